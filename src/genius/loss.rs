//! Preference losses on per-sequence log-prob sums (method.md section 3): ACO (the Genius loss),
//! and the baselines DPO, SimPO, IPO and SFT. Pure f64 maths, no tensors: the trainer computes
//! the per-sequence sums, asks here for the loss and for `d loss / d (policy log-prob sum)` of
//! each sequence, and spreads that scalar over the sequence's tokens
//! (`dL/dlogits_t = g_seq * (onehot(y_t) - p_t)`).
//!
//! Notation for one pair: `logp_w`, `logp_l` are the policy's log-prob **sums** over the chosen
//! and rejected response tokens, `ref_w`, `ref_l` the frozen reference's, `n_w`, `n_l` the
//! response token counts, `A_w`, `A_l` the foresight advantages, and
//! `r_w = logp_w - ref_w`, `r_l = logp_l - ref_l`.
//!
//! | loss | value | `dL/dlogp_w` | `dL/dlogp_l` |
//! |---|---|---|---|
//! | ACO | `-ln sigmoid(z)`, `z = beta*r_w - beta*w*r_l` | `-beta*s` | `+beta*w*s` |
//! | DPO | ACO with `w = 1` | `-beta*s` | `+beta*s` |
//! | SimPO | `-ln sigmoid(z)`, `z = beta*logp_w/n_w - beta*logp_l/n_l - gamma` | `-beta*s/n_w` | `+beta*s/n_l` |
//! | IPO | `(r_w - r_l - 1/(2*tau))^2` | `2*d` | `-2*d` |
//! | SFT | `-logp_w / n_w` | `-1/n_w` | `0` |
//!
//! with `s = sigmoid(-z)` and `d = r_w - r_l - 1/(2*tau)`.
//!
//! - **ACO weight**: `w = min(1, exp(-(A_l - A_w)/alpha))` ([`AcoClip::Min`], the paper,
//!   default) or `max(1, ...)` ([`AcoClip::Max`], the released code). `w` is a constant: no
//!   gradient flows through it. `alpha = +inf` gives `w = 1` exactly, so ACO is then DPO bit
//!   for bit (DPO is computed as `beta*r_w - beta*1*r_l`, the same expression).
//! - **SimPO** is reference-free with length-normalised log-probs and an absolute margin
//!   `gamma` in reward units (the SimPO paper's formula; TRL's `simpo_gamma` has the same
//!   meaning). Its `beta` is SimPO's own: [`LossKind::default_beta`] gives 2.0 (the SimPO paper
//!   uses 2.0 to 2.5), `gamma` defaults to 0.5. Its gradients are with respect to the **sums**,
//!   i.e. already divided by the token counts.
//! - **IPO** uses the IPO paper's convention `(h - 1/(2*tau))^2` on the summed log-ratio
//!   difference `h = r_w - r_l`; `tau` plays the role TRL gives to `beta` and defaults to
//!   0.1 (= the default `beta`). `beta` only scales the reported rewards. (TRL averages the
//!   log-probs over tokens for IPO; here they are summed, as everywhere in method.md.)
//! - **SFT** is the mean negative log-likelihood per token of the chosen response,
//!   `-logp_w / n_w`; the rejected response gets no gradient.
//!
//! Reported per pair: `chosen_reward = beta*r_w`, `rejected_reward = beta*r_l` (for SimPO
//! `beta*logp/n`, its reward), `margin = chosen_reward - rejected_reward` (unweighted, for every
//! loss), and the ACO weight `w` (1 for the other losses). SimPO and SFT ignore the reference
//! log-probs in the loss ([`LossKind::needs_reference`] is false); SFT still reports `beta*r`
//! from whatever reference values it is given.
//!
//! `-ln sigmoid(z)` is evaluated as `softplus(-z)` and `sigmoid` in its two-sided stable form,
//! so `|z|` in the thousands gives finite values (loss 0 or `|z|`, gradients 0 or `beta`).

use anyhow::{Result, bail, ensure};

/// Which side of 1 the ACO weight `exp(-(A_l - A_w)/alpha)` is clipped to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AcoClip {
    /// `w = min(1, ...)`: the paper's form (**default**); inconsistent pairs are down-weighted.
    #[default]
    Min,
    /// `w = max(1, ...)`: the released code's form.
    Max,
}

