//! safetensors files: memory-mapped, header validated against the file before any tensor is
//! read, tensors converted to f32 on demand. Also a small writer (tests, checkpoints).
//!
//! Format: `u64` little-endian header length N, N bytes of JSON
//! `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the
//! data; offsets are relative to the end of the header.

use super::{HostTensor, TensorSource};
use anyhow::{Context, Result, bail};
use memmap2::Mmap;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Storage types the engine reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
        }
    }
}

/// Dtypes safetensors defines that the engine does not load (named in errors as unsupported,
/// as opposed to strings that are no dtype at all).
const KNOWN_UNSUPPORTED: &[&str] = &[
    "F64", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
    "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64",
];

#[derive(Debug, Clone)]
struct TensorEntry {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// One memory-mapped safetensors file with a validated header.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    tensors: BTreeMap<String, TensorEntry>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let p = path.display();
        let file = File::open(path).with_context(|| format!("{p}: cannot open"))?;
        // SAFETY: the map is read-only; a file truncated underneath us is outside our control,
        // as for every mmap-based loader.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("{p}: cannot map"))?;
        let len = mmap.len();
        if len < 8 {
            bail!("{p}: truncated safetensors file ({len} bytes, the header length alone is 8)");
        }
        let header_len = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes")) as usize;
        if header_len > len - 8 {
            bail!(
                "{p}: truncated safetensors file: header says {header_len} bytes of JSON but only {} follow",
                len - 8
            );
        }
        let header: Value = serde_json::from_slice(&mmap[8..8 + header_len])
            .with_context(|| format!("{p}: safetensors header is not valid JSON"))?;
        let obj = header
            .as_object()
            .with_context(|| format!("{p}: safetensors header is not a JSON object"))?;
        let data_start = 8 + header_len;
        let data_len = len - data_start;
        let mut tensors = BTreeMap::new();
        for (name, info) in obj {
            if name == "__metadata__" {
                continue;
            }
            let entry = parse_entry(info, data_start, data_len)
                .with_context(|| format!("{p}: tensor '{name}'"))?;
            tensors.insert(name.clone(), entry);
        }
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// One tensor converted to f32.
    pub fn load(&self, name: &str) -> Result<HostTensor> {
        let e = self
            .tensors
            .get(name)
            .with_context(|| format!("{}: no tensor '{name}'", self.path.display()))?;
        let bytes = &self.mmap[e.start..e.end];
        let data: Vec<f32> = match e.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        };
        Ok(HostTensor::new(e.shape.clone(), data))
    }
}

fn parse_entry(info: &Value, data_start: usize, data_len: usize) -> Result<TensorEntry> {
    let dtype_str = info
        .get("dtype")
        .and_then(Value::as_str)
        .context("missing 'dtype'")?;
    let dtype = match dtype_str {
        "F32" => Dtype::F32,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        s if KNOWN_UNSUPPORTED.contains(&s) => {
            bail!("unsupported dtype {s} (supported: F32, F16, BF16)")
        }
        s => bail!("unknown dtype '{s}' (supported: F32, F16, BF16)"),
    };
    let shape: Vec<usize> = info
        .get("shape")
        .and_then(Value::as_array)
        .context("missing 'shape'")?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<_>>()
        .context("'shape' must be a list of non-negative integers")?;
    let offsets = info
        .get("data_offsets")
        .and_then(Value::as_array)
        .context("missing 'data_offsets'")?;
    let (begin, end) = match offsets.as_slice() {
        [b, e] => (
            b.as_u64().context("'data_offsets' must be integers")? as usize,
            e.as_u64().context("'data_offsets' must be integers")? as usize,
        ),
        _ => bail!("'data_offsets' must be [begin, end]"),
    };
    if begin > end || end > data_len {
        bail!(
            "data_offsets [{begin}, {end}] point past the end of the data ({data_len} bytes): the file is truncated or the header is corrupt"
        );
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .context("shape overflows")?;
    let want = numel.checked_mul(dtype.size()).context("shape overflows")?;
    if end - begin != want {
        bail!(
            "shape {shape:?} of {} needs {want} bytes but data_offsets span {}",
            dtype.name(),
            end - begin
        );
    }
    Ok(TensorEntry {
        dtype,
        shape,
        start: data_start + begin,
        end: data_start + end,
    })
}

/// All tensors of a checkpoint, from one file or several shards.
pub struct SafetensorsWeights {
    files: Vec<Arc<SafetensorsFile>>,
    index: HashMap<String, usize>,
}

impl SafetensorsWeights {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("{}: cannot read", index_path.display()))?;
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", index_path.display()))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .with_context(|| {
                    format!("{}: missing object 'weight_map'", index_path.display())
                })?;
            let mut shard_ids: HashMap<String, usize> = HashMap::new();
            let mut files = Vec::new();
            let mut index = HashMap::new();
            for (name, shard) in map {
                let shard = shard.as_str().with_context(|| {
                    format!(
                        "{}: weight_map entry '{name}' is not a file name",
                        index_path.display()
                    )
                })?;
                let id = match shard_ids.get(shard) {
                    Some(&id) => id,
                    None => {
                        let f = SafetensorsFile::open(&dir.join(shard))?;
                        files.push(Arc::new(f));
                        shard_ids.insert(shard.to_string(), files.len() - 1);
                        files.len() - 1
                    }
                };
                if !files[id].tensors.contains_key(name) {
                    bail!(
                        "{}: index says tensor '{name}' is in {shard}, but that file has no such tensor",
                        index_path.display()
                    );
                }
                index.insert(name.clone(), id);
            }
            Ok(Self { files, index })
        } else if single.is_file() {
            let f = SafetensorsFile::open(&single)?;
            let index = f.names().map(|n| (n.clone(), 0)).collect();
            Ok(Self {
                files: vec![Arc::new(f)],
                index,
            })
        } else {
            bail!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            )
        }
    }
}

