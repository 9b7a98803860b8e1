//! The sampler's view of `scheduler/scheduler_config.json`. Every key is optional: diffusers
//! builds a sampler with `<SchedulerClass>.from_config(config, **overrides)`, so a key absent
//! from the file takes the default of the class being built (DDIMScheduler's `clip_sample` is
//! true, EulerDiscreteScheduler's `timestep_spacing` is `linspace`, ...). `Sampler::new`
//! applies those defaults; this module only parses and type-checks. This is also the
//! pipeline's scheduler configuration (`model::config::PipelineConfig::scheduler`). Keys the
//! samplers do not read (PNDM's `skip_prk_steps`, `_diffusers_version`, ...) are kept in
//! `extra`; a known key with a value of the wrong type or outside its choices is an error
//! naming the field.

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

/// How the training betas are laid out over `num_train_timesteps`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCosCapV2,
}

/// What the UNet predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

/// How inference timesteps are spaced over the training timesteps (Table 2 of
/// arXiv:2305.08891).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// The sigma appended after the last inference step (Euler, DPM-Solver).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalSigmas {
    Zero,
    SigmaMin,
}

/// DPM-Solver's second-order update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SolverType {
    Midpoint,
    Heun,
}

/// The fields of a diffusers scheduler config that the samplers read; `None` = absent (or
/// JSON `null`), i.e. the sampler class's default applies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplerConfig {
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<BetaSchedule>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<PredictionType>,
    pub steps_offset: Option<usize>,
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub rescale_betas_zero_snr: Option<bool>,
    /// Dynamic thresholding (Imagen); not supported, `true` is refused by `Sampler::new`.
    pub thresholding: Option<bool>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub final_sigmas_type: Option<FinalSigmas>,
    /// EulerDiscrete: only `linear` is supported.
    pub interpolation_type: Option<String>,
    /// EulerDiscrete: `discrete` or `continuous`.
    pub timestep_type: Option<String>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub solver_order: Option<usize>,
    pub solver_type: Option<SolverType>,
    /// DPM-Solver: only `dpmsolver++` is supported.
    pub algorithm_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub lambda_min_clipped: Option<f64>,
    pub variance_type: Option<String>,
    pub original_inference_steps: Option<usize>,
    pub timestep_scaling: Option<f64>,
    /// Every other key of the file, as written (`skip_prk_steps`, `_diffusers_version`, ...).
    pub extra: BTreeMap<String, Value>,
}

/// `num_train_timesteps` of every diffusers scheduler class when absent.
const DEFAULT_TRAIN_TIMESTEPS: usize = 1000;

/// The most training timesteps a config may declare. Stable Diffusion models use 1000; the
/// samplers build tables of this length, so an absurd value would allocate gigabytes.
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

fn field_err(file: &str, field: &str, message: impl std::fmt::Display) -> Error {
    Error::Format { file: file.to_string(), tensor: None, message: format!("field `{field}`: {message}") }
}

