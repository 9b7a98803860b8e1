//! Classifier-free guidance as diffusers' StableDiffusionPipeline applies it
//! (pipelines/stable_diffusion/pipeline_stable_diffusion.py), and the guidance-scale embedding
//! of LCM-distilled UNets (pipelines/latent_consistency_models/
//! pipeline_latent_consistency_text2img.py, `get_guidance_scale_embedding`).
//!
//! With an ordinary UNet, guidance is on when `guidance_scale > 1`: the UNet runs on the batch
//! [negative prompt, prompt] and the two halves are combined as
//! `uncond + scale · (cond − uncond)`; at `guidance_scale <= 1` the UNet runs once on the
//! prompt alone and its output is used as is (LCM at scale 1; LCM-LoRA with a small scale
//! such as 1.5 uses ordinary guidance). A UNet with `time_cond_proj_dim` (an LCM-distilled
//! UNet) never uses classifier-free guidance: the scale enters as an embedding of
//! `w = guidance_scale − 1` added to the time embedding.

use crate::error::{Error, Result};

/// How a denoising step uses the guidance scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Guidance {
    /// One UNet call on the prompt; its output goes to the sampler unchanged.
    Off,
    /// Batch [negative, prompt]; combine with `cfg_combine(output, scale)`.
    ClassifierFree { scale: f32 },
    /// One UNet call with `timestep_cond = guidance_embedding(w, time_cond_proj_dim)`.
    Embedded { w: f32, dim: usize },
}

impl Guidance {
    /// The mode diffusers picks for `guidance_scale` and the UNet's `time_cond_proj_dim`.
    pub fn for_unet(guidance_scale: f32, time_cond_proj_dim: Option<usize>) -> Guidance {
        match time_cond_proj_dim {
            Some(dim) => Guidance::Embedded { w: guidance_scale - 1.0, dim },
            None if guidance_scale > 1.0 => Guidance::ClassifierFree { scale: guidance_scale },
            None => Guidance::Off,
        }
    }

    /// The UNet batch size per image (2 under classifier-free guidance).
    pub fn batch(&self) -> usize {
        match self {
            Guidance::ClassifierFree { .. } => 2,
            _ => 1,
        }
    }

    /// The sampler's model output from the UNet output of `batch()` images.
    pub fn combine(&self, unet_output: &[f32]) -> Result<Vec<f32>> {
        match self {
            Guidance::ClassifierFree { scale } => cfg_combine(unet_output, *scale),
            _ => Ok(unet_output.to_vec()),
        }
    }
}

/// `uncond + scale · (cond − uncond)` in f32, element by element as torch does it.
pub fn cfg(uncond: &[f32], cond: &[f32], scale: f32) -> Result<Vec<f32>> {
    if uncond.len() != cond.len() {
        return Err(Error::Invalid(format!(
            "classifier-free guidance: unconditional output has {} values, conditional {}",
            uncond.len(),
            cond.len()
        )));
    }
    Ok(uncond.iter().zip(cond).map(|(&u, &c)| u + scale * (c - u)).collect())
}

/// Splits a UNet output of batch 2 (first half negative / unconditional, second half prompt, as
/// diffusers orders them) and applies `cfg`.
pub fn cfg_combine(unet_output: &[f32], scale: f32) -> Result<Vec<f32>> {
    if !unet_output.len().is_multiple_of(2) {
        return Err(Error::Invalid(format!(
            "classifier-free guidance: a batch-2 output needs an even length, got {}",
            unet_output.len()
        )));
    }
    let (uncond, cond) = unet_output.split_at(unet_output.len() / 2);
    cfg(uncond, cond, scale)
}

/// The guidance-scale embedding of LCM-distilled UNets (VDM's sinusoidal embedding of
/// `w · 1000`): `[sin(w·1000·f_k), cos(w·1000·f_k)]` with `f_k = exp(−k · ln(10000) / (dim/2 − 1))`,
/// zero-padded to odd `dim`. f32 like diffusers.
pub fn guidance_embedding(w: f32, dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let w = w * 1000.0;
    let mut out = vec![0.0f32; dim];
    if half == 0 {
        return out;
    }
    let step = 10000f32.ln() / (half as f32 - 1.0);
    for k in 0..half {
        let arg = w * (k as f32 * -step).exp();
        out[k] = arg.sin();
        out[half + k] = arg.cos();
    }
    out
}
