//! The GGUF reader: [`GgufValue`] (metadata values) and [`GgufFile`], a memory-mapped, fully
//! bounds-checked reader of the header, the metadata (every value type, nested arrays included)
//! and the tensor table. Any input, however corrupt, gives an error that names the file and the
//! problem; nothing panics.

use super::quant::{GgmlType, dequantize, ggml_type_name, supported_type_list};
use anyhow::{Context, Result, anyhow, bail};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// One metadata value. GGUF arrays hold values of a single type (arrays of arrays included).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

pub(super) const TYPE_U8: u32 = 0;
const TYPE_I8: u32 = 1;
const TYPE_U16: u32 = 2;
const TYPE_I16: u32 = 3;
const TYPE_U32: u32 = 4;
const TYPE_I32: u32 = 5;
const TYPE_F32: u32 = 6;
const TYPE_BOOL: u32 = 7;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;
const TYPE_U64: u32 = 10;
const TYPE_I64: u32 = 11;
const TYPE_F64: u32 = 12;

/// Arrays nest at most this deep (real files use one level; the limit keeps corrupt input from
/// exhausting the stack).
const MAX_ARRAY_DEPTH: usize = 8;

impl GgufValue {
    /// The GGUF value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => TYPE_U8,
            GgufValue::I8(_) => TYPE_I8,
            GgufValue::U16(_) => TYPE_U16,
            GgufValue::I16(_) => TYPE_I16,
            GgufValue::U32(_) => TYPE_U32,
            GgufValue::I32(_) => TYPE_I32,
            GgufValue::F32(_) => TYPE_F32,
            GgufValue::Bool(_) => TYPE_BOOL,
            GgufValue::String(_) => TYPE_STRING,
            GgufValue::Array(_) => TYPE_ARRAY,
            GgufValue::U64(_) => TYPE_U64,
            GgufValue::I64(_) => TYPE_I64,
            GgufValue::F64(_) => TYPE_F64,
        }
    }

    /// The value type's name (`"u32"`, `"string"`, `"array"`), for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }

    /// Any integer value as i128 (every GGUF integer type fits).
    fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(x) => x.into(),
            GgufValue::I8(x) => x.into(),
            GgufValue::U16(x) => x.into(),
            GgufValue::I16(x) => x.into(),
            GgufValue::U32(x) => x.into(),
            GgufValue::I32(x) => x.into(),
            GgufValue::U64(x) => x.into(),
            GgufValue::I64(x) => x.into(),
            _ => return None,
        })
    }

    /// An integer value of any width that is non-negative and fits in u64.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_integer().and_then(|x| u64::try_from(x).ok())
    }

    /// An integer value of any width that fits in i64.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_integer().and_then(|x| i64::try_from(x).ok())
    }

    /// A float, or an integer converted to one.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(x) => Some(x.into()),
            GgufValue::F64(x) => Some(x),
            _ => self.as_integer().map(|x| x as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

macro_rules! value_from {
    ($($t:ty => $v:ident),* $(,)?) => {
        $(impl From<$t> for GgufValue {
            fn from(x: $t) -> Self {
                GgufValue::$v(x)
            }
        })*
    };
}
value_from!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
    bool => Bool, String => String, u64 => U64, i64 => I64, f64 => F64);

impl From<&str> for GgufValue {
    fn from(s: &str) -> Self {
        GgufValue::String(s.to_string())
    }
}

impl<T: Into<GgufValue>> From<Vec<T>> for GgufValue {
    fn from(v: Vec<T>) -> Self {
        GgufValue::Array(v.into_iter().map(Into::into).collect())
    }
}

// ---------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// The GGUF tensor name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions as GGUF stores them, innermost (`ne[0]`, the row length) first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    pub n_elements: usize,
    pub n_bytes: usize,
}

