//! The cost of unmerged adapters (`loralab bench lora`), at Stable Diffusion 1.5 shapes with
//! synthesised weights (as `bench unet`: [`BenchShapes`], [`RandomWeights`]).
//!
//! - UNet step: one forward pass on `[2, 4, 64, 64]` latents (classifier-free guidance batch;
//!   uploading the latents and reading the prediction back included) with 0, 1, 4 and 8
//!   kohya-style rank-16 LoRAs (alpha 8) installed unmerged ([`crate::adapter::install`],
//!   applied inside the kernels), per weight type. 0 adapters is also the cost of the same
//!   adapters merged: merging changes the base weights' values, not their shapes or storage
//!   type, so a merged model runs exactly the plain kernels. The adapter counts are interleaved
//!   round by round (each round installs each count afresh and times one step), so a machine
//!   whose speed drifts affects every count alike. With a CPU clock (`cpu_clock`, e.g.
//!   [`process_cpu_ms`]) each step's process CPU time is recorded too: on a software adapter
//!   (lavapipe) that is the work the step took, whatever else the machine runs.
//! - Strength change: [`crate::adapter::set_strengths`] for every installed adapter, timed up
//!   to the GPU having taken the writes (a sync).
//! - Parse and install: a kohya-format file (f16, UNet and text-encoder layers; rank 128 gives
//!   the 144 MiB of a typical rank-128 SD1.5 LoRA) written with the safetensors writer to a
//!   temporary file (to memory on wasm32), then [`crate::lora::read_lora`] from it and
//!   [`crate::adapter::install`] into the UNet and the text encoder, as MB/s of the file.
//! - Layer profile ([`profile`]): where one adapter's cost goes, the extra down-projection
//!   dispatch or the extra reduction steps inside the base kernel.
//!
//! `quick` uses `bench unet`'s small configuration, so a smoke run takes seconds.

mod file;
mod profile;
pub mod synth;
mod table;

pub use profile::{layer_rows, LayerProfile, ProfileShape};
pub use table::format_lora_table;

use crate::adapter::{self, InstallReport};
use crate::bench::unet::BenchShapes;
use crate::error::{Error, Result};
use crate::gpu::{AdapterSummary, Gpu};
use crate::lora::{LoraFile, Target};
use crate::model::random_weights::RandomWeights;
use crate::model::unet::UNet2DConditionModel;
use crate::pipeline::WeightPlan;
use crate::quant::DType;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// The goal this benchmark tracks.
pub const GOAL: &str = "one rank-16 adapter costs at most 5 % UNet step time over the same adapter merged";
pub const GOAL_OVERHEAD_PCT: f64 = 5.0;
/// Rank and alpha of the step-time adapters.
pub const RANK: usize = 16;
pub const ALPHA: f32 = 8.0;
/// Rank of the parse / install file (full size; 144 MiB at f16 on SD1.5 with the text encoder).
pub const FILE_RANK: usize = 128;
/// Rank of the parse / install file in the quick configuration.
pub const QUICK_FILE_RANK: usize = 8;

#[derive(Clone, Debug)]
pub struct LoraBenchOptions {
    /// Weight types of the base, in order.
    pub weights: Vec<DType>,
    /// Adapter counts to time (0 = no adapters = merged).
    pub adapters: Vec<usize>,
    /// Untimed steps per adapter count (pipeline compilation).
    pub warmup: usize,
    /// Warm-up steps on latents a quarter the side (at least 8): the same kernels compile, for
    /// a sixteenth of a step's work (for slow adapters).
    pub small_warmup: bool,
    /// Timed steps (rounds) per adapter count, at least 1.
    pub steps_timed: usize,
    /// Timed strength changes per adapter count.
    pub strength_samples: usize,
    /// The layer profile: `None` runs it for a weight type whose one-adapter overhead exceeds
    /// the goal, `Some(b)` always / never.
    pub profile: Option<bool>,
    /// The parse / install measurement (into the first weight type's UNet).
    pub file: bool,
    /// Its rank (default [`FILE_RANK`], [`QUICK_FILE_RANK`] with `quick`).
    pub file_rank: Option<usize>,
    /// The small configuration (smoke runs).
    pub quick: bool,
    pub seed: u64,
    /// Process CPU time in milliseconds, recorded beside the wall-clock step times and used
    /// for the layer profile (see [`process_cpu_ms`]).
    pub cpu_clock: Option<fn() -> Option<f64>>,
}