/// A preference loss and its own hyper-parameters (`beta` is separate, see [`LossConfig`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossKind {
    /// Advantage-calibrated optimisation (Genius); `alpha > 0`, `+inf` allowed (gives DPO).
    Aco { clip: AcoClip, alpha: f64 },
    /// Direct preference optimisation.
    Dpo,
    /// SimPO: reference-free, length-normalised, absolute margin `gamma` (finite).
    Simpo { gamma: f64 },
    /// IPO: `(r_w - r_l - 1/(2*tau))^2`, `tau > 0`.
    Ipo { tau: f64 },
    /// Mean per-token negative log-likelihood of the chosen response.
    Sft,
}

impl Default for LossKind {
    fn default() -> Self {
        LossKind::Aco {
            clip: AcoClip::Min,
            alpha: LossKind::DEFAULT_ALPHA,
        }
    }
}

impl LossKind {
    /// Default ACO `alpha` (the paper's value).
    pub const DEFAULT_ALPHA: f64 = 1.0;
    /// Default SimPO margin `gamma`.
    pub const DEFAULT_SIMPO_GAMMA: f64 = 0.5;
    /// Default IPO `tau` (equal to the default DPO `beta`).
    pub const DEFAULT_IPO_TAU: f64 = 0.1;
    /// Default `beta` for every loss except SimPO.
    pub const DEFAULT_BETA: f64 = 0.1;
    /// Default SimPO `beta` (SimPO paper range 2.0 to 2.5).
    pub const DEFAULT_SIMPO_BETA: f64 = 2.0;

    /// The `beta` to use when none is given: 2.0 for SimPO, 0.1 otherwise.
    pub fn default_beta(&self) -> f64 {
        match self {
            LossKind::Simpo { .. } => Self::DEFAULT_SIMPO_BETA,
            _ => Self::DEFAULT_BETA,
        }
    }

    /// Whether the loss needs the reference model's log-probs (false for SimPO and SFT).
    pub fn needs_reference(&self) -> bool {
        matches!(
            self,
            LossKind::Aco { .. } | LossKind::Dpo | LossKind::Ipo { .. }
        )
    }

    /// Short lower-case name: `aco`, `dpo`, `simpo`, `ipo`, `sft`.
    pub fn name(&self) -> &'static str {
        match self {
            LossKind::Aco { .. } => "aco",
            LossKind::Dpo => "dpo",
            LossKind::Simpo { .. } => "simpo",
            LossKind::Ipo { .. } => "ipo",
            LossKind::Sft => "sft",
        }
    }
}

/// A loss together with its `beta`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    /// Which loss.
    pub kind: LossKind,
    /// Inverse temperature on the rewards; must be finite and `> 0`.
    pub beta: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig::new(LossKind::default())
    }
}

impl LossConfig {
    /// `kind` with its default `beta` ([`LossKind::default_beta`]).
    pub fn new(kind: LossKind) -> Self {
        LossConfig {
            kind,
            beta: kind.default_beta(),
        }
    }

    /// Checks the hyper-parameters' ranges.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.beta.is_finite() && self.beta > 0.0,
            "beta must be finite and > 0, got {}",
            self.beta
        );
        match self.kind {
            LossKind::Aco { alpha, .. } => {
                ensure!(
                    alpha > 0.0,
                    "ACO alpha must be > 0 (+inf allowed), got {alpha}"
                )
            }
            LossKind::Simpo { gamma } => {
                ensure!(gamma.is_finite(), "SimPO gamma must be finite, got {gamma}")
            }
            LossKind::Ipo { tau } => ensure!(
                tau.is_finite() && tau > 0.0,
                "IPO tau must be finite and > 0, got {tau}"
            ),
            LossKind::Dpo | LossKind::Sft => {}
        }
        Ok(())
    }
}

/// The inputs of one preference pair.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PairLogps {
    /// Policy log-prob sum over the chosen response tokens.
    pub policy_chosen: f64,
    /// Policy log-prob sum over the rejected response tokens.
    pub policy_rejected: f64,
    /// Reference log-prob sum over the chosen response tokens.
    pub ref_chosen: f64,
    /// Reference log-prob sum over the rejected response tokens.
    pub ref_rejected: f64,
    /// Number of chosen response tokens (used by SimPO and SFT).
    pub chosen_tokens: usize,
    /// Number of rejected response tokens (used by SimPO).
    pub rejected_tokens: usize,
    /// Advantage `A_w` of the chosen candidate (used by ACO).
    pub adv_chosen: f64,
    /// Advantage `A_l` of the rejected candidate (used by ACO).
    pub adv_rejected: f64,
}

