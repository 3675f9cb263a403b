//! The rollout engine on the CPU backend: paged generation against the plain forward,
//! determinism whatever the batch, scheduling, preemption and block size, prefix forking,
//! continue / truncate, stop rules, sequences that cannot run, the default model, and the
//! `generate` command.

mod common;

use common::*;
use genius_engine::backend::cpu::CpuBackend;
use genius_engine::engine::sampler::SamplingParams;
use genius_engine::engine::{
    Engine, EngineConfig, FinishReason, Finished, Request, SeqId, StopRules,
};
use genius_engine::model::safetensors::Dtype;
use genius_engine::model::{LoadedModel, ModelConfig, load_model};
use genius_engine::transformer::{PackedBatch, Transformer};
use std::collections::HashMap;
use std::process::Command;

/// A tiny random checkpoint loaded back from disk (the tempdir is kept alive beside it).
struct Tiny {
    _dir: tempfile::TempDir,
    model: LoadedModel,
}

fn tiny(config: &ModelConfig, seed: u64) -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(dir.path(), config, seed, Dtype::F32);
    let model = load_model(Some(dir.path().to_str().unwrap())).unwrap();
    Tiny { _dir: dir, model }
}

fn transformer(m: &LoadedModel) -> Transformer<CpuBackend> {
    Transformer::load(CpuBackend::new(), m.config.clone(), m.weights.as_ref()).unwrap()
}

fn engine(m: &LoadedModel, config: EngineConfig) -> Engine<'_, CpuBackend> {
    Engine::new(transformer(m), &m.tokenizer, config).unwrap()
}

fn config(block_size: usize, kv_budget_tokens: usize, max_batch_tokens: usize) -> EngineConfig {
    EngineConfig {
        block_size,
        kv_budget_tokens,
        max_batch_tokens,
    }
}

fn random_tokens(rng: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
    // Avoid the specials (ids 0..4) so that no prompt contains an EOS.
    (0..n).map(|_| (4 + rng.below(vocab - 4)) as u32).collect()
}

fn fresh(tokens: Vec<u32>, sampling: SamplingParams, stop: StopRules, stream: u64) -> Request {
    Request {
        tokens,
        parent: None,
        sampling,
        stop,
        stream,
    }
}

fn length(n: usize) -> StopRules {
    StopRules {
        max_new_tokens: n,
        ignore_eos: true,
        ..StopRules::default()
    }
}

fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    row.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap()
}

/// Runs `requests` through one engine in the given submission order, with steps that mix
/// decodes and prefill chunks run as two passes when `split`: results by request index, the
/// preemptions, and how many steps were split.
fn run_all_split(
    m: &LoadedModel,
    cfg: EngineConfig,
    requests: &[Request],
    order: &[usize],
    split: bool,
) -> ((HashMap<usize, Finished>, u64), u64) {
    let mut e = engine(m, cfg);
    e.set_split_mixed_steps(split);
    let mut owner: HashMap<SeqId, usize> = HashMap::new();
    for &i in order {
        owner.insert(e.submit(requests[i].clone()).unwrap(), i);
    }
    let mut out = HashMap::new();
    for f in e.run_until_idle().unwrap() {
        assert!(
            !matches!(f.finish_reason, FinishReason::Error(_)),
            "{:?}",
            f.finish_reason
        );
        out.insert(owner[&f.seq], f);
    }
    assert_eq!(out.len(), requests.len());
    ((out, e.preemptions), e.split_steps)
}

