//! UNet and whole-pipeline benchmark at Stable Diffusion 1.5 shapes (`loralab bench unet`).
//!
//! Every component is built from its SD1.5 config (`model::config::{UNetConfig, ClipTextConfig,
//! VaeConfig}::sd15()`) with synthesised weights ([`RandomWeights`]), so no weights file is
//! needed. For each weight type the run follows what `StableDiffusionPipeline` does today
//! (crate/src/pipeline.rs): load the text encoder, the UNet and the VAE decoder with
//! `WeightPlan::new(type)`, encode the negative and positive prompts (77 tokens each), run UNet
//! steps on `[2, 4, 64, 64]` latents (classifier-free guidance batch) reading each output back,
//! and decode one `[1, 4, 64, 64]` latent to a 512×512 image.
//!
//! - Step time: median (and min / max) over `steps_timed` steps after `warmup` steps; a step is
//!   uploading the latents, the UNet forward pass and reading the noise prediction back.
//! - Memory: bytes held by tensors in the engine's buffer pool (`Gpu::memory().live_bytes`, in
//!   the pool's size classes), with the peak reset around each phase. `all_loaded` is the peak
//!   of the whole sequence as measured. `staged` is the peak of the same work as
//!   `StableDiffusionPipeline` runs it with `PipelineOptions::low_memory()` (every component
//!   loaded up front, the text encoder dropped once the prompts are encoded, the UNet and the
//!   prompt embeddings before the decode), computed from the measured weight bytes and phase peaks (the
//!   pool's accounting is additive: [`measure_staged`] runs that order for real and the smoke
//!   test checks the two agree).
//!   Buffers the pool keeps for reuse after they are freed are not counted (see `kept_bytes`).
//!
//! `quick` swaps in a small configuration with the same block structure so a smoke run on a
//! software adapter takes seconds.

use crate::error::{Error, Result};
use crate::gpu::{AdapterSummary, Gpu};
use crate::model::clip::{ClipTextModel, EncodeOpts};
use crate::model::config::{ClipTextConfig, PerLevel, UNetConfig, VaeConfig};
use crate::model::random_weights::RandomWeights;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::{AutoencoderKL, VaeParts};
use crate::pipeline::WeightPlan;
use crate::quant::DType;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// The goal this benchmark tracks: the whole SD1.5 pipeline at q4_0 under this many bytes.
pub const GOAL_BYTES: u64 = 1_200_000_000;
pub const GOAL: &str = "SD1.5 at q4_0 under 1.2 GB peak for the whole pipeline (stable-diffusion.cpp needs 1.5 GB)";

#[derive(Clone, Debug)]
pub struct UnetBenchOptions {
    /// Weight types to run, in order.
    pub weights: Vec<DType>,
    /// Untimed steps first (pipeline compilation).
    pub warmup: usize,
    /// Timed steps (at least 1).
    pub steps_timed: usize,
    /// The small configuration (smoke runs).
    pub quick: bool,
    /// Seed of the synthesised weights.
    pub seed: u64,
}

impl Default for UnetBenchOptions {
    fn default() -> Self {
        Self { weights: DType::ALL.to_vec(), warmup: 1, steps_timed: 3, quick: false, seed: 0 }
    }
}

/// The component configurations and sizes a run uses.
#[derive(Clone, Debug)]
pub struct BenchShapes {
    pub name: &'static str,
    pub unet: UNetConfig,
    pub text_encoder: ClipTextConfig,
    pub vae: VaeConfig,
    /// UNet input `[2, C, h, w]` (classifier-free guidance batch).
    pub latents: [usize; 4],
}

impl BenchShapes {
    /// SD1.5 at 512×512 (64×64 latents).
    pub fn sd15() -> Self {
        Self {
            name: "SD1.5 (512x512)",
            unet: UNetConfig::sd15(),
            text_encoder: ClipTextConfig::sd15(),
            vae: VaeConfig::sd15(),
            latents: [2, 4, 64, 64],
        }
    }

