//! Adapter files: key layouts, metadata, scales, checks against the tiny SD1.5-architecture
//! fixture model (UNet widths 16/32, cross-attention 8, text encoder 8) and the errors for
//! files that do not fit. Synthetic files are written with the crate's safetensors writer.

use super::common::randn;
use loralab::io::safetensors::{Dtype, SafetensorsFile};
use loralab::io::safetensors_write::to_bytes;
use loralab::lora::{
    match_model, open_lora, read_lora_for, Algorithm, BaseModel, Delta, DoraKind, Format, LoraFile, ModelLayers, Target,
};
use loralab::model::checkpoint::{open_path, Checkpoint};
use loralab::model::config::PipelineConfig;
use loralab::Error;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel)
}

pub fn tiny() -> Checkpoint<loralab::io::LocalFile> {
    open_path(fixture("models/tiny-sd15-a"), None).expect("tiny-sd15-a opens")
}

pub fn tiny_layers() -> (PipelineConfig, ModelLayers) {
    let ck = tiny();
    (ck.config.clone(), ModelLayers::from_checkpoint(&ck).expect("layer table"))
}

/// A tensor of an adapter file under construction.
pub struct T {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A random tensor (seeded by its position), or given values.
pub fn t(name: &str, shape: &[usize], seed: u64) -> T {
    let n = shape.iter().product();
    T { name: name.into(), dtype: Dtype::F32, shape: shape.to_vec(), data: randn(n, seed) }
}

pub fn scalar(name: &str, v: f32) -> T {
    T { name: name.into(), dtype: Dtype::F16, shape: vec![], data: vec![v] }
}

pub fn bytes(tensors: &[T], meta: &[(&str, &str)]) -> Vec<u8> {
    let list: Vec<(&str, Dtype, &[usize], &[f32])> =
        tensors.iter().map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice(), t.data.as_slice())).collect();
    let meta: BTreeMap<String, String> = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    to_bytes(&list, &meta).expect("synthetic file")
}

pub fn parse(name: &str, tensors: &[T], meta: &[(&str, &str)], cfg: &PipelineConfig) -> loralab::Result<LoraFile> {
    let f = SafetensorsFile::open(bytes(tensors, meta), name)?;
    read_lora_for(&f, cfg)
}

const Q: &str = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
const K2: &str = "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k";

/// A kohya file for the tiny model: linear, cross-attention, 1×1 and 3×3 convolutions, text
/// encoder, with alphas.
pub fn kohya_tensors() -> Vec<T> {
    vec![
        t(&format!("lora_unet_{Q}.lora_down.weight"), &[4, 16], 1),
        t(&format!("lora_unet_{Q}.lora_up.weight"), &[16, 4], 2),
        scalar(&format!("lora_unet_{Q}.alpha"), 8.0),
        t(&format!("lora_unet_{K2}.lora_down.weight"), &[2, 8], 3),
        t(&format!("lora_unet_{K2}.lora_up.weight"), &[16, 2], 4),
        scalar(&format!("lora_unet_{K2}.alpha"), 1.0),
        t("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", &[4, 16, 1, 1], 5),
        t("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", &[16, 4, 1, 1], 6),
        t("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight", &[4, 16, 3, 3], 7),
        t("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight", &[16, 4, 1, 1], 8),
        scalar("lora_unet_down_blocks_0_resnets_0_conv1.alpha", 0.0),
        t("lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight", &[4, 8], 9),
        t("lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight", &[8, 4], 10),
        scalar("lora_te_text_model_encoder_layers_1_self_attn_q_proj.alpha", 2.0),
    ]
}

