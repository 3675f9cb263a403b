//! The training ops of the CUDA backend that are row-wise or elementwise (the kernels of
//! `kernels/backward.cu` and `kernels/optim.cu`): `scatter_add_rows`, `embedding_backward`,
//! `rms_norm_backward`, `rope_backward`, `swiglu_backward`, the fused `adamw_update`, and
//! `assign_tensor` / `assign_linear` (the f32 master rounded to bf16 on the device).
//!
//! Precision: activations and weights are bf16, parameter gradients, master weights and
//! AdamW moments f32 (accumulated in f32); input gradients are returned in bf16. Every
//! reduction has a fixed order (no float atomics): the scatter-adds are grouped by
//! destination row on the host ([`group_rows`]), so each destination element has one owner
//! thread that adds its sources in ascending source order, as the CPU does; the RMSNorm weight
//! gradient is a column reduction over fixed row slices.
//!
//! Tested against the CPU backend in `tests/cuda_train_elementwise.rs` (GPU runs only);
//! the grouping is tested here, on the CPU.

use super::args;
use super::backend::{CudaBackend, int};
use super::context::grid_stride_config;
use super::tensor::{CudaLinear, CudaTensor, DType};
use crate::backend::AdamWStep;
use anyhow::{Context, Result, bail, ensure};
use cudarc::driver::{DeviceRepr, LaunchConfig};

// SAFETY: plain `repr(C)` structs of integers and floats (device addresses as u64), laid out
// as `kernels/args.h` states (checked by the layout test in context.rs): valid kernel
// arguments by value, as the other argument structs (context.rs).
unsafe impl DeviceRepr for args::ScatterAddRowsArgs {}
unsafe impl DeviceRepr for args::RmsNormBackwardArgs {}
unsafe impl DeviceRepr for args::SwigluBackwardArgs {}
unsafe impl DeviceRepr for args::AdamWArgs {}
unsafe impl DeviceRepr for args::CastArgs {}

/// Row groups per block of the column-sum kernels (`GE_COLUMN_SUM_GROUPS` in common.cuh):
/// blocks of (32, 8) threads.
const COLUMN_SUM_GROUPS: usize = 8;
/// Rows per warp-per-row block of the RMSNorm backward's row kernel.
const RMS_BWD_ROWS_PER_BLOCK: usize = 8;

/// Rows per group of the column-sum kernels (the RMSNorm weight gradient, the bias gradient):
/// 32, or more where that would make over 512 groups (their f32 sums are groups x cols).
fn column_sum_row_group(rows: usize) -> usize {
    rows.div_ceil(512).max(32)
}

/// The layout of a column-sum kernel over `rows x cols`: (grid, row group, groups). A block
/// is (32, 8) threads over 8 row groups and a tile of 256 columns when `cols % 8 == 0` (8 per
/// thread, 16-byte loads), else 32.
pub(crate) fn column_sum_grid(rows: usize, cols: usize) -> ((u32, u32, u32), usize, usize) {
    let row_group = column_sum_row_group(rows);
    let groups = rows.div_ceil(row_group);
    let tile = if cols.is_multiple_of(8) { 256 } else { 32 };
    (
        (
            cols.div_ceil(tile) as u32,
            groups.div_ceil(COLUMN_SUM_GROUPS) as u32,
            1,
        ),
        row_group,
        groups,
    )
}

/// The block of the column-sum kernels and of `ge_column_partials_reduce`.
pub(crate) const COLUMN_SUM_BLOCK: (u32, u32, u32) = (32, COLUMN_SUM_GROUPS as u32, 1);

/// Source rows grouped by destination row, for a deterministic scatter-add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowGroups {
    /// Source rows, grouped by destination (groups in ascending destination order), ascending
    /// within each group.
    pub order: Vec<u32>,
    /// `groups + 1` offsets into `order`.
    pub segments: Vec<u32>,
    /// Each group's destination row (distinct, ascending).
    pub targets: Vec<u32>,
}

