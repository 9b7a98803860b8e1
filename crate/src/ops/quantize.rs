//! Quantization of f32 tensors on the GPU into f16, q8_0, q4_0 (`shaders/quantize.wgsl`).

use crate::shader::ShaderSource;

pub static SHADERS: &[ShaderSource] = &[];
