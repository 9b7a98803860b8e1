//! Component configurations as diffusers / transformers write them (`unet/config.json`,
//! `text_encoder/config.json`, `vae/config.json`, `scheduler/scheduler_config.json`,
//! `model_index.json`). Fields absent from a file take the defaults of the constructor they
//! follow: diffusers `UNet2DConditionModel.__init__` (models/unets/unet_2d_condition.py),
//! `AutoencoderKL.__init__` (models/autoencoders/autoencoder_kl.py), transformers
//! `CLIPTextConfig` (models/clip/configuration_clip.py). The scheduler's configuration is
//! [`crate::sampler::SamplerConfig`]: its absent keys take the defaults of the scheduler class a
//! sampler is built as (see `crate::sampler::config`). Unknown keys are ignored; values the
//! engine cannot run (SDXL's added embeddings, class embeddings, unknown block types) and
//! impossible values are errors naming the file and the field.

use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::BTreeMap;

mod clip;
mod unet;
mod vae;

pub use clip::ClipTextConfig;
/// The scheduler configuration is the samplers' own, whose class-dependent defaults apply when
/// a sampler is built from it.
pub use crate::sampler::SamplerConfig;
pub use unet::{UNetConfig, CROSS_ATTN_DOWN, CROSS_ATTN_UP, DOWN, MID_CROSS_ATTN, UP};
pub use vae::VaeConfig;

/// An `int` or a per-level list (`attention_head_dim`, `layers_per_block`, ...).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerLevel<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Copy + Default> PerLevel<T> {
    /// The value at `level` (a single value applies to every level; a short list repeats its
    /// last entry, an empty one gives the default: validation rejects both).
    pub fn at(&self, level: usize) -> T {
        match self {
            PerLevel::One(v) => *v,
            PerLevel::Each(v) => v.get(level).or(v.last()).copied().unwrap_or_default(),
        }
    }
    fn len(&self) -> Option<usize> {
        match self {
            PerLevel::One(_) => None,
            PerLevel::Each(v) => Some(v.len()),
        }
    }
    fn values(&self) -> Vec<T> {
        match self {
            PerLevel::One(v) => vec![*v],
            PerLevel::Each(v) => v.clone(),
        }
    }
}

fn err(file: &str, field: &str, message: impl std::fmt::Display) -> Error {
    Error::Format { file: file.to_string(), tensor: None, message: format!("field `{field}`: {message}") }
}

/// Parses a config file's JSON text; `file` names it in errors.
fn parse<T: DeserializeOwned>(text: &str, file: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Format {
        file: file.to_string(),
        tensor: None,
        message: format!("not a valid config: {e}"),
    })
}

fn check_list_len<T: Copy + Default>(file: &str, field: &str, v: &PerLevel<T>, levels: usize) -> Result<()> {
    match v.len() {
        Some(n) if n != levels => {
            Err(err(file, field, format!("has {n} entries but the model has {levels} levels (block_out_channels)")))
        }
        _ => Ok(()),
    }
}

/// The largest channel count, width or vocabulary any configuration may give: far above every
/// Stable Diffusion-class model (1280 UNet channels, 1024 text width), far below sizes whose
/// buffers would overflow.
const MAX_WIDTH: usize = 1 << 16;
/// The most layers per block / encoder layers a configuration may give.
const MAX_DEPTH: usize = 256;

/// Errors when `values` of `field` exceed `max` (sizes no real model has; usually a damaged file).
fn check_at_most(file: &str, field: &str, values: &[usize], max: usize) -> Result<()> {
    match values.iter().find(|&&v| v > max) {
        Some(v) => Err(err(
            file,
            field,
            format!("{v} is larger than any model this engine runs (at most {max}); the file is damaged or not a Stable Diffusion config"),
        )),
        None => Ok(()),
    }
}

fn check_one_of(file: &str, field: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(err(file, field, format!("`{value}` is not supported (supported: {})", allowed.join(", "))))
    }
}

/// `sample_size`: an int or `[height, width]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    Square(usize),
    HeightWidth([usize; 2]),
}

// ---------------------------------------------------------------------------------------------
// model_index.json

/// `model_index.json`: the pipeline class and each component's `[library, class]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelIndex {
    pub class_name: String,
    /// Component folder → (library, class); `(None, None)` for absent optional components.
    pub components: BTreeMap<String, (Option<String>, Option<String>)>,
    /// The generation settings the model recommends (`_loralab_defaults`).
    pub defaults: GenerationDefaults,
}

