//! [`GgufWeights`]: a [`TensorSource`] answering in HF names and HF layout. Owns the GGUF <-> HF
//! tensor name mapping and llama.cpp's q/k row permutation: its converter stores LLaMA q/k
//! projection rows interleaved for its own RoPE kernel; they are un-permuted here back to HF's
//! rotate-half layout ([`unpermute_llama_cpp_rows`]).

use super::file::{GgufFile, GgufTensorInfo};
use crate::model::config::{Architecture, ModelConfig};
use crate::model::{HostTensor, TensorSource};
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Per-layer tensors: GGUF stem (after `blk.N.`) and HF stem (after `model.layers.N.`).
const LAYER_TENSOR_NAMES: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Whole-model tensors: GGUF name and HF name.
const GLOBAL_TENSOR_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// The HF name of a GGUF tensor (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`),
/// or `None` for tensors the transformer does not use (`rope_freqs.weight`, ...).
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    if let Some((_, hf)) = GLOBAL_TENSOR_NAMES.iter().find(|(g, _)| *g == gguf_name) {
        return Some(hf.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (stem, suffix) = rest.split_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (_, hf_stem) = LAYER_TENSOR_NAMES.iter().find(|(g, _)| *g == stem)?;
    Some(format!("model.layers.{layer}.{hf_stem}.{suffix}"))
}

/// The GGUF name of a HF tensor; the inverse of [`hf_tensor_name`] (for writers).
pub fn gguf_tensor_name(hf_name: &str) -> Option<String> {
    if let Some((g, _)) = GLOBAL_TENSOR_NAMES.iter().find(|(_, h)| *h == hf_name) {
        return Some(g.to_string());
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (stem, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (gguf_stem, _) = LAYER_TENSOR_NAMES.iter().find(|(_, h)| *h == stem)?;
    Some(format!("blk.{layer}.{gguf_stem}.{suffix}"))
}

/// For each HF row, the row where llama.cpp's converter stored it. The converter does
/// `w.reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2).reshape(rows, cols)`, so HF row
/// `h * D + s * D/2 + i` (head `h`, half `s`, index `i`, `D = rows / n_head`) is stored at row
/// `h * D + 2 * i + s`.
fn llama_cpp_row_positions(rows: usize, n_head: usize) -> Result<Vec<usize>> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        bail!("{rows} rows cannot be split into {n_head} heads of two halves");
    }
    let head_rows = rows / n_head;
    let half = head_rows / 2;
    let mut positions = Vec::with_capacity(rows);
    for h in 0..n_head {
        for s in 0..2 {
            for i in 0..half {
                positions.push(h * head_rows + 2 * i + s);
            }
        }
    }
    Ok(positions)
}

/// Undoes llama.cpp's q/k row permutation: `data` is `[rows, cols]` row-major as stored in a
/// LLaMA GGUF; the result is HF's rotate-half layout. `n_head` is the number of attention heads
/// for q_proj and of KV heads for k_proj. Biases are `[rows, 1]`.
pub fn unpermute_llama_cpp_rows(
    data: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Result<Vec<f32>> {
    if rows.checked_mul(cols) != Some(data.len()) {
        bail!("{} values are not a [{rows}, {cols}] matrix", data.len());
    }
    let positions = llama_cpp_row_positions(rows, n_head)?;
    let mut out = Vec::with_capacity(data.len());
    for &stored in &positions {
        out.extend_from_slice(&data[stored * cols..(stored + 1) * cols]);
    }
    Ok(out)
}

/// Applies llama.cpp's q/k row permutation to an HF-layout `[rows, cols]` matrix (what its
/// converter does); the inverse of [`unpermute_llama_cpp_rows`]. For writers of LLaMA GGUFs.
pub fn permute_llama_cpp_rows(
    data: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Result<Vec<f32>> {
    if rows.checked_mul(cols) != Some(data.len()) {
        bail!("{} values are not a [{rows}, {cols}] matrix", data.len());
    }
    let positions = llama_cpp_row_positions(rows, n_head)?;
    let mut out = vec![0.0f32; data.len()];
    for (hf_row, &stored) in positions.iter().enumerate() {
        out[stored * cols..(stored + 1) * cols]
            .copy_from_slice(&data[hf_row * cols..(hf_row + 1) * cols]);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Weights as a TensorSource
// ---------------------------------------------------------------------------------------------

struct MappedTensor {
    /// Index into the file's tensor table.
    index: usize,
    /// `Some(n_head)` when the rows were permuted by llama.cpp's converter.
    permuted_heads: Option<usize>,
}

/// A GGUF file's weights in HF names and layout, dequantised to f32 on demand.
pub struct GgufWeights {
    file: Arc<GgufFile>,
    by_hf_name: BTreeMap<String, MappedTensor>,
}

impl GgufWeights {
    /// Maps the file's tensors to HF names. `config` gives the architecture and head counts that
    /// decide the q/k un-permutation (LLaMA only; Qwen2 GGUFs are stored unpermuted).
    pub fn new(file: Arc<GgufFile>, config: &ModelConfig) -> Result<Self> {
        let p = file.path().display();
        let mut by_hf_name = BTreeMap::new();
        for (index, info) in file.tensors().iter().enumerate() {
            let Some(hf_name) = hf_tensor_name(&info.name) else {
                continue;
            };
            let heads = if hf_name.contains(".self_attn.q_proj.") {
                Some(config.num_heads)
            } else if hf_name.contains(".self_attn.k_proj.") {
                Some(config.num_kv_heads)
            } else {
                None
            };
            let permuted_heads = heads.filter(|_| config.arch == Architecture::Llama);
            if let Some(n_head) = permuted_heads {
                let rows = info.hf_shape().first().copied().unwrap_or(0);
                if rows != n_head * config.head_dim {
                    bail!(
                        "{p}: tensor {} has {rows} rows, expected {n_head} heads x head_dim {} = {}",
                        info.name,
                        config.head_dim,
                        n_head * config.head_dim
                    );
                }
            }
            by_hf_name.insert(
                hf_name,
                MappedTensor {
                    index,
                    permuted_heads,
                },
            );
        }
        Ok(Self { file, by_hf_name })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The GGUF tensor behind an HF name.
    pub fn gguf_info(&self, hf_name: &str) -> Option<&GgufTensorInfo> {
        self.by_hf_name
            .get(hf_name)
            .map(|m| &self.file.tensors()[m.index])
    }
}

impl TensorSource for GgufWeights {
    fn tensor_names(&self) -> Vec<String> {
        self.by_hf_name.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.gguf_info(name).map(GgufTensorInfo::hf_shape)
    }

    fn load_f32(&self, name: &str) -> Result<HostTensor> {
        let p = self.file.path().display();
        let mapped = self
            .by_hf_name
            .get(name)
            .with_context(|| format!("{p}: no tensor {name} in this GGUF file"))?;
        let info = &self.file.tensors()[mapped.index];
        let context = || format!("{p}: tensor {name} ({} in the file)", info.name);
        let mut data = self.file.read_f32(&info.name).with_context(context)?;
        let shape = info.hf_shape();
        if let Some(n_head) = mapped.permuted_heads {
            let rows = shape.first().copied().unwrap_or(1);
            let cols = shape.iter().skip(1).product();
            data = unpermute_llama_cpp_rows(&data, rows, cols, n_head).with_context(context)?;
        }
        Ok(HostTensor::new(shape, data))
    }

    /// GGUF type names of the tensors this source answers for.
    fn dtype_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for m in self.by_hf_name.values() {
            let ty = self.file.tensors()[m.index].ggml_type;
            *counts.entry(ty.name().to_string()).or_insert(0) += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_round_trips() {
        let (rows, cols) = (12, 3);
        let data: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let permuted = permute_llama_cpp_rows(&data, rows, cols, 2).unwrap();
        assert_ne!(permuted, data);
        assert_eq!(
            unpermute_llama_cpp_rows(&permuted, rows, cols, 2).unwrap(),
            data
        );
        assert!(unpermute_llama_cpp_rows(&data, rows, cols, 5).is_err());
    }

    #[test]
    fn names_map_both_ways() {
        assert_eq!(
            hf_tensor_name("blk.12.attn_q.bias").as_deref(),
            Some("model.layers.12.self_attn.q_proj.bias")
        );
        assert_eq!(hf_tensor_name("rope_freqs.weight"), None);
        assert_eq!(hf_tensor_name("blk.x.attn_q.weight"), None);
        for (g, _) in GLOBAL_TENSOR_NAMES {
            assert_eq!(
                gguf_tensor_name(&hf_tensor_name(g).unwrap()).as_deref(),
                Some(g)
            );
        }
        for (stem, _) in LAYER_TENSOR_NAMES {
            let g = format!("blk.7.{stem}.weight");
            assert_eq!(gguf_tensor_name(&hf_tensor_name(&g).unwrap()), Some(g));
        }
    }
}
