//! "Merge and download": the enabled adapters fused, at their strengths, into the loaded
//! model's files and written as safetensors into the Origin Private File System (through a
//! sync access handle the Worker opens), one tensor at a time — the model is re-read from its
//! source Blobs, never held whole in wasm memory.
//!
//! A single-file checkpoint is written back as one file with its own (CompVis) keys; a diffusers
//! folder gives its merged `unet/diffusion_pytorch_model.safetensors` and
//! `text_encoder/model.safetensors` (the VAE is unchanged), to drop into a copy of the folder.

use crate::engine::{with_source, Source};
use crate::files::HandleWriter;
use crate::{js_error, to_js};
use loralab::lora::fuse::{diffusers_keys, merge_metadata, same_keys, write_merged, FuseReport, OutputDType, Plan, Weighted};
use loralab::lora::{LoraFile, ModelLayers, Target};
use loralab::model::checkpoint::{Checkpoint, Component, Layout};
use loralab::Error;
use serde::Serialize;
use std::collections::BTreeMap;
use wasm_bindgen::prelude::*;
use web_sys::FileSystemSyncAccessHandle;

#[derive(Serialize)]
struct Output {
    component: &'static str,
    name: String,
}

/// The files a merge of the loaded model writes: `[{component, name}]`.
#[wasm_bindgen]
pub fn merge_outputs() -> Result<JsValue, JsValue> {
    with_source(|src, _| {
        let outs = match src {
            Source::Single { name, .. } => {
                let stem = name.rsplit(['/', '\\']).next().unwrap_or(name);
                let stem = stem.strip_suffix(".safetensors").unwrap_or(stem);
                vec![Output { component: "single", name: format!("{stem}-merged.safetensors") }]
            }
            Source::Folder { .. } => vec![
                Output { component: "unet", name: "unet/diffusion_pytorch_model.safetensors".into() },
                Output { component: "text_encoder", name: "text_encoder/model.safetensors".into() },
            ],
        };
        to_js(&outs)
    })
}

#[derive(Serialize)]
struct Written {
    tensors: usize,
    merged: usize,
    skipped_layers: usize,
    bytes: f64,
}

/// The adapters' layers of one target as a file of their own (so each target gets its own
/// strength).
fn only(file: &LoraFile, target: Target) -> LoraFile {
    let mut f = file.clone();
    f.layers.retain(|l| l.target == target);
    f
}

/// Writes one output of [`merge_outputs`] (`component`) to `handle`, stored as `weights`
/// (`f16`, `f32` or `keep`).
#[wasm_bindgen]
pub fn merge_write(component: String, handle: FileSystemSyncAccessHandle, out_name: String, weights: String) -> Result<JsValue, JsValue> {
    let dtype = match weights.as_str() {
        "f16" => OutputDType::F16,
        "f32" => OutputDType::F32,
        "keep" => OutputDType::Keep,
        w => return Err(js_error(&Error::Invalid(format!("merged weights `{w}`: expected f16, f32 or keep")))),
    };
    with_source(|src, adapters| {
        if adapters.iter().all(|(_, (te, unet))| *te == 0.0 && *unet == 0.0) {
            return Err(js_error(&Error::Invalid(
                "no adapter is enabled with a strength other than 0: nothing to merge".into(),
            )));
        }
        let ck = src.checkpoint().map_err(|e| js_error(&e))?;
        let layers = ModelLayers::from_checkpoint(&ck).map_err(|e| js_error(&e))?;
        let split: Vec<(LoraFile, f32)> = adapters
            .iter()
            .flat_map(|(f, (te, unet))| [(only(f, Target::TextEncoder), *te), (only(f, Target::Unet), *unet)])
            .filter(|(f, s)| !f.layers.is_empty() && *s != 0.0)
            .collect();
        let weighted: Vec<Weighted<'_>> = split.iter().map(|(f, s)| Weighted { file: f, strength: *s }).collect();
        let plan = Plan::new(&weighted, &layers).map_err(|e| js_error(&e))?;
        let (mkey, mvalue) = merge_metadata(&weighted);
        let mut report = FuseReport { skipped_layers: plan.skipped_layers, ..Default::default() };
        let out = HandleWriter::new(handle.clone());
        handle.truncate_with_f64(0.0).map_err(|e| js_error(&Error::Io { file: out_name.clone(), message: format!("{e:?}") }))?;
        let written = match (component.as_str(), ck.layout) {
            ("single", Layout::SingleFile) => {
                let file = ck.unet.file();
                let items = same_keys(file, &ck, None).map_err(|e| js_error(&e))?;
                let mut meta = file.metadata().clone();
                meta.insert(mkey, mvalue);
                write_merged(file, &items, &plan, &layers, dtype, &meta, out, &out_name, &mut report)
            }
            (c @ ("unet" | "text_encoder"), Layout::Folder) => {
                let comp = if c == "unet" { Component::Unet } else { Component::TextEncoder };
                let w = ck.weights(comp);
                let items = diffusers_keys(&ck, comp).map_err(|e| js_error(&e))?;
                let mut meta = BTreeMap::new();
                meta.insert("format".to_string(), "pt".to_string());
                meta.insert(mkey, mvalue);
                write_merged(w.file(), &items, &plan, &layers, dtype, &meta, out, &out_name, &mut report)
            }
            (c, _) => return Err(js_error(&Error::Invalid(format!("`{c}` is not an output of this model")))),
        }
        .map_err(|e| js_error(&e))?;
        handle.flush().map_err(|e| js_error(&Error::Io { file: out_name.clone(), message: format!("{e:?}") }))?;
        to_js(&Written { tensors: report.tensors, merged: report.merged, skipped_layers: report.skipped_layers, bytes: written.written() })
    })
}

impl Source {
    /// The model's checkpoint, opened again from its Blobs.
    pub fn checkpoint(&self) -> loralab::Result<Checkpoint<crate::files::BlobReader>> {
        match self {
            Source::Single { name, blob } => Checkpoint::open_single_file(
                crate::files::BlobReader::new(blob.clone(), name.clone()),
                name,
                loralab::model::config::PipelineConfig::sd15(),
            ),
            Source::Folder { name, files } => Checkpoint::open_folder(&crate::files::BlobFiles::new(name, files.clone())),
        }
    }
}
