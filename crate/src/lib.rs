//! loralab: a Stable-Diffusion-class engine on WebGPU with LoRA adapters applied inside the
//! kernels. Runs natively (Vulkan / Metal / DX12 / GL through wgpu) and in the browser
//! (wasm32 + WebGPU); this crate has no browser dependencies.

pub mod adapter;
pub mod bench;
pub mod error;
pub mod eval;
pub mod gpu;
pub mod io;
pub mod licence;
pub mod lora;
pub mod model;
pub mod nn;
pub mod ops;
pub mod parameters;
pub mod pipeline;
pub mod prompt;
pub mod provenance;
pub mod quant;
pub mod rng;
pub mod sampler;
pub mod selftest;
pub mod shader;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use gpu::{Gpu, GpuOptions};
pub use quant::DType;
pub use tensor::Tensor;
