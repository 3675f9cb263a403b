//! Build script. Two jobs:
//!
//! 1. CUDA kernels. Every source in `kernels/` (`.cu` units, `.cuh` and `.h` headers) is
//!    embedded into the library, so that the runtime can compile it with NVRTC on first use.
//!    When nvcc is found (`$NVCC`, else `nvcc` on `PATH`; `GENIUS_NO_NVCC=1` turns this off),
//!    each `.cu` unit is also compiled ahead of time into PTX for `compute_90` and a cubin for
//!    `sm_90a`, and those are embedded too. Without nvcc the build says nothing and succeeds:
//!    a plain `cargo build` never needs CUDA. A unit nvcc rejects is reported as a cargo
//!    warning and left to NVRTC (which will then report the same error at run time);
//!    `tools/compile-kernels.sh` is the check that fails on it.
//! 2. It turns on the real-tokenizer tests when `GENIUS_TEST_TOKENIZERS` is set.
//!
//! Output: `$OUT_DIR/kernel_sources.rs` (`KERNEL_SOURCES`) and `$OUT_DIR/kernel_images.rs`
//! (`NVCC_VERSION`, `KERNEL_PTX`, `KERNEL_CUBIN_SM90A`), included by `src/backend/cuda/`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Virtual architecture of the embedded PTX (Hopper; the driver JIT-compiles it for newer chips).
const PTX_ARCH: &str = "compute_90";

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=GENIUS_NO_NVCC");
    // Tests on real tokenizer files run only when the files are there (see
    // tools/fetch-test-tokenizers.sh); otherwise the harness reports them as ignored.
    println!("cargo:rerun-if-env-changed=GENIUS_TEST_TOKENIZERS");
    println!("cargo::rustc-check-cfg=cfg(genius_test_tokenizers)");
    if std::env::var_os("GENIUS_TEST_TOKENIZERS").is_some() {
        println!("cargo:rustc-cfg=genius_test_tokenizers");
    }
    // GPU tests run only in executables built for a GPU machine (tools/gpu-prepare.sh sets
    // GENIUS_GPU_TESTS); elsewhere the harness reports them as ignored, never as passed.
    println!("cargo:rerun-if-env-changed=GENIUS_GPU_TESTS");
    println!("cargo::rustc-check-cfg=cfg(genius_gpu_tests)");
    if std::env::var_os("GENIUS_GPU_TESTS").is_some() {
        println!("cargo:rustc-cfg=genius_gpu_tests");
    }
    // The NVRTC compile tests need libnvrtc: the toolkit tools/compile-kernels.sh installs
    // (or one on the library path); the bindings check needs the bindgen CLI.
    println!("cargo:rerun-if-env-changed=GENIUS_CUDA_TOOLKIT");
    println!("cargo::rustc-check-cfg=cfg(genius_nvrtc)");
    println!("cargo::rustc-check-cfg=cfg(genius_bindgen)");
    let toolkit = std::env::var_os("GENIUS_CUDA_TOOLKIT")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| std::path::PathBuf::from(h).join(".cache/genius-engine/cuda-toolkit"))
        });
    let nvrtc = toolkit.is_some_and(|t| t.join("nvidia/cu13/lib/libnvrtc.so.13").is_file())
        || [
            "/usr/local/cuda/lib64/libnvrtc.so",
            "/usr/lib/x86_64-linux-gnu/libnvrtc.so",
        ]
        .iter()
        .any(|p| Path::new(p).is_file());
    if nvrtc {
        println!("cargo:rustc-cfg=genius_nvrtc");
    }
    let on_path = |exe: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(exe).is_file()))
    };
    // The bindings check runs where bindgen is installed, unless GENIUS_BINDGEN_CHECK=0 (the
    // GPU test build: the GPU machine has no bindgen, and the check belongs to this machine).
    println!("cargo:rerun-if-env-changed=GENIUS_BINDGEN_CHECK");
    let bindgen_check = std::env::var("GENIUS_BINDGEN_CHECK").map_or(true, |v| v != "0");
    if bindgen_check && on_path("bindgen") {
        println!("cargo:rustc-cfg=genius_bindgen");
    }

    let kernel_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let files = kernel_files(&kernel_dir);
    write_sources(&files, &out_dir);
    write_images(&files, &kernel_dir, &out_dir);
}

/// Every `.cu`, `.cuh` and `.h` file of `kernels/`, sorted by name.
fn kernel_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("cu" | "cuh" | "h")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn file_name(p: &Path) -> &str {
    p.file_name()
        .and_then(|n| n.to_str())
        .expect("utf-8 file name")
}

