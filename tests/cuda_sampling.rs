//! The CUDA sampler (`CudaBackend::sample_rows_kernel`, `kernels/sampling.cu`) against the CPU
//! sampler (`engine::sampler::sample`) on identical f32 and bf16 logits: greedy, unfiltered and
//! top-k / top-p sampling at several temperatures, a production-sized and an odd vocabulary,
//! many rows per launch, rows whose filters cut inside groups of tied probabilities.
//! The tokens must be the same (the definition fixes the draw up to f64 rounding of a
//! boundary), the log-probabilities within 1e-5; seeded reruns must repeat exactly; bad logits
//! must be refused naming the row.
//!
//! These tests are ignored unless built for a GPU run (`GENIUS_GPU_TESTS=1`, as
//! tools/gpu-prepare.sh does); so built, a missing device fails them.

mod common;

use common::Rng;
use common::cuda::shared_gpu as gpu;
use genius_engine::backend::cuda::RowSampling;
use genius_engine::engine::sampler::{SampledToken, SamplingParams, sample, sampling_exp};
use genius_engine::model::HostTensor;

const LOGPROB_TOL: f32 = 1e-5;

/// `rows` rows of logits: uniform in `[-scale, scale)`, a few rows with `-inf` masks and tied
/// maxima so that those paths are exercised.
fn logits(rng: &mut Rng, rows: usize, vocab: usize, scale: f32) -> HostTensor {
    let mut t = rng.tensor(&[rows, vocab], scale);
    for r in (0..rows).step_by(5) {
        let row = &mut t.data[r * vocab..(r + 1) * vocab];
        for _ in 0..vocab / 3 {
            row[rng.below(vocab)] = f32::NEG_INFINITY;
        }
        let top = scale + 1.0;
        row[rng.below(vocab)] = top;
        row[rng.below(vocab)] = top;
    }
    t
}

fn row_params(rows: usize, temperature: f32, seed: u64) -> Vec<RowSampling> {
    (0..rows)
        .map(|r| RowSampling {
            params: SamplingParams {
                temperature,
                seed: seed.wrapping_add(r as u64 * 0x9E37),
                ..SamplingParams::default()
            },
            seq_id: 1000 + r as u64 * 7 + ((r as u64) << 33),
            position: (r * 31 + 17) as u32,
        })
        .collect()
}

fn cpu_rows(l: &HostTensor, rows: &[RowSampling]) -> Vec<SampledToken> {
    let vocab = l.shape[1];
    rows.iter()
        .enumerate()
        .map(|(r, p)| {
            sample(
                &l.data[r * vocab..(r + 1) * vocab],
                &p.params,
                p.seq_id,
                p.position,
            )
            .unwrap()
        })
        .collect()
}

#[track_caller]
fn assert_same(what: &str, got: &[SampledToken], want: &[SampledToken]) {
    assert_eq!(got.len(), want.len(), "{what}: row count");
    for (r, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.token, w.token, "{what}: row {r}: gpu {g:?} cpu {w:?}");
        assert!(
            (g.logprob - w.logprob).abs() <= LOGPROB_TOL,
            "{what}: row {r}: logprob gpu {g:?} cpu {w:?}"
        );
        assert!(
            (g.sampling_logprob - w.sampling_logprob).abs() <= LOGPROB_TOL,
            "{what}: row {r}: sampling_logprob gpu {g:?} cpu {w:?}"
        );
    }
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn cuda_and_cpu_samplers_draw_the_same_tokens() {
    let Some(be) = gpu() else { return };
    let mut rng = Rng::new(7);
    for (vocab, rows) in [(49152, 64), (1001, 97), (1, 3), (257, 40)] {
        for scale in [2.0f32, 12.0] {
            let l = logits(&mut rng, rows, vocab, scale);
            let dev = be.upload_f32(&l).unwrap();
            for (ti, t) in [0.0f32, 0.05, 0.6, 1.0, 1.7, 5.0].into_iter().enumerate() {
                for seed in [0u64, 42, u64::MAX - ti as u64] {
                    let params = row_params(rows, t, seed);
                    let got = be.sample_rows_kernel(&dev, &params).unwrap();
                    let want = cpu_rows(&l, &params);
                    assert_same(
                        &format!("vocab {vocab} scale {scale} T {t} seed {seed}"),
                        &got,
                        &want,
                    );
                }
            }
            // Mixed temperatures in one launch.
            let mut params = row_params(rows, 1.0, 99);
            for (r, p) in params.iter_mut().enumerate() {
                p.params.temperature = [0.0, 0.6, 1.0, 1.7][r % 4];
            }
            let got = be.sample_rows_kernel(&dev, &params).unwrap();
            assert_same(
                &format!("vocab {vocab} mixed"),
                &got,
                &cpu_rows(&l, &params),
            );
        }
    }
}

