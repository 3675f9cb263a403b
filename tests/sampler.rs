//! The sampler: Philox4x32-10 known answers, determinism, greedy, temperature, top-k, top-p,
//! log-probs, the empirical distribution, and parameter validation.

use genius_engine::engine::sampler::{
    SamplingParams, philox_block, philox4x32_10, sample, sampling_exp, sampling_weight, sum_f64,
    uniform,
};

fn params(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        top_p,
        top_k,
        seed,
    }
}

fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let w: Vec<f64> = logits.iter().map(|&l| ((l as f64 - m) / t).exp()).collect();
    let z: f64 = w.iter().sum();
    w.iter().map(|x| x / z).collect()
}

/// Random123 `kat_vectors`, "philox4x32 10" lines: counter[4], key[2] -> output[4].
#[test]
fn philox4x32_10_known_answers() {
    let kats: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        (
            [0, 0, 0, 0],
            [0, 0],
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
        ),
        (
            [0xffffffff; 4],
            [0xffffffff; 2],
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
        ),
        (
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0],
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
        ),
    ];
    for (ctr, key, want) in kats {
        assert_eq!(philox4x32_10(ctr, key), want, "ctr {ctr:x?} key {key:x?}");
    }
}

#[test]
fn counter_and_key_layout() {
    let seed = 0x0123_4567_89ab_cdef_u64;
    let seq = 0xfedc_ba98_7654_3210_u64;
    assert_eq!(
        philox_block(seed, seq, 77),
        philox4x32_10(
            [77, 0x7654_3210, 0xfedc_ba98, 0],
            [0x89ab_cdef, 0x0123_4567]
        )
    );
    let x = philox_block(seed, seq, 77);
    let bits = ((u64::from(x[0]) << 32 | u64::from(x[1])) >> 11) as f64;
    assert_eq!(uniform(seed, seq, 77), bits / 9007199254740992.0);
}

#[test]
fn uniform_is_in_unit_interval_and_roughly_uniform() {
    let n = 20_000;
    let mut sum = 0.0;
    let mut buckets = [0usize; 10];
    for i in 0..n {
        let u = uniform(42, i as u64, (i * 7) as u32);
        assert!((0.0..1.0).contains(&u), "{u}");
        sum += u;
        buckets[(u * 10.0) as usize] += 1;
    }
    let mean = sum / n as f64;
    assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
    for b in buckets {
        // expected 2000, sd ~42
        assert!((b as i64 - 2000).abs() < 250, "{buckets:?}");
    }
}

#[test]
fn draws_are_a_pure_function_of_seed_sequence_and_position() {
    let logits: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32) * 0.05).collect();
    let p = params(1.0, 1.0, 0, 7);
    let a = sample(&logits, &p, 5, 9).unwrap();
    // Interleave unrelated draws ("another batch composition"): same answer.
    for s in 0..50 {
        sample(&logits, &p, s, s as u32).unwrap();
    }
    assert_eq!(sample(&logits, &p, 5, 9).unwrap(), a);

    // Different sequence ids, positions and seeds give different streams.
    let by_seq: Vec<f64> = (0..64).map(|s| uniform(7, s, 9)).collect();
    let by_pos: Vec<f64> = (0..64).map(|q| uniform(7, 5, q)).collect();
    let by_seed: Vec<f64> = (0..64).map(|s| uniform(s, 5, 9)).collect();
    for v in [&by_seq, &by_pos, &by_seed] {
        let mut sorted = v.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted.dedup();
        assert_eq!(sorted.len(), 64, "repeated draws");
    }
    // High bits of the sequence id matter too.
    assert_ne!(uniform(7, 1, 0), uniform(7, 1 | (1 << 40), 0));
    let tokens: std::collections::HashSet<u32> = (0..64)
        .map(|s| sample(&logits, &p, s, 0).unwrap().token)
        .collect();
    assert!(tokens.len() > 10, "{tokens:?}");
}