impl TensorSource for SafetensorsWeights {
    fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let f = &self.files[*self.index.get(name)?];
        f.tensors.get(name).map(|e| e.shape.clone())
    }
    fn load_f32(&self, name: &str) -> Result<HostTensor> {
        let id = self
            .index
            .get(name)
            .with_context(|| format!("checkpoint has no tensor '{name}'"))?;
        self.files[*id].load(name)
    }
    fn dtype_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (name, id) in &self.index {
            if let Some(e) = self.files[*id].tensors.get(name) {
                *m.entry(e.dtype.name().to_string()).or_default() += 1;
            }
        }
        m
    }
}

/// Writes tensors to a safetensors file atomically (temp file, then rename).
pub fn write_safetensors(path: &Path, tensors: &[(&str, &HostTensor)], dtype: Dtype) -> Result<()> {
    write_safetensors_with_metadata(path, tensors, dtype, &[])
}

/// [`write_safetensors`] with a `__metadata__` string map in the header (omitted when empty).
/// transformers refuses files whose metadata lacks `"format": "pt"`, so checkpoints pass it.
/// The file is fsynced before it is renamed into place; errors name the file.
pub fn write_safetensors_with_metadata(
    path: &Path,
    tensors: &[(&str, &HostTensor)],
    dtype: Dtype,
    metadata: &[(&str, &str)],
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta: serde_json::Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        header.insert("__metadata__".to_string(), Value::Object(meta));
    }
    let mut offset = 0usize;
    for (name, t) in tensors {
        if header.contains_key(*name) {
            bail!("{}: tensor '{name}' given twice", path.display());
        }
        let n = t.numel() * dtype.size();
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype.name(), "shape": t.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut header_bytes = serde_json::to_vec(&Value::Object(header))?;
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }
    let tmp = path.with_extension("safetensors.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(File::create(&tmp)?);
        f.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
        f.write_all(&header_bytes)?;
        let mut bytes = Vec::with_capacity(CHUNK * dtype.size());
        for (_, t) in tensors {
            for chunk in t.data.chunks(CHUNK) {
                bytes.clear();
                for &x in chunk {
                    match dtype {
                        Dtype::F32 => bytes.extend_from_slice(&x.to_le_bytes()),
                        Dtype::F16 => {
                            bytes.extend_from_slice(&half::f16::from_f32(x).to_le_bytes())
                        }
                        Dtype::BF16 => {
                            bytes.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes())
                        }
                    }
                }
                f.write_all(&bytes)?;
            }
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(anyhow::Error::new(e).context(format!("{}: cannot write", tmp.display())));
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot move into place", path.display()))?;
    Ok(())
}

/// Values converted per buffered write by [`write_safetensors_with_metadata`].
const CHUNK: usize = 1 << 16;
