//! bf16 GEMMs through cuBLASLt with cached plans. A plan (matrix layouts, the operation
//! descriptor and the algorithm cuBLASLt's heuristic picked) depends only on the shape and on
//! whether a bias is fused, so it is built once per `(rows, out, in, bias)` and reused: a decode
//! step runs about a hundred GEMMs, and building a plan (layouts, descriptor, heuristic query)
//! costs more host time than launching one. cudarc's `CudaBlasLT::matmul` rebuilds it on every
//! call, hence this module.
//!
//! `y[n, m] = x[n, k] · w[m, k]^T (+ bias[m])`, row-major, is computed as the column-major
//! `y^T[m, n] = w · x^T`: `w` is the column-major `[k, m]` matrix taken transposed and `x^T` the
//! column-major `[k, n]` one; the bias epilogue adds `bias[m]` to every column of `y^T`, i.e.
//! to every row of `y`. bf16 operands and output, f32 accumulation and scale.
//!
//! The training GEMMs ([`Gemm::run_general`], plans keyed by [`GeneralGemm`]) are plain
//! column-major `D[m, n] = alpha op(A) op(B) + beta C` with tight leading dimensions, bf16 `A`
//! and `B`, and `C = D` either bf16 or f32 (f32 gradients accumulate with `beta = 1`); the
//! row-major products they implement are spelled out in `train_gemm.rs`.

use anyhow::{Context, Result, anyhow};
use cudarc::cublaslt::result;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream};
use std::collections::HashMap;
use std::mem::size_of;
use std::sync::Arc;

/// cuBLASLt's workspace on Hopper, as NVIDIA recommends (32 MiB).
const WORKSPACE_BYTES: usize = 32 << 20;

/// Environment variable: `1` times cuBLASLt's top [`TUNE_CANDIDATES`] algorithms (and split-K
/// forms of the first [`SPLIT_K_BASES`], where supported) for each shape of [`Gemm::run`] and
/// [`Gemm::run_general`] (the training GEMMs) the first time it is used, and keeps the fastest, instead of taking the heuristic's first choice. Off by default: the choice then depends on timings, so two
/// processes may round differently.
pub const TUNE_ENV: &str = "GENIUS_CUDA_GEMM_TUNE";

/// Algorithms timed per shape when tuning.
pub const TUNE_CANDIDATES: usize = 8;

/// Heuristic picks whose split-K forms are also timed when tuning, and the K splits tried.
const SPLIT_K_BASES: usize = 2;
const SPLIT_K_PARTS: [u32; 4] = [2, 4, 8, 16];

/// Timed runs per candidate (after one untimed run).
const TUNE_REPS: usize = 3;

/// Largest scratch output a [`Gemm::run_general`] with `beta != 0` is tuned on (bigger ones,
/// such as a large vocabulary's f32 LM-head gradient, keep the heuristic's choice).
pub const TUNE_SCRATCH_MAX_BYTES: usize = 256 << 20;

/// The shape of one GEMM: `rows` = n, `out` = m, `inp` = k; `bias` whether the epilogue adds one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmShape {
    pub rows: usize,
    pub out: usize,
    pub inp: usize,
    pub bias: bool,
}

/// One column-major GEMM `D[m, n] = alpha op(A) op(B) + beta C` (`C` and `D` the same
/// buffer): `A` is stored `[k, m]` (leading dimension `k`) when `transa`, else `[m, k]`
/// (leading dimension `m`); `B` is stored `[n, k]` when `transb`, else `[k, n]`; `D` is
/// `[m, n]` with leading dimension `m`. `A` and `B` are bf16; `D` is f32 when `out_f32`, else
/// bf16. f32 compute and scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GeneralGemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub transa: bool,
    pub transb: bool,
    pub out_f32: bool,
}