#[test]
fn greedy_is_argmax_with_lowest_index_on_ties() {
    let logits = [0.5, 3.0, -1.0, 3.0, 2.9];
    for seed in 0..5 {
        let t = sample(&logits, &params(0.0, 1.0, 0, seed), seed, 3).unwrap();
        assert_eq!(t.token, 1);
        assert_eq!(t.sampling_logprob, 0.0);
    }
    assert_eq!(
        sample(&logits, &SamplingParams::greedy(), 0, 0)
            .unwrap()
            .token,
        1
    );
    let big: Vec<f32> = (0..151_936)
        .map(|i| ((i * 7919) % 10007) as f32 * 1e-3)
        .collect();
    let want = big
        .iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &l)| if l > b.1 { (i, l) } else { b })
        .0;
    let got = sample(&big, &SamplingParams::greedy(), 0, 0).unwrap();
    assert_eq!(got.token as usize, want);
}

#[test]
fn top_k_one_and_tiny_top_p_equal_greedy() {
    let logits: Vec<f32> = (0..5000)
        .map(|i| ((i * 7919 % 5003) as f32) * 1e-3)
        .collect();
    let greedy = sample(&logits, &SamplingParams::greedy(), 0, 0).unwrap();
    for s in 0..100 {
        let k1 = sample(&logits, &params(1.3, 1.0, 1, 11), s, s as u32).unwrap();
        assert_eq!(k1.token, greedy.token);
        assert_eq!(k1.logprob, greedy.logprob);
        assert_eq!(k1.sampling_logprob, 0.0);
        let p0 = sample(&logits, &params(0.7, 1e-6, 0, 12), s, s as u32).unwrap();
        assert_eq!(p0.token, greedy.token);
        assert_eq!(p0.sampling_logprob, 0.0);
    }
}

#[test]
fn logprob_is_untempered_log_softmax() {
    let logits = [1.0f32, 2.0, 0.5, -3.0, 2.5, f32::NEG_INFINITY];
    let p = softmax(&logits, 1.0);
    for (t, k, top_p) in [(0.0, 0, 1.0), (0.3, 0, 1.0), (2.0, 3, 0.8), (1.0, 0, 1.0)] {
        for s in 0..30 {
            let r = sample(&logits, &params(t, top_p, k, 3), s, 1).unwrap();
            let want = p[r.token as usize].ln() as f32;
            assert!((r.logprob - want).abs() < 1e-6, "{} vs {want}", r.logprob);
            assert_ne!(r.token, 5, "a -inf logit was sampled");
        }
    }
}

#[test]
fn top_p_keeps_exactly_the_nucleus() {
    // Probabilities 0.4, 0.3, 0.2, 0.1 (shuffled order): top_p = 0.65 keeps {0.4, 0.3};
    // top_p = 0.75 keeps {0.4, 0.3, 0.2}.
    let probs = [0.2f64, 0.4, 0.1, 0.3];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
    for (top_p, nucleus) in [(0.65f32, vec![1u32, 3]), (0.75, vec![1, 3, 0])] {
        let mut seen = std::collections::BTreeMap::new();
        let n = 4000;
        for s in 0..n {
            let r = sample(&logits, &params(1.0, top_p, 0, 5), s, 0).unwrap();
            assert!(
                nucleus.contains(&r.token),
                "{} outside {nucleus:?}",
                r.token
            );
            *seen.entry(r.token).or_insert(0usize) += 1;
            // sampling_logprob is the log of the renormalised kept probability.
            let mass: f64 = nucleus.iter().map(|&t| probs[t as usize]).sum();
            let want = (probs[r.token as usize] / mass).ln();
            assert!((r.sampling_logprob as f64 - want).abs() < 1e-5);
        }
        assert_eq!(seen.len(), nucleus.len(), "{seen:?}");
        // Frequencies follow the renormalised nucleus.
        let mass: f64 = nucleus.iter().map(|&t| probs[t as usize]).sum();
        for &t in &nucleus {
            let q = probs[t as usize] / mass;
            let f = seen[&t] as f64 / n as f64;
            let se = (q * (1.0 - q) / n as f64).sqrt();
            assert!((f - q).abs() < 5.0 * se, "token {t}: {f} vs {q}");
        }
    }
    // The boundary: cumulative mass reaching top_p exactly keeps that prefix.
    let logits = [0.0f32, 0.0, f32::NEG_INFINITY];
    for s in 0..50 {
        let r = sample(&logits, &params(1.0, 0.5, 0, 1), s, 0).unwrap();
        assert_eq!(
            r.token, 0,
            "0.5 >= 0.5 keeps only the first (lowest id) of a tie"
        );
    }
}

