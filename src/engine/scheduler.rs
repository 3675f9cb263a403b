//! The rollout engine proper: sequences on a paged KV cache, scheduled with continuous
//! batching. Every step packs the decode tokens of the running sequences and chunks of pending
//! prefills (up to a token budget) into one forward pass over the shared weights, samples the
//! next token of every sequence that reached its end, and applies stop rules. When the KV
//! budget runs out the youngest sequences are preempted (their blocks freed, their tokens
//! recomputed later), so a step never fails for lack of memory; a sequence that could never fit
//! is finished with an error while the others go on.
//!
//! The Genius loop drives it through [`Engine::submit`] (optionally forking a parent sequence),
//! [`Engine::continue_sequence`], [`Engine::truncate`] and [`Engine::release`].

use super::block_manager::{BlockManager, BlockStats, SeqId};
use super::sampler::{RowSampling, SampledToken, SamplingParams};
use super::stops::{StopChecker, StopEvent};
use crate::backend::Backend;
use crate::model::TextTokenizer;
use crate::transformer::{KvCache, PagedBatch, PagedSeqBatch, Transformer};
use anyhow::{Context, Result, bail, ensure};
use rayon::prelude::*;
use std::collections::HashMap;
use std::time::Instant;

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV capacity in tokens (rounded down to whole blocks).
    pub kv_budget_tokens: usize,
    /// Tokens (decode + prefill chunks) in one forward pass.
    pub max_batch_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_budget_tokens: 1 << 16,
            max_batch_tokens: 2048,
        }
    }
}

/// When a sequence stops.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StopRules {
    /// New tokens after which the sequence stops (finish reason `length`); 0 = prefill only
    /// (the sequence is cached, then waits to be forked or continued).
    pub max_new_tokens: usize,
    /// Strings that end the sequence when they appear in its generated text.
    pub stop_strings: Vec<String>,
    /// Keep the matched stop string at the end of the text.
    pub include_stop_str: bool,
    /// Token ids that end the sequence besides the model's EOS ids.
    pub stop_token_ids: Vec<u32>,
    /// Do not stop at the model's EOS ids.
    pub ignore_eos: bool,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct Request {
    /// Tokens to append before generating (after the parent's tokens when forking).
    pub tokens: Vec<u32>,
    /// Fork this existing sequence at its current end instead of starting empty.
    pub parent: Option<SeqId>,
    pub sampling: SamplingParams,
    pub stop: StopRules,
    /// The random stream of this sequence: draws depend on (seed, stream, position) only, so a
    /// request gives the same tokens whatever else runs beside it. Callers pick stable values.
    pub stream: u64,
}

/// Why a sequence stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// A model EOS id was sampled.
    Eos,
    /// A stop token id was sampled.
    StopToken,
    /// A stop string appeared in the text.
    StopString,
    /// `max_new_tokens` were generated.
    Length,
    /// The model's context window is full.
    ContextFull,
    /// The sequence could not run (e.g. it can never fit the KV budget).
    Error(String),
}

impl FinishReason {
    pub fn as_str(&self) -> &str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::StopToken => "stop_token",
            FinishReason::StopString => "stop",
            FinishReason::Length => "length",
            FinishReason::ContextFull => "context_full",
            FinishReason::Error(_) => "error",
        }
    }
}

/// A sequence's result for its latest generation (since submit or continue).
#[derive(Debug, Clone)]
pub struct Finished {
    pub seq: SeqId,
    /// Generated token ids (a final EOS / stop token included).
    pub tokens: Vec<u32>,
    /// Untempered model log-prob of each generated token.
    pub logprobs: Vec<f32>,
    /// Log-prob of each token under the distribution it was sampled from.
    pub sampling_logprobs: Vec<f32>,
    /// Generated text, cut at a stop string, without a final EOS / stop token.
    pub text: String,
    pub finish_reason: FinishReason,
    /// The stop string that ended the sequence (finish reason `stop`).
    pub matched_stop: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Has tokens to process or a token to sample.
    Active,
    /// Done generating; tokens and (some) KV kept until released or continued.
    Idle,
}

