//! Memory plans: what a training configuration holds at its peak, item by item, computed from
//! the model's shape before anything is allocated, so a configuration that cannot fit is
//! refused up front with the numbers instead of failing mid-run.
//!
//! - [`cpu_training_plan`]: the CPU trainer as it is (f32 everywhere): the model's weights,
//!   the f32 master copy the optimizer updates, AdamW's two moments, the gradients on the
//!   backend and their host copy, the activations the backward pass reads, and one chunk of
//!   LM-head logits.
//! - [`gpu_training_plan`]: the GPU trainer's layout (issue 6's design: bf16 working weights,
//!   f32 master weights, moments and gradients, bf16 activations with per-layer recompute),
//!   plus the rollout engine's KV pool; the plan a CUDA `train` will check before it starts.

use crate::model::ModelConfig;
use anyhow::{Result, bail};

/// One line of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryItem {
    pub name: &'static str,
    pub bytes: u64,
    /// How the figure was counted.
    pub note: String,
}

/// What a configuration needs at its peak.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// What is planned ("CPU training of ...").
    pub what: String,
    pub items: Vec<MemoryItem>,
}

const GIB: f64 = (1u64 << 30) as f64;

impl MemoryPlan {
    pub fn total(&self) -> u64 {
        self.items.iter().map(|i| i.bytes).sum()
    }

    /// The plan as a table, GiB per item.
    pub fn table(&self) -> String {
        let mut out = format!("{}:\n", self.what);
        for i in &self.items {
            out.push_str(&format!(
                "  {:<26} {:>9.2} GiB  ({})\n",
                i.name,
                i.bytes as f64 / GIB,
                i.note
            ));
        }
        out.push_str(&format!(
            "  {:<26} {:>9.2} GiB\n",
            "total",
            self.total() as f64 / GIB
        ));
        out
    }

    /// An error with the whole table when the plan needs more than `available` bytes of
    /// `memory` (e.g. "host memory available").
    pub fn check(&self, available: u64, memory: &str) -> Result<()> {
        if self.total() > available {
            bail!(
                "this configuration needs {:.2} GiB but {memory} is {:.2} GiB:\n{}",
                self.total() as f64 / GIB,
                available as f64 / GIB,
                self.table()
            );
        }
        Ok(())
    }
}

/// The batch a training step runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainShape {
    /// Tokens in one forward/backward pass (a micro-batch).
    pub tokens: usize,
    /// Rows of LM-head logits held at once by the fused log-prob gathering.
    pub logit_rows: usize,
}

/// Parameters and the extra LM-head copy a tied model holds on a backend.
fn params(c: &ModelConfig) -> (u64, u64) {
    let p = c.num_parameters() as u64;
    let tied_copy = if c.tie_word_embeddings {
        (c.vocab_size * c.hidden_size) as u64
    } else {
        0
    };
    (p, tied_copy)
}

/// Values saved per token and layer for backward (see `transformer::train`): the residual
/// stream entering the layer and after attention, q, k, v, the attention output, the fused
/// gate/up projection and SwiGLU's output.
fn saved_per_token_layer(c: &ModelConfig) -> u64 {
    let h = c.hidden_size;
    let q = c.num_heads * c.head_dim;
    let kv = c.num_kv_heads * c.head_dim;
    (2 * h + q + 2 * kv + q + 3 * c.intermediate_size) as u64
}

/// [`saved_per_token_layer`] on the GPU, in bf16 values: also the attention's f32
/// log-sum-exp per head (two bf16 values each), which the tensor-core backward reads.
fn gpu_saved_per_token_layer(c: &ModelConfig) -> u64 {
    saved_per_token_layer(c) + 2 * c.num_heads as u64
}

/// The CPU trainer's peak (all f32).
pub fn cpu_training_plan(c: &ModelConfig, s: TrainShape) -> MemoryPlan {
    let (p, tied) = params(c);
    let f = 4u64;
    let tokens = s.tokens as u64;
    MemoryPlan {
        what: format!(
            "CPU training ({} parameters, {} tokens per pass)",
            p, s.tokens
        ),
        items: vec![
            MemoryItem {
                name: "model weights",
                bytes: (p + tied) * f,
                note: "f32; a tied LM head is held twice".into(),
            },
            MemoryItem {
                name: "master weights",
                bytes: p * f,
                note: "f32 copy the optimizer updates".into(),
            },
            MemoryItem {
                name: "AdamW moments",
                bytes: 2 * p * f,
                note: "m and v, f32".into(),
            },
            MemoryItem {
                name: "gradients",
                bytes: 2 * p * f,
                note: "f32 on the backend and their host copy".into(),
            },
            MemoryItem {
                name: "saved activations",
                bytes: tokens * c.num_layers as u64 * saved_per_token_layer(c) * f,
                note: format!(
                    "{} values per token and layer, f32",
                    saved_per_token_layer(c)
                ),
            },
            MemoryItem {
                name: "logits chunk",
                bytes: 2 * (s.logit_rows * c.vocab_size) as u64 * f,
                note: format!("{} rows x vocab, forward and backward", s.logit_rows),
            },
        ],
    }
}