#[test]
fn top_k_keeps_the_k_most_likely_on_a_large_vocab() {
    let v = 150_000;
    let logits: Vec<f32> = (0..v)
        .map(|i| ((i * 7919) % 100_003) as f32 * 1e-4)
        .collect();
    let mut order: Vec<usize> = (0..v).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let top: std::collections::HashSet<u32> = order[..20].iter().map(|&i| i as u32).collect();
    let p = softmax(&logits, 0.05);
    let kept_mass: f64 = top.iter().map(|&t| p[t as usize]).sum();
    let mut distinct = std::collections::HashSet::new();
    for s in 0..300 {
        let r = sample(&logits, &params(0.05, 1.0, 20, 9), s, 4).unwrap();
        assert!(
            top.contains(&r.token),
            "token {} not in the top 20",
            r.token
        );
        let want = (p[r.token as usize] / kept_mass).ln();
        assert!((r.sampling_logprob as f64 - want).abs() < 1e-4);
        distinct.insert(r.token);
    }
    assert!(distinct.len() > 5);
    // top-k and top-p together: top-p applies to the renormalised top-k distribution.
    for s in 0..100 {
        let r = sample(&logits, &params(0.05, 0.3, 20, 9), s, 4).unwrap();
        assert!(top.contains(&r.token));
    }
}

#[test]
fn temperature_sharpens_and_flattens() {
    let logits = [2.0f32, 1.0, 0.0];
    let n = 6000u64;
    for t in [0.5f32, 1.0, 2.0] {
        let q = softmax(&logits, t as f64);
        let mut counts = [0usize; 3];
        for s in 0..n {
            let r = sample(&logits, &params(t, 1.0, 0, 77), s, 3).unwrap();
            counts[r.token as usize] += 1;
            let want = q[r.token as usize].ln();
            assert!((r.sampling_logprob as f64 - want).abs() < 1e-5);
        }
        for i in 0..3 {
            let f = counts[i] as f64 / n as f64;
            let se = (q[i] * (1.0 - q[i]) / n as f64).sqrt();
            assert!(
                (f - q[i]).abs() < 5.0 * se,
                "T={t} token {i}: {f} vs {}",
                q[i]
            );
        }
    }
    // A very low temperature is effectively greedy.
    for s in 0..50 {
        assert_eq!(
            sample(&logits, &params(1e-4, 1.0, 0, 1), s, 0)
                .unwrap()
                .token,
            0
        );
    }
}

#[test]
fn empirical_frequencies_match_softmax() {
    let logits = [0.3f32, -1.2, 2.0, 0.0, 1.1, -0.4, 0.9, -2.5];
    let q = softmax(&logits, 1.0);
    let n = 40_000u64;
    let mut counts = [0usize; 8];
    for s in 0..n {
        counts[sample(&logits, &SamplingParams::default(), s, 17)
            .unwrap()
            .token as usize] += 1;
    }
    let mut chi2 = 0.0;
    for i in 0..8 {
        let f = counts[i] as f64 / n as f64;
        let se = (q[i] * (1.0 - q[i]) / n as f64).sqrt();
        assert!((f - q[i]).abs() < 4.5 * se, "token {i}: {f} vs {}", q[i]);
        let e = q[i] * n as f64;
        chi2 += (counts[i] as f64 - e).powi(2) / e;
    }
    // 7 degrees of freedom: P(chi2 > 29) < 1.5e-4.
    assert!(chi2 < 29.0, "chi2 {chi2}, counts {counts:?}");
}

