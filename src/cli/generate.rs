//! `genius-engine generate`: batched sampling from prompts on the rollout engine. A prompt with
//! `--n` samples is prefilled once and forked. Output lines are written as sequences finish
//! (each line names its input `index` and `sample`); a line that cannot run (malformed, longer
//! than the context) gets an `error` record and the others complete.

use super::ModelArgs;
use super::prompts::{parse_prompt, tokenize_prompt};
use crate::backend::Backend;
use crate::engine::block_manager::SeqId;
use crate::engine::sampler::SamplingParams;
use crate::engine::scheduler::{Engine, EngineConfig, Finished, Request, StopRules};
use crate::model::LoadedModel;
use crate::transformer::Transformer;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;

/// `generate`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Lines of {"prompt": str} or {"messages": [...]}.
    #[arg(long)]
    pub input: PathBuf,
    /// Lines of {"index", "sample", "text", "token_ids", "logprobs", "finish_reason"}.
    #[arg(long)]
    pub output: PathBuf,
    /// Samples per prompt (the prompt is prefilled once and forked).
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Stop string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep the matched stop string in the text.
    #[arg(long)]
    pub include_stop_str: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV cache capacity: tokens (`32768`), bytes with a unit (`512MiB`, `2GiB`, `1.5GB`), or
    /// `auto` (on a GPU: --gpu-memory-fraction of its memory less what is in use; on the CPU:
    /// 2 GiB).
    #[arg(long, default_value = "auto")]
    pub kv_budget: String,
    /// Tokens per forward pass.
    #[arg(long, default_value_t = 2048)]
    pub max_batch_tokens: usize,
}

/// Bytes of KV cache one token takes (K and V in every layer) at `element_bytes` per value
/// (4 on the CPU backend, 2 on the GPU).
pub fn kv_bytes_per_token(c: &crate::model::ModelConfig, element_bytes: usize) -> usize {
    2 * c.num_layers * c.num_kv_heads * c.head_dim * element_bytes
}

/// The KV budget `auto` gives on a backend without device memory (the CPU).
pub const HOST_AUTO_KV_BYTES: usize = 2 << 30;

/// `--kv-budget` in tokens for the transformer's backend. `auto`: on a GPU,
/// `gpu_memory_fraction` of the device's memory, less what is already in use (weights,
/// other processes) and a reserve for one step's activations and logits at
/// `max_batch_tokens`; on the CPU, 2 GiB. Otherwise as [`parse_kv_budget`].
pub fn resolve_kv_budget<B: Backend>(
    text: &str,
    transformer: &Transformer<B>,
    max_batch_tokens: usize,
    gpu_memory_fraction: f64,
) -> Result<usize> {
    let c = &transformer.config;
    let element_bytes = transformer.backend.element_bytes();
    let per_token = kv_bytes_per_token(c, element_bytes);
    if text.trim() != "auto" {
        return parse_kv_budget(text, per_token);
    }
    // Memory the allocator keeps from earlier phases (training) counts as used until given
    // back.
    transformer.backend.release_cached_memory()?;
    let Some((free, total)) = transformer.backend.memory_info() else {
        return parse_kv_budget(&format!("{HOST_AUTO_KV_BYTES}B"), per_token);
    };
    if !(gpu_memory_fraction > 0.0 && gpu_memory_fraction <= 1.0) {
        bail!("--gpu-memory-fraction {gpu_memory_fraction}: expected a number in (0, 1]");
    }
    // One step's activations: a few hidden-sized and MLP-sized rows per token, plus logits
    // (bf16 and an f32 copy) for every row that samples, and 512 MiB of slack for the
    // library workspaces and the allocator.
    let width = 6 * c.hidden_size + 3 * c.intermediate_size + 3 * c.vocab_size;
    // Decode steps replayed from CUDA graphs keep their activations in the graphs' own memory
    // (one step's worth at the largest bucket), beside the allocator's.
    let graph_rows = match transformer.backend.decode_graph_stats() {
        Some(s) if s.off.is_none() => {
            let buckets = crate::backend::cuda::graphs::BATCH_BUCKETS;
            max_batch_tokens.min(buckets[buckets.len() - 1])
        }
        _ => 0,
    };
    let reserve = (max_batch_tokens + graph_rows) * width * element_bytes + (512 << 20);
    let allowed = (total as f64 * gpu_memory_fraction) as usize;
    let used = total - free;
    let kv_bytes = allowed.saturating_sub(used).saturating_sub(reserve);
    let tokens = kv_bytes / per_token.max(1);
    if tokens == 0 {
        bail!(
            "--kv-budget auto: no room for a KV cache: {:.1} GiB allowed (--gpu-memory-fraction {gpu_memory_fraction} of {:.1} GiB), {:.1} GiB in use, {:.1} GiB reserved for activations",
            allowed as f64 / GIB,
            total as f64 / GIB,
            used as f64 / GIB,
            reserve as f64 / GIB
        );
    }
    eprintln!(
        "KV cache: {tokens} tokens ({:.1} GiB: --gpu-memory-fraction {gpu_memory_fraction} of {:.1} GiB, less {:.1} GiB in use and {:.1} GiB for activations)",
        kv_bytes as f64 / GIB,
        total as f64 / GIB,
        used as f64 / GIB,
        reserve as f64 / GIB
    );
    Ok(tokens)
}

