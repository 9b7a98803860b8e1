//! Kernels. Each op family is one WGSL file in `shaders/`, one Rust module here with the
//! GPU constructor and its CPU reference (`reference`), and tests in `tests/engine/`.

pub mod adapter;
pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod grad;
pub mod gemm;
pub mod layout;
pub mod matmul;
pub mod norm;
pub mod quantize;

/// Builds the uniform words of a dispatch.
#[derive(Default, Clone)]
pub struct Params(pub Vec<u32>);

impl Params {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u(mut self, v: usize) -> Self {
        self.0.push(u32::try_from(v).expect("kernel parameter exceeds u32"));
        self
    }
    pub fn f(mut self, v: f32) -> Self {
        self.0.push(v.to_bits());
        self
    }
}

/// Workgroups of `wg` invocations needed to cover `n` items.
pub fn groups(n: usize, wg: usize) -> u32 {
    u32::try_from(n.div_ceil(wg)).unwrap_or(u32::MAX)
}
