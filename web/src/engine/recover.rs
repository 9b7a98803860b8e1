//! Recovery from a lost GPU device: the model, its adapters and embeddings loaded again onto a
//! new device from the files they came from.

use super::{err, load_into, with_state, ModelInfo, Source, State};
use crate::files::BlobReader;
use crate::to_js;
use loralab::model::textual_inversion::open_textual_inversion;
use serde::Serialize;
use wasm_bindgen::prelude::*;

#[derive(Serialize)]
struct Recovered {
    /// The model loaded again (`load_model`'s value), or `null` when none was loaded.
    model: Option<ModelInfo>,
    /// Adapters installed again, at their strengths.
    adapters: usize,
    /// Embeddings loaded again.
    embeddings: usize,
}

/// After the device was lost: opens a new device and loads the model again from the files it
/// came from (Blobs: the Origin Private File System's cached copy of a downloaded model, the
/// picked files, or the demo model's fetched files), with the same weight type, the adapters at
/// their strengths and the embeddings. An open training run is dropped (its saved files stay:
/// it resumes from its last checkpoint). Returns `{model, adapters, embeddings}`.
#[wasm_bindgen]
pub async fn recover() -> Result<JsValue, JsValue> {
    crate::train::drop_run();
    let g = crate::reopen_gpu().await?;
    with_state(async |s: &mut State| {
        s.pipe = None;
        s.adapter_bytes = 0;
        s.activation_peak = 0;
        let (Some(source), Some(dt)) = (s.source.take(), s.weights) else {
            return to_js(&Recovered { model: None, adapters: 0, embeddings: 0 });
        };
        let (name, entries) = match source {
            Source::Single { name, blob } => (s.model_name.clone(), vec![(name, blob)]),
            Source::Folder { name, files } => (name, files),
        };
        let kind = s.source_kind.clone();
        let record = s.model_record.take();
        let info = load_into(s, &g, entries, &name, &kind, dt, record).await?;
        let mut embeddings = 0;
        if let Some(pipe) = s.pipe.as_mut() {
            for (blob, file) in &s.embeddings {
                let emb = open_textual_inversion(BlobReader::new(blob.clone(), file.clone()), file).map_err(err)?;
                pipe.add_embedding(&g, &emb).map_err(err)?;
                embeddings += 1;
            }
        }
        to_js(&Recovered { model: Some(info), adapters: s.loras.len(), embeddings })
    })
    .await
}