    /// A small model with SD1.5's block structure (2 UNet levels, 2 VAE levels), 16×16 latents.
    pub fn quick() -> Self {
        let unet = UNetConfig {
            block_out_channels: vec![32, 64],
            down_block_types: vec!["CrossAttnDownBlock2D".into(), "DownBlock2D".into()],
            up_block_types: vec!["UpBlock2D".into(), "CrossAttnUpBlock2D".into()],
            layers_per_block: PerLevel::One(1),
            norm_num_groups: Some(8),
            attention_head_dim: PerLevel::One(2),
            cross_attention_dim: PerLevel::One(32),
            ..UNetConfig::sd15()
        };
        let text_encoder = ClipTextConfig {
            vocab_size: 1000,
            hidden_size: 32,
            intermediate_size: 64,
            projection_dim: Some(32),
            num_hidden_layers: 2,
            num_attention_heads: 2,
            ..ClipTextConfig::sd15()
        };
        let vae = VaeConfig {
            down_block_types: vec!["DownEncoderBlock2D".into(); 2],
            up_block_types: vec!["UpDecoderBlock2D".into(); 2],
            block_out_channels: vec![16, 32],
            layers_per_block: 1,
            norm_num_groups: 8,
            ..VaeConfig::sd15()
        };
        Self { name: "quick (small SD1.5-like)", unet, text_encoder, vae, latents: [2, 4, 16, 16] }
    }

    /// Image side in pixels.
    pub fn image_size(&self) -> [usize; 2] {
        let f = 1usize << (self.vae.block_out_channels.len() - 1);
        [self.latents[2] * f, self.latents[3] * f]
    }
}

/// One weight type's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct UnetBenchCase {
    pub weights: String,
    /// UNet parameters and their GPU bytes.
    pub unet_params: u64,
    pub unet_weight_bytes: u64,
    /// Synthesising and uploading the UNet's weights.
    pub unet_load_ms: f64,
    pub steps_timed: usize,
    /// Milliseconds per UNet step.
    pub step_ms_median: f64,
    pub step_ms_min: f64,
    pub step_ms_max: f64,
    /// Most bytes a UNet step allocates above its weights and inputs.
    pub step_activation_peak_bytes: u64,
    /// Peak of a UNet-only run: weights + latents and prompt embeddings + step activations.
    pub unet_peak_bytes: u64,
    pub pipeline: PipelineMemory,
}

/// Whole-pipeline memory (bytes allocated by the engine) for one weight type.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PipelineMemory {
    /// Storage of each component's matrices (`WeightPlan::new`).
    pub text_encoder_dtype: String,
    /// The token embedding table's storage (see [`token_table_dtype`]).
    pub token_table_dtype: String,
    pub unet_dtype: String,
    pub vae_dtype: String,
    pub text_encoder_weight_bytes: u64,
    pub unet_weight_bytes: u64,
    pub vae_decoder_weight_bytes: u64,
    /// Peaks above what was live when each phase began.
    pub encode_peak_bytes: u64,
    pub step_peak_bytes: u64,
    /// `None` when the decode cannot run on this adapter (see `decode_error`).
    pub decode_peak_bytes: Option<u64>,
    /// Why the decode could not run (e.g. an activation larger than the adapter's largest
    /// storage binding: lavapipe's 128 MiB at 512×512); the UNet figures stand regardless.
    pub decode_error: Option<String>,
    /// Measured peak with all three components loaded throughout (what pipeline.rs does today).
    pub all_loaded_peak_bytes: Option<u64>,
    /// Peak with the text encoder freed after encoding and the UNet before the decode
    /// (`PipelineOptions::low_memory()`; computed from the measured parts, see the module docs).
    pub staged_peak_bytes: Option<u64>,
    /// Bytes the pool kept for reuse at the end (allocated from the device, held by no tensor).
    pub kept_bytes: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct UnetBenchReport {
    pub adapter: AdapterSummary,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub model: String,
    pub latents: [usize; 4],
    pub image: [usize; 2],
    pub weights_source: String,
    pub warmup: usize,
    pub goal: String,
    pub goal_bytes: u64,
    /// Whether q4_0's whole-pipeline peak (today's all-loaded pipeline) is under the goal;
    /// absent when q4_0 was not run or the quick configuration was used.
    pub goal_met_all_loaded: Option<bool>,
    pub goal_met_staged: Option<bool>,
    pub cases: Vec<UnetBenchCase>,
}

