//! Timestep conditioning of the UNet, after diffusers' `models/embeddings.py`: `Timesteps`
//! (sinusoidal projection, `get_timestep_embedding`) and `TimestepEmbedding`
//! (`linear_1 → SiLU → linear_2`, with the optional `cond_proj` of LCM-distilled UNets).

use super::weights::{WeightPolicy, WeightSource};
use crate::error::{shape_err, Result};
use crate::gpu::Gpu;
use crate::nn::{join, Linear};
use crate::ops::elementwise::{add, silu};
use crate::ops::layout::timestep_embedding;
use crate::tensor::Tensor;

/// diffusers' `Timesteps(num_channels, flip_sin_to_cos, downscale_freq_shift)` (scale 1,
/// max period 10000).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timesteps {
    pub num_channels: usize,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f32,
}

impl Timesteps {
    /// `[N, num_channels]` for N timesteps.
    pub fn forward(&self, gpu: &Gpu, timesteps: &[f32]) -> Result<Tensor> {
        timestep_embedding(gpu, timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift, 10000.0)
    }
}

/// diffusers' `TimestepEmbedding(in_channels, time_embed_dim, act_fn="silu")`.
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    cond_proj: Option<Linear>,
}

impl TimestepEmbedding {
    /// Loads `linear_1` (`in → dim`), `linear_2` (`dim → dim`) and, when `cond_proj_dim` is
    /// set, the bias-free `cond_proj` (`cond_proj_dim → in`).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        gpu: &Gpu,
        src: &dyn WeightSource,
        policy: WeightPolicy,
        prefix: &str,
        in_channels: usize,
        time_embed_dim: usize,
        cond_proj_dim: Option<usize>,
    ) -> Result<Self> {
        let p = |n: &str| join(prefix, n);
        Ok(Self {
            linear_1: Linear::load(gpu, src, &p("linear_1"), in_channels, time_embed_dim, true, policy)?,
            linear_2: Linear::load(gpu, src, &p("linear_2"), time_embed_dim, time_embed_dim, true, policy)?,
            cond_proj: match cond_proj_dim {
                Some(d) => Some(Linear::load(gpu, src, &p("cond_proj"), d, in_channels, false, policy)?),
                None => None,
            },
        })
    }

    pub fn has_cond_proj(&self) -> bool {
        self.cond_proj.is_some()
    }

    /// `sample: [B, in]` (the sinusoidal projection), `condition: [B, cond_proj_dim]` when the
    /// model has `cond_proj`; returns `[B, time_embed_dim]`.
    pub fn forward(&self, gpu: &Gpu, sample: &Tensor, condition: Option<&Tensor>) -> Result<Tensor> {
        let sample = match (&self.cond_proj, condition) {
            (Some(proj), Some(c)) => add(gpu, sample, &proj.forward(gpu, c)?)?,
            (None, None) | (Some(_), None) => sample.clone(),
            (None, Some(c)) => {
                return Err(shape_err(
                    "TimestepEmbedding",
                    format!("a timestep condition {:?} was given but the model has no cond_proj", c.shape()),
                ))
            }
        };
        let h = self.linear_1.forward(gpu, &sample)?;
        let h = silu(gpu, &h)?;
        self.linear_2.forward(gpu, &h)
    }
}

crate::visit_layers!(TimestepEmbedding: linear_1, linear_2, cond_proj);
