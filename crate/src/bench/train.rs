//! The cost of a LoRA training step (`loralab bench train`): step time and GPU memory for the
//! demo model's UNet and for Stable Diffusion 1.5's at 512×512 (64×64 latents), with
//! synthesised weights ([`RandomWeights`], as `bench unet` and `bench lora`).
//!
//! A step is what [`crate::train::trainer::Trainer::step`] does once its data is cached:
//! upload the noisy latents, the training forward ([`TrainUNet::forward`]) with its tape, read
//! the prediction back, the MSE gradient on the host, the backward into the adapters'
//! gradients, the global gradient norm, and an AdamW step (clipping folded in) on every
//! adapter tensor, up to reading the norm back. The VAE and the text encoder are not involved
//! (their outputs are cached before training). Adapters: kohya-style LoRA, rank 16, alpha 8 by
//! default, on the attention projections (`attn`), B initialised to 0 as kohya does.
//!
//! Memory is the engine's pool accounting (`Gpu::memory()`, as in `bench unet`): the UNet's
//! weights, the adapter state (parameters, gradients and AdamW's two moments), and the peak
//! of a training step; "beyond the weights" is that peak minus the UNet's weights. Each case
//! runs with and without gradient checkpointing.
//!
//! Goal ([`GOAL`]): SD1.5 at q4_0 with a rank-16 adapter at batch 1 trains within 2 GB of GPU
//! memory beyond the weights.

use crate::bench::lora::median_min_max;
use crate::error::{Error, Result};
use crate::gpu::{AdapterSummary, Gpu};
use crate::model::backward::{LoraConfig, LoraParams, Targets, TrainOptions, TrainUNet};
use crate::model::config::UNetConfig;
use crate::model::random_weights::RandomWeights;
use crate::model::unet::UNet2DConditionModel;
use crate::ops::grad::optim::{adamw_step, grad_norm, AdamW, Clip};
use crate::pipeline::WeightPlan;
use crate::quant::DType;
use crate::rng::Rng;
use crate::tensor::Tensor;

pub const GOAL: &str = "SD1.5 (512x512, batch 1, q4_0, rank-16 LoRA) trains within 2 GB of GPU memory beyond the weights";
pub const GOAL_BYTES: u64 = 2_000_000_000;

/// The UNet configuration of the shipped demo model (www/models/demo/unet/config.json).
const DEMO_UNET: &str = include_str!("../../../www/models/demo/unet/config.json");

/// A model shape the benchmark runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainModel {
    /// The demo model's UNet at its 64×64 images (8×8 latents).
    Demo,
    /// Stable Diffusion 1.5's UNet at 512×512 (64×64 latents).
    Sd15,
    /// `bench unet`'s small configuration at 16×16 latents (smoke runs).
    Quick,
}

impl TrainModel {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "demo" => Some(TrainModel::Demo),
            "sd15" => Some(TrainModel::Sd15),
            "quick" => Some(TrainModel::Quick),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TrainModel::Demo => "demo (64x64)",
            TrainModel::Sd15 => "SD1.5 (512x512)",
            TrainModel::Quick => "quick (16x16 latents)",
        }
    }

    /// The UNet config and the latent side.
    fn shape(self) -> Result<(UNetConfig, usize)> {
        Ok(match self {
            TrainModel::Demo => (UNetConfig::from_json(DEMO_UNET, "www/models/demo/unet/config.json")?, 8),
            TrainModel::Sd15 => (UNetConfig::sd15(), 64),
            TrainModel::Quick => (crate::bench::unet::BenchShapes::quick().unet, 16),
        })
    }
}

#[derive(Clone, Debug)]
pub struct TrainBenchOptions {
    pub models: Vec<TrainModel>,
    pub weights: DType,
    pub rank: usize,
    pub alpha: f32,
    pub targets: Targets,
    pub batch: usize,
    /// Gradient checkpointing settings to run, in order.
    pub checkpointing: Vec<bool>,
    /// Untimed steps per case (pipeline compilation).
    pub warmup: usize,
    /// Timed steps per case, at least 1.
    pub steps_timed: usize,
    pub seed: u64,
    /// Process CPU time in milliseconds (see [`crate::bench::lora::process_cpu_ms`]).
    pub cpu_clock: Option<fn() -> Option<f64>>,
}

