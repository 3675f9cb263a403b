//! The device side of the CUDA backend: [`GpuContext`] picks the device, owns the main stream
//! every allocation, copy and launch goes through (and a second stream that only the fused
//! log-prob ops use, ordered against the main one by events: [`GpuContext::aux_stream`]), and
//! holds the [`KernelRegistry`] (every unit of `kernels/` loaded once; kernels looked up by
//! name, with errors that name the kernel). [`GpuContext::launch`] and
//! [`GpuContext::launch_on`] are the only places kernels are launched from.

use super::args;
use super::kernels::{self, CacheOutcome, ImageChoice, KERNEL_UNITS, KernelSourcePolicy};
use super::probe_devices;
use anyhow::{Context, Result, anyhow, bail};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr,
    DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

// SAFETY: each is a `#[repr(C)]` plain-data struct (integers, floats and u64 device
// addresses) generated from kernels/args.h, whose layout the compilers and the layout tests
// check; the kernels take them by value, which is what `DeviceRepr` passes.
unsafe impl DeviceRepr for args::RmsNormArgs {}
unsafe impl DeviceRepr for args::SkinnyGemmArgs {}
unsafe impl DeviceRepr for args::ColumnReduceArgs {}
unsafe impl DeviceRepr for args::RopeArgs {}
unsafe impl DeviceRepr for args::SwigluArgs {}
unsafe impl DeviceRepr for args::AddAssignArgs {}
unsafe impl DeviceRepr for args::ScaleArgs {}
unsafe impl DeviceRepr for args::CopyColumnsArgs {}
unsafe impl DeviceRepr for args::GatherRowsArgs {}
unsafe impl DeviceRepr for args::WriteKvArgs {}
unsafe impl DeviceRepr for args::SampleRowArgs {}
unsafe impl DeviceRepr for args::SampleArgs {}
unsafe impl DeviceRepr for args::CopyBlocksArgs {}
unsafe impl DeviceRepr for args::PagedAttentionArgs {}
unsafe impl DeviceRepr for args::PagedCombineArgs {}
unsafe impl DeviceRepr for args::TargetLogprobArgs {}
unsafe impl DeviceRepr for args::AddRmsNormArgs {}
unsafe impl DeviceRepr for args::QkvRopeArgs {}
unsafe impl DeviceRepr for args::BiasGradArgs {}
unsafe impl DeviceRepr for args::SumSquaresArgs {}
unsafe impl DeviceRepr for args::LogprobBackwardArgs {}

// SAFETY: `SampleRowArgs` is `#[repr(C)]`, `Copy`, made of integers and floats with no padding
// (8 + 8 + 4 + 4 + 4 + 4 bytes, size 32, as the layout tests check), so every bit pattern is
// valid and its bytes can be uploaded as they are (the per-row sampling parameters).
unsafe impl bytemuck::Zeroable for args::SampleRowArgs {}
// SAFETY: as above.
unsafe impl bytemuck::Pod for args::SampleRowArgs {}

/// Environment variable: the CUDA device ordinal to use (default 0).
pub const DEVICE_ENV: &str = "GENIUS_CUDA_DEVICE";
/// Environment variable: `1` synchronizes after every launch (see [`CudaOptions::sync_after_launch`]).
pub const SYNC_ENV: &str = "GENIUS_CUDA_SYNC";

/// Environment variable: `0` runs the attention backward on the scalar (CUDA-core) kernels
/// instead of the tensor-core ones (see [`CudaOptions::attention_tensor_cores`]).
pub const ATTN_TC_ENV: &str = "GENIUS_CUDA_ATTN_TC";
/// `0` runs paged attention on the CUDA-core kernels ([`CudaOptions::paged_attention_tensor_cores`]).
pub const PA_TC_ENV: &str = "GENIUS_CUDA_PA_TC";

