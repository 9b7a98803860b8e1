//! What a training run records in its LoRA file: kohya sd-scripts' `ss_*` metadata (the
//! entries `train_network.py` writes, formatted as it formats them: every value `str()`-ed,
//! JSON entries `json.dumps`-ed) and Stability's `modelspec.*` (ModelSpec 1.0.1, as kohya's
//! `sai_model_spec.py` fills it for an SD1.x LoRA).

use super::pyfmt::{iso_date, py_bool, py_f32, py_f64, py_json, py_opt};
use crate::train::data::{Dataset, DirInfo};
use serde::Serialize;
use std::collections::BTreeMap;

/// The base model's hashes as A1111 and kohya compute them from its file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModelHashes {
    /// SHA-256 of the whole file (`ss_new_sd_model_hash`, A1111's "AutoV2" is its first 10
    /// characters).
    pub sha256: String,
    /// A1111's old hash: SHA-256 of the 64 KiB at offset 1 MiB, first 8 characters
    /// (`ss_sd_model_hash`).
    pub legacy: String,
}

/// Everything about a training run the exported file records. `Default` is a plain
/// kohya-like SD1.x run; fill what the run did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrainingRecord {
    /// `ss_output_name`, `modelspec.title`: the file's name without extension.
    pub output_name: String,
    /// `ss_training_comment`.
    pub training_comment: Option<String>,
    /// `ss_sd_model_name`: the base model's file (or folder) name, without directories.
    pub sd_model_name: Option<String>,
    /// `ss_new_sd_model_hash`, `ss_sd_model_hash`, when the base model is one file.
    pub sd_model_hashes: Option<ModelHashes>,
    /// `ss_v2` (Stable Diffusion 2.x base).
    pub v2: bool,
    /// v-prediction base (`ss_base_model_version` `sd_v2_v`, `modelspec.prediction_type` `v`).
    pub v_parameterization: bool,
    /// `ss_network_dim`: rank of the linear (and 1×1 convolution) layers.
    pub network_dim: u32,
    /// `ss_network_alpha`.
    pub network_alpha: f32,
    /// LoCon: rank and alpha of k×k convolutions (`ss_network_args` `conv_dim` / `conv_alpha`).
    pub conv_dim: Option<u32>,
    pub conv_alpha: Option<f32>,
    /// `ss_learning_rate`: the default rate.
    pub learning_rate: f64,
    /// `ss_unet_lr`, `ss_text_encoder_lr` (`None`: the default rate; `Some(0.0)` with
    /// `train_text_encoder` false for a UNet-only run is also fine).
    pub unet_lr: Option<f64>,
    pub text_encoder_lr: Option<f64>,
    /// Whether the text encoder was trained (its layers are in the file).
    pub train_text_encoder: bool,
    /// The learning rate of the trigger word's learned embedding (bundled in the file), as
    /// `loralab_trigger_lr`; `None` when the word was not learned.
    pub trigger_lr: Option<f64>,
    /// `ss_lr_scheduler` (diffusers' names: `constant`, `constant_with_warmup`, `linear`,
    /// `cosine`, `cosine_with_restarts`, `polynomial`).
    pub lr_scheduler: String,
    pub lr_warmup_steps: u32,
    /// `ss_max_train_steps`.
    pub max_train_steps: u32,
    /// `ss_steps`: steps done when the file was written.
    pub steps: u32,
    /// `ss_num_epochs` and `ss_epoch` (the epoch the file was written in).
    pub num_epochs: u32,
    pub epoch: u32,
    /// `ss_batch_size_per_device`.
    pub batch_size: u32,
    pub gradient_accumulation_steps: u32,
    pub gradient_checkpointing: bool,
    /// `ss_optimizer`, as kohya names it: the class path plus arguments
    /// (`torch.optim.adamw.AdamW(weight_decay=0.01)`).
    pub optimizer: String,
    /// `ss_max_grad_norm` (0: no clipping).
    pub max_grad_norm: f64,
    /// `ss_mixed_precision`: `no`, `fp16` or `bf16`.
    pub mixed_precision: String,
    pub seed: u64,
    /// `ss_clip_skip` (`None`: the last layer).
    pub clip_skip: Option<u32>,
    pub noise_offset: Option<f64>,
    pub min_snr_gamma: Option<f64>,
    pub prior_loss_weight: f64,
    /// `ss_cache_latents`.
    pub cache_latents: bool,
    /// `ss_resolution` and `modelspec.resolution`.
    pub resolution: u32,
    pub flip_aug: bool,
    pub random_crop: bool,
    /// `ss_num_train_images` (images × repeats), `ss_num_reg_images`.
    pub num_train_images: usize,
    pub num_reg_images: usize,
    /// `ss_tag_frequency`: per kohya folder, tag → count.
    pub tag_frequency: BTreeMap<String, BTreeMap<String, u64>>,
    /// `ss_dataset_dirs`, `ss_reg_dataset_dirs`.
    pub dataset_dirs: BTreeMap<String, DirInfo>,
    pub reg_dataset_dirs: BTreeMap<String, DirInfo>,
    /// `ss_training_started_at`, `ss_training_finished_at`: Unix seconds (the caller's clock:
    /// the browser has no system time in wasm32). `modelspec.date` is the finish time (UTC).
    pub training_started_at: f64,
    pub training_finished_at: f64,
    /// `ss_session_id`: a random number kohya uses to group the epochs of one run.
    pub session_id: u32,
    /// `modelspec.trigger_phrase` (the trigger word), `modelspec.description`,
    /// `modelspec.author`, `modelspec.license`, `modelspec.tags`.
    pub trigger_phrase: Option<String>,
    pub description: Option<String>,
    pub author: Option<String>,
    pub license: Option<String>,
    pub tags: Option<String>,
    /// `modelspec.implementation_version`: the software that wrote the file
    /// (`loralab/<version>`; kohya writes `sd-scripts/<commit>`).
    pub software: String,
}

