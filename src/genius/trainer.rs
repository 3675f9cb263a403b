//! Preference training on pairs (method.md section 3): per optimizer step, a global batch of
//! pairs in micro-batches (chosen and rejected of each pair packed together), the loss's
//! gradient with respect to each sequence's log-prob sum spread over its response tokens, the
//! transformer's explicit backward, gradient accumulation, global-norm clipping, AdamW on f32
//! master weights with the linear warm-up/decay schedule, and the updated weights re-uploaded
//! to the backend (the rollout engine samples with them next).
//!
//! The master weights and AdamW moments live on the backend's device (f32, in the gradients'
//! fused layout); clipping and the update run there too. [`TrainState`] saves them (with the step count) so an interrupted run resumes at its last
//! saved step and produces the same numbers as an uninterrupted one.

use super::loss::{LossConfig, PairLogps, PairLoss, batch_loss_of};
use super::optim::{AdamW, AdamWConfig, LrSchedule};
use super::sequences::TrainSequence;
use crate::backend::{AdamWStep, Backend};
use crate::engine::sampler::uniform;
use crate::model::HostTensor;
use crate::model::safetensors::{Dtype, SafetensorsFile, write_safetensors};
use crate::transformer::{Gradients, TrainBatch, Transformer};
use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// Training hyper-parameters (defaults: the paper's, see method.md).
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub loss: LossConfig,
    /// Peak learning rate.
    pub lr: f64,
    /// Fraction of the steps spent warming up.
    pub warmup_ratio: f64,
    pub epochs: usize,
    /// Pairs per optimizer step.
    pub pairs_per_step: usize,
    /// Tokens packed into one forward/backward pass (at least one pair per pass).
    pub micro_batch_tokens: usize,
    pub max_grad_norm: f64,
    pub adamw: AdamWConfig,
    /// Seed of the pair order.
    pub seed: u64,
    /// Per-layer activation recompute: keep only each layer's input in the forward and run
    /// the layer again in backward (same gradients, less memory, an extra forward).
    pub recompute: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            loss: LossConfig::default(),
            lr: 5e-7,
            warmup_ratio: 0.1,
            epochs: 1,
            pairs_per_step: 128,
            micro_batch_tokens: 2048,
            max_grad_norm: 1.0,
            adamw: AdamWConfig::default(),
            seed: 0,
            recompute: false,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        self.loss.validate()?;
        self.adamw.validate()?;
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            bail!("the learning rate must be finite and >= 0, got {}", self.lr);
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            bail!(
                "the warm-up ratio must be in [0, 1], got {}",
                self.warmup_ratio
            );
        }
        if self.epochs == 0 || self.pairs_per_step == 0 || self.micro_batch_tokens == 0 {
            bail!("epochs, pairs per step and micro-batch tokens must be at least 1");
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm <= 0.0 {
            bail!("the gradient clipping norm must be positive");
        }
        Ok(())
    }
}

/// A pair ready for training: token sequences, reference log-prob sums (0 when the loss needs
/// no reference) and advantages.
#[derive(Debug, Clone)]
pub struct TrainPair {
    /// `id` and step of the source pair, for the per-pair log.
    pub id: String,
    pub step: u32,
    pub chosen: TrainSequence,
    pub rejected: TrainSequence,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
    pub adv_chosen: f64,
    pub adv_rejected: f64,
}

/// One optimizer step's line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 1-based optimizer step.
    pub step: u64,
    pub total_steps: u64,
    pub epoch: usize,
    pub loss: f64,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    pub margin: f64,
    pub accuracy: f64,
    pub w_mean: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub pairs: usize,
    /// Tokens through forward and backward in this step.
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub seconds: f64,
}

/// One pair's line of `pair_stats.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairStat {
    /// The optimizer step that used the pair.
    pub opt_step: u64,
    pub id: String,
    pub step: u32,
    pub policy_chosen: f64,
    pub policy_rejected: f64,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
    pub w: f64,
    pub loss: f64,
}

/// Master weights and optimizer state, on the backend's device: f32 master copies of the
/// parameters and AdamW's two f32 moments, in the gradients' (fused) layout and order. On the
/// CPU these are host tensors; on the GPU they never leave the device during training
/// ([`Self::save`] downloads them).
pub struct TrainState<B: Backend> {
    /// Parameter names in the gradients' order.
    pub names: Vec<String>,
    /// f32 master copies of the parameters (fused layout, as the gradients).
    pub master: Vec<B::Tensor>,
    /// AdamW's first and second moments, one f32 tensor per parameter.
    pub m: Vec<B::Tensor>,
    pub v: Vec<B::Tensor>,
    pub adamw: AdamWConfig,
    /// Optimizer steps done (AdamW's update count).
    pub step: u64,
}

