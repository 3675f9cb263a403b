//! Reproducible token sampling: temperature, top-k, top-p (nucleus), driven by a counter-based
//! random number generator so that the draw for a token depends only on
//! `(seed, sequence id, position)`, never on batch composition or scheduling order.
//!
//! # Random numbers
//!
//! [`philox4x32_10`] is Philox4x32 with 10 rounds (Salmon et al., SC'11; the generator behind
//! cuRAND's `curandStatePhilox4_32_10_t`): a round maps counter `c` and key `k` to
//! `(hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0))` with
//! `M0 = 0xD2511F53`, `M1 = 0xCD9E8D57`; between rounds the key is bumped by
//! `(0x9E3779B9, 0xBB67AE85)` (wrapping).
//!
//! [`uniform`]`(seed, seq_id, position)` runs it with key `(seed lo32, seed hi32)` and counter
//! `(position, seq_id lo32, seq_id hi32, 0)`, and returns `((x0 << 32 | x1) >> 11) * 2^-53`
//! from the first two output words: a 53-bit uniform in `[0, 1)`.
//!
//! # The sampling definition (the CUDA kernel implements the same)
//!
//! Given logits `l` over the vocabulary (`l` must be non-empty, contain no NaN or `+inf` and at
//! least one finite value; `-inf` masks a token):
//!
//! 1. `logprob` of the chosen token is always the log-softmax of the **untempered** logits:
//!    `l_t - (m + ln Σ_i E(l_i - m))`, `m = max l`, the sum in f64, where `E` is
//!    [`sampling_exp`], an f32 exponential defined operation by operation (so every backend
//!    computes the same bits) and `l_i - m` an f32 subtraction.
//! 2. **Greedy** (`temperature == 0`): the argmax, lowest index on ties; `sampling_logprob = 0`.
//! 3. Otherwise, with `T = temperature`: `w_i = E((l_i - m) / T)` (f32 subtraction and
//!    division; at `T = 1` the division is skipped, which gives the same value),
//!    `Z = Σ w_i` in f64, `p_i = w_i * r` in f32 with `r = 1 / Z` rounded to f32. Only tokens
//!    with `p_i > 0` are candidates. Candidates are ordered by `p` descending, ties by lower
//!    token id ("rank order").
//! 4. **Top-k** (`top_k > 0`): keep the first `top_k` candidates in rank order.
//! 5. **Top-p** (`top_p < 1`): let `S` be the mass (Σ p, f64) of the candidates kept by step 4;
//!    keep the shortest rank-order prefix whose cumulative mass `>= top_p * S` (at least one
//!    token; all of them if rounding never reaches the target). `top_p == 1` keeps everything.
//!    (This is top-p on the distribution renormalised after top-k, as in HF and vLLM.)
//! 6. `total` = mass of the kept tokens (f64). `u = uniform(seed, seq_id, position)`.
//!    Walk the kept tokens accumulating `p` (f64) and take the first token whose cumulative
//!    mass is `> u * total`; if rounding leaves none, the last kept token. The walk is in rank
//!    order when a filter is on (`top_k > 0` or `top_p < 1`), and in token-id order when
//!    neither is (plain sampling needs no sort: one pass, a prefix sum on a GPU).
//! 7. `sampling_logprob = ln(p_t / total)`: the log-probability of the token under the
//!    distribution actually sampled from (tempered, filtered, renormalised).
//!
//! Sums over sets (Z, S, total when no top-p prefix walk is involved) have an unspecified
//! summation order: implementations agree up to f64 rounding of those sums, so they draw the
//! same token except for draws that land within ~1e-16 of a boundary (or, about once in 10^9
//! rows, where the sums' last-bit difference rounds `r` to the neighbouring f32). Everything
//! per token is f32 with each operation rounded on its own (no fused multiply-add), so it has
//! the same bits on every IEEE machine; on a GPU it is a few f32 operations, where an f64
//! exponential and division (the definition before 2026-11-26) were tens of f64 operations at
//! a half to a sixty-fourth of the f32 rate. Top-k = 1 equals greedy except where distinct
//! logits round to the same f32 probability.
//!
//! Cost: O(V) for the softmax plus selection (at `T = 1` the softmax weights double as the
//! untempered log-partition terms); unfiltered sampling sorts nothing; with top-p only the part
//! of the rank order that is actually visited is sorted (top-k sets are sorted whole; otherwise
//! the sorted prefix grows by doubling via quickselect), so a 150k vocabulary is never fully
//! sorted unless the walk needs it.

