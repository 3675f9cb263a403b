//! GGUF (v2/v3) model files, as written by llama.cpp's converters.
//!
//! What this module owns, in file order:
//!
//! - [`GgmlType`]: the tensor storage types the engine reads (F32, F16, BF16, Q8_0, Q4_0, Q4_1)
//!   and their block layouts; [`dequantize`] turns their bytes into f32 exactly as ggml defines
//!   them (large tensors in parallel with rayon).
//! - [`GgufValue`] and [`GgufFile`]: a memory-mapped, fully bounds-checked reader of the header,
//!   the metadata (every value type, nested arrays included) and the tensor table. Any input,
//!   however corrupt, gives an error that names the file and the problem; nothing panics.
//! - [`GgufWeights`]: a [`TensorSource`] answering in HF names and HF layout. llama.cpp's
//!   converter stores LLaMA q/k projection rows interleaved for its own RoPE kernel; they are
//!   un-permuted here back to HF's rotate-half layout ([`unpermute_llama_cpp_rows`]).
//! - [`config_from_gguf`] and [`tokenizer_from_gguf`]: the [`ModelConfig`] and the byte-level BPE
//!   [`TextTokenizer`] (with its chat template) rebuilt from metadata.
//! - [`load_gguf_model`]: all of the above as a [`LoadedModel`].
//! - [`GgufWriter`] and [`quantize`]: a small writer (v3) with ggml's reference quantisers, for
//!   tests and tools (random-init models, hand-built blocks).
//!
//! Shapes: GGUF lists a tensor's dimensions innermost first (`ne[0]` is the row length), so the
//! HF (row-major) shape is the GGUF dimension list reversed, and the bytes are already in HF
//! row-major order.

use super::config::{Architecture, ModelConfig, RopeScaling};
use super::{HostTensor, LoadedModel, ModelFormat, TensorSource, TextTokenizer};
use anyhow::{Context, Result, anyhow, bail};
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// Tensor storage types
// ---------------------------------------------------------------------------------------------

/// The ggml tensor types the engine can read (ggml's type ids in [`GgmlType::id`]).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    /// Blocks of 32: f16 scale `d`, 16 bytes of nibbles; value = (q - 8) * d.
    Q4_0,
    /// Blocks of 32: f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles; value = q * d + m.
    Q4_1,
    /// Blocks of 32: f16 scale `d`, 32 signed bytes; value = q * d.
    Q8_0,
    BF16,
}

/// Elements per block of the quantised types.
pub const QK: usize = 32;

impl GgmlType {
    /// Every supported type, in the order error messages list them.
    pub const SUPPORTED: [GgmlType; 6] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
    ];

    /// ggml's numeric type id as stored in GGUF tensor infos.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
        }
    }

    /// The supported type with ggml id `id`, if any.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::SUPPORTED.into_iter().find(|t| t.id() == id)
    }

    /// ggml's name of the type (`"Q4_1"`).
    pub fn name(self) -> &'static str {
        ggml_type_name(self.id())
    }

    /// Elements per block (1 for the float types).
    pub fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => QK,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + QK / 2,
            GgmlType::Q4_1 => 2 + 2 + QK / 2,
            GgmlType::Q8_0 => 2 + QK,
        }
    }

    /// Bytes that `n_elements` take, or `None` when `n_elements` is not a whole number of
    /// blocks or the size overflows.
    pub fn bytes_for(self, n_elements: usize) -> Option<usize> {
        if !n_elements.is_multiple_of(self.block_len()) {
            return None;
        }
        (n_elements / self.block_len()).checked_mul(self.block_bytes())
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// ggml's name for any type id, supported or not (for error messages); `"unknown"` otherwise.
pub fn ggml_type_name(id: u32) -> &'static str {
    match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        4 => "Q4_2 (removed)",
        5 => "Q4_3 (removed)",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        31 => "Q4_0_4_4 (removed)",
        32 => "Q4_0_4_8 (removed)",
        33 => "Q4_0_8_8 (removed)",
        34 => "TQ1_0",
        35 => "TQ2_0",
        36 => "IQ4_NL_4_4 (removed)",
        37 => "IQ4_NL_4_8 (removed)",
        38 => "IQ4_NL_8_8 (removed)",
        39 => "MXFP4",
        _ => "unknown",
    }
}

