//! The backward (training) ops of the CPU backend: weight and bias gradients (`gemm` with
//! strides, accumulated in place), RMSNorm, SwiGLU, row scatter-adds (embedding), causal GQA
//! attention (probabilities recomputed block by block, products through `gemm`) and the fused
//! LM head + log-softmax backward (chunked over rows, never `rows x vocab` at once). The input
//! gradient of a packed linear weight lives with its layout, in `packed.rs`.

use super::attention::{QUERY_BLOCK, causal_softmax};
use super::matmul::{gemm_strided, gemm_strided_add, parallelism};
use super::packed::PackedMatrix;
use crate::backend::{AttentionShape, SeqSpan};
use gemm::Parallelism;
use rayon::prelude::*;

/// Rows per parallel task for the light row-wise ops.
const ROWS_PER_TASK: usize = 16;

/// Rows of hidden states per chunk of the LM-head backward: bounds the logits held at once to
/// `LOGPROB_BACKWARD_CHUNK_ROWS x vocab` floats (24 MiB at a 49k vocabulary), and is large
/// enough that the LM-head gradient (read and written once per chunk) is not memory bound.
pub const LOGPROB_BACKWARD_CHUNK_ROWS: usize = 128;

/// `grad[out, in] += dy[n, out]^T @ x[n, in]`.
pub fn accumulate_linear_grad(
    grad: &mut [f32],
    x: &[f32],
    dy: &[f32],
    n: usize,
    out: usize,
    inp: usize,
) {
    assert!(
        grad.len() == out * inp && x.len() == n * inp && dy.len() == n * out,
        "accumulate_linear_grad: shapes"
    );
    // SAFETY: the assert bounds every index: lhs[i][kk] = dy[kk * out + i] (i < out, kk < n),
    // rhs[kk][j] = x[kk * inp + j], dst[i][j] = grad[i * inp + j].
    unsafe {
        gemm_strided_add(
            out,
            inp,
            n,
            grad.as_mut_ptr(),
            inp as isize,
            dy.as_ptr(),
            1,
            out as isize,
            x.as_ptr(),
            inp as isize,
            1,
            parallelism(out, inp, n),
        )
    }
}

/// `grad[out] += column sums of dy[n, out]`.
pub fn accumulate_bias_grad(grad: &mut [f32], dy: &[f32]) {
    let out = grad.len();
    for row in dy.chunks_exact(out) {
        for (g, d) in grad.iter_mut().zip(row) {
            *g += d;
        }
    }
}

/// RMSNorm backward. Forward: `y = x * r * w` with `r = 1 / sqrt(mean(x^2) + eps)` per row.
/// Returns `dx = r * w * dy - x * r^3 / d * sum(dy * w * x)` and adds `sum_rows(dy * x * r)` to
/// `weight_grad`.
pub fn rms_norm_backward(
    x: &[f32],
    weight: &[f32],
    eps: f32,
    dy: &[f32],
    weight_grad: &mut [f32],
) -> Vec<f32> {
    let d = weight.len();
    let mut dx = vec![0f32; x.len()];
    let partial = dx
        .par_chunks_mut(d * ROWS_PER_TASK)
        .zip(x.par_chunks(d * ROWS_PER_TASK))
        .zip(dy.par_chunks(d * ROWS_PER_TASK))
        .fold(
            || vec![0f32; d],
            |mut dw, ((dxs, xs), dys)| {
                for ((dxr, xr), dyr) in dxs
                    .chunks_exact_mut(d)
                    .zip(xs.chunks_exact(d))
                    .zip(dys.chunks_exact(d))
                {
                    let ss: f32 = xr.iter().map(|v| v * v).sum();
                    let r = 1.0 / (ss / d as f32 + eps).sqrt();
                    let mut dot = 0f32;
                    for (((dw, &xv), &g), &w) in dw.iter_mut().zip(xr).zip(dyr).zip(weight) {
                        *dw += g * xv * r;
                        dot += g * w * xv;
                    }
                    let c = r * r * r / d as f32 * dot;
                    for (((o, &xv), &g), &w) in dxr.iter_mut().zip(xr).zip(dyr).zip(weight) {
                        *o = r * w * g - c * xv;
                    }
                }
                dw
            },
        )
        .reduce(
            || vec![0f32; d],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        );
    weight_grad
        .iter_mut()
        .zip(&partial)
        .for_each(|(g, p)| *g += p);
    dx
}

