//! Models with a real architecture's shape and random weights, built in memory: `--model
//! random:PRESET` or `random:PRESET@SEED` (seed a `u64`, default 0). For machines without
//! weights or network (benchmarks, smoke tests): nothing is read from disk or fetched.
//!
//! The weights are a [`TensorSource`] that holds only the config and the seed and generates each
//! tensor when it is asked for, from (seed, tensor name, element index) with a counter-based
//! generator, so every tensor is reproducible on its own and the model is never held twice.
//! The tokenizer is word-level over exactly `vocab_size` tokens: `<s>`, `</s>`, `<|user|>`,
//! `<|assistant|>`, then the words `w4`, `w5`, ... (id `i` is `w{i}`).

use super::{
    Architecture, HostTensor, LoadedModel, ModelConfig, ModelFormat, RopeScaling, TensorSource,
    TextTokenizer,
};
use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The prefix of a `--model` argument naming a random model.
pub const PREFIX: &str = "random:";

/// Preset names with what they copy.
pub const PRESETS: [(&str, &str); 7] = [
    ("qwen2.5-0.5b", "Qwen2.5-0.5B's shape"),
    ("qwen2.5-1.5b", "Qwen2.5-1.5B's shape"),
    ("qwen2.5-3b", "Qwen2.5-3B's shape"),
    ("llama3.2-1b", "Llama-3.2-1B's shape"),
    ("llama-tiny", "the tiny LLaMA of the tests, vocabulary 256"),
    ("qwen2-tiny", "the tiny Qwen2 of the tests, vocabulary 256"),
    (
        "qwen2-tiny-gqa7",
        "a tiny Qwen2 with 7 query heads per KV head",
    ),
];

/// Special tokens at ids 0..4; every other id `i` is the word `w{i}`.
pub const SPECIALS: [&str; 4] = ["<s>", "</s>", "<|user|>", "<|assistant|>"];

/// The chat template of the word tokenizer: `<s> <|user|> ... <|assistant|> ... </s> ...`
/// (system messages are written as user turns).
pub const CHAT_TEMPLATE: &str = "{{ bos_token }} {% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }} {{ eos_token }} {% else %}<|user|> {{ m['content'] }} {% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}";

/// The config of a preset, `None` for an unknown name.
pub fn preset_config(name: &str) -> Option<ModelConfig> {
    let qwen2 = |vocab, hidden, ffn, layers, heads, kv, head_dim| ModelConfig {
        arch: Architecture::Qwen2,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_scaling: None,
        max_position_embeddings: 32768,
        tie_word_embeddings: true,
        attention_bias: true,
    };
    Some(match name {
        "qwen2.5-0.5b" => qwen2(151936, 896, 4864, 24, 14, 2, 64),
        "qwen2.5-1.5b" => qwen2(151936, 1536, 8960, 28, 12, 2, 128),
        "qwen2.5-3b" => qwen2(151936, 2048, 11008, 36, 16, 2, 128),
        "llama3.2-1b" => ModelConfig {
            arch: Architecture::Llama,
            vocab_size: 128256,
            hidden_size: 2048,
            intermediate_size: 8192,
            num_layers: 16,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: Some(RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }),
            max_position_embeddings: 131072,
            tie_word_embeddings: true,
            attention_bias: false,
        },
        // tests/common/mod.rs `tiny_llama_config`, vocabulary 256.
        "llama-tiny" => ModelConfig {
            arch: Architecture::Llama,
            vocab_size: 256,
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
        },
        // tests/common/mod.rs `tiny_qwen2_config`, vocabulary 256.
        "qwen2-tiny" => ModelConfig {
            max_position_embeddings: 256,
            ..qwen2(256, 48, 40, 2, 6, 2, 8)
        },
        "qwen2-tiny-gqa7" => ModelConfig {
            max_position_embeddings: 4096,
            ..qwen2(256, 64, 96, 2, 14, 2, 16)
        },
        _ => return None,
    })
}

/// The preset and seed of a `random:PRESET[@SEED]` argument; `None` when `spec` does not start
/// with `random:`. Errors name an unknown preset (listing the presets) or a bad seed.
pub fn parse_spec(spec: &str) -> Option<Result<(&str, u64)>> {
    let rest = spec.strip_prefix(PREFIX)?;
    let (preset, seed) = match rest.split_once('@') {
        Some((preset, seed)) => (preset, Some(seed)),
        None => (rest, None),
    };
    let parsed = (|| {
        if preset_config(preset).is_none() {
            bail!(
                "model '{spec}': unknown random-model preset '{preset}' (presets: {})",
                preset_names().join(", ")
            );
        }
        let seed = match seed {
            None => 0,
            Some(s) => s.parse::<u64>().map_err(|_| {
                anyhow::anyhow!(
                    "model '{spec}': seed '{s}' is not an unsigned 64-bit integer \
                     (random:PRESET@SEED, e.g. random:{preset}@1)"
                )
            })?,
        };
        Ok((preset, seed))
    })();
    Some(parsed)
}

