//! The classroom's engine commands: an adapter's layers, the singular values of a layer's ΔW,
//! resizing an adapter by SVD, parameter counts, per-block weights and a layer's ΔW heat map.
//! `www/worker.js` calls [`classroom`] with the command's name and its arguments (see
//! docs/web.md, *Message protocol*). A submodule of the engine: it reads the engine's adapters
//! and model in place.

use super::{err, invalid, put, take, with_state, Source, State};
use crate::files::{BlobFiles, BlobReader};
use crate::{gpu, to_js};
use loralab::lora::blocks::{BlockLayout, BlockWeights, BLOCK_NAMES};
use loralab::lora::params::{adapter_values, counts_for_model, counts_for_shape, TargetSet};
use loralab::lora::resize::{resize, ResizeMethod, ResizeOptions};
use loralab::lora::spectrum::{delta_map, layer_shape, spectrum};
use loralab::lora::{LayerAdapter, LoraFile, ModelLayers};
use loralab::model::checkpoint::Checkpoint;
use loralab::model::config::PipelineConfig;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use wasm_bindgen::prelude::*;

/// The commands [`classroom`] answers.
pub const COMMANDS: [&str; 6] = ["lora_layers", "lora_spectrum", "lora_resize", "param_counts", "set_block_weights", "lora_delta_map"];

thread_local! {
    /// Per-block weights by adapter id (re-applied after the adapters are installed again).
    static BLOCKS: RefCell<HashMap<u32, BlockWeights>> = RefCell::new(HashMap::new());
    /// The loaded model's layers, by model name (read from the files' headers once).
    static LAYERS: RefCell<Option<(String, Rc<ModelLayers>)>> = const { RefCell::new(None) };
}

/// Runs classroom command `cmd` with `args` (an object) and returns its value.
#[wasm_bindgen]
pub async fn classroom(cmd: String, args: JsValue) -> Result<JsValue, JsValue> {
    match cmd.as_str() {
        "lora_layers" => lora_layers(parse(&cmd, args)?),
        "lora_spectrum" => lora_spectrum(parse(&cmd, args)?),
        "lora_resize" => lora_resize(parse(&cmd, args)?),
        "param_counts" => param_counts(parse(&cmd, args)?),
        "set_block_weights" => set_block_weights(parse(&cmd, args)?).await,
        "lora_delta_map" => lora_delta_map(parse(&cmd, args)?),
        other => Err(invalid(format!("unknown classroom command `{other}` (available: {})", COMMANDS.join(", ")))),
    }
}

fn parse<T: DeserializeOwned>(cmd: &str, args: JsValue) -> Result<T, JsValue> {
    serde_wasm_bindgen::from_value(args).map_err(|e| invalid(format!("{cmd} arguments: {e}")))
}

/// An adapter, the loaded model's layers (when a model is loaded) and its block layout.
type Context = (Arc<LoraFile>, Option<Rc<ModelLayers>>, BlockLayout);

/// The adapter `id` with the model's layers and block layout.
fn adapter(id: u32) -> Result<Context, JsValue> {
    let s = take()?;
    let r = (|| {
        let file = s.loras.iter().find(|l| l.id == id).map(|l| Arc::clone(&l.file)).ok_or_else(|| invalid(format!("no adapter {id}")))?;
        let layers = model_layers(&s)?;
        let layout = s.config.as_ref().map_or_else(BlockLayout::sd15, |c| BlockLayout::new(&c.unet));
        Ok((file, layers, layout))
    })();
    put(s);
    r
}

/// The loaded model's layers from its files' headers (cached per model).
fn model_layers(s: &State) -> Result<Option<Rc<ModelLayers>>, JsValue> {
    let Some(src) = &s.source else { return Ok(None) };
    if let Some(l) = LAYERS.with_borrow(|c| c.as_ref().filter(|(n, _)| *n == s.model_name).map(|(_, l)| Rc::clone(l))) {
        return Ok(Some(l));
    }
    let layers = match src {
        Source::Single { name, blob } => {
            let ck = Checkpoint::open_single_file(BlobReader::new(blob.clone(), name.clone()), name, PipelineConfig::sd15()).map_err(err)?;
            ModelLayers::from_checkpoint(&ck).map_err(err)?
        }
        Source::Folder { name, files } => {
            let ck = Checkpoint::open_folder(&BlobFiles::new(name, files.clone())).map_err(err)?;
            ModelLayers::from_checkpoint(&ck).map_err(err)?
        }
    };
    let layers = Rc::new(layers);
    LAYERS.with_borrow_mut(|c| *c = Some((s.model_name.clone(), Rc::clone(&layers))));
    Ok(Some(layers))
}

