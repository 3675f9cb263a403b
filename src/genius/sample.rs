//! Stepwise foresight re-sampling (method.md section 1) on the rollout engine.
//!
//! Every query runs as a small state machine, and many queries are in flight at once so the
//! engine's batches stay full:
//!
//! 1. **Prefill**: the prompt (chat template with the query as the user turn, the assistant
//!    header, the reasoning prefix) is prefilled once, as a sequence that only caches.
//! 2. **Candidates**: each live beam is forked `N` times; each fork samples one step (candidate
//!    temperature, stop at "\n", the end marker, EOS or the step token limit).
//! 3. **Rollouts**: a candidate that did not end the answer *continues its own sequence* as
//!    its foresight rollout (rollout temperature, stop at the end marker, EOS or the rollout
//!    token limit): its KV is reused and the scored text is exactly the training text.
//!    `f` = mean untempered log-prob of the rollout's tokens (a final EOS included: the model
//!    chose to stop). A candidate that ended the answer has an empty rollout: `f` = mean
//!    log-prob of its own tokens (**default**) or 0 (`official`, the release).
//! 4. **Selection**: `M` candidates are drawn without replacement (`foresight`: softmax(f/tau);
//!    `advantage`: softmax(A/tau); `greedy`: top-M by f; `random`: uniform). The selected
//!    candidates are cut back to their step boundary (rollout KV freed) and become the new
//!    beams with `Q = f`; everything else is released. A beam whose step ended the answer is
//!    complete (**default**; `--finished-beams continue` keeps sampling from it as the release
//!    does). The query ends after `K` steps or when every beam is complete.
//!
//! Texts are decoded from token ids, so `trajectory` is byte for byte what was scored:
//! `step` is the candidate's whole text (ending in its newline), `rollout` the rest, and
//! `trajectory` = prefix + the beam's earlier steps + `step` + `rollout`.
//!
//! Randomness: a candidate's tokens come from the engine's counter-based sampler on the stream
//! `(query index, k, beam, j)`; the selection draws use [`uniform`] keyed by the seed (salted),
//! the query index and `(k, draw)`. Results depend on the seed and the query's index in its
//! file only, not on what else is in flight.

use super::pairs::{Candidate, Trajectory, TrajectoryStep};
use crate::backend::Backend;
use crate::engine::block_manager::SeqId;
use crate::engine::sampler::{SamplingParams, uniform};
use crate::engine::scheduler::{Engine, FinishReason, Finished, Request, StopRules};
use crate::model::TextTokenizer;
use anyhow::{Context, Result, bail};
use std::collections::{HashMap, HashSet, VecDeque};

/// How the next beams are drawn from a step's candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Strategy {
    /// softmax(f / tau), without replacement (**default**).
    #[default]
    Foresight,
    /// softmax(A / tau), without replacement.
    Advantage,
    /// The M highest f (the paper's "w/o sampling" ablation).
    Greedy,
    /// Uniformly, without replacement.
    Random,
}

/// The score of a candidate whose step itself ended the answer (empty rollout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EmptyRollout {
    /// Mean untempered log-prob of the candidate's own tokens (**default**).
    #[default]
    CandidateMean,
    /// 0, the release's formula (the highest possible score).
    Official,
}

/// What happens to a beam whose chosen step ended the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FinishedBeams {
    /// The beam is complete and spawns no more candidates (**default**).
    #[default]
    Stop,
    /// Keep sampling steps after it for all K steps (the release).
    Continue,
}

