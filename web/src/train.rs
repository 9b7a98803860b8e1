//! Training a LoRA in the Worker: the training loop ([`Trainer`]) driven one optimizer step per
//! call, so the Worker answers other commands (and the page stays responsive) between steps.
//! `www/train-worker.js` keeps the run's files in the Origin Private File System (the dataset's
//! originals, checkpoints, samples) and calls these functions:
//!
//! - [`train_start`]: reads the dataset (each file once), loads the model's parts for training,
//!   optionally continues from a checkpoint;
//! - [`train_step`]: one step, with the loss, learning rate, speed and time left;
//! - [`train_samples`]: the sample prompts (with and without the trigger word) as PNGs;
//! - [`train_save_state`]: a checkpoint's bytes; [`train_export`]: the kohya LoRA file;
//!   [`train_handoff`]: the kohya hand-off zip, written into an OPFS file;
//! - [`train_cancel`]: frees the run.
//!
//! The exported file's metadata records the training dates, the dataset's size and hash, the
//! base model (name, file hashes) and its licence, and that the consent questions were
//! answered; never the images, nor captions beyond kohya's tag counts.

mod data;

use crate::engine::{provenance_now, with_source, Source};
use crate::files::{BlobReader, HandleWriter};
use crate::{gpu, js_error, now, to_js};
use loralab::io::xmp::{AdapterRecord, ModelRecord, Provenance};
use loralab::io::RangeRead;
use loralab::pipeline::WeightPlan;
use loralab::provenance::sha256_hex;
use loralab::sampler::SamplerKind;
use loralab::train::data::DatasetOptions;
use loralab::train::export::{ExportDtype, ModelHashes, TrainingRecord};
use loralab::train::handoff::write_handoff;
use loralab::train::trainer::{format_duration, without_trigger, SampleSettings, Throughput, TrainConfig, Trainer};
use loralab::{DType, Error};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use wasm_bindgen::prelude::*;
use web_sys::{Blob, FileSystemSyncAccessHandle};

fn err(e: Error) -> JsValue {
    js_error(&e)
}

fn invalid(msg: impl Into<String>) -> JsValue {
    js_error(&Error::Invalid(msg.into()))
}

const fn one() -> usize {
    1
}

const fn twenty() -> usize {
    20
}

fn f16_name() -> String {
    "f16".into()
}

/// The page's training settings.
#[derive(Clone, Deserialize, Serialize)]
struct Settings {
    /// The LoRA's name (the exported file's, `ss_output_name`).
    name: String,
    trigger: String,
    class: String,
    resolution: u32,
    rank: usize,
    alpha: f32,
    lr: f64,
    /// The text encoder's learning rate; absent or null: the UNet only.
    #[serde(default)]
    te_lr: Option<f64>,
    /// The trigger word's own embedding's learning rate (pivotal tuning); absent or null: the
    /// word keeps its embedding.
    #[serde(default)]
    trigger_lr: Option<f64>,
    steps: u64,
    batch: usize,
    #[serde(default = "one")]
    grad_accum: usize,
    schedule: String,
    #[serde(default)]
    warmup: u64,
    targets: String,
    seed: f64,
    #[serde(default)]
    flip: bool,
    /// Samples: the prompt with the trigger word (its twin without it is made too); empty for
    /// none.
    #[serde(default)]
    sample_prompt: String,
    #[serde(default = "twenty")]
    sample_steps: usize,
    #[serde(default)]
    sample_cfg: Option<f32>,
    #[serde(default)]
    sample_sampler: Option<String>,
    /// How the frozen model's matrices are stored (`f32`, `f16`, `q8_0`, `q4_0`).
    #[serde(default = "f16_name")]
    weights: String,
    /// The consent questions: the images are the user's or licensed for this use; people
    /// shown consented to a likeness model.
    #[serde(default)]
    consent_images: bool,
    #[serde(default)]
    consent_likeness: bool,
}

impl Settings {
    fn seed(&self) -> Result<u64, JsValue> {
        if self.seed >= 0.0 && self.seed.fract() == 0.0 && self.seed < 9.0e15 {
            Ok(self.seed as u64)
        } else {
            Err(invalid(format!("training setting `seed`: {} must be a whole number ≥ 0", self.seed)))
        }
    }

