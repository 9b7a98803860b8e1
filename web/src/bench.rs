//! One UNet step at a time, for the side-by-side benchmark page (tools/bench/web/): the page
//! loads a UNet from its diffusers folder (`unet/config.json` and the weights file as Blobs)
//! and times `bench_unet_step`, which uploads the inputs, runs the forward pass and reads the
//! prediction back — the same work an onnxruntime-web `session.run` with CPU outputs does.
//! Kept apart from the text-to-image engine's state (`engine.rs`): loading a bench UNet does
//! not touch the loaded model.

use crate::files::BlobReader;
use crate::{gpu, js_error, now, to_js};
use loralab::io::safetensors::SafetensorsFile;
use loralab::model::config::UNetConfig;
use loralab::model::unet::UNet2DConditionModel;
use loralab::model::weights::{SafetensorsSource, WeightPolicy};
use loralab::tensor::Tensor;
use loralab::{DType, Error};
use serde::Serialize;
use std::cell::RefCell;
use wasm_bindgen::prelude::*;
use web_sys::Blob;

thread_local! {
    static UNET: RefCell<Option<UNet2DConditionModel>> = const { RefCell::new(None) };
}

fn invalid(msg: impl Into<String>) -> JsValue {
    js_error(&Error::Invalid(msg.into()))
}

#[derive(Serialize)]
struct Loaded {
    weights: String,
    in_channels: usize,
    cross_attention_dim: usize,
    size_multiple: usize,
    /// GPU bytes of the UNet's weights.
    bytes: u64,
    load_ms: f64,
}

/// Loads the UNet of a diffusers folder (`config`: the text of `unet/config.json`, `weights`:
/// its safetensors file) with matrices stored as `weights_type` (f32, f16, q8_0, q4_0),
/// replacing the previous bench UNet. Returns `{weights, in_channels, cross_attention_dim,
/// size_multiple, bytes, load_ms}`.
#[wasm_bindgen]
pub async fn bench_unet_load(config: String, weights: Blob, weights_type: String) -> Result<JsValue, JsValue> {
    let dt = DType::parse(&weights_type)
        .ok_or_else(|| invalid(format!("weight type `{weights_type}`: expected f32, f16, q8_0 or q4_0")))?;
    let g = gpu().await?;
    UNET.with_borrow_mut(|u| *u = None);
    g.trim();
    let t0 = now();
    let cfg = UNetConfig::from_json(&config, "unet/config.json").map_err(|e| js_error(&e))?;
    let name = "unet/diffusion_pytorch_model.safetensors";
    let file = SafetensorsFile::open(BlobReader::new(weights, name), name).map_err(|e| js_error(&e))?;
    let before = g.memory().live_bytes;
    let unet = UNet2DConditionModel::load(&g, &cfg, &SafetensorsSource::new(file, ""), WeightPolicy::new(dt))
        .map_err(|e| js_error(&e))?;
    g.sync().await.map_err(|e| js_error(&e))?;
    let info = Loaded {
        weights: dt.name().to_string(),
        in_channels: cfg.in_channels,
        cross_attention_dim: unet.cross_attention_dim(),
        size_multiple: unet.size_multiple(),
        bytes: g.memory().live_bytes.saturating_sub(before),
        load_ms: now() - t0,
    };
    UNET.with_borrow_mut(|u| *u = Some(unet));
    to_js(&info)
}

/// One UNet step: uploads `sample` (`[B, C, h, w]`, shape in `sample_shape`) and
/// `encoder_hidden_states` (`[B, tokens, D]`), runs the forward pass at `timestep` and returns
/// the prediction read back from the GPU.
#[wasm_bindgen]
pub async fn bench_unet_step(
    sample: Vec<f32>,
    sample_shape: Vec<u32>,
    timestep: f32,
    encoder_hidden_states: Vec<f32>,
    tokens: u32,
) -> Result<Vec<f32>, JsValue> {
    let g = gpu().await?;
    let shape: Vec<usize> = sample_shape.iter().map(|&d| d as usize).collect();
    if shape.len() != 4 || shape.iter().product::<usize>() != sample.len() {
        return Err(invalid(format!("sample of {} values does not have shape {shape:?}", sample.len())));
    }
    let unet = UNET.with_borrow_mut(|u| u.take()).ok_or_else(|| invalid("no bench UNet is loaded (bench_unet_load)"))?;
    let d = unet.cross_attention_dim();
    let ctx_shape = [shape[0], tokens as usize, d];
    let r = async {
        if ctx_shape.iter().product::<usize>() != encoder_hidden_states.len() {
            return Err(Error::Invalid(format!(
                "encoder_hidden_states of {} values does not have shape {ctx_shape:?}",
                encoder_hidden_states.len()
            )));
        }
        let x = Tensor::from_f32(&g, &shape, &sample)?;
        let ctx = Tensor::from_f32(&g, &ctx_shape, &encoder_hidden_states)?;
        let out = unet.forward(&g, &x, &[timestep], &ctx)?;
        out.to_f32(&g).await
    }
    .await;
    UNET.with_borrow_mut(|u| *u = Some(unet));
    r.map_err(|e| js_error(&e))
}

/// Frees the bench UNet.
#[wasm_bindgen]
pub async fn bench_unet_free() -> Result<(), JsValue> {
    UNET.with_borrow_mut(|u| *u = None);
    gpu().await?.trim();
    Ok(())
}
