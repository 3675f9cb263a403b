//! Every op the CUDA backend runs on the GPU, against the CPU backend, on fresh random inputs
//! and several shapes (odd sizes included). Inputs are rounded to bf16 first, so that both
//! backends compute the same function; the CPU's f32 result is the reference.
//!
//! Tolerances (the device notes' METHOD.md): ‖gpu − cpu‖ / ‖cpu‖ at most 4e-3 for ops whose
//! only rounding is the bf16 output (one rounding is at most 2^-8 per element), 1e-2 for the
//! bf16 GEMM (bf16 operands: 1e-3..1e-2); data movement must be exact; NaN never passes.
//! The backend is created with `poison_outputs`, so every fresh output is NaN until a kernel
//! writes it: an element a kernel misses fails the finiteness check. In-place ops are checked
//! on inputs they must change everywhere.
//!
//! These tests are ignored unless built for a GPU run (`GENIUS_GPU_TESTS=1`, as
//! tools/gpu-prepare.sh does); so built, a missing device fails them.

mod common;

use common::Rng;
use common::cuda::{assert_close, have_device, rand_bf16, shared_gpu as gpu, test_options};
use genius_engine::backend::Backend;
use genius_engine::backend::cpu::CpuBackend;
use genius_engine::backend::cuda::kernels::ImageChoice;
use genius_engine::backend::cuda::tensor::round_to_bf16;
use genius_engine::backend::cuda::{CudaBackend, CudaOptions, DType, KernelSourcePolicy};
use genius_engine::model::HostTensor;

/// Relative error bound for ops whose only rounding is the bf16 output.
const OUTPUT_ROUNDING_TOL: f64 = 4e-3;
/// Relative error bound for the bf16 GEMM.
const GEMM_TOL: f64 = 1e-2;

