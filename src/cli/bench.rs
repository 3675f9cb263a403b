//! `genius-engine bench`: throughput measurements (criterion benches cover the same ground
//! for `cargo bench`). Numbers go to stdout as a table and one JSON line.

use super::ModelArgs;
use crate::backend::Backend;
use crate::backend::cpu::PackedMatrix;
use crate::backend::cuda::{CudaLinear, CudaTensor};
use crate::engine::sampler::SamplingParams;
use crate::engine::{Engine, EngineConfig, Request, StopRules};
use crate::model::{LoadedModel, ModelConfig};
use crate::transformer::{PackedBatch, Transformer};
use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use std::time::Instant;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchKind {
    /// Prefill of one prompt through the whole model, plus GEMM throughput on its shapes.
    Forward,
    /// Batched decode on the rollout engine at several batch sizes, and the foresight pattern
    /// (one prompt forked several ways), with KV allocator statistics.
    Rollout,
    /// ACO optimizer steps on synthetic pairs: forward + explicit backward + AdamW, tokens/s.
    Train,
    /// `eval` on the bundled grade-school questions: questions/s and tokens/s (`--new-tokens`
    /// per answer, `--batches` questions, greedy).
    Eval,
    /// The fused log-prob gathering on the model's LM head (the reference pass and training):
    /// forward and backward over `--batches` row counts, achieved bandwidth on the logits it
    /// writes and reads, and device memory held.
    Logprobs,
    /// The CUDA backend's GEMMs (`linear`, cuBLASLt) on the model's layer shapes at
    /// `--batches` row counts (default 64, 256, 512 as in decode, and 8192 as in training):
    /// device time per call, GB/s of weights and activations, TFLOP/s.
    Gemm,
}

/// `bench`'s flags.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub what: BenchKind,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length (`forward`: the prefill; `rollout`: each sequence's prompt).
    #[arg(long)]
    pub tokens: Option<usize>,
    /// Timed repetitions after one warm-up (`forward`; `train`: optimizer steps).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Concurrent sequences to measure (`rollout`), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub batches: Vec<usize>,
    /// New tokens per sequence (`rollout`).
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Ways the foresight prompt is forked (`rollout`); 0 skips that part.
    #[arg(long, default_value_t = 8)]
    pub forks: usize,
    /// Prompt length of the foresight pattern (`rollout`).
    #[arg(long, default_value_t = 256)]
    pub fork_prompt_tokens: usize,
    /// Tokens per forward/backward pass (`train`); default: the trainer's default, or the
    /// whole step on a GPU.
    #[arg(long)]
    pub micro_batch_tokens: Option<usize>,
}

/// Median of a non-empty list.
pub fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// The model's linear-layer shapes `(name, out, in, uses per layer)`; the LM head runs once
/// per pass, not per layer (0).
pub fn linear_shapes(c: &ModelConfig) -> Vec<(&'static str, usize, usize, usize)> {
    let (h, q, kv) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
    );
    vec![
        ("q_proj", q, h, 1),
        ("k/v_proj", kv, h, 2),
        ("o_proj", h, q, 1),
        ("gate/up_proj", c.intermediate_size, h, 2),
        ("down_proj", h, c.intermediate_size, 1),
        ("lm_head", c.vocab_size, h, 0),
    ]
}

/// GFLOP/s of `[n, in] x [out, in]^T` on the CPU backend's linear layer (weights packed
/// once, as the model holds them; median of `iters`).
pub fn gemm_gflops(n: usize, out: usize, inp: usize, iters: usize) -> f64 {
    let a: Vec<f32> = (0..n * inp)
        .map(|i| ((i % 17) as f32 - 8.0) * 0.01)
        .collect();
    let b: Vec<f32> = (0..out * inp)
        .map(|i| ((i % 13) as f32 - 6.0) * 0.01)
        .collect();
    let w = PackedMatrix::pack(&b, out, inp);
    let mut c = vec![0f32; n * out];
    w.matmul(&mut c, &a, n);
    let mut times: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let t = Instant::now();
            w.matmul(&mut c, &a, n);
            t.elapsed().as_secs_f64()
        })
        .collect();
    2.0 * (n * out * inp) as f64 / median(&mut times) / 1e9
}

