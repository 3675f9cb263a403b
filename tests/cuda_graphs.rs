//! Decode steps replayed from CUDA graphs (`backend/cuda/graphs.rs`) against the CPU backend:
//! the rollout engine on the GPU, whose plain decode steps are padded to a batch bucket and
//! replayed from graphs captured per (bucket, block-table width), must report for every token
//! it draws the log-prob the CPU gives that token in the same context; reruns must repeat
//! exactly; changing a weight must retire the graphs that point at the old one; and a backend
//! with graphs off must agree with the CPU in the same way.
//!
//! The steps cross several buckets (sequences finish at different lengths, so the batch shrinks
//! from 21 rows, padded to 24, down to 1, with padding rows in most steps) and more than one
//! table width (contexts grow to 8 blocks of 16), and the sampling mixes greedy, plain, top-k
//! and top-p rows. Block 0 of the pool holds a real sequence, which padding rows read (and must
//! not write). A scheduler simulation of this workload gives 45 decode steps in 6 shapes: 5
//! met more than once (run eagerly once, with the graph's table width, then captured and
//! replayed) and one, (2 rows, width 4), met once, so warmed up but first captured in the
//! rerun.
//!
//! Tolerance: per token, |gpu − cpu| / (1 + |cpu|) of the log-prob under 0.05 (bf16
//! activations), as in `cuda_model.rs`.
//!
//! These tests are ignored unless built for a GPU run (`GENIUS_GPU_TESTS=1`, as
//! tools/gpu-prepare.sh does); so built, a missing device fails them.

mod common;

use common::cuda::worst_logprob_difference;
use common::*;
use genius_engine::backend::cpu::CpuBackend;
use genius_engine::backend::cuda::{CudaBackend, CudaOptions};
use genius_engine::backend::{Backend, DecodeGraphStats};
use genius_engine::engine::sampler::SamplingParams;
use genius_engine::engine::{Engine, EngineConfig, Finished, Request, StopRules};
use genius_engine::model::safetensors::Dtype;
use genius_engine::model::{HostTensor, LoadedModel, ModelConfig, load_model};
use genius_engine::transformer::Transformer;

const TOL: f32 = 0.05;
const SEQUENCES: usize = 21;

fn config() -> ModelConfig {
    ModelConfig {
        hidden_size: 128,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        vocab_size: 256,
        ..tiny_llama_config()
    }
}

/// The CUDA backend with decode graphs on or off (poisoned outputs), or `None` (skipped).
fn cuda(graphs: bool) -> Option<CudaBackend> {
    common::cuda::gpu_with(|o| CudaOptions {
        decode_graphs: graphs,
        ..o
    })
}

fn model() -> (tempfile::TempDir, LoadedModel) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(dir.path(), &config(), 8, Dtype::BF16);
    let m = load_model(Some(dir.path().to_str().unwrap())).unwrap();
    (dir, m)
}

fn prompts() -> Vec<Vec<u32>> {
    let mut rng = Rng::new(11);
    let vocab = config().vocab_size;
    (0..SEQUENCES)
        .map(|i| {
            (0..3 + (i * 13) % 70)
                .map(|_| 4 + rng.below(vocab - 4) as u32)
                .collect()
        })
        .collect()
}

/// Submits every prompt (a mix of samplers and lengths) and runs the engine dry.
fn rollout(engine: &mut Engine<'_, CudaBackend>, prompts: &[Vec<u32>]) -> Vec<Finished> {
    for (i, p) in prompts.iter().enumerate() {
        engine
            .submit(Request {
                tokens: p.clone(),
                parent: None,
                sampling: SamplingParams {
                    temperature: [1.0, 0.7, 0.0, 0.9][i % 4],
                    top_k: if i % 5 == 1 { 12 } else { 0 },
                    top_p: if i % 7 == 3 { 0.8 } else { 1.0 },
                    seed: 31,
                },
                stop: StopRules {
                    max_new_tokens: 8 + (i * 7) % 41,
                    ignore_eos: true,
                    ..StopRules::default()
                },
                stream: i as u64,
            })
            .unwrap();
    }
    let mut done = engine.run_until_idle().unwrap();
    done.sort_by_key(|f| f.seq);
    for f in &done {
        engine.release(f.seq).unwrap();
    }
    assert_eq!(engine.stats().used, 0, "the KV cache went back to the pool");
    done
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        block_size: 16,
        kv_budget_tokens: 64 * 16 * 4,
        max_batch_tokens: 512,
    }
}