impl Default for TrainBenchOptions {
    fn default() -> Self {
        TrainBenchOptions {
            models: vec![TrainModel::Demo, TrainModel::Sd15],
            weights: DType::Q4_0,
            rank: 16,
            alpha: 8.0,
            targets: Targets::Attn,
            batch: 1,
            checkpointing: vec![false, true],
            warmup: 1,
            steps_timed: 2,
            seed: 0,
            cpu_clock: None,
        }
    }
}

impl TrainBenchOptions {
    /// The smoke configuration: the quick UNet, one warm-up and two timed steps per case.
    pub fn quick() -> Self {
        TrainBenchOptions { models: vec![TrainModel::Quick], ..Default::default() }
    }
}

/// One (model, checkpointing) case.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainCase {
    pub model: TrainModel,
    pub checkpointing: bool,
    /// `[B, 4, h, w]`.
    pub latents: [usize; 4],
    pub unet_weight_bytes: u64,
    pub adapter_layers: usize,
    pub adapter_params: u64,
    /// Parameters, gradients and AdamW moments.
    pub adapter_state_bytes: u64,
    pub steps_timed: usize,
    pub step_ms_median: f64,
    pub step_ms_min: f64,
    pub step_ms_max: f64,
    pub step_cpu_ms_median: Option<f64>,
    /// The largest pool live bytes during the timed steps.
    pub peak_bytes: u64,
    /// `peak_bytes − unet_weight_bytes`: activations, tape, adapter state.
    pub beyond_weights_bytes: u64,
    /// The last timed step's loss (finite: the step ran through).
    pub loss: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainBenchReport {
    pub adapter: AdapterSummary,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub weights: String,
    pub weights_source: String,
    pub rank: usize,
    pub alpha: f32,
    pub targets: String,
    pub batch: usize,
    pub warmup: usize,
    pub cpu_clock: Option<String>,
    pub goal: String,
    /// Whether an SD1.5 case met the goal (absent without an SD1.5 case).
    pub goal_met: Option<bool>,
    pub cases: Vec<TrainCase>,
}

/// The state one case trains.
struct Setup {
    unet: TrainUNet,
    moments: Vec<(Tensor, Tensor)>,
    context: Tensor,
    latents: Vec<f32>,
    target: Vec<f32>,
    shape: [usize; 4],
}

/// One training step; returns the loss.
async fn step(gpu: &Gpu, s: &Setup, opts: TrainOptions, n: u64) -> Result<f64> {
    let hp = AdamW::default();
    s.unet.params().zero_grads(gpu);
    let x = Tensor::from_f32(gpu, &s.shape, &s.latents)?;
    let t = vec![500.0; s.shape[0]];
    let (pred, tape) = s.unet.forward(gpu, &x, &t, &s.context, None, opts)?;
    drop(x);
    let p = pred.to_f32(gpu).await?;
    drop(pred);
    let c = 2.0 / p.len().max(1) as f32;
    let loss = p.iter().zip(&s.target).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / p.len().max(1) as f64;
    let grad: Vec<f32> = p.iter().zip(&s.target).map(|(a, b)| c * (a - b)).collect();
    let g = Tensor::from_f32(gpu, &s.shape, &grad)?;
    s.unet.backward(gpu, tape, &g)?;
    drop(g);
    let trainable = s.unet.params().trainable();
    let grads: Vec<&Tensor> = trainable.iter().map(|t| t.grad).collect();
    let norm = grad_norm(gpu, &grads)?;
    for (t, (m, v)) in trainable.iter().zip(&s.moments) {
        adamw_step(gpu, &hp, 1e-4, n, t.param, t.grad, m, v, Some(Clip { norm: &norm, max_norm: 1.0 }))?;
    }
    let norm = norm.to_f32(gpu).await?;
    if !loss.is_finite() || norm.iter().any(|v| !v.is_finite()) {
        return Err(Error::Invalid(format!("bench train: the step produced a non-finite loss ({loss}) or gradient norm")));
    }
    Ok(loss)
}

