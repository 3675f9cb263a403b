//! HF checkpoint directories: `config.json`, `model.safetensors` or sharded weights with
//! `model.safetensors.index.json`, and the tokenizer files.

use super::safetensors::SafetensorsWeights;
use super::{LoadedModel, ModelConfig, ModelFormat, TextTokenizer};
use anyhow::{Result, bail};
use std::path::Path;

pub fn load_hf_dir(dir: &Path) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        bail!("{}: missing config.json", dir.display());
    }
    let config = ModelConfig::from_hf_json(&config_path)?;
    let weights = SafetensorsWeights::open_dir(dir)?;
    let tokenizer = TextTokenizer::from_hf_dir(dir)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    Ok(LoadedModel {
        name,
        path: dir.to_path_buf(),
        format: ModelFormat::HfSafetensors,
        config,
        weights: Box::new(weights),
        tokenizer,
    })
}