fn write_sources(files: &[PathBuf], out_dir: &Path) {
    let mut out = String::from(
        "/// `(file name, source)` of every kernel source in `kernels/` (units and headers),\n\
         /// embedded at build time.\n\
         pub const KERNEL_SOURCES: &[(&str, &str)] = &[\n",
    );
    for f in files {
        writeln!(
            out,
            "    ({:?}, include_str!({:?})),",
            file_name(f),
            f.display().to_string()
        )
        .unwrap();
    }
    out.push_str("];\n");
    std::fs::write(out_dir.join("kernel_sources.rs"), out).expect("write kernel_sources.rs");
}

/// The nvcc to use, if any: `$NVCC`, else `nvcc` on `PATH`, unless `GENIUS_NO_NVCC` is set.
fn find_nvcc() -> Option<PathBuf> {
    if std::env::var_os("GENIUS_NO_NVCC").is_some_and(|v| !v.is_empty() && v != "0") {
        return None;
    }
    if let Some(p) = std::env::var_os("NVCC").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("nvcc"))
        .find(|p| p.is_file())
}

/// Runs nvcc; on failure returns its output for the warning.
fn nvcc(nvcc: &Path, args: &[&str], src: &Path, out: &Path) -> Result<(), String> {
    let result = Command::new(nvcc)
        .args(args)
        .arg("-o")
        .arg(out)
        .arg(src)
        .output();
    match result {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn write_images(files: &[PathBuf], kernel_dir: &Path, out_dir: &Path) {
    let mut version = None;
    let mut ptx = Vec::new();
    let mut cubins = Vec::new();
    if let Some(nvcc_path) = find_nvcc() {
        version = Command::new(&nvcc_path)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .find(|l| l.contains("release"))
                    .map(|l| l.trim().to_string())
            });
        if version.is_none() {
            println!(
                "cargo:warning=NVCC={} does not run; kernels will be compiled with NVRTC at run time",
                nvcc_path.display()
            );
        }
        let include = format!("-I{}", kernel_dir.display());
        for unit in files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == "cu"))
        {
            if version.is_none() {
                break;
            }
            let name = file_name(unit);
            let stem = name.trim_end_matches(".cu");
            let ptx_out = out_dir.join(format!("{stem}.{PTX_ARCH}.ptx"));
            let ptx_arch = format!("-arch={PTX_ARCH}");
            let ptx_args = ["-ptx", ptx_arch.as_str(), "-std=c++17", include.as_str()];
            match nvcc(&nvcc_path, &ptx_args, unit, &ptx_out) {
                Ok(()) => ptx.push((name.to_string(), ptx_out)),
                Err(log) => {
                    warn_failed(name, "PTX", &log);
                    continue;
                }
            }
            let cubin_out = out_dir.join(format!("{stem}.sm_90a.cubin"));
            let cubin_args = [
                "-cubin",
                "-gencode=arch=compute_90a,code=sm_90a",
                "-std=c++17",
                include.as_str(),
            ];
            match nvcc(&nvcc_path, &cubin_args, unit, &cubin_out) {
                Ok(()) => cubins.push((name.to_string(), cubin_out)),
                Err(log) => warn_failed(name, "sm_90a cubin", &log),
            }
        }
    }
    let mut out = String::new();
    writeln!(
        out,
        "/// `nvcc --version`'s release line when the kernels were compiled ahead of time.\n\
         pub const NVCC_VERSION: Option<&str> = {version:?};"
    )
    .unwrap();
    out.push_str(
        "/// `(unit file name, PTX for compute_90)` of each unit nvcc compiled at build time.\n\
         pub const KERNEL_PTX: &[(&str, &str)] = &[\n",
    );
    for (name, path) in &ptx {
        writeln!(
            out,
            "    ({name:?}, include_str!({:?})),",
            path.display().to_string()
        )
        .unwrap();
    }
    out.push_str(
        "];\n/// `(unit file name, cubin for sm_90a)` of each unit nvcc compiled at build time.\n\
         pub const KERNEL_CUBIN_SM90A: &[(&str, &[u8])] = &[\n",
    );
    for (name, path) in &cubins {
        writeln!(
            out,
            "    ({name:?}, include_bytes!({:?})),",
            path.display().to_string()
        )
        .unwrap();
    }
    out.push_str("];\n");
    std::fs::write(out_dir.join("kernel_images.rs"), out).expect("write kernel_images.rs");
}

fn warn_failed(unit: &str, what: &str, log: &str) {
    println!(
        "cargo:warning=nvcc could not compile kernels/{unit} to {what}; it will be compiled with NVRTC at run time"
    );
    for line in log.lines().filter(|l| !l.trim().is_empty()).take(20) {
        println!("cargo:warning=  {line}");
    }
}
