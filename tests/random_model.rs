//! `--model random:PRESET[@SEED]`: preset shapes, deterministic lazily generated weights, the
//! word tokenizer, loading into the transformer, the engine on a random model, and errors.

mod common;

use common::*;
use genius_engine::backend::cpu::CpuBackend;
use genius_engine::engine::sampler::SamplingParams;
use genius_engine::engine::{Engine, EngineConfig, FinishReason, Request, StopRules};
use genius_engine::model::random::{PRESETS, RandomWeights, preset_config, preset_names};
use genius_engine::model::{
    Architecture, LoadedModel, ModelConfig, ModelFormat, RopeScaling, TensorSource, load_model,
};
use genius_engine::transformer::params::hf_tensor_names;
use genius_engine::transformer::{PackedBatch, Transformer};
use std::process::Command;

const TINY: [&str; 3] = ["llama-tiny", "qwen2-tiny", "qwen2-tiny-gqa7"];

fn load(spec: &str) -> LoadedModel {
    load_model(Some(spec)).unwrap()
}

fn load_err(spec: &str) -> String {
    match load_model(Some(spec)) {
        Ok(m) => panic!("{spec} loaded as {}", m.name),
        Err(e) => format!("{e:#}"),
    }
}

fn transformer(m: &LoadedModel) -> Transformer<CpuBackend> {
    Transformer::load(CpuBackend::new(), m.config.clone(), m.weights.as_ref()).unwrap()
}

#[test]
fn presets_have_the_real_shapes() {
    let qwen05 = preset_config("qwen2.5-0.5b").unwrap();
    assert_eq!(
        qwen05,
        ModelConfig {
            arch: Architecture::Qwen2,
            vocab_size: 151936,
            hidden_size: 896,
            intermediate_size: 4864,
            num_layers: 24,
            num_heads: 14,
            num_kv_heads: 2,
            head_dim: 64,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            rope_scaling: None,
            max_position_embeddings: 32768,
            tie_word_embeddings: true,
            attention_bias: true,
        }
    );
    assert_eq!(
        preset_config("qwen2.5-1.5b").unwrap(),
        ModelConfig {
            hidden_size: 1536,
            intermediate_size: 8960,
            num_layers: 28,
            num_heads: 12,
            head_dim: 128,
            ..qwen05.clone()
        }
    );
    assert_eq!(
        preset_config("llama3.2-1b").unwrap(),
        ModelConfig {
            arch: Architecture::Llama,
            vocab_size: 128256,
            hidden_size: 2048,
            intermediate_size: 8192,
            num_layers: 16,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: Some(RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }),
            max_position_embeddings: 131072,
            tie_word_embeddings: true,
            attention_bias: false,
        }
    );
    for (preset, mut tiny) in [
        ("llama-tiny", tiny_llama_config()),
        ("qwen2-tiny", tiny_qwen2_config()),
    ] {
        tiny.vocab_size = 256;
        assert_eq!(preset_config(preset).unwrap(), tiny, "{preset}");
    }
    let gqa7 = preset_config("qwen2-tiny-gqa7").unwrap();
    assert_eq!(gqa7.arch, Architecture::Qwen2);
    assert_eq!(gqa7.num_heads / gqa7.num_kv_heads, 7);
    assert!(gqa7.attention_bias && gqa7.tie_word_embeddings);
    assert_eq!((gqa7.vocab_size, gqa7.num_layers), (256, 2));
    // Published parameter counts.
    assert_eq!(qwen05.num_parameters(), 494_032_768);
    // Qwen2.5-3B: hidden 2048, FFN 11008, 36 layers, 16 heads / 2 KV heads of 128 (3.09B).
    assert_eq!(
        preset_config("qwen2.5-3b").unwrap(),
        ModelConfig {
            hidden_size: 2048,
            intermediate_size: 11008,
            num_layers: 36,
            num_heads: 16,
            head_dim: 128,
            ..qwen05.clone()
        }
    );
    assert_eq!(
        preset_config("qwen2.5-3b").unwrap().num_parameters(),
        3_085_938_688
    );
    assert_eq!(
        preset_config("llama3.2-1b").unwrap().num_parameters(),
        1_235_814_400
    );
    assert_eq!(
        preset_names(),
        PRESETS.iter().map(|(n, _)| *n).collect::<Vec<_>>()
    );
    assert!(preset_config("qwen2.5-7b").is_none());
}

