//! CLIP text encoder against transformers' `CLIPTextModel` on the two fixture models
//! (tests/fixtures/refs/<model>/text_encoder.safetensors: every hidden state, prompt_embeds and
//! the diffusers clip-skip embeddings for the case prompt, the negative prompt and ""), plus
//! the prompt embeddings recorded in a pipeline run (ddim.safetensors).
//!
//! Error measure: max |got - want| / max |want| over a tensor ("relative"), and nmse.

use crate::common::*;
use loralab::io::safetensors::SafetensorsFile;
use loralab::model::checkpoint;
use loralab::model::clip::{ClipTextConfig, ClipTextModel, EncodeOpts};
use loralab::model::{ClipTokenizer, SafetensorsSource, WeightPolicy};
use loralab::model::WeightSource;
use loralab::quant::{nmse, round_trip, DType};
use loralab::{Error, Gpu, Tensor};
use std::path::{Path, PathBuf};

const MODELS: [&str; 2] = ["tiny-sd15-a", "tiny-sd15-b"];

/// Bound on the relative error for f32 weights (and f16 weights, which hold these fixtures'
/// values exactly). Measured on lavapipe: relative 7.0e-7 / nmse 1.4e-13 (model a), 1.5e-6 /
/// 5.4e-13 (model b), on both devices.
const F32_REL: f64 = 2e-5;
/// Quantized linear weights against transformers' f32 outputs. Hidden size 8 makes every
/// weight row one q8_0/q4_0 block padded from 8 (or 24/32) values, and the random weights'
/// layer norms amplify the rounding, so these are loose. Measured (worst tensor, both devices):
/// q8_0 relative 1.1e-1 / nmse 5.5e-3 (model b; a: 1.5e-2 / 2.7e-4); q4_0 relative 7.4e-1 /
/// nmse 5.5e-1 (model b; a: 4.0e-1 / 6.4e-2). That the kernels compute the quantized model
/// exactly is checked separately (`quantized_kernels_equal_dequantized_f32_model`).
const Q8_REL: f64 = 0.25;
const Q8_NMSE: f64 = 1.5e-2;
const Q4_REL: f64 = 1.5;
const Q4_NMSE: f64 = 1.0;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn manifest() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest");
    serde_json::from_str(&text).expect("manifest JSON")
}

/// (label in the reference file, text) for the case prompt, negative prompt and "".
fn prompts(model: &str) -> Vec<(&'static str, String)> {
    let case = &manifest()["pipelines"][model]["cases"]["ddim"];
    vec![
        ("prompt", case["prompt"].as_str().expect("prompt").to_string()),
        ("negative_prompt", case["negative_prompt"].as_str().expect("negative prompt").to_string()),
        ("empty", String::new()),
    ]
}

fn config(model: &str) -> ClipTextConfig {
    let path = fixtures().join("models").join(model).join("text_encoder/config.json");
    let text = std::fs::read_to_string(&path).expect("text encoder config");
    ClipTextConfig::from_json(&text, &path.display().to_string()).expect("config")
}

fn source(model: &str) -> SafetensorsSource<loralab::io::LocalFile> {
    let path = fixtures().join("models").join(model).join("text_encoder/model.safetensors");
    SafetensorsSource::new(SafetensorsFile::open_path(path).expect("text encoder weights"), "")
}

fn load(gpu: &Gpu, model: &str, matrices: DType, table: DType) -> ClipTextModel {
    ClipTextModel::load_with_table(gpu, &config(model), &source(model), WeightPolicy::new(matrices), table)
        .unwrap_or_else(|e| panic!("{model}: {e}"))
}

/// Padded token ids of the three prompts.
fn ids(model: &str) -> Vec<Vec<u32>> {
    let tok = ClipTokenizer::from_dir(fixtures().join("models").join(model).join("tokenizer")).expect("tokenizer");
    prompts(model).iter().map(|(_, p)| tok.encode_padded(p)).collect()
}

fn refs(model: &str, file: &str) -> SafetensorsFile<loralab::io::LocalFile> {
    SafetensorsFile::open_path(fixtures().join("refs").join(model).join(file)).expect("references")
}