/// Token ids of `n` padded prompts: BOS, a few words, EOS, padding (ids inside the vocabulary).
fn prompt_ids(c: &ClipTextConfig, n: usize) -> Vec<Vec<u32>> {
    let len = c.max_position_embeddings;
    let v = c.vocab_size as u32;
    let bos = c.bos_token_id.unwrap_or(0).min(v - 1);
    let eos = c.eos_token_id.as_ref().map_or(v - 1, |e| e.at(0)).min(v - 1);
    (0..n)
        .map(|p| {
            let mut ids = vec![eos; len];
            ids[0] = bos;
            for (i, id) in ids.iter_mut().enumerate().take(len.min(12)).skip(1) {
                *id = ((p * 31 + i * 997) as u32) % v;
            }
            ids[len.min(12) - 1] = eos;
            ids
        })
        .collect()
}

fn live(gpu: &Gpu) -> u64 {
    gpu.memory().live_bytes
}

/// Phase peak above what was live at its start.
fn peak_above(gpu: &Gpu, base: u64) -> u64 {
    gpu.memory().peak_live_bytes.saturating_sub(base)
}

struct Components {
    te: ClipTextModel,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
}

/// Each parameter's values come from the seed and its name (components' names differ).
fn src(seed: u64, what: &str) -> RandomWeights {
    RandomWeights::new(seed, what)
}

/// The token embedding table's storage: f32 as the pipeline loads it, or f16 where an f32
/// table exceeds the adapter's storage binding limit (SD1.5's is 152 MB, over lavapipe's and
/// browsers' 128 MiB).
pub fn token_table_dtype(gpu: &Gpu, c: &ClipTextConfig) -> DType {
    crate::pipeline::token_table_dtype(c, gpu.caps().max_storage_buffer_binding_size)
}

fn load_te(gpu: &Gpu, s: &BenchShapes, plan: WeightPlan, seed: u64) -> Result<ClipTextModel> {
    let table = token_table_dtype(gpu, &s.text_encoder);
    ClipTextModel::load_with_table(gpu, &s.text_encoder, &src(seed, "text_encoder"), plan.text_encoder, table)
}

fn load_unet(gpu: &Gpu, s: &BenchShapes, plan: WeightPlan, seed: u64) -> Result<(UNet2DConditionModel, u64)> {
    let w = src(seed, "unet");
    let unet = UNet2DConditionModel::load(gpu, &s.unet, &w, plan.unet)?;
    Ok((unet, w.loaded_values()))
}

fn load_vae(gpu: &Gpu, s: &BenchShapes, plan: WeightPlan, seed: u64) -> Result<AutoencoderKL> {
    AutoencoderKL::load(gpu, &s.vae, &src(seed, "vae"), plan.vae, VaeParts::DecoderOnly)
}

/// Prompt embeddings `[2, 77, D]` (negative and positive, batched as the pipeline does).
async fn encode(gpu: &Gpu, s: &BenchShapes, te: &ClipTextModel) -> Result<Tensor> {
    let ids = prompt_ids(&s.text_encoder, 2);
    let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let e = te.encode(gpu, &rows, EncodeOpts::clip_skip(0))?;
    // The pipeline reads the embeddings back and uploads the guidance batch again.
    let v = e.to_f32(gpu).await?;
    drop(e);
    Tensor::from_f32(gpu, &[2, s.text_encoder.max_position_embeddings, s.text_encoder.hidden_size], &v)
}