impl<B: Backend> TrainState<B> {
    /// Fresh state from the model's current weights.
    pub fn new(model: &Transformer<B>, adamw: AdamWConfig) -> Result<Self> {
        adamw.validate()?;
        let be = &model.backend;
        let names = model.parameter_names();
        let mut master = Vec::with_capacity(names.len());
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for n in &names {
            let t = model.weight_f32(n)?;
            let shape = be.shape(&t).to_vec();
            m.push(be.zeros_f32(&shape)?);
            v.push(be.zeros_f32(&shape)?);
            master.push(t);
        }
        Ok(Self {
            names,
            master,
            m,
            v,
            adamw,
            step: 0,
        })
    }

    /// Writes the state into `dir` (created): `weights.safetensors` (fused master weights),
    /// the optimizer files and `state.json` (written last: its presence marks a whole state).
    /// The previous state in `dir` is replaced only once the new one is complete.
    pub fn save(&self, backend: &B, dir: &Path) -> Result<()> {
        let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        super::artifacts::create_dir(&tmp)?;
        let master: Vec<HostTensor> = self
            .master
            .iter()
            .map(|t| backend.download(t))
            .collect::<Result<_>>()?;
        let refs: Vec<(&str, &HostTensor)> =
            self.names.iter().map(String::as_str).zip(&master).collect();
        write_safetensors(&tmp.join("weights.safetensors"), &refs, Dtype::F32)?;
        drop(master);
        let moments = |ts: &[B::Tensor]| -> Result<Vec<Vec<f32>>> {
            ts.iter().map(|t| Ok(backend.download(t)?.data)).collect()
        };
        AdamW::from_parts(self.adamw, self.step, moments(&self.m)?, moments(&self.v)?)?
            .save(&tmp)?;
        super::artifacts::write_json_atomic(
            &tmp.join("state.json"),
            &serde_json::json!({"step": self.step, "names": self.names}),
        )?;
        let old = dir.with_extension(format!("old-{}", std::process::id()));
        if dir.exists() {
            std::fs::rename(dir, &old)
                .with_context(|| format!("{}: cannot move the old state aside", dir.display()))?;
        }
        std::fs::rename(&tmp, dir)
            .with_context(|| format!("{}: cannot move the new state in place", dir.display()))?;
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        Ok(())
    }

    /// Reads a state saved by [`Self::save`] onto `backend`; `None` when `dir` holds no
    /// complete state.
    pub fn load(backend: &B, dir: &Path) -> Result<Option<Self>> {
        let state_path = dir.join("state.json");
        if !state_path.exists() {
            return Ok(None);
        }
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&state_path)
                .with_context(|| format!("{}: cannot read", state_path.display()))?,
        )
        .with_context(|| format!("{}: not valid JSON", state_path.display()))?;
        let step = state["step"]
            .as_u64()
            .with_context(|| format!("{}: no 'step'", state_path.display()))?;
        let names: Vec<String> = serde_json::from_value(state["names"].clone())
            .with_context(|| format!("{}: no 'names'", state_path.display()))?;
        let weights = SafetensorsFile::open(&dir.join("weights.safetensors"))?;
        let optimizer = AdamW::load(dir)?;
        ensure!(
            optimizer.step_count() == step,
            "{}: the optimizer state is at step {} but state.json says {step}",
            dir.display(),
            optimizer.step_count()
        );
        let adamw = *optimizer.config();
        let (_, _, m_host, v_host) = optimizer.into_parts();
        ensure!(
            m_host.len() == names.len(),
            "{}: optimizer state for {} tensors, {} names",
            dir.display(),
            m_host.len(),
            names.len()
        );
        let (mut master, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for ((n, mh), vh) in names.iter().zip(m_host).zip(v_host) {
            let w = weights.load(n)?;
            ensure!(
                w.data.len() == mh.len() && w.data.len() == vh.len(),
                "{}: optimizer state does not match the saved weights ('{n}')",
                dir.display()
            );
            let shape = w.shape.clone();
            master.push(backend.upload_f32(&w)?);
            m.push(backend.upload_f32(&HostTensor::new(shape.clone(), mh))?);
            v.push(backend.upload_f32(&HostTensor::new(shape, vh))?);
        }
        Ok(Some(Self {
            names,
            master,
            m,
            v,
            adamw,
            step,
        }))
    }

    /// Sets the model's weights from the master copies (rounded to the backend's precision).
    pub fn apply_to(&self, model: &mut Transformer<B>) -> Result<()> {
        model.assign_weights(&self.names, &self.master)
    }
}