impl Default for LoraBenchOptions {
    fn default() -> Self {
        Self {
            weights: vec![DType::F16, DType::Q4_0],
            adapters: vec![0, 1, 4, 8],
            warmup: 1,
            small_warmup: false,
            steps_timed: 3,
            strength_samples: 9,
            profile: None,
            file: true,
            file_rank: None,
            quick: false,
            seed: 0,
            cpu_clock: None,
        }
    }
}

/// The synthetic adapters of the step-time measurement (each one the same kind of file).
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterDescription {
    pub format: String,
    pub rank: usize,
    pub alpha: f32,
    /// alpha / rank.
    pub scale: f32,
    /// Module-path endings adapted.
    pub targets: Vec<String>,
    /// UNet layers each adapter adapts.
    pub layers: usize,
    /// Low-rank parameters per adapter.
    pub params: u64,
}

/// One adapter count's UNet step.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepCase {
    pub adapters: usize,
    /// [`adapter::install`] of this many adapters (median over the rounds; 0 for none).
    pub install_ms: f64,
    /// GPU bytes of the installed adapter data.
    pub adapter_gpu_bytes: u64,
    pub steps_timed: usize,
    pub step_ms_median: f64,
    pub step_ms_min: f64,
    pub step_ms_max: f64,
    /// Median step time over the 0-adapter (merged) median, in %; absent without a 0 case.
    pub overhead_pct: Option<f64>,
    /// The same in process CPU time, with a CPU clock.
    pub step_cpu_ms_median: Option<f64>,
    pub step_cpu_ms_min: Option<f64>,
    pub step_cpu_ms_max: Option<f64>,
    pub overhead_cpu_pct: Option<f64>,
}

impl StepCase {
    /// The overhead the goal is judged on (CPU time with `cpu`, see [`cpu_judges`]).
    pub fn judged_overhead(&self, cpu: bool) -> Option<f64> {
        if cpu {
            self.overhead_cpu_pct
        } else {
            self.overhead_pct
        }
    }
}

/// Whether step costs are judged in process CPU time: on a CPU (software) adapter with a CPU
/// clock, where the GPU work is the process's own CPU work.
pub fn cpu_judges(gpu: &Gpu, cpu_clock: Option<fn() -> Option<f64>>) -> bool {
    gpu.adapter().device_type == "Cpu" && cpu_clock.is_some_and(|c| c().is_some())
}

/// Changing the strengths of every installed adapter.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StrengthChange {
    pub adapters: usize,
    /// Layers whose dynamic region each change rewrites.
    pub layers: usize,
    pub samples: usize,
    pub ms_median: f64,
    pub ms_min: f64,
    pub ms_max: f64,
}

/// One base weight type.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WeightsCase {
    pub weights: String,
    pub unet_weight_bytes: u64,
    pub steps: Vec<StepCase>,
    pub strength_changes: Vec<StrengthChange>,
    pub profile: Option<LayerProfile>,
}

