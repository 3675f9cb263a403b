//! Saving a model as a Hugging Face checkpoint directory that this engine
//! ([`load_model`](super::load_model)), transformers and vLLM load back.
//!
//! What this file owns:
//!
//! - The file set ([`save_checkpoint`]): `config.json` (the architecture from
//!   [`ModelConfig::to_hf_value`] plus `torch_dtype` and the BOS/EOS ids), `model.safetensors`
//!   (one file, one dtype, `"format": "pt"` metadata as transformers requires, `lm_head.weight`
//!   left out when the embeddings are tied), `tokenizer.json` (the `tokenizers` serialisation,
//!   which also covers tokenizers rebuilt from GGUF metadata), `tokenizer_config.json` (chat
//!   template, BOS/EOS, `model_max_length`, `PreTrainedTokenizerFast`, the added tokens),
//!   `special_tokens_map.json` and `generation_config.json` (every EOS id).
//! - The check of the weights against the config before anything touches the disk
//!   ([`checkpoint_tensors`]): every tensor present with its shape, nothing unknown, and the
//!   config expressible as a HF config at all.
//! - Atomic publication: everything is written and fsynced in a sibling temporary directory
//!   `<dir>.tmp-<pid>-<n>`, which is then renamed to `<dir>`. An existing checkpoint at `<dir>`
//!   is first renamed aside to `<dir>.old-<pid>-<n>` and removed once the new one is in place,
//!   so `<dir>` never names a half-written checkpoint. A crash between the two renames leaves
//!   no `<dir>` at all, the old checkpoint complete at `<dir>.old-*` and the new one complete at
//!   `<dir>.tmp-*`; nothing cleans such leftovers up automatically.

use super::safetensors::{Dtype, write_safetensors_with_metadata};
use super::{Architecture, HostTensor, ModelConfig, RopeScaling, TextTokenizer};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Name of the embedding tensor, which the LM head shares when embeddings are tied.
const EMBED: &str = "model.embed_tokens.weight";
/// Name of the LM head tensor.
const LM_HEAD: &str = "lm_head.weight";

/// Numbers the temporary directories of one process, so that concurrent saves never share one.
static SAVE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Saves a model as a HF checkpoint directory at `dir` (see the module comment for the files
/// and the atomic replacement of an existing checkpoint).
///
/// `weights` are in HF names and layout, as every [`TensorSource`](super::TensorSource) gives
/// them, in any order; they are stored as `dtype` (`bf16`/`f16` round to nearest even). When
/// `config.tie_word_embeddings` is set, `lm_head.weight` may be given only if it equals the
/// embedding, and is not written. Missing parent directories are created.
///
/// Refuses, before writing anything: a weight missing, misshapen, unknown or given twice; a
/// config a HF config cannot express (GGUF's per-frequency RoPE factors, a llama with q/k/v
/// biases, a qwen2 without them); a tokenizer with more tokens than the embedding has rows; an
/// existing `dir` that is not a directory, or a non-empty directory without `config.json`
/// (a checkpoint is only ever replaced by a checkpoint). Errors name the paths involved.
pub fn save_checkpoint(
    dir: &Path,
    config: &ModelConfig,
    tokenizer: &TextTokenizer,
    weights: &[(String, HostTensor)],
    dtype: Dtype,
) -> Result<()> {
    save(dir, config, tokenizer, weights, dtype)
        .with_context(|| format!("cannot save the checkpoint {}", dir.display()))
}

fn save(
    dir: &Path,
    config: &ModelConfig,
    tokenizer: &TextTokenizer,
    weights: &[(String, HostTensor)],
    dtype: Dtype,
) -> Result<()> {
    let tensors = checkpoint_tensors(config, weights)?;
    let files = metadata_files(config, tokenizer, dtype)?;
    publish_dir(dir, |tmp| {
        for (name, bytes) in &files {
            write_synced(&tmp.join(name), bytes)?;
        }
        write_safetensors_with_metadata(
            &tmp.join("model.safetensors"),
            &tensors,
            dtype,
            &[("format", "pt")],
        )
    })
}

/// HF names and shapes of every tensor a checkpoint of `config` stores, in the order
/// [`save_checkpoint`] writes them (`lm_head.weight` only when the embeddings are untied).
pub fn expected_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let c = config;
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let q = c.num_heads * c.head_dim;
    let kv = c.num_kv_heads * c.head_dim;
    let mut out = vec![(EMBED.to_string(), vec![v, h])];
    for l in 0..c.num_layers {
        let mut push = |part: &str, shape: Vec<usize>| {
            out.push((crate::transformer::layer_tensor_name(l, part), shape))
        };
        push("input_layernorm.weight", vec![h]);
        push("self_attn.q_proj.weight", vec![q, h]);
        push("self_attn.k_proj.weight", vec![kv, h]);
        push("self_attn.v_proj.weight", vec![kv, h]);
        if c.attention_bias {
            push("self_attn.q_proj.bias", vec![q]);
            push("self_attn.k_proj.bias", vec![kv]);
            push("self_attn.v_proj.bias", vec![kv]);
        }
        push("self_attn.o_proj.weight", vec![h, q]);
        push("post_attention_layernorm.weight", vec![h]);
        push("mlp.gate_proj.weight", vec![i, h]);
        push("mlp.up_proj.weight", vec![i, h]);
        push("mlp.down_proj.weight", vec![h, i]);
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        out.push((LM_HEAD.to_string(), vec![v, h]));
    }
    out
}

