//! The GEMM-shaped training ops of the CUDA backend (src/backend/cuda/train_gemm.rs) against
//! the CPU backend, on fresh random inputs and several shapes (odd sizes included):
//! `linear_backward_input`, `accumulate_linear_grad`, `accumulate_bias_grad`, `sum_squares`
//! and `target_logprobs_backward`. Inputs are rounded to bf16 first, so that both backends
//! compute the same function; the CPU's f32 result is the reference. Parameter gradients are
//! f32 tensors (`zeros_f32` / `upload_f32`) holding a nonzero value first, and every
//! accumulating op is called twice, so that both `+=` steps are checked.
//!
//! Tolerances: ‖gpu − cpu‖ / ‖cpu‖ at most 1e-2 for GEMM-based results (bf16 operands, and the
//! log-prob backward's bf16 softmax gradient), 1e-3 for f32 reductions; NaN never passes. The
//! backend is created with `poison_outputs`, so every fresh output is NaN until written.
//!
//! These tests are ignored unless built for a GPU run (`GENIUS_GPU_TESTS=1`, as
//! tools/gpu-prepare.sh does); so built, a missing device fails them.

mod common;

use common::Rng;
use common::cuda::{assert_close, rand_bf16, rel_err_or_inf as rel_err, shared_gpu as gpu};
use genius_engine::backend::Backend;
use genius_engine::backend::cpu::CpuBackend;
use genius_engine::backend::cuda::tensor::round_to_bf16;
use genius_engine::backend::cuda::{CudaBackend, CudaOptions, DType};
use genius_engine::model::HostTensor;

