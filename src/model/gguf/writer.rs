//! [`GgufWriter`]: a small GGUF v3 writer (metadata of every value type, tensors of the
//! supported types) for tests and tools: random-init models and hand-built quantised blocks.

use super::file::{DEFAULT_ALIGNMENT, GGUF_MAGIC, GgufValue, TYPE_U8};
use super::quant::{GgmlType, quantize};
use anyhow::{Context, Result, bail};
use std::collections::HashSet;
use std::path::Path;

/// A tensor waiting to be written.
struct PendingTensor {
    name: String,
    /// GGUF order (innermost first).
    dims: Vec<u64>,
    type_id: u32,
    bytes: Vec<u8>,
}

/// Writes GGUF v3 files: metadata of every value type and tensors of the supported types.
/// Meant for tests and tools (random-init models, hand-built quantised blocks); it does not
/// permute q/k rows by itself (see [`permute_llama_cpp_rows`](super::permute_llama_cpp_rows))
/// nor rename tensors (see [`gguf_tensor_name`](super::gguf_tensor_name)). Data is aligned to
/// `general.alignment` when that key is set (as an integer), else 32.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<PendingTensor>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata key (written in insertion order).
    pub fn add_metadata(
        &mut self,
        key: impl Into<String>,
        value: impl Into<GgufValue>,
    ) -> &mut Self {
        self.metadata.push((key.into(), value.into()));
        self
    }

    /// Adds a tensor from f32 values, converted or quantised to `ggml_type`. `shape` is
    /// row-major (HF order, outermost first); the file stores it reversed.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        data: &[f32],
        ggml_type: GgmlType,
    ) -> Result<&mut Self> {
        let name = name.into();
        if shape.iter().product::<usize>() != data.len() {
            bail!(
                "tensor {name}: shape {shape:?} does not hold {} values",
                data.len()
            );
        }
        if shape.last().copied().unwrap_or(1) % ggml_type.block_len() != 0 {
            bail!(
                "tensor {name}: rows of {:?} elements are not a multiple of the {ggml_type} block \
                 size {}",
                shape.last(),
                ggml_type.block_len()
            );
        }
        let bytes = quantize(ggml_type, data).with_context(|| format!("tensor {name}"))?;
        Ok(self.add_raw_tensor(name, shape, ggml_type.id(), bytes))
    }

    /// Adds a tensor from raw bytes with any ggml type id, unchecked (hand-built blocks, or
    /// deliberately broken files in tests). `shape` is row-major as in [`Self::add_tensor`].
    pub fn add_raw_tensor(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        type_id: u32,
        bytes: Vec<u8>,
    ) -> &mut Self {
        self.tensors.push(PendingTensor {
            name: name.into(),
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            type_id,
            bytes,
        });
        self
    }

    fn alignment(&self) -> Result<usize> {
        match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => Ok(DEFAULT_ALIGNMENT),
            Some((_, v)) => match v.as_u64().and_then(|a| usize::try_from(a).ok()) {
                Some(a) if a.is_power_of_two() => Ok(a),
                _ => bail!("general.alignment must be a power of two, got {v:?}"),
            },
        }
    }

    /// The whole file as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let alignment = self.alignment()?;
        let mut out = Vec::new();
        out.extend_from_slice(GGUF_MAGIC);
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        let mut keys = HashSet::new();
        for (key, value) in &self.metadata {
            if !keys.insert(key.as_str()) {
                bail!("metadata key '{key}' added twice");
            }
            write_string(&mut out, key);
            out.extend(value.type_id().to_le_bytes());
            write_value(&mut out, value).with_context(|| format!("metadata key '{key}'"))?;
        }
        let mut offset = 0usize;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            write_string(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.type_id.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.bytes.len()).div_ceil(alignment) * alignment;
        }
        out.resize(out.len().div_ceil(alignment) * alignment, 0);
        let data_start = out.len();
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + off, 0);
            out.extend_from_slice(&t.bytes);
        }
        Ok(out)
    }

    /// Writes the file.
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = self
            .to_bytes()
            .with_context(|| format!("{}: GGUF writer", path.display()))?;
        std::fs::write(path, bytes).with_context(|| format!("{}: cannot write", path.display()))
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, value: &GgufValue) -> Result<()> {
    match value {
        GgufValue::U8(x) => out.extend(x.to_le_bytes()),
        GgufValue::I8(x) => out.extend(x.to_le_bytes()),
        GgufValue::U16(x) => out.extend(x.to_le_bytes()),
        GgufValue::I16(x) => out.extend(x.to_le_bytes()),
        GgufValue::U32(x) => out.extend(x.to_le_bytes()),
        GgufValue::I32(x) => out.extend(x.to_le_bytes()),
        GgufValue::F32(x) => out.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => write_string(out, s),
        GgufValue::U64(x) => out.extend(x.to_le_bytes()),
        GgufValue::I64(x) => out.extend(x.to_le_bytes()),
        GgufValue::F64(x) => out.extend(x.to_le_bytes()),
        GgufValue::Array(items) => {
            // An empty array is written as an array of u8.
            let element_type = items.first().map_or(TYPE_U8, GgufValue::type_id);
            if items.iter().any(|v| v.type_id() != element_type) {
                bail!("array elements must all have the same type");
            }
            out.extend(element_type.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, item)?;
            }
        }
    }
    Ok(())
}
