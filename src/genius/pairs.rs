//! Preference pairs from sampled trajectories (method.md section 2), and the two JSONL formats
//! involved: the trajectory file the foresight sampler writes (one [`Trajectory`] per query)
//! and the pair file the trainer reads (one [`Pair`] per line).
//!
//! One pair per step of a query: **chosen** = the candidate with the highest foresight score
//! `f` at that step (ties: the lowest candidate index); **rejected** = one of the *other*
//! candidates of the step, drawn uniformly ([`RejectStrategy::Uniform`], the release's
//! behaviour, **default**) or the one with the lowest `f` ([`RejectStrategy::Lowest`], the
//! paper's "w/o sampling" ablation; ties: the lowest index). The uniform draw is
//! `u = `[`uniform`]`(seed, seq_id = query index, position = step k)` and picks the
//! `floor(u * n)`-th of the `n` other candidates in index order, so pairs are reproducible
//! from the seed alone.
//!
//! With [`PairOptions::max_chars`] set, candidates whose `trajectory` has that many characters
//! (Unicode scalar values, as Python's `len`) or more are dropped before choosing (the release
//! kept trajectories shorter than 10,000 characters). A step with fewer than 2 (remaining)
//! candidates gives no pair.
//!
//! JSONL files are read with blank lines skipped and errors that name the file and the
//! 1-based line number.

use crate::engine::sampler::uniform;
use anyhow::{Context, Result, bail, ensure};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::Path;

/// All sampling results for one query: a line of `trajectories.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trajectory {
    /// The query's id.
    pub id: String,
    /// The query text.
    pub query: String,
    /// The rendered prompt the candidates were sampled after (chat template, assistant header,
    /// reasoning prefix).
    pub prompt: String,
    /// The re-sampling steps, in order.
    pub steps: Vec<TrajectoryStep>,
    /// The final beam texts.
    #[serde(rename = "final")]
    pub final_beams: Vec<String>,
}

/// One foresight re-sampling step of a query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrajectoryStep {
    /// The step number (1-based, `k` in method.md).
    pub k: u32,
    /// Every candidate step sampled at this step, over all live beams.
    pub candidates: Vec<Candidate>,
    /// Indices into `candidates` of the ones kept as the next beams.
    pub selected: Vec<usize>,
}

/// One candidate step and its foresight rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Index of the beam the candidate extends.
    pub beam: usize,
    /// The candidate's step text: the decoded step tokens, ending in the newline that stopped
    /// it (absent when the step hit its token limit or ended the answer).
    pub step: String,
    /// The foresight rollout text that followed `step` (the same sequence continued).
    pub rollout: String,
    /// The full assistant text used for training: the prefix, the beam's earlier steps,
    /// `step` and `rollout`, decoded from the sampled tokens (a final EOS left out).
    pub trajectory: String,
    /// Untempered log-probs of the rollout's tokens.
    pub rollout_logprobs: Vec<f32>,
    /// Foresight score: mean rollout log-prob (see method.md for empty rollouts).
    pub f: f64,
    /// Advantage `f - Q[beam]`.
    pub advantage: f64,
    /// Whether the candidate step itself ended the answer (EOS, the end marker or a full
    /// context): its rollout is empty and a beam it makes is complete.
    pub finished: bool,
}

/// A chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

/// A preference pair: a line of `pairs.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    /// The query's id.
    pub id: String,
    /// The step `k` the two candidates come from.
    pub step: u32,
    /// The query text.
    pub prompt: String,
    /// `[user: query, assistant: chosen trajectory]`.
    pub chosen: Vec<Message>,
    /// `[user: query, assistant: rejected trajectory]`.
    pub rejected: Vec<Message>,
    /// `A_w`, the chosen candidate's advantage.
    pub chosen_weights: f64,
    /// `A_l`, the rejected candidate's advantage.
    pub rejected_weights: f64,
    /// The chosen candidate's foresight score.
    pub chosen_f: f64,
    /// The rejected candidate's foresight score.
    pub rejected_f: f64,
    /// Reference model log-prob sum of the chosen response, once computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ref_chosen_logp: Option<f64>,
    /// Reference model log-prob sum of the rejected response, once computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ref_rejected_logp: Option<f64>,
}