/// How the CUDA backend is set up.
#[derive(Debug, Clone)]
pub struct CudaOptions {
    /// Device ordinal.
    pub ordinal: usize,
    /// Where the kernels' device code comes from.
    pub kernels: KernelSourcePolicy,
    /// NVRTC output cache; `None` compiles without caching.
    pub cache_dir: Option<PathBuf>,
    /// Fill every freshly allocated output with NaN before the kernel that writes it, so that
    /// an element a kernel fails to write shows up (for tests; costs one memset per output).
    pub poison_outputs: bool,
    /// Synchronize after every launch, so that a fault is reported by the kernel that caused
    /// it rather than by a later call (for tests and debugging; slow).
    pub sync_after_launch: bool,
    /// Run the causal attention backward on the tensor-core kernels
    /// (`kernels/attention_backward_tc.cu`, the default) rather than the scalar ones of
    /// `kernels/attention_backward.cu` (the fallback; `$GENIUS_CUDA_ATTN_TC=0`).
    pub attention_tensor_cores: bool,
    /// Run `causal_attention` on the tensor-core kernel (`kernels/attention_tc.cu`) where it
    /// applies (head_dim 64 or 128, disjoint sequences), else on the paged-attention kernel;
    /// default on, `$GENIUS_CUDA_ATTN_FWD_TC=0` turns it off.
    pub attention_forward_tensor_cores: bool,
    /// Tensor-core attention backward, GQA: run the dk/dv pass as one block per query head
    /// with per-head shares summed afterwards, rather than one block per kv head looping over
    /// its group; default on, `$GENIUS_CUDA_ATTN_BWD_SPLIT=0` turns it off (for A/B runs).
    pub attention_backward_split_heads: bool,
    /// Tensor-core attention backward in training: take the softmax statistics from the
    /// forward (its log-sum-exp, delta from its output) rather than a first pass over the keys;
    /// default on, `$GENIUS_CUDA_ATTN_BWD_STATS=0` turns it off (for A/B runs).
    pub attention_backward_forward_stats: bool,
    /// Replay plain decode steps from CUDA graphs ([`super::graphs`]); default on,
    /// `$GENIUS_CUDA_GRAPHS=0` turns it off. Profiling and per-launch waits also turn it off.
    pub decode_graphs: bool,
    /// Time cuBLASLt's top algorithms for each shape of `linear` on its first use and keep the
    /// fastest, rather than the heuristic's first choice; default off, `$GENIUS_CUDA_GEMM_TUNE=1`
    /// turns it on (see [`super::gemm::TUNE_ENV`]).
    pub tune_gemms: bool,
    /// Run the fused log-prob forward's softmax pass of one chunk on a second stream while
    /// the next chunk's LM-head GEMM runs ([`super::train_gemm`]); default on,
    /// `$GENIUS_CUDA_LOGPROB_OVERLAP=0` turns it off. Profiling and per-launch waits also turn
    /// it off.
    pub logprob_overlap: bool,
    /// Hand the fused log-prob forward's log-sum-exp per row to its backward
    /// ([`crate::backend::Backend::target_logprobs_with_lse`]), so that the backward makes one
    /// pass over each chunk's logits instead of two; default on, `$GENIUS_CUDA_LOGPROB_LSE=0`
    /// turns it off (for A/B runs).
    pub logprob_lse: bool,
    /// Run paged attention (decode, prefill chunks over the cache) on the tensor-core kernels
    /// (`ge_paged_attention_tc_d*`: the block's query heads as the rows of an mma tile);
    /// default on, `$GENIUS_CUDA_PA_TC=0` keeps the CUDA-core kernels (for A/B runs).
    pub paged_attention_tensor_cores: bool,
    /// Run `linear` on the skinny split-K GEMM kernels (`kernels/skinny_gemm.cu`) where they
    /// apply (at most [`super::skinny_gemm::MAX_ROWS`] rows: decode steps) instead of
    /// cuBLASLt; default off, `$GENIUS_CUDA_SKINNY_GEMM=1` turns it on (for A/B runs).
    pub skinny_gemm: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            ordinal: 0,
            kernels: KernelSourcePolicy::default(),
            cache_dir: None,
            poison_outputs: false,
            sync_after_launch: false,
            attention_tensor_cores: true,
            attention_forward_tensor_cores: true,
            decode_graphs: true,
            tune_gemms: false,
            attention_backward_split_heads: true,
            attention_backward_forward_stats: true,
            logprob_overlap: true,
            logprob_lse: true,
            paged_attention_tensor_cores: true,
            skinny_gemm: false,
        }
    }
}

impl CudaOptions {
    /// Options from the environment: `$GENIUS_CUDA_DEVICE`, `$GENIUS_CUDA_KERNELS`,
    /// `$GENIUS_CUDA_SYNC`, `$GENIUS_CUDA_ATTN_TC`, `$GENIUS_CUDA_ATTN_FWD_TC`,
    /// `$GENIUS_CUDA_GRAPHS`, `$GENIUS_CUDA_GEMM_TUNE`, `$GENIUS_CUDA_ATTN_BWD_SPLIT`,
    /// `$GENIUS_CUDA_ATTN_BWD_STATS`, `$GENIUS_CUDA_LOGPROB_OVERLAP`, `$GENIUS_CUDA_LOGPROB_LSE`,
    /// `$GENIUS_CUDA_PA_TC`, `$GENIUS_CUDA_SKINNY_GEMM`, and the kernel cache under
    /// `$GENIUS_HOME`.
    pub fn from_env() -> Result<Self> {
        let ordinal = match std::env::var(DEVICE_ENV) {
            Ok(v) => v
                .trim()
                .parse()
                .with_context(|| format!("{DEVICE_ENV}={v:?} is not a device ordinal"))?,
            Err(_) => 0,
        };
        Ok(Self {
            ordinal,
            kernels: KernelSourcePolicy::from_env()?,
            cache_dir: kernels::default_cache_dir(),
            poison_outputs: false,
            sync_after_launch: std::env::var(SYNC_ENV).is_ok_and(|v| v == "1"),
            attention_tensor_cores: std::env::var(ATTN_TC_ENV).map_or(true, |v| v.trim() != "0"),
            attention_forward_tensor_cores: std::env::var(super::attention_tc::ATTN_FWD_TC_ENV)
                .map_or(true, |v| v.trim() != "0"),
            decode_graphs: std::env::var(super::graphs::GRAPHS_ENV)
                .map_or(true, |v| v.trim() != "0"),
            tune_gemms: std::env::var(super::gemm::TUNE_ENV).is_ok_and(|v| v.trim() == "1"),
            attention_backward_split_heads: std::env::var("GENIUS_CUDA_ATTN_BWD_SPLIT")
                .map_or(true, |v| v.trim() != "0"),
            attention_backward_forward_stats: std::env::var("GENIUS_CUDA_ATTN_BWD_STATS")
                .map_or(true, |v| v.trim() != "0"),
            logprob_overlap: std::env::var("GENIUS_CUDA_LOGPROB_OVERLAP")
                .map_or(true, |v| v.trim() != "0"),
            logprob_lse: std::env::var("GENIUS_CUDA_LOGPROB_LSE").map_or(true, |v| v.trim() != "0"),
            paged_attention_tensor_cores: std::env::var(PA_TC_ENV)
                .map_or(true, |v| v.trim() != "0"),
            skinny_gemm: std::env::var(super::skinny_gemm::SKINNY_GEMM_ENV)
                .is_ok_and(|v| v.trim() == "1"),
        })
    }
}