struct Sequence {
    /// Every token of the sequence: prompt, then generated.
    tokens: Vec<u32>,
    /// Leading tokens whose K/V are in the cache.
    cached: usize,
    /// Index in `tokens` where the current generation began.
    generation_start: usize,
    /// Order of admission: younger sequences are preempted first.
    age: u64,
    state: State,
    sampling: SamplingParams,
    stop: StopRules,
    stream: u64,
    checker: StopChecker,
    text: String,
    matched_stop: Option<String>,
    logprobs: Vec<f32>,
    sampling_logprobs: Vec<f32>,
}

/// The rollout engine over one model.
pub struct Engine<'t, B: Backend> {
    model: Transformer<B>,
    tokenizer: &'t TextTokenizer,
    blocks: BlockManager,
    cache: KvCache<B::Tensor>,
    config: EngineConfig,
    seqs: HashMap<SeqId, Sequence>,
    next_id: u64,
    next_age: u64,
    /// Tokens processed by forward passes (prefill + decode, recomputation included).
    pub tokens_processed: u64,
    /// Tokens sampled.
    pub tokens_generated: u64,
    /// Sequences preempted so far.
    pub preemptions: u64,
    /// Steps run as two passes (see [`Engine::set_split_mixed_steps`]).
    pub split_steps: u64,
    /// Wall time spent in [`Engine::step`], seconds.
    pub step_seconds: f64,
    /// Of that, the time inside the model's calls (forward passes, decode steps, sampling,
    /// KV block copies; on a GPU this includes waiting for the device): the rest is the
    /// engine's own host work (scheduling, block tables, stops, detokenisation).
    pub model_seconds: f64,
    /// Of the rest, the time taking the sampled tokens: stop checks and detokenisation (the
    /// remainder is scheduling: block reservations, block tables, the batch).
    pub accept_seconds: f64,
    /// Whether a step mixing decodes and prefill chunks runs as two passes (see
    /// [`Engine::set_split_mixed_steps`]); `None`: as the backend prefers.
    split_mixed: Option<bool>,
}

impl<'t, B: Backend> Engine<'t, B> {
    pub fn new(
        model: Transformer<B>,
        tokenizer: &'t TextTokenizer,
        config: EngineConfig,
    ) -> Result<Self> {
        if config.block_size == 0 || config.max_batch_tokens == 0 {
            bail!("block size and batch token budget must be positive");
        }
        let num_blocks = config.kv_budget_tokens / config.block_size;
        if num_blocks == 0 {
            bail!(
                "a KV budget of {} tokens holds no block of {} tokens",
                config.kv_budget_tokens,
                config.block_size
            );
        }
        let cache = model.new_kv_cache(num_blocks, config.block_size)?;
        Ok(Self {
            blocks: BlockManager::new(num_blocks, config.block_size)?,
            model,
            tokenizer,
            cache,
            config,
            seqs: HashMap::new(),
            next_id: 0,
            next_age: 0,
            tokens_processed: 0,
            tokens_generated: 0,
            preemptions: 0,
            split_steps: 0,
            step_seconds: 0.0,
            model_seconds: 0.0,
            accept_seconds: 0.0,
            split_mixed: None,
        })
    }

    /// Runs a step that mixes plain decodes with prefill chunks as two passes (`true`: the
    /// decodes through the backend's decode path, a CUDA graph replay on the GPU) or as one
    /// (`false`), whatever the backend prefers ([`Backend::split_mixed_steps`]). The tokens
    /// are the same up to the backend's rounding.
    pub fn set_split_mixed_steps(&mut self, split: bool) {
        self.split_mixed = Some(split);
    }

    pub fn model(&self) -> &Transformer<B> {
        &self.model
    }

    /// The model back (e.g. for training between sampling rounds); the KV cache is dropped.
    pub fn into_model(self) -> Transformer<B> {
        self.model
    }

    pub fn stats(&self) -> BlockStats {
        self.blocks.stats()
    }

    /// Sequences that still have work.
    pub fn num_active(&self) -> usize {
        self.seqs
            .values()
            .filter(|s| s.state == State::Active)
            .count()
    }

