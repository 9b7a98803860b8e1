//! Adapter files made by the real writers (PEFT, kohya conversion, legacy diffusers,
//! LyCORIS: tests/fixtures/lora/, `tools/fixtures/lora.py`) read with `lora::read_lora` and
//! applied unmerged in the kernels, against the references of diffusers or the writing
//! library: text-encoder prompt embeddings and one UNet call, at strengths 1 and 0.5; the
//! two-adapter stack; diffusers' `fuse_lora`; and a whole DDIM run with the stack through the
//! pipeline.
//!
//! Error measure: max |got − want| / max |want| (the fixtures' own measure). Measured on
//! lavapipe: worst 2.0e-6 over all 21 files at both strengths, the stack, the fused case and
//! every pipeline step (bound 1e-4).

use super::common::{block, fixture_case_sampler, gpu};
use loralab::adapter;
use loralab::io::safetensors::SafetensorsFile;
use loralab::io::LocalFile;
use loralab::lora::{read_lora_for, LoraFile, Target};
use loralab::model::checkpoint::{open_path, Checkpoint};
use loralab::model::clip::{ClipTextConfig, ClipTextModel, EncodeOpts};
use loralab::model::config::UNetConfig;
use loralab::model::unet::UNet2DConditionModel;
use loralab::model::{SafetensorsSource, WeightPolicy};
use loralab::pipeline::{GenerateOptions, StableDiffusionPipeline, WeightPlan};
use loralab::sampler::SamplerKind;
use loralab::{DType, Gpu, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// f32 bound on max |got − want| / max |want|.
const BOUND: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn model_dir() -> PathBuf {
    fixtures().join("models/tiny-sd15-a")
}

fn open(path: &Path) -> SafetensorsFile<LocalFile> {
    SafetensorsFile::open_path(path).unwrap_or_else(|e| panic!("{e}"))
}

/// The case's file, CompVis names mapped with the fixture model's configuration.
fn lora(case: &str) -> LoraFile {
    let f = open(&fixtures().join(format!("lora/{case}.safetensors")));
    let ck: Checkpoint<LocalFile> = open_path(model_dir(), None).unwrap();
    read_lora_for(&f, &ck.config).unwrap_or_else(|e| panic!("{case}: {e}"))
}

fn refs(case: &str) -> SafetensorsFile<LocalFile> {
    open(&fixtures().join(format!("lora/refs/{case}.safetensors")))
}

fn tensor(gpu: &Gpu, f: &SafetensorsFile<LocalFile>, name: &str) -> Tensor {
    let shape = f.get(name).unwrap_or_else(|| panic!("reference `{name}` missing")).shape.clone();
    Tensor::from_f32(gpu, &shape, &f.read_f32(name).unwrap()).unwrap()
}

fn rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|v| v.is_finite()), "non-finite output");
    let d = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let m = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
    d as f64 / m as f64
}

struct Models {
    te: ClipTextModel,
    unet: UNet2DConditionModel,
}

fn load_models(gpu: &Gpu, dt: DType) -> Models {
    let te_cfg = {
        let p = model_dir().join("text_encoder/config.json");
        ClipTextConfig::from_json(&std::fs::read_to_string(&p).unwrap(), "config.json").unwrap()
    };
    let unet_cfg = {
        let p = model_dir().join("unet/config.json");
        UNetConfig::from_json(&std::fs::read_to_string(&p).unwrap(), "config.json").unwrap()
    };
    let te_src = SafetensorsSource::new(open(&model_dir().join("text_encoder/model.safetensors")), "");
    let unet_src = SafetensorsSource::new(open(&model_dir().join("unet/diffusion_pytorch_model.safetensors")), "");
    Models {
        te: ClipTextModel::load(gpu, &te_cfg, &te_src, WeightPolicy::new(dt)).unwrap(),
        unet: UNet2DConditionModel::load(gpu, &unet_cfg, &unet_src, WeightPolicy::new(dt)).unwrap(),
    }
}