    fn config(&self) -> Result<TrainConfig, JsValue> {
        let c = TrainConfig {
            targets: self.targets.clone(),
            rank: self.rank,
            alpha: self.alpha,
            conv_rank: self.rank,
            conv_alpha: self.alpha,
            lr: self.lr,
            te_lr: self.te_lr,
            trigger_lr: self.trigger_lr,
            schedule: self.schedule.clone(),
            warmup_steps: self.warmup,
            steps: self.steps,
            batch: self.batch,
            grad_accum: self.grad_accum,
            seed: self.seed()?,
            // Less memory at the cost of one more forward pass; results are the same.
            checkpointing: self.resolution > 128,
            ..TrainConfig::default()
        };
        c.validate().map_err(err)?;
        Ok(c)
    }

    fn samples(&self) -> Result<SampleSettings, JsValue> {
        let prompt = self.sample_prompt.trim();
        if prompt.is_empty() {
            return Ok(SampleSettings::default());
        }
        let mut prompts = vec![prompt.to_string()];
        let plain = without_trigger(prompt, &self.trigger);
        if plain != prompt && !plain.is_empty() {
            prompts.push(plain);
        }
        let sampler = match &self.sample_sampler {
            Some(s) => SamplerKind::parse(s).map_err(err)?,
            None => SamplerKind::EulerAncestral,
        };
        if self.sample_steps == 0 || self.sample_steps > 150 {
            return Err(invalid(format!("sample steps {} must be between 1 and 150", self.sample_steps)));
        }
        Ok(SampleSettings {
            prompts,
            negative: String::new(),
            steps: self.sample_steps,
            cfg: self.sample_cfg.unwrap_or(7.5),
            sampler,
            seed: self.seed()?,
        })
    }
}

/// The base model as the run records it.
#[derive(Clone, Serialize)]
struct BaseModel {
    name: String,
    licence: Option<String>,
    /// SHA-256 over the `"<sha256>  <file>\n"` lines of its weight files: names the exact
    /// weights, to check that a run continues on the model it started on.
    sha256: String,
    #[serde(skip)]
    hashes: Option<ModelHashes>,
    #[serde(skip)]
    record: ModelRecord,
}

struct Run {
    trainer: Trainer,
    settings: Settings,
    /// The dataset's files as given (OPFS copies), re-read for the hand-off zip.
    originals: Vec<(String, Blob)>,
    clock: Throughput,
    /// Unix seconds.
    started_at: f64,
    dataset_sha256: String,
    caption_files: usize,
    model: BaseModel,
}

thread_local! {
    static RUN: RefCell<Option<Run>> = const { RefCell::new(None) };
}

/// Takes the run for one command (put back with [`put`]); the worker runs one command at a time.
fn take() -> Result<Run, JsValue> {
    RUN.with_borrow_mut(Option::take).ok_or_else(|| invalid("no training run: start one first"))
}

/// Drops the open run (its GPU state belongs to a lost device); its saved files stay, so it
/// can be resumed from its last checkpoint.
pub(crate) fn drop_run() {
    RUN.with_borrow_mut(|r| *r = None);
}

fn put(run: Run) {
    RUN.with_borrow_mut(|slot| *slot = Some(run));
}

fn seconds() -> f64 {
    now() / 1000.0
}

/// The loaded model's record, licence and hashes (A1111's for a single file).
fn base_model() -> Result<BaseModel, JsValue> {
    let record = provenance_now(String::new())?.model;
    let listing: String = record.files.iter().map(|f| format!("{}  {}\n", f.sha256, f.path)).collect();
    let hashes = with_source(|src, _| match src {
        Source::Single { name, blob } => {
            let Some(file) = record.files.first() else { return Ok(None) };
            // A1111's old hash: the 64 KiB at 1 MiB.
            let reader = BlobReader::new(blob.clone(), name.clone());
            let start = (1u64 << 20).min(reader.len());
            let mut window = vec![0u8; (reader.len() - start).min(1 << 16) as usize];
            reader.read_at(start, &mut window).map_err(err)?;
            let legacy = sha256_hex(&window[..]).map_err(err)?;
            Ok(Some(ModelHashes { sha256: file.sha256.clone(), legacy: legacy.get(..8).unwrap_or("").to_string() }))
        }
        Source::Folder { .. } => Ok(None),
    })?;
    Ok(BaseModel {
        name: record.name.clone(),
        licence: record.licence.clone(),
        sha256: sha256_hex(listing.as_bytes()).map_err(err)?,
        hashes,
        record,
    })
}

#[derive(Serialize)]
struct Caption {
    file: String,
    caption: String,
    source: loralab::train::data::CaptionSource,
    width: u32,
    height: u32,
}