    /// All tokens of a sequence (prompt and generated).
    pub fn tokens(&self, seq: SeqId) -> Result<&[u32]> {
        Ok(&self.seq(seq)?.tokens)
    }

    fn seq(&self, seq: SeqId) -> Result<&Sequence> {
        self.seqs
            .get(&seq)
            .with_context(|| format!("unknown {seq}"))
    }

    /// Adds a request; it runs in the following steps. Errors (bad parameters, a prompt longer
    /// than the context window, an unknown or still running parent) leave the engine unchanged.
    pub fn submit(&mut self, request: Request) -> Result<SeqId> {
        request.sampling.validate()?;
        let mut tokens = match request.parent {
            Some(p) => {
                let parent = self.seq(p)?;
                if parent.state == State::Active {
                    bail!("cannot fork {p} while it is still generating");
                }
                parent.tokens.clone()
            }
            None => Vec::new(),
        };
        tokens.extend_from_slice(&request.tokens);
        if tokens.is_empty() {
            bail!("the request has no tokens to start from");
        }
        let context = self.model.config.max_position_embeddings;
        if tokens.len() >= context {
            bail!(
                "{} tokens leave no room to generate in the model's context of {context}",
                tokens.len()
            );
        }
        if let Some(&t) = tokens
            .iter()
            .find(|&&t| t as usize >= self.model.config.vocab_size)
        {
            bail!("token id {t} is outside the vocabulary");
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        // Share the parent's cached KV when it is all there; otherwise recompute.
        let cached = match request.parent {
            Some(p) if self.blocks.contains(p) => {
                self.blocks.fork(p, id)?;
                self.blocks.seq_len(id)?
            }
            _ => {
                self.blocks.add_sequence(id)?;
                0
            }
        };
        let generation_start = tokens.len();
        let age = self.bump_age();
        self.seqs.insert(
            id,
            Sequence {
                tokens,
                cached,
                generation_start,
                age,
                state: State::Active,
                sampling: request.sampling,
                checker: StopChecker::new(
                    request.stop.stop_strings.clone(),
                    request.stop.include_stop_str,
                ),
                stop: request.stop,
                stream: request.stream,
                text: String::new(),
                matched_stop: None,
                logprobs: Vec::new(),
                sampling_logprobs: Vec::new(),
            },
        );
        self.leave_last_token_pending(id)?;
        Ok(id)
    }

    /// A sequence about to generate needs its last token in the next forward pass (that pass
    /// yields the logits it samples from); when every token is cached (a fork of a prefilled
    /// parent with no new tokens, a continue after a prefill-only request or a truncate), the
    /// last token's KV is dropped so that it is recomputed.
    fn leave_last_token_pending(&mut self, id: SeqId) -> Result<()> {
        let s = self
            .seqs
            .get_mut(&id)
            .with_context(|| format!("unknown {id}"))?;
        if s.cached >= s.tokens.len() {
            s.cached = s.tokens.len() - 1;
            if self.blocks.contains(id) {
                let keep = self.blocks.seq_len(id)?.min(s.cached);
                self.blocks.truncate(id, keep)?;
            }
        }
        Ok(())
    }

    fn bump_age(&mut self) -> u64 {
        self.next_age += 1;
        self.next_age
    }

    /// Makes a finished sequence generate again from its end with new parameters (a candidate
    /// step continuing into its rollout). Its KV is reused.
    pub fn continue_sequence(
        &mut self,
        seq: SeqId,
        sampling: SamplingParams,
        stop: StopRules,
    ) -> Result<()> {
        sampling.validate()?;
        let context = self.model.config.max_position_embeddings;
        let s = self.idle_seq_mut(seq)?;
        if s.tokens.len() >= context {
            bail!("{seq} already fills the model's context of {context}");
        }
        s.state = State::Active;
        s.generation_start = s.tokens.len();
        s.checker = StopChecker::new(stop.stop_strings.clone(), stop.include_stop_str);
        s.sampling = sampling;
        s.stop = stop;
        s.text.clear();
        s.matched_stop = None;
        s.logprobs.clear();
        s.sampling_logprobs.clear();
        self.leave_last_token_pending(seq)
    }

    /// A sequence that has finished generating, for changing it.
    fn idle_seq_mut(&mut self, seq: SeqId) -> Result<&mut Sequence> {
        let s = self
            .seqs
            .get_mut(&seq)
            .with_context(|| format!("unknown {seq}"))?;
        if s.state == State::Active {
            bail!("{seq} is still generating");
        }
        Ok(s)
    }

    /// Cuts a finished sequence back to its first `len` tokens (a mark), freeing KV blocks no
    /// one else uses.
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<()> {
        let s = self.idle_seq_mut(seq)?;
        if len == 0 || len > s.tokens.len() {
            bail!(
                "cannot truncate {seq} of {} tokens to {len}",
                s.tokens.len()
            );
        }
        s.tokens.truncate(len);
        s.cached = s.cached.min(len);
        s.generation_start = s.generation_start.min(len);
        let cached = s.cached;
        if self.blocks.contains(seq) {
            let keep = self.blocks.seq_len(seq)?.min(cached);
            self.blocks.truncate(seq, keep)?;
        }
        Ok(())
    }

    /// Forgets a sequence and frees its KV blocks.
    pub fn release(&mut self, seq: SeqId) -> Result<()> {
        self.seqs
            .remove(&seq)
            .with_context(|| format!("unknown {seq}"))?;
        if self.blocks.contains(seq) {
            self.blocks.release(seq)?;
        }
        Ok(())
    }

    /// Runs steps until no sequence is active; returns every finished sequence in finishing
    /// order.
    pub fn run_until_idle(&mut self) -> Result<Vec<Finished>> {
        let mut out = Vec::new();
        while self.num_active() > 0 {
            out.extend(self.step()?);
        }
        Ok(out)
    }

    /// Frees a sequence's KV so it is recomputed later.
    fn preempt(&mut self, seq: SeqId) -> Result<()> {
        self.drop_kv(seq)?;
        self.preemptions += 1;
        Ok(())
    }

    /// Frees all of a sequence's KV blocks; its tokens stay and are recomputed when it runs.
    fn drop_kv(&mut self, seq: SeqId) -> Result<()> {
        if self.blocks.contains(seq) {
            self.blocks.release(seq)?;
        }
        self.blocks.add_sequence(seq)?;
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.cached = 0;
        }
        Ok(())
    }

