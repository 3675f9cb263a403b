//! Where the kernels' device code comes from, decided and produced on the host (no GPU needed,
//! so all of it is tested on the CPU):
//!
//! - the kernel sources of `kernels/`, embedded by `build.rs` ([`sources`]), and the PTX /
//!   cubins nvcc made ahead of time when it was present at build time ([`images`]);
//! - [`KERNEL_UNITS`]: every kernel the backend launches, by the unit that defines it;
//! - [`choose_image`]: per unit, load the precompiled image or compile the source with NVRTC;
//! - [`nvrtc_compile`]: NVRTC with the embedded headers (the kernels include no system or CUDA
//!   headers, so no include path is needed at run time);
//! - [`compile_unit_cached`]: NVRTC output cached on disk under
//!   `$GENIUS_HOME/kernel-cache/<hash of sources, options, compiler>.ptx`.

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};
use std::ffi::{CStr, CString, c_char, c_int};
use std::path::{Path, PathBuf};

/// Kernel sources from `kernels/`, embedded by `build.rs` for NVRTC.
pub mod sources {
    include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));
}

/// Kernel images nvcc compiled at build time (empty when the build had no nvcc).
pub mod images {
    include!(concat!(env!("OUT_DIR"), "/kernel_images.rs"));
}

/// Every kernel the CUDA backend launches, grouped by the unit (`kernels/*.cu`) defining it.
/// The registry loads each unit once and looks every name up at start, so a missing or
/// misspelt kernel is an error when the backend is created, naming the kernel and unit.
pub const KERNEL_UNITS: &[(&str, &[&str])] = &[
    (
        "attention_backward.cu",
        &[
            "ge_attention_backward_dq_d64",
            "ge_attention_backward_dq_d128",
            "ge_attention_backward_dkv_d64",
            "ge_attention_backward_dkv_d128",
        ],
    ),
    (
        "attention_backward_tc.cu",
        &[
            "ge_attention_backward_tc_dq_d64",
            "ge_attention_backward_tc_dq_d128",
            "ge_attention_backward_tc_dkv_d64",
            "ge_attention_backward_tc_dkv_d128",
            "ge_attention_dkv_reduce",
            "ge_attention_delta",
        ],
    ),
    (
        "attention_tc.cu",
        &["ge_attention_tc_fwd_d64", "ge_attention_tc_fwd_d128"],
    ),
    (
        "elementwise.cu",
        &[
            "ge_rms_norm",
            "ge_add_rms_norm",
            "ge_rope",
            "ge_qkv_rope_write_kv",
            "ge_swiglu",
            "ge_add_assign_bf16",
            "ge_add_assign_f32",
            "ge_add_assign_f32_bf16",
            "ge_scale_bf16",
            "ge_scale_f32",
            "ge_copy_columns_bf16",
            "ge_copy_columns_f32",
            "ge_gather_rows_bf16",
            "ge_gather_rows_f32",
        ],
    ),
    (
        "paged_attention.cu",
        &[
            "ge_write_kv_bf16",
            "ge_copy_blocks_bf16",
            "ge_paged_attention_d64",
            "ge_paged_attention_d128",
            "ge_paged_attention_tc_d64",
            "ge_paged_attention_tc_d128",
            "ge_paged_attention_combine",
        ],
    ),
    (
        "skinny_gemm.cu",
        &["ge_skinny_gemm", "ge_skinny_gemm_reduce"],
    ),
    (
        "backward.cu",
        &[
            "ge_scatter_add_rows_bf16",
            "ge_scatter_add_rows_bf16_f32",
            "ge_scatter_add_rows_f32",
            "ge_scatter_add_rows_f32_bf16",
            "ge_rms_norm_backward_rows",
            "ge_rms_norm_backward_weight",
            "ge_column_partials_reduce",
            "ge_swiglu_backward",
        ],
    ),
    (
        "optim.cu",
        &["ge_adamw_update", "ge_cast_f32_bf16", "ge_cast_bf16_f32"],
    ),
    ("loss.cu", &["ge_pair_losses"]),
    (
        "sampling.cu",
        &[
            "ge_sample_rows",
            "ge_sample_rows_bf16",
            "ge_sampling_exp_values",
        ],
    ),
    (
        "train_gemm.cu",
        &[
            "ge_bias_grad_bf16",
            "ge_sum_squares_f32",
            "ge_sum_squares_bf16",
            "ge_target_logprobs_bf16",
            "ge_target_logprobs_bf16_v8",
            "ge_target_logprobs_backward_bf16",
            "ge_target_logprobs_backward_bf16_v8",
        ],
    ),
];