/// Parameters of foresight re-sampling (method.md section 1; defaults are the paper's).
#[derive(Debug, Clone, PartialEq)]
pub struct SampleConfig {
    /// M: beams kept per step.
    pub beams: usize,
    /// N: candidate steps per beam.
    pub candidates: usize,
    /// K: steps per query.
    pub steps: usize,
    /// Softmax temperature over foresight scores.
    pub tau: f64,
    pub candidate_temperature: f32,
    pub rollout_temperature: f32,
    /// Token limit of one candidate step.
    pub max_step_tokens: usize,
    /// Token limit of one rollout.
    pub max_rollout_tokens: usize,
    /// Start of the assistant turn.
    pub prefix: String,
    /// Text that ends an answer besides EOS.
    pub end_marker: String,
    pub strategy: Strategy,
    pub empty_rollout: EmptyRollout,
    pub finished_beams: FinishedBeams,
    pub seed: u64,
    /// Queries sampled concurrently.
    pub queries_in_flight: usize,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            beams: 2,
            candidates: 4,
            steps: 4,
            tau: 0.1,
            candidate_temperature: 0.6,
            rollout_temperature: 1.0,
            max_step_tokens: 1024,
            max_rollout_tokens: 1024,
            prefix: "The reasoning steps are:\n\n".into(),
            end_marker: "<end_of_reasoning>".into(),
            strategy: Strategy::Foresight,
            empty_rollout: EmptyRollout::CandidateMean,
            finished_beams: FinishedBeams::Stop,
            seed: 0,
            queries_in_flight: 8,
        }
    }
}

impl SampleConfig {
    /// Rejects values the method cannot run with.
    pub fn validate(&self) -> Result<()> {
        if self.beams == 0 || self.candidates == 0 || self.steps == 0 {
            bail!("M (beams), N (candidates) and K (steps) must all be at least 1");
        }
        if self.beams > 1 << 12 || self.candidates > 1 << 12 || self.steps > 1 << 12 {
            bail!("M, N and K must each be at most 4096");
        }
        if !(self.tau.is_finite() && self.tau > 0.0) {
            bail!("tau must be a positive number, got {}", self.tau);
        }
        for (name, t) in [
            ("candidate temperature", self.candidate_temperature),
            ("rollout temperature", self.rollout_temperature),
        ] {
            if !t.is_finite() || t < 0.0 {
                bail!("{name} must be finite and >= 0, got {t}");
            }
        }
        if self.max_step_tokens == 0 || self.max_rollout_tokens == 0 {
            bail!("step and rollout token limits must be at least 1");
        }
        if self.queries_in_flight == 0 {
            bail!("at least one query must be in flight");
        }
        Ok(())
    }
}

/// One query to sample: `index` is its position in the query file (it keys the random streams,
/// so a resumed run draws the same numbers).
#[derive(Debug, Clone)]
pub struct QueryInput {
    pub index: u64,
    pub id: String,
    pub query: String,
}

/// Counters of a sampling run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SampleStats {
    pub queries: usize,
    /// Queries that could not be sampled (e.g. a prompt beyond the context window).
    pub failed: Vec<(String, String)>,
    pub candidates: usize,
    pub rollouts: usize,
    /// Tokens generated (candidates and rollouts).
    pub tokens_generated: u64,
    /// Sum of every candidate's f, for the mean.
    pub f_sum: f64,
}

impl SampleStats {
    /// Mean foresight score over all candidates.
    pub fn mean_f(&self) -> f64 {
        if self.candidates == 0 {
            f64::NAN
        } else {
            self.f_sum / self.candidates as f64
        }
    }
}

/// The prompt text for a query: the model's chat template with one user turn, the generation
/// prompt, then the reasoning prefix.
pub fn render_prompt(tok: &TextTokenizer, query: &str, prefix: &str) -> Result<String> {
    let messages = serde_json::json!([{ "role": "user", "content": query }]);
    Ok(tok.apply_chat_template(&messages, true)? + prefix)
}

/// A live or complete beam.
#[derive(Debug, Clone)]
struct Beam {
    /// The idle engine sequence ending at this beam's step boundary (`None` once complete).
    seq: Option<SeqId>,
    /// Tokens after the prompt (the steps so far).
    tokens: Vec<u32>,
    q: f64,
    complete: bool,
    /// The trajectory of the candidate that made this beam (its answer so far, with rollout).
    last_trajectory: Option<String>,
}