use anyhow::{Result, bail};
use std::cmp::Ordering;

/// Philox4x32 round multipliers.
pub const PHILOX_M4X32: [u32; 2] = [0xD251_1F53, 0xCD9E_8D57];
/// Philox4x32 Weyl key increments (golden ratio and sqrt(3) - 1).
pub const PHILOX_W32: [u32; 2] = [0x9E37_79B9, 0xBB67_AE85];
/// Rounds of the Philox variant used here (Philox4x32-10).
pub const PHILOX_ROUNDS: usize = 10;

/// Philox4x32-10: the 128-bit block `counter` encrypted under the 64-bit `key`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..PHILOX_ROUNDS {
        if round > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W32[0]);
            k[1] = k[1].wrapping_add(PHILOX_W32[1]);
        }
        let p0 = u64::from(PHILOX_M4X32[0]) * u64::from(c[0]);
        let p1 = u64::from(PHILOX_M4X32[1]) * u64::from(c[2]);
        c = [
            ((p1 >> 32) as u32) ^ c[1] ^ k[0],
            p1 as u32,
            ((p0 >> 32) as u32) ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

/// The Philox block for one token draw: key `(seed lo, seed hi)`,
/// counter `(position, seq_id lo, seq_id hi, 0)`.
pub fn philox_block(seed: u64, seq_id: u64, position: u32) -> [u32; 4] {
    philox4x32_10(
        [position, seq_id as u32, (seq_id >> 32) as u32, 0],
        [seed as u32, (seed >> 32) as u32],
    )
}

/// The uniform draw in `[0, 1)` for `(seed, seq_id, position)`: the top 53 bits of
/// `x0 << 32 | x1` (first two Philox output words) times `2^-53`.
pub fn uniform(seed: u64, seq_id: u64, position: u32) -> f64 {
    let x = philox_block(seed, seq_id, position);
    let bits = ((u64::from(x[0]) << 32) | u64::from(x[1])) >> 11;
    bits as f64 * (1.0 / (1u64 << 53) as f64)
}

/// How to pick the next token of a sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy (argmax). Must be finite and `>= 0`.
    pub temperature: f32,
    /// Nucleus mass in `(0, 1]`; `1` disables top-p.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; `0` disables top-k.
    pub top_k: usize,
    /// Key of the random stream (together with sequence id and position).
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Plain sampling from the model's distribution: `T = 1`, no top-p, no top-k, seed 0.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (argmax).
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Whether these parameters select the argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Rejects a NaN, infinite or negative temperature and a top-p outside `(0, 1]`.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            bail!("sampling parameter temperature must be finite and >= 0 (0 = greedy), got {t}");
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            bail!("sampling parameter top_p must be in (0, 1], got {p}");
        }
        Ok(())
    }
}

/// The outcome of sampling one token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampledToken {
    pub token: u32,
    /// Log-softmax of the untempered logits at `token` (the model's log-probability).
    pub logprob: f32,
    /// Log-probability of `token` under the distribution actually sampled from (tempered,
    /// top-k/top-p filtered, renormalised); `0` for greedy.
    pub sampling_logprob: f32,
}

/// A sampling candidate: probability (f32, as in the definition) and token id.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    p: f32,
    id: u32,
}

/// Rank order: probability descending, then lower token id first.
fn rank(a: &Candidate, b: &Candidate) -> Ordering {
    b.p.total_cmp(&a.p).then(a.id.cmp(&b.id))
}

/// Candidates whose rank-order prefix is sorted on demand: `items[..sorted]` is the true sorted
/// prefix and every element after it ranks below all of them.
struct LazyRanked {
    items: Vec<Candidate>,
    sorted: usize,
}

