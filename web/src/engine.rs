//! The text-to-image engine in the Worker: one loaded model, its adapters and embeddings.
//! `www/worker.js` calls these functions one at a time (it queues commands), so the state is
//! taken out of its slot for the duration of a call and put back after.

use crate::files::{BlobFiles, BlobReader};
use crate::{gpu, js_error, now, to_js};
use loralab::io::safetensors::SafetensorsFile;
use loralab::io::xmp::{FileRecord, ModelRecord, Provenance};
use loralab::licence::Licence;
use loralab::provenance::{adapter_record, file_name, file_record, model_licence, model_record};
use loralab::lora::{read_lora_for, LoraFile, MatchReport};
use loralab::model::checkpoint::Checkpoint;
use loralab::model::config::PipelineConfig;
use loralab::model::textual_inversion::open_textual_inversion;
use loralab::parameters::{self, a1111_sampler};
use loralab::pipeline::{GenerateOptions, StableDiffusionPipeline, StepProgress, WeightPlan};
use loralab::sampler::SamplerKind;
use loralab::{DType, Error};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::sync::Arc;
use wasm_bindgen::prelude::*;
use web_sys::Blob;

#[path = "engine/recover.rs"]
mod recover;

#[path = "classroom.rs"]
pub(crate) mod classroom;

struct Lora {
    id: u32,
    blob: Blob,
    name: String,
    file: Arc<LoraFile>,
    /// Name, size and SHA-256 of the file (hashed once, when added).
    record: FileRecord,
    te: f32,
    unet: f32,
    enabled: bool,
}

impl Lora {
    fn strengths(&self) -> (f32, f32) {
        if self.enabled {
            (self.te, self.unet)
        } else {
            (0.0, 0.0)
        }
    }
}

/// Where the loaded model came from (kept to re-read it for a merge).
pub(crate) enum Source {
    Single { name: String, blob: Blob },
    Folder { name: String, files: Vec<(String, Blob)> },
}

#[derive(Default)]
struct State {
    pipe: Option<StableDiffusionPipeline>,
    source: Option<Source>,
    config: Option<PipelineConfig>,
    model_name: String,
    /// How the model arrived (`load_model`'s `source`: demo, files, url, cache).
    source_kind: String,
    /// Embedding files added (loaded again after a device loss).
    embeddings: Vec<(Blob, String)>,
    /// The model's weight files (hashed once, at load) and stated licence, for the images' XMP.
    model_record: Option<ModelRecord>,
    weights: Option<DType>,
    loras: Vec<Lora>,
    next_id: u32,
    /// GPU bytes of the model's weights (measured after loading).
    model_bytes: u64,
    /// GPU bytes of the installed adapters.
    adapter_bytes: u64,
    /// Peak GPU bytes of the last generation's activations.
    activation_peak: u64,
}

thread_local! {
    static STATE: RefCell<Option<State>> = RefCell::new(Some(State::default()));
}

/// Takes the state for one command; the worker runs one command at a time.
fn take() -> Result<State, JsValue> {
    STATE
        .with_borrow_mut(|s| s.take())
        .ok_or_else(|| js_sys::Error::new("the engine is busy with another command").into())
}

/// Runs `f` with the loaded model's source and the enabled adapters with their (text encoder,
/// UNet) strengths.
pub(crate) fn with_source<T>(
    f: impl FnOnce(&Source, &[(Arc<LoraFile>, (f32, f32))]) -> Result<T, JsValue>,
) -> Result<T, JsValue> {
    let s = take()?;
    let r = match &s.source {
        Some(src) => {
            let adapters: Vec<(Arc<LoraFile>, (f32, f32))> =
                s.loras.iter().filter(|l| l.enabled).map(|l| (Arc::clone(&l.file), (l.te, l.unet))).collect();
            f(src, &adapters)
        }
        None => Err(invalid("no model is loaded")),
    };
    put(s);
    r
}

fn put(s: State) {
    STATE.with_borrow_mut(|slot| *slot = Some(s));
}

/// Runs `f` with the state, putting it back whatever happens.
async fn with_state<T>(f: impl AsyncFnOnce(&mut State) -> Result<T, JsValue>) -> Result<T, JsValue> {
    let mut s = take()?;
    let r = f(&mut s).await;
    put(s);
    r
}

