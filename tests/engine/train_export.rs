//! Exporting trained LoRA layers as kohya files (`loralab::train::export`): the inverse of the
//! adapter reader (every tensor, alpha and module back; every layer fits the fixture model;
//! the metadata in the summary and `loralab lora inspect`), the `sshs_*` hashes, errors, and
//! the committed fixture `tests/fixtures/lora_export/kohya_export.safetensors` — regenerated here
//! bit for bit — applied by the engine against diffusers' `load_lora_weights` references
//! (`tools/fixtures/train_export.py`).
//!
//! `LORALAB_WRITE_TRAIN_FIXTURE=1` rewrites the fixture file instead of comparing it (then run
//! the Python script to renew its references).

use super::common::{block, gpu};
use loralab::adapter;
use loralab::io::safetensors::SafetensorsFile;
use loralab::io::LocalFile;
use loralab::lora::{match_model, read_lora_for, Delta, HostTensor, LayerShape, LoraFile, ModelLayers, Target};
use loralab::model::checkpoint::{open_path, Checkpoint};
use loralab::model::clip::{ClipTextConfig, ClipTextModel, EncodeOpts};
use loralab::model::config::UNetConfig;
use loralab::model::unet::UNet2DConditionModel;
use loralab::model::{SafetensorsSource, WeightPolicy};
use loralab::rng::Rng;
use loralab::train::export::{export_kohya, kohya_name, model_hashes, safetensors_data_hash, ExportDtype, TrainedLayer, TrainingRecord};
use loralab::DType;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn model_dir() -> PathBuf {
    fixtures().join("models/tiny-sd15-a")
}

fn checkpoint() -> Checkpoint<LocalFile> {
    open_path(model_dir(), None).unwrap_or_else(|e| panic!("{e}"))
}

/// The modules kohya's `networks.lora` trains with `conv_dim` set: UNet Linear / Conv2d
/// children of Transformer2DModel (`attentions.*`), ResnetBlock2D, Downsample2D and
/// Upsample2D; text-encoder CLIPAttention / CLIPMLP linears. k×k convolutions get
/// (conv_dim, conv_alpha), the others (dim, alpha).
fn kohya_targets(layers: &ModelLayers) -> Vec<(Target, String, LayerShape)> {
    layers
        .iter()
        .filter(|(t, m, info)| {
            !matches!(info.shape, LayerShape::Norm { .. })
                && match t {
                    Target::Unet => [".attentions.", ".resnets.", ".downsamplers.", ".upsamplers."].iter().any(|p| m.contains(p)),
                    Target::TextEncoder => m.contains(".self_attn.") || m.contains(".mlp."),
                }
        })
        .map(|(t, m, info)| (t, m.to_string(), info.shape))
        .collect()
}

const DIM: usize = 4;
const ALPHA: f32 = 2.0;
const CONV_DIM: usize = 2;
const CONV_ALPHA: f32 = 1.0;

/// Seeded random factors, rounded to f16 values (so F16 and F32 files hold the same numbers):
/// down ~ N(0, 1/K), up ~ N(0, σ²) with σ sized so the adapter visibly changes the outputs.
fn seeded_layers(layers: &ModelLayers, seed: u64) -> Vec<TrainedLayer> {
    let mut rng = Rng::new(seed);
    let f16 = |v: f32| half::f16::from_f32(v).to_f32();
    kohya_targets(layers)
        .into_iter()
        .map(|(target, module, shape)| {
            let conv = shape.kernel() > 1;
            let (r, alpha) = if conv { (CONV_DIM, CONV_ALPHA) } else { (DIM, ALPHA) };
            let k = shape.cols();
            let sigma_up = match target {
                Target::Unet => 0.03,
                Target::TextEncoder => 0.03,
            };
            let down: Vec<f32> = rng.normal_vec(r * k).into_iter().map(|v| f16(v / (k as f32).sqrt())).collect();
            let up: Vec<f32> = rng.normal_vec(shape.out_dim() * r).into_iter().map(|v| f16(v * sigma_up)).collect();
            TrainedLayer {
                target,
                module,
                shape,
                down: HostTensor::new(vec![r, k], down).unwrap(),
                up: HostTensor::new(vec![shape.out_dim(), r], up).unwrap(),
                alpha,
            }
        })
        .collect()
}

