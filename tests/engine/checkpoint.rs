//! Model loading: both fixture models open in the diffusers folder layout and as single-file
//! CompVis checkpoints; every parameter of every component reads back bitwise equal from the
//! two layouts (f32 / f16 / bf16 files of the same numbers); configs parse with the values the
//! files hold; bad models give errors naming the file and field or tensor.

use crate::common::{gpu, read};
use loralab::io::safetensors::SafetensorsFile;
use loralab::model::checkpoint::{
    compvis_to_diffusers, open_path, Checkpoint, Component, ComponentWeights, Layout, Mapped,
};
use loralab::model::config::{ClipTextConfig, PerLevel, PipelineConfig, UNetConfig, VaeConfig};
use loralab::sampler::{BetaSchedule, PredictionType, Sampler, SamplerConfig, SamplerKind};
use loralab::model::WeightSource;
use loralab::{DType, Error};
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(rel)
}

fn open_both(model: &str) -> (Checkpoint<loralab::io::LocalFile>, Checkpoint<loralab::io::LocalFile>) {
    let folder = open_path(fixture(model), None).unwrap_or_else(|e| panic!("{model} folder: {e}"));
    let single = open_path(fixture(&format!("{model}.safetensors")), Some(&fixture(model)))
        .unwrap_or_else(|e| panic!("{model} single file: {e}"));
    (folder, single)
}

/// A fresh scratch directory for this test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loralab-checkpoint-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).expect("copy");
        }
    }
}

fn message<T>(r: loralab::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message `{msg}` lacks `{p}`");
    }
}

#[test]
fn both_layouts_hold_identical_parameters() {
    for model in ["tiny-sd15-a", "tiny-sd15-b"] {
        let (folder, single) = open_both(model);
        assert_eq!(folder.layout, Layout::Folder);
        assert_eq!(single.layout, Layout::SingleFile);
        assert_eq!(folder.config, single.config, "{model}: single file takes the folder's config");
        let mut total = 0;
        for c in Component::ALL {
            let (f, s) = (folder.weights(c), single.weights(c));
            let fnames: Vec<&str> = f.names().collect();
            let snames: Vec<&str> = s.names().collect();
            let only_f: Vec<_> = fnames.iter().filter(|n| !s.contains(n)).collect();
            let only_s: Vec<_> = snames.iter().filter(|n| !f.contains(n)).collect();
            assert!(
                only_f.is_empty() && only_s.is_empty(),
                "{model} {c:?}: folder only {only_f:?}, single only {only_s:?}"
            );
            for name in fnames {
                let (fs, fv) = f.read_f32(name).unwrap_or_else(|e| panic!("{e}"));
                let (ss, sv) = s.read_f32(name).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(fs, ss, "{model} {name}: shape");
                let same = fv.iter().zip(&sv).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same && fv.len() == sv.len(), "{model} {name}: values differ between layouts");
                total += 1;
            }
        }
        assert!(total > 200, "{model}: only {total} parameters compared");
    }
}

