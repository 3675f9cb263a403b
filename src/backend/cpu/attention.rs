//! Causal GQA self-attention on the CPU, over contiguous K/V (a packed batch of whole
//! sequences) or over a paged KV cache (block tables). Both split the work into
//! (sequence, head, query block) tasks that run [`attend_block`]: `S = Q K^T` for the query
//! block against the keys it may see with `gemm`, causal mask, softmax, then `S V`.

use super::matmul::gemm_strided;
use crate::backend::{AttentionShape, PagedSeq, SeqSpan};
use gemm::Parallelism;
use rayon::prelude::*;

/// Queries per task: bounds the score matrix of a task to `QUERY_BLOCK x context`.
pub(super) const QUERY_BLOCK: usize = 64;

/// Attention of `q_rows` queries of one head against `kv_rows` keys/values of its kv head.
/// Query `i` sits at position `first_query_pos + i` and sees keys `0..=first_query_pos + i`
/// (`kv_rows` must be `first_query_pos + q_rows`). Row strides are in floats. Returns
/// `[q_rows, head_dim]`.
///
/// # Safety
/// `q`, `k`, `v` must address `q_rows` / `kv_rows` rows of `head_dim` floats at their strides.
#[allow(clippy::too_many_arguments)]
unsafe fn attend_block(
    q: *const f32,
    q_stride: usize,
    q_rows: usize,
    k: *const f32,
    v: *const f32,
    kv_stride: usize,
    first_query_pos: usize,
    head_dim: usize,
) -> Vec<f32> {
    let kv_rows = first_query_pos + q_rows;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut scores = vec![0f32; q_rows * kv_rows];
    unsafe {
        gemm_strided(
            q_rows,
            kv_rows,
            head_dim,
            scores.as_mut_ptr(),
            kv_rows as isize,
            q,
            q_stride as isize,
            1,
            k,
            1,
            kv_stride as isize,
            Parallelism::None,
        );
    }
    causal_softmax(&mut scores, kv_rows, first_query_pos, scale);
    let mut out = vec![0f32; q_rows * head_dim];
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
            v,
            kv_stride as isize,
            1,
            Parallelism::None,
        );
    }
    out
}

/// Turns raw scores `Q K^T` (`[rows, kv_rows]`, row `i` a query at position
/// `first_query_pos + i`) into causal attention probabilities in place: `softmax(scale * s)`
/// over the visible keys, zero beyond them. Shared by the forward and the backward pass, so
/// the backward's recomputed probabilities are the forward's, bit for bit.
pub(super) fn causal_softmax(
    scores: &mut [f32],
    kv_rows: usize,
    first_query_pos: usize,
    scale: f32,
) {
    for (i, row) in scores.chunks_exact_mut(kv_rows).enumerate() {
        let visible = first_query_pos + i + 1;
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
}

/// Writes task results (`[rows, head_dim]` per (first row, head)) into `[tokens, heads * head_dim]`.
fn scatter(
    tokens: usize,
    qw: usize,
    head_dim: usize,
    placed: impl Iterator<Item = (usize, usize, Vec<f32>)>,
) -> Vec<f32> {
    let mut out = vec![0f32; tokens * qw];
    for (row0, h, block) in placed {
        for (i, row) in block.chunks_exact(head_dim).enumerate() {
            let dst = (row0 + i) * qw + h * head_dim;
            out[dst..dst + head_dim].copy_from_slice(row);
        }
    }
    out
}

/// Attention within each whole sequence of a packed batch; K/V rows are the sequence's own.
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
    let (qw, kw) = (num_heads * head_dim, num_kv_heads * head_dim);
    // (first row of the batch, head, first query index within the sequence, sequence)
    let tasks: Vec<(usize, usize, usize, SeqSpan)> = seqs
        .iter()
        .flat_map(|&s| {
            (0..num_heads).flat_map(move |h| {
                (0..s.len)
                    .step_by(QUERY_BLOCK)
                    .map(move |q0| (s.start + q0, h, q0, s))
            })
        })
        .collect();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(row0, h, q0, s)| {
            let kvh = h / group;
            // SAFETY: the caller checked every span lies inside q/k/v; head offsets stay
            // inside a row.
            unsafe {
                attend_block(
                    q.as_ptr().add(row0 * qw + h * head_dim),
                    qw,
                    QUERY_BLOCK.min(s.len - q0),
                    k.as_ptr().add(s.start * kw + kvh * head_dim),
                    v.as_ptr().add(s.start * kw + kvh * head_dim),
                    kw,
                    q0,
                    head_dim,
                )
            }
        })
        .collect();
    scatter(
        tokens,
        qw,
        head_dim,
        tasks.iter().zip(results).map(|(t, r)| (t.0, t.1, r)),
    )
}

/// Copies the rows of positions `0..len` of a sequence out of a paged cache
/// (`[blocks * block_size, width]`) into one contiguous `[len, width]` buffer.
fn gather_rows(
    cache: &[f32],
    width: usize,
    block_table: &[u32],
    block_size: usize,
    len: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(len * width);
    for (b, &block) in block_table.iter().enumerate() {
        let first = b * block_size;
        if first >= len {
            break;
        }
        let rows = block_size.min(len - first);
        let start = block as usize * block_size * width;
        out.extend_from_slice(&cache[start..start + rows * width]);
    }
    out
}

