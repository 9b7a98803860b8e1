//! Stable-Diffusion-class model components, named after their diffusers / transformers
//! counterparts.

pub mod tokenizer;
pub mod weights;

pub use tokenizer::ClipTokenizer;
pub use weights::{SafetensorsSource, WeightPolicy, WeightSource};
