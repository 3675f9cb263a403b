//! GGUF (v2/v3) model files, as written by llama.cpp's converters.
//!
//! What this module owns, one file per concern:
//!
//! - `quant.rs`: [`GgmlType`], the tensor storage types the engine reads (F32, F16, BF16, Q8_0,
//!   Q4_0, Q4_1) and their block layouts; [`dequantize`] turns their bytes into f32 exactly as
//!   ggml defines them (large tensors in parallel with rayon); [`quantize`] applies ggml's
//!   reference quantisers (for tests and tools).
//! - `file.rs`: [`GgufValue`] and [`GgufFile`], a memory-mapped, fully bounds-checked reader of
//!   the header, the metadata (every value type, nested arrays included) and the tensor table.
//!   Any input, however corrupt, gives an error that names the file and the problem; nothing
//!   panics.
//! - `weights.rs`: [`GgufWeights`], a [`TensorSource`](crate::model::TensorSource) answering in
//!   HF names and HF layout. llama.cpp's converter stores LLaMA q/k projection rows interleaved
//!   for its own RoPE kernel; they are un-permuted here back to HF's rotate-half layout
//!   ([`unpermute_llama_cpp_rows`]).
//! - `config.rs` and `tokenizer.rs`: [`config_from_gguf`] and [`tokenizer_from_gguf`], the
//!   [`ModelConfig`](crate::model::ModelConfig) and the byte-level BPE
//!   [`TextTokenizer`](crate::model::TextTokenizer) (with its chat template) rebuilt from
//!   metadata.
//! - `mod.rs` (here): [`load_gguf_model`], all of the above as a [`LoadedModel`], and the
//!   public surface (re-exports).
//! - `writer.rs`: [`GgufWriter`], a small writer (v3), for tests and tools (random-init models,
//!   hand-built blocks).
//!
//! Shapes: GGUF lists a tensor's dimensions innermost first (`ne[0]` is the row length), so the
//! HF (row-major) shape is the GGUF dimension list reversed, and the bytes are already in HF
//! row-major order.

mod config;
mod file;
mod quant;
mod tokenizer;
mod weights;
mod writer;

pub use config::config_from_gguf;
pub use file::{GgufFile, GgufTensorInfo, GgufValue};
pub use quant::{GgmlType, QK, dequantize, ggml_type_name, quantize};
pub use tokenizer::tokenizer_from_gguf;
pub use weights::{
    GgufWeights, gguf_tensor_name, hf_tensor_name, permute_llama_cpp_rows, unpermute_llama_cpp_rows,
};
pub use writer::GgufWriter;

use super::{LoadedModel, ModelFormat};
use anyhow::Result;
use config::check_tensor_shapes;
use std::path::Path;
use std::sync::Arc;

/// Loads a GGUF file as a model (config, weights in HF names and layout, tokenizer).
pub fn load_gguf_model(path: &Path) -> Result<LoadedModel> {
    load_gguf_file(GgufFile::open(path)?)
}

/// [`load_gguf_model`] for a file already opened (or parsed from memory).
pub fn load_gguf_file(file: GgufFile) -> Result<LoadedModel> {
    let file = Arc::new(file);
    let path = file.path().to_path_buf();
    let config = config_from_gguf(&file)?;
    let tokenizer = tokenizer_from_gguf(&file)?;
    let weights = GgufWeights::new(file, &config)?;
    check_tensor_shapes(&path, &config, &weights)?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    Ok(LoadedModel {
        name,
        path,
        format: ModelFormat::Gguf,
        config,
        weights: Box::new(weights),
        tokenizer,
    })
}
