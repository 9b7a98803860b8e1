//! Quantization of f32 tensors on the GPU into f16, q8_0, q4_0 (`shaders/quantize.wgsl`).
//!
//! The result has exactly the packed layout of [`crate::quant`] (what `quant::pack` produces on
//! the CPU), so it can be used as a weight by every kernel and read back with `Tensor::to_f32`.

use super::{groups, Params};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::quant::{padded_cols, DType, BLOCK};
use crate::shader::{Defines, ShaderSource};
use crate::tensor::Tensor;

const SHADER: &str = "quantize.wgsl";
const WG: usize = 64;

pub static SHADERS: &[ShaderSource] = &[ShaderSource {
    name: SHADER,
    source: crate::wgsl!("quantize.wgsl"),
    flag_axes: &[],
    values: &[],
    entries: &["to_f16", "to_q8_0", "to_q4_0"],
    top_level: true,
}];

/// Converts f32 `x` (a `rows × cols` matrix: `shape[0]` by the product of the rest) to `dtype`,
/// keeping its shape. `F32` returns `x` itself.
pub fn quantize(gpu: &Gpu, x: &Tensor, dtype: DType) -> Result<Tensor> {
    x.expect_f32("quantize")?;
    let (rows, cols) = x.rows_cols();
    let n = rows * cols;
    if n >= u32::MAX as usize / 2 {
        return Err(Error::TooLarge {
            what: format!("quantize of {:?}", x.shape()),
            bytes: (n * 4) as u64,
            limit: u32::MAX as u64,
        });
    }
    if dtype == DType::F32 {
        return Ok(x.clone());
    }
    let what = format!("{dtype} tensor {:?}", x.shape());
    let data = gpu.alloc(dtype.data_bytes(rows, cols).next_multiple_of(4) as u64, &what)?;
    let blocks = rows * padded_cols(cols) / BLOCK;
    let (entry, items, scales) = match dtype {
        DType::F16 => ("to_f16", n.div_ceil(2), None),
        DType::Q8_0 => ("to_q8_0", blocks.div_ceil(2), Some(gpu.alloc(dtype.scale_bytes(rows, cols) as u64, &what)?)),
        DType::Q4_0 => ("to_q4_0", blocks.div_ceil(2), Some(gpu.alloc(dtype.scale_bytes(rows, cols) as u64, &what)?)),
        DType::F32 => unreachable!("handled above"),
    };
    let params = Params::new().u(rows).u(cols).u(items).u(blocks);
    let mut binds = vec![(1, x.buffer()), (2, &data)];
    if let Some(s) = &scales {
        binds.push((3, s));
    }
    gpu.dispatch(SHADER, entry, &Defines::new(), &params.0, &binds, gpu.grid(groups(items, WG)))?;
    Ok(Tensor::from_parts(x.shape().to_vec(), dtype, data, scales))
}

/// The CPU reference is the host packing itself (ggml's block math).
pub mod reference {
    use crate::quant::{pack, DType, Packed};

    /// Packed words of a row-major `rows × cols` matrix, as [`super::quantize`] must produce.
    pub fn quantize(values: &[f32], rows: usize, cols: usize, dtype: DType) -> Packed {
        pack(values, rows, cols, dtype)
    }
}
