//! The backward of causal attention on the CUDA backend (the kernels of
//! `kernels/attention_backward.cu`): [`CudaBackend`]'s `causal_attention_backward`.
//!
//! FlashAttention-2 style, recomputing the probabilities from q, k, v: a dq kernel, one block
//! per (query tile, query head), first recomputes each row's softmax statistics (log-sum-exp
//! and `D = sum_j P_ij (dO_i . v_j)`), keeps them in f32 scratch for the second kernel and
//! accumulates dQ; a dk/dv kernel, one block per (key tile, kv head), walks every query head
//! of the GQA group and every query tile at or after the key tile and accumulates dK and dV in
//! registers. Both are deterministic (no atomics). Two kernel sets, head_dim 64 and 128 only
//! ([`tiles_for`]): the tensor-core ones of `kernels/attention_backward_tc.cu` (bf16
//! `mma.sync.m16n8k16`, f32 accumulation, 128-thread blocks owning 64-row tiles; the default)
//! and the scalar ones of `kernels/attention_backward.cu` (f32 FMAs on CUDA cores), chosen by
//! [`super::CudaOptions::attention_tensor_cores`] (`$GENIUS_CUDA_ATTN_TC=0`: scalar).
//! `attention_backward_tc_emu.rs` emulates the tensor-core kernels lane by lane on the host.
//!
//! The host side (shape checks, the tile lists) is tested on the CPU; the kernels against the
//! CPU backend in `tests/cuda_train_attention.rs` (skipped without a GPU).

use super::args;
use super::backend::CudaBackend;
use super::tensor::{CudaTensor, DType, DeviceData};
use crate::backend::{AttentionShape, SeqSpan};
use anyhow::{Result, anyhow, bail, ensure};
use cudarc::driver::LaunchConfig;
use half::bf16;

// SAFETY: a `#[repr(C)]` plain-data struct (u64 device addresses, i32s and an f32) generated
// from kernels/args.h, whose layout the compilers and the layout tests check; the kernels take
// it by value, which is what `DeviceRepr` passes. (Here rather than with the others in
// context.rs, next to its only user.)
unsafe impl cudarc::driver::DeviceRepr for args::AttentionBackwardArgs {}
// SAFETY: as above (u64 device addresses, an i64, i32s and an f32).
unsafe impl cudarc::driver::DeviceRepr for args::AttentionDkvReduceArgs {}
// SAFETY: as above (u64 device addresses, an i64 and i32s).
unsafe impl cudarc::driver::DeviceRepr for args::AttentionDeltaArgs {}

/// Threads per block of both scalar kernels (`GE_AB_THREADS`).
pub const THREADS: u32 = 256;
/// Threads per block of both tensor-core kernels (`GE_ABT_THREADS`): 4 warps of 16 rows.
pub const TC_THREADS: u32 = 128;

/// The compiled kernels and tile sizes for one head dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackwardTiles {
    /// Query rows per tile of the dq kernel (its compiled `BQ`).
    pub query_rows: usize,
    /// Key rows per tile of the dk/dv kernel (its compiled `BK`).
    pub key_rows: usize,
    /// Threads per block of both kernels.
    pub threads: u32,
    pub dq_kernel: &'static str,
    pub dkv_kernel: &'static str,
}

