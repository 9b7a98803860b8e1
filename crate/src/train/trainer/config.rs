//! The settings of a training run ([`TrainConfig`]) and of the images sampled while it runs
//! ([`SampleSettings`]).
//!
//! A [`TrainConfig`] is everything that decides the trained adapter: resuming from a checkpoint
//! requires the same values ([`TrainConfig::mismatches`]), except gradient checkpointing, which
//! changes memory use and not results. It travels in the checkpoint as JSON.

use crate::error::{Error, Result};
use crate::model::backward::{LoraConfig, Targets};
use crate::ops::grad::optim::{AdamW, LrSchedule};
use crate::sampler::SamplerKind;
use serde::{Deserialize, Serialize};

/// The schedule names [`LrSchedule::from_name`] takes.
pub const SCHEDULES: [&str; 5] = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"];

/// Everything that decides the trained adapter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// `attn`, `attn+ff` or `attn+ff+conv` ([`Targets::from_name`]).
    pub targets: String,
    /// Rank and alpha of linear and 1×1 layers (kohya `network_dim`, `network_alpha`).
    pub rank: usize,
    pub alpha: f32,
    /// Rank and alpha of 3×3 convolutions (target set `attn+ff+conv`; kohya `conv_dim`,
    /// `conv_alpha`).
    pub conv_rank: usize,
    pub conv_alpha: f32,
    /// Base learning rate of the UNet adapters.
    pub lr: f64,
    /// Base learning rate of the text encoder's adapters (same schedule); `None`: the text
    /// encoder is not trained and the prompt embeddings are cached.
    #[serde(default)]
    pub te_lr: Option<f64>,
    /// Learning rate of the trigger word's own token embedding (pivotal tuning, as diffusers'
    /// advanced DreamBooth LoRA script and A1111's bundled embeddings): the trigger becomes a
    /// new token whose vectors start from the word's current embedding and are trained beside
    /// the adapters (same schedule, their own AdamW group); the export bundles them
    /// (`bundle_emb.<trigger>.string_to_param.*`). `None`: the word keeps its embedding.
    #[serde(default)]
    pub trigger_lr: Option<f64>,
    /// One of [`SCHEDULES`].
    pub schedule: String,
    pub warmup_steps: u64,
    /// Cycles of `cosine_with_restarts`.
    pub cycles: u64,
    /// Optimizer steps.
    pub steps: u64,
    /// Training images per micro-batch (regularization images add as many again).
    pub batch: usize,
    /// Micro-batches whose gradients make one optimizer step.
    pub grad_accum: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clipping (torch's `clip_grad_norm_`); 0 turns it off.
    pub max_grad_norm: f32,
    /// Weight of the regularization images' loss (prior preservation).
    pub prior_weight: f32,
    /// Seeds A's initialisation, the image order, flips, the posterior samples, the noise and
    /// the timesteps.
    pub seed: u64,
    /// diffusers `clip_skip` of the prompt embeddings (0 = last layer).
    pub clip_skip: usize,
    /// Gradient checkpointing ([`crate::model::backward::TrainOptions::checkpointing`]): less
    /// memory, about one more forward pass of time, the same results.
    pub checkpointing: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            targets: "attn".into(),
            rank: 16,
            alpha: 8.0,
            conv_rank: 8,
            conv_alpha: 4.0,
            lr: 1e-4,
            te_lr: None,
            trigger_lr: None,
            schedule: "constant".into(),
            warmup_steps: 0,
            cycles: 1,
            steps: 1000,
            batch: 1,
            grad_accum: 1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: 1.0,
            prior_weight: 1.0,
            seed: 0,
            clip_skip: 0,
            checkpointing: false,
        }
    }
}

fn invalid(what: &str, message: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("training setting `{what}`: {message}"))
}