// 1. Paged generation equals the plain forward.
#[test]
fn greedy_generation_equals_the_full_forward() {
    for (config, seed) in [(tiny_llama_config(), 11), (tiny_qwen2_config(), 12)] {
        let t = tiny(&config, seed);
        let full_model = transformer(&t.model);
        let mut rng = Rng::new(seed);
        let prompts: Vec<Vec<u32>> = [11usize, 1, 37]
            .iter()
            .map(|&n| random_tokens(&mut rng, n, config.vocab_size))
            .collect();
        // All three batched together, blocks of 7 (dividing none of the lengths).
        let mut e = engine(&t.model, config_with_block(7));
        let ids: Vec<SeqId> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                e.submit(fresh(
                    p.clone(),
                    SamplingParams::greedy(),
                    length(20),
                    i as u64,
                ))
                .unwrap()
            })
            .collect();
        let finished = e.run_until_idle().unwrap();
        for (p, id) in prompts.iter().zip(&ids) {
            let f = finished.iter().find(|f| f.seq == *id).unwrap();
            assert_eq!(f.finish_reason, FinishReason::Length);
            assert_eq!(f.tokens.len(), 20);
            let mut seq = p.clone();
            for (k, (&tok, &lp)) in f.tokens.iter().zip(&f.logprobs).enumerate() {
                let hidden = full_model
                    .forward_hidden(&PackedBatch::from_sequences(&[&seq]))
                    .unwrap();
                let logits = full_model.logits_at(&hidden, &[seq.len() - 1]).unwrap();
                let expected = argmax(&logits.data);
                assert_eq!(tok, expected, "{:?} token {k}", config.arch);
                let ls = log_softmax(&logits.data);
                assert!(
                    (lp - ls[tok as usize]).abs() < 1e-4,
                    "{:?} token {k}: logprob {lp} vs {}",
                    config.arch,
                    ls[tok as usize]
                );
                // Greedy: sampled from a point mass.
                assert_eq!(f.sampling_logprobs[k], 0.0);
                seq.push(expected);
            }
        }
    }
}

fn config_with_block(block_size: usize) -> EngineConfig {
    EngineConfig {
        block_size,
        ..EngineConfig::default()
    }
}

// 2. Determinism.
fn mixed_requests(vocab: usize) -> Vec<Request> {
    let mut rng = Rng::new(2024);
    (0..64)
        .map(|i| {
            let len = 1 + rng.below(40);
            let tokens = random_tokens(&mut rng, len, vocab);
            let sampling = SamplingParams {
                temperature: 0.7 + 0.6 * (rng.below(1000) as f32 / 999.0),
                top_p: [1.0, 0.9, 0.6][rng.below(3)],
                top_k: [0, 5, 20][rng.below(3)],
                seed: rng.below(4) as u64,
            };
            let stop = StopRules {
                max_new_tokens: 1 + rng.below(30),
                ignore_eos: i % 2 == 0,
                ..StopRules::default()
            };
            fresh(tokens, sampling, stop, 1000 + 17 * i as u64)
        })
        .collect()
}

