//! The LoRA training loop: kohya-style adapters on a frozen Stable Diffusion 1.x/2.x UNet,
//! trained step by step on the GPU ([`Trainer::step`]), so a native command line and a web
//! Worker drive the same code. Nothing here reads files, starts threads or reads a clock: the
//! model comes as a [`Checkpoint`] over any [`RangeRead`], datasets as [`Dataset`]s, checkpoints
//! as bytes, and the caller times the steps.
//!
//! [`Trainer::new`] caches, once:
//! - each image's VAE posterior `N(mean, std²)` (and the mirrored image's when the dataset
//!   flips), on the host. Every step draws a fresh latent `mean + std·ε` from it with the
//!   sample's own seeded generator (as training without a latent cache does), where kohya
//!   caches one draw per image; the draw is scaled as the pipeline scales latents
//!   (`(z − shift_factor)·scaling_factor`);
//! - the prompt embeddings of every caption, with the run's `clip_skip`, and those of the
//!   sample prompts; the text encoder is then released, unless it is trained too
//!   ([`TrainConfig::te_lr`], see [`text`]): then each micro-batch encodes its captions.
//!
//! Each optimizer step ([`Trainer::step`]) runs `grad_accum` micro-batches of `batch` training
//! images (plus as many regularization images with prior preservation), each sample drawn as
//! described in [`batch`]: a timestep uniform over the `num_train_timesteps` of the model's
//! scheduler config, the noisy latent `sqrt(ᾱ_t)·z + sqrt(1 − ᾱ_t)·ε`, the target ε (or
//! `v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·z` for `prediction_type: v_prediction`), the MSE loss
//! (weighted by the prior weight for regularization images, divided by the accumulation
//! count), the [`TrainUNet`] backward into the adapters' gradients, then the global gradient
//! norm, clipping folded into AdamW, and one AdamW step at the schedule's learning rate.
//!
//! Determinism: all randomness derives from the seed and the sample's index, every GPU
//! reduction sums in a fixed order, and the host arithmetic is sequential, so a run repeats bit
//! for bit on one device, and a run resumed from a checkpoint ([`Trainer::save_state`] /
//! [`Trainer::load_state`]: adapters, AdamW moments, the step) continues exactly as the
//! uninterrupted run. K micro-batches of `b` train on the same samples as one batch of `K·b`;
//! the gradients agree up to the order the batch's contributions are summed in.
//!
//! Submodules: `config` (settings), `batch` (data and loss), `state` (checkpoints and export),
//! `sample` (progress images), `progress` (loss average, throughput), `text` (training the text
//! encoder).

mod batch;
mod config;
mod progress;
mod sample;
mod state;
mod text;

pub use config::{without_trigger, SampleSettings, TrainConfig, SCHEDULES};
pub use progress::{format_duration, LossAverage, Throughput};
pub use sample::SampleImage;
pub use state::{STATE_FORMAT, STATE_KEY};

use self::batch::{loss_and_grad, NoiseSchedule, Sample, Split, REG_STREAM, TRAIN_STREAM};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::io::RangeRead;
use crate::model::backward::{LoraParams, Trainable, TrainOptions, TrainUNet};
use crate::model::checkpoint::Checkpoint;
use crate::model::clip::{ClipTextModel, EncodeOpts};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::{AutoencoderKL, VaeParts};
use crate::ops::grad::optim::{adamw_step, grad_norm, AdamW, Clip, LrSchedule};
use crate::pipeline::{token_table_dtype, WeightPlan};
use crate::sampler::config::BetaSchedule;
use crate::sampler::schedule::{alphas_cumprod, betas, rescale_zero_terminal_snr};
use crate::sampler::{PredictionType, SamplerConfig};
use crate::tensor::Tensor;
use crate::train::data::{CropMode, Dataset};

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Optimizer steps done, this one included.
    pub step: u64,
    /// The step's loss (the mean over its micro-batches).
    pub loss: f64,
    /// [`LossAverage`] after this step.
    pub loss_avg: f64,
    /// The learning rate this step used.
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f32,
}