#[test]
fn configs_parse_with_file_values() {
    let (a, _) = open_both("tiny-sd15-a");
    let u = &a.config.unet;
    assert_eq!(u.block_out_channels, vec![16, 32]);
    assert_eq!((u.levels(), u.layers_per_block(0), u.heads(0), u.head_dim(0), u.head_dim(1)), (2, 1, 2, 8, 16));
    assert_eq!((u.cross_attention_dim(0), u.norm_groups(), u.time_embed_dim()), (8, 8, 64));
    assert!(!u.use_linear_projection && u.flip_sin_to_cos && u.down_has_attention(0) && !u.down_has_attention(1));
    assert!(!u.up_has_attention(0) && u.up_has_attention(1));
    let t = &a.config.text_encoder;
    assert_eq!((t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads), (8, 32, 2, 2));
    assert_eq!((t.hidden_act.as_str(), t.max_position_embeddings, t.vocab_size), ("quick_gelu", 77, 49408));
    let v = &a.config.vae;
    assert_eq!((v.block_out_channels.clone(), v.layers_per_block, v.norm_num_groups), (vec![8, 16, 16, 16], 1, 4));
    assert_eq!((v.latent_channels, v.scaling_factor), (4, 0.18215));
    let s = &a.config.scheduler;
    assert_eq!(s.class_name.as_deref(), Some("PNDMScheduler"));
    assert_eq!((s.num_train_timesteps, s.beta_start, s.beta_end, s.steps_offset), (Some(1000), Some(0.00085), Some(0.012), Some(1)));
    // `prediction_type` is absent from the file: the scheduler class's default applies.
    let p = Sampler::new(SamplerKind::Ddim, s).unwrap().params().clone();
    assert_eq!((s.beta_schedule, p.prediction_type), (Some(BetaSchedule::ScaledLinear), PredictionType::Epsilon));
    assert_eq!((s.clip_sample, s.set_alpha_to_one, s.timestep_spacing), (Some(false), Some(false), None));
    assert_eq!(s.extra.get("skip_prk_steps"), Some(&serde_json::Value::Bool(true)));
    assert_eq!(a.model_index.as_ref().and_then(|m| m.class_of("unet")), Some("UNet2DConditionModel"));

    let (b, _) = open_both("tiny-sd15-b");
    let u = &b.config.unet;
    assert_eq!(u.attention_head_dim, PerLevel::Each(vec![2, 4, 4]));
    assert_eq!((u.levels(), u.layers_per_block(2), u.heads(1), u.head_dim(1), u.head_dim(2)), (3, 2, 4, 4, 8));
    assert!(u.use_linear_projection);
    assert_eq!((b.config.text_encoder.hidden_act.as_str(), b.config.text_encoder.num_hidden_layers), ("gelu", 3));
    assert_eq!(b.config.vae.layers_per_block, 2);

    // The SD1.5 / SD2.1 constructors match the published configs and pass validation.
    let sd15 = PipelineConfig::sd15();
    assert_eq!(sd15.unet.block_out_channels, vec![320, 640, 1280, 1280]);
    assert_eq!((sd15.unet.heads(0), sd15.unet.head_dim(3), sd15.unet.cross_attention_dim(0)), (8, 160, 768));
    assert_eq!((sd15.text_encoder.hidden_size, sd15.text_encoder.hidden_act.as_str()), (768, "quick_gelu"));
    assert_eq!(sd15.vae.block_out_channels, vec![128, 256, 512, 512]);
    let sd21 = PipelineConfig::sd21();
    assert_eq!((sd21.unet.heads(0), sd21.unet.head_dim(0), sd21.unet.head_dim(3)), (5, 64, 64));
    assert_eq!((sd21.text_encoder.num_hidden_layers, sd21.scheduler.prediction_type), (23, Some(PredictionType::VPrediction)));
    for c in [&sd15, &sd21] {
        c.unet.validate("sd").unwrap();
        c.text_encoder.validate("sd").unwrap();
        c.vae.validate("sd").unwrap();
        c.scheduler.validate("sd").unwrap();
    }
    // Absent keys take the constructors' defaults.
    let u = UNetConfig::from_json("{}", "unet/config.json").unwrap();
    assert_eq!((u.layers_per_block(0), u.heads(0), u.cross_attention_dim(0), u.norm_groups()), (2, 8, 1280, 32));
    let t = ClipTextConfig::from_json("{}", "text_encoder/config.json").unwrap();
    assert_eq!((t.hidden_size, t.num_attention_heads, t.eos_token_id.clone()), (512, 8, Some(PerLevel::One(49407))));
    let v = VaeConfig::from_json("{}", "vae/config.json").unwrap();
    assert_eq!((v.block_out_channels.clone(), v.norm_num_groups, v.sample_size.is_some()), (vec![64], 32, true));
    let s = SamplerConfig::from_json("{}", "scheduler_config.json").unwrap();
    let p = Sampler::new(SamplerKind::Ddim, &s).unwrap().params().clone();
    assert_eq!((p.beta_start, p.beta_schedule, p.steps_offset), (0.0001, BetaSchedule::Linear, 0));
}