    /// One forward pass: schedules, computes, samples, applies stops. Returns the sequences that
    /// finished in this step.
    pub fn step(&mut self) -> Result<Vec<Finished>> {
        let started = Instant::now();
        let result = self.step_untimed();
        self.step_seconds += started.elapsed().as_secs_f64();
        result
    }

    fn step_untimed(&mut self) -> Result<Vec<Finished>> {
        let mut finished = Vec::new();
        // Decodes (one pending token) before prefills, each group oldest first: the oldest get
        // the budget and are never preempted for younger ones. (Ages are unique.)
        let mut keyed: Vec<(bool, u64, SeqId)> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.state == State::Active)
            .map(|(id, s)| (s.tokens.len() - s.cached > 1, s.age, *id))
            .collect();
        keyed.sort_unstable();
        let order: Vec<(u64, SeqId)> = keyed.into_iter().map(|(_, age, id)| (age, id)).collect();

        let mut batch = PagedBatch::default();
        let mut copies: Vec<(u32, u32)> = Vec::new();
        // (sequence, tokens processed this step, samples after)
        let mut planned: Vec<(SeqId, bool)> = Vec::new();
        let mut budget = self.config.max_batch_tokens;
        let mut skipped: Vec<SeqId> = Vec::new();
        for &(_, id) in &order {
            if budget == 0 || skipped.contains(&id) {
                continue;
            }
            let (pending, cached) = {
                let s = &self.seqs[&id];
                (s.tokens.len() - s.cached, s.cached)
            };
            let chunk = pending.min(budget);
            // Reserve KV room, preempting the youngest other active sequences when short.
            let plan = loop {
                match self.blocks.reserve(id, chunk)? {
                    Ok(plan) => break Some(plan),
                    Err(short) => {
                        // The youngest active sequence holding KV that this step has not
                        // already scheduled.
                        let victim = order
                            .iter()
                            .filter(|&&(_, v)| {
                                v != id
                                    && !skipped.contains(&v)
                                    && !planned.iter().any(|(p, _)| *p == v)
                                    && self.blocks.seq_len(v).map(|l| l > 0).unwrap_or(false)
                            })
                            .max_by_key(|&&(age, _)| age)
                            .map(|&(_, v)| v)
                            .or_else(|| {
                                // Idle sequences holding KV can give it up too.
                                self.seqs
                                    .iter()
                                    .filter(|(v, s)| {
                                        **v != id
                                            && s.state == State::Idle
                                            && self
                                                .blocks
                                                .seq_len(**v)
                                                .map(|l| l > 0)
                                                .unwrap_or(false)
                                    })
                                    .max_by_key(|(_, s)| s.age)
                                    .map(|(v, _)| *v)
                            });
                        match victim {
                            Some(v) => {
                                self.preempt(v)?;
                                skipped.push(v);
                            }
                            None if planned.is_empty() => {
                                // Alone and still short: it can never fit.
                                let needed_tokens = self.seqs[&id].tokens.len();
                                let reason = format!(
                                    "the sequence needs {needed_tokens} tokens of KV but the budget holds {} ({short})",
                                    self.blocks.num_blocks() * self.blocks.block_size()
                                );
                                self.drop_kv(id)?;
                                let s = self.seqs.get_mut(&id).expect("scheduled sequence exists");
                                s.state = State::Idle;
                                finished.push(self.finish_record(id, FinishReason::Error(reason)));
                                break None;
                            }
                            None => break None, // wait for a later step
                        }
                    }
                }
            };
            let Some(plan) = plan else { continue };
            copies.extend(plan.copies.iter().map(|c| (c.src.0, c.dst.0)));
            let s = &self.seqs[&id];
            let q_start = batch.tokens.len();
            for (i, &slot) in plan.slots.iter().enumerate() {
                let pos = cached + i;
                batch.tokens.push(s.tokens[pos]);
                batch.positions.push(pos as u32);
                batch.slots.push(slot as u32);
            }
            batch.seqs.push(PagedSeqBatch {
                q_start,
                q_len: chunk,
                context_len: cached + chunk,
                block_table: self.blocks.block_table(id)?.iter().map(|b| b.0).collect(),
            });
            planned.push((id, chunk == pending));
            budget -= chunk;
        }
        if planned.is_empty() {
            return Ok(finished);
        }
        let model_started = Instant::now();
        self.model.copy_kv_blocks(&mut self.cache, &copies)?;
        self.model_seconds += model_started.elapsed().as_secs_f64();