/// A training run in progress.
pub struct Trainer {
    config: TrainConfig,
    schedule: LrSchedule,
    adamw: AdamW,
    unet: UNet2DConditionModel,
    train: TrainUNet,
    /// AdamW's `exp_avg` and `exp_avg_sq` per trainable tensor, in [`LoraParams::trainable`] order.
    moments: Vec<(Tensor, Tensor)>,
    /// The text encoder with its adapters when it is trained.
    te: Option<text::TextTraining>,
    noise: NoiseSchedule,
    scheduler: SamplerConfig,
    /// (scaling_factor, shift_factor) of the VAE.
    scaling: (f32, f32),
    train_set: Split,
    reg_set: Option<Split>,
    /// `[C, h, w]` of one latent.
    latent_shape: [usize; 3],
    /// `[tokens, dim]` of one prompt embedding.
    embed_shape: [usize; 2],
    step: u64,
    loss_avg: LossAverage,
    samples: Option<sample::Sampling>,
    fingerprint: String,
}

/// The training noise schedule of a scheduler config (DDPMScheduler's defaults for absent keys).
fn noise_schedule(c: &SamplerConfig) -> Result<NoiseSchedule> {
    let n = c.num_train_timesteps.unwrap_or(1000);
    if n == 0 {
        return Err(Error::Invalid("scheduler config: num_train_timesteps must be at least 1".into()));
    }
    let trained = c.trained_betas.as_deref();
    if trained.is_some_and(|t| t.len() != n) {
        return Err(Error::Invalid(format!("scheduler config: trained_betas must have num_train_timesteps = {n} values")));
    }
    let b = betas(c.beta_schedule.unwrap_or(BetaSchedule::Linear), c.beta_start.unwrap_or(1e-4), c.beta_end.unwrap_or(0.02), n, trained);
    let b = if c.rescale_betas_zero_snr == Some(true) { rescale_zero_terminal_snr(&b) } else { b };
    let prediction = c.prediction_type.unwrap_or(PredictionType::Epsilon);
    if prediction == PredictionType::Sample {
        return Err(Error::Invalid("scheduler config: prediction_type `sample` is not supported for training (epsilon or v_prediction)".into()));
    }
    Ok(NoiseSchedule { alphas_cumprod: alphas_cumprod(&b), prediction })
}

/// `[tokens, dim]` embeddings of each text, encoded in batches of 8.
fn encode_texts(gpu: &Gpu, te: &ClipTextModel, tok: &ClipTokenizer, texts: &[&str], clip_skip: usize) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(8) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|t| tok.encode_padded(t)).collect();
        let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        out.push(te.encode(gpu, &rows, EncodeOpts::clip_skip(clip_skip))?);
    }
    Ok(out)
}

async fn read_rows(gpu: &Gpu, batches: Vec<Tensor>, per: usize) -> Result<Vec<Vec<f32>>> {
    let mut out = vec![];
    for b in batches {
        out.extend(b.to_f32(gpu).await?.chunks(per).map(<[f32]>::to_vec));
    }
    Ok(out)
}

