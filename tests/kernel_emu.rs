//! The kernels' own source, run on the CPU: `tools/kernel-emu.sh` compiles
//! `kernels/paged_attention.cu`, `skinny_gemm.cu`, `train_gemm.cu`, `elementwise.cu`, `backward.cu` and the
//! three attention units (`attention_tc.cu`, `attention_backward_tc.cu`,
//! `attention_backward.cu`) with the host's C++ compiler and a small emulation of CUDA's
//! threads, barriers, warp shuffles and the tensor-core `mma.sync` instruction
//! (`tools/kernel-emu/emu.h`), then checks against float64 or exact references
//! (`tools/kernel-emu/checks.cpp`): paged attention on the CUDA cores and on the tensor cores
//! (decode, prefill chunks, GQA, head slices, context partitions and their combine, contiguous
//! rows; `cp.async` copies land only when waited for), the skinny split-K GEMM (one split and
//! several, partial tiles, bias), the fused log-prob forward and
//! backward (status codes included), SwiGLU, RMSNorm forward and backward, the bias gradient,
//! the elementwise kernels' 16-byte paths (add, scale, casts, sums of squares, column copies,
//! row gathers), the KV-cache writes with padding rows
//! (`NO_SLOT`), and training attention: the tensor-core forward with its log-sum-exp and the
//! backward in every form (statistics computed or taken from the forward, dk/dv per kv head
//! or split over query heads and reduced, the CUDA-core kernels). The same build then runs the
//! preference-loss kernel (`kernels/loss.cu`) on pairs of every loss kind, packed as the CUDA
//! backend packs them, against the host definition (`genius::loss::pair_losses_host`), and
//! the sampling kernel (`kernels/sampling.cu`) on f32 and bf16 rows against its host port and
//! the CPU sampler (the same tokens), with its f32 exponential against the CPU's bit for bit,
//! and the AdamW update (`kernels/optim.cu`, with its bf16 working copy) against the host's
//! `adamw_update_host` bit for bit.
//!
//! The checks run twice, with a block's threads one at a time in ascending and in descending
//! rank order (the first warp running ahead of the others up to each block barrier), so that
//! a missing `__syncthreads` / `__syncwarp` gives stale data in one of the two runs, and an
//! ldmatrix read of another thread's cp.async data before a barrier stops the run.
//!
//! This runs without a GPU, so kernel logic is checked before device time is spent; it is
//! not a GPU test (no timing, host math functions, the tensor cores' accumulation order
//! approximated): the `cuda_*` tests stay the judges of the device. It needs a C++20
//! compiler (`$CXX`, g++ or clang++) and fails, saying so, without one.

mod common;

use common::{Rng, every_loss_kind, loss_test_pairs};
use genius_engine::backend::cuda::loss::{OUTPUTS, kind_code, pair_inputs};
use genius_engine::backend::cuda::sampling::{
    RowSampling, THREADS, blocked_sample, filtered_sample, is_filtered, unpack_outputs,
};
use genius_engine::backend::{AdamWStep, adamw_update_host};
use genius_engine::engine::sampler::{SampledToken, SamplingParams, sample, sampling_exp};
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
        .env("KERNEL_EMU_ORDERS", "ascending descending:issue")
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
    // Both thread orders ran every check (a missing barrier fails one of them).
    for order in ["ascending", "descending:issue"] {
        assert!(
            stdout.contains(&format!("== thread order: {order}")),
            "no run in the {order} thread order:\n{stdout}"
        );
    }
    assert_eq!(
        stdout.matches("checks passed").count(),
        2,
        "one summary per thread order:\n{stdout}"
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");
    emulation_stops_unsynchronised_ldmatrix(&out.join("checks"));
    // The same build, run on the loss kernel's inputs (after the checks: one build at a time).
    pair_loss_kernel_matches_the_host(&out.join("checks"));
    sampling_kernel_matches_the_host_port_and_the_cpu_sampler(&out.join("checks"));
    sampling_kernel_filtered_paths_match_the_cpu_sampler(&out.join("checks"));
    kernel_exponential_is_the_cpu_definition(&out.join("checks"));
    adamw_kernel_is_the_host_update(&out.join("checks"));
}

