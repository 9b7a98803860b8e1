//! Text-to-image generation as diffusers' `StableDiffusionPipeline.__call__` runs it
//! (diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion.py):
//!
//! 1. `encode_prompt`: the prompt (and, under classifier-free guidance, the negative prompt, `""`
//!    when none is given) tokenized to 77 ids and encoded by the CLIP text encoder, with
//!    diffusers' `clip_skip`;
//! 2. `prepare_latents`: standard normal noise `[1, in_channels, H/8, W/8]` (or the caller's
//!    initial latents) × the sampler's `init_noise_sigma`;
//! 3. the guidance mode (`sampler::guidance::Guidance::for_unet`): classifier-free guidance
//!    when `cfg > 1` on a UNet without `time_cond_proj_dim`, the UNet batch being
//!    `[negative, prompt]`; one UNet call otherwise; LCM-distilled UNets take the guidance-scale
//!    embedding as `timestep_cond`;
//! 4. for every timestep: `scale_model_input`, the UNet, the guidance combination
//!    `uncond + cfg · (cond − uncond)`, the sampler step (ε or v prediction as the scheduler
//!    config says), then the progress callback with the new latents (`callback_on_step_end`);
//! 5. `vae.decode(latents / scaling_factor)` (tiled as `vae.enable_tiling()` does when the adapter
//!    cannot bind the whole decode's activations) and `(x / 2 + 0.5).clamp(0, 1)`.
//!
//! Randomness (when no initial latents are given): `crate::rng::Rng::new(seed)` draws the
//! initial noise with `normal_vec(C·h·w)` (in NCHW order); the next `next_u64()` of the same
//! generator seeds the sampler's own noise (`Sampler::set_noise_seed`), which stochastic samplers
//! (Euler ancestral, LCM) draw once per noisy step. With initial latents given, the sampler's
//! noise is seeded the same way from `seed`. [`GenerateOptions::step_noise`] replaces the
//! sampler's draw at chosen steps (for replaying noise recorded from diffusers).
//!
//! Storage of the weights ([`WeightPlan::new`]): the matrices of every linear and convolution
//! layer of the UNet and the text encoder take the chosen type (f32, f16, q8_0, q4_0); the VAE's
//! matrices take it too for f32 and f16, and f16 for the quantized types (the decoder is small
//! and its errors land directly in the pixels). Norm parameters, biases, the token and position
//! embeddings and the time-embedding inputs stay f32 everywhere, except the token embedding
//! table when its f32 form would exceed the adapter's largest storage binding (SD1.5's is
//! 152 MB, over the 128 MiB of lavapipe and browsers): it is then stored f16
//! ([`token_table_dtype`]).
//!
//! Memory: by default every component stays on the GPU. [`PipelineOptions::low_memory`] (through
//! [`StableDiffusionPipeline::load_with_options`]) frees the text encoder once the prompts are
//! encoded and the UNet before the VAE decode, reloading each from the checkpoint when next
//! needed; the results are the same.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::io::RangeRead;
use crate::model::checkpoint::{Checkpoint, ComponentWeights};
use crate::model::clip::{ClipTextModel, EncodeOpts};
use crate::model::config::{ClipTextConfig, SampleSize, UNetConfig};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::{to_image_01, AutoencoderKL, VaeParts};
use crate::model::vae_tiling::VaeTiling;
use crate::model::weights::WeightPolicy;
use crate::quant::DType;
use crate::rng::Rng;
use crate::sampler::guidance::{guidance_embedding, Guidance};
use crate::sampler::{Sampler, SamplerConfig, SamplerKind};
use crate::tensor::Tensor;

#[path = "pipeline/adapters.rs"]
mod adapters;
#[path = "pipeline/slot.rs"]
mod slot;

pub use adapters::AdapterReport;
use adapters::AdapterState;
use slot::Slot;

/// Storage of each component's weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightPlan {
    pub unet: WeightPolicy,
    pub text_encoder: WeightPolicy,
    pub vae: WeightPolicy,
}

impl WeightPlan {
    /// The plan for weight type `matrices` (see the module docs): UNet and text encoder matrices
    /// as `matrices`, VAE matrices as `matrices` for f32/f16 and f16 for q8_0/q4_0.
    pub fn new(matrices: DType) -> Self {
        let vae = match matrices {
            DType::F32 => DType::F32,
            _ => DType::F16,
        };
        WeightPlan {
            unet: WeightPolicy::new(matrices),
            text_encoder: WeightPolicy::new(matrices),
            vae: WeightPolicy::new(vae),
        }
    }
}