/// The preset names.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|(name, _)| *name).collect()
}

/// Builds the model of a `random:PRESET[@SEED]` argument; `None` when `spec` is not one.
pub fn load_random_spec(spec: &str) -> Option<Result<LoadedModel>> {
    parse_spec(spec).map(|parsed| parsed.and_then(|(preset, seed)| load_random(preset, seed)))
}

/// The random model `preset` with weights from `seed`: named `random:PRESET@SEED`.
pub fn load_random(preset: &str, seed: u64) -> Result<LoadedModel> {
    let config = preset_config(preset).with_context(|| {
        format!(
            "unknown random-model preset '{preset}' (presets: {})",
            preset_names().join(", ")
        )
    })?;
    let name = format!("{PREFIX}{preset}@{seed}");
    let path = PathBuf::from(format!("{PREFIX}{preset}"));
    config.validate(&path)?;
    let tokenizer = word_tokenizer(config.vocab_size, &name)?;
    Ok(LoadedModel {
        name,
        path,
        format: ModelFormat::Random,
        weights: Box::new(RandomWeights::new(config.clone(), seed)),
        config,
        tokenizer,
    })
}

/// The word-level tokenizer over `vocab_size` tokens (see the module docs), with BOS `<s>`,
/// EOS `</s>` and [`CHAT_TEMPLATE`]. `model` names it in error messages.
pub fn word_tokenizer(vocab_size: usize, model: &str) -> Result<TextTokenizer> {
    if vocab_size < SPECIALS.len() {
        bail!(
            "{model}: a word tokenizer needs a vocabulary of at least {} tokens, not {vocab_size}",
            SPECIALS.len()
        );
    }
    let mut vocab = serde_json::Map::with_capacity(vocab_size);
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
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        // WordPiece without "##" pieces: the tokens joined by spaces.
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": SPECIALS[0]}
    });
    let inner: tokenizers::Tokenizer = serde_json::from_value(json)
        .map_err(|e| anyhow::anyhow!("{model}: cannot build the word tokenizer: {e}"))?;
    let special = |i: usize| Some((SPECIALS[i].to_string(), i as u32));
    Ok(TextTokenizer::new(
        inner,
        special(0),
        special(1),
        Vec::new(),
        Some(CHAT_TEMPLATE.to_string()),
        PathBuf::from(format!("{model} (word tokenizer)")),
    ))
}

/// How a tensor's values are drawn; `u` is uniform in [-1, 1).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    /// `u * scale`.
    Uniform(f32),
    /// RMSNorm weights: `1 + 0.2 u`.
    Norm,
}

/// Random weights of a config, generated on demand: the tensor named `name` of seed `seed` is
/// the same on every call and every machine.
///
/// Scales (as tests/common `random_weights`, `u` uniform in [-1, 1)): q/k projections
/// `2/sqrt(hidden)`, v/o and gate/up `1/sqrt(hidden)`, down `1/sqrt(ffn)`, biases 0.5, norms
/// `1 + 0.2 u`. The embedding is `u` up to hidden 48 and `u * sqrt(48 / hidden)` beyond, the
/// untied LM head half of that, so that logits keep a standard deviation of about 4 (not
/// `sqrt(hidden / 3)`) in wide models. Every sublayer reads an RMS-normed input and adds a
/// contribution of bounded size, so the residual stream grows only additively with depth.
pub struct RandomWeights {
    config: ModelConfig,
    seed: u64,
}

/// Elements generated per rayon task.
const CHUNK: usize = 1 << 16;