fn rel(got: &[f32], want: &[f32]) -> f64 {
    let diff = got.iter().zip(want).map(|(g, w)| (g - w).abs() as f64).fold(0.0, f64::max);
    let scale = want.iter().map(|w| w.abs() as f64).fold(0.0, f64::max);
    diff / scale
}

/// Worst relative error and nmse seen, for the report.
#[derive(Default)]
struct Worst {
    rel: f64,
    nmse: f64,
}

impl Worst {
    fn check(&mut self, what: &str, got: &[f32], want: &[f32], rel_bound: f64, nmse_bound: f64) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite output");
        let (r, e) = (rel(got, want), nmse(got, want));
        assert!(r <= rel_bound && e <= nmse_bound, "{what}: relative {r:e} (bound {rel_bound:e}), nmse {e:e} (bound {nmse_bound:e})");
        if std::env::var("CLIP_VERBOSE").is_ok() { eprintln!("  {what}: rel {r:.2e} nmse {e:.2e}"); }
        self.rel = self.rel.max(r);
        self.nmse = self.nmse.max(e);
    }
}

/// One batch row `b` of a `[B, S, D]` readback.
fn row(all: &[f32], b: usize, batch: usize) -> &[f32] {
    let n = all.len() / batch;
    &all[b * n..(b + 1) * n]
}

/// Every reference tensor of `text_encoder.safetensors` (and ddim's prompt embeddings) for
/// one model and storage choice; returns the worst errors.
fn compare(gpu: &Gpu, model: &str, matrices: DType, table: DType, rel_bound: f64, nmse_bound: f64) -> Worst {
    let m = load(gpu, model, matrices, table);
    let ids = ids(model);
    let rows: Vec<&[u32]> = ids.iter().map(|r| &r[..]).collect();
    let labels = prompts(model);
    let r = refs(model, "text_encoder.safetensors");
    let b = rows.len();
    let what = |s: &str| format!("{model} {matrices} table {table}: {s}");
    let mut worst = Worst::default();

    let states = m.hidden_states(gpu, &rows).expect("hidden states");
    assert_eq!(states.len(), config(model).num_hidden_layers + 1);
    for (k, st) in states.iter().enumerate() {
        let got = read(gpu, st);
        for (i, (label, _)) in labels.iter().enumerate() {
            let name = format!("{label}_hidden_state_{k}");
            let want = r.read_f32(&name).expect("reference");
            worst.check(&what(&name), row(&got, i, b), &want, rel_bound, nmse_bound);
        }
    }
    for skip in 0..=2 {
        let got = read(gpu, &m.encode(gpu, &rows, EncodeOpts::clip_skip(skip)).expect("encode"));
        for (i, (label, _)) in labels.iter().enumerate() {
            let base = if *label == "empty" { "empty_embeds".to_string() } else { format!("{label}_embeds") };
            let name = if skip == 0 { base } else { format!("{base}_clip_skip_{skip}") };
            let want = r.read_f32(&name).expect("reference");
            worst.check(&what(&name), row(&got, i, b), &want, rel_bound, nmse_bound);
        }
    }
    // The embeddings the ddim pipeline run used, encoded one prompt at a time.
    let ddim = refs(model, "ddim.safetensors");
    for (i, name) in ["prompt_embeds", "negative_prompt_embeds"].into_iter().enumerate() {
        let got = read(gpu, &m.encode(gpu, &[&ids[i]], EncodeOpts::default()).expect("encode"));
        worst.check(&what(&format!("ddim {name}")), &got, &ddim.read_f32(name).unwrap(), rel_bound, nmse_bound);
    }
    worst
}

#[test]
fn f32_matches_transformers() {
    for gpu in gpus() {
        for model in MODELS {
            let w = compare(gpu, model, DType::F32, DType::F32, F32_REL, 1e-9);
            eprintln!("clip {model} f32: relative {:.2e}, nmse {:.2e}", w.rel, w.nmse);
        }
    }
}

#[test]
fn f16_weights_and_table_match_transformers() {
    // These fixtures' weights are exact in f16, so f16 storage keeps the f32 bound.
    for model in MODELS {
        let w = compare(gpu(), model, DType::F16, DType::F16, F32_REL, 1e-9);
        eprintln!("clip {model} f16: relative {:.2e}, nmse {:.2e}", w.rel, w.nmse);
    }
}