impl TrainConfig {
    /// Checks every value; errors name the setting and say what it takes.
    pub fn validate(&self) -> Result<()> {
        self.target_set()?;
        if self.rank == 0 || self.rank > 1024 {
            return Err(invalid("rank", format!("{} must be between 1 and 1024", self.rank)));
        }
        if self.target_set()? == Targets::AttnFfConv && (self.conv_rank == 0 || self.conv_rank > 1024) {
            return Err(invalid("conv_rank", format!("{} must be between 1 and 1024", self.conv_rank)));
        }
        for (what, v) in [("alpha", self.alpha), ("conv_alpha", self.conv_alpha), ("prior_weight", self.prior_weight)] {
            if !v.is_finite() || v < 0.0 {
                return Err(invalid(what, format!("{v} must be a finite number >= 0")));
            }
        }
        if !self.max_grad_norm.is_finite() || self.max_grad_norm < 0.0 {
            return Err(invalid("max_grad_norm", format!("{} must be >= 0 (0 turns clipping off)", self.max_grad_norm)));
        }
        if !self.lr.is_finite() || self.lr <= 0.0 || self.lr > 1.0 {
            return Err(invalid("lr", format!("{} must be a number in (0, 1] (1e-4 is typical)", self.lr)));
        }
        if let Some(lr) = self.te_lr {
            if !lr.is_finite() || lr <= 0.0 || lr > 1.0 {
                return Err(invalid("te_lr", format!("{lr} must be a number in (0, 1] (5e-5 is typical)")));
            }
        }
        if let Some(lr) = self.trigger_lr {
            if !lr.is_finite() || lr <= 0.0 || lr > 1.0 {
                return Err(invalid("trigger_lr", format!("{lr} must be a number in (0, 1] (1e-3 is typical)")));
            }
        }
        for (what, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(invalid(what, format!("{v} must be in [0, 1)")));
            }
        }
        if !self.eps.is_finite() || self.eps <= 0.0 {
            return Err(invalid("eps", format!("{} must be > 0", self.eps)));
        }
        let max_lr = self.lr.max(self.te_lr.unwrap_or(0.0)).max(self.trigger_lr.unwrap_or(0.0));
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 || max_lr * self.weight_decay >= 1.0 {
            return Err(invalid("weight_decay", format!("{} must be >= 0 with lr × weight_decay < 1", self.weight_decay)));
        }
        if self.steps == 0 || self.steps > i32::MAX as u64 {
            return Err(invalid("steps", format!("{} must be between 1 and {}", self.steps, i32::MAX)));
        }
        if self.batch == 0 || self.batch > 256 {
            return Err(invalid("batch", format!("{} must be between 1 and 256", self.batch)));
        }
        if self.grad_accum == 0 || self.grad_accum > 1024 {
            return Err(invalid("grad_accum", format!("{} must be between 1 and 1024", self.grad_accum)));
        }
        if self.warmup_steps > self.steps {
            return Err(invalid("warmup_steps", format!("{} is more than the {} steps", self.warmup_steps, self.steps)));
        }
        if self.schedule == "cosine_with_restarts" && self.cycles == 0 {
            return Err(invalid("cycles", "cosine_with_restarts needs at least 1 cycle"));
        }
        self.lr_schedule()?;
        Ok(())
    }

    pub fn target_set(&self) -> Result<Targets> {
        Targets::from_name(&self.targets)
    }

    /// The adapters' settings (A seeded from the run's seed).
    pub fn lora(&self) -> Result<LoraConfig> {
        Ok(LoraConfig {
            targets: self.target_set()?,
            rank: self.rank,
            alpha: self.alpha,
            conv_rank: self.conv_rank,
            conv_alpha: self.conv_alpha,
            seed: self.seed,
        })
    }

    pub fn lr_schedule(&self) -> Result<LrSchedule> {
        LrSchedule::from_name(&self.schedule, self.warmup_steps, self.steps, self.cycles)
    }

    pub fn adamw(&self) -> AdamW {
        AdamW { beta1: self.beta1, beta2: self.beta2, eps: self.eps, weight_decay: self.weight_decay }
    }

    /// Images one optimizer step trains on (batch × accumulation).
    pub fn images_per_step(&self) -> u64 {
        (self.batch * self.grad_accum) as u64
    }

    /// The settings that differ from `other` as `name: ours vs theirs`, ignoring those that do
    /// not change results (gradient checkpointing).
    pub fn mismatches(&self, other: &TrainConfig) -> Vec<String> {
        let a = serde_json::to_value(self).unwrap_or_default();
        let b = serde_json::to_value(other).unwrap_or_default();
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return vec!["the settings could not be compared".into()];
        };
        a.iter()
            .filter(|(k, _)| k.as_str() != "checkpointing")
            .filter_map(|(k, v)| {
                let w = b.get(k).cloned().unwrap_or(serde_json::Value::Null);
                (*v != w).then(|| format!("{k}: {v} vs {w}"))
            })
            .collect()
    }

    /// A warning when the run shows each training image far fewer or far more times than the
    /// usual 100–200 (`num_train_images` counts repeats, as kohya does).
    pub fn steps_warning(&self, num_train_images: usize) -> Option<String> {
        if num_train_images == 0 {
            return None;
        }
        let per_image = (self.steps * self.images_per_step()) as f64 / num_train_images as f64;
        let seen = if per_image < 10.0 { format!("{per_image:.1}") } else { format!("{per_image:.0}") };
        let advice = |lo: f64| {
            let steps = (lo * num_train_images as f64 / self.images_per_step() as f64).ceil();
            format!(
                "each training image is seen {seen} times ({} steps × {} images per step / {num_train_images} \
                 images); 100-200 is usual, i.e. about {steps:.0} steps",
                self.steps,
                self.images_per_step()
            )
        };
        if per_image < 50.0 {
            Some(format!("{}: the adapter may learn little", advice(100.0)))
        } else if per_image > 400.0 {
            Some(format!("{}: the adapter may overfit (copy the training images)", advice(200.0)))
        } else {
            None
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Format {
            file: file.to_string(),
            tensor: None,
            message: format!("the training settings in its metadata do not parse ({e})"),
        })
    }
}