/// (prompt_embeds, unet_out) with `files` at `strengths`.
fn outputs(gpu: &Gpu, m: &mut Models, files: &[&LoraFile], strengths: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let inputs = refs("inputs");
    block(adapter::install(gpu, &mut m.te, Target::TextEncoder, files, strengths)).unwrap();
    let rep = block(adapter::install(gpu, &mut m.unet, Target::Unet, files, strengths)).unwrap();
    if let Some((file, n, examples)) = rep.unmatched.first() {
        panic!("{file}: {n} UNet adapter layers found no module, e.g. {examples:?}");
    }
    let ids: Vec<u32> = inputs.read_f32("input_ids").unwrap().iter().map(|&v| v as u32).collect();
    let e = m.te.encode(gpu, &[&ids], EncodeOpts::default()).unwrap();
    let sample = tensor(gpu, &inputs, "sample");
    let ehs = tensor(gpu, &inputs, "encoder_hidden_states");
    let u = m.unet.forward(gpu, &sample, &[500.0], &ehs).unwrap();
    (block(e.to_f32(gpu)).unwrap(), block(u.to_f32(gpu)).unwrap())
}

/// Every case with its own adapter file.
const CASES: &[&str] = &[
    "peft",
    "peft_fp16",
    "peft_nometa",
    "peft_dora",
    "kohya",
    "kohya_compvis",
    "kohya_te_plain",
    "kohya_b",
    "diffusers_legacy",
    "lycoris_locon",
    "lycoris_locon_tucker",
    "lycoris_loha",
    "lycoris_loha_tucker",
    "lycoris_lokr_full",
    "lycoris_lokr_lowrank",
    "lycoris_lokr_decompose_both",
    "lycoris_lokr_tucker",
    "lycoris_ia3",
    "lycoris_full",
    "lycoris_full_norm",
    "lycoris_dora",
];

