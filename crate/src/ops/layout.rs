//! Data movement: nearest 2x upsample, channel concat, timestep embedding (`shaders/layout.wgsl`).

use crate::shader::ShaderSource;

pub static SHADERS: &[ShaderSource] = &[];