fn err(e: Error) -> JsValue {
    js_error(&e)
}

fn invalid(msg: impl Into<String>) -> JsValue {
    js_error(&Error::Invalid(msg.into()))
}

fn parse_weights(w: &str) -> Result<DType, JsValue> {
    DType::parse(w).ok_or_else(|| invalid(format!("weight type `{w}`: expected f32, f16, q8_0 or q4_0")))
}

#[derive(Serialize)]
struct ModelInfo {
    name: String,
    source: String,
    weights: String,
    default_width: usize,
    default_height: usize,
    /// The model's recommended sampler (its scheduler class), guidance scale and steps.
    sampler: String,
    guidance_scale: f32,
    steps: usize,
    bytes: u64,
    adapter_warnings: Vec<String>,
    licence: Licence,
}

/// Loads a model from Blobs: `files` is an object `{relative path: Blob}` holding a diffusers
/// folder, or a single `.safetensors` checkpoint (read with Stable Diffusion 1.5's
/// configuration). Adapters already added are applied to the new model.
#[wasm_bindgen]
pub async fn load_model(files: js_sys::Object, name: String, source: String, weights: String) -> Result<JsValue, JsValue> {
    let dt = parse_weights(&weights)?;
    let g = gpu().await?;
    let mut entries = vec![];
    for pair in js_sys::Object::entries(&files).iter() {
        let pair: js_sys::Array = pair.unchecked_into();
        let path = pair.get(0).as_string().unwrap_or_default();
        let blob: Blob = pair.get(1).dyn_into().map_err(|_| invalid(format!("`{path}` is not a file")))?;
        entries.push((path, blob));
    }
    with_state(async |s: &mut State| {
        s.embeddings.clear();
        to_js(&load_into(s, &g, entries, &name, &source, dt, None).await?)
    })
    .await
}

/// Loads `entries` (a folder's files or one checkpoint) onto `g` in place of the current model
/// and installs the adapters on it. `record`: the files' hashes when they are known (the same
/// files loaded again), else they are hashed now.
async fn load_into(
    s: &mut State,
    g: &loralab::Gpu,
    mut entries: Vec<(String, Blob)>,
    name: &str,
    source: &str,
    dt: DType,
    record: Option<ModelRecord>,
) -> Result<ModelInfo, JsValue> {
    let (ck, licence, new_source) = if entries.len() == 1 && entries[0].0.to_ascii_lowercase().ends_with(".safetensors") {
        let (path, blob) = entries.pop().unwrap_or_else(|| unreachable!());
        if loralab::model::checkpoint::is_pickle_name(&path) {
            return Err(err(loralab::model::checkpoint::refuse_pickle(&path)));
        }
        let ck = Checkpoint::open_single_file(BlobReader::new(blob.clone(), path.clone()), &path, PipelineConfig::sd15())
            .map_err(err)?;
        let licence = model_licence::<_, BlobFiles>(&ck, None);
        (ck, licence, Source::Single { name: path, blob })
    } else {
        if let Some((p, _)) = entries.iter().find(|(p, _)| loralab::model::checkpoint::is_pickle_name(p)) {
            if !entries.iter().any(|(p, _)| p.ends_with(".safetensors")) {
                return Err(err(loralab::model::checkpoint::refuse_pickle(p)));
            }
        }
        let files = BlobFiles::new(name, entries.clone());
        let ck = Checkpoint::open_folder(&files).map_err(err)?;
        let licence = model_licence(&ck, Some(&files));
        (ck, licence, Source::Folder { name: name.to_string(), files: entries })
    };
    // Hashed by ranges before the weights go to the GPU (the files are read once more).
    let record = match record {
        Some(r) => r,
        None => model_record(&ck, name, &licence).map_err(err)?,
    };
    // The files are readable (a broken one has left the loaded model as it was); free the
    // previous model before the weights go to the GPU: two models may not fit together.
    s.pipe = None;
    g.trim();
    s.model_record = None;
    s.source = Some(new_source);
    let config = ck.config.clone();
    let sampler = loralab::eval::recommended_sampler(&config.scheduler).unwrap_or(SamplerKind::EulerAncestral);
    let defaults = ck.model_index.as_ref().map(|m| m.defaults.clone()).unwrap_or_default();
    let before = g.memory().live_bytes;
    let pipe = StableDiffusionPipeline::load(g, ck, WeightPlan::new(dt)).map_err(err)?;
    s.model_bytes = g.memory().live_bytes.saturating_sub(before);
    let (w, h) = pipe.default_size();
    s.pipe = Some(pipe);
    s.config = Some(config);
    s.model_name = name.to_string();
    s.source_kind = source.to_string();
    s.model_record = Some(record);
    s.weights = Some(dt);
    let adapter_warnings = reapply(s).await?;
    Ok(ModelInfo {
        name: name.to_string(),
        source: source.to_string(),
        weights: dt.name().to_string(),
        default_width: w,
        default_height: h,
        sampler: sampler.name().to_string(),
        guidance_scale: defaults.guidance_scale.unwrap_or(7.5),
        steps: defaults.num_inference_steps.unwrap_or(20),
        bytes: g.memory().live_bytes,
        adapter_warnings,
        licence,
    })
}

