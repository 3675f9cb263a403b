//! The CUDA backend. cudarc is built with dynamic loading and panics if libcuda is absent, so
//! [`probe_devices`] finds out first, without panicking, whether a driver and devices are
//! usable; nothing else here touches the driver before it says yes.
//!
//! - [`kernels`]: where device code comes from (embedded sources, nvcc's ahead-of-time PTX and
//!   cubins, NVRTC with an on-disk cache) and the list of every kernel; host-only, tested on
//!   the CPU.
//! - [`args`]: the kernels' argument structs, generated from `kernels/args.h` by bindgen.
//! - [`gemm`]: bf16 GEMMs through cuBLASLt with plans cached per shape.
//! - [`context`]: device selection, the backend's streams (the main one; a second one for
//!   the fused log-prob ops' overlap), the kernel registry, launches.
//! - [`sampling`]: greedy, unfiltered and top-k / top-p token sampling on the GPU
//!   ([`CudaBackend::sample_rows_kernel`], what the backend's `sample_rows` runs).
//! - [`tensor`]: [`CudaTensor`] (bf16 or f32 device buffers) and [`CudaLinear`] (bf16 weights).
//! - [`train_gemm`]: the GEMM-shaped training ops (linear input / weight / bias gradients,
//!   `sum_squares`, the log-prob backward), cuBLASLt GEMMs into f32 gradients plus the
//!   reductions of `kernels/train_gemm.cu`.
//! - [`train_elementwise`]: the row-wise and elementwise training ops (scatter-adds, the
//!   RMSNorm / RoPE / SwiGLU / embedding backwards, the fused AdamW update and the on-device
//!   f32 -> bf16 parameter assignment), kernels in `kernels/backward.cu` and `kernels/optim.cu`.
//! - [`attention_backward`]: the backward of causal attention (FlashAttention-2 style,
//!   deterministic: a dq kernel that also recomputes the softmax statistics, then a dk/dv
//!   kernel per key tile and kv head).
//! - [`attention_tc`]: the forward of causal attention on tensor cores (FlashAttention-2 style,
//!   `mma.sync` m16n8k16 bf16), what `causal_attention` runs for head_dim 64 / 128 unless
//!   [`CudaOptions::attention_forward_tensor_cores`] is off; also the log-sum-exp per row.
//! - [`graphs`]: decode steps captured into CUDA graphs per batch-size bucket and replayed
//!   ([`crate::backend::Backend::decode_step`]).
//! - [`loss`]: the preference losses of a micro-batch (per-sequence log-prob sums, ACO, DPO,
//!   SimPO, IPO, SFT) in `kernels/loss.cu`.
//! - [`backend`]: [`CudaBackend`], the [`crate::backend::Backend`] implementation. The whole
//!   trait runs on the GPU ([`ON_CUDA`]: the forward pass, paged attention, log-probs,
//!   sampling, every backward op and AdamW); [`NOT_YET_ON_CUDA`] lists what does not (empty).

#[allow(non_camel_case_types, non_snake_case, non_upper_case_globals)]
pub mod args;
pub mod attention;
pub mod attention_backward;
pub mod attention_tc;
pub mod backend;
pub mod context;
pub mod gemm;
pub mod graphs;
pub mod kernels;
pub mod loss;
pub mod sampling;
pub mod skinny_gemm;
pub mod tensor;
pub mod train_elementwise;
pub mod train_gemm;

pub use backend::{CudaBackend, NOT_YET_ON_CUDA, ON_CUDA, TARGET_LOGPROB_CHUNK_BYTES};
pub use context::CudaOptions;
pub use kernels::KernelSourcePolicy;
pub use sampling::RowSampling;
pub use tensor::{CudaLinear, CudaTensor, DType};

/// A CUDA device the driver reports.
#[derive(Debug, Clone)]
pub struct CudaDeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_memory: usize,
}

/// One line on what the CUDA backend can do in this build (for `genius-engine info`).
pub fn readiness() -> String {
    format!(
        "CUDA backend: {} of {} backend ops on the GPU (the forward pass, paged KV, log-probs, \
         sampling with top-k/top-p, every backward op and AdamW); every command runs with \
         --device cuda",
        ON_CUDA.len(),
        ON_CUDA.len() + NOT_YET_ON_CUDA.len()
    )
}

/// Devices usable through the CUDA driver, or why none are.
pub fn probe_devices() -> Result<Vec<CudaDeviceInfo>, String> {
    let lib_names = ["libcuda.so.1", "libcuda.so", "nvcuda.dll"];
    // SAFETY: loading the system's CUDA driver library runs its initialisers, as any CUDA
    // program does; nothing else is called through this handle.
    let found = lib_names
        .iter()
        .any(|n| unsafe { libloading::Library::new(*n) }.is_ok());
    if !found {
        return Err("no CUDA driver library (libcuda.so.1) on this machine".into());
    }
    let probe = std::panic::catch_unwind(|| -> Result<Vec<CudaDeviceInfo>, String> {
        use cudarc::driver::result;
        result::init().map_err(|e| format!("cuInit failed: {e}"))?;
        let n = result::device::get_count().map_err(|e| format!("cuDeviceGetCount: {e}"))?;
        let mut out = Vec::new();
        for i in 0..n {
            let dev = result::device::get(i).map_err(|e| format!("cuDeviceGet({i}): {e}"))?;
            let name = result::device::get_name(dev).unwrap_or_else(|_| "unknown".into());
            // SAFETY: `dev` is a valid device handle from cuDeviceGet.
            let total_memory = unsafe { result::device::total_mem(dev) }.unwrap_or(0);
            out.push(CudaDeviceInfo {
                ordinal: i as usize,
                name,
                total_memory,
            });
        }
        Ok(out)
    });
    match probe {
        Ok(r) => r,
        Err(_) => Err("the CUDA driver could not be initialised".into()),
    }
}

/// Kernel sources from `kernels/`, embedded by `build.rs` for NVRTC.
pub use kernels::sources;