#[derive(Serialize)]
struct Started {
    images: usize,
    caption_files: usize,
    num_train_images: usize,
    captions: Vec<Caption>,
    warnings: Vec<String>,
    steps_warning: Option<String>,
    sample_prompts: Vec<String>,
    dataset_sha256: String,
    model: BaseModel,
    step: u64,
    steps: u64,
    next_lr: f64,
    state_bytes: u64,
}

/// Starts a run. `files`: `[[name, Blob], …]` (images and `.txt` / `.caption` captions, in
/// kohya's layout when names carry `N_words/` folders); `settings`: the page's settings (see
/// docs/web.md); `resume`: a checkpoint of this run to continue from (`resume_name` names it
/// in errors); `started_at`: the run's start (Unix seconds, kept across resumes);
/// `model_sha256`: when continuing, the base model the run started on (a different loaded
/// model is refused). `on_progress(done, total, label)` is called while files are read.
#[wasm_bindgen]
#[allow(clippy::too_many_arguments)]
pub async fn train_start(
    files: js_sys::Array,
    settings: JsValue,
    resume: Option<Blob>,
    resume_name: String,
    started_at: f64,
    model_sha256: Option<String>,
    on_progress: js_sys::Function,
) -> Result<JsValue, JsValue> {
    let s: Settings = serde_wasm_bindgen::from_value(settings).map_err(|e| invalid(format!("training settings: {e}")))?;
    if !s.consent_images || !s.consent_likeness {
        return Err(invalid(
            "confirm both consent questions before training: the images are yours or licensed for this use, and people shown have consented to a likeness model",
        ));
    }
    let config = s.config()?;
    let sample_settings = s.samples()?;
    let weights = DType::parse(&s.weights)
        .ok_or_else(|| invalid(format!("weight type `{}`: expected f32, f16, q8_0 or q4_0", s.weights)))?;
    let model = base_model()?;
    if let Some(expected) = model_sha256.filter(|m| !m.is_empty()) {
        if expected != model.sha256 {
            return Err(invalid(format!(
                "this run was trained on another model than the loaded one ({}); load the model it started on, then resume",
                model.name
            )));
        }
    }
    if RUN.with_borrow(Option::is_some) {
        return Err(invalid("a training run is already open; cancel it first"));
    }
    let mut entries = Vec::with_capacity(files.length() as usize);
    for pair in files.iter() {
        let pair: js_sys::Array = pair.dyn_into().map_err(|_| invalid("dataset files: expected [name, Blob] pairs"))?;
        let name = pair.get(0).as_string().unwrap_or_default();
        let blob: Blob = pair.get(1).dyn_into().map_err(|_| invalid(format!("dataset file `{name}` is not a file")))?;
        entries.push((name, blob));
    }
    let originals = entries.clone();
    let mut options = DatasetOptions::new(s.resolution, &s.trigger, &s.class);
    options.flip = s.flip;
    let progress = |done: usize, total: usize, label: &str| {
        let _ = on_progress.call3(&JsValue::NULL, &(done as f64).into(), &(total as f64).into(), &label.into());
    };
    let read = data::read_dataset(entries, options, &progress).map_err(err)?;
    let steps_warning = config.steps_warning(read.dataset.num_train_images());
    let ck = with_source(|src, _| src.checkpoint().map_err(err))?;
    let g = gpu().await?;
    let mut trainer = Trainer::new(&g, &ck, WeightPlan::new(weights), read.dataset, None, config, sample_settings)
        .await
        .map_err(err)?;
    drop(ck);
    if let Some(blob) = resume {
        let bytes = BlobReader::new(blob, resume_name.clone()).read_all().map_err(err)?;
        trainer.load_state(&g, &bytes, &resume_name).map_err(err)?;
    }
    let ds = trainer.dataset();
    let info = Started {
        images: ds.len(),
        caption_files: read.caption_files,
        num_train_images: ds.num_train_images(),
        captions: ds
            .items
            .iter()
            .map(|i| Caption { file: i.file.clone(), caption: i.caption.clone(), source: i.caption_source, width: i.width, height: i.height })
            .collect(),
        warnings: ds.warnings.clone(),
        steps_warning,
        sample_prompts: trainer.sample_prompts().to_vec(),
        dataset_sha256: read.sha256.clone(),
        model: model.clone(),
        step: trainer.steps_done(),
        steps: trainer.config().steps,
        next_lr: trainer.next_lr(),
        state_bytes: trainer.state_bytes(),
    };
    let mut clock = Throughput::default();
    clock.mark(trainer.steps_done(), seconds());
    put(Run {
        trainer,
        settings: s,
        originals,
        clock,
        started_at,
        dataset_sha256: read.sha256,
        caption_files: read.caption_files,
        model,
    });
    to_js(&info)
}