/// Python's json writes `-Infinity`, `Infinity` and `NaN` (diffusers saves
/// `lambda_min_clipped: -Infinity`); serde_json does not accept them, so outside strings they
/// become the strings `"-inf"`, `"inf"` and `"nan"`, which `num` reads back.
fn python_json_to_strict(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_str = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_str {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let mut matched = false;
        for (token, repl) in [("-Infinity", "\"-inf\""), ("Infinity", "\"inf\""), ("NaN", "\"nan\"")] {
            if rest.starts_with(token) {
                out.push_str(repl);
                rest = &rest[token.len()..];
                matched = true;
                break;
            }
        }
        if matched {
            continue;
        }
        if c == '"' {
            in_str = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

struct Fields<'a> {
    map: &'a Map<String, Value>,
    file: &'a str,
    /// The keys read so far; the others go to `extra`.
    read: RefCell<BTreeSet<String>>,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.read.borrow_mut().insert(key.to_string());
        self.map.get(key).filter(|v| !v.is_null())
    }
    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(field_err(self.file, key, format!("expected true or false, got {v}"))),
        }
    }
    fn num(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(Value::String(s)) if matches!(s.as_str(), "inf" | "-inf" | "nan") => Ok(s.parse().ok()),
            Some(v) => Err(field_err(self.file, key, format!("expected a number, got {v}"))),
        }
    }
    fn positive(&self, key: &str) -> Result<Option<f64>> {
        match self.num(key)? {
            Some(x) if !(x > 0.0 && x.is_finite()) => {
                Err(field_err(self.file, key, format!("must be a positive number, got {x}")))
            }
            x => Ok(x),
        }
    }
    fn uint(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(Some(n.as_u64().unwrap() as usize)),
            Some(v) => Err(field_err(self.file, key, format!("expected a non-negative integer, got {v}"))),
        }
    }
    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(field_err(self.file, key, format!("expected a string, got {v}"))),
        }
    }
    fn choice<T: Copy>(&self, key: &str, choices: &[(&str, T)]) -> Result<Option<T>> {
        let Some(s) = self.string(key)? else { return Ok(None) };
        match choices.iter().find(|(name, _)| *name == s) {
            Some((_, v)) => Ok(Some(*v)),
            None => {
                let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
                Err(field_err(self.file, key, format!("`{s}` is not one of {}", names.join(" | "))))
            }
        }
    }
}