/// SwiGLU backward on rows `[gate (width) | up (width)]`: with `s = sigmoid(g)`,
/// `d_up = dy * g * s` and `d_gate = dy * u * s * (1 + g * (1 - s))`. Returns
/// `[n, 2 * width]` in the fused layout.
pub fn swiglu_backward(gate_up: &[f32], dy: &[f32], width: usize) -> Vec<f32> {
    let mut out = vec![0f32; gate_up.len()];
    out.par_chunks_mut(2 * width)
        .zip(gate_up.par_chunks(2 * width))
        .zip(dy.par_chunks(width))
        .for_each(|((o, row), dy)| {
            let (g, u) = row.split_at(width);
            let (dg, du) = o.split_at_mut(width);
            for i in 0..width {
                let s = 1.0 / (1.0 + (-g[i]).exp());
                du[i] = dy[i] * g[i] * s;
                dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        });
    out
}

/// `dst[rows[i]] += src[i]` for rows of width `d` (repeated rows add up).
pub fn scatter_add_rows(dst: &mut [f32], d: usize, rows: impl Iterator<Item = usize>, src: &[f32]) {
    for (r, s) in rows.zip(src.chunks_exact(d)) {
        for (a, b) in dst[r * d..(r + 1) * d].iter_mut().zip(s) {
            *a += b;
        }
    }
}

/// Gradients of one query head of one sequence: `q`, `dout` (row stride `q_stride`) and `k`,
/// `v` (row stride `kv_stride`) address `len` rows of `head_dim` floats. With `P` the causal
/// softmax of `scale * Q K^T` and `dP = dO V^T`: `dS = P * (dP - rowsum(P * dP)) * scale`,
/// `dQ = dS K`, `dK = dS^T Q`, `dV = P^T dO`, computed per block of queries (each block sees
/// keys `0..=its last position`). Returns `[dq, dk, dv]`, each `[len, head_dim]`.
///
/// # Safety
/// The pointers must address those rows at those strides.
#[allow(clippy::too_many_arguments)]
unsafe fn attention_backward_head(
    q: *const f32,
    dout: *const f32,
    q_stride: usize,
    k: *const f32,
    v: *const f32,
    kv_stride: usize,
    len: usize,
    head_dim: usize,
) -> [Vec<f32>; 3] {
    let scale = 1.0 / (head_dim as f32).sqrt();
    let hd = head_dim;
    let mut dq = vec![0f32; len * hd];
    let mut dk = vec![0f32; len * hd];
    let mut dv = vec![0f32; len * hd];
    let block_cap = QUERY_BLOCK.min(len) * len;
    let mut probs = vec![0f32; block_cap];
    let mut dprobs = vec![0f32; block_cap];
    let none = Parallelism::None;
    for q0 in (0..len).step_by(QUERY_BLOCK) {
        let rows = QUERY_BLOCK.min(len - q0);
        let vis = q0 + rows;
        let p = &mut probs[..rows * vis];
        let ds = &mut dprobs[..rows * vis];
        // SAFETY: (all products) query rows q0..q0 + rows and key rows 0..vis are inside
        // the head's rows; the local buffers hold rows x vis and len x head_dim floats.
        unsafe {
            let (qb, db) = (q.add(q0 * q_stride), dout.add(q0 * q_stride));
            let (qs, ks) = (q_stride as isize, kv_stride as isize);
            // P = causal softmax(scale Q K^T); dP = dO V^T.
            gemm_strided(
                rows,
                vis,
                hd,
                p.as_mut_ptr(),
                vis as isize,
                qb,
                qs,
                1,
                k,
                1,
                ks,
                none,
            );
            causal_softmax(p, vis, q0, scale);
            gemm_strided(
                rows,
                vis,
                hd,
                ds.as_mut_ptr(),
                vis as isize,
                db,
                qs,
                1,
                v,
                1,
                ks,
                none,
            );
            for (prow, drow) in p.chunks_exact(vis).zip(ds.chunks_exact_mut(vis)) {
                let dot: f32 = prow.iter().zip(drow.iter()).map(|(a, b)| a * b).sum();
                for (d, &pv) in drow.iter_mut().zip(prow) {
                    *d = pv * (*d - dot) * scale;
                }
            }
            // dQ[block] = dS K; dK += dS^T Q[block]; dV += P^T dO[block].
            let (dsp, pp) = (ds.as_ptr(), p.as_ptr());
            let (dqp, hdi, visi) = (dq.as_mut_ptr().add(q0 * hd), hd as isize, vis as isize);
            gemm_strided(rows, hd, vis, dqp, hdi, dsp, visi, 1, k, ks, 1, none);
            gemm_strided_add(
                vis,
                hd,
                rows,
                dk.as_mut_ptr(),
                hdi,
                dsp,
                1,
                visi,
                qb,
                qs,
                1,
                none,
            );
            gemm_strided_add(
                vis,
                hd,
                rows,
                dv.as_mut_ptr(),
                hdi,
                pp,
                1,
                visi,
                db,
                qs,
                1,
                none,
            );
        }
    }
    [dq, dk, dv]
}

/// Backward of [`super::attention::causal_attention`]: `(dq, dk, dv)` for a packed batch,
/// `dk`/`dv` summed over the query heads that share a kv head. One task per (sequence, query
/// head).
pub fn causal_attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    tokens: usize,
    seqs: &[SeqSpan],
    shape: AttentionShape,
) -> [Vec<f32>; 3] {
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim,
    } = shape;
    let group = num_heads / num_kv_heads;
    let (qw, kw) = (num_heads * head_dim, num_kv_heads * head_dim);
    let tasks: Vec<(SeqSpan, usize)> = seqs
        .iter()
        .filter(|s| s.len > 0)
        .flat_map(|&s| (0..num_heads).map(move |h| (s, h)))
        .collect();
    let results: Vec<[Vec<f32>; 3]> = tasks
        .par_iter()
        .map(|&(s, h)| {
            let kvh = h / group;
            let (qo, ko) = (s.start * qw + h * head_dim, s.start * kw + kvh * head_dim);
            // SAFETY: the caller checked every span lies inside q/k/v/dout; head offsets
            // stay inside a row.
            unsafe {
                attention_backward_head(
                    q.as_ptr().add(qo),
                    dout.as_ptr().add(qo),
                    qw,
                    k.as_ptr().add(ko),
                    v.as_ptr().add(ko),
                    kw,
                    s.len,
                    head_dim,
                )
            }
        })
        .collect();
    let mut dq = vec![0f32; tokens * qw];
    let mut dk = vec![0f32; tokens * kw];
    let mut dv = vec![0f32; tokens * kw];
    for (&(s, h), [hq, hk, hv]) in tasks.iter().zip(&results) {
        let kvh = h / group;
        for i in 0..s.len {
            let row = s.start + i;
            let src = i * head_dim..(i + 1) * head_dim;
            let qd = row * qw + h * head_dim;
            dq[qd..qd + head_dim].copy_from_slice(&hq[src.clone()]);
            let kd = row * kw + kvh * head_dim;
            for (a, b) in dk[kd..kd + head_dim].iter_mut().zip(&hk[src.clone()]) {
                *a += b;
            }
            for (a, b) in dv[kd..kd + head_dim].iter_mut().zip(&hv[src]) {
                *a += b;
            }
        }
    }
    [dq, dk, dv]
}