/// How one unit of `kernels/` was loaded.
#[derive(Debug, Clone)]
pub struct LoadedUnit {
    pub unit: &'static str,
    pub image: ImageChoice,
    /// For NVRTC: whether the disk cache had it.
    pub cache: Option<CacheOutcome>,
}

/// Every kernel of [`KERNEL_UNITS`], loaded into the context once.
pub struct KernelRegistry {
    functions: HashMap<&'static str, CudaFunction>,
    units: Vec<LoadedUnit>,
    _modules: Vec<Arc<CudaModule>>,
}

impl KernelRegistry {
    /// Loads every unit (precompiled image or NVRTC, per `policy`) and looks up every kernel.
    pub fn load(
        ctx: &Arc<CudaContext>,
        cc: (i32, i32),
        policy: KernelSourcePolicy,
        cache_dir: Option<&std::path::Path>,
    ) -> Result<Self> {
        let mut functions = HashMap::new();
        let mut units = Vec::new();
        let mut modules = Vec::new();
        for &(unit, names) in KERNEL_UNITS {
            let ptx = kernels::precompiled_ptx(unit);
            let cubin = kernels::precompiled_cubin(unit);
            let image = kernels::choose_image(policy, cc, ptx.is_some(), cubin.is_some())
                .with_context(|| format!("kernels/{unit}"))?;
            let (code, cache) = match (&image, ptx, cubin) {
                (ImageChoice::Cubin, _, Some(bin)) => (Ptx::from_binary(bin.to_vec()), None),
                (ImageChoice::Ptx, Some(text), _) => (Ptx::from_src(text), None),
                (ImageChoice::Nvrtc { arch }, _, _) => {
                    let (text, outcome) = kernels::compile_unit_cached(unit, arch, cache_dir)?;
                    (Ptx::from_src(text), Some(outcome))
                }
                _ => unreachable!("choose_image picks only images that exist"),
            };
            let module = ctx.load_module(code).with_context(|| {
                format!("loading kernels/{unit} ({image:?}) into the CUDA context")
            })?;
            for &name in names {
                let f = module.load_function(name).with_context(|| {
                    format!("kernel {name} is not in kernels/{unit} as loaded ({image:?})")
                })?;
                functions.insert(name, f);
            }
            units.push(LoadedUnit { unit, image, cache });
            modules.push(module);
        }
        Ok(Self {
            functions,
            units,
            _modules: modules,
        })
    }

    /// The kernel called `name`.
    pub fn get(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| {
            anyhow!(
                "kernel {name} is not in the CUDA kernel registry (units: {})",
                self.units
                    .iter()
                    .map(|u| u.unit)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    /// The registry's own copy of a kernel name (for the profile's table).
    pub fn static_name(&self, name: &str) -> &'static str {
        self.functions
            .get_key_value(name)
            .map_or("unknown kernel", |(k, _)| *k)
    }

    /// How each unit was loaded.
    pub fn units(&self) -> &[LoadedUnit] {
        &self.units
    }
}

/// Environment variable: `0` lets the allocator's pool give memory back at every
/// synchronization (the driver's default), for comparison.
pub const POOL_KEEP_ENV: &str = "GENIUS_CUDA_POOL_KEEP";

/// Makes the device's default memory pool (which `cuMemAllocAsync` draws from) keep freed
/// memory instead of releasing it at every synchronization: the backend allocates its
/// activations per op and synchronizes every decode step (to read the sampled tokens), and
/// with the driver's default release threshold of 0 each step would map its memory afresh.
fn keep_pool_memory(ctx: &CudaContext) -> Result<()> {
    if std::env::var(POOL_KEEP_ENV).is_ok_and(|v| v == "0") {
        return Ok(());
    }
    use cudarc::driver::sys;
    let pool = default_pool(ctx)?;
    let threshold: u64 = u64::MAX;
    // SAFETY: a valid pool handle; a u64 attribute set through a pointer to a u64.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&threshold) as *const u64 as *mut std::ffi::c_void,
        )
    }
    .result()
    .context("setting the memory pool's release threshold")
}

