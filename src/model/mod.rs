//! Everything about a checkpoint on disk: its architecture config, its weights (HF safetensors
//! directories and GGUF files, dequantised to f32 in HF layout), its tokenizer and chat template,
//! and where the default model comes from. `random` builds models with a real architecture's
//! shape and random weights in memory (`--model random:PRESET[@SEED]`).
//!
//! `checkpoint` writes a model back out as a HF checkpoint directory (config, safetensors,
//! tokenizer files) that this engine, transformers and vLLM load.

pub mod chat_template;
pub mod checkpoint;
pub mod config;
pub mod fetch;
pub mod gguf;
pub mod hf;
pub mod random;
pub mod safetensors;
pub mod tokenizer;

pub use config::{Architecture, ModelConfig, RopeScaling};
pub use tokenizer::TextTokenizer;

use anyhow::Result;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A dense f32 tensor in host memory, row-major, in Hugging Face layout (a linear layer's
/// weight is `[out_features, in_features]`).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "HostTensor shape/data mismatch"
        );
        Self { shape, data }
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Where a model's weights come from. Every source answers in HF tensor names
/// (`model.layers.3.self_attn.q_proj.weight`) and HF layout, whatever its file format.
pub trait TensorSource: Send + Sync {
    /// HF names of all tensors the source holds.
    fn tensor_names(&self) -> Vec<String>;
    /// Shape (HF layout) of a tensor, without reading its data.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// The tensor dequantised/converted to f32, HF layout. Errors name the file and tensor.
    fn load_f32(&self, name: &str) -> Result<HostTensor>;
    /// Storage types on disk with how many tensors use each (e.g. `{"BF16": 290}`).
    fn dtype_counts(&self) -> BTreeMap<String, usize>;
}

/// Tensors already in host memory under HF names, borrowed: a [`TensorSource`] for weights
/// that never touched a file (random test models, an import of exported weights).
pub struct MemoryTensors<'a> {
    tensors: BTreeMap<&'a str, &'a HostTensor>,
}

impl<'a> MemoryTensors<'a> {
    /// Indexes `tensors` by name; a name given twice is an error.
    pub fn new(tensors: &'a [(String, HostTensor)]) -> Result<Self> {
        let mut map = BTreeMap::new();
        for (name, t) in tensors {
            if map.insert(name.as_str(), t).is_some() {
                anyhow::bail!("tensor '{name}' is given twice");
            }
        }
        Ok(Self { tensors: map })
    }
}

impl TensorSource for MemoryTensors<'_> {
    fn tensor_names(&self) -> Vec<String> {
        self.tensors.keys().map(|n| n.to_string()).collect()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.shape.clone())
    }
    fn load_f32(&self, name: &str) -> Result<HostTensor> {
        self.tensors
            .get(name)
            .map(|&t| t.clone())
            .ok_or_else(|| anyhow::anyhow!("no tensor named '{name}' among the given tensors"))
    }
    fn dtype_counts(&self) -> BTreeMap<String, usize> {
        BTreeMap::from([("F32".to_string(), self.tensors.len())])
    }
}

/// The on-disk format a model was loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFormat {
    HfSafetensors,
    Gguf,
    /// Built in memory with random weights (`random:PRESET[@SEED]`, see [`random`]).
    Random,
}

/// A checkpoint ready to use: config, lazily readable weights and tokenizer.
pub struct LoadedModel {
    pub name: String,
    pub path: PathBuf,
    pub format: ModelFormat,
    pub config: ModelConfig,
    pub weights: Box<dyn TensorSource>,
    pub tokenizer: TextTokenizer,
}

/// Resolves a `--model` argument: `random:PRESET[@SEED]` (a preset's shape with random weights,
/// see [`random`]), a HF checkpoint directory, a `.gguf` file, or the name of a known model (the
/// default, `smollm2-135m-instruct`, is fetched on first use).
pub fn load_model(spec: Option<&str>) -> Result<LoadedModel> {
    let spec = spec.unwrap_or(fetch::DEFAULT_MODEL);
    if let Some(model) = random::load_random_spec(spec) {
        return model;
    }
    let path = Path::new(spec);
    if path.is_dir() {
        hf::load_hf_dir(path)
    } else if path.is_file() {
        gguf::load_gguf_model(path)
    } else if let Some(known) = fetch::known_model(spec) {
        let file = fetch::ensure_model(known)?;
        let mut model = gguf::load_gguf_model(&file)?;
        model.name = known.name.to_string();
        Ok(model)
    } else {
        anyhow::bail!(
            "model '{spec}': no such directory or file, not a known model name (known: {}), \
             and not random:PRESET[@SEED] (presets: {})",
            fetch::known_model_names().join(", "),
            random::preset_names().join(", ")
        )
    }
}