/// The emulation's visibility tracking, which the checks rely on to catch a missing barrier
/// between cp.async and ldmatrix (the data is there in the emulation even without it): a
/// warp's ldmatrix of rows other lanes landed, with no `__syncwarp` between, stops the run in
/// both one-at-a-time orders (the same kernel with the barrier passes in the `emulator` group).
fn emulation_stops_unsynchronised_ldmatrix(checks: &Path) {
    for order in ["ascending", "descending"] {
        let run = Command::new(checks)
            .env("GE_EMU_ORDER", order)
            .arg("emulator-unsynced")
            .output()
            .expect("runs the kernel-emu checks");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(
            !run.status.success() && stderr.contains("with no barrier between"),
            "{order}: an unsynchronised ldmatrix was not stopped ({}):\n{}\n{stderr}",
            run.status,
            String::from_utf8_lossy(&run.stdout)
        );
    }
}

/// `ge_adamw_update` (kernels/optim.cu) with the bf16 working copy, run by the emulation:
/// the master weights and both moments are the host's `adamw_update_host` bit for bit (the
/// kernel's explicitly rounded operations in the host's order), and the working copy is the
/// updated master rounded to bf16 (nearest even), for a first step and a later one with
/// weight decay and a clipping factor.
fn adamw_kernel_is_the_host_update(checks: &Path) {
    let mut rng = Rng::new(83);
    let n = 1_001; // more than the emulated grid's 192 threads: the grid-stride loop runs
    for (t, lr, wd, scale) in [(1, 1e-3, 0.0, 1.0f32), (100, 3e-4, 0.1, 0.37)] {
        let step = AdamWStep::new(0.9, 0.999, 1e-8, wd, t, lr, scale);
        let mut p: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
        let mut m: Vec<f32> = (0..n).map(|_| rng.uniform() * 1e-2).collect();
        let mut v: Vec<f32> = (0..n).map(|_| rng.uniform().abs() * 1e-4).collect();
        let grad: Vec<f32> = (0..n)
            .map(|i| match i % 7 {
                0 => 0.0,
                1 => rng.uniform() * 1e3,
                _ => rng.uniform() * 0.1,
            })
            .collect();
        if t == 1 {
            m.fill(0.0);
            v.fill(0.0);
        }
        let mut text = String::new();
        for x in [
            step.beta1,
            step.beta2,
            step.one_minus_beta1,
            step.one_minus_beta2,
            step.eps,
            step.step_size,
            step.inv_sqrt_bias2,
            step.decay,
            step.grad_scale,
        ] {
            write!(text, "{:08x} ", x.to_bits()).unwrap();
        }
        writeln!(text, "\n{n}").unwrap();
        for x in p.iter().chain(&m).chain(&v).chain(&grad) {
            write!(text, "{:08x} ", x.to_bits()).unwrap();
        }
        let got = run_checks_mode(checks, "adamw", &text);
        assert_eq!(got.len(), 4 * n, "adamw: {} output words", got.len());
        adamw_update_host(&mut p, &mut m, &mut v, &grad, &step);
        for (what, (k, host)) in ["master", "m", "v"]
            .iter()
            .zip([&p, &m, &v].iter().enumerate())
        {
            for (i, x) in host.iter().enumerate() {
                assert_eq!(
                    got[k * n + i],
                    u64::from(x.to_bits()),
                    "adamw step {t}: {what}[{i}]: kernel {:#010x}, host {x} ({:#010x})",
                    got[k * n + i],
                    x.to_bits()
                );
            }
        }
        for (i, x) in p.iter().enumerate() {
            let want = half::bf16::from_f32(*x).to_bits();
            assert_eq!(
                got[3 * n + i],
                u64::from(want),
                "adamw step {t}: working copy [{i}] of {x}"
            );
        }
    }
}