#[test]
fn bad_configs_name_file_and_field() {
    let a = std::fs::read_to_string(fixture("tiny-sd15-a/unet/config.json")).unwrap();
    let unet = |from: &str, to: &str| {
        assert!(a.contains(from), "fixture lacks {from}");
        message(UNetConfig::from_json(&a.replacen(from, to, 1), "m/unet/config.json"))
    };
    let m = unet("\"DownBlock2D\"", "\"FancyDownBlock2D\"");
    assert_contains(&m, &["m/unet/config.json", "down_block_types", "FancyDownBlock2D"]);
    let m = unet("\"addition_embed_type\": null", "\"addition_embed_type\": \"text_time\"");
    assert_contains(&m, &["addition_embed_type", "text_time", "not supported"]);
    let m = unet("\"attention_head_dim\": 2", "\"attention_head_dim\": 3");
    assert_contains(&m, &["attention_head_dim", "3 heads do not divide", "16 channels"]);
    let m = unet("\"UpBlock2D\",", "");
    assert_contains(&m, &["up_block_types", "1 entries", "block_out_channels has 2"]);
    let m = unet("16,\n", "0,\n");
    assert_contains(&m, &["block_out_channels", "entry 0 is 0"]);
    let m = unet("\"class_embed_type\": null", "\"class_embed_type\": \"timestep\"");
    assert_contains(&m, &["class_embed_type"]);
    let m = unet("\"layers_per_block\": 1", "\"layers_per_block\": [1, 1, 1]");
    assert_contains(&m, &["layers_per_block", "3 entries", "2 levels"]);
    let m = message(UNetConfig::from_json("{\"in_channels\": \"four\"}", "x/unet/config.json"));
    assert_contains(&m, &["x/unet/config.json", "not a valid config"]);
    let m = message(ClipTextConfig::from_json("{\"hidden_size\": 10, \"num_attention_heads\": 4}", "te.json"));
    assert_contains(&m, &["te.json", "num_attention_heads", "hidden_size 10"]);
    let m = message(ClipTextConfig::from_json("{\"hidden_act\": \"relu\"}", "te.json"));
    assert_contains(&m, &["hidden_act", "relu"]);
    let m = message(VaeConfig::from_json("{\"block_out_channels\": [64, 64]}", "vae.json"));
    assert_contains(&m, &["vae.json", "down_block_types", "block_out_channels has 2"]);
    let m = message(SamplerConfig::from_json("{\"beta_schedule\": \"cosine\"}", "s.json"));
    assert_contains(&m, &["s.json", "beta_schedule", "cosine"]);
    let m = message(SamplerConfig::from_json("{\"trained_betas\": [0.1, 0.2]}", "s.json"));
    assert_contains(&m, &["trained_betas", "2 values", "1000"]);
    let xl = r#"{"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}"#;
    let m = message(loralab::model::config::ModelIndex::from_json(xl, "model_index.json"));
    assert_contains(&m, &["model_index.json", "SDXL"]);
}

