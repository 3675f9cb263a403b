//! The training backward pass on the CPU backend. Every backward op against an f64 reference
//! (central differences of a plain-loop f64 forward, or exact f64 sums); the whole model's
//! parameter gradients against central differences of its own forward, for samples of every
//! kind of parameter, on tiny LLaMA (untied, llama3 rope scaling, GQA 2), Qwen2 (q/k/v bias,
//! tied, GQA 3), an untied Qwen2 and a tied LLaMA without GQA; the training batch, gradient
//! accumulation, weight export/import and their errors. Plus a manual timing aid.

mod common;

use common::*;
use genius_engine::backend::cpu::{CpuBackend, LOGPROB_BACKWARD_CHUNK_ROWS};
use genius_engine::backend::{AttentionShape, Backend, SeqSpan};
use genius_engine::model::{Architecture, HostTensor, ModelConfig};
use genius_engine::transformer::{Gradients, PackedBatch, TrainBatch, Transformer};

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Compares an f32 analytic gradient with central differences (step 1e-5, in f64) of an f64
/// loss at the given indices. `loss` gets the perturbed copy of the input.
fn check_grad(
    what: &str,
    x: &[f32],
    analytic: &[f32],
    indices: impl IntoIterator<Item = usize>,
    loss: impl Fn(&[f64]) -> f64,
) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let scale = 1f64.max(analytic.iter().fold(0f64, |m, &g| m.max(g.abs() as f64)));
    let mut xs = f64s(x);
    let mut checked = 0;
    for i in indices {
        let h = 1e-5;
        let orig = xs[i];
        xs[i] = orig + h;
        let up = loss(&xs);
        xs[i] = orig - h;
        let down = loss(&xs);
        xs[i] = orig;
        let want = (up - down) / (2.0 * h);
        let got = analytic[i] as f64;
        assert!(
            (got - want).abs() <= 2e-5 * scale + 1e-4 * want.abs(),
            "{what}[{i}]: analytic {got}, finite difference {want} (gradient scale {scale})"
        );
        checked += 1;
    }
    assert!(checked > 0, "{what}: nothing checked");
}

/// Every index when small, else `count` random ones.
fn sample(len: usize, count: usize, rng: &mut Rng) -> Vec<usize> {
    if len <= count {
        (0..len).collect()
    } else {
        (0..count).map(|_| rng.below(len)).collect()
    }
}

fn tensor(rng: &mut Rng, shape: &[usize], scale: f32) -> HostTensor {
    rng.tensor(shape, scale)
}

// ---------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------

/// `dx = dy @ W` and `grad += dy^T x` on shapes with a partial last weight panel, against
/// exact f64 sums; the gradient accumulates onto what was there.
#[test]
fn linear_input_and_weight_gradients_match_f64() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(1);
    for &(n, out, inp) in &[
        (1, 1, 1),
        (5, 37, 19),
        (13, 70, 33),
        (40, 16, 129),
        (7, 300, 9),
    ] {
        let x = tensor(&mut rng, &[n, inp], 1.0);
        let dy = tensor(&mut rng, &[n, out], 1.0);
        let w = tensor(&mut rng, &[out, inp], 1.0);
        let packed = be.upload_linear(&w).unwrap();
        let dx = be.linear_backward_input(&dy, &packed).unwrap();
        assert_eq!(dx.shape, [n, inp]);
        let before = tensor(&mut rng, &[out, inp], 1.0);
        let mut grad = before.clone();
        be.accumulate_linear_grad(&mut grad, &x, &dy).unwrap();
        let bias_before = tensor(&mut rng, &[out], 1.0);
        let mut bias = bias_before.clone();
        be.accumulate_bias_grad(&mut bias, &dy).unwrap();
        for r in 0..n {
            for t in 0..inp {
                let want: f64 = (0..out)
                    .map(|j| dy.data[r * out + j] as f64 * w.data[j * inp + t] as f64)
                    .sum();
                let got = dx.data[r * inp + t] as f64;
                assert!(
                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "dx ({n},{out},{inp})"
                );
            }
        }
        for j in 0..out {
            for t in 0..inp {
                let want: f64 = before.data[j * inp + t] as f64
                    + (0..n)
                        .map(|r| dy.data[r * out + j] as f64 * x.data[r * inp + t] as f64)
                        .sum::<f64>();
                let got = grad.data[j * inp + t] as f64;
                assert!(
                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "dW ({n},{out},{inp})"
                );
            }
            let want: f64 = bias_before.data[j] as f64
                + (0..n).map(|r| dy.data[r * out + j] as f64).sum::<f64>();
            assert!(
                (bias.data[j] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                "db"
            );
        }
    }
}

fn rms_norm_f64(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let d = w.len();
    x.chunks(d)
        .flat_map(|row| {
            let r = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
            row.iter().zip(w).map(move |(v, g)| v * r * g)
        })
        .collect()
}

