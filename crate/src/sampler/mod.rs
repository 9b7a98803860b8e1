//! Diffusion samplers matching diffusers 0.42.1's schedulers: DDIM (schedulers/scheduling_ddim.py),
//! Euler (scheduling_euler_discrete.py), Euler ancestral (scheduling_euler_ancestral_discrete.py),
//! DPM-Solver++ 2M with and without Karras sigmas (scheduling_dpmsolver_multistep.py,
//! `algorithm_type="dpmsolver++"`, midpoint) and LCM (scheduling_lcm.py).
//!
//! Latents are small (4 × H/8 × W/8), so a step runs on the host over f32 slices: the pipeline
//! reads the UNet output back anyway. Arithmetic follows diffusers: the schedule's scalars (ᾱ,
//! σ, the step coefficients) are f32 like diffusers' 0-dim tensors, the inference schedule
//! (spacing, interpolation, Karras sigmas) is f64 like numpy, and the per-element update is
//! evaluated in f64 and rounded once to f32.
//!
//! Use: `Sampler::new(kind, &config)`, `set_timesteps(n)`, latents = `initial_latents(noise)`,
//! then for each `t` in `timesteps()`: UNet on `scale_model_input(latents, t)` (batch 2 under
//! classifier-free guidance, combined by `guidance::cfg_combine`), then
//! `latents = step(&output, t, &latents, None)?.prev_sample`.
//!
//! Noise: stochastic steps (Euler ancestral at every step, LCM at every step but the last,
//! DDIM with η > 0) take the `noise` argument when given (exactly `sample.len()` standard
//! normal values, e.g. noise recorded from diffusers), else draw `sample.len()` values from the
//! sampler's own `crate::rng::Rng` (seeded by `set_noise_seed`, 0 by default) with
//! `Rng::normal_vec`, one draw per stochastic step in step order.

pub mod config;
mod ddim;
mod dpmpp;
mod euler;
pub mod guidance;
mod lcm;
pub mod schedule;

pub use config::{BetaSchedule, FinalSigmas, PredictionType, SamplerConfig, SolverType, TimestepSpacing};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// The sampler families the engine offers (A1111 / ComfyUI names in the docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    /// DDIMScheduler (deterministic unless η > 0).
    Ddim,
    /// EulerDiscreteScheduler ("Euler"); honours `use_karras_sigmas` from the config.
    Euler,
    /// EulerAncestralDiscreteScheduler ("Euler a").
    EulerAncestral,
    /// DPMSolverMultistepScheduler, dpmsolver++ order 2 ("DPM++ 2M"); Karras sigmas off.
    DpmPp2M,
    /// The same with `use_karras_sigmas=True` ("DPM++ 2M Karras").
    DpmPp2MKarras,
    /// LCMScheduler (latent consistency models, LCM-LoRA).
    Lcm,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 6] = [
        SamplerKind::Ddim,
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::DpmPp2M,
        SamplerKind::DpmPp2MKarras,
        SamplerKind::Lcm,
    ];

    /// Short name: `ddim`, `euler`, `euler_a`, `dpmpp_2m`, `dpmpp_2m_karras`, `lcm`.
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Euler => "euler",
            SamplerKind::EulerAncestral => "euler_a",
            SamplerKind::DpmPp2M => "dpmpp_2m",
            SamplerKind::DpmPp2MKarras => "dpmpp_2m_karras",
            SamplerKind::Lcm => "lcm",
        }
    }

    /// The diffusers class the kind follows.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "DDIMScheduler",
            SamplerKind::Euler => "EulerDiscreteScheduler",
            SamplerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SamplerKind::DpmPp2M | SamplerKind::DpmPp2MKarras => "DPMSolverMultistepScheduler",
            SamplerKind::Lcm => "LCMScheduler",
        }
    }

    /// Parses a short name (as `name` writes it; `euler_ancestral`, `dpm++_2m`, `dpm++_2m_karras`
    /// are accepted too).
    pub fn parse(s: &str) -> Result<Self> {
        let n = s.trim().to_ascii_lowercase().replace(['-', ' '], "_");
        Ok(match n.as_str() {
            "ddim" => SamplerKind::Ddim,
            "euler" => SamplerKind::Euler,
            "euler_a" | "euler_ancestral" => SamplerKind::EulerAncestral,
            "dpmpp_2m" | "dpm++_2m" => SamplerKind::DpmPp2M,
            "dpmpp_2m_karras" | "dpm++_2m_karras" => SamplerKind::DpmPp2MKarras,
            "lcm" => SamplerKind::Lcm,
            _ => {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                return Err(Error::Invalid(format!("unknown sampler `{s}` (one of {})", names.join(", "))));
            }
        })
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The result of one step.
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// The latents entering the next step (after the last step: the final latents).
    pub prev_sample: Vec<f32>,
    /// The model's current estimate of the clean latents (diffusers' `pred_original_sample`,
    /// LCM's `denoised`, DPM-Solver's converted output), for previews.
    pub denoised: Vec<f32>,
}

