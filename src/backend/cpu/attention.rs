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
            let heads = i * qw + kvh * group * head_dim..i * qw + (kvh + 1) * group * head_dim;
            let kv = KvHead {
                k_cache,
                v_cache,
                slots: &slots[..visible],
                row_stride: kw,
                offset: kvh * head_dim,
                head_dim,
            };
            let scores = &mut scores[..group * visible];
            attend_kv_head(&q[heads.clone()], &kv, scale, scores, &mut out[heads]);
        }
    }
    out
}

/// One kv head of a paged cache as seen by one sequence: row `slots[p]` of the pools holds
/// position `p`; the head's values are `offset..offset + head_dim` of that row.
struct KvHead<'a> {
    k_cache: &'a [f32],
    v_cache: &'a [f32],
    slots: &'a [usize],
    row_stride: usize,
    offset: usize,
    head_dim: usize,
}

impl KvHead<'_> {
    fn k(&self, pos: usize) -> &[f32] {
        let start = self.slots[pos] * self.row_stride + self.offset;
        &self.k_cache[start..start + self.head_dim]
    }
    fn v(&self, pos: usize) -> &[f32] {
        let start = self.slots[pos] * self.row_stride + self.offset;
        &self.v_cache[start..start + self.head_dim]
    }
}

/// The query heads `qs` (`[group, head_dim]`) that share one kv head attend over all of its
/// visible positions (`kv.slots`); each K/V row is read once for the whole group. `scores`
/// is scratch (`[group, visible]`); the result goes to `out` (`[group, head_dim]`).
fn attend_kv_head(qs: &[f32], kv: &KvHead<'_>, scale: f32, scores: &mut [f32], out: &mut [f32]) {
    let (d, visible) = (kv.head_dim, kv.slots.len());
    #[cfg(target_arch = "x86_64")]
    if d % 16 == 0 && std::arch::is_x86_feature_detected!("avx512f") {
        let group = qs.len() / d;
        macro_rules! d64 {
            ($($g:literal)*) => {
                match group {
                    // SAFETY: AVX-512F is present; head_dim is 64; the group size matches.
                    $($g if d == 64 => unsafe { attend_kv_head_d64::<$g>(qs, kv, scale, scores, out) },)*
                    // SAFETY: AVX-512F is present; head_dim is a multiple of 16.
                    _ => unsafe { attend_kv_head_avx512(qs, kv, scale, scores, out) },
                }
            };
        }
        d64!(1 2 3 4 5 6 7 8);
        return;
    }
    for pos in 0..visible {
        let k = kv.k(pos);
        for (g, q) in qs.chunks_exact(d).enumerate() {
            scores[g * visible + pos] = super::matmul::dot(q, k) * scale;
        }
    }
    softmax_rows(scores, visible);
    out.fill(0.0);
    for pos in 0..visible {
        let v = kv.v(pos);
        for (g, o) in out.chunks_exact_mut(d).enumerate() {
            super::matmul::axpy(o, scores[g * visible + pos], v);
        }
    }
}

/// In-place softmax of each `len`-long row of `scores`.
fn softmax_rows(scores: &mut [f32], len: usize) {
    for row in scores.chunks_exact_mut(len) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|s| *s *= inv);
    }
}

