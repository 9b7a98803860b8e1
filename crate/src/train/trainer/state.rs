//! Checkpoints of a run and the finished adapter.
//!
//! A checkpoint ([`Trainer::save_state`]) is a safetensors file of f32 tensors: every trainable
//! tensor under its kohya name (`lora_unet_<module>.lora_down.weight` / `.lora_up.weight`, and
//! `lora_te_…` when the text encoder trains) and
//! AdamW's moments as `adamw.exp_avg.<name>` / `adamw.exp_avg_sq.<name>`; its metadata entry
//! [`STATE_KEY`] holds JSON with the format ([`STATE_FORMAT`]), the steps done, the run's
//! [`TrainConfig`] (seed included: every random number of the remaining steps derives from it),
//! the datasets' fingerprint and the loss average. [`Trainer::load_state`] refuses a checkpoint
//! of other settings or other data, naming what differs.
//!
//! The export ([`Trainer::export`]) is a kohya LoRA file written by
//! [`crate::train::export::export_kohya`] with the metadata of [`Trainer::training_record`].

use super::batch::sample_rng;
use super::progress::LossAverage;
use super::{TrainConfig, Trainer};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::io::safetensors::SafetensorsFile;
use crate::io::safetensors_write::to_bytes;
use crate::lora::{HostTensor, LayerShape};
use crate::model::backward::{LoraKind, Targets};
use crate::sampler::PredictionType;
use crate::train::data::{Augment, Dataset};
use crate::train::export::{export_kohya_with, py_f64, BundledEmbedding, ExportDtype, TrainedLayer, TrainingRecord};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The metadata key of a checkpoint's JSON.
pub const STATE_KEY: &str = "loralab_train_state";
/// The checkpoint format this engine writes and reads.
pub const STATE_FORMAT: &str = "loralab-train-state/1";

#[derive(Serialize, Deserialize)]
struct StateJson {
    format: String,
    step: u64,
    config: TrainConfig,
    data: String,
    loss_average: LossAverage,
}

