//! The whole model on the CUDA backend against the CPU backend, on the same bf16-rounded random
//! weights: full-sequence logits (tiny models with GQA ratios 1, 2 and 7 and head sizes 64 and
//! 128, and Qwen2.5-0.5B's shape), the paged path (chunked prefill then decode steps, blocks scattered
//! through the pool, block sizes 16 and 7), and the rollout engine end to end (seeded reruns
//! repeat exactly; the log-probs it reports agree with the CPU scoring the same tokens).
//!
//! Tolerance: relative L2 error of the logits (‖gpu − cpu‖ / ‖cpu‖), bf16 activations with f32
//! accumulation: under 3e-2 (printed for every model).
//!
//! These tests are ignored unless built for a GPU run (`GENIUS_GPU_TESTS=1`, as
//! tools/gpu-prepare.sh does); so built, a missing device fails them.

mod common;

use common::cuda::{both, gpu, rel_err, worst_logprob_difference};
use common::*;
use genius_engine::backend::cpu::CpuBackend;
use genius_engine::backend::cuda::CudaBackend;
use genius_engine::engine::sampler::SamplingParams;
use genius_engine::engine::{Engine, EngineConfig, Request, StopRules};
use genius_engine::model::safetensors::Dtype;
use genius_engine::model::{Architecture, ModelConfig, load_model};
use genius_engine::transformer::{PackedBatch, PagedBatch, PagedSeqBatch, Transformer};

const REL_TOL: f64 = 3e-2;

fn gqa7_config() -> ModelConfig {
    ModelConfig {
        arch: Architecture::Qwen2,
        vocab_size: 300,
        hidden_size: 64,
        intermediate_size: 72,
        num_layers: 2,
        num_heads: 14,
        num_kv_heads: 2,
        head_dim: 64,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_scaling: None,
        max_position_embeddings: 512,
        tie_word_embeddings: true,
        attention_bias: true,
    }
}

fn qwen25_05b_config() -> ModelConfig {
    ModelConfig {
        arch: Architecture::Qwen2,
        vocab_size: 151936,
        hidden_size: 896,
        intermediate_size: 4864,
        num_layers: 24,
        num_heads: 14,
        num_kv_heads: 2,
        head_dim: 64,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_scaling: None,
        max_position_embeddings: 32768,
        tie_word_embeddings: true,
        attention_bias: true,
    }
}

/// A tiny LLaMA with head_dim 64 (the paged-attention kernels' smallest head size).
fn llama_d64_config() -> ModelConfig {
    ModelConfig {
        hidden_size: 128,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        vocab_size: 256,
        ..tiny_llama_config()
    }
}

/// A tiny Qwen2 with head_dim 128 and no GQA (ratio 1).
fn qwen2_d128_mha_config() -> ModelConfig {
    ModelConfig {
        hidden_size: 192,
        num_heads: 2,
        num_kv_heads: 2,
        head_dim: 128,
        vocab_size: 512,
        ..tiny_qwen2_config()
    }
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn whole_model_logits_match_the_cpu() {
    for (name, config) in [
        (
            "tiny llama, head_dim 64, gqa 2, llama3 rope",
            llama_d64_config(),
        ),
        ("tiny qwen2, head_dim 128, gqa 1", qwen2_d128_mha_config()),
        ("tiny qwen2, head_dim 64, gqa 7", gqa7_config()),
        ("qwen2.5-0.5b shape", qwen25_05b_config()),
    ] {
        let Some(be) = gpu() else { return };
        let (cpu, cuda) = both(&config, 5, be);
        let mut rng = Rng::new(9);
        let seqs: Vec<Vec<u32>> = [5usize, 37, 1]
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|_| rng.below(config.vocab_size) as u32)
                    .collect()
            })
            .collect();
        let batch = PackedBatch::from_sequences(&seqs);
        let rows: Vec<usize> = (0..batch.tokens.len()).collect();
        let want = cpu
            .logits_at(&cpu.forward_hidden(&batch).unwrap(), &rows)
            .unwrap();
        let got = cuda
            .logits_at(&cuda.forward_hidden(&batch).unwrap(), &rows)
            .unwrap();
        let e = rel_err(&got.data, &want.data);
        println!("{name}: logits relative error {e:.2e}");
        assert!(e < REL_TOL, "{name}: logits relative error {e:.3e}");
    }
}

