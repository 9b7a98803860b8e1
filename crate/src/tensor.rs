//! Tensors: a shape, a storage type and GPU buffers. Activations are f32; weights may be
//! f16, q8_0 or q4_0 (see `quant`). Quantized and f16 tensors are matrices of
//! `rows = shape[0]` by `cols = product(shape[1..])` (a conv weight `[O, I, kh, kw]` is
//! `O × I·kh·kw`).

use crate::error::{Error, Result};
use crate::gpu::{GpuBuffer, Gpu};
use crate::quant::{self, DType, Packed};
use std::sync::Arc;

#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    data: Arc<GpuBuffer>,
    scales: Option<Arc<GpuBuffer>>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {})", self.shape, self.dtype)
    }
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape.split_first() {
        Some((r, rest)) => (*r, numel(rest)),
        None => (1, 1),
    }
}

impl Tensor {
    /// Wraps existing buffers (used by ops for their outputs).
    pub fn from_parts(
        shape: Vec<usize>,
        dtype: DType,
        data: GpuBuffer,
        scales: Option<GpuBuffer>,
    ) -> Self {
        Self { shape, dtype, data: Arc::new(data), scales: scales.map(Arc::new) }
    }

    /// An f32 tensor with unspecified contents (for op outputs that write every element).
    pub fn empty(gpu: &Gpu, shape: &[usize]) -> Result<Self> {
        let bytes = (numel(shape) * 4) as u64;
        let data = gpu.alloc(bytes, &format!("tensor {shape:?}"))?;
        Ok(Self::from_parts(shape.to_vec(), DType::F32, data, None))
    }

    /// An f32 tensor of zeros.
    pub fn zeros(gpu: &Gpu, shape: &[usize]) -> Result<Self> {
        let t = Self::empty(gpu, shape)?;
        gpu.zero(&t.data);
        Ok(t)
    }

    /// Uploads f32 values.
    pub fn from_f32(gpu: &Gpu, shape: &[usize], values: &[f32]) -> Result<Self> {
        Self::from_f32_as(gpu, shape, values, DType::F32)
    }

    /// Uploads f32 values converted (on the CPU) to `dtype`.
    pub fn from_f32_as(gpu: &Gpu, shape: &[usize], values: &[f32], dtype: DType) -> Result<Self> {
        if values.len() != numel(shape) {
            return Err(Error::Invalid(format!(
                "{} values given for a tensor of shape {shape:?} ({} elements)",
                values.len(),
                numel(shape)
            )));
        }
        let (rows, cols) = rows_cols(shape);
        let packed = quant::pack(values, rows, cols, dtype);
        Self::from_packed(gpu, shape, dtype, &packed)
    }

    /// Uploads already packed words (see `quant` for the layout).
    pub fn from_packed(gpu: &Gpu, shape: &[usize], dtype: DType, p: &Packed) -> Result<Self> {
        let (rows, cols) = rows_cols(shape);
        if p.data.len() * 4 != dtype.data_bytes(rows, cols).next_multiple_of(4)
            || p.scales.len() * 4 != dtype.scale_bytes(rows, cols)
        {
            return Err(Error::Invalid(format!(
                "packed {dtype} data for shape {shape:?} has {} data / {} scale words",
                p.data.len(),
                p.scales.len()
            )));
        }
        let what = format!("{dtype} tensor {shape:?}");
        let data = gpu.upload(bytemuck::cast_slice(&p.data), &what)?;
        let scales = if dtype.is_quantized() {
            Some(gpu.upload(bytemuck::cast_slice(&p.scales), &what)?)
        } else {
            None
        };
        Ok(Self::from_parts(shape.to_vec(), dtype, data, scales))
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Size of dimension `i`; negative counts from the end.
    pub fn dim(&self, i: isize) -> usize {
        let i = if i < 0 { self.shape.len() as isize + i } else { i };
        self.shape[i as usize]
    }
    /// `(rows, cols)` of the matrix view (`shape[0]`, product of the rest).
    pub fn rows_cols(&self) -> (usize, usize) {
        rows_cols(&self.shape)
    }
    pub fn buffer(&self) -> &GpuBuffer {
        &self.data
    }
    /// The scale buffer of a quantized tensor.
    pub fn scales(&self) -> Option<&GpuBuffer> {
        self.scales.as_deref()
    }
    /// GPU bytes held (data and scales).
    pub fn bytes(&self) -> u64 {
        self.data.size() + self.scales.as_ref().map_or(0, |s| s.size())
    }

    /// The same storage seen with another shape of equal element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        if numel(shape) != self.numel() {
            return Err(Error::Invalid(format!(
                "cannot reshape {:?} to {shape:?}: element counts differ",
                self.shape
            )));
        }
        if self.dtype.is_quantized() && rows_cols(shape).1 != self.rows_cols().1 {
            return Err(Error::Invalid(format!(
                "a {} tensor keeps its row length; cannot reshape {:?} to {shape:?}",
                self.dtype, self.shape
            )));
        }
        Ok(Self { shape: shape.to_vec(), ..self.clone() })
    }

    /// Errors unless the tensor is f32 (for ops on activations).
    pub fn expect_f32(&self, op: &'static str) -> Result<()> {
        if self.dtype != DType::F32 {
            return Err(Error::DType { op, message: format!("needs f32 activations, got {}", self.dtype) });
        }
        Ok(())
    }

    /// Reads the tensor back as f32 values (dequantizing on the CPU where needed).
    pub async fn to_f32(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let (rows, cols) = self.rows_cols();
        let data = gpu.read(&self.data, self.dtype.data_bytes(rows, cols) as u64).await?;
        let scales = match &self.scales {
            Some(s) => gpu.read(s, self.dtype.scale_bytes(rows, cols) as u64).await?,
            None => vec![],
        };
        let words = |b: &[u8]| -> Vec<u32> {
            b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        };
        let packed = Packed { data: words(&data), scales: words(&scales) };
        Ok(quant::unpack(&packed, rows, cols, self.dtype))
    }
}
