//! The CUDA backend's row-wise and elementwise training ops (`scatter_add_rows`,
//! `embedding_backward`, `rms_norm_backward`, `rope_backward`, `swiglu_backward`,
//! `adamw_update`, `assign_tensor`, `assign_linear`) against the CPU backend and the host
//! AdamW, on fresh random inputs rounded to bf16 first (so that both backends compute the same
//! function) and several shapes, odd sizes included.
//!
//! Tolerances, as ‖gpu − cpu‖ / ‖cpu‖:
//! - bf16 outputs: 4e-3. Each of these ops rounds its f32 result to bf16 once (at most 2^-9
//!   relative per element), and the f32 maths before it differs from the CPU's only in
//!   summation order or `expf`'s last bits (~1e-7), far below that.
//! - f32 gradients: 1e-5. The scatter-adds sum in the CPU's order (same bits expected); the
//!   RMSNorm weight gradient sums the rows in another order (error ~sqrt(rows) x 2^-24).
//! - AdamW: 1e-6, and every element within 1 ulp of the host's. The kernel rounds each
//!   operation explicitly (no FMA contraction) in `adamw_update_host`'s order, so the same
//!   bits are expected; 1e-6 is the brief's bound for "same f32 arithmetic".
//! - assign_*: exact against the host's bf16 rounding (round to nearest even).
//!
//! The backend is created with `poison_outputs`, so every fresh output is NaN until a kernel
//! writes it; in-place ops are checked on inputs they change everywhere.
//!
//! These tests are ignored unless built for a GPU run (`GENIUS_GPU_TESTS=1`, as
//! tools/gpu-prepare.sh does); so built, a missing device fails them.

mod common;

use common::Rng;
use common::cuda::{assert_close, rand_bf16, shared_gpu as gpu};
use genius_engine::backend::cpu::CpuBackend;
use genius_engine::backend::cuda::DType;
use genius_engine::backend::cuda::tensor::round_to_bf16;
use genius_engine::backend::{AdamWStep, Backend, adamw_update_host};
use genius_engine::model::HostTensor;

/// Relative error bound for ops whose only rounding is the bf16 output.
const OUTPUT_ROUNDING_TOL: f64 = 4e-3;
/// Relative error bound for f32 gradients computed with the same maths as the CPU.
const F32_TOL: f64 = 1e-5;
/// Relative error bound for AdamW (the same f32 operations as the host).
const ADAMW_TOL: f64 = 1e-6;

#[track_caller]
fn assert_exact(what: &str, got: &HostTensor, want: &HostTensor) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    if let Some(i) = (0..got.data.len()).find(|&i| got.data[i].to_bits() != want.data[i].to_bits())
    {
        panic!(
            "{what}: element {i} is {} ({:#010x}) but should be {} ({:#010x})",
            got.data[i],
            got.data[i].to_bits(),
            want.data[i],
            want.data[i].to_bits()
        );
    }
}

/// Largest distance in units in the last place between two f32 slices of finite values.
fn max_ulps(got: &[f32], want: &[f32]) -> u64 {
    // Maps f32 bits to a monotonic integer line (so that -0 and +0 are neighbours).
    let key = |v: f32| {
        let b = v.to_bits() as i64;
        if b & 0x8000_0000 != 0 {
            0x8000_0000 - b
        } else {
            b + 0x8000_0000
        }
    };
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (key(g) - key(w)).unsigned_abs())
        .max()
        .unwrap_or(0)
}