/// Runs `checks MODE IN OUT` (tools/kernel-emu/checks.cpp) on `input` written to IN, in a
/// folder of its own per mode; returns OUT's words (hexadecimal bit patterns). Each call's
/// input and output stay there (`in-N.txt`, `out-N.txt`, N counting the mode's calls), so
/// that a kernel change can be rerun on all of them by hand.
fn run_checks_mode(checks: &Path, mode: &str, input: &str) -> Vec<u64> {
    static CALLS: std::sync::Mutex<Vec<(String, usize)>> = std::sync::Mutex::new(Vec::new());
    let n = {
        let mut calls = CALLS.lock().unwrap();
        match calls.iter_mut().find(|(m, _)| m == mode) {
            Some((_, k)) => {
                *k += 1;
                *k
            }
            None => {
                calls.push((mode.to_string(), 0));
                0
            }
        }
    };
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kernel-emu-{mode}"));
    std::fs::create_dir_all(&dir).unwrap();
    let (inp, outp) = (
        dir.join(format!("in-{n}.txt")),
        dir.join(format!("out-{n}.txt")),
    );
    std::fs::write(&inp, input).unwrap();
    let run = Command::new(checks)
        .env("GE_EMU_ORDER", "descending")
        .arg(mode)
        .arg(&inp)
        .arg(&outp)
        .output()
        .expect("runs the kernel-emu checks");
    assert!(
        run.status.success(),
        "{mode}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    std::fs::read_to_string(&outp)
        .unwrap()
        .split_whitespace()
        .map(|w| u64::from_str_radix(w, 16).unwrap())
        .collect()
}

/// `ge_pair_losses` (kernels/loss.cu), run by the emulation on pairs of every loss kind, gives
/// the host definition's sums, losses, gradients and monitoring values (f64; the kernel sums
/// each segment in a tree, the host in row order: 1e-9 relative).
fn pair_loss_kernel_matches_the_host(checks: &Path) {
    let mut rng = Rng::new(77);
    let (lp, rows, pairs) = loss_test_pairs(&mut rng, 3_000, 13);
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
            for v in pair_inputs(p) {
                write!(text, " {}", hex(v)).unwrap();
            }
            text.push('\n');
        }
        let got: Vec<f64> = run_checks_mode(checks, "pair-losses", &text)
            .into_iter()
            .map(f64::from_bits)
            .collect();
        assert_eq!(got.len(), OUTPUTS * pairs.len(), "{kind:?}");
        let close = |a: f64, b: f64| a == b || (a - b).abs() <= 1e-9 * (1.0 + b.abs());
        for (i, ((wx, wl), g)) in want.iter().zip(got.chunks_exact(OUTPUTS)).enumerate() {
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

/// One launch of the emulated sampling kernel on `rows` rows of `vocab` logits (f32, or bf16
/// when `bf16`: then `logits` must already be bf16 values): the packed output words.
fn emulated_sample_rows(
    checks: &Path,
    logits: &[f32],
    vocab: usize,
    rows: &[RowSampling],
    bf16: bool,
) -> Vec<u32> {
    let mut text = format!("{} {} {vocab} {THREADS}\n", u8::from(bf16), rows.len());
    for &x in logits {
        if bf16 {
            let b = half::bf16::from_f32(x);
            assert_eq!(
                b.to_f32().to_bits(),
                x.to_bits(),
                "bf16 test logits must be bf16 values"
            );
            write!(text, "{:04x} ", b.to_bits()).unwrap();
        } else {
            write!(text, "{:08x} ", x.to_bits()).unwrap();
        }
    }
    text.push('\n');
    for r in rows {
        let p = &r.params;
        writeln!(
            text,
            "{:x} {:x} {:08x} {:08x} {} {}",
            p.seed,
            r.seq_id,
            p.temperature.to_bits(),
            p.top_p.to_bits(),
            i32::try_from(p.top_k).unwrap_or(i32::MAX),
            r.position
        )
        .unwrap();
    }
    run_checks_mode(checks, "sample-rows", &text)
        .into_iter()
        .map(|w| u32::try_from(w).expect("a 32-bit output word"))
        .collect()
}

/// The kernel's draw `got` is each reference's token, with both log-probabilities within 1e-5.
fn assert_same_draw(got: &SampledToken, wants: &[(&str, SampledToken)], what: &str) {
    for (name, want) in wants {
        assert_eq!(
            got.token, want.token,
            "{what}: kernel {got:?}, {name} {want:?}"
        );
        assert!(
            (got.logprob - want.logprob).abs() <= 1e-5
                && (got.sampling_logprob - want.sampling_logprob).abs() <= 1e-5,
            "{what}: kernel {got:?}, {name} {want:?}"
        );
    }
}

/// `ge_sample_rows[_bf16]` (kernels/sampling.cu), run by the emulation, draws the tokens of the
/// kernel's host port (`blocked_sample`, `filtered_sample`: the same chunking and walk) and of
/// the CPU sampler, with their log-probabilities, on f32 and bf16 logits: greedy, T = 1 and
/// 0.6, top-k and top-p, masked tokens, tied maxima, an odd, an aligned and Qwen2.5's
/// vocabulary; rows holding a NaN or only -inf are refused with their status.
fn sampling_kernel_matches_the_host_port_and_the_cpu_sampler(checks: &Path) {
    let mut rng = Rng::new(4242);
    let mut checked = 0;
    let mut greedy_ties = 0;
    let mut later_tiles = 0;
    for (vocab, rows_n, bf16, scale) in [
        (1_000, 10, false, 6.0f32),
        (5_003, 8, true, 4.0),
        (4_096, 8, true, 12.0),
        (151_936, 3, true, 8.0),
        // Chunks of 1,960 logits: walks that cross in the second tile of 1,024.
        (2_000_000, 3, true, 8.0),
        (2_000_003, 3, false, 8.0),
    ] {
        let mut logits: Vec<f32> = (0..vocab * rows_n)
            .map(|_| {
                let x = (2.0 * rng.uniform() - 1.0) * scale;
                if bf16 {
                    half::bf16::from_f32(x).to_f32()
                } else {
                    x
                }
            })
            .collect();
        let kinds: [(f32, usize, f32); 6] = [
            (1.0, 0, 1.0),
            (0.6, 0, 1.0),
            (0.0, 0, 1.0),
            (1.0, 0, 1.0),
            (0.8, 40, 1.0),
            (1.0, 0, 0.9),
        ];
        // Masked tokens and two tied maxima in every third row and every greedy row; a greedy
        // row must take the lower of the two.
        let mut tie_first = vec![None; rows_n];
        for r in 0..rows_n {
            if r % 3 != 0 && kinds[r % kinds.len()].0 != 0.0 {
                continue;
            }
            let row = &mut logits[r * vocab..(r + 1) * vocab];
            for _ in 0..vocab / 4 {
                row[rng.below(vocab)] = f32::NEG_INFINITY;
            }
            let a = rng.below(vocab);
            let b = (a + 1 + rng.below(vocab - 1)) % vocab;
            row[a] = scale + 1.0;
            row[b] = scale + 1.0;
            tie_first[r] = Some(a.min(b));
        }
        let rows: Vec<RowSampling> = (0..rows_n)
            .map(|r| {
                let (temperature, top_k, top_p) = kinds[r % kinds.len()];
                RowSampling {
                    params: SamplingParams {
                        temperature,
                        top_k,
                        top_p,
                        seed: 0x5eed_0000 + r as u64 * 977 + vocab as u64,
                    },
                    seq_id: 77 + r as u64 * 13 + ((r as u64) << 34),
                    position: (r * 29 + 5) as u32,
                }
            })
            .collect();
        let got = unpack_outputs(
            &emulated_sample_rows(checks, &logits, vocab, &rows, bf16),
            vocab,
        )
        .unwrap();
        for (r, (g, row)) in got.iter().zip(&rows).enumerate() {
            let l = &logits[r * vocab..(r + 1) * vocab];
            let what = format!("vocab {vocab}, bf16 {bf16}, row {r}, {:?}", row.params);
            let port: SampledToken = if is_filtered(&row.params) {
                filtered_sample(l, &row.params, row.seq_id, row.position)
                    .unwrap()
                    .0
            } else {
                blocked_sample(l, &row.params, row.seq_id, row.position).unwrap()
            };
            let cpu = sample(l, &row.params, row.seq_id, row.position).unwrap();
            assert_same_draw(g, &[("host port", port), ("CPU sampler", cpu)], &what);
            if row.params.temperature == 0.0 {
                if let Some(first) = tie_first[r] {
                    assert_eq!(
                        g.token as usize, first,
                        "{what}: the lower of two tied maxima"
                    );
                    greedy_ties += 1;
                }
            } else if !is_filtered(&row.params) {
                let chunk = 8 * vocab.div_ceil(8 * THREADS);
                if g.token as usize % chunk >= THREADS {
                    later_tiles += 1;
                }
            }
            checked += 1;
        }
    }
    assert!(
        greedy_ties >= 4,
        "{greedy_ties} greedy rows with tied maxima"
    );
    assert!(
        later_tiles >= 1,
        "no walk crossed beyond its chunk's first tile of {THREADS} logits"
    );
    // Bad rows: a NaN (status 1), every logit -inf (status 2); the good row between them is
    // still sampled.
    let vocab = 300;
    let mut logits: Vec<f32> = (0..3 * vocab).map(|i| (i % 17) as f32 * 0.25).collect();
    logits[17] = f32::NAN;
    logits[2 * vocab..].fill(f32::NEG_INFINITY);
    let rows: Vec<RowSampling> = (0..3)
        .map(|r| RowSampling {
            params: SamplingParams::default(),
            seq_id: r,
            position: 1,
        })
        .collect();
    let words = emulated_sample_rows(checks, &logits, vocab, &rows, false);
    assert_eq!(words.len(), 12);
    assert_eq!(
        (words[3], words[7], words[11]),
        (1, 0, 2),
        "status words {words:?}"
    );
    let want = blocked_sample(&logits[vocab..2 * vocab], &rows[1].params, 1, 1).unwrap();
    assert_eq!(words[4], want.token);
    println!(
        "sampling: the emulated kernel draws the host port's and the CPU's tokens on {checked} rows \
         ({greedy_ties} greedy rows with tied maxima, {later_tiles} walks past a chunk's first \
         tile); bad rows refused"
    );
}

/// The filtered (top-k / top-p) paths of `ge_sample_rows[_bf16]` that random rows rarely
/// reach, run by the emulation against the host port and the CPU sampler: the whole-row
/// searches (more than `CAP` tokens at the histogram's bound: top-k 5,000, and top-p 0.95 on a
/// flat row), the cut inside a tie at the k-th key (compacted and whole-row), top-p ending
/// inside a tie, top-k together with top-p, and a top-k at or above the candidate count
/// (no floor at all). Every path is asserted to have been taken, so that the barriers on it
/// are exercised (`tools/kernel-emu-barrier-sweep.sh` reruns these inputs without each one).
fn sampling_kernel_filtered_paths_match_the_cpu_sampler(checks: &Path) {
    #[derive(Clone, Copy, Debug)]
    enum Shape {
        /// Uniform in [-8, 8].
        Spread,
        /// Uniform in [-0.5, 0.5]: the nucleus holds most of the vocabulary.
        Flat,
        /// Multiples of 0.5 in [-4, 4], then 100 tokens at 6.0 and 50 at 5.5: ties everywhere.
        Ties,
        /// Multiples of 0.5 in [-4, 4]: thousands tied at the top key.
        Steps,
        /// 30 finite logits, the rest -inf.
        Sparse,
    }
    let cases: [(Shape, f32, usize, f32); 10] = [
        (Shape::Spread, 0.7, 5_000, 1.0),
        (Shape::Flat, 1.0, 0, 0.95),
        (Shape::Spread, 1.3, 50, 0.8),
        (Shape::Spread, 1.0, 1_000_000, 1.0),
        (Shape::Ties, 1.0, 120, 1.0),
        (Shape::Ties, 1.0, 0, 0.5),
        (Shape::Sparse, 1.0, 40, 1.0),
        (Shape::Sparse, 0.9, 10, 0.7),
        (Shape::Steps, 1.0, 1_000, 1.0),
        (Shape::Flat, 1.0, 3_000, 0.9),
    ];
    let mut rng = Rng::new(9_001);
    let (mut compacted, mut whole_row, mut checked) = (0, 0, 0);
    for (vocab, bf16) in [(32_768usize, true), (20_003, false)] {
        let mut logits = Vec::with_capacity(vocab * cases.len());
        for &(shape, ..) in &cases {
            let start = logits.len();
            logits.extend((0..vocab).map(|_| {
                let x = 2.0 * rng.uniform() - 1.0;
                match shape {
                    Shape::Spread => 8.0 * x,
                    Shape::Flat => 0.5 * x,
                    Shape::Ties | Shape::Steps => (8.0 * x).round() * 0.5,
                    Shape::Sparse => f32::NEG_INFINITY,
                }
            }));
            let row = &mut logits[start..];
            match shape {
                Shape::Ties => {
                    for j in 0..150 {
                        row[rng.below(vocab)] = if j < 100 { 6.0 } else { 5.5 };
                    }
                }
                Shape::Sparse => {
                    for _ in 0..30 {
                        row[rng.below(vocab)] = 4.0 * rng.uniform();
                    }
                }
                _ => {}
            }
            if bf16 {
                for x in row.iter_mut() {
                    *x = half::bf16::from_f32(*x).to_f32();
                }
            }
        }
        let rows: Vec<RowSampling> = cases
            .iter()
            .enumerate()
            .map(|(r, &(_, temperature, top_k, top_p))| RowSampling {
                params: SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    seed: 0xf17e_0000 + r as u64 * 31 + vocab as u64,
                },
                seq_id: 1_000 + r as u64,
                position: (r * 7 + 3) as u32,
            })
            .collect();
        let got = unpack_outputs(
            &emulated_sample_rows(checks, &logits, vocab, &rows, bf16),
            vocab,
        )
        .unwrap();
        for (r, (g, row)) in got.iter().zip(&rows).enumerate() {
            let l = &logits[r * vocab..(r + 1) * vocab];
            let what = format!(
                "vocab {vocab}, bf16 {bf16}, row {r} ({:?}), {:?}",
                cases[r].0, row.params
            );
            let (port, compact) =
                filtered_sample(l, &row.params, row.seq_id, row.position).unwrap();
            let cpu = sample(l, &row.params, row.seq_id, row.position).unwrap();
            assert_same_draw(g, &[("host port", port), ("CPU sampler", cpu)], &what);
            if compact {
                compacted += 1;
            } else {
                whole_row += 1;
            }
            checked += 1;
        }
    }
    // Both search paths ran, on both vocabularies' worth of rows.
    assert!(compacted >= 6, "{compacted} compacted rows");
    assert!(whole_row >= 6, "{whole_row} whole-row rows");
    println!(
        "sampling, filtered paths: the emulated kernel draws the host port's and the CPU's tokens \
         on {checked} rows ({compacted} compacted, {whole_row} searched over the whole row)"
    );
}

/// The kernel source's `ge_sampling_exp` (kernels/sampling.cu), run by the emulation, gives the
/// CPU's `sampling_exp` bit for bit: the two transcriptions of the definition's operations and
/// constants agree. (The emulation's arithmetic is the host's IEEE f32, as the definition's;
/// whether the device's is too is `cuda_sampling`'s
/// `device_exponential_is_the_cpu_definition_bit_for_bit`.)
fn kernel_exponential_is_the_cpu_definition(checks: &Path) {
    let mut x: Vec<f32> = (0..=105 * 512).map(|i| -(i as f32) / 512.0).collect();
    let mut rng = Rng::new(99);
    x.extend((0..20_000).map(|_| -105.0 * rng.uniform().abs()));
    x.extend([f32::NEG_INFINITY, f32::NAN, -0.0, -1e-30, -103.97]);
    let mut text = format!("{}\n", x.len());
    for v in &x {
        writeln!(text, "{:08x}", v.to_bits()).unwrap();
    }
    let got: Vec<u32> = run_checks_mode(checks, "sampling-exp", &text)
        .into_iter()
        .map(|w| u32::try_from(w).expect("a 32-bit output word"))
        .collect();
    assert_eq!(got.len(), x.len());
    for (&xi, &g) in x.iter().zip(&got) {
        let want = sampling_exp(xi);
        assert_eq!(
            g,
            want.to_bits(),
            "E({xi:e}): kernel {:e}, cpu {want:e}",
            f32::from_bits(g)
        );
    }
    println!(
        "sampling exponential: the kernel's source gives the CPU's bits on {} values",
        x.len()
    );
}