#[test]
fn invalid_parameters_and_logits_are_rejected() {
    let logits = [0.0f32, 1.0];
    let err = |p: SamplingParams| sample(&logits, &p, 0, 0).unwrap_err().to_string();
    for t in [-0.1f32, f32::NAN, f32::INFINITY] {
        let m = err(params(t, 1.0, 0, 0));
        assert!(
            m.contains("temperature") && m.contains(&t.to_string()),
            "{m}"
        );
        assert!(params(t, 1.0, 0, 0).validate().is_err());
    }
    for p in [0.0f32, -0.5, 1.5, f32::NAN] {
        let m = err(params(1.0, p, 0, 0));
        assert!(m.contains("top_p") && m.contains(&p.to_string()), "{m}");
    }
    assert!(params(0.0, 1.0, 0, 0).validate().is_ok());
    assert!(params(1.0, 1e-9, 0, 0).validate().is_ok());

    let p = SamplingParams::default();
    let msg = sample(&[], &p, 0, 0).unwrap_err().to_string();
    assert!(msg.contains("empty"), "{msg}");
    let msg = sample(&[0.0, f32::NAN], &p, 0, 0).unwrap_err().to_string();
    assert!(msg.contains("logit 1") && msg.contains("NaN"), "{msg}");
    assert!(sample(&[0.0, f32::INFINITY], &p, 0, 0).is_err());
    let msg = sample(&[f32::NEG_INFINITY; 3], &SamplingParams::greedy(), 0, 0)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("-inf"), "{msg}");
    // top_k larger than the vocabulary is fine.
    assert!(sample(&logits, &params(1.0, 1.0, 100, 0), 0, 0).is_ok());
}

/// The module definition written naively (full sort of the whole vocabulary).
fn reference_sample(logits: &[f32], p: &SamplingParams, seq: u64, pos: u32) -> (u32, f64) {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f32> = logits
        .iter()
        .map(|&l| sampling_weight(l, m, p.temperature))
        .collect();
    let z: f64 = w.iter().map(|&x| x as f64).sum();
    let inv_z = (1.0 / z) as f32;
    let mut c: Vec<(f32, u32)> = w
        .iter()
        .enumerate()
        .map(|(i, &x)| (x * inv_z, i as u32))
        .filter(|c| c.0 > 0.0)
        .collect();
    // Rank order when a filter is on; token-id order (as collected) otherwise.
    if p.top_k > 0 || p.top_p < 1.0 {
        c.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    }
    if p.top_k > 0 {
        c.truncate(p.top_k);
    }
    if p.top_p < 1.0 {
        let mass: f64 = c.iter().map(|x| x.0 as f64).sum();
        let mut cum = 0.0;
        let mut keep = c.len();
        for (i, x) in c.iter().enumerate() {
            cum += x.0 as f64;
            if cum >= p.top_p as f64 * mass {
                keep = i + 1;
                break;
            }
        }
        c.truncate(keep);
    }
    let total: f64 = c.iter().map(|x| x.0 as f64).sum();
    let thr = uniform(p.seed, seq, pos) * total;
    let mut cum = 0.0;
    for x in &c {
        cum += x.0 as f64;
        if cum > thr {
            return (x.1, (x.0 as f64 / total).ln());
        }
    }
    let x = c[c.len() - 1];
    (x.1, (x.0 as f64 / total).ln())
}