/// [`attend_kv_head`] with AVX-512 dot products and accumulations, inlined.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_kv_head_avx512(
    qs: &[f32],
    kv: &KvHead<'_>,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (d, visible) = (kv.head_dim, kv.slots.len());
    let group = qs.len() / d;
    assert!(scores.len() >= group * visible && out.len() == group * d && d % 16 == 0);
    for pos in 0..visible {
        let k = kv.k(pos);
        for g in 0..group {
            let mut acc = _mm512_setzero_ps();
            for c in (0..d).step_by(16) {
                // SAFETY: c + 16 <= d: inside the query row and the key row.
                unsafe {
                    let qv = _mm512_loadu_ps(qs.as_ptr().add(g * d + c));
                    let kv = _mm512_loadu_ps(k.as_ptr().add(c));
                    acc = _mm512_fmadd_ps(qv, kv, acc);
                }
            }
            scores[g * visible + pos] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
    softmax_rows(&mut scores[..group * visible], visible);
    out.fill(0.0);
    for pos in 0..visible {
        let v = kv.v(pos);
        for g in 0..group {
            let w = _mm512_set1_ps(scores[g * visible + pos]);
            for c in (0..d).step_by(16) {
                // SAFETY: c + 16 <= d: inside the value row and the output head.
                unsafe {
                    let o = out.as_mut_ptr().add(g * d + c);
                    let vv = _mm512_loadu_ps(v.as_ptr().add(c));
                    _mm512_storeu_ps(o, _mm512_fmadd_ps(w, vv, _mm512_loadu_ps(o)));
                }
            }
        }
    }
}

/// `[sum(a), sum(b), sum(c), sum(d)]` of four vectors, with one shared reduction tree.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn reduce4(
    a: std::arch::x86_64::__m512,
    b: std::arch::x86_64::__m512,
    c: std::arch::x86_64::__m512,
    d: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m128 {
    use std::arch::x86_64::*;
    // Within each 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], then [c.., d..] likewise.
    let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    // Pairs of floats as doubles: [a, b, c, d] partial sums in every 128-bit lane.
    let (ab, cd) = (_mm512_castps_pd(ab), _mm512_castps_pd(cd));
    let abcd = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)),
        _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)),
    );
    let lo = _mm_add_ps(
        _mm512_extractf32x4_ps::<0>(abcd),
        _mm512_extractf32x4_ps::<1>(abcd),
    );
    let hi = _mm_add_ps(
        _mm512_extractf32x4_ps::<2>(abcd),
        _mm512_extractf32x4_ps::<3>(abcd),
    );
    _mm_add_ps(lo, hi)
}