pub fn run(args: &BenchArgs) -> Result<()> {
    match args.what {
        BenchKind::Forward => forward(&args.model, args.tokens.unwrap_or(512), args.iters),
        BenchKind::Rollout => rollout(args),
        BenchKind::Train => train(args),
        BenchKind::Eval => eval(args),
        BenchKind::Logprobs => logprobs(args),
        BenchKind::Gemm => gemm(args),
    }
}

/// `bench gemm`: layer 0's fused projections and the LM head through the CUDA backend's
/// `linear` (cuBLASLt; `GENIUS_CUDA_GEMM_TUNE=1` times its candidate algorithms first;
/// `GENIUS_CUDA_SKINNY_GEMM=1` runs the shapes it takes on the skinny split-K kernels), for
/// each `--batches` entry as a row count; device time per call from events over `--iters`
/// calls queued back to back (at least 20). Bytes counted: the weight, the input rows and the
/// output rows, once each (bf16).
fn gemm(args: &BenchArgs) -> Result<()> {
    let (model, any) = super::load_transformer(&args.model)?;
    let t = match any {
        super::AnyTransformer::Cuda(t) => t,
        super::AnyTransformer::Cpu(_) => bail!(
            "bench gemm times the CUDA backend's cuBLASLt GEMMs: run it with --device cuda (on the CPU, bench forward prints a GEMM table)"
        ),
    };
    let rows: Vec<usize> = if args.batches == [1, 8, 32, 64] {
        vec![64, 256, 512, 8192]
    } else {
        args.batches.clone()
    };
    let be = &t.backend;
    let c = &model.config;
    let layer = t
        .weights
        .layers
        .first()
        .context("bench gemm: the model has no layers")?;
    let reps = args.iters.max(20);
    println!("device        {}", t.backend_name());
    println!(
        "model         {} (hidden {}, ffn {})",
        model.name, c.hidden_size, c.intermediate_size
    );
    println!(
        "gemms         {}",
        if be.skinny_gemm() {
            "skinny split-K kernels where they apply (at most 512 rows), else cuBLASLt"
        } else {
            "cuBLASLt"
        }
    );
    println!("     rows   gemm           out x in        us/call     GB/s   TFLOP/s");
    let mut results = Vec::new();
    for &n in &rows {
        let shapes: [(&str, &CudaLinear, Option<&CudaTensor>); 5] = [
            ("qkv_proj", &layer.qkv_proj, layer.qkv_bias.as_ref()),
            ("o_proj", &layer.o_proj, None),
            ("gate_up_proj", &layer.gate_up_proj, None),
            ("down_proj", &layer.down_proj, None),
            ("lm_head", t.lm_head(), None),
        ];
        for (name, w, bias) in shapes {
            let (out, inp) = (w.out_features, w.in_features);
            let x = be.upload(&crate::model::HostTensor::new(
                vec![n, inp],
                (0..n * inp)
                    .map(|i| ((i * 2654435761usize % 1000) as f32 / 1000.0 - 0.5) * 0.5)
                    .collect(),
            ))?;
            // One call first: plans (and, when tuning, the timed choice) are made there.
            be.linear(&x, w, bias)?;
            let secs = be.device_seconds_per_call(reps, || be.linear(&x, w, bias).map(drop))?;
            let bytes = 2.0 * (out * inp + n * inp + n * out) as f64;
            let flops = 2.0 * (n * out * inp) as f64;
            println!(
                "{n:>9}   {name:<12} {:>13}   {:>10.2}   {:>6.0}   {:>7.1}",
                format!("{out} x {inp}"),
                secs * 1e6,
                bytes / secs / 1e9,
                flops / secs / 1e12
            );
            results.push(serde_json::json!({
                "rows": n, "gemm": name, "out": out, "in": inp, "us_per_call": secs * 1e6,
                "gb_s": bytes / secs / 1e9, "tflop_s": flops / secs / 1e12,
            }));
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "gemm", "device": t.backend_name(), "model": model.name,
            "tuned": std::env::var(crate::backend::cuda::gemm::TUNE_ENV).is_ok_and(|v| v.trim() == "1"),
            "skinny": be.skinny_gemm(),
            "results": results,
        })
    );
    Ok(())
}

/// A fixed pseudo-random prompt of real token ids (`salt` picks one of many).
pub fn synthetic_prompt(len: usize, vocab: usize, salt: u64) -> Vec<u32> {
    (0..len as u64)
        .map(|i| (((i + salt * 7919).wrapping_mul(2654435761) >> 7) % vocab as u64) as u32)
        .collect()
}

