//! Host-side checks of the CUDA kernels that need no GPU:
//! - every unit of `kernels/` compiles with NVRTC from the embedded sources and headers (as the
//!   backend does at run time), for Hopper and for the oldest supported architecture, and the
//!   disk cache is hit the second time. Needs libnvrtc: the system's, or the one
//!   `tools/compile-kernels.sh` installs under `$GENIUS_CUDA_TOOLKIT` (default
//!   `~/.cache/genius-engine/cuda-toolkit`); reported as ignored when the build found none
//!   (build.rs), and failing when it found one that then cannot be loaded.
//! - `src/backend/cuda/args.rs` is what `tools/gen-bindings.sh` (bindgen) makes of
//!   `kernels/args.h`; ignored where the build found no bindgen CLI, failing where bindgen is
//!   there but cannot run (e.g. no libclang).

use genius_engine::backend::cuda::kernels::{
    self, CacheOutcome, KERNEL_UNITS, compile_unit_cached, nvrtc_available,
};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Prints a line the test harness does not capture, so that a skip is visible.
/// A test that the build enabled (its tools were found) but that cannot run: a failure, so
/// that nothing unrun is counted as passed.
fn skipped(why: &str) {
    panic!("cannot run: {why}");
}

/// The folder of the PyPI CUDA toolkit's libraries, if installed (where
/// tools/compile-kernels.sh puts it: `$GENIUS_CUDA_TOOLKIT`, default
/// `$HOME/.cache/genius-engine/cuda-toolkit`).
fn toolkit_lib_dir() -> Option<PathBuf> {
    let root = std::env::var_os("GENIUS_CUDA_TOOLKIT")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/genius-engine/cuda-toolkit"))
        })?;
    let lib = root.join("nvidia").join("cu13").join("lib");
    lib.join("libnvrtc.so.13").is_file().then_some(lib)
}

/// Makes libnvrtc loadable: already, or by loading the toolkit's copy (and its builtins,
/// which libnvrtc opens by name) by full path, after which loads by name find it.
fn ensure_nvrtc() -> Result<(), String> {
    if nvrtc_available().is_ok() {
        return Ok(());
    }
    let dir = toolkit_lib_dir().ok_or_else(|| {
        "no libnvrtc on the library path and no CUDA toolkit from tools/compile-kernels.sh"
            .to_string()
    })?;
    for name in ["libnvrtc-builtins.so.13.0", "libnvrtc.so.13"] {
        // SAFETY: loads NVIDIA's library, whose initialisers are safe to run; the handle is
        // kept for the life of the process so that later loads by name find it.
        let lib = unsafe { libloading::Library::new(dir.join(name)) }
            .map_err(|e| format!("loading {}: {e}", dir.join(name).display()))?;
        std::mem::forget(lib);
    }
    nvrtc_available()
}

#[test]
#[cfg_attr(
    not(genius_nvrtc),
    ignore = "needs libnvrtc: run tools/compile-kernels.sh first (it installs NVIDIA's compiler wheels)"
)]
fn every_kernel_unit_compiles_with_nvrtc_and_is_cached() {
    if let Err(why) = ensure_nvrtc() {
        skipped(&format!("NVRTC compile check ({why})"));
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    for (unit, names) in KERNEL_UNITS {
        for arch in ["compute_90", "compute_80"] {
            let (ptx, outcome) = compile_unit_cached(unit, arch, Some(cache.path()))
                .unwrap_or_else(|e| panic!("{e:#}"));
            assert_eq!(outcome, CacheOutcome::Compiled, "{unit} {arch}");
            for name in *names {
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "{unit} for {arch}: no entry {name} in the PTX"
                );
            }
            let target = arch.replace("compute_", ".target sm_");
            assert!(ptx.contains(&target), "{unit}: PTX is not for {arch}");
            let (again, outcome) = compile_unit_cached(unit, arch, Some(cache.path())).unwrap();
            assert_eq!(outcome, CacheOutcome::Hit, "{unit} {arch}: second compile");
            assert_eq!(again, ptx);
        }
    }
    // One cache file per (unit, arch), named by the key.
    let files: Vec<_> = std::fs::read_dir(cache.path()).unwrap().collect();
    assert_eq!(files.len(), KERNEL_UNITS.len() * 2);
    // Without a cache folder it still compiles.
    let (_, outcome) = compile_unit_cached(KERNEL_UNITS[0].0, "compute_90", None).unwrap();
    assert_eq!(outcome, CacheOutcome::CompiledUncached);
}

#[test]
#[cfg_attr(
    not(genius_nvrtc),
    ignore = "needs libnvrtc: run tools/compile-kernels.sh first (it installs NVIDIA's compiler wheels)"
)]
fn nvrtc_reports_compile_errors_with_the_log() {
    if let Err(why) = ensure_nvrtc() {
        skipped(&format!("NVRTC error check ({why})"));
        return;
    }
    let err = kernels::nvrtc_compile(
        "broken.cu",
        "#include \"common.cuh\"\nextern \"C\" __global__ void k() { undefined_thing(); }\n",
        &kernels::headers(),
        &kernels::nvrtc_options("compute_90"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("broken.cu"), "{err}");
    assert!(err.contains("undefined_thing"), "no compiler log in: {err}");
}

/// The first line bindgen writes: `/* automatically generated by rust-bindgen X.Y.Z */`.
fn bindgen_version_of(text: &str) -> Option<&str> {
    text.lines()
        .next()?
        .strip_prefix("/* automatically generated by rust-bindgen ")?
        .strip_suffix(" */")
}

#[test]
#[cfg_attr(
    not(genius_bindgen),
    ignore = "needs the bindgen CLI and libclang (see tools/gen-bindings.sh)"
)]
fn committed_bindings_match_bindgen() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if !root.join("tools/gen-bindings.sh").is_file() {
        // A prebuilt test executable run away from its source tree (tools/gpu-check.sh).
        skipped(&format!(
            "bindings regeneration check (no source tree at {})",
            root.display()
        ));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("args.rs");
    let run = Command::new("bash")
        .arg(root.join("tools/gen-bindings.sh"))
        .arg(&out)
        .current_dir(root)
        .output()
        .expect("running bash");
    let stderr = String::from_utf8_lossy(&run.stderr);
    match run.status.code() {
        Some(0) => {}
        Some(3) => {
            skipped(&format!(
                "bindings regeneration check ({})",
                stderr
                    .lines()
                    .next()
                    .unwrap_or("bindgen or libclang missing")
            ));
            return;
        }
        _ => panic!("tools/gen-bindings.sh failed:\n{stderr}"),
    }
    let fresh = std::fs::read_to_string(&out).unwrap();
    let committed = std::fs::read_to_string(root.join("src/backend/cuda/args.rs")).unwrap();
    if fresh == committed {
        return;
    }
    let (have, made_with) = (bindgen_version_of(&fresh), bindgen_version_of(&committed));
    if have != made_with {
        skipped(&format!(
            "bindings regeneration check (bindgen {have:?} here, the committed file is from {made_with:?})"
        ));
        return;
    }
    let first_diff = fresh
        .lines()
        .zip(committed.lines())
        .position(|(a, b)| a != b)
        .map(|i| i + 1);
    panic!(
        "src/backend/cuda/args.rs is not what bindgen makes of kernels/args.h (first difference \
         at line {first_diff:?}): run tools/gen-bindings.sh and commit the result"
    );
}