/// One pipeline step: upload the latents batch, UNet forward, read the prediction back.
async fn step(gpu: &Gpu, s: &BenchShapes, unet: &UNet2DConditionModel, ctx: &Tensor, latents: &[f32]) -> Result<Vec<f32>> {
    let sample = Tensor::from_f32(gpu, &s.latents, latents)?;
    let out = unet.forward(gpu, &sample, &[981.0], ctx)?;
    out.to_f32(gpu).await
}

async fn decode(gpu: &Gpu, s: &BenchShapes, vae: &AutoencoderKL, latents: &[f32]) -> Result<Vec<f32>> {
    let [_, c, h, w] = s.latents;
    let z = Tensor::from_f32(gpu, &[1, c, h, w], &latents[..c * h * w])?;
    // As the pipeline does: in tiles when the adapter cannot bind the whole decode.
    let image = if vae.needs_tiling(gpu.caps(), h, w) {
        let tiling = crate::model::vae_tiling::VaeTiling::for_adapter(vae.config(), gpu.caps());
        vae.decode_tiled(gpu, &z, tiling).await?
    } else {
        vae.decode(gpu, &z)?
    };
    image.to_f32(gpu).await
}

fn check_finite(what: &str, v: &[f32]) -> Result<()> {
    if v.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(Error::Invalid(format!("bench unet: {what} produced non-finite values")))
    }
}

/// Runs one weight type in the pipeline's order (all components loaded first).
async fn run_case(gpu: &Gpu, s: &BenchShapes, dt: DType, opts: &UnetBenchOptions, clock: &dyn Fn() -> f64) -> Result<UnetBenchCase> {
    let plan = WeightPlan::new(dt);
    gpu.sync().await?;
    gpu.trim();
    gpu.reset_peak_memory();
    let base = live(gpu);

    let te = load_te(gpu, s, plan, opts.seed)?;
    let te_bytes = live(gpu) - base;
    let t0 = clock();
    let (unet, unet_params) = load_unet(gpu, s, plan, opts.seed)?;
    gpu.sync().await?;
    let unet_load_ms = clock() - t0;
    let unet_bytes = live(gpu) - base - te_bytes;
    let vae = load_vae(gpu, s, plan, opts.seed)?;
    let vae_bytes = live(gpu) - base - te_bytes - unet_bytes;
    let c = Components { te, unet, vae };

    // 1. Prompt embeddings.
    let b = live(gpu);
    gpu.reset_peak_memory();
    let ctx = encode(gpu, s, &c.te).await?;
    let encode_peak = peak_above(gpu, b);
    let overall_1 = gpu.memory().peak_live_bytes;

    // 2. UNet steps.
    let latents = Rng::new(opts.seed).normal_vec(s.latents.iter().product());
    let b2 = live(gpu);
    gpu.reset_peak_memory();
    for _ in 0..opts.warmup {
        check_finite("the UNet", &step(gpu, s, &c.unet, &ctx, &latents).await?)?;
    }
    let mut ms = Vec::new();
    for _ in 0..opts.steps_timed.max(1) {
        let t = clock();
        let out = step(gpu, s, &c.unet, &ctx, &latents).await?;
        ms.push(clock() - t);
        check_finite("the UNet", &out)?;
    }
    let step_peak = peak_above(gpu, b2);
    let overall_2 = gpu.memory().peak_live_bytes;

    // 3. VAE decode.
    let b3 = live(gpu);
    gpu.reset_peak_memory();
    let (decode_peak, decode_error) = match decode(gpu, s, &c.vae, &latents).await {
        Ok(image) => {
            check_finite("the VAE decoder", &image)?;
            (Some(peak_above(gpu, b3)), None)
        }
        // An activation this adapter cannot bind: report it, keep the UNet figures.
        Err(e @ crate::Error::TooLarge { .. }) => (None, Some(e.to_string())),
        Err(e) => return Err(e),
    };
    let overall_3 = gpu.memory().peak_live_bytes;

    let all_loaded = decode_peak.map(|_| overall_1.max(overall_2).max(overall_3) - base);
    let class = |bytes: u64| crate::gpu::pool::size_class(bytes);
    let ctx_bytes = class(ctx.buffer().size());
    let staged = decode_peak.map(|decode_peak| {
        (te_bytes + unet_bytes + vae_bytes + encode_peak)
            .max(unet_bytes + vae_bytes + ctx_bytes + step_peak)
            .max(vae_bytes + decode_peak)
    });
    drop(c);
    drop(ctx);
    gpu.sync().await?;
    let kept = gpu.memory().free_bytes;
    gpu.trim();

    ms.sort_by(|a, b| a.total_cmp(b));
    Ok(UnetBenchCase {
        weights: dt.name().into(),
        unet_params,
        unet_weight_bytes: unet_bytes,
        unet_load_ms,
        steps_timed: ms.len(),
        step_ms_median: ms[ms.len() / 2],
        step_ms_min: ms[0],
        step_ms_max: ms[ms.len() - 1],
        step_activation_peak_bytes: step_peak,
        unet_peak_bytes: unet_bytes + ctx_bytes + step_peak,
        pipeline: PipelineMemory {
            text_encoder_dtype: plan.text_encoder.matrix().name().into(),
            token_table_dtype: token_table_dtype(gpu, &s.text_encoder).name().into(),
            unet_dtype: plan.unet.matrix().name().into(),
            vae_dtype: plan.vae.matrix().name().into(),
            text_encoder_weight_bytes: te_bytes,
            unet_weight_bytes: unet_bytes,
            vae_decoder_weight_bytes: vae_bytes,
            encode_peak_bytes: encode_peak,
            step_peak_bytes: step_peak,
            decode_peak_bytes: decode_peak,
            decode_error,
            all_loaded_peak_bytes: all_loaded,
            staged_peak_bytes: staged,
            kept_bytes: kept,
        },
    })
}

