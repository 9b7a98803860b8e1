//! diffusers `AutoencoderKL` configuration (models/autoencoders/autoencoder_kl.py).

use super::{check_at_most, check_one_of, err, parse, SampleSize, MAX_DEPTH, MAX_WIDTH};
use crate::error::Result;
use serde::Deserialize;

/// diffusers `AutoencoderKL` configuration (`vae/config.json`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: Option<SampleSize>,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub latents_mean: Option<Vec<f64>>,
    pub latents_std: Option<Vec<f64>>,
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    /// diffusers' constructor defaults.
    fn default() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: Some(SampleSize::Square(32)),
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    /// Stable Diffusion 1.5's VAE.
    pub fn sd15() -> Self {
        VaeConfig {
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            sample_size: Some(SampleSize::Square(512)),
            ..Self::default()
        }
    }

    /// Stable Diffusion 2.1's VAE (same weights layout, 768 samples).
    pub fn sd21() -> Self {
        VaeConfig { sample_size: Some(SampleSize::Square(768)), ..Self::sd15() }
    }

    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let c: Self = parse(text, file)?;
        c.validate(file)?;
        Ok(c)
    }

    pub fn levels(&self) -> usize {
        self.block_out_channels.len()
    }

    pub fn validate(&self, file: &str) -> Result<()> {
        let n = self.levels();
        if n == 0 {
            return Err(err(file, "block_out_channels", "is empty"));
        }
        if let Some(i) = self.block_out_channels.iter().position(|&c| c == 0) {
            return Err(err(file, "block_out_channels", format!("entry {i} is 0")));
        }
        for (field, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("layers_per_block", self.layers_per_block),
            ("norm_num_groups", self.norm_num_groups),
        ] {
            if v == 0 {
                return Err(err(file, field, "is 0"));
            }
            check_at_most(file, field, &[v], if field == "layers_per_block" { MAX_DEPTH } else { MAX_WIDTH })?;
        }
        check_at_most(file, "block_out_channels", &self.block_out_channels, MAX_WIDTH)?;
        for (field, types, allowed) in [
            ("down_block_types", &self.down_block_types, "DownEncoderBlock2D"),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if types.len() != n {
                return Err(err(file, field, format!("has {} entries but block_out_channels has {n}", types.len())));
            }
            for t in types {
                check_one_of(file, field, t, &[allowed])?;
            }
        }
        if let Some(&c) = self.block_out_channels.iter().find(|&&c| !c.is_multiple_of(self.norm_num_groups)) {
            return Err(err(
                file,
                "norm_num_groups",
                format!("{} groups do not divide {c} channels", self.norm_num_groups),
            ));
        }
        if self.scaling_factor.is_nan() || self.scaling_factor <= 0.0 {
            return Err(err(file, "scaling_factor", format!("{} is not positive", self.scaling_factor)));
        }
        check_one_of(file, "act_fn", &self.act_fn, &["silu"])
    }
}