fn dot64(a: &[f64], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(a, &b)| a * b as f64).sum()
}

#[test]
fn rms_norm_backward_matches_f64_finite_differences() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(2);
    for &(n, d, eps) in &[(7usize, 37usize, 1e-5f32), (3, 16, 0.3), (20, 5, 1e-6)] {
        let mut x = tensor(&mut rng, &[n, d], 1.0);
        // Rows of very different scales.
        for (r, row) in x.data.chunks_mut(d).enumerate() {
            row.iter_mut().for_each(|v| *v *= [1.0, 10.0, 0.1][r % 3]);
        }
        let w = HostTensor::new(vec![d], (0..d).map(|_| 1.0 + 0.5 * rng.uniform()).collect());
        let dy = tensor(&mut rng, &[n, d], 1.0);
        let wg_before = tensor(&mut rng, &[d], 1.0);
        let mut wg = wg_before.clone();
        let dx = be.rms_norm_backward(&x, &w, eps, &dy, &mut wg).unwrap();
        let dw: Vec<f32> = wg
            .data
            .iter()
            .zip(&wg_before.data)
            .map(|(a, b)| a - b)
            .collect();
        let (xs, ws) = (f64s(&x.data), f64s(&w.data));
        let eps = eps as f64;
        check_grad("rms dx", &x.data, &dx.data, 0..n * d, |x| {
            dot64(&rms_norm_f64(x, &ws, eps), &dy.data)
        });
        check_grad("rms dw", &w.data, &dw, 0..d, |w| {
            dot64(&rms_norm_f64(&xs, w, eps), &dy.data)
        });
    }
}

#[test]
fn swiglu_backward_matches_f64_finite_differences() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(3);
    let (n, i) = (5, 13);
    let gate_up = tensor(&mut rng, &[n, 2 * i], 4.0);
    let dy = tensor(&mut rng, &[n, i], 1.0);
    let d = be.swiglu_backward(&gate_up, &dy).unwrap();
    assert_eq!(d.shape, [n, 2 * i]);
    check_grad("swiglu", &gate_up.data, &d.data, 0..n * 2 * i, |gu| {
        gu.chunks(2 * i)
            .zip(dy.data.chunks(i))
            .map(|(row, dy)| {
                (0..i)
                    .map(|j| {
                        let g = row[j];
                        g / (1.0 + (-g).exp()) * row[i + j] * dy[j] as f64
                    })
                    .sum::<f64>()
            })
            .sum()
    });
}

/// RoPE's backward is its adjoint (`<rope(x), y> = <x, rope_bwd(y)>`) and, the rotation being
/// orthogonal, its inverse.
#[test]
fn rope_backward_is_the_adjoint_and_the_inverse() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(4);
    let config = tiny_llama_config();
    let inv_freq = config.rope_inv_freq();
    let hd = config.head_dim;
    let positions = [0u32, 1, 5, 17, 300, 1000, 4095];
    let n = positions.len();
    let x = tensor(&mut rng, &[n, 3 * hd], 1.0);
    let y = tensor(&mut rng, &[n, 3 * hd], 1.0);
    let mut rx = x.clone();
    be.rope(&mut rx, &positions, hd, &inv_freq).unwrap();
    let mut ry = y.clone();
    be.rope_backward(&mut ry, &positions, hd, &inv_freq)
        .unwrap();
    let lhs: f64 = dot64(&f64s(&rx.data), &y.data);
    let rhs: f64 = dot64(&f64s(&x.data), &ry.data);
    assert!(
        (lhs - rhs).abs() < 1e-4,
        "<rope x, y> {lhs} vs <x, rope_bwd y> {rhs}"
    );
    assert_ne!(ry.data, y.data, "rope_backward changed nothing");
    be.rope_backward(&mut rx, &positions, hd, &inv_freq)
        .unwrap();
    for (a, b) in rx.data.iter().zip(&x.data) {
        assert!(
            (a - b).abs() < 1e-5,
            "rope_backward(rope(x)) != x: {a} vs {b}"
        );
    }
}

#[test]
fn concat_columns_inverts_split_columns_and_scatter_inverts_gather() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(5);
    let x = tensor(&mut rng, &[6, 11], 1.0);
    let parts = be.split_columns(&x, &[4, 2, 5]).unwrap();
    let refs: Vec<&HostTensor> = parts.iter().collect();
    assert_eq!(be.concat_columns(&refs).unwrap(), x);
    assert!(be.concat_columns(&[&parts[0], &x.clone()]).is_ok());
    let short = tensor(&mut rng, &[5, 3], 1.0);
    assert!(be.concat_columns(&[&parts[0], &short]).is_err());

    // scatter_add_rows is gather_rows' adjoint: <gather(x), y> = <x, scatter(y)>.
    let rows = [4usize, 0, 4, 2];
    let g = be.gather_rows(&x, &rows).unwrap();
    let y = tensor(&mut rng, &[4, 11], 1.0);
    let mut s = be.zeros(&[6, 11]).unwrap();
    be.scatter_add_rows(&mut s, &rows, &y).unwrap();
    let lhs = dot64(&f64s(&g.data), &y.data);
    let rhs = dot64(&f64s(&x.data), &s.data);
    assert!((lhs - rhs).abs() < 1e-4, "{lhs} vs {rhs}");
    assert!(be.scatter_add_rows(&mut s, &[6, 0, 0, 0], &y).is_err());
}