/// Groups source rows `i` by their destination `rows[i]` (a stable sort, so that a group's
/// sources keep their order and the sum is the CPU's sequential one).
pub fn group_rows(rows: &[usize]) -> Result<RowGroups> {
    let n = u32::try_from(rows.len()).context("scatter: more than 2^32 source rows")?;
    let mut order: Vec<u32> = (0..n).collect();
    order.sort_by_key(|&i| rows[i as usize]);
    let mut segments = Vec::new();
    let mut targets = Vec::new();
    for (k, &i) in order.iter().enumerate() {
        let r = rows[i as usize];
        if targets.last().is_none_or(|&t| t as usize != r) {
            targets.push(u32::try_from(r).context("scatter: destination row over u32")?);
            segments.push(k as u32);
        }
    }
    segments.push(n);
    Ok(RowGroups {
        order,
        segments,
        targets,
    })
}

impl CudaBackend {
    /// `dst[rows[i]] += src[i]` (f32 sums, one rounding to `dst`'s type), deterministic.
    /// `rows` must all be below `dst`'s row count and `src` must be `[rows.len(), width]`
    /// (checked by the callers).
    fn scatter_grouped(
        &self,
        op: &str,
        dst: &mut CudaTensor,
        rows: &[usize],
        src: &CudaTensor,
    ) -> Result<()> {
        let width = dst.matrix().1;
        if rows.is_empty() || width == 0 {
            return Ok(());
        }
        let kernel = match (dst.dtype(), src.dtype()) {
            (DType::Bf16, DType::Bf16) => "ge_scatter_add_rows_bf16",
            (DType::Bf16, DType::F32) => "ge_scatter_add_rows_bf16_f32",
            (DType::F32, DType::F32) => "ge_scatter_add_rows_f32",
            (DType::F32, DType::Bf16) => "ge_scatter_add_rows_f32_bf16",
        };
        let g = group_rows(rows)?;
        let order = self.gpu.upload_slice(&g.order)?;
        let segments = self.gpu.upload_slice(&g.segments)?;
        let targets = self.gpu.upload_slice(&g.targets)?;
        let a = args::ScatterAddRowsArgs {
            dst: self.addr_mut(dst),
            src: self.addr(src),
            order: self.gpu.ptr(&order),
            segments: self.gpu.ptr(&segments),
            targets: self.gpu.ptr(&targets),
            groups: int(g.targets.len(), op, "destination rows")?,
            width: int(width, op, "width")?,
        };
        // SAFETY: dst is [m, width] with every target below m, src [rows.len(), width] with
        // every order entry below rows.len(); segments has groups + 1 entries bounding order;
        // the index buffers live until the launch is queued (frees are stream-ordered).
        unsafe {
            self.gpu
                .launch(kernel, grid_stride_config(g.targets.len() * width), &a)
        }
    }

    /// [`crate::backend::Backend::scatter_add_rows`] on the GPU.
    pub(crate) fn train_scatter_add_rows(
        &self,
        dst: &mut CudaTensor,
        rows: &[usize],
        src: &CudaTensor,
    ) -> Result<()> {
        let (m, d) = dst.matrix();
        ensure!(
            src.matrix() == (rows.len(), d),
            "scatter_add_rows: src {:?} for {} rows of width {d}",
            src.shape,
            rows.len()
        );
        if let Some(&r) = rows.iter().find(|&&r| r >= m) {
            bail!("scatter_add_rows: row {r} of {m}");
        }
        self.scatter_grouped("scatter_add_rows", dst, rows, src)
    }