/// Relative error bound for GEMM-based results (bf16 operands).
const GEMM_TOL: f64 = 1e-2;
/// Relative error bound for f32 reductions.
const REDUCTION_TOL: f64 = 1e-3;

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn linear_backward_input_matches_cpu() {
    let Some(be) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(101);
    // (n, out, in): odd sizes, n = 1 / 7 / 33 / 130, and the real models' projections.
    for (n, out, inp) in [
        (1, 1, 1),
        (7, 5, 3),
        (33, 65, 17),
        (130, 33, 129),
        (7, 896, 4864),
        (130, 4864, 896),
        (130, 1152, 576),
    ] {
        let dy = rand_bf16(&mut rng, &[n, out], 1.0);
        let w = rand_bf16(&mut rng, &[out, inp], 1.0 / (out as f32).sqrt());
        let want = cpu
            .linear_backward_input(&dy, &cpu.upload_linear(&w).unwrap())
            .unwrap();
        let got = be
            .linear_backward_input(&be.upload(&dy).unwrap(), &be.upload_linear(&w).unwrap())
            .unwrap();
        assert_eq!(got.dtype(), DType::Bf16);
        assert_close(
            &format!("linear_backward_input [{n}, {out}] x [{out}, {inp}]"),
            &be.download(&got).unwrap(),
            &want,
            GEMM_TOL,
        );
    }
    let w = be
        .upload_linear(&rand_bf16(&mut rng, &[4, 3], 1.0))
        .unwrap();
    let err = be
        .linear_backward_input(&be.upload(&rand_bf16(&mut rng, &[2, 5], 1.0)).unwrap(), &w)
        .unwrap_err()
        .to_string();
    assert!(err.contains("columns"), "{err}");
    let empty = be
        .linear_backward_input(
            &be.upload(&HostTensor::new(vec![0, 4], vec![])).unwrap(),
            &w,
        )
        .unwrap();
    assert_eq!(be.shape(&empty), &[0, 3]);
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn accumulate_linear_grad_matches_cpu_twice_onto_a_nonzero_grad() {
    let Some(be) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(102);
    for (n, out, inp) in [
        (1, 1, 1),
        (7, 5, 3),
        (33, 65, 17),
        (130, 33, 129),
        (7, 896, 4864),
        (130, 4864, 896),
        (130, 1152, 576),
    ] {
        let x = rand_bf16(&mut rng, &[n, inp], 1.0);
        let dy = rand_bf16(&mut rng, &[n, out], 1.0);
        let g0 = rng.tensor(&[out, inp], (n as f32).sqrt());
        let mut want = g0.clone();
        let mut got = be.upload_f32(&g0).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let (gx, gdy) = (be.upload(&x).unwrap(), be.upload(&dy).unwrap());
        for call in 1..=2 {
            cpu.accumulate_linear_grad(&mut want, &x, &dy).unwrap();
            be.accumulate_linear_grad(&mut got, &gx, &gdy).unwrap();
            assert_close(
                &format!("accumulate_linear_grad x{call}: [{n}, {out}]^T x [{n}, {inp}]"),
                &be.download(&got).unwrap(),
                &want,
                GEMM_TOL,
            );
        }
        // From zero, twice: exactly twice the first call's f32 sums (same GEMM, same order).
        let mut once = be.zeros_f32(&[out, inp]).unwrap();
        be.accumulate_linear_grad(&mut once, &gx, &gdy).unwrap();
        let once = be.download(&once).unwrap();
        let mut twice = be.zeros_f32(&[out, inp]).unwrap();
        be.accumulate_linear_grad(&mut twice, &gx, &gdy).unwrap();
        be.accumulate_linear_grad(&mut twice, &gx, &gdy).unwrap();
        let doubled = HostTensor::new(
            once.shape.clone(),
            once.data.iter().map(|v| 2.0 * v).collect(),
        );
        assert_close(
            &format!("accumulate_linear_grad from zero twice [{out}, {inp}]"),
            &be.download(&twice).unwrap(),
            &doubled,
            1e-6,
        );
    }
    // A bf16 grad is refused (gradients are f32), as is a shape mismatch.
    let (gx, gdy) = (
        be.upload(&rand_bf16(&mut rng, &[3, 4], 1.0)).unwrap(),
        be.upload(&rand_bf16(&mut rng, &[3, 2], 1.0)).unwrap(),
    );
    let err = be
        .accumulate_linear_grad(&mut be.zeros(&[2, 4]).unwrap(), &gx, &gdy)
        .unwrap_err()
        .to_string();
    assert!(err.contains("f32"), "{err}");
    let err = be
        .accumulate_linear_grad(&mut be.zeros_f32(&[4, 2]).unwrap(), &gx, &gdy)
        .unwrap_err()
        .to_string();
    assert!(err.contains("want [2, 4]"), "{err}");
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn accumulate_bias_grad_matches_cpu_and_is_deterministic() {
    let Some(be) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(103);
    for (n, out) in [
        (1, 1),
        (7, 5),
        (33, 65),
        (130, 896),
        (130, 4864),
        (2049, 129),
        // Many row groups (32 rows each, 8 per block) on the 16-byte path: Qwen2's q/k/v bias.
        (8192, 1152),
    ] {
        let dy = rand_bf16(&mut rng, &[n, out], 1.0);
        let g0 = rng.tensor(&[out], (n as f32).sqrt());
        let mut want = g0.clone();
        let mut got = be.upload_f32(&g0).unwrap();
        let gdy = be.upload(&dy).unwrap();
        for call in 1..=2 {
            cpu.accumulate_bias_grad(&mut want, &dy).unwrap();
            be.accumulate_bias_grad(&mut got, &gdy).unwrap();
            assert_close(
                &format!("accumulate_bias_grad x{call}: [{n}, {out}]"),
                &be.download(&got).unwrap(),
                &want,
                REDUCTION_TOL,
            );
        }
        let runs: Vec<Vec<u32>> = (0..2)
            .map(|_| {
                let mut g = be.upload_f32(&g0).unwrap();
                be.accumulate_bias_grad(&mut g, &gdy).unwrap();
                be.download(&g)
                    .unwrap()
                    .data
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            })
            .collect();
        assert_eq!(
            runs[0], runs[1],
            "accumulate_bias_grad [{n}, {out}]: not deterministic"
        );
    }
    let err = be
        .accumulate_bias_grad(
            &mut be.zeros_f32(&[3]).unwrap(),
            &be.upload(&rand_bf16(&mut rng, &[2, 4], 1.0)).unwrap(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("columns"), "{err}");
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn sum_squares_matches_cpu_for_f32_and_bf16_and_is_deterministic() {
    let Some(be) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(104);
    for len in [1usize, 7, 33 * 130, (1 << 20) + 3, 5_000_011] {
        let t = rng.tensor(&[len], 3.0);
        let tb = round_to_bf16(&t);
        for (what, dev, host) in [
            ("f32", be.upload_f32(&t).unwrap(), &t),
            ("bf16", be.upload(&t).unwrap(), &tb),
        ] {
            let want = cpu.sum_squares(host).unwrap();
            let got = be.sum_squares(&dev).unwrap();
            assert!(got.is_finite(), "sum_squares {what} {len}: {got}");
            let e = (got - want).abs() / want.abs().max(f64::MIN_POSITIVE);
            assert!(
                e <= REDUCTION_TOL,
                "sum_squares {what} of {len}: {got} vs {want} (relative error {e:.3e})"
            );
            let again = be.sum_squares(&dev).unwrap();
            assert_eq!(
                got.to_bits(),
                again.to_bits(),
                "sum_squares {what} {len}: not deterministic"
            );
        }
    }
    let empty = be.upload_f32(&HostTensor::new(vec![0, 3], vec![])).unwrap();
    assert_eq!(be.sum_squares(&empty).unwrap(), 0.0);
    // Batched over mixed tensors (an empty one among them): the per-tensor sums added in
    // order, bit for bit.
    let mixed: Vec<_> = [5usize, 0, 4096 * 3 + 1, 1, (1 << 20) + 17]
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let t = rng.tensor(&[len], 2.0);
            if i % 2 == 0 {
                be.upload_f32(&t).unwrap()
            } else {
                be.upload(&t).unwrap()
            }
        })
        .collect();
    let refs: Vec<_> = mixed.iter().collect();
    let mut want = 0.0f64;
    for t in &refs {
        want += be.sum_squares(t).unwrap();
    }
    let got = be.sum_squares_many(&refs).unwrap();
    assert_eq!(
        got.to_bits(),
        want.to_bits(),
        "sum_squares_many {got} vs {want}"
    );
    assert_eq!(be.sum_squares_many(&[&empty]).unwrap(), 0.0);
    assert_eq!(be.sum_squares_many(&[]).unwrap(), 0.0);
}

/// One log-prob backward case, on the GPU with `chunk` rows per chunk (0: the default) and
/// on the CPU, each called twice onto the same nonzero f32 LM-head gradient.
fn check_logprobs_backward(
    be: &CudaBackend,
    rng: &mut Rng,
    n: usize,
    d: usize,
    vocab: usize,
    chunk: usize,
) {
    let cpu = CpuBackend::new();
    let hidden = rand_bf16(rng, &[n, d], 1.0);
    let w = rand_bf16(rng, &[vocab, d], 3.0 / (d as f32).sqrt());
    let targets: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
    let d_logprob: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
    let g0 = rng.tensor(&[vocab, d], 0.1);
    let cw = cpu.upload_linear(&w).unwrap();
    let (gh, gw) = (be.upload(&hidden).unwrap(), be.upload_linear(&w).unwrap());
    let mut want_grad = g0.clone();
    let mut got_grad = be.upload_f32(&g0).unwrap();
    be.set_logprob_chunk_rows(chunk);
    let what = format!("target_logprobs_backward n {n}, d {d}, vocab {vocab}, chunk {chunk}");
    for call in 1..=2 {
        let want = cpu
            .target_logprobs_backward(&hidden, &cw, &targets, &d_logprob, None, &mut want_grad)
            .unwrap();
        let got = be
            .target_logprobs_backward(&gh, &gw, &targets, &d_logprob, None, &mut got_grad)
            .unwrap();
        assert_eq!(got.dtype(), DType::Bf16);
        assert_close(
            &format!("{what}: d_hidden (call {call})"),
            &be.download(&got).unwrap(),
            &want,
            GEMM_TOL,
        );
        assert_close(
            &format!("{what}: lm_head_grad (call {call})"),
            &be.download(&got_grad).unwrap(),
            &want_grad,
            GEMM_TOL,
        );
    }
    // The gradient's own contribution (without g0) is what matters most: check it alone.
    let mut fresh = be.zeros_f32(&[vocab, d]).unwrap();
    let mut fresh_cpu = HostTensor::new(vec![vocab, d], vec![0.0; vocab * d]);
    be.target_logprobs_backward(&gh, &gw, &targets, &d_logprob, None, &mut fresh)
        .unwrap();
    let want_dh = cpu
        .target_logprobs_backward(&hidden, &cw, &targets, &d_logprob, None, &mut fresh_cpu)
        .unwrap();
    assert_close(
        &format!("{what}: lm_head_grad from zero"),
        &be.download(&fresh).unwrap(),
        &fresh_cpu,
        GEMM_TOL,
    );
    // The one-pass form: the forward's log-sum-exp handed to the backward. The forward's
    // log-probs are the plain forward's bits; the gradients match the CPU's as above.
    let plain = be.target_logprobs(&gh, &gw, &targets).unwrap();
    let (lp, lse) = be.target_logprobs_with_lse(&gh, &gw, &targets).unwrap();
    assert_eq!(
        lp, plain,
        "{what}: the forward with the log-sum-exp changed the log-probs"
    );
    let lse = lse.expect("the CUDA backend hands the log-sum-exp over");
    assert_eq!(lse.len(), n);
    assert!(
        lse.iter().all(|x| x.is_finite()),
        "{what}: log-sum-exp {lse:?}"
    );
    let mut fresh1 = be.zeros_f32(&[vocab, d]).unwrap();
    let dh1 = be
        .target_logprobs_backward(&gh, &gw, &targets, &d_logprob, Some(&lse), &mut fresh1)
        .unwrap();
    assert_close(
        &format!("{what}: one pass: d_hidden"),
        &be.download(&dh1).unwrap(),
        &want_dh,
        GEMM_TOL,
    );
    assert_close(
        &format!("{what}: one pass: lm_head_grad from zero"),
        &be.download(&fresh1).unwrap(),
        &fresh_cpu,
        GEMM_TOL,
    );
    be.set_logprob_chunk_rows(0);
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn target_logprobs_backward_matches_cpu_in_chunks() {
    // The log-sum-exp handed over whatever GENIUS_CUDA_LOGPROB_LSE says (both forms are
    // checked here).
    let Some(be) = common::cuda::gpu_with(|o| CudaOptions {
        sync_after_launch: true,
        logprob_lse: true,
        ..o
    }) else {
        return;
    };
    let be = &be;
    let mut rng = Rng::new(105);
    // (n, d, vocab, chunk rows; 0 = the default, one chunk here). d = 96 with 7-row chunks
    // gives row offsets that are not 256-byte aligned (the copied path); d = 128 and 576 with
    // 48 / 128-row chunks the in-place path; vocab 999 / 1001 the unvectorised kernel.
    for (n, d, vocab, chunk) in [
        (1, 64, 1000, 0),
        (7, 64, 1000, 3),
        (33, 96, 999, 7),
        (130, 96, 1000, 7),
        (130, 128, 1001, 7),
        (300, 64, 1000, 128),
        (130, 896, 32000, 0),
        (130, 576, 32000, 48),
    ] {
        check_logprobs_backward(be, &mut rng, n, d, vocab, chunk);
    }
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn target_logprobs_backward_reports_bad_rows_and_targets() {
    let Some(be) = gpu() else { return };
    let mut rng = Rng::new(106);
    let (n, d, vocab) = (5, 16, 40);
    let mut hidden = rand_bf16(&mut rng, &[n, d], 1.0);
    let w = be
        .upload_linear(&rand_bf16(&mut rng, &[vocab, d], 0.3))
        .unwrap();
    let g = vec![1.0f32; n];
    let mut grad = be.zeros_f32(&[vocab, d]).unwrap();
    let err = be
        .target_logprobs_backward(
            &be.upload(&hidden).unwrap(),
            &w,
            &[0, 1, 2, 3, 40],
            &g,
            None,
            &mut grad,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    hidden.data[3 * d + 2] = f32::NAN;
    let err = be
        .target_logprobs_backward(
            &be.upload(&hidden).unwrap(),
            &w,
            &[0, 1, 2, 3, 4],
            &g,
            None,
            &mut grad,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 3 has a NaN"), "{err}");
    // The one-pass form finds the NaN itself when handed a finite log-sum-exp, and refuses a
    // log-sum-exp that is not finite or of the wrong length.
    let gh = be.upload(&hidden).unwrap();
    let targets = [0, 1, 2, 3, 4];
    let err = be
        .target_logprobs_backward(&gh, &w, &targets, &g, Some(&[1.0; 5]), &mut grad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 3 has a NaN"), "{err}");
    let lse = [1.0, f32::NAN, 1.0, 1.0, 1.0];
    hidden.data[3 * d + 2] = 0.5;
    let gh = be.upload(&hidden).unwrap();
    let err = be
        .target_logprobs_backward(&gh, &w, &targets, &g, Some(&lse), &mut grad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("row 1: the forward's log-sum-exp"), "{err}");
    let err = be
        .target_logprobs_backward(&gh, &w, &targets, &g, Some(&[1.0; 4]), &mut grad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("log-sum-exps"), "{err}");
    hidden.data[3 * d + 2] = f32::NAN;
    let err = be
        .target_logprobs_backward(
            &be.upload(&hidden).unwrap(),
            &w,
            &[0, 1, 2, 3, 4],
            &g,
            None,
            &mut be.zeros(&[vocab, d]).unwrap(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("f32"), "{err}");
}

/// The log-prob ops with several chunks on a backend that does not wait after each launch,
/// so that each chunk's softmax pass runs on the second stream beside the next chunk's GEMM
/// (the op tests' shared backend waits after every launch, which keeps one stream): the
/// forward against the one-stream forward of the same backend, the backward against the CPU,
/// and the outputs the same over reruns.
#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn logprob_chunks_overlapped_on_two_streams_match() {
    // Heuristic GEMM algorithms in both (tuned choices could differ between the two).
    let Some(be) = common::cuda::gpu_with(|o| CudaOptions {
        sync_after_launch: false,
        logprob_overlap: true,
        tune_gemms: false,
        logprob_lse: true,
        ..o
    }) else {
        return;
    };
    let one_stream = common::cuda::gpu_with(|o| CudaOptions {
        sync_after_launch: false,
        logprob_overlap: false,
        tune_gemms: false,
        logprob_lse: true,
        ..o
    })
    .expect("a second backend on the same device");
    let mut rng = Rng::new(109);
    let (n, d, vocab) = (301, 128, 4096);
    let h = rand_bf16(&mut rng, &[n, d], 1.0);
    let wh = rand_bf16(&mut rng, &[vocab, d], 0.3);
    let targets: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
    let forward = |b: &CudaBackend| {
        let (gh, gw) = (b.upload(&h).unwrap(), b.upload_linear(&wh).unwrap());
        b.set_logprob_chunk_rows(16); // 19 chunks, the last partial
        let lp = b.target_logprobs(&gh, &gw, &targets).unwrap();
        b.set_logprob_chunk_rows(0);
        lp
    };
    let two = forward(&be);
    assert_eq!(two, forward(&be), "overlapped forward reruns differ");
    let one = forward(&one_stream);
    // The same kernels and GEMM shapes: the same bits whichever stream ran the passes.
    assert_eq!(two, one, "overlapped and one-stream forwards differ");
    // The backward with overlap against the CPU (as target_logprobs_backward_matches_cpu_in_chunks).
    check_logprobs_backward(&be, &mut rng, 301, 128, 4096, 16);
    check_logprobs_backward(&be, &mut rng, 130, 96, 1000, 7);
}

/// The forward with forced small chunks (the same chunk-size setting) still matches one chunk.
#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn target_logprobs_forward_is_the_same_in_small_chunks() {
    let Some(be) = gpu() else { return };
    let mut rng = Rng::new(107);
    let (n, d, vocab) = (33, 64, 1000);
    let hidden = be.upload(&rand_bf16(&mut rng, &[n, d], 1.0)).unwrap();
    let w = be
        .upload_linear(&rand_bf16(&mut rng, &[vocab, d], 0.4))
        .unwrap();
    let targets: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
    let whole = be.target_logprobs(&hidden, &w, &targets).unwrap();
    be.set_logprob_chunk_rows(5);
    let chunked = be.target_logprobs(&hidden, &w, &targets);
    be.set_logprob_chunk_rows(0);
    let chunked = chunked.unwrap();
    // The logits GEMM may pick another algorithm for 5 rows than for 33 (bf16 logits one
    // rounding apart), hence not bit-exact.
    let e = rel_err(&chunked, &whole);
    assert!(
        e <= 5e-3,
        "target_logprobs in 5-row chunks: relative error {e:.3e}"
    );
}