/// The loss of one pair, its gradients and monitoring values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLoss {
    /// The pair's loss.
    pub loss: f64,
    /// `d loss / d policy_chosen` (the chosen log-prob **sum**).
    pub grad_chosen: f64,
    /// `d loss / d policy_rejected` (the rejected log-prob **sum**).
    pub grad_rejected: f64,
    /// `beta * r_w` (SimPO: `beta * logp_w / n_w`).
    pub chosen_reward: f64,
    /// `beta * r_l` (SimPO: `beta * logp_l / n_l`).
    pub rejected_reward: f64,
    /// The ACO weight `w` (1 for the other losses).
    pub weight: f64,
    /// `chosen_reward - rejected_reward`.
    pub margin: f64,
}

/// `ln(1 + e^x)` without overflow or loss of precision for large `|x|`.
pub fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `1 / (1 + e^-x)` evaluated so that neither branch overflows.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The ACO weight `clip(exp(-(A_l - A_w)/alpha))`; exactly 1 when `alpha` is `+inf`.
pub fn aco_weight(clip: AcoClip, alpha: f64, adv_chosen: f64, adv_rejected: f64) -> f64 {
    let e = (-(adv_rejected - adv_chosen) / alpha).exp();
    match clip {
        AcoClip::Min => e.min(1.0),
        AcoClip::Max => e.max(1.0),
    }
}

/// The loss of one pair (see the module table). Errors on invalid hyper-parameters, non-finite
/// inputs, zero token counts where the loss divides by them, and an ACO weight that overflows.
pub fn pair_loss(cfg: &LossConfig, x: &PairLogps) -> Result<PairLoss> {
    cfg.validate()?;
    for (name, v) in [
        ("policy chosen log-prob", x.policy_chosen),
        ("policy rejected log-prob", x.policy_rejected),
        ("reference chosen log-prob", x.ref_chosen),
        ("reference rejected log-prob", x.ref_rejected),
        ("chosen advantage", x.adv_chosen),
        ("rejected advantage", x.adv_rejected),
    ] {
        ensure!(v.is_finite(), "{name} is not finite: {v}");
    }
    let beta = cfg.beta;
    let r_w = x.policy_chosen - x.ref_chosen;
    let r_l = x.policy_rejected - x.ref_rejected;
    let out = match cfg.kind {
        LossKind::Aco { clip, alpha } => {
            let w = aco_weight(clip, alpha, x.adv_chosen, x.adv_rejected);
            if !w.is_finite() {
                bail!(
                    "ACO weight overflows: A_w = {}, A_l = {}, alpha = {alpha}",
                    x.adv_chosen,
                    x.adv_rejected
                );
            }
            logistic_pair(beta, r_w, r_l, w)?
        }
        LossKind::Dpo => logistic_pair(beta, r_w, r_l, 1.0)?,
        LossKind::Simpo { gamma } => {
            ensure!(
                x.chosen_tokens > 0 && x.rejected_tokens > 0,
                "SimPO needs non-empty responses (chosen {} tokens, rejected {} tokens)",
                x.chosen_tokens,
                x.rejected_tokens
            );
            let n_w = x.chosen_tokens as f64;
            let n_l = x.rejected_tokens as f64;
            let chosen_reward = beta * (x.policy_chosen / n_w);
            let rejected_reward = beta * (x.policy_rejected / n_l);
            let z = chosen_reward - rejected_reward - gamma;
            ensure!(z.is_finite(), "SimPO logit is not finite");
            let s = sigmoid(-z);
            PairLoss {
                loss: softplus(-z),
                grad_chosen: -beta * s / n_w,
                grad_rejected: beta * s / n_l,
                chosen_reward,
                rejected_reward,
                weight: 1.0,
                margin: chosen_reward - rejected_reward,
            }
        }
        LossKind::Ipo { tau } => {
            let d = r_w - r_l - 1.0 / (2.0 * tau);
            PairLoss {
                loss: d * d,
                grad_chosen: 2.0 * d,
                grad_rejected: -2.0 * d,
                chosen_reward: beta * r_w,
                rejected_reward: beta * r_l,
                weight: 1.0,
                margin: beta * r_w - beta * r_l,
            }
        }
        LossKind::Sft => {
            ensure!(x.chosen_tokens > 0, "SFT needs a non-empty chosen response");
            let n_w = x.chosen_tokens as f64;
            PairLoss {
                loss: -x.policy_chosen / n_w,
                grad_chosen: -1.0 / n_w,
                grad_rejected: 0.0,
                chosen_reward: beta * r_w,
                rejected_reward: beta * r_l,
                weight: 1.0,
                margin: beta * r_w - beta * r_l,
            }
        }
    };
    ensure!(
        out.loss.is_finite(),
        "{} loss is not finite",
        cfg.kind.name()
    );
    Ok(out)
}

