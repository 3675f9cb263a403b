//! Saving HF checkpoints (`model::checkpoint`): tiny models and the default GGUF model come back
//! from `load_model` with the same config, tensors, tokenizer and logits; bad weights are
//! refused before anything is written; unwritable targets fail naming the path and leave
//! nothing behind; an existing checkpoint is replaced whole, with no temporaries left.

mod common;

use common::*;
use genius_engine::backend::cpu::CpuBackend;
use genius_engine::model::checkpoint::{expected_tensors, save_checkpoint};
use genius_engine::model::fetch::{DEFAULT_MODEL, ModelCache, known_model};
use genius_engine::model::safetensors::Dtype;
use genius_engine::model::{
    Architecture, HostTensor, LoadedModel, ModelConfig, RopeScaling, TextTokenizer, load_model,
};
use genius_engine::transformer::{PackedBatch, Transformer};
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;

fn load(dir: &Path) -> LoadedModel {
    load_model(Some(dir.to_str().unwrap()))
        .unwrap_or_else(|e| panic!("loading {}: {e:#}", dir.display()))
}

/// Every tensor a model holds, f32, by name.
fn all_weights(model: &LoadedModel) -> Vec<(String, HostTensor)> {
    model
        .weights
        .tensor_names()
        .into_iter()
        .map(|n| {
            let t = model.weights.load_f32(&n).unwrap();
            (n, t)
        })
        .collect()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The JSON header of a safetensors file.
fn safetensors_header(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + n]).unwrap()
}

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Same special tokens, template, vocabulary, encodings, decodings and chat renderings.
fn assert_same_tokenizer(a: &TextTokenizer, b: &TextTokenizer, texts: &[&str]) {
    assert_eq!(a.bos_token, b.bos_token);
    assert_eq!(a.eos_token, b.eos_token);
    assert_eq!(a.eos_ids, b.eos_ids);
    assert_eq!(a.chat_template, b.chat_template);
    assert_eq!(a.vocab_size(), b.vocab_size());
    for text in texts {
        for special in [false, true] {
            let ids = a.encode(text, special).unwrap();
            assert_eq!(ids, b.encode(text, special).unwrap(), "{text:?} {special}");
            assert_eq!(a.decode(&ids).unwrap(), b.decode(&ids).unwrap(), "{ids:?}");
        }
    }
    let conversations = [
        json!([{"role": "user", "content": texts[0]}]),
        json!([
            {"role": "user", "content": texts[0]},
            {"role": "assistant", "content": texts[texts.len() - 1]},
            {"role": "user", "content": "and again"}
        ]),
    ];
    for messages in &conversations {
        for generation_prompt in [false, true] {
            let ra = a.apply_chat_template(messages, generation_prompt).unwrap();
            let rb = b.apply_chat_template(messages, generation_prompt).unwrap();
            assert_eq!(ra, rb);
            assert_eq!(a.encode(&ra, false).unwrap(), b.encode(&rb, false).unwrap());
        }
    }
}

fn tied_llama_config() -> ModelConfig {
    ModelConfig {
        tie_word_embeddings: true,
        rope_scaling: None,
        num_kv_heads: 4,
        ..tiny_llama_config()
    }
}