pub const KOHYA_META: [(&str, &str); 5] = [
    ("ss_network_module", "networks.lora"),
    ("ss_network_dim", "4"),
    ("ss_network_alpha", "8.0"),
    ("ss_base_model_version", "sd_v1"),
    ("ss_tag_frequency", r#"{"10_sks dog": {"sks": 10, "dog": 7, "outdoors": 3}}"#),
];

#[test]
fn kohya_file_reads_and_matches_the_tiny_model() {
    let (cfg, layers) = tiny_layers();
    let f = parse("kohya.safetensors", &kohya_tensors(), &KOHYA_META, &cfg).expect("reads");
    assert_eq!(f.format, Format::Kohya);
    assert_eq!(f.algorithms, vec![Algorithm::Lora, Algorithm::LoCon]);
    assert_eq!(f.base, BaseModel::Sd1);
    assert_eq!(f.layers.len(), 5);
    let by_module = |m: &str| f.layers.iter().find(|l| l.module == m).unwrap_or_else(|| panic!("{m} missing"));
    let q = by_module("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q");
    assert_eq!((q.target, q.delta.rank(), q.delta.scale(), q.alpha), (Target::Unet, Some(4), 2.0, Some(8.0)));
    let conv = by_module("down_blocks.0.resnets.0.conv1");
    assert_eq!(conv.delta.scale(), 1.0, "alpha 0 means alpha = rank");
    assert_eq!(conv.delta.algorithm(), Algorithm::LoCon);
    let te = by_module("text_model.encoder.layers.1.self_attn.q_proj");
    assert_eq!((te.target, te.delta.scale()), (Target::TextEncoder, 0.5));
    assert_eq!(f.metadata.network_dim, Some(4));
    assert_eq!(f.metadata.trigger_words, vec!["sks", "dog", "outdoors"]);
    let report = match_model(&f, &layers).expect("fits");
    assert_eq!((report.matched, report.total, report.warning.as_deref()), (5, 5, None));
    let s = f.summary(Some(report));
    assert_eq!(s.ranks.iter().map(|r| (r.value.as_str(), r.layers)).collect::<Vec<_>>(), vec![("2", 1), ("4", 4)]);
    assert!(s.blocks.iter().any(|b| b.block == "down_blocks.0" && b.layers == 4));
}

#[test]
fn sd1_text_encoder_under_the_sdxl_prefix_still_applies() {
    // diffusers' convert_state_dict_to_kohya writes SD1 text encoders as `lora_te1_`.
    let (cfg, layers) = tiny_layers();
    let tensors: Vec<T> = kohya_tensors()
        .into_iter()
        .map(|mut t| {
            t.name = t.name.replace("lora_te_", "lora_te1_");
            t
        })
        .collect();
    let f = parse("converted.safetensors", &tensors, &KOHYA_META, &cfg).expect("reads");
    assert_eq!(f.base, BaseModel::Sd1);
    assert_eq!(f.layers_of(Target::TextEncoder).count(), 1);
    assert_eq!(match_model(&f, &layers).expect("fits").matched, 5);
}

#[test]
fn compvis_names_use_the_model_block_numbering() {
    // tiny-sd15-a has 2 levels with 1 layer per block: input_blocks.1 is down_blocks.0's first
    // layer and output_blocks.2 is up_blocks.1's first (up blocks have 2 layers each).
    let (cfg, layers) = tiny_layers();
    let tensors = vec![
        t("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight", &[2, 16], 1),
        t("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight", &[16, 2], 2),
        t("lora_unet_output_blocks_2_0_skip_connection.lora_down.weight", &[2, 48, 1, 1], 3),
        t("lora_unet_output_blocks_2_0_skip_connection.lora_up.weight", &[16, 2, 1, 1], 4),
        t("lora_unet_middle_block_1_proj_in.lora_down.weight", &[2, 32, 1, 1], 5),
        t("lora_unet_middle_block_1_proj_in.lora_up.weight", &[32, 2, 1, 1], 6),
    ];
    let f = parse("compvis.safetensors", &tensors, &[], &cfg).expect("reads");
    let modules: Vec<&str> = f.layers.iter().map(|l| l.module.as_str()).collect();
    assert_eq!(
        modules,
        vec![
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "mid_block.attentions.0.proj_in",
            "up_blocks.1.resnets.0.conv_shortcut"
        ]
    );
    assert_eq!(match_model(&f, &layers).expect("fits").matched, 3);
}

#[test]
fn peft_file_takes_alpha_from_metadata_patterns() {
    let (cfg, layers) = tiny_layers();
    let q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let conv = "unet.down_blocks.0.resnets.0.conv1";
    let te = "text_encoder.encoder.layers.0.mlp.fc1";
    let tensors = vec![
        t(&format!("{q}.lora_A.weight"), &[4, 16], 1),
        t(&format!("{q}.lora_B.weight"), &[16, 4], 2),
        t(&format!("{conv}.lora_A.weight"), &[2, 16, 3, 3], 3),
        t(&format!("{conv}.lora_B.weight"), &[16, 2, 1, 1], 4),
        t(&format!("{conv}.lora_magnitude_vector"), &[16], 5),
        t(&format!("{te}.lora_A.weight"), &[4, 8], 6),
        t(&format!("{te}.lora_B.weight"), &[32, 4], 7),
    ];
    let meta = r#"{"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"conv1": 2},
        "unet.alpha_pattern": {"resnets.0.conv1": 3}, "unet.use_dora": true, "text_encoder.r": 4}"#;
    let f = parse("peft.safetensors", &tensors, &[("lora_adapter_metadata", meta)], &cfg).expect("reads");
    assert_eq!(f.format, Format::Peft);
    let get = |m: &str| f.layers.iter().find(|l| l.module == m).expect("layer");
    assert_eq!(get("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").delta.scale(), 2.0);
    let c = get("down_blocks.0.resnets.0.conv1");
    assert_eq!((c.delta.scale(), c.alpha), (1.5, Some(3.0)));
    assert_eq!(c.dora.as_ref().map(|d| d.kind), Some(DoraKind::Peft));
    let fc1 = get("text_model.encoder.layers.0.mlp.fc1");
    assert_eq!((fc1.target, fc1.delta.scale(), fc1.alpha), (Target::TextEncoder, 1.0, None), "no lora_alpha: alpha = r");
    assert!(f.algorithms.contains(&Algorithm::Dora));
    assert_eq!(match_model(&f, &layers).expect("fits").matched, 3);
}

