//! Group norm (+ SiLU), layer norm and softmax (`shaders/norm.wgsl`).

use crate::shader::ShaderSource;

pub static SHADERS: &[ShaderSource] = &[];