/// The kernel's exponential is the CPU's `sampling_exp` bit for bit (the definition is f32
/// operations rounded one at a time; a contracted FMA or a flush of subnormals to zero on the
/// device would show here): a sweep of [-105, 0] in steps of 2^-12, values close to 0, the
/// subnormal range, and -inf / NaN.
#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn device_exponential_is_the_cpu_definition_bit_for_bit() {
    let Some(be) = gpu() else { return };
    let mut x: Vec<f32> = (0..=105 * 4096).map(|i| -(i as f32) / 4096.0).collect();
    x.extend((0..4096).map(|i| -f32::from_bits(0x3000_0000 + i * 4099)));
    x.extend([
        -103.97,
        -103.9721,
        -87.4,
        -87.3,
        f32::NEG_INFINITY,
        f32::NAN,
        -0.0,
    ]);
    let got = be.sampling_exp_on_device(&x).unwrap();
    assert_eq!(got.len(), x.len());
    let mut subnormal = 0;
    for (&xi, &g) in x.iter().zip(&got) {
        let want = sampling_exp(xi);
        assert_eq!(
            g.to_bits(),
            want.to_bits(),
            "E({xi:e}): device {g:e}, cpu {want:e}"
        );
        if want > 0.0 && want < f32::MIN_POSITIVE {
            subnormal += 1;
        }
    }
    assert!(
        subnormal > 100,
        "only {subnormal} subnormal results were compared"
    );
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn seeded_reruns_repeat_and_seeds_differ() {
    let Some(be) = gpu() else { return };
    let mut rng = Rng::new(11);
    let l = logits(&mut rng, 128, 4099, 3.0);
    let dev = be.upload_f32(&l).unwrap();
    let params = row_params(128, 1.0, 5);
    let a = be.sample_rows_kernel(&dev, &params).unwrap();
    let b = be.sample_rows_kernel(&dev, &params).unwrap();
    assert_eq!(a, b, "same seeds, same draws");
    let other = be
        .sample_rows_kernel(&dev, &row_params(128, 1.0, 6))
        .unwrap();
    let differ = a
        .iter()
        .zip(&other)
        .filter(|(x, y)| x.token != y.token)
        .count();
    assert!(
        differ > 64,
        "another seed changed only {differ} of 128 draws"
    );
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn filtered_rows_are_sampled_and_bad_logits_refused_by_row() {
    let Some(be) = gpu() else { return };
    let mut rng = Rng::new(13);
    let mut l = logits(&mut rng, 4, 300, 2.0);
    let dev = be.upload_f32(&l).unwrap();
    let mut params = row_params(4, 1.0, 1);
    params[2].params.top_k = 40;
    params[1].params.top_p = 0.9;
    let got = be.sample_rows_kernel(&dev, &params).unwrap();
    assert_same("filtered rows", &got, &cpu_rows(&l, &params));

    l.data[3 * 300 + 17] = f32::NAN;
    let dev = be.upload_f32(&l).unwrap();
    let e = be
        .sample_rows_kernel(&dev, &params)
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 3") && e.contains("NaN"), "{e}");
    l.data[3 * 300 + 17] = 0.0;
    for v in &mut l.data[300..600] {
        *v = f32::NEG_INFINITY;
    }
    let dev = be.upload_f32(&l).unwrap();
    let e = be
        .sample_rows_kernel(&dev, &params)
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 1") && e.contains("-inf"), "{e}");

    let e = be
        .sample_rows_kernel(&dev, &params[..3])
        .unwrap_err()
        .to_string();
    assert!(e.contains("4 logits rows but 3"), "{e}");
}

/// `logits` rounded to bf16 (what the LM head's output holds on the GPU), as f32.
fn bf16_rounded(l: &HostTensor) -> HostTensor {
    HostTensor::new(
        l.shape.clone(),
        l.data
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect(),
    )
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn bf16_logits_and_the_backend_sampler_with_filtered_rows_match_the_cpu() {
    use genius_engine::backend::Backend;
    let Some(be) = gpu() else { return };
    let mut rng = Rng::new(17);
    for (vocab, rows) in [(151936, 24), (1001, 61)] {
        // bf16 logits: the kernel reads them as f32, so the CPU sampler on the same rounded
        // values must draw the same tokens.
        let l = bf16_rounded(&logits(&mut rng, rows, vocab, 8.0));
        let dev = be.upload(&l).unwrap();
        let mut params = row_params(rows, 1.0, 23);
        for (r, p) in params.iter_mut().enumerate() {
            p.params.temperature = [0.0, 0.7, 1.0, 1.3][r % 4];
            // Every third row asks for a filter (sampled in the same launch).
            if r % 3 == 1 {
                p.params.top_k = 50;
            } else if r % 3 == 2 && r % 2 == 0 {
                p.params.top_p = 0.8;
            }
        }
        let want = cpu_rows(&l, &params);
        let got = Backend::sample_rows(be, &dev, &params).unwrap();
        assert_same(&format!("bf16 vocab {vocab} mixed filters"), &got, &want);
        let plain: Vec<RowSampling> = params
            .iter()
            .map(|p| RowSampling {
                params: SamplingParams {
                    top_k: 0,
                    top_p: 1.0,
                    ..p.params
                },
                ..*p
            })
            .collect();
        let got = be.sample_rows_kernel(&dev, &plain).unwrap();
        assert_same(
            &format!("bf16 vocab {vocab} kernel"),
            &got,
            &cpu_rows(&l, &plain),
        );
    }
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn target_logprobs_match_the_cpu() {
    use genius_engine::backend::Backend;
    use genius_engine::backend::cpu::CpuBackend;
    let Some(be) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(19);
    for (rows, dim, vocab) in [(37, 64, 1001), (5, 896, 151936), (130, 32, 7)] {
        let h = bf16_rounded(&rng.tensor(&[rows, dim], 1.0));
        let w = bf16_rounded(&rng.tensor(&[vocab, dim], 0.5));
        let targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab) as u32).collect();
        let want = cpu
            .target_logprobs(&h, &cpu.upload_linear(&w).unwrap(), &targets)
            .unwrap();
        let got = be
            .target_logprobs(
                &be.upload(&h).unwrap(),
                &be.upload_linear(&w).unwrap(),
                &targets,
            )
            .unwrap();
        assert_eq!(got.len(), rows);
        // bf16 logits: an absolute error of a few bf16 ulps of the logit's magnitude.
        for (r, (g, c)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - c).abs() <= 0.05 + 0.01 * c.abs(),
                "rows {rows} dim {dim} vocab {vocab}: row {r}: gpu {g} cpu {c}"
            );
        }
    }
    let h = be.upload(&rng.tensor(&[2, 8], 1.0)).unwrap();
    let w = be.upload_linear(&rng.tensor(&[10, 8], 1.0)).unwrap();
    let e = be
        .target_logprobs(&h, &w, &[3, 10])
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 1") && e.contains("outside"), "{e}");
    let e = be.target_logprobs(&h, &w, &[3]).unwrap_err().to_string();
    assert!(e.contains("2 rows but 1"), "{e}");
}