impl LazyRanked {
    fn new(items: Vec<Candidate>) -> Self {
        Self { items, sorted: 0 }
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    /// The `i`-th candidate in rank order (`i < len`).
    fn get(&mut self, i: usize) -> Candidate {
        if i >= self.sorted {
            let n = self.items.len();
            let want = (i + 1).max(2 * self.sorted).max(256).min(n);
            let tail = &mut self.items[self.sorted..];
            let k = want - self.sorted;
            if k < tail.len() {
                tail.select_nth_unstable_by(k - 1, rank);
            }
            tail[..k].sort_unstable_by(rank);
            self.sorted = want;
        }
        self.items[i]
    }
}

/// Checks logits and returns `(argmax, max)`: lowest index among the maximal values.
pub fn scan_logits(logits: &[f32]) -> Result<(usize, f32)> {
    if logits.is_empty() {
        bail!("cannot sample from an empty logits vector");
    }
    let mut best = 0usize;
    let mut max = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() || l == f32::INFINITY {
            bail!("logit {i} is {l}: cannot sample from non-finite logits");
        }
        if l > max {
            max = l;
            best = i;
        }
    }
    if max == f32::NEG_INFINITY {
        bail!(
            "all {} logits are -inf: no token can be sampled",
            logits.len()
        );
    }
    Ok((best, max))
}

/// The constants of [`sampling_exp`] as f32 bit patterns (`GE_EXP_*` in kernels/sampling.cu,
/// which a test compares): `ln 2` in two parts (the high one has 9 significant bits, so
/// `k * LN2_HI` is exact for the `k` that occur), `log2 e`, and the coefficients of `P` from
/// the highest degree down.
pub const EXP_LN2_HI_BITS: u32 = 0x3f31_8000;
pub const EXP_LN2_LO_BITS: u32 = 0xb95e_8083;
pub const EXP_LOG2E_BITS: u32 = 0x3fb8_aa3b;
pub const EXP_POLY_BITS: [u32; 6] = [
    0x3950_6967,
    0x3ab7_43ce,
    0x3c08_8908,
    0x3d2a_a9c1,
    0x3e2a_aaaa,
    0x3f00_0000,
];
/// `1.5 * 2^23`: adding and subtracting it rounds an f32 of magnitude below `2^22` to an
/// integer, ties to even (`GE_ROUND_MAGIC` in kernels/sampling.cu).
pub const EXP_ROUND_MAGIC: f32 = 12_582_912.0;

/// The exponential of the sampling definition, for `x <= 0` (the sampler's arguments are
/// logits minus their maximum): `exp(x)` to about 1 ulp, defined by its operations (each an
/// IEEE f32 multiply, add or subtract, rounded to nearest, none fused), so that the CPU, the
/// CUDA kernel (`ge_sampling_exp` in kernels/sampling.cu) and any IEEE machine give the same
/// bits. `x = k ln 2 + r` with `k = round(x log2 e)` and `|r| <= ln 2 / 2` (Cody-Waite),
/// `exp(r) = 1 + r + r^2 P(r)` with the degree-5 minimax `P` of the Cephes library's `expf`,
/// then `2^k` applied by two exact power-of-two products, the second of which rounds once into
/// the subnormal range. `E(0) = 1` exactly; below -104 (where `exp` rounds to 0), `-inf` and
/// NaN give 0; outside the domain, `x > 0` is taken as 0 (a debug build asserts).
pub fn sampling_exp(x: f32) -> f32 {
    debug_assert!(
        x <= 0.0 || x.is_nan(),
        "sampling_exp({x}): defined for x <= 0"
    );
    // Branch-free, so that loops over logits vectorise: the arithmetic runs on x clamped to
    // [-104, 0] (a NaN stays NaN and `as i32` maps it to 0, no harm) and the result is
    // replaced by 0 where x is NaN or below -104.
    let xc = x.clamp(-104.0, 0.0);
    let t = xc * f32::from_bits(EXP_LOG2E_BITS);
    let kf = (t + EXP_ROUND_MAGIC) - EXP_ROUND_MAGIC;
    let r = (xc - kf * f32::from_bits(EXP_LN2_HI_BITS)) - kf * f32::from_bits(EXP_LN2_LO_BITS);
    let z = r * r;
    let mut p = f32::from_bits(EXP_POLY_BITS[0]);
    for &c in &EXP_POLY_BITS[1..] {
        p = p * r + f32::from_bits(c);
    }
    let y = (p * z + r) + 1.0;
    // k in [-150, 0]: 2^(k + 64) and 2^-64 are normal powers of two.
    let k = kf as i32;
    let up = f32::from_bits(((k + 64 + 127) as u32) << 23);
    let down = f32::from_bits((127 - 64) << 23);
    let e = (y * up) * down;
    if x >= -104.0 { e } else { 0.0 }
}

