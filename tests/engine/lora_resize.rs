//! LoRA resize by SVD, ΔW spectra, parameter counts and per-block weights, on the committed
//! adapter fixtures (every format with a ΔW) and through the CLI.
//!
//! The resized file is read back with the same parser as any adapter, and its ΔW compared with
//! the input's: at full rank it reproduces ΔW (f32 storage), at rank k the squared Frobenius
//! error equals the sum of the dropped σᵢ² (Eckart–Young), as the report says.

use super::common::{block, gpu, randn};
use loralab::adapter;
use loralab::io::safetensors::SafetensorsFile;
use loralab::io::LocalFile;
use loralab::lora::blocks::{BlockLayout, BlockWeights, Group};
use loralab::lora::resize::{resize, ResizeMethod, ResizeOptions};
use loralab::lora::spectrum::{delta_map, layer_shape, layer_svd, spectrum};
use loralab::lora::svd::{svd_jacobi, Matrix};
use loralab::lora::{open_lora, LayerAdapter, LoraFile, Target};
use loralab::model::config::{PipelineConfig, UNetConfig};
use loralab::model::unet::UNet2DConditionModel;
use loralab::model::{SafetensorsSource, WeightPolicy};
use loralab::{DType, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn open(name: &str) -> LoraFile {
    let path = fixtures().join("lora").join(name);
    open_lora(LocalFile::open(&path).unwrap(), name, &PipelineConfig::sd15()).unwrap()
}

/// Formats with a ΔW.
const FILES: [&str; 12] = [
    "kohya.safetensors",
    "peft.safetensors",
    "lycoris_locon.safetensors",
    "lycoris_locon_tucker.safetensors",
    "lycoris_loha.safetensors",
    "lycoris_loha_tucker.safetensors",
    "lycoris_lokr_full.safetensors",
    "lycoris_lokr_lowrank.safetensors",
    "lycoris_lokr_tucker.safetensors",
    "lycoris_lokr_decompose_both.safetensors",
    "lycoris_full.safetensors",
    "lycoris_dora.safetensors",
];

fn delta(l: &LayerAdapter) -> Vec<f64> {
    let shape = layer_shape(l, None).unwrap();
    l.delta.delta_weight(&shape).unwrap().data.iter().map(|&v| v as f64).collect()
}

fn sq_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

fn resized(file: &LoraFile, method: ResizeMethod) -> (loralab::lora::resize::Resized, LoraFile) {
    let mut opts = ResizeOptions::new(method);
    opts.dtype = safetensors::Dtype::F32;
    let r = resize(file, &opts, None).unwrap_or_else(|e| panic!("{}: {e}", file.file));
    let bytes = r.to_bytes("resized.safetensors").unwrap();
    let back = open_lora(bytes, "resized.safetensors", &PipelineConfig::sd15()).unwrap();
    (r, back)
}

#[test]
fn resize_every_format_keeps_delta_w_and_the_eckart_young_error() {
    for name in FILES {
        let file = open(name);
        // Full rank (all of the energy): ΔW back up to f32 rounding.
        let (full, back) = resized(&file, ResizeMethod::Energy(1.0));
        assert_eq!(back.layers.len(), full.layers.len(), "{name}");
        for (l, r) in file.layers.iter().filter(|l| layer_shape(l, None).is_some()).zip(&full.layers) {
            let got = back.layers.iter().find(|b| b.module == l.module).unwrap_or_else(|| panic!("{name}: {} missing", l.module));
            assert!(matches!(got.delta, loralab::lora::Delta::LowRank { mid: None, .. }), "{name} {}", l.module);
            let (want, have) = (delta(l), delta(got));
            let norm: f64 = want.iter().map(|v| v * v).sum();
            let e = sq_diff(&want, &have);
            assert!(e <= 1e-9 * norm.max(1e-30), "{name} {}: full-rank error² {e:.3e} of {norm:.3e} (rank {})", l.module, r.new_rank);
        }
        // Rank 2: error² = Σ of the dropped σ², as reported.
        let (two, back) = resized(&file, ResizeMethod::Rank(2));
        for r in &two.layers {
            let l = file.layers.iter().find(|l| l.module == r.module).unwrap();
            let got = back.layers.iter().find(|b| b.module == r.module).unwrap();
            assert!(r.new_rank <= 2 && got.delta.rank() == Some(r.new_rank));
            let all = layer_svd(l, &|_| 0).unwrap().s;
            let tail: f64 = all.iter().skip(r.new_rank).map(|s| s * s).sum();
            let norm: f64 = all.iter().map(|s| s * s).sum();
            let e = sq_diff(&delta(l), &delta(got));
            assert!((e - tail).abs() <= 1e-6 * norm + 1e-12, "{name} {}: error² {e:.6e} vs Σ dropped σ² {tail:.6e}", r.module);
            assert!((r.error * r.error - tail).abs() <= 1e-9 * norm + 1e-12);
            assert!((r.energy - (1.0 - tail / norm)).abs() < 1e-9);
        }
        assert!(two.new_params < full.new_params || full.layers.iter().all(|l| l.new_rank <= 2), "{name}");
    }
}

#[test]
fn spectra_match_a_dense_jacobi_svd_of_delta_w() {
    for name in FILES {
        let file = open(name);
        for l in file.layers.iter().filter(|l| layer_shape(l, None).is_some()) {
            let shape = layer_shape(l, None).unwrap();
            let dw = delta(l);
            let m = Matrix { rows: shape.out_dim(), cols: shape.cols(), data: dw };
            let want = svd_jacobi(&m).s;
            let got = spectrum(l, None).unwrap();
            assert_eq!(got.shape, shape.weight_shape());
            for (i, w) in want.iter().enumerate() {
                let g = got.singular.get(i).copied().unwrap_or(0.0);
                // ΔW was rounded to f32 for the reference.
                assert!((g - w).abs() <= 1e-5 * want[0] + 1e-12, "{name} {} σ{i}: {g:.6e} vs {w:.6e}", l.module);
            }
            assert!((got.energy.last().copied().unwrap_or(1.0) - 1.0).abs() < 1e-9);
            assert!(got.energy.windows(2).all(|w| w[0] <= w[1] + 1e-15));
        }
    }
}

#[test]
fn delta_map_pools_the_scaled_delta() {
    let file = open("lycoris_locon.safetensors");
    let l = file.layers.iter().find(|l| layer_shape(l, None).is_some_and(|s| s.kernel() == 3)).expect("a 3x3 layer");
    let shape = layer_shape(l, None).unwrap();
    let dw = delta(l);
    let max = dw.iter().fold(0f64, |m, v| m.max(v.abs()));
    let m = delta_map(l, None, 0.5, 16).unwrap();
    assert!(m.rows <= 16 && m.cols <= 16 && m.values.len() == m.rows * m.cols);
    assert_eq!((m.full_rows, m.full_cols), (shape.out_dim(), shape.cols()));
    assert!(((m.max as f64) - 0.5 * max).abs() <= 1e-6 * max, "{} vs {}", m.max, 0.5 * max);
    let m2 = delta_map(l, None, -1.0, 16).unwrap();
    assert!(m.values.iter().zip(&m2.values).all(|(a, b)| (a * -2.0 - b).abs() <= 1e-6 * max as f32));
    // Strength changes the values: the map of a zero strength is all zeros.
    assert!(delta_map(l, None, 0.0, 16).unwrap().values.iter().all(|v| *v == 0.0));
}

fn loralab(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loralab")).args(args).output().expect("run loralab")
}

#[test]
fn cli_params_reproduce_the_textbook_example() {
    let out = loralab(&["lora", "params", "--shape", "1024x1024", "--rank", "4", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["full"], 1_048_576);
    assert_eq!(v["lora"], 8_192);
    assert_eq!(v["lora_ratio"], 128.0);
    let text = String::from_utf8(loralab(&["lora", "params", "--shape", "1024x1024", "--rank", "4"]).stdout).unwrap();
    assert!(text.contains("8192") && text.contains("128.0× fewer"), "{text}");
    let model = fixtures().join("models/tiny-sd15-a");
    let counts = |target: &str| {
        let out = loralab(&["lora", "params", "--model", model.to_str().unwrap(), "--target", target, "--rank", "4", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let (a, b, c) = (counts("attn"), counts("attn+ff"), counts("attn+ff+conv"));
    let layers = |v: &serde_json::Value| v["layers"].as_u64().unwrap();
    assert!(layers(&a) < layers(&b) && layers(&b) < layers(&c), "{a} {b} {c}");
    let bad = loralab(&["lora", "params", "--shape", "12", "--rank", "4"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--shape 12"));
}

#[test]
fn cli_resize_and_spectrum() {
    let dir = std::env::temp_dir().join(format!("loralab-resize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = fixtures().join("lora/lycoris_loha.safetensors");
    let out_path = dir.join("loha-e90.safetensors");
    let out = loralab(&["lora", "resize", input.to_str().unwrap(), "--energy", "0.9", "--rank", "3", "--out", out_path.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("old rank") && text.contains("Frob. error") && text.contains("total:"), "{text}");
    let back = open_lora(LocalFile::open(&out_path).unwrap(), "r", &PipelineConfig::sd15()).unwrap();
    assert!(back.layers.iter().all(|l| l.delta.rank().is_some_and(|r| r <= 3)));
    assert_eq!(back.metadata.raw.get("ss_network_dim").map(String::as_str), Some("Dynamic"));
    assert!(back.metadata.raw.get("loralab_resize").is_some_and(|n| n.contains("energy 0.9")));
    assert!(back.dtypes.contains(&"F16".to_string()));
    // Errors name the file / the layer.
    let ia3 = fixtures().join("lora/lycoris_ia3.safetensors");
    let bad = loralab(&["lora", "resize", ia3.to_str().unwrap(), "--rank", "2", "--out", dir.join("x.safetensors").to_str().unwrap()]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("lycoris_ia3.safetensors"));
    let kohya = fixtures().join("lora/kohya.safetensors");
    let bad = loralab(&["lora", "spectrum", kohya.to_str().unwrap(), "--layer", "no_such_layer"]);
    let msg = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && msg.contains("kohya.safetensors") && msg.contains("no_such_layer"), "{msg}");
    let layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let one = loralab(&["lora", "spectrum", kohya.to_str().unwrap(), "--layer", layer, "--json"]);
    assert!(one.status.success(), "{}", String::from_utf8_lossy(&one.stderr));
    let v: serde_json::Value = serde_json::from_slice(&one.stdout).unwrap();
    let s = v[0]["spectrum"]["singular"].as_array().unwrap();
    assert!(!s.is_empty() && s.iter().all(|x| x.as_f64().unwrap() >= 0.0));
    std::fs::remove_dir_all(&dir).ok();
}

/// Zeroing the output blocks' weight gives exactly the adapter with its output-block layers
/// removed; the input/middle weights still act.
#[test]
fn block_weights_zero_equals_layers_removed() {
    let gpu = gpu();
    let root = fixtures().join("models/tiny-sd15-a/unet");
    let cfg = UNetConfig::from_json(&std::fs::read_to_string(root.join("config.json")).unwrap(), "config.json").unwrap();
    let src = || SafetensorsSource::new(SafetensorsFile::open_path(root.join("diffusion_pytorch_model.safetensors")).unwrap(), "");
    let mut u = UNet2DConditionModel::load(gpu, &cfg, &src(), WeightPolicy::new(DType::F32)).unwrap();
    let layout = BlockLayout::new(&cfg);
    let file = open("kohya.safetensors");
    let unet_groups: Vec<Group> = file.layers_of(Target::Unet).map(|l| layout.group(Target::Unet, &l.module)).collect();
    assert!(unet_groups.contains(&Group::Out) && unet_groups.contains(&Group::In), "the fixture adapts both sides");
    let mut trimmed = file.clone();
    trimmed.layers.retain(|l| layout.group(l.target, &l.module) != Group::Out);

    let sample = Tensor::from_f32(gpu, &[1, 4, 8, 8], &randn(256, 3)).unwrap();
    let ehs = Tensor::from_f32(gpu, &[1, 77, 8], &randn(77 * 8, 4)).unwrap();
    let run = |u: &UNet2DConditionModel| block(u.forward(gpu, &sample, &[400.0], &ehs).unwrap().to_f32(gpu)).unwrap();
    let base = run(&u);

    block(adapter::install(gpu, &mut u, Target::Unet, &[&file], &[0.8])).unwrap();
    let whole = run(&u);
    let blocks = BlockWeights::groups(1.0, 1.0, 0.0).unwrap();
    let factor = |name: &str, _: usize| blocks.weight(&layout, Target::Unet, name);
    adapter::set_strengths_by_layer(gpu, &mut u, &[0.8], &factor).unwrap();
    let no_out = run(&u);
    adapter::clear(&mut u);
    block(adapter::install(gpu, &mut u, Target::Unet, &[&trimmed], &[0.8])).unwrap();
    let removed = run(&u);
    assert_eq!(no_out, removed, "output blocks at 0 differ from the adapter without them");
    assert_ne!(no_out, whole, "the output blocks' layers change the output");
    assert_ne!(no_out, base, "the input and middle blocks still act");
    // Every block at 0: the base model, bit for bit.
    adapter::clear(&mut u);
    block(adapter::install(gpu, &mut u, Target::Unet, &[&file], &[0.8])).unwrap();
    let zero = BlockWeights::groups(0.0, 0.0, 0.0).unwrap();
    adapter::set_strengths_by_layer(gpu, &mut u, &[0.8], &|name, _| zero.weight(&layout, Target::Unet, name)).unwrap();
    assert_eq!(run(&u), base);
}

/// The pipeline's per-block weights: the output blocks at 0 draw the image of the adapter
/// without its output-block layers; a 26-entry list with BASE at 0 leaves the text encoder
/// plain (the image of the adapter without its text-encoder layers); reinstalling resets them.
#[test]
fn pipeline_block_weights() {
    use loralab::model::checkpoint::open_path;
    use loralab::pipeline::{GenerateOptions, StableDiffusionPipeline, StepProgress, WeightPlan};
    use loralab::sampler::SamplerKind;
    use std::sync::Arc;
    let gpu = gpu();
    let ck = open_path(fixtures().join("models/tiny-sd15-a"), None).unwrap();
    let layout = BlockLayout::new(&ck.config.unet);
    let mut pipe = StableDiffusionPipeline::load(gpu, ck, WeightPlan::new(DType::F32)).unwrap();
    let file = open("kohya.safetensors");
    assert!(file.layers_of(Target::TextEncoder).next().is_some() && file.layers_of(Target::Unet).next().is_some());
    let opts = GenerateOptions { prompt: "a red cube".into(), steps: 2, sampler: SamplerKind::Ddim, seed: 3, ..Default::default() };
    let image = |pipe: &StableDiffusionPipeline| block(pipe.generate(gpu, &opts, &mut |_: &StepProgress<'_>| {})).unwrap().image;
    let without = |keep: &dyn Fn(&LayerAdapter) -> bool| {
        let mut f = file.clone();
        f.layers.retain(|l| keep(l));
        Arc::new(f)
    };

    block(pipe.set_adapters(gpu, vec![Arc::new(file.clone())], vec![(1.0, 1.0)])).unwrap();
    let whole = image(&pipe);
    pipe.set_block_weights(gpu, vec![BlockWeights::groups(1.0, 1.0, 0.0).unwrap()]).unwrap();
    let no_out = image(&pipe);
    let mut base0 = [1.0f32; 26];
    base0[0] = 0.0;
    pipe.set_block_weights(gpu, vec![BlockWeights::from_list(&base0).unwrap()]).unwrap();
    let no_te = image(&pipe);
    assert!(pipe.set_block_weights(gpu, vec![]).is_err(), "one set per adapter file");

    block(pipe.set_adapters(gpu, vec![without(&|l| layout.group(l.target, &l.module) != Group::Out)], vec![(1.0, 1.0)])).unwrap();
    assert!(pipe.block_weights()[0].is_uniform(), "set_adapters resets the block weights");
    assert_eq!(no_out, image(&pipe), "output blocks at 0 differ from the adapter without them");
    block(pipe.set_adapters(gpu, vec![without(&|l| l.target != Target::TextEncoder)], vec![(1.0, 1.0)])).unwrap();
    assert_eq!(no_te, image(&pipe), "BASE at 0 differs from the adapter without its text-encoder layers");
    assert_ne!(no_out, whole);
    assert_ne!(no_te, whole);
}