/// The filter settings the top-k / top-p tests cycle through, rows of one launch each taking
/// one: top-k 1, 2, 40, the vocabulary and beyond; top-p 0.05, 0.5, 0.9, 1; both; T 0.7, 1.3.
fn filter_grid(vocab: usize) -> Vec<(f32, usize, f32)> {
    let mut grid = Vec::new();
    for t in [0.7f32, 1.3] {
        for k in [0usize, 1, 2, 40, vocab, vocab + 3] {
            for p in [1.0f32, 0.05, 0.5, 0.9] {
                grid.push((t, k, p));
            }
        }
    }
    grid
}

fn filtered_rows(grid: &[(f32, usize, f32)], rows: usize, seed: u64) -> Vec<RowSampling> {
    let mut params = row_params(rows, 1.0, seed);
    for (r, p) in params.iter_mut().enumerate() {
        let (t, k, tp) = grid[r % grid.len()];
        p.params.temperature = t;
        p.params.top_k = k;
        p.params.top_p = tp;
    }
    params
}

/// Rows whose probabilities come in groups of equal values, so that top-k / top-p cut inside
/// a tie: logits from a few levels, equal maxima among masked tokens, and distinct logits
/// whose probabilities round to the same (denormal) f32.
fn tied_logits(rng: &mut Rng, rows: usize, vocab: usize) -> HostTensor {
    let mut t = HostTensor::new(vec![rows, vocab], vec![0.0; rows * vocab]);
    for r in 0..rows {
        let row = &mut t.data[r * vocab..(r + 1) * vocab];
        match r % 3 {
            0 => {
                let levels = 2 + r % 4;
                for v in row.iter_mut() {
                    *v = rng.below(levels) as f32 * 0.5;
                }
            }
            1 => {
                for (i, v) in row.iter_mut().enumerate() {
                    *v = if i % 3 == 1 { 2.0 } else { f32::NEG_INFINITY };
                }
            }
            _ => {
                for (i, v) in row.iter_mut().enumerate() {
                    *v = -95.0 - (i % 400) as f32 * 1e-3;
                }
                row[rng.below(vocab)] = 0.0;
                row[rng.below(vocab)] = -0.5;
            }
        }
    }
    t
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn top_k_and_top_p_match_the_cpu_sampler() {
    use genius_engine::backend::Backend;
    let Some(be) = gpu() else { return };
    let mut rng = Rng::new(29);
    for vocab in [1000usize, 151_936] {
        let grid = filter_grid(vocab);
        let rows = grid.len();
        for scale in [3.0f32, 10.0] {
            let l = logits(&mut rng, rows, vocab, scale);
            let lb = bf16_rounded(&l);
            for (what, host, dev) in [
                ("f32", &l, be.upload_f32(&l).unwrap()),
                ("bf16", &lb, be.upload(&lb).unwrap()),
            ] {
                for seed in [3u64, 77] {
                    let params = filtered_rows(&grid, rows, seed);
                    let got = be.sample_rows_kernel(&dev, &params).unwrap();
                    let want = cpu_rows(host, &params);
                    for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                        let (t, k, p) = grid[r % grid.len()];
                        assert_eq!(
                            g.token, w.token,
                            "{what} vocab {vocab} scale {scale} seed {seed} row {r} (T {t} \
                             top_k {k} top_p {p}): gpu {g:?} cpu {w:?}"
                        );
                    }
                    assert_same(
                        &format!("{what} vocab {vocab} scale {scale} seed {seed}"),
                        &got,
                        &want,
                    );
                    // Seeded reruns repeat exactly, through the backend's entry point too.
                    let again = Backend::sample_rows(be, &dev, &params).unwrap();
                    assert_eq!(got, again, "{what} vocab {vocab}: rerun");
                }
            }
        }
    }
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn top_k_and_top_p_cut_ties_like_the_cpu_sampler() {
    let Some(be) = gpu() else { return };
    let mut rng = Rng::new(31);
    for vocab in [1000usize, 151_936] {
        let grid = filter_grid(vocab);
        let rows = grid.len();
        let l = tied_logits(&mut rng, rows, vocab);
        let dev = be.upload_f32(&l).unwrap();
        for seed in [5u64, 6, 7] {
            let params = filtered_rows(&grid, rows, seed);
            let got = be.sample_rows_kernel(&dev, &params).unwrap();
            let want = cpu_rows(&l, &params);
            for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                let (t, k, p) = grid[r % grid.len()];
                assert_eq!(
                    g.token,
                    w.token,
                    "ties vocab {vocab} seed {seed} row {r} (kind {}, T {t} top_k {k} top_p \
                     {p}): gpu {g:?} cpu {w:?}",
                    r % 3
                );
            }
            assert_same(&format!("ties vocab {vocab} seed {seed}"), &got, &want);
            let again = be.sample_rows_kernel(&dev, &params).unwrap();
            assert_eq!(got, again, "ties vocab {vocab}: rerun");
        }
    }
}