#[test]
fn embedding_backward_adds_repeated_ids() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(6);
    let before = tensor(&mut rng, &[5, 7], 1.0);
    let ids = [3u32, 1, 3, 0, 3];
    let dy = tensor(&mut rng, &[5, 7], 1.0);
    let mut grad = before.clone();
    be.embedding_backward(&mut grad, &ids, &dy).unwrap();
    for v in 0..5 {
        for c in 0..7 {
            let want: f64 = before.data[v * 7 + c] as f64
                + ids
                    .iter()
                    .enumerate()
                    .filter(|(_, id)| **id as usize == v)
                    .map(|(i, _)| dy.data[i * 7 + c] as f64)
                    .sum::<f64>();
            assert!((grad.data[v * 7 + c] as f64 - want).abs() < 1e-5);
        }
    }
    assert!(
        be.embedding_backward(&mut grad, &[5, 0, 0, 0, 0], &dy)
            .is_err()
    );
    assert!(be.embedding_backward(&mut grad, &[0, 0], &dy).is_err());
}

/// Causal GQA attention over a packed batch, f64, plain loops: `[tokens, heads * hd]`.
fn attention_f64(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    seqs: &[SeqSpan],
    shape: AttentionShape,
) -> Vec<f64> {
    let AttentionShape {
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: hd,
    } = shape;
    let (qw, kw) = (nh * hd, nkv * hd);
    let n = q.len() / qw;
    let mut out = vec![0.0; n * qw];
    for s in seqs {
        for i in 0..s.len {
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let qi = &q[(s.start + i) * qw + h * hd..][..hd];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let kj = &k[(s.start + j) * kw + kvh * hd..][..hd];
                        qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|x| (x - m).exp()).sum();
                for (j, sc) in scores.iter().enumerate() {
                    let p = (sc - m).exp() / z;
                    for d in 0..hd {
                        out[(s.start + i) * qw + h * hd + d] +=
                            p * v[(s.start + j) * kw + kvh * hd + d];
                    }
                }
            }
        }
    }
    out
}

/// Query heads per kv head 1, 2 and 3; three sequences of odd lengths (one longer than the
/// CPU attention's 64-query block, one of a single token) and a row that belongs to none.
#[test]
fn causal_attention_backward_matches_f64_finite_differences() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(7);
    let lens = [5usize, 1, 70];
    let mut seqs = Vec::new();
    let mut at = 0;
    for &l in &lens {
        seqs.push(SeqSpan { start: at, len: l });
        at += l;
    }
    let n = at + 1; // the last row is in no sequence
    for (nh, nkv) in [(3usize, 3usize), (4, 2), (6, 2)] {
        let shape = AttentionShape {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: 8,
        };
        let (qw, kw) = (nh * 8, nkv * 8);
        let q = tensor(&mut rng, &[n, qw], 1.5);
        let k = tensor(&mut rng, &[n, kw], 1.5);
        let v = tensor(&mut rng, &[n, kw], 1.0);
        let dout = tensor(&mut rng, &[n, qw], 1.0);
        let (dq, dk, dv) = be
            .causal_attention_backward(&q, &k, &v, &dout, &seqs, shape)
            .unwrap();
        let (q64, k64, v64) = (f64s(&q.data), f64s(&k.data), f64s(&v.data));
        let loss = |q: &[f64], k: &[f64], v: &[f64]| {
            dot64(&attention_f64(q, k, v, &seqs, shape), &dout.data)
        };
        let what = format!("GQA {nh}/{nkv}");
        // Every row of the short sequences, random rows of the long one, the stray row.
        let mut pick = |w: usize| -> Vec<usize> {
            let mut idx: Vec<usize> = (0..6 * w).collect();
            idx.extend(
                sample((n - 6) * w, 120, &mut rng)
                    .into_iter()
                    .map(|i| i + 6 * w),
            );
            idx.extend((n - 1) * w..n * w);
            idx
        };
        check_grad(&format!("{what} dq"), &q.data, &dq.data, pick(qw), |x| {
            loss(x, &k64, &v64)
        });
        check_grad(&format!("{what} dk"), &k.data, &dk.data, pick(kw), |x| {
            loss(&q64, x, &v64)
        });
        check_grad(&format!("{what} dv"), &v.data, &dv.data, pick(kw), |x| {
            loss(&q64, &k64, x)
        });
    }
}