#[test]
fn tokens_do_not_depend_on_batch_order_preemption_or_block_size() {
    let cfg = tiny_llama_config();
    let t = tiny(&cfg, 21);
    let requests = mixed_requests(cfg.vocab_size);
    let n = requests.len();

    // Alone: one at a time in a fresh engine each.
    let alone: Vec<Finished> = requests
        .iter()
        .map(|r| {
            let mut e = engine(&t.model, EngineConfig::default());
            e.submit(r.clone()).unwrap();
            let mut f = e.run_until_idle().unwrap();
            assert_eq!(f.len(), 1);
            f.pop().unwrap()
        })
        .collect();
    // The mix is not degenerate: several finish reasons, sampled (not greedy) draws.
    assert!(
        alone
            .iter()
            .any(|f| f.finish_reason == FinishReason::Length)
    );
    assert!(
        alone
            .iter()
            .map(|f| f.tokens.len())
            .collect::<std::collections::HashSet<_>>()
            .len()
            > 10
    );

    let forward: Vec<usize> = (0..n).collect();
    let reverse: Vec<usize> = (0..n).rev().collect();
    // (name, config, order, must preempt, mixed steps split into two passes)
    let runs: Vec<(&str, EngineConfig, &[usize], bool, bool)> = vec![
        ("together", EngineConfig::default(), &forward, false, false),
        ("reverse", EngineConfig::default(), &reverse, false, false),
        ("kv budget", config(16, 320, 2048), &forward, true, false),
        ("block 1", config(1, 1 << 16, 2048), &forward, false, false),
        ("block 7", config(7, 1 << 16, 2048), &reverse, false, false),
        (
            "block 7 small budget",
            config(7, 301, 2048),
            &forward,
            true,
            false,
        ),
        (
            "block 1 small budget",
            config(1, 200, 2048),
            &reverse,
            true,
            false,
        ),
        (
            "chunked prefill",
            config(16, 1 << 16, 8),
            &forward,
            false,
            false,
        ),
        (
            "chunked + budget",
            config(16, 320, 8),
            &reverse,
            true,
            false,
        ),
        (
            "split, chunked prefill",
            config(16, 1 << 16, 8),
            &forward,
            false,
            true,
        ),
        (
            "split, chunked + budget",
            config(16, 320, 8),
            &reverse,
            true,
            true,
        ),
        (
            "split, block 7 small budget",
            config(7, 301, 2048),
            &forward,
            true,
            true,
        ),
    ];
    for (name, ecfg, order, must_preempt, split) in runs {
        let ((got, preemptions), split_steps) =
            run_all_split(&t.model, ecfg, &requests, order, split);
        if must_preempt {
            assert!(preemptions > 0, "{name}: no preemption");
        }
        if split {
            assert!(split_steps > 0, "{name}: no step was split");
        } else {
            assert_eq!(split_steps, 0, "{name}: a step was split");
        }
        for (i, a) in alone.iter().enumerate() {
            let g = &got[&i];
            assert_eq!(g.tokens, a.tokens, "{name}: request {i}");
            assert_eq!(g.finish_reason, a.finish_reason, "{name}: request {i}");
            for (x, y) in g.logprobs.iter().zip(&a.logprobs) {
                assert!((x - y).abs() < 1e-4, "{name}: request {i}: {x} vs {y}");
            }
        }
    }
}

