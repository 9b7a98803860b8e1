//! UNet2DConditionModel against diffusers 0.42.1: the fixture models' single UNet calls at
//! t = 999, 500, 1 (refs/<model>/unet.safetensors) and the batch-2 classifier-free-guidance
//! calls recorded inside the sampler references, with f32, f16, q8_0 and q4_0 weights; plus
//! config / weight mismatch and bad-input errors.
//!
//! Measured on lavapipe (relative error = sqrt(Σ(got-want)²/Σwant²)): f32 and f16 weights
//! ≤ 1.9e-6 for model a and ≤ 8.4e-7 for model b, single calls and batch-2 steps (bound
//! 1e-4); q8_0 1.4e-2 / 5.5e-3 (bound 3e-2) and q4_0 0.25 / 0.095 (bound 0.4) from diffusers,
//! bit-identical to an f32 model holding the same rounded weights (bound 1e-5). About
//! 120–250 ms per forward once the pipelines are built.

use super::common::{block, gpu, gpu_plain};
use loralab::io::safetensors::SafetensorsFile;
use loralab::model::config::{PerLevel, UNetConfig};
use loralab::model::unet::UNet2DConditionModel;
use loralab::model::{SafetensorsSource, WeightPolicy};
use loralab::model::WeightSource;
use loralab::quant::{nmse, round_trip};
use loralab::{DType, Error, Gpu, Tensor};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn config(model: &str) -> UNetConfig {
    let text = std::fs::read_to_string(fixtures().join(format!("models/{model}/unet/config.json"))).unwrap();
    UNetConfig::from_json(&text, &format!("{model}/unet/config.json")).unwrap()
}

fn source(model: &str) -> SafetensorsSource<loralab::io::LocalFile> {
    let path = fixtures().join(format!("models/{model}/unet/diffusion_pytorch_model.safetensors"));
    SafetensorsSource::new(SafetensorsFile::open_path(path).unwrap(), "")
}

fn load(gpu: &Gpu, model: &str, weights: DType) -> UNet2DConditionModel {
    UNet2DConditionModel::load(gpu, &config(model), &source(model), WeightPolicy::new(weights))
        .unwrap_or_else(|e| panic!("{model}: {e}"))
}

fn refs(model: &str, name: &str) -> SafetensorsFile<loralab::io::LocalFile> {
    SafetensorsFile::open_path(fixtures().join(format!("refs/{model}/{name}.safetensors"))).unwrap()
}

fn upload(gpu: &Gpu, f: &SafetensorsFile<loralab::io::LocalFile>, name: &str) -> Tensor {
    let shape: Vec<usize> = f.get(name).unwrap().shape.clone();
    Tensor::from_f32(gpu, &shape, &f.read_f32(name).unwrap()).unwrap()
}

fn read(gpu: &Gpu, t: &Tensor) -> Vec<f32> {
    block(t.to_f32(gpu)).unwrap()
}

/// Relative error sqrt(Σ(a-b)²/Σb²).
fn rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|v| v.is_finite()), "non-finite output");
    nmse(got, want).sqrt()
}

const MODELS: [&str; 2] = ["tiny-sd15-a", "tiny-sd15-b"];

/// Runs the three single calls; returns the worst relative error.
fn single_calls(gpu: &Gpu, model: &str, label: &str, unet: &UNet2DConditionModel) -> f64 {
    let r = refs(model, "unet");
    let sample = upload(gpu, &r, "sample");
    let ctx = upload(gpu, &r, "encoder_hidden_states");
    let mut worst = 0f64;
    for t in [999u32, 500, 1] {
        let start = Instant::now();
        let out = unet.forward(gpu, &sample, &[t as f32], &ctx).unwrap();
        let got = read(gpu, &out);
        let ms = start.elapsed().as_secs_f64() * 1e3;
        assert_eq!(out.shape(), [1, 4, 8, 8]);
        let e = rel(&got, &r.read_f32(&format!("noise_pred_t{t}")).unwrap());
        eprintln!("{model} {label} t={t}: relative error {e:.2e}, {ms:.1} ms");
        worst = worst.max(e);
    }
    worst
}

#[test]
fn unet_matches_diffusers_in_f32() {
    for model in MODELS {
        for g in [gpu(), gpu_plain()] {
            let unet = load(g, model, DType::F32);
            let e = single_calls(g, model, "f32", &unet);
            assert!(e <= 1e-4, "{model}: relative error {e:e} > 1e-4");
        }
    }
}