/// [`attend_kv_head`] for head_dim 64 and `G` query heads per kv head: the queries and the
/// outputs stay in registers, and the scores of four positions share one reduction tree.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_kv_head_d64<const G: usize>(
    qs: &[f32],
    kv: &KvHead<'_>,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    const D: usize = 64;
    let visible = kv.slots.len();
    assert!(kv.head_dim == D && qs.len() == G * D && out.len() == G * D);
    assert!(scores.len() >= G * visible);
    let load4 = |x: &[f32]| -> [__m512; 4] {
        // SAFETY: every caller passes a row of D = 64 floats.
        std::array::from_fn(|c| unsafe { _mm512_loadu_ps(x.as_ptr().add(16 * c)) })
    };
    let q: [[__m512; 4]; G] = std::array::from_fn(|g| load4(&qs[g * D..(g + 1) * D]));
    let dot = |q: &[__m512; 4], k: &[__m512; 4]| -> __m512 {
        let mut acc = _mm512_mul_ps(q[0], k[0]);
        for c in 1..4 {
            acc = _mm512_fmadd_ps(q[c], k[c], acc);
        }
        acc
    };
    let mut pos = 0;
    while pos + 4 <= visible {
        let k: [[__m512; 4]; 4] = std::array::from_fn(|j| load4(kv.k(pos + j)));
        for (g, q) in q.iter().enumerate() {
            let s = reduce4(dot(q, &k[0]), dot(q, &k[1]), dot(q, &k[2]), dot(q, &k[3]));
            let s = _mm_mul_ps(s, _mm_set1_ps(scale));
            // SAFETY: g * visible + pos + 4 <= G * visible <= scores.len().
            unsafe { _mm_storeu_ps(scores.as_mut_ptr().add(g * visible + pos), s) };
        }
        pos += 4;
    }
    for p in pos..visible {
        let k = load4(kv.k(p));
        for (g, q) in q.iter().enumerate() {
            scores[g * visible + p] = _mm512_reduce_add_ps(dot(q, &k)) * scale;
        }
    }
    softmax_rows(&mut scores[..G * visible], visible);
    let mut o = [[_mm512_setzero_ps(); 4]; G];
    for p in 0..visible {
        let v = load4(kv.v(p));
        for (g, o) in o.iter_mut().enumerate() {
            let w = _mm512_set1_ps(scores[g * visible + p]);
            for c in 0..4 {
                o[c] = _mm512_fmadd_ps(w, v[c], o[c]);
            }
        }
    }
    for (g, o) in o.iter().enumerate() {
        for (c, &oc) in o.iter().enumerate() {
            // SAFETY: g * D + 16 * c + 16 <= G * D = out.len().
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(g * D + 16 * c), oc) };
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The decode kernels (head_dim 64 with groups 1-8 in registers, the general vector path
    /// for 16 and for 64 with a group of 9, portable for 8 and 24) against plain f64
    /// attention, with scattered slots and positions that do and do not fill groups of four.
    #[test]
    fn attend_kv_head_matches_f64_reference() {
        let mut seed = 3u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for (d, group, visible) in [
            (16, 1, 1),
            (64, 3, 37),
            (64, 1, 3),
            (64, 7, 9),
            (64, 8, 4),
            (64, 9, 6),
            (16, 2, 20),
            (8, 2, 5),
            (24, 3, 9),
        ] {
            let (rows, stride, offset) = (50, 2 * d + 8, d + 8);
            let k_cache: Vec<f32> = (0..rows * stride).map(|_| next()).collect();
            let v_cache: Vec<f32> = (0..rows * stride).map(|_| next()).collect();
            let slots: Vec<usize> = (0..visible).map(|p| (p * 7 + 3) % rows).collect();
            let qs: Vec<f32> = (0..group * d).map(|_| next() * 4.0).collect();
            let kv = KvHead {
                k_cache: &k_cache,
                v_cache: &v_cache,
                slots: &slots,
                row_stride: stride,
                offset,
                head_dim: d,
            };
            let scale = 1.0 / (d as f32).sqrt();
            let mut scores = vec![f32::NAN; group * visible];
            let mut out = vec![f32::NAN; group * d];
            attend_kv_head(&qs, &kv, scale, &mut scores, &mut out);
            for g in 0..group {
                let q = &qs[g * d..(g + 1) * d];
                let s: Vec<f64> = (0..visible)
                    .map(|p| {
                        let k = kv.k(p);
                        (0..d).map(|c| q[c] as f64 * k[c] as f64).sum::<f64>() * scale as f64
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - max).exp()).sum();
                for c in 0..d {
                    let want: f64 = (0..visible)
                        .map(|p| (s[p] - max).exp() / z * kv.v(p)[c] as f64)
                        .sum();
                    let got = out[g * d + c] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "d {d} group {group} visible {visible} [{g},{c}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// Manual timing aid: the head_dim-64 decode kernel against the general vector path,
    /// `cargo test --release --lib decode_attention_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn decode_attention_timing() {
        let (d, group, visible, rows) = (64, 3, 192, 4096);
        let stride = 3 * d;
        let k_cache: Vec<f32> = (0..rows * stride).map(|i| (i % 97) as f32 * 1e-3).collect();
        let v_cache = k_cache.clone();
        let slots: Vec<usize> = (0..visible).map(|p| (p * 37) % rows).collect();
        let qs: Vec<f32> = (0..group * d).map(|i| (i % 13) as f32 * 1e-2).collect();
        let kv = KvHead {
            k_cache: &k_cache,
            v_cache: &v_cache,
            slots: &slots,
            row_stride: stride,
            offset: d,
            head_dim: d,
        };
        let mut scores = vec![0f32; group * visible];
        let mut out = vec![0f32; group * d];
        let reps = 20_000;
        for round in 0..3 {
            let t = std::time::Instant::now();
            for _ in 0..reps {
                unsafe { attend_kv_head_avx512(&qs, &kv, 0.125, &mut scores, &mut out) };
            }
            let general = t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            for _ in 0..reps {
                unsafe { attend_kv_head_d64::<3>(&qs, &kv, 0.125, &mut scores, &mut out) };
            }
            let d64 = t.elapsed().as_secs_f64();
            eprintln!(
                "round {round}: general {:.2} us, head_dim-64 kernel {:.2} us per call",
                general / reps as f64 * 1e6,
                d64 / reps as f64 * 1e6
            );
        }
    }
}