impl Default for TrainingRecord {
    fn default() -> Self {
        TrainingRecord {
            output_name: "lora".into(),
            training_comment: None,
            sd_model_name: None,
            sd_model_hashes: None,
            v2: false,
            v_parameterization: false,
            network_dim: 16,
            network_alpha: 8.0,
            conv_dim: None,
            conv_alpha: None,
            learning_rate: 1e-4,
            unet_lr: None,
            text_encoder_lr: None,
            trigger_lr: None,
            train_text_encoder: false,
            lr_scheduler: "constant".into(),
            lr_warmup_steps: 0,
            max_train_steps: 0,
            steps: 0,
            num_epochs: 1,
            epoch: 1,
            batch_size: 1,
            gradient_accumulation_steps: 1,
            gradient_checkpointing: false,
            optimizer: "torch.optim.adamw.AdamW".into(),
            max_grad_norm: 1.0,
            mixed_precision: "no".into(),
            seed: 0,
            clip_skip: None,
            noise_offset: None,
            min_snr_gamma: None,
            prior_loss_weight: 1.0,
            cache_latents: true,
            resolution: 512,
            flip_aug: false,
            random_crop: false,
            num_train_images: 0,
            num_reg_images: 0,
            tag_frequency: BTreeMap::new(),
            dataset_dirs: BTreeMap::new(),
            reg_dataset_dirs: BTreeMap::new(),
            training_started_at: 0.0,
            training_finished_at: 0.0,
            session_id: 0,
            trigger_phrase: None,
            description: None,
            author: None,
            license: None,
            tags: None,
            software: format!("loralab/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

fn dirs_json(dirs: &BTreeMap<String, DirInfo>) -> String {
    let m: serde_json::Map<String, serde_json::Value> = dirs
        .iter()
        .map(|(k, d)| (k.clone(), serde_json::json!({"img_count": d.img_count, "n_repeats": d.n_repeats})))
        .collect();
    py_json(&serde_json::Value::Object(m))
}

impl TrainingRecord {
    /// Fills the dataset entries (image counts, tag frequency, folders, resolution, flip and
    /// crop) from the training dataset and the regularization one.
    pub fn set_datasets(&mut self, train: &Dataset, reg: Option<&Dataset>) {
        self.num_train_images = train.num_train_images();
        self.tag_frequency = train.tag_frequency();
        self.dataset_dirs = train.dataset_dirs();
        self.resolution = train.options.resolution;
        self.flip_aug = train.options.flip;
        self.random_crop = train.options.crop == crate::train::data::CropMode::Random;
        self.num_reg_images = reg.map_or(0, |r| r.num_train_images());
        self.reg_dataset_dirs = reg.map(|r| r.dataset_dirs()).unwrap_or_default();
        if self.trigger_phrase.is_none() && !train.options.trigger.is_empty() {
            self.trigger_phrase = Some(train.options.trigger.clone());
        }
    }

    /// kohya's `ss_base_model_version` (`get_model_version_str_for_sd1_sd2`).
    pub fn base_model_version(&self) -> String {
        let mut s = String::from(if self.v2 { "sd_v2" } else { "sd_v1" });
        if self.v_parameterization {
            s.push_str("_v");
        }
        s
    }

    /// `ss_network_args` as kohya stores the `key=value` network arguments.
    fn network_args(&self) -> Option<String> {
        let mut args = serde_json::Map::new();
        if let Some(d) = self.conv_dim {
            args.insert("conv_dim".into(), d.to_string().into());
            args.insert("conv_alpha".into(), py_f32(self.conv_alpha.unwrap_or(1.0)).into());
        }
        (!args.is_empty()).then(|| py_json(&serde_json::Value::Object(args)))
    }

    /// The `ss_*` and `modelspec.*` entries (without the `sshs_*` hashes of the tensors, which
    /// the exporter adds).
    pub fn metadata(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        let total_batch = self.batch_size.saturating_mul(self.gradient_accumulation_steps.max(1));
        let batches_per_epoch = if self.batch_size == 0 {
            0
        } else {
            // kohya pairs every training image with a regularization image when there are any.
            let per_epoch = if self.num_reg_images > 0 { 2 * self.num_train_images } else { self.num_train_images };
            per_epoch.div_ceil(self.batch_size as usize)
        };
        put("ss_session_id", self.session_id.to_string());
        put("ss_training_started_at", py_f64(self.training_started_at));
        put("ss_training_finished_at", py_f64(self.training_finished_at));
        put("ss_output_name", self.output_name.clone());
        put("ss_learning_rate", py_f64(self.learning_rate));
        put("ss_text_encoder_lr", py_opt(self.text_encoder_lr, py_f64));
        put("ss_unet_lr", py_opt(self.unet_lr, py_f64));
        if let Some(lr) = self.trigger_lr {
            put("loralab_trigger_lr", py_f64(lr));
        }
        put("ss_num_train_images", self.num_train_images.to_string());
        put("ss_num_reg_images", self.num_reg_images.to_string());
        put("ss_num_batches_per_epoch", batches_per_epoch.to_string());
        put("ss_num_epochs", self.num_epochs.to_string());
        put("ss_epoch", self.epoch.to_string());
        put("ss_steps", self.steps.to_string());
        put("ss_gradient_checkpointing", py_bool(self.gradient_checkpointing).into());
        put("ss_gradient_accumulation_steps", self.gradient_accumulation_steps.to_string());
        put("ss_max_train_steps", self.max_train_steps.to_string());
        put("ss_lr_warmup_steps", self.lr_warmup_steps.to_string());
        put("ss_lr_scheduler", self.lr_scheduler.clone());
        put("ss_network_module", "networks.lora".into());
        put("ss_network_dim", self.network_dim.to_string());
        put("ss_network_alpha", py_f32(self.network_alpha));
        put("ss_network_dropout", "None".into());
        if let Some(args) = self.network_args() {
            put("ss_network_args", args);
        }
        put("ss_mixed_precision", self.mixed_precision.clone());
        put("ss_full_fp16", "False".into());
        put("ss_v2", py_bool(self.v2).into());
        put("ss_base_model_version", self.base_model_version());
        put("ss_clip_skip", py_opt(self.clip_skip, |v| v.to_string()));
        put("ss_max_token_length", "None".into());
        put("ss_cache_latents", py_bool(self.cache_latents).into());
        put("ss_seed", self.seed.to_string());
        put("ss_noise_offset", py_opt(self.noise_offset, py_f64));
        put("ss_min_snr_gamma", py_opt(self.min_snr_gamma, py_f64));
        put("ss_training_comment", self.training_comment.clone().unwrap_or_else(|| "None".into()));
        put("ss_optimizer", self.optimizer.clone());
        put("ss_max_grad_norm", py_f64(self.max_grad_norm));
        put("ss_prior_loss_weight", py_f64(self.prior_loss_weight));
        put("ss_loss_type", "l2".into());
        put("ss_caption_dropout_rate", "0.0".into());
        put("ss_batch_size_per_device", self.batch_size.to_string());
        put("ss_total_batch_size", total_batch.to_string());
        put("ss_resolution", format!("({0}, {0})", self.resolution));
        put("ss_color_aug", "False".into());
        put("ss_flip_aug", py_bool(self.flip_aug).into());
        put("ss_random_crop", py_bool(self.random_crop).into());
        put("ss_shuffle_caption", "False".into());
        put("ss_enable_bucket", "False".into());
        put("ss_bucket_no_upscale", "False".into());
        put("ss_min_bucket_reso", "None".into());
        put("ss_max_bucket_reso", "None".into());
        put("ss_keep_tokens", "0".into());
        put("ss_bucket_info", "null".into());
        put("ss_dataset_dirs", dirs_json(&self.dataset_dirs));
        put("ss_reg_dataset_dirs", dirs_json(&self.reg_dataset_dirs));
        let tags: serde_json::Map<String, serde_json::Value> = self
            .tag_frequency
            .iter()
            .map(|(dir, counts)| (dir.clone(), serde_json::json!(counts)))
            .collect();
        put("ss_tag_frequency", py_json(&serde_json::Value::Object(tags)));
        if let Some(name) = &self.sd_model_name {
            put("ss_sd_model_name", name.clone());
        }
        if let Some(h) = &self.sd_model_hashes {
            put("ss_sd_model_hash", h.legacy.clone());
            put("ss_new_sd_model_hash", h.sha256.clone());
        }
        // ModelSpec 1.0.1.
        let arch = match (self.v2, self.v_parameterization) {
            (false, _) => "stable-diffusion-v1",
            (true, false) => "stable-diffusion-v2-512",
            (true, true) => "stable-diffusion-v2-768-v",
        };
        put("modelspec.sai_model_spec", "1.0.1".into());
        put("modelspec.architecture", format!("{arch}/lora"));
        put("modelspec.implementation", "diffusers".into());
        put("modelspec.implementation_version", self.software.clone());
        put("modelspec.title", self.output_name.clone());
        put("modelspec.resolution", format!("{0}x{0}", self.resolution));
        put("modelspec.date", iso_date(self.training_finished_at));
        put("modelspec.prediction_type", if self.v_parameterization { "v" } else { "epsilon" }.into());
        if let Some(c) = self.clip_skip {
            put("modelspec.encoder_layer", c.to_string());
        }
        for (key, v) in [
            ("modelspec.trigger_phrase", &self.trigger_phrase),
            ("modelspec.description", &self.description),
            ("modelspec.author", &self.author),
            ("modelspec.license", &self.license),
            ("modelspec.tags", &self.tags),
        ] {
            if let Some(v) = v.as_ref().filter(|v| !v.is_empty()) {
                put(key, v.clone());
            }
        }
        m
    }
}