impl Trainer {
    /// Loads the model (`plan` storage; the VAE with its encoder), caches the datasets'
    /// posteriors and prompt embeddings and the sample prompts' embeddings, and creates the
    /// adapters (kohya's initialisation, B = 0) and the optimizer state.
    pub async fn new<R: RangeRead>(
        gpu: &Gpu,
        ck: &Checkpoint<R>,
        plan: WeightPlan,
        train: Dataset,
        reg: Option<Dataset>,
        config: TrainConfig,
        samples: SampleSettings,
    ) -> Result<Trainer> {
        config.validate()?;
        let c = &ck.config;
        if c.unet.time_cond_proj_dim.is_some() {
            return Err(Error::Invalid(
                "this UNet takes a guidance embedding (time_cond_proj_dim, an LCM-distilled model); train on its base model instead".into(),
            ));
        }
        let noise = noise_schedule(&c.scheduler)?;
        let res = train.options.resolution as usize;
        for d in std::iter::once(&train).chain(reg.as_ref()) {
            if d.options.crop == CropMode::Random {
                return Err(Error::Invalid(
                    "random crops cannot be used: latents are cached once per image; use centre crops".into(),
                ));
            }
            if d.options.resolution as usize != res {
                return Err(Error::Invalid(format!(
                    "the regularization images' resolution {} differs from the training images' {res}",
                    d.options.resolution
                )));
            }
        }
        if reg.is_some() && config.prior_weight == 0.0 {
            return Err(Error::Invalid("regularization images with prior weight 0 would not be trained on; give a prior weight > 0".into()));
        }
        let fingerprint = state::fingerprint(&train, reg.as_ref())?;

        // Prompt embeddings, then the text encoder goes.
        let te_config = &c.text_encoder;
        let table = token_table_dtype(te_config, gpu.caps().max_storage_buffer_binding_size);
        let te = ClipTextModel::load_with_table(gpu, te_config, &ck.text_encoder, plan.text_encoder, table)?;
        let embed_shape = [ck.tokenizer.max_length(), te_config.hidden_size];
        let per = embed_shape[0] * embed_shape[1];
        let captions: Vec<&str> = train.items.iter().map(|i| i.caption.as_str()).collect();
        let train_embeds = read_rows(gpu, encode_texts(gpu, &te, &ck.tokenizer, &captions, config.clip_skip)?, per).await?;
        let reg_embeds = match &reg {
            Some(r) => {
                let caps: Vec<&str> = r.items.iter().map(|i| i.caption.as_str()).collect();
                read_rows(gpu, encode_texts(gpu, &te, &ck.tokenizer, &caps, config.clip_skip)?, per).await?
            }
            None => vec![],
        };
        let mut prompts: Vec<&str> = samples.prompts.iter().map(String::as_str).collect();
        prompts.push(&samples.negative);
        let sample_embeds = if samples.prompts.is_empty() {
            vec![]
        } else {
            read_rows(gpu, encode_texts(gpu, &te, &ck.tokenizer, &prompts, config.clip_skip)?, per).await?
        };
        let te = match config.te_lr.or(config.trigger_lr) {
            Some(_) => {
                let reg_caps: Vec<&str> = reg.iter().flat_map(|r| r.items.iter().map(|i| i.caption.as_str())).collect();
                let caps = [captions.as_slice(), reg_caps.as_slice()];
                let trigger = train.options.trigger.clone();
                Some(text::TextTraining::new(gpu, te, &ck.tokenizer, &config, &trigger, caps, &prompts).await?)
            }
            None => {
                drop(te);
                gpu.trim();
                None
            }
        };

        // Posteriors; the VAE stays only when samples are asked for.
        let vae = AutoencoderKL::load(gpu, &c.vae, &ck.vae, plan.vae, VaeParts::Both)?;
        let scaling = (c.vae.scaling_factor as f32, c.vae.shift_factor.unwrap_or(0.0) as f32);
        let train_set = Split::encode(gpu, &vae, train, train_embeds, TRAIN_STREAM).await?;
        let reg_set = match reg {
            Some(r) => Some(Split::encode(gpu, &vae, r, reg_embeds, REG_STREAM).await?),
            None => None,
        };
        let f = vae.downscale();
        let latent_shape = [c.vae.latent_channels, res / f, res / f];
        if train_set.latent_len() != latent_shape.iter().product::<usize>() {
            return Err(Error::Invalid(format!(
                "the VAE encodes {res}x{res} images to {} values, not {latent_shape:?}",
                train_set.latent_len()
            )));
        }
        let samples = match sample_embeds.split_last() {
            Some((negative, prompts)) => {
                Some(sample::Sampling::new(vae, samples, prompts.to_vec(), negative.clone(), embed_shape))
            }
            None => {
                drop(vae);
                gpu.trim();
                None
            }
        };

        let mut unet = UNet2DConditionModel::load(gpu, &c.unet, &ck.unet, plan.unet)?;
        let m = unet.size_multiple();
        if !latent_shape[1].is_multiple_of(m) {
            return Err(Error::Invalid(format!(
                "training resolution {res}: the latents ({}x{}) must be a multiple of {m} for this UNet (use a resolution that is a multiple of {})",
                latent_shape[1],
                latent_shape[2],
                m * f
            )));
        }
        let params = LoraParams::new(gpu, &mut unet, &config.lora()?)?;
        let train = TrainUNet::new(&mut unet, params)?;
        let moments = train
            .params()
            .trainable()
            .iter()
            .map(|t| Ok((Tensor::zeros(gpu, t.param.shape())?, Tensor::zeros(gpu, t.param.shape())?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Trainer {
            schedule: config.lr_schedule()?,
            adamw: config.adamw(),
            config,
            unet,
            train,
            moments,
            te,
            noise,
            scheduler: c.scheduler.clone(),
            scaling,
            train_set,
            reg_set,
            latent_shape,
            embed_shape,
            step: 0,
            loss_avg: LossAverage::default(),
            samples,
            fingerprint,
        })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Optimizer steps done.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    pub fn is_finished(&self) -> bool {
        self.step >= self.config.steps
    }

    pub fn params(&self) -> &LoraParams {
        self.train.params()
    }

    /// The text encoder's adapters when it is trained ([`TrainConfig::te_lr`]).
    pub fn text_encoder_params(&self) -> Option<&LoraParams> {
        self.te.as_ref().map(|t| t.params())
    }

    /// Every trainable tensor (the UNet's, then the text encoder's, then the trigger token's)
    /// with its AdamW moments and
    /// its parameter group's base learning rate.
    fn groups(&self) -> Vec<(Trainable<'_>, &(Tensor, Tensor), f64)> {
        let unet = self.train.params().trainable().into_iter().zip(&self.moments).map(|(t, m)| (t, m, self.config.lr));
        let te = self.te.iter().flat_map(|te| {
            let lr = self.config.te_lr.unwrap_or(self.config.lr);
            te.params().trainable().into_iter().zip(&te.moments).map(move |(t, m)| (t, m, lr))
        });
        let trigger = self.te.iter().filter_map(|te| te.trigger.as_ref()).map(|t| {
            let lr = self.config.trigger_lr.unwrap_or(self.config.lr);
            (Trainable { name: t.state_name(), param: &t.table, grad: &t.grad }, &t.moments, lr)
        });
        unet.chain(te).chain(trigger).collect()
    }

    pub fn dataset(&self) -> &Dataset {
        &self.train_set.dataset
    }

    pub fn regularization(&self) -> Option<&Dataset> {
        self.reg_set.as_ref().map(|s| &s.dataset)
    }

    /// The learning rate of the next step.
    pub fn next_lr(&self) -> f64 {
        self.schedule.lr(self.config.lr, self.step)
    }

    /// GPU bytes of the adapters, their gradients and the optimizer state.
    pub fn state_bytes(&self) -> u64 {
        let te = self.te.as_ref().map_or(0, |t| t.bytes());
        self.train.params().bytes() + self.moments.iter().map(|(m, v)| m.bytes() + v.bytes()).sum::<u64>() + te
    }

    /// The samples of micro-batch `k` of the current step.
    fn micro_batch(&mut self, k: usize) -> Result<Vec<Sample>> {
        let (n, acc, seed) = (self.config.batch as u64, self.config.grad_accum as u64, self.config.seed);
        let first = (self.step * acc + k as u64) * n;
        let mut out = Vec::with_capacity(2 * n as usize);
        for i in first..first + n {
            out.push(self.train_set.draw(i, seed, &self.noise, self.scaling, 1.0)?);
        }
        if let Some(reg) = &mut self.reg_set {
            for i in first..first + n {
                out.push(reg.draw(i, seed, &self.noise, self.scaling, self.config.prior_weight)?);
            }
        }
        Ok(out)
    }

    /// One optimizer step: `grad_accum` micro-batches forward and backward, gradient clipping
    /// and AdamW. Errors when the loss stops being finite (the run diverged).
    pub async fn step(&mut self, gpu: &Gpu) -> Result<StepReport> {
        if self.is_finished() {
            return Err(Error::Invalid(format!("training is finished: {} of {} steps done", self.step, self.config.steps)));
        }
        let lr = self.next_lr();
        let opts = TrainOptions { checkpointing: self.config.checkpointing };
        let [c, h, w] = self.latent_shape;
        let per = self.embed_shape[0] * self.embed_shape[1];
        self.train.params().zero_grads(gpu);
        if let Some(te) = &self.te {
            te.zero_grads(gpu);
        }
        let mut loss = 0.0;
        for k in 0..self.config.grad_accum {
            let samples = self.micro_batch(k)?;
            let b = samples.len();
            let mut x = Vec::with_capacity(b * c * h * w);
            let mut ctx = Vec::with_capacity(b * per);
            for s in &samples {
                x.extend_from_slice(&s.noisy);
                let split = if s.stream == REG_STREAM { self.reg_set.as_ref().unwrap_or(&self.train_set) } else { &self.train_set };
                let e = split.embeds.get(s.image).ok_or_else(|| Error::Invalid(format!("image {} has no prompt embedding", s.image)))?;
                ctx.extend_from_slice(e);
            }
            let ts: Vec<f32> = samples.iter().map(|s| s.timestep as f32).collect();
            let sample = Tensor::from_f32(gpu, &[b, c, h, w], &x)?;
            let rows = match &self.te {
                Some(te) => samples.iter().map(|s| te.ids(s.stream, s.image)).collect::<Result<Vec<_>>>()?,
                None => vec![],
            };
            let (context, te_tape) = match &self.te {
                Some(te) => {
                    let (context, tape) = te.encode(gpu, &rows, opts)?;
                    (context, Some(tape))
                }
                None => (Tensor::from_f32(gpu, &[b, self.embed_shape[0], self.embed_shape[1]], &ctx)?, None),
            };
            let (pred, tape) = self.train.forward(gpu, &sample, &ts, &context, None, opts)?;
            drop((sample, context));
            let p = pred.to_f32(gpu).await?;
            let shape = pred.shape().to_vec();
            drop(pred);
            let (l, grad) = loss_and_grad(&p, &samples, self.config.batch, self.config.grad_accum)?;
            if !l.is_finite() {
                return Err(Error::Invalid(format!(
                    "the loss became {l} at step {}: training diverged; lower the learning rate (now {lr:e})",
                    self.step + 1
                )));
            }
            loss += l / self.config.grad_accum as f64;
            let g = Tensor::from_f32(gpu, &shape, &grad)?;
            match (&self.te, te_tape) {
                (Some(te), Some(te_tape)) => {
                    let d_context = self.train.backward_with_context_grad(gpu, tape, &g)?;
                    drop(g);
                    te.backward(gpu, te_tape, &rows, &d_context).await?;
                }
                _ => self.train.backward(gpu, tape, &g)?,
            }
        }
        let groups = self.groups();
        let grads: Vec<&Tensor> = groups.iter().map(|(t, _, _)| t.grad).collect();
        let norm = grad_norm(gpu, &grads)?;
        let clip = (self.config.max_grad_norm > 0.0).then_some(Clip { norm: &norm, max_norm: self.config.max_grad_norm });
        for (t, (m, v), base) in &groups {
            let lr = self.schedule.lr(*base, self.step);
            adamw_step(gpu, &self.adamw, lr, self.step + 1, t.param, t.grad, m, v, clip)?;
        }
        drop(groups);
        let grad_norm = norm.to_f32(gpu).await?.first().copied().unwrap_or(f32::NAN);
        self.step += 1;
        self.loss_avg.add(loss);
        Ok(StepReport { step: self.step, loss, loss_avg: self.loss_avg.value(), lr, grad_norm })
    }
}