fn supported_type_list() -> String {
    GgmlType::SUPPORTED.map(GgmlType::name).join(", ")
}

// ---------------------------------------------------------------------------------------------
// Dequantisation
// ---------------------------------------------------------------------------------------------

/// Tensors with at least this many elements are dequantised on all cores.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;
/// Blocks per rayon work item.
const PARALLEL_CHUNK_BLOCKS: usize = 2048;

/// Dequantises `bytes` of type `ggml_type` into `out` (one f32 per element). Fails only when
/// the lengths do not match (`bytes` must hold exactly `out.len()` elements, whole blocks).
pub fn dequantize(ggml_type: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    match ggml_type.bytes_for(out.len()) {
        Some(n) if n == bytes.len() => {}
        _ => bail!(
            "{} data of {} bytes does not hold {} elements",
            ggml_type,
            bytes.len(),
            out.len()
        ),
    }
    if out.len() < PARALLEL_MIN_ELEMENTS {
        dequantize_serial(ggml_type, bytes, out);
    } else {
        let elems = PARALLEL_CHUNK_BLOCKS * ggml_type.block_len();
        let nbytes = PARALLEL_CHUNK_BLOCKS * ggml_type.block_bytes();
        out.par_chunks_mut(elems)
            .zip(bytes.par_chunks(nbytes))
            .for_each(|(o, b)| dequantize_serial(ggml_type, b, o));
    }
    Ok(())
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Dequantises whole blocks; lengths are the caller's responsibility (checked in [`dequantize`]).
fn dequantize_serial(ggml_type: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let bb = ggml_type.block_bytes();
    match ggml_type {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (block, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(block, 0);
                let qs = &block[2..2 + QK / 2];
                for (j, &q) in qs.iter().enumerate() {
                    o[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                    o[j + QK / 2] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (block, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(block, 0);
                let m = f16_at(block, 2);
                let qs = &block[4..4 + QK / 2];
                for (j, &q) in qs.iter().enumerate() {
                    o[j] = (q & 0x0F) as f32 * d + m;
                    o[j + QK / 2] = (q >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (block, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(block, 0);
                for (o, &q) in o.iter_mut().zip(&block[2..2 + QK]) {
                    *o = (q as i8) as f32 * d;
                }
            }
        }
    }
}

/// Quantises (or converts) `data` to `ggml_type` with ggml's reference quantisers
/// (`quantize_row_*_ref`): Q8_0 d = max|x| / 127, q = round(x / d); Q4_0 d = (the value of
/// largest magnitude) / -8, q = min(15, trunc(x / d + 8.5)); Q4_1 d = (max - min) / 15, m = min,
/// q = min(15, trunc((x - m) / d + 0.5)). For tests and tools.
pub fn quantize(ggml_type: GgmlType, data: &[f32]) -> Result<Vec<u8>> {
    let n_bytes = ggml_type.bytes_for(data.len()).with_context(|| {
        format!(
            "cannot quantise {} values to {ggml_type}: not a multiple of its block size {}",
            data.len(),
            ggml_type.block_len()
        )
    })?;
    let mut out = Vec::with_capacity(n_bytes);
    let inverse = |d: f32| if d != 0.0 { 1.0 / d } else { 0.0 };
    match ggml_type {
        GgmlType::F32 => data.iter().for_each(|x| out.extend(x.to_le_bytes())),
        GgmlType::F16 => data
            .iter()
            .for_each(|x| out.extend(f16::from_f32(*x).to_le_bytes())),
        GgmlType::BF16 => data
            .iter()
            .for_each(|x| out.extend(bf16::from_f32(*x).to_le_bytes())),
        GgmlType::Q8_0 => {
            for block in data.chunks_exact(QK) {
                let amax = block.iter().fold(0.0f32, |a, x| a.max(x.abs()));
                let d = amax / 127.0;
                let id = inverse(d);
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(block.iter().map(|x| ((x * id).round() as i8) as u8));
            }
        }
        GgmlType::Q4_0 => {
            for block in data.chunks_exact(QK) {
                let (mut amax, mut max) = (0.0f32, 0.0f32);
                for &x in block {
                    if amax < x.abs() {
                        amax = x.abs();
                        max = x;
                    }
                }
                let d = max / -8.0;
                let id = inverse(d);
                out.extend(f16::from_f32(d).to_le_bytes());
                let nibble = |x: f32| ((x * id + 8.5) as i8).min(15) as u8;
                for j in 0..QK / 2 {
                    out.push(nibble(block[j]) | (nibble(block[j + QK / 2]) << 4));
                }
            }
        }
        GgmlType::Q4_1 => {
            for block in data.chunks_exact(QK) {
                let min = block.iter().fold(f32::INFINITY, |a, &x| a.min(x));
                let max = block.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                let d = (max - min) / 15.0;
                let id = inverse(d);
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(f16::from_f32(min).to_le_bytes());
                let nibble = |x: f32| (((x - min) * id + 0.5) as i8).min(15) as u8;
                for j in 0..QK / 2 {
                    out.push(nibble(block[j]) | (nibble(block[j + QK / 2]) << 4));
                }
            }
        }
    }
    debug_assert_eq!(out.len(), n_bytes);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------------------------

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

const TYPE_U8: u32 = 0;
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

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: usize = 32;
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

    fn missing(&self, key: &str) -> anyhow::Error {
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

// ---------------------------------------------------------------------------------------------
// Names, layout and the Q/K row permutation
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Config from metadata
// ---------------------------------------------------------------------------------------------

/// Upper bound on any one model dimension or count read from metadata (guards the arithmetic
/// on corrupt files; real models are far below it).
const MAX_MODEL_DIMENSION: usize = 1 << 24;

/// Builds the [`ModelConfig`] from `{arch}.*` metadata and the tensor table (tied embeddings,
/// q/k/v biases, `rope_freqs.weight`), and validates it.
pub fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig> {
    let path = file.path();
    let p = path.display();
    let arch_name = file.require_str("general.architecture")?;
    let arch = match arch_name {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => bail!(
            "{p}: unsupported architecture '{other}' (general.architecture; supported: llama, \
             qwen2)"
        ),
    };
    let key = |k: &str| format!("{arch_name}.{k}");

    let hidden_size = file.require_usize(&key("embedding_length"))?;
    let num_heads = file.require_usize(&key("attention.head_count"))?;
    if num_heads == 0 {
        bail!("{p}: {} must be positive", key("attention.head_count"));
    }
    let num_kv_heads = file
        .get_usize(&key("attention.head_count_kv"))?
        .unwrap_or(num_heads);
    let rope_dims = file.get_usize(&key("rope.dimension_count"))?;
    let head_dim = match file.get_usize(&key("attention.key_length"))? {
        Some(d) => d,
        None => rope_dims.unwrap_or(hidden_size / num_heads),
    };
    if let Some(r) = rope_dims
        && r != head_dim
    {
        bail!(
            "{p}: {} = {r} differs from the head dimension {head_dim}: partial rotary embeddings \
             are not supported",
            key("rope.dimension_count")
        );
    }
    if let Some(kind) = file.get_str(&key("rope.scaling.type"))?
        && kind != "none"
    {
        bail!(
            "{p}: {} = '{kind}' is not supported (only LLaMA-3 scaling through \
             rope_freqs.weight)",
            key("rope.scaling.type")
        );
    }

    let vocab_size = match file
        .get("tokenizer.ggml.tokens")
        .and_then(GgufValue::as_array)
    {
        Some(tokens) => tokens.len(),
        None => file.get_usize(&key("vocab_size"))?.with_context(|| {
            format!(
                "{p}: missing metadata key 'tokenizer.ggml.tokens' (or '{}')",
                key("vocab_size")
            )
        })?,
    };
    if let Some(embd) = file.tensor("token_embd.weight") {
        let rows = embd.hf_shape().first().copied().unwrap_or(0);
        if rows != vocab_size {
            bail!(
                "{p}: token_embd.weight has {rows} rows but the vocabulary has {vocab_size} \
                 tokens"
            );
        }
    }

    let rope_scaling = match file.tensor("rope_freqs.weight") {
        None => None,
        Some(info) => {
            if info.n_elements != head_dim / 2 {
                bail!(
                    "{p}: rope_freqs.weight has {} values, expected head_dim / 2 = {}",
                    info.n_elements,
                    head_dim / 2
                );
            }
            Some(RopeScaling::FreqFactors(
                file.read_f32("rope_freqs.weight")?,
            ))
        }
    };

    let intermediate_size = file.require_usize(&key("feed_forward_length"))?;
    let num_layers = file.require_usize(&key("block_count"))?;
    for (what, value) in [
        ("embedding_length", hidden_size),
        ("feed_forward_length", intermediate_size),
        ("block_count", num_layers),
        ("attention.head_count", num_heads),
        ("attention.head_count_kv", num_kv_heads),
        ("head dimension", head_dim),
    ] {
        if value > MAX_MODEL_DIMENSION {
            bail!(
                "{p}: {arch_name}.{what} = {value} is absurd (more than {MAX_MODEL_DIMENSION}); \
                 the file is corrupt"
            );
        }
    }

    let cfg = ModelConfig {
        arch,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: file.require_f64(&key("attention.layer_norm_rms_epsilon"))? as f32,
        rope_theta: file.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32,
        rope_scaling,
        max_position_embeddings: file.require_usize(&key("context_length"))?,
        tie_word_embeddings: file.tensor("output.weight").is_none(),
        attention_bias: arch == Architecture::Qwen2 || file.tensor("blk.0.attn_q.bias").is_some(),
    };
    cfg.validate(path)?;
    Ok(cfg)
}

/// Checks that every tensor the transformer needs is present with the shape `config` implies.
/// Stops at the first problem (a corrupt layer count must not make it build a huge list).
fn check_tensor_shapes(path: &Path, config: &ModelConfig, weights: &GgufWeights) -> Result<()> {
    let (h, i, v) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let q = config.num_heads * config.head_dim;
    let kv = config.num_kv_heads * config.head_dim;
    let check = |name: &str, shape: &[usize]| -> Result<()> {
        let gguf = gguf_tensor_name(name).unwrap_or_else(|| name.to_string());
        match weights.shape(name) {
            None => bail!("{}: missing tensor {gguf} ({name})", path.display()),
            Some(s) if s != shape => bail!(
                "{}: tensor {gguf} ({name}) has shape {s:?}, expected {shape:?} from the config",
                path.display()
            ),
            Some(_) => Ok(()),
        }
    };
    check("model.embed_tokens.weight", &[v, h])?;
    check("model.norm.weight", &[h])?;
    if !config.tie_word_embeddings {
        check("lm_head.weight", &[v, h])?;
    }
    for l in 0..config.num_layers {
        let name = |s: &str| format!("model.layers.{l}.{s}");
        check(&name("input_layernorm.weight"), &[h])?;
        check(&name("self_attn.q_proj.weight"), &[q, h])?;
        check(&name("self_attn.k_proj.weight"), &[kv, h])?;
        check(&name("self_attn.v_proj.weight"), &[kv, h])?;
        check(&name("self_attn.o_proj.weight"), &[h, q])?;
        check(&name("post_attention_layernorm.weight"), &[h])?;
        check(&name("mlp.gate_proj.weight"), &[i, h])?;
        check(&name("mlp.up_proj.weight"), &[i, h])?;
        check(&name("mlp.down_proj.weight"), &[h, i])?;
        if config.attention_bias {
            check(&name("self_attn.q_proj.bias"), &[q])?;
            check(&name("self_attn.k_proj.bias"), &[kv])?;
            check(&name("self_attn.v_proj.bias"), &[kv])?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tokenizer from metadata
// ---------------------------------------------------------------------------------------------

/// GGUF token types (`tokenizer.ggml.token_type`).
mod token_type {
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
}

/// LLaMA-3's pre-tokenizer regex (HF `tokenizer.json`).
const LLAMA3_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: LLaMA-3's with single digits.
const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Values of `tokenizer.ggml.pre` this module understands.
const SUPPORTED_PRE_TOKENIZERS: &str = "default, gpt2, smollm, llama-bpe, llama3, qwen2";

/// Splits a GGUF merge `"a b"` at the first space after its first character (as llama.cpp does).
fn split_merge(merge: &str) -> Option<(String, String)> {
    let first_len = merge.chars().next()?.len_utf8();
    let space = merge[first_len..].find(' ')? + first_len;
    Some((merge[..space].to_string(), merge[space + 1..].to_string()))
}

/// How `tokenizer.ggml.pre` configures the pipeline, as HF's `tokenizer.json` for that family.
struct PreTokenizerSpec {
    pre_tokenizer: tokenizers::PreTokenizerWrapper,
    normalizer: Option<tokenizers::NormalizerWrapper>,
    /// BPE `ignore_merges` (whole words found in the vocabulary skip merging; LLaMA-3).
    ignore_merges: bool,
}

fn pre_tokenizer_spec(pre: &str) -> Result<Option<PreTokenizerSpec>, String> {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::{NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

    let regex_split = |regex: &str| -> Result<PreTokenizerWrapper, String> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| format!("cannot compile the pre-tokenizer regex: {e}"))?;
        Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ])))
    };
    Ok(Some(match pre {
        "default" | "gpt2" => PreTokenizerSpec {
            pre_tokenizer: PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            normalizer: None,
            ignore_merges: false,
        },
        "smollm" => PreTokenizerSpec {
            pre_tokenizer: PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            ])),
            normalizer: None,
            ignore_merges: false,
        },
        "llama-bpe" | "llama3" => PreTokenizerSpec {
            pre_tokenizer: regex_split(LLAMA3_SPLIT_REGEX)?,
            normalizer: None,
            ignore_merges: true,
        },
        "qwen2" => PreTokenizerSpec {
            pre_tokenizer: regex_split(QWEN2_SPLIT_REGEX)?,
            normalizer: Some(NormalizerWrapper::NFC(tokenizers::normalizers::NFC)),
            ignore_merges: false,
        },
        _ => return Ok(None),
    }))
}

/// Rebuilds the model's byte-level BPE tokenizer (`tokenizer.ggml.model` = `gpt2`) from GGUF
/// metadata, with its special tokens, BOS/EOS handling and chat template.
///
/// Control and unknown tokens become special added tokens, user-defined ones plain added
/// tokens. When a token string appears twice, its first id wins.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<TextTokenizer> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::{BPE, Vocab};
    use tokenizers::processors::byte_level::ByteLevel as ByteLevelProcessor;
    use tokenizers::processors::sequence::Sequence as ProcessorSequence;
    use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
    use tokenizers::{AddedToken, DecoderWrapper, PostProcessorWrapper};

    let path = file.path();
    let p = path.display();
    let model = file.require_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        bail!(
            "{p}: tokenizer model '{model}' (tokenizer.ggml.model) is not supported; supported: \
             gpt2 (byte-level BPE)"
        );
    }
    let tokens = file
        .get_str_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| file.missing("tokenizer.ggml.tokens"))?;
    let merges = file
        .get_str_array("tokenizer.ggml.merges")?
        .ok_or_else(|| file.missing("tokenizer.ggml.merges"))?;
    let token_types = file.get_int_array("tokenizer.ggml.token_type")?;
    if let Some(types) = &token_types
        && types.len() != tokens.len()
    {
        bail!(
            "{p}: tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}",
            types.len(),
            tokens.len()
        );
    }
    let pre = file.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let spec = pre_tokenizer_spec(pre)
        .map_err(|e| anyhow!("{p}: tokenizer.ggml.pre '{pre}': {e}"))?
        .with_context(|| {
            format!(
                "{p}: pre-tokenizer '{pre}' (tokenizer.ggml.pre) is not supported; supported: \
                 {SUPPORTED_PRE_TOKENIZERS}"
            )
        })?;

    let mut seen = HashSet::with_capacity(tokens.len());
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| seen.insert(**t))
        .map(|(id, t)| (t.to_string(), id as u32))
        .collect();
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            split_merge(m).with_context(|| {
                format!(
                    "{p}: tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by a space"
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|e| anyhow!("{p}: cannot build the BPE tokenizer from metadata: {e}"))?;

    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner
        .with_normalizer(spec.normalizer)
        .map_err(|e| anyhow!("{p}: cannot set the tokenizer normalizer: {e}"))?;
    inner.with_pre_tokenizer(Some(spec.pre_tokenizer));
    inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));

    // Added tokens, at their vocabulary ids (they are in the BPE vocabulary too).
    let mut special = Vec::new();
    let mut user_defined = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        let kind = token_types.as_ref().map_or(1, |t| t[id]);
        if token.is_empty() {
            continue;
        }
        match kind {
            token_type::CONTROL | token_type::UNKNOWN => {
                special.push(AddedToken::from(token.to_string(), true))
            }
            token_type::USER_DEFINED => {
                user_defined.push(AddedToken::from(token.to_string(), false))
            }
            _ => {}
        }
    }
    inner
        .add_special_tokens(special)
        .map_err(|e| anyhow!("{p}: cannot add the control tokens: {e}"))?;
    inner
        .add_tokens(user_defined)
        .map_err(|e| anyhow!("{p}: cannot add the user-defined tokens: {e}"))?;

    let token_by_id = |key: &str| -> Result<Option<(String, u32)>> {
        match file.get_usize(key)? {
            None => Ok(None),
            Some(id) => match tokens.get(id) {
                Some(t) => Ok(Some((t.to_string(), id as u32))),
                None => bail!(
                    "{p}: {key} = {id} is outside the vocabulary of {} tokens",
                    tokens.len()
                ),
            },
        }
    };
    let bos = token_by_id("tokenizer.ggml.bos_token_id")?;
    let eos = token_by_id("tokenizer.ggml.eos_token_id")?;
    let mut eos_ids: Vec<u32> = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some((_, id)) = token_by_id(key)?
            && !eos_ids.contains(&id)
        {
            eos_ids.push(id);
        }
    }

    // BOS/EOS added by `encode(text, true)`, as HF's TemplateProcessing does for LLaMA-3.
    let add_bos = file
        .get_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(false);
    let add_eos = file
        .get_bool("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);
    let byte_level = PostProcessorWrapper::ByteLevel(ByteLevelProcessor::new(true, false, true));
    let post_processor = if add_bos || add_eos {
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut specials = Vec::new();
        for (wanted, which, key, token) in [
            (add_bos, "BOS", "tokenizer.ggml.bos_token_id", &bos),
            (add_eos, "EOS", "tokenizer.ggml.eos_token_id", &eos),
        ] {
            if !wanted {
                continue;
            }
            let (text, id) = token.as_ref().with_context(|| {
                format!(
                    "{p}: tokenizer.ggml.add_{}_token is true but {key} is missing",
                    which.to_lowercase()
                )
            })?;
            specials.push(
                SpecialToken::new(which.to_string(), vec![*id], vec![text.clone()])
                    .map_err(|e| anyhow!("{p}: {which} token: {e}"))?,
            );
        }
        if add_bos {
            single.push("BOS".to_string());
            pair.push("BOS".to_string());
        }
        single.push("$A".to_string());
        pair.push("$A".to_string());
        if add_eos {
            single.push("EOS".to_string());
            pair.push("EOS".to_string());
        }
        if add_bos {
            pair.push("BOS:1".to_string());
        }
        pair.push("$B:1".to_string());
        if add_eos {
            pair.push("EOS:1".to_string());
        }
        let template = TemplateProcessing::builder()
            .try_single(single)
            .and_then(|b| b.try_pair(pair))
            .map_err(|e| anyhow!("{p}: BOS/EOS template: {e}"))?
            .special_tokens(specials)
            .build()
            .map_err(|e| anyhow!("{p}: BOS/EOS template: {e}"))?;
        PostProcessorWrapper::Sequence(ProcessorSequence::new(vec![
            byte_level,
            PostProcessorWrapper::Template(template),
        ]))
    } else {
        byte_level
    };
    inner.with_post_processor(Some(post_processor));

    let chat_template = file.get_str("tokenizer.chat_template")?.map(str::to_string);
    Ok(TextTokenizer::new(
        inner,
        bos,
        eos,
        eos_ids,
        chat_template,
        path.to_path_buf(),
    ))
}