#[derive(Serialize)]
struct Stepped {
    step: u64,
    steps: u64,
    loss: f64,
    loss_avg: f64,
    lr: f64,
    grad_norm: f32,
    /// Steps per second over the last steps (null until two steps were timed).
    it_s: Option<f64>,
    /// Seconds left, and as text (`3m07s`).
    eta_s: Option<f64>,
    eta: String,
    finished: bool,
}

/// One optimizer step. `resumed`: the first step after a pause (the speed is measured anew).
#[wasm_bindgen]
pub async fn train_step(resumed: bool) -> Result<JsValue, JsValue> {
    let g = gpu().await?;
    let mut run = take()?;
    if resumed {
        run.clock = Throughput::default();
        run.clock.mark(run.trainer.steps_done(), seconds());
    }
    let r = run.trainer.step(&g).await;
    let out = r.map(|r| {
        run.clock.mark(r.step, seconds());
        let total = run.trainer.config().steps;
        let eta_s = run.clock.eta(total);
        Stepped {
            step: r.step,
            steps: total,
            loss: r.loss,
            loss_avg: r.loss_avg,
            lr: r.lr,
            grad_norm: r.grad_norm,
            it_s: run.clock.rate(),
            eta_s,
            eta: eta_s.map_or_else(|| "?".into(), format_duration),
            finished: run.trainer.is_finished(),
        }
    });
    put(run);
    to_js(&out.map_err(err)?)
}

#[derive(Serialize)]
struct SampleInfo<'a> {
    prompt: &'a str,
    step: u64,
    width: usize,
    height: usize,
}

#[derive(Serialize)]
struct Named {
    name: String,
}

/// The current adapters' samples: `[{prompt, step, width, height, png}]` (PNG bytes with the
/// prompt as A1111 `parameters` and the XMP record of the base model and the adapter in
/// training). Empty when the run has no sample prompt.
#[wasm_bindgen]
pub async fn train_samples() -> Result<js_sys::Array, JsValue> {
    let g = gpu().await?;
    let mut run = take()?;
    let out = if run.trainer.sample_prompts().is_empty() { Ok(vec![]) } else { run.trainer.samples(&g).await };
    let result = out.map_err(err).and_then(|images| {
        let list = js_sys::Array::new();
        let set = run.trainer.config();
        let sampler = run.settings.sample_sampler.as_deref().and_then(|n| SamplerKind::parse(n).ok()).unwrap_or(SamplerKind::EulerAncestral);
        for im in images {
            let settings = [
                ("Steps", run.settings.sample_steps.to_string()),
                ("Sampler", loralab::parameters::a1111_sampler(sampler).to_string()),
                ("CFG scale", run.settings.sample_cfg.unwrap_or(7.5).to_string()),
                ("Seed", set.seed.to_string()),
                ("Size", format!("{}x{}", im.width, im.height)),
                ("Model", run.model.name.clone()),
                ("LoRA", format!("{} (in training, step {} of {})", run.settings.name, im.step, set.steps)),
                ("Version", format!("loralab {}", env!("CARGO_PKG_VERSION"))),
            ];
            let text = loralab::parameters::format(&im.prompt, "", &settings);
            let adapter = AdapterRecord {
                name: format!("{} (training step {})", run.settings.name, im.step),
                licence: run.model.licence.clone(),
                trained_on: Some(run.model.name.clone()),
                strengths: Some((0.0, 1.0)),
                ..AdapterRecord::default()
            };
            let mut p = Provenance::new(run.model.record.clone(), vec![adapter]);
            p.description = Some(format!("training sample: {}", im.prompt));
            let png = loralab::io::png::encode_rgb8_xmp(im.width, im.height, &im.rgb, &[("parameters", &text)], &p.to_xmp())
                .map_err(err)?;
            let item = to_js(&SampleInfo { prompt: &im.prompt, step: im.step, width: im.width, height: im.height })?;
            js_sys::Reflect::set(&item, &"png".into(), &js_sys::Uint8Array::from(&png[..]))?;
            list.push(&item);
        }
        Ok(list)
    });
    put(run);
    result
}

