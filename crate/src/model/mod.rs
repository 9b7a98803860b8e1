//! Stable-Diffusion-class model components, named after their diffusers / transformers
//! counterparts.

pub mod backward;
pub mod clip;
pub mod embeddings;
pub mod resnet;
pub mod transformer;
pub mod unet;
pub mod unet_blocks;
pub mod checkpoint;
pub mod config;
pub mod random_weights;
pub mod textual_inversion;
pub mod tokenizer;
pub mod vae;
pub mod vae_blocks;
pub mod vae_tiling;
pub mod weights;

pub use tokenizer::ClipTokenizer;
pub use random_weights::RandomWeights;
pub use weights::{SafetensorsSource, WeightPolicy, WeightSource};
