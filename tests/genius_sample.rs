//! Foresight re-sampling on the default model (fetched on first use; fails, never skips,
//! without it): the invariants of every trajectory record, the scores against an independent
//! forward pass, reproducibility, and pairs built from the result.
//!
//! Scores are checked against `score_packed` on re-tokenized text: the trajectory stores text,
//! and re-tokenizing sampled text occasionally splits it differently from the sampled tokens
//! (same count, other tokens), so at least 90% must match to 2e-3 rather than all.

use genius_engine::backend::cpu::CpuBackend;
use genius_engine::cli::score::{ScoreRequest, score_packed};
use genius_engine::engine::scheduler::{Engine, EngineConfig};
use genius_engine::genius::pairs::{PairOptions, Trajectory, build_pairs};
use genius_engine::genius::sample::{
    FinishedBeams, QueryInput, SampleConfig, Strategy, sample_queries,
};
use genius_engine::model::{LoadedModel, load_model};
use genius_engine::transformer::Transformer;

fn small_config(seed: u64) -> SampleConfig {
    SampleConfig {
        beams: 2,
        candidates: 3,
        steps: 2,
        max_step_tokens: 20,
        max_rollout_tokens: 24,
        seed,
        queries_in_flight: 2,
        ..SampleConfig::default()
    }
}

fn queries() -> Vec<QueryInput> {
    [
        "A shop sells pens at 3 dollars each. How much do 7 pens cost?",
        "If all cats are animals and Tom is a cat, is Tom an animal?",
        "Plan a 3-step morning routine for a student.",
    ]
    .iter()
    .enumerate()
    .map(|(i, q)| QueryInput {
        index: i as u64,
        id: format!("t{i}"),
        query: q.to_string(),
    })
    .collect()
}