/// `Σ x_i` in f64 over f32 terms, in a fixed order (eight interleaved partial sums, then
/// combined pairwise), so that the loop vectorises; the definition leaves the order of its
/// sums open.
pub fn sum_f64(xs: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f64::from(x);
        }
    }
    for (a, &x) in acc.iter_mut().zip(tail) {
        *a += f64::from(x);
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// The tempered weight `E((l - max) / T)` of a logit (the division skipped at `T = 1`).
pub fn sampling_weight(l: f32, max: f32, temperature: f32) -> f32 {
    let d = l - max;
    sampling_exp(if temperature == 1.0 {
        d
    } else {
        d / temperature
    })
}

/// `max + ln Σ E(l - max)` (the sum in f64): the log-partition function of the untempered
/// logits.
pub fn log_sum_exp(logits: &[f32], max: f32) -> f64 {
    // In blocks, so that the exponentials vectorise without a vocabulary-sized buffer.
    let mut s = 0.0f64;
    let mut e = [0.0f32; 1024];
    for block in logits.chunks(e.len()) {
        for (o, &l) in e.iter_mut().zip(block) {
            *o = sampling_exp(l - max);
        }
        s += sum_f64(&e[..block.len()]);
    }
    f64::from(max) + s.ln()
}

/// The tempered weights `w_i` of a row (step 3) and their sum `Z` in f64 ([`sum_f64`]'s
/// order).
pub fn tempered_weights(logits: &[f32], max: f32, temperature: f32) -> (Vec<f32>, f64) {
    let weights: Vec<f32> = logits
        .iter()
        .map(|&l| sampling_weight(l, max, temperature))
        .collect();
    let z = sum_f64(&weights);
    (weights, z)
}

/// `1 / Z` rounded to f32: the factor that turns weights into probabilities.
pub fn inverse_normaliser(z: f64) -> f32 {
    (1.0 / z) as f32
}

/// Plain sampling (no top-k, no top-p): the inverse-CDF walk in token-id order over the f32
/// probabilities `weights[i] * inv_z`.
fn sample_unfiltered(
    weights: &[f32],
    inv_z: f32,
    params: &SamplingParams,
    seq_id: u64,
    position: u32,
    logprob: impl Fn(usize) -> f32,
) -> SampledToken {
    let probs: Vec<f32> = weights.iter().map(|&w| w * inv_z).collect();
    let total = sum_f64(&probs);
    let threshold = uniform(params.seed, seq_id, position) * total;
    let mut cum = 0.0f64;
    // The last candidate (p > 0) is the fallback when rounding leaves the walk short; the
    // argmax has p >= 1/V > 0, so there is one.
    let mut chosen = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            chosen = i;
            cum += f64::from(p);
            if cum > threshold {
                break;
            }
        }
    }
    SampledToken {
        token: chosen as u32,
        logprob: logprob(chosen),
        sampling_logprob: (f64::from(probs[chosen]) / total).ln() as f32,
    }
}

/// One row of a batched sampling call: how to sample, and the draw's stream
/// (`seq_id`, `position`) as [`sample`] takes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSampling {
    pub params: SamplingParams,
    pub seq_id: u64,
    pub position: u32,
}