async fn run_case(gpu: &Gpu, model: TrainModel, checkpointing: bool, opts: &TrainBenchOptions, clock: &dyn Fn() -> f64) -> Result<TrainCase> {
    let (config, side) = model.shape()?;
    gpu.sync().await?;
    gpu.trim();
    let base = gpu.memory().live_bytes;
    let mut unet = UNet2DConditionModel::load(gpu, &config, &RandomWeights::new(opts.seed, "unet"), WeightPlan::new(opts.weights).unet)?;
    let unet_weight_bytes = gpu.memory().live_bytes - base;
    let lora = LoraConfig { targets: opts.targets, rank: opts.rank, alpha: opts.alpha, conv_rank: opts.rank, conv_alpha: opts.alpha, seed: opts.seed };
    let params = LoraParams::new(gpu, &mut unet, &lora)?;
    let (adapter_layers, adapter_params) = (params.layers().len(), params.param_count() as u64);
    let train = TrainUNet::new(&mut unet, params)?;
    drop(unet);
    let moments = train
        .params()
        .trainable()
        .iter()
        .map(|t| Ok((Tensor::zeros(gpu, t.param.shape())?, Tensor::zeros(gpu, t.param.shape())?)))
        .collect::<Result<Vec<_>>>()?;
    let adapter_state_bytes = train.params().bytes() + moments.iter().map(|(m, v)| m.bytes() + v.bytes()).sum::<u64>();
    let shape = [opts.batch.max(1), config.in_channels, side, side];
    let n: usize = shape.iter().product();
    let d = config.cross_attention_dim(0);
    let mut rng = Rng::new(opts.seed ^ 0x7261_696e);
    let context = Tensor::from_f32(gpu, &[shape[0], 77, d], &rng.normal_vec(shape[0] * 77 * d))?;
    let s = Setup { unet: train, moments, context, latents: rng.normal_vec(n), target: rng.normal_vec(n), shape };
    let topts = TrainOptions { checkpointing };
    let mut k = 0;
    for _ in 0..opts.warmup {
        k += 1;
        step(gpu, &s, topts, k).await?;
    }
    gpu.sync().await?;
    gpu.reset_peak_memory();
    let (mut ms, mut cpu_ms) = (vec![], vec![]);
    let mut loss = f64::NAN;
    let cpu = || opts.cpu_clock.and_then(|c| c());
    for _ in 0..opts.steps_timed.max(1) {
        k += 1;
        let (t0, c0) = (clock(), cpu());
        loss = step(gpu, &s, topts, k).await?;
        ms.push(clock() - t0);
        if let (Some(a), Some(b)) = (c0, cpu()) {
            cpu_ms.push(b - a);
        }
    }
    let peak_bytes = gpu.memory().peak_live_bytes.saturating_sub(base);
    let steps_timed = ms.len();
    let (step_ms_median, step_ms_min, step_ms_max) = median_min_max(ms);
    let step_cpu_ms_median = (cpu_ms.len() == steps_timed).then(|| median_min_max(cpu_ms).0);
    drop(s);
    gpu.sync().await?;
    gpu.trim();
    Ok(TrainCase {
        model,
        checkpointing,
        latents: shape,
        unet_weight_bytes,
        adapter_layers,
        adapter_params,
        adapter_state_bytes,
        steps_timed,
        step_ms_median,
        step_ms_min,
        step_ms_max,
        step_cpu_ms_median,
        peak_bytes,
        beyond_weights_bytes: peak_bytes.saturating_sub(unet_weight_bytes),
        loss,
    })
}