/// The fixture's training record: fixed times and a small dataset description.
fn record() -> TrainingRecord {
    let mut tags = BTreeMap::new();
    tags.insert(
        "10_ohwx cat".to_string(),
        [("ohwx cat", 4u64), ("grass", 3), ("indoors", 1)].into_iter().map(|(t, n)| (t.to_string(), n)).collect(),
    );
    TrainingRecord {
        output_name: "ohwx_cat".into(),
        sd_model_name: Some("tiny-sd15-a".into()),
        network_dim: DIM as u32,
        network_alpha: ALPHA,
        conv_dim: Some(CONV_DIM as u32),
        conv_alpha: Some(CONV_ALPHA),
        learning_rate: 1e-4,
        unet_lr: Some(1e-4),
        text_encoder_lr: Some(5e-5),
        train_text_encoder: true,
        lr_scheduler: "cosine".into(),
        lr_warmup_steps: 10,
        max_train_steps: 200,
        steps: 200,
        num_epochs: 5,
        epoch: 5,
        mixed_precision: "fp16".into(),
        seed: 1234,
        resolution: 64,
        flip_aug: true,
        num_train_images: 40,
        tag_frequency: tags,
        dataset_dirs: [("10_ohwx cat".to_string(), loralab::train::data::DirInfo { n_repeats: 10, img_count: 4 })].into(),
        training_started_at: 1_767_225_600.25,
        training_finished_at: 1_767_229_200.5,
        session_id: 42,
        trigger_phrase: Some("ohwx".into()),
        software: "loralab/fixture".into(),
        ..TrainingRecord::default()
    }
}

const FIXTURE_SEED: u64 = 7007;

fn fixture_bytes() -> Vec<u8> {
    let layers = ModelLayers::from_checkpoint(&checkpoint()).unwrap();
    export_kohya(&seeded_layers(&layers, FIXTURE_SEED), &record(), ExportDtype::F16).unwrap()
}

