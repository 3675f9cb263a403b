//! Criterion benchmarks of the CPU sampler (`engine::sampler::sample`) on one row of
//! Qwen2.5's vocabulary (151,936 logits, uniform in [-8, 8)): plain sampling at T = 1 (the
//! foresight rollouts) and T = 0.6 (the candidate steps), greedy, and top-p 0.9. Throughput is
//! in logits read. The CUDA kernel's time is in `genius-engine bench rollout --device cuda`'s
//! profile.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use genius_engine::engine::sampler::{SamplingParams, sample};

const VOCAB: usize = 151_936;

fn sampler(c: &mut Criterion) {
    // A fixed pseudo-random row (xorshift), no dependency on the tests' helpers.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let logits: Vec<f32> = (0..VOCAB)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 16.0 - 8.0
        })
        .collect();
    let mut group = c.benchmark_group("sampler");
    group.throughput(Throughput::Elements(VOCAB as u64));
    for (name, temperature, top_p) in [
        ("t1", 1.0f32, 1.0f32),
        ("t0.6", 0.6, 1.0),
        ("greedy", 0.0, 1.0),
        ("top_p0.9", 1.0, 0.9),
    ] {
        let params = SamplingParams {
            temperature,
            top_p,
            top_k: 0,
            seed: 7,
        };
        let mut position = 0u32;
        group.bench_function(name, |b| {
            b.iter(|| {
                position = position.wrapping_add(1);
                sample(&logits, &params, 3, position).unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, sampler);
criterion_main!(benches);
