//! The transformer's architecture, read from HF `config.json` (GGUF metadata maps onto the same
//! struct in `gguf/config.rs`).

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// LLaMA 2/3.x and SmolLM: no attention biases.
    Llama,
    /// Qwen2 / Qwen2.5: biases on q, k and v.
    Qwen2,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

/// RoPE frequency scaling. Only LLaMA-3's scheme changes the frequencies; `default` is none.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Per-frequency divisors, as GGUF stores LLaMA-3 scaling (`rope_freqs.weight`):
    /// `inv_freq[i] / factors[i]`.
    FreqFactors(Vec<f32>),
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

/// Upper bound on every dimension of a config (vocabulary, widths, layers, heads, context), so
/// that sizes derived from them cannot overflow; real models are far below it.
pub const MAX_DIMENSION: usize = 1 << 24;

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2).
    pub attention_bias: bool,
}

impl ModelConfig {
    /// Parameter count (embedding counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (h, i, kv) = (
            self.hidden_size,
            self.intermediate_size,
            self.num_kv_heads * self.head_dim,
        );
        let q = self.num_heads * self.head_dim;
        let attn = h * q + 2 * h * kv + q * h + if self.attention_bias { q + 2 * kv } else { 0 };
        let mlp = 3 * h * i;
        let layer = attn + mlp + 2 * h;
        let emb = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        self.num_layers * layer + emb + head + h
    }

    /// RoPE inverse frequencies for one head (`head_dim / 2` values), LLaMA-3 scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let mut inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / (self.rope_theta as f64).powf((2 * i) as f64 / d as f64))
            .collect();
        if let Some(RopeScaling::FreqFactors(factors)) = &self.rope_scaling {
            for (f, d) in inv.iter_mut().zip(factors) {
                *f /= *d as f64;
            }
        }
        if let Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) = self.rope_scaling
        {
            let (factor, lo, hi) = (
                factor as f64,
                low_freq_factor as f64,
                high_freq_factor as f64,
            );
            let old = original_max_position_embeddings as f64;
            let low_freq_wavelen = old / lo;
            let high_freq_wavelen = old / hi;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen < high_freq_wavelen {
                    // high frequency: unchanged
                } else if wavelen > low_freq_wavelen {
                    *f /= factor;
                } else {
                    let smooth = (old / wavelen - lo) / (hi - lo);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
        inv.into_iter().map(|f| f as f32).collect()
    }

    /// Checks that the dimensions are consistent; `origin` names the file in the error.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let o = origin.display();
        for (what, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value > MAX_DIMENSION {
                bail!("{o}: {what} = {value} is beyond any real model (limit {MAX_DIMENSION})");
            }
        }
        if self.num_heads * self.head_dim > MAX_DIMENSION {
            bail!("{o}: num_attention_heads x head_dim is beyond any real model");
        }
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_layers == 0 {
            bail!("{o}: heads, kv heads and layers must be positive");
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "{o}: num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            bail!("{o}: head_dim {} must be even and positive", self.head_dim);
        }
        if self.hidden_size == 0 || self.vocab_size == 0 || self.intermediate_size == 0 {
            bail!("{o}: hidden_size, intermediate_size and vocab_size must be positive");
        }
        Ok(())
    }

    /// Parses a HF `config.json` (architectures `llama` and `qwen2`).
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read config", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_hf_value(&v, path)
    }

    pub fn from_hf_value(v: &Value, path: &Path) -> Result<Self> {
        let o = path.display();
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .with_context(|| format!("{o}: missing field 'model_type'"))?;
        let arch = match model_type {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => bail!(
                "{o}: unsupported architecture model_type '{other}' (supported: llama, qwen2)"
            ),
        };
        let req = |k: &str| -> Result<usize> {
            let f = v
                .get(k)
                .with_context(|| format!("{o}: missing field '{k}'"))?;
            f.as_u64().map(|x| x as usize).with_context(|| {
                format!("{o}: field '{k}' must be a non-negative integer, got {f}")
            })
        };
        let opt_f = |k: &str, default: f64| -> Result<f64> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_f64()
                    .with_context(|| format!("{o}: field '{k}' must be a number, got {x}")),
            }
        };
        let hidden_size = req("hidden_size")?;
        let num_heads = req("num_attention_heads")?;
        let num_kv_heads = match v.get("num_key_value_heads") {
            None | Some(Value::Null) => num_heads,
            Some(_) => req("num_key_value_heads")?,
        };
        let head_dim = match v.get("head_dim") {
            None | Some(Value::Null) => {
                if num_heads == 0 {
                    bail!("{o}: num_attention_heads must be positive");
                }
                hidden_size / num_heads
            }
            Some(_) => req("head_dim")?,
        };
        let rope_scaling = match v.get("rope_scaling") {
            None | Some(Value::Null) => None,
            Some(rs) => {
                let kind = rs
                    .get("rope_type")
                    .or_else(|| rs.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => {
                        let f = |k: &str| -> Result<f64> {
                            rs.get(k).and_then(Value::as_f64).with_context(|| {
                                format!("{o}: rope_scaling of type llama3 needs number '{k}'")
                            })
                        };
                        Some(RopeScaling::Llama3 {
                            factor: f("factor")? as f32,
                            low_freq_factor: f("low_freq_factor")? as f32,
                            high_freq_factor: f("high_freq_factor")? as f32,
                            original_max_position_embeddings: f("original_max_position_embeddings")?
                                as usize,
                        })
                    }
                    other => bail!(
                        "{o}: unsupported rope_scaling type '{other}' (supported: default, llama3)"
                    ),
                }
            }
        };
        // Settings of the HF classes that change the maths and that this engine does not
        // implement: refused, never silently ignored.
        let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            bail!("{o}: unsupported hidden_act '{act}' (supported: silu)");
        }
        match arch {
            Architecture::Llama if flag("attention_bias") => bail!(
                "{o}: attention_bias = true (biases on q/k/v/o projections) is not supported for llama"
            ),
            Architecture::Llama if flag("mlp_bias") => {
                bail!("{o}: mlp_bias = true is not supported")
            }
            Architecture::Qwen2 if flag("use_sliding_window") => {
                bail!("{o}: use_sliding_window = true (sliding-window attention) is not supported")
            }
            _ => {}
        }
        let attention_bias = arch == Architecture::Qwen2;
        let cfg = ModelConfig {
            arch,
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_layers: req("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f("rms_norm_eps", 1e-6)? as f32,
            rope_theta: opt_f("rope_theta", 10000.0)? as f32,
            rope_scaling,
            max_position_embeddings: match v.get("max_position_embeddings") {
                None | Some(Value::Null) => 4096,
                Some(_) => req("max_position_embeddings")?,
            },
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            attention_bias,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Serialises to a HF `config.json` value (tests, and `checkpoint.rs`, which adds the token
    /// ids and the storage dtype). Floats are written as their shortest decimal (`1e-05`, not
    /// `9.999999747378752e-06`), which parses back to the same `f32`.
    pub fn to_hf_value(&self) -> Value {
        let mut v = serde_json::json!({
            "architectures": [match self.arch {
                Architecture::Llama => "LlamaForCausalLM",
                Architecture::Qwen2 => "Qwen2ForCausalLM",
            }],
            "model_type": self.arch.name(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": json_f32(self.rms_norm_eps),
            "rope_theta": json_f32(self.rope_theta),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
        });
        if self.arch == Architecture::Llama {
            v["attention_bias"] = Value::Bool(false);
            v["mlp_bias"] = Value::Bool(false);
        }
        if let Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) = self.rope_scaling
        {
            v["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3",
                "factor": json_f32(factor),
                "low_freq_factor": json_f32(low_freq_factor),
                "high_freq_factor": json_f32(high_freq_factor),
                "original_max_position_embeddings": original_max_position_embeddings,
            });
        }
        v
    }
}

/// An `f32` as the JSON number of its shortest round-tripping decimal: serde_json widens `f32`
/// to `f64` exactly, which writes `1e-5f32` as `9.999999747378752e-06`. Non-finite values
/// (never valid in a config) become `null`, as serde_json writes them.
fn json_f32(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_are_written_as_their_shortest_decimal_and_read_back_exactly() {
        for x in [1e-5f32, 1e-6, 0.1, 100000.0, 1_000_000.0, 8.0, 3.0e-7, 0.3] {
            let v = json_f32(x);
            assert!(serde_json::to_string(&v).unwrap().len() <= 10, "{v}");
            assert_eq!(v.as_f64().unwrap() as f32, x);
        }
        let text = serde_json::to_string(&json_f32(1e-5)).unwrap();
        assert_eq!(text.parse::<f64>().unwrap(), 1e-5, "{text}");
        assert_eq!(json_f32(f32::NAN), Value::Null);
    }
}