fn rollout(args: &BenchArgs) -> Result<()> {
    let prompt_len = args.tokens.unwrap_or(128);
    if prompt_len < 2 || args.new_tokens == 0 || args.batches.contains(&0) {
        bail!("--tokens must be at least 2, --new-tokens and every --batches entry positive");
    }
    let (model, any) = super::load_transformer(&args.model)?;
    crate::with_transformer!(any, t => rollout_on(args, &model, t))
}

/// Bytes one decode step must read at least: every linear weight (the LM head included; the
/// embedding table only by rows) plus the K and V of every cached token of the batch.
pub fn decode_step_bytes(c: &ModelConfig, element_bytes: usize, kv_tokens: f64) -> f64 {
    let linear: usize = linear_shapes(c)
        .iter()
        .map(|&(_, out, inp, per_layer)| {
            out * inp
                * if per_layer == 0 {
                    1
                } else {
                    per_layer * c.num_layers
                }
        })
        .sum();
    let kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * element_bytes;
    (linear * element_bytes) as f64 + kv_tokens * kv_per_token as f64
}

fn rollout_on<B: Backend>(
    args: &BenchArgs,
    model: &LoadedModel,
    transformer: Transformer<B>,
) -> Result<()> {
    let prompt_len = args.tokens.unwrap_or(128);
    let vocab = model.config.vocab_size;
    let element_bytes = transformer.backend.element_bytes();
    let max_batch = args
        .batches
        .iter()
        .copied()
        .max()
        .unwrap_or(1)
        .max(args.forks);
    let per_seq = prompt_len.max(args.fork_prompt_tokens) + args.new_tokens + 16;
    let config = EngineConfig {
        block_size: 16,
        kv_budget_tokens: max_batch * per_seq + args.fork_prompt_tokens,
        max_batch_tokens: 4096,
    };
    let mut engine = Engine::new(transformer, &model.tokenizer, config)?;
    let sampling = SamplingParams {
        seed: 7,
        ..SamplingParams::default()
    };
    let stop = StopRules {
        max_new_tokens: args.new_tokens,
        ignore_eos: true,
        ..StopRules::default()
    };
    println!("device        {}", engine.model().backend_name());
    println!("model         {}", model.name);
    println!(
        "rollout: prompt {prompt_len} tokens, {} new tokens per sequence, sampling T=1",
        args.new_tokens
    );
    println!(
        "  sequences   prefill s   decode s   decode tokens/s   step ms   host ms   (stops ms)   GB/s (weights + KV read)   KV blocks used (peak)"
    );
    let mut rows = Vec::new();
    for &batch in &args.batches {
        // Prefill every prompt (all but its last token), then time the decode of the rest.
        let t0 = Instant::now();
        let parents = (0..batch)
            .map(|b| {
                engine.submit(Request {
                    tokens: synthetic_prompt(prompt_len, vocab, b as u64),
                    parent: None,
                    sampling,
                    stop: StopRules {
                        max_new_tokens: 0,
                        ..StopRules::default()
                    },
                    stream: b as u64,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        engine.run_until_idle()?;
        let prefill_s = t0.elapsed().as_secs_f64();
        for &p in &parents {
            engine.continue_sequence(p, sampling, stop.clone())?;
        }
        let generated0 = engine.tokens_generated;
        let (step_s0, model_s0, accept_s0) = (
            engine.step_seconds,
            engine.model_seconds,
            engine.accept_seconds,
        );
        let graphs0 = engine.model().backend.decode_graph_stats();
        let t1 = Instant::now();
        let mut peak = 0;
        while engine.num_active() > 0 {
            engine.step()?;
            peak = peak.max(engine.stats().used);
        }
        let decode_s = t1.elapsed().as_secs_f64();
        // The engine's own host work per step (scheduling, stops), outside the model's calls.
        let host_ms = ((engine.step_seconds - step_s0) - (engine.model_seconds - model_s0))
            / args.new_tokens as f64
            * 1e3;
        // Of that, taking the sampled tokens (stop checks, detokenisation); the rest schedules.
        let accept_ms = (engine.accept_seconds - accept_s0) / args.new_tokens as f64 * 1e3;
        // The decode-graph activity of this batch (none where the backend records none).
        let graphs = graphs0
            .zip(engine.model().backend.decode_graph_stats())
            .map(|(a, b)| b.since(&a));
        let tokens = engine.tokens_generated - generated0;
        let tok_s = tokens as f64 / decode_s;
        // Each decode step samples one token of every sequence; the mean cached context over
        // the steps is the prompt plus half the new tokens.
        let steps = args.new_tokens as f64;
        let step_s = decode_s / steps;
        let mean_context = prompt_len as f64 + args.new_tokens as f64 / 2.0;
        let bytes = decode_step_bytes(&model.config, element_bytes, batch as f64 * mean_context);
        let gb_s = bytes / step_s / 1e9;
        println!(
            "  {batch:>9}   {prefill_s:>9.2}   {decode_s:>8.2}   {tok_s:>15.1}   {:>7.2}   {host_ms:>7.3}   {accept_ms:>10.3}   {gb_s:>24.1}   {peak:>6}",
            step_s * 1e3
        );
        rows.push(
            serde_json::json!({"sequences": batch, "prefill_s": prefill_s, "decode_s": decode_s,
            "decode_tokens": tokens, "decode_tokens_per_s": tok_s, "decode_step_ms": step_s * 1e3,
            "host_ms_per_step": host_ms, "accept_ms_per_step": accept_ms,
            "decode_step_bytes": bytes, "achieved_gb_s": gb_s, "peak_blocks_used": peak,
            "graphs": graphs}),
        );
        if let Some(g) = &graphs {
            // Whether the decode steps were replayed from CUDA graphs.
            println!("              decode graphs: {}", g.summary());
        }
        for p in parents {
            engine.release(p)?;
        }
    }
    let mut foresight = serde_json::Value::Null;
    if args.forks > 0 {
        // One prompt prefilled once, forked `forks` ways; each fork samples its own rollout.
        let prompt = synthetic_prompt(args.fork_prompt_tokens, vocab, 99);
        let t0 = Instant::now();
        let parent = engine.submit(Request {
            tokens: prompt[..prompt.len() - 1].to_vec(),
            parent: None,
            sampling,
            stop: StopRules {
                max_new_tokens: 0,
                ..StopRules::default()
            },
            stream: 1000,
        })?;
        engine.run_until_idle()?;
        let children = (0..args.forks)
            .map(|f| {
                engine.submit(Request {
                    tokens: prompt[prompt.len() - 1..].to_vec(),
                    parent: Some(parent),
                    sampling,
                    stop: stop.clone(),
                    stream: 1001 + f as u64,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        engine.step()?;
        let after_fork = engine.stats();
        let generated0 = engine.tokens_generated;
        engine.run_until_idle()?;
        let secs = t0.elapsed().as_secs_f64();
        let tokens = engine.tokens_generated - generated0;
        let unshared_blocks = args.forks * (args.fork_prompt_tokens + 1).div_ceil(16);
        println!(
            "foresight: {}-token prompt forked {} ways: {:.2}s, {tokens} tokens after the fork; KV after the first step: {} blocks used, {} shared (unshared copies would need {unshared_blocks})",
            args.fork_prompt_tokens, args.forks, secs, after_fork.used, after_fork.shared
        );
        foresight = serde_json::json!({"prompt_tokens": args.fork_prompt_tokens, "forks": args.forks,
            "seconds": secs, "blocks_used": after_fork.used, "blocks_shared": after_fork.shared,
            "blocks_without_sharing": unshared_blocks});
        for c in children {
            engine.release(c)?;
        }
        engine.release(parent)?;
    }
    println!(
        "{}",
        serde_json::json!({"bench": "rollout", "device": engine.model().backend_name(), "model": model.name,
            "prompt_tokens": prompt_len, "new_tokens": args.new_tokens, "batches": rows, "foresight": foresight})
    );
    Ok(())
}

fn forward(args: &ModelArgs, tokens: usize, iters: usize) -> Result<()> {
    if tokens == 0 || iters == 0 {
        bail!("--tokens and --iters must be positive");
    }
    let (model, any) = super::load_transformer(args)?;
    crate::with_transformer!(any, t => forward_on(&model, t, tokens, iters))
}

fn forward_on<B: Backend>(
    model: &LoadedModel,
    transformer: Transformer<B>,
    tokens: usize,
    iters: usize,
) -> Result<()> {
    let c = &model.config;
    if tokens > c.max_position_embeddings {
        bail!(
            "--tokens {tokens} exceeds the model's context of {}",
            c.max_position_embeddings
        );
    }
    let prompt = synthetic_prompt(tokens, c.vocab_size, 0);
    let batch = PackedBatch::from_sequences(&[&prompt]);
    let last = [tokens - 1];
    let run_once = || -> Result<f64> {
        let t = Instant::now();
        let hidden = transformer.forward_hidden(&batch)?;
        transformer.logits_at(&hidden, &last)?;
        Ok(t.elapsed().as_secs_f64())
    };
    run_once()?; // warm-up
    let mut times = (0..iters).map(|_| run_once()).collect::<Result<Vec<_>>>()?;
    let secs = median(&mut times);
    let tok_s = tokens as f64 / secs;
    // Matmul work of the pass (LM head only for the last row), for an achieved-GFLOP/s figure.
    let per_token: usize = linear_shapes(c)
        .iter()
        .map(|(_, o, i, uses)| o * i * uses)
        .sum::<usize>()
        * c.num_layers;
    let flops = 2.0 * (per_token * tokens) as f64;
    println!("device        {}", transformer.backend_name());
    println!(
        "model         {} ({} layers, hidden {})",
        model.name, c.num_layers, c.hidden_size
    );
    println!(
        "prefill       {tokens} tokens: median {:.3}s over {iters} runs -> {tok_s:.0} tokens/s ({:.1} GFLOP/s in linear layers)",
        secs,
        flops / secs / 1e9
    );
    let mut gemms = Vec::new();
    // The GEMM table measures the CPU backend's packed kernel; a device backend (one with its
    // own memory) skips it.
    let on_host = transformer.backend.memory_info().is_none();
    if on_host {
        println!("gemm on the model's shapes, {tokens} rows:");
    }
    for (name, out, inp, _) in linear_shapes(c).into_iter().filter(|_| on_host) {
        let g = gemm_gflops(tokens, out, inp, iters);
        println!("  {name:<14} [{tokens} x {inp}] x [{out} x {inp}]^T  {g:8.1} GFLOP/s");
        gemms.push(
            serde_json::json!({"name": name, "rows": tokens, "out": out, "in": inp, "gflops": g}),
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "forward", "device": transformer.backend_name(), "model": model.name,
            "tokens": tokens, "iters": iters, "median_s": secs, "tokens_per_s": tok_s, "gemm": gemms
        })
    );
    Ok(())
}

/// Optimizer steps of the ACO trainer on synthetic pairs (each sequence `--tokens` long, a
/// quarter of it prompt): tokens/s of forward + backward, and where a step's time goes.
fn train(args: &BenchArgs) -> Result<()> {
    let len = args.tokens.unwrap_or(256);
    let pairs_per_step = args.batches.first().copied().unwrap_or(8).max(1);
    let steps = args.iters.max(1);
    if len < 4 {
        bail!("--tokens must be at least 4 for a training sequence");
    }
    let (model, any) = super::load_transformer(&args.model)?;
    let micro = args.micro_batch_tokens;
    crate::with_transformer!(any, t => train_on(&model, t, len, pairs_per_step, steps, micro))
}

/// Measured bf16 (or f32 on the CPU) GEMM throughput of the backend, FLOP/s: `n x n x n`
/// products, timed after a warm-up, synchronised by downloading one element.
fn gemm_ceiling<B: Backend>(be: &B, n: usize, iters: usize) -> Result<f64> {
    let x = be.upload(&crate::model::HostTensor::new(
        vec![n, n],
        (0..n * n).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect(),
    ))?;
    let w = be.upload_linear(&crate::model::HostTensor::new(
        vec![n, n],
        (0..n * n).map(|i| ((i % 5) as f32 - 2.0) * 0.01).collect(),
    ))?;
    let sync = |t: &B::Tensor| -> Result<()> {
        be.download(&be.gather_rows(t, &[0])?)?;
        Ok(())
    };
    sync(&be.linear(&x, &w, None)?)?;
    let started = Instant::now();
    let mut last = None;
    for _ in 0..iters {
        last = Some(be.linear(&x, &w, None)?);
    }
    if let Some(t) = &last {
        sync(t)?;
    }
    Ok(2.0 * (n as f64).powi(3) * iters as f64 / started.elapsed().as_secs_f64())
}

fn train_on<B: Backend>(
    model: &crate::model::LoadedModel,
    mut transformer: Transformer<B>,
    len: usize,
    pairs_per_step: usize,
    steps: usize,
    micro_batch_tokens: Option<usize>,
) -> Result<()> {
    use crate::genius::sequences::TrainSequence;
    use crate::genius::trainer::{TrainConfig, TrainPair, TrainState, train as train_loop};
    let vocab = model.config.vocab_size;
    let seq = |salt: u64| TrainSequence {
        tokens: synthetic_prompt(len, vocab, salt),
        prompt_len: len / 4,
    };
    let pairs: Vec<TrainPair> = (0..pairs_per_step * steps)
        .map(|i| TrainPair {
            id: format!("p{i}"),
            step: 1,
            chosen: seq(2 * i as u64),
            rejected: seq(2 * i as u64 + 1),
            ref_chosen: 0.0,
            ref_rejected: 0.0,
            adv_chosen: 0.0,
            adv_rejected: -0.5,
        })
        .collect();
    let on_gpu = transformer.backend.memory_info().is_some();
    let defaults = TrainConfig::default();
    let cfg = TrainConfig {
        pairs_per_step,
        lr: 1e-7,
        warmup_ratio: 0.0,
        micro_batch_tokens: micro_batch_tokens.unwrap_or(if on_gpu {
            2 * len * pairs_per_step
        } else {
            defaults.micro_batch_tokens
        }),
        ..defaults
    };
    let mut cfg = cfg;
    cfg.recompute = super::train::choose_recompute(&transformer, cfg.micro_batch_tokens)?;
    let mut state = TrainState::new(&transformer, cfg.adamw)?;
    println!("device        {}", transformer.backend_name());
    println!("model         {}", model.name);
    println!(
        "train: {steps} optimizer steps of {pairs_per_step} pairs, sequences of {len} tokens ({} scored), micro-batches of {} tokens{}",
        len - len / 4,
        cfg.micro_batch_tokens,
        if cfg.recompute {
            ", per-layer recompute"
        } else {
            ""
        }
    );
    println!("  step   seconds   tokens   fwd+bwd+update tokens/s");
    let mut rates = Vec::new();
    let started = Instant::now();
    train_loop(&mut transformer, &pairs, &cfg, &mut state, |m, _, t, _| {
        println!(
            "  {:>4}   {:>7.2}   {:>6}   {:>8.1}",
            m.step, m.seconds, m.tokens, m.tokens_per_s
        );
        rates.push(m.tokens_per_s);
        if m.step == 1 {
            // The profile (GENIUS_CUDA_PROFILE) then covers the timed steps only.
            t.backend.reset_profile();
        }
        Ok(())
    })?;
    let total = started.elapsed().as_secs_f64();
    // The first step pays for plans, kernel loads and the pool's first allocations.
    if rates.len() > 1 {
        rates.remove(0);
    }
    let med = median(&mut rates);
    let c = &model.config;
    // Model FLOPs per token: 6 x parameters (forward + backward of every weight) plus causal
    // attention's QK^T and PV (2 x 2 x len/2 x q_width per layer forward, x3 with backward).
    let flops_per_token = 6.0 * c.num_parameters() as f64
        + 6.0 * c.num_layers as f64 * len as f64 * (c.num_heads * c.head_dim) as f64;
    let achieved = flops_per_token * med;
    let used = transformer
        .backend
        .memory_info()
        .map(|(free, total)| total.saturating_sub(free));
    let ceiling = if on_gpu {
        Some(gemm_ceiling(&transformer.backend, 8192, 10)?)
    } else {
        None
    };
    println!(
        "median {med:.1} tokens/s (first step left out); {:.1} TFLOP/s of model FLOPs (6 x parameters + attention per token)",
        achieved / 1e12
    );
    if let Some(ceil) = ceiling {
        println!(
            "bf16 GEMM ceiling measured now (8192^3): {:.0} TFLOP/s; model FLOP utilisation {:.1}%",
            ceil / 1e12,
            100.0 * achieved / ceil
        );
    }
    if let Some(u) = used {
        println!(
            "device memory in use after the steps: {:.2} GiB (the allocator keeps its high-water mark)",
            u as f64 / (1u64 << 30) as f64
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "train", "device": transformer.backend_name(), "model": model.name,
            "tokens_per_sequence": len, "pairs_per_step": pairs_per_step, "steps": steps,
            "micro_batch_tokens": cfg.micro_batch_tokens, "recompute": cfg.recompute,
            "median_tokens_per_s": med, "seconds": total,
            "model_tflops": achieved / 1e12,
            "gemm_ceiling_tflops": ceiling.map(|c| c / 1e12),
            "mfu": ceiling.map(|c| achieved / c),
            "device_memory_used_bytes": used,
        })
    );
    Ok(())
}

/// `bench eval`: the bundled questions (the first `--batches` entry of them, at most 20),
/// greedy, `--new-tokens` per answer, through the same code as `eval`.
fn eval(args: &BenchArgs) -> Result<()> {
    use super::eval::{BUNDLED_GSM8K_MINI, EvalGenFlags, evaluate};
    let questions = args.batches.first().copied().unwrap_or(20);
    let data = std::env::temp_dir().join(format!("genius-bench-eval-{}.jsonl", std::process::id()));
    std::fs::write(&data, BUNDLED_GSM8K_MINI)
        .map_err(|e| anyhow::anyhow!("{}: {e}", data.display()))?;
    let output = data.with_extension("out.jsonl");
    let (model, any) = super::load_transformer(&args.model)?;
    let flags = EvalGenFlags {
        temperature: 0.0,
        samples: 1,
        max_new_tokens: args.new_tokens,
        seed: 0,
        shots: None,
        limit: Some(questions),
        kv_budget: "auto".into(),
    };
    let result = crate::with_transformer!(any, t => {
        let device = t.backend_name();
        let kv = super::generate::resolve_kv_budget("auto", &t, EngineConfig::default().max_batch_tokens, args.model.gpu_memory_fraction)?;
        let mut engine = Engine::new(t, &model.tokenizer, EngineConfig { kv_budget_tokens: kv, ..EngineConfig::default() })?;
        evaluate(&mut engine, &model, crate::eval::data::Benchmark::Gsm8k, &data, &flags, &output)
            .map(|s| (device, s))
    });
    let _ = std::fs::remove_file(&data);
    let _ = std::fs::remove_file(&output);
    let (device, s) = result?;
    println!("device        {device}");
    println!("model         {}", model.name);
    println!("eval          {}", s.line());
    println!(
        "{}",
        serde_json::json!({"bench": "eval", "device": device, "model": model.name,
            "questions": s.questions, "new_tokens": args.new_tokens, "seconds": s.seconds,
            "questions_per_s": s.questions as f64 / s.seconds.max(1e-9),
            "tokens": s.tokens, "tokens_per_s": s.tokens as f64 / s.seconds.max(1e-9),
            "accuracy": s.accuracy.accuracy})
    );
    Ok(())
}

/// `bench logprobs`: [`Backend::target_logprobs`] and its backward on random final hidden
/// states through the model's LM head, for each `--batches` entry as a row count (default
/// 1024, 4096, 16384), median of `--iters` after a warm-up. Bytes counted per pass: the LM
/// head read once per chunk, the hidden rows read, and the bf16 logits written by the GEMM and
/// read back by the softmax kernel (the backward also writes them back and reads them again
/// for the two gradient GEMMs); GB/s = bytes / time. Where the backend hands the forward's
/// log-sum-exp to the backward ([`Backend::target_logprobs_with_lse`]), that one-pass backward
/// is timed too (the same bytes less one read of the logits). The device memory in use after each row
/// count (the allocator's cache released before it) is that count's peak: it should not grow
/// with rows x vocab (fixed-size chunks).
fn logprobs(args: &BenchArgs) -> Result<()> {
    let (model, any) = super::load_transformer(&args.model)?;
    let rows: Vec<usize> = if args.batches == [1, 8, 32, 64] {
        vec![1024, 4096, 16384]
    } else {
        args.batches.clone()
    };
    crate::with_transformer!(any, t => logprobs_on(&model, t, &rows, args.iters.max(1)))
}

fn logprobs_on<B: Backend>(
    model: &crate::model::LoadedModel,
    t: Transformer<B>,
    rows: &[usize],
    iters: usize,
) -> Result<()> {
    let be = &t.backend;
    let c = &model.config;
    let (vocab, d) = (c.vocab_size, c.hidden_size);
    let eb = be.element_bytes() as f64;
    println!("device        {}", t.backend_name());
    println!("model         {} (vocab {vocab}, hidden {d})", model.name);
    println!(
        "     rows   forward ms    GB/s   backward ms    GB/s   1-pass bwd ms    GB/s   memory in use"
    );
    let mut results = Vec::new();
    let mut grad = be.zeros_f32(&[vocab, d])?;
    for &n in rows {
        // The allocator keeps its high-water mark: give it back first, so the memory in use
        // after this row count is this row count's peak.
        be.release_cached_memory()?;
        let hidden = be.upload(&crate::model::HostTensor::new(
            vec![n, d],
            (0..n * d)
                .map(|i| ((i * 2654435761usize % 1000) as f32 / 1000.0 - 0.5) * 0.5)
                .collect(),
        ))?;
        let targets: Vec<u32> = (0..n).map(|i| ((i * 7919) % vocab) as u32).collect();
        let d_lp = vec![1.0f32; n];
        // Warm-up (plans, kernel loads), then timed passes; the log-probs and the returned
        // gradient come back to the host or are synchronised, so each pass is complete.
        be.target_logprobs(&hidden, t.lm_head(), &targets)?;
        let mut fwd = Vec::new();
        for _ in 0..iters {
            let started = Instant::now();
            be.target_logprobs(&hidden, t.lm_head(), &targets)?;
            fwd.push(started.elapsed().as_secs_f64());
        }
        // A warm-up, then `iters` timed backwards (the returned gradient read back, so each
        // pass is complete); with the forward's log-sum-exp when `lse` is set.
        let mut time_backward = |lse: Option<&[f32]>| -> Result<Vec<f64>> {
            let mut times = Vec::new();
            for i in 0..=iters {
                let started = Instant::now();
                let dh = be.target_logprobs_backward(
                    &hidden,
                    t.lm_head(),
                    &targets,
                    &d_lp,
                    lse,
                    &mut grad,
                )?;
                be.download(&be.gather_rows(&dh, &[0])?)?;
                if i > 0 {
                    times.push(started.elapsed().as_secs_f64());
                }
            }
            Ok(times)
        };
        let mut bwd = time_backward(None)?;
        // The one-pass backward, with the forward's log-sum-exp (untimed forward).
        let (_, lse) = be.target_logprobs_with_lse(&hidden, t.lm_head(), &targets)?;
        let mut bwd1 = match &lse {
            Some(lse) => time_backward(Some(lse))?,
            None => Vec::new(),
        };
        let (f, b) = (median(&mut fwd), median(&mut bwd));
        let b1 = (!bwd1.is_empty()).then(|| median(&mut bwd1));
        let logits = (n * vocab) as f64 * eb;
        let head = (vocab * d) as f64 * eb;
        let hid = (n * d) as f64 * eb;
        // Chunks: the CUDA backend's chunk of at most 256 MiB of logits (the CPU's is smaller;
        // the head re-reads are then undercounted there).
        let chunks = (logits / (256u64 << 20) as f64).ceil().max(1.0);
        let fwd_bytes = head * chunks + hid + 2.0 * logits;
        // Backward: logits written and read (as forward), the gradient written back and read
        // by the two gradient GEMMs, the head read twice more per chunk, the f32 head gradient
        // read and written once per chunk, the hidden rows read again and written (d_hidden).
        let bwd_bytes = fwd_bytes
            + 3.0 * logits
            + 2.0 * head * chunks
            + 2.0 * 4.0 * (vocab * d) as f64 * chunks
            + 2.0 * hid;
        let bwd1_bytes = bwd_bytes - logits;
        let used = be
            .memory_info()
            .map(|(free, total)| total.saturating_sub(free));
        println!(
            "{n:>9}   {:>10.2}   {:>5.0}   {:>11.2}   {:>5.0}   {:>13}   {:>5}   {}",
            f * 1e3,
            fwd_bytes / f / 1e9,
            b * 1e3,
            bwd_bytes / b / 1e9,
            b1.map_or("-".to_string(), |b1| format!("{:.2}", b1 * 1e3)),
            b1.map_or("-".to_string(), |b1| format!(
                "{:.0}",
                bwd1_bytes / b1 / 1e9
            )),
            used.map_or("-".to_string(), |u| format!(
                "{:.2} GiB",
                u as f64 / (1u64 << 30) as f64
            ))
        );
        results.push(serde_json::json!({
            "rows": n, "forward_ms": f * 1e3, "forward_gb_s": fwd_bytes / f / 1e9,
            "backward_ms": b * 1e3, "backward_gb_s": bwd_bytes / b / 1e9,
            "one_pass_backward_ms": b1.map(|b1| b1 * 1e3),
            "one_pass_backward_gb_s": b1.map(|b1| bwd1_bytes / b1 / 1e9),
            "device_memory_used_bytes": used,
        }));
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "logprobs", "device": t.backend_name(), "model": model.name,
            "vocab": vocab, "hidden": d, "results": results,
        })
    );
    Ok(())
}