        // Sample where a sequence reached its end (prefill-only sequences just get cached).
        let mut rows = Vec::new();
        let mut samplers = Vec::new();
        let mut prefilled = Vec::new();
        // Per batch sequence: whether it samples a token this step.
        let mut samples = Vec::with_capacity(batch.seqs.len());
        for (entry, &(id, reached_end)) in batch.seqs.iter().zip(&planned) {
            let s = &self.seqs[&id];
            samples.push(reached_end && s.stop.max_new_tokens > 0);
            if reached_end && s.stop.max_new_tokens == 0 {
                prefilled.push(id);
            } else if reached_end {
                rows.push(entry.q_start + entry.q_len - 1);
                samplers.push((id, s.sampling, s.stream, s.tokens.len() as u32));
            }
        }
        let sampling: Vec<RowSampling> = samplers
            .iter()
            .map(|&(_, params, seq_id, position)| RowSampling {
                params,
                seq_id,
                position,
            })
            .collect();
        // A plain decode step (one new token per sequence, every one sampled) goes through the
        // backend's decode path (a CUDA graph replay on the GPU); anything else is a forward
        // pass, then sampling at the rows that reached their end. Where the backend prefers it
        // (`Backend::split_mixed_steps`), a step mixing decodes with prefill chunks runs as
        // two: the prefill part as a forward pass, the decodes through the decode path.
        let plain_decode = !batch.tokens.is_empty() && rows.len() == batch.tokens.len();
        let is_decode: Vec<bool> = batch
            .seqs
            .iter()
            .zip(&samples)
            .map(|(e, &samples)| e.q_len == 1 && samples)
            .collect();
        let decodes = is_decode.iter().filter(|&&d| d).count();
        let model_started = Instant::now();
        let sampled = if plain_decode {
            self.model.decode_step(&batch, &mut self.cache, &sampling)?
        } else if decodes > 0
            && decodes < batch.seqs.len()
            && self
                .split_mixed
                .unwrap_or_else(|| self.model.backend.split_mixed_steps())
        {
            self.split_step(&batch, &is_decode, &samples, &sampling)?
        } else {
            let hidden = self.model.forward_paged(&batch, &mut self.cache)?;
            if rows.is_empty() {
                Vec::new()
            } else {
                self.model.sample_at(&hidden, &rows, &sampling)?
            }
        };
        self.model_seconds += model_started.elapsed().as_secs_f64();
        // The step's K/V are in the cache.
        self.tokens_processed += batch.tokens.len() as u64;
        for (entry, &(id, _)) in batch.seqs.iter().zip(&planned) {
            let s = self.seqs.get_mut(&id).expect("scheduled sequence exists");
            s.cached += entry.q_len;
        }
        for id in prefilled {
            // Prefill only: the sequence is cached and waits to be forked or continued.
            let s = self.seqs.get_mut(&id).expect("scheduled sequence exists");
            s.state = State::Idle;
            finished.push(self.finish_record(id, FinishReason::Length));
        }
        if rows.is_empty() {
            return Ok(finished);
        }
        // Each sampled sequence takes its token (stop checks and detokenisation: independent
        // per sequence, so many are done in parallel); finish records in sampling order.
        ensure!(
            sampled.len() == samplers.len(),
            "internal error: {} tokens sampled for {} sequences",
            sampled.len(),
            samplers.len()
        );
        self.tokens_generated += sampled.len() as u64;
        let accept_started = Instant::now();
        let context = self.model.config.max_position_embeddings;
        let tokenizer = self.tokenizer;
        let mut by_id: HashMap<SeqId, &mut Sequence> = self
            .seqs
            .iter_mut()
            .filter(|(_, s)| s.state == State::Active)
            .map(|(id, s)| (*id, s))
            .collect();
        let work: Vec<(&mut Sequence, SampledToken)> = samplers
            .iter()
            .zip(sampled)
            .map(|((id, ..), tok)| {
                let s = by_id
                    .remove(id)
                    .with_context(|| format!("internal error: sampled {id} is not active"))?;
                Ok((s, tok))
            })
            .collect::<Result<_>>()?;
        let take = |(s, tok): (&mut Sequence, SampledToken)| accept(s, tok, tokenizer, context);
        let reasons: Vec<Result<Option<FinishReason>>> = if work.len() >= PARALLEL_ACCEPT_MIN {
            work.into_par_iter().map(take).collect()
        } else {
            work.into_iter().map(take).collect()
        };
        for ((id, ..), reason) in samplers.iter().zip(reasons) {
            if let Some(reason) = reason? {
                finished.push(self.finish_record(*id, reason));
            }
        }
        self.accept_seconds += accept_started.elapsed().as_secs_f64();
        Ok(finished)
    }

    /// A mixed step as two passes: the sequences that are not plain decodes (prefill chunks,
    /// prefill-only sequences) through a forward pass and sampling at the rows that reached
    /// their end, then the plain decodes (`is_decode[i]`: one token, sampled) through
    /// [`Transformer::decode_step`]. `sampling` holds the sampled sequences' parameters in
    /// batch order; so does the result. The two groups are different sequences, so neither
    /// pass reads what the other writes (copy-on-write copies are done before both).
    fn split_step(
        &mut self,
        batch: &PagedBatch,
        is_decode: &[bool],
        samples: &[bool],
        sampling: &[RowSampling],
    ) -> Result<Vec<SampledToken>> {
        let (mut rest, mut decode) = (PagedBatch::default(), PagedBatch::default());
        let (mut rest_rows, mut rest_sampling, mut decode_sampling) =
            (Vec::new(), Vec::new(), Vec::new());
        // Which group each sampled sequence is in, in batch order.
        let mut sampled_in_decode = Vec::new();
        let mut next_sampling = sampling.iter();
        for ((e, &dec), &samples) in batch.seqs.iter().zip(is_decode).zip(samples) {
            let sub = if dec { &mut decode } else { &mut rest };
            let q_start = sub.tokens.len();
            let span = e.q_start..e.q_start + e.q_len;
            sub.tokens.extend_from_slice(&batch.tokens[span.clone()]);
            sub.positions
                .extend_from_slice(&batch.positions[span.clone()]);
            sub.slots.extend_from_slice(&batch.slots[span]);
            sub.seqs.push(PagedSeqBatch {
                q_start,
                ..e.clone()
            });
            // `sampling` lists the sampled sequences (every plain decode is one) in batch order.
            if samples {
                let params = *next_sampling
                    .next()
                    .context("internal: fewer sampling rows than sampled sequences")?;
                sampled_in_decode.push(dec);
                if dec {
                    decode_sampling.push(params);
                } else {
                    rest_rows.push(q_start + e.q_len - 1);
                    rest_sampling.push(params);
                }
            }
        }
        if next_sampling.next().is_some() {
            bail!("internal: more sampling rows than sampled sequences");
        }
        self.split_steps += 1;
        let hidden = self.model.forward_paged(&rest, &mut self.cache)?;
        let mut rest_tokens = if rest_rows.is_empty() {
            Vec::new()
        } else {
            self.model.sample_at(&hidden, &rest_rows, &rest_sampling)?
        }
        .into_iter();
        drop(hidden);
        let mut decode_tokens = self
            .model
            .decode_step(&decode, &mut self.cache, &decode_sampling)?
            .into_iter();
        sampled_in_decode
            .into_iter()
            .map(|dec| {
                if dec {
                    decode_tokens.next()
                } else {
                    rest_tokens.next()
                }
                .context("internal: a pass returned fewer tokens than it sampled")
            })
            .collect()
    }

    /// Appends a sampled token and applies the stop rules; `Some(reason)` when it finished.
    fn finish_record(&self, id: SeqId, reason: FinishReason) -> Finished {
        let s = &self.seqs[&id];
        Finished {
            seq: id,
            tokens: s.tokens[s.generation_start..].to_vec(),
            logprobs: s.logprobs.clone(),
            sampling_logprobs: s.sampling_logprobs.clone(),
            text: s.text.clone(),
            finish_reason: reason,
            matched_stop: s.matched_stop.clone(),
        }
    }
}