/// Environment variable choosing [`KernelSourcePolicy`]: `auto`, `precompiled` or `nvrtc`.
pub const KERNELS_ENV: &str = "GENIUS_CUDA_KERNELS";

/// How the backend gets each unit's device code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelSourcePolicy {
    /// The build's precompiled image when it suits the device, else NVRTC.
    #[default]
    Auto,
    /// Only the build's precompiled images (an error when there is none for the device).
    Precompiled,
    /// Always NVRTC from the embedded sources (through the disk cache).
    Nvrtc,
}

impl KernelSourcePolicy {
    /// Parses `auto`, `precompiled` or `nvrtc`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Self::Auto),
            "precompiled" | "ptx" => Ok(Self::Precompiled),
            "nvrtc" => Ok(Self::Nvrtc),
            other => bail!("{KERNELS_ENV}={other:?}: expected auto, precompiled or nvrtc"),
        }
    }

    /// From `$GENIUS_CUDA_KERNELS` (unset: `auto`).
    pub fn from_env() -> Result<Self> {
        match std::env::var(KERNELS_ENV) {
            Ok(v) => Self::parse(&v),
            Err(std::env::VarError::NotPresent) => Ok(Self::Auto),
            Err(e) => Err(anyhow!("{KERNELS_ENV}: {e}")),
        }
    }
}

/// What [`choose_image`] decided for one unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageChoice {
    /// The build's `sm_90a` cubin (only on compute capability 9.0 exactly).
    Cubin,
    /// The build's `compute_90` PTX, JIT-compiled by the driver (compute capability >= 9.0).
    Ptx,
    /// NVRTC from the embedded source, for this virtual architecture (`compute_XY`).
    Nvrtc { arch: String },
}

/// The virtual architecture NVRTC compiles for on a device of compute capability `cc`.
pub fn nvrtc_arch(cc: (i32, i32)) -> String {
    format!("compute_{}{}", cc.0, cc.1)
}

/// NVRTC options for `arch` (the same language settings nvcc gets in `build.rs`).
pub fn nvrtc_options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()]
}

/// Picks how to get a unit's device code on a device of compute capability `cc`, given
/// whether the build holds PTX (`compute_90`) and a cubin (`sm_90a`) for it. The kernels
/// need sm_80 or newer (bf16 conversion instructions).
pub fn choose_image(
    policy: KernelSourcePolicy,
    cc: (i32, i32),
    has_ptx: bool,
    has_cubin: bool,
) -> Result<ImageChoice> {
    if cc < (8, 0) {
        bail!(
            "compute capability {}.{} is too old: the kernels need 8.0 or newer",
            cc.0,
            cc.1
        );
    }
    let precompiled = if cc == (9, 0) && has_cubin {
        Some(ImageChoice::Cubin)
    } else if cc >= (9, 0) && has_ptx {
        Some(ImageChoice::Ptx)
    } else {
        None
    };
    match (policy, precompiled) {
        (KernelSourcePolicy::Nvrtc, _) | (KernelSourcePolicy::Auto, None) => {
            Ok(ImageChoice::Nvrtc {
                arch: nvrtc_arch(cc),
            })
        }
        (_, Some(choice)) => Ok(choice),
        (KernelSourcePolicy::Precompiled, None) => bail!(
            "{KERNELS_ENV}=precompiled, but this build holds no kernel image for compute capability {}.{} \
             (PTX: {}, sm_90a cubin: {}; build with nvcc on PATH or $NVCC set)",
            cc.0,
            cc.1,
            if has_ptx { "compute_90" } else { "none" },
            if has_cubin { "yes" } else { "no" },
        ),
    }
}

/// The embedded source of a file of `kernels/`.
pub fn source(name: &str) -> Option<&'static str> {
    sources::KERNEL_SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
}

/// The embedded headers (`.cuh`, `.h`) as `(include name, text)`.
pub fn headers() -> Vec<(&'static str, &'static str)> {
    sources::KERNEL_SOURCES
        .iter()
        .filter(|(n, _)| n.ends_with(".cuh") || n.ends_with(".h"))
        .copied()
        .collect()
}