fn run(model: &LoadedModel, cfg: &SampleConfig, qs: Vec<QueryInput>) -> Vec<Trajectory> {
    let t = Transformer::load(
        CpuBackend::new(),
        model.config.clone(),
        model.weights.as_ref(),
    )
    .unwrap();
    let mut engine = Engine::new(t, &model.tokenizer, EngineConfig::default()).unwrap();
    let mut out = Vec::new();
    let stats = sample_queries(
        &mut engine,
        &model.tokenizer,
        qs,
        cfg,
        |t| {
            out.push(t);
            Ok(())
        },
        |_| {},
    )
    .unwrap();
    assert!(stats.failed.is_empty(), "{:?}", stats.failed);
    assert_eq!(engine.stats().used, 0, "every sequence was released");
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

#[test]
fn trajectories_keep_the_method_invariants_and_scores_match_a_fresh_forward() {
    let model = load_model(None).expect("default model");
    let tok = &model.tokenizer;
    let cfg = small_config(11);
    let trajs = run(&model, &cfg, queries());
    assert_eq!(trajs.len(), 3);
    let scorer = Transformer::load(
        CpuBackend::new(),
        model.config.clone(),
        model.weights.as_ref(),
    )
    .unwrap();
    let (mut checked, mut matched) = (0, 0);
    for t in &trajs {
        assert!(t.prompt.ends_with(&cfg.prefix));
        assert!(!t.steps.is_empty() && t.steps.len() <= cfg.steps);
        assert_eq!(t.final_beams.len(), cfg.beams);
        // (Q, complete) of each beam, as the sampler orders them: complete beams first.
        let mut beams = vec![(0.0f64, false); cfg.beams];
        for (si, step) in t.steps.iter().enumerate() {
            assert_eq!(step.k as usize, si + 1);
            // Selections: distinct indices of this step's candidates.
            let mut sel = step.selected.clone();
            sel.sort_unstable();
            sel.dedup();
            assert_eq!(sel.len(), step.selected.len(), "distinct selections");
            assert!(sel.iter().all(|&i| i < step.candidates.len()));
            for c in &step.candidates {
                // f is the mean of the logged rollout log-probs (or of the candidate's own
                // when the candidate ended the answer and the rollout is empty).
                if !c.rollout_logprobs.is_empty() {
                    let mean = c.rollout_logprobs.iter().map(|&x| x as f64).sum::<f64>()
                        / c.rollout_logprobs.len() as f64;
                    assert!((c.f - mean).abs() < 1e-9, "f {} vs mean {mean}", c.f);
                } else {
                    assert!(
                        c.finished,
                        "an empty rollout only after a finished candidate"
                    );
                }
                // The advantage is f minus the beam's Q.
                assert!(!beams[c.beam].1, "a complete beam spawned a candidate");
                assert!((c.advantage - (c.f - beams[c.beam].0)).abs() < 1e-9);
                assert!(c.trajectory.starts_with(&cfg.prefix));
                assert!(c.trajectory.ends_with(&format!("{}{}", c.step, c.rollout)));

                // f against an independent forward pass over the same text, re-tokenized:
                // compared where the re-tokenization gives the same token count.
                if c.rollout_logprobs.is_empty() {
                    continue;
                }
                let context_text = format!(
                    "{}{}",
                    t.prompt,
                    &c.trajectory[cfg.prefix.len()..c.trajectory.len() - c.rollout.len()]
                );
                let prompt_ids = tok.encode(&context_text, false).unwrap();
                let mut completion_ids = tok.encode(&c.rollout, false).unwrap();
                if completion_ids.len() + 1 == c.rollout_logprobs.len() {
                    completion_ids.push(tok.eos_ids[0]); // the rollout ended with EOS
                }
                if completion_ids.len() != c.rollout_logprobs.len() {
                    continue;
                }
                let req = ScoreRequest {
                    prompt_ids,
                    completion_ids,
                };
                let lps = score_packed(&scorer, &[&req]).unwrap().remove(0);
                let f_scored = lps.iter().map(|&x| x as f64).sum::<f64>() / lps.len() as f64;
                // Re-tokenizing sampled text can give other tokens of the same count (BPE
                // merges differ from the sampled split), so a few may differ; most must not.
                if (f_scored - c.f).abs() < 2e-3 {
                    matched += 1;
                }
                checked += 1;
            }
            let mut next: Vec<(f64, bool)> = beams.iter().copied().filter(|b| b.1).collect();
            next.extend(step.selected.iter().map(|&i| {
                let c = &step.candidates[i];
                (c.f, c.finished)
            }));
            beams = next;
        }
        // Pairs: chosen has the highest f of its step, rejected is another candidate.
        let pairs = build_pairs(t, 0, &PairOptions::default()).unwrap();
        assert_eq!(pairs.len(), t.steps.len());
        for (p, step) in pairs.iter().zip(&t.steps) {
            let best = step.candidates.iter().map(|c| c.f).fold(f64::MIN, f64::max);
            assert_eq!(p.chosen_f, best);
            assert!(p.rejected_f <= best);
            assert_ne!(p.chosen, p.rejected);
        }
    }
    assert!(
        checked >= 20,
        "only {checked} candidates re-tokenized to the same length"
    );
    assert!(
        matched * 10 >= checked * 9,
        "only {matched} of {checked} foresight scores match an independent forward pass"
    );
}

#[test]
fn results_depend_on_the_seed_only_not_on_concurrency() {
    let model = load_model(None).expect("default model");
    let cfg = small_config(5);
    let together = run(&model, &cfg, queries());
    let one_at_a_time = run(
        &model,
        &SampleConfig {
            queries_in_flight: 1,
            ..cfg.clone()
        },
        queries(),
    );
    assert_eq!(together, one_at_a_time);
    let other_seed = run(&model, &small_config(6), queries());
    assert_ne!(together, other_seed);
}

#[test]
fn greedy_selection_and_finished_beams_follow_the_flags() {
    let model = load_model(None).expect("default model");
    let cfg = SampleConfig {
        strategy: Strategy::Greedy,
        finished_beams: FinishedBeams::Stop,
        steps: 3,
        ..small_config(3)
    };
    for t in run(&model, &cfg, queries()) {
        for step in &t.steps {
            let mut order: Vec<usize> = (0..step.candidates.len()).collect();
            order.sort_by(|&a, &b| {
                step.candidates[b]
                    .f
                    .total_cmp(&step.candidates[a].f)
                    .then(a.cmp(&b))
            });
            assert_eq!(step.selected, order[..step.selected.len()].to_vec());
        }
        // A finished beam spawns no candidates in later steps.
        let mut finished_beams = 0;
        for step in &t.steps {
            let live = cfg.beams - finished_beams;
            assert_eq!(step.selected.len(), live);
            assert_eq!(step.candidates.len(), live * cfg.candidates);
            finished_beams += step
                .selected
                .iter()
                .filter(|&&i| step.candidates[i].finished)
                .count();
        }
    }
}