/// Runs the pipeline's work in the staged order of `PipelineOptions::low_memory()` (all
/// components loaded, the text encoder freed after encoding, one UNet step, the UNet and the
/// prompt embeddings freed, the decode) and returns the measured peak above what was live at
/// the start.
pub async fn measure_staged(gpu: &Gpu, s: &BenchShapes, dt: DType, seed: u64) -> Result<u64> {
    let plan = WeightPlan::new(dt);
    gpu.sync().await?;
    gpu.trim();
    gpu.reset_peak_memory();
    let base = live(gpu);
    let te = load_te(gpu, s, plan, seed)?;
    let (unet, _) = load_unet(gpu, s, plan, seed)?;
    let vae = load_vae(gpu, s, plan, seed)?;
    let ctx = encode(gpu, s, &te).await?;
    drop(te);
    let latents = Rng::new(seed).normal_vec(s.latents.iter().product());
    step(gpu, s, &unet, &ctx, &latents).await?;
    drop((unet, ctx));
    decode(gpu, s, &vae, &latents).await?;
    let peak = gpu.memory().peak_live_bytes - base;
    drop(vae);
    gpu.sync().await?;
    gpu.trim();
    Ok(peak)
}

/// One VAE decode measured alone.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct DecodeMemory {
    /// The decoder's weights (`WeightPlan::new(type).vae`).
    pub vae_decoder_weight_bytes: u64,
    /// Peak of the decode above what was live when it began (the decoder's weights excluded,
    /// the uploaded latents included, as in [`PipelineMemory::decode_peak_bytes`]).
    pub decode_peak_bytes: u64,
}