/// Parsing and installing one adapter file.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FileBench {
    pub format: String,
    pub rank: usize,
    pub alpha: f32,
    pub unet_layers: usize,
    pub text_encoder_layers: usize,
    pub file_bytes: u64,
    /// Where it was read from (a temporary file, or memory on wasm32).
    pub source: String,
    pub write_ms: f64,
    /// Opening the file and [`crate::lora::read_lora`].
    pub parse_ms: f64,
    pub parse_mb_s: f64,
    /// [`adapter::install`] into the UNet and the text encoder, up to a GPU sync.
    pub install_ms: f64,
    pub install_mb_s: f64,
    pub adapter_gpu_bytes: u64,
    /// The base weight type installed into.
    pub weights: String,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct LoraBenchReport {
    pub adapter: AdapterSummary,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub model: String,
    pub latents: [usize; 4],
    /// Prompt embeddings `[2, tokens, dim]`.
    pub context: [usize; 3],
    pub weights_source: String,
    pub warmup: usize,
    /// Warm-up latents (smaller than `latents` with `small_warmup`).
    pub warmup_latents: [usize; 4],
    /// What the CPU figures measure (absent without a CPU clock).
    pub cpu_clock: Option<String>,
    pub adapters: AdapterDescription,
    pub goal: String,
    pub goal_overhead_pct: f64,
    /// What the goal is judged on: wall-clock step time, or process CPU time on a software
    /// adapter (where the wall clock counts whatever else the machine runs).
    pub goal_clock: String,
    /// Whether every weight type's one-adapter overhead is within the goal; absent for the
    /// quick configuration or without the 0 and 1 counts.
    pub goal_met: Option<bool>,
    pub cases: Vec<WeightsCase>,
    pub file: Option<FileBench>,
}

/// Warm-up runs and timed samples of one kernel; a sample lasts at least `min_sample_ms`
/// (fast kernels repeat inside it).
#[derive(Clone, Copy, Debug)]
pub(crate) struct KernelTiming {
    pub warmup: usize,
    pub samples: usize,
    pub min_sample_ms: f64,
}

/// Per-run milliseconds of each sample of `f` (which records GPU work); a sample records as
/// many runs as fill `min_sample_ms` and waits for the GPU once.
pub(crate) async fn time_kernel<F: FnMut() -> Result<Tensor>>(
    gpu: &Gpu,
    timing: KernelTiming,
    clock: &dyn Fn() -> f64,
    mut f: F,
) -> Result<Vec<f64>> {
    for _ in 0..timing.warmup {
        let _y = f()?;
        gpu.sync().await?;
    }
    let t0 = clock();
    let _y = f()?;
    gpu.sync().await?;
    let once = (clock() - t0).max(1e-3);
    let reps = ((timing.min_sample_ms / once).ceil() as usize).clamp(1, 1000);
    let mut ms = Vec::with_capacity(timing.samples);
    for _ in 0..timing.samples.max(1) {
        let t0 = clock();
        for _ in 0..reps {
            let _y = f()?;
        }
        gpu.sync().await?;
        ms.push((clock() - t0) / reps as f64);
    }
    Ok(ms)
}

/// (median, min, max) of a non-empty list (0s when empty).
pub(crate) fn median_min_max(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    match (v.get(v.len() / 2), v.first(), v.last()) {
        (Some(m), Some(lo), Some(hi)) => (*m, *lo, *hi),
        _ => (0.0, 0.0, 0.0),
    }
}

fn check_finite(v: &[f32]) -> Result<()> {
    if v.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(Error::Invalid("bench lora: the UNet produced non-finite values".into()))
    }
}