/// Generation settings a model folder recommends, from `model_index.json`'s
/// `_loralab_defaults` object (`{"guidance_scale": 5.0, "num_inference_steps": 20}`; diffusers
/// ignores keys that start with `_`). Absent fields leave the caller's own defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationDefaults {
    pub guidance_scale: Option<f32>,
    pub num_inference_steps: Option<usize>,
}

impl GenerationDefaults {
    const KEY: &'static str = "_loralab_defaults";

    fn from_value(value: Option<&serde_json::Value>, file: &str) -> Result<Self> {
        let Some(value) = value else { return Ok(Self::default()) };
        let field = |name: &str| format!("{}.{name}", Self::KEY);
        let obj = value.as_object().ok_or_else(|| err(file, Self::KEY, "must be an object"))?;
        let mut d = Self::default();
        for (key, v) in obj {
            match key.as_str() {
                "guidance_scale" => {
                    let g = v.as_f64().filter(|g| g.is_finite() && *g >= 0.0 && *g <= 100.0);
                    let g = g.ok_or_else(|| err(file, &field(key), format!("`{v}`: expected a number from 0 to 100")))?;
                    d.guidance_scale = Some(g as f32);
                }
                "num_inference_steps" => {
                    let n = v.as_u64().filter(|n| (1..=1000).contains(n));
                    let n = n.ok_or_else(|| err(file, &field(key), format!("`{v}`: expected a whole number from 1 to 1000")))?;
                    d.num_inference_steps = Some(n as usize);
                }
                // Settings of later versions are skipped, not refused.
                _ => {}
            }
        }
        Ok(d)
    }
}

impl ModelIndex {
    /// Parses `model_index.json` and checks that it describes a Stable Diffusion 1.x/2.x
    /// pipeline this engine can run.
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let map: BTreeMap<String, serde_json::Value> = parse(text, file)?;
        let class_name = match map.get("_class_name") {
            Some(serde_json::Value::String(s)) => s.clone(),
            _ => return Err(err(file, "_class_name", "is missing; not a diffusers model_index.json")),
        };
        let mut components = BTreeMap::new();
        for (key, value) in &map {
            if key.starts_with('_') {
                continue;
            }
            if let Some([lib, class]) = value.as_array().and_then(|a| <&[_; 2]>::try_from(a.as_slice()).ok()) {
                let s = |v: &serde_json::Value| v.as_str().map(str::to_string);
                components.insert(key.clone(), (s(lib), s(class)));
            }
        }
        let defaults = GenerationDefaults::from_value(map.get(GenerationDefaults::KEY), file)?;
        let index = ModelIndex { class_name, components, defaults };
        index.validate(file)?;
        Ok(index)
    }

    /// The class of component `name`, if listed.
    pub fn class_of(&self, name: &str) -> Option<&str> {
        self.components.get(name).and_then(|(_, c)| c.as_deref())
    }

    pub fn validate(&self, file: &str) -> Result<()> {
        if self.components.contains_key("text_encoder_2") || self.class_name.contains("XL") {
            return Err(err(
                file,
                "_class_name",
                format!("`{}` (SDXL) is not supported; Stable Diffusion 1.x/2.x pipelines only", self.class_name),
            ));
        }
        for (name, class) in
            [("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL"), ("text_encoder", "CLIPTextModel")]
        {
            match self.class_of(name) {
                Some(c) if c == class => {}
                Some(other) => {
                    return Err(err(file, name, format!("class `{other}` is not supported (expected `{class}`)")))
                }
                None => {
                    return Err(err(file, name, format!("is missing; a Stable Diffusion pipeline needs a {class}")))
                }
            }
        }
        Ok(())
    }
}

/// The configurations of one pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineConfig {
    pub unet: UNetConfig,
    pub text_encoder: ClipTextConfig,
    pub vae: VaeConfig,
    pub scheduler: SamplerConfig,
}

impl PipelineConfig {
    /// Stable Diffusion 1.5's configuration.
    pub fn sd15() -> Self {
        PipelineConfig {
            unet: UNetConfig::sd15(),
            text_encoder: ClipTextConfig::sd15(),
            vae: VaeConfig::sd15(),
            scheduler: SamplerConfig::sd15(),
        }
    }

    /// Stable Diffusion 2.1's (768, v-prediction) configuration.
    pub fn sd21() -> Self {
        PipelineConfig {
            unet: UNetConfig::sd21(),
            text_encoder: ClipTextConfig::sd21(),
            vae: VaeConfig::sd21(),
            scheduler: SamplerConfig::sd21(),
        }
    }
}