/// The fused LM-head backward over more rows than one chunk, a vocabulary that is not a
/// multiple of the weight panel, `lm_head_grad` accumulating onto what was there.
#[test]
fn target_logprobs_backward_matches_f64_finite_differences() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(8);
    let (n, vocab, d) = (LOGPROB_BACKWARD_CHUNK_ROWS + 3, 37, 20);
    let hidden = tensor(&mut rng, &[n, d], 1.0);
    let w = tensor(&mut rng, &[vocab, d], 1.0);
    let targets: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
    let g: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
    let packed = be.upload_linear(&w).unwrap();
    let before = tensor(&mut rng, &[vocab, d], 1.0);
    let mut wg = before.clone();
    let dh = be
        .target_logprobs_backward(&hidden, &packed, &targets, &g, None, &mut wg)
        .unwrap();
    let dw: Vec<f32> = wg
        .data
        .iter()
        .zip(&before.data)
        .map(|(a, b)| a - b)
        .collect();
    let loss = |h: &[f64], w: &[f64]| -> f64 {
        (0..n)
            .map(|r| {
                let logits: Vec<f64> = (0..vocab)
                    .map(|v| (0..d).map(|c| h[r * d + c] * w[v * d + c]).sum())
                    .collect();
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
                g[r] as f64 * (logits[targets[r] as usize] - lse)
            })
            .sum()
    };
    let (h64, w64) = (f64s(&hidden.data), f64s(&w.data));
    check_grad("d_hidden", &hidden.data, &dh.data, 0..n * d, |h| {
        loss(h, &w64)
    });
    check_grad("d_lm_head", &w.data, &dw, 0..vocab * d, |w| loss(&h64, w));
    // The forward it differentiates is the backend's own.
    let lp = be.target_logprobs(&hidden, &packed, &targets).unwrap();
    let total: f64 = lp.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum();
    assert!((total - loss(&h64, &w64)).abs() < 1e-3);
}

/// Shapes that do not fit are errors, not panics.
#[test]
fn backward_ops_reject_bad_shapes() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(9);
    let w = be.upload_linear(&tensor(&mut rng, &[5, 4], 1.0)).unwrap();
    let x = tensor(&mut rng, &[3, 4], 1.0);
    let dy = tensor(&mut rng, &[3, 5], 1.0);
    assert!(be.linear_backward_input(&x, &w).is_err());
    let mut grad = be.zeros(&[5, 3]).unwrap();
    assert!(be.accumulate_linear_grad(&mut grad, &x, &dy).is_err());
    let mut grad = be.zeros(&[5, 4]).unwrap();
    assert!(be.accumulate_linear_grad(&mut grad, &x, &x).is_err());
    assert!(
        be.accumulate_bias_grad(&mut be.zeros(&[4]).unwrap(), &dy)
            .is_err()
    );
    let norm = be.zeros(&[4]).unwrap();
    assert!(
        be.rms_norm_backward(&x, &norm, 1e-5, &dy, &mut be.zeros(&[4]).unwrap())
            .is_err()
    );
    assert!(
        be.rms_norm_backward(&x, &norm, 1e-5, &x, &mut be.zeros(&[5]).unwrap())
            .is_err()
    );
    assert!(be.swiglu_backward(&x, &x).is_err());
    let mut odd = tensor(&mut rng, &[3, 5], 1.0);
    assert!(
        be.rope_backward(&mut odd, &[0, 1, 2], 4, &[1.0, 0.5])
            .is_err()
    );
    assert!(
        be.rope_backward(&mut x.clone(), &[0, 1], 4, &[1.0, 0.5])
            .is_err()
    );
    let shape = AttentionShape {
        num_heads: 1,
        num_kv_heads: 1,
        head_dim: 4,
    };
    let seqs = [SeqSpan { start: 0, len: 3 }];
    assert!(
        be.causal_attention_backward(&x, &x, &x, &dy, &seqs, shape)
            .is_err()
    );
    let past = [SeqSpan { start: 1, len: 3 }];
    assert!(
        be.causal_attention_backward(&x, &x, &x, &x, &past, shape)
            .is_err()
    );
    let mut head_grad = be.zeros(&[5, 4]).unwrap();
    let g = [1.0f32; 3];
    assert!(
        be.target_logprobs_backward(&x, &w, &[0, 1, 5], &g, None, &mut head_grad)
            .is_err()
    );
    assert!(
        be.target_logprobs_backward(&x, &w, &[0, 1], &g, None, &mut head_grad)
            .is_err()
    );
    assert!(
        be.target_logprobs_backward(
            &x,
            &w,
            &[0, 1, 2],
            &g,
            None,
            &mut be.zeros(&[4, 4]).unwrap()
        )
        .is_err()
    );
    assert!(be.zeros(&[usize::MAX, 2]).is_err());
}