impl Pair {
    /// The chosen response: the content of the last `assistant` message of `chosen`.
    pub fn chosen_response(&self) -> Result<&str> {
        assistant_content(&self.chosen).context("'chosen' has no assistant message")
    }

    /// The rejected response: the content of the last `assistant` message of `rejected`.
    pub fn rejected_response(&self) -> Result<&str> {
        assistant_content(&self.rejected).context("'rejected' has no assistant message")
    }
}

fn assistant_content(messages: &[Message]) -> Option<&str> {
    messages
        .iter()
        .rev()
        .find(|m| m.role == "assistant")
        .map(|m| m.content.as_str())
}

/// How the rejected candidate of a step is picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RejectStrategy {
    /// Uniformly among the other candidates (the release; **default**).
    #[default]
    Uniform,
    /// The lowest `f` among the other candidates (ties: lowest index).
    Lowest,
}

/// Options of [`build_pairs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PairOptions {
    /// How to pick the rejected candidate.
    pub strategy: RejectStrategy,
    /// Seed of the uniform draw.
    pub seed: u64,
    /// Drop candidates whose trajectory has at least this many characters (`None`: keep all).
    pub max_chars: Option<usize>,
}

/// One pair per step of `traj` with at least two (kept) candidates; `query_index` is the
/// query's position in the query file (the Philox `seq_id` of the uniform draw). Errors on a
/// non-finite `f` or advantage.
pub fn build_pairs(traj: &Trajectory, query_index: u64, opts: &PairOptions) -> Result<Vec<Pair>> {
    let mut pairs = Vec::new();
    for step in &traj.steps {
        let kept: Vec<&Candidate> = step
            .candidates
            .iter()
            .filter(|c| {
                opts.max_chars
                    .is_none_or(|max| c.trajectory.chars().count() < max)
            })
            .collect();
        for (i, c) in kept.iter().enumerate() {
            ensure!(
                c.f.is_finite() && c.advantage.is_finite(),
                "query '{}' step {}: candidate {i} has f = {}, advantage = {}",
                traj.id,
                step.k,
                c.f,
                c.advantage
            );
        }
        if kept.len() < 2 {
            continue;
        }
        let mut best = 0;
        for (i, c) in kept.iter().enumerate() {
            if c.f > kept[best].f {
                best = i;
            }
        }
        let others: Vec<usize> = (0..kept.len()).filter(|&i| i != best).collect();
        let rejected = match opts.strategy {
            RejectStrategy::Uniform => {
                let u = uniform(opts.seed, query_index, step.k);
                others[((u * others.len() as f64) as usize).min(others.len() - 1)]
            }
            RejectStrategy::Lowest => {
                let mut low = others[0];
                for &i in &others {
                    if kept[i].f < kept[low].f {
                        low = i;
                    }
                }
                low
            }
        };
        let (w, l) = (kept[best], kept[rejected]);
        let conversation = |c: &Candidate| {
            vec![
                Message {
                    role: "user".into(),
                    content: traj.query.clone(),
                },
                Message {
                    role: "assistant".into(),
                    content: c.trajectory.clone(),
                },
            ]
        };
        pairs.push(Pair {
            id: traj.id.clone(),
            step: step.k,
            prompt: traj.query.clone(),
            chosen: conversation(w),
            rejected: conversation(l),
            chosen_weights: w.advantage,
            rejected_weights: l.advantage,
            chosen_f: w.f,
            rejected_f: l.f,
            ref_chosen_logp: None,
            ref_rejected_logp: None,
        });
    }
    Ok(pairs)
}

