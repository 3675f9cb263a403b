//! [`CudaBackend`]: the [`Backend`] trait on one CUDA device. bf16 tensors (f32 where asked
//! for), f32 maths inside the kernels, cuBLASLt bf16 GEMMs with f32 accumulation for
//! [`Backend::linear`]. Each op checks its shapes on the host (as the CPU backend does),
//! then launches the kernels of `kernels/elementwise.cu` through [`GpuContext::launch`].
//!
//! On the GPU so far: upload/download, the tensor utilities (zeros, copy, fill_zero, scale,
//! add_assign), embedding, rms_norm, rope, swiglu, split/concat columns, gather_rows and
//! linear; the KV cache (kv_pool, write_kv, copy_blocks) and attention (paged and causal) in
//! [`super::attention`]; the attention backward in [`super::attention_backward`]; the
//! GEMM-shaped training ops (linear input / weight / bias gradients, `sum_squares`, the log-prob
//! backward) in [`super::train_gemm`]; the elementwise training ops and AdamW in
//! [`super::train_elementwise`]. Every trait op runs on the GPU ([`NOT_YET_ON_CUDA`] is empty).

use super::args;
use super::context::{CudaOptions, GpuContext, LoadedUnit, grid_stride_config, row_block_threads};
use super::gemm::{Gemm, GemmShape};
use super::graphs::{DecodeGraphs, keys};
use super::tensor::{CudaLinear, CudaTensor, DType, DeviceData, from_bf16, numel, to_bf16};
use crate::backend::{
    AttentionShape, Backend, DecodeRun, PagedSeq, SeqSpan, add_rms_norm_composed,
    qkv_rope_write_kv_composed,
};
use crate::engine::sampler::{RowSampling, SampledToken};
use crate::model::HostTensor;
use crate::transformer::{KvCache, PagedBatch, Weights};
use anyhow::{Context, Result, anyhow, bail, ensure};
use cudarc::driver::{CudaSlice, LaunchConfig};
use half::bf16;
use std::sync::Mutex;

/// The [`Backend`] ops that run on the GPU in this build.
pub const ON_CUDA: &[&str] = &[
    "upload",
    "download",
    "upload_linear",
    "download_linear",
    "linear",
    "embedding",
    "rms_norm",
    "rope",
    "swiglu",
    "split_columns",
    "concat_columns",
    "gather_rows",
    "add_assign",
    "zeros",
    "copy",
    "fill_zero",
    "scale",
    "causal_attention",
    "causal_attention_backward",
    "kv_pool",
    "write_kv",
    "copy_blocks",
    "paged_attention",
    "target_logprobs",
    "sample_rows",
    "add_rms_norm",
    "qkv_rope_write_kv",
    "element_bytes",
    "memory_info",
    "zeros_f32",
    "upload_f32",
    "release_cached_memory",
    "pair_losses",
    "decode_step",
    "decode_graph_stats",
    "split_mixed_steps",
    "sum_squares_many",
    "causal_attention_for_training",
    "causal_attention_backward_with",
    "reset_profile",
    "tensor_to_f32",
    "linear_to_f32",
    "assign_tensor",
    "assign_linear",
    "sum_squares",
    "linear_backward_input",
    "accumulate_linear_grad",
    "accumulate_bias_grad",
    "target_logprobs_backward",
    "target_logprobs_with_lse",
    "adamw_update",
    "adamw_update_tensor",
    "adamw_update_linear",
    "scatter_add_rows",
    "rms_norm_backward",
    "rope_backward",
    "swiglu_backward",
    "embedding_backward",
];

/// The [`Backend`] ops that are not on the CUDA backend yet: each returns an error naming it.
pub const NOT_YET_ON_CUDA: &[&str] = &[];

/// Most bytes of bf16 logits [`Backend::target_logprobs`] holds at once.
pub const TARGET_LOGPROB_CHUNK_BYTES: usize = 256 << 20;

/// bf16 quiet NaN, the poison of bf16 outputs.
const BF16_NAN_BITS: u16 = 0x7FC0;
/// f32 quiet NaN, the poison of f32 outputs.
pub(super) const F32_NAN_BITS: u32 = 0x7FC0_0000;

/// The profile's name for a GEMM: decode-sized (up to 64 rows) or larger, by output width.
fn gemm_profile_name(s: GemmShape) -> &'static str {
    match (s.rows <= 64, s.out >= 32768) {
        (true, true) => "gemm lm_head, <= 64 rows",
        (true, false) => "gemm layer, <= 64 rows",
        (false, true) => "gemm lm_head, > 64 rows",
        (false, false) => "gemm layer, > 64 rows",
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if let Some(p) = &self.gpu.profile {
            let _ = self.gpu.sync("the profiled work");
            if let Ok(mut p) = p.lock() {
                eprint!("{}", p.report());
            }
        }
    }
}

/// A size as the kernels' `int`, or an error naming `op` and `what`.
pub(super) fn int(v: usize, op: &str, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow!("{op}: {what} = {v} is over the kernels' 2^31 - 1 limit"))
}

/// Threads per block of the RoPE kernels (`ge_rope`, `ge_qkv_rope_write_kv`) for `pairs`
/// rotated pairs per row: they take eight pairs per step when `head_dim / 2` is a multiple of
/// 8, so fewer threads (and more blocks per SM) then.
pub(super) fn rope_block_threads(pairs: usize, head_dim: usize) -> u32 {
    if head_dim.is_multiple_of(16) {
        row_block_threads(pairs.div_ceil(8))
    } else {
        row_block_threads(pairs)
    }
}

/// Most rows per block of the RMSNorm kernels (one warp per row, `blockDim.x / 32` rows).
const NORM_ROWS_PER_BLOCK: usize = 8;