/// A candidate of the current step.
#[derive(Debug, Clone)]
struct CandidateRun {
    beam: usize,
    seq: SeqId,
    step_tokens: Vec<u32>,
    step_logprobs: Vec<f32>,
    ended_answer: bool,
    rollout: Option<Finished>,
    done: bool,
}

/// One query's progress.
struct QueryRun {
    input: QueryInput,
    prompt: String,
    root: Option<SeqId>,
    beams: Vec<Beam>,
    k: usize,
    cands: Vec<CandidateRun>,
    steps: Vec<TrajectoryStep>,
}

/// What an engine sequence is to the sampler.
#[derive(Debug, Clone, Copy)]
enum Role {
    Root,
    Candidate(usize),
    Rollout(usize),
}

/// Runs foresight re-sampling over `queries` on `engine`. Each finished query's trajectory
/// goes to `on_done` as soon as it is complete (callers append it to a file, so an interrupted
/// run loses no finished query); `on_progress(tokens_generated)` is called after every step.
pub fn sample_queries<B: Backend>(
    engine: &mut Engine<'_, B>,
    tok: &TextTokenizer,
    queries: Vec<QueryInput>,
    cfg: &SampleConfig,
    mut on_done: impl FnMut(Trajectory) -> Result<()>,
    mut on_progress: impl FnMut(&SampleStats),
) -> Result<SampleStats> {
    cfg.validate()?;
    let mut stats = SampleStats::default();
    let mut waiting: VecDeque<QueryInput> = queries.into();
    let mut runs: HashMap<u64, QueryRun> = HashMap::new();
    let mut owner: HashMap<SeqId, (u64, Role)> = HashMap::new();
    // Sequences of failed queries, released, whose finish records may still come this step.
    let mut dropped: HashSet<SeqId> = HashSet::new();
    let generated_before = engine.tokens_generated;
    loop {
        // Admit queries up to the in-flight limit.
        while runs.len() < cfg.queries_in_flight {
            let Some(input) = waiting.pop_front() else {
                break;
            };
            let prompt = render_prompt(tok, &input.query, &cfg.prefix)?;
            let start = tok
                .encode(&prompt, false)
                .and_then(|tokens| {
                    engine.submit(Request {
                        tokens,
                        parent: None,
                        sampling: SamplingParams::greedy(),
                        stop: StopRules::default(),
                        stream: 0,
                    })
                })
                .with_context(|| format!("query '{}'", input.id));
            match start {
                Ok(root) => {
                    owner.insert(root, (input.index, Role::Root));
                    runs.insert(
                        input.index,
                        QueryRun {
                            input,
                            prompt,
                            root: Some(root),
                            beams: Vec::new(),
                            k: 0,
                            cands: Vec::new(),
                            steps: Vec::new(),
                        },
                    );
                }
                Err(e) => {
                    stats.failed.push((input.id.clone(), format!("{e:#}")));
                }
            }
        }
        if runs.is_empty() {
            break;
        }
        if engine.num_active() == 0 {
            bail!("internal error: queries in flight but the engine has nothing to run");
        }
        let finished = engine.step()?;
        stats.tokens_generated = engine.tokens_generated - generated_before;
        for f in finished {
            if dropped.remove(&f.seq) {
                continue; // its query failed earlier in this step; already released
            }
            let (qi, role) = owner
                .remove(&f.seq)
                .context("internal error: a sequence finished that no query owns")?;
            let run = runs
                .get_mut(&qi)
                .context("internal error: a finished sequence's query is gone")?;
            if let FinishReason::Error(reason) = &f.finish_reason {
                // The query cannot be sampled (KV budget); free what it holds and report it.
                let id = run.input.id.clone();
                let run = runs.remove(&qi).expect("present");
                dropped.extend(release_query(engine, &run, &mut owner)?);
                stats.failed.push((id, reason.clone()));
                continue;
            }
            match role {
                Role::Root => start_step(engine, run, cfg, &mut owner, &f)?,
                Role::Candidate(j) => candidate_done(engine, run, cfg, &mut owner, j, f)?,
                Role::Rollout(j) => {
                    run.cands[j].rollout = Some(f);
                    run.cands[j].done = true;
                }
            }
            if !run.cands.is_empty() && run.cands.iter().all(|c| c.done) {
                let ended = finish_step(engine, run, cfg, tok, &mut stats)?;
                if ended {
                    let run = runs.remove(&qi).expect("present");
                    stats.queries += 1;
                    on_done(trajectory_of(run))?;
                } else {
                    let run = runs.get_mut(&qi).expect("present");
                    submit_candidates(engine, run, cfg, &mut owner)?;
                }
            }
        }
        on_progress(&stats);
    }
    Ok(stats)
}