/// Re-reads every adapter for the current model's configuration and installs them. Adapters
/// that do not fit the new model are disabled with a warning.
async fn reapply(s: &mut State) -> Result<Vec<String>, JsValue> {
    let Some(cfg) = s.config.clone() else { return Ok(vec![]) };
    let mut warnings = vec![];
    for l in &mut s.loras {
        let f = SafetensorsFile::open(BlobReader::new(l.blob.clone(), l.name.clone()), l.name.clone()).map_err(err)?;
        l.file = Arc::new(read_lora_for(&f, &cfg).map_err(err)?);
    }
    loop {
        let Some(pipe) = s.pipe.as_mut() else { return Ok(warnings) };
        let files: Vec<Arc<LoraFile>> = s.loras.iter().map(|l| Arc::clone(&l.file)).collect();
        let strengths = s.loras.iter().map(Lora::strengths).collect();
        match pipe.set_adapters(&*gpu().await?, files, strengths).await {
            Ok(report) => {
                s.adapter_bytes = report.text_encoder.bytes + report.unet.bytes;
                warnings.extend(report.warnings);
                classroom::restore_blocks(s, &*gpu().await?)?;
                return Ok(warnings);
            }
            Err(Error::Format { file, message, .. }) if s.loras.iter().any(|l| l.file.file == file) => {
                warnings.push(format!("{file}: {message}; removed"));
                s.loras.retain(|l| l.file.file != file);
            }
            Err(e) => return Err(err(e)),
        }
    }
}

#[derive(Deserialize)]
struct GenerateParams {
    prompt: String,
    #[serde(default)]
    negative: String,
    seed: f64,
    steps: usize,
    cfg: f32,
    #[serde(default)]
    sampler: Option<String>,
    #[serde(default)]
    width: Option<usize>,
    #[serde(default)]
    height: Option<usize>,
}

#[derive(Serialize)]
struct StepEvent {
    step: usize,
    steps: usize,
    elapsed_ms: f64,
    preview_width: usize,
    preview_height: usize,
}

#[derive(Serialize)]
struct Generated {
    parameters: String,
    seed: u64,
    width: usize,
    height: usize,
    ms: f64,
    notes: Vec<String>,
}