/// The launch of `ge_rms_norm` / `ge_add_rms_norm` over `rows` rows on `num_sms` SMs: as many
/// rows per block (at most [`NORM_ROWS_PER_BLOCK`]) as keep one block per SM or more, so that
/// a decode step's few hundred rows are read by every SM rather than by a quarter of them.
fn norm_rows_config(rows: usize, num_sms: usize) -> LaunchConfig {
    let per_block = rows.div_ceil(num_sms.max(1)).clamp(1, NORM_ROWS_PER_BLOCK);
    LaunchConfig {
        grid_dim: (rows.div_ceil(per_block) as u32, 1, 1),
        block_dim: (32 * per_block as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The CUDA backend: one device, its main stream (and a second one for the fused log-prob
/// ops' overlap), the kernels of `kernels/` and a cuBLASLt handle.
pub struct CudaBackend {
    /// cuBLASLt handle (and its workspace), used by one thread at a time.
    pub(super) gemm: Mutex<Gemm>,
    poison: bool,
    /// Whether the fused ops (`add_rms_norm`, `qkv_rope_write_kv`) run as one kernel each;
    /// `$GENIUS_CUDA_FUSED=0` runs them as their separate ops, for comparison.
    fused: bool,
    /// Whether the attention backward runs on the tensor-core kernels
    /// ([`CudaOptions::attention_tensor_cores`]).
    pub(super) attention_tensor_cores: bool,
    /// [`CudaOptions::attention_backward_split_heads`].
    pub(super) attention_backward_split_heads: bool,
    /// [`CudaOptions::attention_backward_forward_stats`].
    attention_backward_forward_stats: bool,
    /// The last RoPE `inv_freq` table uploaded (as f32 bits) and its device copy.
    pub(super) rope_table: Mutex<Option<(Vec<u32>, CudaSlice<f32>)>>,
    /// Rows per chunk of the log-prob ops (forward and backward); 0: by
    /// [`TARGET_LOGPROB_CHUNK_BYTES`]. See [`CudaBackend::set_logprob_chunk_rows`].
    pub(super) logprob_chunk_rows: std::sync::atomic::AtomicUsize,
    /// Whether `causal_attention` runs on the tensor-core kernel where it applies
    /// ([`CudaOptions::attention_forward_tensor_cores`]; see
    /// [`CudaBackend::set_attention_forward_tensor_cores`]).
    attn_fwd_tc: std::sync::atomic::AtomicBool,
    /// Whether paged attention runs on the tensor-core kernels
    /// ([`CudaOptions::paged_attention_tensor_cores`]; see
    /// [`CudaBackend::set_paged_attention_tensor_cores`]).
    paged_attn_tc: std::sync::atomic::AtomicBool,
    /// Whether `linear` runs on the skinny GEMM kernels where they apply
    /// ([`CudaOptions::skinny_gemm`]; see [`CudaBackend::set_skinny_gemm`]).
    skinny_gemm: std::sync::atomic::AtomicBool,
    /// Multiprocessors of the device (launch planning; 132 where the driver does not say).
    pub(super) sm_count: usize,
    /// Decode steps captured into CUDA graphs ([`super::graphs`]).
    pub(super) graphs: Mutex<DecodeGraphs>,
    /// Whether `linear` and the training GEMMs time cuBLASLt's candidate algorithms per
    /// shape ([`CudaOptions::tune_gemms`]).
    pub(super) tune_gemms: bool,
    /// [`CudaOptions::logprob_overlap`].
    pub(super) logprob_overlap: bool,
    /// [`CudaOptions::logprob_lse`].
    pub(super) logprob_lse: bool,
    /// The device, its stream and kernels. Last, so that it is dropped last: the graphs and
    /// plans above are destroyed while the kernel modules they use are still loaded.
    pub(super) gpu: GpuContext,
}

impl CudaBackend {
    /// Opens the device and loads every kernel; errors (no driver, no device, no cuBLASLt,
    /// a kernel that does not compile or load) say which.
    pub fn new(options: &CudaOptions) -> Result<Self> {
        let gpu = GpuContext::new(options)?;
        // SAFETY: only tries to load the library by its usual names.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            bail!("CUDA backend: no cuBLASLt library (libcublasLt.so) could be loaded");
        }
        gpu.ctx.bind_to_thread()?;
        let gemm = Gemm::new(gpu.stream.clone())?;
        let sm_count = {
            use cudarc::driver::sys::CUdevice_attribute_enum::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
            gpu.ctx
                .attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map(|n| n.max(1) as usize)
                .unwrap_or(132)
        };
        Ok(Self {
            gemm: Mutex::new(gemm),
            poison: options.poison_outputs,
            fused: std::env::var("GENIUS_CUDA_FUSED").map_or(true, |v| v != "0"),
            attention_tensor_cores: options.attention_tensor_cores,
            attention_backward_split_heads: options.attention_backward_split_heads,
            attention_backward_forward_stats: options.attention_backward_forward_stats,
            rope_table: Mutex::new(None),
            logprob_chunk_rows: std::sync::atomic::AtomicUsize::new(
                super::train_gemm::logprob_chunk_rows_from_env()?,
            ),
            attn_fwd_tc: std::sync::atomic::AtomicBool::new(options.attention_forward_tensor_cores),
            paged_attn_tc: std::sync::atomic::AtomicBool::new(options.paged_attention_tensor_cores),
            skinny_gemm: std::sync::atomic::AtomicBool::new(options.skinny_gemm),
            sm_count,
            tune_gemms: options.tune_gemms,
            logprob_overlap: options.logprob_overlap,
            logprob_lse: options.logprob_lse,
            graphs: Mutex::new(DecodeGraphs::new(
                options.decode_graphs,
                gpu.profile.is_some(),
                gpu.sync_after_launch,
            )),
            gpu,
        })
    }

    /// Whether outputs are NaN-filled before the kernels that write them
    /// ([`CudaOptions::poison_outputs`]).
    pub(super) fn poison_outputs(&self) -> bool {
        self.poison
    }

    /// Whether `causal_attention` runs on the tensor-core kernel where it applies.
    pub fn attention_forward_tensor_cores(&self) -> bool {
        self.attn_fwd_tc.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Switches `causal_attention` between the tensor-core kernel (where it applies) and the
    /// paged-attention kernel (for comparisons).
    pub fn set_attention_forward_tensor_cores(&self, on: bool) {
        self.attn_fwd_tc
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether paged attention runs on the tensor-core kernels.
    pub fn paged_attention_tensor_cores(&self) -> bool {
        self.paged_attn_tc
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Switches paged attention between the tensor-core and the CUDA-core kernels (for
    /// comparisons). Decode steps already captured into CUDA graphs keep the kernel they were
    /// captured with.
    pub fn set_paged_attention_tensor_cores(&self, on: bool) {
        self.paged_attn_tc
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether `linear` runs on the skinny GEMM kernels where they apply.
    pub fn skinny_gemm(&self) -> bool {
        self.skinny_gemm.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Switches `linear` between the skinny GEMM kernels (where they apply) and cuBLASLt
    /// (for comparisons). Decode steps already captured into CUDA graphs keep their GEMMs.
    pub fn set_skinny_gemm(&self, on: bool) {
        self.skinny_gemm
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// [`CudaBackend::new`] with [`CudaOptions::from_env`].
    pub fn from_env() -> Result<Self> {
        Self::new(&CudaOptions::from_env()?)
    }

    /// How each kernel unit was loaded (precompiled image or NVRTC, cache hit or not).
    pub fn kernel_units(&self) -> &[LoadedUnit] {
        self.gpu.registry.units()
    }

    /// Compute capability `(major, minor)` of the device.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.gpu.compute_capability
    }

    /// Total device memory in bytes.
    pub fn total_memory(&self) -> usize {
        self.gpu.total_memory
    }

    /// Waits for all queued work; reports any asynchronous error.
    pub fn synchronize(&self) -> Result<()> {
        self.gpu.sync("the queued work")
    }

    /// Device seconds per call of `f` (which queues device work), over `reps` calls back to
    /// back, timed by two events: the calls are queued behind memsets that keep the device
    /// busy while the host queues them, so the host's launch overhead leaves no idle gaps.
    /// If the device got to the first call before the host had queued the last (the delay
    /// was too short), the measurement is repeated with twice the delay, up to 4 times; then
    /// it is an error (for `bench gemm`).
    pub fn device_seconds_per_call(
        &self,
        reps: usize,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<f64> {
        let reps = reps.max(1);
        const SCRATCH_BYTES: usize = 256 << 20;
        let mut scratch = self.gpu.alloc::<u32>(SCRATCH_BYTES / 4)?;
        let p = self.gpu.ptr_mut(&mut scratch);
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut memsets = 4; // ~0.3 ms at 3 TB/s
        for _ in 0..5 {
            self.synchronize()?;
            for _ in 0..memsets {
                self.gpu.memset_u32(p, 0, SCRATCH_BYTES / 4)?;
            }
            let start = self.gpu.stream.record_event(flags)?;
            for _ in 0..reps {
                f()?;
            }
            let end = self.gpu.stream.record_event(flags)?;
            let queued_in_time = !start.try_is_complete()?;
            self.synchronize()?;
            if queued_in_time {
                return Ok(start.elapsed_ms(&end)? as f64 / 1e3 / reps as f64);
            }
            memsets *= 2;
        }
        bail!(
            "device_seconds_per_call: the host could not queue {reps} calls within {memsets} \
             memsets of {SCRATCH_BYTES} bytes; the device would have idled between them"
        )
    }

    /// Uploads `t` as an f32 device tensor (no rounding): for what must stay f32.
    pub fn upload_f32(&self, t: &HostTensor) -> Result<CudaTensor> {
        let s = self.gpu.upload_slice(&t.data)?;
        CudaTensor::new(DeviceData::F32(s), t.shape.clone())
    }

    /// A zero-filled f32 device tensor.
    pub fn zeros_f32(&self, shape: &[usize]) -> Result<CudaTensor> {
        let s = self.gpu.alloc_zeros::<f32>(numel(shape)?)?;
        CudaTensor::new(DeviceData::F32(s), shape.to_vec())
    }

    /// A new bf16 buffer for a kernel to write in full (NaN-filled first when poisoning).
    fn output_bf16(&self, len: usize) -> Result<CudaSlice<bf16>> {
        let mut s = self.gpu.alloc::<bf16>(len)?;
        if self.poison {
            let p = self.gpu.ptr_mut(&mut s);
            self.gpu.memset_u16(p, BF16_NAN_BITS, len)?;
        }
        Ok(s)
    }

    /// A new buffer of `dtype` for a kernel to write in full.
    pub(super) fn output(&self, dtype: DType, shape: Vec<usize>) -> Result<CudaTensor> {
        let len = numel(&shape)?;
        let data = match dtype {
            DType::Bf16 => DeviceData::Bf16(self.output_bf16(len)?),
            DType::F32 => {
                let mut s = self.gpu.alloc::<f32>(len)?;
                if self.poison {
                    let p = self.gpu.ptr_mut(&mut s);
                    self.gpu.memset_u32(p, F32_NAN_BITS, len)?;
                }
                DeviceData::F32(s)
            }
        };
        CudaTensor::new(data, shape)
    }

    /// Device address of a tensor's buffer, whatever its type.
    pub(super) fn addr(&self, t: &CudaTensor) -> u64 {
        match &t.data {
            DeviceData::Bf16(s) => self.gpu.ptr(s),
            DeviceData::F32(s) => self.gpu.ptr(s),
        }
    }

    /// Device address of a tensor's buffer that a kernel writes.
    pub(super) fn addr_mut(&self, t: &mut CudaTensor) -> u64 {
        match &mut t.data {
            DeviceData::Bf16(s) => self.gpu.ptr_mut(s),
            DeviceData::F32(s) => self.gpu.ptr_mut(s),
        }
    }

    /// `dst` rows = `src` rows at `indices` (each checked below `src`'s row count); the
    /// indices go up under the upload key `key`.
    fn gather(
        &self,
        op: &str,
        key: &'static str,
        src: &CudaTensor,
        indices: &[u32],
    ) -> Result<CudaTensor> {
        let (rows, width) = src.matrix();
        if let Some(&i) = indices.iter().find(|&&i| i as usize >= rows) {
            bail!("{op}: index {i} is outside the {rows} rows");
        }
        let mut out = self.output(src.dtype(), vec![indices.len(), width])?;
        if indices.is_empty() || width == 0 {
            return Ok(out);
        }
        let idx = self.gpu.upload_memo(key, indices)?;
        let a = args::GatherRowsArgs {
            src: self.addr(src),
            dst: self.addr_mut(&mut out),
            indices: idx,
            count: int(indices.len(), op, "rows")?,
            width: int(width, op, "width")?,
        };
        let kernel = match src.dtype() {
            DType::Bf16 => "ge_gather_rows_bf16",
            DType::F32 => "ge_gather_rows_f32",
        };
        // SAFETY: `src` is [rows, width] with every index below rows, `out` is
        // [count, width], `idx` holds `count` u32s; all live until the launch is queued
        // (frees are stream-ordered after it).
        // The kernel copies 16 bytes per step where it can: a thread per 16 bytes.
        let per_step = 16 / src.dtype().size();
        unsafe {
            self.gpu.launch(
                kernel,
                grid_stride_config((indices.len() * width).div_ceil(per_step)),
                &a,
            )
        }?;
        Ok(out)
    }

    /// Copies `cols` columns from column `src_col` of `src` into column `dst_col` of `dst`.
    #[allow(clippy::too_many_arguments)]
    fn copy_columns(
        &self,
        op: &str,
        src: &CudaTensor,
        src_col: usize,
        dst: &mut CudaTensor,
        dst_col: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let (src_width, dst_width) = (src.matrix().1, dst.matrix().1);
        debug_assert!(src_col + cols <= src_width && dst_col + cols <= dst_width);
        ensure!(
            src.dtype() == dst.dtype(),
            "{op}: mixed {} and {} tensors",
            src.dtype().name(),
            dst.dtype().name()
        );
        let a = args::CopyColumnsArgs {
            src: self.addr(src),
            dst: self.addr_mut(dst),
            rows: int(rows, op, "rows")?,
            cols: int(cols, op, "columns")?,
            src_width: int(src_width, op, "width")?,
            src_col: int(src_col, op, "column")?,
            dst_width: int(dst_width, op, "width")?,
            dst_col: int(dst_col, op, "column")?,
        };
        let kernel = match src.dtype() {
            DType::Bf16 => "ge_copy_columns_bf16",
            DType::F32 => "ge_copy_columns_f32",
        };
        // The kernel copies 16 bytes per step where it can: a thread per 16 bytes.
        let per_step = 16 / src.dtype().size();
        // SAFETY: both tensors have `rows` rows of their widths and the copied column ranges
        // lie inside them (checked by the callers).
        unsafe {
            self.gpu.launch(
                kernel,
                grid_stride_config((rows * cols).div_ceil(per_step)),
                &a,
            )
        }
    }

    /// The device copy of `inv_freq`, uploaded when it differs from the last one.
    pub(super) fn with_inv_freq<R>(
        &self,
        inv_freq: &[f32],
        f: impl FnOnce(&CudaSlice<f32>) -> Result<R>,
    ) -> Result<R> {
        let bits: Vec<u32> = inv_freq.iter().map(|v| v.to_bits()).collect();
        let mut cache = self
            .rope_table
            .lock()
            .map_err(|_| anyhow!("rope: the inv_freq cache lock is poisoned"))?;
        if cache.as_ref().is_none_or(|(b, _)| *b != bits) {
            let table = self.gpu.upload_slice(inv_freq)?;
            *cache = Some((bits, table));
        }
        let (_, table) = cache.as_ref().expect("filled above");
        f(table)
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Linear = CudaLinear;

    fn name(&self) -> String {
        let (major, minor) = self.gpu.compute_capability;
        format!("cuda ({}, sm_{major}{minor}, bf16)", self.gpu.name)
    }

    fn element_bytes(&self) -> usize {
        2
    }

    fn memory_info(&self) -> Option<(usize, usize)> {
        self.gpu.ctx.bind_to_thread().ok()?;
        cudarc::driver::result::mem_get_info().ok()
    }

    fn upload(&self, t: &HostTensor) -> Result<CudaTensor> {
        let s = self.gpu.upload_slice(&to_bf16(&t.data))?;
        CudaTensor::new(DeviceData::Bf16(s), t.shape.clone())
    }

    fn download(&self, t: &CudaTensor) -> Result<HostTensor> {
        let data = match &t.data {
            DeviceData::Bf16(s) => from_bf16(&self.gpu.download_slice(s, t.numel())?),
            DeviceData::F32(s) => self.gpu.download_slice(s, t.numel())?,
        };
        Ok(HostTensor::new(t.shape.clone(), data))
    }

    fn shape<'a>(&self, t: &'a CudaTensor) -> &'a [usize] {
        &t.shape
    }

    fn upload_linear(&self, w: &HostTensor) -> Result<CudaLinear> {
        ensure!(
            w.shape.len() == 2,
            "linear weight must be 2-D [out, in], got shape {:?}",
            w.shape
        );
        Ok(CudaLinear {
            weight: self.gpu.upload_slice(&to_bf16(&w.data))?,
            out_features: w.shape[0],
            in_features: w.shape[1],
        })
    }

    fn download_linear(&self, w: &CudaLinear) -> Result<HostTensor> {
        Ok(HostTensor::new(
            vec![w.out_features, w.in_features],
            from_bf16(
                &self
                    .gpu
                    .download_slice(&w.weight, w.out_features * w.in_features)?,
            ),
        ))
    }

    fn linear_shape(&self, w: &CudaLinear) -> [usize; 2] {
        [w.out_features, w.in_features]
    }

    fn embedding(&self, table: &CudaTensor, ids: &[u32]) -> Result<CudaTensor> {
        let (vocab, _) = table.matrix();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("token id {id} is outside the vocabulary ({vocab} entries)");
        }
        table.bf16("embedding")?;
        // The lookup is a row gather of the table.
        self.gather("embedding", keys::EMBEDDING_IDS, table, ids)
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        let (rows, dim) = x.matrix();
        ensure!(
            weight.numel() == dim,
            "rms_norm: weight has {} entries, x rows {dim}",
            weight.numel()
        );
        let xs = x.bf16("rms_norm")?;
        let ws = weight.bf16("rms_norm (weight)")?;
        let mut out = self.output(DType::Bf16, x.shape.clone())?;
        if rows == 0 || dim == 0 {
            return Ok(out);
        }
        let a = args::RmsNormArgs {
            x: self.gpu.ptr(xs),
            weight: self.gpu.ptr(ws),
            out: self.addr_mut(&mut out),
            rows: int(rows, "rms_norm", "rows")?,
            dim: int(dim, "rms_norm", "dim")?,
            eps,
        };
        // SAFETY: x and out are [rows, dim] bf16 (whole buffers, so 16-byte aligned rows
        // when dim % 8 == 0), weight is [dim] bf16; one warp per row.
        unsafe {
            self.gpu
                .launch("ge_rms_norm", norm_rows_config(rows, self.num_sms()), &a)
        }?;
        Ok(out)
    }

    fn add_rms_norm(
        &self,
        x: &mut CudaTensor,
        y: &CudaTensor,
        weight: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        if !self.fused {
            return add_rms_norm_composed(self, x, y, weight, eps);
        }
        let (rows, dim) = x.matrix();
        ensure!(
            y.shape == x.shape,
            "add_rms_norm: x is {:?} but y is {:?}",
            x.shape,
            y.shape
        );
        ensure!(
            weight.numel() == dim,
            "add_rms_norm: weight has {} entries, x rows {dim}",
            weight.numel()
        );
        let ys = self.gpu.ptr(y.bf16("add_rms_norm (y)")?);
        let ws = self.gpu.ptr(weight.bf16("add_rms_norm (weight)")?);
        let mut out = self.output(DType::Bf16, x.shape.clone())?;
        if rows == 0 || dim == 0 {
            return Ok(out);
        }
        let a = args::AddRmsNormArgs {
            x: self.gpu.ptr_mut(x.bf16_mut("add_rms_norm (x)")?),
            y: ys,
            weight: ws,
            out: self.addr_mut(&mut out),
            rows: int(rows, "add_rms_norm", "rows")?,
            dim: int(dim, "add_rms_norm", "dim")?,
            eps,
        };
        // SAFETY: x, y and out are [rows, dim] bf16 whole buffers (x written in place, out
        // separate), weight is [dim] bf16; one warp per row, as ge_rms_norm (so the sums
        // match).
        unsafe {
            self.gpu.launch(
                "ge_add_rms_norm",
                norm_rows_config(rows, self.num_sms()),
                &a,
            )
        }?;
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn qkv_rope_write_kv(
        &self,
        qkv: &CudaTensor,
        q_width: usize,
        kv_width: usize,
        positions: &[u32],
        head_dim: usize,
        inv_freq: &[f32],
        k_pool: &mut CudaTensor,
        v_pool: &mut CudaTensor,
        slots: &[u32],
    ) -> Result<CudaTensor> {
        if !self.fused {
            return qkv_rope_write_kv_composed(
                self, qkv, q_width, kv_width, positions, head_dim, inv_freq, k_pool, v_pool, slots,
            );
        }
        let op = "qkv_rope_write_kv";
        let (n, w) = qkv.matrix();
        ensure!(
            w == q_width + 2 * kv_width,
            "{op}: qkv has {w} columns, want {q_width} + 2 x {kv_width}"
        );
        ensure!(
            n == positions.len() && n == slots.len(),
            "{op}: {n} rows, {} positions, {} slots",
            positions.len(),
            slots.len()
        );
        ensure!(
            head_dim > 0
                && q_width.is_multiple_of(head_dim)
                && kv_width.is_multiple_of(head_dim)
                && inv_freq.len() * 2 == head_dim,
            "{op}: bad head_dim {head_dim} for widths {q_width} / {kv_width} and {} frequencies",
            inv_freq.len()
        );
        let (pool_rows, pool_w) = k_pool.matrix();
        ensure!(
            pool_w == kv_width && v_pool.shape == k_pool.shape,
            "{op}: pools {:?} / {:?} for kv width {kv_width}",
            k_pool.shape,
            v_pool.shape
        );
        super::attention::check_slots(op, slots, pool_rows)?;
        let mut q = self.output(DType::Bf16, vec![n, q_width])?;
        if n == 0 {
            return Ok(q);
        }
        let src = self.gpu.ptr(qkv.bf16(op)?);
        let pos = self.gpu.upload_memo(keys::ROPE_POSITIONS, positions)?;
        let slot_addr = self.gpu.upload_memo(keys::WRITE_KV_SLOTS, slots)?;
        let kp = self.gpu.ptr_mut(k_pool.bf16_mut(op)?);
        let vp = self.gpu.ptr_mut(v_pool.bf16_mut(op)?);
        let qp = self.addr_mut(&mut q);
        self.with_inv_freq(inv_freq, |table| {
            let a = args::QkvRopeArgs {
                qkv: src,
                q_out: qp,
                k_pool: kp,
                v_pool: vp,
                positions: pos,
                slots: slot_addr,
                inv_freq: self.gpu.ptr(table),
                rows: int(n, op, "rows")?,
                q_width: int(q_width, op, "q width")?,
                kv_width: int(kv_width, op, "kv width")?,
                head_dim: int(head_dim, op, "head_dim")?,
            };
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (rope_block_threads((q_width + kv_width) / 2, head_dim), 1, 1),
                shared_mem_bytes: (head_dim * std::mem::size_of::<f32>()) as u32,
            };
            // SAFETY: qkv is [n, q_width + 2 kv_width] bf16, q [n, q_width] bf16, the pools
            // [pool_rows, kv_width] bf16 with every slot below pool_rows; positions and slots
            // hold n u32s, the table head_dim / 2 f32s; the shared table is head_dim floats.
            unsafe { self.gpu.launch("ge_qkv_rope_write_kv", cfg, &a) }
        })?;
        Ok(q)
    }

    fn linear(
        &self,
        x: &CudaTensor,
        weight: &CudaLinear,
        bias: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        let (n, k) = x.matrix();
        let (m, k2) = (weight.out_features, weight.in_features);
        ensure!(k == k2, "linear: x has {k} columns, weight has {k2}");
        ensure!(k > 0, "linear: the weight has no input features");
        let xs = x.bf16("linear")?;
        let bs = match bias {
            Some(b) => {
                ensure!(
                    b.numel() == m,
                    "linear: bias has {} entries, want {m}",
                    b.numel()
                );
                Some(b.bf16("linear (bias)")?)
            }
            None => None,
        };
        let mut out = self.output_bf16(n * m)?;
        let skinny = if self.skinny_gemm() {
            super::skinny_gemm::plan_skinny_gemm(n, m, k, self.num_sms())
        } else {
            None
        };
        if let Some(plan) = skinny {
            let x_ptr = self.gpu.ptr(xs);
            let w_ptr = self.gpu.ptr(&weight.weight);
            let b_ptr = bs.map(|b| self.gpu.ptr(b));
            let y_ptr = self.gpu.ptr_mut(&mut out);
            // SAFETY: w is [m, k], x is [n, k], out is [n, m] and bias is [m], all bf16 and
            // live until the stream has run the kernels (frees are stream-ordered).
            unsafe { self.skinny_linear(&plan, x_ptr, w_ptr, b_ptr, y_ptr, n, m, k) }?;
        } else if n > 0 && m > 0 {
            let shape = GemmShape {
                rows: n,
                out: m,
                inp: k,
                bias: bs.is_some(),
            };
            let x_ptr = self.gpu.ptr(xs);
            let w_ptr = self.gpu.ptr(&weight.weight);
            let b_ptr = bs.map(|b| self.gpu.ptr(b));
            let y_ptr = self.gpu.ptr_mut(&mut out);
            let mut gemm = self
                .gemm
                .lock()
                .map_err(|_| anyhow!("linear: the cuBLASLt handle's lock is poisoned"))?;
            self.gpu.ctx.bind_to_thread()?;
            let timing = self.gpu.profile_start()?;
            // SAFETY: w is [m, k], x is [n, k], out is [n, m] and bias is [m], all bf16 and
            // live until the stream has run the GEMM (frees are stream-ordered).
            // Timing candidates waits on the stream, which a graph capture forbids.
            let tune = self.tune_gemms && !self.gpu.capturing();
            let done = unsafe { gemm.run(shape, x_ptr, w_ptr, b_ptr, y_ptr, tune) };
            self.gpu.profile_end(timing, gemm_profile_name(shape))?;
            done.map_err(|e| {
                anyhow!(
                    "linear: bf16 GEMM [{n}, {k}] x [{m}, {k}]^T{}: {e:#}",
                    if bs.is_some() { " + bias" } else { "" }
                )
            })?;
            if self.gpu.sync_after_launch {
                self.gpu.sync("the cuBLASLt GEMM of linear")?;
            }
        }
        CudaTensor::new(DeviceData::Bf16(out), vec![n, m])
    }

    fn rope(
        &self,
        x: &mut CudaTensor,
        positions: &[u32],
        head_dim: usize,
        inv_freq: &[f32],
    ) -> Result<()> {
        let (n, w) = x.matrix();
        ensure!(
            n == positions.len(),
            "rope: {n} rows but {} positions",
            positions.len()
        );
        ensure!(
            head_dim > 0 && w % head_dim == 0 && inv_freq.len() * 2 == head_dim,
            "rope: bad head_dim {head_dim} for width {w} and {} frequencies",
            inv_freq.len()
        );
        if n == 0 || w == 0 {
            return Ok(());
        }
        let pos = self.gpu.upload_memo(keys::ROPE_POSITIONS, positions)?;
        let xp = self.gpu.ptr_mut(x.bf16_mut("rope")?);
        self.with_inv_freq(inv_freq, |table| {
            let a = args::RopeArgs {
                x: xp,
                positions: pos,
                inv_freq: self.gpu.ptr(table),
                rows: int(n, "rope", "rows")?,
                width: int(w, "rope", "width")?,
                head_dim: int(head_dim, "rope", "head_dim")?,
                inverse: 0,
            };
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (rope_block_threads(w / 2, head_dim), 1, 1),
                shared_mem_bytes: (head_dim * std::mem::size_of::<f32>()) as u32,
            };
            // SAFETY: x is [n, w] bf16 with w a multiple of head_dim, positions has n u32s,
            // the table head_dim / 2 f32s; the shared table is head_dim floats.
            unsafe { self.gpu.launch("ge_rope", cfg, &a) }
        })
    }

    // The KV cache and attention live in attention.rs.
    fn causal_attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        seqs: &[SeqSpan],
        shape: AttentionShape,
    ) -> Result<CudaTensor> {
        self.attn_causal(q, k, v, seqs, shape)
    }

    fn kv_pool(&self, num_blocks: usize, block_size: usize, width: usize) -> Result<CudaTensor> {
        self.attn_kv_pool(num_blocks, block_size, width)
    }

    fn write_kv(
        &self,
        k_pool: &mut CudaTensor,
        v_pool: &mut CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        slots: &[u32],
    ) -> Result<()> {
        self.attn_write_kv(k_pool, v_pool, k, v, slots)
    }

    fn copy_blocks(
        &self,
        pool: &mut CudaTensor,
        copies: &[(u32, u32)],
        block_size: usize,
    ) -> Result<()> {
        self.attn_copy_blocks(pool, copies, block_size)
    }

    fn paged_attention(
        &self,
        q: &CudaTensor,
        k_pool: &CudaTensor,
        v_pool: &CudaTensor,
        seqs: &[PagedSeq<'_>],
        shape: AttentionShape,
        block_size: usize,
    ) -> Result<CudaTensor> {
        self.attn_paged(q, k_pool, v_pool, seqs, shape, block_size)
    }

    fn swiglu(&self, gate_up: &CudaTensor) -> Result<CudaTensor> {
        let (n, w) = gate_up.matrix();
        ensure!(w.is_multiple_of(2), "swiglu: fused width {w} is odd");
        let inner = w / 2;
        let gs = gate_up.bf16("swiglu")?;
        let mut out = self.output(DType::Bf16, vec![n, inner])?;
        if n == 0 || inner == 0 {
            return Ok(out);
        }
        let a = args::SwigluArgs {
            gate_up: self.gpu.ptr(gs),
            out: self.addr_mut(&mut out),
            rows: int(n, "swiglu", "rows")?,
            inner: int(inner, "swiglu", "width")?,
        };
        // SAFETY: gate_up is [n, 2 inner] bf16, out [n, inner] bf16, both whole allocations
        // (256-byte aligned, as the kernel's 16-byte loads need when inner % 8 == 0).
        unsafe {
            self.gpu.launch(
                "ge_swiglu",
                grid_stride_config(super::context::swiglu_lanes(n, inner)),
                &a,
            )
        }?;
        Ok(out)
    }

    fn split_columns(&self, x: &CudaTensor, widths: &[usize]) -> Result<Vec<CudaTensor>> {
        let (n, w) = x.matrix();
        ensure!(
            widths.iter().sum::<usize>() == w,
            "split_columns: widths {widths:?} vs {w}"
        );
        let mut outs = Vec::with_capacity(widths.len());
        let mut at = 0;
        for &c in widths {
            let mut part = self.output(x.dtype(), vec![n, c])?;
            self.copy_columns("split_columns", x, at, &mut part, 0, n, c)?;
            outs.push(part);
            at += c;
        }
        Ok(outs)
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        ensure!(
            x.shape == y.shape,
            "add: shapes {:?} and {:?} differ",
            x.shape,
            y.shape
        );
        let kernel = match (x.dtype(), y.dtype()) {
            (DType::Bf16, DType::Bf16) => "ge_add_assign_bf16",
            (DType::F32, DType::F32) => "ge_add_assign_f32",
            (DType::F32, DType::Bf16) => "ge_add_assign_f32_bf16",
            (DType::Bf16, DType::F32) => {
                bail!("add: adding an f32 tensor into a bf16 one would round it; not supported")
            }
        };
        let n = x.numel();
        if n == 0 {
            return Ok(());
        }
        let a = args::AddAssignArgs {
            x: self.addr_mut(x),
            y: self.addr(y),
            n: n as i64,
        };
        // SAFETY: x and y hold n elements of the kernel's types; a thread per eight (the
        // kernel's step where aligned).
        unsafe {
            self.gpu
                .launch(kernel, grid_stride_config(n.div_ceil(8)), &a)
        }
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
        let n = x.matrix().0;
        let mut idx = Vec::with_capacity(rows.len());
        for &r in rows {
            ensure!(r < n, "gather_rows: row {r} of {n}");
            idx.push(u32::try_from(r).context("gather_rows: row index over u32")?);
        }
        self.gather("gather_rows", keys::GATHER_ROWS, x, &idx)
    }

    fn target_logprobs(
        &self,
        hidden: &CudaTensor,
        lm_head: &CudaLinear,
        targets: &[u32],
    ) -> Result<Vec<f32>> {
        Ok(self
            .train_target_logprobs(hidden, lm_head, targets, false)?
            .0)
    }

    fn target_logprobs_with_lse(
        &self,
        hidden: &CudaTensor,
        lm_head: &CudaLinear,
        targets: &[u32],
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        self.train_target_logprobs(hidden, lm_head, targets, self.logprob_lse)
    }

    fn sample_rows(&self, logits: &CudaTensor, rows: &[RowSampling]) -> Result<Vec<SampledToken>> {
        // Greedy, plain and top-k / top-p sampling all run in the kernel: one launch, one
        // download.
        self.sample_rows_kernel(logits, rows)
    }

    fn zeros(&self, shape: &[usize]) -> Result<CudaTensor> {
        let s = self.gpu.alloc_zeros::<bf16>(numel(shape)?)?;
        CudaTensor::new(DeviceData::Bf16(s), shape.to_vec())
    }

    fn copy(&self, x: &CudaTensor) -> Result<CudaTensor> {
        // Whole buffers (an empty tensor's one placeholder element included).
        let data = match &x.data {
            DeviceData::Bf16(s) => DeviceData::Bf16(self.gpu.stream.clone_dtod(s)?),
            DeviceData::F32(s) => DeviceData::F32(self.gpu.stream.clone_dtod(s)?),
        };
        CudaTensor::new(data, x.shape.clone())
    }

    fn fill_zero(&self, x: &mut CudaTensor) -> Result<()> {
        match &mut x.data {
            DeviceData::Bf16(s) => self.gpu.stream.memset_zeros(s)?,
            DeviceData::F32(s) => self.gpu.stream.memset_zeros(s)?,
        }
        Ok(())
    }

    fn scale(&self, x: &mut CudaTensor, s: f32) -> Result<()> {
        let n = x.numel();
        if n == 0 {
            return Ok(());
        }
        let kernel = match x.dtype() {
            DType::Bf16 => "ge_scale_bf16",
            DType::F32 => "ge_scale_f32",
        };
        let a = args::ScaleArgs {
            x: self.addr_mut(x),
            n: n as i64,
            factor: s,
        };
        // SAFETY: x holds n elements of the kernel's type; a thread per eight (the kernel's
        // step where aligned).
        unsafe {
            self.gpu
                .launch(kernel, grid_stride_config(n.div_ceil(8)), &a)
        }
    }

    fn sum_squares(&self, x: &CudaTensor) -> Result<f64> {
        self.train_sum_squares(x)
    }

    fn sum_squares_many(&self, xs: &[&CudaTensor]) -> Result<f64> {
        self.train_sum_squares_many(xs)
    }

    fn zeros_f32(&self, shape: &[usize]) -> Result<CudaTensor> {
        CudaBackend::zeros_f32(self, shape)
    }

    fn pair_losses(
        &self,
        row_logprobs: &[f32],
        rows: &[(std::ops::Range<usize>, std::ops::Range<usize>)],
        pairs: &[crate::genius::loss::PairLogps],
        cfg: &crate::genius::loss::LossConfig,
    ) -> Result<
        Vec<(
            crate::genius::loss::PairLogps,
            crate::genius::loss::PairLoss,
        )>,
    > {
        self.pair_losses_kernel(row_logprobs, rows, pairs, cfg)
    }

    fn reset_profile(&self) {
        if let Some(p) = &self.gpu.profile {
            let _ = self.gpu.sync("the profiled work");
            if let Ok(mut p) = p.lock() {
                p.reset();
            }
        }
    }

    fn tensor_to_f32(&self, t: &CudaTensor) -> Result<CudaTensor> {
        self.train_to_f32(t)
    }

    fn linear_to_f32(&self, w: &CudaLinear) -> Result<CudaTensor> {
        self.train_linear_to_f32(w)
    }

    fn release_cached_memory(&self) -> Result<()> {
        self.synchronize()?;
        self.release_graphs()?;
        super::context::trim_pool_memory(&self.gpu.ctx)
    }

    fn decode_step(
        &self,
        batch: &PagedBatch,
        sampling: &[RowSampling],
        weights: &Weights<CudaTensor, CudaLinear>,
        cache: &mut KvCache<CudaTensor>,
        run: &mut DecodeRun<'_, CudaTensor>,
    ) -> Result<Vec<SampledToken>> {
        self.graph_decode_step(batch, sampling, weights, cache, run)
    }

    fn decode_graph_stats(&self) -> Option<crate::backend::DecodeGraphStats> {
        Some(self.graph_stats())
    }

    fn split_mixed_steps(&self) -> bool {
        // Worth a second pass only while decode steps replay from graphs.
        self.graphs_on()
    }

    fn upload_f32(&self, t: &HostTensor) -> Result<CudaTensor> {
        CudaBackend::upload_f32(self, t)
    }

    fn adamw_update(
        &self,
        master: &mut CudaTensor,
        m: &mut CudaTensor,
        v: &mut CudaTensor,
        grad: &CudaTensor,
        step: &crate::backend::AdamWStep,
    ) -> Result<()> {
        self.train_adamw_update(master, m, v, grad, step, None)
    }

    fn adamw_update_tensor(
        &self,
        master: &mut CudaTensor,
        m: &mut CudaTensor,
        v: &mut CudaTensor,
        grad: &CudaTensor,
        step: &crate::backend::AdamWStep,
        dst: &mut CudaTensor,
    ) -> Result<()> {
        if dst.dtype() == DType::Bf16 && dst.numel() == master.numel() {
            // The working copy written by the update's own pass.
            let out = self.addr_mut(dst);
            self.train_adamw_update(master, m, v, grad, step, Some(out))?;
            dst.shape = master.shape.clone();
            Ok(())
        } else {
            self.train_adamw_update(master, m, v, grad, step, None)?;
            self.train_assign_tensor(dst, master)
        }
    }

    fn adamw_update_linear(
        &self,
        master: &mut CudaTensor,
        m: &mut CudaTensor,
        v: &mut CudaTensor,
        grad: &CudaTensor,
        step: &crate::backend::AdamWStep,
        dst: &mut CudaLinear,
    ) -> Result<()> {
        let (out, inp) = (dst.out_features, dst.in_features);
        ensure!(
            master.shape == [out, inp],
            "adamw_update_linear: weight [{out}, {inp}] for a master copy {:?}",
            master.shape
        );
        let p = self.gpu.ptr_mut(&mut dst.weight);
        self.train_adamw_update(master, m, v, grad, step, Some(p))
    }

    fn assign_tensor(&self, dst: &mut CudaTensor, master: &CudaTensor) -> Result<()> {
        self.train_assign_tensor(dst, master)
    }

    fn assign_linear(&self, dst: &mut CudaLinear, master: &CudaTensor) -> Result<()> {
        self.train_assign_linear(dst, master)
    }

    fn concat_columns(&self, parts: &[&CudaTensor]) -> Result<CudaTensor> {
        ensure!(!parts.is_empty(), "concat_columns: no tensors");
        let n = parts[0].matrix().0;
        let dtype = parts[0].dtype();
        let mut widths = Vec::with_capacity(parts.len());
        for p in parts {
            let (rows, w) = p.matrix();
            ensure!(
                rows == n,
                "concat_columns: {rows} rows vs {n} (shapes {:?} and {:?})",
                p.shape,
                parts[0].shape
            );
            ensure!(
                p.dtype() == dtype,
                "concat_columns: mixed {} and {} tensors",
                dtype.name(),
                p.dtype().name()
            );
            widths.push(w);
        }
        let total: usize = widths.iter().sum();
        let mut out = self.output(dtype, vec![n, total])?;
        let mut at = 0;
        for (p, &w) in parts.iter().zip(&widths) {
            self.copy_columns("concat_columns", p, 0, &mut out, at, n, w)?;
            at += w;
        }
        Ok(out)
    }

    fn scatter_add_rows(
        &self,
        dst: &mut CudaTensor,
        rows: &[usize],
        src: &CudaTensor,
    ) -> Result<()> {
        self.train_scatter_add_rows(dst, rows, src)
    }

    fn linear_backward_input(&self, dy: &CudaTensor, w: &CudaLinear) -> Result<CudaTensor> {
        self.train_linear_backward_input(dy, w)
    }

    fn accumulate_linear_grad(
        &self,
        grad: &mut CudaTensor,
        x: &CudaTensor,
        dy: &CudaTensor,
    ) -> Result<()> {
        self.train_accumulate_linear_grad(grad, x, dy)
    }

    fn accumulate_bias_grad(&self, grad: &mut CudaTensor, dy: &CudaTensor) -> Result<()> {
        self.train_accumulate_bias_grad(grad, dy)
    }

    fn rms_norm_backward(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        eps: f32,
        dy: &CudaTensor,
        weight_grad: &mut CudaTensor,
    ) -> Result<CudaTensor> {
        self.train_rms_norm_backward(x, weight, eps, dy, weight_grad)
    }

    fn rope_backward(
        &self,
        dx: &mut CudaTensor,
        positions: &[u32],
        head_dim: usize,
        inv_freq: &[f32],
    ) -> Result<()> {
        self.train_rope_backward(dx, positions, head_dim, inv_freq)
    }

    fn swiglu_backward(&self, gate_up: &CudaTensor, dy: &CudaTensor) -> Result<CudaTensor> {
        self.train_swiglu_backward(gate_up, dy)
    }

    fn embedding_backward(
        &self,
        grad: &mut CudaTensor,
        ids: &[u32],
        dy: &CudaTensor,
    ) -> Result<()> {
        self.train_embedding_backward(grad, ids, dy)
    }

    fn causal_attention_backward(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        dout: &CudaTensor,
        seqs: &[SeqSpan],
        shape: AttentionShape,
    ) -> Result<(CudaTensor, CudaTensor, CudaTensor)> {
        self.attn_causal_backward(q, k, v, dout, None, seqs, shape)
    }

    fn causal_attention_for_training(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        seqs: &[SeqSpan],
        shape: AttentionShape,
    ) -> Result<(CudaTensor, Option<CudaTensor>)> {
        // The statistics serve the tensor-core backward; they come with the tensor-core
        // forward.
        if self.attention_tensor_cores
            && self.attention_backward_forward_stats
            && self.attn_fwd_tc_applies(seqs, q.matrix().0, shape)
        {
            let (out, lse) = self.attn_causal_tc(q, k, v, seqs, shape, true)?;
            return Ok((out, lse));
        }
        Ok((self.attn_causal(q, k, v, seqs, shape)?, None))
    }

    #[allow(clippy::too_many_arguments)]
    fn causal_attention_backward_with(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        dout: &CudaTensor,
        out: &CudaTensor,
        stats: &CudaTensor,
        seqs: &[SeqSpan],
        shape: AttentionShape,
    ) -> Result<(CudaTensor, CudaTensor, CudaTensor)> {
        self.attn_causal_backward(q, k, v, dout, Some((out, stats)), seqs, shape)
    }

    fn target_logprobs_backward(
        &self,
        hidden: &CudaTensor,
        lm_head: &CudaLinear,
        targets: &[u32],
        d_logprob: &[f32],
        lse: Option<&[f32]>,
        lm_head_grad: &mut CudaTensor,
    ) -> Result<CudaTensor> {
        self.train_target_logprobs_backward(hidden, lm_head, targets, d_logprob, lse, lm_head_grad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_blocks_spread_few_rows_over_the_sms() {
        let shape = |rows| {
            let c = norm_rows_config(rows, 132);
            (c.grid_dim.0, c.block_dim.0)
        };
        // A decode step of 256 rows: two rows (warps) per block, 128 blocks.
        assert_eq!(shape(256), (128, 64));
        // Few rows: one per block; many: eight per block.
        assert_eq!(shape(5), (5, 32));
        assert_eq!(shape(8192), (1024, 256));
        // Every row has a warp.
        for rows in [1, 131, 133, 1000, 1057] {
            let c = norm_rows_config(rows, 132);
            assert!(c.grid_dim.0 as usize * (c.block_dim.0 as usize / 32) >= rows);
            assert!(c.block_dim.0 <= 256);
        }
    }

    #[test]
    fn every_op_is_listed_once_as_on_cuda_or_not_yet() {
        let mut all: Vec<&str> = ON_CUDA.iter().chain(NOT_YET_ON_CUDA).copied().collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "an op is listed twice");
        // The Backend trait's methods, less `name`, `shape` and `linear_shape` (no device work).
        let trait_src = include_str!("../mod.rs");
        let start = trait_src.find("pub trait Backend").unwrap();
        let mut methods: Vec<&str> = trait_src[start..]
            .match_indices("    fn ")
            .map(|(at, _)| {
                let rest = &trait_src[start + at + 7..];
                &rest[..rest.find(['(', '<']).unwrap()]
            })
            .filter(|m| !["name", "shape", "linear_shape"].contains(m))
            .collect();
        methods.sort();
        assert_eq!(methods, all);
    }
}
