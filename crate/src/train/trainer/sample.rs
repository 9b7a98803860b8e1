//! Images generated with the adapter being trained, to watch what it learns: the current
//! adapters are installed unmerged into the inference UNet ([`crate::adapter::install`], the
//! path a finished LoRA file takes), each sample prompt is generated as
//! [`crate::pipeline::StableDiffusionPipeline::generate`] does it (the same noise for the same
//! seed, the same sampler, guidance and decode), and the adapters are removed again. The
//! prompt embeddings were cached when the run started, or, when the text encoder trains, are
//! made with its adapters as they are now.

use super::Trainer;
use crate::adapter;
use crate::error::{shape_err, Error, Result};
use crate::gpu::Gpu;
use crate::lora::Target;
use crate::model::vae::{to_rgb8, AutoencoderKL};
use crate::model::vae_tiling::VaeTiling;
use crate::rng::Rng;
use crate::sampler::guidance::Guidance;
use crate::sampler::Sampler;
use crate::tensor::Tensor;

use super::SampleSettings;

/// The sampling state a run keeps: the VAE (its decoder makes the pixels) and the prompts'
/// embeddings.
pub(super) struct Sampling {
    vae: AutoencoderKL,
    settings: SampleSettings,
    /// `[tokens, dim]` per prompt.
    prompts: Vec<Vec<f32>>,
    negative: Vec<f32>,
    embed_shape: [usize; 2],
}

impl Sampling {
    pub fn new(vae: AutoencoderKL, settings: SampleSettings, prompts: Vec<Vec<f32>>, negative: Vec<f32>, embed_shape: [usize; 2]) -> Self {
        Sampling { vae, settings, prompts, negative, embed_shape }
    }
}

/// One generated sample.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleImage {
    pub prompt: String,
    /// Optimizer steps done when it was made.
    pub step: u64,
    pub width: usize,
    pub height: usize,
    /// `[H, W, 3]` RGB8.
    pub rgb: Vec<u8>,
}

impl Trainer {
    /// The sample prompts (empty when the run makes no samples).
    pub fn sample_prompts(&self) -> &[String] {
        self.samples.as_ref().map_or(&[], |s| &s.settings.prompts)
    }

    /// One image per sample prompt with the adapters as they are now, at the training
    /// resolution.
    pub async fn samples(&mut self, gpu: &Gpu) -> Result<Vec<SampleImage>> {
        if self.samples.is_none() {
            return Err(Error::Invalid("this run was set up without sample prompts".into()));
        }
        // A trained text encoder makes the prompts' embeddings anew.
        let fresh = match &self.te {
            Some(te) => Some(te.sample_embeddings(gpu).await?),
            None => None,
        };
        let file = self.train.params().to_lora_file(gpu, "training").await?;
        adapter::install(gpu, &mut self.unet, Target::Unet, &[&file], &[1.0]).await?;
        let out = self.generate_all(gpu, fresh).await;
        adapter::clear(&mut self.unet);
        out
    }

    async fn generate_all(&self, gpu: &Gpu, fresh: Option<Vec<Vec<f32>>>) -> Result<Vec<SampleImage>> {
        let Some(s) = &self.samples else { return Ok(vec![]) };
        let (prompts, negative) = match fresh.as_ref().and_then(|f| f.split_last()) {
            Some((negative, prompts)) => (prompts, negative),
            None => (s.prompts.as_slice(), &s.negative),
        };
        let mut out = Vec::with_capacity(prompts.len());
        for (prompt, embeds) in s.settings.prompts.iter().zip(prompts) {
            let (width, height, rgb) = self.generate_one(gpu, s, embeds, negative).await?;
            out.push(SampleImage { prompt: prompt.clone(), step: self.step, width, height, rgb });
        }
        Ok(out)
    }

    async fn generate_one(&self, gpu: &Gpu, s: &Sampling, embeds: &[f32], negative: &[f32]) -> Result<(usize, usize, Vec<u8>)> {
        let set = &s.settings;
        let mut sampler = Sampler::new(set.sampler, &self.scheduler)?;
        sampler.set_timesteps(set.steps)?;
        let guidance = Guidance::for_unet(set.cfg, None);
        let batch = guidance.batch();
        let context: Vec<f32> = if batch == 2 { negative.iter().chain(embeds).copied().collect() } else { embeds.to_vec() };
        let context = Tensor::from_f32(gpu, &[batch, s.embed_shape[0], s.embed_shape[1]], &context)?;
        let [c, h, w] = self.latent_shape;
        let shape = [1, c, h, w];
        let mut rng = Rng::new(set.seed);
        let noise = rng.normal_vec(c * h * w);
        sampler.set_noise_seed(rng.next_u64());
        let mut latents = sampler.initial_latents(&noise);
        let timesteps = sampler.timesteps().to_vec();
        for &t in &timesteps {
            let input = sampler.scale_model_input(&latents, t)?;
            let input: Vec<f32> = if batch == 2 { input.iter().chain(&input).copied().collect() } else { input };
            let x = Tensor::from_f32(gpu, &[batch, c, h, w], &input)?;
            let out = self.unet.forward(gpu, &x, &[t], &context)?.to_f32(gpu).await?;
            let guided = guidance.combine(&out)?;
            latents = sampler.step(&guided, t, &latents, None)?.prev_sample;
        }
        let z = Tensor::from_f32(gpu, &shape, &latents)?;
        let caps = gpu.caps();
        let image = if s.vae.needs_tiling(caps, h, w) {
            s.vae.decode_tiled(gpu, &z, VaeTiling::for_adapter(s.vae.config(), caps)).await?
        } else {
            s.vae.decode(gpu, &z)?
        };
        let dims: [usize; 4] = image
            .shape()
            .try_into()
            .map_err(|_| shape_err("sample", format!("the VAE output {:?} is not NCHW", image.shape())))?;
        let rgb = to_rgb8(&image.to_f32(gpu).await?, dims)?;
        // [1, H, W, C] with C = 3 for Stable Diffusion VAEs.
        if dims[1] != 3 {
            return Err(shape_err("sample", format!("the VAE makes {} channels, not RGB", dims[1])));
        }
        Ok((dims[3], dims[2], rgb))
    }
}
