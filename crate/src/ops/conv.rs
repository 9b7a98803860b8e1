//! 2-D convolution as an implicit GEMM (`shaders/conv2d.wgsl`).

use crate::shader::ShaderSource;

pub static SHADERS: &[ShaderSource] = &[];