/// Up to this many new queries, a sequence's paged attention reads K/V rows in place through its
/// block table with dot products (decode steps); longer chunks gather the rows and use `gemm`.
const DIRECT_QUERIES: usize = 8;

/// Attention of `q_rows` queries (row stride `qw`) of one sequence straight off the paged
/// cache: query `i` sits at `first_pos + i`. Returns `[q_rows, heads * head_dim]`.
#[allow(clippy::too_many_arguments)]
fn attend_direct(
    q: &[f32],
    qw: usize,
    q_rows: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    block_table: &[u32],
    block_size: usize,
    first_pos: usize,
    shape: AttentionShape,
) -> Vec<f32> {
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim,
    } = shape;
    let group = num_heads / num_kv_heads;
    let kw = num_kv_heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let visible_max = first_pos + q_rows;
    let slots: Vec<usize> = (0..visible_max)
        .map(|p| block_table[p / block_size] as usize * block_size + p % block_size)
        .collect();
    let mut out = vec![0f32; q_rows * qw];
    // Scores of the `group` query heads that share one kv head: each K/V row is read once
    // for all of them.
    let mut scores = vec![0f32; group * visible_max];
    for i in 0..q_rows {
        let visible = first_pos + i + 1;
        for kvh in 0..num_kv_heads {
            let kv_off = kvh * head_dim;
            let heads = kvh * group..(kvh + 1) * group;
            let qh = |h: usize| &q[i * qw + h * head_dim..i * qw + (h + 1) * head_dim];
            for (pos, &slot) in slots[..visible].iter().enumerate() {
                let k = &k_cache[slot * kw + kv_off..slot * kw + kv_off + head_dim];
                for (g, h) in heads.clone().enumerate() {
                    scores[g * visible_max + pos] = super::matmul::dot(qh(h), k) * scale;
                }
            }
            for g in 0..group {
                let sc = &mut scores[g * visible_max..g * visible_max + visible];
                let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for s in sc.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                sc.iter_mut().for_each(|s| *s *= inv);
            }
            let o =
                &mut out[i * qw + kvh * group * head_dim..i * qw + (kvh + 1) * group * head_dim];
            for (pos, &slot) in slots[..visible].iter().enumerate() {
                let v = &v_cache[slot * kw + kv_off..slot * kw + kv_off + head_dim];
                for (g, o) in o.chunks_exact_mut(head_dim).enumerate() {
                    super::matmul::axpy(o, scores[g * visible_max + pos], v);
                }
            }
        }
    }
    out
}

/// Attention of new queries against a paged KV cache that already holds their own K/V.
pub fn paged_attention(
    q: &[f32],
    tokens: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    seqs: &[PagedSeq<'_>],
    shape: AttentionShape,
    block_size: usize,
) -> Vec<f32> {
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim,
    } = shape;
    let group = num_heads / num_kv_heads;
    let (qw, kw) = (num_heads * head_dim, num_kv_heads * head_dim);
    // (sequence index, first query index within the step's queries of that sequence)
    let tasks: Vec<(usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(i, s)| (0..s.q_len).step_by(QUERY_BLOCK).map(move |q0| (i, q0)))
        .collect();
    let results: Vec<Vec<(usize, usize, Vec<f32>)>> = tasks
        .par_iter()
        .map(|&(i, q0)| {
            let s = &seqs[i];
            let q_rows = QUERY_BLOCK.min(s.q_len - q0);
            let first_pos = s.context_len - s.q_len + q0;
            if s.q_len <= DIRECT_QUERIES {
                let rows = &q[(s.q_start + q0) * qw..(s.q_start + q0 + q_rows) * qw];
                let out = attend_direct(
                    rows,
                    qw,
                    q_rows,
                    k_cache,
                    v_cache,
                    s.block_table,
                    block_size,
                    first_pos,
                    shape,
                );
                // One entry per head, as the gemm path returns.
                return (0..num_heads)
                    .map(|h| {
                        let block: Vec<f32> = out
                            .chunks_exact(qw)
                            .flat_map(|row| row[h * head_dim..(h + 1) * head_dim].iter().copied())
                            .collect();
                        (s.q_start + q0, h, block)
                    })
                    .collect();
            }
            let visible = first_pos + q_rows;
            let keys = gather_rows(k_cache, kw, s.block_table, block_size, visible);
            let values = gather_rows(v_cache, kw, s.block_table, block_size, visible);
            (0..num_heads)
                .map(|h| {
                    let kvh = h / group;
                    // SAFETY: the caller checked the rows and block tables; the gathered
                    // buffers hold `visible` rows of `kw` floats.
                    let out = unsafe {
                        attend_block(
                            q.as_ptr().add((s.q_start + q0) * qw + h * head_dim),
                            qw,
                            q_rows,
                            keys.as_ptr().add(kvh * head_dim),
                            values.as_ptr().add(kvh * head_dim),
                            kw,
                            first_pos,
                            head_dim,
                        )
                    };
                    (s.q_start + q0, h, out)
                })
                .collect()
        })
        .collect();
    scatter(tokens, qw, head_dim, results.into_iter().flatten())
}