/// After the prompt's prefill: M beams at the root, then the first step's candidates.
fn start_step<B: Backend>(
    engine: &mut Engine<'_, B>,
    run: &mut QueryRun,
    cfg: &SampleConfig,
    owner: &mut HashMap<SeqId, (u64, Role)>,
    root: &Finished,
) -> Result<()> {
    run.beams = (0..cfg.beams)
        .map(|_| Beam {
            seq: Some(root.seq),
            tokens: Vec::new(),
            q: 0.0,
            complete: false,
            last_trajectory: None,
        })
        .collect();
    submit_candidates(engine, run, cfg, owner)
}

/// Submits the next step's N candidates for every live beam.
fn submit_candidates<B: Backend>(
    engine: &mut Engine<'_, B>,
    run: &mut QueryRun,
    cfg: &SampleConfig,
    owner: &mut HashMap<SeqId, (u64, Role)>,
) -> Result<()> {
    run.k += 1;
    run.cands.clear();
    let mut stop_strings = vec!["\n".to_string()];
    if !cfg.end_marker.is_empty() {
        stop_strings.push(cfg.end_marker.clone());
    }
    for (b, beam) in run.beams.iter().enumerate() {
        let Some(parent) = beam.seq.filter(|_| !beam.complete) else {
            continue;
        };
        for j in 0..cfg.candidates {
            let seq = engine.submit(Request {
                tokens: Vec::new(),
                parent: Some(parent),
                sampling: SamplingParams {
                    temperature: cfg.candidate_temperature,
                    top_p: 1.0,
                    top_k: 0,
                    seed: cfg.seed,
                },
                stop: StopRules {
                    max_new_tokens: cfg.max_step_tokens,
                    stop_strings: stop_strings.clone(),
                    include_stop_str: true,
                    ..StopRules::default()
                },
                stream: stream_id(run.input.index, run.k, b * cfg.candidates + j),
            })?;
            owner.insert(seq, (run.input.index, Role::Candidate(run.cands.len())));
            run.cands.push(CandidateRun {
                beam: b,
                seq,
                step_tokens: Vec::new(),
                step_logprobs: Vec::new(),
                ended_answer: false,
                rollout: None,
                done: false,
            });
        }
    }
    if run.cands.is_empty() {
        bail!("internal error: a step with no live beam");
    }
    Ok(())
}

/// The engine stream of candidate `c` (beam-major index) at step `k` of query `index`.
fn stream_id(index: u64, k: usize, c: usize) -> u64 {
    (index << 32) | ((k as u64 & 0xffff) << 16) | (c as u64 & 0xffff)
}