/// Checks `weights` against `config` (see [`save_checkpoint`]) and returns the tensors to
/// store, in [`expected_tensors`] order.
pub fn checkpoint_tensors<'a>(
    config: &ModelConfig,
    weights: &'a [(String, HostTensor)],
) -> Result<Vec<(&'a str, &'a HostTensor)>> {
    check_expressible(config)?;
    let mut by_name: HashMap<&str, &HostTensor> = HashMap::with_capacity(weights.len());
    for (name, tensor) in weights {
        if by_name.insert(name.as_str(), tensor).is_some() {
            bail!("tensor '{name}' is given twice");
        }
    }
    let mut out = Vec::with_capacity(weights.len());
    for (name, shape) in expected_tensors(config) {
        let (name, tensor) = by_name
            .remove_entry(name.as_str())
            .with_context(|| format!("tensor '{name}' (shape {shape:?}) is missing"))?;
        if tensor.data.len() != shape.iter().product::<usize>() {
            bail!(
                "tensor '{name}' holds {} values but its shape {:?} needs {}",
                tensor.data.len(),
                tensor.shape,
                tensor.shape.iter().product::<usize>()
            );
        }
        if tensor.shape != shape {
            bail!(
                "tensor '{name}' has shape {:?}, the config implies {shape:?}",
                tensor.shape
            );
        }
        out.push((name, tensor));
    }
    if config.tie_word_embeddings
        && let Some(head) = by_name.remove(LM_HEAD)
    {
        let embed = out[0].1;
        let same_bits = head.shape == embed.shape
            && head.data.len() == embed.data.len()
            && head
                .data
                .iter()
                .zip(&embed.data)
                .all(|(a, b)| a.to_bits() == b.to_bits());
        if !same_bits {
            bail!(
                "tie_word_embeddings is set but '{LM_HEAD}' differs from '{EMBED}': untie the \
                 config or leave the LM head out"
            );
        }
    }
    if !by_name.is_empty() {
        let mut unknown: Vec<&str> = by_name.into_keys().collect();
        unknown.sort_unstable();
        let shown = unknown.len().min(5);
        bail!(
            "{} tensor(s) the config does not describe: {}{}",
            unknown.len(),
            unknown[..shown].join(", "),
            if unknown.len() > shown { ", ..." } else { "" }
        );
    }
    Ok(out)
}