/// `-ln sigmoid(beta*r_w - beta*w*r_l)` and its gradients (ACO; DPO with `w = 1`).
fn logistic_pair(beta: f64, r_w: f64, r_l: f64, w: f64) -> Result<PairLoss> {
    let chosen_reward = beta * r_w;
    let rejected_reward = beta * r_l;
    let z = chosen_reward - beta * w * r_l;
    ensure!(z.is_finite(), "preference logit is not finite (w = {w})");
    let s = sigmoid(-z);
    Ok(PairLoss {
        loss: softplus(-z),
        grad_chosen: -beta * s,
        grad_rejected: beta * w * s,
        chosen_reward,
        rejected_reward,
        weight: w,
        margin: chosen_reward - rejected_reward,
    })
}

/// The losses of a (micro-)batch of pairs as contributions to a global batch of `num_pairs`
/// pairs: `loss` and the gradients are divided by `num_pairs`, the statistics are means over
/// the pairs given here.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLoss {
    /// `sum of pair losses / num_pairs`.
    pub loss: f64,
    /// Per pair, `grad_chosen / num_pairs`: what the trainer back-propagates.
    pub grad_chosen: Vec<f64>,
    /// Per pair, `grad_rejected / num_pairs`.
    pub grad_rejected: Vec<f64>,
    /// The unscaled per-pair results.
    pub pairs: Vec<PairLoss>,
    /// Mean `chosen_reward` over the given pairs.
    pub mean_chosen_reward: f64,
    /// Mean `rejected_reward` over the given pairs.
    pub mean_rejected_reward: f64,
    /// Mean `margin` over the given pairs.
    pub mean_margin: f64,
    /// Mean ACO weight over the given pairs.
    pub mean_weight: f64,
    /// Fraction of the given pairs with `chosen_reward > rejected_reward`.
    pub accuracy: f64,
}