// 3. Forking shares KV.
#[test]
fn forked_children_share_the_prompt_kv_and_match_independent_requests() {
    // (The tiny Qwen2 checkpoint puts all its mass on one token; the LLaMA one samples.)
    let cfg = tiny_llama_config();
    let t = tiny(&cfg, 31);
    let mut rng = Rng::new(31);
    let prompt = random_tokens(&mut rng, 200, cfg.vocab_size);
    let sampling = SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        top_k: 0,
        seed: 7,
    };
    let stop = length(24);
    let block = 16;
    let mut e = engine(&t.model, config(block, 4096, 2048));
    let parent = e
        .submit(fresh(
            prompt[..199].to_vec(),
            sampling,
            StopRules::default(),
            0,
        ))
        .unwrap();
    let done = e.run_until_idle().unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].seq, parent);
    assert!(done[0].tokens.is_empty());
    let parent_blocks = 199usize.div_ceil(block);
    assert_eq!(e.stats().used, parent_blocks);

    let children: Vec<SeqId> = (0..8)
        .map(|k| {
            e.submit(Request {
                tokens: vec![prompt[199]],
                parent: Some(parent),
                sampling,
                stop: stop.clone(),
                stream: 100 + k,
            })
            .unwrap()
        })
        .collect();
    let first = e.step().unwrap();
    assert!(first.is_empty());
    let stats = e.stats();
    let full_blocks = 199 / block;
    assert!(
        stats.shared >= full_blocks,
        "shared {} < {full_blocks}",
        stats.shared
    );
    // Each child owns at most its copied partial block (+ one fresh block).
    assert!(
        stats.used <= parent_blocks + 8 * 2,
        "used {} blocks for 8 forks of {parent_blocks}",
        stats.used
    );
    assert!(stats.used * 4 < 8 * parent_blocks);
    // Only the children's last prompt token was computed, not their prompts.
    assert_eq!(e.tokens_processed, 199 + 8);
    let mut forked: HashMap<SeqId, Finished> = e
        .run_until_idle()
        .unwrap()
        .into_iter()
        .map(|f| (f.seq, f))
        .collect();
    assert_eq!(forked.len(), 8);

    let mut e2 = engine(&t.model, config(block, 4096, 2048));
    let independent: Vec<SeqId> = (0..8)
        .map(|k| {
            e2.submit(fresh(prompt.clone(), sampling, stop.clone(), 100 + k))
                .unwrap()
        })
        .collect();
    let mut indep: HashMap<SeqId, Finished> = e2
        .run_until_idle()
        .unwrap()
        .into_iter()
        .map(|f| (f.seq, f))
        .collect();
    let first_independent = indep[&independent[0]].tokens.clone();
    let mut distinct = std::collections::HashSet::new();
    for (c, i) in children.iter().zip(&independent) {
        let a = forked.remove(c).unwrap();
        let b = indep.remove(i).unwrap();
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.tokens.len(), 24);
        for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
            assert!((x - y).abs() < 1e-4);
        }
        distinct.insert(a.tokens);
    }
    assert!(distinct.len() > 1, "the streams should differ");

    // A fork with no new tokens of a parent holding the whole prompt (all of it cached):
    // the last token is recomputed, the result is the same.
    let whole = e
        .submit(fresh(prompt.clone(), sampling, StopRules::default(), 0))
        .unwrap();
    e.run_until_idle().unwrap();
    e.submit(Request {
        tokens: vec![],
        parent: Some(whole),
        sampling,
        stop: stop.clone(),
        stream: 100,
    })
    .unwrap();
    let child = only(e.run_until_idle().unwrap());
    assert_eq!(child.tokens, first_independent);
}

// 4. continue_sequence and truncate.
fn only(mut v: Vec<Finished>) -> Finished {
    assert_eq!(v.len(), 1);
    v.pop().unwrap()
}

fn fresh_run(
    m: &LoadedModel,
    tokens: &[u32],
    sampling: SamplingParams,
    stop: StopRules,
) -> Finished {
    let mut e = engine(m, config(8, 4096, 2048));
    e.submit(fresh(tokens.to_vec(), sampling, stop, 5)).unwrap();
    only(e.run_until_idle().unwrap())
}