/// The layer `name` names: our module path, the key as written, or its kohya key.
fn find<'a>(f: &'a LoraFile, name: &str) -> Result<&'a LayerAdapter, JsValue> {
    let kohya = |l: &LayerAdapter| loralab::lora::resize::kohya_key(l.target, &l.module);
    f.layers.iter().find(|l| l.module == name || l.key == name || kohya(l) == name).ok_or_else(|| {
        invalid(format!("{}: no layer `{name}` (layers are named like `{}`)", f.file, f.layers.first().map_or("", |l| l.module.as_str())))
    })
}

#[derive(Deserialize)]
struct IdArgs {
    id: u32,
}

#[derive(Serialize)]
struct LayerRow {
    /// Our module path (what the other commands take as `layer`).
    name: String,
    /// The key as written in the file.
    key: String,
    kind: &'static str,
    target: &'static str,
    /// `[out, in]` or `[out, in, kh, kw]` (empty when neither the file nor the model says).
    shape: Vec<usize>,
    rank: Option<usize>,
    alpha: Option<f32>,
    /// `te`, `in`, `mid`, `out` or `base` (UNet layers outside the three, `time_embedding`).
    block: &'static str,
    /// The LoRA Block Weight block: `BASE`, `IN00`…`IN11`, `M00`, `OUT00`…`OUT11`.
    block_id: &'static str,
    /// Values the layer's tensors hold.
    params: usize,
}

fn lora_layers(a: IdArgs) -> Result<JsValue, JsValue> {
    let (f, model, layout) = adapter(a.id)?;
    let rows: Vec<LayerRow> = f
        .layers
        .iter()
        .map(|l| {
            let shape = layer_shape(l, model.as_deref())
                .or_else(|| model.as_ref().and_then(|m| m.get(l.target, &l.module)).map(|i| i.shape))
                .map(|s| s.weight_shape())
                .unwrap_or_default();
            LayerRow {
                name: l.module.clone(),
                key: l.key.clone(),
                kind: l.delta.algorithm().name(),
                target: l.target.name(),
                shape,
                rank: l.delta.rank(),
                alpha: l.alpha,
                block: layout.group(l.target, &l.module).name(),
                block_id: BLOCK_NAMES[layout.block(l.target, &l.module)],
                params: adapter_values(&l.delta),
            }
        })
        .collect();
    to_js(&rows)
}

#[derive(Deserialize)]
struct LayerArgs {
    id: u32,
    layer: String,
}

fn lora_spectrum(a: LayerArgs) -> Result<JsValue, JsValue> {
    let (f, model, _) = adapter(a.id)?;
    let l = find(&f, &a.layer)?;
    let s = spectrum(l, model.as_deref()).map_err(|e| err(in_file(e, &f)))?;
    to_js(&s)
}

/// A layer error with the adapter's file name.
fn in_file(e: loralab::Error, f: &LoraFile) -> loralab::Error {
    match e {
        loralab::Error::Format { file, tensor, message } if file.is_empty() => loralab::Error::Format { file: f.file.clone(), tensor, message },
        other => other,
    }
}

#[derive(Deserialize)]
struct ResizeArgs {
    id: u32,
    rank: Option<usize>,
    energy: Option<f64>,
    /// `f16` (default), `bf16` or `f32`.
    dtype: Option<String>,
}

#[derive(Serialize)]
struct ResizeValue<'a> {
    name: String,
    layers: &'a [loralab::lora::resize::LayerResize],
    warnings: &'a [String],
    old_params: usize,
    new_params: usize,
}