/// Model weights with every matrix rounded through `dtype` and stored as f32: the exact
/// numbers a `dtype` model computes with.
struct RoundTrip<S> {
    inner: S,
    dtype: DType,
}

impl<S: WeightSource> WeightSource for RoundTrip<S> {
    fn load(&self, gpu: &Gpu, name: &str, shape: &[usize], dtype: DType) -> loralab::Result<Tensor> {
        let t = self.inner.load(gpu, name, shape, DType::F32)?;
        if dtype == DType::F32 {
            return Ok(t);
        }
        assert_eq!(dtype, self.dtype, "{name}");
        let (rows, cols) = t.rows_cols();
        let values = round_trip(&read(gpu, &t), rows, cols, dtype);
        Tensor::from_f32(gpu, shape, &values)
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[test]
fn unet_matches_diffusers_with_f16_and_quantized_weights() {
    // The fixture weights are exactly representable in f16, so f16 storage is lossless up to
    // f32 rounding; q8_0 and q4_0 round every weight matrix (these tiny layers have K = 16..128,
    // and random full-scale weights), so their distance from diffusers is the quantization's.
    // Against an f32 model holding the same rounded weights they must agree to f32 precision.
    for model in MODELS {
        for (dtype, bound) in [(DType::F16, 1e-4), (DType::Q8_0, 3e-2), (DType::Q4_0, 0.4)] {
            let unet = load(gpu(), model, dtype);
            let e = single_calls(gpu(), model, &dtype.to_string(), &unet);
            eprintln!("{model} {dtype}: worst relative error {e:.2e} against diffusers");
            assert!(e <= bound, "{model} {dtype}: relative error {e:e} > {bound:e}");

            let rounded = RoundTrip { inner: source(model), dtype };
            let same = UNet2DConditionModel::load(gpu(), &config(model), &rounded, WeightPolicy::new(dtype)).unwrap();
            let r = refs(model, "unet");
            let sample = upload(gpu(), &r, "sample");
            let ctx = upload(gpu(), &r, "encoder_hidden_states");
            let got = read(gpu(), &unet.forward(gpu(), &sample, &[500.0], &ctx).unwrap());
            let want = read(gpu(), &same.forward(gpu(), &sample, &[500.0], &ctx).unwrap());
            let e = rel(&got, &want);
            eprintln!("{model} {dtype}: relative error {e:.2e} against f32 on the rounded weights");
            assert!(e <= 1e-5, "{model} {dtype}: {e:e} from the f32 model on rounded weights");
        }
    }
}

/// The UNet timesteps of a sampler case, from the manifest.
fn unet_timesteps(model: &str, case: &str) -> Vec<f32> {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap()).unwrap();
    m["pipelines"][model]["cases"][case]["unet_timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn unet_matches_sampler_steps_at_batch_2() {
    // Classifier-free guidance: the latent duplicated, [negative, prompt] embeddings.
    let g = gpu();
    for model in MODELS {
        let unet = load(g, model, DType::F32);
        for case in ["ddim", "euler"] {
            let r = refs(model, case);
            let ts = unet_timesteps(model, case);
            let neg = r.read_f32("negative_prompt_embeds").unwrap();
            let pos = r.read_f32("prompt_embeds").unwrap();
            let d = unet.cross_attention_dim();
            let ctx = Tensor::from_f32(g, &[2, neg.len() / d, d], &[neg, pos].concat()).unwrap();
            for (i, &t) in ts.iter().enumerate() {
                let x = r.read_f32(&format!("model_input_step_{i}")).unwrap();
                let sample = Tensor::from_f32(g, &[2, 4, 8, 8], &[x.clone(), x].concat()).unwrap();
                let start = Instant::now();
                let got = read(g, &unet.forward(g, &sample, &[t], &ctx).unwrap());
                let ms = start.elapsed().as_secs_f64() * 1e3;
                let e = rel(&got, &r.read_f32(&format!("unet_output_step_{i}")).unwrap());
                eprintln!("{model} {case} step {i} (t={t}, batch 2): relative error {e:.2e}, {ms:.1} ms");
                assert!(e <= 1e-4, "{model} {case} step {i}: relative error {e:e} > 1e-4");
                if i > 0 {
                    continue;
                }
                // Per-item timesteps give the same result.
                let got2 = read(g, &unet.forward(g, &sample, &[t, t], &ctx).unwrap());
                assert!(rel(&got2, &got) <= 1e-6);
            }
        }
    }
}

#[test]
fn unet_rejects_weights_of_another_configuration() {
    let g = gpu();
    // Model a's weights under model b's config: shapes or names differ.
    let err = UNet2DConditionModel::load(g, &config("tiny-sd15-b"), &source("tiny-sd15-a"), WeightPolicy::default())
        .err()
        .expect("model a's weights must not load as model b");
    assert!(matches!(err, Error::Format { tensor: Some(_), .. }), "{err}");
    eprintln!("a weights, b config: {err}");

    // A config without model a's first-level attentions: every tensor it asks for exists, but
    // the file has transformer layers the config lacks.
    let mut c = config("tiny-sd15-a");
    c.down_block_types[0] = "DownBlock2D".into();
    c.up_block_types[1] = "UpBlock2D".into();
    let err = UNet2DConditionModel::load(g, &c, &source("tiny-sd15-a"), WeightPolicy::default())
        .err()
        .expect("extra attention layers must be reported");
    match &err {
        Error::Format { tensor: Some(t), .. } => assert!(t.contains("attentions.0"), "{err}"),
        other => panic!("unexpected {other}"),
    }

    // Fewer layers per block than the file has.
    let mut c = config("tiny-sd15-b");
    c.layers_per_block = PerLevel::One(1);
    let err = UNet2DConditionModel::load(g, &c, &source("tiny-sd15-b"), WeightPolicy::default()).err().unwrap();
    assert!(matches!(err, Error::Format { tensor: Some(_), .. }), "{err}");

    // Wrong head count: the heads must divide the channels as diffusers does; 3 heads of a
    // 16-channel block leave 15 inner channels, which the weights contradict.
    let mut c = config("tiny-sd15-a");
    c.attention_head_dim = PerLevel::One(3);
    let err = UNet2DConditionModel::load(g, &c, &source("tiny-sd15-a"), WeightPolicy::default()).err().unwrap();
    assert!(matches!(err, Error::Format { tensor: Some(_), .. }), "{err}");

    // Settings outside SD1.x/SD2.x are refused, not approximated.
    // (Parsing refuses them too, naming the file: tests/engine/checkpoint.rs.)
    let mut sdxl = config("tiny-sd15-a");
    sdxl.addition_embed_type = Some("text_time".into());
    let err = UNet2DConditionModel::load(g, &sdxl, &source("tiny-sd15-a"), WeightPolicy::default())
        .err()
        .unwrap();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    assert!(UNetConfig::from_json("{\"block_out_channels\": \"x\"}", "unet/config.json").is_err());
}

#[test]
fn unet_rejects_bad_inputs() {
    let g = gpu();
    let unet = load(g, "tiny-sd15-b", DType::F32);
    let ctx = Tensor::zeros(g, &[2, 77, 8]).unwrap();
    let shape_err = |r: loralab::Result<Tensor>| matches!(r, Err(Error::Shape { .. }));
    // Height not a multiple of 4 (two downsamplers).
    assert!(shape_err(unet.forward(g, &Tensor::zeros(g, &[2, 4, 6, 8]).unwrap(), &[1.0], &ctx)));
    // Wrong channel count, batch mismatch, context width, timestep count.
    assert!(shape_err(unet.forward(g, &Tensor::zeros(g, &[2, 3, 8, 8]).unwrap(), &[1.0], &ctx)));
    assert!(shape_err(unet.forward(g, &Tensor::zeros(g, &[1, 4, 8, 8]).unwrap(), &[1.0], &ctx)));
    let wide = Tensor::zeros(g, &[2, 77, 16]).unwrap();
    assert!(shape_err(unet.forward(g, &Tensor::zeros(g, &[2, 4, 8, 8]).unwrap(), &[1.0], &wide)));
    assert!(shape_err(unet.forward(g, &Tensor::zeros(g, &[2, 4, 8, 8]).unwrap(), &[1.0, 2.0, 3.0], &ctx)));
    // A non-square latent of allowed size runs.
    let out = unet.forward(g, &Tensor::zeros(g, &[2, 4, 4, 12]).unwrap(), &[10.0], &ctx).unwrap();
    assert_eq!(out.shape(), [2, 4, 4, 12]);
}