/// The effective settings of a sampler: the config's values, else its diffusers class's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: PredictionType,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub timestep_spacing: TimestepSpacing,
    pub rescale_betas_zero_snr: bool,
    pub use_karras_sigmas: bool,
    pub final_sigmas_type: FinalSigmas,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub solver_order: usize,
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub lambda_min_clipped: f64,
    pub original_inference_steps: usize,
    pub timestep_scaling: f64,
}

fn bad(kind: SamplerKind, field: &str, message: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("sampler {kind} ({}): config field `{field}`: {message}", kind.diffusers_class()))
}

impl Params {
    fn resolve(kind: SamplerKind, c: &SamplerConfig) -> Result<Params> {
        use SamplerKind::*;
        let lcm = kind == Lcm;
        let dpm = matches!(kind, DpmPp2M | DpmPp2MKarras);
        let p = Params {
            num_train_timesteps: c.num_train_timesteps.unwrap_or(1000),
            beta_start: c.beta_start.unwrap_or(if lcm { 0.00085 } else { 0.0001 }),
            beta_end: c.beta_end.unwrap_or(if lcm { 0.012 } else { 0.02 }),
            beta_schedule: c.beta_schedule.unwrap_or(if lcm {
                BetaSchedule::ScaledLinear
            } else {
                BetaSchedule::Linear
            }),
            prediction_type: c.prediction_type.unwrap_or(PredictionType::Epsilon),
            steps_offset: c.steps_offset.unwrap_or(0),
            set_alpha_to_one: c.set_alpha_to_one.unwrap_or(true),
            clip_sample: c.clip_sample.unwrap_or(kind == Ddim),
            clip_sample_range: c.clip_sample_range.unwrap_or(1.0),
            timestep_spacing: c.timestep_spacing.unwrap_or(match kind {
                Ddim | Lcm => TimestepSpacing::Leading,
                _ => TimestepSpacing::Linspace,
            }),
            rescale_betas_zero_snr: c.rescale_betas_zero_snr.unwrap_or(false),
            use_karras_sigmas: match kind {
                DpmPp2M => false,
                DpmPp2MKarras => true,
                Euler => c.use_karras_sigmas.unwrap_or(false),
                _ => false,
            },
            final_sigmas_type: c.final_sigmas_type.unwrap_or(FinalSigmas::Zero),
            sigma_min: if kind == Euler { c.sigma_min } else { None },
            sigma_max: if kind == Euler { c.sigma_max } else { None },
            solver_order: c.solver_order.unwrap_or(2),
            solver_type: c.solver_type.unwrap_or(SolverType::Midpoint),
            lower_order_final: c.lower_order_final.unwrap_or(true),
            euler_at_final: c.euler_at_final.unwrap_or(false),
            lambda_min_clipped: c.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY),
            original_inference_steps: c.original_inference_steps.unwrap_or(50),
            timestep_scaling: c.timestep_scaling.unwrap_or(10.0),
        };
        // Settings these samplers do not implement are refused rather than ignored.
        // Fields the class does not have keep their defaults, so equal settings compare equal.
        let mut p = p;
        if !matches!(kind, Ddim | Lcm) {
            (p.set_alpha_to_one, p.clip_sample, p.clip_sample_range) = (true, false, 1.0);
        }
        if !lcm {
            (p.original_inference_steps, p.timestep_scaling) = (50, 10.0);
        }
        if !dpm {
            (p.solver_order, p.solver_type, p.lower_order_final, p.euler_at_final) =
                (2, SolverType::Midpoint, true, false);
            p.lambda_min_clipped = f64::NEG_INFINITY;
        }
        if !matches!(kind, Euler | DpmPp2M | DpmPp2MKarras) {
            p.final_sigmas_type = FinalSigmas::Zero;
        }
        let on = |v: Option<bool>| v == Some(true);
        if on(c.thresholding) && matches!(kind, Ddim | Lcm | DpmPp2M | DpmPp2MKarras) {
            return Err(bad(kind, "thresholding", "dynamic thresholding is not supported"));
        }
        if matches!(kind, Euler | DpmPp2M | DpmPp2MKarras) {
            for (field, v) in
                [("use_exponential_sigmas", c.use_exponential_sigmas), ("use_beta_sigmas", c.use_beta_sigmas)]
            {
                if on(v) {
                    return Err(bad(kind, field, "only Karras or the default sigmas are supported"));
                }
            }
        }
        if kind == Euler {
            if let Some(t) = c.interpolation_type.as_deref().filter(|t| *t != "linear") {
                return Err(bad(kind, "interpolation_type", format!("`{t}` is not supported (only `linear`)")));
            }
            if c.timestep_type.as_deref() == Some("continuous") && p.prediction_type == PredictionType::VPrediction {
                return Err(bad(kind, "timestep_type", "continuous timesteps are not supported"));
            }
        }
        if kind == EulerAncestral && p.prediction_type == PredictionType::Sample {
            return Err(bad(kind, "prediction_type", "`sample` is not implemented by EulerAncestralDiscreteScheduler"));
        }
        if dpm {
            if on(c.use_lu_lambdas) || on(c.use_flow_sigmas) {
                return Err(bad(kind, "use_lu_lambdas", "Lu lambdas and flow sigmas are not supported"));
            }
            if let Some(a) = c.algorithm_type.as_deref().filter(|a| !matches!(*a, "dpmsolver++" | "deis")) {
                return Err(bad(kind, "algorithm_type", format!("`{a}` is not supported (only `dpmsolver++`)")));
            }
            if !(1..=2).contains(&p.solver_order) {
                return Err(bad(kind, "solver_order", format!("{} is not supported (1 or 2)", p.solver_order)));
            }
            if let Some(v) = c.variance_type.as_deref() {
                return Err(bad(kind, "variance_type", format!("`{v}` (learned variance) is not supported")));
            }
        }
        if let Some(b) = &c.trained_betas {
            if b.len() != p.num_train_timesteps {
                return Err(bad(
                    kind,
                    "trained_betas",
                    format!("has {} values, expected {}", b.len(), p.num_train_timesteps),
                ));
            }
        } else if p.beta_end < p.beta_start {
            return Err(bad(kind, "beta_end", format!("{} is below beta_start {}", p.beta_end, p.beta_start)));
        }
        if lcm && (p.original_inference_steps == 0 || p.original_inference_steps > p.num_train_timesteps) {
            return Err(bad(
                kind,
                "original_inference_steps",
                format!("{} is not in 1..={}", p.original_inference_steps, p.num_train_timesteps),
            ));
        }
        Ok(p)
    }
}