/// Everything cuBLASLt needs for one shape, built once.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    w_layout: sys::cublasLtMatrixLayout_t,
    x_layout: sys::cublasLtMatrixLayout_t,
    y_layout: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
    /// Whether tuning ([`TUNE_ENV`]) has run for this plan: `algo` was then chosen by timing,
    /// or kept from the heuristic where the shape could not be timed.
    tuned: bool,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created by this plan and is destroyed once; errors at
        // teardown are ignored (nothing useful can be done with them).
        unsafe {
            let _ = result::destroy_matrix_layout(self.w_layout);
            let _ = result::destroy_matrix_layout(self.x_layout);
            let _ = result::destroy_matrix_layout(self.y_layout);
            let _ = result::destroy_matmul_desc(self.desc);
        }
    }
}

/// A cuBLASLt handle, its workspace and the plans built so far. Used by one thread at a time
/// (the backend keeps it behind a mutex).
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    plans: HashMap<GemmShape, Plan>,
    general_plans: HashMap<GeneralGemm, Plan>,
}

// SAFETY: the raw cuBLASLt handles are only used behind the backend's mutex, one thread at a
// time; cuBLASLt handles may be used from any thread.
unsafe impl Send for Gemm {}

impl Drop for Gemm {
    fn drop(&mut self) {
        self.plans.clear();
        self.general_plans.clear();
        // SAFETY: the handle was created in `new` and every plan using it is gone.
        unsafe {
            let _ = result::destroy_handle(self.handle);
        }
    }
}

fn blas_err(what: &str, e: result::CublasError) -> anyhow::Error {
    anyhow!("cuBLASLt {what}: {e:?}")
}

