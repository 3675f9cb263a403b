//! Token sampling on the CUDA backend (`kernels/sampling.cu`): [`CudaBackend::sample_rows_kernel`]
//! draws one token per row of an f32 or bf16 logits matrix, greedy, unfiltered, or with top-k
//! and / or top-p, with the definition and the Philox stream of [`crate::engine::sampler`], so
//! that the GPU and the CPU draw the same tokens.
//!
//! [`blocked_sample`] is the kernel's unfiltered algorithm on the host (same chunking, same
//! summation order of the walk), [`filtered_sample`] its top-k / top-p algorithm (histogram
//! bound and compaction, bit-at-a-time threshold searches, tie cuts by id; its sums are
//! sequential where the kernel's are a fixed tree); the CPU tests compare both with
//! [`crate::engine::sampler::sample`]. The kernel writes [`OUT_WORDS`] words per row into one
//! buffer, unpacked by [`unpack_outputs`]: one download per launch.

use super::args;
use super::backend::CudaBackend;
use super::tensor::{CudaTensor, DeviceData};
pub use crate::engine::sampler::RowSampling;
use crate::engine::sampler::{
    SampledToken, SamplingParams, inverse_normaliser, log_sum_exp, scan_logits, tempered_weights,
    uniform,
};
use anyhow::{Result, anyhow, ensure};
use cudarc::driver::LaunchConfig;

/// Threads per block of `ge_sample_rows` (`GE_SAMPLE_THREADS`); the walk's chunking depends
/// on it.
pub const THREADS: usize = 1024;

/// Whether `p` asks for top-k or top-p (the kernel's filtered path). Greedy ignores both.
pub fn is_filtered(p: &SamplingParams) -> bool {
    !p.is_greedy() && (p.top_k > 0 || p.top_p < 1.0)
}