/// A configured sampler with its schedule and per-run state.
pub struct Sampler {
    kind: SamplerKind,
    params: Params,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    step_index: usize,
    dpm: dpmpp::State,
    eta: f32,
    rng: Rng,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("kind", &self.kind)
            .field("params", &self.params)
            .field("timesteps", &self.timesteps)
            .field("sigmas", &self.sigmas)
            .field("step_index", &self.step_index)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// Builds `kind` from a scheduler config (absent keys take the diffusers class's defaults,
    /// as `<Class>.from_config(config)` does).
    pub fn new(kind: SamplerKind, config: &SamplerConfig) -> Result<Sampler> {
        let params = Params::resolve(kind, config)?;
        let n = params.num_train_timesteps;
        let mut betas = schedule::betas(
            params.beta_schedule,
            params.beta_start,
            params.beta_end,
            n,
            config.trained_betas.as_deref(),
        );
        if params.rescale_betas_zero_snr {
            betas = schedule::rescale_zero_terminal_snr(&betas);
        }
        let mut alphas_cumprod = schedule::alphas_cumprod(&betas);
        if params.rescale_betas_zero_snr && !matches!(kind, SamplerKind::Ddim | SamplerKind::Lcm) {
            // σ would be infinite at the last timestep; diffusers pins ᾱ there to 2^-24.
            alphas_cumprod[n - 1] = 2f32.powi(-24);
        }
        let final_alpha_cumprod = if params.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        Ok(Sampler {
            kind,
            params,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            init_noise_sigma: 1.0,
            step_index: 0,
            dpm: dpmpp::State::default(),
            eta: 0.0,
            rng: Rng::new(0),
        })
    }