/// Evaluates every pair and scales loss and gradients by `1 / num_pairs` (the global batch
/// size, at least `inputs.len()` when the global batch is split in micro-batches). Errors when
/// `inputs` is empty, when `num_pairs < inputs.len()`, or on any pair's error (naming its index).
pub fn batch_loss(cfg: &LossConfig, inputs: &[PairLogps], num_pairs: usize) -> Result<BatchLoss> {
    ensure!(!inputs.is_empty(), "batch_loss needs at least one pair");
    ensure!(
        num_pairs >= inputs.len(),
        "num_pairs ({num_pairs}) is smaller than the number of pairs given ({})",
        inputs.len()
    );
    let pairs = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| pair_loss(cfg, x).map_err(|e| e.context(format!("pair {i}"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(batch_loss_of(pairs, num_pairs))
}

/// The policy's log-prob sums of a micro-batch's pairs from its per-row log-probs (pair `i`:
/// rows `rows[i].0` chosen, `rows[i].1` rejected, summed in f64 in row order) and each pair's
/// loss: `pairs[i]` gives the reference sums, token counts and advantages (its policy fields
/// are replaced). The host definition of [`crate::backend::Backend::pair_losses`].
pub fn pair_losses_host(
    row_logprobs: &[f32],
    rows: &[(std::ops::Range<usize>, std::ops::Range<usize>)],
    pairs: &[PairLogps],
    cfg: &LossConfig,
) -> Result<Vec<(PairLogps, PairLoss)>> {
    ensure!(
        rows.len() == pairs.len(),
        "pair_losses: {} row ranges for {} pairs",
        rows.len(),
        pairs.len()
    );
    let sum = |r: &std::ops::Range<usize>| -> Result<f64> {
        let s = row_logprobs.get(r.clone()).ok_or_else(|| {
            anyhow::anyhow!(
                "pair_losses: rows {r:?} outside the {} log-probs",
                row_logprobs.len()
            )
        })?;
        Ok(s.iter().map(|&x| f64::from(x)).sum::<f64>())
    };
    rows.iter()
        .zip(pairs)
        .enumerate()
        .map(|(i, ((c, r), p))| {
            let x = PairLogps {
                policy_chosen: sum(c)?,
                policy_rejected: sum(r)?,
                ..*p
            };
            let l = pair_loss(cfg, &x).map_err(|e| e.context(format!("pair {i}")))?;
            Ok((x, l))
        })
        .collect()
}

/// [`BatchLoss`] of per-pair results already computed: loss and gradients divided by
/// `num_pairs`, statistics averaged over the pairs given (non-empty).
pub fn batch_loss_of(pairs: Vec<PairLoss>, num_pairs: usize) -> BatchLoss {
    let scale = 1.0 / num_pairs as f64;
    let n = pairs.len() as f64;
    let mean = |f: fn(&PairLoss) -> f64| pairs.iter().map(f).sum::<f64>() / n;
    BatchLoss {
        loss: pairs.iter().map(|p| p.loss).sum::<f64>() * scale,
        grad_chosen: pairs.iter().map(|p| p.grad_chosen * scale).collect(),
        grad_rejected: pairs.iter().map(|p| p.grad_rejected * scale).collect(),
        mean_chosen_reward: mean(|p| p.chosen_reward),
        mean_rejected_reward: mean(|p| p.rejected_reward),
        mean_margin: mean(|p| p.margin),
        mean_weight: mean(|p| p.weight),
        accuracy: mean(|p| f64::from(u8::from(p.chosen_reward > p.rejected_reward))),
        pairs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// r_w = -10 - (-11) = 1.0, r_l = -12 - (-11.5) = -0.5, n_w = 5, n_l = 8.
    fn pair(adv_chosen: f64, adv_rejected: f64) -> PairLogps {
        PairLogps {
            policy_chosen: -10.0,
            policy_rejected: -12.0,
            ref_chosen: -11.0,
            ref_rejected: -11.5,
            chosen_tokens: 5,
            rejected_tokens: 8,
            adv_chosen,
            adv_rejected,
        }
    }

    fn aco(clip: AcoClip, alpha: f64) -> LossConfig {
        LossConfig::new(LossKind::Aco { clip, alpha })
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * (1.0 + b.abs())
    }

    fn assert_loss(got: &PairLoss, loss: f64, gw: f64, gl: f64, w: f64) {
        assert!(close(got.loss, loss, 1e-12), "loss {} vs {loss}", got.loss);
        assert!(
            close(got.grad_chosen, gw, 1e-12),
            "gw {} vs {gw}",
            got.grad_chosen
        );
        assert!(
            close(got.grad_rejected, gl, 1e-12),
            "gl {} vs {gl}",
            got.grad_rejected
        );
        assert!(close(got.weight, w, 1e-15), "w {} vs {w}", got.weight);
    }

    #[test]
    fn dpo_hand_computed() {
        // z = 0.1*1.0 - 0.1*(-0.5) = 0.15; loss = ln(1 + e^-0.15) = 0.6209570477895321;
        // s = sigmoid(-0.15) = 0.4625701546562505; gw = -0.1*s, gl = +0.1*s.
        let got = pair_loss(&LossConfig::new(LossKind::Dpo), &pair(0.3, 0.8)).unwrap();
        assert_loss(
            &got,
            0.6209570477895321,
            -0.04625701546562505,
            0.04625701546562505,
            1.0,
        );
        assert!(close(got.chosen_reward, 0.1, 1e-15));
        assert!(close(got.rejected_reward, -0.05, 1e-15));
        assert!(close(got.margin, 0.15, 1e-15));
    }

    #[test]
    fn aco_both_clips_when_rejected_advantage_is_higher() {
        // A_w = 0.3 < A_l = 0.8: exp(-(0.8-0.3)/1) = e^-0.5 = 0.6065306597126334.
        // Min: w = 0.60653..., z = 0.1 - 0.1*w*(-0.5) = 0.13032653298563168,
        //      loss = ln(1+e^-z) = 0.6301055388621637, gw = -0.1*sigmoid(-z) = -0.04674644051597592,
        //      gl = 0.1*w*sigmoid(-z) = 0.02835314940537225.
        let min = pair_loss(&aco(AcoClip::Min, 1.0), &pair(0.3, 0.8)).unwrap();
        assert_loss(
            &min,
            0.6301055388621637,
            -0.04674644051597592,
            0.02835314940537225,
            0.6065306597126334,
        );
        // Max: w = 1, i.e. DPO's numbers.
        let max = pair_loss(&aco(AcoClip::Max, 1.0), &pair(0.3, 0.8)).unwrap();
        assert_loss(
            &max,
            0.6209570477895321,
            -0.04625701546562505,
            0.04625701546562505,
            1.0,
        );
    }

    #[test]
    fn aco_both_clips_when_rejected_advantage_is_lower() {
        // A_w = 0.8 > A_l = 0.3: exp(0.5) = 1.6487212707001282.
        // Min: w = 1 (DPO's numbers).
        let min = pair_loss(&aco(AcoClip::Min, 1.0), &pair(0.8, 0.3)).unwrap();
        assert_loss(
            &min,
            0.6209570477895321,
            -0.04625701546562505,
            0.04625701546562505,
            1.0,
        );
        // Max: w = 1.64872..., z = 0.1 + 0.1*w*0.5 = 0.1824360635350064,
        //      loss = 0.6060837566770789, gw = -0.04545170645921639, gl = 0.07493719522892847.
        let max = pair_loss(&aco(AcoClip::Max, 1.0), &pair(0.8, 0.3)).unwrap();
        assert_loss(
            &max,
            0.6060837566770789,
            -0.04545170645921639,
            0.07493719522892847,
            1.6487212707001282,
        );
    }

    #[test]
    fn aco_with_infinite_alpha_is_exactly_dpo() {
        let dpo = LossConfig::new(LossKind::Dpo);
        for (aw, al) in [(0.3, 0.8), (0.8, 0.3), (-5.0, 7.0), (0.0, 0.0)] {
            let x = pair(aw, al);
            let want = pair_loss(&dpo, &x).unwrap();
            for clip in [AcoClip::Min, AcoClip::Max] {
                let got = pair_loss(&aco(clip, f64::INFINITY), &x).unwrap();
                assert_eq!(got, want, "clip {clip:?}, A_w {aw}, A_l {al}");
            }
            // A large finite alpha approaches DPO.
            let near = pair_loss(&aco(AcoClip::Min, 1e12), &x).unwrap();
            assert!(close(near.loss, want.loss, 1e-10));
        }
    }

    #[test]
    fn simpo_hand_computed() {
        // beta = 2, gamma = 0.5: chosen reward 2*(-10/5) = -4, rejected 2*(-12/8) = -3,
        // z = -4 + 3 - 0.5 = -1.5, loss = ln(1+e^1.5) = 1.7014132779827524,
        // s = sigmoid(1.5) = 0.8175744761936437, gw = -2*s/5, gl = 2*s/8.
        let cfg = LossConfig::new(LossKind::Simpo {
            gamma: LossKind::DEFAULT_SIMPO_GAMMA,
        });
        assert_eq!(cfg.beta, 2.0);
        // The reference log-probs do not matter.
        let mut x = pair(0.0, 0.0);
        x.ref_chosen = 123.0;
        let got = pair_loss(&cfg, &x).unwrap();
        assert_loss(
            &got,
            1.7014132779827524,
            -0.32702979047745745,
            0.2043936190484109,
            1.0,
        );
        assert!(close(got.chosen_reward, -4.0, 1e-15));
        assert!(close(got.rejected_reward, -3.0, 1e-15));
        assert!(close(got.margin, -1.0, 1e-15));
        x.chosen_tokens = 0;
        assert!(pair_loss(&cfg, &x).is_err());
    }

    #[test]
    fn ipo_hand_computed() {
        // tau = 0.1: d = 1.0 - (-0.5) - 1/(2*0.1) = 1.5 - 5 = -3.5, loss = 12.25,
        // gw = 2d = -7, gl = -2d = 7.
        let cfg = LossConfig::new(LossKind::Ipo {
            tau: LossKind::DEFAULT_IPO_TAU,
        });
        let got = pair_loss(&cfg, &pair(0.0, 0.0)).unwrap();
        assert_loss(&got, 12.25, -7.0, 7.0, 1.0);
        assert!(close(got.margin, 0.15, 1e-15));
    }

    #[test]
    fn sft_hand_computed() {
        // loss = 10/5 = 2 nats per token, gw = -1/5, gl = 0.
        let cfg = LossConfig::new(LossKind::Sft);
        let got = pair_loss(&cfg, &pair(0.0, 0.0)).unwrap();
        assert_loss(&got, 2.0, -0.2, 0.0, 1.0);
        let mut x = pair(0.0, 0.0);
        x.chosen_tokens = 0;
        assert!(pair_loss(&cfg, &x).is_err());
    }

    #[test]
    fn policy_equal_to_reference_gives_ln2() {
        for cfg in [
            aco(AcoClip::Min, 1.0),
            aco(AcoClip::Max, 1.0),
            aco(AcoClip::Min, 0.25),
            LossConfig::new(LossKind::Dpo),
        ] {
            for (aw, al) in [(0.3, 0.8), (0.8, 0.3)] {
                let x = PairLogps {
                    policy_chosen: -17.25,
                    policy_rejected: -3.5,
                    ref_chosen: -17.25,
                    ref_rejected: -3.5,
                    chosen_tokens: 9,
                    rejected_tokens: 2,
                    adv_chosen: aw,
                    adv_rejected: al,
                };
                let got = pair_loss(&cfg, &x).unwrap();
                assert_eq!(got.loss, std::f64::consts::LN_2, "{cfg:?}");
                assert_eq!(got.grad_chosen, -cfg.beta * 0.5);
                assert_eq!(got.grad_rejected, cfg.beta * got.weight * 0.5);
            }
        }
    }

    /// Central differences of the loss wrt the two policy sums match the analytic gradients.
    #[test]
    fn gradients_match_finite_differences() {
        let kinds = [
            LossKind::Aco {
                clip: AcoClip::Min,
                alpha: 1.0,
            },
            LossKind::Aco {
                clip: AcoClip::Max,
                alpha: 0.5,
            },
            LossKind::Dpo,
            LossKind::Simpo { gamma: 0.5 },
            LossKind::Ipo { tau: 0.1 },
            LossKind::Sft,
        ];
        let inputs = [
            pair(0.3, 0.8),
            pair(0.8, 0.3),
            PairLogps {
                policy_chosen: -40.0,
                policy_rejected: -25.0,
                ref_chosen: -30.0,
                ref_rejected: -45.0,
                chosen_tokens: 20,
                rejected_tokens: 13,
                adv_chosen: -0.2,
                adv_rejected: 0.4,
            },
        ];
        let h = 1e-5;
        for kind in kinds {
            let cfg = LossConfig::new(kind);
            for x in inputs {
                let g = pair_loss(&cfg, &x).unwrap();
                let f = |dw: f64, dl: f64| {
                    let mut y = x;
                    y.policy_chosen += dw;
                    y.policy_rejected += dl;
                    pair_loss(&cfg, &y).unwrap().loss
                };
                let num_w = (f(h, 0.0) - f(-h, 0.0)) / (2.0 * h);
                let num_l = (f(0.0, h) - f(0.0, -h)) / (2.0 * h);
                assert!(
                    (num_w - g.grad_chosen).abs() < 1e-7 * (1.0 + num_w.abs()),
                    "{kind:?} chosen: numeric {num_w} analytic {}",
                    g.grad_chosen
                );
                assert!(
                    (num_l - g.grad_rejected).abs() < 1e-7 * (1.0 + num_l.abs()),
                    "{kind:?} rejected: numeric {num_l} analytic {}",
                    g.grad_rejected
                );
            }
        }
    }

    #[test]
    fn extreme_logits_stay_finite() {
        // z = beta*(r_w - r_l) = +-1000 and beyond.
        for (pw, loss_is_zero) in [(10_000.0, true), (-10_000.0, false), (1e6, true)] {
            for kind in [
                LossKind::Dpo,
                LossKind::Aco {
                    clip: AcoClip::Min,
                    alpha: 1.0,
                },
                LossKind::Simpo { gamma: 0.5 },
            ] {
                let cfg = LossConfig::new(kind);
                let x = PairLogps {
                    policy_chosen: if pw > 0.0 { 0.0 } else { pw },
                    policy_rejected: if pw > 0.0 { -pw } else { 0.0 },
                    chosen_tokens: 1,
                    rejected_tokens: 1,
                    ..PairLogps::default()
                };
                let g = pair_loss(&cfg, &x).unwrap();
                assert!(
                    g.loss.is_finite() && g.grad_chosen.is_finite(),
                    "{kind:?} {g:?}"
                );
                assert!(g.grad_rejected.is_finite());
                if loss_is_zero {
                    assert_eq!(g.loss, 0.0, "{kind:?}");
                    assert_eq!(g.grad_chosen, 0.0);
                } else {
                    assert!(g.loss > 900.0, "{kind:?} {g:?}");
                    assert!(close(g.grad_chosen, -cfg.beta, 1e-12));
                }
            }
        }
        assert_eq!(softplus(1000.0), 1000.0);
        assert_eq!(softplus(-1000.0), 0.0);
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert_eq!(sigmoid(1000.0), 1.0);
        assert!(close(softplus(0.0), std::f64::consts::LN_2, 1e-15));
    }

    #[test]
    fn invalid_inputs_are_errors() {
        let x = pair(0.0, 0.0);
        assert!(pair_loss(&aco(AcoClip::Min, 0.0), &x).is_err());
        assert!(pair_loss(&aco(AcoClip::Min, f64::NAN), &x).is_err());
        let bad_beta = LossConfig {
            kind: LossKind::Dpo,
            beta: -0.1,
        };
        assert!(pair_loss(&bad_beta, &x).is_err());
        assert!(pair_loss(&LossConfig::new(LossKind::Ipo { tau: 0.0 }), &x).is_err());
        let mut y = x;
        y.policy_chosen = f64::NAN;
        assert!(pair_loss(&LossConfig::default(), &y).is_err());
        // exp(1000) overflows the Max weight.
        let e = pair_loss(&aco(AcoClip::Max, 1.0), &pair(1000.0, 0.0)).unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
        // ...while Min clips it to 1.
        assert_eq!(
            pair_loss(&aco(AcoClip::Min, 1.0), &pair(1000.0, 0.0))
                .unwrap()
                .weight,
            1.0
        );
    }

    #[test]
    fn batch_scales_by_the_global_pair_count() {
        let cfg = aco(AcoClip::Min, 1.0);
        let xs = [pair(0.3, 0.8), pair(0.8, 0.3)];
        let b = batch_loss(&cfg, &xs, 4).unwrap();
        let p0 = pair_loss(&cfg, &xs[0]).unwrap();
        let p1 = pair_loss(&cfg, &xs[1]).unwrap();
        assert!(close(b.loss, (p0.loss + p1.loss) / 4.0, 1e-15));
        assert_eq!(
            b.grad_chosen,
            vec![p0.grad_chosen / 4.0, p1.grad_chosen / 4.0]
        );
        assert_eq!(
            b.grad_rejected,
            vec![p0.grad_rejected / 4.0, p1.grad_rejected / 4.0]
        );
        assert_eq!(b.pairs, vec![p0, p1]);
        assert!(close(
            b.mean_weight,
            (0.6065306597126334 + 1.0) / 2.0,
            1e-15
        ));
        assert!(close(b.mean_margin, 0.15, 1e-15));
        assert_eq!(b.accuracy, 1.0);
        assert!(batch_loss(&cfg, &xs, 1).is_err());
        assert!(batch_loss(&cfg, &[], 1).is_err());
        let mut bad = xs;
        bad[1].policy_rejected = f64::INFINITY;
        let e = batch_loss(&cfg, &bad, 2).unwrap_err();
        assert!(format!("{e:#}").contains("pair 1"), "{e:#}");
    }

    #[test]
    fn defaults_and_names() {
        let d = LossConfig::default();
        assert_eq!(
            d.kind,
            LossKind::Aco {
                clip: AcoClip::Min,
                alpha: 1.0
            }
        );
        assert_eq!(d.beta, 0.1);
        assert!(d.kind.needs_reference());
        assert!(!LossKind::Sft.needs_reference());
        assert!(!LossKind::Simpo { gamma: 0.5 }.needs_reference());
        assert_eq!(LossKind::Ipo { tau: 0.1 }.name(), "ipo");
    }
}
