//! Row-wise and elementwise ops of the CPU backend: RMSNorm, RoPE, SwiGLU, residual add, and
//! the fused LM-head log-softmax gather.

use super::packed::PackedMatrix;
use crate::model::HostTensor;
use rayon::prelude::*;

/// Rows per parallel task for the light row-wise ops.
const ROWS_PER_TASK: usize = 16;

pub fn rms_norm(x: &HostTensor, weight: &[f32], eps: f32) -> HostTensor {
    let d = weight.len();
    let mut out = vec![0f32; x.numel()];
    out.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(x.data.par_chunks(d * ROWS_PER_TASK))
        .for_each(|(o, xs)| {
            for (orow, xrow) in o.chunks_exact_mut(d).zip(xs.chunks_exact(d)) {
                let ss: f32 = xrow.iter().map(|v| v * v).sum();
                let scale = 1.0 / (ss / d as f32 + eps).sqrt();
                for ((o, &v), &w) in orow.iter_mut().zip(xrow).zip(weight) {
                    *o = v * scale * w;
                }
            }
        });
    HostTensor::new(x.shape.clone(), out)
}

/// HF rotate-half RoPE on rows of width `width` (`heads * head_dim`); `inverse` rotates by
/// minus the angle (the transpose of the rotation: RoPE's backward).
pub fn rope(
    x: &mut [f32],
    width: usize,
    positions: &[u32],
    head_dim: usize,
    inv_freq: &[f32],
    inverse: bool,
) {
    let sign = if inverse { -1.0 } else { 1.0 };
    let half = head_dim / 2;
    x.par_chunks_mut(width)
        .zip(positions.par_iter())
        .for_each(|(row, &pos)| {
            let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
                .iter()
                .map(|&f| {
                    let a = pos as f64 * f as f64;
                    (a.cos() as f32, sign * a.sin() as f32)
                })
                .unzip();
            for head in row.chunks_exact_mut(head_dim) {
                let (lo, hi) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * cos[i] - b * sin[i];
                    hi[i] = b * cos[i] + a * sin[i];
                }
            }
        });
}

/// `silu(gate) * up` for rows laid out `[gate (width) | up (width)]`.
pub fn swiglu(gate_up: &[f32], width: usize) -> Vec<f32> {
    let mut out = vec![0f32; gate_up.len() / 2];
    out.par_chunks_mut(width)
        .zip(gate_up.par_chunks(2 * width))
        .for_each(|(o, row)| {
            let (g, u) = row.split_at(width);
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        });
    out
}

pub fn add_assign(x: &mut [f32], y: &[f32]) {
    x.par_chunks_mut(4096)
        .zip(y.par_chunks(4096))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}

/// Rows of hidden states handled per LM-head chunk: bounds the logits held at once to
/// `LOGPROB_CHUNK_ROWS x vocab` floats.
pub const LOGPROB_CHUNK_ROWS: usize = 64;

/// `log softmax(hidden[r] @ lm_head^T)[targets[r]]` for every row, chunk by chunk.
pub fn target_logprobs(hidden: &[f32], lm_head: &PackedMatrix, targets: &[u32]) -> Vec<f32> {
    let (vocab, d) = (lm_head.out_features(), lm_head.in_features());
    let mut out = Vec::with_capacity(targets.len());
    let mut logits = vec![0f32; LOGPROB_CHUNK_ROWS.min(targets.len()) * vocab];
    for (h, t) in hidden
        .chunks(LOGPROB_CHUNK_ROWS * d)
        .zip(targets.chunks(LOGPROB_CHUNK_ROWS))
    {
        let rows = t.len();
        let logits = &mut logits[..rows * vocab];
        lm_head.matmul(logits, h, rows);
        let lp: Vec<f32> = logits
            .par_chunks(vocab)
            .zip(t.par_iter())
            .map(|(row, &tgt)| row[tgt as usize] - log_sum_exp(row))
            .collect();
        out.extend(lp);
    }
    out
}

/// `log(sum(exp(row)))`, stable, accumulated in f64.
pub fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
    (max as f64 + sum.ln()) as f32
}