#[test]
fn legacy_attention_processor_keys() {
    let (cfg, _) = tiny_layers();
    let u = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor";
    let tensors = vec![
        t(&format!("{u}.to_out_lora.down.weight"), &[2, 16], 1),
        t(&format!("{u}.to_out_lora.up.weight"), &[16, 2], 2),
        t("text_encoder.text_model.encoder.layers.0.self_attn.to_v_lora.down.weight", &[2, 8], 3),
        t("text_encoder.text_model.encoder.layers.0.self_attn.to_v_lora.up.weight", &[8, 2], 4),
    ];
    let f = parse("legacy.safetensors", &tensors, &[], &cfg).expect("reads");
    assert_eq!(f.format, Format::DiffusersLegacy);
    let modules: Vec<&str> = f.layers.iter().map(|l| l.module.as_str()).collect();
    assert_eq!(
        modules,
        vec!["text_model.encoder.layers.0.self_attn.v_proj", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"]
    );
    assert!(f.layers.iter().all(|l| l.delta.scale() == 1.0));
}

#[test]
fn lycoris_algorithms_are_recognised() {
    let (cfg, layers) = tiny_layers();
    let c1 = "lora_unet_down_blocks_0_resnets_0_conv1";
    let tensors = vec![
        t(&format!("{c1}.hada_w1_a"), &[16, 2], 1),
        t(&format!("{c1}.hada_w1_b"), &[2, 144], 2),
        t(&format!("{c1}.hada_w2_a"), &[16, 2], 3),
        t(&format!("{c1}.hada_w2_b"), &[2, 144], 4),
        scalar(&format!("{c1}.alpha"), 1.0),
        t("lora_unet_down_blocks_0_attentions_0_proj_out.lokr_w1", &[4, 4], 5),
        t("lora_unet_down_blocks_0_attentions_0_proj_out.lokr_w2", &[4, 4, 1, 1], 6),
        scalar("lora_unet_down_blocks_0_attentions_0_proj_out.alpha", 3.0),
        t("lora_te_text_model_encoder_layers_0_mlp_fc2.weight", &[32], 7),
        T { name: "lora_te_text_model_encoder_layers_0_mlp_fc2.on_input".into(), dtype: Dtype::I64, shape: vec![], data: vec![1.0] },
        t("lora_unet_conv_in.diff", &[16, 4, 3, 3], 8),
        t("lora_unet_conv_in.diff_b", &[16], 9),
        t("lora_unet_down_blocks_0_resnets_0_norm1.w_norm", &[16], 10),
        t("lora_unet_down_blocks_0_resnets_0_norm1.b_norm", &[16], 11),
    ];
    let f = parse("lycoris.safetensors", &tensors, &[("ss_network_module", "lycoris.kohya")], &cfg).expect("reads");
    assert_eq!(f.format, Format::Lycoris);
    assert_eq!(f.algorithms, vec![Algorithm::LoHa, Algorithm::LoKr, Algorithm::Ia3, Algorithm::Full, Algorithm::Norm]);
    let get = |m: &str| f.layers.iter().find(|l| l.module == m).expect("layer");
    assert_eq!(get("down_blocks.0.resnets.0.conv1").delta.scale(), 0.5);
    assert_eq!(get("down_blocks.0.attentions.0.proj_out").delta.scale(), 1.0, "two full LoKr factors: scale 1");
    assert!(matches!(get("text_model.encoder.layers.0.mlp.fc2").delta, Delta::Ia3 { on_input: true, .. }));
    assert_eq!(match_model(&f, &layers).expect("fits").matched, 5);
}

#[test]
fn sdxl_file_is_rejected_with_counts() {
    let (cfg, layers) = tiny_layers();
    let x = "lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_k";
    let tensors = vec![
        t(&format!("{x}.lora_down.weight"), &[4, 2048], 1),
        t(&format!("{x}.lora_up.weight"), &[1280, 4], 2),
        t("lora_unet_input_blocks_1_1_proj_in.lora_down.weight", &[4, 16, 1, 1], 3),
        t("lora_unet_input_blocks_1_1_proj_in.lora_up.weight", &[16, 4, 1, 1], 4),
        t("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", &[4, 768], 5),
        t("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", &[768, 4], 6),
        t("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", &[4, 1280], 7),
        t("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", &[1280, 4], 8),
    ];
    let f = parse("sdxl.safetensors", &tensors, &[("ss_base_model_version", "sdxl_base_v1-0")], &cfg).expect("reads");
    assert_eq!(f.base, BaseModel::Sdxl);
    assert_eq!(f.other_components.len(), 1);
    let err = match_model(&f, &layers).expect_err("SDXL on SD1.5 must fail");
    let Error::Format { file, message, .. } = &err else { panic!("{err}") };
    assert_eq!(file, "sdxl.safetensors");
    for want in ["3 layers", "SDXL", "lora_te1_", "1 adapt a second text encoder", "does not have", "other shapes"] {
        assert!(message.contains(want), "`{want}` not in: {message}");
    }
}

#[test]
fn partial_match_warns_with_counts() {
    let (cfg, layers) = tiny_layers();
    let mut tensors = kohya_tensors();
    tensors.push(t("lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight", &[4, 16, 1, 1], 20));
    tensors.push(t("lora_unet_down_blocks_3_attentions_0_proj_in.lora_up.weight", &[16, 4, 1, 1], 21));
    let f = parse("partial.safetensors", &tensors, &[], &cfg).expect("reads");
    let report = match_model(&f, &layers).expect("partial match is not an error");
    assert_eq!((report.matched, report.total), (5, 6));
    let w = report.warning.expect("warning");
    assert!(w.contains("5 of 6") && w.contains("lora_unet_down_blocks_3_attentions_0_proj_in"), "{w}");
}

#[test]
fn mismatched_widths_name_the_key() {
    let (cfg, layers) = tiny_layers();
    let mut tensors = kohya_tensors();
    tensors[0] = t(&format!("lora_unet_{Q}.lora_down.weight"), &[4, 32], 1);
    let f = parse("wide.safetensors", &tensors, &[], &cfg).expect("reads");
    match match_model(&f, &layers) {
        Err(Error::Format { tensor: Some(key), message, .. }) => {
            assert_eq!(key, format!("lora_unet_{Q}"));
            assert!(message.contains("takes 32 inputs") && message.contains("takes 16"), "{message}");
        }
        other => panic!("expected a format error, got {other:?}"),
    }
    // A 3×3 adapter on a linear layer.
    let mut tensors = kohya_tensors();
    tensors[0] = t(&format!("lora_unet_{Q}.lora_down.weight"), &[4, 16, 3, 3], 1);
    tensors[1] = t(&format!("lora_unet_{Q}.lora_up.weight"), &[16, 4, 1, 1], 2);
    let f = parse("conv_on_linear.safetensors", &tensors, &[], &cfg).expect("reads");
    let err = match_model(&f, &layers).expect_err("conv adapter on a linear layer").to_string();
    assert!(err.contains("3×3 convolution adapter") && err.contains("linear 16→16"), "{err}");
}

#[test]
fn rank_mismatch_between_down_and_up_is_an_error() {
    let (cfg, _) = tiny_layers();
    let mut tensors = kohya_tensors();
    tensors[1] = t(&format!("lora_unet_{Q}.lora_up.weight"), &[16, 3], 2);
    match parse("ranks.safetensors", &tensors, &[], &cfg) {
        Err(Error::Format { file, tensor: Some(key), message }) => {
            assert_eq!(file, "ranks.safetensors");
            assert_eq!(key, format!("lora_unet_{Q}.lora_up.weight"));
            assert!(message.contains("rank 3") && message.contains("rank 4"), "{message}");
        }
        other => panic!("expected a format error, got {other:?}"),
    }
}

#[test]
fn pickles_and_models_are_refused() {
    let cfg = PipelineConfig::sd15();
    for name in ["style.ckpt", "style.pt", "pytorch_lora_weights.bin"] {
        let err = open_lora(vec![0u8; 64], name, &cfg).expect_err("pickle").to_string();
        assert!(err.contains("unpickling can run arbitrary code") && err.contains(name), "{err}");
    }
    // A zip (torch.save: `archive/data.pkl` inside) renamed to .safetensors is recognised by
    // its magic bytes; any other zip is an archive to extract the adapter from.
    let mut zip = b"PK\x03\x04".to_vec();
    zip.resize(30, 0);
    zip.extend_from_slice(b"archive/data.pkl");
    zip.resize(64, 0);
    let err = open_lora(zip, "renamed.safetensors", &cfg).expect_err("zip").to_string();
    assert!(err.contains("convert it to .safetensors"), "{err}");
    let mut zip = b"PK\x03\x04".to_vec();
    zip.resize(30, 0);
    zip.extend_from_slice(b"style.safetensors");
    zip.resize(64, 0);
    let err = open_lora(zip, "style.zip", &cfg).expect_err("zip").to_string();
    assert!(err.contains("is a zip archive") && err.contains("extract it"), "{err}");
    let model = fixture("models/tiny-sd15-a.safetensors");
    let reader = loralab::io::LocalFile::open(&model).expect("fixture");
    let err = open_lora(reader, "tiny-sd15-a.safetensors", &cfg).expect_err("a model is not an adapter").to_string();
    assert!(err.contains("model checkpoint") && err.contains("not an adapter"), "{err}");
    let unet = SafetensorsFile::open_path(fixture("models/tiny-sd15-a/unet/diffusion_pytorch_model.safetensors")).expect("unet");
    let err = read_lora_for(&unet, &cfg).expect_err("UNet weights").to_string();
    assert!(err.contains("UNet model weights"), "{err}");
}

#[test]
fn inspect_json_through_the_binary() {
    let dir = std::env::temp_dir().join(format!("loralab-inspect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("kohya.safetensors");
    std::fs::write(&path, bytes(&kohya_tensors(), &KOHYA_META)).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loralab"))
        .args(["lora", "inspect"])
        .arg(&path)
        .arg("--model")
        .arg(fixture("models/tiny-sd15-a"))
        .arg("--json")
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["format"], "kohya");
    assert_eq!(v["algorithms"], serde_json::json!(["lora", "locon"]));
    assert_eq!(v["layers"], 5);
    assert_eq!(v["match"]["matched"], 5);
    assert_eq!(v["metadata"]["trigger_words"][0], "sks");
    // No licence in the file: the base model's (sd_v1) restrictions, marked as inferred.
    assert_eq!(v["licence"]["name"], "CreativeML Open RAIL-M");
    assert_eq!(v["licence"]["inferred"], true);
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_loralab")).args(["lora", "inspect"]).arg(&path).output().expect("runs");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("licence       CreativeML Open RAIL-M: Use, change and share"), "{text}");
    assert!(text.contains("inferred: the file names no licence"), "{text}");
    // Errors exit non-zero with the message.
    let bad = dir.join("bad.safetensors");
    let mut tensors = kohya_tensors();
    tensors[1] = t(&format!("lora_unet_{Q}.lora_up.weight"), &[16, 3], 2);
    std::fs::write(&bad, bytes(&tensors, &[])).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loralab")).args(["lora", "inspect"]).arg(&bad).output().expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("rank 3"), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// The reference files of tests/fixtures/lora (written by PEFT, diffusers' kohya converter and
// LyCORIS; see its manifest.json)

pub fn manifest() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("lora/manifest.json")).expect("tests/fixtures/lora/manifest.json");
    serde_json::from_str(&text).expect("manifest JSON")
}

/// The manifest's module kind: component and the path after the last repeated block
/// (`unet:attn2.to_k`, `te:mlp.fc1`), text-encoder paths without `text_model.`.
fn kind_of(target: Target, module: &str) -> String {
    let (comp, path) = match target {
        Target::Unet => ("unet", module),
        Target::TextEncoder => ("te", module.strip_prefix("text_model.").unwrap_or(module)),
    };
    let parts: Vec<&str> = path.split('.').collect();
    let mut cut = 0;
    for i in 0..parts.len().saturating_sub(1) {
        let repeated = ["transformer_blocks", "resnets", "attentions", "layers", "downsamplers", "upsamplers"];
        if repeated.contains(&parts[i]) && parts[i + 1].chars().all(|c| c.is_ascii_digit()) {
            cut = i + 2;
        }
    }
    let leaf = parts[cut..].join(".");
    format!("{comp}:{}", if leaf.is_empty() { path } else { &leaf })
}

/// Checks one layer against the manifest's description of its module kind.
fn check_layer(case: &str, l: &loralab::lora::LayerAdapter, info: &serde_json::Value) {
    use loralab::lora::Factor;
    let what = format!("{case}: {} ({})", l.key, l.module);
    let module = match &l.delta {
        Delta::LowRank { .. } => "LoConModule",
        Delta::LoHa { .. } => "LohaModule",
        Delta::LoKr { .. } => "LokrModule",
        Delta::Ia3 { .. } => "IA3Module",
        Delta::Full { .. } => "FullModule",
        Delta::Norm { .. } => "NormModule",
    };
    if let Some(m) = info["module"].as_str() {
        assert_eq!(module, m, "{what}");
    }
    let factored = l.delta.rank();
    if let (Some(want), Some(r)) = (info["rank"].as_u64().or(info["dim"].as_u64()), factored) {
        assert_eq!(r as u64, want, "{what}: rank");
    }
    if let (Some(want), Some(r)) = (info["alpha"].as_f64(), factored) {
        assert_eq!(l.alpha.unwrap_or(r as f32) as f64, want, "{what}: alpha");
    }
    if let Some(want) = info["scale"].as_f64() {
        assert!((l.delta.scale() as f64 - want).abs() < 1e-6 * want.abs().max(1.0), "{what}: scale {} vs {want}", l.delta.scale());
    }
    if info["dora"].as_bool() == Some(true) {
        assert_eq!(l.dora.as_ref().map(|d| d.kind), Some(DoraKind::Peft), "{what}");
    }
    if let Some(on_out) = info["dora_wd_on_out"].as_bool() {
        assert_eq!(l.dora.as_ref().map(|d| d.kind), Some(DoraKind::Lycoris { on_output: on_out }), "{what}");
    }
    if let Some(on) = info["on_input"].as_u64() {
        assert!(matches!(l.delta, Delta::Ia3 { on_input, .. } if on_input == (on == 1)), "{what}: on_input");
    }
    if info["tucker"].as_bool() == Some(true) {
        assert!(matches!(&l.delta, Delta::LowRank { mid: Some(_), .. } | Delta::LoHa { t1: Some(_), .. }), "{what}: Tucker");
    }
    if let Delta::LoKr { w1, w2, t2, .. } = &l.delta {
        let layout = |f: &Factor, t: bool, n: &str| match (f, t) {
            (Factor::Full(_), _) => "full".to_string(),
            (Factor::LowRank { .. }, true) => format!("tucker(t2,{n}_a,{n}_b)"),
            (Factor::LowRank { .. }, false) => format!("{n}_a@{n}_b"),
        };
        assert_eq!(Some(layout(w1, false, "w1").as_str()), info["w1"].as_str(), "{what}: w1");
        assert_eq!(Some(layout(w2, t2.is_some(), "w2").as_str()), info["w2"].as_str(), "{what}: w2");
    }
}

#[test]
fn every_fixture_adapter_reads_as_its_manifest_says() {
    let m = manifest();
    let (cfg, layers) = tiny_layers();
    let mut checked = 0;
    for (case, c) in m["cases"].as_object().expect("cases") {
        let Some(file) = c["file"].as_str().filter(|f| !case.starts_with("ti_") && f.ends_with(".safetensors")) else { continue };
        let reader = loralab::io::LocalFile::open(fixture(&format!("lora/{file}"))).expect("fixture file");
        let f = open_lora(reader, file, &cfg).unwrap_or_else(|e| panic!("{case}: {e}"));
        let format = c["format"].as_str().expect("format");
        let want_format = if format.starts_with("kohya") {
            Format::Kohya
        } else if format.starts_with("LyCORIS") {
            Format::Lycoris
        } else if format.starts_with("diffusers/PEFT") {
            Format::Peft
        } else {
            Format::DiffusersLegacy
        };
        assert_eq!(f.format, want_format, "{case}");
        let algo = c["algorithm"].as_str().expect("algorithm");
        let main = match algo.split(' ').next().expect("word") {
            "lora" | "locon" => Algorithm::Lora,
            "loha" => Algorithm::LoHa,
            "lokr" => Algorithm::LoKr,
            "ia3" => Algorithm::Ia3,
            "full" => Algorithm::Full,
            "dora" => Algorithm::Dora,
            other => panic!("{case}: algorithm {other}"),
        };
        assert!(f.algorithms.contains(&main), "{case}: {:?} lacks {main:?}", f.algorithms);
        assert_eq!(f.algorithms.contains(&Algorithm::Dora), algo.contains("dora"), "{case}");
        assert!(f.unrecognised.is_empty() && f.warnings.is_empty(), "{case}: {:?} {:?}", f.unrecognised, f.warnings);
        // Every module kind of the manifest, with its count, rank, alpha, scale and layout.
        let mut by_kind: BTreeMap<String, Vec<&loralab::lora::LayerAdapter>> = BTreeMap::new();
        for l in &f.layers {
            by_kind.entry(kind_of(l.target, &l.module)).or_default().push(l);
        }
        let kinds = c["modules"].as_object().expect("modules");
        let mut total = 0;
        for (kind, info) in kinds {
            if kind.contains(":down_blocks") || kind.contains(":up_blocks") || kind.contains(":mid_block") {
                // A single path listed on its own (one kind with several settings).
                let (comp, path) = kind.split_once(':').expect("kind");
                let target = if comp == "te" { Target::TextEncoder } else { Target::Unet };
                let l = f.layers.iter().find(|l| l.target == target && l.module == path).unwrap_or_else(|| panic!("{case}: {kind}"));
                check_layer(case, l, info);
                total += 1;
                continue;
            }
            let got = by_kind.get(kind).unwrap_or_else(|| panic!("{case}: no layers of kind {kind}"));
            match info["varies"].as_array() {
                Some(variants) => {
                    let n: usize = variants.iter().map(|v| v["paths"].as_array().map_or(0, Vec::len)).sum();
                    assert_eq!(got.len(), n, "{case}: {kind}");
                    for v in variants {
                        for p in v["paths"].as_array().expect("paths") {
                            let p = p.as_str().expect("path");
                            let l = got.iter().find(|l| l.module.ends_with(p)).unwrap_or_else(|| panic!("{case}: {p}"));
                            check_layer(case, l, v);
                        }
                    }
                }
                None => {
                    assert_eq!(got.len() as u64, info["modules"].as_u64().expect("count"), "{case}: {kind}");
                    got.iter().for_each(|l| check_layer(case, l, info));
                }
            }
            total += got.len();
        }
        assert_eq!(f.layers.len(), total, "{case}: layers not in the manifest");
        let report = match_model(&f, &layers).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!((report.matched, report.warning.as_deref()), (f.layers.len(), None), "{case}");
        checked += 1;
    }
    assert!(checked >= 21, "only {checked} fixture adapters found");
}

#[test]
fn inspect_json_on_every_fixture_adapter() {
    let m = manifest();
    for (case, c) in m["cases"].as_object().expect("cases") {
        let Some(file) = c["file"].as_str().filter(|f| !case.starts_with("ti_") && f.ends_with(".safetensors")) else { continue };
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_loralab"))
            .args(["lora", "inspect", "--json", "--model"])
            .arg(fixture("models/tiny-sd15-a"))
            .arg(fixture(&format!("lora/{file}")))
            .output()
            .expect("runs");
        assert!(out.status.success(), "{case}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let layers = v["layers"].as_u64().expect("layers");
        assert!(layers > 0 && v["match"]["matched"].as_u64() == Some(layers), "{case}: {}", v["match"]);
        let meta = &m["files"][file]["metadata"];
        if let Some(name) = meta["ss_output_name"].as_str() {
            assert_eq!(v["metadata"]["output_name"], name, "{case}");
            // ss_tag_frequency {"sks": 10, "dog": 10, "sks dog": 10, "outdoors": 3}.
            assert_eq!(v["metadata"]["trigger_words"], serde_json::json!(["dog", "sks", "sks dog", "outdoors"]), "{case}");
        }
        if meta["lora_adapter_metadata"].is_string() {
            assert!(v["metadata"]["peft"].as_array().is_some_and(|p| !p.is_empty()), "{case}");
        }
    }
}