fn parse(bytes: Vec<u8>, name: &str) -> LoraFile {
    let f = SafetensorsFile::open(bytes, name).unwrap_or_else(|e| panic!("{e}"));
    read_lora_for(&f, &checkpoint().config).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn train_export_reads_back_as_written() {
    let ck = checkpoint();
    let model = ModelLayers::from_checkpoint(&ck).unwrap();
    let layers = seeded_layers(&model, 11);
    let n_conv = layers.iter().filter(|l| l.shape.kernel() > 1).count();
    assert!(n_conv > 0 && layers.iter().any(|l| l.target == Target::TextEncoder), "targets cover convolutions and the text encoder");
    for dtype in [ExportDtype::F32, ExportDtype::F16, ExportDtype::Bf16] {
        let bytes = export_kohya(&layers, &record(), dtype).unwrap();
        let st = SafetensorsFile::open(bytes.clone(), "x").unwrap();
        // Every tensor in the one storage type, in name order.
        let names: Vec<&str> = st.tensors().iter().map(|t| t.name.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert_eq!(names.len(), 3 * layers.len());
        let f = parse(bytes.clone(), "exported.safetensors");
        assert_eq!(f.format, loralab::lora::Format::Kohya);
        assert!(f.warnings.is_empty() && f.unrecognised.is_empty(), "{:?} {:?}", f.warnings, f.unrecognised);
        assert_eq!(f.layers.len(), layers.len());
        assert_eq!(f.dtypes, vec![match dtype {
            ExportDtype::F32 => "F32",
            ExportDtype::F16 => "F16",
            ExportDtype::Bf16 => "BF16",
        }]);
        for want in &layers {
            let got = f
                .layers
                .iter()
                .find(|l| l.target == want.target && l.module == want.module)
                .unwrap_or_else(|| panic!("{} missing", want.module));
            assert_eq!(got.key, kohya_name(want.target, &want.module).unwrap());
            assert_eq!(got.alpha, Some(want.alpha));
            let Delta::LowRank { down, up, mid: None, scale } = &got.delta else { panic!("{}: not low-rank", want.module) };
            assert_eq!(*scale, want.alpha / want.rank() as f32);
            let conv = matches!(want.shape, LayerShape::Conv { .. });
            assert_eq!(down.ndim(), if conv { 4 } else { 2 }, "{}", want.module);
            assert_eq!(up.shape, if conv { vec![want.shape.out_dim(), want.rank(), 1, 1] } else { want.up.shape.clone() });
            if dtype == ExportDtype::Bf16 {
                let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= y.abs() / 128.0);
                assert!(close(&down.data, &want.down.data) && close(&up.data, &want.up.data));
            } else {
                assert_eq!(down.data, want.down.data, "{}", want.module);
                assert_eq!(up.data, want.up.data, "{}", want.module);
            }
        }
        let report = match_model(&f, &model).unwrap();
        assert_eq!((report.matched, report.total), (layers.len(), layers.len()));
        assert!(report.warning.is_none());
        // Metadata as the summary shows it.
        let s = f.summary(Some(report));
        let m = &s.metadata;
        assert_eq!(m.network_module.as_deref(), Some("networks.lora"));
        assert_eq!((m.network_dim, m.network_alpha), (Some(DIM as u32), Some(ALPHA)));
        assert_eq!(m.base_model_version.as_deref(), Some("sd_v1"));
        assert_eq!(m.sd_model_name.as_deref(), Some("tiny-sd15-a"));
        assert_eq!(m.output_name.as_deref(), Some("ohwx_cat"));
        assert_eq!(m.title.as_deref(), Some("ohwx_cat"));
        assert_eq!(m.architecture.as_deref(), Some("stable-diffusion-v1/lora"));
        assert_eq!(m.trigger_words, vec!["ohwx cat", "grass", "indoors"]);
        assert!(m.problems.is_empty(), "{:?}", m.problems);
        assert_eq!(f.base, loralab::lora::BaseModel::Sd1);
        let raw = &m.raw;
        assert_eq!(raw["sshs_model_hash"], safetensors_data_hash(&bytes).unwrap());
        assert_eq!(raw["sshs_legacy_hash"].len(), 8);
        for (k, v) in [
            ("ss_network_args", r#"{"conv_alpha": "1.0", "conv_dim": "2"}"#),
            ("ss_resolution", "(64, 64)"),
            ("ss_learning_rate", "0.0001"),
            ("ss_text_encoder_lr", "5e-05"),
            ("ss_training_started_at", "1767225600.25"),
            ("ss_dataset_dirs", r#"{"10_ohwx cat": {"img_count": 4, "n_repeats": 10}}"#),
            ("ss_tag_frequency", r#"{"10_ohwx cat": {"grass": 3, "indoors": 1, "ohwx cat": 4}}"#),
            ("ss_flip_aug", "True"),
            ("ss_clip_skip", "None"),
            ("modelspec.date", "2026-01-01T01:00:00"),
            ("modelspec.resolution", "64x64"),
            ("modelspec.trigger_phrase", "ohwx"),
        ] {
            assert_eq!(raw.get(k).map(String::as_str), Some(v), "{k}");
        }
    }
}

#[test]
fn train_export_summary_through_the_binary() {
    let dir = std::env::temp_dir().join(format!("loralab-train-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ohwx_cat.safetensors");
    std::fs::write(&path, fixture_bytes()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loralab"))
        .args(["lora", "inspect"])
        .arg(&path)
        .arg("--model")
        .arg(model_dir())
        .arg("--json")
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["format"], "kohya");
    assert_eq!(v["algorithms"], serde_json::json!(["lora", "locon"]));
    assert_eq!(v["match"]["matched"], v["layers"]);
    assert_eq!(v["metadata"]["network_module"], "networks.lora");
    assert_eq!(v["metadata"]["trigger_words"][0], "ohwx cat");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn train_export_refuses_bad_layers() {
    let good = TrainedLayer {
        target: Target::Unet,
        module: "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q".into(),
        shape: LayerShape::Linear { in_features: 16, out_features: 16 },
        down: HostTensor::new(vec![2, 16], vec![0.1; 32]).unwrap(),
        up: HostTensor::new(vec![16, 2], vec![0.1; 32]).unwrap(),
        alpha: 1.0,
    };
    let rec = TrainingRecord::default();
    assert!(export_kohya(std::slice::from_ref(&good), &rec, ExportDtype::F16).is_ok());
    let mut nan = good.clone();
    nan.up.data[3] = f32::NAN;
    let mut short = good.clone();
    short.down = HostTensor::new(vec![2, 15], vec![0.1; 30]).unwrap();
    let mut wrong_up = good.clone();
    wrong_up.up = HostTensor::new(vec![16, 3], vec![0.1; 48]).unwrap();
    let mut norm = good.clone();
    norm.shape = LayerShape::Norm { channels: 16 };
    let mut odd_name = good.clone();
    odd_name.module = "down_blocks.0.my_layer.x".into();
    let mut bad_alpha = good.clone();
    bad_alpha.alpha = f32::INFINITY;
    for (layers, want) in [
        (vec![nan], "diverged"),
        (vec![short], "lora_down"),
        (vec![wrong_up], "lora_up"),
        (vec![norm], "norm"),
        (vec![odd_name], "read back"),
        (vec![bad_alpha], "alpha"),
        (vec![good.clone(), good.clone()], "twice"),
        (vec![], "no trained layers"),
    ] {
        let e = export_kohya(&layers, &rec, ExportDtype::F32).expect_err(want).to_string();
        assert!(e.contains(want), "`{e}` lacks `{want}`");
        if !layers.is_empty() && want != "read back" {
            assert!(e.contains("attn1.to_q"), "`{e}` names no module");
        }
    }
    // Text-encoder names get kohya's `text_model_` even when given without it.
    assert_eq!(
        kohya_name(Target::TextEncoder, "encoder.layers.1.mlp.fc2").unwrap(),
        "lora_te_text_model_encoder_layers_1_mlp_fc2"
    );
}

#[test]
fn train_export_model_hashes() {
    let single = fixtures().join("models/tiny-sd15-a.safetensors");
    let bytes = std::fs::read(&single).unwrap();
    let h = model_hashes(bytes.as_slice()).unwrap();
    use sha2::Digest;
    let full: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(h.sha256, full);
    let window = &bytes[0x10_0000.min(bytes.len())..(0x11_0000).min(bytes.len())];
    let legacy: String = sha2::Sha256::digest(window).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(h.legacy, legacy[..8]);
    assert_eq!(model_hashes(&LocalFile::open(&single).unwrap()).unwrap(), h);
}

/// The committed fixture is what this exporter writes for the seeded layers.
#[test]
fn train_export_fixture_file_is_reproduced() {
    let path = fixtures().join("lora_export/kohya_export.safetensors");
    let bytes = fixture_bytes();
    if std::env::var_os("LORALAB_WRITE_TRAIN_FIXTURE").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &bytes).unwrap();
    }
    let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(committed == bytes, "{} differs from what the exporter writes now", path.display());
}

fn rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|v| v.is_finite()));
    let d = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let m = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
    d as f64 / m as f64
}

/// The fixture applied in the kernels reproduces diffusers' `load_lora_weights` of the same
/// file (text encoder and UNet outputs at strengths 1 and 0.5).
#[test]
fn train_export_fixture_matches_diffusers() {
    let gpu = gpu();
    let open = |p: PathBuf| SafetensorsFile::open_path(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let file = read_lora_for(&open(fixtures().join("lora_export/kohya_export.safetensors")), &checkpoint().config).unwrap();
    let refs = open(fixtures().join("lora_export/refs.safetensors"));
    let inputs = open(fixtures().join("lora/refs/inputs.safetensors"));
    let cfg = |p: &str| std::fs::read_to_string(model_dir().join(p)).unwrap();
    let te_cfg = ClipTextConfig::from_json(&cfg("text_encoder/config.json"), "config.json").unwrap();
    let unet_cfg = UNetConfig::from_json(&cfg("unet/config.json"), "config.json").unwrap();
    let te_src = SafetensorsSource::new(open(model_dir().join("text_encoder/model.safetensors")), "");
    let unet_src = SafetensorsSource::new(open(model_dir().join("unet/diffusion_pytorch_model.safetensors")), "");
    let mut te = ClipTextModel::load(gpu, &te_cfg, &te_src, WeightPolicy::new(DType::F32)).unwrap();
    let mut unet = UNet2DConditionModel::load(gpu, &unet_cfg, &unet_src, WeightPolicy::new(DType::F32)).unwrap();
    let tensor = |f: &SafetensorsFile<LocalFile>, n: &str| {
        loralab::Tensor::from_f32(gpu, &f.get(n).unwrap().shape.clone(), &f.read_f32(n).unwrap()).unwrap()
    };
    let ids: Vec<u32> = inputs.read_f32("input_ids").unwrap().iter().map(|&v| v as u32).collect();
    let (sample, ehs) = (tensor(&inputs, "sample"), tensor(&inputs, "encoder_hidden_states"));
    for (s, suffix) in [(1.0f32, ""), (0.5, "_s0.5")] {
        block(adapter::install(gpu, &mut te, Target::TextEncoder, &[&file], &[s])).unwrap();
        let rep = block(adapter::install(gpu, &mut unet, Target::Unet, &[&file], &[s])).unwrap();
        assert!(rep.unmatched.is_empty(), "{:?}", rep.unmatched);
        let pe = block(te.encode(gpu, &[&ids], EncodeOpts::default()).unwrap().to_f32(gpu)).unwrap();
        let uo = block(unet.forward(gpu, &sample, &[500.0], &ehs).unwrap().to_f32(gpu)).unwrap();
        for (name, got, base) in [("prompt_embeds", &pe, "encoder_hidden_states"), ("unet_out", &uo, "unet_out_base")] {
            let want = refs.read_f32(&format!("{name}{suffix}")).unwrap();
            let e = rel(got, &want);
            let change = rel(&inputs.read_f32(base).unwrap(), &want);
            eprintln!("{name}{suffix}: {e:.2e} (the adapter changes it by {change:.2e})");
            assert!(change > 0.02, "{name}{suffix}: the adapter hardly changes the output ({change:.2e})");
            assert!(e < 1e-4, "{name}{suffix}: {e:.2e}");
        }
    }
}