#[test]
fn tiny_models_round_trip_through_a_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let cases = [
        ("llama-untied-llama3-rope", tiny_llama_config()),
        ("qwen2-bias-tied", tiny_qwen2_config()),
        ("llama-tied", tied_llama_config()),
    ];
    assert!(matches!(
        cases[0].1.rope_scaling,
        Some(RopeScaling::Llama3 { .. })
    ));
    assert!(!cases[0].1.tie_word_embeddings && cases[1].1.attention_bias);
    for (seed, (name, config)) in cases.into_iter().enumerate() {
        let src = root.path().join(format!("{name}-src"));
        let original = write_tiny_checkpoint(&src, &config, 100 + seed as u64, Dtype::F32);
        // A second EOS id from generation_config.json, which must survive the trip.
        std::fs::write(
            src.join("generation_config.json"),
            json!({"eos_token_id": [1, 3]}).to_string(),
        )
        .unwrap();
        let model = load(&src);
        assert_eq!(model.tokenizer.eos_ids, vec![1, 3]);
        let weights = all_weights(&model);

        // f32: bit-exact.
        let dst = root.path().join(format!("{name}-f32"));
        save_checkpoint(&dst, &model.config, &model.tokenizer, &weights, Dtype::F32).unwrap();
        let back = load(&dst);
        assert_eq!(back.config, config, "{name}");
        let expected: Vec<String> = expected_tensors(&config)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let mut names = back.weights.tensor_names();
        names.sort();
        let mut sorted_expected = expected.clone();
        sorted_expected.sort();
        assert_eq!(names, sorted_expected, "{name}");
        assert_eq!(
            names.iter().any(|n| n == "lm_head.weight"),
            !config.tie_word_embeddings,
            "{name}"
        );
        for (n, t) in &original {
            let got = back.weights.load_f32(n).unwrap();
            assert_eq!(got.shape, t.shape, "{name} {n}");
            assert!(
                got.data
                    .iter()
                    .zip(&t.data)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name} {n}: not bit-exact"
            );
        }
        let texts = [
            "w4 w5 w63",
            "<|user|> w10 w11 </s>",
            "<s> w7 <|assistant|> w8",
            "w12  w13\nw14",
        ];
        assert_same_tokenizer(&model.tokenizer, &back.tokenizer, &texts);

        // The files transformers reads.
        let cfg = read_json(&dst.join("config.json"));
        assert_eq!(cfg["torch_dtype"], "float32");
        assert_eq!(cfg["model_type"], config.arch.name());
        let class = match config.arch {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        };
        assert_eq!(cfg["architectures"], json!([class]));
        assert_eq!(cfg["tie_word_embeddings"], config.tie_word_embeddings);
        assert_eq!(cfg["bos_token_id"], 0);
        assert_eq!(cfg["eos_token_id"], json!([1, 3]));
        assert_eq!(
            cfg["rms_norm_eps"].as_f64().unwrap(),
            format!("{}", config.rms_norm_eps).parse::<f64>().unwrap()
        );
        let tc = read_json(&dst.join("tokenizer_config.json"));
        assert_eq!(tc["tokenizer_class"], "PreTrainedTokenizerFast");
        assert_eq!(tc["model_max_length"], config.max_position_embeddings);
        assert_eq!(tc["bos_token"], "<s>");
        assert_eq!(tc["eos_token"], "</s>");
        assert_eq!(
            tc["chat_template"].as_str(),
            model.tokenizer.chat_template.as_deref()
        );
        assert_eq!(tc["added_tokens_decoder"]["2"]["content"], "<|user|>");
        assert_eq!(tc["added_tokens_decoder"]["2"]["special"], true);
        assert_eq!(
            read_json(&dst.join("special_tokens_map.json")),
            json!({"bos_token": "<s>", "eos_token": "</s>"})
        );
        assert_eq!(
            read_json(&dst.join("generation_config.json")),
            json!({"bos_token_id": 0, "eos_token_id": [1, 3]})
        );
        let header = safetensors_header(&dst.join("model.safetensors"));
        assert_eq!(header["__metadata__"], json!({"format": "pt"}));
        assert_eq!(header[&expected[1]]["dtype"], "F32");

        // bf16: each value is the f32 rounded to nearest bf16.
        let dst16 = root.path().join(format!("{name}-bf16"));
        save_checkpoint(
            &dst16,
            &model.config,
            &model.tokenizer,
            &weights,
            Dtype::BF16,
        )
        .unwrap();
        let back16 = load(&dst16);
        assert_eq!(back16.config, config, "{name}");
        assert_eq!(
            read_json(&dst16.join("config.json"))["torch_dtype"],
            "bfloat16"
        );
        assert_eq!(
            back16.weights.dtype_counts().keys().collect::<Vec<_>>(),
            ["BF16"]
        );
        let mut rounded = 0;
        for (n, t) in &original {
            let got = back16.weights.load_f32(n).unwrap();
            assert_eq!(got.shape, t.shape);
            for (g, x) in got.data.iter().zip(&t.data) {
                assert_eq!(*g, half::bf16::from_f32(*x).to_f32(), "{name} {n}");
                assert!((g - x).abs() <= x.abs() * 2f32.powi(-8), "{name} {n}");
                rounded += (g != x) as usize;
            }
        }
        assert!(rounded > 0, "random f32 weights must lose bits in bf16");
        assert_same_tokenizer(&model.tokenizer, &back16.tokenizer, &texts);
    }
}

