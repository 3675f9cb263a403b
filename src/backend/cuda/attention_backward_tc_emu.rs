//! A host emulation of `kernels/attention_backward_tc.cu`, lane by lane: shared tiles as bf16
//! arrays with the kernels' padded row stride, the kernels' fragment loads (the same index
//! maths, word for word), and each `mma.m16n8k16` done by rebuilding A, B and C from the 32
//! lanes' registers per the PTX ISA's fragment layouts (written down here independently of the
//! kernels' code), so a wrong index in a load, a pack or a store shows up as a wrong gradient
//! against the CPU backend. Warp shuffles are emulated over the 32 lanes' values.

// Loops over lanes and registers index several arrays at once, as the kernels do.
#![allow(clippy::needless_range_loop)]

use super::{tc_inner_tiles, tile_list, tiles_for};
use crate::backend::{AttentionShape, SeqSpan};
use half::bf16;

const LANES: usize = 32;
/// One warp-wide value per lane.
type Lanes<T> = [T; LANES];
/// A C fragment (4 f32 per lane).
type CFrag = Lanes<[f32; 4]>;
/// An A fragment (4 bf16 pairs per lane).
type AFrag = Lanes<[u32; 4]>;
/// A B fragment (2 bf16 pairs per lane).
type BFrag = Lanes<[u32; 2]>;

fn bf(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}
fn unbf(b: u16) -> f32 {
    bf16::from_bits(b).to_f32()
}
/// `ge_abt_pack`: `lo` in the low half.
fn pack(lo: f32, hi: f32) -> u32 {
    bf(lo) as u32 | (bf(hi) as u32) << 16
}

/// A shared tile: `rows` rows of `hd` bf16 with a stride of `hd / 2 + 4` words.
struct Smem {
    w: usize,
    h: Vec<u16>,
}

impl Smem {
    fn new(rows: usize, hd: usize) -> Self {
        let w = hd / 2 + 4;
        Self {
            w,
            h: vec![0xffff; rows * 2 * w], // garbage (NaN) in the padding and unloaded rows
        }
    }
    /// The 32-bit word `i` (little-endian: element 2 i in the low half).
    fn word(&self, i: usize) -> u32 {
        self.h[2 * i] as u32 | (self.h[2 * i + 1] as u32) << 16
    }
    /// `ge_abt_load`: rows `row0 ..` of `src` (columns `col .. col + hd`, `ld` per row);
    /// rows at or past `nvalid` zero.
    #[allow(clippy::too_many_arguments)]
    fn load(
        &mut self,
        rows: usize,
        hd: usize,
        src: &[f32],
        ld: usize,
        col: usize,
        row0: usize,
        nvalid: usize,
    ) {
        for r in 0..rows {
            for c in 0..hd {
                self.h[r * 2 * self.w + c] = if r < nvalid {
                    bf(src[(row0 + r) * ld + col + c])
                } else {
                    0
                };
            }
        }
    }
}

fn gid(lane: usize) -> usize {
    lane >> 2
}
fn tig(lane: usize) -> usize {
    lane & 3
}

// ---- The kernels' fragment loads (ge_abt_frag_a / _b / _bt), index for index. ----

fn frag_a(m: &Smem, r0: usize, kk: usize) -> AFrag {
    std::array::from_fn(|lane| {
        let w = m.w;
        let p = (r0 + gid(lane)) * w + kk / 2 + tig(lane);
        [
            m.word(p),
            m.word(p + 8 * w),
            m.word(p + 4),
            m.word(p + 8 * w + 4),
        ]
    })
}

fn frag_b(m: &Smem, n0: usize, kk: usize) -> BFrag {
    std::array::from_fn(|lane| {
        let p = (n0 + gid(lane)) * m.w + kk / 2 + tig(lane);
        [m.word(p), m.word(p + 4)]
    })
}

fn frag_bt(m: &Smem, kk: usize, n0: usize) -> BFrag {
    std::array::from_fn(|lane| {
        let w = m.w;
        let i = (kk + 2 * tig(lane)) * (2 * w) + n0 + gid(lane);
        let h = |o: usize| m.h[i + o] as u32;
        [h(0) | h(2 * w) << 16, h(16 * w) | h(18 * w) << 16]
    })
}