#[test]
fn continue_and_truncate_equal_fresh_requests_from_the_history() {
    let cfg = tiny_llama_config();
    let t = tiny(&cfg, 41);
    let mut rng = Rng::new(41);
    let prompt = random_tokens(&mut rng, 10, cfg.vocab_size);
    let s1 = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        seed: 3,
    };
    // Pick a stop token from a probe run: the 6th generated token.
    let probe = fresh_run(&t.model, &prompt, s1, length(30));
    let stop_tok = probe.tokens[5];
    let cut = probe.tokens.iter().position(|&x| x == stop_tok).unwrap();

    let mut e = engine(&t.model, config(8, 4096, 2048));
    let a = e
        .submit(fresh(
            prompt.clone(),
            s1,
            StopRules {
                max_new_tokens: 30,
                stop_token_ids: vec![stop_tok],
                ignore_eos: true,
                ..StopRules::default()
            },
            5,
        ))
        .unwrap();
    let step1 = only(e.run_until_idle().unwrap());
    assert_eq!(step1.finish_reason, FinishReason::StopToken);
    assert_eq!(step1.tokens, probe.tokens[..=cut]);

    // Continue with other parameters.
    let s2 = SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        top_k: 10,
        seed: 99,
    };
    e.continue_sequence(a, s2, length(15)).unwrap();
    let step2 = only(e.run_until_idle().unwrap());
    assert_eq!(step2.seq, a);
    assert_eq!(step2.tokens.len(), 15);
    let history: Vec<u32> = e.tokens(a).unwrap().to_vec();
    assert_eq!(history.len(), prompt.len() + step1.tokens.len() + 15);
    let expected = fresh_run(&t.model, &history[..history.len() - 15], s2, length(15));
    assert_eq!(step2.tokens, expected.tokens);
    for (x, y) in step2.logprobs.iter().zip(&expected.logprobs) {
        assert!((x - y).abs() < 1e-4);
    }

    // Truncate to marks (inside the cached part, at the last cached token, at the very end)
    // and continue.
    let s3 = SamplingParams {
        temperature: 1.2,
        top_p: 1.0,
        top_k: 0,
        seed: 1,
    };
    let mut history = history;
    for back in [4usize, 9, 0] {
        let mark = if back == 0 {
            history.len()
        } else {
            prompt.len() + step1.tokens.len() + back
        };
        e.truncate(a, mark).unwrap();
        assert_eq!(e.tokens(a).unwrap(), &history[..mark]);
        e.continue_sequence(a, s3, length(12)).unwrap();
        let got = only(e.run_until_idle().unwrap());
        let expected = fresh_run(&t.model, &history[..mark], s3, length(12));
        assert_eq!(got.tokens, expected.tokens, "mark {mark}");
        history = e.tokens(a).unwrap().to_vec();
    }
    // A prefill-only sequence (everything cached) continued directly.
    let p = e
        .submit(fresh(prompt.clone(), s1, StopRules::default(), 5))
        .unwrap();
    let pre = only(e.run_until_idle().unwrap());
    assert_eq!(pre.finish_reason, FinishReason::Length);
    assert!(pre.tokens.is_empty());
    e.continue_sequence(p, s1, length(30)).unwrap();
    let got = only(e.run_until_idle().unwrap());
    assert_eq!(got.tokens, probe.tokens);
    // Truncating or continuing a running sequence is refused.
    e.continue_sequence(p, s1, length(3)).unwrap();
    assert!(e.truncate(p, 3).is_err());
    assert!(e.continue_sequence(p, s1, length(3)).is_err());
    assert!(e.truncate(a, 0).is_err());
    assert!(e.truncate(a, 10_000).is_err());
}