// ---------------------------------------------------------------------------------------
// Whole model
// ---------------------------------------------------------------------------------------

/// Three sequences (one longer than the attention's query block, one of a single token),
/// about two thirds of the tokens scored.
fn training_batch(config: &ModelConfig, rng: &mut Rng) -> TrainBatch {
    let seqs: Vec<Vec<u32>> = [9usize, 1, 70]
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| rng.below(config.vocab_size) as u32)
                .collect()
        })
        .collect();
    let masks: Vec<Vec<bool>> = seqs
        .iter()
        .map(|s| (0..s.len()).map(|j| j > 0 && rng.below(3) > 0).collect())
        .collect();
    TrainBatch::next_token(&seqs, &masks).unwrap()
}

/// `sum_i c_i log p_i` of the model's scored rows, in f64.
fn objective(model: &Transformer<CpuBackend>, batch: &TrainBatch, c: &[f32]) -> f64 {
    let (lp, _) = model.forward_train(batch).unwrap();
    lp.iter().zip(c).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// Row ranges of a fused parameter's parts (q/k/v, gate/up), or the whole.
fn sections(config: &ModelConfig, name: &str, rows: usize) -> Vec<(usize, usize)> {
    let (q, kv, ffn) = (
        config.num_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
        config.intermediate_size,
    );
    if name.contains("qkv_proj") {
        vec![(0, q), (q, q + kv), (q + kv, q + 2 * kv)]
    } else if name.contains("gate_up_proj") {
        vec![(0, ffn), (ffn, 2 * ffn)]
    } else {
        vec![(0, rows)]
    }
}

/// The gradient of `sum_i c_i log p_i` from backward against central differences of the f32
/// forward, for samples of every parameter tensor: the entry with the largest gradient and
/// random entries of every fused part (embedding: rows of tokens in the batch, and other
/// rows). f32 forwards make the differences noisy, hence the step and tolerances.
fn check_model_gradients(config: ModelConfig, seed: u64) {
    let mut model = random_cpu_model(&config, seed);
    let mut rng = Rng::new(seed + 100);
    let batch = training_batch(&config, &mut rng);
    let c: Vec<f32> = (0..batch.rows.len()).map(|_| rng.uniform()).collect();
    let (_, acts) = model.forward_train(&batch).unwrap();
    assert_eq!(acts.scored_rows(), c.len());
    let mut grads = Gradients::zeros(&model).unwrap();
    model.backward(&acts, &c, &mut grads).unwrap();
    let grads: Vec<(String, HostTensor)> = grads
        .iter()
        .into_iter()
        .map(|(n, g)| (n, g.clone()))
        .collect();
    assert_eq!(
        grads.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        model.parameter_names()
    );
    let kinds = [
        "model.embed_tokens.weight",
        "input_layernorm.weight",
        "self_attn.qkv_proj.weight",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_up_proj.weight",
        "mlp.down_proj.weight",
        "model.norm.weight",
    ];
    for kind in kinds {
        assert!(grads.iter().any(|(n, _)| n.ends_with(kind)), "no {kind}");
    }
    assert_eq!(
        grads.iter().any(|(n, _)| n == "lm_head.weight"),
        !config.tie_word_embeddings
    );
    assert_eq!(
        grads.iter().any(|(n, _)| n.ends_with("qkv_proj.bias")),
        config.attention_bias
    );

    let h = 1e-2f32;
    let mut worst = 0f64;
    for (name, g) in &grads {
        let w = model.weight(name).unwrap();
        assert_eq!(w.shape, g.shape, "{name}");
        let cols = if w.shape.len() == 2 { w.shape[1] } else { 1 };
        let rows = w.numel() / cols;
        let mut idx = vec![
            g.data
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap()
                .0,
        ];
        if name == "model.embed_tokens.weight" {
            for _ in 0..4 {
                let tok = batch.batch.tokens[rng.below(batch.batch.tokens.len())] as usize;
                idx.push(tok * cols + rng.below(cols));
            }
            idx.push(rng.below(w.numel()));
        } else {
            for (r0, r1) in sections(&config, name, rows) {
                for _ in 0..3 {
                    idx.push((r0 + rng.below(r1 - r0)) * cols + rng.below(cols));
                }
            }
        }
        let gmax = g.data.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
        assert!(gmax > 1e-3, "{name}: gradient is all but zero ({gmax})");
        for i in idx {
            let mut p = w.clone();
            p.data[i] = w.data[i] + h;
            model.set_weight(name, &p).unwrap();
            let up = objective(&model, &batch, &c);
            p.data[i] = w.data[i] - h;
            model.set_weight(name, &p).unwrap();
            let down = objective(&model, &batch, &c);
            model.set_weight(name, &w).unwrap();
            let fd = (up - down) / (2.0 * h as f64);
            let got = g.data[i] as f64;
            let err = (got - fd).abs() / (2e-3 * gmax.max(1.0) + 1e-2 * fd.abs());
            worst = worst.max(err);
            assert!(
                err <= 1.0,
                "{name}[{i}]: backward {got}, finite difference {fd} (max |grad| {gmax})"
            );
        }
    }
    eprintln!("worst error / tolerance: {worst:.3}");
}

#[test]
fn llama_untied_llama3_rope_gradients_match_finite_differences() {
    check_model_gradients(tiny_llama_config(), 21);
}

#[test]
fn qwen2_bias_tied_gradients_match_finite_differences() {
    check_model_gradients(tiny_qwen2_config(), 22);
}

#[test]
fn qwen2_bias_untied_gradients_match_finite_differences() {
    let mut c = tiny_qwen2_config();
    c.tie_word_embeddings = false;
    check_model_gradients(c, 23);
}

#[test]
fn llama_tied_no_gqa_gradients_match_finite_differences() {
    let mut c = tiny_llama_config();
    c.num_kv_heads = c.num_heads;
    c.tie_word_embeddings = true;
    c.rope_scaling = None;
    check_model_gradients(c, 24);
}

/// The training forward's log-probs are the inference path's, bit for bit, and come back in
/// the order of `rows` with per-sequence ranges.
#[test]
fn forward_train_logprobs_equal_inference() {
    let config = tiny_qwen2_config();
    let model = random_cpu_model(&config, 31);
    let mut rng = Rng::new(32);
    let batch = training_batch(&config, &mut rng);
    let (lp, _) = model.forward_train(&batch).unwrap();
    let hidden = model.forward_hidden(&batch.batch).unwrap();
    let want = model
        .target_logprobs(&hidden, &batch.rows, &batch.targets)
        .unwrap();
    assert_eq!(lp, want);
    assert_eq!(batch.seq_rows.len(), 3);
    assert_eq!(
        batch.seq_rows[1],
        batch.seq_rows[0].end..batch.seq_rows[0].end
    );
    assert_eq!(batch.seq_rows[2].end, lp.len());
    for (s, range) in batch.seq_rows.iter().enumerate() {
        let span = batch.batch.seqs[s];
        for i in range.clone() {
            let r = batch.rows[i];
            assert!(r >= span.start && r + 1 < span.start + span.len);
            assert_eq!(batch.targets[i], batch.batch.tokens[r + 1]);
        }
    }
}

#[test]
fn train_batch_and_backward_reject_bad_input() {
    let config = tiny_llama_config();
    let model = random_cpu_model(&config, 33);
    assert!(TrainBatch::next_token(&[vec![1u32, 2]], &[vec![true, true]]).is_err());
    assert!(TrainBatch::next_token(&[vec![1u32, 2]], &[vec![false]]).is_err());
    assert!(TrainBatch::next_token(&[vec![1u32, 2]], &Vec::<Vec<bool>>::new()).is_err());
    let mut batch =
        TrainBatch::next_token(&[vec![1u32, 2, 3]], &[vec![false, true, true]]).unwrap();
    assert_eq!(
        (batch.rows.clone(), batch.targets.clone()),
        (vec![0, 1], vec![2, 3])
    );
    let (_, acts) = model.forward_train(&batch).unwrap();
    let mut grads = Gradients::zeros(&model).unwrap();
    assert!(model.backward(&acts, &[1.0], &mut grads).is_err());
    let other = random_cpu_model(&tiny_qwen2_config(), 34);
    let mut wrong = Gradients::zeros(&other).unwrap();
    assert!(model.backward(&acts, &[1.0, 1.0], &mut wrong).is_err());
    let (_, other_acts) = other.forward_train(&batch).unwrap();
    assert!(
        model
            .backward(&other_acts, &[1.0, 1.0], &mut grads)
            .is_err()
    );
    model.backward(&acts, &[1.0, 1.0], &mut grads).unwrap();
    batch.rows[1] = 3;
    assert!(model.forward_train(&batch).is_err());
    batch.rows[1] = 1;
    batch.targets[1] = config.vocab_size as u32;
    assert!(model.forward_train(&batch).is_err());
}

/// Backward adds to the gradients (two calls give twice one call), `zero` clears them, and
/// `scale` / `sum_squares` see every tensor.
#[test]
fn backward_accumulates_and_zero_clears() {
    let config = tiny_llama_config();
    let model = random_cpu_model(&config, 35);
    let be = &model.backend;
    let mut rng = Rng::new(36);
    let batch = training_batch(&config, &mut rng);
    let c: Vec<f32> = (0..batch.rows.len()).map(|_| rng.uniform()).collect();
    let (_, acts) = model.forward_train(&batch).unwrap();
    let mut once = Gradients::zeros(&model).unwrap();
    model.backward(&acts, &c, &mut once).unwrap();
    let mut twice = Gradients::zeros(&model).unwrap();
    model.backward(&acts, &c, &mut twice).unwrap();
    model.backward(&acts, &c, &mut twice).unwrap();
    let norm1 = once.sum_squares(be).unwrap();
    assert!(norm1 > 0.0);
    for ((n, a), (_, b)) in once.iter().into_iter().zip(twice.iter()) {
        for (x, y) in a.data.iter().zip(&b.data) {
            assert!(
                (2.0 * x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "{n}: {x} x 2 vs {y}"
            );
        }
    }
    twice.scale(be, 0.5).unwrap();
    assert!((twice.sum_squares(be).unwrap() - norm1).abs() < 1e-3 * norm1);
    twice.zero(be).unwrap();
    assert_eq!(twice.sum_squares(be).unwrap(), 0.0);
    assert!(
        twice
            .iter()
            .into_iter()
            .all(|(_, g)| g.data.iter().all(|&v| v == 0.0))
    );
}

// ---------------------------------------------------------------------------------------
// Weights by name
// ---------------------------------------------------------------------------------------

fn all_logits(model: &Transformer<CpuBackend>, batch: &PackedBatch) -> HostTensor {
    let hidden = model.forward_hidden(batch).unwrap();
    let rows: Vec<usize> = (0..batch.tokens.len()).collect();
    model.logits_at(&hidden, &rows).unwrap()
}

/// export -> import onto a differently initialised model gives identical logits; the export
/// is the checkpoint's tensors, names and values.
#[test]
fn export_import_round_trip_keeps_logits() {
    for (config, tied) in [(tiny_llama_config(), false), (tiny_qwen2_config(), true)] {
        assert_eq!(config.tie_word_embeddings, tied);
        let original = random_weights(&config, 41);
        let a = random_cpu_model(&config, 41);
        let exported = a.export_weights().unwrap();
        let mut sorted_a = exported.clone();
        let mut sorted_b = original.clone();
        sorted_a.sort_by(|x, y| x.0.cmp(&y.0));
        sorted_b.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            sorted_a, sorted_b,
            "export differs from the loaded checkpoint"
        );
        let mut b = random_cpu_model(&config, 42);
        let batch = PackedBatch::from_sequences(&[vec![1u32, 5, 9, 3], vec![7, 2]]);
        assert_ne!(all_logits(&a, &batch), all_logits(&b, &batch));
        b.import_weights(&exported).unwrap();
        assert_eq!(all_logits(&a, &batch), all_logits(&b, &batch));
    }
}

#[test]
fn import_and_set_weight_report_bad_names_and_shapes() {
    let config = tiny_qwen2_config();
    let mut model = random_cpu_model(&config, 43);
    let good = model.export_weights().unwrap();
    let batch = PackedBatch::from_sequences(&[vec![1u32, 5, 9, 3]]);
    let before = all_logits(&model, &batch);

    let mut missing = good.clone();
    missing.retain(|(n, _)| n != "model.layers.1.self_attn.k_proj.bias");
    let err = model.import_weights(&missing).unwrap_err().to_string();
    assert!(
        err.contains("model.layers.1.self_attn.k_proj.bias"),
        "{err}"
    );

    let mut unknown = good.clone();
    unknown.push((
        "lm_head.weight".into(),
        HostTensor::new(vec![64, 48], vec![0.0; 64 * 48]),
    ));
    let err = model.import_weights(&unknown).unwrap_err().to_string();
    assert!(err.contains("lm_head.weight"), "{err}");

    let mut bad_shape = good.clone();
    let (_, t) = bad_shape
        .iter_mut()
        .find(|(n, _)| n == "model.layers.0.mlp.up_proj.weight")
        .unwrap();
    *t = HostTensor::new(vec![48, 40], vec![0.0; 48 * 40]);
    let err = format!("{:#}", model.import_weights(&bad_shape).unwrap_err());
    assert!(err.contains("up_proj") && err.contains("[48, 40]"), "{err}");

    let mut twice = good.clone();
    twice.push(good[0].clone());
    assert!(model.import_weights(&twice).is_err());
    assert_eq!(
        all_logits(&model, &batch),
        before,
        "a failed import changed the model"
    );

    // One parameter at a time, fused names.
    let qkv = "model.layers.0.self_attn.qkv_proj.weight";
    let w = model.weight(qkv).unwrap();
    assert_eq!(w.shape, [6 * 8 + 2 * 2 * 8, 48]);
    assert!(
        model
            .set_weight(qkv, &HostTensor::new(vec![2], vec![0.0; 2]))
            .is_err()
    );
    assert!(
        model
            .set_weight("model.layers.0.self_attn.q_proj.weight", &w)
            .is_err()
    );
    assert!(model.weight("lm_head.weight").is_err());
    let emb = model.weight("model.embed_tokens.weight").unwrap();
    assert!(model.set_weight("lm_head.weight", &emb).is_err());
    // Setting a tied embedding moves the LM head with it.
    let zero = HostTensor::new(emb.shape.clone(), vec![0.0; emb.numel()]);
    model
        .set_weight("model.embed_tokens.weight", &zero)
        .unwrap();
    let hidden = model.forward_hidden(&batch).unwrap();
    let logits = model.logits_at(&hidden, &[0, 1]).unwrap();
    assert!(logits.data.iter().all(|&v| v == 0.0));
    model.set_weight("model.embed_tokens.weight", &emb).unwrap();
    assert_eq!(all_logits(&model, &batch), before);
}

// ---------------------------------------------------------------------------------------
// Timing
// ---------------------------------------------------------------------------------------

/// Manual timing aid: forward + backward tokens/s on a random model of the default model's
/// shape (SmolLM2-135M: hidden 576, 30 layers, FFN 1536, 9 heads / 3 kv heads, vocab 49152,
/// tied) for two 300-token sequences, every next token scored.
/// `cargo test --release --test backward train_step_timing -- --ignored --nocapture`
#[test]
#[ignore]
fn train_step_timing() {
    let config = ModelConfig {
        arch: Architecture::Llama,
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: 30,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 100000.0,
        rope_scaling: None,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        attention_bias: false,
    };
    let t = std::time::Instant::now();
    let model = random_cpu_model(&config, 1);
    eprintln!("model built in {:.1} s", t.elapsed().as_secs_f64());
    let mut rng = Rng::new(2);
    let seqs: Vec<Vec<u32>> = (0..2)
        .map(|_| {
            (0..300)
                .map(|_| rng.below(config.vocab_size) as u32)
                .collect()
        })
        .collect();
    let masks: Vec<Vec<bool>> = seqs
        .iter()
        .map(|s| (0..s.len()).map(|j| j > 0).collect())
        .collect();
    let batch = TrainBatch::next_token(&seqs, &masks).unwrap();
    let tokens = batch.batch.tokens.len() as f64;
    let mut grads = Gradients::zeros(&model).unwrap();
    let g: Vec<f32> = vec![-1.0 / batch.rows.len() as f32; batch.rows.len()];
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mut inference, mut forward, mut backward, mut step) = (vec![], vec![], vec![], vec![]);
    for iter in 0..5 {
        // The inference path on the same rows, for scale.
        let t = std::time::Instant::now();
        let hidden = model.forward_hidden(&batch.batch).unwrap();
        model
            .target_logprobs(&hidden, &batch.rows, &batch.targets)
            .unwrap();
        inference.push(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        let (_, acts) = model.forward_train(&batch).unwrap();
        let fwd = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        model.backward(&acts, &g, &mut grads).unwrap();
        let bwd = t.elapsed().as_secs_f64();
        eprintln!(
            "iter {iter}: inference forward {:.2} s; training forward {fwd:.2} s, backward \
             {bwd:.2} s: {:.0} tokens/s",
            inference[iter],
            tokens / (fwd + bwd),
        );
        forward.push(fwd);
        backward.push(bwd);
        step.push(fwd + bwd);
    }
    eprintln!(
        "median of 5 ({} threads, {tokens} tokens): inference forward {:.2} s, training \
         forward {:.2} s, backward {:.2} s, forward+backward {:.0} tokens/s",
        rayon::current_num_threads(),
        median(inference),
        median(forward),
        median(backward),
        tokens / median(step)
    );
}

/// Per-layer recompute runs the same ops as the saving forward, so the log-probs and every
/// gradient are bit-identical, on a tied Qwen2 (biases) and an untied LLaMA.
#[test]
fn recompute_gives_the_same_gradients_bit_for_bit() {
    let mut untied = tiny_llama_config();
    untied.tie_word_embeddings = false;
    for (config, seed) in [(tiny_qwen2_config(), 41), (untied, 42)] {
        let model = random_cpu_model(&config, seed);
        let mut rng = Rng::new(seed + 1);
        let batch = training_batch(&config, &mut rng);
        let c: Vec<f32> = (0..batch.rows.len()).map(|_| rng.uniform() - 0.5).collect();
        let mut results = Vec::new();
        for recompute in [false, true] {
            let (lp, acts) = model.forward_train_with(&batch, recompute).unwrap();
            let mut grads = Gradients::zeros(&model).unwrap();
            model.backward(&acts, &c, &mut grads).unwrap();
            let g: Vec<(String, Vec<f32>)> = grads
                .iter()
                .into_iter()
                .map(|(n, g)| (n, g.data.clone()))
                .collect();
            results.push((lp, g));
        }
        assert_eq!(results[0].0, results[1].0, "log-probs differ");
        for ((n, a), (_, b)) in results[0].1.iter().zip(&results[1].1) {
            assert!(a.iter().any(|&x| x != 0.0), "{n}: zero gradient");
            assert_eq!(a, b, "{n}: gradients differ with recompute");
        }
    }
}