// ---------------------------------------------------------------------------------------------
// The whole model
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

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
/// permute q/k rows by itself (see [`permute_llama_cpp_rows`]) nor rename tensors (see
/// [`gguf_tensor_name`]). Data is aligned to `general.alignment` when that key is set (as an
/// integer), else 32.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ids_round_trip_and_name_unsupported_ones() {
        for t in GgmlType::SUPPORTED {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
        }
        assert_eq!(GgmlType::from_id(12), None);
        assert_eq!(ggml_type_name(12), "Q4_K");
        assert_eq!(ggml_type_name(999), "unknown");
    }

    #[test]
    fn quantisers_round_trip_within_their_step() {
        let data: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 30.0) / 7.0)
            .collect();
        for (ty, tol) in [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 0.005),
            (GgmlType::BF16, 0.04),
            (GgmlType::Q8_0, 0.02),
            (GgmlType::Q4_0, 0.3),
            (GgmlType::Q4_1, 0.3),
        ] {
            let bytes = quantize(ty, &data).unwrap();
            assert_eq!(bytes.len(), ty.bytes_for(64).unwrap());
            let mut back = vec![0.0; 64];
            dequantize(ty, &bytes, &mut back).unwrap();
            let err = data
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(err <= tol, "{ty}: max error {err} > {tol}");
        }
    }

    #[test]
    fn parallel_dequantisation_matches_serial() {
        let n = PARALLEL_MIN_ELEMENTS * 3 + 5 * QK;
        let data: Vec<f32> = (0..n).map(|i| ((i % 1000) as f32).sin()).collect();
        let bytes = quantize(GgmlType::Q4_1, &data).unwrap();
        let mut parallel = vec![0.0; n];
        dequantize(GgmlType::Q4_1, &bytes, &mut parallel).unwrap();
        let mut serial = vec![0.0; n];
        dequantize_serial(GgmlType::Q4_1, &bytes, &mut serial);
        assert_eq!(parallel, serial);
    }

    #[test]
    fn dequantize_rejects_mismatched_lengths() {
        let mut out = vec![0.0; 32];
        assert!(dequantize(GgmlType::Q8_0, &[0; 33], &mut out).is_err());
        assert!(dequantize(GgmlType::F32, &[0; 4], &mut out).is_err());
    }

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

    #[test]
    fn merges_split_at_the_first_space_after_the_first_char() {
        assert_eq!(split_merge("Ġ t"), Some(("Ġ".into(), "t".into())));
        assert_eq!(split_merge("  x"), Some((" ".into(), "x".into())));
        assert_eq!(split_merge("ab"), None);
        assert_eq!(split_merge(""), None);
    }
}