    /// [`crate::backend::Backend::embedding_backward`] on the GPU.
    pub(crate) fn train_embedding_backward(
        &self,
        grad: &mut CudaTensor,
        ids: &[u32],
        dy: &CudaTensor,
    ) -> Result<()> {
        let (vocab, dim) = grad.matrix();
        ensure!(
            dy.matrix() == (ids.len(), dim),
            "embedding_backward: dy {:?} for {} ids of width {dim}",
            dy.shape,
            ids.len()
        );
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("token id {id} is outside the vocabulary ({vocab} entries)");
        }
        let rows: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        self.scatter_grouped("embedding_backward", grad, &rows, dy)
    }

    /// [`crate::backend::Backend::rms_norm_backward`] on the GPU: `x`, `weight`, `dy` bf16,
    /// `weight_grad` f32; returns `dx` in bf16.
    pub(crate) fn train_rms_norm_backward(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        eps: f32,
        dy: &CudaTensor,
        weight_grad: &mut CudaTensor,
    ) -> Result<CudaTensor> {
        let op = "rms_norm_backward";
        let (rows, d) = x.matrix();
        ensure!(
            weight.numel() == d && weight_grad.numel() == d,
            "{op}: weight {:?} / grad {:?} for rows of {d}",
            weight.shape,
            weight_grad.shape
        );
        ensure!(
            dy.shape == x.shape,
            "{op}: dy {:?} vs x {:?}",
            dy.shape,
            x.shape
        );
        ensure!(
            weight_grad.dtype() == DType::F32,
            "{op}: the weight gradient must be an f32 tensor (zeros_f32), got bf16"
        );
        let xs = self.gpu.ptr(x.bf16(op)?);
        let ws = self.gpu.ptr(weight.bf16(&format!("{op} (weight)"))?);
        let dys = self.gpu.ptr(dy.bf16(&format!("{op} (dy)"))?);
        let mut dx = self.output(DType::Bf16, x.shape.clone())?;
        if rows == 0 || d == 0 {
            return Ok(dx);
        }
        let mut rinv = self.gpu.alloc::<f32>(rows)?;
        let (weight_grid, row_group, groups) = column_sum_grid(rows, d);
        let mut partial = self.gpu.alloc::<f32>(groups * d)?;
        let a = args::RmsNormBackwardArgs {
            x: xs,
            weight: ws,
            dy: dys,
            dx: self.addr_mut(&mut dx),
            rinv: self.gpu.ptr_mut(&mut rinv),
            partial: self.gpu.ptr_mut(&mut partial),
            rows: int(rows, op, "rows")?,
            dim: int(d, op, "dim")?,
            eps,
            row_group: int(row_group, op, "rows per group")?,
        };
        let row_cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(RMS_BWD_ROWS_PER_BLOCK) as u32, 1, 1),
            block_dim: (32 * RMS_BWD_ROWS_PER_BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x, dy and dx are [rows, d] bf16 (whole allocations: 256-byte aligned, as the
        // 16-byte loads need when d % 8 == 0), weight [d] bf16, rinv [rows] f32; one warp per
        // row.
        unsafe { self.gpu.launch("ge_rms_norm_backward_rows", row_cfg, &a) }?;
        let col_cfg = LaunchConfig {
            grid_dim: weight_grid,
            block_dim: COLUMN_SUM_BLOCK,
            shared_mem_bytes: 0,
        };
        // SAFETY: as above; partial holds groups x d f32s, one row per group, each written by
        // the threads of its group; rinv was written by the launch before (same stream).
        unsafe { self.gpu.launch("ge_rms_norm_backward_weight", col_cfg, &a) }?;
        self.add_column_partials(op, &partial, groups, weight_grad)?;
        Ok(dx)
    }

    /// `out += ` the column sums of `partial` (`[groups, cols]` f32, every row written by the
    /// stream's earlier launches) on `ge_column_partials_reduce`, in a fixed order.
    pub(crate) fn add_column_partials(
        &self,
        op: &str,
        partial: &cudarc::driver::CudaSlice<f32>,
        groups: usize,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let cols = out.numel();
        ensure!(
            out.dtype() == DType::F32 && partial.len() >= groups * cols,
            "{op}: column sums of {groups} x {cols} into a {} tensor of {cols}",
            out.dtype().name()
        );
        let a = args::ColumnReduceArgs {
            partial: self.gpu.ptr(partial),
            out: self.addr_mut(out),
            groups: int(groups, op, "row groups")?,
            cols: int(cols, op, "columns")?,
        };
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(32) as u32, 1, 1),
            block_dim: COLUMN_SUM_BLOCK,
            shared_mem_bytes: 0,
        };
        // SAFETY: partial holds groups x cols f32s, out cols f32s; block (32, 8) as the
        // kernel's shared tile assumes.
        unsafe { self.gpu.launch("ge_column_partials_reduce", cfg, &a) }
    }

    /// [`crate::backend::Backend::rope_backward`] on the GPU: `ge_rope` with `inverse` set
    /// (the rotation by minus the forward's angle), in place on bf16 `dx`.
    pub(crate) fn train_rope_backward(
        &self,
        dx: &mut CudaTensor,
        positions: &[u32],
        head_dim: usize,
        inv_freq: &[f32],
    ) -> Result<()> {
        let op = "rope_backward";
        let (n, w) = dx.matrix();
        ensure!(
            n == positions.len(),
            "{op}: {n} rows but {} positions",
            positions.len()
        );
        ensure!(
            head_dim > 0 && w % head_dim == 0 && inv_freq.len() * 2 == head_dim,
            "{op}: bad head_dim {head_dim} for width {w} and {} frequencies",
            inv_freq.len()
        );
        if n == 0 || w == 0 {
            return Ok(());
        }
        let pos = self
            .gpu
            .upload_memo(super::graphs::keys::ROPE_POSITIONS, positions)?;
        let xp = self.gpu.ptr_mut(dx.bf16_mut(op)?);
        self.with_inv_freq(inv_freq, |table| {
            let a = args::RopeArgs {
                x: xp,
                positions: pos,
                inv_freq: self.gpu.ptr(table),
                rows: int(n, op, "rows")?,
                width: int(w, op, "width")?,
                head_dim: int(head_dim, op, "head_dim")?,
                inverse: 1,
            };
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (super::backend::rope_block_threads(w / 2, head_dim), 1, 1),
                shared_mem_bytes: (head_dim * std::mem::size_of::<f32>()) as u32,
            };
            // SAFETY: dx is [n, w] bf16 with w a multiple of head_dim, positions has n u32s,
            // the table head_dim / 2 f32s; the shared table is head_dim floats.
            unsafe { self.gpu.launch("ge_rope", cfg, &a) }
        })
    }

    /// [`crate::backend::Backend::swiglu_backward`] on the GPU (bf16 in and out).
    pub(crate) fn train_swiglu_backward(
        &self,
        gate_up: &CudaTensor,
        dy: &CudaTensor,
    ) -> Result<CudaTensor> {
        let op = "swiglu_backward";
        let (n, w) = gate_up.matrix();
        ensure!(w.is_multiple_of(2), "{op}: fused width {w} is odd");
        let inner = w / 2;
        ensure!(
            dy.matrix() == (n, inner),
            "{op}: dy {:?} for gate_up {:?}",
            dy.shape,
            gate_up.shape
        );
        let gs = self.gpu.ptr(gate_up.bf16(op)?);
        let dys = self.gpu.ptr(dy.bf16(&format!("{op} (dy)"))?);
        let mut out = self.output(DType::Bf16, gate_up.shape.clone())?;
        if n == 0 || inner == 0 {
            return Ok(out);
        }
        let a = args::SwigluBackwardArgs {
            gate_up: gs,
            dy: dys,
            out: self.addr_mut(&mut out),
            rows: int(n, op, "rows")?,
            inner: int(inner, op, "width")?,
        };
        // SAFETY: gate_up and out are [n, 2 inner] bf16, dy [n, inner] bf16, all whole
        // allocations (256-byte aligned, as the 16-byte loads need when inner % 8 == 0).
        unsafe {
            self.gpu.launch(
                "ge_swiglu_backward",
                grid_stride_config(super::context::swiglu_lanes(n, inner)),
                &a,
            )
        }?;
        Ok(out)
    }

    /// [`crate::backend::Backend::adamw_update`] on the GPU: one fused kernel over f32
    /// `master`, `m`, `v` and `grad`, bit for bit [`crate::backend::adamw_update_host`]; with
    /// `out_bf16` (the device address of `master.numel()` bf16s: a parameter's working copy),
    /// the updated master rounded to bf16 (the cast's rounding) is written there in the same
    /// pass.
    pub(crate) fn train_adamw_update(
        &self,
        master: &mut CudaTensor,
        m: &mut CudaTensor,
        v: &mut CudaTensor,
        grad: &CudaTensor,
        step: &AdamWStep,
        out_bf16: Option<u64>,
    ) -> Result<()> {
        let op = "adamw_update";
        let n = master.numel();
        ensure!(
            m.numel() == n && v.numel() == n && grad.numel() == n,
            "{op}: parameter of {n} elements, moments of {} and {}, gradient of {}",
            m.numel(),
            v.numel(),
            grad.numel()
        );
        for (what, t) in [("master", &*master), ("m", &*m), ("v", &*v), ("grad", grad)] {
            ensure!(
                t.dtype() == DType::F32,
                "{op}: {what} must be an f32 tensor, got {}",
                t.dtype().name()
            );
        }
        if n == 0 {
            return Ok(());
        }
        let a = args::AdamWArgs {
            master: self.addr_mut(master),
            m: self.addr_mut(m),
            v: self.addr_mut(v),
            grad: self.addr(grad),
            n: n as i64,
            beta1: step.beta1,
            beta2: step.beta2,
            one_minus_beta1: step.one_minus_beta1,
            one_minus_beta2: step.one_minus_beta2,
            eps: step.eps,
            step_size: step.step_size,
            inv_sqrt_bias2: step.inv_sqrt_bias2,
            decay: step.decay,
            grad_scale: step.grad_scale,
            out_bf16: out_bf16.unwrap_or(0),
        };
        // SAFETY: the four buffers hold n f32s each (checked above); master, m and v are
        // distinct tensors (three `&mut`), grad only read; out_bf16, when given, holds n bf16s
        // (the callers' parameter of the master's size) distinct from all four.
        unsafe {
            self.gpu
                .launch("ge_adamw_update", grid_stride_config(n), &a)
        }
    }

    /// Writes f32 `master` (`n` elements) rounded to bf16 into the bf16 buffer at `dst`.
    fn cast_into_bf16(&self, op: &str, dst: u64, master: &CudaTensor, n: usize) -> Result<()> {
        ensure!(
            master.dtype() == DType::F32,
            "{op}: the master copy must be an f32 tensor, got bf16"
        );
        if n == 0 {
            return Ok(());
        }
        let a = args::CastArgs {
            src: self.addr(master),
            dst,
            n: n as i64,
        };
        // SAFETY: master holds n f32s and dst n bf16s (checked by the callers).
        unsafe {
            self.gpu
                .launch("ge_cast_f32_bf16", grid_stride_config(n.div_ceil(8)), &a)
        }
    }

    /// [`crate::backend::Backend::assign_tensor`] on the GPU: `dst` (bf16, or f32) set in
    /// place from the f32 master of as many elements (rounded to nearest even for bf16, as the
    /// host upload rounds); `dst` takes the master's shape, as the trait's default does.
    pub(crate) fn train_assign_tensor(
        &self,
        dst: &mut CudaTensor,
        master: &CudaTensor,
    ) -> Result<()> {
        let op = "assign_tensor";
        let n = master.numel();
        ensure!(
            dst.numel() == n,
            "{op}: destination {:?} for a master copy {:?}",
            dst.shape,
            master.shape
        );
        match dst.dtype() {
            DType::Bf16 => {
                let p = self.addr_mut(dst);
                self.cast_into_bf16(op, p, master, n)?;
            }
            DType::F32 => {
                ensure!(
                    master.dtype() == DType::F32,
                    "{op}: the master copy must be an f32 tensor, got bf16"
                );
                *dst = self.copy_f32(master)?;
            }
        }
        dst.shape = master.shape.clone();
        Ok(())
    }

    /// `n` bf16 values at `src` widened into a new f32 tensor of `shape` (exact).
    fn widen_to_f32(&self, src: u64, n: usize, shape: Vec<usize>) -> Result<CudaTensor> {
        let mut out = self.zeros_f32(&shape)?;
        if n > 0 {
            let a = args::CastArgs {
                src,
                dst: self.addr_mut(&mut out),
                n: n as i64,
            };
            // SAFETY: src holds n bf16s and out n f32s.
            unsafe {
                self.gpu
                    .launch("ge_cast_bf16_f32", grid_stride_config(n.div_ceil(8)), &a)?
            }
        }
        Ok(out)
    }

    /// [`crate::backend::Backend::tensor_to_f32`] on the GPU: a bf16 tensor widened on the
    /// device (an f32 one copied).
    pub(crate) fn train_to_f32(&self, t: &CudaTensor) -> Result<CudaTensor> {
        match t.dtype() {
            DType::F32 => self.copy_f32(t),
            DType::Bf16 => self.widen_to_f32(self.addr(t), t.numel(), t.shape.clone()),
        }
    }

    /// [`crate::backend::Backend::linear_to_f32`] on the GPU: the bf16 `[out, in]` weight
    /// widened on the device.
    pub(crate) fn train_linear_to_f32(&self, w: &CudaLinear) -> Result<CudaTensor> {
        let (out, inp) = (w.out_features, w.in_features);
        let p = self.gpu.ptr(&w.weight);
        self.widen_to_f32(p, out * inp, vec![out, inp])
    }

    /// A device copy of an f32 tensor.
    fn copy_f32(&self, t: &CudaTensor) -> Result<CudaTensor> {
        use super::tensor::DeviceData;
        match &t.data {
            DeviceData::F32(s) => CudaTensor::new(
                DeviceData::F32(self.gpu.stream.clone_dtod(s)?),
                t.shape.clone(),
            ),
            DeviceData::Bf16(_) => bail!("copy_f32: a bf16 tensor"),
        }
    }

    /// [`crate::backend::Backend::assign_linear`] on the GPU: the bf16 `[out, in]` weight set
    /// in place from its f32 master `[out, in]`.
    pub(crate) fn train_assign_linear(
        &self,
        dst: &mut CudaLinear,
        master: &CudaTensor,
    ) -> Result<()> {
        let op = "assign_linear";
        let (out, inp) = (dst.out_features, dst.in_features);
        ensure!(
            master.shape == [out, inp],
            "{op}: weight [{out}, {inp}] for a master copy {:?}",
            master.shape
        );
        let p = self.gpu.ptr_mut(&mut dst.weight);
        self.cast_into_bf16(op, p, master, out * inp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_sum_groups_are_the_kernels() {
        let line = include_str!("../../../kernels/common.cuh")
            .lines()
            .find_map(|l| l.trim().strip_prefix("#define GE_COLUMN_SUM_GROUPS "))
            .expect("GE_COLUMN_SUM_GROUPS in kernels/common.cuh");
        assert_eq!(line.trim(), COLUMN_SUM_GROUPS.to_string());
    }

    #[test]
    fn column_sum_grid_covers_every_row_and_column() {
        // A training micro-batch of 8192 rows of 896: groups of 32 rows, 4 tiles of 256
        // columns x 32 blocks of 8 groups.
        assert_eq!(column_sum_grid(8192, 896), ((4, 32, 1), 32, 256));
        // Columns not a multiple of 8: tiles of 32 columns, one per thread.
        assert_eq!(column_sum_grid(130, 257), ((9, 1, 1), 32, 5));
        // Many rows: at most 512 groups.
        let (_, group, groups) = column_sum_grid(1 << 20, 64);
        assert!(groups <= 512 && group * groups >= 1 << 20);
        for rows in [1, 31, 32, 33, 1000, 16385] {
            for dim in [1, 8, 33, 896, 4097] {
                let ((x, y, _), group, groups) = column_sum_grid(rows, dim);
                assert!(group * groups >= rows && group * (groups - 1) < rows);
                assert!(y as usize * COLUMN_SUM_GROUPS >= groups);
                let per_thread = if dim % 8 == 0 { 8 } else { 1 };
                assert!(x as usize * 32 * per_thread >= dim);
            }
        }
    }

    #[test]
    fn rows_are_grouped_by_destination_in_source_order() {
        let g = group_rows(&[5, 2, 5, 0, 2, 5]).unwrap();
        assert_eq!(g.targets, vec![0, 2, 5]);
        assert_eq!(g.segments, vec![0, 1, 3, 6]);
        assert_eq!(g.order, vec![3, 1, 4, 0, 2, 5]);
        let e = group_rows(&[]).unwrap();
        assert_eq!(
            (e.order.len(), e.segments, e.targets.len()),
            (0, vec![0], 0)
        );
        let one = group_rows(&[7]).unwrap();
        assert_eq!(
            (one.order, one.segments, one.targets),
            (vec![0], vec![0, 1], vec![7])
        );
    }
}