/// Loads the VAE decoder of `s` for weight type `dt` and decodes one `[1, C, h, w]` latent as
/// [`run_unet`] does, measuring only that phase. With `read_back` off the decode is recorded
/// and submitted but its image is not awaited: the pool counts bytes when tensors are
/// allocated and freed, not when the GPU runs, so the figure is the same, and a full-size
/// decode can be measured on a slow software adapter (the caller then must not wait for the
/// device before exiting if it wants to skip the work).
pub async fn measure_decode(gpu: &Gpu, s: &BenchShapes, dt: DType, seed: u64, read_back: bool) -> Result<DecodeMemory> {
    let plan = WeightPlan::new(dt);
    gpu.sync().await?;
    gpu.trim();
    let base = live(gpu);
    let vae = load_vae(gpu, s, plan, seed)?;
    let vae_bytes = live(gpu) - base;
    let latents = Rng::new(seed).normal_vec(s.latents.iter().product());
    let [_, c, h, w] = s.latents;
    let b = live(gpu);
    gpu.reset_peak_memory();
    let z = Tensor::from_f32(gpu, &[1, c, h, w], &latents[..c * h * w])?;
    let image = vae.decode(gpu, &z)?;
    let decode_peak = peak_above(gpu, b);
    if read_back {
        check_finite("the VAE decoder", &image.to_f32(gpu).await?)?;
    } else {
        gpu.flush();
    }
    drop((image, z, vae));
    Ok(DecodeMemory { vae_decoder_weight_bytes: vae_bytes, decode_peak_bytes: decode_peak })
}

/// Peak bytes one UNet step of `s` allocates above its weights and inputs (the prompt
/// embeddings and the uploaded latents included, as in
/// [`UnetBenchCase::step_activation_peak_bytes`]), with weight type `dt`. `read_back` as in
/// [`measure_decode`].
pub async fn measure_step(gpu: &Gpu, s: &BenchShapes, dt: DType, seed: u64, read_back: bool) -> Result<u64> {
    let plan = WeightPlan::new(dt);
    gpu.sync().await?;
    gpu.trim();
    let (unet, _) = load_unet(gpu, s, plan, seed)?;
    let t = &s.text_encoder;
    let (b, n, d) = (s.latents[0], t.max_position_embeddings, t.hidden_size);
    let ctx = Tensor::from_f32(gpu, &[b, n, d], &Rng::new(seed).normal_vec(b * n * d))?;
    let latents = Rng::new(seed).normal_vec(s.latents.iter().product());
    let base = live(gpu);
    gpu.reset_peak_memory();
    if read_back {
        check_finite("the UNet", &step(gpu, s, &unet, &ctx, &latents).await?)?;
    } else {
        let sample = Tensor::from_f32(gpu, &s.latents, &latents)?;
        drop(unet.forward(gpu, &sample, &[981.0], &ctx)?);
        gpu.flush();
    }
    let peak = peak_above(gpu, base);
    drop((unet, ctx));
    Ok(peak)
}

/// Runs every weight type of `opts`; `clock` returns milliseconds.
pub async fn run_unet(gpu: &Gpu, opts: &UnetBenchOptions, clock: &dyn Fn() -> f64) -> Result<UnetBenchReport> {
    let s = if opts.quick { BenchShapes::quick() } else { BenchShapes::sd15() };
    let mut cases = Vec::new();
    for &dt in &opts.weights {
        cases.push(run_case(gpu, &s, dt, opts, clock).await?);
    }
    let q4 = cases.iter().find(|c| c.weights == DType::Q4_0.name()).filter(|_| !opts.quick);
    Ok(UnetBenchReport {
        adapter: gpu.adapter(),
        shader_f16: gpu.caps().shader_f16,
        subgroups: gpu.caps().subgroups,
        model: s.name.into(),
        latents: s.latents,
        image: s.image_size(),
        weights_source: "random (model::RandomWeights, seeded uniform)".into(),
        warmup: opts.warmup,
        goal: GOAL.into(),
        goal_bytes: GOAL_BYTES,
        goal_met_all_loaded: q4.and_then(|c| c.pipeline.all_loaded_peak_bytes).map(|b| b < GOAL_BYTES),
        goal_met_staged: q4.and_then(|c| c.pipeline.staged_peak_bytes).map(|b| b < GOAL_BYTES),
        cases,
    })
}