impl GgufTensorInfo {
    /// Row-major (HF) shape: the GGUF dimensions reversed.
    pub fn hf_shape(&self) -> Vec<usize> {
        // Every dimension fits in usize: their product was checked when the file was opened.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A memory-mapped GGUF file with its metadata and tensor table parsed and checked: every
/// tensor's data lies inside the file and has a supported type.
pub struct GgufFile {
    path: PathBuf,
    bytes: FileBytes,
    version: u32,
    alignment: usize,
    data_offset: usize,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// The bytes of a GGUF file: memory-mapped, or owned (files parsed from memory).
enum FileBytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}

pub(super) const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub(super) const DEFAULT_ALIGNMENT: usize = 32;
/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;

/// A bounds-checked little-endian cursor over the file's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn fmt::Display) -> Result<&'a [u8]> {
        if n > self.remaining() {
            bail!(
                "{}: file is truncated: {} needs {} bytes at offset {}, but the file ends at {}",
                self.path.display(),
                what,
                n,
                self.pos,
                self.bytes.len()
            );
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &dyn fmt::Display) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &dyn fmt::Display) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn fmt::Display) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Checks that `count` items of at least `min_bytes_each` bytes can fit in the rest of the
    /// file, so that corrupt counts never drive huge allocations.
    fn count(&self, count: u64, min_bytes_each: usize, what: &dyn fmt::Display) -> Result<usize> {
        let fits = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(min_bytes_each).map(|b| (c, b)))
            .filter(|&(_, b)| b <= self.remaining());
        match fits {
            Some((c, _)) => Ok(c),
            None => bail!(
                "{}: corrupt or truncated file: {} count {} at offset {} cannot fit in the {} \
                 bytes that remain",
                self.path.display(),
                what,
                count,
                self.pos,
                self.remaining()
            ),
        }
    }

    fn string(&mut self, what: &dyn fmt::Display) -> Result<String> {
        let len = self.u64(what)?;
        let len = self.count(len, 1, &format_args!("string length of {what}"))?;
        let at = self.pos;
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => bail!(
                "{}: {} at offset {} is not valid UTF-8 ({e})",
                self.path.display(),
                what,
                at
            ),
        }
    }

    /// Minimum encoded size of one value of type `value_type` (for count checks).
    fn min_value_bytes(value_type: u32) -> usize {
        match value_type {
            TYPE_U8 | TYPE_I8 | TYPE_BOOL => 1,
            TYPE_U16 | TYPE_I16 => 2,
            TYPE_U32 | TYPE_I32 | TYPE_F32 => 4,
            TYPE_STRING => 8,
            TYPE_ARRAY => 12,
            _ => 8,
        }
    }

    fn value(
        &mut self,
        value_type: u32,
        what: &dyn fmt::Display,
        depth: usize,
    ) -> Result<GgufValue> {
        Ok(match value_type {
            TYPE_U8 => GgufValue::U8(u8::from_le_bytes(self.array(what)?)),
            TYPE_I8 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            TYPE_U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            TYPE_I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            TYPE_U32 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            TYPE_I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            TYPE_F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            TYPE_U64 => GgufValue::U64(u64::from_le_bytes(self.array(what)?)),
            TYPE_I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            TYPE_F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            TYPE_BOOL => {
                let at = self.pos;
                match self.array::<1>(what)?[0] {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    b => bail!(
                        "{}: corrupt file: {} at offset {at} is a bool with byte value {b} \
                         (must be 0 or 1)",
                        self.path.display(),
                        what
                    ),
                }
            }
            TYPE_STRING => GgufValue::String(self.string(what)?),
            TYPE_ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    bail!(
                        "{}: corrupt file: {} nests arrays more than {MAX_ARRAY_DEPTH} deep",
                        self.path.display(),
                        what
                    );
                }
                let element_type = self.u32(what)?;
                if element_type > TYPE_F64 {
                    bail!(
                        "{}: corrupt file: {} is an array of unknown value type {element_type}",
                        self.path.display(),
                        what
                    );
                }
                let count = self.u64(what)?;
                let count = self.count(
                    count,
                    Self::min_value_bytes(element_type),
                    &format_args!("array element of {what}"),
                )?;
                let mut values = Vec::with_capacity(count);
                for _ in 0..count {
                    values.push(self.value(element_type, what, depth + 1)?);
                }
                GgufValue::Array(values)
            }
            other => bail!(
                "{}: corrupt file: {} has unknown value type {other} at offset {}",
                self.path.display(),
                what,
                self.pos.saturating_sub(4)
            ),
        })
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`. Every error names the file and what is wrong with it.
    pub fn open(path: &Path) -> Result<Self> {
        let p = path.display();
        let file = std::fs::File::open(path).with_context(|| format!("{p}: cannot open"))?;
        // SAFETY: the map is read-only; like every mmap-based loader (llama.cpp, safetensors),
        // this assumes the file is not truncated by another process while it is in use.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{p}: cannot memory-map the file"))?;
        Self::from_file_bytes(path, FileBytes::Mapped(mmap))
    }

    /// Parses a GGUF file held in memory; `path` is only used to name it in errors.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::from_file_bytes(path, FileBytes::Owned(bytes))
    }

    fn from_file_bytes(path: &Path, bytes: FileBytes) -> Result<Self> {
        let parsed = parse(path, &bytes)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            bytes,
            version: parsed.version,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            tensor_index: parsed
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect(),
            metadata: parsed.metadata,
            tensors: parsed.tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of tensor data (`general.alignment`, default 32).
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Where the tensor data section starts in the file (tensor offsets are relative to it).
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// The tensor table in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// A tensor's info by GGUF name.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor (bounds were checked when the file was opened).
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        // The offset and size were checked against the file length in `parse`.
        let start = self.data_offset + info.offset as usize;
        &self.bytes[start..start + info.n_bytes]
    }

    /// A tensor by GGUF name, dequantised to f32, in file order (= HF row-major order).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self
            .tensor(name)
            .with_context(|| format!("{}: no tensor named {name}", self.path.display()))?;
        let mut out = vec![0.0f32; info.n_elements];
        dequantize(info.ggml_type, self.tensor_bytes(info), &mut out)
            .with_context(|| format!("{}: tensor {name}", self.path.display()))?;
        Ok(out)
    }

    pub(super) fn missing(&self, key: &str) -> anyhow::Error {
        anyhow!("{}: missing metadata key '{key}'", self.path.display())
    }

    fn wrong_type(&self, key: &str, expected: &str, got: &GgufValue) -> anyhow::Error {
        anyhow!(
            "{}: metadata key '{key}' must be {expected}, but it is a {}",
            self.path.display(),
            got.type_name()
        )
    }

    /// A non-negative integer that fits in usize; `Ok(None)` when the key is absent.
    pub fn get_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
            })
            .transpose()
    }

    pub fn require_usize(&self, key: &str) -> Result<usize> {
        self.get_usize(key)?.ok_or_else(|| self.missing(key))
    }

    /// A number (float or integer); `Ok(None)` when the key is absent.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.wrong_type(key, "a number", v))
            })
            .transpose()
    }

    pub fn require_f64(&self, key: &str) -> Result<f64> {
        self.get_f64(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.wrong_type(key, "a bool", v)))
            .transpose()
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong_type(key, "a string", v))
            })
            .transpose()
    }

    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.get_str(key)?.ok_or_else(|| self.missing(key))
    }

    /// An array of strings; `Ok(None)` when the key is absent.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let items = v
            .as_array()
            .ok_or_else(|| self.wrong_type(key, "an array of strings", v))?;
        items
            .iter()
            .map(|item| {
                item.as_str()
                    .ok_or_else(|| self.wrong_type(key, "an array of strings", item))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An array of integers; `Ok(None)` when the key is absent.
    pub fn get_int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let items = v
            .as_array()
            .ok_or_else(|| self.wrong_type(key, "an array of integers", v))?;
        items
            .iter()
            .map(|item| {
                item.as_i64()
                    .ok_or_else(|| self.wrong_type(key, "an array of integers", item))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

struct Parsed {
    version: u32,
    alignment: usize,
    data_offset: usize,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
}

/// Parses and checks the header, metadata and tensor table of a whole GGUF file in `bytes`.
fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let p = path.display();
    let mut r = Reader {
        bytes,
        pos: 0,
        path,
    };
    if bytes.len() < 4 {
        bail!(
            "{p}: file is truncated: {} bytes, too short for a GGUF header",
            bytes.len()
        );
    }
    let magic = r.array::<4>(&"the magic")?;
    if &magic != GGUF_MAGIC {
        bail!(
            "{p}: not a GGUF file: bad magic {:?} (expected \"GGUF\")",
            String::from_utf8_lossy(&magic)
        );
    }
    let version = r.u32(&"the version")?;
    if version != 2 && version != 3 {
        bail!("{p}: unsupported GGUF version {version} (supported: 2, 3)");
    }
    let n_tensors = r.u64(&"the tensor count")?;
    let n_kv = r.u64(&"the metadata count")?;
    // A key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes.
    let n_kv = r.count(n_kv, 13, &"metadata key-value")?;

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.string(&format_args!("metadata key #{i}"))?;
        let what = format!("metadata key '{key}'");
        let value_type = r.u32(&what)?;
        let value = r.value(value_type, &what, 0)?;
        if metadata.insert(key, value).is_some() {
            bail!("{p}: corrupt file: {what} appears twice");
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64().and_then(|a| usize::try_from(a).ok()) {
            Some(a) if a.is_power_of_two() => a,
            _ => bail!("{p}: general.alignment must be a power of two, got {v:?}"),
        },
    };

    // A tensor info takes at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
    let n_tensors = r.count(n_tensors, 24, &"tensor info")?;
    let mut tensors = Vec::with_capacity(n_tensors);
    let mut names = HashSet::new();
    for i in 0..n_tensors {
        let name = r.string(&format_args!("the name of tensor #{i}"))?;
        let what = format!("tensor {name}");
        let n_dims = r.u32(&what)?;
        if n_dims > MAX_DIMS {
            bail!("{p}: corrupt file: {what} has {n_dims} dimensions (at most {MAX_DIMS})");
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&what)?);
        }
        let type_id = r.u32(&what)?;
        let offset = r.u64(&what)?;
        let ggml_type = GgmlType::from_id(type_id).with_context(|| {
            format!(
                "{p}: tensor {name} has type {} ({type_id}), not supported; supported: {}",
                ggml_type_name(type_id),
                supported_type_list()
            )
        })?;
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|n| usize::try_from(n).ok())
            .with_context(|| format!("{p}: corrupt file: {what} has absurd dimensions {dims:?}"))?;
        let row_len = dims.first().copied().unwrap_or(1);
        if !row_len.is_multiple_of(ggml_type.block_len() as u64) {
            bail!(
                "{p}: corrupt file: {what} of type {ggml_type} has rows of {row_len} elements, \
                 not a multiple of its block size {}",
                ggml_type.block_len()
            );
        }
        let n_bytes = ggml_type
            .bytes_for(n_elements)
            .with_context(|| format!("{p}: corrupt file: {what} has absurd dimensions {dims:?}"))?;
        if offset % alignment as u64 != 0 {
            bail!(
                "{p}: corrupt file: {what} data offset {offset} is not a multiple of the \
                 alignment {alignment}"
            );
        }
        if !names.insert(name.clone()) {
            bail!("{p}: corrupt file: {what} appears twice in the tensor table");
        }
        tensors.push(GgufTensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_elements,
            n_bytes,
        });
    }

    let data_offset = r.pos.div_ceil(alignment) * alignment;
    for t in &tensors {
        let end = (data_offset as u64)
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.n_bytes as u64));
        match end {
            Some(end) if end <= bytes.len() as u64 => {}
            _ => bail!(
                "{p}: tensor {} data ({} bytes at offset {} of the data section, which starts at \
                 {data_offset}) lies past the end of the file ({} bytes): the file is truncated \
                 or corrupt",
                t.name,
                t.n_bytes,
                t.offset,
                bytes.len()
            ),
        }
    }
    Ok(Parsed {
        version,
        alignment,
        data_offset,
        metadata,
        tensors,
    })
}
