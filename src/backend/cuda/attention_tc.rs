//! Forward causal attention on tensor cores (`kernels/attention_tc.cu`, FlashAttention-2
//! style): what [`CudaBackend`]'s `causal_attention` runs for head_dim 64 and 128 when
//! [`super::CudaOptions::attention_forward_tensor_cores`] is on (the default), with the
//! paged-attention kernel as the fallback. [`CudaBackend::causal_attention_with_lse`] also
//! returns the per-row log-sum-exp of the scaled scores.
//!
//! One thread block of 4 warps per (query tile of [`TILE_ROWS`] positions, query head); each
//! warp owns 16 query rows and runs `mma.sync.m16n8k16` (bf16 in, f32 accumulate) for
//! `S = Q K^T` and `O += P V` over the key tiles at or before its query tile. The host-side
//! parts (tile lists) and the kernel's fragment index maths (an emulation that models each
//! lane's registers per the PTX ISA) are tested on the CPU; the kernel on a GPU in
//! `tests/cuda_attention_tc.rs`.

use super::args;
use super::backend::CudaBackend;
use super::tensor::{CudaTensor, DType, DeviceData};
use crate::backend::{AttentionShape, SeqSpan};
use anyhow::{Result, anyhow, ensure};
use cudarc::driver::LaunchConfig;

// SAFETY: `#[repr(C)]` plain data generated from kernels/args.h (u64 device addresses, i32s
// and an f32), layout checked by the compilers and the layout tests; the kernels take it by
// value, which is what `DeviceRepr` passes.
unsafe impl cudarc::driver::DeviceRepr for args::AttentionTcArgs {}

/// Query (and key) positions per tile (`GE_AT_BQ`, `GE_AT_BK`).
pub const TILE_ROWS: usize = 64;
/// Threads per block (`GE_AT_THREADS`): 4 warps of 16 query rows.
pub const THREADS: u32 = 128;
/// Environment variable: `0` turns the tensor-core forward off (the paged-attention kernel
/// runs `causal_attention` instead).
pub const ATTN_FWD_TC_ENV: &str = "GENIUS_CUDA_ATTN_FWD_TC";

/// The kernel for `head_dim`, or `None` (the fallback path runs).
pub fn kernel_for(head_dim: usize) -> Option<&'static str> {
    match head_dim {
        64 => Some("ge_attention_tc_fwd_d64"),
        128 => Some("ge_attention_tc_fwd_d128"),
        _ => None,
    }
}

/// The query tiles of every non-empty sequence, three u32s each (sequence start row, length,
/// tile start), heaviest first (a tile at position `p` sees about `p + TILE_ROWS` keys).
pub fn query_tiles(seqs: &[SeqSpan]) -> Result<Vec<u32>> {
    let u = |v: usize| {
        u32::try_from(v).map_err(|_| anyhow!("causal_attention: {v} does not fit a u32"))
    };
    let mut tiles: Vec<(usize, [u32; 3])> = Vec::new();
    for s in seqs.iter().filter(|s| s.len > 0) {
        for p in (0..s.len).step_by(TILE_ROWS) {
            tiles.push(((p + TILE_ROWS).min(s.len), [u(s.start)?, u(s.len)?, u(p)?]));
        }
    }
    // Stable: equal work keeps the sequence order.
    tiles.sort_by_key(|&(w, _)| std::cmp::Reverse(w));
    Ok(tiles.into_iter().flat_map(|(_, t)| t).collect())
}

/// `Some(covers every row)` when the non-empty spans are disjoint, `None` when two overlap
/// (the fallback path runs then: which sequence's output a shared row gets is its business).
pub fn disjoint_cover(seqs: &[SeqSpan], rows: usize) -> Option<bool> {
    let mut spans: Vec<&SeqSpan> = seqs.iter().filter(|s| s.len > 0).collect();
    spans.sort_by_key(|s| s.start);
    let (mut end, mut covered) = (0, 0);
    for s in spans {
        if s.start < end {
            return None;
        }
        end = s.start + s.len;
        covered += s.len;
    }
    Some(covered == rows)
}

impl CudaBackend {
    /// Whether `causal_attention` can run on the tensor-core kernel for these inputs.
    pub(super) fn attn_fwd_tc_applies(
        &self,
        seqs: &[SeqSpan],
        rows: usize,
        shape: AttentionShape,
    ) -> bool {
        self.attention_forward_tensor_cores()
            && kernel_for(shape.head_dim).is_some()
            && disjoint_cover(seqs, rows).is_some()
    }