/// The build's PTX for a unit, if nvcc made one.
pub fn precompiled_ptx(unit: &str) -> Option<&'static str> {
    images::KERNEL_PTX
        .iter()
        .find(|(n, _)| *n == unit)
        .map(|(_, p)| *p)
}

/// The build's sm_90a cubin for a unit, if nvcc made one.
pub fn precompiled_cubin(unit: &str) -> Option<&'static [u8]> {
    images::KERNEL_CUBIN_SM90A
        .iter()
        .find(|(n, _)| *n == unit)
        .map(|(_, c)| *c)
}

/// Names of the `extern "C" __global__` functions a CUDA source defines, in order.
pub fn kernel_names_in(source: &str) -> Vec<String> {
    const MARK: &str = "extern \"C\" __global__ void ";
    source
        .match_indices(MARK)
        .map(|(at, _)| {
            let rest = &source[at + MARK.len()..];
            // An optional `__launch_bounds__(...)` before the name.
            let rest = match rest.strip_prefix("__launch_bounds__(") {
                Some(r) => r.split_once(')').map_or(r, |(_, after)| after).trim_start(),
                None => rest,
            };
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// Disk-cache key of a unit compiled with NVRTC: a SHA-256 over the unit's name and source,
/// every header's name and text, the options and the compiler's version, so that a change to
/// any of them compiles afresh.
pub fn cache_key(
    unit: &str,
    source: &str,
    headers: &[(&str, &str)],
    options: &[String],
    compiler: &str,
) -> String {
    let mut h = Sha256::new();
    let mut field = |s: &str| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    field("genius-engine kernel cache v1");
    field(compiler);
    field(unit);
    field(source);
    for (name, text) in headers {
        field(name);
        field(text);
    }
    for o in options {
        field(o);
    }
    h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
}

/// The kernel cache folder: `$GENIUS_HOME/kernel-cache` (default
/// `~/.cache/genius-engine/kernel-cache`); `None` when no cache root is known.
pub fn default_cache_dir() -> Option<PathBuf> {
    crate::model::fetch::resolve_home(
        std::env::var_os(crate::model::fetch::HOME_ENV),
        dirs::cache_dir(),
    )
    .ok()
    .map(|home| home.join("kernel-cache"))
}

/// Whether libnvrtc can be loaded (cudarc panics on first use otherwise).
pub fn nvrtc_available() -> Result<(), String> {
    // SAFETY: only tries to load the library by its usual names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err("no NVRTC library (libnvrtc.so) could be loaded".into())
    }
}

/// `"nvrtc X.Y"` of the loaded NVRTC.
pub fn nvrtc_version() -> Result<String> {
    nvrtc_available().map_err(|e| anyhow!(e))?;
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: two valid out-pointers.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| anyhow!("nvrtcVersion: {e:?}"))?;
    Ok(format!("nvrtc {major}.{minor}"))
}

/// Compiles `source` (named `unit` in messages) to PTX with NVRTC, with `headers` available to
/// `#include "name"`. A compile error carries NVRTC's log.
pub fn nvrtc_compile(
    unit: &str,
    source: &str,
    headers: &[(&str, &str)],
    options: &[String],
) -> Result<String> {
    use cudarc::nvrtc::{result, sys};
    nvrtc_available().map_err(|e| anyhow!(e))?;
    let c = |s: &str| CString::new(s).with_context(|| format!("{unit}: NUL byte in {s:.20}"));
    let src = c(source)?;
    let name = c(unit)?;
    let header_texts = headers
        .iter()
        .map(|(_, t)| c(t))
        .collect::<Result<Vec<_>>>()?;
    let header_names = headers
        .iter()
        .map(|(n, _)| c(n))
        .collect::<Result<Vec<_>>>()?;
    let text_ptrs: Vec<*const c_char> = header_texts.iter().map(|s| s.as_ptr()).collect();
    let name_ptrs: Vec<*const c_char> = header_names.iter().map(|s| s.as_ptr()).collect();
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer refers to a NUL-terminated string alive until the program is
    // destroyed below; the two header arrays have `headers.len()` entries.
    unsafe {
        sys::nvrtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            headers.len() as c_int,
            text_ptrs.as_ptr(),
            name_ptrs.as_ptr(),
        )
    }
    .result()
    .map_err(|e| anyhow!("NVRTC could not create a program for {unit}: {e:?}"))?;
    // SAFETY: `prog` was created above and is destroyed exactly once, at the end.
    let compiled = unsafe { result::compile_program(prog, options) };
    let out = match compiled {
        Ok(()) => unsafe { result::get_ptx(prog) }
            .map(|ptx| c_chars_to_string(&ptx))
            .map_err(|e| anyhow!("NVRTC gave no PTX for {unit}: {e:?}")),
        Err(e) => {
            let log = unsafe { result::get_program_log(prog) }
                .map(|l| c_chars_to_string(&l))
                .unwrap_or_default();
            Err(anyhow!(
                "NVRTC could not compile kernels/{unit} ({e:?}, options {options:?}):\n{log}"
            ))
        }
    };
    // SAFETY: see above.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().map(|&c| c as u8).collect();
    match CStr::from_bytes_until_nul(&bytes) {
        Ok(s) => s.to_string_lossy().into_owned(),
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// How [`compile_unit_cached`] got its PTX.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Read from the disk cache.
    Hit,
    /// Compiled now and stored in the cache.
    Compiled,
    /// Compiled now; there is no cache folder, or it could not be written.
    CompiledUncached,
}

/// The PTX of embedded unit `unit` for `arch`, from the disk cache in `cache_dir` or compiled
/// with NVRTC (and then stored there, written atomically). Returns the PTX and how it was got.
pub fn compile_unit_cached(
    unit: &str,
    arch: &str,
    cache_dir: Option<&Path>,
) -> Result<(String, CacheOutcome)> {
    let src = source(unit).ok_or_else(|| anyhow!("no kernel unit kernels/{unit} in this build"))?;
    let headers = headers();
    let options = nvrtc_options(arch);
    let compiler = nvrtc_version()?;
    let key = cache_key(unit, src, &headers, &options, &compiler);
    let path = cache_dir.map(|d| d.join(format!("{key}.ptx")));
    if let Some(p) = &path
        && let Ok(ptx) = std::fs::read_to_string(p)
        && ptx.contains(".entry")
    {
        return Ok((ptx, CacheOutcome::Hit));
    }
    let ptx = nvrtc_compile(unit, src, &headers, &options)?;
    let stored = path.is_some_and(|p| write_atomically(&p, &ptx).is_ok());
    let outcome = if stored {
        CacheOutcome::Compiled
    } else {
        CacheOutcome::CompiledUncached
    };
    Ok((ptx, outcome))
}

/// Writes `text` to `path` through a temporary file in the same folder and a rename, so that
/// a reader never sees half a file.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("ptx"),
        std::process::id()
    ));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_prefers_the_cubin_on_hopper_then_ptx_then_nvrtc() {
        use KernelSourcePolicy::*;
        let nv = |a: &str| ImageChoice::Nvrtc { arch: a.into() };
        assert_eq!(
            choose_image(Auto, (9, 0), true, true).unwrap(),
            ImageChoice::Cubin
        );
        assert_eq!(
            choose_image(Auto, (9, 0), true, false).unwrap(),
            ImageChoice::Ptx
        );
        assert_eq!(
            choose_image(Auto, (9, 0), false, false).unwrap(),
            nv("compute_90")
        );
        // A newer chip cannot run the sm_90a cubin but can JIT the compute_90 PTX.
        assert_eq!(
            choose_image(Auto, (10, 0), true, true).unwrap(),
            ImageChoice::Ptx
        );
        assert_eq!(
            choose_image(Auto, (12, 0), false, true).unwrap(),
            nv("compute_120")
        );
        // An older chip cannot JIT compute_90 PTX: NVRTC for its own architecture.
        assert_eq!(
            choose_image(Auto, (8, 6), true, true).unwrap(),
            nv("compute_86")
        );
        assert_eq!(
            choose_image(Nvrtc, (9, 0), true, true).unwrap(),
            nv("compute_90")
        );
        assert_eq!(
            choose_image(Precompiled, (9, 0), true, false).unwrap(),
            ImageChoice::Ptx
        );
        let err = choose_image(Precompiled, (8, 0), true, true).unwrap_err();
        assert!(err.to_string().contains("no kernel image"), "{err}");
        let err = choose_image(Auto, (7, 5), true, true).unwrap_err();
        assert!(err.to_string().contains("too old"), "{err}");
    }

    #[test]
    fn policy_parses() {
        assert_eq!(
            KernelSourcePolicy::parse("").unwrap(),
            KernelSourcePolicy::Auto
        );
        assert_eq!(
            KernelSourcePolicy::parse("NVRTC").unwrap(),
            KernelSourcePolicy::Nvrtc
        );
        assert_eq!(
            KernelSourcePolicy::parse("precompiled").unwrap(),
            KernelSourcePolicy::Precompiled
        );
        assert!(KernelSourcePolicy::parse("cubin-only").is_err());
    }

    #[test]
    fn cache_key_changes_with_every_input() {
        let opts = nvrtc_options("compute_90");
        let base = cache_key("a.cu", "src", &[("h.cuh", "h")], &opts, "nvrtc 13.0");
        assert_eq!(base.len(), 64);
        assert!(base.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            base,
            cache_key("a.cu", "src", &[("h.cuh", "h")], &opts, "nvrtc 13.0")
        );
        let variants = [
            cache_key("b.cu", "src", &[("h.cuh", "h")], &opts, "nvrtc 13.0"),
            cache_key("a.cu", "src2", &[("h.cuh", "h")], &opts, "nvrtc 13.0"),
            cache_key("a.cu", "src", &[("h.cuh", "h2")], &opts, "nvrtc 13.0"),
            cache_key("a.cu", "src", &[("g.cuh", "h")], &opts, "nvrtc 13.0"),
            cache_key("a.cu", "src", &[], &opts, "nvrtc 13.0"),
            cache_key(
                "a.cu",
                "src",
                &[("h.cuh", "h")],
                &nvrtc_options("compute_100"),
                "nvrtc 13.0",
            ),
            cache_key("a.cu", "src", &[("h.cuh", "h")], &opts, "nvrtc 13.1"),
            // Field boundaries count: moving text from one field to the next is a change.
            cache_key("a.c", "usrc", &[("h.cuh", "h")], &opts, "nvrtc 13.0"),
        ];
        for v in &variants {
            assert_ne!(&base, v);
        }
    }

    #[test]
    fn every_registered_kernel_is_defined_by_its_unit_and_vice_versa() {
        for (unit, names) in KERNEL_UNITS {
            let src = source(unit).unwrap_or_else(|| panic!("{unit} is not embedded"));
            let defined = kernel_names_in(src);
            let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            let mut got = defined.clone();
            want.sort();
            got.sort();
            assert_eq!(want, got, "{unit}: registry vs extern \"C\" kernels");
        }
        // Every embedded unit is registered.
        for (name, _) in sources::KERNEL_SOURCES {
            if name.ends_with(".cu") {
                assert!(
                    KERNEL_UNITS.iter().any(|(u, _)| u == name),
                    "kernels/{name} is not in KERNEL_UNITS"
                );
            }
        }
    }

    #[test]
    fn kernel_names_are_parsed() {
        let src = "extern \"C\" __global__ void ge_a(X a) {}\n\
                   __device__ void helper() {}\n\
                   extern \"C\" __global__ void ge_b_f32(Y b) { }\n\
                   extern \"C\" __global__ void __launch_bounds__(1024) ge_c(Z c) { }";
        assert_eq!(kernel_names_in(src), ["ge_a", "ge_b_f32", "ge_c"]);
    }

    #[test]
    fn headers_and_units_are_embedded() {
        let names: Vec<&str> = headers().iter().map(|(n, _)| *n).collect();
        assert!(
            names.contains(&"common.cuh") && names.contains(&"args.h"),
            "{names:?}"
        );
        assert!(source("elementwise.cu").is_some());
        // Precompiled images exist only for embedded units.
        for (unit, ptx) in images::KERNEL_PTX {
            assert!(source(unit).is_some(), "{unit}");
            assert!(ptx.contains(".entry"), "{unit}: not PTX");
        }
        for (unit, _) in images::KERNEL_CUBIN_SM90A {
            assert!(precompiled_ptx(unit).is_some(), "{unit}: cubin without PTX");
        }
    }

    #[test]
    fn the_cache_is_written_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub").join("k.ptx");
        write_atomically(&p, "one").unwrap();
        write_atomically(&p, "two").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        let left: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "temporary files left behind");
    }
}