/// Storage of the text encoder's token embedding table: f32 when its `vocab_size × hidden_size`
/// f32 values fit in one storage binding of `max_binding_bytes`
/// (`gpu.caps().max_storage_buffer_binding_size`), f16 otherwise.
pub fn token_table_dtype(config: &ClipTextConfig, max_binding_bytes: u64) -> DType {
    let f32_bytes = (config.vocab_size as u64) * (config.hidden_size as u64) * 4;
    if f32_bytes <= max_binding_bytes {
        DType::F32
    } else {
        DType::F16
    }
}

impl Default for WeightPlan {
    fn default() -> Self {
        Self::new(DType::F32)
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub prompt: String,
    /// The negative prompt (diffusers' `negative_prompt=None` is `""`); used only under
    /// classifier-free guidance.
    pub negative: String,
    pub seed: u64,
    pub steps: usize,
    /// Guidance scale (diffusers' `guidance_scale`).
    pub cfg: f32,
    pub sampler: SamplerKind,
    /// Image size in pixels; `None` = the UNet's `sample_size` × the VAE factor (diffusers'
    /// default).
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// diffusers' `clip_skip` (0 = last layer, 1 = penultimate; A1111's "Clip skip N" is N − 1).
    pub clip_skip: usize,
    /// Initial noise `[1, in_channels, H/8, W/8]` (standard normal, before `init_noise_sigma`)
    /// instead of the seeded draw.
    pub init_latents: Option<Vec<f32>>,
    /// Noise for stochastic steps: entry `i`, when present, replaces the sampler's own draw at
    /// step `i` (ignored at steps that draw nothing).
    pub step_noise: Vec<Option<Vec<f32>>>,
    /// Replaces the model's scheduler config (e.g. to force `prediction_type`).
    pub scheduler: Option<SamplerConfig>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            prompt: String::new(),
            negative: String::new(),
            seed: 0,
            steps: 20,
            cfg: 7.5,
            sampler: SamplerKind::EulerAncestral,
            width: None,
            height: None,
            clip_skip: 0,
            init_latents: None,
            step_noise: Vec::new(),
            scheduler: None,
        }
    }
}

/// What the progress callback sees after each step.
pub struct StepProgress<'a> {
    /// 0-based step index.
    pub step: usize,
    pub steps: usize,
    pub timestep: f32,
    /// Latents after this step `[1, C, h, w]` (what `callback_on_step_end` sees).
    pub latents: &'a [f32],
    /// The sampler's current estimate of the clean latents (for previews).
    pub denoised: &'a [f32],
}

/// A generated image and the intermediates diffusers' pipeline exposes.
#[derive(Clone, Debug)]
pub struct GenerateOutput {
    /// `[1, 3, H, W]` in [0, 1] (diffusers' `output_type="np"`, NCHW).
    pub image: Vec<f32>,
    pub image_shape: [usize; 4],
    /// `[1, 77, D]`.
    pub prompt_embeds: Vec<f32>,
    /// `[1, 77, D]`, present under classifier-free guidance.
    pub negative_prompt_embeds: Option<Vec<f32>>,
    pub embeds_shape: [usize; 3],
    /// Latents after each step, `[1, C, h, w]` each.
    pub latents: Vec<Vec<f32>>,
    pub latents_shape: [usize; 4],
    /// The timesteps run.
    pub timesteps: Vec<f32>,
    /// The tiles the VAE decoded by, when the untiled decode's largest activation exceeds the
    /// adapter's storage-binding limit ([`AutoencoderKL::needs_tiling`]): diffusers' default
    /// tiles for the VAE config, shrunk until one tile fits ([`VaeTiling::for_adapter`]).
    /// `None`: decoded whole.
    pub vae_tiling: Option<VaeTiling>,
}