/// Images generated with the adapter being trained (progress samples).
#[derive(Clone, Debug, PartialEq)]
pub struct SampleSettings {
    /// One image per prompt, each time samples are made. Empty: no samples (the VAE decoder is
    /// then not kept on the GPU).
    pub prompts: Vec<String>,
    pub negative: String,
    pub steps: usize,
    /// Guidance scale (≤ 1: no classifier-free guidance).
    pub cfg: f32,
    pub sampler: SamplerKind,
    /// The initial noise's seed: the same for every sample, so samples show what training changed.
    pub seed: u64,
}

impl Default for SampleSettings {
    fn default() -> Self {
        SampleSettings {
            prompts: vec![],
            negative: String::new(),
            steps: 20,
            cfg: 7.5,
            sampler: SamplerKind::EulerAncestral,
            seed: 0,
        }
    }
}

/// `prompt` without the whole word `trigger` (and the comma or space it leaves), for the
/// no-trigger sample beside each trigger sample.
pub fn without_trigger(prompt: &str, trigger: &str) -> String {
    let trigger = trigger.trim();
    if trigger.is_empty() {
        return prompt.to_string();
    }
    let words: Vec<&str> = prompt
        .split(' ')
        .filter(|w| !w.trim_matches(|c: char| !c.is_alphanumeric() && c != '_').eq_ignore_ascii_case(trigger))
        .collect();
    let joined = words.join(" ");
    let cleaned = joined.split(' ').filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ");
    cleaned.trim_start_matches([',', ' ']).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_and_compared() {
        let c = TrainConfig::default();
        c.validate().unwrap();
        for bad in [
            TrainConfig { rank: 0, ..c.clone() },
            TrainConfig { lr: 0.0, ..c.clone() },
            TrainConfig { schedule: "step".into(), ..c.clone() },
            TrainConfig { targets: "all".into(), ..c.clone() },
            TrainConfig { warmup_steps: 2000, ..c.clone() },
            TrainConfig { batch: 0, ..c.clone() },
            TrainConfig { te_lr: Some(0.0), ..c.clone() },
            TrainConfig { te_lr: Some(f64::NAN), ..c.clone() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let other = TrainConfig { lr: 2e-4, checkpointing: true, ..c.clone() };
        assert_eq!(c.mismatches(&other), vec!["lr: 0.0001 vs 0.0002".to_string()]);
        assert_eq!(TrainConfig::from_json(&c.to_json(), "x").unwrap(), c);
        assert!(TrainConfig::from_json("{}", "x").unwrap_err().to_string().contains("x"));
    }

    #[test]
    fn step_warnings_and_trigger_removal() {
        let c = TrainConfig { steps: 3000, ..TrainConfig::default() };
        assert!(c.steps_warning(20).is_none());
        assert!(c.steps_warning(100).unwrap().contains("learn little"));
        assert!(c.steps_warning(5).unwrap().contains("overfit"));
        assert_eq!(without_trigger("a red sks shape on a blue background", "sks"), "a red shape on a blue background");
        assert_eq!(without_trigger("sks, a dog", "sks"), "a dog");
        assert_eq!(without_trigger("two sks shapes", "SKS"), "two shapes");
    }
}
