//! The kernels' own source, run on the CPU: `tools/kernel-emu.sh` compiles
//! `kernels/paged_attention.cu`, `train_gemm.cu`, `elementwise.cu`, `backward.cu` and the
//! three attention units (`attention_tc.cu`, `attention_backward_tc.cu`,
//! `attention_backward.cu`) with the host's C++ compiler and a small emulation of CUDA's
//! threads, barriers, warp shuffles and the tensor-core `mma.sync` instruction
//! (`tools/kernel-emu/emu.h`), then checks against float64 or exact references
//! (`tools/kernel-emu/checks.cpp`): paged attention (decode, prefill chunks, GQA, head slices,
//! context partitions and their combine, contiguous rows), the fused log-prob forward and
//! backward (status codes included), SwiGLU, the KV-cache writes with padding rows
//! (`NO_SLOT`), and training attention: the tensor-core forward with its log-sum-exp and the
//! backward in every form (statistics computed or taken from the forward, dk/dv per kv head
//! or split over query heads and reduced, the CUDA-core kernels).
//!
//! This runs without a GPU, so kernel logic is checked before device time is spent; it is
//! not a GPU test (no timing, host math functions, the tensor cores' accumulation order
//! approximated): the `cuda_*` tests stay the judges of the device. It needs a C++20
//! compiler (`$CXX`, g++ or clang++) and fails, saying so, without one.

use std::path::Path;
use std::process::Command;

#[test]
fn cuda_core_kernels_match_float64_references_in_the_cpu_emulation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel-emu");
    let result = Command::new("bash")
        .arg(root.join("tools/kernel-emu.sh"))
        .env("KERNEL_EMU_DIR", &out)
        .current_dir(root)
        .output()
        .expect("runs bash tools/kernel-emu.sh");
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    println!("{stdout}");
    assert!(
        result.status.success(),
        "tools/kernel-emu.sh failed ({}):\n{stdout}\n{stderr}",
        result.status
    );
    assert!(
        stdout.contains("checks passed") && !stdout.contains("FAIL"),
        "{stdout}"
    );
}