/// Parses JSONL text into `T`s, skipping blank lines; errors name `source` and the 1-based
/// line number.
pub fn parse_jsonl<T: DeserializeOwned>(text: &str, source: &str) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<T>(line) {
            Ok(v) => out.push(v),
            Err(e) => {
                // serde_json ends its message with " at line 1 column C": keep the column only.
                let mut msg = e.to_string();
                if let Some(at) = msg.rfind(" at line ") {
                    msg.truncate(at);
                }
                bail!("{source}: line {}: {msg} (column {})", i + 1, e.column());
            }
        }
    }
    Ok(out)
}

/// Reads a JSONL file of `T`s (see [`parse_jsonl`]).
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_jsonl(&text, &path.display().to_string())
}

/// Writes one JSON object per line, atomically (the file is whole or untouched).
pub fn write_jsonl<T: Serialize>(path: &Path, items: &[T]) -> Result<()> {
    let mut text = Vec::new();
    for item in items {
        serde_json::to_writer(&mut text, item)?;
        text.push(b'\n');
    }
    super::artifacts::write_atomic(path, &text)
}

/// Reads `pairs.jsonl`.
pub fn read_pairs(path: &Path) -> Result<Vec<Pair>> {
    read_jsonl(path)
}

/// Reads `trajectories.jsonl`.
pub fn read_trajectories(path: &Path) -> Result<Vec<Trajectory>> {
    read_jsonl(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn cand(beam: usize, f: f64, text: &str) -> Candidate {
        Candidate {
            beam,
            step: format!("step {text}"),
            rollout: format!("rollout {text}"),
            trajectory: format!("The reasoning steps are:\n\nstep {text}\nrollout {text}"),
            rollout_logprobs: vec![-0.5, -1.25],
            f,
            advantage: f + 0.25,
            finished: false,
        }
    }

    fn traj(steps: Vec<Vec<f64>>) -> Trajectory {
        Trajectory {
            id: "q007".into(),
            query: "How many legs do 3 spiders have?".into(),
            prompt: "<user>How many legs do 3 spiders have?<assistant>".into(),
            steps: steps
                .into_iter()
                .enumerate()
                .map(|(k, fs)| TrajectoryStep {
                    k: k as u32 + 1,
                    candidates: fs
                        .iter()
                        .enumerate()
                        .map(|(j, &f)| cand(j / 4, f, &format!("{k}.{j}")))
                        .collect(),
                    selected: vec![0, 1],
                })
                .collect(),
            final_beams: vec!["a".into(), "b".into()],
        }
    }

    fn index_of(t: &Trajectory, p: &Pair, response: &str) -> usize {
        let step = &t.steps[p.step as usize - 1];
        step.candidates
            .iter()
            .position(|c| c.trajectory == response)
            .unwrap()
    }

    #[test]
    fn chosen_has_the_highest_f_and_rejected_differs() {
        let t = traj(vec![
            vec![-1.2, -0.5, -0.9, -0.5, -2.0, -0.7, -1.1, -0.6],
            vec![-0.3],
            vec![-0.8, -0.8, -0.8],
        ]);
        for seed in 0..50 {
            let opts = PairOptions {
                seed,
                ..PairOptions::default()
            };
            let pairs = build_pairs(&t, 3, &opts).unwrap();
            // Step 2 has one candidate: no pair.
            assert_eq!(pairs.iter().map(|p| p.step).collect::<Vec<_>>(), vec![1, 3]);
            // Step 1: max f -0.5 at indices 1 and 3: the lowest index wins.
            let c = index_of(&t, &pairs[0], pairs[0].chosen_response().unwrap());
            assert_eq!(c, 1);
            assert_eq!(pairs[0].chosen_f, -0.5);
            assert_eq!(pairs[0].chosen_weights, -0.25);
            let r = index_of(&t, &pairs[0], pairs[0].rejected_response().unwrap());
            assert_ne!(r, c);
            assert_eq!(pairs[0].rejected_f, t.steps[0].candidates[r].f);
            assert_eq!(
                pairs[0].rejected_weights,
                t.steps[0].candidates[r].advantage
            );
            // Step 3: all equal, index 0 is chosen.
            assert_eq!(
                index_of(&t, &pairs[1], pairs[1].chosen_response().unwrap()),
                0
            );
            assert_ne!(
                index_of(&t, &pairs[1], pairs[1].rejected_response().unwrap()),
                0
            );
            for p in &pairs {
                assert_eq!(p.id, "q007");
                assert_eq!(p.prompt, t.query);
                assert_eq!(p.chosen[0].role, "user");
                assert_eq!(p.chosen[0].content, t.query);
                assert_eq!(p.chosen[1].role, "assistant");
                assert_eq!(p.rejected[0].content, t.query);
                assert!(p.ref_chosen_logp.is_none());
            }
        }
    }

    #[test]
    fn uniform_rejection_is_reproducible_and_covers_the_others() {
        let t = traj(vec![vec![-1.2, -0.5, -0.9, -0.7]]);
        let opts = PairOptions {
            seed: 1234,
            ..PairOptions::default()
        };
        let mut seen = [0usize; 4];
        for q in 0..400u64 {
            let a = build_pairs(&t, q, &opts).unwrap();
            let b = build_pairs(&t, q, &opts).unwrap();
            assert_eq!(a, b);
            let r = index_of(&t, &a[0], a[0].rejected_response().unwrap());
            // The draw is the documented one.
            let u = uniform(1234, q, 1);
            assert_eq!(r, [0, 2, 3][(u * 3.0) as usize]);
            seen[r] += 1;
        }
        assert_eq!(seen[1], 0);
        for i in [0, 2, 3] {
            assert!(seen[i] > 90, "{seen:?}");
        }
        // Another seed changes some draws.
        let other = PairOptions { seed: 99, ..opts };
        assert!((0..20u64).any(|q| {
            build_pairs(&t, q, &opts).unwrap() != build_pairs(&t, q, &other).unwrap()
        }));
    }

    #[test]
    fn lowest_picks_the_minimum() {
        let t = traj(vec![vec![-1.2, -0.5, -3.0, -0.7, -3.0], vec![-0.1, -0.2]]);
        let opts = PairOptions {
            strategy: RejectStrategy::Lowest,
            seed: 5,
            max_chars: None,
        };
        let pairs = build_pairs(&t, 0, &opts).unwrap();
        assert_eq!(
            index_of(&t, &pairs[0], pairs[0].rejected_response().unwrap()),
            2
        );
        assert_eq!(pairs[0].rejected_f, -3.0);
        assert_eq!(
            index_of(&t, &pairs[1], pairs[1].chosen_response().unwrap()),
            0
        );
        assert_eq!(
            index_of(&t, &pairs[1], pairs[1].rejected_response().unwrap()),
            1
        );
        // The seed does not matter.
        let again = build_pairs(&t, 7, &PairOptions { seed: 6, ..opts }).unwrap();
        assert_eq!(pairs, again);
    }

    #[test]
    fn long_trajectories_are_dropped_before_choosing() {
        let mut t = traj(vec![vec![-1.0, -0.2, -0.5]]);
        t.steps[0].candidates[1].trajectory = "x".repeat(20);
        t.steps[0].candidates[0].trajectory = "é".repeat(19); // 19 characters, 38 bytes
        t.steps[0].candidates[2].trajectory = "short".into();
        let opts = PairOptions {
            strategy: RejectStrategy::Lowest,
            max_chars: Some(20),
            ..PairOptions::default()
        };
        let p = build_pairs(&t, 0, &opts).unwrap();
        assert_eq!(p[0].chosen_f, -0.5);
        assert_eq!(p[0].rejected_f, -1.0);
        // With only one candidate left there is no pair.
        let short = PairOptions {
            max_chars: Some(19),
            ..opts
        };
        assert!(build_pairs(&t, 0, &short).unwrap().is_empty());
    }

    #[test]
    fn non_finite_scores_are_errors() {
        let mut t = traj(vec![vec![-1.0, -0.2]]);
        t.steps[0].candidates[1].f = f64::NAN;
        let e = build_pairs(&t, 0, &PairOptions::default()).unwrap_err();
        assert!(
            e.to_string().contains("q007") && e.to_string().contains("step 1"),
            "{e}"
        );
    }

    #[test]
    fn json_field_names_round_trip() {
        let t = traj(vec![vec![-1.0, -0.2]]);
        let mut pair = build_pairs(&t, 0, &PairOptions::default())
            .unwrap()
            .remove(0);
        let v = serde_json::to_value(&pair).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "id",
                "step",
                "prompt",
                "chosen",
                "rejected",
                "chosen_weights",
                "rejected_weights",
                "chosen_f",
                "rejected_f"
            ]
        );
        assert_eq!(
            v["chosen"],
            serde_json::json!([
                {"role": "user", "content": t.query},
                {"role": "assistant", "content": t.steps[0].candidates[1].trajectory},
            ])
        );
        pair.ref_chosen_logp = Some(-12.5);
        pair.ref_rejected_logp = Some(-30.25);
        let line = serde_json::to_string(&pair).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ref_chosen_logp"], -12.5);
        assert_eq!(v["ref_rejected_logp"], -30.25);
        assert_eq!(serde_json::from_str::<Pair>(&line).unwrap(), pair);

        let tv = serde_json::to_value(&t).unwrap();
        let keys: Vec<&str> = tv.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["id", "query", "prompt", "steps", "final"]);
        let ck: Vec<&str> = tv["steps"][0]["candidates"][0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            ck,
            [
                "beam",
                "step",
                "rollout",
                "trajectory",
                "rollout_logprobs",
                "f",
                "advantage",
                "finished"
            ]
        );
        assert_eq!(serde_json::from_value::<Trajectory>(tv).unwrap(), t);
    }

    #[test]
    fn files_round_trip_and_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let t = traj(vec![vec![-1.0, -0.2, -0.4], vec![-0.3, -0.9]]);
        let tpath = dir.path().join("trajectories.jsonl");
        write_jsonl(&tpath, std::slice::from_ref(&t)).unwrap();
        assert_eq!(read_trajectories(&tpath).unwrap(), vec![t.clone()]);

        let pairs = build_pairs(&t, 0, &PairOptions::default()).unwrap();
        let ppath = dir.path().join("pairs.jsonl");
        write_jsonl(&ppath, &pairs).unwrap();
        assert_eq!(read_pairs(&ppath).unwrap(), pairs);

        // Line 1 good, line 2 blank, line 3 lacks chosen_f.
        let good = serde_json::to_string(&pairs[0]).unwrap();
        let mut v: Value = serde_json::from_str(&good).unwrap();
        v.as_object_mut().unwrap().remove("chosen_f");
        fs::write(&ppath, format!("{good}\n\n{v}\n")).unwrap();
        let e = read_pairs(&ppath).unwrap_err().to_string();
        assert!(e.contains("pairs.jsonl") && e.contains("line 3"), "{e}");
        assert!(e.contains("missing field `chosen_f`"), "{e}");
        assert!(!e.contains("line 1 column"), "{e}");

        fs::write(&ppath, format!("{good}\n{{not json\n")).unwrap();
        let e = read_pairs(&ppath).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");

        fs::write(&tpath, "\n{\"id\": \"q1\", \"query\": \"x\"}\n").unwrap();
        let e = read_trajectories(&tpath).unwrap_err().to_string();
        assert!(
            e.contains("trajectories.jsonl") && e.contains("line 2"),
            "{e}"
        );
        assert!(e.contains("missing field `prompt`"), "{e}");

        let e = read_pairs(&dir.path().join("absent.jsonl")).unwrap_err();
        assert!(e.to_string().contains("absent.jsonl"), "{e}");
    }
}