/// The pair order of every epoch: a Fisher-Yates shuffle per epoch keyed by the seed.
pub fn pair_order(n: usize, epochs: usize, seed: u64) -> Vec<usize> {
    let mut out = Vec::with_capacity(n * epochs);
    for e in 0..epochs {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let u = uniform(seed ^ 0x0DE5_5EED, e as u64, i as u32);
            let j = ((u * (i + 1) as f64) as usize).min(i);
            order.swap(i, j);
        }
        out.extend(order);
    }
    out
}

/// Optimizer steps `pairs` gives for `cfg`.
pub fn total_steps(num_pairs: usize, cfg: &TrainConfig) -> u64 {
    (num_pairs * cfg.epochs).div_ceil(cfg.pairs_per_step) as u64
}

/// Trains from `state.step` to the end. After each optimizer step `on_step` gets the step's
/// metrics, the per-pair statistics, the updated model and the state (to log and save).
pub fn train<B: Backend>(
    model: &mut Transformer<B>,
    pairs: &[TrainPair],
    cfg: &TrainConfig,
    state: &mut TrainState<B>,
    mut on_step: impl FnMut(&StepMetrics, &[PairStat], &Transformer<B>, &TrainState<B>) -> Result<()>,
) -> Result<()> {
    cfg.validate()?;
    if pairs.is_empty() {
        bail!("no pairs to train on");
    }
    let total = total_steps(pairs.len(), cfg);
    let schedule = LrSchedule::with_warmup_ratio(cfg.lr, cfg.warmup_ratio, total);
    let order = pair_order(pairs.len(), cfg.epochs, cfg.seed);
    let mut grads = Gradients::zeros(model)?;
    ensure!(
        grads
            .iter()
            .iter()
            .map(|(n, _)| n.clone())
            .collect::<Vec<_>>()
            == state.names,
        "internal error: gradient and parameter names differ"
    );
    while state.step < total {
        let started = Instant::now();
        let s = state.step as usize;
        let batch: Vec<usize> =
            order[s * cfg.pairs_per_step..((s + 1) * cfg.pairs_per_step).min(order.len())].to_vec();
        grads.zero(&model.backend)?;
        let mut step_pairs = Vec::with_capacity(batch.len());
        let mut tokens = 0;
        // Micro-batches: consecutive pairs up to the token budget (at least one pair).
        let mut at = 0;
        while at < batch.len() {
            let mut end = at;
            let mut n_tok = 0;
            while end < batch.len() {
                let p = &pairs[batch[end]];
                let t = p.chosen.tokens.len() + p.rejected.tokens.len();
                if end > at && n_tok + t > cfg.micro_batch_tokens {
                    break;
                }
                n_tok += t;
                end += 1;
            }
            let micro = &batch[at..end];
            step_pairs.extend(micro_step(
                model,
                pairs,
                micro,
                cfg,
                batch.len(),
                &mut grads,
            )?);
            tokens += n_tok;
            at = end;
        }
        // Global-norm clipping and the AdamW update, on the backend (the master weights,
        // moments and gradients never leave the device).
        let grad_norm = grads.sum_squares(&model.backend)?.sqrt();
        if !grad_norm.is_finite() {
            bail!(
                "optimizer step {}: the gradient norm is {grad_norm}; stopping before the weights are damaged",
                state.step + 1
            );
        }
        let grad_scale = if grad_norm > cfg.max_grad_norm {
            (cfg.max_grad_norm / grad_norm) as f32
        } else {
            1.0
        };
        let lr = schedule.lr(state.step);
        let a = &state.adamw;
        let update = AdamWStep::new(
            a.beta1,
            a.beta2,
            a.eps,
            a.weight_decay,
            state.step + 1,
            lr,
            grad_scale,
        );
        // The update and the working weights set from the new masters, in one pass per
        // parameter where the backend can.
        {
            let grad_list: Vec<&B::Tensor> = grads.iter().into_iter().map(|(_, g)| g).collect();
            model.adamw_step(
                &state.names,
                &mut state.master,
                &mut state.m,
                &mut state.v,
                &grad_list,
                &update,
            )?;
        }
        state.step += 1;

        let (logps, losses): (Vec<PairLogps>, Vec<PairLoss>) = step_pairs.into_iter().unzip();
        let result = batch_loss_of(losses, batch.len());
        let seconds = started.elapsed().as_secs_f64();
        let metrics = StepMetrics {
            step: state.step,
            total_steps: total,
            epoch: s * cfg.pairs_per_step / pairs.len(),
            loss: result.loss,
            chosen_reward: result.mean_chosen_reward,
            rejected_reward: result.mean_rejected_reward,
            margin: result.mean_margin,
            accuracy: result.accuracy,
            w_mean: result.mean_weight,
            lr,
            grad_norm,
            pairs: batch.len(),
            tokens,
            tokens_per_s: tokens as f64 / seconds.max(1e-9),
            seconds,
        };
        let stats: Vec<PairStat> = batch
            .iter()
            .zip(&logps)
            .zip(&result.pairs)
            .map(|((&i, x), r)| PairStat {
                opt_step: state.step,
                id: pairs[i].id.clone(),
                step: pairs[i].step,
                policy_chosen: x.policy_chosen,
                policy_rejected: x.policy_rejected,
                ref_chosen: x.ref_chosen,
                ref_rejected: x.ref_rejected,
                w: r.weight,
                loss: r.loss,
            })
            .collect();
        on_step(&metrics, &stats, model, state)?;
    }
    Ok(())
}

