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
//! or split over query heads and reduced, the CUDA-core kernels). The same build then runs the
//! preference-loss kernel (`kernels/loss.cu`) on pairs of every loss kind, packed as the CUDA
//! backend packs them, against the host definition (`genius::loss::pair_losses_host`).
//!
//! This runs without a GPU, so kernel logic is checked before device time is spent; it is
//! not a GPU test (no timing, host math functions, the tensor cores' accumulation order
//! approximated): the `cuda_*` tests stay the judges of the device. It needs a C++20
//! compiler (`$CXX`, g++ or clang++) and fails, saying so, without one.

mod common;

use common::{Rng, every_loss_kind, loss_test_pairs};
use genius_engine::backend::cuda::loss::kind_code;
use genius_engine::genius::loss::{LossConfig, PairLoss, pair_losses_host};
use std::fmt::Write as _;
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
    // The same build, run on the loss kernel's inputs (after the checks: one build at a time).
    pair_loss_kernel_matches_the_host(&out.join("checks"));
}

/// `ge_pair_losses` (kernels/loss.cu), run by the emulation on pairs of every loss kind, gives
/// the host definition's sums, losses, gradients and monitoring values (f64; the kernel sums
/// each segment in a tree, the host in row order: 1e-9 relative).
fn pair_loss_kernel_matches_the_host(checks: &Path) {
    let mut rng = Rng::new(77);
    let (lp, rows, pairs) = loss_test_pairs(&mut rng, 3_000, 13);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel-emu-pair-losses");
    std::fs::create_dir_all(&dir).unwrap();
    for kind in every_loss_kind() {
        let cfg = LossConfig::new(kind);
        let want = pair_losses_host(&lp, &rows, &pairs, &cfg).unwrap();
        // The kernel's inputs, as the CUDA backend packs them (backend/cuda/loss.rs).
        let (code, clip, alpha, gamma, tau) = kind_code(kind);
        let hex = |x: f64| format!("{:016x}", x.to_bits());
        let mut text = format!(
            "{code} {clip} {} {} {} {}\n{}\n",
            hex(cfg.beta),
            hex(alpha),
            hex(gamma),
            hex(tau),
            lp.len()
        );
        for x in &lp {
            write!(text, "{:08x} ", x.to_bits()).unwrap();
        }
        writeln!(text, "\n{}", pairs.len()).unwrap();
        for ((c, r), p) in rows.iter().zip(&pairs) {
            write!(text, "{} {} {} {}", c.start, c.end, r.start, r.end).unwrap();
            for v in [
                p.ref_chosen,
                p.ref_rejected,
                p.chosen_tokens as f64,
                p.rejected_tokens as f64,
                p.adv_chosen,
                p.adv_rejected,
            ] {
                write!(text, " {}", hex(v)).unwrap();
            }
            text.push('\n');
        }
        let (inp, outp) = (dir.join("in.txt"), dir.join("out.txt"));
        std::fs::write(&inp, text).unwrap();
        let run = Command::new(checks)
            .arg("pair-losses")
            .arg(&inp)
            .arg(&outp)
            .output()
            .expect("runs the kernel-emu checks");
        assert!(
            run.status.success(),
            "pair-losses: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let got: Vec<f64> = std::fs::read_to_string(&outp)
            .unwrap()
            .split_whitespace()
            .map(|w| f64::from_bits(u64::from_str_radix(w, 16).unwrap()))
            .collect();
        assert_eq!(got.len(), 9 * pairs.len(), "{kind:?}");
        let close = |a: f64, b: f64| a == b || (a - b).abs() <= 1e-9 * (1.0 + b.abs());
        for (i, ((wx, wl), g)) in want.iter().zip(got.chunks_exact(9)).enumerate() {
            let PairLoss {
                loss,
                grad_chosen,
                grad_rejected,
                chosen_reward,
                rejected_reward,
                weight,
                margin,
            } = *wl;
            let expect = [
                wx.policy_chosen,
                wx.policy_rejected,
                loss,
                grad_chosen,
                grad_rejected,
                chosen_reward,
                rejected_reward,
                weight,
                margin,
            ];
            for (k, (&gv, &wv)) in g.iter().zip(&expect).enumerate() {
                assert!(
                    close(gv, wv),
                    "{kind:?}, pair {i}, output {k}: kernel {gv}, host {wv}"
                );
            }
        }
    }
    println!("pair losses: the emulated kernel matches the host for every loss kind");
}