// ---- The PTX ISA's m16n8k16 layouts (independent of the kernels' code). ----

/// (row, column) of element `half` of A register `reg` of `lane`.
fn a_elem(lane: usize, reg: usize, half: usize) -> (usize, usize) {
    (
        gid(lane) + 8 * (reg % 2),
        2 * tig(lane) + half + 8 * (reg / 2),
    )
}
/// (k, n) of element `half` of B register `reg` of `lane`.
fn b_elem(lane: usize, reg: usize, half: usize) -> (usize, usize) {
    (2 * tig(lane) + half + 8 * reg, gid(lane))
}
/// (row, column) of C register `reg` of `lane`.
fn c_elem(lane: usize, reg: usize) -> (usize, usize) {
    (gid(lane) + 8 * (reg / 2), 2 * tig(lane) + reg % 2)
}

/// `c += A B` for one warp, A and B rebuilt from the lanes' registers (each element exactly
/// once), summed in f32.
fn mma(c: &mut CFrag, a: &AFrag, b: &BFrag) {
    let mut am = [[f32::NAN; 16]; 16];
    let mut bm = [[f32::NAN; 8]; 16];
    let mut seen_a = [[false; 16]; 16];
    let mut seen_b = [[false; 8]; 16];
    for lane in 0..LANES {
        for reg in 0..4 {
            for half in 0..2 {
                let (r, k) = a_elem(lane, reg, half);
                assert!(!seen_a[r][k]);
                seen_a[r][k] = true;
                am[r][k] = unbf((a[lane][reg] >> (16 * half)) as u16);
            }
        }
        for reg in 0..2 {
            for half in 0..2 {
                let (k, n) = b_elem(lane, reg, half);
                assert!(!seen_b[k][n]);
                seen_b[k][n] = true;
                bm[k][n] = unbf((b[lane][reg] >> (16 * half)) as u16);
            }
        }
    }
    for lane in 0..LANES {
        for reg in 0..4 {
            let (r, n) = c_elem(lane, reg);
            let mut s = c[lane][reg];
            for k in 0..16 {
                s += am[r][k] * bm[k][n];
            }
            c[lane][reg] = s;
        }
    }
}

fn shfl_xor(v: &Lanes<f32>, o: usize) -> Lanes<f32> {
    std::array::from_fn(|l| v[l ^ o])
}

/// `ge_abt_scores`: NT C fragments of rows `r0 ..` of `a` against rows of `m`.
fn scores(a: &Smem, m: &Smem, r0: usize, hd: usize, nt: usize) -> Vec<CFrag> {
    let mut acc = vec![[[0f32; 4]; LANES]; nt];
    for kk in (0..hd).step_by(16) {
        let af = frag_a(a, r0, kk);
        for (j, c) in acc.iter_mut().enumerate() {
            mma(c, &af, &frag_b(m, 8 * j, kk));
        }
    }
    acc
}

/// `ge_abt_c_to_a`.
fn c_to_a(c: &[CFrag]) -> Vec<AFrag> {
    (0..c.len() / 2)
        .map(|s| {
            std::array::from_fn(|l| {
                let (x, y) = (&c[2 * s][l], &c[2 * s + 1][l]);
                [
                    pack(x[0], x[1]),
                    pack(x[2], x[3]),
                    pack(y[0], y[1]),
                    pack(y[2], y[3]),
                ]
            })
        })
        .collect()
}

/// `ge_abt_accumulate`.
fn accumulate(acc: &mut [CFrag], a: &[AFrag], m: &Smem) {
    for (n, c) in acc.iter_mut().enumerate() {
        for (s, af) in a.iter().enumerate() {
            mma(c, af, &frag_bt(m, 16 * s, 8 * n));
        }
    }
}