#[test]
fn every_preset_names_exactly_the_tensors_the_transformer_reads() {
    for preset in preset_names() {
        let config = preset_config(preset).unwrap();
        let w = RandomWeights::new(config.clone(), 0);
        let names = w.tensor_names();
        assert_eq!(names, hf_tensor_names(&config), "{preset}");
        let total: usize = names
            .iter()
            .map(|n| w.shape(n).unwrap().iter().product::<usize>())
            .sum();
        assert_eq!(total, config.num_parameters(), "{preset}");
        assert_eq!(
            w.dtype_counts(),
            [("RANDOM-F32".to_string(), names.len())].into(),
            "{preset}"
        );
        assert!(w.shape("model.layers.0.mlp.nothing.weight").is_none());
        let err = format!("{:#}", w.load_f32("nothing").unwrap_err());
        assert!(err.contains("'nothing'"), "{err}");
    }
}

#[test]
fn qwen2_5_0_5b_shapes_and_one_layer_tensor() {
    let w = RandomWeights::new(preset_config("qwen2.5-0.5b").unwrap(), 0);
    for (name, shape) in [
        ("model.embed_tokens.weight", vec![151936, 896]),
        ("model.layers.0.self_attn.q_proj.weight", vec![896, 896]),
        ("model.layers.0.self_attn.k_proj.weight", vec![128, 896]),
        ("model.layers.0.self_attn.v_proj.weight", vec![128, 896]),
        ("model.layers.0.self_attn.q_proj.bias", vec![896]),
        ("model.layers.0.self_attn.k_proj.bias", vec![128]),
        ("model.layers.23.self_attn.v_proj.bias", vec![128]),
        ("model.layers.23.self_attn.o_proj.weight", vec![896, 896]),
        ("model.layers.23.mlp.gate_proj.weight", vec![4864, 896]),
        ("model.layers.23.mlp.up_proj.weight", vec![4864, 896]),
        ("model.layers.23.mlp.down_proj.weight", vec![896, 4864]),
        ("model.layers.23.input_layernorm.weight", vec![896]),
        ("model.layers.23.post_attention_layernorm.weight", vec![896]),
        ("model.norm.weight", vec![896]),
    ] {
        assert_eq!(w.shape(name), Some(shape), "{name}");
    }
    assert_eq!(w.shape("lm_head.weight"), None, "tied");
    assert_eq!(w.shape("model.layers.24.input_layernorm.weight"), None);
    assert_eq!(w.tensor_names().len(), 2 + 24 * 12);

    let name = "model.layers.5.mlp.down_proj.weight";
    let t = w.load_f32(name).unwrap();
    assert_eq!(t.shape, vec![896, 4864]);
    let bound = 1.0 / (4864f32).sqrt();
    assert!(t.data.iter().all(|x| x.is_finite() && x.abs() <= bound));
    let mean = t.data.iter().map(|&x| x as f64).sum::<f64>() / t.numel() as f64;
    let rms = (t.data.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / t.numel() as f64).sqrt();
    assert!(mean.abs() < 1e-3 * bound as f64, "mean {mean}");
    // Uniform in [-b, b): rms b / sqrt(3).
    assert!(
        (rms / (bound as f64 / 3f64.sqrt()) - 1.0).abs() < 1e-2,
        "rms {rms}"
    );
    assert_eq!(w.load_f32(name).unwrap(), t, "deterministic");
    let norm = w.load_f32("model.layers.5.input_layernorm.weight").unwrap();
    assert!(norm.data.iter().all(|&x| (0.8..1.2).contains(&x)));
}

#[test]
fn same_spec_same_weights_other_seed_other_weights() {
    let a = load("random:qwen2-tiny@5");
    let b = load("random:qwen2-tiny@5");
    let c = load("random:qwen2-tiny@6");
    let d = load("random:qwen2-tiny");
    assert_eq!(a.name, "random:qwen2-tiny@5");
    assert_eq!(d.name, "random:qwen2-tiny@0");
    assert_eq!(a.format, ModelFormat::Random);
    assert_eq!(a.path.to_str(), Some("random:qwen2-tiny"));
    let names = a.weights.tensor_names();
    for name in &names {
        let ta = a.weights.load_f32(name).unwrap();
        assert_eq!(ta, b.weights.load_f32(name).unwrap(), "{name}");
        let tc = c.weights.load_f32(name).unwrap();
        let td = d.weights.load_f32(name).unwrap();
        assert_eq!(ta.shape, tc.shape);
        let same = |x: &[f32], y: &[f32]| x.iter().zip(y).filter(|(p, q)| p == q).count();
        assert!(same(&ta.data, &tc.data) * 10 < ta.numel().max(10), "{name}");
        assert!(same(&ta.data, &td.data) * 10 < ta.numel().max(10), "{name}");
    }
    // Tensors of one model differ from each other too (the name keys the stream).
    let q0 = a
        .weights
        .load_f32("model.layers.0.self_attn.k_proj.weight")
        .unwrap();
    let q1 = a
        .weights
        .load_f32("model.layers.1.self_attn.k_proj.weight")
        .unwrap();
    assert_ne!(q0.data, q1.data);
}

