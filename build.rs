//! Build script: embeds the CUDA kernel sources of `kernels/` into the library so that the
//! runtime can compile them with NVRTC on first use. A plain `cargo build` never needs CUDA.
//! (Ahead-of-time nvcc compilation joins this script with the CUDA backend.) It also turns on
//! the real-tokenizer tests when `GENIUS_TEST_TOKENIZERS` is set.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    // Tests on real tokenizer files run only when the files are there (see
    // tools/fetch-test-tokenizers.sh); otherwise the harness reports them as ignored.
    println!("cargo:rerun-if-env-changed=GENIUS_TEST_TOKENIZERS");
    println!("cargo::rustc-check-cfg=cfg(genius_test_tokenizers)");
    if std::env::var_os("GENIUS_TEST_TOKENIZERS").is_some() {
        println!("cargo:rustc-cfg=genius_test_tokenizers");
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut out = String::from(
        "/// `(file name, source)` of every kernel source in `kernels/`, embedded at build time.\n\
         pub const KERNEL_SOURCES: &[(&str, &str)] = &[\n",
    );
    for f in &files {
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 file name");
        writeln!(
            out,
            "    ({name:?}, include_str!({:?})),",
            f.display().to_string()
        )
        .unwrap();
    }
    out.push_str("];\n");
    let dest = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("kernel_sources.rs");
    std::fs::write(dest, out).expect("write kernel_sources.rs");
}
