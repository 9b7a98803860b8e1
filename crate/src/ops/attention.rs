//! Fused flash-style scaled dot-product attention (`shaders/attention.wgsl`).

use crate::shader::ShaderSource;

pub static SHADERS: &[ShaderSource] = &[];