/// Refuses configs whose meaning a HF `config.json` of their architecture cannot carry.
fn check_expressible(config: &ModelConfig) -> Result<()> {
    config.validate(Path::new("the model config"))?;
    if let Some(RopeScaling::FreqFactors(_)) = config.rope_scaling {
        bail!(
            "the config's RoPE scaling is a list of per-frequency factors (GGUF \
             rope_freqs.weight), which a HF config cannot express (it needs the llama3 \
             parameters)"
        );
    }
    match config.arch {
        Architecture::Llama if config.attention_bias => bail!(
            "a llama with q/k/v biases cannot be expressed as a HF config (its attention_bias \
             also puts a bias on o_proj)"
        ),
        Architecture::Qwen2 if !config.attention_bias => {
            bail!("a qwen2 without q/k/v biases cannot be expressed as a HF config")
        }
        _ => Ok(()),
    }
}

/// transformers' name of a storage dtype (`torch_dtype`).
fn torch_dtype(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "float32",
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
    }
}

/// An id field: absent for none, the id for one, the list for several.
fn ids_json(ids: &[u32]) -> Option<Value> {
    match ids {
        [] => None,
        [id] => Some(json!(id)),
        ids => Some(json!(ids)),
    }
}

/// Pretty JSON with a final newline, as transformers writes its files.
fn json_bytes(v: &Value) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(v)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Every file of the checkpoint but the weights, as (file name, contents).
fn metadata_files(
    config: &ModelConfig,
    tokenizer: &TextTokenizer,
    dtype: Dtype,
) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let tokens = tokenizer.vocab_size();
    if tokens > config.vocab_size {
        bail!(
            "the tokenizer has {tokens} tokens but the embedding only {} rows (vocab_size)",
            config.vocab_size
        );
    }
    let bos_id = tokenizer.bos_token.as_ref().map(|(_, id)| *id);
    let eos_ids = ids_json(&tokenizer.eos_ids);

    let mut cfg = config.to_hf_value();
    cfg["torch_dtype"] = json!(torch_dtype(dtype));
    if let Some(id) = bos_id {
        cfg["bos_token_id"] = json!(id);
    }
    if let Some(ids) = &eos_ids {
        cfg["eos_token_id"] = ids.clone();
    }

    let mut generation = json!({});
    if let Some(id) = bos_id {
        generation["bos_token_id"] = json!(id);
    }
    if let Some(ids) = &eos_ids {
        generation["eos_token_id"] = ids.clone();
    }

    let inner = tokenizer.inner();
    let tokenizer_json = inner.to_string(false).map_err(|e| {
        anyhow::anyhow!(
            "cannot serialise the tokenizer of {}: {e}",
            tokenizer.origin.display()
        )
    })?;
    let mut added: Vec<_> = inner.get_added_tokens_decoder().into_iter().collect();
    added.sort_by_key(|(id, _)| *id);
    let added_tokens_decoder: serde_json::Map<String, Value> = added
        .into_iter()
        .map(|(id, t)| {
            let entry = json!({
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            });
            (id.to_string(), entry)
        })
        .collect();
    let token_text = |t: &Option<(String, u32)>| match t {
        Some((text, _)) => json!(text),
        None => Value::Null,
    };
    // `null` rather than absent: the loader would otherwise take the first id of
    // generation_config.json as the token.
    let mut tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.max_position_embeddings,
        // transformers' default (true) would make decode() differ from the engine's.
        "clean_up_tokenization_spaces": false,
        "bos_token": token_text(&tokenizer.bos_token),
        "eos_token": token_text(&tokenizer.eos_token),
        "added_tokens_decoder": added_tokens_decoder,
    });
    if let Some(template) = &tokenizer.chat_template {
        tokenizer_config["chat_template"] = json!(template);
    }

    let mut special_tokens_map = json!({});
    for (field, token) in [
        ("bos_token", &tokenizer.bos_token),
        ("eos_token", &tokenizer.eos_token),
    ] {
        if let Some((text, _)) = token {
            special_tokens_map[field] = json!(text);
        }
    }

    Ok(vec![
        ("config.json", json_bytes(&cfg)?),
        ("generation_config.json", json_bytes(&generation)?),
        ("tokenizer.json", tokenizer_json.into_bytes()),
        ("tokenizer_config.json", json_bytes(&tokenizer_config)?),
        ("special_tokens_map.json", json_bytes(&special_tokens_map)?),
    ])
}