const GIB: f64 = (1u64 << 30) as f64;

/// `--kv-budget` in tokens: a plain number is tokens; a number with a byte unit (B, KB, MB, GB,
/// KiB, MiB, GiB) is divided by `bytes_per_token`.
pub fn parse_kv_budget(text: &str, bytes_per_token: usize) -> Result<usize> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v > 0.0)
        .with_context(|| {
            format!("--kv-budget '{text}': expected a positive number of tokens or bytes")
        })?;
    let scale = match unit.trim() {
        "" => bytes_per_token as f64, // plain tokens
        "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => bail!(
            "--kv-budget '{text}': unknown unit '{other}' (B, KB, MB, GB, KiB, MiB, GiB, or none for tokens)"
        ),
    };
    let tokens = (value * scale / bytes_per_token.max(1) as f64) as usize;
    if tokens == 0 {
        bail!("--kv-budget '{text}' holds no token ({bytes_per_token} bytes each)");
    }
    Ok(tokens)
}

/// The random stream of sample `sample` of input `index`: stable whatever the batch.
pub fn stream_id(index: usize, sample: usize) -> u64 {
    ((index as u64) << 20) | sample as u64
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
    };
    sampling.validate()?;
    if args.n == 0 || args.n >= 1 << 20 {
        bail!("--n must be between 1 and {}", (1 << 20) - 1);
    }
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be positive");
    }
    let stop = StopRules {
        max_new_tokens: args.max_new_tokens,
        stop_strings: args.stop.clone(),
        include_stop_str: args.include_stop_str,
        ..StopRules::default()
    };
    let file = std::fs::File::open(&args.input)
        .with_context(|| format!("{}: cannot open input", args.input.display()))?;
    let lines: Vec<String> = std::io::BufReader::new(file)
        .lines()
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("{}: cannot read", args.input.display()))?;

    let (model, any) = super::load_transformer(&args.model)?;
    crate::with_transformer!(any, t => generate_on(args, sampling, &stop, &lines, &model, t))
}