#[test]
fn weights_that_do_not_match_the_config_are_refused_before_writing() {
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("src");
    let config = tiny_qwen2_config();
    write_tiny_checkpoint(&src, &config, 5, Dtype::F32);
    let model = load(&src);
    let weights = all_weights(&model);
    let dst = root.path().join("dst");
    let refuse = |weights: &[(String, HostTensor)], config: &ModelConfig, needle: &str| {
        let err = save_checkpoint(&dst, config, &model.tokenizer, weights, Dtype::BF16)
            .expect_err(needle);
        let msg = format!("{err:#}");
        assert!(
            msg.contains(needle) && msg.contains(dst.to_str().unwrap()),
            "{msg}"
        );
        assert!(!dst.exists());
        assert_eq!(listing(root.path()), ["src"]);
    };

    let q = "model.layers.1.self_attn.q_proj.bias";
    let without: Vec<_> = weights.iter().filter(|(n, _)| n != q).cloned().collect();
    refuse(&without, &config, q);

    let mut misshapen = weights.clone();
    let i = misshapen.iter().position(|(n, _)| n == q).unwrap();
    misshapen[i].1 = HostTensor::new(vec![3], vec![0.0; 3]);
    refuse(&misshapen, &config, q);

    let mut unknown = weights.clone();
    unknown.push((
        "model.layers.7.mlp.gate_proj.weight".into(),
        HostTensor::new(vec![1], vec![0.0]),
    ));
    refuse(&unknown, &config, "model.layers.7.mlp.gate_proj.weight");

    let mut twice = weights.clone();
    twice.push(weights[0].clone());
    refuse(&twice, &config, "given twice");

    // Tied: an LM head that differs from the embedding is refused...
    let embed = weights
        .iter()
        .find(|(n, _)| n == "model.embed_tokens.weight")
        .unwrap()
        .1
        .clone();
    let mut head = embed.clone();
    head.data[17] += 1.0;
    let mut differing = weights.clone();
    differing.push(("lm_head.weight".into(), head));
    refuse(&differing, &config, "lm_head.weight");

    // ... configs a HF config cannot express are refused ...
    let freq = ModelConfig {
        rope_scaling: Some(RopeScaling::FreqFactors(vec![1.0; 4])),
        ..config.clone()
    };
    refuse(&weights, &freq, "per-frequency");

    // ... and a tokenizer larger than the embedding.
    let small = ModelConfig {
        vocab_size: 32,
        ..config.clone()
    };
    let shrunk: Vec<_> = weights
        .iter()
        .map(|(n, t)| {
            if n == "model.embed_tokens.weight" {
                (
                    n.clone(),
                    HostTensor::new(vec![32, 48], t.data[..32 * 48].to_vec()),
                )
            } else {
                (n.clone(), t.clone())
            }
        })
        .collect();
    refuse(&shrunk, &small, "tokenizer has 64 tokens");

    // ... while an LM head equal to the embedding is accepted and not stored.
    let mut same = weights.clone();
    same.push(("lm_head.weight".into(), embed));
    save_checkpoint(&dst, &config, &model.tokenizer, &same, Dtype::F32).unwrap();
    let back = load(&dst);
    assert!(
        !back
            .weights
            .tensor_names()
            .contains(&"lm_head.weight".to_string())
    );
    assert_eq!(back.config, config);
}

#[test]
fn default_model_round_trips_through_a_checkpoint() {
    let known = known_model(DEFAULT_MODEL).unwrap();
    let cached = ModelCache::from_env().unwrap().model_path(known);
    if !cached.is_file() {
        // Written to the real stderr, past the test harness's capture, so the skip shows.
        writeln!(
            std::io::stderr(),
            "SKIPPED default_model_round_trips_through_a_checkpoint: the default model is not \
             cached at {} (tests/default_model.rs fetches it)",
            cached.display()
        )
        .unwrap();
        return;
    }
    let model = load_model(None).unwrap();
    let weights = all_weights(&model);
    let root = tempfile::tempdir().unwrap();
    let dst = root.path().join("smollm2");
    save_checkpoint(&dst, &model.config, &model.tokenizer, &weights, Dtype::F32).unwrap();
    let back = load(&dst);
    assert_eq!(back.config, model.config);
    assert!(back.config.tie_word_embeddings);
    assert!(
        !back
            .weights
            .tensor_names()
            .contains(&"lm_head.weight".to_string())
    );

    let tok = &model.tokenizer;
    let messages = json!([{"role": "user", "content": "What is the capital of France?"}]);
    let rendered = tok.apply_chat_template(&messages, true).unwrap();
    assert!(rendered.contains("<|im_start|>user\nWhat is the capital of France?<|im_end|>"));
    let texts = [
        "What is the capital of France?",
        rendered.as_str(),
        "Numbers 1234567 and   spaces\n\n\ttabs",
        "Ünïcödé — 東京 🙂 naïve café",
        "The capital of France is Paris.<|im_end|>",
    ];
    assert_same_tokenizer(tok, &back.tokenizer, &texts);
    assert_eq!(back.tokenizer.eos_ids, tok.eos_ids);
    assert!(!tok.eos_ids.is_empty());

    let prompt = tok.encode(&rendered, false).unwrap();
    assert_eq!(back.tokenizer.encode(&rendered, false).unwrap(), prompt);
    let logits = |m: &LoadedModel| {
        let t = Transformer::load(CpuBackend::new(), m.config.clone(), m.weights.as_ref()).unwrap();
        let hidden = t
            .forward_hidden(&PackedBatch::from_sequences(&[&prompt]))
            .unwrap();
        t.logits_at(&hidden, &[prompt.len() - 1]).unwrap()
    };
    let a = logits(&model);
    let b = logits(&back);
    assert_eq!(a.shape, [1, model.config.vocab_size]);
    assert_eq!(a.shape, b.shape);
    assert!(
        a.data
            .iter()
            .zip(&b.data)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "logits differ after the round trip"
    );
}