fn stats(engine: &Engine<'_, CudaBackend>) -> DecodeGraphStats {
    engine.model().backend.decode_graph_stats().unwrap()
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn graph_replayed_decode_steps_match_the_cpu_and_repeat() {
    let Some(be) = cuda(true) else { return };
    let (_dir, m) = model();
    let cpu = Transformer::load(CpuBackend::new(), config(), m.weights.as_ref()).unwrap();
    let gpu = Transformer::load(be, config(), m.weights.as_ref()).unwrap();
    let mut engine = Engine::new(gpu, &m.tokenizer, engine_config()).unwrap();
    let prompts = prompts();

    let a = rollout(&mut engine, &prompts);
    let s = stats(&engine);
    println!(
        "decode graphs after the first rollout: {s:?}; {} steps split into prefill + decode",
        engine.split_steps
    );
    // The prefill of 21 prompts spans two steps of 512 tokens; the second mixes in the
    // decodes of the sequences prefilled in the first, which then run as their own pass.
    assert!(engine.split_steps > 0, "no mixed step was split");
    assert_eq!(s.off, None, "graphs were turned off");
    assert_eq!(
        s.failed_captures, 0,
        "a capture failed: {:?}",
        s.last_failure
    );
    assert!(s.captures >= 3, "too few shapes captured: {s:?}");
    assert!(
        s.replays > s.captures * 2,
        "most decode steps should be replays: {s:?}"
    );
    assert!(s.padding_rows > 0, "no step was padded: {s:?}");
    let worst = worst_logprob_difference(&cpu, &prompts, &a);
    println!("graph-replayed decode: worst logprob difference from the CPU {worst:.2e}");
    assert!(worst < TOL, "log-probs differ from the CPU's by {worst}");

    // A seeded rerun replays the same graphs and draws the same tokens.
    let b = rollout(&mut engine, &prompts);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.tokens, y.tokens, "a seeded rerun drew other tokens");
        assert_eq!(x.logprobs, y.logprobs);
    }
    let s2 = stats(&engine);
    // Every shape of the rerun was met (and warmed up) by the first rollout, so no decode
    // step runs eagerly; shapes the first rollout met only once are captured now.
    assert_eq!(
        s2.eager_steps, s.eager_steps,
        "the rerun ran decode steps eagerly: {s2:?}"
    );
    assert_eq!(s2.failed_captures, 0, "{:?}", s2.last_failure);

    // A new final-norm weight is a new device buffer: the graphs reading the old one must be
    // retired (recaptured), and the log-probs must follow the new weight.
    let mut model = engine.into_model();
    let mut cpu = cpu;
    let h = config().hidden_size;
    let norm = HostTensor::new(
        vec![h],
        (0..h).map(|i| 0.5 + (i % 7) as f32 * 0.125).collect(),
    );
    model.set_weight("model.norm.weight", &norm).unwrap();
    cpu.set_weight("model.norm.weight", &norm).unwrap();
    let mut engine = Engine::new(model, &m.tokenizer, engine_config()).unwrap();
    let c = rollout(&mut engine, &prompts);
    let s3 = stats(&engine);
    assert!(
        s3.captures > s2.captures,
        "no recapture after new weights: {s3:?}"
    );
    let worst = worst_logprob_difference(&cpu, &prompts, &c);
    println!("after a weight change: worst logprob difference from the CPU {worst:.2e}");
    assert!(worst < TOL, "log-probs differ from the CPU's by {worst}");
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn eager_decode_steps_with_graphs_off_match_the_cpu() {
    let Some(be) = cuda(false) else { return };
    let (_dir, m) = model();
    let cpu = Transformer::load(CpuBackend::new(), config(), m.weights.as_ref()).unwrap();
    let gpu = Transformer::load(be, config(), m.weights.as_ref()).unwrap();
    let mut engine = Engine::new(gpu, &m.tokenizer, engine_config()).unwrap();
    let prompts = prompts();
    let a = rollout(&mut engine, &prompts);
    let s = stats(&engine);
    assert!(s.off.is_some());
    assert_eq!((s.captures, s.replays), (0, 0), "{s:?}");
    let worst = worst_logprob_difference(&cpu, &prompts, &a);
    println!("eager decode: worst logprob difference from the CPU {worst:.2e}");
    assert!(worst < TOL, "log-probs differ from the CPU's by {worst}");
}