/// The GPU trainer's peak: bf16 working weights (the rollout engine samples with them), f32
/// master weights, moments and gradients, bf16 activations of one micro-batch (every layer's
/// saved, or with per-layer `recompute` the layer inputs kept and one layer's activations
/// live), a logits chunk, the KV pool of `kv_tokens`, and the cuBLASLt workspace.
pub fn gpu_training_plan(
    c: &ModelConfig,
    s: TrainShape,
    kv_tokens: usize,
    recompute: bool,
) -> MemoryPlan {
    let (p, tied) = params(c);
    let tokens = s.tokens as u64;
    let kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 2;
    MemoryPlan {
        what: format!(
            "GPU training ({} parameters, {} tokens per pass, KV pool of {kv_tokens} tokens)",
            p, s.tokens
        ),
        items: vec![
            MemoryItem {
                name: "working weights",
                bytes: (p + tied) * 2,
                note: "bf16, shared with the rollout engine".into(),
            },
            MemoryItem {
                name: "master weights",
                bytes: p * 4,
                note: "f32".into(),
            },
            MemoryItem {
                name: "AdamW moments",
                bytes: 2 * p * 4,
                note: "m and v, f32".into(),
            },
            MemoryItem {
                name: "gradients",
                bytes: p * 4,
                note: "f32 accumulation".into(),
            },
            if recompute {
                MemoryItem {
                    name: "activations",
                    bytes: (tokens * c.num_layers as u64 * c.hidden_size as u64
                        + tokens * gpu_saved_per_token_layer(c))
                        * 2,
                    note: "bf16: every layer's input, one layer recomputed at a time".into(),
                }
            } else {
                MemoryItem {
                    name: "activations",
                    bytes: tokens * c.num_layers as u64 * gpu_saved_per_token_layer(c) * 2,
                    note: format!(
                        "bf16: {} values per token and layer, every layer saved",
                        gpu_saved_per_token_layer(c)
                    ),
                }
            },
            MemoryItem {
                name: "logits chunk",
                bytes: 2 * (s.logit_rows * c.vocab_size) as u64 * 4,
                note: format!("{} rows x vocab, f32, forward and backward", s.logit_rows),
            },
            MemoryItem {
                name: "backward working set",
                bytes: tokens * (4 * c.intermediate_size + 6 * c.hidden_size) as u64 * 2,
                note: "bf16: one layer's short-lived gradients (the MLP's the largest; the attention backward's f32 per-head dk/dv shares, 8 x q width bytes per token, are smaller)".into(),
            },
            MemoryItem {
                name: "KV pool",
                bytes: (kv_tokens * kv_per_token) as u64,
                note: format!("{kv_per_token} bytes per token, bf16"),
            },
            MemoryItem {
                name: "workspace",
                bytes: 32 << 20,
                note: "cuBLASLt".into(),
            },
        ],
    }
}

/// Host memory the process may still take (`MemAvailable` of /proc/meminfo), where known.
pub fn host_memory_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Architecture, ModelConfig};

    fn qwen(hidden: usize, inter: usize, layers: usize, heads: usize, kv: usize) -> ModelConfig {
        ModelConfig {
            arch: Architecture::Qwen2,
            vocab_size: 151936,
            hidden_size: hidden,
            intermediate_size: inter,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: 128,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            rope_scaling: None,
            max_position_embeddings: 32768,
            tie_word_embeddings: true,
            attention_bias: true,
        }
    }

    #[test]
    fn qwen25_3b_aco_step_fits_one_80gb_h100_and_7b_does_not() {
        let shape = TrainShape {
            tokens: 8 * 1024,
            logit_rows: 1024,
        };
        // Qwen2.5-3B: hidden 2048, FFN 11008, 36 layers, 16 heads / 2 KV heads of 128.
        let b3 = qwen(2048, 11008, 36, 16, 2);
        let plan = gpu_training_plan(&b3, shape, 1 << 16, true);
        let h100 = 80 * (1u64 << 30);
        assert!(plan.total() > 3_000_000_000 * 16, "{}", plan.table());
        plan.check(h100, "the H100's memory").unwrap();
        // Qwen2.5-7B: hidden 3584, FFN 18944, 28 layers, 28 heads / 4 KV heads of 128.
        let b7 = ModelConfig {
            tie_word_embeddings: false,
            ..qwen(3584, 18944, 28, 28, 4)
        };
        let e = gpu_training_plan(&b7, shape, 1 << 16, true)
            .check(h100, "the H100's memory")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs") && e.contains("master weights"), "{e}");
        assert!(e.contains("80.00 GiB"), "{e}");
        // Without recompute the 3B's saved activations alone are ~16 GiB more.
        let saving = gpu_training_plan(&b3, shape, 0, false);
        let recomputing = gpu_training_plan(&b3, shape, 0, true);
        assert!(saving.total() > recomputing.total() + (10u64 << 30));
    }

    #[test]
    fn cpu_plan_counts_every_copy() {
        let c = qwen(64, 96, 2, 4, 2);
        let p = c.num_parameters() as u64;
        let plan = cpu_training_plan(
            &c,
            TrainShape {
                tokens: 100,
                logit_rows: 10,
            },
        );
        let by = |n: &str| plan.items.iter().find(|i| i.name == n).unwrap().bytes;
        assert_eq!(by("master weights"), 4 * p);
        assert_eq!(by("AdamW moments"), 8 * p);
        assert_eq!(by("model weights"), 4 * (p + 151936 * 64));
        assert_eq!(by("logits chunk"), 2 * 10 * 151936 * 4);
        assert_eq!(
            plan.total(),
            plan.items.iter().map(|i| i.bytes).sum::<u64>()
        );
        assert!(plan.check(u64::MAX, "memory").is_ok());
        let e = plan
            .check(1000, "host memory available")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("host memory available") && e.contains("total"),
            "{e}"
        );
    }

    #[test]
    fn meminfo_is_read_on_linux() {
        if std::path::Path::new("/proc/meminfo").exists() {
            assert!(host_memory_available().unwrap() > 0);
        }
    }
}