    /// Computes the inference timesteps (and sigmas) for `num_inference_steps` and resets the
    /// per-run state (step index, DPM-Solver history).
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let n = num_inference_steps;
        if n == 0 || n > self.params.num_train_timesteps {
            return Err(Error::Invalid(format!(
                "sampler {}: {n} inference steps (must be 1..={})",
                self.kind, self.params.num_train_timesteps
            )));
        }
        let (timesteps, sigmas) = match self.kind {
            SamplerKind::Ddim => (ddim::timesteps(&self.params, n), Vec::new()),
            SamplerKind::Euler | SamplerKind::EulerAncestral => euler::timesteps(&self.params, &self.alphas_cumprod, n),
            SamplerKind::DpmPp2M | SamplerKind::DpmPp2MKarras => {
                dpmpp::timesteps(&self.params, &self.alphas_cumprod, n)
            }
            SamplerKind::Lcm => (lcm::timesteps(&self.params, n).map_err(|m| self.invalid(m))?, Vec::new()),
        };
        if timesteps.is_empty() {
            return Err(self.invalid(format!("{n} inference steps give an empty schedule")));
        }
        self.init_noise_sigma = match self.kind {
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                if self.params.timestep_spacing == TimestepSpacing::Leading {
                    (max * max + 1.0).sqrt()
                } else {
                    max
                }
            }
            _ => 1.0,
        };
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.step_index = 0;
        self.dpm = dpmpp::State::default();
        Ok(())
    }

    pub fn kind(&self) -> SamplerKind {
        self.kind
    }
    /// The effective settings (config values or class defaults).
    pub fn params(&self) -> &Params {
        &self.params
    }
    /// The timesteps to run, in order; also the values the UNet's time embedding receives.
    /// Integers except for Euler-family spacings/Karras that give fractional timesteps.
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }
    /// Euler / DPM-Solver: σ for each step plus the final σ (len = steps + 1); DDIM/LCM: empty.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
    /// ᾱ_t for every training timestep t.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }
    /// The standard deviation of the initial latents (σ_max for Euler-family samplers, else 1).
    pub fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }
    /// The index of the next step.
    pub fn step_index(&self) -> usize {
        self.step_index
    }
    /// Starts at step `index` instead of 0 (img2img strength), like diffusers' `set_begin_index`.
    pub fn set_begin_index(&mut self, index: usize) -> Result<()> {
        if index >= self.timesteps.len() {
            return Err(self.invalid(format!("begin index {index} with {} timesteps", self.timesteps.len())));
        }
        self.step_index = index;
        self.dpm = dpmpp::State::default();
        Ok(())
    }
    /// Seeds the noise drawn by stochastic steps when `step` gets no `noise`.
    pub fn set_noise_seed(&mut self, seed: u64) {
        self.rng = Rng::new(seed);
    }
    /// DDIM's η (0 = deterministic DDIM, 1 = DDPM-like); ignored by the other samplers.
    pub fn set_eta(&mut self, eta: f32) {
        self.eta = eta;
    }

    /// Whether the next step draws fresh noise (and so reads `noise` or the sampler's RNG).
    pub fn draws_noise(&self) -> bool {
        match self.kind {
            SamplerKind::EulerAncestral => true,
            SamplerKind::Lcm => self.step_index + 1 < self.timesteps.len(),
            SamplerKind::Ddim => self.eta > 0.0,
            _ => false,
        }
    }

    /// The initial latents: `noise` (standard normal) × `init_noise_sigma`.
    pub fn initial_latents(&self, noise: &[f32]) -> Vec<f32> {
        noise.iter().map(|&x| x * self.init_noise_sigma).collect()
    }

    /// The UNet input for timestep `t` (the current step): Euler-family samplers divide by
    /// sqrt(σ² + 1), the others return the sample unchanged.
    pub fn scale_model_input(&self, sample: &[f32], t: f32) -> Result<Vec<f32>> {
        self.check_step(t)?;
        Ok(match self.kind {
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let s = self.sigmas[self.step_index];
                let d = (s * s + 1.0).sqrt();
                sample.iter().map(|&x| x / d).collect()
            }
            _ => sample.to_vec(),
        })
    }

    /// One denoising step from timestep `t` (which must be `timesteps()[step_index()]`):
    /// `model_output` is the (guided) UNet output for `sample`. `noise` replaces the sampler's
    /// own draw on a stochastic step (see `draws_noise`) and is ignored otherwise.
    pub fn step(&mut self, model_output: &[f32], t: f32, sample: &[f32], noise: Option<&[f32]>) -> Result<StepOutput> {
        self.check_step(t)?;
        if model_output.len() != sample.len() {
            return Err(self.invalid(format!(
                "model output has {} values but the sample has {}",
                model_output.len(),
                sample.len()
            )));
        }
        let noise: Option<Vec<f32>> = if self.draws_noise() {
            match noise {
                Some(z) if z.len() != sample.len() => {
                    return Err(self.invalid(format!(
                        "noise has {} values but the sample has {}",
                        z.len(),
                        sample.len()
                    )))
                }
                Some(z) => Some(z.to_vec()),
                None => Some(self.rng.normal_vec(sample.len())),
            }
        } else {
            None
        };
        let i = self.step_index;
        let out = match self.kind {
            SamplerKind::Ddim => ddim::step(self, model_output, t, sample, noise.as_deref()),
            SamplerKind::Euler => euler::step(&self.params, &self.sigmas, i, model_output, sample),
            SamplerKind::EulerAncestral => euler::step_ancestral(
                &self.params,
                &self.sigmas,
                i,
                model_output,
                sample,
                noise.as_deref().unwrap_or(&[]),
            ),
            SamplerKind::DpmPp2M | SamplerKind::DpmPp2MKarras => {
                let n = self.timesteps.len();
                dpmpp::step(&self.params, &self.sigmas, &mut self.dpm, i, n, model_output, sample)
            }
            SamplerKind::Lcm => lcm::step(self, model_output, t, sample, noise.as_deref()),
        };
        self.step_index += 1;
        Ok(out)
    }

    fn check_step(&self, t: f32) -> Result<()> {
        match self.timesteps.get(self.step_index) {
            None if self.timesteps.is_empty() => Err(self.invalid("set_timesteps has not been called".into())),
            None => Err(self.invalid(format!("all {} steps are done", self.timesteps.len()))),
            Some(&expected) if expected != t => {
                Err(self.invalid(format!("timestep {t} given but step {} runs timestep {expected}", self.step_index)))
            }
            Some(_) => Ok(()),
        }
    }

    fn invalid(&self, message: String) -> Error {
        Error::Invalid(format!("sampler {}: {message}", self.kind))
    }

    /// ᾱ at an integer training timestep.
    fn alpha_at(&self, t: f32) -> f32 {
        self.alphas_cumprod[(t as usize).min(self.alphas_cumprod.len() - 1)]
    }
}

/// x̂₀ and ε̂ from a model output at ᾱ_t (DDIM and LCM; f32 scalars like diffusers, f64 per
/// element). Returns (pred_original_sample, pred_epsilon).
pub(crate) fn predict_x0_eps(
    prediction: PredictionType,
    alpha_prod_t: f32,
    model_output: &[f32],
    sample: &[f32],
) -> (Vec<f64>, Vec<f64>) {
    let beta_prod_t = 1.0 - alpha_prod_t;
    let (sa, sb) = (alpha_prod_t.sqrt() as f64, beta_prod_t.sqrt() as f64);
    let mut x0 = Vec::with_capacity(sample.len());
    let mut eps = Vec::with_capacity(sample.len());
    for (&m, &x) in model_output.iter().zip(sample) {
        let (m, x) = (m as f64, x as f64);
        let (p, e) = match prediction {
            PredictionType::Epsilon => ((x - sb * m) / sa, m),
            PredictionType::Sample => (m, (x - sa * m) / sb),
            PredictionType::VPrediction => (sa * x - sb * m, sa * m + sb * x),
        };
        x0.push(p);
        eps.push(e);
    }
    (x0, eps)
}

pub(crate) fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}