impl Gemm {
    /// A handle and workspace on `stream`'s device.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let handle = result::create_handle().map_err(|e| blas_err("handle creation", e))?;
        // SAFETY: the workspace is only ever handed to cuBLASLt as scratch; its contents are
        // never read.
        let workspace = unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }
            .map_err(|e| anyhow!("cuBLASLt workspace ({WORKSPACE_BYTES} bytes): {e:?}"))?;
        Ok(Self {
            handle,
            workspace,
            stream,
            plans: HashMap::new(),
            general_plans: HashMap::new(),
        })
    }

    /// Plans built so far (for tests and diagnostics).
    pub fn num_plans(&self) -> usize {
        self.plans.len() + self.general_plans.len()
    }

    fn plan(&mut self, s: GemmShape) -> Result<&Plan> {
        if !self.plans.contains_key(&s) {
            let plan = self.build(s)?;
            self.plans.insert(s, plan);
        }
        Ok(&self.plans[&s])
    }

    fn build(&self, s: GemmShape) -> Result<Plan> {
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        let (m, n, k) = (s.out as u64, s.rows as u64, s.inp as u64);
        let layout = |rows: u64, cols: u64, ld: u64| {
            result::create_matrix_layout(bf16, rows, cols, ld as i64)
                .map_err(|e| blas_err("matrix layout", e))
        };
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(|e| blas_err("matmul descriptor", e))?;
        let mut plan = Plan {
            desc,
            // w: column-major [k, m] (taken transposed); x^T: [k, n]; y^T: [m, n].
            w_layout: layout(k, m, k)?,
            x_layout: layout(k, n, k)?,
            y_layout: layout(m, n, m)?,
            // SAFETY: plain data, overwritten by the heuristic below.
            algo: unsafe { std::mem::zeroed() },
            tuned: false,
        };
        let transa: i32 = 1;
        let epilogue = if s.bias {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        // SAFETY: the descriptor is live; each attribute is given a pointer to a value of the
        // size stated.
        unsafe {
            result::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&transa) as *const i32 as *const _,
                size_of::<i32>(),
            )
            .map_err(|e| blas_err("transpose attribute", e))?;
            result::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                (&epilogue) as *const sys::cublasLtEpilogue_t as *const _,
                size_of::<sys::cublasLtEpilogue_t>(),
            )
            .map_err(|e| blas_err("epilogue attribute", e))?;
            if s.bias {
                let bias_type = bf16;
                result::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                    (&bias_type) as *const sys::cudaDataType as *const _,
                    size_of::<sys::cudaDataType>(),
                )
                .map_err(|e| blas_err("bias type attribute", e))?;
            }
        }
        plan.algo = self.heuristic(&plan, &format!("{s:?}"))?;
        Ok(plan)
    }

    /// cuBLASLt's first choice of algorithm for a plan's descriptor and layouts (`C` = `D`).
    fn heuristic(&self, plan: &Plan, what: &str) -> Result<sys::cublasLtMatmulAlgo_t> {
        self.heuristics(plan, what, 1)?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("cuBLASLt has no algorithm for {what}"))
    }

    /// cuBLASLt's best `count` algorithms for a plan, best first (those it says work with the
    /// workspace).
    fn heuristics(
        &self,
        plan: &Plan,
        what: &str,
        count: usize,
    ) -> Result<Vec<sys::cublasLtMatmulAlgo_t>> {
        let pref = result::create_matmul_pref().map_err(|e| blas_err("preference", e))?;
        let workspace = WORKSPACE_BYTES;
        // SAFETY: plain data, filled by the heuristic for the first `returned` entries.
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> =
            vec![unsafe { std::mem::zeroed() }; count.max(1)];
        let mut returned: i32 = 0;
        // SAFETY: every handle is live; the heuristic only reads them and writes at most
        // `results.len()` entries. The preference is destroyed right after.
        unsafe {
            let r = result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&workspace) as *const usize as *const _,
                size_of::<usize>(),
            )
            .and_then(|_| {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    plan.desc,
                    plan.w_layout,
                    plan.x_layout,
                    plan.y_layout,
                    plan.y_layout,
                    pref,
                    results.len() as i32,
                    results.as_mut_ptr(),
                    &mut returned,
                )
                .result()
            });
            let _ = result::destroy_matmul_pref(pref);
            r
        }
        .map_err(|e| blas_err(&format!("algorithm heuristic for {what}"), e))?;
        let algos: Vec<_> = results
            .iter()
            .take(returned.max(0) as usize)
            .filter(|r| {
                r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                    && r.workspaceSize <= WORKSPACE_BYTES
            })
            .map(|r| r.algo)
            .collect();
        if algos.is_empty() {
            return Err(blas_err(
                &format!("algorithm heuristic for {what}"),
                result::CublasError(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED),
            ));
        }
        Ok(algos)
    }

    /// The fastest of cuBLASLt's top [`TUNE_CANDIDATES`] algorithms for `plan`, timed on the
    /// caller's buffers `a`, `b` (the plan's A and B) and `d` (its D, which the timed runs
    /// overwrite with the product, `beta = 0`): each once untimed, then [`TUNE_REPS`] times
    /// between two events. A candidate that fails to launch is skipped; with none timed, the
    /// heuristic's first choice.
    ///
    /// # Safety
    /// As [`Gemm::run`] / [`Gemm::run_general`] with `d` a scratch or output buffer of D's
    /// layout; the stream must not be capturing a graph (this waits for it).
    unsafe fn tuned_algo(
        &self,
        plan: &Plan,
        what: &str,
        a: u64,
        b: u64,
        d: u64,
    ) -> Result<sys::cublasLtMatmulAlgo_t> {
        let mut candidates = self.heuristics(plan, what, TUNE_CANDIDATES)?;
        // Split-K forms of the heuristic's first picks: skinny GEMMs (decode's few rows, a
        // long K) have fewer output tiles than SMs without them.
        let splits: Vec<_> = candidates
            .iter()
            .take(SPLIT_K_BASES)
            .flat_map(|a| self.split_k_variants(plan, a))
            .collect();
        candidates.extend(splits);
        let ctx = self.stream.context();
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut best: Option<(f32, sys::cublasLtMatmulAlgo_t)> = None;
        for algo in &candidates {
            // SAFETY: forwarded from the caller; a plan's bias pointer is already set.
            let launch = || unsafe { self.matmul(plan, algo, (a, b, d), 0.0) };
            if launch().is_err() {
                continue;
            }
            let (start, end) = (ctx.new_event(flags)?, ctx.new_event(flags)?);
            start.record(&self.stream)?;
            let timed = (0..TUNE_REPS).try_for_each(|_| launch());
            end.record(&self.stream)?;
            self.stream
                .synchronize()
                .with_context(|| format!("timing a cuBLASLt algorithm for {what}"))?;
            if timed.is_err() {
                continue;
            }
            let ms = start.elapsed_ms(&end)?;
            if best.is_none_or(|(b, _)| ms < b) {
                best = Some((ms, *algo));
            }
        }
        Ok(best.map_or(candidates[0], |(_, a)| a))
    }

    /// `algo` with its K dimension split into each of [`SPLIT_K_PARTS`] parts, reduced in the
    /// compute type (f32 partial sums in the workspace), where cuBLASLt says the algorithm
    /// supports split-K and the variant suits `plan` within the workspace
    /// (`cublasLtMatmulAlgoCheck`). None where it does not (many Hopper kernels).
    fn split_k_variants(
        &self,
        plan: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
    ) -> Vec<sys::cublasLtMatmulAlgo_t> {
        // A 4-byte capability (SPLITK_SUPPORT is an int32, the scheme mask a uint32).
        let cap = |attr| -> Result<u32, result::CublasError> {
            let (mut value, mut written) = (0u32, 0usize);
            // SAFETY: the algorithm is plain data; the query writes at most 4 bytes.
            unsafe {
                sys::cublasLtMatmulAlgoCapGetAttribute(
                    algo,
                    attr,
                    (&mut value) as *mut u32 as *mut _,
                    size_of::<u32>(),
                    &mut written,
                )
            }
            .result()?;
            Ok(value)
        };
        use sys::cublasLtMatmulAlgoCapAttributes_t as Cap;
        use sys::cublasLtMatmulAlgoConfigAttributes_t as Config;
        let scheme = sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32;
        let supported = cap(Cap::CUBLASLT_ALGO_CAP_SPLITK_SUPPORT).is_ok_and(|v| v != 0)
            && cap(Cap::CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK).is_ok_and(|m| m & scheme != 0);
        if !supported {
            return Vec::new();
        }
        // A uint32 configuration attribute of `variant`.
        let set = |variant: &mut sys::cublasLtMatmulAlgo_t, attr, value: u32| {
            // SAFETY: the variant is a copy of a valid algorithm; the value is a u32.
            unsafe {
                sys::cublasLtMatmulAlgoConfigSetAttribute(
                    variant,
                    attr,
                    (&value) as *const u32 as *const _,
                    size_of::<u32>(),
                )
            }
            .result()
        };
        let mut out = Vec::new();
        for parts in SPLIT_K_PARTS {
            let mut variant = *algo;
            let ok = set(&mut variant, Config::CUBLASLT_ALGO_CONFIG_SPLITK_NUM, parts)
                .and_then(|_| {
                    set(
                        &mut variant,
                        Config::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME,
                        scheme,
                    )
                })
                .and_then(|_| {
                    // SAFETY: the check only reads the plan's live handles and the variant.
                    unsafe {
                        let mut check: sys::cublasLtMatmulHeuristicResult_t = std::mem::zeroed();
                        sys::cublasLtMatmulAlgoCheck(
                            self.handle,
                            plan.desc,
                            plan.w_layout,
                            plan.x_layout,
                            plan.y_layout,
                            plan.y_layout,
                            &variant,
                            &mut check,
                        )
                        .result()
                        .map(|_| check.workspaceSize <= WORKSPACE_BYTES)
                    }
                });
            if ok == Ok(true) {
                out.push(variant);
            }
        }
        out
    }

    /// One `D = alpha op(A) op(B) + beta D` launch of `plan` with `algo` (`alpha = 1`; for a
    /// [`GemmShape`] plan A is the weight, B the input, D the output).
    ///
    /// # Safety
    /// As [`Gemm::run`] / [`Gemm::run_general`]; with `beta = 0`, D's previous contents are
    /// not read.
    unsafe fn matmul(
        &self,
        plan: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
        (a, b, d): (u64, u64, u64),
        beta: f32,
    ) -> Result<()> {
        let (ws, _record) = cudarc::driver::DevicePtr::device_ptr(&self.workspace, &self.stream);
        let alpha = 1.0f32;
        // SAFETY: the plan's handles are live; the caller vouches for the buffers (C = D, the
        // same layout, which cuBLASLt allows in place).
        unsafe {
            result::matmul(
                self.handle,
                plan.desc,
                (&alpha) as *const f32 as *const _,
                (&beta) as *const f32 as *const _,
                a as *const _,
                plan.w_layout,
                b as *const _,
                plan.x_layout,
                d as *const _,
                plan.y_layout,
                d as *mut _,
                plan.y_layout,
                algo,
                ws as *mut _,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as *mut _,
            )
        }
        .map_err(|e| blas_err("GEMM", e))
    }

    fn build_general(&self, s: GeneralGemm) -> Result<Plan> {
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        let out_type = if s.out_f32 {
            sys::cudaDataType_t::CUDA_R_32F
        } else {
            bf16
        };
        let (m, n, k) = (s.m as u64, s.n as u64, s.k as u64);
        let layout = |ty, rows: u64, cols: u64| {
            result::create_matrix_layout(ty, rows, cols, rows as i64)
                .map_err(|e| blas_err("matrix layout", e))
        };
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(|e| blas_err("matmul descriptor", e))?;
        let mut plan = Plan {
            desc,
            w_layout: if s.transa {
                layout(bf16, k, m)?
            } else {
                layout(bf16, m, k)?
            },
            x_layout: if s.transb {
                layout(bf16, n, k)?
            } else {
                layout(bf16, k, n)?
            },
            y_layout: layout(out_type, m, n)?,
            // SAFETY: plain data, overwritten by the heuristic below.
            algo: unsafe { std::mem::zeroed() },
            tuned: false,
        };
        let (transa, transb) = (s.transa as i32, s.transb as i32);
        // SAFETY: the descriptor is live; each attribute is given a pointer to a value of the
        // size stated.
        unsafe {
            result::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&transa) as *const i32 as *const _,
                size_of::<i32>(),
            )
            .map_err(|e| blas_err("transpose attribute", e))?;
            result::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                (&transb) as *const i32 as *const _,
                size_of::<i32>(),
            )
            .map_err(|e| blas_err("transpose attribute", e))?;
        }
        plan.algo = self.heuristic(&plan, &format!("{s:?}"))?;
        Ok(plan)
    }

    /// `y = x w^T (+ bias)` on the stream, with device addresses: `x` bf16 `[rows, inp]`, `w`
    /// bf16 `[out, inp]`, `bias` bf16 `[out]`, `y` bf16 `[rows, out]`. With `tune`, a shape's
    /// first use times cuBLASLt's top algorithms on these buffers and keeps the fastest
    /// ([`TUNE_ENV`]); otherwise the heuristic's first choice.
    ///
    /// # Safety
    /// The addresses must hold live buffers of those shapes until the stream has run the GEMM;
    /// with `tune`, the stream must not be capturing a graph.
    pub unsafe fn run(
        &mut self,
        s: GemmShape,
        x: u64,
        w: u64,
        bias: Option<u64>,
        y: u64,
        tune: bool,
    ) -> Result<()> {
        debug_assert_eq!(s.bias, bias.is_some());
        self.plan(s)?;
        let plan = &self.plans[&s];
        // SAFETY: the descriptor is live; the attribute is given a pointer to a u64.
        unsafe {
            if let Some(b) = bias {
                result::set_matmul_desc_attribute(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    (&b) as *const u64 as *const _,
                    size_of::<u64>(),
                )
                .map_err(|e| blas_err("bias pointer attribute", e))?;
            }
        }
        if tune && !plan.tuned {
            // SAFETY: forwarded from the caller.
            let algo = unsafe { self.tuned_algo(plan, &format!("{s:?}"), w, x, y) }?;
            if let Some(p) = self.plans.get_mut(&s) {
                p.algo = algo;
                p.tuned = true;
            }
        }
        let plan = &self.plans[&s];
        // SAFETY: forwarded from the caller.
        unsafe { self.matmul(plan, &plan.algo, (w, x, y), 0.0) }.map_err(|e| anyhow!("{e:#} {s:?}"))
    }

    /// Whether tuning has run for the [`GeneralGemm`] shape `s` (false before its first use).
    pub fn general_tuned(&self, s: &GeneralGemm) -> bool {
        self.general_plans.get(s).is_some_and(|p| p.tuned)
    }

    /// `D = op(A) op(B) + beta D` on the stream ([`GeneralGemm`]), with device addresses `a`,
    /// `b` and `d`. With `tune`, a shape's first use times cuBLASLt's top algorithms
    /// ([`TUNE_ENV`]) and keeps the fastest: on `d` itself when `beta = 0` (the real run then
    /// overwrites it), else on a scratch D (D must be read as it was), skipped for a D over
    /// [`TUNE_SCRATCH_MAX_BYTES`] (the heuristic's choice is kept).
    ///
    /// # Safety
    /// The addresses must hold live buffers of the shapes and types `s` states until the
    /// stream has run the GEMM; `d` must not overlap `a` or `b`; with `tune`, the stream must
    /// not be capturing a graph.
    pub unsafe fn run_general(
        &mut self,
        s: GeneralGemm,
        a: u64,
        b: u64,
        d: u64,
        beta: f32,
        tune: bool,
    ) -> Result<()> {
        if !self.general_plans.contains_key(&s) {
            let plan = self.build_general(s)?;
            self.general_plans.insert(s, plan);
        }
        let plan = &self.general_plans[&s];
        if tune && !plan.tuned {
            let d_bytes = s.m * s.n * if s.out_f32 { 4 } else { 2 };
            let what = format!("{s:?}");
            let algo = if beta == 0.0 {
                // SAFETY: forwarded from the caller; d is overwritten by the real run.
                Some(unsafe { self.tuned_algo(plan, &what, a, b, d) }?)
            } else if d_bytes <= TUNE_SCRATCH_MAX_BYTES
                // SAFETY: the scratch is only written (beta = 0 in the timed runs).
                && let Ok(mut scratch) = unsafe { self.stream.alloc::<u8>(d_bytes.max(1)) }
            {
                let (sp, _record) =
                    cudarc::driver::DevicePtrMut::device_ptr_mut(&mut scratch, &self.stream);
                // SAFETY: a and b as the caller vouches; D is the scratch of D's layout.
                Some(unsafe { self.tuned_algo(plan, &what, a, b, sp) }?)
            } else {
                // Too large a D, or no memory for the scratch: the heuristic's choice stays.
                None
            };
            if let Some(p) = self.general_plans.get_mut(&s) {
                if let Some(algo) = algo {
                    p.algo = algo;
                }
                p.tuned = true;
            }
        }
        let plan = &self.general_plans[&s];
        // SAFETY: forwarded from the caller.
        unsafe { self.matmul(plan, &plan.algo, (a, b, d), beta) }
            .map_err(|e| anyhow!("{e:#} {s:?}"))
    }
}