/// Sampled sequences from which [`Engine::step`] takes the tokens in parallel.
const PARALLEL_ACCEPT_MIN: usize = 16;

/// Appends a sampled token to an active sequence and applies its stop rules: returns why the
/// sequence finished, if it did (it is then idle).
fn accept(
    s: &mut Sequence,
    tok: SampledToken,
    tokenizer: &TextTokenizer,
    context: usize,
) -> Result<Option<FinishReason>> {
    let token = tok.token;
    s.tokens.push(token);
    s.logprobs.push(tok.logprob);
    s.sampling_logprobs.push(tok.sampling_logprob);
    let generated = s.tokens.len() - s.generation_start;
    let reason = if !s.stop.ignore_eos && tokenizer.eos_ids.contains(&token) {
        Some(FinishReason::Eos)
    } else if s.stop.stop_token_ids.contains(&token) {
        Some(FinishReason::StopToken)
    } else {
        match s.checker.push(&s.tokens[s.generation_start..], tokenizer)? {
            StopEvent::Stop { new_text, matched } => {
                s.text.push_str(&new_text);
                s.matched_stop = Some(matched);
                Some(FinishReason::StopString)
            }
            StopEvent::Continue { new_text } => {
                s.text.push_str(&new_text);
                if generated >= s.stop.max_new_tokens {
                    Some(FinishReason::Length)
                } else if s.tokens.len() >= context {
                    Some(FinishReason::ContextFull)
                } else {
                    None
                }
            }
        }
    };
    if let Some(r) = &reason {
        if !matches!(r, FinishReason::StopString) {
            let tail = s.checker.finish();
            s.text.push_str(&tail);
        }
        s.state = State::Idle;
    }
    Ok(reason)
}
