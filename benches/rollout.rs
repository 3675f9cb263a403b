//! Criterion benchmarks of the rollout engine on the CPU backend with the default model:
//! batched decode (prompt 128, 16 new tokens per sequence) at 1, 8 and 32 concurrent sequences,
//! and the foresight pattern (one 256-token prompt forked 8 ways). Throughput is in generated
//! tokens. `genius-engine bench rollout` measures the longer workloads of the performance notes.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use genius_engine::backend::cpu::CpuBackend;
use genius_engine::cli::bench::synthetic_prompt as prompt;
use genius_engine::engine::sampler::SamplingParams;
use genius_engine::engine::{Engine, EngineConfig, Request, StopRules};
use genius_engine::model::load_model;
use genius_engine::transformer::Transformer;

const NEW_TOKENS: usize = 16;

fn rollouts(c: &mut Criterion) {
    let model = load_model(None).expect("default model (fetched on first use)");
    let vocab = model.config.vocab_size;
    let transformer = Transformer::load(
        CpuBackend::new(),
        model.config.clone(),
        model.weights.as_ref(),
    )
    .expect("load weights");
    let mut engine = Engine::new(
        transformer,
        &model.tokenizer,
        EngineConfig {
            block_size: 16,
            kv_budget_tokens: 64 * 512,
            max_batch_tokens: 4096,
        },
    )
    .expect("engine");
    let sampling = SamplingParams {
        seed: 3,
        ..SamplingParams::default()
    };
    let stop = StopRules {
        max_new_tokens: NEW_TOKENS,
        ignore_eos: true,
        ..StopRules::default()
    };

    let mut group = c.benchmark_group("rollout");
    group.sample_size(10);
    for batch in [1usize, 8, 32] {
        group.throughput(Throughput::Elements((batch * NEW_TOKENS) as u64));
        group.bench_function(format!("decode/{batch}_sequences/prompt_128"), |b| {
            b.iter(|| {
                let seqs: Vec<_> = (0..batch)
                    .map(|s| {
                        engine
                            .submit(Request {
                                tokens: prompt(128, vocab, s as u64),
                                parent: None,
                                sampling,
                                stop: stop.clone(),
                                stream: s as u64,
                            })
                            .unwrap()
                    })
                    .collect();
                engine.run_until_idle().unwrap();
                for s in seqs {
                    engine.release(s).unwrap();
                }
            })
        });
    }
    group.throughput(Throughput::Elements((8 * NEW_TOKENS) as u64));
    group.bench_function("foresight/256_prompt_forked_8", |b| {
        let p = prompt(256, vocab, 99);
        b.iter(|| {
            let parent = engine
                .submit(Request {
                    tokens: p[..255].to_vec(),
                    parent: None,
                    sampling,
                    stop: StopRules {
                        max_new_tokens: 0,
                        ..StopRules::default()
                    },
                    stream: 1000,
                })
                .unwrap();
            engine.run_until_idle().unwrap();
            let kids: Vec<_> = (0..8)
                .map(|f| {
                    engine
                        .submit(Request {
                            tokens: p[255..].to_vec(),
                            parent: Some(parent),
                            sampling,
                            stop: stop.clone(),
                            stream: 1001 + f,
                        })
                        .unwrap()
                })
                .collect();
            engine.run_until_idle().unwrap();
            for k in kids {
                engine.release(k).unwrap();
            }
            engine.release(parent).unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, rollouts);
criterion_main!(benches);