// 5. Stops through the engine.
#[test]
fn stop_tokens_eos_length_and_ignore_eos() {
    let cfg = tiny_llama_config();
    let t = tiny(&cfg, 51);
    let eos = t.model.tokenizer.token_to_id("</s>").unwrap();
    assert_eq!(eos, 1);
    assert!(t.model.tokenizer.eos_ids.contains(&eos));
    let mut rng = Rng::new(51);
    let prompt = random_tokens(&mut rng, 6, cfg.vocab_size);
    let s = SamplingParams {
        temperature: 1.3,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
    };
    // Find a stream that samples EOS somewhere (ignore_eos keeps going past it).
    let mut found = None;
    for stream in 0..200u64 {
        let mut e = engine(&t.model, EngineConfig::default());
        e.submit(fresh(prompt.clone(), s, length(150), stream))
            .unwrap();
        let f = only(e.run_until_idle().unwrap());
        assert_eq!(f.finish_reason, FinishReason::Length);
        assert_eq!(f.tokens.len(), 150);
        if let Some(k) = f.tokens.iter().position(|&x| x == eos)
            && k + 1 < f.tokens.len()
        {
            found = Some((stream, k, f));
            break;
        }
    }
    let (stream, k, ignored) = found.expect("some stream samples EOS");

    let run = |stop: StopRules| {
        let mut e = engine(&t.model, EngineConfig::default());
        e.submit(fresh(prompt.clone(), s, stop, stream)).unwrap();
        only(e.run_until_idle().unwrap())
    };
    // EOS stops, the EOS token is in the tokens but not the text.
    let f = run(StopRules {
        max_new_tokens: 150,
        ..StopRules::default()
    });
    assert_eq!(f.finish_reason, FinishReason::Eos);
    assert_eq!(f.tokens, ignored.tokens[..=k]);
    assert!(!f.text.contains("</s>"), "{:?}", f.text);
    assert_eq!(
        f.text,
        t.model.tokenizer.decode(&ignored.tokens[..k]).unwrap()
    );

    // A stop token id that comes before the EOS.
    if k >= 2 {
        let tok = ignored.tokens[k - 2];
        let first = ignored.tokens.iter().position(|&x| x == tok).unwrap();
        let f = run(StopRules {
            max_new_tokens: 150,
            stop_token_ids: vec![tok],
            ..StopRules::default()
        });
        assert_eq!(f.finish_reason, FinishReason::StopToken);
        assert_eq!(f.tokens, ignored.tokens[..=first]);
    }
    // A stop token id that is the EOS itself: EOS wins the reason.
    let f = run(StopRules {
        max_new_tokens: 150,
        stop_token_ids: vec![eos],
        ..StopRules::default()
    });
    assert_eq!(f.finish_reason, FinishReason::Eos);
    // With ignore_eos a stop token still stops.
    let f = run(StopRules {
        max_new_tokens: 150,
        stop_token_ids: vec![eos],
        ignore_eos: true,
        ..StopRules::default()
    });
    assert_eq!(f.finish_reason, FinishReason::StopToken);
    assert_eq!(f.tokens, ignored.tokens[..=k]);
    // max_new_tokens before the EOS: length.
    if k >= 1 {
        let f = run(StopRules {
            max_new_tokens: k,
            ..StopRules::default()
        });
        assert_eq!(f.finish_reason, FinishReason::Length);
        assert_eq!(f.tokens, ignored.tokens[..k]);
    }
}

fn chat_ids(m: &LoadedModel, question: &str) -> Vec<u32> {
    let tok = &m.tokenizer;
    let messages = serde_json::json!([{"role": "user", "content": question}]);
    let prompt = tok.apply_chat_template(&messages, true).unwrap();
    tok.encode(&prompt, false).unwrap()
}

#[test]
fn default_model_stop_string_and_capital_of_france() {
    let m = load_model(None).expect("default model");
    let mut e = engine(&m, EngineConfig::default());
    let run = |e: &mut Engine<'_, CpuBackend>, ids: &[u32], stop: StopRules| {
        e.submit(fresh(ids.to_vec(), SamplingParams::greedy(), stop, 0))
            .unwrap();
        only(e.run_until_idle().unwrap())
    };

    // 7. Greedy answer through the engine.
    let france = chat_ids(&m, "What is the capital of France?");
    let f = run(
        &mut e,
        &france,
        StopRules {
            max_new_tokens: 48,
            ..StopRules::default()
        },
    );
    assert!(
        f.text.starts_with("The capital of France is Paris."),
        "{:?}",
        f.text
    );
    assert_eq!(f.finish_reason, FinishReason::Eos, "{:?}", f.text);
    assert!(m.tokenizer.eos_ids.contains(f.tokens.last().unwrap()));

    // 5. A stop string "\n" on a chat prompt whose answer has several lines.
    let ids = chat_ids(&m, "List three fruits, one per line.");
    let probe = run(&mut e, &ids, length(40));
    let nl = probe
        .text
        .find('\n')
        .unwrap_or_else(|| panic!("no newline in {:?}", probe.text));
    let stop = StopRules {
        max_new_tokens: 40,
        stop_strings: vec!["\n".into()],
        ..StopRules::default()
    };
    let f = run(&mut e, &ids, stop.clone());
    assert_eq!(f.finish_reason, FinishReason::StopString);
    assert!(!f.text.contains('\n'), "{:?}", f.text);
    assert_eq!(f.text, probe.text[..nl]);
    assert_eq!(f.tokens, probe.tokens[..f.tokens.len()]);
    let f = run(
        &mut e,
        &ids,
        StopRules {
            include_stop_str: true,
            ..stop
        },
    );
    assert_eq!(f.finish_reason, FinishReason::StopString);
    assert_eq!(f.text, probe.text[..=nl]);
    assert!(f.text.ends_with('\n'));
}