/// How a [`StableDiffusionPipeline`] holds its components between uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipelineOptions {
    /// Release the text encoder's weights as soon as the prompts are encoded (and the pool's
    /// spare buffers with them), and load them again from the checkpoint at the next encoding:
    /// the UNet loop and the VAE decode then run without the text encoder resident, at the cost
    /// of re-reading its weights on every generation. Results are the same either way.
    pub free_text_encoder_after_encoding: bool,
    /// Release the UNet's weights after the denoising loop, before the VAE decode, and load them
    /// again from the checkpoint at the next generation's loop: the decode, the largest
    /// activation peak, runs beside the VAE decoder's weights alone.
    pub free_unet_before_decode: bool,
}

impl PipelineOptions {
    /// The lowest peak memory this pipeline offers: the text encoder freed after encoding and
    /// the UNet before the decode.
    pub fn low_memory() -> Self {
        Self { free_text_encoder_after_encoding: true, free_unet_before_decode: true }
    }
}

/// diffusers' `StableDiffusionPipeline`: tokenizer, text encoder, UNet, VAE decoder and the
/// model's scheduler config, with weights on the GPU.
pub struct StableDiffusionPipeline {
    tokenizer: ClipTokenizer,
    /// Released between uses under [`PipelineOptions::free_text_encoder_after_encoding`].
    text_encoder: Slot<ClipTextModel>,
    text_encoder_config: ClipTextConfig,
    token_table: DType,
    /// Released between uses under [`PipelineOptions::free_unet_before_decode`].
    unet: Slot<UNet2DConditionModel>,
    unet_config: UNetConfig,
    unet_size_multiple: usize,
    options: PipelineOptions,
    vae: AutoencoderKL,
    scheduler: SamplerConfig,
    plan: WeightPlan,
    default_size: (usize, usize),
    /// Unmerged adapters: the files, their strengths and the installed layers.
    adapters: AdapterState,
}

const OP: &str = "StableDiffusionPipeline";

fn invalid(message: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{OP}: {message}"))
}

impl StableDiffusionPipeline {
    /// Loads every component of `ck` (consumed: the pipeline keeps its tokenizer) to the GPU with the storage `plan` (weights stream
    /// tensor by tensor from the checkpoint's files).
    pub fn load<R: RangeRead>(gpu: &Gpu, ck: Checkpoint<R>, plan: WeightPlan) -> Result<Self> {
        Self::load_parts(gpu, ck, plan).map(|(pipe, _, _)| pipe)
    }