#[test]
fn lazy_partial_sort_matches_a_full_sort_reference() {
    let v = 20_000;
    for (k, (t, top_p, top_k)) in [
        (1.0f32, 1.0f32, 0usize),
        (1.0, 0.9, 0),
        (0.7, 0.95, 0),
        (2.0, 0.5, 0),
        (1.0, 1.0, 50),
        (1.0, 0.8, 3000),
        (1.5, 0.99, 0),
    ]
    .into_iter()
    .enumerate()
    {
        // Flat-ish logits so the nucleus and the walk go far beyond the first sorted chunk.
        let logits: Vec<f32> = (0..v)
            .map(|i| ((i * 7919 + k * 131) % 1009) as f32 * 4e-3)
            .collect();
        let p = params(t, top_p, top_k, k as u64);
        for s in 0..40 {
            let got = sample(&logits, &p, s, 2).unwrap();
            let (tok, slp) = reference_sample(&logits, &p, s, 2);
            assert_eq!(got.token, tok, "{p:?} seq {s}");
            assert!((got.sampling_logprob as f64 - slp).abs() < 1e-5);
        }
    }
}

/// The definition's f32 exponential is `exp` to within 2 ulp on its whole domain (a sweep of
/// [-104, 0] in steps of ~2^-14, plus every f32 in [-2^-10, 0] at a stride), rounds into the
/// subnormal range within one subnormal step, never decreases as x grows, and has the exact
/// values the sampler relies on: E(0) = 1, E(-inf) = E(NaN) = 0, 0 below -104.
#[test]
fn sampling_exp_is_exp_to_two_ulp_and_monotone() {
    assert_eq!(sampling_exp(0.0), 1.0);
    assert_eq!(sampling_exp(-0.0), 1.0);
    assert_eq!(sampling_exp(f32::NEG_INFINITY), 0.0);
    assert_eq!(sampling_exp(f32::NAN), 0.0);
    assert_eq!(sampling_exp(-104.5), 0.0);
    let mut worst_ulp = 0.0f64;
    let mut worst_sub = 0.0f64;
    let mut prev = 0.0f32;
    let mut check = |x: f32| {
        let e = sampling_exp(x);
        let exact = (x as f64).exp();
        if exact >= f32::MIN_POSITIVE as f64 {
            // One ulp of the f32 result's binade.
            let ulp = 2f64.powi((exact.log2().floor() as i32) - 23);
            worst_ulp = worst_ulp.max((e as f64 - exact).abs() / ulp);
        } else {
            worst_sub = worst_sub.max((e as f64 - exact).abs() / 2f64.powi(-149));
        }
        e
    };
    let steps = 104 * (1 << 14);
    for i in 0..=steps {
        let x = -104.0 + i as f32 / (1 << 14) as f32;
        let e = check(x);
        assert!(e >= prev, "E decreases at {x}: {e} after {prev}");
        prev = e;
    }
    let mut x = -1.0f32 / 1024.0;
    while x < 0.0 {
        check(x);
        x = f32::from_bits(x.to_bits() - 97);
    }
    assert!(worst_ulp <= 2.0, "worst error {worst_ulp} ulp");
    assert!(worst_sub <= 1.0, "worst subnormal error {worst_sub} steps");
    println!("sampling_exp: worst {worst_ulp:.3} ulp, {worst_sub:.3} subnormal steps");
}

/// The sampler's f64 sums of f32 terms (eight interleaved partial sums) agree with a
/// sequential sum to f64 rounding, for every remainder length.
#[test]
fn sum_f64_matches_a_sequential_sum() {
    let mut state = 12345u64;
    for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 1000, 151_936] {
        let xs: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect();
        let seq: f64 = xs.iter().map(|&x| x as f64).sum();
        let got = sum_f64(&xs);
        assert!(
            (got - seq).abs() <= 1e-13 * seq.max(1.0),
            "n {n}: {got} vs {seq}"
        );
    }
}
