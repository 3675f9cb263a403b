//! `genius-engine bench`: throughput measurements (criterion benches cover the same ground
//! for `cargo bench`). Numbers go to stdout as a table and one JSON line.

use super::ModelArgs;
use crate::backend::cpu::matmul_nt;
use crate::model::ModelConfig;
use crate::transformer::PackedBatch;
use anyhow::{Result, bail};
use clap::ValueEnum;
use std::time::Instant;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchKind {
    /// Prefill of one prompt through the whole model, plus GEMM throughput on its shapes.
    Forward,
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

/// GFLOP/s of `[n, in] x [out, in]^T` on the CPU backend (median of `iters`).
pub fn gemm_gflops(n: usize, out: usize, inp: usize, iters: usize) -> f64 {
    let a: Vec<f32> = (0..n * inp)
        .map(|i| ((i % 17) as f32 - 8.0) * 0.01)
        .collect();
    let b: Vec<f32> = (0..out * inp)
        .map(|i| ((i % 13) as f32 - 6.0) * 0.01)
        .collect();
    let mut c = vec![0f32; n * out];
    matmul_nt(&mut c, &a, &b, n, out, inp);
    let mut times: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let t = Instant::now();
            matmul_nt(&mut c, &a, &b, n, out, inp);
            t.elapsed().as_secs_f64()
        })
        .collect();
    2.0 * (n * out * inp) as f64 / median(&mut times) / 1e9
}

pub fn run(what: BenchKind, args: &ModelArgs, tokens: usize, iters: usize) -> Result<()> {
    match what {
        BenchKind::Forward => forward(args, tokens, iters),
    }
}

fn forward(args: &ModelArgs, tokens: usize, iters: usize) -> Result<()> {
    if tokens == 0 || iters == 0 {
        bail!("--tokens and --iters must be positive");
    }
    let (model, transformer) = super::load_cpu_transformer(args)?;
    let c = &model.config;
    if tokens > c.max_position_embeddings {
        bail!(
            "--tokens {tokens} exceeds the model's context of {}",
            c.max_position_embeddings
        );
    }
    // A fixed pseudo-random prompt: real token ids, no special structure.
    let prompt: Vec<u32> = (0..tokens as u64)
        .map(|i| ((i.wrapping_mul(2654435761) >> 7) % c.vocab_size as u64) as u32)
        .collect();
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
    println!("gemm on the model's shapes, {tokens} rows:");
    let mut gemms = Vec::new();
    for (name, out, inp, _) in linear_shapes(c) {
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