    /// [`load`](Self::load) with `options`; for each component the options free between uses,
    /// the pipeline keeps the checkpoint's weights of that component to reload them from.
    pub fn load_with_options<R: RangeRead + 'static>(
        gpu: &Gpu,
        ck: Checkpoint<R>,
        plan: WeightPlan,
        options: PipelineOptions,
    ) -> Result<Self> {
        let (mut pipe, te, unet) = Self::load_parts(gpu, ck, plan)?;
        pipe.options = options;
        if options.free_text_encoder_after_encoding {
            pipe.text_encoder.source = Some(Box::new(te));
        }
        if options.free_unet_before_decode {
            pipe.unet.source = Some(Box::new(unet));
        }
        Ok(pipe)
    }

    pub fn options(&self) -> PipelineOptions {
        self.options
    }

    /// Whether the text encoder's weights are on the GPU now.
    pub fn text_encoder_resident(&self) -> bool {
        self.text_encoder.is_resident()
    }

    /// Whether the UNet's weights are on the GPU now.
    pub fn unet_resident(&self) -> bool {
        self.unet.is_resident()
    }

    #[allow(clippy::type_complexity)]
    fn load_parts<R: RangeRead>(
        gpu: &Gpu,
        ck: Checkpoint<R>,
        plan: WeightPlan,
    ) -> Result<(Self, ComponentWeights<R>, ComponentWeights<R>)> {
        let scheduler = ck.config.scheduler.clone();
        let te_config = &ck.config.text_encoder;
        let table = token_table_dtype(te_config, gpu.caps().max_storage_buffer_binding_size);
        let text_encoder = ClipTextModel::load_with_table(gpu, te_config, &ck.text_encoder, plan.text_encoder, table)?;
        let unet = UNet2DConditionModel::load(gpu, &ck.config.unet, &ck.unet, plan.unet)?;
        let vae = AutoencoderKL::load(gpu, &ck.config.vae, &ck.vae, plan.vae, VaeParts::DecoderOnly)?;
        let d = text_encoder.config().hidden_size;
        if d != unet.cross_attention_dim() {
            return Err(invalid(format!(
                "the text encoder's hidden_size {d} does not match the UNet's cross_attention_dim {}",
                unet.cross_attention_dim()
            )));
        }
        if vae.config().latent_channels != unet.config().in_channels {
            return Err(invalid(format!(
                "the VAE's latent_channels {} do not match the UNet's in_channels {}",
                vae.config().latent_channels,
                unet.config().in_channels
            )));
        }
        let f = vae.downscale();
        let default_size = match &ck.config.unet.sample_size {
            Some(SampleSize::Square(s)) => (s * f, s * f),
            Some(SampleSize::HeightWidth([h, w])) => (w * f, h * f),
            None => (64 * f, 64 * f),
        };
        let pipe = StableDiffusionPipeline {
            tokenizer: ck.tokenizer,
            text_encoder_config: text_encoder.config().clone(),
            text_encoder: Slot::resident(text_encoder),
            token_table: table,
            unet_config: unet.config().clone(),
            unet_size_multiple: unet.size_multiple(),
            unet: Slot::resident(unet),
            options: PipelineOptions::default(),
            vae,
            scheduler,
            plan,
            default_size,
            adapters: AdapterState::default(),
        };
        Ok((pipe, ck.text_encoder, ck.unet))
    }

    pub fn weight_plan(&self) -> WeightPlan {
        self.plan
    }

    /// The model's scheduler config as the samplers read it.
    pub fn scheduler_config(&self) -> &SamplerConfig {
        &self.scheduler
    }

    /// Pixels per latent (8 for Stable Diffusion).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.downscale()
    }

    /// Width and height must be multiples of this (VAE factor × UNet levels).
    pub fn size_multiple(&self) -> usize {
        self.vae.downscale() * self.unet_size_multiple
    }

    /// diffusers' default image size: `unet.config.sample_size × vae_scale_factor` (512 for
    /// SD1.5), as (width, height).
    pub fn default_size(&self) -> (usize, usize) {
        self.default_size
    }

    /// Latent shape `[1, C, h, w]` for an image of `width × height` pixels, checking the size.
    pub fn latents_shape(&self, width: usize, height: usize) -> Result<[usize; 4]> {
        let m = self.size_multiple();
        for (name, v) in [("width", width), ("height", height)] {
            if v == 0 || !v.is_multiple_of(m) {
                return Err(invalid(format!(
                    "unsupported size: {name} {v} must be a positive multiple of {m} for this model"
                )));
            }
        }
        let f = self.vae_scale_factor();
        Ok([1, self.unet_config.in_channels, height / f, width / f])
    }

    /// Refuses an image size whose UNet activations cannot be held: the first level's
    /// `[batch, block_out_channels[0], h, w]` (f32, and every layer of that level as large) must
    /// fit one buffer of the adapter. Checked before the prompts are encoded or any noise drawn,
    /// so an impossible size costs nothing.
    fn check_activation_size(&self, gpu: &Gpu, batch: usize, shape: [usize; 4]) -> Result<()> {
        let c0 = self.unet_config.block_out_channels.first().copied().unwrap_or(0) as u64;
        let bytes = batch as u64 * c0 * shape[2] as u64 * shape[3] as u64 * 4;
        let caps = gpu.caps();
        let limit = caps.max_storage_buffer_binding_size.min(caps.max_buffer_size);
        if bytes > limit {
            return Err(Error::TooLarge {
                what: format!(
                    "a {}x{} image (the UNet's activation [{batch}, {c0}, {}, {}])",
                    shape[3] * self.vae_scale_factor(),
                    shape[2] * self.vae_scale_factor(),
                    shape[2],
                    shape[3]
                ),
                bytes,
                limit,
            });
        }
        Ok(())
    }

    /// `[1, 77, D]` prompt embeddings of each text (one text-encoder call on the batch).
    pub async fn encode_prompts(&self, gpu: &Gpu, texts: &[&str], clip_skip: usize) -> Result<Vec<Vec<f32>>> {
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| self.tokenizer.encode_padded(t)).collect();
        let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let te = self.text_encoder.get("text encoder", |src| self.reload_text_encoder(gpu, src))?;
        let e = te.encode(gpu, &rows, EncodeOpts::clip_skip(clip_skip))?;
        if self.options.free_text_encoder_after_encoding {
            // Commands already recorded keep the buffers they read alive until they have run.
            self.text_encoder.release();
            drop(te);
            gpu.trim();
        }
        let all = e.to_f32(gpu).await?;
        let per = all.len() / texts.len().max(1);
        Ok(all.chunks(per).map(<[f32]>::to_vec).collect())
    }

    /// Runs the whole pipeline. `progress` is called after every step.
    pub async fn generate(
        &self,
        gpu: &Gpu,
        opts: &GenerateOptions,
        progress: &mut dyn FnMut(&StepProgress<'_>),
    ) -> Result<GenerateOutput> {
        let (dw, dh) = self.default_size();
        let (width, height) = (opts.width.unwrap_or(dw), opts.height.unwrap_or(dh));
        let shape = self.latents_shape(width, height)?;
        let n: usize = shape.iter().product();
        if !(opts.cfg.is_finite()) {
            return Err(invalid(format!("guidance scale {} is not a finite number", opts.cfg)));
        }

        // Sampler (checks the step count before any GPU work).
        let config = opts.scheduler.as_ref().unwrap_or(&self.scheduler);
        let mut sampler = Sampler::new(opts.sampler, config)?;
        sampler.set_timesteps(opts.steps)?;

        // 1. Prompt embeddings (A1111 `<lora:…>` tags removed; they must match the adapters).
        let (prompt, negative) = (self.untagged(&opts.prompt)?, self.untagged(&opts.negative)?);
        let guidance = Guidance::for_unet(opts.cfg, self.unet_config.time_cond_proj_dim);
        self.check_activation_size(gpu, guidance.batch(), shape)?;
        let d = self.text_encoder_config.hidden_size;
        let seq = self.tokenizer.max_length();
        let (prompt_embeds, negative_prompt_embeds) = match guidance {
            Guidance::ClassifierFree { .. } => {
                let mut e = self.encode_prompts(gpu, &[&negative, &prompt], opts.clip_skip).await?;
                let cond = e.pop().expect("two prompts");
                (cond, e.pop())
            }
            _ => (self.encode_prompts(gpu, &[&prompt], opts.clip_skip).await?.remove(0), None),
        };
        let batch = guidance.batch();
        let context: Vec<f32> = match &negative_prompt_embeds {
            Some(neg) => neg.iter().chain(&prompt_embeds).copied().collect(),
            None => prompt_embeds.clone(),
        };
        let context = Tensor::from_f32(gpu, &[batch, seq, d], &context)?;
        let timestep_cond = match guidance {
            Guidance::Embedded { w, dim } => Some(Tensor::from_f32(gpu, &[1, dim], &guidance_embedding(w, dim))?),
            _ => None,
        };

        // 2. Initial latents.
        let mut rng = Rng::new(opts.seed);
        let noise = match &opts.init_latents {
            Some(l) if l.len() != n => {
                return Err(invalid(format!(
                    "initial latents have {} values but a {width}x{height} image needs {shape:?} ({n} values)",
                    l.len()
                )))
            }
            Some(l) => l.clone(),
            None => rng.normal_vec(n),
        };
        sampler.set_noise_seed(rng.next_u64());
        let mut latents = sampler.initial_latents(&noise);

        // 3. Denoising loop.
        let unet = self.unet.get("UNet", |src| self.reload_unet(gpu, src))?;
        let timesteps = sampler.timesteps().to_vec();
        let mut steps_out = Vec::with_capacity(timesteps.len());
        for (i, &t) in timesteps.iter().enumerate() {
            let input = sampler.scale_model_input(&latents, t)?;
            let input: Vec<f32> = if batch == 2 { input.iter().chain(&input).copied().collect() } else { input };
            let sample = Tensor::from_f32(gpu, &[batch, shape[1], shape[2], shape[3]], &input)?;
            let out = unet.forward_with_cond(gpu, &sample, &[t], &context, timestep_cond.as_ref())?;
            let out = out.to_f32(gpu).await?;
            let guided = guidance.combine(&out)?;
            let noise = opts.step_noise.get(i).and_then(|z| z.as_deref());
            let step = sampler.step(&guided, t, &latents, noise)?;
            latents = step.prev_sample;
            progress(&StepProgress {
                step: i,
                steps: timesteps.len(),
                timestep: t,
                latents: &latents,
                denoised: &step.denoised,
            });
            steps_out.push(latents.clone());
        }

        if self.options.free_unet_before_decode {
            self.unet.release();
            drop(unet);
            drop(context);
            gpu.trim();
        }

        // 4. Decode.
        let z = Tensor::from_f32(gpu, &shape, &latents)?;
        let (caps, vae_config) = (gpu.caps(), self.vae.config());
        let vae_tiling = self.vae.needs_tiling(caps, shape[2], shape[3]).then(|| VaeTiling::for_adapter(vae_config, caps));
        let image = match vae_tiling {
            Some(t) => self.vae.decode_tiled(gpu, &z, t).await?,
            None => self.vae.decode(gpu, &z)?,
        };
        let image_shape: [usize; 4] =
            image.shape().try_into().map_err(|_| invalid(format!("VAE output {:?} is not NCHW", image.shape())))?;
        let image = to_image_01(&image.to_f32(gpu).await?);
        Ok(GenerateOutput {
            image,
            image_shape,
            prompt_embeds,
            negative_prompt_embeds,
            embeds_shape: [1, seq, d],
            latents: steps_out,
            latents_shape: shape,
            timesteps,
            vae_tiling,
        })
    }
}

