//! Test support: a seeded RNG, tiny random checkpoints written to disk in HF layout, and a
//! small word-level tokenizer.json.
#![allow(dead_code)]

pub mod cuda;

use genius_engine::model::safetensors::{Dtype, write_safetensors};
use genius_engine::model::{Architecture, HostTensor, ModelConfig, RopeScaling};
use std::path::Path;

/// splitmix64: deterministic, seedable, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn tensor(&mut self, shape: &[usize], scale: f32) -> HostTensor {
        let n = shape.iter().product();
        HostTensor::new(
            shape.to_vec(),
            (0..n).map(|_| self.uniform() * scale).collect(),
        )
    }
}

/// Row segments of a pair batch: (chosen rows, rejected rows).
pub type PairRows = (std::ops::Range<usize>, std::ops::Range<usize>);

/// Inputs for the preference-loss kernel's tests: `n` random per-row log-probs and `pairs`
/// pairs over consecutive segments of them (chosen lengths 1, 3, 77, 300 and sometimes 0,
/// rejected 2, 250, 1, 64), with random reference sums and advantages.
pub fn loss_test_pairs(
    rng: &mut Rng,
    n: usize,
    pairs: usize,
) -> (
    Vec<f32>,
    Vec<PairRows>,
    Vec<genius_engine::genius::loss::PairLogps>,
) {
    use genius_engine::genius::loss::PairLogps;
    let lp: Vec<f32> = (0..n).map(|_| -5.0 * rng.uniform() - 0.01).collect();
    let (mut rows, mut out, mut at) = (Vec::new(), Vec::new(), 0);
    for i in 0..pairs {
        let lc = [1, 3, 77, 300, 0][i % 5].max(if i % 7 == 4 { 0 } else { 1 });
        let lr = [2, 250, 1, 64][i % 4];
        rows.push((at..at + lc, at + lc..at + lc + lr));
        at += lc + lr;
        out.push(PairLogps {
            ref_chosen: -3.0 * lc as f64 + rng.uniform() as f64,
            ref_rejected: -3.0 * lr as f64 - rng.uniform() as f64,
            chosen_tokens: lc.max(1),
            rejected_tokens: lr.max(1),
            adv_chosen: rng.uniform() as f64 - 0.5,
            adv_rejected: rng.uniform() as f64 - 0.5,
            ..PairLogps::default()
        });
    }
    assert!(at <= n, "the pairs need {at} rows");
    (lp, rows, out)
}

/// Every loss kind, ACO with both clips and a finite and an infinite alpha.
pub fn every_loss_kind() -> [genius_engine::genius::loss::LossKind; 7] {
    use genius_engine::genius::loss::{AcoClip, LossKind};
    [
        LossKind::Aco {
            clip: AcoClip::Min,
            alpha: 1.0,
        },
        LossKind::Aco {
            clip: AcoClip::Max,
            alpha: 0.3,
        },
        LossKind::Aco {
            clip: AcoClip::Min,
            alpha: f64::INFINITY,
        },
        LossKind::Dpo,
        LossKind::Simpo { gamma: 0.5 },
        LossKind::Ipo { tau: 0.1 },
        LossKind::Sft,
    ]
}

pub fn tiny_llama_config() -> ModelConfig {
    ModelConfig {
        arch: Architecture::Llama,
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 16,
        }),
        max_position_embeddings: 256,
        tie_word_embeddings: false,
        attention_bias: false,
    }
}

pub fn tiny_qwen2_config() -> ModelConfig {
    ModelConfig {
        arch: Architecture::Qwen2,
        vocab_size: 64,
        hidden_size: 48,
        intermediate_size: 40,
        num_layers: 2,
        num_heads: 6,
        num_kv_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_scaling: None,
        max_position_embeddings: 256,
        tie_word_embeddings: true,
        attention_bias: true,
    }
}