#[test]
fn tiny_presets_load_and_give_finite_logits() {
    for preset in TINY {
        let m = load(&format!("random:{preset}@3"));
        let t = transformer(&m);
        let vocab = m.config.vocab_size;
        let seqs = [vec![0u32, 10, 11, 200, 255, 4], vec![7, 8]];
        let batch = PackedBatch::from_sequences(&seqs);
        let hidden = t.forward_hidden(&batch).unwrap();
        let rows: Vec<usize> = (0..batch.tokens.len()).collect();
        let logits = t.logits_at(&hidden, &rows).unwrap();
        assert_eq!(logits.shape, vec![rows.len(), vocab]);
        assert!(logits.data.iter().all(|x| x.is_finite()), "{preset}");
        let rms = (logits.data.iter().map(|x| x * x).sum::<f32>() / logits.numel() as f32).sqrt();
        assert!(rms > 0.1 && rms < 20.0, "{preset}: logit rms {rms}");
        // Same weights as the tests' in-memory model path: the source loads like memory does.
        let exported = t.export_weights().unwrap();
        for (name, tensor) in &exported {
            assert_eq!(
                &m.weights.load_f32(name).unwrap(),
                tensor,
                "{preset}: {name}"
            );
        }
    }
}

#[test]
fn word_tokenizer_round_trips_and_covers_the_vocabulary() {
    for preset in ["llama-tiny", "qwen2.5-0.5b"] {
        let started = std::time::Instant::now();
        let m = load(&format!("random:{preset}"));
        // Debug build of this crate: generous, but catches a quadratic build.
        assert!(started.elapsed().as_secs_f64() < 10.0, "{preset}");
        let t = &m.tokenizer;
        assert_eq!(t.vocab_size(), m.config.vocab_size, "{preset}");
        let ids = t.encode("w10 w11", true).unwrap();
        assert_eq!(ids, vec![10, 11]);
        assert_eq!(t.decode(&ids).unwrap(), "w10 w11");
        let last = m.config.vocab_size as u32 - 1;
        assert_eq!(t.id_to_token(last), Some(format!("w{last}")));
        assert_eq!(t.token_to_id(&format!("w{}", last + 1)), None);
        assert_eq!(t.bos_token, Some(("<s>".to_string(), 0)));
        assert_eq!(t.eos_token, Some(("</s>".to_string(), 1)));
        assert_eq!(t.eos_ids, vec![1]);
        assert_eq!(t.encode("<s> w5 </s>", false).unwrap(), vec![0, 5, 1]);
        let messages = serde_json::json!([
            {"role": "system", "content": "w4"},
            {"role": "user", "content": "w5 w6"},
            {"role": "assistant", "content": "w7"},
            {"role": "user", "content": "w8"},
        ]);
        let text = t.apply_chat_template(&messages, true).unwrap();
        assert_eq!(
            t.encode(&text, false).unwrap(),
            vec![0, 2, 4, 2, 5, 6, 3, 7, 1, 2, 8, 3],
            "{text:?}"
        );
    }
}