/// Runs every (model, checkpointing) case of `opts`; `clock` returns milliseconds.
pub async fn run_train(gpu: &Gpu, opts: &TrainBenchOptions, clock: &dyn Fn() -> f64) -> Result<TrainBenchReport> {
    if opts.models.is_empty() || opts.checkpointing.is_empty() || opts.rank == 0 || opts.batch == 0 {
        return Err(Error::Invalid("bench train: give at least one model and checkpointing setting, rank and batch >= 1".into()));
    }
    let mut cases = vec![];
    for &m in &opts.models {
        for &c in &opts.checkpointing {
            cases.push(run_case(gpu, m, c, opts, clock).await?);
        }
    }
    let sd15: Vec<&TrainCase> = cases.iter().filter(|c| c.model == TrainModel::Sd15).collect();
    let goal_met = (!sd15.is_empty() && opts.weights == DType::Q4_0 && opts.rank == 16 && opts.batch == 1)
        .then(|| sd15.iter().any(|c| c.beyond_weights_bytes <= GOAL_BYTES));
    Ok(TrainBenchReport {
        adapter: gpu.adapter(),
        shader_f16: gpu.caps().shader_f16,
        subgroups: gpu.caps().subgroups,
        weights: opts.weights.name().into(),
        weights_source: "random (model::RandomWeights, seeded uniform)".into(),
        rank: opts.rank,
        alpha: opts.alpha,
        targets: opts.targets.name().into(),
        batch: opts.batch,
        warmup: opts.warmup,
        cpu_clock: opts.cpu_clock.filter(|c| c().is_some()).map(|_| "process CPU time (user + system, every thread)".into()),
        goal: GOAL.into(),
        goal_met,
        cases,
    })
}

fn gb(bytes: u64) -> String {
    if bytes >= 100_000_000 {
        format!("{:.3} GB", bytes as f64 / 1e9)
    } else {
        format!("{:.2} MB", bytes as f64 / 1e6)
    }
}

/// The report as text (GB = 10⁹ bytes, MB = 10⁶).
pub fn format_train_table(r: &TrainBenchReport) -> String {
    let mut s = format!(
        "adapter: {} ({}, {}), shader-f16: {}, subgroups: {}\n",
        r.adapter.name, r.adapter.backend, r.adapter.device_type, r.shader_f16, r.subgroups
    );
    s.push_str(&format!(
        "LoRA rank {}, alpha {}, targets {}; batch {}; base weights {} ({}); AdamW, clipping 1.0\n",
        r.rank, r.alpha, r.targets, r.batch, r.weights, r.weights_source
    ));
    s.push_str(&format!("training step (after {} warm-up step(s)); memory = bytes allocated by the engine\n", r.warmup));
    s.push_str(&format!(
        "{:<22} {:>5} {:>7} {:>10} {:>12} {:>12} {:>6} {:>11} {:>10} {:>10} {:>11} {:>12} {:>12}\n",
        "model", "ckpt", "layers", "params", "UNet weights", "adapter+opt", "steps", "median ms", "min ms", "max ms", "CPU ms", "peak", "beyond wts"
    ));
    for c in &r.cases {
        s.push_str(&format!(
            "{:<22} {:>5} {:>7} {:>9.2}M {:>12} {:>12} {:>6} {:>11.1} {:>10.1} {:>10.1} {:>11} {:>12} {:>12}\n",
            c.model.name(),
            if c.checkpointing { "on" } else { "off" },
            c.adapter_layers,
            c.adapter_params as f64 / 1e6,
            gb(c.unet_weight_bytes),
            gb(c.adapter_state_bytes),
            c.steps_timed,
            c.step_ms_median,
            c.step_ms_min,
            c.step_ms_max,
            c.step_cpu_ms_median.map_or("-".into(), |v| format!("{v:.0}")),
            gb(c.peak_bytes),
            gb(c.beyond_weights_bytes),
        ));
    }
    let verdict = match r.goal_met {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not judged (needs an SD1.5 case at q4_0, rank 16, batch 1)",
    };
    s.push_str(&format!("\ngoal: {}: {verdict}\n", r.goal));
    s
}