/// The tensor-core kernels on the host: `(dq, dk, dv)`, rows of no sequence NaN (never
/// written), written values rounded to bf16 as the kernels store them.
/// The tensor-core backward kernels, emulated. With `given` = (log-sum-exp, delta), each
/// `[rows, num_heads]`, the dq kernel runs in its `stats_given` mode: those statistics replace
/// the ones of its first pass, and the dk/dv kernel reads them.
#[allow(clippy::too_many_arguments)]
pub(super) fn emulate_tc(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    rows: usize,
    seqs: &[SeqSpan],
    shape: AttentionShape,
    given: Option<(&[f32], &[f32])>,
) -> [Vec<f32>; 3] {
    let AttentionShape {
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: hd,
    } = shape;
    let t = tiles_for(hd, true).unwrap();
    assert_eq!((t.query_rows, t.key_rows, t.threads), (64, 64, 128));
    let (bk_in, bq_in) = tc_inner_tiles(hd);
    let (qw, kw, group) = (nh * hd, nkv * hd, nh / nkv);
    let scale = 1.0 / (hd as f32).sqrt();
    let (dt, ninf) = (hd / 8, f32::NEG_INFINITY);
    let mut dq = vec![f32::NAN; rows * qw];
    let mut dk = vec![f32::NAN; rows * kw];
    let mut dv = vec![f32::NAN; rows * kw];
    let mut lse_g = vec![f32::NAN; rows * nh];
    let mut dd_g = vec![f32::NAN; rows * nh];
    if let Some((lse, delta)) = given {
        lse_g.copy_from_slice(lse);
        dd_g.copy_from_slice(delta);
    }

    // ---- dq kernel: grid (query tile, head). ----
    let qt = tile_list(seqs, 64, true).unwrap();
    for tile in qt.chunks(3) {
        let (seq0, len, q0) = (tile[0] as usize, tile[1] as usize, tile[2] as usize);
        let nq = 64.min(len - q0);
        let key_end = q0 + nq;
        let nt = bk_in / 8;
        for h in 0..nh {
            let kvh = h / group;
            let mut q_s = Smem::new(64, hd);
            let mut do_s = Smem::new(64, hd);
            q_s.load(64, hd, q, qw, h * hd, seq0 + q0, nq);
            do_s.load(64, hd, dout, qw, h * hd, seq0 + q0, nq);
            for warp in 0..4 {
                let r0 = 16 * warp;
                let mut m = [[ninf; 2]; LANES];
                let mut l = [[0f32; 2]; LANES];
                let mut acc = [[0f32; 2]; LANES];
                for k0 in (0..key_end).step_by(bk_in) {
                    let nk = bk_in.min(key_end - k0);
                    let mut k_s = Smem::new(bk_in, hd);
                    let mut v_s = Smem::new(bk_in, hd);
                    k_s.load(bk_in, hd, k, kw, kvh * hd, seq0 + k0, nk);
                    v_s.load(bk_in, hd, v, kw, kvh * hd, seq0 + k0, nk);
                    let mut s = scores(&q_s, &k_s, r0, hd, nt);
                    let dp = scores(&do_s, &v_s, r0, hd, nt);
                    for hr in 0..2 {
                        let mut mx = [ninf; LANES];
                        for lane in 0..LANES {
                            let r = r0 + gid(lane) + 8 * hr;
                            for (j, sj) in s.iter_mut().enumerate() {
                                for e in 0..2 {
                                    let c = 8 * j + 2 * tig(lane) + e;
                                    let ok = r < nq && c < nk && k0 + c <= q0 + r;
                                    let x = if ok {
                                        sj[lane][2 * hr + e] * scale
                                    } else {
                                        ninf
                                    };
                                    sj[lane][2 * hr + e] = x;
                                    mx[lane] = mx[lane].max(x);
                                }
                            }
                        }
                        let o = shfl_xor(&mx, 1);
                        mx = std::array::from_fn(|i| mx[i].max(o[i]));
                        let o = shfl_xor(&mx, 2);
                        mx = std::array::from_fn(|i| mx[i].max(o[i]));
                        for lane in 0..LANES {
                            let mn = m[lane][hr].max(mx[lane]);
                            if mn != ninf {
                                let corr = (m[lane][hr] - mn).exp();
                                let mut ls = l[lane][hr] * corr;
                                let mut a_s = acc[lane][hr] * corr;
                                for j in 0..nt {
                                    for e in 0..2 {
                                        let ex = (s[j][lane][2 * hr + e] - mn).exp();
                                        ls += ex;
                                        a_s += ex * dp[j][lane][2 * hr + e];
                                    }
                                }
                                l[lane][hr] = ls;
                                acc[lane][hr] = a_s;
                                m[lane][hr] = mn;
                            }
                        }
                    }
                }
                let mut lse_r = [[0f32; 2]; LANES];
                let mut dd_r = [[0f32; 2]; LANES];
                for hr in 0..2 {
                    let mut ls: Lanes<f32> = std::array::from_fn(|i| l[i][hr]);
                    let mut a_s: Lanes<f32> = std::array::from_fn(|i| acc[i][hr]);
                    for o in [1, 2] {
                        let (x, y) = (shfl_xor(&ls, o), shfl_xor(&a_s, o));
                        ls = std::array::from_fn(|i| ls[i] + x[i]);
                        a_s = std::array::from_fn(|i| a_s[i] + y[i]);
                    }
                    for lane in 0..LANES {
                        // The 4 lanes of a quad agree (the kernel relies on it).
                        assert_eq!(ls[lane].to_bits(), ls[lane & !3].to_bits());
                        assert_eq!(m[lane][hr].to_bits(), m[lane & !3][hr].to_bits());
                        let r = r0 + gid(lane) + 8 * hr;
                        if given.is_some() {
                            // stats_given: the row's statistics from global memory.
                            let idx = (seq0 + q0 + r) * nh + h;
                            lse_r[lane][hr] = if r < nq { lse_g[idx] } else { 0.0 };
                            dd_r[lane][hr] = if r < nq { dd_g[idx] } else { 0.0 };
                            continue;
                        }
                        let ok = r < nq && ls[lane] > 0.0;
                        lse_r[lane][hr] = if ok { m[lane][hr] + ls[lane].ln() } else { 0.0 };
                        dd_r[lane][hr] = if ok { a_s[lane] / ls[lane] } else { 0.0 };
                        if tig(lane) == 0 && r < nq {
                            let idx = (seq0 + q0 + r) * nh + h;
                            lse_g[idx] = lse_r[lane][hr];
                            dd_g[idx] = dd_r[lane][hr];
                        }
                    }
                }
                // Pass 2.
                let mut dqa = vec![[[0f32; 4]; LANES]; dt];
                for k0 in (0..key_end).step_by(bk_in) {
                    let nk = bk_in.min(key_end - k0);
                    let mut k_s = Smem::new(bk_in, hd);
                    let mut v_s = Smem::new(bk_in, hd);
                    k_s.load(bk_in, hd, k, kw, kvh * hd, seq0 + k0, nk);
                    v_s.load(bk_in, hd, v, kw, kvh * hd, seq0 + k0, nk);
                    let mut s = scores(&q_s, &k_s, r0, hd, nt);
                    let dp = scores(&do_s, &v_s, r0, hd, nt);
                    for (j, sj) in s.iter_mut().enumerate() {
                        for lane in 0..LANES {
                            for i in 0..4 {
                                let hr = i / 2;
                                let r = r0 + gid(lane) + 8 * hr;
                                let c = 8 * j + 2 * tig(lane) + i % 2;
                                let mut ds = 0.0;
                                if r < nq && c < nk && k0 + c <= q0 + r {
                                    let p = (sj[lane][i] * scale - lse_r[lane][hr]).exp();
                                    ds = p * (dp[j][lane][i] - dd_r[lane][hr]);
                                }
                                sj[lane][i] = ds;
                            }
                        }
                    }
                    accumulate(&mut dqa, &c_to_a(&s), &k_s);
                }
                for lane in 0..LANES {
                    for hr in 0..2 {
                        let r = r0 + gid(lane) + 8 * hr;
                        if r >= nq {
                            continue;
                        }
                        let rowword = ((seq0 + q0 + r) * qw + h * hd) / 2;
                        for (n, c) in dqa.iter().enumerate() {
                            let wd = pack(c[lane][2 * hr] * scale, c[lane][2 * hr + 1] * scale);
                            let at = 2 * (rowword + 4 * n + tig(lane));
                            assert!(dq[at].is_nan() && dq[at + 1].is_nan(), "dq written twice");
                            dq[at] = unbf(wd as u16);
                            dq[at + 1] = unbf((wd >> 16) as u16);
                        }
                    }
                }
            }
        }
    }

    // ---- dk/dv kernel: grid (key tile, kv head), and with GQA (`split_dkv_heads`) the query
    // head of the group (z), writing f32 per-head shares that the reduce kernel sums. ----
    let kt = tile_list(seqs, 64, false).unwrap();
    let nt = bq_in / 8;
    let split = super::split_dkv_heads(true, group);
    let mut dk_part = vec![f32::NAN; rows * qw];
    let mut dv_part = vec![f32::NAN; rows * qw];
    for tile in kt.chunks(3) {
        let (seq0, len, k0) = (tile[0] as usize, tile[1] as usize, tile[2] as usize);
        let nk = 64.min(len - k0);
        for (kvh, z) in
            (0..nkv).flat_map(|h| (0..if split { group } else { 1 }).map(move |z| (h, z)))
        {
            let mut k_s = Smem::new(64, hd);
            let mut v_s = Smem::new(64, hd);
            k_s.load(64, hd, k, kw, kvh * hd, seq0 + k0, nk);
            v_s.load(64, hd, v, kw, kvh * hd, seq0 + k0, nk);
            let heads = if split { z..z + 1 } else { 0..group };
            for warp in 0..4 {
                let r0 = 16 * warp;
                let mut dka = vec![[[0f32; 4]; LANES]; dt];
                let mut dva = vec![[[0f32; 4]; LANES]; dt];
                let first_q = (k0 / bq_in) * bq_in;
                for g in heads.clone() {
                    let h = kvh * group + g;
                    for q0 in (first_q..len).step_by(bq_in) {
                        let nq = bq_in.min(len - q0);
                        let mut q_s = Smem::new(bq_in, hd);
                        let mut do_s = Smem::new(bq_in, hd);
                        q_s.load(bq_in, hd, q, qw, h * hd, seq0 + q0, nq);
                        do_s.load(bq_in, hd, dout, qw, h * hd, seq0 + q0, nq);
                        let (mut lse_s, mut dd_s) = (vec![0f32; bq_in], vec![0f32; bq_in]);
                        for r in 0..nq {
                            let idx = (seq0 + q0 + r) * nh + h;
                            assert!(lse_g[idx].is_finite() && dd_g[idx].is_finite());
                            lse_s[r] = lse_g[idx];
                            dd_s[r] = dd_g[idx];
                        }
                        if r0 >= nk || k0 + r0 > q0 + nq - 1 {
                            continue;
                        }
                        let mut st = scores(&k_s, &q_s, r0, hd, nt);
                        let mut dpt = scores(&v_s, &do_s, r0, hd, nt);
                        for j in 0..nt {
                            for lane in 0..LANES {
                                for i in 0..4 {
                                    let kr = r0 + gid(lane) + 8 * (i / 2);
                                    let c = 8 * j + 2 * tig(lane) + i % 2;
                                    let mut p = 0.0;
                                    if kr < nk && c < nq && k0 + kr <= q0 + c {
                                        p = (st[j][lane][i] * scale - lse_s[c]).exp();
                                    }
                                    st[j][lane][i] = p;
                                    dpt[j][lane][i] = p * (dpt[j][lane][i] - dd_s[c]);
                                }
                            }
                        }
                        accumulate(&mut dva, &c_to_a(&st), &do_s);
                        accumulate(&mut dka, &c_to_a(&dpt), &q_s);
                    }
                }
                if split {
                    // The head's share, f32 and unscaled, at [row, head, column].
                    let h = kvh * group + z;
                    for lane in 0..LANES {
                        for hr in 0..2 {
                            let kr = r0 + gid(lane) + 8 * hr;
                            if kr >= nk {
                                continue;
                            }
                            let at0 = ((seq0 + k0 + kr) * nh + h) * hd + 2 * tig(lane);
                            for n in 0..dt {
                                let at = at0 + 8 * n;
                                let (a, b) = (&dka[n][lane], &dva[n][lane]);
                                assert!(
                                    dk_part[at].is_nan() && dv_part[at].is_nan(),
                                    "a dk/dv share written twice"
                                );
                                dk_part[at..at + 2].copy_from_slice(&a[2 * hr..2 * hr + 2]);
                                dv_part[at..at + 2].copy_from_slice(&b[2 * hr..2 * hr + 2]);
                            }
                        }
                    }
                    continue;
                }
                for lane in 0..LANES {
                    for hr in 0..2 {
                        let kr = r0 + gid(lane) + 8 * hr;
                        if kr >= nk {
                            continue;
                        }
                        let rowword = ((seq0 + k0 + kr) * kw + kvh * hd) / 2;
                        for n in 0..dt {
                            let at = 2 * (rowword + 4 * n + tig(lane));
                            let (a, b) = (&dka[n][lane], &dva[n][lane]);
                            let wk = pack(a[2 * hr] * scale, a[2 * hr + 1] * scale);
                            let wv = pack(b[2 * hr], b[2 * hr + 1]);
                            assert!(dk[at].is_nan() && dv[at].is_nan(), "dk/dv written twice");
                            dk[at] = unbf(wk as u16);
                            dk[at + 1] = unbf((wk >> 16) as u16);
                            dv[at] = unbf(wv as u16);
                            dv[at + 1] = unbf((wv >> 16) as u16);
                        }
                    }
                }
            }
        }
    }
    if split {
        // ---- The reduce kernel: the group's shares summed in order, at sequence rows (the
        // kernel reads zeros elsewhere, where the shares are zero-filled). ----
        for s in seqs {
            for r in s.start..s.start + s.len {
                for c in 0..kw {
                    let (kvh, d) = (c / hd, c % hd);
                    let (mut sk, mut sv) = (0f32, 0f32);
                    for g in 0..group {
                        let p = (r * nh + kvh * group + g) * hd + d;
                        assert!(
                            dk_part[p].is_finite() && dv_part[p].is_finite(),
                            "a share unwritten"
                        );
                        sk += dk_part[p];
                        sv += dv_part[p];
                    }
                    dk[r * kw + c] = unbf(bf(sk * scale));
                    dv[r * kw + c] = unbf(bf(sv));
                }
            }
        }
    }
    [dq, dk, dv]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::backend::cpu::CpuBackend;
    use crate::model::HostTensor;

    fn span(start: usize, len: usize) -> SeqSpan {
        SeqSpan { start, len }
    }

    #[test]
    fn mma_layout_is_a_bijection_and_multiplies() {
        // A = row index + column / 16, B = k - n: check one product against a plain matmul.
        let av = |r: usize, k: usize| (r as f32) + (k as f32) / 16.0;
        let bv = |k: usize, n: usize| (k as f32) - (n as f32);
        let a: AFrag = std::array::from_fn(|lane| {
            std::array::from_fn(|reg| {
                let (r0, k0) = a_elem(lane, reg, 0);
                let (r1, k1) = a_elem(lane, reg, 1);
                pack(av(r0, k0), av(r1, k1))
            })
        });
        let b: BFrag = std::array::from_fn(|lane| {
            std::array::from_fn(|reg| {
                let (k0, n0) = b_elem(lane, reg, 0);
                let (k1, n1) = b_elem(lane, reg, 1);
                pack(bv(k0, n0), bv(k1, n1))
            })
        });
        let mut c = [[0f32; 4]; LANES];
        mma(&mut c, &a, &b);
        for (lane, cl) in c.iter().enumerate() {
            for (reg, &got) in cl.iter().enumerate() {
                let (r, n) = c_elem(lane, reg);
                let want: f32 = (0..16).map(|k| unbf(bf(av(r, k))) * bv(k, n)).sum();
                assert_eq!(got, want, "lane {lane} reg {reg}");
            }
        }
    }

    fn scale_of(hd: usize) -> f64 {
        1.0 / (hd as f64).sqrt()
    }

    #[test]
    fn emulated_tc_kernels_match_the_cpu_backward() {
        let mut state = 1234u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let cpu = CpuBackend::new();
        for (nh, nkv, hd, spans, rows) in [
            // Gaps, a 1-row and a 17-row sequence, tiles not 64-aligned, GQA 2.
            (
                2,
                1,
                64,
                vec![
                    span(1, 1),
                    span(3, 17),
                    span(20, 70),
                    span(95, 150),
                    span(250, 0),
                ],
                250,
            ),
            (
                3,
                3,
                128,
                vec![span(2, 40), span(45, 100), span(150, 0)],
                150,
            ),
            (7, 1, 64, vec![span(0, 129)], 129),
            (4, 2, 128, vec![span(0, 1), span(1, 66)], 70),
        ] {
            let shape = AttentionShape {
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
            };
            let mut t = |w: usize, sc: f32| {
                (0..rows * w)
                    .map(|_| unbf(bf(next() * sc)))
                    .collect::<Vec<f32>>()
            };
            let (q, k, v, d) = (
                t(nh * hd, 3.0),
                t(nkv * hd, 1.0),
                t(nkv * hd, 1.0),
                t(nh * hd, 1.0),
            );
            let h = |x: &[f32], w: usize| HostTensor::new(vec![rows, w], x.to_vec());
            let want = cpu
                .causal_attention_backward(
                    &h(&q, nh * hd),
                    &h(&k, nkv * hd),
                    &h(&v, nkv * hd),
                    &h(&d, nh * hd),
                    &spans,
                    shape,
                )
                .unwrap();
            let got = emulate_tc(&q, &k, &v, &d, rows, &spans, shape, None);
            // The stats_given mode, with the forward's statistics: the log-sum-exp of each
            // row's scaled scores (f64 here) and delta = dout . out with the forward's output
            // rounded to bf16, as the GPU's training forward hands them over.
            let out = cpu
                .causal_attention(
                    &h(&q, nh * hd),
                    &h(&k, nkv * hd),
                    &h(&v, nkv * hd),
                    &spans,
                    shape,
                )
                .unwrap();
            let (mut lse, mut delta) = (vec![0f32; rows * nh], vec![0f32; rows * nh]);
            for s in &spans {
                for i in 0..s.len {
                    let r = s.start + i;
                    for hh in 0..nh {
                        let kvh = hh / (nh / nkv);
                        let qrow = &q[r * nh * hd + hh * hd..][..hd];
                        let sc: Vec<f64> = (0..=i)
                            .map(|j| {
                                let krow = &k[(s.start + j) * nkv * hd + kvh * hd..][..hd];
                                qrow.iter()
                                    .zip(krow)
                                    .map(|(a, b)| (a * b) as f64)
                                    .sum::<f64>()
                                    * scale_of(hd)
                            })
                            .collect();
                        let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        lse[r * nh + hh] =
                            (mx + sc.iter().map(|x| (x - mx).exp()).sum::<f64>().ln()) as f32;
                        delta[r * nh + hh] = (0..hd)
                            .map(|dd| {
                                let at = r * nh * hd + hh * hd + dd;
                                d[at] * unbf(bf(out.data[at]))
                            })
                            .sum();
                    }
                }
            }
            let got_given = emulate_tc(&q, &k, &v, &d, rows, &spans, shape, Some((&lse, &delta)));
            let mut in_seq = vec![false; rows];
            for s in &spans {
                in_seq[s.start..s.start + s.len].fill(true);
            }
            for (name, g, w) in [
                ("dq", &got[0], &want.0),
                ("dk", &got[1], &want.1),
                ("dv", &got[2], &want.2),
                ("dq (forward's statistics)", &got_given[0], &want.0),
                ("dk (forward's statistics)", &got_given[1], &want.1),
                ("dv (forward's statistics)", &got_given[2], &want.2),
            ] {
                let width = g.len() / rows;
                let (mut num, mut den) = (0f64, 0f64);
                for (i, (&a, &b)) in g.iter().zip(&w.data).enumerate() {
                    if !in_seq[i / width] {
                        assert!(
                            a.is_nan(),
                            "{name}: row {} of no sequence written",
                            i / width
                        );
                        assert_eq!(b, 0.0);
                        continue;
                    }
                    assert!(a.is_finite(), "{name}: element {i} unwritten or not finite");
                    num += ((a - b) as f64).powi(2);
                    den += (b as f64).powi(2);
                }
                let e = (num / den).sqrt();
                eprintln!("tc emulation {name} H={nh} KVH={nkv} hd={hd}: relative error {e:.2e}");
                assert!(
                    e < 1e-2,
                    "{name} H={nh} KVH={nkv} hd={hd}: relative error {e:.2e}"
                );
            }
        }
    }
}