/// The run's checkpoint after the steps done (a safetensors file, see
/// `loralab::train::trainer`).
#[wasm_bindgen]
pub async fn train_save_state() -> Result<js_sys::Uint8Array, JsValue> {
    let g = gpu().await?;
    let run = take()?;
    let out = run.trainer.save_state(&g).await;
    put(run);
    Ok(js_sys::Uint8Array::from(&out.map_err(err)?[..]))
}

/// The kohya metadata of the run: the trainer's, the name, the base model and its licence, the
/// dates (`finished_at`, Unix seconds), the dataset's hash and the consent.
fn record(run: &Run, finished_at: f64) -> TrainingRecord {
    let mut r = run.trainer.training_record();
    let s = &run.settings;
    r.output_name = s.name.clone();
    r.sd_model_name = Some(run.model.name.clone());
    r.sd_model_hashes = run.model.hashes.clone();
    r.training_started_at = run.started_at;
    r.training_finished_at = finished_at;
    r.license = run.model.licence.clone();
    r.trigger_phrase = Some(s.trigger.clone()).filter(|t| !t.is_empty());
    let images = run.trainer.dataset().len();
    r.training_comment = Some(format!(
        "dataset: {images} images, {} caption files, SHA-256 {}; base model {} (weights SHA-256 {}); \
         consent confirmed: the images are the trainer's or licensed for this use, people shown consented to a likeness model",
        run.caption_files, run.dataset_sha256, run.model.name, run.model.sha256
    ));
    r.description = Some(format!(
        "A LoRA of `{}` trained in the browser with loralab on {images} images, base model {}.",
        format!("{} {}", s.trigger, s.class).trim(),
        run.model.name
    ));
    r
}

/// The adapters as a kohya LoRA file (f16): `{name, bytes}`.
#[wasm_bindgen]
pub async fn train_export(finished_at: f64) -> Result<JsValue, JsValue> {
    let g = gpu().await?;
    let run = take()?;
    let out = if run.trainer.steps_done() == 0 {
        Err(invalid("nothing to export yet: the run has not done a step"))
    } else {
        run.trainer.export(&g, &record(&run, finished_at), ExportDtype::F16).await.map_err(err)
    };
    let name = format!("{}.safetensors", loralab::train::data::safe_folder_name(&run.settings.name));
    put(run);
    let bytes = out?;
    let obj = to_js(&Named { name })?;
    js_sys::Reflect::set(&obj, &"bytes".into(), &js_sys::Uint8Array::from(&bytes[..]))?;
    Ok(obj)
}

/// The name of the hand-off zip of the current run.
#[wasm_bindgen]
pub fn train_handoff_name() -> Result<String, JsValue> {
    RUN.with_borrow(|r| r.as_ref().map(|r| format!("{}_kohya.zip", loralab::train::data::safe_folder_name(&r.settings.name))))
        .ok_or_else(|| invalid("no training run: start one first"))
}

/// Writes the kohya hand-off zip (the dataset's original files with captions, a
/// `train_network.py` configuration of these settings) to `handle`; returns its size.
#[wasm_bindgen]
pub fn train_handoff(handle: FileSystemSyncAccessHandle, unix_seconds: f64) -> Result<f64, JsValue> {
    let run = take()?;
    let out = (|| {
        handle.truncate_with_f64(0.0).map_err(|e| invalid(format!("the browser's file storage refused the zip: {e:?}")))?;
        let rec = record(&run, unix_seconds);
        let mut source = |name: &str| -> loralab::Result<Vec<u8>> {
            let blob = run.originals.iter().find(|(n, _)| n == name).map(|(_, b)| b.clone()).ok_or_else(|| Error::Io {
                file: name.to_string(),
                message: "the file is no longer in the run's storage".into(),
            })?;
            BlobReader::new(blob, name).read_all()
        };
        let w = write_handoff(
            HandleWriter::new(handle.clone()),
            &rec,
            ExportDtype::F16,
            run.trainer.dataset(),
            None,
            &mut source,
            unix_seconds as i64,
        )
        .map_err(err)?;
        handle.flush().map_err(|e| invalid(format!("{e:?}")))?;
        Ok(w.written())
    })();
    put(run);
    out
}

/// Ends the run and frees its GPU memory (the checkpoints stay where the worker saved them).
#[wasm_bindgen]
pub async fn train_cancel() -> Result<(), JsValue> {
    let run = RUN.with_borrow_mut(Option::take);
    drop(run);
    gpu().await?.trim();
    Ok(())
}
