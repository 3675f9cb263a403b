//! The CPU transformer against a deliberately naive f64 implementation written here with plain
//! loops: LLaMA with GQA, llama3 rope scaling and an untied head; Qwen2 with q/k/v biases and a
//! tied head; several sequences of different lengths packed in one batch.

mod common;

use common::*;
use genius_engine::backend::cpu::CpuBackend;
use genius_engine::model::safetensors::{Dtype, SafetensorsWeights};
use genius_engine::model::{HostTensor, ModelConfig, RopeScaling, TensorSource};
use genius_engine::transformer::{PackedBatch, Transformer};
use std::collections::HashMap;

/// Naive forward pass for one sequence: log-softmax over the vocabulary at every position.
fn naive_log_probs(
    c: &ModelConfig,
    w: &HashMap<String, HostTensor>,
    tokens: &[u32],
) -> Vec<Vec<f64>> {
    let get = |n: &str| -> Vec<f64> { w[n].data.iter().map(|&x| x as f64).collect() };
    let (h, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
    let t = tokens.len();
    let emb = get("model.embed_tokens.weight");
    let mut x: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&id| emb[id as usize * h..(id as usize + 1) * h].to_vec())
        .collect();
    let rms = |v: &[f64], g: &[f64]| -> Vec<f64> {
        let ms = v.iter().map(|a| a * a).sum::<f64>() / v.len() as f64;
        let s = 1.0 / (ms + c.rms_norm_eps as f64).sqrt();
        v.iter().zip(g).map(|(a, b)| a * s * b).collect()
    };
    // y = W v + b with W [out, in]
    let matvec = |wm: &[f64], v: &[f64], b: Option<&[f64]>| -> Vec<f64> {
        let n_in = v.len();
        let n_out = wm.len() / n_in;
        (0..n_out)
            .map(|o| {
                let s: f64 = (0..n_in).map(|i| wm[o * n_in + i] * v[i]).sum();
                s + b.map_or(0.0, |b| b[o])
            })
            .collect()
    };
    // Inverse frequencies, written out from the LLaMA-3 paper's definition.
    let inv_freq: Vec<f64> = (0..hd / 2)
        .map(|i| {
            let base = 1.0 / (c.rope_theta as f64).powf(2.0 * i as f64 / hd as f64);
            match &c.rope_scaling {
                None => base,
                Some(RopeScaling::FreqFactors(f)) => base / f[i] as f64,
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                }) => {
                    let wavelen = 2.0 * std::f64::consts::PI / base;
                    let old = *original_max_position_embeddings as f64;
                    let (lo, hi, f) = (
                        *low_freq_factor as f64,
                        *high_freq_factor as f64,
                        *factor as f64,
                    );
                    if wavelen < old / hi {
                        base
                    } else if wavelen > old / lo {
                        base / f
                    } else {
                        let s = (old / wavelen - lo) / (hi - lo);
                        (1.0 - s) * base / f + s * base
                    }
                }
            }
        })
        .collect();
    let rope = |v: &mut [f64], pos: usize| {
        for head in v.chunks_mut(hd) {
            let half = hd / 2;
            for i in 0..half {
                let a = pos as f64 * inv_freq[i];
                let (x1, x2) = (head[i], head[i + half]);
                head[i] = x1 * a.cos() - x2 * a.sin();
                head[i + half] = x2 * a.cos() + x1 * a.sin();
            }
        }
    };
    for l in 0..c.num_layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        let opt = |s: &str| {
            w.get(&p(s))
                .map(|t| t.data.iter().map(|&x| x as f64).collect::<Vec<_>>())
        };
        let (qb, kb, vb) = (
            opt("self_attn.q_proj.bias"),
            opt("self_attn.k_proj.bias"),
            opt("self_attn.v_proj.bias"),
        );
        let (wq, wk, wv, wo) = (
            get(&p("self_attn.q_proj.weight")),
            get(&p("self_attn.k_proj.weight")),
            get(&p("self_attn.v_proj.weight")),
            get(&p("self_attn.o_proj.weight")),
        );
        let g1 = get(&p("input_layernorm.weight"));
        let mut qs = vec![];
        let mut ks = vec![];
        let mut vs = vec![];
        for (pos, xi) in x.iter().enumerate() {
            let xn = rms(xi, &g1);
            let mut q = matvec(&wq, &xn, qb.as_deref());
            let mut k = matvec(&wk, &xn, kb.as_deref());
            rope(&mut q, pos);
            rope(&mut k, pos);
            qs.push(q);
            ks.push(k);
            vs.push(matvec(&wv, &xn, vb.as_deref()));
        }
        for i in 0..t {
            let mut attn = vec![0.0; nh * hd];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..hd)
                            .map(|d| qs[i][head * hd + d] * ks[j][kvh * hd + d])
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    let pj = (s - m).exp() / z;
                    for d in 0..hd {
                        attn[head * hd + d] += pj * vs[j][kvh * hd + d];
                    }
                }
            }
            let o = matvec(&wo, &attn, None);
            for d in 0..h {
                x[i][d] += o[d];
            }
        }
        let g2 = get(&p("post_attention_layernorm.weight"));
        let (wg, wu, wd) = (
            get(&p("mlp.gate_proj.weight")),
            get(&p("mlp.up_proj.weight")),
            get(&p("mlp.down_proj.weight")),
        );
        for xi in x.iter_mut() {
            let xn = rms(xi, &g2);
            let g = matvec(&wg, &xn, None);
            let u = matvec(&wu, &xn, None);
            let a: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = matvec(&wd, &a, None);
            for k in 0..h {
                xi[k] += d[k];
            }
        }
    }
    let gf = get("model.norm.weight");
    let head = if c.tie_word_embeddings {
        get("model.embed_tokens.weight")
    } else {
        get("lm_head.weight")
    };
    x.iter()
        .map(|xi| {
            let logits = matvec(&head, &rms(xi, &gf), None);
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + logits.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            logits.iter().map(|v| v - lse).collect()
        })
        .collect()
}