/// Latents `[1, 4, h, w]` → RGBA `h × w`: a fixed linear map from the four SD latent channels
/// to RGB (an approximation of the VAE decoder, good enough to watch an image form).
fn preview_rgba(latents: &[f32], h: usize, w: usize) -> Vec<u8> {
    const F: [[f32; 3]; 4] = [[0.35, 0.23, 0.32], [0.33, 0.50, 0.24], [-0.28, 0.18, 0.27], [-0.21, -0.26, -0.72]];
    let hw = h * w;
    let mut out = vec![255u8; hw * 4];
    if latents.len() < 4 * hw {
        return out;
    }
    for p in 0..hw {
        for c in 0..3 {
            let v: f32 = (0..4).map(|k| latents[k * hw + p] * F[k][c]).sum();
            out[p * 4 + c] = (((v + 1.0) * 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    out
}

/// Generates one image. `on_step(event, rgba)` is called after every step with
/// `{step, steps, elapsed_ms, preview_width, preview_height}` and the preview's RGBA bytes.
/// Returns `{parameters, seed, width, height, ms, notes}` and the PNG through `png_out`
/// (a callback receiving the bytes, so they are transferred once).
#[wasm_bindgen]
pub async fn generate(params: JsValue, on_step: js_sys::Function, png_out: js_sys::Function) -> Result<JsValue, JsValue> {
    let p: GenerateParams =
        serde_wasm_bindgen::from_value(params).map_err(|e| invalid(format!("generate parameters: {e}")))?;
    let g = gpu().await?;
    with_state(async |s: &mut State| {
        let name = s.model_name.clone();
        let weights = s.weights;
        if s.pipe.is_none() {
            return Err(invalid("no model is loaded"));
        }
        let sampler = match &p.sampler {
            Some(n) => SamplerKind::parse(n).map_err(err)?,
            None => SamplerKind::EulerAncestral,
        };
        if !(p.seed >= 0.0 && p.seed.fract() == 0.0 && p.seed < 1.8e19) {
            return Err(invalid(format!("seed {}: expected a whole number ≥ 0", p.seed)));
        }
        let mut opts = GenerateOptions {
            prompt: p.prompt.clone(),
            negative: p.negative.clone(),
            seed: p.seed as u64,
            steps: p.steps,
            cfg: p.cfg,
            sampler,
            width: p.width,
            height: p.height,
            ..Default::default()
        };
        let Some(pipe) = s.pipe.as_mut() else { return Err(invalid("no model is loaded")) };
        // Prompt tags apply to this image only: the cards' strengths come back afterwards.
        let before: Vec<(f32, f32)> = pipe.adapters().iter().map(|(_, s)| *s).collect();
        let notes = pipe.apply_prompt_tags(&g, &mut opts).map_err(err)?;
        let used: Vec<(String, (f32, f32))> = pipe.adapters().iter().map(|(f, s)| (f.display_name(), *s)).collect();
        // The pipeline holds the adapters in the cards' order.
        let records = pipe
            .adapters()
            .iter()
            .zip(&s.loras)
            .filter(|((_, st), _)| st.0 != 0.0 || st.1 != 0.0)
            .map(|((f, st), l)| adapter_record(f, Some(l.record.clone()), Some(*st)))
            .collect();
        let provenance = Provenance::new(s.model_record.clone().unwrap_or_default(), records);
        let t0 = now();
        let resident = g.memory().live_bytes;
        g.reset_peak_memory();
        let mut step_err = None;
        let mut progress = |sp: &StepProgress<'_>| {
            let shape = sp.latents.len() / 4;
            let (h, w) = latent_hw(shape, opts.width, opts.height);
            let ev = StepEvent { step: sp.step, steps: sp.steps, elapsed_ms: now() - t0, preview_width: w, preview_height: h };
            let rgba = preview_rgba(sp.denoised, h, w);
            let arr = js_sys::Uint8ClampedArray::from(&rgba[..]);
            if let Ok(ev) = to_js(&ev) {
                if let Err(e) = on_step.call2(&JsValue::NULL, &ev, &arr) {
                    step_err.get_or_insert(e);
                }
            }
        };
        let out = pipe.generate(&g, &opts, &mut progress).await;
        s.activation_peak = g.memory().peak_live_bytes.saturating_sub(resident);
        if before != pipe.adapters().iter().map(|(_, s)| *s).collect::<Vec<_>>() {
            pipe.set_adapter_strengths(&g, &before).map_err(err)?;
        }
        let out = out.map_err(err)?;
        if let Some(e) = step_err {
            return Err(e);
        }
        let [_, _, h, w] = out.image_shape;
        let text = parameters_text(&p, &opts, &used, w, h, &name, weights);
        let png = loralab::io::png::encode_rgb8_xmp(w, h, &out.to_rgb8(), &[("parameters", &text)], &provenance.to_xmp())
            .map_err(err)?;
        png_out.call1(&JsValue::NULL, &js_sys::Uint8Array::from(&png[..]))?;
        to_js(&Generated { parameters: text, seed: opts.seed, width: w, height: h, ms: now() - t0, notes })
    })
    .await
}

/// (h, w) of a latent with `hw` positions for the requested image size.
fn latent_hw(hw: usize, width: Option<usize>, height: Option<usize>) -> (usize, usize) {
    match (width, height) {
        (Some(w), Some(h)) if w >= 8 && h >= 8 && (w / 8) * (h / 8) == hw => (h / 8, w / 8),
        _ => {
            let side = (hw as f64).sqrt() as usize;
            (side, hw / side.max(1))
        }
    }
}

fn parameters_text(
    p: &GenerateParams,
    opts: &GenerateOptions,
    used: &[(String, (f32, f32))],
    w: usize,
    h: usize,
    model: &str,
    weights: Option<DType>,
) -> String {
    let prompt = parameters::prompt_with_adapters(&p.prompt, used);
    let mut settings = vec![
        ("Steps", opts.steps.to_string()),
        ("Sampler", a1111_sampler(opts.sampler).to_string()),
        ("CFG scale", opts.cfg.to_string()),
        ("Seed", opts.seed.to_string()),
        ("Size", format!("{w}x{h}")),
        ("Model", model.to_string()),
    ];
    if let Some(dt) = weights.filter(|d| *d != DType::F32) {
        settings.push(("Weights", dt.name().to_string()));
    }
    settings.push(("Version", format!("loralab {}", env!("CARGO_PKG_VERSION"))));
    parameters::format(&prompt, &p.negative, &settings)
}

#[derive(Serialize)]
struct Card {
    id: u32,
    name: String,
    summary: loralab::lora::Summary,
    base_mismatch: Option<String>,
    te: f32,
    unet: f32,
    enabled: bool,
}

/// Adds an adapter file: reads it, checks it against the loaded model and applies it at
/// strength 1. Returns its card (`{id, name, summary, base_mismatch, te, unet, enabled}`). A
/// file that does not fit leaves the engine as it was.
#[wasm_bindgen]
pub async fn lora_add(file: Blob, name: String) -> Result<JsValue, JsValue> {
    with_state(async |s: &mut State| {
        if loralab::model::checkpoint::is_pickle_name(&name) {
            return Err(err(loralab::model::checkpoint::refuse_pickle(&name)));
        }
        let cfg = s.config.clone().unwrap_or_else(PipelineConfig::sd15);
        let reader = BlobReader::new(file.clone(), name.clone());
        // By content too: a pickle or zip renamed to .safetensors gets the CLI's message.
        let lf = Arc::new(loralab::lora::open_lora(reader.clone(), &name, &cfg).map_err(err)?);
        let record = file_record(&reader, file_name(&name)).map_err(err)?;
        let id = s.next_id;
        s.next_id += 1;
        let lora = Lora { id, blob: file, name: name.clone(), file: Arc::clone(&lf), record, te: 1.0, unet: 1.0, enabled: true };
        s.loras.push(lora);
        if let Err(e) = install(s).await {
            s.loras.pop();
            install(s).await?;
            return Err(e);
        }
        let summary = lf.summary(None::<MatchReport>);
        let base_mismatch = base_mismatch(&lf, &cfg);
        to_js(&Card { id, name: lf.display_name(), summary, base_mismatch, te: 1.0, unet: 1.0, enabled: true })
    })
    .await
}

/// A warning when the adapter was made for another model family than the loaded one (Stable
/// Diffusion 2.x when its text encoder is 1,024 wide, else 1.x).
fn base_mismatch(f: &LoraFile, cfg: &PipelineConfig) -> Option<String> {
    use loralab::lora::BaseModel;
    let loaded = if cfg.unet.cross_attention_dim.at(0) == 1024 { BaseModel::Sd2 } else { BaseModel::Sd1 };
    if f.base == BaseModel::Unknown || f.base == loaded {
        return None;
    }
    let why = f.base_reason.as_deref().map(|r| format!(" (from {r})")).unwrap_or_default();
    Some(format!("made for {}{why}, but the loaded model is {}: expect weak or broken results", f.base.describe(), loaded.describe()))
}

/// What an image made now is made with: the model and the adapters (all of them, strengths
/// left out: an X/Y grid varies them). `description` says what the image shows.
pub(crate) fn provenance_now(description: String) -> Result<Provenance, JsValue> {
    let s = take()?;
    let r = match &s.model_record {
        Some(m) => {
            let adapters = s.loras.iter().map(|l| adapter_record(&l.file, Some(l.record.clone()), None)).collect();
            let mut p = Provenance::new(m.clone(), adapters);
            p.description = Some(description).filter(|d| !d.is_empty());
            Ok(p)
        }
        None => Err(invalid("no model is loaded")),
    };
    put(s);
    r
}

async fn install(s: &mut State) -> Result<(), JsValue> {
    let Some(pipe) = s.pipe.as_mut() else { return Ok(()) };
    let files = s.loras.iter().map(|l| Arc::clone(&l.file)).collect();
    let strengths = s.loras.iter().map(Lora::strengths).collect();
    let report = pipe.set_adapters(&*gpu().await?, files, strengths).await.map_err(err)?;
    s.adapter_bytes = report.text_encoder.bytes + report.unet.bytes;
    classroom::restore_blocks(s, &*gpu().await?)
}

/// Sets an adapter's strengths and whether it is on: a few words per layer are rewritten.
#[wasm_bindgen]
pub async fn lora_set(id: u32, te: f32, unet: f32, enabled: bool) -> Result<(), JsValue> {
    if !te.is_finite() || !unet.is_finite() {
        return Err(invalid("strengths must be finite numbers"));
    }
    let g = gpu().await?;
    with_state(async |s: &mut State| {
        let l = s.loras.iter_mut().find(|l| l.id == id).ok_or_else(|| invalid(format!("no adapter {id}")))?;
        (l.te, l.unet, l.enabled) = (te, unet, enabled);
        let strengths: Vec<(f32, f32)> = s.loras.iter().map(Lora::strengths).collect();
        if let Some(pipe) = s.pipe.as_mut() {
            pipe.set_adapter_strengths(&g, &strengths).map_err(err)?;
        }
        Ok(())
    })
    .await
}

/// Removes an adapter.
#[wasm_bindgen]
pub async fn lora_remove(id: u32) -> Result<(), JsValue> {
    with_state(async |s: &mut State| {
        let n = s.loras.len();
        s.loras.retain(|l| l.id != id);
        if s.loras.len() == n {
            return Err(invalid(format!("no adapter {id}")));
        }
        install(s).await
    })
    .await
}

#[derive(Serialize)]
struct EmbeddingInfo {
    token: String,
    vectors: usize,
}

/// Loads a textual-inversion embedding; its trigger word works in prompts.
#[wasm_bindgen]
pub async fn embedding_add(file: Blob, name: String) -> Result<JsValue, JsValue> {
    let g = gpu().await?;
    with_state(async |s: &mut State| {
        let Some(pipe) = s.pipe.as_mut() else { return Err(invalid("load a model before adding an embedding")) };
        let emb = open_textual_inversion(BlobReader::new(file.clone(), name.clone()), &name).map_err(err)?;
        let ids = pipe.add_embedding(&g, &emb).map_err(err)?;
        s.embeddings.push((file, name.clone()));
        to_js(&EmbeddingInfo { token: emb.token.clone(), vectors: ids.len() })
    })
    .await
}

#[derive(Serialize)]
struct Memory {
    live_bytes: u64,
    peak_live_bytes: u64,
    free_bytes: u64,
    model: String,
    adapters: usize,
    /// GPU bytes of the model's weights, the adapters' data, and the last generation's peak
    /// activations.
    weights_bytes: u64,
    adapter_bytes: u64,
    activation_peak_bytes: u64,
}

/// GPU memory in use and what is loaded.
#[wasm_bindgen]
pub async fn gpu_memory() -> Result<JsValue, JsValue> {
    let g = gpu().await?;
    let m = g.memory();
    let (model, adapters, w, a, act) = STATE
        .with_borrow(|s| {
            s.as_ref().map(|s| (s.model_name.clone(), s.loras.len(), s.model_bytes, s.adapter_bytes, s.activation_peak))
        })
        .unwrap_or_default();
    to_js(&Memory {
        live_bytes: m.live_bytes,
        peak_live_bytes: m.peak_live_bytes,
        free_bytes: m.free_bytes,
        model,
        adapters,
        weights_bytes: w,
        adapter_bytes: a,
        activation_peak_bytes: act,
    })
}