/// Forward and backward of one micro-batch; returns each pair's log-prob sums (policy before
/// the update) and loss, and adds the gradients, scaled by `1 / pairs_in_step`.
fn micro_step<B: Backend>(
    model: &Transformer<B>,
    pairs: &[TrainPair],
    micro: &[usize],
    cfg: &TrainConfig,
    pairs_in_step: usize,
    grads: &mut Gradients<B>,
) -> Result<Vec<(PairLogps, PairLoss)>> {
    let mut seqs: Vec<&[u32]> = Vec::with_capacity(2 * micro.len());
    let mut masks: Vec<Vec<bool>> = Vec::with_capacity(2 * micro.len());
    for &i in micro {
        for s in [&pairs[i].chosen, &pairs[i].rejected] {
            seqs.push(&s.tokens);
            masks.push((0..s.tokens.len()).map(|j| j >= s.prompt_len).collect());
        }
    }
    let batch = TrainBatch::next_token(&seqs, &masks)?;
    let (lp, acts) = model.forward_train_with(&batch, cfg.recompute)?;
    // Per-sequence sums and the pair losses on the backend (the same definitions everywhere).
    let rows: Vec<_> = (0..micro.len())
        .map(|m| {
            (
                batch.seq_rows[2 * m].clone(),
                batch.seq_rows[2 * m + 1].clone(),
            )
        })
        .collect();
    let inputs: Vec<PairLogps> = micro
        .iter()
        .map(|&i| {
            let p = &pairs[i];
            PairLogps {
                policy_chosen: 0.0,
                policy_rejected: 0.0,
                ref_chosen: p.ref_chosen,
                ref_rejected: p.ref_rejected,
                chosen_tokens: p.chosen.response_len(),
                rejected_tokens: p.rejected.response_len(),
                adv_chosen: p.adv_chosen,
                adv_rejected: p.adv_rejected,
            }
        })
        .collect();
    let results = model.backend.pair_losses(&lp, &rows, &inputs, &cfg.loss)?;
    let scale = 1.0 / pairs_in_step as f64;
    let mut d_logprob = vec![0f32; lp.len()];
    for ((c, r), (_, l)) in rows.iter().zip(&results) {
        for (range, g) in [(c, l.grad_chosen), (r, l.grad_rejected)] {
            d_logprob[range.clone()]
                .iter_mut()
                .for_each(|d| *d = (g * scale) as f32);
        }
    }
    model.backward(&acts, &d_logprob, grads)?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_order_is_a_permutation_per_epoch_and_seeded() {
        let o = pair_order(10, 2, 3);
        assert_eq!(o.len(), 20);
        for e in 0..2 {
            let mut part = o[e * 10..(e + 1) * 10].to_vec();
            part.sort_unstable();
            assert_eq!(part, (0..10).collect::<Vec<_>>());
        }
        assert_eq!(o, pair_order(10, 2, 3));
        assert_ne!(o, pair_order(10, 2, 4));
        assert_ne!(o[..10], o[10..]);
    }

    #[test]
    fn steps_round_up() {
        let cfg = TrainConfig {
            pairs_per_step: 4,
            epochs: 2,
            ..TrainConfig::default()
        };
        assert_eq!(total_steps(9, &cfg), 5);
        assert_eq!(total_steps(8, &cfg), 4);
    }
}