/// The kernels for `head_dim`, or an error naming the supported ones: the tensor-core ones
/// (`kernels/attention_backward_tc.cu`) or the scalar ones (`kernels/attention_backward.cu`).
pub fn tiles_for(head_dim: usize, tensor_cores: bool) -> Result<BackwardTiles> {
    match (head_dim, tensor_cores) {
        (64, false) => Ok(BackwardTiles {
            query_rows: 32,
            key_rows: 64,
            threads: THREADS,
            dq_kernel: "ge_attention_backward_dq_d64",
            dkv_kernel: "ge_attention_backward_dkv_d64",
        }),
        (128, false) => Ok(BackwardTiles {
            query_rows: 32,
            key_rows: 32,
            threads: THREADS,
            dq_kernel: "ge_attention_backward_dq_d128",
            dkv_kernel: "ge_attention_backward_dkv_d128",
        }),
        (64, true) => Ok(BackwardTiles {
            query_rows: 64,
            key_rows: 64,
            threads: TC_THREADS,
            dq_kernel: "ge_attention_backward_tc_dq_d64",
            dkv_kernel: "ge_attention_backward_tc_dkv_d64",
        }),
        (128, true) => Ok(BackwardTiles {
            query_rows: 64,
            key_rows: 64,
            threads: TC_THREADS,
            dq_kernel: "ge_attention_backward_tc_dq_d128",
            dkv_kernel: "ge_attention_backward_tc_dkv_d128",
        }),
        (d, _) => bail!(
            "causal_attention_backward: head_dim {d} is not supported on CUDA (have 64 and 128); \
             run it on the CPU backend"
        ),
    }
}

/// The inner tile sizes of the tensor-core kernels (kernels/attention_backward_tc.cu's
/// instantiations): keys per step of the dq kernel and queries per step of the dk/dv kernel.
pub fn tc_inner_tiles(head_dim: usize) -> (usize, usize) {
    if head_dim == 64 { (64, 64) } else { (16, 16) }
}

/// The tiles of `tile_rows` positions of every non-empty sequence, three u32s each
/// (sequence start row, length, tile start), heaviest first for the causal work: with
/// `queries_see_before` a tile at position `p` does about `p + tile_rows` keys' work (query
/// tiles), otherwise `len - p` queries' (key tiles).
pub fn tile_list(seqs: &[SeqSpan], tile_rows: usize, queries_see_before: bool) -> Result<Vec<u32>> {
    let mut tiles: Vec<(usize, [u32; 3])> = Vec::new();
    let u = |v: usize| {
        u32::try_from(v).map_err(|_| anyhow!("causal_attention_backward: {v} does not fit a u32"))
    };
    for s in seqs.iter().filter(|s| s.len > 0) {
        for p in (0..s.len).step_by(tile_rows) {
            let work = if queries_see_before {
                (p + tile_rows).min(s.len)
            } else {
                s.len - p
            };
            tiles.push((work, [u(s.start)?, u(s.len)?, u(p)?]));
        }
    }
    // Stable: equal work keeps the sequence order.
    tiles.sort_by_key(|&(w, _)| std::cmp::Reverse(w));
    Ok(tiles.into_iter().flat_map(|(_, t)| t).collect())
}

/// Whether the non-empty spans cover every one of `rows` rows, or an error when two overlap.
fn spans_cover(seqs: &[SeqSpan], rows: usize) -> Result<bool> {
    let mut spans: Vec<&SeqSpan> = seqs.iter().filter(|s| s.len > 0).collect();
    spans.sort_by_key(|s| s.start);
    let mut covered = 0;
    let mut end = 0;
    for s in spans {
        ensure!(
            s.start >= end,
            "causal_attention_backward: sequences overlap at row {} (the CUDA backend needs \
             disjoint spans)",
            s.start
        );
        end = s.start + s.len;
        covered += s.len;
    }
    Ok(covered == rows)
}

impl CudaBackend {
    /// A bf16 output: poisoned (when asked) if the kernels write every row, zeros otherwise.
    fn attn_bwd_output(&self, rows: usize, width: usize, covers_all: bool) -> Result<CudaTensor> {
        if covers_all {
            self.output(DType::Bf16, vec![rows, width])
        } else {
            let s = self.gpu.alloc_zeros::<bf16>(rows * width)?;
            CudaTensor::new(DeviceData::Bf16(s), vec![rows, width])
        }
    }

