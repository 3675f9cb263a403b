//! Device tensors of the CUDA backend: [`CudaTensor`] (a bf16 or f32 device buffer plus its
//! shape), [`CudaLinear`] (a bf16 `[out, in]` weight) and the host-side conversions between
//! them and f32 [`HostTensor`]s. Per the design, weights and activations are bf16 on the
//! device (f32 rounded to nearest even on upload); f32 buffers exist for what must stay f32
//! (master weights, optimizer moments, accumulators).

use crate::model::HostTensor;
use anyhow::{Result, bail, ensure};
use cudarc::driver::CudaSlice;
use half::bf16;
use rayon::prelude::*;

/// Element type of a device buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    Bf16,
    F32,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F32 => "f32",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bf16 => 2,
            DType::F32 => 4,
        }
    }
}

/// A device buffer of one element type.
#[derive(Debug)]
pub enum DeviceData {
    Bf16(CudaSlice<bf16>),
    F32(CudaSlice<f32>),
}

/// A row-major tensor in device memory.
#[derive(Debug)]
pub struct CudaTensor {
    pub(crate) data: DeviceData,
    pub(crate) shape: Vec<usize>,
}

impl CudaTensor {
    /// Wraps a buffer; its length must be the shape's element count, or one for an empty
    /// shape (the backend never allocates zero bytes).
    pub fn new(data: DeviceData, shape: Vec<usize>) -> Result<Self> {
        let n = numel(&shape)?;
        let len = match &data {
            DeviceData::Bf16(s) => s.len(),
            DeviceData::F32(s) => s.len(),
        };
        ensure!(
            len == n || (n == 0 && len == 1),
            "device buffer of {len} elements for shape {shape:?}"
        );
        Ok(Self { data, shape })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            DeviceData::Bf16(_) => DType::Bf16,
            DeviceData::F32(_) => DType::F32,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// `(rows, cols)`: the last dimension is the columns, the others are flattened into rows.
    pub fn matrix(&self) -> (usize, usize) {
        as_matrix(&self.shape)
    }

    /// The bf16 buffer, or an error naming `op` when the tensor is f32.
    pub fn bf16(&self, op: &str) -> Result<&CudaSlice<bf16>> {
        match &self.data {
            DeviceData::Bf16(s) => Ok(s),
            DeviceData::F32(_) => bail!("{op}: needs a bf16 tensor, got f32 {:?}", self.shape),
        }
    }

    /// The bf16 buffer, mutably, or an error naming `op` when the tensor is f32.
    pub fn bf16_mut(&mut self, op: &str) -> Result<&mut CudaSlice<bf16>> {
        match &mut self.data {
            DeviceData::Bf16(s) => Ok(s),
            DeviceData::F32(_) => bail!("{op}: needs a bf16 tensor, got f32 {:?}", self.shape),
        }
    }
}

/// A linear layer's weight on the device: bf16, `[out, in]` row-major (HF layout), which
/// cuBLASLt reads as its transposed column-major operand. (An empty weight holds one unused
/// element, as empty tensors do.)
#[derive(Debug)]
pub struct CudaLinear {
    pub(crate) weight: CudaSlice<bf16>,
    pub(crate) out_features: usize,
    pub(crate) in_features: usize,
}

impl CudaLinear {
    pub fn out_features(&self) -> usize {
        self.out_features
    }
    pub fn in_features(&self) -> usize {
        self.in_features
    }
}

/// `(rows, cols)` of a shape seen as a matrix (leading dimensions flattened; a 0-d shape is
/// one element).
pub fn as_matrix(shape: &[usize]) -> (usize, usize) {
    let cols = shape.last().copied().unwrap_or(1);
    let n: usize = shape.iter().product();
    (n.checked_div(cols).unwrap_or(0), cols)
}

/// Element count of a shape, or an error when it overflows.
pub fn numel(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| anyhow::anyhow!("shape {shape:?} overflows"))
}

/// f32 -> bf16, rounded to nearest even (NaN stays NaN), in parallel for large tensors.
pub fn to_bf16(data: &[f32]) -> Vec<bf16> {
    const CHUNK: usize = 1 << 16;
    let mut out = vec![bf16::ZERO; data.len()];
    out.par_chunks_mut(CHUNK)
        .zip(data.par_chunks(CHUNK))
        .for_each(|(o, d)| {
            for (o, &v) in o.iter_mut().zip(d) {
                *o = bf16::from_f32(v);
            }
        });
    out
}

/// bf16 -> f32 (exact), in parallel for large tensors.
pub fn from_bf16(data: &[bf16]) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0f32; data.len()];
    out.par_chunks_mut(CHUNK)
        .zip(data.par_chunks(CHUNK))
        .for_each(|(o, d)| {
            for (o, &v) in o.iter_mut().zip(d) {
                *o = v.to_f32();
            }
        });
    out
}

/// `t` with every element rounded to bf16 and back: what a bf16 upload then download gives.
pub fn round_to_bf16(t: &HostTensor) -> HostTensor {
    HostTensor::new(t.shape.clone(), from_bf16(&to_bf16(&t.data)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_conversion_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        let halfway = 1.0 + (2f32).powi(-8);
        let above = 1.0 + (2f32).powi(-8) + (2f32).powi(-20);
        let v = from_bf16(&to_bf16(&[halfway, above, -2.5, f32::INFINITY]));
        assert_eq!(v[0], 1.0);
        assert_eq!(v[1], 1.0 + (2f32).powi(-7));
        assert_eq!(v[2], -2.5);
        assert_eq!(v[3], f32::INFINITY);
        assert!(from_bf16(&to_bf16(&[f32::NAN]))[0].is_nan());
    }

    #[test]
    fn shapes_as_matrices() {
        assert_eq!(as_matrix(&[3, 4, 5]), (12, 5));
        assert_eq!(as_matrix(&[7]), (1, 7));
        assert_eq!(as_matrix(&[0, 5]), (0, 5));
        assert_eq!(as_matrix(&[5, 0]), (0, 0));
        assert_eq!(as_matrix(&[]), (1, 1));
        assert!(numel(&[usize::MAX, 2]).is_err());
    }
}