/// Random weights for `config` in HF names and layout (norm weights around 1).
pub fn random_weights(config: &ModelConfig, seed: u64) -> Vec<(String, HostTensor)> {
    let mut rng = Rng::new(seed);
    let (h, q, kv, i) = (
        config.hidden_size,
        config.num_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
        config.intermediate_size,
    );
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        rng.tensor(&[config.vocab_size, h], 1.0),
    )];
    let norm = |rng: &mut Rng| {
        HostTensor::new(vec![h], (0..h).map(|_| 1.0 + 0.2 * rng.uniform()).collect())
    };
    for l in 0..config.num_layers {
        let n = |p: &str| format!("model.layers.{l}.{p}");
        out.push((n("input_layernorm.weight"), norm(&mut rng)));
        let s = 1.0 / (h as f32).sqrt();
        out.push((n("self_attn.q_proj.weight"), rng.tensor(&[q, h], s * 2.0)));
        out.push((n("self_attn.k_proj.weight"), rng.tensor(&[kv, h], s * 2.0)));
        out.push((n("self_attn.v_proj.weight"), rng.tensor(&[kv, h], s)));
        if config.attention_bias {
            out.push((n("self_attn.q_proj.bias"), rng.tensor(&[q], 0.5)));
            out.push((n("self_attn.k_proj.bias"), rng.tensor(&[kv], 0.5)));
            out.push((n("self_attn.v_proj.bias"), rng.tensor(&[kv], 0.5)));
        }
        out.push((n("self_attn.o_proj.weight"), rng.tensor(&[h, q], s)));
        out.push((n("post_attention_layernorm.weight"), norm(&mut rng)));
        out.push((n("mlp.gate_proj.weight"), rng.tensor(&[i, h], s)));
        out.push((n("mlp.up_proj.weight"), rng.tensor(&[i, h], s)));
        out.push((
            n("mlp.down_proj.weight"),
            rng.tensor(&[h, i], 1.0 / (i as f32).sqrt()),
        ));
    }
    out.push(("model.norm.weight".to_string(), norm(&mut rng)));
    if !config.tie_word_embeddings {
        out.push((
            "lm_head.weight".to_string(),
            rng.tensor(&[config.vocab_size, h], 0.5),
        ));
    }
    out
}

/// Words of the test tokenizer: id i is `w{i}` except the specials at the front.
pub const SPECIALS: [&str; 4] = ["<s>", "</s>", "<|user|>", "<|assistant|>"];

/// A word-level tokenizer.json over `vocab_size` tokens: the specials, then `w4`, `w5`, ...
pub fn word_tokenizer_json(vocab_size: usize) -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (i, s) in SPECIALS.iter().enumerate() {
        vocab.insert(s.to_string(), i.into());
    }
    for i in SPECIALS.len()..vocab_size {
        vocab.insert(format!("w{i}"), i.into());
    }
    let added: Vec<_> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<s>"}
    })
}

/// Writes a complete tiny HF checkpoint directory (config, safetensors, tokenizer files with a
/// simple chat template) and returns its weights.
pub fn write_tiny_checkpoint(
    dir: &Path,
    config: &ModelConfig,
    seed: u64,
    dtype: Dtype,
) -> Vec<(String, HostTensor)> {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config.to_hf_value()).unwrap(),
    )
    .unwrap();
    let weights = random_weights(config, seed);
    let refs: Vec<(&str, &HostTensor)> = weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_safetensors(&dir.join("model.safetensors"), &refs, dtype).unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string(&word_tokenizer_json(config.vocab_size)).unwrap(),
    )
    .unwrap();
    let template = "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} {% else %}<|assistant|> {{ m['content'] }} </s> {% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}";
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string(&serde_json::json!({
            "bos_token": "<s>", "eos_token": "</s>", "chat_template": template
        }))
        .unwrap(),
    )
    .unwrap();
    weights
}

/// A model with [`random_weights`] on the CPU backend, loaded from memory (no files).
pub fn random_cpu_model(
    config: &ModelConfig,
    seed: u64,
) -> genius_engine::transformer::Transformer<genius_engine::backend::cpu::CpuBackend> {
    let weights = random_weights(config, seed);
    let source = genius_engine::model::MemoryTensors::new(&weights).unwrap();
    genius_engine::transformer::Transformer::load(
        genius_engine::backend::cpu::CpuBackend::new(),
        config.clone(),
        &source,
    )
    .unwrap()
}