/// The device's default memory pool (the one `cuMemAllocAsync` draws from), with the context
/// bound to this thread.
fn default_pool(ctx: &CudaContext) -> Result<cudarc::driver::sys::CUmemoryPool> {
    use cudarc::driver::sys;
    ctx.bind_to_thread()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a valid device handle and an out-pointer to a pool handle.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .context("reading the device's default memory pool")?;
    Ok(pool)
}

/// Gives the memory the device's default pool keeps (see [`keep_pool_memory`]) back to the
/// driver, once the stream is idle: before a phase that needs the memory for other shapes
/// (training after sampling), and so that `cuMemGetInfo` reports it free again.
pub(crate) fn trim_pool_memory(ctx: &CudaContext) -> Result<()> {
    let pool = default_pool(ctx)?;
    // SAFETY: a valid pool handle; trimming only releases memory no allocation holds.
    unsafe { cudarc::driver::sys::cuMemPoolTrimTo(pool, 0) }
        .result()
        .context("trimming the memory pool")
}

/// Environment variable: `1` times every kernel launch and GEMM with CUDA events and prints
/// a table of GPU time per kernel when the backend is dropped (slow; for finding where a
/// step's time goes).
pub const PROFILE_ENV: &str = "GENIUS_CUDA_PROFILE";

/// GPU time per kernel name, from events around each launch (see [`PROFILE_ENV`]).
#[derive(Default)]
pub(crate) struct Profile {
    pending: Vec<(&'static str, CudaEvent, CudaEvent)>,
    /// name -> (launches, total ms)
    totals: HashMap<&'static str, (u64, f64)>,
    started: Option<std::time::Instant>,
}

impl Profile {
    /// Forgets everything timed so far (after a benchmark's warm-up, whose plan building and
    /// first launches would otherwise be counted).
    pub(crate) fn reset(&mut self) {
        self.fold();
        self.totals.clear();
        self.started = None;
    }

    fn fold(&mut self) {
        for (name, a, b) in self.pending.drain(..) {
            let ms = a.elapsed_ms(&b).map(f64::from).unwrap_or(0.0);
            let e = self.totals.entry(name).or_default();
            e.0 += 1;
            e.1 += ms;
        }
    }

    /// The table, slowest first.
    pub(crate) fn report(&mut self) -> String {
        self.fold();
        let wall = self
            .started
            .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
        let gpu: f64 = self.totals.values().map(|v| v.1).sum();
        let mut rows: Vec<_> = self.totals.iter().collect();
        rows.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
        let mut out = format!(
            "CUDA profile: {gpu:.1} ms of kernel time in {wall:.1} ms since the first launch\n{:<34} {:>9} {:>11} {:>9} {:>6}\n",
            "kernel", "launches", "total ms", "mean us", "share"
        );
        for (name, (n, ms)) in rows {
            out.push_str(&format!(
                "{name:<34} {n:>9} {ms:>11.2} {:>9.1} {:>5.1}%\n",
                ms * 1e3 / *n as f64,
                100.0 * ms / gpu.max(1e-9)
            ));
        }
        out
    }
}

/// One memoized upload: the host bytes and their device copy.
type MemoEntry = (Vec<u8>, CudaSlice<u8>);

/// What the ops see while a decode step is captured into a CUDA graph (see
/// [`super::graphs`]): the step's host inputs were staged in the graph's input buffer before
/// the capture, so an upload under a staged key returns that buffer's address (after checking
/// that the op asks for exactly the staged bytes), and any other transfer is refused.
pub(crate) struct CaptureInputs {
    /// Upload key -> (device address in the graph's input buffer, the staged bytes).
    pub(crate) staged: HashMap<&'static str, (u64, Vec<u8>)>,
    /// Entries of every block table of the step (paged attention's fixed layout).
    pub(crate) table_width: usize,
    /// Where the sampling kernel writes its packed output (`[rows, OUT_WORDS]` u32).
    pub(crate) sample_out: u64,
}

/// A CUDA device in use: context, the backend's main stream (and, once used, a second one),
/// and the kernels.
pub struct GpuContext {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) registry: KernelRegistry,
    pub(crate) name: String,
    pub(crate) compute_capability: (i32, i32),
    pub(crate) total_memory: usize,
    pub(crate) sync_after_launch: bool,
    /// The last upload under each [`GpuContext::upload_memo`] key: host bytes and device copy.
    memo: Mutex<HashMap<&'static str, MemoEntry>>,
    /// Whether [`GpuContext::upload_memo`] reuses equal uploads (`$GENIUS_CUDA_MEMO=0` turns
    /// it off, for comparison).
    memo_uploads: bool,
    /// Per-kernel GPU times, when `$GENIUS_CUDA_PROFILE=1`.
    pub(crate) profile: Option<Mutex<Profile>>,
    /// The staged inputs of the decode step being captured, if one is.
    capture: Mutex<Option<CaptureInputs>>,
    /// The block-table width of an eager step run for a graph's shape (its warm-up), so that
    /// it plans attention as the graph will; 0 when none ([`GpuContext::fixed_table_width`]).
    warmup_table_width: std::sync::atomic::AtomicUsize,
    /// A second stream, made on first use ([`GpuContext::aux_stream`]), for work that may
    /// overlap the main stream's; ordered against it by events only.
    aux: std::sync::OnceLock<Arc<CudaStream>>,
}