/// `count` row indices below `m`, with repeats forced in (the first and last rows, and three
/// in a row when there are enough).
fn rows_with_repeats(rng: &mut Rng, count: usize, m: usize) -> Vec<usize> {
    let mut rows: Vec<usize> = (0..count).map(|_| rng.below(m)).collect();
    if count >= 2 {
        rows[count - 1] = rows[0];
    }
    if count >= 5 {
        rows[2] = rows[1];
        rows[3] = rows[1];
        rows[4] = m - 1;
    }
    rows
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn scatter_add_rows_matches_cpu() {
    let Some(be) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(101);
    for (n, m, d) in [
        (1, 1, 64),
        (7, 3, 896),
        (33, 40, 33),
        (130, 17, 896),
        (130, 300, 257),
    ] {
        let rows = rows_with_repeats(&mut rng, n, m);
        let src = rand_bf16(&mut rng, &[n, d], 1.0);
        // Existing values everywhere (accumulation onto a nonzero destination).
        let dst = rand_bf16(&mut rng, &[m, d], 1.0);
        let mut want = dst.clone();
        cpu.scatter_add_rows(&mut want, &rows, &src).unwrap();
        let what = format!("scatter_add_rows {n} rows into [{m}, {d}]");

        // bf16 += bf16 (the trainer's d_hidden): one rounding of the f32 sum.
        let mut g = be.upload(&dst).unwrap();
        be.scatter_add_rows(&mut g, &rows, &be.upload(&src).unwrap())
            .unwrap();
        assert_eq!(g.dtype(), DType::Bf16);
        assert_close(
            &format!("{what}, bf16"),
            &be.download(&g).unwrap(),
            &want,
            OUTPUT_ROUNDING_TOL,
        );
        // f32 += f32 and f32 += bf16: the CPU's sums in the CPU's order.
        for src_f32 in [true, false] {
            let mut g = be.upload_f32(&dst).unwrap();
            let s = if src_f32 {
                be.upload_f32(&src).unwrap()
            } else {
                be.upload(&src).unwrap()
            };
            be.scatter_add_rows(&mut g, &rows, &s).unwrap();
            assert_close(
                &format!("{what}, f32 += {}", if src_f32 { "f32" } else { "bf16" }),
                &be.download(&g).unwrap(),
                &want,
                F32_TOL,
            );
        }
    }
    // Bad inputs are refused.
    let mut dst = be.upload_f32(&rand_bf16(&mut rng, &[4, 8], 1.0)).unwrap();
    let src = be.upload(&rand_bf16(&mut rng, &[2, 8], 1.0)).unwrap();
    assert!(be.scatter_add_rows(&mut dst, &[0, 4], &src).is_err());
    assert!(be.scatter_add_rows(&mut dst, &[0], &src).is_err());
    be.scatter_add_rows(&mut dst, &[], &be.zeros(&[0, 8]).unwrap())
        .unwrap();
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn embedding_backward_matches_cpu() {
    let Some(be) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(102);
    for (n, vocab, dim) in [
        (1, 1, 64),
        (7, 5, 896),
        (33, 1000, 33),
        (130, 50, 896),
        (130, 4000, 64),
    ] {
        let rows = rows_with_repeats(&mut rng, n, vocab);
        let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let dy = rand_bf16(&mut rng, &[n, dim], 1.0);
        // An f32 gradient that already holds a micro-batch's sums (not bf16-rounded).
        let grad = rng.tensor(&[vocab, dim], 0.5);
        let mut want = grad.clone();
        cpu.embedding_backward(&mut want, &ids, &dy).unwrap();
        let mut g = be.upload_f32(&grad).unwrap();
        be.embedding_backward(&mut g, &ids, &be.upload(&dy).unwrap())
            .unwrap();
        assert_eq!(g.dtype(), DType::F32);
        assert_close(
            &format!("embedding_backward {n} ids into [{vocab}, {dim}]"),
            &be.download(&g).unwrap(),
            &want,
            F32_TOL,
        );
    }
    let mut g = be.zeros_f32(&[4, 3]).unwrap();
    let dy = be.upload(&rand_bf16(&mut rng, &[2, 3], 1.0)).unwrap();
    let err = be
        .embedding_backward(&mut g, &[1, 4], &dy)
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    assert!(be.embedding_backward(&mut g, &[1], &dy).is_err());
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn rms_norm_backward_matches_cpu() {
    let Some(be) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(103);
    for (rows, dim) in [
        (1, 1),
        (1, 64),
        (7, 896),
        (33, 33),
        (130, 896),
        (130, 257),
        (7, 4097),
        // Many row groups of the weight-gradient kernel (groups of 32 rows, 8 per block).
        (2049, 896),
        (600, 64),
    ] {
        let x = rand_bf16(&mut rng, &[rows, dim], 2.0);
        let w = round_to_bf16(&HostTensor::new(
            vec![dim],
            (0..dim).map(|_| 1.0 + 0.5 * rng.uniform()).collect(),
        ));
        let dy = rand_bf16(&mut rng, &[rows, dim], 1.0);
        let wg0 = rng.tensor(&[dim], 0.5);
        let mut want_wg = wg0.clone();
        let want_dx = cpu
            .rms_norm_backward(&x, &w, 1e-5, &dy, &mut want_wg)
            .unwrap();
        let mut wg = be.upload_f32(&wg0).unwrap();
        let dx = be
            .rms_norm_backward(
                &be.upload(&x).unwrap(),
                &be.upload(&w).unwrap(),
                1e-5,
                &be.upload(&dy).unwrap(),
                &mut wg,
            )
            .unwrap();
        assert_eq!(dx.dtype(), DType::Bf16);
        let what = format!("rms_norm_backward [{rows}, {dim}]");
        assert_close(
            &format!("{what} dx"),
            &be.download(&dx).unwrap(),
            &want_dx,
            OUTPUT_ROUNDING_TOL,
        );
        assert_close(
            &format!("{what} weight_grad"),
            &be.download(&wg).unwrap(),
            &want_wg,
            F32_TOL,
        );
    }
    // Run to run the weight gradient is the same bits (no atomics).
    let x = be.upload(&rand_bf16(&mut rng, &[130, 896], 2.0)).unwrap();
    let w = be.upload(&rand_bf16(&mut rng, &[896], 1.0)).unwrap();
    let dy = be.upload(&rand_bf16(&mut rng, &[130, 896], 1.0)).unwrap();
    let runs: Vec<HostTensor> = (0..3)
        .map(|_| {
            let mut wg = be.zeros_f32(&[896]).unwrap();
            be.rms_norm_backward(&x, &w, 1e-6, &dy, &mut wg).unwrap();
            be.download(&wg).unwrap()
        })
        .collect();
    assert_exact("rms_norm_backward determinism", &runs[1], &runs[0]);
    assert_exact("rms_norm_backward determinism", &runs[2], &runs[0]);
    // Shape errors.
    let mut bad = be.zeros_f32(&[895]).unwrap();
    assert!(be.rms_norm_backward(&x, &w, 1e-6, &dy, &mut bad).is_err());
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn rope_backward_matches_cpu() {
    let Some(be) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(104);
    // GQA-like: the query side (14 or 9 heads) and the key side (2 or 3 heads) of one layer.
    for (rows, heads, head_dim, max_pos, theta) in [
        (1, 1, 2, 10, 10000.0f64),
        (7, 14, 64, 32768, 1e6),
        (7, 2, 64, 32768, 1e6),
        (33, 9, 128, 8192, 5e5),
        (33, 3, 128, 8192, 5e5),
        (130, 14, 64, 131072, 1e6),
        (130, 2, 64, 131072, 1e6),
    ] {
        let dx = rand_bf16(&mut rng, &[rows, heads * head_dim], 1.0);
        // Positions from 1 up, so that every element is rotated (position 0 is the identity).
        let positions: Vec<u32> = (0..rows).map(|_| 1 + rng.below(max_pos) as u32).collect();
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| theta.powf(-2.0 * i as f64 / head_dim as f64) as f32)
            .collect();
        let mut want = dx.clone();
        cpu.rope_backward(&mut want, &positions, head_dim, &inv_freq)
            .unwrap();
        let mut got = be.upload(&dx).unwrap();
        be.rope_backward(&mut got, &positions, head_dim, &inv_freq)
            .unwrap();
        assert_close(
            &format!("rope_backward [{rows}, {heads} x {head_dim}] positions < {max_pos}"),
            &be.download(&got).unwrap(),
            &want,
            OUTPUT_ROUNDING_TOL,
        );
        // The forward after the backward is the identity up to two bf16 roundings.
        be.rope(&mut got, &positions, head_dim, &inv_freq).unwrap();
        assert_close(
            "rope(rope_backward(x)) = x",
            &be.download(&got).unwrap(),
            &dx,
            2.0 * OUTPUT_ROUNDING_TOL,
        );
    }
    let mut t = be.upload(&rand_bf16(&mut rng, &[3, 16], 1.0)).unwrap();
    assert!(be.rope_backward(&mut t, &[1, 2], 8, &[1.0; 4]).is_err());
    assert!(be.rope_backward(&mut t, &[1, 2, 3], 6, &[1.0; 3]).is_err());
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn swiglu_backward_matches_cpu() {
    let Some(be) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(105);
    for (rows, inner) in [(1, 1), (1, 64), (7, 896), (33, 33), (130, 4864), (130, 257)] {
        let gate_up = rand_bf16(&mut rng, &[rows, 2 * inner], 4.0);
        let dy = rand_bf16(&mut rng, &[rows, inner], 1.0);
        let want = cpu.swiglu_backward(&gate_up, &dy).unwrap();
        let got = be
            .swiglu_backward(&be.upload(&gate_up).unwrap(), &be.upload(&dy).unwrap())
            .unwrap();
        assert_eq!(got.dtype(), DType::Bf16);
        assert_close(
            &format!("swiglu_backward [{rows}, 2 x {inner}]"),
            &be.download(&got).unwrap(),
            &want,
            OUTPUT_ROUNDING_TOL,
        );
    }
    let odd = be.upload(&rand_bf16(&mut rng, &[2, 5], 1.0)).unwrap();
    let dy = be.upload(&rand_bf16(&mut rng, &[2, 2], 1.0)).unwrap();
    assert!(be.swiglu_backward(&odd, &dy).is_err());
    let gu = be.upload(&rand_bf16(&mut rng, &[2, 6], 1.0)).unwrap();
    assert!(
        be.swiglu_backward(&gu, &dy).is_err(),
        "dy [2, 2] for inner 3"
    );
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn adamw_update_matches_the_host_over_several_steps() {
    let Some(be) = gpu() else { return };
    let mut rng = Rng::new(106);
    for n in [1usize, 7, 33 * 64, 130 * 896 + 3] {
        let mut p = rng.tensor(&[n], 1.0).data;
        let mut m = vec![0f32; n];
        let mut v = vec![0f32; n];
        let mut gp = be.upload_f32(&HostTensor::new(vec![n], p.clone())).unwrap();
        let mut gm = be.zeros_f32(&[n]).unwrap();
        let mut gv = be.zeros_f32(&[n]).unwrap();
        for t in 1..=5u64 {
            // Gradients of varied size, some tiny (so that eps matters), clipped by 0.37.
            let scale = if t % 2 == 0 { 1e-4 } else { 3.0 };
            let grad = rng.tensor(&[n], scale);
            let step = AdamWStep::new(0.9, 0.95, 1e-8, 0.1, t, 3e-3, 0.37);
            adamw_update_host(&mut p, &mut m, &mut v, &grad.data, &step);
            be.adamw_update(
                &mut gp,
                &mut gm,
                &mut gv,
                &be.upload_f32(&grad).unwrap(),
                &step,
            )
            .unwrap();
            for (what, got, want) in [("master", &gp, &p), ("m", &gm, &m), ("v", &gv, &v)] {
                let got = be.download(got).unwrap();
                let want = HostTensor::new(vec![n], want.clone());
                let label = format!("adamw {what}, {n} elements, step {t}");
                assert_close(&label, &got, &want, ADAMW_TOL);
                let ulps = max_ulps(&got.data, &want.data);
                assert!(ulps <= 1, "{label}: {ulps} ulps from the host");
            }
        }
    }
    let mut a = be.zeros_f32(&[4]).unwrap();
    let mut b = be.zeros_f32(&[4]).unwrap();
    let mut c = be.zeros_f32(&[3]).unwrap();
    let g = be.zeros_f32(&[4]).unwrap();
    let step = AdamWStep::new(0.9, 0.999, 1e-8, 0.0, 1, 1e-3, 1.0);
    assert!(be.adamw_update(&mut a, &mut b, &mut c, &g, &step).is_err());
    let mut c = be.zeros(&[4]).unwrap();
    assert!(
        be.adamw_update(&mut a, &mut b, &mut c, &g, &step).is_err(),
        "bf16 moment"
    );
}

/// The update with the working copy written in the same pass (`adamw_update_tensor`,
/// `adamw_update_linear`) against the two separate ops (`adamw_update`, then
/// `assign_tensor` / `assign_linear`): masters, moments and working copies bit for bit.
#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn adamw_update_with_the_working_copy_is_the_two_ops() {
    let Some(be) = gpu() else { return };
    let mut rng = Rng::new(107);
    for (rows, cols) in [(1usize, 1usize), (7, 33), (130, 896), (3, 4097)] {
        let n = rows * cols;
        let p0 = rng.tensor(&[rows, cols], 1.0);
        let grad = be.upload_f32(&rng.tensor(&[rows, cols], 2.0)).unwrap();
        let step = AdamWStep::new(0.9, 0.95, 1e-8, 0.1, 3, 3e-3, 0.5);
        let fresh = || {
            (
                be.upload_f32(&p0).unwrap(),
                be.zeros_f32(&[rows, cols]).unwrap(),
                be.zeros_f32(&[rows, cols]).unwrap(),
            )
        };
        // Separate ops.
        let (mut p1, mut m1, mut v1) = fresh();
        be.adamw_update(&mut p1, &mut m1, &mut v1, &grad, &step)
            .unwrap();
        let mut t1 = be.upload(&p0).unwrap();
        be.assign_tensor(&mut t1, &p1).unwrap();
        let mut l1 = be.upload_linear(&p0).unwrap();
        be.assign_linear(&mut l1, &p1).unwrap();
        // One pass, for a tensor parameter and for a linear one.
        let (mut p2, mut m2, mut v2) = fresh();
        let mut t2 = be.upload(&p0).unwrap();
        be.adamw_update_tensor(&mut p2, &mut m2, &mut v2, &grad, &step, &mut t2)
            .unwrap();
        let (mut p3, mut m3, mut v3) = fresh();
        let mut l3 = be.upload_linear(&p0).unwrap();
        be.adamw_update_linear(&mut p3, &mut m3, &mut v3, &grad, &step, &mut l3)
            .unwrap();
        let what = format!("[{rows}, {cols}] ({n} elements)");
        for (label, a, b) in [
            ("master (tensor)", &p2, &p1),
            ("m (tensor)", &m2, &m1),
            ("v (tensor)", &v2, &v1),
            ("working copy (tensor)", &t2, &t1),
            ("master (linear)", &p3, &p1),
            ("m (linear)", &m3, &m1),
            ("v (linear)", &v3, &v1),
        ] {
            assert_exact(
                &format!("{label} {what}"),
                &be.download(a).unwrap(),
                &be.download(b).unwrap(),
            );
        }
        assert_exact(
            &format!("working copy (linear) {what}"),
            &be.download_linear(&l3).unwrap(),
            &be.download_linear(&l1).unwrap(),
        );
    }
}

/// f32 values whose bf16 rounding exercises the edge cases: ties to even both ways, values
/// just over a tie, the largest finite values, overflow to infinity, subnormals, zeros.
fn rounding_edge_cases() -> Vec<f32> {
    let tie_down = 1.0 + (2f32).powi(-8); // halfway between 1 and 1 + 2^-7: to 1.0
    let tie_up = 1.0 + 3.0 * (2f32).powi(-8); // halfway, odd below: up
    vec![
        tie_down,
        -tie_down,
        tie_up,
        -tie_up,
        tie_down + (2f32).powi(-20),
        f32::MAX,
        -f32::MAX,
        // Halfway between bf16's largest finite value (odd mantissa) and infinity: to infinity.
        f32::from_bits(0x7F7F_8000),
        // Halfway, even below: stays at 0x7F7E.
        f32::from_bits(0x7F7E_8000),
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MIN_POSITIVE,
        // Subnormals (kept, not flushed), the second a tie (odd: rounds away).
        f32::from_bits(0x0001_2345),
        f32::from_bits(0x8001_8000),
        0.0,
        -0.0,
        1.0,
        65504.0,
        std::f32::consts::PI,
    ]
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn assign_tensor_and_linear_round_like_the_host() {
    let Some(be) = gpu() else { return };
    let mut rng = Rng::new(107);
    for (rows, cols) in [(1, 1), (1, 64), (7, 896), (33, 33), (130, 257)] {
        let mut master = rng.tensor(&[rows, cols], 2.0);
        for (d, e) in master.data.iter_mut().zip(rounding_edge_cases()) {
            *d = e;
        }
        let want = round_to_bf16(&master);
        let gm = be.upload_f32(&master).unwrap();
        // A tensor parameter: set in place, bf16 kept.
        let mut dst = be.upload(&rand_bf16(&mut rng, &[rows, cols], 1.0)).unwrap();
        be.assign_tensor(&mut dst, &gm).unwrap();
        assert_eq!(dst.dtype(), DType::Bf16);
        assert_exact(
            &format!("assign_tensor [{rows}, {cols}]"),
            &be.download(&dst).unwrap(),
            &want,
        );
        // A 1-D parameter (a norm weight) from a 1-D master.
        let flat = HostTensor::new(vec![rows * cols], master.data.clone());
        let mut dst = be
            .upload(&rand_bf16(&mut rng, &[rows * cols], 1.0))
            .unwrap();
        be.assign_tensor(&mut dst, &be.upload_f32(&flat).unwrap())
            .unwrap();
        assert_exact(
            "assign_tensor 1-D",
            &be.download(&dst).unwrap(),
            &round_to_bf16(&flat),
        );
        // A linear weight [out, in].
        let mut lin = be
            .upload_linear(&rand_bf16(&mut rng, &[rows, cols], 1.0))
            .unwrap();
        be.assign_linear(&mut lin, &gm).unwrap();
        assert_exact(
            &format!("assign_linear [{rows}, {cols}]"),
            &be.download_linear(&lin).unwrap(),
            &want,
        );
    }
    let gm = be.upload_f32(&rng.tensor(&[3, 4], 1.0)).unwrap();
    let mut lin = be
        .upload_linear(&rand_bf16(&mut rng, &[4, 3], 1.0))
        .unwrap();
    assert!(
        be.assign_linear(&mut lin, &gm).is_err(),
        "[4, 3] from [3, 4]"
    );
    let mut t = be.upload(&rand_bf16(&mut rng, &[5], 1.0)).unwrap();
    assert!(be.assign_tensor(&mut t, &gm).is_err(), "5 from 12 elements");
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn scale_and_fill_zero_work_on_f32_gradients() {
    let Some(be) = gpu() else { return };
    let mut rng = Rng::new(108);
    for shape in [vec![1], vec![7, 33], vec![130, 896]] {
        let x = rng.tensor(&shape, 1.0);
        let mut g = be.upload_f32(&x).unwrap();
        be.scale(&mut g, 0.37).unwrap();
        assert_eq!(g.dtype(), DType::F32);
        let want = HostTensor::new(shape.clone(), x.data.iter().map(|v| v * 0.37).collect());
        assert_exact(
            &format!("scale f32 {shape:?}"),
            &be.download(&g).unwrap(),
            &want,
        );
        be.fill_zero(&mut g).unwrap();
        assert_eq!(g.dtype(), DType::F32);
        let got = be.download(&g).unwrap();
        assert!(
            got.data.iter().all(|v| v.to_bits() == 0),
            "fill_zero f32 {shape:?}"
        );
    }
}
