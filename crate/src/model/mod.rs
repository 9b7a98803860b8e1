//! Stable-Diffusion-class model components, named after their diffusers / transformers
//! counterparts.

pub mod tokenizer;

pub use tokenizer::ClipTokenizer;