impl GenerateOutput {
    /// The tensors `loralab generate --dump` writes, all f32: `prompt_embeds`,
    /// `negative_prompt_embeds` (under classifier-free guidance), `latents_step_{i}` and `image`.
    pub fn dump_tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        let mut v: Vec<(String, Vec<usize>, &[f32])> =
            vec![("prompt_embeds".into(), self.embeds_shape.to_vec(), &self.prompt_embeds)];
        if let Some(neg) = &self.negative_prompt_embeds {
            v.push(("negative_prompt_embeds".into(), self.embeds_shape.to_vec(), neg));
        }
        for (i, l) in self.latents.iter().enumerate() {
            v.push((format!("latents_step_{i}"), self.latents_shape.to_vec(), l));
        }
        v.push(("image".into(), self.image_shape.to_vec(), &self.image));
        v
    }

    /// The image as 8-bit RGB `[H, W, 3]` (diffusers' `output_type="pil"`: `255·v` rounded half
    /// to even).
    pub fn to_rgb8(&self) -> Vec<u8> {
        let [_, c, h, w] = self.image_shape;
        let mut out = vec![0u8; h * w * 3];
        for p in 0..h * w {
            for ch in 0..3 {
                let v = self.image[(ch.min(c - 1)) * h * w + p];
                out[p * 3 + ch] = (v * 255.0).round_ties_even().clamp(0.0, 255.0) as u8;
            }
        }
        out
    }

    /// [`Self::dump_tensors`] as a safetensors file.
    pub fn dump_safetensors(&self) -> Result<Vec<u8>> {
        write_safetensors_f32(&self.dump_tensors())
    }
}

