//! DDPM-family scheduler configuration (diffusers schedulers/scheduling_ddpm.py,
//! scheduling_ddim.py, scheduling_pndm.py).

use super::{check_one_of, err, parse};
use crate::error::Result;
use serde::Deserialize;
use std::collections::BTreeMap;

/// The DDPM-family scheduler fields of `scheduler/scheduler_config.json`. Keys whose default
/// differs between scheduler classes (`clip_sample`, `set_alpha_to_one`, `timestep_spacing`)
/// stay `None` when absent so a sampler can apply its own class's default; every other key of
/// the file is kept in `extra` (e.g. `use_karras_sigmas`, `skip_prk_steps`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon`, `v_prediction` or `sample`.
    pub prediction_type: String,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
    pub set_alpha_to_one: Option<bool>,
    /// `leading`, `trailing` or `linspace`.
    pub timestep_spacing: Option<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Default for SchedulerConfig {
    /// The defaults DDPMScheduler, DDIMScheduler, PNDMScheduler and EulerDiscreteScheduler share.
    fn default() -> Self {
        SchedulerConfig {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            prediction_type: "epsilon".into(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            clip_sample: None,
            clip_sample_range: 1.0,
            set_alpha_to_one: None,
            timestep_spacing: None,
            extra: BTreeMap::new(),
        }
    }
}

impl SchedulerConfig {
    /// Stable Diffusion 1.5's `scheduler_config.json` (PNDMScheduler).
    pub fn sd15() -> Self {
        let mut extra = BTreeMap::new();
        extra.insert("skip_prk_steps".to_string(), serde_json::Value::Bool(true));
        SchedulerConfig {
            class_name: Some("PNDMScheduler".into()),
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            steps_offset: 1,
            clip_sample: Some(false),
            set_alpha_to_one: Some(false),
            extra,
            ..Self::default()
        }
    }

    /// Stable Diffusion 2.1's (768, v-prediction; DDIMScheduler).
    pub fn sd21() -> Self {
        SchedulerConfig {
            class_name: Some("DDIMScheduler".into()),
            prediction_type: "v_prediction".into(),
            ..Self::sd15()
        }
    }

    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let c: Self = parse(text, file)?;
        c.validate(file)?;
        Ok(c)
    }

    pub fn validate(&self, file: &str) -> Result<()> {
        if self.num_train_timesteps == 0 {
            return Err(err(file, "num_train_timesteps", "is 0"));
        }
        check_one_of(file, "beta_schedule", &self.beta_schedule, &["linear", "scaled_linear", "squaredcos_cap_v2"])?;
        if let Some(b) = &self.trained_betas {
            if b.len() != self.num_train_timesteps {
                return Err(err(
                    file,
                    "trained_betas",
                    format!("has {} values but num_train_timesteps is {}", b.len(), self.num_train_timesteps),
                ));
            }
        } else if !(self.beta_start > 0.0 && self.beta_start < self.beta_end && self.beta_end < 1.0) {
            return Err(err(
                file,
                "beta_start",
                format!(
                    "beta_start {} and beta_end {} must satisfy 0 < start < end < 1",
                    self.beta_start, self.beta_end
                ),
            ));
        }
        check_one_of(file, "prediction_type", &self.prediction_type, &["epsilon", "v_prediction", "sample"])?;
        if let Some(s) = &self.timestep_spacing {
            check_one_of(file, "timestep_spacing", s, &["leading", "trailing", "linspace"])?;
        }
        Ok(())
    }
}
