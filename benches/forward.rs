//! Criterion benchmarks of the CPU backend: prefill of a 512-token prompt through the default
//! model (fetched on first use), and the GEMMs of the model's linear layers at 512 rows.
//! `genius-engine bench forward` reports the same figures from the binary.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use genius_engine::backend::cpu::{CpuBackend, PackedMatrix};
use genius_engine::cli::bench::{linear_shapes, synthetic_prompt};
use genius_engine::model::load_model;
use genius_engine::transformer::{PackedBatch, Transformer};
use std::hint::black_box;

const PROMPT_TOKENS: usize = 512;

fn default_model_prefill(c: &mut Criterion) {
    let model = load_model(None).expect("default model (fetched on first use)");
    let config = model.config.clone();
    let transformer = Transformer::load(CpuBackend::new(), config.clone(), model.weights.as_ref())
        .expect("load weights");
    let prompt = synthetic_prompt(PROMPT_TOKENS, config.vocab_size, 0);
    let batch = PackedBatch::from_sequences(&[&prompt]);

    let mut group = c.benchmark_group("prefill");
    group.sample_size(10);
    group.throughput(Throughput::Elements(PROMPT_TOKENS as u64));
    group.bench_function(format!("{}/{PROMPT_TOKENS}_tokens", model.name), |b| {
        b.iter(|| {
            let hidden = transformer.forward_hidden(black_box(&batch)).unwrap();
            transformer
                .logits_at(&hidden, &[PROMPT_TOKENS - 1])
                .unwrap()
        })
    });
    group.finish();

    let mut group = c.benchmark_group("gemm");
    group.sample_size(10);
    for (name, out, inp, _) in linear_shapes(&config) {
        let a: Vec<f32> = (0..PROMPT_TOKENS * inp)
            .map(|i| (i % 31) as f32 * 0.01)
            .collect();
        let w: Vec<f32> = (0..out * inp).map(|i| (i % 29) as f32 * 0.01).collect();
        let w = PackedMatrix::pack(&w, out, inp);
        let mut y = vec![0f32; PROMPT_TOKENS * out];
        // Throughput in FLOP: criterion's "elements/s" then reads as FLOP/s.
        group.throughput(Throughput::Elements(2 * (PROMPT_TOKENS * out * inp) as u64));
        group.bench_function(format!("{name}/{PROMPT_TOKENS}x{inp}x{out}"), |b| {
            b.iter(|| black_box(&w).matmul(&mut y, black_box(&a), PROMPT_TOKENS))
        });
    }
    group.finish();
}

criterion_group!(benches, default_model_prefill);
criterion_main!(benches);
