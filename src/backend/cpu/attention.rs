//! Causal GQA self-attention on the CPU over a packed batch of sequences. Work is split into
//! (sequence, head, query block) tasks; each task computes `S = Q K^T` for its query block
//! against the keys up to the block's end with `gemm`, masks, softmaxes and multiplies by V.

use super::matmul::gemm_strided;
use crate::backend::{AttentionShape, SeqSpan};
use gemm::Parallelism;
use rayon::prelude::*;

/// Queries per task: bounds the score matrix of a task to `QUERY_BLOCK x seq_len`.
const QUERY_BLOCK: usize = 64;

pub fn causal_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    tokens: usize,
    seqs: &[SeqSpan],
    shape: AttentionShape,
) -> Vec<f32> {
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim,
    } = shape;
    let group = num_heads / num_kv_heads;
    let qw = num_heads * head_dim;
    let kw = num_kv_heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();

    // (sequence, head, first query row within the sequence)
    let tasks: Vec<(SeqSpan, usize, usize)> = seqs
        .iter()
        .flat_map(|&s| {
            (0..num_heads)
                .flat_map(move |h| (0..s.len).step_by(QUERY_BLOCK).map(move |q0| (s, h, q0)))
        })
        .collect();

    let blocks: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(s, h, q0)| {
            let q_rows = QUERY_BLOCK.min(s.len - q0);
            let kv_rows = q0 + q_rows; // causal: keys up to the last query of the block
            let kvh = h / group;
            let mut scores = vec![0f32; q_rows * kv_rows];
            // SAFETY: rows s.start..s.start+s.len are inside q/k/v (checked by the caller),
            // head offsets stay inside a row.
            unsafe {
                gemm_strided(
                    q_rows,
                    kv_rows,
                    head_dim,
                    scores.as_mut_ptr(),
                    kv_rows as isize,
                    q.as_ptr().add((s.start + q0) * qw + h * head_dim),
                    qw as isize,
                    1,
                    k.as_ptr().add(s.start * kw + kvh * head_dim),
                    1,
                    kw as isize,
                    Parallelism::None,
                );
            }
            for (i, row) in scores.chunks_exact_mut(kv_rows).enumerate() {
                let visible = q0 + i + 1;
                let max = row[..visible]
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
                let mut sum = 0f32;
                for x in &mut row[..visible] {
                    *x = (*x * scale - max).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                row[..visible].iter_mut().for_each(|x| *x *= inv);
                row[visible..].iter_mut().for_each(|x| *x = 0.0);
            }
            let mut out = vec![0f32; q_rows * head_dim];
            // SAFETY: as above.
            unsafe {
                gemm_strided(
                    q_rows,
                    head_dim,
                    kv_rows,
                    out.as_mut_ptr(),
                    head_dim as isize,
                    scores.as_ptr(),
                    kv_rows as isize,
                    1,
                    v.as_ptr().add(s.start * kw + kvh * head_dim),
                    kw as isize,
                    1,
                    Parallelism::None,
                );
            }
            out
        })
        .collect();

    let mut out = vec![0f32; tokens * qw];
    for (&(s, h, q0), block) in tasks.iter().zip(&blocks) {
        for (i, row) in block.chunks_exact(head_dim).enumerate() {
            let dst = (s.start + q0 + i) * qw + h * head_dim;
            out[dst..dst + head_dim].copy_from_slice(row);
        }
    }
    out
}