/// SHA-256 over what the datasets train on: per dataset its resolution and flip setting, per
/// image its name, caption, repeats and centre-cropped pixels.
pub(super) fn fingerprint(train: &Dataset, reg: Option<&Dataset>) -> Result<String> {
    let mut h = Sha256::new();
    for d in std::iter::once(train).chain(reg) {
        h.update(format!("dataset {} {}\n", d.options.resolution, d.options.flip).as_bytes());
        for (i, item) in d.items.iter().enumerate() {
            h.update(format!("{}\n{}\n{}\n", item.file, item.caption, item.repeats).as_bytes());
            let a = d.augment(i, 0, 0);
            let px = d.image(i, Augment { flip: false, ..a })?;
            h.update(bytemuck::cast_slice(&px));
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn bad(file: &str, tensor: Option<&str>, message: impl Into<String>) -> Error {
    Error::Format { file: file.to_string(), tensor: tensor.map(str::to_string), message: message.into() }
}

impl Trainer {
    /// The run's state after [`Self::steps_done`] steps, as a safetensors file.
    pub async fn save_state(&self, gpu: &Gpu) -> Result<Vec<u8>> {
        let groups = self.groups();
        let mut values: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::with_capacity(3 * groups.len());
        for (t, (m, v), _) in &groups {
            let shape = t.param.shape().to_vec();
            values.push((t.name.clone(), shape.clone(), t.param.to_f32(gpu).await?));
            values.push((format!("adamw.exp_avg.{}", t.name), shape.clone(), m.to_f32(gpu).await?));
            values.push((format!("adamw.exp_avg_sq.{}", t.name), shape, v.to_f32(gpu).await?));
        }
        let json = StateJson {
            format: STATE_FORMAT.into(),
            step: self.step,
            config: self.config.clone(),
            data: self.fingerprint.clone(),
            loss_average: self.loss_avg,
        };
        let text = serde_json::to_string(&json).map_err(|e| Error::Invalid(format!("writing the training state: {e}")))?;
        let meta = BTreeMap::from([(STATE_KEY.to_string(), text)]);
        let refs: Vec<(&str, safetensors::Dtype, &[usize], &[f32])> =
            values.iter().map(|(n, s, v)| (n.as_str(), safetensors::Dtype::F32, s.as_slice(), v.as_slice())).collect();
        to_bytes(&refs, &meta)
    }

    /// Continues from a checkpoint of [`Self::save_state`] (`file` names it in errors): the
    /// adapters, the optimizer state and the step. The run's settings and data must be those
    /// the checkpoint was made with.
    pub fn load_state(&mut self, gpu: &Gpu, bytes: &[u8], file: &str) -> Result<()> {
        let f = SafetensorsFile::open(bytes, file)?;
        let text = f.metadata().get(STATE_KEY).ok_or_else(|| {
            bad(file, None, format!("is not a training checkpoint (no `{STATE_KEY}` metadata); pass the state file the run saved, not the exported LoRA"))
        })?;
        let s: StateJson = serde_json::from_str(text)
            .map_err(|e| bad(file, None, format!("its `{STATE_KEY}` metadata does not parse ({e})")))?;
        if s.format != STATE_FORMAT {
            return Err(bad(file, None, format!("checkpoint format `{}`; this engine reads `{STATE_FORMAT}`", s.format)));
        }
        let diff = self.config.mismatches(&s.config);
        if !diff.is_empty() {
            return Err(bad(
                file,
                None,
                format!(
                    "was saved with other training settings (this run vs the checkpoint: {}); resume with the settings it was made with",
                    diff.join("; ")
                ),
            ));
        }
        if s.data != self.fingerprint {
            return Err(bad(file, None, "was trained on other images or captions than this run's; resume with the same dataset"));
        }
        if s.step > self.config.steps {
            return Err(bad(file, None, format!("holds {} steps, more than this run's {}", s.step, self.config.steps)));
        }
        let groups = self.groups();
        // Read and check everything before writing anything.
        let mut values = Vec::with_capacity(3 * groups.len());
        for (t, _, _) in &groups {
            for name in [t.name.clone(), format!("adamw.exp_avg.{}", t.name), format!("adamw.exp_avg_sq.{}", t.name)] {
                let e = f.get(&name).ok_or_else(|| {
                    bad(file, Some(&name), "is missing: the checkpoint was made for other adapter layers")
                })?;
                if e.shape != t.param.shape() {
                    return Err(bad(file, Some(&name), format!("has shape {:?}, this run's is {:?}", e.shape, t.param.shape())));
                }
                let v = f.read_f32(&name)?;
                if let Some(x) = v.iter().find(|x| !x.is_finite()) {
                    return Err(bad(file, Some(&name), format!("holds {x}")));
                }
                values.push(v);
            }
        }
        let mut it = values.iter();
        for (t, (m, v), _) in &groups {
            for dst in [t.param, m, v] {
                let src = it.next().ok_or_else(|| bad(file, None, "fewer tensors than adapter layers"))?;
                gpu.write(dst.buffer(), 0, bytemuck::cast_slice(src))?;
            }
        }
        drop(groups);
        self.step = s.step;
        self.loss_avg = s.loss_average;
        Ok(())
    }

    /// The adapters as exportable layers (values read back from the GPU).
    pub async fn trained_layers(&self, gpu: &Gpu) -> Result<Vec<TrainedLayer>> {
        let mut out = vec![];
        let te = self.te.as_ref().map(|t| t.params().layers()).unwrap_or_default();
        for l in self.train.params().layers().iter().chain(te) {
            let (d, u) = (l.down.shape().to_vec(), l.up.shape().to_vec());
            let (rank, cin, cout) = (d[0], d.get(1).copied().unwrap_or(0), u[0]);
            let shape = match l.kind {
                LoraKind::Linear => LayerShape::Linear { in_features: cin, out_features: cout },
                LoraKind::Pointwise => LayerShape::Conv { in_channels: cin, out_channels: cout, kernel: 1 },
                LoraKind::Conv { kernel, .. } => LayerShape::Conv { in_channels: cin, out_channels: cout, kernel },
            };
            let down_shape = match l.kind {
                LoraKind::Conv { .. } => d.clone(),
                _ => vec![rank, cin],
            };
            out.push(TrainedLayer {
                target: l.target,
                module: l.module.clone(),
                shape,
                down: HostTensor::new(down_shape, l.down.to_f32(gpu).await?)?,
                up: HostTensor::new(vec![cout, rank], l.up.to_f32(gpu).await?)?,
                alpha: l.alpha,
            });
        }
        Ok(out)
    }

    /// The kohya metadata of this run so far; the caller adds what the trainer does not know:
    /// `output_name`, `sd_model_name` / `sd_model_hashes`, the start and finish times.
    pub fn training_record(&self) -> TrainingRecord {
        let c = &self.config;
        let mut r = TrainingRecord {
            v2: self.unet.cross_attention_dim() == 1024,
            v_parameterization: self.noise.prediction == PredictionType::VPrediction,
            network_dim: c.rank as u32,
            network_alpha: c.alpha,
            learning_rate: c.lr,
            unet_lr: Some(c.lr),
            text_encoder_lr: c.te_lr,
            train_text_encoder: c.te_lr.is_some(),
            trigger_lr: c.trigger_lr,
            lr_scheduler: c.schedule.clone(),
            lr_warmup_steps: c.warmup_steps.min(u32::MAX as u64) as u32,
            max_train_steps: c.steps.min(u32::MAX as u64) as u32,
            steps: self.step.min(u32::MAX as u64) as u32,
            batch_size: c.batch as u32,
            gradient_accumulation_steps: c.grad_accum as u32,
            gradient_checkpointing: c.checkpointing,
            optimizer: format!(
                "torch.optim.adamw.AdamW(weight_decay={},betas=({}, {}),eps={})",
                py_f64(c.weight_decay),
                py_f64(c.beta1),
                py_f64(c.beta2),
                py_f64(c.eps)
            ),
            max_grad_norm: c.max_grad_norm as f64,
            seed: c.seed,
            clip_skip: (c.clip_skip > 0).then_some(c.clip_skip as u32 + 1),
            prior_loss_weight: c.prior_weight as f64,
            cache_latents: true,
            session_id: sample_rng(c.seed, u64::MAX, 0).next_u64() as u32,
            ..TrainingRecord::default()
        };
        if c.target_set().ok() == Some(Targets::AttnFfConv) {
            r.conv_dim = Some(c.conv_rank as u32);
            r.conv_alpha = Some(c.conv_alpha);
        }
        r.set_datasets(&self.train_set.dataset, self.reg_set.as_ref().map(|s| &s.dataset));
        let per_epoch = self.train_set.dataset.num_train_images().max(1) as u64;
        let seen = |steps: u64| (steps * c.images_per_step()).div_ceil(per_epoch).max(1);
        r.num_epochs = seen(c.steps).min(u32::MAX as u64) as u32;
        r.epoch = seen(self.step).min(u32::MAX as u64) as u32;
        r
    }

    /// The adapters as a kohya LoRA file with `record`'s metadata (see
    /// [`Self::training_record`]).
    pub async fn export(&self, gpu: &Gpu, record: &TrainingRecord, dtype: ExportDtype) -> Result<Vec<u8>> {
        let emb: Vec<BundledEmbedding> = self.trigger_embedding(gpu).await?.into_iter().collect();
        export_kohya_with(&self.trained_layers(gpu).await?, &emb, record, dtype)
    }

    /// The learned trigger token ([`TrainConfig::trigger_lr`]), `None` when the run does not
    /// train it. [`crate::train::export::export_embedding`] writes it as a file of its own.
    pub async fn trigger_embedding(&self, gpu: &Gpu) -> Result<Option<BundledEmbedding>> {
        let Some(t) = self.te.as_ref().and_then(|te| te.trigger.as_ref()) else { return Ok(None) };
        let (shape, values) = t.vectors(gpu).await?;
        Ok(Some(BundledEmbedding { name: t.word.clone(), shape: [shape[0], shape[1]], values }))
    }
}