fn check_against_naive(config: ModelConfig, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(dir.path(), &config, seed, Dtype::F32);
    let source = SafetensorsWeights::open_dir(dir.path()).unwrap();
    let weights: HashMap<String, HostTensor> = source
        .tensor_names()
        .into_iter()
        .map(|n| {
            let t = source.load_f32(&n).unwrap();
            (n, t)
        })
        .collect();
    let model = Transformer::load(CpuBackend::new(), config.clone(), &source).unwrap();

    // Three sequences of different lengths (one longer than the CPU attention's query block).
    let mut rng = Rng::new(seed + 1);
    let seqs: Vec<Vec<u32>> = [5usize, 1, 77]
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| rng.below(config.vocab_size) as u32)
                .collect()
        })
        .collect();
    let batch = PackedBatch::from_sequences(&seqs);
    let hidden = model.forward_hidden(&batch).unwrap();

    let mut worst = 0f64;
    for (s, span) in seqs.iter().zip(&batch.seqs) {
        let reference = naive_log_probs(&config, &weights, s);
        // Every position's full distribution through logits_at ...
        let rows: Vec<usize> = (span.start..span.start + span.len).collect();
        let logits = model.logits_at(&hidden, &rows).unwrap();
        let v = config.vocab_size;
        for (i, row) in logits.data.chunks(v).enumerate() {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            for (a, b) in row.iter().zip(&reference[i]) {
                worst = worst.max((*a as f64 - lse - b).abs());
            }
        }
        // ... and the fused log-prob gather on next-token targets.
        if s.len() > 1 {
            let targets: Vec<u32> = s[1..].to_vec();
            let lp = model
                .target_logprobs(&hidden, &rows[..s.len() - 1], &targets)
                .unwrap();
            for (i, (&got, &t)) in lp.iter().zip(&targets).enumerate() {
                let want = reference[i][t as usize];
                assert!(
                    (got as f64 - want).abs() < 2e-4,
                    "seq pos {i}: {got} vs {want}"
                );
            }
        }
    }
    assert!(worst < 2e-4, "max |log-prob difference| {worst}");
}

#[test]
fn llama_gqa_rope_scaling_untied_matches_naive() {
    check_against_naive(tiny_llama_config(), 11);
}

#[test]
fn qwen2_bias_tied_matches_naive() {
    check_against_naive(tiny_qwen2_config(), 12);
}

#[test]
fn llama_no_gqa_tied_plain_rope_matches_naive() {
    let mut c = tiny_llama_config();
    c.num_kv_heads = c.num_heads;
    c.tie_word_embeddings = true;
    c.rope_scaling = None;
    check_against_naive(c, 13);
}

#[test]
fn gguf_style_rope_factors_match_naive() {
    let mut c = tiny_llama_config();
    c.rope_scaling = Some(RopeScaling::FreqFactors(vec![1.0, 2.0, 4.0, 8.0]));
    // written to config.json as no scaling: the loaded model gets the factors back below
    let dir = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(dir.path(), &c, 14, Dtype::F32);
    let source = SafetensorsWeights::open_dir(dir.path()).unwrap();
    let weights: HashMap<String, HostTensor> = source
        .tensor_names()
        .into_iter()
        .map(|n| (n.clone(), source.load_f32(&n).unwrap()))
        .collect();
    let model = Transformer::load(CpuBackend::new(), c.clone(), &source).unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 7 % 64) as u32).collect();
    let hidden = model
        .forward_hidden(&PackedBatch::from_sequences(&[&tokens]))
        .unwrap();
    let rows: Vec<usize> = (0..39).collect();
    let lp = model.target_logprobs(&hidden, &rows, &tokens[1..]).unwrap();
    let reference = naive_log_probs(&c, &weights, &tokens);
    for i in 0..39 {
        let want = reference[i][tokens[i + 1] as usize];
        assert!((lp[i] as f64 - want).abs() < 2e-4);
    }
}

#[test]
fn bf16_and_f16_checkpoints_load_as_rounded_values() {
    for dtype in [Dtype::BF16, Dtype::F16] {
        let dir = tempfile::tempdir().unwrap();
        let weights = write_tiny_checkpoint(dir.path(), &tiny_qwen2_config(), 5, dtype);
        let source = SafetensorsWeights::open_dir(dir.path()).unwrap();
        assert_eq!(
            source.dtype_counts().get(dtype.name()),
            Some(&weights.len())
        );
        for (name, t) in &weights {
            let got = source.load_f32(name).unwrap();
            assert_eq!(got.shape, t.shape);
            for (a, b) in got.data.iter().zip(&t.data) {
                let want = match dtype {
                    Dtype::BF16 => half::bf16::from_f32(*b).to_f32(),
                    _ => half::f16::from_f32(*b).to_f32(),
                };
                assert_eq!(*a, want, "{name}");
            }
        }
    }
}