// 6. Sequences that cannot run.
#[test]
fn impossible_sequences_fail_alone_and_bad_requests_are_refused() {
    let cfg = tiny_llama_config();
    let t = tiny(&cfg, 61);
    let mut rng = Rng::new(61);
    let s = SamplingParams::default();
    for big_first in [true, false] {
        let mut e = engine(&t.model, config(16, 64, 2048));
        let mut small = Vec::new();
        let mut submit_small = |e: &mut Engine<'_, CpuBackend>, rng: &mut Rng| {
            for k in 0..3 {
                let p = random_tokens(rng, 10, cfg.vocab_size);
                small.push(e.submit(fresh(p, s, length(10), k)).unwrap());
            }
        };
        let big_prompt = random_tokens(&mut rng, 100, cfg.vocab_size);
        if !big_first {
            submit_small(&mut e, &mut rng);
        }
        let big = e.submit(fresh(big_prompt, s, length(10), 9)).unwrap();
        if big_first {
            submit_small(&mut e, &mut rng);
        }
        let done = e.run_until_idle().unwrap();
        assert_eq!(done.len(), 4);
        for f in &done {
            if f.seq == big {
                assert!(
                    matches!(&f.finish_reason, FinishReason::Error(m) if m.contains("budget")),
                    "{:?}",
                    f.finish_reason
                );
            } else {
                assert!(small.contains(&f.seq));
                assert_eq!(f.finish_reason, FinishReason::Length);
                assert_eq!(f.tokens.len(), 10);
            }
        }
        assert_eq!(e.num_active(), 0);
    }

    let mut e = engine(&t.model, EngineConfig::default());
    let ok = random_tokens(&mut rng, 5, cfg.vocab_size);
    // Longer than (or as long as) the context window.
    let context = cfg.max_position_embeddings;
    for n in [context, context + 10] {
        let long = random_tokens(&mut rng, n, cfg.vocab_size);
        let err = e.submit(fresh(long, s, length(4), 0)).unwrap_err();
        assert!(format!("{err:#}").contains("context"), "{err:#}");
    }
    let long = random_tokens(&mut rng, context - 1, cfg.vocab_size);
    e.submit(fresh(long, s, length(4), 0)).unwrap();
    // Invalid sampling parameters.
    for (t_, p_) in [
        (-1.0, 1.0),
        (f32::NAN, 1.0),
        (1.0, 0.0),
        (1.0, 1.5),
        (1.0, -0.5),
    ] {
        let bad = SamplingParams {
            temperature: t_,
            top_p: p_,
            ..SamplingParams::default()
        };
        assert!(
            e.submit(fresh(ok.clone(), bad, length(4), 0)).is_err(),
            "T {t_} top_p {p_} accepted"
        );
    }
    // Empty, out-of-vocabulary, unknown parent.
    assert!(e.submit(fresh(vec![], s, length(4), 0)).is_err());
    assert!(e.submit(fresh(vec![5, 64], s, length(4), 0)).is_err());
    assert!(
        e.submit(Request {
            tokens: vec![5],
            parent: Some(SeqId(12345)),
            sampling: s,
            stop: length(4),
            stream: 0,
        })
        .is_err()
    );
    // Nothing rejected was added: only the one valid request runs.
    let done = e.run_until_idle().unwrap();
    assert_eq!(done.len(), 1);
    // Forking a running sequence is refused.
    let a = e.submit(fresh(ok.clone(), s, length(4), 0)).unwrap();
    assert!(
        e.submit(Request {
            tokens: vec![5],
            parent: Some(a),
            sampling: s,
            stop: length(4),
            stream: 0,
        })
        .is_err()
    );
    let done = e.run_until_idle().unwrap();
    assert_eq!(done.len(), 1);
    let bad = SamplingParams {
        temperature: -0.5,
        ..s
    };
    assert!(e.continue_sequence(a, bad, length(4)).is_err());
}