/// Chunked prefill then decode steps of three sequences on both backends, the same block
/// tables (scattered) on each; logits of every new token compared.
fn paged_check(config: &ModelConfig, block_size: usize, gpu: CudaBackend) {
    let (cpu, cuda) = both(config, 3, gpu);
    let mut rng = Rng::new(21);
    let prompt_lens = [13usize, 1, 70];
    let decode_steps = 6;
    let full: Vec<Vec<u32>> = prompt_lens
        .iter()
        .map(|&p| {
            (0..p + decode_steps)
                .map(|_| rng.below(config.vocab_size) as u32)
                .collect()
        })
        .collect();
    let max_len = full.iter().map(Vec::len).max().unwrap();
    let num_blocks = 3 * max_len.div_ceil(block_size) + 5;
    let mut free: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, rng.below(i + 1));
    }
    let mut cpu_cache = cpu.new_kv_cache(num_blocks, block_size).unwrap();
    let mut gpu_cache = cuda.new_kv_cache(num_blocks, block_size).unwrap();
    let mut tables: Vec<Vec<u32>> = vec![Vec::new(); full.len()];
    let mut lens = vec![0usize; full.len()];
    let mut schedule: Vec<Vec<usize>> = vec![
        prompt_lens.iter().map(|&p| p.div_ceil(2)).collect(),
        prompt_lens.iter().map(|&p| p - p.div_ceil(2)).collect(),
    ];
    schedule.extend((0..decode_steps).map(|_| vec![1; full.len()]));
    let mut worst = 0f64;
    for step in schedule {
        let mut batch = PagedBatch::default();
        for (s, &add) in step.iter().enumerate() {
            if add == 0 {
                continue;
            }
            let q_start = batch.tokens.len();
            for pos in lens[s]..lens[s] + add {
                if pos % block_size == 0 {
                    tables[s].push(free.pop().unwrap());
                }
                let block = tables[s][pos / block_size];
                batch.tokens.push(full[s][pos]);
                batch.positions.push(pos as u32);
                batch
                    .slots
                    .push(block * block_size as u32 + (pos % block_size) as u32);
            }
            lens[s] += add;
            batch.seqs.push(PagedSeqBatch {
                q_start,
                q_len: add,
                context_len: lens[s],
                block_table: tables[s].clone(),
            });
        }
        let rows: Vec<usize> = (0..batch.tokens.len()).collect();
        let want = cpu
            .logits_at(&cpu.forward_paged(&batch, &mut cpu_cache).unwrap(), &rows)
            .unwrap();
        let got = cuda
            .logits_at(&cuda.forward_paged(&batch, &mut gpu_cache).unwrap(), &rows)
            .unwrap();
        worst = worst.max(rel_err(&got.data, &want.data));
    }
    println!("paged, block size {block_size}: worst step's logits relative error {worst:.2e}");
    assert!(
        worst < REL_TOL,
        "paged, block size {block_size}: logits relative error {worst:.3e}"
    );
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn paged_prefill_and_decode_match_the_cpu() {
    for block_size in [16, 7] {
        for config in [llama_d64_config(), gqa7_config(), qwen2_d128_mha_config()] {
            let Some(be) = gpu() else { return };
            paged_check(&config, block_size, be);
        }
    }
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn engine_on_cuda_repeats_and_reports_the_cpu_logprobs() {
    let Some(be) = gpu() else { return };
    let config = llama_d64_config();
    let dir = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(dir.path(), &config, 8, Dtype::BF16);
    let m = load_model(Some(dir.path().to_str().unwrap())).unwrap();
    let cuda = Transformer::load(be, config.clone(), m.weights.as_ref()).unwrap();
    let mut engine = Engine::new(
        cuda,
        &m.tokenizer,
        EngineConfig {
            block_size: 16,
            kv_budget_tokens: 4096,
            max_batch_tokens: 256,
        },
    )
    .unwrap();
    let mut rng = Rng::new(4);
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| {
            (0..5 + 9 * i)
                .map(|_| 4 + rng.below(config.vocab_size - 4) as u32)
                .collect()
        })
        .collect();
    let run = |engine: &mut Engine<'_, CudaBackend>| {
        for (i, p) in prompts.iter().enumerate() {
            engine
                .submit(Request {
                    tokens: p.clone(),
                    parent: None,
                    sampling: SamplingParams {
                        temperature: [1.0, 0.7, 0.0][i % 3],
                        top_k: if i == 4 { 20 } else { 0 },
                        seed: 77,
                        ..SamplingParams::default()
                    },
                    stop: StopRules {
                        max_new_tokens: 24,
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
        done
    };
    let a = run(&mut engine);
    let b = run(&mut engine);
    assert_eq!(a.len(), prompts.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            x.tokens, y.tokens,
            "a seeded rerun on the GPU drew other tokens"
        );
        assert_eq!(x.logprobs, y.logprobs);
    }
    // The CPU, scoring the same tokens with the same weights, gives the same log-probs up to
    // bf16 rounding.
    let cpu = Transformer::load(CpuBackend::new(), config.clone(), m.weights.as_ref()).unwrap();
    assert!(a.iter().all(|f| f.tokens.len() == 24));
    let worst = worst_logprob_difference(&cpu, &prompts, &a);
    println!("engine on cuda: worst logprob difference from the CPU {worst:.2e}");
    assert!(
        worst < 0.05,
        "engine logprobs differ from the CPU's by {worst}"
    );
    // The KV cache went back to the pool.
    assert_eq!(engine.stats().used, 0);
}