/// Creates `path`, writes `bytes` and fsyncs it. Errors name the file.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().with_context(|| format!("{}: cannot write", path.display()))
}

/// Flushes a directory's entries (new files, renames) to disk; a no-op where directories
/// cannot be opened (not Unix).
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("{}: cannot sync the directory", dir.display()))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Fills a fresh sibling temporary directory with `fill` and renames it to `dir` (see the module
/// comment). The temporary directory is removed when anything fails before the rename.
fn publish_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dir
        .file_name()
        .with_context(|| format!("{}: not a directory name", dir.display()))?
        .to_string_lossy()
        .into_owned();
    let parent: PathBuf = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if parent.exists() && !parent.is_dir() {
        bail!("{}: the parent is not a directory", parent.display());
    }
    fs::create_dir_all(&parent).with_context(|| {
        format!(
            "{}: the parent directory cannot be created",
            parent.display()
        )
    })?;
    let existing = match fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            check_replaceable(dir)?;
            true
        }
        Ok(_) => bail!(
            "{} exists and is not a directory; refusing to replace it",
            dir.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("{}: cannot inspect", dir.display())),
    };

    let n = SAVE_COUNTER.fetch_add(1, Ordering::Relaxed);
    let suffix = format!("{}-{n}", std::process::id());
    let tmp = parent.join(format!("{name}.tmp-{suffix}"));
    fs::create_dir(&tmp).with_context(|| {
        format!(
            "{}: cannot create the temporary directory (is {} writable?)",
            tmp.display(),
            parent.display()
        )
    })?;
    let filled = fill(&tmp).and_then(|()| sync_dir(&tmp));
    if let Err(e) = filled {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }

    if !existing {
        if let Err(e) = fs::rename(&tmp, dir) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()));
        }
        return sync_dir(&parent);
    }
    let old = parent.join(format!("{name}.old-{suffix}"));
    if let Err(e) = fs::rename(dir, &old) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e).with_context(|| {
            format!(
                "cannot move the existing checkpoint {} aside to {}",
                dir.display(),
                old.display()
            )
        });
    }
    if let Err(e) = fs::rename(&tmp, dir) {
        // Put the old checkpoint back; the new one is lost.
        let restored = fs::rename(&old, dir);
        let _ = fs::remove_dir_all(&tmp);
        let e = anyhow::Error::new(e).context(format!(
            "cannot rename {} to {}",
            tmp.display(),
            dir.display()
        ));
        return Err(match restored {
            Ok(()) => e,
            Err(r) => e.context(format!(
                "and the previous checkpoint could not be moved back from {}: {r}",
                old.display()
            )),
        });
    }
    sync_dir(&parent)?;
    fs::remove_dir_all(&old).with_context(|| {
        format!(
            "the new checkpoint is in place, but the previous one could not be removed from {}",
            old.display()
        )
    })?;
    sync_dir(&parent)
}

/// An existing directory may be replaced only when it is empty or holds a `config.json` (a
/// checkpoint), never an unrelated directory given by mistake.
fn check_replaceable(dir: &Path) -> Result<()> {
    let mut entries =
        fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?;
    if entries.next().is_none() || dir.join("config.json").is_file() {
        return Ok(());
    }
    bail!(
        "{} exists and is neither empty nor a checkpoint (no config.json); refusing to replace it",
        dir.display()
    )
}