/// Checks every row's parameters, naming the first bad row.
pub fn check_rows(rows: &[RowSampling]) -> Result<()> {
    for (r, row) in rows.iter().enumerate() {
        row.params
            .validate()
            .map_err(|e| anyhow!("sample_rows: row {r}: {e}"))?;
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

/// The kernel's arguments for each row, as uploaded (a decode graph stages the same bytes).
pub(super) fn row_args_of(rows: &[RowSampling]) -> Vec<args::SampleRowArgs> {
    rows.iter().map(row_args).collect()
}

/// Words per row of the kernel's packed output: token, logprob (f32 bits), sampling logprob
/// (f32 bits), status.
pub const OUT_WORDS: usize = 4;

/// The error for a row's kernel status (0 is success).
fn status_error(row: usize, status: i32, vocab: usize) -> anyhow::Error {
    match status {
        1 => anyhow!("sample_rows: row {row} holds a NaN or +inf logit"),
        2 => anyhow!("sample_rows: row {row}: all {vocab} logits are -inf"),
        s => anyhow!("sample_rows: row {row}: unknown kernel status {s}"),
    }
}

/// The kernel's packed output (`[rows, OUT_WORDS]` u32) as tokens; the first row with a
/// non-zero status is an error naming it.
pub fn unpack_outputs(words: &[u32], vocab: usize) -> Result<Vec<SampledToken>> {
    ensure!(
        words.len().is_multiple_of(OUT_WORDS),
        "sample_rows: {} output words are not whole rows of {OUT_WORDS}",
        words.len()
    );
    words
        .chunks_exact(OUT_WORDS)
        .enumerate()
        .map(|(r, w)| {
            let status = w[3] as i32;
            if status != 0 {
                return Err(status_error(r, status, vocab));
            }
            Ok(SampledToken {
                token: w[0],
                logprob: f32::from_bits(w[1]),
                sampling_logprob: f32::from_bits(w[2]),
            })
        })
        .collect()
}

/// `ge_sample_rows` on the host, the same steps in the same order: for unfiltered sampling
/// (or greedy) of one row; [`filtered_sample`] for top-k / top-p rows. Sums whose order the kernel leaves to the hardware (the
/// normalisers) are the CPU sampler's here; the walk (chunk sums, their sequential exclusive
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
    let lse = log_sum_exp(logits, max);
    let logprob = |i: usize| (f64::from(logits[i]) - lse) as f32;
    if params.is_greedy() {
        return Ok(SampledToken {
            token: argmax as u32,
            logprob: logprob(argmax),
            sampling_logprob: 0.0,
        });
    }
    let (weights, z) = tempered_weights(logits, max, params.temperature);
    let inv_z = inverse_normaliser(z);
    let prob = |i: usize| weights[i] * inv_z;
    // 3. chunk sums and their exclusive prefix: chunks of a multiple of 8 logits.
    let chunk = 8 * vocab.div_ceil(8 * THREADS);
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

/// Histogram bins of the kernel's filtered path (`GE_SAMPLE_BINS`): a key's bin is
/// `key >> BIN_SHIFT` (its exponent and 3 mantissa bits).
pub const BINS: usize = 1024;
/// `GE_SAMPLE_BIN_SHIFT`.
pub const BIN_SHIFT: u32 = 20;
/// Tokens the kernel's compacted candidate list holds in shared memory (`GE_SAMPLE_CAP`).
pub const CAP: usize = 4096;
/// Scale of the histogram's fixed-point masses (`GE_SAMPLE_FIXED`, 2^62).
const FIXED: f64 = 4_611_686_018_427_387_904.0;

/// A rank-order floor `(key, id)`: the prefix `{key > F, or key == F and id <= f}`.
type Floor = (u32, usize);

fn in_floor(key: u32, id: usize, floor: Floor) -> bool {
    key > floor.0 || (key == floor.0 && id <= floor.1)
}

/// Count or mass of the listed tokens with key >= k inside the floor.
fn list_sum(list: &[(u32, usize)], k: u32, floor: Floor, mass: bool) -> f64 {
    list.iter()
        .filter(|&&(key, id)| key >= k && in_floor(key, id, floor))
        .map(|&(key, _)| {
            if mass {
                f64::from(f32::from_bits(key))
            } else {
                1.0
            }
        })
        .sum()
}

#[derive(Clone, Copy, PartialEq)]
enum Pred {
    CountGe,
    MassGe,
    MassGt,
}

/// `ge_list_search`: the largest key `K >= 1` with `pred(K)`, 0 if none; keys `<= lo` count as
/// true without looking.
fn list_search(list: &[(u32, usize)], pred: Pred, goal: f64, lo: u32, floor: Floor) -> u32 {
    let mut res = 0u32;
    for bit in (0..31).rev() {
        let cand = res | (1 << bit);
        let ok = cand <= lo || {
            let v = list_sum(list, cand, floor, pred != Pred::CountGe);
            if pred == Pred::MassGt {
                v > goal
            } else {
                v >= goal
            }
        };
        if ok {
            res = cand;
        }
    }
    res
}

/// The ids of the ties at key `k` inside the floor, in token order.
fn list_ties(list: &[(u32, usize)], k: u32, floor: Floor) -> Vec<usize> {
    list.iter()
        .filter(|&&(key, id)| key == k && in_floor(key, id, floor))
        .map(|&(_, id)| id)
        .collect()
}

/// `ge_tie_steps`: adds `p` to `base` up to `nt` times; the number of adds after which the
/// sum first reaches `goal` (`>`, when strict), `nt` if never, and the sum then.
pub fn tie_steps(base: f64, p: f64, nt: usize, goal: f64, strict: bool) -> (usize, f64) {
    let mut c = base;
    for q in 1..=nt {
        c += p;
        if if strict { c > goal } else { c >= goal } {
            return (q, c);
        }
    }
    (nt, c)
}

/// The kernel's lower bound on the keys a filtered row needs, from the candidates' histogram
/// (counts and rounded-down fixed-point masses per bin): `Some(lo)` when at most [`CAP`]
/// tokens have key >= lo (the kernel then compacts them), `None` for the whole-row path.
/// `k` is the effective top-k (0 = off, else below the candidate count); `s_all` the
/// candidates' mass.
pub fn compaction_bound(
    counts: &[u32],
    masses: &[u64],
    k: usize,
    top_p: f32,
    s_all: f64,
) -> Option<u32> {
    let lo = |b: usize| ((b as u32) << BIN_SHIFT).max(1);
    if k > 0 {
        let mut cum = 0usize;
        for b in (0..counts.len()).rev() {
            cum += counts[b] as usize;
            if cum >= k {
                return (cum <= CAP).then(|| lo(b));
            }
        }
        None
    } else if top_p < 1.0 {
        let target = f64::from(top_p) * s_all;
        let (mut fm, mut cum) = (0u64, 0usize);
        for b in (0..counts.len()).rev() {
            fm += masses[b];
            cum += counts[b] as usize;
            if cum > CAP {
                return None;
            }
            if fm as f64 * (1.0 / FIXED) * (1.0 - 1e-9) >= target {
                return Some(lo(b));
            }
        }
        None
    } else {
        None
    }
}

/// The kernel's top-k / top-p algorithm on the host (see `ge_sample_filtered` in
/// kernels/sampling.cu): the same histogram bound and compaction, searches, tie cuts and walk;
/// its sums are sequential where the kernel's are a fixed tree. Returns the token and whether
/// the row was compacted (the kernel's fast path).
pub fn filtered_sample(
    logits: &[f32],
    params: &SamplingParams,
    seq_id: u64,
    position: u32,
) -> Result<(SampledToken, bool)> {
    params.validate()?;
    ensure!(
        is_filtered(params),
        "filtered_sample: not a top-k / top-p row"
    );
    let (_, max) = scan_logits(logits)?;
    let lse = log_sum_exp(logits, max);
    let (weights, z) = tempered_weights(logits, max, params.temperature);
    let inv_z = inverse_normaliser(z);
    let keys: Vec<u32> = weights.iter().map(|&w| (w * inv_z).to_bits()).collect();
    // a. candidates and histogram.
    let mut counts = vec![0u32; BINS];
    let mut masses = vec![0u64; BINS];
    let mut s_all = 0.0f64;
    for &key in keys.iter().filter(|&&k| k != 0) {
        let p = f64::from(f32::from_bits(key));
        s_all += p;
        counts[(key >> BIN_SHIFT) as usize] += 1;
        masses[(key >> BIN_SHIFT) as usize] += (p * FIXED) as u64;
    }
    let ncand: usize = counts.iter().map(|&c| c as usize).sum();
    let k = if params.top_k < ncand {
        params.top_k
    } else {
        0
    };
    // b. the bound and the list.
    let bound = compaction_bound(&counts, &masses, k, params.top_p, s_all);
    let lo = bound.unwrap_or(0);
    let list: Vec<(u32, usize)> = keys
        .iter()
        .enumerate()
        .filter(|&(_, &key)| key >= lo)
        .map(|(i, &key)| (key, i))
        .collect();
    // c. top-k.
    let mut floor: Floor = (1, usize::MAX);
    let mut floor_is_token = false;
    let mut s = s_all;
    if k > 0 {
        let kk = list_search(&list, Pred::CountGe, k as f64, lo, floor);
        let above = list_sum(&list, kk + 1, floor, false) as usize;
        floor = (kk, list_ties(&list, kk, floor)[k - above - 1]);
        floor_is_token = true;
        s = list_sum(&list, 1, floor, true);
    }
    // d. top-p.
    let mut total = s;
    if params.top_p < 1.0 {
        let target = f64::from(params.top_p) * s;
        let lo_p = if k > 0 { 0 } else { lo };
        let kp = list_search(&list, Pred::MassGe, target, lo_p, floor);
        if kp != 0 {
            let base = list_sum(&list, kp + 1, floor, true);
            let ties = list_ties(&list, kp, floor);
            let p = f64::from(f32::from_bits(kp));
            let (j, cum) = tie_steps(base, p, ties.len(), target, false);
            floor = (kp, ties[j - 1]);
            floor_is_token = true;
            total = cum;
        }
    }
    // e. the walk.
    let thr = uniform(params.seed, seq_id, position) * total;
    let kw = list_search(&list, Pred::MassGt, thr, 0, floor);
    let (token, key) = if kw != 0 {
        let base = list_sum(&list, kw + 1, floor, true);
        let ties = list_ties(&list, kw, floor);
        let p = f64::from(f32::from_bits(kw));
        let (j, _) = tie_steps(base, p, ties.len(), thr, true);
        (ties[j - 1], kw)
    } else if floor_is_token {
        (floor.1, floor.0)
    } else {
        let least = list
            .iter()
            .filter(|&&(key, id)| key >= 1 && in_floor(key, id, floor))
            .map(|&(key, _)| key)
            .min()
            .ok_or_else(|| anyhow!("no token with p > 0"))?;
        let id = list_ties(&list, least, floor)
            .last()
            .copied()
            .ok_or_else(|| anyhow!("no token with p > 0"))?;
        (id, least)
    };
    let p = f32::from_bits(key);
    Ok((
        SampledToken {
            token: token as u32,
            logprob: (f64::from(logits[token]) - lse) as f32,
            sampling_logprob: (f64::from(p) / total).ln() as f32,
        },
        bound.is_some(),
    ))
}

impl CudaBackend {
    /// One token per row of `logits` (f32 or bf16 `[rows, vocab]` on the device), greedy,
    /// unfiltered or top-k / top-p sampling as [`crate::engine::sampler::sample`] defines it,
    /// row `r` with `rows[r]`. Errors on a shape or parameter problem and on a row with a
    /// NaN / +inf logit or only -inf logits, naming the row.
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
        let host_args = row_args_of(rows);
        let params = self
            .gpu
            .upload_memo(super::graphs::keys::SAMPLE_PARAMS, &host_args)?;
        // In a graph capture the output goes to the graph's output buffer, read after each
        // replay (see `super::graphs`); otherwise to a buffer downloaded below.
        let mut out = None;
        let out_addr = match self.gpu.capture_sample_out() {
            Some(addr) => addr,
            None => self
                .gpu
                .ptr_mut(out.insert(self.gpu.alloc::<u32>(n * OUT_WORDS)?)),
        };
        let a = args::SampleArgs {
            logits: data,
            params,
            out: out_addr,
            rows: n_i32,
            vocab: vocab_i32,
        };
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: logits is [n, vocab] of the kernel's element type, params holds n
        // SampleRowArgs, out n * OUT_WORDS u32; one block per row writes its row's words;
        // frees are stream-ordered.
        unsafe { self.gpu.launch(kernel, cfg, &a) }?;
        let Some(out) = out else {
            // Captured: the tokens are read after the graph runs.
            return Ok(Vec::new());
        };
        // One copy (and sync) for the whole launch.
        let words = self.gpu.download_slice(&out, n * OUT_WORDS)?;
        unpack_outputs(&words, vocab)
    }

    /// The sampling definition's exponential ([`crate::engine::sampler::sampling_exp`]) of
    /// each value, as the sampling kernel computes it (`ge_sampling_exp`): for the GPU test
    /// that the device gives the CPU's bits.
    pub fn sampling_exp_on_device(&self, x: &[f32]) -> Result<Vec<f32>> {
        if x.is_empty() {
            return Ok(Vec::new());
        }
        let src = self.gpu.upload_slice(x)?;
        let mut dst = self.gpu.alloc::<f32>(x.len())?;
        let a = args::CastArgs {
            src: self.gpu.ptr(&src),
            dst: self.gpu.ptr_mut(&mut dst),
            n: x.len() as i64,
        };
        // SAFETY: src and dst hold n f32 each; each thread writes its own elements.
        unsafe {
            self.gpu.launch(
                "ge_sampling_exp_values",
                super::context::grid_stride_config(x.len()),
                &a,
            )
        }?;
        self.gpu.download_slice(&dst, x.len())
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
    fn kernel_exp_constants_match_the_cpu_sampler() {
        use crate::engine::sampler::{
            EXP_LN2_HI_BITS, EXP_LN2_LO_BITS, EXP_LOG2E_BITS, EXP_POLY_BITS, EXP_ROUND_MAGIC,
        };
        let src = super::super::kernels::source("sampling.cu").expect("sampling.cu embedded");
        assert_eq!(define(src, "GE_EXP_LN2_HI"), u64::from(EXP_LN2_HI_BITS));
        assert_eq!(define(src, "GE_EXP_LN2_LO"), u64::from(EXP_LN2_LO_BITS));
        assert_eq!(define(src, "GE_EXP_LOG2E"), u64::from(EXP_LOG2E_BITS));
        for (d, &bits) in EXP_POLY_BITS.iter().enumerate() {
            let name = format!("GE_EXP_P{}", EXP_POLY_BITS.len() - 1 - d);
            assert_eq!(define(src, &name), u64::from(bits), "{name}");
        }
        let magic = define_f32(src, "GE_ROUND_MAGIC");
        assert_eq!(magic.to_bits(), EXP_ROUND_MAGIC.to_bits());
    }

    /// The value of `#define NAME 123.0f`.
    fn define_f32(src: &str, name: &str) -> f32 {
        let line = src
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("no #define {name} in sampling.cu"));
        line.trim().trim_end_matches('f').parse().unwrap()
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
    fn filter_constants_match_the_kernel() {
        let src = super::super::kernels::source("sampling.cu").expect("sampling.cu embedded");
        assert_eq!(define(src, "GE_SAMPLE_BINS"), BINS as u64);
        assert_eq!(define(src, "GE_SAMPLE_BIN_SHIFT"), u64::from(BIN_SHIFT));
        assert_eq!(define(src, "GE_SAMPLE_CAP"), CAP as u64);
        // Keys are f32 bit patterns of p <= 1: their bins fit the histogram.
        assert!(((1.0f32.to_bits() >> BIN_SHIFT) as usize) < BINS);
    }

    #[test]
    fn invalid_rows_are_refused_by_name_and_filtered_rows_accepted() {
        let row = |params| RowSampling {
            params,
            seq_id: 0,
            position: 0,
        };
        let ok = row(SamplingParams::default());
        let k = row(SamplingParams {
            top_k: 40,
            top_p: 0.9,
            ..SamplingParams::default()
        });
        assert!(check_rows(&[ok, row(SamplingParams::greedy()), k]).is_ok());
        let bad = row(SamplingParams {
            temperature: f32::NAN,
            ..SamplingParams::default()
        });
        let e = check_rows(&[ok, ok, bad]).unwrap_err().to_string();
        assert!(e.contains("row 2") && e.contains("temperature"), "{e}");
        let bad_p = row(SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        });
        let e = check_rows(&[bad_p]).unwrap_err().to_string();
        assert!(e.contains("row 0") && e.contains("top_p"), "{e}");
    }

    #[test]
    fn packed_outputs_unpack_by_row() {
        let words = [
            7,
            (-1.5f32).to_bits(),
            (-0.25f32).to_bits(),
            0,
            151_935,
            (-20.0f32).to_bits(),
            0f32.to_bits(),
            0,
        ];
        let t = unpack_outputs(&words, 151_936).unwrap();
        assert_eq!(
            t,
            vec![
                SampledToken {
                    token: 7,
                    logprob: -1.5,
                    sampling_logprob: -0.25
                },
                SampledToken {
                    token: 151_935,
                    logprob: -20.0,
                    sampling_logprob: 0.0
                }
            ]
        );
        let mut bad = words;
        bad[7] = 1;
        let e = unpack_outputs(&bad, 10).unwrap_err().to_string();
        assert!(e.contains("row 1") && e.contains("NaN"), "{e}");
        bad[3] = 2;
        let e = unpack_outputs(&bad, 10).unwrap_err().to_string();
        assert!(e.contains("row 0") && e.contains("-inf"), "{e}");
        assert!(unpack_outputs(&words[..5], 10).is_err());
        assert!(unpack_outputs(&[], 10).unwrap().is_empty());
    }

    #[test]
    fn tie_steps_stop_at_the_first_crossing() {
        assert_eq!(tie_steps(0.5, 0.125, 4, 0.75, false), (2, 0.75));
        assert_eq!(tie_steps(0.5, 0.125, 4, 0.75, true), (3, 0.875));
        // Never reached: all of them.
        assert_eq!(tie_steps(0.0, 0.25, 2, 0.75, false), (2, 0.5));
    }

    #[test]
    fn compaction_bound_covers_the_kept_sets() {
        let mut counts = vec![0u32; BINS];
        let mut masses = vec![0u64; BINS];
        let bin = |p: f32| (p.to_bits() >> BIN_SHIFT) as usize;
        let fixed = |p: f32| (f64::from(p) * FIXED) as u64;
        // 1 token of p = 0.5, 3 of 0.1, 1000 of 1e-4.
        for (p, c) in [(0.5f32, 1u32), (0.1, 3), (1e-4, 1000)] {
            counts[bin(p)] += c;
            masses[bin(p)] += u64::from(c) * fixed(p);
        }
        let s = 0.5 + 0.3 + 0.1;
        // Top-k: the bin of the k-th largest.
        assert_eq!(
            compaction_bound(&counts, &masses, 1, 1.0, s),
            Some((bin(0.5) as u32) << BIN_SHIFT)
        );
        assert_eq!(
            compaction_bound(&counts, &masses, 3, 1.0, s),
            Some((bin(0.1) as u32) << BIN_SHIFT)
        );
        assert_eq!(
            compaction_bound(&counts, &masses, 5, 1.0, s),
            Some((bin(1e-4) as u32) << BIN_SHIFT)
        );
        // Top-p: 0.5 of 0.9 is reached by the first token, 0.6 needs the 0.1s, 0.99 the tail.
        assert_eq!(
            compaction_bound(&counts, &masses, 0, 0.5, s),
            Some((bin(0.5) as u32) << BIN_SHIFT)
        );
        assert_eq!(
            compaction_bound(&counts, &masses, 0, 0.6, s),
            Some((bin(0.1) as u32) << BIN_SHIFT)
        );
        assert_eq!(
            compaction_bound(&counts, &masses, 0, 0.99, s),
            Some((bin(1e-4) as u32) << BIN_SHIFT)
        );
        // Over capacity: the whole-row path.
        counts[bin(1e-4)] += CAP as u32;
        assert_eq!(compaction_bound(&counts, &masses, 5, 1.0, s), None);
        assert_eq!(compaction_bound(&counts, &masses, 0, 0.99, s), None);
        assert_eq!(compaction_bound(&counts, &masses, 0, 1.0, s), None);
    }

    fn filtered_params(t: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k,
            top_p,
            seed,
        }
    }

    /// Compares the host model of the kernel's filtered path with the CPU sampler on `l`;
    /// returns (draws, compacted draws).
    fn check_filtered(l: &[f32], what: &str, seeds: u64) -> (usize, usize) {
        let vocab = l.len();
        let (mut draws, mut compacted) = (0, 0);
        for t in [0.7f32, 1.3, 0.05] {
            for top_k in [0usize, 1, 2, 40, vocab, vocab + 5] {
                for top_p in [1.0f32, 0.05, 0.5, 0.9] {
                    let p0 = filtered_params(t, top_k, top_p, 0);
                    if !is_filtered(&p0) {
                        continue;
                    }
                    for seed in 0..seeds {
                        let p = SamplingParams {
                            seed: seed * 7919 + 3,
                            ..p0
                        };
                        let seq = seed ^ 0x5151_7777;
                        let pos = seed as u32 * 3 + 1;
                        let want = sample(l, &p, seq, pos).unwrap();
                        let (got, c) = filtered_sample(l, &p, seq, pos).unwrap();
                        draws += 1;
                        compacted += usize::from(c);
                        assert_eq!(
                            got.token, want.token,
                            "{what}: T {t} k {top_k} p {top_p} seed {seed}: {got:?} vs {want:?}"
                        );
                        assert!(
                            (got.logprob - want.logprob).abs() <= 1e-5
                                && (got.sampling_logprob - want.sampling_logprob).abs() <= 1e-5,
                            "{what}: T {t} k {top_k} p {top_p}: {got:?} vs {want:?}"
                        );
                    }
                }
            }
        }
        (draws, compacted)
    }

    #[test]
    fn filtered_model_matches_the_cpu_sampler() {
        let (mut draws, mut compacted) = (0, 0);
        for (vi, &(vocab, seeds)) in [
            (1usize, 3u64),
            (2, 5),
            (7, 8),
            (257, 6),
            (1000, 6),
            (6000, 2),
        ]
        .iter()
        .enumerate()
        {
            for (si, &scale) in [0.5, 4.0, 20.0].iter().enumerate() {
                let l = logits(vocab, scale, (vi * 10 + si) as u64 + 101);
                let (d, c) = check_filtered(&l, &format!("vocab {vocab} scale {scale}"), seeds);
                draws += d;
                compacted += c;
            }
        }
        // Both of the kernel's paths are exercised.
        assert!(compacted > 0 && compacted < draws, "{compacted} of {draws}");
    }

    #[test]
    fn filtered_model_cuts_ties_like_the_cpu_sampler() {
        // Logits from a few values: every cut falls inside a group of equal probabilities.
        for (vocab, levels) in [(12usize, 3usize), (300, 4), (5000, 5)] {
            let mut r = rng(vocab as u64);
            let l: Vec<f32> = (0..vocab)
                .map(|_| (r() * levels as f64).floor() as f32 * 0.5)
                .collect();
            check_filtered(&l, &format!("ties vocab {vocab}"), 4);
            // Equal maxima only, with masked tokens: top-k / top-p cut by token id.
            let mut l = vec![f32::NEG_INFINITY; vocab];
            for i in (1..vocab).step_by(3) {
                l[i] = 2.0;
            }
            check_filtered(&l, &format!("flat vocab {vocab}"), 4);
        }
        // Distinct logits whose probabilities round to the same f32 (denormal tail): ties by
        // p, not by logit.
        let mut l: Vec<f32> = (0..400).map(|i| -95.0 - i as f32 * 1e-3).collect();
        l[0] = 0.0;
        l[1] = -0.5;
        for (t, k, tp) in [
            (1.0f32, 100usize, 1.0f32),
            (1.0, 0, 0.9999999),
            (1.0, 300, 0.99999994),
        ] {
            for seed in 0..20 {
                let p = filtered_params(t, k, tp, seed);
                let want = sample(&l, &p, 1, 2).unwrap();
                let (got, _) = filtered_sample(&l, &p, 1, 2).unwrap();
                assert_eq!(
                    got.token, want.token,
                    "denormal ties k {k} p {tp} seed {seed}"
                );
            }
        }
    }

    #[test]
    fn filtered_model_matches_at_a_production_vocabulary() {
        for (scale, seed0) in [(8.0, 1u64), (2.0, 2)] {
            let l = logits(151_936, scale, 900 + seed0);
            for (t, k, tp) in [
                (0.7f32, 40usize, 1.0f32),
                (1.3, 0, 0.9),
                (0.7, 0, 0.05),
                (1.3, 2, 0.5),
                (1.3, 151_936, 1.0),
            ] {
                let p = filtered_params(t, k, tp, seed0 * 31);
                let want = sample(&l, &p, 5, 6).unwrap();
                let (got, _) = filtered_sample(&l, &p, 5, 6).unwrap();
                assert_eq!(got.token, want.token, "scale {scale} T {t} k {k} p {tp}");
                assert!((got.sampling_logprob - want.sampling_logprob).abs() <= 1e-5);
            }
        }
    }
}