    /// The attention backward; with `forward` = (output, log-sum-exp of
    /// [`CudaBackend::causal_attention_with_lse`]) and the tensor-core kernels, the dq kernel
    /// takes the softmax statistics from the forward (delta from its output) instead of
    /// computing them in a first pass over the keys.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attn_causal_backward(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        dout: &CudaTensor,
        forward: Option<(&CudaTensor, &CudaTensor)>,
        seqs: &[SeqSpan],
        shape: AttentionShape,
    ) -> Result<(CudaTensor, CudaTensor, CudaTensor)> {
        const OP: &str = "causal_attention_backward";
        let AttentionShape {
            num_heads,
            num_kv_heads,
            head_dim,
        } = shape;
        let tiles = tiles_for(head_dim, self.attention_tensor_cores)?;
        ensure!(
            num_kv_heads > 0 && num_heads.is_multiple_of(num_kv_heads),
            "{OP}: {num_heads} heads are not a multiple of {num_kv_heads} kv heads"
        );
        let (n, qw) = q.matrix();
        let kw = num_kv_heads * head_dim;
        ensure!(
            qw == num_heads * head_dim,
            "{OP}: q width {qw}, want {num_heads} heads x {head_dim}"
        );
        ensure!(
            k.matrix() == (n, kw) && v.matrix() == (n, kw),
            "{OP}: k/v shapes {:?} {:?}, want [{n}, {kw}]",
            k.shape,
            v.shape
        );
        ensure!(
            dout.shape == q.shape,
            "{OP}: dout {:?} vs q {:?}",
            dout.shape,
            q.shape
        );
        for s in seqs {
            ensure!(
                s.start + s.len <= n,
                "{OP}: sequence {}..{} past the batch ({n} rows)",
                s.start,
                s.start + s.len
            );
        }
        ensure!(
            n.checked_mul(qw).is_some_and(|e| e <= i64::MAX as usize)
                && num_heads <= MAX_GRID_Y
                && num_kv_heads <= MAX_GRID_Y,
            "{OP}: {n} rows x {num_heads} heads is over the kernels' limits"
        );
        let covers_all = spans_cover(seqs, n)?;
        let (qs, ks, vs, ds) = (q.bf16(OP)?, k.bf16(OP)?, v.bf16(OP)?, dout.bf16(OP)?);
        let mut dq = self.attn_bwd_output(n, qw, covers_all)?;
        let mut dk = self.attn_bwd_output(n, kw, covers_all)?;
        let mut dv = self.attn_bwd_output(n, kw, covers_all)?;
        let q_tiles = tile_list(seqs, tiles.query_rows, true)?;
        let k_tiles = tile_list(seqs, tiles.key_rows, false)?;
        if q_tiles.is_empty() {
            return Ok((dq, dk, dv));
        }
        let (nq, nk) = (q_tiles.len() / 3, k_tiles.len() / 3);
        ensure!(
            nq <= i32::MAX as usize && nk <= i32::MAX as usize,
            "{OP}: too many tiles"
        );
        // Row statistics, written by the dq kernel at every sequence row, read by dk/dv; or,
        // given the forward's, its log-sum-exp and delta = rowsum(dout * out) from its output.
        // `delta` is written by ge_attention_delta from the forward's output when the forward's
        // statistics are given, else by the dq kernel, as is `lse` then.
        let mut delta = self.gpu.alloc::<f32>(n * num_heads)?;
        let given_lse = match forward {
            Some((out, lse)) if self.attention_tensor_cores => {
                ensure!(
                    out.shape == q.shape && out.dtype() == DType::Bf16,
                    "{OP}: forward output {:?} ({}) for q {:?}",
                    out.shape,
                    out.dtype().name(),
                    q.shape
                );
                ensure!(
                    lse.numel() == n * num_heads && lse.dtype() == DType::F32,
                    "{OP}: forward statistics of {} {} values for {n} rows x {num_heads} heads",
                    lse.numel(),
                    lse.dtype().name()
                );
                if n > 0 {
                    let d = args::AttentionDeltaArgs {
                        out: self.gpu.ptr(out.bf16(OP)?),
                        dout: self.gpu.ptr(ds),
                        delta: self.gpu.ptr_mut(&mut delta),
                        rows: n as i64,
                        num_heads: num_heads as i32,
                        head_dim: head_dim as i32,
                    };
                    // SAFETY: out and dout are [n, num_heads * head_dim] bf16 (checked), delta
                    // n * num_heads f32s; one warp per (row, head).
                    unsafe {
                        self.gpu.launch(
                            "ge_attention_delta",
                            super::context::grid_stride_config(n * num_heads * 32),
                            &d,
                        )
                    }?;
                }
                Some(self.addr(lse))
            }
            _ => None,
        };
        let own_lse;
        let lse_addr = match given_lse {
            Some(addr) => addr,
            None => {
                own_lse = self.gpu.alloc::<f32>(n * num_heads)?;
                self.gpu.ptr(&own_lse)
            }
        };
        let q_tile_buf = self.gpu.upload_slice(&q_tiles)?;
        let k_tile_buf = self.gpu.upload_slice(&k_tiles)?;
        let mut a = args::AttentionBackwardArgs {
            q: self.gpu.ptr(qs),
            k: self.gpu.ptr(ks),
            v: self.gpu.ptr(vs),
            dout: self.gpu.ptr(ds),
            dq: self.gpu.ptr_mut(dq.bf16_mut(OP)?),
            dk: self.gpu.ptr_mut(dk.bf16_mut(OP)?),
            dv: self.gpu.ptr_mut(dv.bf16_mut(OP)?),
            lse: lse_addr,
            delta: self.gpu.ptr(&delta),
            tiles: self.gpu.ptr(&q_tile_buf),
            num_tiles: nq as i32,
            num_heads: num_heads as i32,
            num_kv_heads: num_kv_heads as i32,
            head_dim: head_dim as i32,
            tile_rows: tiles.query_rows as i32,
            scale: 1.0 / (head_dim as f32).sqrt(),
            split_heads: 0,
            stats_given: given_lse.is_some() as i32,
        };
        let cfg = LaunchConfig {
            grid_dim: (nq as u32, num_heads as u32, 1),
            block_dim: (tiles.threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: q/dout are [n, num_heads * head_dim] and k/v [n, num_kv_heads * head_dim]
        // bf16 (checked above), every tile lies inside its sequence and every sequence inside
        // the batch, dq has q's shape, lse/delta hold n * num_heads f32s; the tile list holds
        // 3 * nq u32s; all buffers outlive the queued launches (frees are stream-ordered).
        unsafe { self.gpu.launch(tiles.dq_kernel, cfg, &a) }?;
        a.tiles = self.gpu.ptr(&k_tile_buf);
        a.num_tiles = nk as i32;
        a.tile_rows = tiles.key_rows as i32;
        let group = num_heads / num_kv_heads;
        if self.attention_backward_split_heads
            && split_dkv_heads(self.attention_tensor_cores, group)
        {
            // One block per (key tile, kv head, query head of the group), each writing its
            // head's f32 share; then the group's shares are summed into dk / dv. Rows of no
            // sequence are zero in the shares, so the sum writes zeros there, as the
            // unsplit kernel's zero-filled outputs hold.
            let part_len = n * qw;
            let zeroed = |len| {
                if covers_all {
                    self.gpu.alloc::<f32>(len)
                } else {
                    self.gpu.alloc_zeros::<f32>(len)
                }
            };
            let (mut dk_part, mut dv_part) = (zeroed(part_len)?, zeroed(part_len)?);
            if covers_all && self.poison_outputs() {
                // Every share is written by the kernel: NaN first, so a missed one shows.
                for part in [&mut dk_part, &mut dv_part] {
                    let p = self.gpu.ptr_mut(part);
                    self.gpu
                        .memset_u32(p, super::backend::F32_NAN_BITS, part_len)?;
                }
            }
            a.dk = self.gpu.ptr_mut(&mut dk_part);
            a.dv = self.gpu.ptr_mut(&mut dv_part);
            a.split_heads = 1;
            let cfg = LaunchConfig {
                grid_dim: (nk as u32, num_kv_heads as u32, group as u32),
                block_dim: (tiles.threads, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as above, for the key tiles; the shares are f32 [n, num_heads,
            // head_dim], each (sequence row, head) written by exactly one block.
            unsafe { self.gpu.launch(tiles.dkv_kernel, cfg, &a) }?;
            let r = args::AttentionDkvReduceArgs {
                dk_part: a.dk,
                dv_part: a.dv,
                dk: self.gpu.ptr_mut(dk.bf16_mut(OP)?),
                dv: self.gpu.ptr_mut(dv.bf16_mut(OP)?),
                rows: n as i64,
                num_heads: num_heads as i32,
                num_kv_heads: num_kv_heads as i32,
                head_dim: head_dim as i32,
                scale: a.scale,
            };
            // SAFETY: the shares hold n * num_heads * head_dim f32s (written at every
            // sequence row, zero elsewhere unless every row is a sequence's), dk / dv n *
            // num_kv_heads * head_dim bf16s.
            unsafe {
                self.gpu.launch(
                    "ge_attention_dkv_reduce",
                    super::context::grid_stride_config(n * kw),
                    &r,
                )
            }?;
            return Ok((dq, dk, dv));
        }
        let cfg = LaunchConfig {
            grid_dim: (nk as u32, num_kv_heads as u32, 1),
            block_dim: (tiles.threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above, for the key tiles and dk/dv ([n, num_kv_heads * head_dim]); the
        // dq kernel, queued before on the same stream, wrote lse/delta at every sequence row,
        // which is all this kernel reads of them.
        unsafe { self.gpu.launch(tiles.dkv_kernel, cfg, &a) }?;
        Ok((dq, dk, dv))
    }
}

/// CUDA's limit on grid y.
const MAX_GRID_Y: usize = 65535;

/// Whether the dk/dv pass runs one block per query head of each GQA group, writing per-head
/// f32 shares that a second kernel sums (`split_heads` of `AttentionBackwardArgs`): on the
/// tensor-core kernels whenever a kv head serves several query heads. The scalar kernels
/// always loop over the group in one block.
pub fn split_dkv_heads(tensor_cores: bool, group: usize) -> bool {
    tensor_cores && group > 1
}

#[cfg(test)]
#[path = "attention_backward_tc_emu.rs"]
mod tc_emulation;

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: usize, len: usize) -> SeqSpan {
        SeqSpan { start, len }
    }

    #[test]
    fn only_head_dims_64_and_128_have_kernels() {
        assert_eq!(tiles_for(64, false).unwrap().key_rows, 64);
        assert_eq!(tiles_for(128, false).unwrap().query_rows, 32);
        assert_eq!(tiles_for(128, true).unwrap().query_rows, 64);
        assert_eq!(tiles_for(64, true).unwrap().threads, 128);
        for tc in [false, true] {
            let e = tiles_for(96, tc).unwrap_err().to_string();
            assert!(e.contains("head_dim 96 is not supported on CUDA"), "{e}");
        }
    }

    #[test]
    fn tiles_cover_every_position_once_heaviest_first() {
        let seqs = [
            span(5, 1),
            span(6, 17),
            span(30, 130),
            span(200, 0),
            span(300, 64),
        ];
        for rows in [32, 64] {
            for queries in [true, false] {
                let t = tile_list(&seqs, rows, queries).unwrap();
                let mut seen = std::collections::HashSet::new();
                let mut last_work = usize::MAX;
                for c in t.chunks(3) {
                    let (start, len, p) = (c[0] as usize, c[1] as usize, c[2] as usize);
                    assert!(seqs.iter().any(|s| s.start == start && s.len == len));
                    assert!(p < len && p.is_multiple_of(rows));
                    let work = if queries {
                        (p + rows).min(len)
                    } else {
                        len - p
                    };
                    assert!(work <= last_work, "not heaviest first");
                    last_work = work;
                    for i in p..(p + rows).min(len) {
                        assert!(seen.insert(start + i), "row {} twice", start + i);
                    }
                }
                let want: usize = seqs.iter().map(|s| s.len).sum();
                assert_eq!(seen.len(), want);
            }
        }
        assert!(tile_list(&[], 32, true).unwrap().is_empty());
    }

    #[test]
    fn coverage_and_overlap() {
        assert!(spans_cover(&[span(2, 3), span(0, 2)], 5).unwrap());
        assert!(!spans_cover(&[span(0, 2), span(3, 2)], 5).unwrap());
        assert!(spans_cover(&[span(0, 5), span(2, 0)], 5).unwrap());
        assert!(spans_cover(&[span(0, 3), span(2, 2)], 5).is_err());
        assert!(spans_cover(&[], 0).unwrap());
    }

    /// The kernels' maths on the host, loop for loop (tiles, masks, the per-thread online
    /// softmax over columns `tx + 16 j` merged across the 16 threads of a row, the query tiles
    /// a key tile visits), in f32: `(dq, dk, dv)`.
    fn emulate(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dout: &[f32],
        rows: usize,
        seqs: &[SeqSpan],
        shape: AttentionShape,
    ) -> [Vec<f32>; 3] {
        let AttentionShape {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        } = shape;
        let t = tiles_for(hd, false).unwrap();
        let (bq, bk) = (t.query_rows, t.key_rows);
        let (qw, kw, group) = (nh * hd, nkv * hd, nh / nkv);
        let scale = 1.0 / (hd as f32).sqrt();
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let qr = |r: usize, h: usize| &q[r * qw + h * hd..r * qw + (h + 1) * hd];
        let dor = |r: usize, h: usize| &dout[r * qw + h * hd..r * qw + (h + 1) * hd];
        let kr = |r: usize, g: usize| &k[r * kw + g * hd..r * kw + (g + 1) * hd];
        let vr = |r: usize, g: usize| &v[r * kw + g * hd..r * kw + (g + 1) * hd];
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; rows * qw],
            vec![0f32; rows * kw],
            vec![0f32; rows * kw],
        );
        let (mut lse, mut delta) = (vec![f32::NAN; rows * nh], vec![f32::NAN; rows * nh]);
        let qt = tile_list(seqs, bq, true).unwrap();
        for tile in qt.chunks(3) {
            let (s0, len, q0) = (tile[0] as usize, tile[1] as usize, tile[2] as usize);
            let nq = bq.min(len - q0);
            for h in 0..nh {
                let g = h / group;
                for r in 0..nq {
                    let qi = q0 + r;
                    let mut parts = [(f32::NEG_INFINITY, 0f32, 0f32); 16];
                    for k0 in (0..q0 + nq).step_by(bk) {
                        for c in 0..bk.min(q0 + nq - k0) {
                            let kj = k0 + c;
                            if kj > qi {
                                continue;
                            }
                            let x = dot(qr(s0 + qi, h), kr(s0 + kj, g)) * scale;
                            let dp = dot(dor(s0 + qi, h), vr(s0 + kj, g));
                            let (m, l, a) = &mut parts[c % 16];
                            if x > *m {
                                let corr = (*m - x).exp();
                                *l = *l * corr + 1.0;
                                *a = *a * corr + dp;
                                *m = x;
                            } else {
                                let e = (x - *m).exp();
                                *l += e;
                                *a += e * dp;
                            }
                        }
                    }
                    let mx = parts.iter().map(|p| p.0).fold(f32::NEG_INFINITY, f32::max);
                    let (mut ls, mut a_s) = (0f32, 0f32);
                    for &(m, l, a) in &parts {
                        let f = if m == f32::NEG_INFINITY {
                            0.0
                        } else {
                            (m - mx).exp()
                        };
                        ls += l * f;
                        a_s += a * f;
                    }
                    lse[(s0 + qi) * nh + h] = mx + ls.ln();
                    delta[(s0 + qi) * nh + h] = a_s / ls;
                    for kj in 0..=qi {
                        let p = (dot(qr(s0 + qi, h), kr(s0 + kj, g)) * scale
                            - lse[(s0 + qi) * nh + h])
                            .exp();
                        let ds =
                            p * (dot(dor(s0 + qi, h), vr(s0 + kj, g)) - delta[(s0 + qi) * nh + h]);
                        for d in 0..hd {
                            dq[(s0 + qi) * qw + h * hd + d] += ds * kr(s0 + kj, g)[d] * scale;
                        }
                    }
                }
            }
        }
        let kt = tile_list(seqs, bk, false).unwrap();
        for tile in kt.chunks(3) {
            let (s0, len, k0) = (tile[0] as usize, tile[1] as usize, tile[2] as usize);
            let nk = bk.min(len - k0);
            for g in 0..nkv {
                for h in g * group..(g + 1) * group {
                    for q0 in ((k0 / bq) * bq..len).step_by(bq) {
                        for qi in q0..(q0 + bq).min(len) {
                            let (l, dd) = (lse[(s0 + qi) * nh + h], delta[(s0 + qi) * nh + h]);
                            assert!(l.is_finite() && dd.is_finite(), "stats of row {qi} unset");
                            for kj in k0..k0 + nk {
                                if kj > qi {
                                    continue;
                                }
                                let p = (dot(qr(s0 + qi, h), kr(s0 + kj, g)) * scale - l).exp();
                                let ds = p * (dot(dor(s0 + qi, h), vr(s0 + kj, g)) - dd);
                                for d in 0..hd {
                                    dv[(s0 + kj) * kw + g * hd + d] += p * dor(s0 + qi, h)[d];
                                    dk[(s0 + kj) * kw + g * hd + d] +=
                                        ds * qr(s0 + qi, h)[d] * scale;
                                }
                            }
                        }
                    }
                }
            }
        }
        [dq, dk, dv]
    }

    #[test]
    fn emulated_kernels_match_the_cpu_backward() {
        use crate::backend::Backend;
        use crate::backend::cpu::CpuBackend;
        use crate::model::HostTensor;
        let mut state = 99u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let cpu = CpuBackend::new();
        for (nh, nkv, hd, spans, rows) in [
            (
                2,
                1,
                64,
                vec![span(0, 1), span(1, 17), span(18, 70), span(88, 130)],
                218,
            ),
            (3, 3, 128, vec![span(2, 40), span(45, 33), span(80, 0)], 81),
            (4, 2, 64, vec![span(1, 129)], 133),
        ] {
            let shape = AttentionShape {
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
            };
            let mut t =
                |w: usize, sc: f32| (0..rows * w).map(|_| next() * sc).collect::<Vec<f32>>();
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
            let got = emulate(&q, &k, &v, &d, rows, &spans, shape);
            for (name, g, w) in [
                ("dq", &got[0], &want.0),
                ("dk", &got[1], &want.1),
                ("dv", &got[2], &want.2),
            ] {
                let num: f64 = g
                    .iter()
                    .zip(&w.data)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum();
                let den: f64 = w.data.iter().map(|b| (*b as f64).powi(2)).sum();
                let e = (num / den).sqrt();
                assert!(
                    e < 1e-4,
                    "{name} H={nh} KVH={nkv} hd={hd}: relative error {e:.2e}"
                );
            }
        }
    }
}