// 8. The `generate` binary.
fn generate(
    model: &std::path::Path,
    input: &std::path::Path,
    output: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_genius-engine"))
        .args(["generate", "--model", model.to_str().unwrap()])
        .args(["--device", "cpu"])
        .args(["--input", input.to_str().unwrap()])
        .args(["--output", output.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn generate_command_writes_samples_and_reports_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    let mut cfg = tiny_llama_config();
    cfg.max_position_embeddings = 64;
    write_tiny_checkpoint(&model_dir, &cfg, 81, Dtype::F32);
    // The written config.json carries the small context.
    let hf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(hf["max_position_embeddings"], 64);

    let words = |n: usize| {
        (0..n)
            .map(|i| format!("w{}", 4 + i % 50))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    let lines = [
        serde_json::json!({"prompt": words(5)}).to_string(),
        serde_json::json!({"messages": [{"role": "user", "content": words(3)}]}).to_string(),
        serde_json::json!({"prompt": words(80)}).to_string(),
        "{not json".to_string(),
        serde_json::json!({"prompt": "w7"}).to_string(),
    ];
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let out = generate(
        &model_dir,
        &input,
        &output,
        &["--n", "3", "--max-new-tokens", "6", "--seed", "4"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in.jsonl:3"), "{stderr}");
    assert!(stderr.contains("in.jsonl:4"), "{stderr}");
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let errors: Vec<_> = records
        .iter()
        .filter(|r| r.get("error").is_some())
        .collect();
    assert_eq!(errors.len(), 2, "{records:?}");
    for (line, idx) in [(3, 2), (4, 3)] {
        let e = errors.iter().find(|r| r["index"] == idx).unwrap();
        let msg = e["error"].as_str().unwrap();
        assert!(msg.contains(&format!("in.jsonl:{line}:")), "{msg}");
    }
    let samples: Vec<_> = records
        .iter()
        .filter(|r| r.get("error").is_none())
        .collect();
    assert_eq!(samples.len(), 9);
    for idx in [0, 1, 4] {
        let mut got: Vec<u64> = samples
            .iter()
            .filter(|r| r["index"] == idx)
            .map(|r| r["sample"].as_u64().unwrap())
            .collect();
        got.sort();
        assert_eq!(got, vec![0, 1, 2], "index {idx}");
    }
    for r in &samples {
        for key in [
            "index",
            "sample",
            "text",
            "token_ids",
            "logprobs",
            "finish_reason",
        ] {
            assert!(r.get(key).is_some(), "{key} missing in {r}");
        }
        let ids = r["token_ids"].as_array().unwrap();
        assert_eq!(ids.len(), r["logprobs"].as_array().unwrap().len());
        assert!(!ids.is_empty() && ids.len() <= 6);
        assert!(["length", "eos"].contains(&r["finish_reason"].as_str().unwrap()));
    }

    // Bad sampling parameters are refused before anything runs.
    for (flag, value, name) in [
        ("--temperature", "-1", "temperature"),
        ("--top-p", "0", "top"),
        ("--top-p", "1.5", "top"),
    ] {
        let output2 = dir.path().join("out2.jsonl");
        let out = generate(&model_dir, &input, &output2, &[flag, value]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag} {value}: {stderr}");
        assert!(stderr.to_lowercase().contains(name), "{flag}: {stderr}");
        assert!(
            !output2.exists() || std::fs::read_to_string(&output2).unwrap().is_empty(),
            "{flag} {value} generated something"
        );
    }
}
