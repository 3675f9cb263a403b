//! ggml tensor storage types ([`GgmlType`]: F32, F16, BF16, Q8_0, Q4_0, Q4_1) and their block
//! layouts; [`dequantize`] turns their bytes into f32 exactly as ggml defines them (large tensors
//! in parallel with rayon), and [`quantize`] applies ggml's reference quantisers (tests, tools).

use anyhow::{Context, Result, bail};
use half::{bf16, f16};
use rayon::prelude::*;
use std::fmt;

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

pub(super) fn supported_type_list() -> String {
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
}