#[track_caller]
fn assert_exact(what: &str, got: &HostTensor, want: &HostTensor) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    if let Some(i) = (0..got.data.len()).find(|&i| got.data[i].to_bits() != want.data[i].to_bits())
    {
        panic!(
            "{what}: element {i} is {} but should be {}",
            got.data[i], want.data[i]
        );
    }
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn upload_download_round_trips_through_bf16() {
    let Some(be) = gpu() else { return };
    let mut rng = Rng::new(1);
    for shape in [
        vec![1],
        vec![3, 5],
        vec![17, 33],
        vec![2, 3, 129],
        vec![0, 4],
    ] {
        let t = rng.tensor(&shape, 3.0);
        let d = be.upload(&t).unwrap();
        assert_eq!(be.shape(&d), &shape[..]);
        assert_eq!(d.dtype(), DType::Bf16);
        assert_exact(
            "upload/download",
            &be.download(&d).unwrap(),
            &round_to_bf16(&t),
        );
        let f = be.upload_f32(&t).unwrap();
        assert_eq!(f.dtype(), DType::F32);
        assert_exact("f32 upload/download", &be.download(&f).unwrap(), &t);
        let w = HostTensor::new(vec![shape.iter().product::<usize>(), 1], t.data.clone());
        let l = be.upload_linear(&w).unwrap();
        assert_eq!(be.linear_shape(&l), [w.shape[0], 1]);
        assert_exact(
            "linear round trip",
            &be.download_linear(&l).unwrap(),
            &round_to_bf16(&w),
        );
    }
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn embedding_matches_cpu() {
    let Some(be) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(2);
    for (vocab, dim, n) in [(1, 1, 1), (7, 5, 9), (64, 33, 17), (1000, 896, 64)] {
        let table = rand_bf16(&mut rng, &[vocab, dim], 1.0);
        let mut ids: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
        ids[0] = (vocab - 1) as u32;
        let want = cpu.embedding(&table, &ids).unwrap();
        let got = be
            .download(&be.embedding(&be.upload(&table).unwrap(), &ids).unwrap())
            .unwrap();
        assert_exact(&format!("embedding {vocab}x{dim}, {n} ids"), &got, &want);
    }
    let table = be.upload(&rand_bf16(&mut rng, &[4, 3], 1.0)).unwrap();
    let err = be.embedding(&table, &[1, 4]).unwrap_err().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    let empty = be.embedding(&table, &[]).unwrap();
    assert_eq!(be.shape(&empty), &[0, 3]);
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn rms_norm_matches_cpu() {
    let Some(be) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(3);
    for (rows, dim) in [
        (1, 1),
        (3, 7),
        (5, 32),
        (17, 33),
        (4, 255),
        (64, 896),
        (3, 4097),
    ] {
        let x = rand_bf16(&mut rng, &[rows, dim], 2.0);
        // Weights around 1, as trained norms are.
        let w = round_to_bf16(&HostTensor::new(
            vec![dim],
            (0..dim).map(|_| 1.0 + 0.5 * rng.uniform()).collect(),
        ));
        let want = cpu.rms_norm(&x, &w, 1e-5).unwrap();
        let got = be
            .rms_norm(&be.upload(&x).unwrap(), &be.upload(&w).unwrap(), 1e-5)
            .unwrap();
        assert_close(
            &format!("rms_norm [{rows}, {dim}]"),
            &be.download(&got).unwrap(),
            &want,
            OUTPUT_ROUNDING_TOL,
        );
    }
}

/// `linear` with cuBLASLt's algorithms timed per shape (`CudaOptions::tune_gemms`,
/// `$GENIUS_CUDA_GEMM_TUNE=1`): the same products as the CPU, on the first use of a shape
/// (which times the candidates on the output buffer) and on the next (which reuses the pick),
/// the two bit for bit.
#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn tuned_linear_matches_cpu() {
    if !have_device() {
        return;
    }
    let be = CudaBackend::new(&CudaOptions {
        tune_gemms: true,
        ..test_options()
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    let mut rng = Rng::new(44);
    // Each shape used twice: the first use times the candidates, the second reuses the pick;
    // the two bit for bit.
    linear_against_cpu(
        &be,
        &mut rng,
        &[
            (3, 7, 5),
            (64, 896, 1152),
            (256, 896, 4864),
            (256, 4864, 896),
        ],
        "tuned linear",
        true,
    );
}

/// `linear` on the skinny split-K GEMM kernels (`CudaOptions::skinny_gemm`,
/// `$GENIUS_CUDA_SKINNY_GEMM=1`): the same products as the CPU at decode sizes (one split and
/// many, partial tiles, K not a multiple of 32), and the same bits when run again (the split
/// products are summed in a fixed order). Shapes the kernels do not take (an LM head's
/// features, more rows, K not a multiple of 8) fall back to cuBLASLt.
#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn skinny_gemm_linear_matches_cpu() {
    if !have_device() {
        return;
    }
    let be = CudaBackend::new(&CudaOptions {
        skinny_gemm: true,
        ..test_options()
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(be.skinny_gemm());
    let mut rng = Rng::new(45);
    linear_against_cpu(
        &be,
        &mut rng,
        &[
            (1, 8, 1),
            (3, 104, 5),
            (7, 896, 1152),
            (64, 896, 1152),
            (64, 4864, 896),
            (65, 328, 131),
            (256, 896, 4864),
            (256, 4864, 896),
            (512, 896, 896),
            // Not taken: more rows, K not a multiple of 8, a vocabulary of features.
            (513, 64, 96),
            (5, 7, 3),
            (4, 64, 40000),
        ],
        "skinny linear",
        true,
    );
}

/// `linear` on `be` against the CPU backend for each `(rows, in, out)` shape, without and
/// with a bias; with `twice`, each product is computed a second time and must give the same
/// bits.
fn linear_against_cpu(
    be: &CudaBackend,
    rng: &mut Rng,
    shapes: &[(usize, usize, usize)],
    what: &str,
    twice: bool,
) {
    let cpu = CpuBackend::new();
    for &(n, k, m) in shapes {
        let x = rand_bf16(rng, &[n, k], 1.0);
        let w = rand_bf16(rng, &[m, k], 1.0 / (k as f32).sqrt());
        let b = rand_bf16(rng, &[m], 1.0);
        let (cw, gw) = (
            cpu.upload_linear(&w).unwrap(),
            be.upload_linear(&w).unwrap(),
        );
        let gx = be.upload(&x).unwrap();
        for bias in [None, Some(&b)] {
            let want = cpu.linear(&x, &cw, bias).unwrap();
            let gb = bias.map(|b| be.upload(b).unwrap());
            let got = be
                .download(&be.linear(&gx, &gw, gb.as_ref()).unwrap())
                .unwrap();
            assert_close(
                &format!("{what} [{n}, {k}] x [{m}, {k}]^T, bias {}", bias.is_some()),
                &got,
                &want,
                GEMM_TOL,
            );
            if twice {
                let again = be.linear(&gx, &gw, gb.as_ref()).unwrap();
                assert_eq!(got.data, be.download(&again).unwrap().data);
            }
        }
    }
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn linear_matches_cpu_with_and_without_bias() {
    let Some(be) = gpu() else { return };
    let mut rng = Rng::new(4);
    linear_against_cpu(
        be,
        &mut rng,
        &[
            (1, 1, 1),
            (3, 7, 5),
            (17, 33, 65),
            (5, 4096, 3),
            (64, 896, 1000),
            (256, 896, 4864),
        ],
        "linear",
        false,
    );
    // Three-dimensional input: leading dimensions are rows.
    let x = rand_bf16(&mut rng, &[2, 3, 8], 1.0);
    let w = be
        .upload_linear(&rand_bf16(&mut rng, &[4, 8], 0.3))
        .unwrap();
    let y = be.linear(&be.upload(&x).unwrap(), &w, None).unwrap();
    assert_eq!(be.shape(&y), &[6, 4]);
    let err = be
        .linear(
            &be.upload(&rand_bf16(&mut rng, &[2, 7], 1.0)).unwrap(),
            &w,
            None,
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
fn rope_matches_cpu() {
    let Some(be) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(5);
    for (rows, heads, head_dim, max_pos, theta) in [
        (1, 1, 2, 10, 10000.0f64),
        (5, 3, 8, 100, 10000.0),
        (17, 14, 64, 32768, 1e6),
        (9, 2, 128, 8192, 5e5),
        (33, 9, 64, 131072, 1e5),
    ] {
        let x = rand_bf16(&mut rng, &[rows, heads * head_dim], 1.0);
        // Positions from 1 up, so that every element is rotated (position 0 is the identity).
        let positions: Vec<u32> = (0..rows).map(|_| 1 + rng.below(max_pos) as u32).collect();
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| theta.powf(-2.0 * i as f64 / head_dim as f64) as f32)
            .collect();
        let mut want = x.clone();
        cpu.rope(&mut want, &positions, head_dim, &inv_freq)
            .unwrap();
        let mut got = be.upload(&x).unwrap();
        be.rope(&mut got, &positions, head_dim, &inv_freq).unwrap();
        assert_close(
            &format!("rope [{rows}, {heads} x {head_dim}] positions < {max_pos}"),
            &be.download(&got).unwrap(),
            &want,
            OUTPUT_ROUNDING_TOL,
        );
    }
    // A second table after the first: the cached inv_freq must be replaced.
    let x = rand_bf16(&mut rng, &[3, 16], 1.0);
    for inv_freq in [vec![1.0f32, 0.5, 0.25, 0.125], vec![0.9f32, 0.3, 0.1, 0.01]] {
        let positions = [3u32, 7, 11];
        let mut want = x.clone();
        cpu.rope(&mut want, &positions, 8, &inv_freq).unwrap();
        let mut got = be.upload(&x).unwrap();
        be.rope(&mut got, &positions, 8, &inv_freq).unwrap();
        assert_close(
            "rope table change",
            &be.download(&got).unwrap(),
            &want,
            OUTPUT_ROUNDING_TOL,
        );
    }
    let mut t = be.upload(&x).unwrap();
    assert!(be.rope(&mut t, &[1, 2], 8, &[1.0; 4]).is_err());
    assert!(be.rope(&mut t, &[1, 2, 3], 6, &[1.0; 3]).is_err());
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn swiglu_matches_cpu() {
    let Some(be) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(6);
    for (rows, inner) in [(1, 1), (3, 7), (17, 48), (64, 4864), (5, 1537)] {
        let x = rand_bf16(&mut rng, &[rows, 2 * inner], 4.0);
        let want = cpu.swiglu(&x).unwrap();
        let got = be.swiglu(&be.upload(&x).unwrap()).unwrap();
        assert_close(
            &format!("swiglu [{rows}, 2 x {inner}]"),
            &be.download(&got).unwrap(),
            &want,
            OUTPUT_ROUNDING_TOL,
        );
    }
    assert!(
        be.swiglu(&be.upload(&rand_bf16(&mut rng, &[2, 5], 1.0)).unwrap())
            .is_err()
    );
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn split_and_concat_columns_match_cpu_exactly() {
    let Some(be) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(7);
    for (rows, widths) in [
        (1, vec![1]),
        (3, vec![2, 5]),
        (17, vec![896, 128, 128]),
        (9, vec![7, 0, 33, 1]),
        (0, vec![3, 4]),
    ] {
        let w: usize = widths.iter().sum();
        let x = rand_bf16(&mut rng, &[rows, w], 1.0);
        let want = cpu.split_columns(&x, &widths).unwrap();
        for upload_f32 in [false, true] {
            let gx = if upload_f32 {
                be.upload_f32(&x).unwrap()
            } else {
                be.upload(&x).unwrap()
            };
            let parts = be.split_columns(&gx, &widths).unwrap();
            assert_eq!(parts.len(), widths.len());
            for (j, (p, wp)) in parts.iter().zip(&want).enumerate() {
                assert_exact(
                    &format!("split {rows} x {widths:?} part {j} (f32 {upload_f32})"),
                    &be.download(p).unwrap(),
                    wp,
                );
            }
            // Zero-width parts cannot be concatenated (as on the CPU: a [rows, 0] tensor has
            // no rows as a matrix), so they are left out.
            let refs: Vec<_> = parts.iter().filter(|p| p.shape()[1] > 0).collect();
            let back = be.concat_columns(&refs).unwrap();
            assert_exact(
                &format!("concat {rows} x {widths:?} (f32 {upload_f32})"),
                &be.download(&back).unwrap(),
                &x,
            );
        }
    }
    let a = be.upload(&rand_bf16(&mut rng, &[2, 3], 1.0)).unwrap();
    let b = be.upload(&rand_bf16(&mut rng, &[3, 3], 1.0)).unwrap();
    assert!(be.concat_columns(&[&a, &b]).is_err());
    assert!(be.split_columns(&a, &[1, 1]).is_err());
    let c = be.upload_f32(&rand_bf16(&mut rng, &[2, 3], 1.0)).unwrap();
    assert!(be.concat_columns(&[&a, &c]).is_err(), "mixed dtypes");
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn gather_rows_matches_cpu_exactly() {
    let Some(be) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(8);
    for (n, d, count) in [(1, 1, 1), (5, 7, 9), (64, 896, 17), (33, 3, 0)] {
        let x = rand_bf16(&mut rng, &[n, d], 1.0);
        let rows: Vec<usize> = (0..count).map(|_| rng.below(n)).collect();
        let want = cpu.gather_rows(&x, &rows).unwrap();
        for f32_tensor in [false, true] {
            let gx = if f32_tensor {
                be.upload_f32(&x).unwrap()
            } else {
                be.upload(&x).unwrap()
            };
            let got = be.gather_rows(&gx, &rows).unwrap();
            assert_exact(
                &format!("gather_rows [{n}, {d}] x {count} (f32 {f32_tensor})"),
                &be.download(&got).unwrap(),
                &want,
            );
        }
    }
    let x = be.upload(&rand_bf16(&mut rng, &[3, 2], 1.0)).unwrap();
    assert!(be.gather_rows(&x, &[0, 3]).is_err());
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn add_assign_and_scale_match_cpu() {
    let Some(be) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(9);
    for shape in [vec![1], vec![3, 7], vec![17, 896], vec![2, 3, 1001]] {
        let x = rand_bf16(&mut rng, &shape, 1.0);
        let y = rand_bf16(&mut rng, &shape, 1.0);
        let mut want = x.clone();
        cpu.add_assign(&mut want, &y).unwrap();
        let mut scaled = want.clone();
        cpu.scale(&mut scaled, -0.37).unwrap();

        let mut gx = be.upload(&x).unwrap();
        be.add_assign(&mut gx, &be.upload(&y).unwrap()).unwrap();
        assert_close(
            &format!("add bf16 {shape:?}"),
            &be.download(&gx).unwrap(),
            &want,
            OUTPUT_ROUNDING_TOL,
        );
        be.scale(&mut gx, -0.37).unwrap();
        // Two bf16 roundings (after the add, after the scale).
        assert_close(
            &format!("scale bf16 {shape:?}"),
            &be.download(&gx).unwrap(),
            &scaled,
            2.0 * OUTPUT_ROUNDING_TOL,
        );

        // f32 accumulators: += f32 and += bf16 are exact up to f32 rounding.
        let mut fx = be.upload_f32(&x).unwrap();
        be.add_assign(&mut fx, &be.upload_f32(&y).unwrap()).unwrap();
        assert_close("add f32", &be.download(&fx).unwrap(), &want, 1e-6);
        let mut fx = be.upload_f32(&x).unwrap();
        be.add_assign(&mut fx, &be.upload(&y).unwrap()).unwrap();
        assert_close("add f32 += bf16", &be.download(&fx).unwrap(), &want, 1e-6);
        be.scale(&mut fx, -0.37).unwrap();
        assert_close("scale f32", &be.download(&fx).unwrap(), &scaled, 1e-6);
    }
    let mut a = be.upload(&rand_bf16(&mut rng, &[2, 3], 1.0)).unwrap();
    let b = be.upload(&rand_bf16(&mut rng, &[3, 2], 1.0)).unwrap();
    assert!(be.add_assign(&mut a, &b).is_err());
    let f = be.upload_f32(&rand_bf16(&mut rng, &[2, 3], 1.0)).unwrap();
    assert!(be.add_assign(&mut a, &f).is_err(), "f32 into bf16");
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn zeros_copy_and_fill_zero() {
    let Some(be) = gpu() else { return };
    let mut rng = Rng::new(10);
    let z = be.zeros(&[3, 5]).unwrap();
    assert_exact(
        "zeros",
        &be.download(&z).unwrap(),
        &HostTensor::new(vec![3, 5], vec![0.0; 15]),
    );
    let zf = be.zeros_f32(&[4]).unwrap();
    assert_eq!(zf.dtype(), DType::F32);
    assert_eq!(be.download(&zf).unwrap().data, vec![0.0; 4]);
    assert_eq!(be.shape(&be.zeros(&[0, 7]).unwrap()), &[0, 7]);

    for f32_tensor in [false, true] {
        let x = rand_bf16(&mut rng, &[17, 33], 1.0);
        let gx = if f32_tensor {
            be.upload_f32(&x).unwrap()
        } else {
            be.upload(&x).unwrap()
        };
        let mut c = be.copy(&gx).unwrap();
        assert_exact("copy", &be.download(&c).unwrap(), &x);
        // The copy is independent of the original.
        be.scale(&mut c, 2.0).unwrap();
        assert_exact(
            "original after scaling the copy",
            &be.download(&gx).unwrap(),
            &x,
        );
        be.fill_zero(&mut c).unwrap();
        assert_exact(
            "fill_zero",
            &be.download(&c).unwrap(),
            &HostTensor::new(vec![17, 33], vec![0.0; 17 * 33]),
        );
    }
}

/// The NVRTC path on the device (the op tests may use nvcc's precompiled images): a backend
/// that compiles every unit with NVRTC into a fresh cache, then one that reads the cache,
/// both computing RMSNorm correctly.
#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn nvrtc_kernels_load_run_and_are_cached() {
    if !have_device() {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let options = CudaOptions {
        kernels: KernelSourcePolicy::Nvrtc,
        cache_dir: Some(cache.path().to_path_buf()),
        ..test_options()
    };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(11);
    let x = rand_bf16(&mut rng, &[7, 129], 1.0);
    let w = rand_bf16(&mut rng, &[129], 1.0);
    let want = cpu.rms_norm(&x, &w, 1e-6).unwrap();
    for expect_hit in [false, true] {
        let be = CudaBackend::new(&options).unwrap_or_else(|e| panic!("{e:#}"));
        for u in be.kernel_units() {
            assert!(matches!(u.image, ImageChoice::Nvrtc { .. }), "{u:?}");
            use genius_engine::backend::cuda::kernels::CacheOutcome::*;
            let want_outcome = if expect_hit { Hit } else { Compiled };
            assert_eq!(u.cache, Some(want_outcome), "{u:?}");
        }
        let got = be
            .rms_norm(&be.upload(&x).unwrap(), &be.upload(&w).unwrap(), 1e-6)
            .unwrap();
        assert_close(
            "rms_norm through NVRTC",
            &be.download(&got).unwrap(),
            &want,
            OUTPUT_ROUNDING_TOL,
        );
    }
}

/// The fused ops give the same bits as the ops they replace (on the GPU), and match the CPU.
#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn fused_ops_match_their_composition_and_the_cpu() {
    use genius_engine::backend::{add_rms_norm_composed, qkv_rope_write_kv_composed};
    let Some(be) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(31);
    for (rows, dim) in [(1, 1), (3, 7), (17, 33), (64, 896), (5, 4097)] {
        let x = rand_bf16(&mut rng, &[rows, dim], 2.0);
        let y = rand_bf16(&mut rng, &[rows, dim], 2.0);
        let w = round_to_bf16(&HostTensor::new(
            vec![dim],
            (0..dim).map(|_| 1.0 + 0.5 * rng.uniform()).collect(),
        ));
        let (yd, wd) = (be.upload(&y).unwrap(), be.upload(&w).unwrap());
        let mut x1 = be.upload(&x).unwrap();
        let out1 = be.add_rms_norm(&mut x1, &yd, &wd, 1e-6).unwrap();
        let mut x2 = be.upload(&x).unwrap();
        let out2 = add_rms_norm_composed(be, &mut x2, &yd, &wd, 1e-6).unwrap();
        let what = format!("add_rms_norm [{rows}, {dim}]");
        assert_exact(
            &what,
            &be.download(&out1).unwrap(),
            &be.download(&out2).unwrap(),
        );
        assert_exact(
            &what,
            &be.download(&x1).unwrap(),
            &be.download(&x2).unwrap(),
        );
        let mut xc = x.clone();
        let want = cpu.add_rms_norm(&mut xc, &y, &w, 1e-6).unwrap();
        assert_close(
            &what,
            &be.download(&out1).unwrap(),
            &want,
            OUTPUT_ROUNDING_TOL,
        );
        assert_close(&what, &be.download(&x1).unwrap(), &xc, OUTPUT_ROUNDING_TOL);
    }
    for (rows, heads, kv_heads, head_dim) in [
        (5, 4, 2, 64),
        (1, 14, 2, 64),
        (9, 2, 2, 128),
        (33, 7, 1, 64),
    ] {
        let (qw, kvw) = (heads * head_dim, kv_heads * head_dim);
        let qkv = rand_bf16(&mut rng, &[rows, qw + 2 * kvw], 1.5);
        let positions: Vec<u32> = (0..rows).map(|_| rng.below(5000) as u32).collect();
        let pool_rows = 4 * rows + 3;
        let mut free: Vec<u32> = (0..pool_rows as u32).collect();
        let slots: Vec<u32> = (0..rows)
            .map(|_| free.swap_remove(rng.below(free.len())))
            .collect();
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 10000f32.powf(-2.0 * i as f32 / head_dim as f32))
            .collect();
        let dq = be.upload(&qkv).unwrap();
        let run = |fused: bool| {
            let mut kp = be.kv_pool(pool_rows, 1, kvw).unwrap();
            let mut vp = be.kv_pool(pool_rows, 1, kvw).unwrap();
            let q = if fused {
                be.qkv_rope_write_kv(
                    &dq, qw, kvw, &positions, head_dim, &inv_freq, &mut kp, &mut vp, &slots,
                )
            } else {
                qkv_rope_write_kv_composed(
                    be, &dq, qw, kvw, &positions, head_dim, &inv_freq, &mut kp, &mut vp, &slots,
                )
            }
            .unwrap();
            [q, kp, vp].map(|t| be.download(&t).unwrap())
        };
        let what = format!("qkv_rope_write_kv rows {rows} heads {heads}/{kv_heads} d {head_dim}");
        let fused = run(true);
        for (f, c) in fused.iter().zip(&run(false)) {
            assert_exact(&what, f, c);
        }
        let mut kc = cpu.kv_pool(pool_rows, 1, kvw).unwrap();
        let mut vc = cpu.kv_pool(pool_rows, 1, kvw).unwrap();
        let qc = cpu
            .qkv_rope_write_kv(
                &qkv, qw, kvw, &positions, head_dim, &inv_freq, &mut kc, &mut vc, &slots,
            )
            .unwrap();
        for (f, c) in fused.iter().zip([&qc, &kc, &vc]) {
            assert_close(&what, f, c, OUTPUT_ROUNDING_TOL);
        }
    }
}