impl SamplerConfig {
    /// Parses the text of a `scheduler_config.json`; `file` names it in errors.
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(&python_json_to_strict(text)).map_err(|e| Error::Format {
            file: file.to_string(),
            tensor: None,
            message: format!("not a valid scheduler config: {e}"),
        })?;
        Self::from_value(&value, file)
    }

    /// Reads the fields from an already parsed JSON object.
    pub fn from_value(value: &Value, file: &str) -> Result<Self> {
        let map = value.as_object().ok_or_else(|| Error::Format {
            file: file.to_string(),
            tensor: None,
            message: "a scheduler config must be a JSON object".into(),
        })?;
        let f = Fields { map, file, read: RefCell::new(BTreeSet::new()) };
        let trained_betas = match f.get("trained_betas") {
            None => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| v.as_f64())
                    .collect::<Option<Vec<f64>>>()
                    .ok_or_else(|| field_err(file, "trained_betas", "expected a list of numbers"))?,
            ),
            Some(v) => return Err(field_err(file, "trained_betas", format!("expected a list of numbers, got {v}"))),
        };
        let c = SamplerConfig {
            class_name: f.string("_class_name")?,
            num_train_timesteps: f.uint("num_train_timesteps")?,
            beta_start: f.positive("beta_start")?,
            beta_end: f.positive("beta_end")?,
            beta_schedule: f.choice(
                "beta_schedule",
                &[
                    ("linear", BetaSchedule::Linear),
                    ("scaled_linear", BetaSchedule::ScaledLinear),
                    ("squaredcos_cap_v2", BetaSchedule::SquaredCosCapV2),
                ],
            )?,
            trained_betas,
            prediction_type: f.choice(
                "prediction_type",
                &[
                    ("epsilon", PredictionType::Epsilon),
                    ("v_prediction", PredictionType::VPrediction),
                    ("sample", PredictionType::Sample),
                ],
            )?,
            steps_offset: f.uint("steps_offset")?,
            set_alpha_to_one: f.bool("set_alpha_to_one")?,
            clip_sample: f.bool("clip_sample")?,
            clip_sample_range: f.positive("clip_sample_range")?,
            timestep_spacing: f.choice(
                "timestep_spacing",
                &[
                    ("leading", TimestepSpacing::Leading),
                    ("trailing", TimestepSpacing::Trailing),
                    ("linspace", TimestepSpacing::Linspace),
                ],
            )?,
            rescale_betas_zero_snr: f.bool("rescale_betas_zero_snr")?,
            thresholding: f.bool("thresholding")?,
            use_karras_sigmas: f.bool("use_karras_sigmas")?,
            use_exponential_sigmas: f.bool("use_exponential_sigmas")?,
            use_beta_sigmas: f.bool("use_beta_sigmas")?,
            use_lu_lambdas: f.bool("use_lu_lambdas")?,
            use_flow_sigmas: f.bool("use_flow_sigmas")?,
            final_sigmas_type: f
                .choice("final_sigmas_type", &[("zero", FinalSigmas::Zero), ("sigma_min", FinalSigmas::SigmaMin)])?,
            interpolation_type: f.string("interpolation_type")?,
            timestep_type: f.string("timestep_type")?,
            sigma_min: f.positive("sigma_min")?,
            sigma_max: f.positive("sigma_max")?,
            solver_order: f.uint("solver_order")?,
            solver_type: f.choice("solver_type", &[("midpoint", SolverType::Midpoint), ("heun", SolverType::Heun)])?,
            algorithm_type: f.string("algorithm_type")?,
            lower_order_final: f.bool("lower_order_final")?,
            euler_at_final: f.bool("euler_at_final")?,
            lambda_min_clipped: f.num("lambda_min_clipped")?,
            variance_type: f.string("variance_type")?,
            original_inference_steps: f.uint("original_inference_steps")?,
            timestep_scaling: f.positive("timestep_scaling")?,
            extra: BTreeMap::new(),
        };
        let read = f.read.into_inner();
        let extra = map.iter().filter(|(k, _)| !read.contains(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        let c = SamplerConfig { extra, ..c };
        c.validate(file)?;
        Ok(c)
    }

    /// Checks the values against each other (a parsed config is already checked); `file`
    /// names the config in errors. Values whose default depends on the scheduler class are
    /// checked again, with those defaults, by `Sampler::new`.
    pub fn validate(&self, file: &str) -> Result<()> {
        let n = self.num_train_timesteps.unwrap_or(DEFAULT_TRAIN_TIMESTEPS);
        if n == 0 {
            return Err(field_err(file, "num_train_timesteps", "must be at least 1"));
        }
        if n > MAX_TRAIN_TIMESTEPS {
            return Err(field_err(
                file,
                "num_train_timesteps",
                format!("{n} is more than the {MAX_TRAIN_TIMESTEPS} supported (Stable Diffusion models use 1000)"),
            ));
        }
        if let Some(b) = &self.trained_betas {
            if b.len() != n {
                return Err(field_err(
                    file,
                    "trained_betas",
                    format!("has {} values but num_train_timesteps is {n}", b.len()),
                ));
            }
            if b.iter().any(|&x| !(0.0..=1.0).contains(&x)) {
                return Err(field_err(
                    file,
                    "trained_betas",
                    "values must lie in [0, 1] and the list must not be empty",
                ));
            }
        } else {
            for (field, v) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
                if let Some(v) = v.filter(|v| !(*v > 0.0 && *v < 1.0)) {
                    return Err(field_err(file, field, format!("{v} is not in (0, 1)")));
                }
            }
            if let (Some(start), Some(end)) = (self.beta_start, self.beta_end) {
                if start >= end {
                    return Err(field_err(file, "beta_end", format!("{end} is not above beta_start {start}")));
                }
            }
        }
        Ok(())
    }

    /// Stable Diffusion 1.5's `scheduler/scheduler_config.json` (PNDMScheduler).
    pub fn sd15() -> Self {
        SamplerConfig {
            class_name: Some("PNDMScheduler".into()),
            num_train_timesteps: Some(1000),
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            beta_schedule: Some(BetaSchedule::ScaledLinear),
            steps_offset: Some(1),
            clip_sample: Some(false),
            set_alpha_to_one: Some(false),
            extra: BTreeMap::from([("skip_prk_steps".to_string(), Value::Bool(true))]),
            ..Self::default()
        }
    }

    /// Stable Diffusion 2.1's (768, v-prediction; DDIMScheduler).
    pub fn sd21() -> Self {
        SamplerConfig {
            class_name: Some("DDIMScheduler".into()),
            prediction_type: Some(PredictionType::VPrediction),
            ..Self::sd15()
        }
    }
}
