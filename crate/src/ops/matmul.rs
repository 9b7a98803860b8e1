//! Tiled matmul / linear with bias on f32, f16, q8_0 and q4_0 weights (`shaders/matmul.wgsl`).

use crate::shader::ShaderSource;

pub static SHADERS: &[ShaderSource] = &[];
