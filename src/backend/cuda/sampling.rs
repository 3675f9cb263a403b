//! Token sampling on the CUDA backend (`kernels/sampling.cu`): [`CudaBackend::sample_rows_kernel`]
//! draws one token per row of an f32 logits matrix, greedy or unfiltered (temperature > 0,
//! no top-k, no top-p), with the definition and the Philox stream of
//! [`crate::engine::sampler`], so that the GPU and the CPU draw the same tokens.
//!
//! Rows asking for top-k or top-p are refused with an error naming the row: those filters are
//! not on the GPU yet, and the caller uses the CPU sampler for them.
//!
//! [`blocked_sample`] is the kernel's algorithm on the host (same chunking, same summation
//! order of the walk); the CPU tests compare it with [`crate::engine::sampler::sample`].

use super::args;
use super::backend::CudaBackend;
use super::tensor::{CudaTensor, DeviceData};
pub use crate::engine::sampler::RowSampling;
use crate::engine::sampler::{SampledToken, SamplingParams, scan_logits, uniform};
use anyhow::{Result, anyhow, bail, ensure};
use cudarc::driver::LaunchConfig;

/// Threads per block of `ge_sample_rows` (`GE_SAMPLE_THREADS`); the walk's chunking depends
/// on it.
pub const THREADS: usize = 1024;

/// Whether `p` asks for top-k or top-p (not on the GPU yet). Greedy ignores both.
pub fn is_filtered(p: &SamplingParams) -> bool {
    !p.is_greedy() && (p.top_k > 0 || p.top_p < 1.0)
}

/// Checks every row's parameters: valid, and not filtered (the GPU has no top-k / top-p yet).
pub fn check_rows(rows: &[RowSampling]) -> Result<()> {
    for (r, row) in rows.iter().enumerate() {
        row.params
            .validate()
            .map_err(|e| anyhow!("sample_rows: row {r}: {e}"))?;
        if is_filtered(&row.params) {
            bail!(
                "sample_rows: row {r} asks for top_k = {} / top_p = {}: top-k and top-p are not \
                 on the GPU yet (use the CPU sampler for such rows)",
                row.params.top_k,
                row.params.top_p
            );
        }
    }
    Ok(())
}

/// The kernel's argument for one row.
fn row_args(r: &RowSampling) -> args::SampleRowArgs {
    args::SampleRowArgs {
        seed: r.params.seed,
        seq_id: r.seq_id,
        temperature: r.params.temperature,
        top_p: r.params.top_p,
        top_k: i32::try_from(r.params.top_k).unwrap_or(i32::MAX),
        position: r.position,
    }
}

/// The error for a row's kernel status (0 is success).
fn status_error(row: usize, status: i32, vocab: usize) -> anyhow::Error {
    match status {
        1 => anyhow!("sample_rows: row {row} holds a NaN or +inf logit"),
        2 => anyhow!("sample_rows: row {row}: all {vocab} logits are -inf"),
        3 => anyhow!("sample_rows: row {row}: top-k / top-p are not on the GPU yet"),
        s => anyhow!("sample_rows: row {row}: unknown kernel status {s}"),
    }
}

/// `ge_sample_rows` on the host, the same steps in the same order: for unfiltered sampling
/// (or greedy) of one row. Sums whose order the kernel leaves to the hardware (the
/// normalisers) are sequential here; the walk (chunk sums, their sequential exclusive
/// prefix, per-chunk walks, lowest crossing) is the kernel's exactly.
pub fn blocked_sample(
    logits: &[f32],
    params: &SamplingParams,
    seq_id: u64,
    position: u32,
) -> Result<SampledToken> {
    params.validate()?;
    ensure!(!is_filtered(params), "blocked_sample: top-k / top-p rows");
    let vocab = logits.len();
    // 1. max / argmax (the lowest index among the maxima), with the CPU sampler's checks.
    let (argmax, max) = scan_logits(logits)?;
    // 2. normalisers.
    let m = f64::from(max);
    let lse = m + logits
        .iter()
        .map(|&l| (f64::from(l) - m).exp())
        .sum::<f64>()
        .ln();
    let logprob = |i: usize| (f64::from(logits[i]) - lse) as f32;
    if params.is_greedy() {
        return Ok(SampledToken {
            token: argmax as u32,
            logprob: logprob(argmax),
            sampling_logprob: 0.0,
        });
    }
    let t = f64::from(params.temperature);
    let z: f64 = logits.iter().map(|&l| ((f64::from(l) - m) / t).exp()).sum();
    let prob = |i: usize| (((f64::from(logits[i]) - m) / t).exp() / z) as f32;
    // 3. chunk sums and their exclusive prefix.
    let chunk = vocab.div_ceil(THREADS);
    let range = |c: usize| (c * chunk).min(vocab)..((c + 1) * chunk).min(vocab);
    let mut prefix = [0.0f64; THREADS];
    let mut total = 0.0f64;
    for (c, slot) in prefix.iter_mut().enumerate() {
        let mut cs = 0.0f64;
        for i in range(c) {
            let p = prob(i);
            if p > 0.0 {
                cs += f64::from(p);
            }
        }
        *slot = total;
        total += cs;
    }
    // 4. the walk.
    let threshold = uniform(params.seed, seq_id, position) * total;
    // The one chunk whose [prefix, next prefix) holds the threshold is walked, with a
    // chunk-local running sum added to its prefix; if none holds it, the last token with p > 0.
    let mut first = None;
    for (c, &start) in prefix.iter().enumerate() {
        let next = prefix.get(c + 1).copied().unwrap_or(total);
        if !(start <= threshold && threshold < next) {
            continue;
        }
        let mut local = 0.0f64;
        for i in range(c) {
            let p = prob(i);
            if p > 0.0 {
                local += f64::from(p);
                if start + local > threshold {
                    first = Some(i);
                    break;
                }
            }
        }
    }
    let last = (0..vocab).rev().find(|&i| prob(i) > 0.0);
    let chosen = first
        .or(last)
        .ok_or_else(|| anyhow!("no token with p > 0"))?;
    Ok(SampledToken {
        token: chosen as u32,
        logprob: logprob(chosen),
        sampling_logprob: (f64::from(prob(chosen)) / total).ln() as f32,
    })
}