/// Serialises f32 tensors `(name, shape, values)` as a safetensors file.
pub fn write_safetensors_f32(tensors: &[(String, Vec<usize>, &[f32])]) -> Result<Vec<u8>> {
    use safetensors::tensor::TensorView;
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| bytemuck::cast_slice(v).to_vec()).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map(|v| (name.clone(), v))
                .map_err(|e| invalid(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, None).map_err(|e| invalid(format!("writing safetensors: {e}")))
}

#[cfg(test)]
mod tests {
    use super::token_table_dtype;
    use crate::model::config::ClipTextConfig;
    use crate::quant::DType;

    #[test]
    fn token_table_goes_f16_only_when_f32_exceeds_the_binding_limit() {
        let sd15 = ClipTextConfig::sd15(); // 49408 × 768 × 4 = 151,781,376 bytes
        let f32_bytes = (sd15.vocab_size * sd15.hidden_size * 4) as u64;
        assert_eq!(f32_bytes, 151_781_376);
        assert_eq!(token_table_dtype(&sd15, 128 << 20), DType::F16); // lavapipe, browsers
        assert_eq!(token_table_dtype(&sd15, 2 << 30), DType::F32); // desktop Vulkan
        assert_eq!(token_table_dtype(&sd15, f32_bytes), DType::F32); // exactly fits
        assert_eq!(token_table_dtype(&sd15, f32_bytes - 1), DType::F16);
        let tiny = ClipTextConfig { vocab_size: 1000, hidden_size: 32, ..ClipTextConfig::sd15() };
        assert_eq!(token_table_dtype(&tiny, 128 << 20), DType::F32);
    }
}