impl GpuContext {
    /// Opens device `options.ordinal`, after checking without panicking that a driver and
    /// the device exist, and loads every kernel.
    pub fn new(options: &CudaOptions) -> Result<Self> {
        let devices = probe_devices().map_err(|why| anyhow!("CUDA backend: {why}"))?;
        let Some(dev) = devices.iter().find(|d| d.ordinal == options.ordinal) else {
            bail!(
                "CUDA backend: no device {} (the driver reports {} device(s))",
                options.ordinal,
                devices.len()
            );
        };
        let ctx = CudaContext::new(options.ordinal)
            .with_context(|| format!("creating a CUDA context on device {}", options.ordinal))?;
        // SAFETY: the backend allocates, copies and frees on one stream (below), so
        // stream-ordered execution orders every use of every buffer there and cudarc's
        // per-buffer events are not needed. The one other user, the second stream of the
        // fused log-prob ops, reads and writes buffers only after waiting for an event
        // recorded on the main stream after they were made, and the main stream waits for an
        // event recorded after that work (or the host waits for the second stream) before
        // any of them is freed. No buffer exists yet.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().context("creating a CUDA stream")?;
        keep_pool_memory(&ctx)?;
        let compute_capability = ctx
            .compute_capability()
            .context("reading the compute capability")?;
        let registry = KernelRegistry::load(
            &ctx,
            compute_capability,
            options.kernels,
            options.cache_dir.as_deref(),
        )?;
        Ok(Self {
            ctx,
            stream,
            registry,
            name: dev.name.clone(),
            compute_capability,
            total_memory: dev.total_memory,
            sync_after_launch: options.sync_after_launch,
            memo: Mutex::new(HashMap::new()),
            memo_uploads: std::env::var("GENIUS_CUDA_MEMO").map_or(true, |v| v != "0"),
            profile: std::env::var(PROFILE_ENV)
                .is_ok_and(|v| v == "1")
                .then(|| Mutex::new(Profile::default())),
            capture: Mutex::new(None),
            warmup_table_width: std::sync::atomic::AtomicUsize::new(0),
            aux: std::sync::OnceLock::new(),
        })
    }

    /// The second stream (made on first use). Nothing orders it against the main stream but
    /// the events its users record and wait for; buffers it uses must outlive that use on the
    /// main stream's side (freed there only after waiting for an event recorded after it).
    pub(crate) fn aux_stream(&self) -> Result<&Arc<CudaStream>> {
        if let Some(s) = self.aux.get() {
            return Ok(s);
        }
        let s = self
            .ctx
            .new_stream()
            .context("creating a second CUDA stream")?;
        Ok(self.aux.get_or_init(|| s))
    }

    /// Waits on the host for everything queued on the second stream, if it exists.
    pub(crate) fn sync_aux(&self) -> Result<()> {
        if let Some(aux) = self.aux.get() {
            aux.synchronize()
                .context("waiting for the second CUDA stream")?;
        }
        Ok(())
    }

    /// An event (no timing) recorded on `stream` now.
    pub(crate) fn record_on(&self, stream: &CudaStream) -> Result<CudaEvent> {
        stream
            .record_event(Some(
                cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING,
            ))
            .context("recording a CUDA event")
    }

    /// [`GpuContext::launch`] on another stream of this context (not profiled).
    ///
    /// # Safety
    /// As [`GpuContext::launch`], and every buffer the kernel touches must be ordered against
    /// the main stream by events (see [`GpuContext::aux_stream`]).
    pub(crate) unsafe fn launch_on<A: DeviceRepr>(
        &self,
        stream: &Arc<CudaStream>,
        name: &str,
        cfg: LaunchConfig,
        args: &A,
    ) -> Result<()> {
        let f = self.registry.get(name)?;
        let mut builder = stream.launch_builder(f);
        builder.arg(args);
        // SAFETY: forwarded to the caller.
        unsafe { builder.launch(cfg) }.with_context(|| {
            format!(
                "launching {name} on the second stream (grid {:?}, block {:?})",
                cfg.grid_dim, cfg.block_dim
            )
        })?;
        Ok(())
    }

    /// Starts capturing the stream's work into a graph, with `inputs` answering the uploads
    /// (see [`CaptureInputs`]). Nothing queued from here to [`GpuContext::end_capture`] runs.
    pub(crate) fn begin_capture(&self, inputs: CaptureInputs) -> Result<()> {
        self.sync("the work before a graph capture")?;
        // An error recorded earlier (by a buffer's drop) is reported here, not taken for the
        // capture's by `end_capture`.
        self.ctx
            .check_err()
            .context("a CUDA error recorded before a graph capture")?;
        *self
            .capture
            .lock()
            .map_err(|_| anyhow!("capture state lock poisoned"))? = Some(inputs);
        let begun = self.stream.begin_capture(
            cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        );
        if let Err(e) = begun {
            self.clear_capture();
            return Err(e).context("beginning a CUDA graph capture");
        }
        Ok(())
    }