#[test]
fn quantized_matrices_within_bounds() {
    for model in MODELS {
        let w = compare(gpu(), model, DType::Q8_0, DType::F32, Q8_REL, Q8_NMSE);
        eprintln!("clip {model} q8_0: relative {:.2e}, nmse {:.2e}", w.rel, w.nmse);
        let w = compare(gpu(), model, DType::Q4_0, DType::F32, Q4_REL, Q4_NMSE);
        eprintln!("clip {model} q4_0: relative {:.2e}, nmse {:.2e}", w.rel, w.nmse);
    }
}

#[test]
fn clip_skip_conventions_and_pooled_output() {
    let gpu = gpu();
    let model = "tiny-sd15-b";
    let m = load(gpu, model, DType::F32, DType::F32);
    let ids = ids(model);
    let rows: Vec<&[u32]> = ids.iter().map(|r| &r[..]).collect();
    // A1111 "Clip skip 2" = diffusers clip_skip 1 = penultimate; A1111 1 = no skip.
    assert_eq!(EncodeOpts::a1111(2), EncodeOpts::penultimate());
    assert_eq!(EncodeOpts::a1111(1), EncodeOpts::default());
    // Without the final norm the chosen state is the raw hidden state (SDXL style).
    let states = m.hidden_states(gpu, &rows).unwrap();
    let raw = m.encode(gpu, &rows, EncodeOpts { clip_skip: 1, final_norm: false }).unwrap();
    assert_eq!(read(gpu, &raw), read(gpu, &states[states.len() - 2]));
    // clip_skip = layer count gives the normalised embeddings; more is an error.
    let n = m.num_layers();
    let e0 = m.encode(gpu, &rows, EncodeOpts::clip_skip(n)).unwrap();
    assert_nmse("clip_skip = layers", &read(gpu, &e0), &read(gpu, &m.final_layer_norm(gpu, &states[0]).unwrap()), STRICT);
    let e = m.encode(gpu, &rows, EncodeOpts::clip_skip(n + 1)).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }) && e.to_string().contains("clip_skip"), "{e}");
    // pooler_output: eos_token_id is the legacy 2 in these configs, so the argmax row.
    let last = m.encode(gpu, &rows, EncodeOpts::default()).unwrap();
    let pooled = read(gpu, &m.pooled(gpu, &last, &rows).unwrap());
    let all = read(gpu, &last);
    let d = config(model).hidden_size;
    for (b, r) in ids.iter().enumerate() {
        let j = r.iter().position(|&t| t == *r.iter().max().unwrap()).unwrap();
        let s = r.len();
        assert_eq!(&pooled[b * d..(b + 1) * d], &all[(b * s + j) * d..(b * s + j + 1) * d], "row {b}");
    }
}

#[test]
fn mismatched_config_or_ids_are_clear_errors() {
    let gpu = gpu_plain();
    let model = "tiny-sd15-a";
    // intermediate_size that the file does not have: the fc1 weight is named with both shapes.
    let mut c = config(model);
    c.intermediate_size += 8;
    let e = ClipTextModel::load(gpu, &c, &source(model), WeightPolicy::default()).err().expect("mismatch");
    let msg = e.to_string();
    assert!(matches!(e, Error::Format { .. }) && msg.contains("mlp.fc1.weight") && msg.contains("[40, 8]"), "{msg}");
    // More layers than the file holds: the missing tensor is named.
    let mut c = config(model);
    c.num_hidden_layers += 1;
    let e = ClipTextModel::load(gpu, &c, &source(model), WeightPolicy::default()).err().expect("missing layer");
    assert!(e.to_string().contains("layers.2."), "{e}");
    // A config whose heads do not divide the width, an unknown activation; bad ids.
    let mut c = config(model);
    c.num_attention_heads = 3;
    let e = ClipTextModel::load(gpu, &c, &source(model), WeightPolicy::default()).err().expect("heads");
    assert!(e.to_string().contains("num_attention_heads"), "{e}");
    let mut c = config(model);
    c.hidden_act = "relu6".into();
    let e = ClipTextModel::load(gpu, &c, &source(model), WeightPolicy::default()).err().expect("act");
    assert!(e.to_string().contains("relu6"), "{e}");
    let m = load(gpu, model, DType::F32, DType::F32);
    let long = vec![0u32; 78];
    let e = m.encode(gpu, &[&long], EncodeOpts::default()).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }) && e.to_string().contains("78 tokens"), "{e}");
    let e = m.encode(gpu, &[&[49408u32][..]], EncodeOpts::default()).unwrap_err();
    assert!(e.to_string().contains("49408"), "{e}");
    let e = m.encode(gpu, &[&[1u32, 2][..], &[1u32][..]], EncodeOpts::default()).unwrap_err();
    assert!(e.to_string().contains("[2, 1]"), "{e}");
    assert!(ClipTextModel::load_with_table(gpu, &config(model), &source(model), WeightPolicy::default(), DType::Q8_0).is_err());
}