/// [`sample`] on each row of host logits (`[rows.len(), vocab]`, row-major), in parallel;
/// the error of a bad row names it.
pub fn sample_host_rows(
    logits: &[f32],
    vocab: usize,
    rows: &[RowSampling],
) -> Result<Vec<SampledToken>> {
    use rayon::prelude::*;
    if logits.len() != rows.len() * vocab {
        bail!(
            "sampling: {} logits for {} rows of a {vocab}-token vocabulary",
            logits.len(),
            rows.len()
        );
    }
    if vocab == 0 {
        return rows
            .iter()
            .map(|_| Err(anyhow::anyhow!("sampling: empty vocabulary")))
            .collect();
    }
    logits
        .par_chunks(vocab)
        .zip(rows.par_iter())
        .enumerate()
        .map(|(r, (row, s))| {
            sample(row, &s.params, s.seq_id, s.position)
                .map_err(|e| anyhow::anyhow!("sampling row {r}: {e:#}"))
        })
        .collect()
}

/// Samples the token at `position` of sequence `seq_id` from `logits`; see the module
/// documentation for the exact definition. Errors on invalid parameters or logits.
pub fn sample(
    logits: &[f32],
    params: &SamplingParams,
    seq_id: u64,
    position: u32,
) -> Result<SampledToken> {
    params.validate()?;
    let (argmax, max) = scan_logits(logits)?;
    if params.is_greedy() {
        let lse = log_sum_exp(logits, max);
        return Ok(SampledToken {
            token: argmax as u32,
            logprob: (f64::from(logits[argmax]) - lse) as f32,
            sampling_logprob: 0.0,
        });
    }

    // Tempered softmax: f32 weights, f64 normaliser, f32 probabilities.
    let t = params.temperature;
    let (weights, z) = tempered_weights(logits, max, t);
    let inv_z = inverse_normaliser(z);
    // At T = 1 the weights are exactly the terms of the untempered log-partition function.
    let lse = if t == 1.0 {
        f64::from(max) + z.ln()
    } else {
        log_sum_exp(logits, max)
    };
    let logprob = |t: usize| (f64::from(logits[t]) - lse) as f32;

    if params.top_k == 0 && params.top_p == 1.0 {
        return Ok(sample_unfiltered(
            &weights, inv_z, params, seq_id, position, logprob,
        ));
    }
    let mut candidates: Vec<Candidate> = weights
        .iter()
        .enumerate()
        .filter_map(|(i, &w)| {
            let p = w * inv_z;
            (p > 0.0).then_some(Candidate { p, id: i as u32 })
        })
        .collect();
    // The argmax has w = 1 and p >= 1/V > 0, so there is always a candidate.

    // Top-k: quickselect the k best (rank order), dropping the rest.
    if params.top_k > 0 && params.top_k < candidates.len() {
        candidates.select_nth_unstable_by(params.top_k - 1, rank);
        candidates.truncate(params.top_k);
    }
    let mass: f64 = candidates.iter().map(|c| f64::from(c.p)).sum();
    let mut ranked = LazyRanked::new(candidates);

    // Top-p: shortest rank-order prefix with cumulative mass >= top_p * mass.
    let (kept, total) = if params.top_p < 1.0 {
        let target = f64::from(params.top_p) * mass;
        let mut cum = 0.0f64;
        let mut kept = ranked.len();
        for i in 0..ranked.len() {
            cum += f64::from(ranked.get(i).p);
            if cum >= target {
                kept = i + 1;
                break;
            }
        }
        (kept, cum)
    } else {
        (ranked.len(), mass)
    };

    // Inverse-CDF walk in rank order.
    let threshold = uniform(params.seed, seq_id, position) * total;
    let mut cum = 0.0f64;
    let mut chosen = None;
    for i in 0..kept {
        let c = ranked.get(i);
        cum += f64::from(c.p);
        if cum > threshold {
            chosen = Some(c);
            break;
        }
    }
    let chosen = match chosen {
        Some(c) => c,
        None => ranked.get(kept - 1),
    };
    Ok(SampledToken {
        token: chosen.id,
        logprob: logprob(chosen.id as usize),
        sampling_logprob: (f64::from(chosen.p) / total).ln() as f32,
    })
}
