//! The preference losses on the GPU ([`crate::backend::Backend::pair_losses`]): one block per
//! pair sums its chosen and rejected rows' log-probs in f64 and evaluates the loss of
//! `kernels/loss.cu` (ACO with either clip, DPO, SimPO, IPO, SFT), with the definitions of
//! [`crate::genius::loss`]. A pair whose result is not finite is evaluated again on the host,
//! so that the error (or value) is exactly the host's.

use super::args;
use super::backend::CudaBackend;
use crate::genius::loss::{AcoClip, LossConfig, LossKind, PairLogps, PairLoss, pair_loss};
use anyhow::{Context, Result, anyhow, ensure};
use cudarc::driver::{DeviceRepr, LaunchConfig};
use std::ops::Range;

// SAFETY: a plain C struct (kernels/args.h) of u64s, i32s and f64s, its layout checked by
// the args layout test.
unsafe impl DeviceRepr for args::PairLossArgs {}

/// The loss kernel's `(kind, clip_max, alpha, gamma, tau)` for `kind` (`GE_LOSS_*` of
/// kernels/args.h); also used by the CPU emulation's test of the kernel (`tests/kernel_emu.rs`).
pub fn kind_code(kind: LossKind) -> (i32, i32, f64, f64, f64) {
    match kind {
        LossKind::Aco { clip, alpha } => (0, i32::from(clip == AcoClip::Max), alpha, 0.0, 1.0),
        LossKind::Dpo => (1, 0, f64::INFINITY, 0.0, 1.0),
        LossKind::Simpo { gamma } => (2, 0, f64::INFINITY, gamma, 1.0),
        LossKind::Ipo { tau } => (3, 0, f64::INFINITY, 0.0, tau),
        LossKind::Sft => (4, 0, f64::INFINITY, 0.0, 1.0),
    }
}

/// The kernel's f64 inputs of one pair, in `PairLossArgs::inputs` order: reference sums
/// (chosen, rejected), token counts (chosen, rejected), advantages (chosen, rejected).
pub fn pair_inputs(p: &PairLogps) -> [f64; 6] {
    [
        p.ref_chosen,
        p.ref_rejected,
        p.chosen_tokens as f64,
        p.rejected_tokens as f64,
        p.adv_chosen,
        p.adv_rejected,
    ]
}

/// f64 outputs per pair (`GE_PAIR_LOSS_OUTPUTS`).
pub const OUTPUTS: usize = 9;
/// Threads per block (`GE_LOSS_THREADS`).
const THREADS: u32 = 256;

impl CudaBackend {
    pub(crate) fn pair_losses_kernel(
        &self,
        row_logprobs: &[f32],
        rows: &[(Range<usize>, Range<usize>)],
        pairs: &[PairLogps],
        cfg: &LossConfig,
    ) -> Result<Vec<(PairLogps, PairLoss)>> {
        cfg.validate()?;
        ensure!(
            rows.len() == pairs.len(),
            "pair_losses: {} row ranges for {} pairs",
            rows.len(),
            pairs.len()
        );
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let n = row_logprobs.len();
        let mut segments = Vec::with_capacity(4 * pairs.len());
        for r in rows.iter().flat_map(|(c, r)| [c, r]) {
            ensure!(
                r.start <= r.end && r.end <= n,
                "pair_losses: rows {r:?} outside the {n} log-probs"
            );
            segments.push(u32::try_from(r.start).context("pair_losses: row index over u32")?);
            segments.push(u32::try_from(r.end).context("pair_losses: row index over u32")?);
        }
        let inputs: Vec<f64> = pairs.iter().flat_map(pair_inputs).collect();
        let lp = self.gpu.upload_slice(row_logprobs)?;
        let seg = self.gpu.upload_slice(&segments)?;
        let inp = self.gpu.upload_slice(&inputs)?;
        let mut out = self.gpu.alloc_zeros::<f64>(OUTPUTS * pairs.len())?;
        let (kind, clip_max, alpha, gamma, tau) = kind_code(cfg.kind);
        let a = args::PairLossArgs {
            row_logprobs: self.gpu.ptr(&lp),
            segments: self.gpu.ptr(&seg),
            inputs: self.gpu.ptr(&inp),
            outputs: self.gpu.ptr_mut(&mut out),
            pairs: i32::try_from(pairs.len()).context("pair_losses: too many pairs")?,
            kind,
            clip_max,
            unused: 0,
            beta: cfg.beta,
            alpha,
            gamma,
            tau,
        };
        let launch = LaunchConfig {
            grid_dim: (pairs.len() as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the buffers hold what PairLossArgs documents for `pairs.len()` pairs, and
        // every segment lies inside the uploaded log-probs (checked above).
        unsafe { self.gpu.launch("ge_pair_losses", launch, &a)? };
        let o = self.gpu.download_slice(&out, OUTPUTS * pairs.len())?;
        o.chunks_exact(OUTPUTS)
            .zip(pairs)
            .enumerate()
            .map(|(i, (v, p))| {
                let x = PairLogps {
                    policy_chosen: v[0],
                    policy_rejected: v[1],
                    ..*p
                };
                let l = PairLoss {
                    loss: v[2],
                    grad_chosen: v[3],
                    grad_rejected: v[4],
                    chosen_reward: v[5],
                    rejected_reward: v[6],
                    weight: v[7],
                    margin: v[8],
                };
                if v.iter().all(|x| x.is_finite()) {
                    Ok((x, l))
                } else {
                    // Not finite somewhere: the host's evaluation says why (or gives the value
                    // it defines, e.g. for inputs the kernel took as they are).
                    pair_loss(cfg, &x)
                        .map(|l| (x, l))
                        .map_err(|e| anyhow!("{e:#}").context(format!("pair {i}")))
                }
            })
            .collect()
    }
}