#[test]
fn an_unwritable_target_fails_naming_the_path_and_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("src");
    let config = tiny_llama_config();
    write_tiny_checkpoint(&src, &config, 9, Dtype::F32);
    let model = load(&src);
    let weights = all_weights(&model);

    // A path under a regular file (fails for root too).
    let file = root.path().join("plain-file");
    std::fs::write(&file, "not a directory").unwrap();
    for dst in [file.join("ckpt"), file.join("deeper").join("ckpt")] {
        let err = save_checkpoint(&dst, &config, &model.tokenizer, &weights, Dtype::BF16)
            .expect_err("a path under a regular file");
        let msg = format!("{err:#}");
        assert!(msg.contains(dst.to_str().unwrap()), "{msg}");
        assert!(msg.contains(file.to_str().unwrap()), "{msg}");
        assert_eq!(listing(root.path()), ["plain-file", "src"]);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a directory");
    }

    // An existing regular file, or a directory that is not a checkpoint, is never replaced.
    let err = save_checkpoint(&file, &config, &model.tokenizer, &weights, Dtype::BF16)
        .expect_err("a regular file as the target");
    assert!(format!("{err:#}").contains("not a directory"), "{err:#}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a directory");
    let other = root.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "keep me").unwrap();
    let err = save_checkpoint(&other, &config, &model.tokenizer, &weights, Dtype::BF16)
        .expect_err("a non-checkpoint directory");
    let msg = format!("{err:#}");
    assert!(
        msg.contains(other.to_str().unwrap()) && msg.contains("no config.json"),
        "{msg}"
    );
    assert_eq!(listing(&other), ["notes.txt"]);
    assert_eq!(listing(root.path()), ["other", "plain-file", "src"]);
}

#[test]
fn overwriting_a_checkpoint_replaces_it_whole_and_leaves_no_temporaries() {
    let root = tempfile::tempdir().unwrap();
    let config = tiny_llama_config();
    let (src_a, src_b) = (root.path().join("a"), root.path().join("b"));
    write_tiny_checkpoint(&src_a, &config, 1, Dtype::F32);
    let weights_b = write_tiny_checkpoint(&src_b, &config, 2, Dtype::F32);
    let (a, b) = (load(&src_a), load(&src_b));

    let out = root.path().join("out");
    save_checkpoint(&out, &a.config, &a.tokenizer, &all_weights(&a), Dtype::F32).unwrap();
    std::fs::write(out.join("stale.txt"), "from the first save").unwrap();
    std::fs::write(out.join("chat_template.jinja"), "stale {{ messages }}").unwrap();
    save_checkpoint(&out, &b.config, &b.tokenizer, &all_weights(&b), Dtype::F32).unwrap();

    assert_eq!(listing(root.path()), ["a", "b", "out"]);
    assert_eq!(
        listing(&out),
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let back = load(&out);
    for (n, t) in &weights_b {
        assert_eq!(&back.weights.load_f32(n).unwrap(), t, "{n}");
    }
    assert_eq!(back.tokenizer.chat_template, b.tokenizer.chat_template);

    // An empty directory is a valid target too.
    let empty = root.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    save_checkpoint(
        &empty,
        &b.config,
        &b.tokenizer,
        &all_weights(&b),
        Dtype::BF16,
    )
    .unwrap();
    assert_eq!(load(&empty).config, config);
    assert_eq!(listing(root.path()), ["a", "b", "empty", "out"]);
}