impl CudaBackend {
    /// One token per row of `logits` (f32 `[rows, vocab]` on the device), greedy or
    /// unfiltered sampling as [`crate::engine::sampler::sample`] defines it, row `r` with
    /// `rows[r]`. Errors on a shape or parameter problem, on a row asking for top-k / top-p
    /// (not on the GPU yet), and on a row with a NaN / +inf logit or only -inf logits, naming
    /// the row.
    pub fn sample_rows_kernel(
        &self,
        logits: &CudaTensor,
        rows: &[RowSampling],
    ) -> Result<Vec<SampledToken>> {
        let shape = logits.shape();
        ensure!(
            shape.len() == 2,
            "sample_rows: logits must be [rows, vocab], got shape {shape:?}"
        );
        let (n, vocab) = (shape[0], shape[1]);
        let (kernel, data) = match &logits.data {
            DeviceData::F32(d) => ("ge_sample_rows", self.gpu.ptr(d)),
            DeviceData::Bf16(d) => ("ge_sample_rows_bf16", self.gpu.ptr(d)),
        };
        ensure!(
            rows.len() == n,
            "sample_rows: {n} logits rows but {} sampling parameter rows",
            rows.len()
        );
        ensure!(
            vocab > 0,
            "sample_rows: cannot sample from an empty vocabulary"
        );
        let n_i32 = i32::try_from(n).map_err(|_| anyhow!("sample_rows: {n} rows"))?;
        let vocab_i32 =
            i32::try_from(vocab).map_err(|_| anyhow!("sample_rows: vocabulary of {vocab}"))?;
        check_rows(rows)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let host_args: Vec<args::SampleRowArgs> = rows.iter().map(row_args).collect();
        let params = self.gpu.upload_slice(&host_args)?;
        let mut tokens = self.gpu.alloc::<u32>(n)?;
        let mut logprobs = self.gpu.alloc::<f32>(n)?;
        let mut sampling_logprobs = self.gpu.alloc::<f32>(n)?;
        let mut status = self.gpu.alloc::<i32>(n)?;
        let a = args::SampleArgs {
            logits: data,
            params: self.gpu.ptr(&params),
            tokens: self.gpu.ptr_mut(&mut tokens),
            logprobs: self.gpu.ptr_mut(&mut logprobs),
            sampling_logprobs: self.gpu.ptr_mut(&mut sampling_logprobs),
            status: self.gpu.ptr_mut(&mut status),
            rows: n_i32,
            vocab: vocab_i32,
        };
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: logits is [n, vocab] of the kernel's element type, params holds n SampleRowArgs, the four outputs
        // n elements each; one block per row writes its row of each; frees are stream-ordered.
        unsafe { self.gpu.launch(kernel, cfg, &a) }?;
        let tokens = self.gpu.download_slice(&tokens, n)?;
        let logprobs = self.gpu.download_slice(&logprobs, n)?;
        let sampling_logprobs = self.gpu.download_slice(&sampling_logprobs, n)?;
        let status = self.gpu.download_slice(&status, n)?;
        (0..n)
            .map(|r| {
                if status[r] != 0 {
                    return Err(status_error(r, status[r], vocab));
                }
                Ok(SampledToken {
                    token: tokens[r],
                    logprob: logprobs[r],
                    sampling_logprob: sampling_logprobs[r],
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampler::{PHILOX_M4X32, PHILOX_ROUNDS, PHILOX_W32, sample};

    /// A small deterministic generator (xorshift64*), for test logits.
    fn rng(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn logits(vocab: usize, scale: f64, seed: u64) -> Vec<f32> {
        let mut r = rng(seed);
        (0..vocab)
            .map(|_| ((r() * 2.0 - 1.0) * scale) as f32)
            .collect()
    }

    /// The value of `#define NAME value` in the kernel source.
    fn define(src: &str, name: &str) -> u64 {
        let line = src
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("no #define {name} in sampling.cu"));
        let v = line.trim().trim_end_matches('u');
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
            None => v.parse().unwrap(),
        }
    }

    #[test]
    fn kernel_philox_constants_match_the_cpu_sampler() {
        let src = super::super::kernels::source("sampling.cu").expect("sampling.cu embedded");
        assert_eq!(define(src, "GE_PHILOX_M0"), u64::from(PHILOX_M4X32[0]));
        assert_eq!(define(src, "GE_PHILOX_M1"), u64::from(PHILOX_M4X32[1]));
        assert_eq!(define(src, "GE_PHILOX_W0"), u64::from(PHILOX_W32[0]));
        assert_eq!(define(src, "GE_PHILOX_W1"), u64::from(PHILOX_W32[1]));
        assert_eq!(define(src, "GE_PHILOX_ROUNDS"), PHILOX_ROUNDS as u64);
        assert_eq!(define(src, "GE_SAMPLE_THREADS"), THREADS as u64);
    }

    #[test]
    fn blocked_walk_matches_the_cpu_sampler() {
        let mut mismatches = 0;
        let mut draws = 0;
        for (vi, &vocab) in [1usize, 2, 7, 255, 256, 257, 1000, 4099, 49152]
            .iter()
            .enumerate()
        {
            for (si, &scale) in [0.5, 4.0, 20.0].iter().enumerate() {
                let l = logits(vocab, scale, (vi * 10 + si) as u64 + 1);
                for t in [0.0f32, 0.05, 0.6, 1.0, 1.7, 5.0] {
                    let seeds = if vocab > 10_000 { 8 } else { 40 };
                    for seed in 0..seeds {
                        let p = SamplingParams {
                            temperature: t,
                            seed: seed * 7919 + 3,
                            ..SamplingParams::default()
                        };
                        let seq = seed ^ 0x1234_5678_9abc;
                        let pos = (seed as u32) * 13 + 5;
                        let want = sample(&l, &p, seq, pos).unwrap();
                        let got = blocked_sample(&l, &p, seq, pos).unwrap();
                        draws += 1;
                        if want.token != got.token {
                            mismatches += 1;
                            continue;
                        }
                        assert!(
                            (want.logprob - got.logprob).abs() <= 1e-5,
                            "vocab {vocab} T {t}: logprob {want:?} vs {got:?}"
                        );
                        assert!(
                            (want.sampling_logprob - got.sampling_logprob).abs() <= 1e-5,
                            "vocab {vocab} T {t}: sampling_logprob {want:?} vs {got:?}"
                        );
                    }
                }
            }
        }
        // Only draws within f64 rounding of a boundary may differ: none expected here.
        assert_eq!(mismatches, 0, "{mismatches} of {draws} draws differ");
    }

    #[test]
    fn blocked_walk_handles_masked_tokens_and_ties() {
        let mut l = vec![f32::NEG_INFINITY; 600];
        l[3] = 1.0;
        l[300] = 1.0;
        l[599] = 0.5;
        for seed in 0..200 {
            let p = SamplingParams {
                seed,
                ..SamplingParams::default()
            };
            let want = sample(&l, &p, 9, 1).unwrap();
            assert_eq!(blocked_sample(&l, &p, 9, 1).unwrap(), want);
        }
        let g = blocked_sample(&l, &SamplingParams::greedy(), 0, 0).unwrap();
        assert_eq!(g.token, 3);
    }

    #[test]
    fn filtered_and_invalid_rows_are_refused_by_name() {
        let row = |params| RowSampling {
            params,
            seq_id: 0,
            position: 0,
        };
        let ok = row(SamplingParams::default());
        assert!(check_rows(&[ok, row(SamplingParams::greedy())]).is_ok());
        // Greedy ignores the filters, as the CPU sampler does.
        let greedy_k = row(SamplingParams {
            top_k: 5,
            ..SamplingParams::greedy()
        });
        assert!(check_rows(&[greedy_k]).is_ok());
        let k = row(SamplingParams {
            top_k: 40,
            ..SamplingParams::default()
        });
        let e = check_rows(&[ok, k]).unwrap_err().to_string();
        assert!(e.contains("row 1") && e.contains("not on the GPU"), "{e}");
        let p = row(SamplingParams {
            top_p: 0.9,
            ..SamplingParams::default()
        });
        let e = check_rows(&[p]).unwrap_err().to_string();
        assert!(e.contains("row 0") && e.contains("top-p"), "{e}");
        let bad = row(SamplingParams {
            temperature: f32::NAN,
            ..SamplingParams::default()
        });
        let e = check_rows(&[ok, ok, bad]).unwrap_err().to_string();
        assert!(e.contains("row 2") && e.contains("temperature"), "{e}");
    }
}