#[test]
fn engine_generates_on_random_llama_tiny() {
    let m = load("random:llama-tiny");
    let run = || {
        let mut e = Engine::new(
            transformer(&m),
            &m.tokenizer,
            EngineConfig {
                block_size: 4,
                kv_budget_tokens: 256,
                max_batch_tokens: 64,
            },
        )
        .unwrap();
        let prompt = m.tokenizer.encode("w10 w11 w12", true).unwrap();
        let chat = m
            .tokenizer
            .apply_chat_template(
                &serde_json::json!([{"role": "user", "content": "w20 w21"}]),
                true,
            )
            .unwrap();
        let chat = m.tokenizer.encode(&chat, false).unwrap();
        for (stream, tokens) in [prompt, chat].into_iter().enumerate() {
            e.submit(Request {
                tokens,
                parent: None,
                sampling: SamplingParams {
                    seed: 9,
                    ..SamplingParams::default()
                },
                stop: StopRules {
                    max_new_tokens: 12,
                    ignore_eos: true,
                    ..StopRules::default()
                },
                stream: stream as u64,
            })
            .unwrap();
        }
        let mut done = e.run_until_idle().unwrap();
        done.sort_by_key(|f| f.seq);
        done
    };
    let first = run();
    assert_eq!(first.len(), 2);
    for f in &first {
        assert_eq!(f.finish_reason, FinishReason::Length);
        assert_eq!(f.tokens.len(), 12);
        assert!(f.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0));
        assert!(f.tokens.iter().all(|&t| (t as usize) < m.config.vocab_size));
        assert_eq!(f.text, m.tokenizer.decode(&f.tokens).unwrap());
    }
    let again = run();
    for (a, b) in first.iter().zip(&again) {
        assert_eq!(a.tokens, b.tokens, "same model, same seed, same tokens");
    }
}

#[test]
fn bad_presets_and_seeds_are_named() {
    let err = load_err("random:qwen2.5-7b");
    assert!(err.contains("'qwen2.5-7b'"), "{err}");
    for preset in preset_names() {
        assert!(err.contains(preset), "{err}");
    }
    let err = load_err("random:");
    assert!(err.contains("preset ''"), "{err}");
    for (spec, seed) in [
        ("random:llama-tiny@x", "'x'"),
        ("random:llama-tiny@", "''"),
        ("random:llama-tiny@-1", "'-1'"),
        (
            "random:llama-tiny@18446744073709551616",
            "'18446744073709551616'",
        ),
        ("random:llama-tiny@1@2", "'1@2'"),
    ] {
        let err = load_err(spec);
        assert!(err.contains(&format!("seed {seed}")), "{spec}: {err}");
    }
    assert_eq!(
        load("random:llama-tiny@18446744073709551615").name,
        "random:llama-tiny@18446744073709551615"
    );
    // Neither a path nor a known name nor random: the message offers random:PRESET.
    let err = load_err("no-such-model-anywhere");
    assert!(err.contains("random:PRESET"), "{err}");
    assert!(err.contains("qwen2.5-0.5b"), "{err}");
}

#[test]
fn info_describes_a_random_model() {
    let out = Command::new(env!("CARGO_BIN_EXE_genius-engine"))
        .args(["info", "--model", "random:qwen2.5-0.5b@2", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["name"], "random:qwen2.5-0.5b@2");
    assert_eq!(v["format"], "Random");
    assert_eq!(v["parameters"], 494_032_768);
    assert_eq!(v["tokenizer_vocab_size"], 151936);
    assert_eq!(v["dtypes"]["RANDOM-F32"], 290);
    assert_eq!(v["chat_template"], true);
}

/// The whole big models on the CPU: finite logits of sane size for a few tokens. Slow (and
/// up to ~10 GB of memory): `cargo test --release --test random_model -- --ignored`.
#[test]
#[ignore]
fn big_presets_forward_is_finite() {
    for preset in ["qwen2.5-0.5b", "llama3.2-1b", "qwen2.5-1.5b"] {
        let m = load(&format!("random:{preset}"));
        let started = std::time::Instant::now();
        let t = transformer(&m);
        let last = m.config.vocab_size as u32 - 1;
        let batch = PackedBatch::from_sequences(&[vec![0u32, 100, 2000, 30000, last, 7, 8, 9]]);
        let hidden = t.forward_hidden(&batch).unwrap();
        let logits = t.logits_at(&hidden, &(0..8).collect::<Vec<_>>()).unwrap();
        assert!(logits.data.iter().all(|x| x.is_finite()), "{preset}");
        let rms = (logits.data.iter().map(|x| x * x).sum::<f32>() / logits.numel() as f32).sqrt();
        let max = logits.data.iter().fold(0f32, |a, x| a.max(x.abs()));
        eprintln!(
            "{preset}: built and ran in {:.1}s, logit rms {rms}, max |logit| {max}",
            started.elapsed().as_secs_f64()
        );
        assert!(rms > 0.5 && rms < 20.0, "{preset}: logit rms {rms}");
    }
}