    /// Ends the capture begun by [`GpuContext::begin_capture`] (always, also after a failed
    /// step, so that the stream works again) and instantiates the graph.
    pub(crate) fn end_capture(&self) -> Result<cudarc::driver::CudaGraph> {
        use cudarc::driver::sys::CUstreamCaptureStatus;
        // When the driver invalidates a capture, the frees of the buffers the step allocated
        // in it fail and cudarc records the error in the context; cudarc's next call (its
        // `end_capture` included) would return that error before doing anything. Take it
        // first: it belongs to the capture.
        let in_capture = self.ctx.check_err().err();
        let ended = self
            .stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        self.clear_capture();
        let after = self.ctx.check_err().err();
        // Should the capture still be open, end it without cudarc so that the stream works.
        if matches!(
            self.stream.capture_status(),
            Ok(s) if s != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
        ) {
            // SAFETY: the backend's live stream; a graph it returns is destroyed at once.
            unsafe {
                if let Ok(g) = cudarc::driver::result::stream::end_capture(self.stream.cu_stream())
                    && !g.is_null()
                {
                    let _ = cudarc::driver::result::graph::destroy(g);
                }
            }
            let _ = self.ctx.check_err();
        }
        let graph = ended
            .context("ending the CUDA graph capture")?
            .ok_or_else(|| anyhow!("the CUDA graph capture recorded no work"))?;
        if let Some(e) = in_capture.or(after) {
            bail!("a CUDA error during the graph capture: {e}");
        }
        Ok(graph)
    }

    fn clear_capture(&self) {
        if let Ok(mut c) = self.capture.lock() {
            *c = None;
        }
    }

    /// Whether a graph capture is in progress (uploads, downloads and waits are refused).
    pub(crate) fn capturing(&self) -> bool {
        self.capture.lock().map(|c| c.is_some()).unwrap_or(false)
    }