impl RandomWeights {
    pub fn new(config: ModelConfig, seed: u64) -> Self {
        Self { config, seed }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Shape and initialisation of the tensor `name`, `None` when the config has no such tensor.
    fn spec(&self, name: &str) -> Option<(Vec<usize>, Init)> {
        let c = &self.config;
        let (v, h, i) = (c.vocab_size, c.hidden_size, c.intermediate_size);
        let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let s = 1.0 / (h as f32).sqrt();
        let embed = (48.0 / h as f32).sqrt().min(1.0);
        match name {
            "model.embed_tokens.weight" => return Some((vec![v, h], Init::Uniform(embed))),
            "model.norm.weight" => return Some((vec![h], Init::Norm)),
            "lm_head.weight" if !c.tie_word_embeddings => {
                return Some((vec![v, h], Init::Uniform(0.5 * embed)));
            }
            _ => {}
        }
        let (layer, part) = name.strip_prefix("model.layers.")?.split_once('.')?;
        let l: usize = layer.parse().ok()?;
        if l >= c.num_layers || l.to_string() != layer {
            return None;
        }
        let bias = c.attention_bias;
        Some(match part {
            "input_layernorm.weight" | "post_attention_layernorm.weight" => (vec![h], Init::Norm),
            "self_attn.q_proj.weight" => (vec![q, h], Init::Uniform(2.0 * s)),
            "self_attn.k_proj.weight" => (vec![kv, h], Init::Uniform(2.0 * s)),
            "self_attn.v_proj.weight" => (vec![kv, h], Init::Uniform(s)),
            "self_attn.q_proj.bias" if bias => (vec![q], Init::Uniform(0.5)),
            "self_attn.k_proj.bias" | "self_attn.v_proj.bias" if bias => {
                (vec![kv], Init::Uniform(0.5))
            }
            "self_attn.o_proj.weight" => (vec![h, q], Init::Uniform(s)),
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => (vec![i, h], Init::Uniform(s)),
            "mlp.down_proj.weight" => (vec![h, i], Init::Uniform(1.0 / (i as f32).sqrt())),
            _ => return None,
        })
    }
}

/// splitmix64's finaliser: a bijective mix of 64 bits.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9E3779B97F4A7C15;

/// FNV-1a of a tensor name.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Uniform in [-1, 1) from the top 24 bits (exact in `f32`).
fn uniform(bits: u64) -> f32 {
    (bits >> 40) as f32 * (1.0 / (1u32 << 23) as f32) - 1.0
}

/// The values of a tensor: element `j` is `mix64(key + (j + 1) * GOLDEN)` mapped by `init`,
/// with `key` from the seed and the name.
fn generate(seed: u64, name: &str, n: usize, init: Init) -> Vec<f32> {
    let key = mix64(seed ^ mix64(name_hash(name)));
    let (scale, offset) = match init {
        Init::Uniform(scale) => (scale, 0.0),
        Init::Norm => (0.2, 1.0),
    };
    let mut data = vec![0f32; n];
    data.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let start = (c * CHUNK) as u64;
            for (j, x) in chunk.iter_mut().enumerate() {
                let counter = start + j as u64 + 1;
                *x =
                    offset + scale * uniform(mix64(key.wrapping_add(counter.wrapping_mul(GOLDEN))));
            }
        });
    data
}

impl TensorSource for RandomWeights {
    fn tensor_names(&self) -> Vec<String> {
        crate::transformer::params::hf_tensor_names(&self.config)
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.spec(name).map(|(shape, _)| shape)
    }

    fn load_f32(&self, name: &str) -> Result<HostTensor> {
        let (shape, init) = self.spec(name).with_context(|| {
            format!(
                "no tensor named '{name}' in the random {} model",
                self.config.arch.name()
            )
        })?;
        let n = shape.iter().product();
        Ok(HostTensor::new(shape, generate(self.seed, name, n, init)))
    }

    fn dtype_counts(&self) -> BTreeMap<String, usize> {
        BTreeMap::from([("RANDOM-F32".to_string(), self.tensor_names().len())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_covers_minus_one_to_one() {
        assert_eq!(uniform(0), -1.0);
        assert!(uniform(u64::MAX) < 1.0);
        assert!(uniform(u64::MAX) > 0.9999);
        assert_eq!(uniform(1 << 63), 0.0);
    }

    #[test]
    fn names_and_specs_agree() {
        for (preset, _) in PRESETS {
            let w = RandomWeights::new(preset_config(preset).unwrap(), 0);
            let names = w.tensor_names();
            assert!(names.iter().all(|n| w.shape(n).is_some()), "{preset}");
            assert_eq!(w.dtype_counts()["RANDOM-F32"], names.len());
            for bad in [
                "model.layers.01.input_layernorm.weight",
                "model.layers.99.input_layernorm.weight",
                "model.layers.0.nothing",
                "nothing",
            ] {
                assert!(w.shape(bad).is_none(), "{preset}: {bad}");
            }
        }
    }
}