/// Milliseconds of CPU time this process has used (user + system, every thread) from
/// `/proc/self/stat`, in ticks of 10 ms (Linux's USER_HZ of 100); `None` where unavailable.
pub fn process_cpu_ms() -> Option<f64> {
    #[cfg(target_os = "linux")]
    {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name may hold spaces: fields are counted after its closing parenthesis,
        // from field 3 (state); utime and stime are fields 14 and 15.
        let rest = stat.get(stat.rfind(')')? + 1..)?;
        let mut f = rest.split_whitespace().skip(11);
        let utime: f64 = f.next()?.parse().ok()?;
        let stime: f64 = f.next()?.parse().ok()?;
        Some((utime + stime) * 10.0)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// The warm-up steps' latents: a quarter of the side (at least 8) with `small`.
fn warmup_shape(latents: [usize; 4], small: bool) -> [usize; 4] {
    let [b, c, h, w] = latents;
    let q = |x: usize| (x / 4).max(8).min(x);
    if small {
        [b, c, q(h), q(w)]
    } else {
        latents
    }
}

/// One pipeline step: upload the latents `[B, C, h, w]`, UNet forward, read the prediction back.
async fn step(gpu: &Gpu, shape: &[usize; 4], unet: &UNet2DConditionModel, ctx: &Tensor, latents: &[f32]) -> Result<()> {
    let sample = Tensor::from_f32(gpu, shape, latents)?;
    let out = unet.forward(gpu, &sample, &[981.0], ctx)?;
    check_finite(&out.to_f32(gpu).await?)
}

fn check_install(r: &InstallReport, what: &str, layers: usize, files: usize) -> Result<()> {
    if r.matched != layers * files || !r.unmatched.is_empty() {
        return Err(Error::Invalid(format!(
            "bench lora: {files} adapter(s) of {layers} layers matched {} layers of the {what} (unmatched: {:?})",
            r.matched, r.unmatched
        )));
    }
    Ok(())
}

/// Installs the first `n` of `files` (strength 1): (ms up to a GPU sync, GPU bytes).
async fn install_n(
    gpu: &Gpu,
    unet: &mut UNet2DConditionModel,
    files: &[LoraFile],
    n: usize,
    layers: usize,
    clock: &dyn Fn() -> f64,
) -> Result<(f64, u64)> {
    adapter::clear(unet);
    if n == 0 {
        return Ok((0.0, 0));
    }
    let refs: Vec<&LoraFile> = files.iter().take(n).collect();
    let t0 = clock();
    let r = adapter::install(gpu, unet, Target::Unet, &refs, &vec![1.0; n]).await?;
    gpu.sync().await?;
    let ms = clock() - t0;
    check_install(&r, "UNet", layers, n)?;
    Ok((ms, r.bytes))
}

async fn strength_change(
    gpu: &Gpu,
    unet: &mut UNet2DConditionModel,
    n: usize,
    layers: usize,
    samples: usize,
    clock: &dyn Fn() -> f64,
) -> Result<StrengthChange> {
    let mut ms = vec![];
    for i in 0..samples.max(1) {
        // Alternating non-zero values: every layer stays active, every region is rewritten.
        let s = if i % 2 == 0 { 0.75 } else { 1.0 };
        let t0 = clock();
        adapter::set_strengths(gpu, unet, &vec![s; n])?;
        gpu.sync().await?;
        ms.push(clock() - t0);
    }
    let samples = ms.len();
    let (ms_median, ms_min, ms_max) = median_min_max(ms);
    Ok(StrengthChange { adapters: n, layers, samples, ms_median, ms_min, ms_max })
}

/// Times the UNet steps of every adapter count for one weight type.
#[allow(clippy::too_many_arguments)]
async fn run_weights(
    gpu: &Gpu,
    s: &BenchShapes,
    unet: &mut UNet2DConditionModel,
    dt: DType,
    unet_weight_bytes: u64,
    files: &[LoraFile],
    layers: usize,
    opts: &LoraBenchOptions,
    clock: &dyn Fn() -> f64,
) -> Result<WeightsCase> {
    let t = &s.text_encoder;
    let ctx_shape = [s.latents[0], t.max_position_embeddings, t.hidden_size];
    let ctx = Tensor::from_f32(gpu, &ctx_shape, &Rng::new(opts.seed).normal_vec(ctx_shape.iter().product()))?;
    let latents = Rng::new(opts.seed ^ 1).normal_vec(s.latents.iter().product());
    let warm_shape = warmup_shape(s.latents, opts.small_warmup);
    let warm_latents = &latents[..warm_shape.iter().product()];
    let counts = &opts.adapters;
    let mut step_ms = vec![vec![]; counts.len()];
    let mut cpu_ms: Vec<Vec<f64>> = vec![vec![]; counts.len()];
    let cpu = || opts.cpu_clock.and_then(|c| c());
    let mut install_ms = vec![vec![]; counts.len()];
    let mut bytes = vec![0u64; counts.len()];
    let mut strength_changes = vec![];
    let rounds = opts.steps_timed.max(1);
    for round in 0..rounds {
        for (i, &n) in counts.iter().enumerate() {
            let (ms, b) = install_n(gpu, unet, files, n, layers, clock).await?;
            install_ms[i].push(ms);
            bytes[i] = b;
            if round == 0 {
                for _ in 0..opts.warmup {
                    step(gpu, &warm_shape, unet, &ctx, warm_latents).await?;
                }
            }
            let (t0, c0) = (clock(), cpu());
            step(gpu, &s.latents, unet, &ctx, &latents).await?;
            step_ms[i].push(clock() - t0);
            if let (Some(c0), Some(c1)) = (c0, cpu()) {
                cpu_ms[i].push(c1 - c0);
            }
            if round + 1 == rounds && n > 0 {
                strength_changes.push(strength_change(gpu, unet, n, layers, opts.strength_samples, clock).await?);
            }
        }
    }
    let zero = counts.iter().position(|&n| n == 0);
    let merged = zero.map(|i| median_min_max(step_ms[i].clone()).0);
    let has_cpu = cpu_ms.iter().all(|v| v.len() == rounds);
    let merged_cpu = zero.filter(|_| has_cpu).map(|i| median_min_max(cpu_ms[i].clone()).0);
    let mut steps = vec![];
    for (i, &n) in counts.iter().enumerate() {
        let (med, min, max) = median_min_max(step_ms[i].clone());
        let c = has_cpu.then(|| median_min_max(cpu_ms[i].clone()));
        steps.push(StepCase {
            adapters: n,
            install_ms: median_min_max(install_ms[i].clone()).0,
            adapter_gpu_bytes: bytes[i],
            steps_timed: step_ms[i].len(),
            step_ms_median: med,
            step_ms_min: min,
            step_ms_max: max,
            overhead_pct: merged.filter(|m| *m > 0.0).map(|m| 100.0 * (med / m - 1.0)),
            step_cpu_ms_median: c.map(|c| c.0),
            step_cpu_ms_min: c.map(|c| c.1),
            step_cpu_ms_max: c.map(|c| c.2),
            overhead_cpu_pct: merged_cpu.filter(|m| *m > 0.0).zip(c).map(|(m, c)| 100.0 * (c.0 / m - 1.0)),
        });
    }
    let cpu_judged = cpu_judges(gpu, opts.cpu_clock);
    let one = steps.iter().find(|c| c.adapters == 1).and_then(|c| c.judged_overhead(cpu_judged));
    let want_profile = opts.profile.unwrap_or(one.is_some_and(|o| o > GOAL_OVERHEAD_PCT));
    let profile = if want_profile && !files.is_empty() {
        install_n(gpu, unet, files, 1, layers, clock).await?;
        // The first (untimed) run of each kernel compiles it: no warm-up needed.
        let samples = opts.steps_timed.max(1);
        let cpu_clock = opts.cpu_clock.filter(|c| c().is_some());
        let cpu_ms = move || cpu_clock.and_then(|c| c()).unwrap_or(0.0);
        // CPU time advances in 10 ms ticks: samples of at least 200 ms keep that under 5 %.
        let (timing, kernel_clock, clock_name): (_, &dyn Fn() -> f64, _) = match cpu_clock {
            Some(_) => (KernelTiming { warmup: 0, samples, min_sample_ms: 200.0 }, &cpu_ms, "process CPU time"),
            None => (KernelTiming { warmup: 0, samples, min_sample_ms: 25.0 }, clock, "wall clock"),
        };
        let mut p = profile::profile_layers(gpu, unet, s, t.max_position_embeddings, dt.name(), 1, timing, kernel_clock).await?;
        p.clock = clock_name.into();
        Some(p)
    } else {
        None
    };
    adapter::clear(unet);
    drop(ctx);
    gpu.sync().await?;
    Ok(WeightsCase { weights: dt.name().into(), unet_weight_bytes, steps, strength_changes, profile })
}

/// Runs every weight type of `opts`; `clock` returns milliseconds.
pub async fn run_lora(gpu: &Gpu, opts: &LoraBenchOptions, clock: &dyn Fn() -> f64) -> Result<LoraBenchReport> {
    let s = if opts.quick { BenchShapes::quick() } else { BenchShapes::sd15() };
    if opts.weights.is_empty() || opts.adapters.is_empty() {
        return Err(Error::Invalid("bench lora: give at least one weight type and one adapter count".into()));
    }
    let most = opts.adapters.iter().copied().max().unwrap_or(0);
    let mut cases = vec![];
    let mut file = None;
    let mut description = None;
    for (wi, &dt) in opts.weights.iter().enumerate() {
        gpu.sync().await?;
        gpu.trim();
        let base = gpu.memory().live_bytes;
        let mut unet = UNet2DConditionModel::load(gpu, &s.unet, &RandomWeights::new(opts.seed, "unet"), WeightPlan::new(dt).unet)?;
        let unet_bytes = gpu.memory().live_bytes - base;
        let targets = synth::target_layers(&mut unet, Target::Unet);
        let mut files = vec![];
        for i in 0..most {
            let seed = opts.seed.wrapping_mul(1_000_003).wrapping_add(i as u64 + 1);
            files.push(synth::lora_file(&format!("bench-lora-{i}"), &targets, RANK, ALPHA, seed)?);
        }
        description.get_or_insert_with(|| AdapterDescription {
            format: "kohya-style LoRA built in memory (f32 factors, seeded)".into(),
            rank: RANK,
            alpha: ALPHA,
            scale: ALPHA / RANK as f32,
            targets: synth::UNET_TARGETS.iter().map(|t| t.trim_start_matches('.').to_string()).collect(),
            layers: targets.len(),
            params: targets.iter().map(|l| l.params(RANK) as u64).sum(),
        });
        if opts.file && wi == 0 {
            file = Some(file::run_file(gpu, &s, &mut unet, dt, opts, clock).await?);
        }
        cases.push(run_weights(gpu, &s, &mut unet, dt, unet_bytes, &files, targets.len(), opts, clock).await?);
        drop(files);
        drop(unet);
        gpu.sync().await?;
        gpu.trim();
    }
    let cpu_judged = cpu_judges(gpu, opts.cpu_clock);
    let overheads: Option<Vec<f64>> = cases
        .iter()
        .map(|c| c.steps.iter().find(|x| x.adapters == 1).and_then(|x| x.judged_overhead(cpu_judged)))
        .collect();
    let t = &s.text_encoder;
    Ok(LoraBenchReport {
        adapter: gpu.adapter(),
        shader_f16: gpu.caps().shader_f16,
        subgroups: gpu.caps().subgroups,
        model: s.name.into(),
        latents: s.latents,
        context: [s.latents[0], t.max_position_embeddings, t.hidden_size],
        weights_source: "random (model::RandomWeights, seeded uniform)".into(),
        warmup: opts.warmup,
        warmup_latents: warmup_shape(s.latents, opts.small_warmup),
        cpu_clock: opts
            .cpu_clock
            .filter(|c| c().is_some())
            .map(|_| "process CPU time (user + system, every thread), 10 ms ticks".into()),
        adapters: description.ok_or_else(|| Error::Invalid("bench lora: nothing was run".into()))?,
        goal: GOAL.into(),
        goal_overhead_pct: GOAL_OVERHEAD_PCT,
        goal_clock: if cpu_judged { "process CPU time" } else { "wall clock" }.into(),
        goal_met: overheads.filter(|_| !opts.quick).map(|o| o.iter().all(|p| *p <= GOAL_OVERHEAD_PCT)),
        cases,
        file,
    })
}