    /// The fixed block-table width of the step being captured, or of the eager warm-up step
    /// of a graph's shape ([`GpuContext::set_warmup_table_width`]): paged attention pads its
    /// tables to it and plans for it, so the warm-up computes exactly what the graph's
    /// replays will.
    pub(crate) fn fixed_table_width(&self) -> Option<usize> {
        if let Some(w) = self.capture.lock().ok()?.as_ref().map(|c| c.table_width) {
            return Some(w);
        }
        match self
            .warmup_table_width
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => None,
            w => Some(w),
        }
    }

    /// Sets (or with `None` clears) the table width of an eager warm-up step.
    pub(crate) fn set_warmup_table_width(&self, width: Option<usize>) {
        self.warmup_table_width
            .store(width.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
    }

    /// During a capture: where the sampling kernel writes its output.
    pub(crate) fn capture_sample_out(&self) -> Option<u64> {
        self.capture.lock().ok()?.as_ref().map(|c| c.sample_out)
    }

    /// During a capture: the staged address for an upload under `key`, if its bytes are the
    /// staged ones; an error naming the key otherwise.
    fn staged_upload(&self, key: &'static str, bytes: &[u8]) -> Result<u64> {
        let capture = self
            .capture
            .lock()
            .map_err(|_| anyhow!("capture state lock poisoned"))?;
        let Some(c) = capture.as_ref() else {
            bail!("internal: no graph capture in progress");
        };
        match c.staged.get(key) {
            Some((addr, staged)) if staged.as_slice() == bytes => Ok(*addr),
            Some((_, staged)) => bail!(
                "graph capture: the upload '{key}' ({} bytes) differs from what was staged for it ({} bytes)",
                bytes.len(),
                staged.len()
            ),
            None => bail!("graph capture: the upload '{key}' was not staged"),
        }
    }

    /// Launches kernel `name` with one by-value argument struct, then (with
    /// `sync_after_launch`) waits for it. Errors name the kernel and launch shape.
    ///
    /// # Safety
    /// `args` must be the struct the kernel takes, and every device address in it must point
    /// to a live allocation of this context large enough for what the kernel reads and
    /// writes with these sizes and `cfg`.
    pub(crate) unsafe fn launch<A: DeviceRepr>(
        &self,
        name: &str,
        cfg: LaunchConfig,
        args: &A,
    ) -> Result<()> {
        let f = self.registry.get(name)?;
        let mut builder = self.stream.launch_builder(f);
        builder.arg(args);
        let timing = self.profile_start()?;
        // SAFETY: forwarded to the caller (see above).
        unsafe { builder.launch(cfg) }.with_context(|| {
            format!(
                "launching {name} (grid {:?}, block {:?}, {} B dynamic shared memory)",
                cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes
            )
        })?;
        self.profile_end(timing, self.registry.static_name(name))?;
        if self.sync_after_launch {
            self.stream
                .synchronize()
                .with_context(|| format!("kernel {name} failed on the device"))?;
        }
        Ok(())
    }

    /// With profiling on, an event recorded before the work to time.
    pub(crate) fn profile_start(&self) -> Result<Option<CudaEvent>> {
        let Some(p) = &self.profile else {
            return Ok(None);
        };
        let mut p = p.lock().map_err(|_| anyhow!("profile lock poisoned"))?;
        p.started.get_or_insert_with(std::time::Instant::now);
        let e = self
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        e.record(&self.stream)?;
        Ok(Some(e))
    }

    /// With profiling on, closes the timing `start` opened under `name`.
    pub(crate) fn profile_end(&self, start: Option<CudaEvent>, name: &'static str) -> Result<()> {
        let (Some(start), Some(p)) = (start, &self.profile) else {
            return Ok(());
        };
        let end = self
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        end.record(&self.stream)?;
        let mut p = p.lock().map_err(|_| anyhow!("profile lock poisoned"))?;
        p.pending.push((name, start, end));
        if p.pending.len() >= 4096 {
            self.sync("profiled work")?;
            p.fold();
        }
        Ok(())
    }

    /// Waits for everything queued on the stream; errors say which call was waiting.
    pub(crate) fn sync(&self, what: &str) -> Result<()> {
        if self.capturing() {
            bail!("waiting for {what} while a CUDA graph is captured");
        }
        self.stream
            .synchronize()
            .with_context(|| format!("CUDA error while waiting for {what}"))
    }

    /// A buffer of `len` elements, uninitialised (the caller writes all of it). An empty
    /// tensor still gets one element: zero-byte allocations are not valid for every CUDA
    /// allocator, so the backend never asks for one (see [`CudaTensor::new`]).
    ///
    /// [`CudaTensor::new`]: super::tensor::CudaTensor::new
    pub(crate) fn alloc<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        let len = len.max(1);
        // SAFETY: the contents are unset; every caller writes every element before reading.
        unsafe { self.stream.alloc(len) }.with_context(|| {
            format!(
                "allocating {len} x {} bytes on the device",
                std::mem::size_of::<T>()
            )
        })
    }

    /// A zero-filled buffer of `len` elements (at least one, as in [`GpuContext::alloc`]).
    pub(crate) fn alloc_zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        let len = len.max(1);
        self.stream.alloc_zeros(len).with_context(|| {
            format!(
                "allocating {len} x {} zeroed bytes on the device",
                std::mem::size_of::<T>()
            )
        })
    }

    /// A copy of host data in a new device buffer (one unset element when `data` is empty).
    pub(crate) fn upload_slice<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        if self.capturing() {
            bail!(
                "copying {} elements to the device while a CUDA graph is captured",
                data.len()
            );
        }
        if data.is_empty() {
            return self.alloc(0);
        }
        self.stream
            .clone_htod(data)
            .with_context(|| format!("copying {} elements to the device", data.len()))
    }

    /// The device address of a copy of `data`, reusing the last upload made under `key` when
    /// its bytes are the same. The layers of one forward pass upload the same positions, KV
    /// slots and attention metadata again and again; this makes all but the first a host-side
    /// comparison. The copy stays alive until the next upload under `key` with other bytes
    /// (whose free is stream-ordered after every launch queued before it), so an address is
    /// good for launches queued before the next call with the same key.
    pub(crate) fn upload_memo<T: bytemuck::Pod>(
        &self,
        key: &'static str,
        data: &[T],
    ) -> Result<u64> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if self.capturing() {
            return self.staged_upload(key, bytes);
        }
        if !self.memo_uploads {
            let dev = self.upload_slice(if bytes.is_empty() { &[0u8] } else { bytes })?;
            let addr = self.ptr(&dev);
            // Freed (stream-ordered) after the launches queued so far, and after the caller's.
            self.memo
                .lock()
                .map_err(|_| anyhow!("upload cache lock poisoned"))?
                .insert(key, (Vec::new(), dev));
            return Ok(addr);
        }
        let mut memo = self
            .memo
            .lock()
            .map_err(|_| anyhow!("upload cache lock poisoned"))?;
        if let Some((host, dev)) = memo.get(key)
            && host.as_slice() == bytes
        {
            return Ok(self.ptr(dev));
        }
        // An empty upload still gets a (one-byte) buffer so that its address is valid.
        let dev = if bytes.is_empty() {
            self.alloc::<u8>(1)?
        } else {
            self.upload_slice(bytes)?
        };
        let addr = self.ptr(&dev);
        memo.insert(key, (bytes.to_vec(), dev));
        Ok(addr)
    }

    /// The first `len` elements of a device buffer, on the host (waits for the stream).
    pub(crate) fn download_slice<T: DeviceRepr>(
        &self,
        s: &CudaSlice<T>,
        len: usize,
    ) -> Result<Vec<T>> {
        self.sync("the work before a download")?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let v = self
            .stream
            .clone_dtoh(&s.slice(..len))
            .with_context(|| format!("copying {len} elements from the device"))?;
        self.sync("a download")?;
        Ok(v)
    }

    /// Fills `len` 16-bit elements at device address `ptr` with `bits` (poisoning outputs).
    pub(crate) fn memset_u16(&self, ptr: u64, bits: u16, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        // SAFETY: `ptr` is the start of a live allocation of at least `len` u16 elements
        // (callers pass a whole buffer), and the memset is ordered on the backend's stream.
        unsafe { cudarc::driver::sys::cuMemsetD16Async(ptr, bits, len, self.stream.cu_stream()) }
            .result()
            .context("cuMemsetD16Async")
    }

    /// Fills `len` 32-bit elements at device address `ptr` with `bits` (poisoning outputs).
    pub(crate) fn memset_u32(&self, ptr: u64, bits: u32, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        // SAFETY: as in `memset_u16`, for u32 elements.
        unsafe { cudarc::driver::sys::cuMemsetD32Async(ptr, bits, len, self.stream.cu_stream()) }
            .result()
            .context("cuMemsetD32Async")
    }

    /// The device address of a buffer, for an argument struct.
    pub(crate) fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        // The returned guard only records a cudarc event, which this backend has turned off
        // (see `new`), so it can be dropped at once.
        let (p, _guard) = s.device_ptr(&self.stream);
        p
    }

    /// The device address of a buffer the kernel writes, for an argument struct.
    pub(crate) fn ptr_mut<T>(&self, s: &mut CudaSlice<T>) -> u64 {
        let (p, _guard) = s.device_ptr_mut(&self.stream);
        p
    }
}

