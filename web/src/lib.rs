//! Browser bindings of the loralab engine. Loaded by `www/worker.js` (a module Web Worker) and
//! usable from a page as well:
//!
//! ```js
//! import load, { init, self_test } from "./loralab_web.js";
//! await load();                      // instantiate the wasm module (the default export)
//! const info = await init();         // adapter, caps, features (throws without WebGPU)
//! const report = await self_test();  // every kernel against its CPU reference
//! ```
//!
//! The text-to-image engine (`engine.rs`): `load_model`, `generate`, `lora_add`, `lora_set`,
//! `lora_remove`, `embedding_add`, `gpu_memory`; PNG files (`png.rs`): `parameters_read`,
//! `png_annotate` (the XMP packet for a canvas-drawn PNG); and merging the adapters into the
//! model's files (`merge.rs`) — files come in as Blobs and are read by byte ranges
//! (`files.rs`), never whole into wasm memory.
//! Training a LoRA step by step (`train.rs`): `train_start`, `train_step`, `train_samples`,
//! `train_save_state`, `train_export`, `train_handoff`, `train_cancel`.
//! One UNet step for the side-by-side benchmark page (`bench.rs`): `bench_unet_load`,
//! `bench_unet_step`, `bench_unet_free`.
//!
//! Errors are thrown as `Error` objects carrying the engine's message; a missing WebGPU adapter
//! throws one named `NoAdapterError` so the page can explain what to enable.

#![cfg(target_arch = "wasm32")]

mod bench;
mod engine;
mod files;
mod merge;
mod png;
mod train;

use loralab::selftest;
use loralab::{Error, Gpu, GpuOptions};
use serde::Serialize;
use std::cell::RefCell;
use std::rc::Rc;
use wasm_bindgen::prelude::*;

thread_local! {
    static GPU: RefCell<Option<Rc<Gpu>>> = const { RefCell::new(None) };
}

#[wasm_bindgen(start)]
pub fn start() {
    console_error_panic_hook::set_once();
}

/// The crate version, for the page footer.
#[wasm_bindgen]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

pub(crate) fn js_error(e: &Error) -> JsValue {
    let err = js_sys::Error::new(&e.to_string());
    err.set_name(match e {
        Error::NoAdapter(_) => "NoAdapterError",
        Error::DeviceLost(_) => "DeviceLostError",
        _ => "LoralabError",
    });
    err.into()
}

pub(crate) fn to_js<T: Serialize>(v: &T) -> Result<JsValue, JsValue> {
    v.serialize(&serde_wasm_bindgen::Serializer::json_compatible())
        .map_err(|e| js_sys::Error::new(&format!("serialising the result failed: {e}")).into())
}

/// The open device, opening it on first use. Once it is lost this is `DeviceLostError` until
/// `recover` (engine.rs) has opened a new one and loaded the model onto it again: the model's
/// buffers belong to the lost device and must never meet a new one.
pub(crate) async fn gpu() -> Result<Rc<Gpu>, JsValue> {
    if let Some(g) = GPU.with_borrow(|g| g.clone()) {
        g.check_lost().map_err(|e| js_error(&e))?;
        return Ok(g);
    }
    reopen_gpu().await
}

/// Opens a new device in place of the current one (lost or not).
pub(crate) async fn reopen_gpu() -> Result<Rc<Gpu>, JsValue> {
    let g = Rc::new(Gpu::new(GpuOptions::default()).await.map_err(|e| js_error(&e))?);
    GPU.with_borrow_mut(|slot| *slot = Some(Rc::clone(&g)));
    Ok(g)
}

/// Resolves with the reason once the open device is lost (`GPUDevice.lost`: a driver reset,
/// the browser reclaiming the GPU, `device_destroy`).
#[wasm_bindgen]
pub async fn device_lost() -> Result<String, JsValue> {
    let g = gpu().await?;
    Ok(g.lost().await)
}

/// Destroys the open device as a driver reset would (the page's fault tests use it).
#[wasm_bindgen]
pub fn device_destroy() {
    if let Some(g) = GPU.with_borrow(|g| g.clone()) {
        g.destroy();
    }
}

/// `performance.now()` in a page or a worker (milliseconds).
pub(crate) fn now() -> f64 {
    js_sys::Reflect::get(&js_sys::global(), &JsValue::from_str("performance"))
        .ok()
        .and_then(|p| p.dyn_into::<web_sys::Performance>().ok())
        .map_or_else(js_sys::Date::now, |p| p.now())
}

/// Opens the GPU and returns `{ adapter, caps, adapter_features, memory, pipelines }`.
#[wasm_bindgen(js_name = init)]
pub async fn init_gpu() -> Result<JsValue, JsValue> {
    let g = gpu().await?;
    to_js(&selftest::describe(&g))
}

/// Runs the kernel self-test and returns the report
/// (`{ adapter, caps, families, cases: [{op, case, nmse, bound, passed, ms, error}], passed,
/// failed, total_ms }`).
#[wasm_bindgen]
pub async fn self_test() -> Result<JsValue, JsValue> {
    let g = gpu().await?;
    let report = selftest::run_with_clock(&g, &now).await;
    to_js(&report)
}
