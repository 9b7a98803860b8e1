//! The whole text-to-image pipeline against diffusers 0.42.1's StableDiffusionPipeline: for
//! both fixture models, both layouts (diffusers folder; single-file CompVis checkpoint with the
//! folder as `--config`) and every sampler case of tests/fixtures/refs/<model>/<case>.safetensors
//! (ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lcm, lcm_cfg1.5, ddim_vpred), the pipeline
//! runs from the recorded initial latents (and the recorded noise of the stochastic samplers)
//! and its prompt embeddings, latents after every step and final image are compared with the
//! references. Error measure: max |got − want| / max |want| per tensor.
//!
//! Bounds: f32 weights 1e-4 on everything (measured on lavapipe over all 32 runs: embeddings
//! <= 1.5e-6, latents <= 3.1e-6, images <= 4.5e-6, the same for both layouts); q8_0 weights
//! (UNet and text encoder q8_0, VAE f16) on model b's dpmpp_2m case: embeddings 0.25, latents
//! and image 0.1 (measured 1.1e-1, 2.6e-2, 1.6e-2); f16 keeps the f32 bound (the fixtures'
//! weights are exact in f16; measured 1.7e-6); q4_0 1.5 / 0.5 / 0.4 (measured 7.4e-1, 2.7e-1,
//! 1.9e-1: the fixtures' 8-value rows are single padded blocks). clip skip is checked against
//! the text encoder references. The CLI test runs the built `loralab generate`
//! with --init-latents and --dump and checks the dump against the references, the PNG's pixels,
//! its A1111 `parameters` chunk and its XMP packet (read back with roxmltree, the checkpoint's
//! SHA-256 recomputed); bad inputs must exit non-zero with messages naming the option or file.

use super::common::{block, fixture_case_sampler, gpu};
use loralab::io::safetensors::SafetensorsFile;
use loralab::model::checkpoint::open_path;
use loralab::pipeline::{
    write_safetensors_f32, GenerateOptions, GenerateOutput, PipelineOptions, StableDiffusionPipeline, StepProgress,
    WeightPlan,
};
use loralab::sampler::SamplerKind;
use loralab::DType;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const MODELS: [&str; 2] = ["tiny-sd15-a", "tiny-sd15-b"];
const F32_BOUND: f64 = 1e-4;
/// q8_0 weights: (embeddings, latents, image). The fixtures' text encoder has rows of 8 values,
/// each one padded q8_0 block, so its error is large (measured 1.1e-1 on model b, as
/// tests/engine/clip.rs finds); latents 2.6e-2, image 1.6e-2.
const Q8_BOUNDS: [f64; 3] = [0.25, 0.1, 0.1];
/// q4_0 weights (VAE f16), same case: measured embeddings 7.4e-1 (the padded 8-value rows
/// again), latents 2.7e-1, image 1.9e-1.
const Q4_BOUNDS: [f64; 3] = [1.5, 0.5, 0.4];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest parse")
}

/// max |got − want| / max |want|.
fn rel_err(what: &str, got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite values");
    let scale = want.iter().fold(0f64, |m, &w| m.max((w as f64).abs())).max(f64::MIN_POSITIVE);
    let diff = got.iter().zip(want).fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
    diff / scale
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    Folder,
    SingleFile,
}

fn load(model: &str, layout: Layout, weights: DType) -> StableDiffusionPipeline {
    let folder = fixtures().join("models").join(model);
    let ck = match layout {
        Layout::Folder => open_path(&folder, None),
        Layout::SingleFile => open_path(fixtures().join(format!("models/{model}.safetensors")), Some(&folder)),
    }
    .unwrap_or_else(|e| panic!("{model} {layout:?}: {e}"));
    StableDiffusionPipeline::load(gpu(), ck, WeightPlan::new(weights)).unwrap_or_else(|e| panic!("{model}: {e}"))
}

fn refs(model: &str, name: &str) -> SafetensorsFile<loralab::io::LocalFile> {
    SafetensorsFile::open_path(fixtures().join(format!("refs/{model}/{name}.safetensors"))).unwrap()
}

