//! transformers `CLIPTextConfig` (models/clip/configuration_clip.py).

use super::{check_at_most, check_one_of, err, parse, PerLevel, MAX_DEPTH, MAX_WIDTH};
use crate::error::Result;
use serde::Deserialize;

/// transformers `CLIPTextConfig` (`text_encoder/config.json`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: Option<usize>,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    /// `quick_gelu` (OpenAI CLIP, SD1.x) or `gelu` (OpenCLIP, SD2.x).
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    /// transformers allows a list; the first id is used.
    pub eos_token_id: Option<PerLevel<u32>>,
}

impl Default for ClipTextConfig {
    /// transformers' `CLIPTextConfig` defaults.
    fn default() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: Some(512),
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            pad_token_id: Some(1),
            bos_token_id: Some(49406),
            eos_token_id: Some(PerLevel::One(49407)),
        }
    }
}

impl ClipTextConfig {
    /// Stable Diffusion 1.5's text encoder (OpenAI CLIP ViT-L/14).
    pub fn sd15() -> Self {
        ClipTextConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: Some(768),
            num_attention_heads: 12,
            bos_token_id: Some(0),
            eos_token_id: Some(PerLevel::One(2)),
            ..Self::default()
        }
    }

    /// Stable Diffusion 2.1's text encoder (OpenCLIP ViT-H/14, 23 of 24 layers).
    pub fn sd21() -> Self {
        ClipTextConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            projection_dim: Some(512),
            num_hidden_layers: 23,
            num_attention_heads: 16,
            hidden_act: "gelu".into(),
            bos_token_id: Some(0),
            eos_token_id: Some(PerLevel::One(2)),
            ..Self::default()
        }
    }

    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let c: Self = parse(text, file)?;
        c.validate(file)?;
        Ok(c)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn validate(&self, file: &str) -> Result<()> {
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(err(file, field, "is 0"));
            }
            let max = if field == "num_hidden_layers" { MAX_DEPTH } else { MAX_WIDTH * 16 };
            check_at_most(file, field, &[v], max)?;
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(err(
                file,
                "num_attention_heads",
                format!("{} heads do not divide hidden_size {}", self.num_attention_heads, self.hidden_size),
            ));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err(err(file, "layer_norm_eps", format!("{} is not positive", self.layer_norm_eps)));
        }
        check_one_of(file, "hidden_act", &self.hidden_act, &["quick_gelu", "gelu"])
    }
}