/// The fixture's parameters with every quantized request answered by f32 values that went
/// through the quantizer's round trip: the f32 model that a quantized model approximates.
struct Dequantized(SafetensorsSource<loralab::io::LocalFile>);

impl WeightSource for Dequantized {
    fn load(&self, gpu: &Gpu, name: &str, shape: &[usize], dtype: DType) -> loralab::Result<Tensor> {
        let values = self.0.file().read_f32(name)?;
        let cols: usize = shape[1..].iter().product();
        Tensor::from_f32(gpu, shape, &round_trip(&values, shape[0], cols, dtype))
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
}

#[test]
fn quantized_kernels_equal_dequantized_f32_model() {
    // Measured: bit-identical (relative 0) for both formats and models: the kernels dequantize
    // exactly what the CPU round trip does and accumulate in the same order.
    let gpu = gpu();
    for model in MODELS {
        let ids = ids(model);
        let rows: Vec<&[u32]> = ids.iter().map(|r| &r[..]).collect();
        for dtype in [DType::Q8_0, DType::Q4_0] {
            let q = load(gpu, model, dtype, DType::F32);
            let f = ClipTextModel::load(gpu, &config(model), &Dequantized(source(model)), WeightPolicy::new(dtype))
                .unwrap();
            for skip in [0, 1] {
                let got = read(gpu, &q.encode(gpu, &rows, EncodeOpts::clip_skip(skip)).unwrap());
                let want = read(gpu, &f.encode(gpu, &rows, EncodeOpts::clip_skip(skip)).unwrap());
                Worst::default().check(&format!("{model} {dtype} clip_skip {skip}"), &got, &want, F32_REL, 1e-9);
            }
        }
    }
}

#[test]
fn loads_through_checkpoint_folder_and_single_file() {
    // The folder (a: f32, b: f16 tensors) and the CompVis-named single file (a: f16, b: bf16)
    // hold the same numbers, so both give the f32 references within the f32 bound.
    let gpu = gpu_plain();
    for model in MODELS {
        let folder = fixtures().join("models").join(model);
        let file = fixtures().join("models").join(format!("{model}.safetensors"));
        let want = refs(model, "text_encoder.safetensors");
        for ck in [checkpoint::open_path(&folder, None), checkpoint::open_path(&file, Some(&folder))] {
            let ck = ck.unwrap_or_else(|e| panic!("{model}: {e}"));
            let m = ClipTextModel::load(gpu, &ck.config.text_encoder, &ck.text_encoder, WeightPolicy::default())
                .unwrap_or_else(|e| panic!("{model}: {e}"));
            let ids = ck.tokenizer.encode_padded(&prompts(model)[0].1);
            for (skip, name) in [(0, "prompt_embeds"), (1, "prompt_embeds_clip_skip_1")] {
                let got = read(gpu, &m.encode(gpu, &[&ids], EncodeOpts::clip_skip(skip)).unwrap());
                let what = format!("{model} {:?} {name}", ck.layout);
                Worst::default().check(&what, &got, &want.read_f32(name).unwrap(), F32_REL, 1e-9);
            }
        }
    }
}
