//! [`config_from_gguf`]: the [`ModelConfig`] rebuilt from `{arch}.*` metadata and the tensor
//! table, and the check that every tensor the transformer needs has the shape it implies.

use super::file::{GgufFile, GgufValue};
use super::weights::{GgufWeights, gguf_tensor_name};
use crate::model::TensorSource;
use crate::model::config::{Architecture, ModelConfig, RopeScaling};
use anyhow::{Context, Result, bail};
use std::path::Path;

/// Upper bound on any one model dimension or count read from metadata (guards the arithmetic
/// on corrupt files; real models are far below it).
const MAX_MODEL_DIMENSION: usize = 1 << 24;

/// Builds the [`ModelConfig`] from `{arch}.*` metadata and the tensor table (tied embeddings,
/// q/k/v biases, `rope_freqs.weight`), and validates it.
pub fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig> {
    let path = file.path();
    let p = path.display();
    let arch_name = file.require_str("general.architecture")?;
    let arch = match arch_name {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => bail!(
            "{p}: unsupported architecture '{other}' (general.architecture; supported: llama, \
             qwen2)"
        ),
    };
    let key = |k: &str| format!("{arch_name}.{k}");

    let hidden_size = file.require_usize(&key("embedding_length"))?;
    let num_heads = file.require_usize(&key("attention.head_count"))?;
    if num_heads == 0 {
        bail!("{p}: {} must be positive", key("attention.head_count"));
    }
    let num_kv_heads = file
        .get_usize(&key("attention.head_count_kv"))?
        .unwrap_or(num_heads);
    let rope_dims = file.get_usize(&key("rope.dimension_count"))?;
    let head_dim = match file.get_usize(&key("attention.key_length"))? {
        Some(d) => d,
        None => rope_dims.unwrap_or(hidden_size / num_heads),
    };
    if let Some(r) = rope_dims
        && r != head_dim
    {
        bail!(
            "{p}: {} = {r} differs from the head dimension {head_dim}: partial rotary embeddings \
             are not supported",
            key("rope.dimension_count")
        );
    }
    if let Some(kind) = file.get_str(&key("rope.scaling.type"))?
        && kind != "none"
    {
        bail!(
            "{p}: {} = '{kind}' is not supported (only LLaMA-3 scaling through \
             rope_freqs.weight)",
            key("rope.scaling.type")
        );
    }

    let vocab_size = match file
        .get("tokenizer.ggml.tokens")
        .and_then(GgufValue::as_array)
    {
        Some(tokens) => tokens.len(),
        None => file.get_usize(&key("vocab_size"))?.with_context(|| {
            format!(
                "{p}: missing metadata key 'tokenizer.ggml.tokens' (or '{}')",
                key("vocab_size")
            )
        })?,
    };
    if let Some(embd) = file.tensor("token_embd.weight") {
        let rows = embd.hf_shape().first().copied().unwrap_or(0);
        if rows != vocab_size {
            bail!(
                "{p}: token_embd.weight has {rows} rows but the vocabulary has {vocab_size} \
                 tokens"
            );
        }
    }

    let rope_scaling = match file.tensor("rope_freqs.weight") {
        None => None,
        Some(info) => {
            if info.n_elements != head_dim / 2 {
                bail!(
                    "{p}: rope_freqs.weight has {} values, expected head_dim / 2 = {}",
                    info.n_elements,
                    head_dim / 2
                );
            }
            Some(RopeScaling::FreqFactors(
                file.read_f32("rope_freqs.weight")?,
            ))
        }
    };

    let intermediate_size = file.require_usize(&key("feed_forward_length"))?;
    let num_layers = file.require_usize(&key("block_count"))?;
    for (what, value) in [
        ("embedding_length", hidden_size),
        ("feed_forward_length", intermediate_size),
        ("block_count", num_layers),
        ("attention.head_count", num_heads),
        ("attention.head_count_kv", num_kv_heads),
        ("head dimension", head_dim),
    ] {
        if value > MAX_MODEL_DIMENSION {
            bail!(
                "{p}: {arch_name}.{what} = {value} is absurd (more than {MAX_MODEL_DIMENSION}); \
                 the file is corrupt"
            );
        }
    }

    let cfg = ModelConfig {
        arch,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: file.require_f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
        rope_theta: file.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32,
        rope_scaling,
        max_position_embeddings: file.require_usize(&key("context_length"))?,
        tie_word_embeddings: file.tensor("output.weight").is_none(),
        attention_bias: arch == Architecture::Qwen2 || file.tensor("blk.0.attn_q.bias").is_some(),
    };
    cfg.validate(path)?;
    Ok(cfg)
}

/// Checks that every tensor the transformer needs is present with the shape `config` implies.
/// Stops at the first problem (a corrupt layer count must not make it build a huge list).
pub(super) fn check_tensor_shapes(
    path: &Path,
    config: &ModelConfig,
    weights: &GgufWeights,
) -> Result<()> {
    let (h, i, v) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let q = config.num_heads * config.head_dim;
    let kv = config.num_kv_heads * config.head_dim;
    let check = |name: &str, shape: &[usize]| -> Result<()> {
        let gguf = gguf_tensor_name(name).unwrap_or_else(|| name.to_string());
        match weights.shape(name) {
            None => bail!("{}: missing tensor {gguf} ({name})", path.display()),
            Some(s) if s != shape => bail!(
                "{}: tensor {gguf} ({name}) has shape {s:?}, expected {shape:?} from the config",
                path.display()
            ),
            Some(_) => Ok(()),
        }
    };
    check("model.embed_tokens.weight", &[v, h])?;
    check("model.norm.weight", &[h])?;
    if !config.tie_word_embeddings {
        check("lm_head.weight", &[v, h])?;
    }
    for l in 0..config.num_layers {
        let name = |s: &str| format!("model.layers.{l}.{s}");
        check(&name("input_layernorm.weight"), &[h])?;
        check(&name("self_attn.q_proj.weight"), &[q, h])?;
        check(&name("self_attn.k_proj.weight"), &[kv, h])?;
        check(&name("self_attn.v_proj.weight"), &[kv, h])?;
        check(&name("self_attn.o_proj.weight"), &[h, q])?;
        check(&name("post_attention_layernorm.weight"), &[h])?;
        check(&name("mlp.gate_proj.weight"), &[i, h])?;
        check(&name("mlp.up_proj.weight"), &[i, h])?;
        check(&name("mlp.down_proj.weight"), &[h, i])?;
        if config.attention_bias {
            check(&name("self_attn.q_proj.bias"), &[q])?;
            check(&name("self_attn.k_proj.bias"), &[kv])?;
            check(&name("self_attn.v_proj.bias"), &[kv])?;
        }
    }
    Ok(())
}
