//! PNG files in the Worker: reading the A1111 `parameters` of a dropped image, and putting the
//! XMP packet (AI-generated, the software, the model's and adapters' files with their hashes)
//! into a PNG drawn on a canvas (the X/Y grid), as every PNG the engine itself writes has.

use crate::files::BlobReader;
use crate::{js_error, to_js};
use loralab::parameters;
use loralab::Error;
use serde::Serialize;
use wasm_bindgen::prelude::*;
use web_sys::Blob;

fn err(e: Error) -> JsValue {
    js_error(&e)
}

#[derive(Serialize)]
struct ReadParameters {
    prompt: String,
    negative: String,
    seed: Option<u64>,
    steps: Option<usize>,
    cfg: Option<f32>,
    sampler: Option<String>,
    width: Option<usize>,
    height: Option<usize>,
    raw: String,
}

/// Reads the A1111 `parameters` of a PNG.
#[wasm_bindgen]
pub fn parameters_read(file: Blob, name: String) -> Result<JsValue, JsValue> {
    let bytes = BlobReader::new(file, name.clone()).read_all().map_err(err)?;
    let (p, text) = parameters::read_png(&bytes, &name).map_err(err)?;
    to_js(&ReadParameters {
        prompt: p.prompt,
        negative: p.negative,
        seed: p.seed,
        steps: p.steps,
        cfg: p.cfg,
        sampler: p.sampler.map(|s| s.name().to_string()),
        width: p.width,
        height: p.height,
        raw: text,
    })
}

/// Returns the PNG `file` with the XMP packet of the loaded model and adapters (an `iTXt` chunk
/// after `IHDR`); `description` (what the image shows) becomes its `dc:description`.
#[wasm_bindgen]
pub fn png_annotate(file: Blob, name: String, description: String) -> Result<js_sys::Uint8Array, JsValue> {
    let provenance = crate::engine::provenance_now(description)?;
    let bytes = BlobReader::new(file, name.clone()).read_all().map_err(err)?;
    let out = loralab::io::png::add_xmp(&bytes, &provenance.to_xmp(), &name).map_err(err)?;
    Ok(js_sys::Uint8Array::from(&out[..]))
}