/// A candidate step finished: either it ended the answer, or its rollout starts.
fn candidate_done<B: Backend>(
    engine: &mut Engine<'_, B>,
    run: &mut QueryRun,
    cfg: &SampleConfig,
    owner: &mut HashMap<SeqId, (u64, Role)>,
    j: usize,
    f: Finished,
) -> Result<()> {
    let ended = match &f.finish_reason {
        FinishReason::Eos | FinishReason::StopToken | FinishReason::ContextFull => true,
        FinishReason::StopString => f.matched_stop.as_deref() == Some(cfg.end_marker.as_str()),
        FinishReason::Length => false,
        FinishReason::Error(e) => bail!("candidate failed: {e}"),
    };
    let c = &mut run.cands[j];
    c.step_tokens = f.tokens;
    c.step_logprobs = f.logprobs;
    c.ended_answer = ended;
    if ended {
        c.done = true;
        return Ok(());
    }
    let stop = StopRules {
        max_new_tokens: cfg.max_rollout_tokens,
        stop_strings: if cfg.end_marker.is_empty() {
            Vec::new()
        } else {
            vec![cfg.end_marker.clone()]
        },
        include_stop_str: true,
        ..StopRules::default()
    };
    let sampling = SamplingParams {
        temperature: cfg.rollout_temperature,
        top_p: 1.0,
        top_k: 0,
        seed: cfg.seed,
    };
    match engine.continue_sequence(c.seq, sampling, stop) {
        Ok(()) => {
            owner.insert(c.seq, (run.input.index, Role::Rollout(j)));
        }
        // The context is full: nothing can follow, the rollout is empty.
        Err(_) if engine.tokens(c.seq)?.len() >= engine.model().config.max_position_embeddings => {
            c.ended_answer = true;
            c.done = true;
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Mean of log-probs in f64 (`None` when empty).
fn mean(logprobs: &[f32]) -> Option<f64> {
    (!logprobs.is_empty())
        .then(|| logprobs.iter().map(|&l| f64::from(l)).sum::<f64>() / logprobs.len() as f64)
}

/// All candidates of the step are scored: record the step, select the next beams, release the
/// rest. Returns whether the query is finished.
fn finish_step<B: Backend>(
    engine: &mut Engine<'_, B>,
    run: &mut QueryRun,
    cfg: &SampleConfig,
    tok: &TextTokenizer,
    stats: &mut SampleStats,
) -> Result<bool> {
    let eos = &tok.eos_ids;
    let mut records = Vec::with_capacity(run.cands.len());
    for c in &run.cands {
        let beam = &run.beams[c.beam];
        let (rollout_tokens, rollout_logprobs): (&[u32], &[f32]) = match &c.rollout {
            Some(r) => (&r.tokens, &r.logprobs),
            None => (&[], &[]),
        };
        let f = match mean(rollout_logprobs) {
            Some(m) => m,
            None => match cfg.empty_rollout {
                EmptyRollout::CandidateMean => mean(&c.step_logprobs).unwrap_or(0.0),
                EmptyRollout::Official => 0.0,
            },
        };
        // Texts from token ids; a final EOS is a token, not text.
        let strip_eos = |t: &[u32]| -> Vec<u32> {
            match t.last() {
                Some(last) if eos.contains(last) => t[..t.len() - 1].to_vec(),
                _ => t.to_vec(),
            }
        };
        let step_ids = strip_eos(&c.step_tokens);
        let rollout_ids = strip_eos(rollout_tokens);
        let mut all = beam.tokens.clone();
        all.extend_from_slice(&c.step_tokens);
        all.extend_from_slice(rollout_tokens);
        let trajectory = cfg.prefix.clone() + &tok.decode(&strip_eos(&all))?;
        records.push(Candidate {
            beam: c.beam,
            step: tok.decode(&step_ids)?,
            rollout: tok.decode(&rollout_ids)?,
            trajectory,
            rollout_logprobs: rollout_logprobs.to_vec(),
            f,
            advantage: f - beam.q,
            finished: c.ended_answer,
        });
        stats.candidates += 1;
        stats.rollouts += usize::from(c.rollout.is_some());
        stats.f_sum += f;
    }
    // Complete beams keep their slots; the live ones are re-drawn.
    let complete = run.beams.iter().filter(|b| b.complete).count();
    let slots = cfg.beams.saturating_sub(complete);
    let selected = select(&records, slots, cfg, run.input.index, run.k)?;

    // New beams from the selected candidates, cut back to their step boundary.
    let mut beams = Vec::with_capacity(selected.len());
    for &i in &selected {
        let c = &run.cands[i];
        let parent = &run.beams[c.beam];
        let mut tokens = parent.tokens.clone();
        tokens.extend_from_slice(&c.step_tokens);
        let complete = c.ended_answer && cfg.finished_beams == FinishedBeams::Stop;
        let boundary =
            engine.tokens(c.seq)?.len() - c.rollout.as_ref().map_or(0, |r| r.tokens.len());
        let seq = if complete {
            None
        } else {
            engine.truncate(c.seq, boundary)?;
            Some(c.seq)
        };
        beams.push(Beam {
            seq,
            tokens,
            q: records[i].f,
            complete,
            last_trajectory: Some(records[i].trajectory.clone()),
        });
    }
    // Release every candidate not kept as a live beam, and the old beams' sequences.
    for (i, c) in run.cands.iter().enumerate() {
        let kept = selected.contains(&i) && beams.iter().any(|b| b.seq == Some(c.seq));
        if !kept {
            engine.release(c.seq)?;
        }
    }
    let mut old: Vec<SeqId> = run.beams.iter().filter_map(|b| b.seq).collect();
    old.extend(run.root.take());
    old.sort_unstable();
    old.dedup();
    for seq in old {
        engine.release(seq)?;
    }
    // Complete beams from earlier steps stay as they are.
    let mut next: Vec<Beam> = run.beams.iter().filter(|b| b.complete).cloned().collect();
    next.extend(beams);
    run.beams = next;
    run.steps.push(TrajectoryStep {
        k: run.k as u32,
        candidates: records,
        selected,
    });
    run.cands.clear();
    let finished = run.k >= cfg.steps || run.beams.iter().all(|b| b.complete);
    if finished {
        for b in &mut run.beams {
            if let Some(seq) = b.seq.take() {
                engine.release(seq)?;
            }
        }
    }
    Ok(finished)
}

/// Indices of the candidates kept as the next beams (distinct, in draw order).
fn select(
    records: &[Candidate],
    m: usize,
    cfg: &SampleConfig,
    index: u64,
    k: usize,
) -> Result<Vec<usize>> {
    let n = records.len();
    let m = m.min(n);
    if cfg.strategy == Strategy::Greedy {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| records[b].f.total_cmp(&records[a].f).then(a.cmp(&b)));
        order.truncate(m);
        return Ok(order);
    }
    let scores: Vec<f64> = records
        .iter()
        .map(|c| match cfg.strategy {
            Strategy::Foresight => c.f / cfg.tau,
            Strategy::Advantage => c.advantage / cfg.tau,
            _ => 0.0,
        })
        .collect();
    if let Some(bad) = scores.iter().position(|s| !s.is_finite()) {
        bail!(
            "candidate {bad} of step {k} has a non-finite score (f = {})",
            records[bad].f
        );
    }
    Ok(draw_without_replacement(&scores, m, |d| {
        uniform(
            cfg.seed ^ SELECTION_SALT,
            index,
            (k as u32) << 16 | d as u32,
        )
    }))
}

/// Keeps the selection draws apart from the engine's token draws under the same seed.
const SELECTION_SALT: u64 = 0x5E1E_C7ED_D2A5_0001;

/// `m` distinct indices drawn one after another from softmax(`scores`) over the indices not
/// yet drawn; draw `d` uses the uniform `u(d)` and walks the indices in order.
pub fn draw_without_replacement(scores: &[f64], m: usize, u: impl Fn(usize) -> f64) -> Vec<usize> {
    let mut left: Vec<usize> = (0..scores.len()).collect();
    let mut out = Vec::with_capacity(m);
    for d in 0..m.min(scores.len()) {
        let max = left
            .iter()
            .map(|&i| scores[i])
            .fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = left.iter().map(|&i| (scores[i] - max).exp()).collect();
        let total: f64 = w.iter().sum();
        let threshold = u(d) * total;
        let mut cum = 0.0;
        let mut pick = left.len() - 1;
        for (p, &wi) in w.iter().enumerate() {
            cum += wi;
            if cum > threshold {
                pick = p;
                break;
            }
        }
        out.push(left.remove(pick));
    }
    out
}

/// Frees every sequence a query holds, running or not (after a failure); returns them.
fn release_query<B: Backend>(
    engine: &mut Engine<'_, B>,
    run: &QueryRun,
    owner: &mut HashMap<SeqId, (u64, Role)>,
) -> Result<Vec<SeqId>> {
    let mut seqs: Vec<SeqId> = run.beams.iter().filter_map(|b| b.seq).collect();
    seqs.extend(run.root);
    seqs.extend(run.cands.iter().map(|c| c.seq));
    seqs.sort_unstable();
    seqs.dedup();
    let mut released = Vec::new();
    for seq in seqs {
        owner.remove(&seq);
        // Already released ones (e.g. the root after the first step) are simply gone.
        if engine.release(seq).is_ok() {
            released.push(seq);
        }
    }
    Ok(released)
}

/// The query's record for `trajectories.jsonl`.
fn trajectory_of(run: QueryRun) -> Trajectory {
    Trajectory {
        id: run.input.id,
        query: run.input.query,
        prompt: run.prompt,
        steps: run.steps,
        final_beams: run
            .beams
            .into_iter()
            .map(|b| b.last_trajectory.unwrap_or_default())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_distinct_and_follow_the_scores() {
        // A dominant score is drawn first whatever u is (below its mass).
        let scores = [0.0, 50.0, 0.0, 0.0];
        let got = draw_without_replacement(&scores, 2, |_| 0.5);
        assert_eq!(got[0], 1);
        assert_ne!(got[0], got[1]);
        // Uniform scores: u walks the remaining indices in order.
        let flat = [1.0; 4];
        assert_eq!(
            draw_without_replacement(&flat, 4, |_| 0.0),
            vec![0, 1, 2, 3]
        );
        assert_eq!(draw_without_replacement(&flat, 2, |_| 0.99), vec![3, 2]);
        // Asking for more than there are returns all of them once.
        let mut all = draw_without_replacement(&flat, 9, |d| (d as f64 * 0.37) % 1.0);
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3]);
    }

    #[test]
    fn draw_frequencies_match_softmax() {
        let scores = [0.0f64, 1.0, 2.0];
        let z: f64 = scores.iter().map(|s| s.exp()).sum();
        let mut counts = [0usize; 3];
        let trials = 20_000;
        for t in 0..trials {
            let first = draw_without_replacement(&scores, 1, |d| uniform(9, t, d as u32))[0];
            counts[first] += 1;
        }
        for i in 0..3 {
            let want = scores[i].exp() / z;
            let got = counts[i] as f64 / trials as f64;
            assert!((got - want).abs() < 0.015, "index {i}: {got} vs {want}");
        }
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let ok = SampleConfig::default();
        assert!(ok.validate().is_ok());
        for bad in [
            SampleConfig {
                beams: 0,
                ..ok.clone()
            },
            SampleConfig {
                tau: 0.0,
                ..ok.clone()
            },
            SampleConfig {
                candidate_temperature: -1.0,
                ..ok.clone()
            },
            SampleConfig {
                max_rollout_tokens: 0,
                ..ok.clone()
            },
            SampleConfig {
                queries_in_flight: 0,
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