/// The options of a fixture case: prompts, guidance, steps, sampler (with the case's scheduler
/// overrides), the recorded initial latents and noise.
fn case_options(pipe: &StableDiffusionPipeline, model: &str, case: &str, info: &Value) -> GenerateOptions {
    let (sampler, scheduler) = fixture_case_sampler(case, pipe.scheduler_config());
    let r = refs(model, case);
    let steps = info["num_inference_steps"].as_u64().unwrap() as usize;
    let noise_steps: Vec<usize> =
        info["noise_steps"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let step_noise =
        (0..steps).map(|i| noise_steps.contains(&i).then(|| r.read_f32(&format!("noise_step_{i}")).unwrap())).collect();
    GenerateOptions {
        prompt: info["prompt"].as_str().unwrap().to_string(),
        negative: info["negative_prompt"].as_str().unwrap_or("").to_string(),
        seed: 0,
        steps,
        cfg: info["guidance_scale"].as_f64().unwrap() as f32,
        sampler,
        width: Some(info["width"].as_u64().unwrap() as usize),
        height: Some(info["height"].as_u64().unwrap() as usize),
        clip_skip: 0,
        init_latents: Some(refs(model, "latents").read_f32("latents").unwrap()),
        step_noise,
        scheduler: Some(scheduler),
    }
}

/// Worst errors of one run: (embeddings, latents, image).
fn compare(
    what: &str,
    out: &GenerateOutput,
    r: &SafetensorsFile<loralab::io::LocalFile>,
    bounds: [f64; 3],
) -> [f64; 3] {
    let read = |n: &str| r.read_f32(n).unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut e = [0f64; 3];
    e[0] = rel_err(&format!("{what}: prompt_embeds"), &out.prompt_embeds, &read("prompt_embeds"));
    match (&out.negative_prompt_embeds, r.get("negative_prompt_embeds").is_some()) {
        (Some(neg), true) => {
            e[0] = e[0].max(rel_err(&format!("{what}: negative_prompt_embeds"), neg, &read("negative_prompt_embeds")))
        }
        (None, false) => {}
        (got, _) => panic!("{what}: negative_prompt_embeds present {} vs reference", got.is_some()),
    }
    let steps = r.tensors().iter().filter(|t| t.name.starts_with("latents_step_")).count();
    assert_eq!(out.latents.len(), steps, "{what}: step count");
    for (i, l) in out.latents.iter().enumerate() {
        e[1] = e[1].max(rel_err(&format!("{what}: latents_step_{i}"), l, &read(&format!("latents_step_{i}"))));
    }
    e[2] = rel_err(&format!("{what}: image"), &out.image, &read("image"));
    for ((name, v), bound) in ["embeddings", "latents", "image"].iter().zip(e).zip(bounds) {
        assert!(v <= bound, "{what}: {name} max relative error {v:e} > {bound:e}");
    }
    e
}

fn run_all_cases(model: &str, layout: Layout) {
    let m = manifest();
    let cases = m["pipelines"][model]["cases"].as_object().unwrap();
    let t0 = std::time::Instant::now();
    let pipe = load(model, layout, DType::F32);
    let mut worst = [0f64; 3];
    for (case, info) in cases {
        let opts = case_options(&pipe, model, case, info);
        let mut seen = Vec::new();
        let out = block(
            pipe.generate(gpu(), &opts, &mut |p: &StepProgress<'_>| seen.push((p.step, p.steps, p.latents.to_vec()))),
        )
        .unwrap_or_else(|e| panic!("{model}/{case}: {e}"));
        assert_eq!(seen.len(), opts.steps, "{model}/{case}: progress calls");
        assert!(seen.iter().zip(&out.latents).all(|(s, l)| &s.2 == l && s.1 == opts.steps));
        let ts: Vec<f32> = info["timesteps"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(out.timesteps, ts, "{model}/{case}: timesteps");
        let e = compare(&format!("{model} {layout:?} {case}"), &out, &refs(model, case), [F32_BOUND; 3]);
        for k in 0..3 {
            worst[k] = worst[k].max(e[k]);
        }
    }
    eprintln!(
        "{model} {layout:?}: {} cases, worst relative error embeddings {:.1e}, latents {:.1e}, image {:.1e} ({:.1} s)",
        cases.len(),
        worst[0],
        worst[1],
        worst[2],
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn pipeline_matches_diffusers_folder_a() {
    run_all_cases(MODELS[0], Layout::Folder);
}

#[test]
fn pipeline_matches_diffusers_folder_b() {
    run_all_cases(MODELS[1], Layout::Folder);
}

#[test]
fn pipeline_matches_diffusers_single_file_a() {
    run_all_cases(MODELS[0], Layout::SingleFile);
}

#[test]
fn pipeline_matches_diffusers_single_file_b() {
    run_all_cases(MODELS[1], Layout::SingleFile);
}

fn quantized_run(dtype: DType, bounds: [f64; 3]) -> [f64; 3] {
    let model = MODELS[1];
    let m = manifest();
    let info = &m["pipelines"][model]["cases"]["dpmpp_2m"];
    let pipe = load(model, Layout::Folder, dtype);
    let opts = case_options(&pipe, model, "dpmpp_2m", info);
    let out = block(pipe.generate(gpu(), &opts, &mut |_: &StepProgress<'_>| {})).unwrap();
    let e = compare(&format!("{model} {dtype} dpmpp_2m"), &out, &refs(model, "dpmpp_2m"), bounds);
    eprintln!("{model} {dtype} dpmpp_2m: embeddings {:.1e}, latents {:.1e}, image {:.1e}", e[0], e[1], e[2]);
    e
}

#[test]
fn pipeline_q8_0_weights_stay_close() {
    quantized_run(DType::Q8_0, Q8_BOUNDS);
}

#[test]
fn pipeline_f16_and_q4_0_weights() {
    // The fixtures' weights are exact in f16, so f16 storage keeps the f32 bound.
    quantized_run(DType::F16, [F32_BOUND; 3]);
    quantized_run(DType::Q4_0, Q4_BOUNDS);
}

#[test]
fn pipeline_low_memory_frees_and_reloads_components() {
    // The text encoder is dropped after encoding and the UNet before the decode, both reloaded
    // at the next generation; every output is bit-identical to the resident pipeline's, run
    // after run.
    let model = MODELS[1];
    let folder = fixtures().join("models").join(model);
    let info = &manifest()["pipelines"][model]["cases"]["dpmpp_2m"];
    let resident = load(model, Layout::Folder, DType::F32);
    assert!(resident.text_encoder_resident() && resident.unet_resident());
    assert_eq!(resident.options(), PipelineOptions::default());
    let opts = case_options(&resident, model, "dpmpp_2m", info);
    let want = block(resident.generate(gpu(), &opts, &mut |_: &StepProgress<'_>| {})).unwrap();
    assert!(resident.text_encoder_resident() && resident.unet_resident());
    let ck = open_path(&folder, None).unwrap();
    let low = StableDiffusionPipeline::load_with_options(gpu(), ck, WeightPlan::new(DType::F32), PipelineOptions::low_memory())
        .unwrap();
    assert!(low.text_encoder_resident() && low.unet_resident(), "loaded with the pipeline");
    for run in 0..2 {
        let mut during = Vec::new();
        let got = block(low.generate(gpu(), &opts, &mut |_: &StepProgress<'_>| {
            during.push((low.text_encoder_resident(), low.unet_resident()))
        }))
        .unwrap();
        assert!(during.iter().all(|&r| r == (false, true)), "run {run}: {during:?}");
        assert!(!low.text_encoder_resident() && !low.unet_resident(), "run {run}: freed");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.prompt_embeds), bits(&want.prompt_embeds), "run {run}");
        assert_eq!(
            bits(got.negative_prompt_embeds.as_ref().unwrap()),
            bits(want.negative_prompt_embeds.as_ref().unwrap()),
            "run {run}"
        );
        assert_eq!(got.latents.len(), want.latents.len());
        for (g, w) in got.latents.iter().zip(&want.latents) {
            assert_eq!(bits(g), bits(w), "run {run}");
        }
        assert_eq!(bits(&got.image), bits(&want.image), "run {run}");
    }
    compare(&format!("{model} low memory dpmpp_2m"), &want, &refs(model, "dpmpp_2m"), [F32_BOUND; 3]);
}

#[test]
fn pipeline_clip_skip_uses_earlier_layer() {
    let model = MODELS[0];
    let pipe = load(model, Layout::Folder, DType::F32);
    let info = &manifest()["pipelines"][model]["cases"]["ddim"];
    let text = refs(model, "text_encoder");
    for k in [1usize, 2] {
        let opts = GenerateOptions { clip_skip: k, steps: 1, ..case_options(&pipe, model, "ddim", info) };
        let out = block(pipe.generate(gpu(), &opts, &mut |_: &StepProgress<'_>| {})).unwrap();
        for (name, got) in [
            ("prompt_embeds", &out.prompt_embeds),
            ("negative_prompt_embeds", out.negative_prompt_embeds.as_ref().unwrap()),
        ] {
            let want = text.read_f32(&format!("{name}_clip_skip_{k}")).unwrap();
            let e = rel_err(name, got, &want);
            assert!(e <= F32_BOUND, "clip skip {k} {name}: {e:e}");
        }
    }
}

#[test]
fn pipeline_seeded_noise_and_bad_options() {
    let pipe = load(MODELS[0], Layout::Folder, DType::F32);
    let opts = GenerateOptions {
        prompt: "a red cube".into(),
        steps: 2,
        sampler: SamplerKind::EulerAncestral,
        seed: 7,
        ..Default::default()
    };
    let run = |o: &GenerateOptions| block(pipe.generate(gpu(), o, &mut |_: &StepProgress<'_>| {}));
    let a = run(&opts).unwrap();
    assert_eq!(pipe.default_size(), (64, 64));
    assert_eq!(a.image_shape, [1, 3, 64, 64]);
    let again = run(&opts).unwrap();
    assert_eq!(a.image, again.image, "same seed, same image");
    let other = run(&GenerateOptions { seed: 8, ..opts.clone() }).unwrap();
    assert_ne!(a.latents[0], other.latents[0], "another seed, other noise");
    // The seeded initial noise is Rng::new(seed).normal_vec(n): feeding it back as initial
    // latents reproduces the first step of a deterministic sampler.
    let det = GenerateOptions { sampler: SamplerKind::Ddim, ..opts.clone() };
    let noise = loralab::rng::Rng::new(7).normal_vec(4 * 8 * 8);
    let x = run(&det).unwrap();
    let y = run(&GenerateOptions { init_latents: Some(noise), seed: 99, ..det.clone() }).unwrap();
    assert_eq!(x.latents, y.latents);

    let err = |o: GenerateOptions| run(&o).expect_err("must fail").to_string();
    let e = err(GenerateOptions { width: Some(72), ..opts.clone() });
    assert!(e.contains("width 72") && e.contains("multiple of 16"), "{e}");
    let e = err(GenerateOptions { init_latents: Some(vec![0.0; 10]), ..opts.clone() });
    assert!(e.contains("initial latents have 10 values"), "{e}");
    let e = err(GenerateOptions { steps: 0, ..opts.clone() });
    assert!(e.contains("0 inference steps"), "{e}");
}

fn tmp_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loralab-pipeline-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn loralab(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loralab")).arg("generate").args(args).output().expect("run loralab")
}

#[test]
fn cli_generate_writes_png_and_dump() {
    let model = MODELS[0];
    let f = fixtures();
    let dir = tmp_dir("cli");
    let (png, dump) = (dir.join("cli.png"), dir.join("cli.safetensors"));
    let info = &manifest()["pipelines"][model]["cases"]["dpmpp_2m_karras"];
    let (prompt, negative) = (info["prompt"].as_str().unwrap(), info["negative_prompt"].as_str().unwrap());
    let single = f.join(format!("models/{model}.safetensors"));
    let folder = f.join(format!("models/{model}"));
    let latents = f.join(format!("refs/{model}/latents.safetensors"));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = loralab(&[
        "--model",
        &s(&single),
        "--config",
        &s(&folder),
        "--prompt",
        prompt,
        "--negative",
        negative,
        "--seed",
        "42",
        "--steps",
        "4",
        "--cfg",
        "7.5",
        "--sampler",
        "dpmpp_2m_karras",
        "--width",
        "64",
        "--height",
        "64",
        "--weights",
        "f32",
        "--init-latents",
        &s(&latents),
        "--dump",
        &s(&dump),
        "--out",
        &s(&png),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loralab generate failed: {stderr}");
    assert!(stderr.contains("step 4/4"), "progress per step on stderr: {stderr}");

    // The dump holds what the reference holds.
    let d = SafetensorsFile::open_path(&dump).unwrap();
    let r = refs(model, "dpmpp_2m_karras");
    for name in ["prompt_embeds", "negative_prompt_embeds", "latents_step_0", "latents_step_3", "image"] {
        let (got, want) = (d.get(name).unwrap(), r.get(name).unwrap());
        assert_eq!(got.shape, want.shape, "{name}");
        let e = rel_err(name, &d.read_f32(name).unwrap(), &r.read_f32(name).unwrap());
        assert!(e <= F32_BOUND, "dump {name}: {e:e}");
    }
    assert!(d.get("latents_step_4").is_none());

    // The PNG: pixels are round(255 · image), parameters as A1111 writes them.
    let p = loralab::io::png::decode(&std::fs::read(&png).unwrap()).unwrap();
    assert_eq!((p.width, p.height, p.channels), (64, 64, 3));
    let image = d.read_f32("image").unwrap();
    for (i, &px) in p.pixels.iter().enumerate() {
        let (y, x, c) = (i / (64 * 3), (i / 3) % 64, i % 3);
        let want = (image[c * 64 * 64 + y * 64 + x] * 255.0).round_ties_even() as u8;
        assert_eq!(px, want, "pixel {i}");
    }
    let want = format!(
        "{prompt}\nNegative prompt: {negative}\nSteps: 4, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, \
         Size: 64x64, Model: {model}"
    );
    assert_eq!(p.text("parameters"), Some(want.as_str()));

    // The XMP packet: AI-generated, the software, the checkpoint's name and SHA-256, read back
    // with an independent XML parser.
    let xmp = p.text(loralab::io::xmp::KEYWORD).expect("an XMP iTXt chunk");
    let doc = roxmltree::Document::parse(xmp).expect("well-formed XMP");
    let field = |ns: &str, name: &str| doc.descendants().find(|n| n.has_tag_name((ns, name))).and_then(|n| n.text());
    assert_eq!(
        field(loralab::io::xmp::NS_IPTC_EXT, "DigitalSourceType"),
        Some("http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia")
    );
    assert_eq!(field(loralab::io::xmp::NS_XMP, "CreatorTool"), Some(format!("loralab {}", env!("CARGO_PKG_VERSION")).as_str()));
    use sha2::Digest;
    let digest: String = sha2::Sha256::digest(std::fs::read(&single).unwrap()).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(field(loralab::io::xmp::NS_LORALAB, "sha256"), Some(digest.as_str()), "{xmp}");
    assert_eq!(field(loralab::io::xmp::NS_LORALAB, "path"), Some(format!("{model}.safetensors").as_str()));
    assert!(stderr.contains("licence unknown: no licence found"), "the licence line on stderr: {stderr}");

    // A1111's --clip-skip 2 is diffusers' clip_skip 1 (the penultimate layer), recorded as such.
    let out = loralab(&[
        "--model",
        &s(&folder),
        "--prompt",
        prompt,
        "--seed",
        "3",
        "--steps",
        "1",
        "--sampler",
        "euler",
        "--clip-skip",
        "2",
        "--dump",
        &s(&dump),
        "--out",
        &s(&png),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d = SafetensorsFile::open_path(&dump).unwrap();
    let want = refs(model, "text_encoder").read_f32("prompt_embeds_clip_skip_1").unwrap();
    let e = rel_err("clip skip", &d.read_f32("prompt_embeds").unwrap(), &want);
    assert!(e <= F32_BOUND, "--clip-skip 2 prompt_embeds: {e:e}");
    let p = loralab::io::png::decode(&std::fs::read(&png).unwrap()).unwrap();
    let text = p.text("parameters").unwrap();
    assert!(
        text.ends_with("Sampler: Euler, CFG scale: 7.5, Seed: 3, Size: 64x64, Model: tiny-sd15-a, Clip skip: 2"),
        "{text}"
    );
    assert!(!text.contains("Negative prompt"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cli_generate_rejects_bad_input() {
    let f = fixtures();
    let dir = tmp_dir("errors");
    let folder = f.join("models/tiny-sd15-a");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out_png = s(&dir.join("x.png"));
    let fails = |args: &[&str], expect: &[&str]| {
        let o = loralab(args);
        let msg = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} must fail");
        for e in expect {
            assert!(msg.contains(e), "{args:?}: message `{msg}` should mention `{e}`");
        }
    };
    let base = |model: &str| -> Vec<String> {
        vec!["--model".into(), model.into(), "--prompt".into(), "p".into(), "--out".into(), out_png.clone()]
    };
    let with = |model: &str, extra: &[&str]| -> Vec<String> {
        let mut v = base(model);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let missing = s(&dir.join("no-such-model"));
    fails(&strs(&base(&missing)), &["--model", "no-such-model", "no such file"]);
    fails(&strs(&base(&s(&dir.join("model.ckpt")))), &["model.ckpt", "pickled", ".safetensors"]);
    fails(&strs(&with(&s(&folder), &["--sampler", "plms"])), &["--sampler plms", "unknown sampler"]);
    fails(&strs(&with(&s(&folder), &["--weights", "q5_k"])), &["--weights q5_k", "f32, f16, q8_0, q4_0"]);
    fails(&strs(&with(&s(&folder), &["--steps", "many"])), &["--steps many"]);
    fails(&strs(&with(&s(&folder), &["--bogus"])), &["unknown option `--bogus`"]);
    fails(&["--model", &s(&folder), "--prompt", "p"], &["--out"]);
    fails(&strs(&with(&s(&folder), &["--width", "72"])), &["--width 72", "multiple of 16"]);
    // A single file of a non-SD1.5 configuration without --config: the shape error and a hint.
    let single = s(&f.join("models/tiny-sd15-b.safetensors"));
    fails(&strs(&base(&single)), &["token_embedding", "[49408, 768]", "--config DIR"]);

    // Initial latents of the wrong shape name the file, the tensor and both shapes.
    let bad = dir.join("bad-latents.safetensors");
    let zeros = vec![0f32; 64];
    std::fs::write(&bad, write_safetensors_f32(&[("latents".into(), vec![1, 4, 4, 4], &zeros)]).unwrap()).unwrap();
    fails(
        &strs(&with(&s(&folder), &["--init-latents", &s(&bad)])),
        &["--init-latents", "bad-latents.safetensors", "`latents`", "[1, 4, 4, 4]", "[1, 4, 8, 8]"],
    );
    let other = dir.join("no-latents.safetensors");
    std::fs::write(&other, write_safetensors_f32(&[("noise".into(), vec![1, 4, 8, 8], &[0f32; 256])]).unwrap())
        .unwrap();
    fails(&strs(&with(&s(&folder), &["--init-latents", &s(&other)])), &["`latents` is missing", "noise"]);
    let _ = std::fs::remove_dir_all(&dir);
}