/// Backward of the fused LM head + log-softmax + gather: for row `r` with logits
/// `l = hidden[r] @ W^T`, `p = softmax(l)` and upstream gradient `g = d_logprob[r]`,
/// `dl = g * (onehot(targets[r]) - p)`; returns `d_hidden = dl @ W` (`[n, d]`) and adds
/// `dl^T @ hidden` to `lm_head_grad` (`[vocab, d]`). Chunked over rows like the forward.
pub fn target_logprobs_backward(
    hidden: &[f32],
    lm_head: &PackedMatrix,
    targets: &[u32],
    d_logprob: &[f32],
    lm_head_grad: &mut [f32],
) -> Vec<f32> {
    let (vocab, d) = (lm_head.out_features(), lm_head.in_features());
    let n = targets.len();
    let mut d_hidden = vec![0f32; n * d];
    let mut logits = vec![0f32; LOGPROB_BACKWARD_CHUNK_ROWS.min(n) * vocab];
    for (((h, t), g), dh) in hidden
        .chunks(LOGPROB_BACKWARD_CHUNK_ROWS * d)
        .zip(targets.chunks(LOGPROB_BACKWARD_CHUNK_ROWS))
        .zip(d_logprob.chunks(LOGPROB_BACKWARD_CHUNK_ROWS))
        .zip(d_hidden.chunks_mut(LOGPROB_BACKWARD_CHUNK_ROWS * d))
    {
        let rows = t.len();
        let logits = &mut logits[..rows * vocab];
        lm_head.matmul(logits, h, rows);
        logits
            .par_chunks_mut(vocab)
            .zip(t.par_iter().zip(g.par_iter()))
            .for_each(|(row, (&tgt, &g))| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f64;
                for v in row.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v as f64;
                }
                let coef = (-g as f64 / sum) as f32;
                for v in row.iter_mut() {
                    *v *= coef;
                }
                row[tgt as usize] += g;
            });
        lm_head.matmul_transposed(dh, logits, rows);
        accumulate_linear_grad(lm_head_grad, h, logits, rows, vocab, d);
    }
    d_hidden
}