/// Threads per block of the grid-stride kernels.
pub(crate) const GRID_STRIDE_THREADS: u32 = 256;

/// A one-dimensional grid-stride launch over `n` elements (`n > 0`): enough blocks to cover
/// `n`, capped (the kernels loop) so that huge tensors do not need huge grids.
pub(crate) fn grid_stride_config(n: usize) -> LaunchConfig {
    const MAX_BLOCKS: usize = 1 << 16;
    let blocks = n
        .div_ceil(GRID_STRIDE_THREADS as usize)
        .clamp(1, MAX_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (GRID_STRIDE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads' worth of work of the SwiGLU kernels over `rows x inner` outputs: they take eight
/// elements (16 bytes) per thread and step when `inner` is a multiple of 8, else one.
pub(crate) fn swiglu_lanes(rows: usize, inner: usize) -> usize {
    if inner.is_multiple_of(8) {
        rows * inner / 8
    } else {
        rows * inner
    }
}

/// Threads for a one-block-per-row kernel over rows of `width` elements: a multiple of 32
/// (the block reductions need whole warps), at least 32, at most 256.
pub(crate) fn row_block_threads(width: usize) -> u32 {
    (width.div_ceil(32) * 32).clamp(32, 256) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(name, size, align)` of every `GE_LAYOUT(Name, size, align);` line of `kernels/args.h`.
    fn header_layouts() -> Vec<(String, usize, usize)> {
        let header = crate::backend::cuda::kernels::source("args.h").expect("args.h embedded");
        header
            .lines()
            .filter_map(|l| l.trim().strip_prefix("GE_LAYOUT("))
            .map(|rest| {
                let inner = rest.trim_end_matches(';').trim_end_matches(')');
                let f: Vec<&str> = inner.split(',').map(str::trim).collect();
                assert_eq!(f.len(), 3, "GE_LAYOUT line: {rest}");
                (
                    f[0].to_string(),
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn argument_structs_match_the_header_layouts() {
        macro_rules! rust_layouts {
            ($($t:ident),* $(,)?) => {
                vec![$((
                    stringify!($t).to_string(),
                    std::mem::size_of::<args::$t>(),
                    std::mem::align_of::<args::$t>(),
                )),*]
            };
        }
        let mut rust = rust_layouts!(
            RmsNormArgs,
            RopeArgs,
            SwigluArgs,
            AddAssignArgs,
            ScaleArgs,
            CopyColumnsArgs,
            GatherRowsArgs,
            WriteKvArgs,
            CopyBlocksArgs,
            PagedAttentionArgs,
            PagedCombineArgs,
            SampleRowArgs,
            SampleArgs,
            TargetLogprobArgs,
            AddRmsNormArgs,
            QkvRopeArgs,
            BiasGradArgs,
            SumSquaresArgs,
            LogprobBackwardArgs,
            ScatterAddRowsArgs,
            RmsNormBackwardArgs,
            SwigluBackwardArgs,
            AdamWArgs,
            CastArgs,
            AttentionBackwardArgs,
            AttentionDkvReduceArgs,
            AttentionDeltaArgs,
            PairLossArgs,
            AttentionTcArgs,
            SkinnyGemmArgs,
            ColumnReduceArgs,
        );
        let mut header = header_layouts();
        rust.sort();
        header.sort();
        // Same structs on both sides, each with the size and alignment the header states
        // (and that nvcc / NVRTC check with static_assert).
        assert_eq!(rust, header);
    }

    #[test]
    fn launch_shapes() {
        let c = grid_stride_config(1);
        assert_eq!((c.grid_dim.0, c.block_dim.0), (1, 256));
        assert_eq!(grid_stride_config(257).grid_dim.0, 2);
        assert_eq!(grid_stride_config(usize::MAX / 2).grid_dim.0, 1 << 16);
        assert_eq!(row_block_threads(1), 32);
        assert_eq!(row_block_threads(33), 64);
        assert_eq!(row_block_threads(896), 256);
        for w in [1, 7, 31, 32, 33, 100, 5000] {
            assert_eq!(row_block_threads(w) % 32, 0);
        }
    }
}