    /// Causal attention (as [`crate::backend::Backend::causal_attention`]) on the tensor-core
    /// kernel, also returning the natural log-sum-exp of each row's scaled scores, f32
    /// `[rows, num_heads]` (zero at rows of no sequence). head_dim 64 or 128 and disjoint
    /// sequences only; whatever [`CudaOptions`](super::CudaOptions) say.
    pub fn causal_attention_with_lse(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        seqs: &[SeqSpan],
        shape: AttentionShape,
    ) -> Result<(CudaTensor, CudaTensor)> {
        let (out, lse) = self.attn_causal_tc(q, k, v, seqs, shape, true)?;
        Ok((out, lse.expect("asked for")))
    }

    /// The tensor-core forward; `q`, `k`, `v` shapes and the spans' bounds are checked here.
    pub(super) fn attn_causal_tc(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        seqs: &[SeqSpan],
        shape: AttentionShape,
        want_lse: bool,
    ) -> Result<(CudaTensor, Option<CudaTensor>)> {
        const OP: &str = "causal_attention";
        let AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
        } = shape;
        let (n, qw) = q.matrix();
        ensure!(
            qw == num_heads * head_dim,
            "{OP}: q width {qw}, want {num_heads} heads x {head_dim}"
        );
        ensure!(
            k.matrix() == (n, num_kv_heads * head_dim) && v.matrix() == k.matrix(),
            "{OP}: k/v shapes {:?} {:?}",
            k.shape,
            v.shape
        );
        ensure!(
            num_kv_heads > 0 && num_heads.is_multiple_of(num_kv_heads),
            "{OP}: {num_heads} heads are not a multiple of {num_kv_heads} kv heads"
        );
        let kernel = kernel_for(head_dim).ok_or_else(|| {
            anyhow!("{OP}: head_dim {head_dim} has no tensor-core kernel (have 64 and 128)")
        })?;
        for s in seqs {
            ensure!(
                s.start + s.len <= n,
                "{OP}: sequence {}..{} past the batch ({n} rows)",
                s.start,
                s.start + s.len
            );
        }
        let covers_all = disjoint_cover(seqs, n).ok_or_else(|| {
            anyhow!("{OP}: overlapping sequences (the tensor-core kernel needs disjoint spans)")
        })?;
        ensure!(
            num_heads <= 65535,
            "{OP}: {num_heads} heads is over the grid limit"
        );
        let mut out = if covers_all {
            self.output(DType::Bf16, vec![n, qw])?
        } else {
            let s = self.gpu.alloc_zeros::<half::bf16>(n * qw)?;
            CudaTensor::new(DeviceData::Bf16(s), vec![n, qw])?
        };
        let mut lse = if !want_lse {
            None
        } else if covers_all {
            Some(self.output(DType::F32, vec![n, num_heads])?)
        } else {
            let s = self.gpu.alloc_zeros::<f32>(n * num_heads)?;
            Some(CudaTensor::new(DeviceData::F32(s), vec![n, num_heads])?)
        };
        let tiles = query_tiles(seqs)?;
        let num_tiles = tiles.len() / 3;
        if num_tiles == 0 {
            return Ok((out, lse));
        }
        ensure!(
            num_tiles <= i32::MAX as usize,
            "{OP}: {num_tiles} tiles is over the grid limit"
        );
        let tile_buf = self.gpu.upload_memo("attention tc tiles", &tiles)?;
        let lse_ptr = match lse.as_mut().map(|t| &mut t.data) {
            Some(DeviceData::F32(s)) => self.gpu.ptr_mut(s),
            Some(DeviceData::Bf16(_)) => unreachable!("allocated as f32 above"),
            None => 0,
        };
        let a = args::AttentionTcArgs {
            q: self.gpu.ptr(q.bf16(OP)?),
            k: self.gpu.ptr(k.bf16(OP)?),
            v: self.gpu.ptr(v.bf16(OP)?),
            out: self.gpu.ptr_mut(out.bf16_mut(OP)?),
            lse: lse_ptr,
            tiles: tile_buf,
            num_tiles: num_tiles as i32,
            num_heads: num_heads as i32,
            num_kv_heads: num_kv_heads as i32,
            head_dim: head_dim as i32,
            tile_rows: TILE_ROWS as i32,
            scale: 1.0 / (head_dim as f32).sqrt(),
        };
        let cfg = LaunchConfig {
            grid_dim: (num_tiles as u32, num_heads as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: q is [n, num_heads * head_dim] bf16, k/v [n, num_kv_heads * head_dim] bf16,
        // out the same shape as q, lse (when non-zero) [n, num_heads] f32; every tile lies in
        // a span checked to be inside the batch, and the kernel reads K/V rows only below its
        // sequence's length; `tiles` holds 3 * num_tiles u32s until a later upload under its
        // key; the buffers outlive the queued launch (frees are stream-ordered).
        unsafe { self.gpu.launch(kernel, cfg, &a) }?;
        Ok((out, lse))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn span(start: usize, len: usize) -> SeqSpan {
        SeqSpan { start, len }
    }

    #[test]
    fn tiles_cover_every_query_position_once_heaviest_first() {
        let seqs = [span(0, 1), span(3, 130), span(200, 64), span(300, 0)];
        let t = query_tiles(&seqs).unwrap();
        let tiles: Vec<[u32; 3]> = t.chunks(3).map(|c| [c[0], c[1], c[2]]).collect();
        assert_eq!(
            tiles,
            vec![
                [3, 130, 128],
                [3, 130, 64],
                [3, 130, 0],
                [200, 64, 0],
                [0, 1, 0]
            ]
        );
        assert_eq!(disjoint_cover(&seqs, 264), Some(false));
        assert_eq!(disjoint_cover(&[span(0, 2), span(2, 3)], 5), Some(true));
        assert_eq!(disjoint_cover(&[span(0, 3), span(2, 3)], 5), None);
        assert_eq!(kernel_for(96), None);
    }

    // ---- A lane-level emulation of kernels/attention_tc.cu ----
    //
    // The mma below assembles its operands from the 32 lanes' registers with the fragment
    // layouts of the PTX ISA (m16n8k16, .bf16, row.col), written from the ISA's tables, not
    // from the kernel; the kernel's loops are transcribed lane by lane with the kernel's own
    // index expressions. A wrong index in the kernel gives a wrong result here.

    /// groupID and threadID_in_group of a lane.
    fn gt(lane: usize) -> (usize, usize) {
        (lane / 4, lane % 4)
    }

    #[allow(clippy::needless_range_loop)]
    /// `D = A B + C` for one warp: `a[lane]` four .b32 registers (bf16x2), `b[lane]` two,
    /// `c[lane]` four f32.
    fn mma_m16n8k16(c: &mut [[f32; 4]; 32], a: &[[u32; 4]; 32], b: &[[u32; 2]; 32]) {
        let half = |r: u32, i: usize| bf16::from_bits((r >> (16 * (i & 1))) as u16).to_f32();
        let mut am = [[f32::NAN; 16]; 16];
        let mut bm = [[f32::NAN; 8]; 16];
        let mut cm = [[f32::NAN; 8]; 16];
        for lane in 0..32 {
            let (g, t) = gt(lane);
            // A: a_i, i in 0..8, two per register; row g for a0,a1,a4,a5, g + 8 for
            // a2,a3,a6,a7; column 2t + (i & 1), plus 8 for i >= 4.
            for i in 0..8 {
                let row = if i < 2 || (4..6).contains(&i) {
                    g
                } else {
                    g + 8
                };
                let col = t * 2 + (i & 1) + if i >= 4 { 8 } else { 0 };
                am[row][col] = half(a[lane][i / 2], i);
            }
            // B: b_i, i in 0..4; row (k) 2t + (i & 1), plus 8 for i >= 2; column (n) g.
            for i in 0..4 {
                let row = t * 2 + (i & 1) + if i >= 2 { 8 } else { 0 };
                bm[row][g] = half(b[lane][i / 2], i);
            }
            // C: c_i; row g for c0,c1, g + 8 for c2,c3; column 2t + (i & 1).
            for i in 0..4 {
                let row = if i < 2 { g } else { g + 8 };
                cm[row][t * 2 + (i & 1)] = c[lane][i];
            }
        }
        for lane in 0..32 {
            let (g, t) = gt(lane);
            for i in 0..4 {
                let row = if i < 2 { g } else { g + 8 };
                let col = t * 2 + (i & 1);
                let mut acc = cm[row][col];
                for kk in 0..16 {
                    acc += am[row][kk] * bm[kk][col];
                }
                c[lane][i] = acc;
            }
        }
    }

    fn to_bf16_bits(x: f32) -> u16 {
        bf16::from_f32(x).to_bits()
    }

    fn pack(lo: f32, hi: f32) -> u32 {
        to_bf16_bits(lo) as u32 | ((to_bf16_bits(hi) as u32) << 16)
    }

    /// `__shfl_xor_sync` of one value per lane.
    fn shfl_xor(v: &[f32; 32], m: usize) -> [f32; 32] {
        std::array::from_fn(|l| v[l ^ m])
    }

    /// Global memory as the kernel sees it: bf16 bits, row-major.
    struct Mem {
        q: Vec<u16>,
        k: Vec<u16>,
        v: Vec<u16>,
        out: Vec<u16>,
        lse: Vec<f32>,
    }

    /// One block of `ge_attention_tc_fwd<HD>`, transcribed (4 warps x 32 lanes).
    #[allow(clippy::needless_range_loop)]
    fn emulate_block(
        hd: usize,
        m: &mut Mem,
        tile: [u32; 3],
        h: usize,
        nh: usize,
        nkv: usize,
        scale: f32,
    ) {
        let lds = hd + 8;
        let ksteps = hd / 16;
        let ont = hd / 8;
        let snt = 64 / 8;
        let seq_start = tile[0] as usize;
        let seq_len = tile[1] as i64;
        let q0 = tile[2] as i64;
        let kvh = h / (nh / nkv);
        let qld = nh * hd;
        let kld = nkv * hd;
        let sl2 = scale * std::f32::consts::LOG2_E;
        let mut ks = vec![0u16; 64 * lds];
        let mut vs = vec![0u16; 64 * lds];
        let word = |mem: &[u16], base: usize, w: usize| -> u32 {
            mem[base + 2 * w] as u32 | ((mem[base + 2 * w + 1] as u32) << 16)
        };
        for warp in 0..4 {
            let mut qf = vec![[[0u32; 4]; 32]; ksteps];
            let mut o = vec![[[0f32; 4]; 32]; ont];
            let mut m0 = [f32::NEG_INFINITY; 32];
            let mut m1 = [f32::NEG_INFINITY; 32];
            let mut l0 = [0f32; 32];
            let mut l1 = [0f32; 32];
            let rows = |lane: usize| {
                let (g, _) = gt(lane);
                let r0 = q0 + warp as i64 * 16 + g as i64;
                (r0, r0 + 8)
            };
            for lane in 0..32 {
                let (_, t) = gt(lane);
                let (r0, r1) = rows(lane);
                let base = |r: i64| (seq_start + r as usize) * qld + h * hd;
                for kk in 0..ksteps {
                    let w = kk * 8 + t;
                    let ld = |r: i64, w: usize| {
                        if r < seq_len {
                            word(&m.q, base(r), w)
                        } else {
                            0
                        }
                    };
                    qf[kk][lane] = [ld(r0, w), ld(r1, w), ld(r0, w + 4), ld(r1, w + 4)];
                }
            }
            let last_kt = q0 / 64;
            for kt in 0..=last_kt {
                let k0 = kt * 64;
                let nvalid = 64.min(seq_len - k0);
                // ge_at_load_tile, K and V.
                for (dst, src) in [(&mut ks, &m.k), (&mut vs, &m.v)] {
                    let vecs = hd / 8;
                    for i in 0..64 * vecs {
                        let (r, c) = (i / vecs, i % vecs);
                        for e in 0..8 {
                            dst[r * lds + c * 8 + e] = if (r as i64) < nvalid {
                                src[(seq_start + k0 as usize + r) * kld + kvh * hd + c * 8 + e]
                            } else {
                                0
                            };
                        }
                    }
                }
                // S = Q K^T.
                let mut s = vec![[[0f32; 4]; 32]; snt];
                for j in 0..snt {
                    for kk in 0..ksteps {
                        let b: [[u32; 2]; 32] = std::array::from_fn(|lane| {
                            let (g, t) = gt(lane);
                            let krow = (j * 8 + g) * (lds / 2);
                            [
                                word(&ks, 0, krow + kk * 8 + t),
                                word(&ks, 0, krow + kk * 8 + t + 4),
                            ]
                        });
                        let mut c = s[j];
                        mma_m16n8k16(&mut c, &qf[kk], &b);
                        s[j] = c;
                    }
                }
                let diag = kt == last_kt;
                for j in 0..snt {
                    for lane in 0..32 {
                        let (_, t) = gt(lane);
                        let (r0, r1) = rows(lane);
                        for e in 0..4 {
                            let mut x = s[j][lane][e] * sl2;
                            if diag {
                                let kpos = k0 + (j * 8 + 2 * t + (e & 1)) as i64;
                                let qpos = if e < 2 { r0 } else { r1 };
                                if kpos > qpos || kpos >= seq_len {
                                    x = f32::NEG_INFINITY;
                                }
                            }
                            s[j][lane][e] = x;
                        }
                    }
                }
                let mut mx0 = m0;
                let mut mx1 = m1;
                for lane in 0..32 {
                    for j in 0..snt {
                        mx0[lane] = mx0[lane].max(s[j][lane][0].max(s[j][lane][1]));
                        mx1[lane] = mx1[lane].max(s[j][lane][2].max(s[j][lane][3]));
                    }
                }
                for sh in [1, 2] {
                    let (a0, a1) = (shfl_xor(&mx0, sh), shfl_xor(&mx1, sh));
                    for lane in 0..32 {
                        mx0[lane] = mx0[lane].max(a0[lane]);
                        mx1[lane] = mx1[lane].max(a1[lane]);
                    }
                }
                for lane in 0..32 {
                    let b0 = if mx0[lane] == f32::NEG_INFINITY {
                        0.0
                    } else {
                        mx0[lane]
                    };
                    let b1 = if mx1[lane] == f32::NEG_INFINITY {
                        0.0
                    } else {
                        mx1[lane]
                    };
                    let c0 = (m0[lane] - b0).exp2();
                    let c1 = (m1[lane] - b1).exp2();
                    m0[lane] = mx0[lane];
                    m1[lane] = mx1[lane];
                    l0[lane] *= c0;
                    l1[lane] *= c1;
                    for j in 0..ont {
                        o[j][lane][0] *= c0;
                        o[j][lane][1] *= c0;
                        o[j][lane][2] *= c1;
                        o[j][lane][3] *= c1;
                    }
                    for j in 0..snt {
                        let x = &mut s[j][lane];
                        x[0] = (x[0] - b0).exp2();
                        x[1] = (x[1] - b0).exp2();
                        x[2] = (x[2] - b1).exp2();
                        x[3] = (x[3] - b1).exp2();
                        l0[lane] += x[0] + x[1];
                        l1[lane] += x[2] + x[3];
                    }
                }
                // O += P V.
                for kk in 0..4 {
                    let pf: [[u32; 4]; 32] = std::array::from_fn(|lane| {
                        let (x, y) = (s[2 * kk][lane], s[2 * kk + 1][lane]);
                        [
                            pack(x[0], x[1]),
                            pack(x[2], x[3]),
                            pack(y[0], y[1]),
                            pack(y[2], y[3]),
                        ]
                    });
                    for j in 0..ont {
                        let b: [[u32; 2]; 32] = std::array::from_fn(|lane| {
                            let (g, t) = gt(lane);
                            let v0 = (kk * 16 + 2 * t) * lds;
                            let v1 = v0 + 8 * lds;
                            let col = j * 8 + g;
                            [
                                vs[v0 + col] as u32 | ((vs[v0 + lds + col] as u32) << 16),
                                vs[v1 + col] as u32 | ((vs[v1 + lds + col] as u32) << 16),
                            ]
                        });
                        let mut c = o[j];
                        mma_m16n8k16(&mut c, &pf, &b);
                        o[j] = c;
                    }
                }
            }
            for sh in [1, 2] {
                let (a0, a1) = (shfl_xor(&l0, sh), shfl_xor(&l1, sh));
                for lane in 0..32 {
                    l0[lane] += a0[lane];
                    l1[lane] += a1[lane];
                }
            }
            for lane in 0..32 {
                let (_, t) = gt(lane);
                let (r0, r1) = rows(lane);
                let inv0 = if l0[lane] > 0.0 { 1.0 / l0[lane] } else { 0.0 };
                let inv1 = if l1[lane] > 0.0 { 1.0 / l1[lane] } else { 0.0 };
                let mut store = |r: i64, w: usize, val: u32| {
                    let at = (seq_start + r as usize) * qld + h * hd + 2 * w;
                    m.out[at] = val as u16;
                    m.out[at + 1] = (val >> 16) as u16;
                };
                for j in 0..ont {
                    if r0 < seq_len {
                        store(
                            r0,
                            j * 4 + t,
                            pack(o[j][lane][0] * inv0, o[j][lane][1] * inv0),
                        );
                    }
                    if r1 < seq_len {
                        store(
                            r1,
                            j * 4 + t,
                            pack(o[j][lane][2] * inv1, o[j][lane][3] * inv1),
                        );
                    }
                }
                if t == 0 {
                    let ln2 = std::f32::consts::LN_2;
                    if r0 < seq_len {
                        m.lse[(seq_start + r0 as usize) * nh + h] =
                            (m0[lane] + l0[lane].log2()) * ln2;
                    }
                    if r1 < seq_len {
                        m.lse[(seq_start + r1 as usize) * nh + h] =
                            (m1[lane] + l1[lane].log2()) * ln2;
                    }
                }
            }
        }
    }

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
        let (mut n, mut d) = (0f64, 0f64);
        for (&g, &w) in got.iter().zip(want) {
            assert!(g.is_finite(), "non-finite output");
            n += (g as f64 - w as f64).powi(2);
            d += (w as f64).powi(2);
        }
        (n / d.max(1e-30)).sqrt()
    }

    /// Runs the emulated kernel over `lens` (one-row gaps between spans) and compares with
    /// the CPU backend's causal attention and an f64 log-sum-exp.
    fn check(nh: usize, nkv: usize, hd: usize, lens: &[usize], seed: u64) {
        let mut spans = Vec::new();
        let mut at = 1; // a row of no sequence first, and one after each span
        for &len in lens {
            spans.push(span(at, len));
            at += len + 1;
        }
        let n = at;
        let mut next = rng(seed);
        let mut make = |w: usize, sc: f32| -> Vec<f32> {
            (0..n * w)
                .map(|_| bf16::from_f32(next() * sc).to_f32())
                .collect()
        };
        let (q, k, v) = (make(nh * hd, 2.0), make(nkv * hd, 1.0), make(nkv * hd, 1.0));
        let shape = AttentionShape {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        };
        let want = {
            use crate::backend::Backend;
            let cpu = crate::backend::cpu::CpuBackend::new();
            let t = |w: usize, d: &[f32]| crate::model::HostTensor::new(vec![n, w], d.to_vec());
            let (qt, kt, vt) = (t(nh * hd, &q), t(nkv * hd, &k), t(nkv * hd, &v));
            cpu.causal_attention(&qt, &kt, &vt, &spans, shape)
                .unwrap()
                .data
        };
        let bits = |x: &[f32]| x.iter().map(|&f| to_bf16_bits(f)).collect::<Vec<u16>>();
        let mut m = Mem {
            q: bits(&q),
            k: bits(&k),
            v: bits(&v),
            out: vec![0; n * nh * hd],
            lse: vec![0.0; n * nh],
        };
        let tiles = query_tiles(&spans).unwrap();
        let scale = 1.0 / (hd as f32).sqrt();
        for tile in tiles.chunks(3) {
            for h in 0..nh {
                emulate_block(hd, &mut m, [tile[0], tile[1], tile[2]], h, nh, nkv, scale);
            }
        }
        let got: Vec<f32> = m.out.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
        let e = rel_l2(&got, &want);
        assert!(
            e < 1e-2,
            "heads {nh}/{nkv} d {hd} lens {lens:?}: relative L2 {e:.3e}"
        );
        // Gap rows stay zero.
        for r in (0..n).filter(|r| !spans.iter().any(|s| (s.start..s.start + s.len).contains(r))) {
            assert!(
                got[r * nh * hd..(r + 1) * nh * hd]
                    .iter()
                    .all(|&x| x == 0.0)
            );
        }
        // Log-sum-exp against f64.
        for s in &spans {
            for i in 0..s.len {
                let row = s.start + i;
                for h in 0..nh {
                    let kvh = h / (nh / nkv);
                    let sc: Vec<f64> = (0..=i)
                        .map(|j| {
                            let kr = s.start + j;
                            (0..hd)
                                .map(|d| {
                                    q[row * nh * hd + h * hd + d] as f64
                                        * k[kr * nkv * hd + kvh * hd + d] as f64
                                })
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let mx = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let want = mx + sc.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
                    let got = m.lse[row * nh + h] as f64;
                    assert!(
                        (got - want).abs() < 1e-3 * want.abs().max(1.0),
                        "lse row {row} head {h}: {got} vs {want}"
                    );
                }
            }
        }
        eprintln!("emulated tc attention heads {nh}/{nkv} d {hd} lens {lens:?}: rel L2 {e:.2e}");
    }

    #[test]
    fn emulated_kernel_matches_the_cpu_causal_attention() {
        check(2, 2, 64, &[1, 17, 64, 130, 301], 1);
        check(4, 2, 128, &[1, 17, 64, 130, 301], 2);
        check(7, 1, 64, &[65, 3, 128], 3);
        check(7, 1, 128, &[200], 4);
    }
}