#[test]
fn every_writer_and_algorithm_matches_its_reference() {
    let gpu = gpu();
    let mut m = load_models(gpu, DType::F32);
    let mut failures = vec![];
    for case in CASES {
        let f = lora(case);
        let r = refs(case);
        for (s, suffix) in [(1.0f32, ""), (0.5, "_s0.5")] {
            let (pe, uo) = outputs(gpu, &mut m, &[&f], &[s]);
            let name = format!("prompt_embeds{suffix}");
            if r.get(&name).is_some() {
                let e = rel(&pe, &r.read_f32(&name).unwrap());
                eprintln!("{case} s={s}: prompt_embeds {e:.2e}");
                if e > BOUND {
                    failures.push(format!("{case} s={s}: prompt_embeds {e:.2e}"));
                }
            }
            let e = rel(&uo, &r.read_f32(&format!("unet_out{suffix}")).unwrap());
            eprintln!("{case} s={s}: unet_out {e:.2e}");
            if e > BOUND {
                failures.push(format!("{case} s={s}: unet_out {e:.2e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn stacked_and_fused_match_diffusers() {
    let gpu = gpu();
    let mut m = load_models(gpu, DType::F32);
    let (a, b) = (lora("peft"), lora("kohya_b"));
    let r = refs("stack");
    let (pe, uo) = outputs(gpu, &mut m, &[&a, &b], &[0.7, -0.4]);
    let (e1, e2) = (rel(&pe, &r.read_f32("prompt_embeds").unwrap()), rel(&uo, &r.read_f32("unet_out").unwrap()));
    eprintln!("stack: prompt_embeds {e1:.2e}, unet_out {e2:.2e}");
    assert!(e1 < BOUND && e2 < BOUND, "stack: {e1:.2e} {e2:.2e}");
    // fuse_lora(lora_scale=0.8) equals the unmerged adapter at 0.8.
    let r = refs("fused");
    let (_, uo) = outputs(gpu, &mut m, &[&a], &[0.8]);
    let e = rel(&uo, &r.read_f32("unet_out").unwrap());
    eprintln!("fused: unet_out {e:.2e}");
    assert!(e < BOUND, "fused: {e:.2e}");
}

#[test]
fn pipeline_with_stacked_adapters_matches_diffusers_ddim() {
    let gpu = gpu();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("lora/manifest.json")).unwrap()).unwrap();
    let case = &manifest["cases"]["pipeline"];
    let ck: Checkpoint<LocalFile> = open_path(model_dir(), None).unwrap();
    let mut pipe = StableDiffusionPipeline::load(gpu, ck, WeightPlan::new(DType::F32)).unwrap();
    let files = vec![Arc::new(lora("peft")), Arc::new(lora("kohya_b"))];
    let report = block(pipe.set_adapters(gpu, files, vec![(0.7, 0.7), (-0.4, -0.4)])).unwrap();
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let r = refs("pipeline");
    let latents = open(&fixtures().join("refs/tiny-sd15-a/latents.safetensors")).read_f32("latents").unwrap();
    let prompt = case["prompt"].as_str().unwrap_or_else(|| manifest["prompt"].as_str().unwrap()).to_string();
    let negative =
        case["negative_prompt"].as_str().unwrap_or_else(|| manifest["negative_prompt"].as_str().unwrap()).to_string();
    let (sampler, scheduler) = fixture_case_sampler("ddim", pipe.scheduler_config());
    assert_eq!(sampler, SamplerKind::Ddim);
    let opts = GenerateOptions {
        prompt,
        negative,
        steps: 4,
        cfg: 7.5,
        sampler,
        scheduler: Some(scheduler),
        width: Some(64),
        height: Some(64),
        init_latents: Some(latents),
        ..Default::default()
    };
    let out = block(pipe.generate(gpu, &opts, &mut |_| {})).unwrap();
    let e = rel(&out.prompt_embeds, &r.read_f32("prompt_embeds").unwrap());
    eprintln!("pipeline: prompt_embeds {e:.2e}");
    assert!(e < BOUND, "prompt_embeds {e:.2e}");
    for (i, step) in out.latents.iter().enumerate() {
        let e = rel(step, &r.read_f32(&format!("latents_step_{i}")).unwrap());
        eprintln!("pipeline: latents step {i} {e:.2e}");
        assert!(e < BOUND, "latents step {i}: {e:.2e}");
    }
    // Strength changes: off equals the base pipeline's reference.
    pipe.set_adapter_strengths(gpu, &[(0.0, 0.0), (0.0, 0.0)]).unwrap();
    let out = block(pipe.generate(gpu, &opts, &mut |_| {})).unwrap();
    let base = open(&fixtures().join("refs/tiny-sd15-a/ddim.safetensors"));
    let last = out.latents.len() - 1;
    let e = rel(&out.latents[last], &base.read_f32(&format!("latents_step_{last}")).unwrap());
    eprintln!("pipeline at strength 0 vs the base reference: {e:.2e}");
    assert!(e < BOUND, "strength 0: {e:.2e}");
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_loralab")).arg("generate").args(args).output().expect("run loralab")
}

/// `loralab generate --lora … --embedding …` with A1111 tags in the prompt: the tags override
/// the `--lora` strengths, are removed from the text, and the run equals diffusers' reference;
/// the PNG's parameters keep the tags.
#[test]
fn cli_generate_with_loras_tags_and_embedding() {
    let dir = std::env::temp_dir().join(format!("loralab-lora-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("lora/manifest.json")).unwrap()).unwrap();
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    let (png, dump) = (dir.join("lora.png"), dir.join("lora.safetensors"));
    let prompt = format!("{} <lora:peft:0.7> <lora:KOHYA_B:-0.4:-0.4>", manifest["prompt"].as_str().unwrap());
    let base = [
        "--model".to_string(),
        s(model_dir()),
        "--negative".into(),
        manifest["negative_prompt"].as_str().unwrap().into(),
        "--steps".into(),
        "4".into(),
        "--cfg".into(),
        "7.5".into(),
        "--sampler".into(),
        "ddim".into(),
        "--width".into(),
        "64".into(),
        "--height".into(),
        "64".into(),
        "--init-latents".into(),
        s(fixtures().join("refs/tiny-sd15-a/latents.safetensors")),
        "--lora".into(),
        s(fixtures().join("lora/peft.safetensors")) + ":0.2",
        "--lora".into(),
        s(fixtures().join("lora/kohya_b.safetensors")),
        "--embedding".into(),
        s(fixtures().join("lora/ti_diffusers/learned_embeds.safetensors")),
        "--out".into(),
        s(png.clone()),
        "--dump".into(),
        s(dump.clone()),
    ];
    let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
    args.extend(["--prompt", &prompt]);
    let out = cli(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("trigger word `<lx-toy>`"), "{stderr}");
    let d = open(&dump);
    let r = refs("pipeline");
    for name in ["prompt_embeds", "latents_step_3"] {
        let e = rel(&d.read_f32(name).unwrap(), &r.read_f32(name).unwrap());
        assert!(e < BOUND, "{name}: {e:.2e}");
    }
    let text = loralab::io::png::decode(&std::fs::read(&png).unwrap()).unwrap();
    let params = text.text("parameters").unwrap();
    assert!(params.starts_with(&prompt), "{params}");
    // The XMP packet lists the folder's three weight files and both adapters, hashed, with the
    // strengths the prompt's tags set.
    let xmp = text.text(loralab::io::xmp::KEYWORD).expect("an XMP iTXt chunk");
    let doc = roxmltree::Document::parse(xmp).expect("well-formed XMP");
    let ns = loralab::io::xmp::NS_LORALAB;
    let items = |list: &str| -> Vec<roxmltree::Node> {
        let l = doc.descendants().find(|n| n.has_tag_name((ns, list))).expect(list);
        l.descendants().filter(|n| n.has_tag_name((loralab::io::xmp::NS_RDF, "li"))).collect()
    };
    let get = |n: roxmltree::Node, k: &str| n.children().find(|c| c.has_tag_name((ns, k))).and_then(|c| c.text()).map(str::to_string);
    let sha = |p: PathBuf| -> String {
        use sha2::Digest;
        sha2::Sha256::digest(std::fs::read(p).unwrap()).iter().map(|b| format!("{b:02x}")).collect()
    };
    let files: Vec<_> = items("files").into_iter().map(|n| (get(n, "path").unwrap(), get(n, "sha256").unwrap())).collect();
    assert_eq!(files.len(), 3, "{xmp}");
    for (path, digest) in &files {
        assert_eq!(digest, &sha(model_dir().join(path)), "{path}");
    }
    let adapters = items("adapters");
    assert_eq!(adapters.len(), 2, "{xmp}");
    let by_name = |name: &str| *adapters.iter().find(|n| get(**n, "name").as_deref() == Some(name)).expect(name);
    let peft = by_name("peft");
    assert_eq!(get(peft, "sha256"), Some(sha(fixtures().join("lora/peft.safetensors"))));
    assert_eq!((get(peft, "textEncoderStrength"), get(peft, "unetStrength")), (Some("0.7".into()), Some("0.7".into())));
    assert_eq!(get(by_name("kohya_b"), "unetStrength"), Some("-0.4".into()));
    assert!(stderr.contains("  licence "), "adapter licence lines: {stderr}");

    // The embedding's trigger word in the prompt gives diffusers' embeddings.
    let ti = &manifest["cases"]["ti_diffusers"];
    let ti_prompt = ti["prompt"].as_str().unwrap();
    // Without the adapters: the --lora pairs dropped.
    let mut args: Vec<&str> = vec![];
    let mut it = base.iter().map(String::as_str);
    while let Some(a) = it.next() {
        if a == "--lora" {
            it.next();
        } else {
            args.push(a);
        }
    }
    args.extend(["--prompt", ti_prompt]);
    let out = cli(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e = rel(&open(&dump).read_f32("prompt_embeds").unwrap(), &refs("ti_diffusers").read_f32("prompt_embeds").unwrap());
    assert!(e < BOUND, "embedding prompt_embeds {e:.2e}");

    // Errors name the file or the tag and exit non-zero.
    for (extra, want) in [
        (vec!["--lora", "/nonexistent/x.safetensors"], "no such file"),
        (vec!["--lora", "/tmp/x.ckpt"], "pickle"),
        (vec!["--prompt", "a dog <lora:unknown:1>"], "unknown"),
        (vec!["--prompt", "a dog <lora:peft:abc>"], "abc"),
    ] {
        let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
        if extra[0] != "--prompt" {
            args.extend(["--prompt", "a dog"]);
        }
        args.extend(extra.iter().copied());
        let out = cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} succeeded");
        assert!(stderr.to_lowercase().contains(want), "{extra:?}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Fusing the adapters into the weights gives the unmerged run's result; unfusing restores
/// the unmerged adapters bit for bit; on q4_0 weights the report measures what the
/// requantization lost.
#[test]
fn fuse_and_unfuse_on_the_pipeline() {
    let gpu = gpu();
    let opts = GenerateOptions {
        prompt: "a red circle".into(),
        steps: 2,
        cfg: 7.5,
        sampler: SamplerKind::Ddim,
        width: Some(64),
        height: Some(64),
        init_latents: Some(open(&fixtures().join("refs/tiny-sd15-a/latents.safetensors")).read_f32("latents").unwrap()),
        ..Default::default()
    };
    let files = || vec![Arc::new(lora("peft")), Arc::new(lora("lycoris_loha"))];
    for dt in [DType::F32, DType::Q4_0] {
        let ck: Checkpoint<LocalFile> = open_path(model_dir(), None).unwrap();
        let mut pipe = StableDiffusionPipeline::load(gpu, ck, WeightPlan::new(dt)).unwrap();
        block(pipe.set_adapters(gpu, files(), vec![(0.8, 0.8), (0.5, 0.6)])).unwrap();
        let unmerged = block(pipe.generate(gpu, &opts, &mut |_| {})).unwrap();
        let (te, unet) = block(pipe.fuse_adapters(gpu)).unwrap();
        assert!(pipe.adapters_fused() && te.layers > 0 && unet.layers > 0);
        assert!(pipe.set_adapter_strengths(gpu, &[(1.0, 1.0), (1.0, 1.0)]).is_err(), "strengths change while fused");
        let fused = block(pipe.generate(gpu, &opts, &mut |_| {})).unwrap();
        let e = rel(fused.latents.last().unwrap(), unmerged.latents.last().unwrap());
        eprintln!("{dt}: fused vs unmerged {e:.2e}, worst requantization loss {:?}", unet.worst_loss);
        match dt {
            DType::F32 => {
                assert!(e < BOUND, "{dt}: fused vs unmerged {e:.2e}");
                assert!(unet.worst_loss.is_none());
            }
            _ => {
                let loss = unet.worst_loss.as_ref().unwrap().1;
                assert!(loss > 0.0 && loss.is_finite());
                assert!(e < 0.5, "{dt}: fused vs unmerged {e:.2e}");
            }
        }
        block(pipe.unfuse_adapters(gpu)).unwrap();
        let again = block(pipe.generate(gpu, &opts, &mut |_| {})).unwrap();
        assert_eq!(again.latents, unmerged.latents, "{dt}: unfuse did not restore the unmerged adapters");
    }
    // Low-memory pipelines reload components from the file: fusing is refused.
    let ck: Checkpoint<LocalFile> = open_path(model_dir(), None).unwrap();
    let mut pipe = StableDiffusionPipeline::load_with_options(
        gpu,
        ck,
        WeightPlan::new(DType::F32),
        loralab::pipeline::PipelineOptions::low_memory(),
    )
    .unwrap();
    block(pipe.set_adapters(gpu, files(), vec![(1.0, 1.0), (1.0, 1.0)])).unwrap();
    let err = block(pipe.fuse_adapters(gpu)).unwrap_err().to_string();
    assert!(err.contains("low-memory"), "{err}");
    // …but the unmerged adapters survive the reloads.
    let a = block(pipe.generate(gpu, &opts, &mut |_| {})).unwrap();
    let b = block(pipe.generate(gpu, &opts, &mut |_| {})).unwrap();
    assert_eq!(a.latents, b.latents);
}