#[test]
fn model_index_recommended_settings() {
    use loralab::model::config::{GenerationDefaults, ModelIndex};
    let index = |extra: &str| {
        let text = format!(
            r#"{{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]{extra}}}"#
        );
        ModelIndex::from_json(&text, "m/model_index.json")
    };
    assert_eq!(index("").unwrap().defaults, GenerationDefaults::default());
    let d = index(r#", "_loralab_defaults": {"guidance_scale": 5.0, "num_inference_steps": 20, "later": 1}"#).unwrap().defaults;
    assert_eq!(d, GenerationDefaults { guidance_scale: Some(5.0), num_inference_steps: Some(20) });
    let m = message(index(r#", "_loralab_defaults": {"guidance_scale": "high"}"#));
    assert_contains(&m, &["m/model_index.json", "_loralab_defaults.guidance_scale", "\"high\"", "0 to 100"]);
    let m = message(index(r#", "_loralab_defaults": {"num_inference_steps": 0}"#));
    assert_contains(&m, &["_loralab_defaults.num_inference_steps", "1 to 1000"]);
    let m = message(index(r#", "_loralab_defaults": [5]"#));
    assert_contains(&m, &["_loralab_defaults", "must be an object"]);
}

#[test]
fn weights_load_to_the_gpu_by_diffusers_name() {
    let gpu = gpu();
    let (folder, single) = open_both("tiny-sd15-a");
    // A squeezed 1x1-conv attention weight, a conv, a linear and a norm, as f32 and f16.
    let cases: [(Component, &str, &[usize]); 4] = [
        (Component::Vae, "decoder.mid_block.attentions.0.to_q.weight", &[16, 16]),
        (Component::Unet, "down_blocks.0.resnets.0.conv1.weight", &[16, 16, 3, 3]),
        (Component::TextEncoder, "text_model.encoder.layers.1.mlp.fc1.weight", &[32, 8]),
        (Component::Unet, "up_blocks.1.attentions.0.norm.bias", &[16]),
    ];
    for (c, name, shape) in cases {
        let (_, want) = folder.weights(c).read_f32(name).unwrap();
        for dtype in [DType::F32, DType::F16] {
            for src in [folder.weights(c), single.weights(c)] {
                let t = src.load(gpu, name, shape, dtype).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(t.shape(), shape);
                assert_eq!(read(gpu, &t), want, "{name} as {dtype} from {}", src.describe());
            }
        }
    }
    // Wrong shape: the file and the tensor are named.
    let m = message(single.unet.load(gpu, "conv_in.weight", &[320, 4, 3, 3], DType::F32));
    assert_contains(
        &m,
        &["tiny-sd15-a.safetensors", "model.diffusion_model.input_blocks.0.0.weight", "[320, 4, 3, 3]"],
    );
    // Missing tensor.
    let m = message(folder.unet.load(gpu, "down_blocks.7.resnets.0.conv1.weight", &[1], DType::F32));
    assert_contains(&m, &["diffusion_pytorch_model.safetensors", "down_blocks.7.resnets.0.conv1.weight", "missing"]);
    assert!(!single.vae.contains("decoder.mid_block.attentions.0.query.weight"));
}

#[test]
fn mapping_follows_the_config_numbering() {
    let cfg_a = PipelineConfig { unet: open_both("tiny-sd15-a").0.config.unet, ..PipelineConfig::sd15() };
    let map = |key: &str, cfg: &PipelineConfig| match compvis_to_diffusers(key, cfg).unwrap() {
        Some(Mapped::Param { name, .. }) => name,
        other => panic!("{key}: {other:?}"),
    };
    let sd15 = PipelineConfig::sd15();
    // SD1.5: 4 levels, 2 layers per block.
    for (key, want) in [
        ("model.diffusion_model.input_blocks.0.0.weight", "conv_in.weight"),
        ("model.diffusion_model.input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
        ("model.diffusion_model.input_blocks.5.1.proj_in.weight", "down_blocks.1.attentions.1.proj_in.weight"),
        ("model.diffusion_model.input_blocks.11.0.emb_layers.1.bias", "down_blocks.3.resnets.1.time_emb_proj.bias"),
        ("model.diffusion_model.middle_block.2.out_layers.3.weight", "mid_block.resnets.1.conv2.weight"),
        ("model.diffusion_model.output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
        ("model.diffusion_model.output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
        ("model.diffusion_model.output_blocks.11.1.norm.weight", "up_blocks.3.attentions.2.norm.weight"),
        (
            "model.diffusion_model.output_blocks.9.0.skip_connection.weight",
            "up_blocks.3.resnets.0.conv_shortcut.weight",
        ),
        ("model.diffusion_model.time_embed.2.weight", "time_embedding.linear_2.weight"),
        ("model.diffusion_model.out.0.bias", "conv_norm_out.bias"),
        (
            "first_stage_model.decoder.up.0.block.2.nin_shortcut.weight",
            "decoder.up_blocks.3.resnets.2.conv_shortcut.weight",
        ),
        ("first_stage_model.encoder.mid.attn_1.proj_out.bias", "encoder.mid_block.attentions.0.to_out.0.bias"),
        ("first_stage_model.decoder.norm_out.weight", "decoder.conv_norm_out.weight"),
        ("cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight", "text_model.encoder.layers.0.mlp.fc1.weight"),
    ] {
        assert_eq!(map(key, &sd15), want, "{key}");
    }
    // The tiny model's 2 levels × 1 layer: output block 1 ends level 0 with the upsampler.
    assert_eq!(
        map("model.diffusion_model.output_blocks.1.1.conv.weight", &cfg_a),
        "up_blocks.0.upsamplers.0.conv.weight"
    );
    assert_eq!(map("model.diffusion_model.input_blocks.2.0.op.bias", &cfg_a), "down_blocks.0.downsamplers.0.conv.bias");
    for key in ["betas", "alphas_cumprod", "cond_stage_model.transformer.text_model.embeddings.position_ids"] {
        assert_eq!(compvis_to_diffusers(key, &sd15).unwrap(), Some(Mapped::Ignored), "{key}");
    }
    // A block number the config does not have.
    let m = message(compvis_to_diffusers("model.diffusion_model.input_blocks.6.0.in_layers.0.weight", &cfg_a));
    assert_contains(&m, &["input_blocks.6", "2 levels", "config"]);
    // Model b's file read with model a's config.
    let file = SafetensorsFile::open_path(fixture("tiny-sd15-b.safetensors")).unwrap();
    let m = message(ComponentWeights::from_single_file(std::sync::Arc::new(file), &cfg_a));
    assert_contains(&m, &["tiny-sd15-b.safetensors", "input_blocks."]);
}

#[test]
fn bad_model_files_are_refused_with_their_names() {
    // Pickled checkpoints.
    let m = message(open_path("/nonexistent/model.ckpt", None));
    assert_contains(&m, &["model.ckpt", "convert it to .safetensors"]);
    let dir = scratch("pickle");
    copy_dir(&fixture("tiny-sd15-a"), &dir);
    std::fs::rename(dir.join("vae/diffusion_pytorch_model.safetensors"), dir.join("vae/diffusion_pytorch_model.bin"))
        .unwrap();
    let m = message(open_path(&dir, None));
    assert_contains(&m, &["vae/diffusion_pytorch_model.bin", ".safetensors"]);

    // The fp16 variant file name is accepted.
    std::fs::remove_file(dir.join("vae/diffusion_pytorch_model.bin")).unwrap();
    std::fs::copy(
        fixture("tiny-sd15-b/unet/diffusion_pytorch_model.safetensors"),
        dir.join("unet/diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    std::fs::remove_file(dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let m = message(open_path(&dir, None));
    assert_contains(&m, &["vae/diffusion_pytorch_model.safetensors", "missing"]);
    std::fs::copy(
        fixture("tiny-sd15-a/vae/diffusion_pytorch_model.safetensors"),
        dir.join("vae/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let ck = open_path(&dir, None).expect("fp16 variant");
    assert!(ck.unet.describe().contains("diffusion_pytorch_model.fp16.safetensors"));

    // A missing component folder.
    std::fs::remove_dir_all(dir.join("text_encoder")).unwrap();
    let m = message(open_path(&dir, None));
    assert_contains(&m, &["text_encoder/config.json", "missing"]);
    let _ = std::fs::remove_dir_all(&dir);

    // A truncated single file.
    let dir = scratch("truncated");
    let bytes = std::fs::read(fixture("tiny-sd15-a.safetensors")).unwrap();
    let path = dir.join("cut.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let m = message(open_path(&path, None));
    assert_contains(&m, &["cut.safetensors", "past the end", "truncated"]);
    std::fs::write(&path, &bytes[..4]).unwrap();
    let m = message(open_path(&path, None));
    assert_contains(&m, &["cut.safetensors", "not a safetensors file"]);

    // A single file that is not a Stable Diffusion checkpoint (a folder component's file).
    let m = message(open_path(fixture("tiny-sd15-a/vae/diffusion_pytorch_model.safetensors"), None));
    assert_contains(&m, &["diffusion_pytorch_model.safetensors", "no unet tensors"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(matches!(open_path("/nonexistent/x.safetensors", None), Err(Error::Io { .. })));
}

#[test]
fn single_file_without_config_uses_sd15() {
    let ck = open_path(fixture("tiny-sd15-a.safetensors"), None).expect("open");
    assert_eq!(ck.config, PipelineConfig::sd15());
    assert_eq!(ck.tokenizer.max_length(), 77);
    // The tiny weights do not fit SD1.5's shapes: loading says so, naming the tensor.
    let m =
        message(ck.text_encoder.load(gpu(), "text_model.embeddings.position_embedding.weight", &[77, 768], DType::F32));
    assert_contains(&m, &["position_embedding.weight", "[77, 8]", "[77, 768]"]);
}