fn gb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn gb_or_dash(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "-".to_string(), gb)
}

/// A plain-text table of a report (MB = 10⁶ bytes, GB = 10⁹ bytes).
pub fn format_unet_table(r: &UnetBenchReport) -> String {
    let mut s = format!(
        "adapter: {} ({}, {}), shader-f16: {}, subgroups: {}\n",
        r.adapter.name, r.adapter.backend, r.adapter.device_type, r.shader_f16, r.subgroups
    );
    s.push_str(&format!(
        "model: {}, UNet latents {:?} (batch 2 = classifier-free guidance), image {}x{}, weights: {}\n\n",
        r.model, r.latents, r.image[0], r.image[1], r.weights_source
    ));
    s.push_str(&format!("UNet step (after {} warm-up step(s)); memory = bytes allocated by the engine\n", r.warmup));
    s.push_str(&format!(
        "{:<7} {:>8} {:>12} {:>9} {:>6} {:>11} {:>10} {:>10} {:>14} {:>12}\n",
        "weights", "params", "weights", "load ms", "steps", "median ms", "min ms", "max ms", "activations", "UNet peak"
    ));
    for c in &r.cases {
        s.push_str(&format!(
            "{:<7} {:>7.0}M {:>12} {:>9.0} {:>6} {:>11.1} {:>10.1} {:>10.1} {:>14} {:>12}\n",
            c.weights,
            c.unet_params as f64 / 1e6,
            gb(c.unet_weight_bytes),
            c.unet_load_ms,
            c.steps_timed,
            c.step_ms_median,
            c.step_ms_min,
            c.step_ms_max,
            gb(c.step_activation_peak_bytes),
            gb(c.unet_peak_bytes)
        ));
    }
    s.push_str("\nWhole pipeline (encode 2 prompts -> UNet steps -> VAE decode), peak bytes allocated by the engine\n");
    s.push_str(&format!(
        "{:<7} {:<16} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10}\n",
        "weights", "te/unet/vae", "text enc", "UNet", "VAE dec", "encode+", "step+", "decode+", "all loaded", "staged"
    ));
    for c in &r.cases {
        let p = &c.pipeline;
        s.push_str(&format!(
            "{:<7} {:<16} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10}\n",
            c.weights,
            format!("{}/{}/{}", p.text_encoder_dtype, p.unet_dtype, p.vae_dtype),
            gb(p.text_encoder_weight_bytes),
            gb(p.unet_weight_bytes),
            gb(p.vae_decoder_weight_bytes),
            gb(p.encode_peak_bytes),
            gb(p.step_peak_bytes),
            gb_or_dash(p.decode_peak_bytes),
            gb_or_dash(p.all_loaded_peak_bytes),
            gb_or_dash(p.staged_peak_bytes)
        ));
        if let Some(e) = &p.decode_error {
            s.push_str(&format!("        VAE decode did not run on this adapter: {e}\n"));
        }
    }
    if let Some(c) = r.cases.iter().find(|c| c.pipeline.token_table_dtype != "f32") {
        s.push_str(&format!(
            "token embedding table stored {} (an f32 table exceeds this adapter's storage binding limit)\n",
            c.pipeline.token_table_dtype
        ));
    }
    s.push_str(
        "all loaded: measured, every component resident throughout (what StableDiffusionPipeline does today)\n\
         staged: PipelineOptions::low_memory(): text encoder freed after encoding, UNet before the decode (from the measured parts)\n",
    );
    let met = |m: Option<bool>| match m {
        Some(true) => "met",
        Some(false) => "not met",
        None => "n/a (needs a full-size q4_0 run whose decode fits the adapter)",
    };
    s.push_str(&format!(
        "\ngoal: {} (GB = 10^9 bytes)\n  all loaded: {}; staged: {}\n",
        r.goal,
        met(r.goal_met_all_loaded),
        met(r.goal_met_staged)
    ));
    s
}