fn lora_resize(a: ResizeArgs) -> Result<JsValue, JsValue> {
    let (f, model, _) = adapter(a.id)?;
    let (method, cap, tag) = match (a.rank, a.energy) {
        (r, Some(e)) => (ResizeMethod::Energy(e), r, format!("e{}", (e * 100.0).round())),
        (Some(r), None) => (ResizeMethod::Rank(r), None, format!("r{r}")),
        (None, None) => return Err(invalid("lora_resize needs `rank` or `energy`")),
    };
    let mut opts = ResizeOptions::new(method);
    opts.max_rank = cap;
    opts.set_dtype(a.dtype.as_deref().unwrap_or("f16")).map_err(err)?;
    let r = resize(&f, &opts, model.as_deref()).map_err(err)?;
    let name = format!("{}-{tag}.safetensors", f.display_name());
    let bytes = r.to_bytes(&name).map_err(err)?;
    let value = to_js(&ResizeValue { name, layers: &r.layers, warnings: &r.warnings, old_params: r.old_params, new_params: r.new_params })?;
    js_sys::Reflect::set(&value, &"bytes".into(), &js_sys::Uint8Array::from(&bytes[..]))?;
    Ok(value)
}

#[derive(Deserialize)]
struct CountArgs {
    shape: Option<Vec<usize>>,
    target: Option<String>,
    rank: usize,
}

fn param_counts(a: CountArgs) -> Result<JsValue, JsValue> {
    let counts = match (&a.shape, &a.target) {
        (Some(shape), _) => counts_for_shape(shape, a.rank).map_err(err)?,
        (None, Some(t)) => {
            let targets = TargetSet::parse(t).map_err(err)?;
            let s = take()?;
            let layers = model_layers(&s);
            put(s);
            let layers = layers?.ok_or_else(|| invalid("param_counts with a target needs a loaded model"))?;
            counts_for_model(&layers, targets, a.rank).map_err(err)?
        }
        (None, None) => return Err(invalid("param_counts needs `shape` or `target`")),
    };
    to_js(&counts)
}

#[derive(Deserialize)]
struct BlockArgs {
    id: u32,
    /// `[in, mid, out]`, or the LoRA Block Weight list (17 or 26 values).
    weights: Option<Vec<f32>>,
    weights17: Option<Vec<f32>>,
}

async fn set_block_weights(a: BlockArgs) -> Result<JsValue, JsValue> {
    let w = match (&a.weights, &a.weights17) {
        (_, Some(list)) => BlockWeights::from_list(list),
        (Some(v), None) if v.len() == 3 => BlockWeights::groups(v[0], v[1], v[2]),
        (Some(v), None) => BlockWeights::from_list(v),
        (None, None) => return Err(invalid("set_block_weights needs `weights` ([in, mid, out]) or `weights17`")),
    }
    .map_err(err)?;
    let g = gpu().await?;
    with_state(async |s: &mut State| {
        if !s.loras.iter().any(|l| l.id == a.id) {
            return Err(invalid(format!("no adapter {}", a.id)));
        }
        BLOCKS.with_borrow_mut(|b| b.insert(a.id, w));
        restore_blocks(s, &g)?;
        Ok(JsValue::NULL)
    })
    .await
}

/// Applies the per-block weights set for the engine's adapters (after they were installed,
/// which resets them).
pub(super) fn restore_blocks(s: &mut State, g: &loralab::Gpu) -> Result<(), JsValue> {
    let blocks: Vec<BlockWeights> =
        BLOCKS.with_borrow(|b| s.loras.iter().map(|l| b.get(&l.id).cloned().unwrap_or_default()).collect());
    let Some(pipe) = s.pipe.as_mut() else { return Ok(()) };
    if blocks.iter().all(BlockWeights::is_uniform) && pipe.block_weights().iter().all(BlockWeights::is_uniform) {
        return Ok(());
    }
    pipe.set_block_weights(g, blocks).map_err(err)
}

#[derive(Deserialize)]
struct MapArgs {
    id: u32,
    layer: String,
    strength: Option<f32>,
    /// Cells per side at most (default 128).
    size: Option<usize>,
}

fn lora_delta_map(a: MapArgs) -> Result<JsValue, JsValue> {
    let (f, model, _) = adapter(a.id)?;
    let l = find(&f, &a.layer)?;
    let strength = a.strength.unwrap_or(1.0);
    if !strength.is_finite() {
        return Err(invalid("strength must be a finite number"));
    }
    let m = delta_map(l, model.as_deref(), strength, a.size.unwrap_or(128).clamp(1, 512)).map_err(|e| err(in_file(e, &f)))?;
    to_js(&m)
}