fn generate_on<B: Backend>(
    args: &GenerateArgs,
    sampling: SamplingParams,
    stop: &StopRules,
    lines: &[String],
    model: &LoadedModel,
    transformer: Transformer<B>,
) -> Result<()> {
    let tok = &model.tokenizer;
    let kv_budget_tokens = resolve_kv_budget(
        &args.kv_budget,
        &transformer,
        args.max_batch_tokens,
        args.model.gpu_memory_fraction,
    )?;
    let mut engine = Engine::new(
        transformer,
        tok,
        EngineConfig {
            block_size: args.block_size,
            kv_budget_tokens,
            max_batch_tokens: args.max_batch_tokens,
        },
    )?;
    let out_file = std::fs::File::create(&args.output)
        .with_context(|| format!("{}: cannot create output", args.output.display()))?;
    let mut out = BufWriter::new(out_file);
    let mut failures = Vec::new();
    let mut fail =
        |out: &mut BufWriter<std::fs::File>, index: usize, e: anyhow::Error| -> Result<()> {
            let msg = format!("{}:{}: {e:#}", args.input.display(), index + 1);
            serde_json::to_writer(&mut *out, &json!({"index": index, "error": msg}))?;
            out.write_all(b"\n")?;
            failures.push(msg);
            Ok(())
        };

    // Phase 1: tokenize every line; prompts with several samples get a prefill-only parent
    // holding all but the last prompt token.
    let mut prompts: Vec<(usize, Vec<u32>)> = Vec::new();
    let mut parents: HashMap<usize, SeqId> = HashMap::new();
    for (index, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(line)
            .context("not valid JSON")
            .and_then(|v| {
                let obj = v.as_object().context("expected a JSON object")?;
                tokenize_prompt(tok, &parse_prompt(obj)?)
            });
        let ids = match parsed {
            Ok(ids) if ids.is_empty() => {
                fail(&mut out, index, anyhow::anyhow!("the prompt has no tokens"))?;
                continue;
            }
            Ok(ids) => ids,
            Err(e) => {
                fail(&mut out, index, e)?;
                continue;
            }
        };
        if args.n > 1 && ids.len() > 1 {
            let parent = engine.submit(Request {
                tokens: ids[..ids.len() - 1].to_vec(),
                parent: None,
                sampling,
                stop: StopRules {
                    max_new_tokens: 0,
                    ..StopRules::default()
                },
                stream: stream_id(index, 0),
            });
            match parent {
                Ok(p) => {
                    parents.insert(index, p);
                }
                Err(e) => {
                    fail(&mut out, index, e)?;
                    continue;
                }
            }
        }
        prompts.push((index, ids));
    }
    engine.run_until_idle()?;

    // Phase 2: the samples, forked from their parent where there is one.
    let started = std::time::Instant::now();
    let mut owners: HashMap<SeqId, (usize, usize)> = HashMap::new();
    for (index, ids) in &prompts {
        for sample in 0..args.n {
            let request = match parents.get(index) {
                Some(&p) => Request {
                    tokens: ids[ids.len() - 1..].to_vec(),
                    parent: Some(p),
                    sampling,
                    stop: stop.clone(),
                    stream: stream_id(*index, sample),
                },
                None => Request {
                    tokens: ids.clone(),
                    parent: None,
                    sampling,
                    stop: stop.clone(),
                    stream: stream_id(*index, sample),
                },
            };
            match engine.submit(request) {
                Ok(seq) => {
                    owners.insert(seq, (*index, sample));
                }
                Err(e) => {
                    fail(&mut out, *index, e)?;
                    break;
                }
            }
        }
    }
    let total = owners.len() as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} samples  {msg}")
            .expect("static template"),
    );
    let generated_before = engine.tokens_generated;
    let mut peak_shared = 0;
    while engine.num_active() > 0 {
        let done: Vec<Finished> = engine.step()?;
        peak_shared = peak_shared.max(engine.stats().shared);
        for f in done {
            let Some(&(index, sample)) = owners.get(&f.seq) else {
                continue;
            };
            let record = json!({
                "index": index,
                "sample": sample,
                "text": f.text,
                "token_ids": f.tokens,
                "logprobs": f.logprobs,
                "finish_reason": f.finish_reason.as_str(),
            });
            serde_json::to_writer(&mut out, &record)?;
            out.write_all(b"\n")?;
            if let crate::engine::scheduler::FinishReason::Error(e) = &f.finish_reason {
                failures.push(format!("{}:{}: {e}", args.input.display(), index + 1));
            }
            engine.release(f.seq)?;
            bar.inc(1);
        }
        out.flush()
            .with_context(|| format!("{}: write failed", args.output.display()))?;
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "{:.0} tokens/s",
            (engine.tokens_generated - generated_before) as f64 / secs
        ));
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let generated = engine.tokens_generated - generated_before;
    eprintln!(
        "generated {total} samples, {generated} tokens in {secs:.2}s ({:.0} tokens/s); {} preemptions; peak shared KV blocks {peak_shared}",
        generated as f64 / secs.max(1e-9),
        engine.preemptions
    );
    if let Some(g) = engine.model().backend.decode_graph_stats() {
        eprintln!("decode graphs: {}", g.summary());
    }
    if !failures.is_empty() {
        bail!(
            "{} input line(s) failed (the others were written to {}):\n  {}",
            failures.len(),
            args.output.display(),
            failures.join("\n  ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_kv_budget;

    #[test]
    fn kv_budget_in_tokens_or_bytes() {
        assert_eq!(parse_kv_budget("32768", 1000).unwrap(), 32768);
        assert_eq!(parse_kv_budget("2MiB", 1024).unwrap(), 2048);
        assert_eq!(parse_kv_budget("1.5GB", 1_000_000).unwrap(), 1500);
        assert_eq!(parse_kv_budget(" 4096 B ", 4).unwrap(), 1024);
        for bad in ["", "-5", "0", "abc", "3 parsecs", "1B"] {
            let err = parse_kv_budget(bad, 46080).unwrap_err().to_string();
            assert!(err.contains("--kv-budget"), "{bad:?}: {err}");
        }
    }
}
