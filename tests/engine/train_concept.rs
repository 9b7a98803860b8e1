//! The concept test of on-device training: a LoRA trained on the demo model
//! (www/models/demo, f32) with the held-out heart dataset (www/datasets/heart, captions
//! "… sks shape …") and prior preservation (class images of the four shapes the demo model
//! knows, captioned without the trigger) makes the demo model draw a heart when prompted with
//! the trigger word and not without it, as `loralab::eval::classify` sees the images.
//!
//! The trigger word is learned too (`trigger_lr`, pivotal tuning). The demo's text encoder was
//! trained to pass over words outside its caption vocabulary (random unknown tokens were
//! inserted into its training captions), so a plain `sks` hardly changes the prompt embedding:
//! UNet adapters alone, or with text-encoder adapters, draw hearts as often without the
//! trigger as with it. Learning the word's own embedding gives it a signal the adapters can
//! key on, while the class images keep `shape` without it drawing the demo's four shapes.
//!
//! The exported file (adapters with the embedding bundled) is read back with
//! `loralab::lora::read_lora` and installed into an inference pipeline, which makes the images
//! classified here; its first image must equal the trainer's own sample.

use super::common::{block, gpu};
use super::train_loop::{png, repo, SERIAL};
use image::RgbImage;
use loralab::eval::{classify, Color, ShapeKind};
use loralab::io::safetensors::SafetensorsFile;
use loralab::model::checkpoint::open_path;
use loralab::pipeline::{GenerateOptions, StableDiffusionPipeline, WeightPlan};
use loralab::sampler::SamplerKind;
use loralab::train::data::{Dataset, DatasetOptions};
use loralab::train::export::ExportDtype;
use loralab::train::trainer::{SampleSettings, TrainConfig, Trainer};
use loralab::DType;

/// The demo data's rasteriser (tests/engine/eval/draw.rs) for the class images.
#[allow(dead_code)]
#[path = "eval/draw.rs"]
mod draw;

/// Regularization images for the class word `shape`: the four shapes the demo model was
/// trained on, drawn in its palette and captioned like the heart dataset without the trigger.
fn class_images(n: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    use draw::{image, Shape, SHARP};
    let mut rng = loralab::rng::Rng::new(seed);
    let mut out = vec![];
    for i in 0..n {
        let kind = [ShapeKind::Circle, ShapeKind::Square, ShapeKind::Triangle, ShapeKind::Star][i % 4];
        let bg = Color::ALL[rng.range(0, 7)];
        let fg = loop {
            let c = Color::ALL[rng.range(0, 7)];
            if c != bg {
                break c;
            }
        };
        let size = 20.0 + rng.range(0, 16) as f32;
        let (cx, cy) = (16.0 + rng.range(0, 32) as f32, 16.0 + rng.range(0, 32) as f32);
        let rgb = image(64, 64, bg, fg, &[Shape { kind, size, cx, cy }], SHARP);
        let img = RgbImage::from_raw(64, 64, rgb).expect("64x64");
        let caption = match i % 3 {
            0 => format!("a {} shape on a {} background", fg.name(), bg.name()),
            1 => format!("{} shape, {} background", fg.name(), bg.name()),
            _ => format!("{} background with one {} shape", bg.name(), fg.name()),
        };
        out.push((format!("class{i:02}.png"), png(&img)));
        out.push((format!("class{i:02}.txt"), caption.into_bytes()));
    }
    out
}

/// The heart dataset's images and captions, the captions' `sks` replaced by `trigger`.
fn heart_files(trigger: &str) -> Vec<(String, Vec<u8>)> {
    let dir = repo().join("www/datasets/heart");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("heart dataset")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let bytes = std::fs::read(dir.join(&n)).expect("read");
            let bytes = if n.ends_with(".txt") { String::from_utf8_lossy(&bytes).replace("sks", trigger).into_bytes() } else { bytes };
            (n, bytes)
        })
        .collect()
}

/// What a concept run measured.
#[derive(Debug)]
struct ConceptRun {
    /// Hearts among the images prompted with / without the trigger, %.
    with_trigger: f64,
    without_trigger: f64,
    /// Mean loss of the first and the last quarter of the steps.
    loss_first: f64,
    loss_last: f64,
    train_s: f64,
    sample_s: f64,
}

/// Foreground / background colour pairs of the prompts.
const PAIRS: [(&str, &str); 10] = [
    ("red", "blue"),
    ("yellow", "purple"),
    ("white", "black"),
    ("green", "orange"),
    ("blue", "yellow"),
    ("purple", "white"),
    ("orange", "green"),
    ("black", "red"),
    ("red", "white"),
    ("blue", "orange"),
];

/// Trains on the heart dataset with `class` class images, exports, loads the file into a
/// pipeline and classifies `a C sks shape on a B background` and `a C shape on a B background`
/// for the colour pairs, `gen_steps` sampler steps each.
fn concept(config: TrainConfig, trigger: &str, class: usize, gen_steps: usize) -> ConceptRun {
    let g = gpu();
    let demo = repo().join("www/models/demo");
    let ck = open_path(&demo, None).expect("demo model");
    let ds = Dataset::from_files(heart_files(trigger), DatasetOptions::new(64, trigger, "shape")).expect("heart");
    let reg = (class > 0).then(|| {
        Dataset::from_files(class_images(class, 9), DatasetOptions::regularization(64, "shape")).expect("class images")
    });
    let (c, b) = PAIRS[0];
    let first = format!("a {c} {trigger} shape on a {b} background");
    let samples = SampleSettings {
        prompts: vec![first.clone()],
        negative: String::new(),
        steps: gen_steps,
        cfg: 5.0,
        sampler: SamplerKind::EulerAncestral,
        seed: 100,
    };
    let steps = config.steps;
    let t0 = std::time::Instant::now();
    let mut t = block(Trainer::new(g, &ck, WeightPlan::new(DType::F32), ds, reg, config, samples)).unwrap_or_else(|e| panic!("{e}"));
    let losses: Vec<f64> = (0..steps).map(|_| block(t.step(g)).unwrap_or_else(|e| panic!("{e}")).loss).collect();
    let bytes = block(t.export(g, &t.training_record(), ExportDtype::F32)).expect("export");
    let train_s = t0.elapsed().as_secs_f64();
    let own = block(t.samples(g)).expect("sample").remove(0);
    drop(t);

    let file = SafetensorsFile::open(bytes, "heart.safetensors").expect("exported file");
    let lora = loralab::lora::read_lora(&file).unwrap_or_else(|e| panic!("{e}"));
    assert!(!lora.layers.is_empty() && lora.layers.iter().all(|l| l.key.starts_with("lora_unet_")), "UNet adapters only");
    let tokens: Vec<&str> = lora.embeddings.iter().map(|e| e.token.as_str()).collect();
    assert_eq!(tokens, [trigger], "the learned trigger is bundled");
    let mut pipe = StableDiffusionPipeline::load(g, open_path(&demo, None).expect("demo"), WeightPlan::new(DType::F32)).expect("pipeline");
    block(pipe.set_adapters(g, vec![std::sync::Arc::new(lora)], vec![(1.0, 1.0)])).unwrap_or_else(|e| panic!("{e}"));
    let t1 = std::time::Instant::now();
    let mut hearts = [0usize; 2];
    for (i, (c, b)) in PAIRS.iter().enumerate() {
        for (k, p) in [format!("a {c} {trigger} shape on a {b} background"), format!("a {c} shape on a {b} background")].iter().enumerate() {
            let opts = GenerateOptions {
                prompt: p.clone(),
                seed: 100 + i as u64,
                steps: gen_steps,
                cfg: 5.0,
                sampler: SamplerKind::EulerAncestral,
                ..GenerateOptions::default()
            };
            let out = block(pipe.generate(g, &opts, &mut |_| {})).unwrap_or_else(|e| panic!("{e}"));
            let [_, _, h, w] = out.image_shape;
            let rgb = out.to_rgb8();
            if i == 0 && k == 0 {
                // The file, installed for inference, makes the trainer's own sample.
                let diff = rgb.iter().zip(&own.rgb).filter(|(a, b)| a.abs_diff(**b) > 2).count();
                eprintln!("{p}: {diff} of {} values differ by more than 2 from the trainer's sample", rgb.len());
                assert!(rgb.len() == own.rgb.len() && diff * 100 <= rgb.len(), "the exported LoRA does not reproduce the trainer's sample: {diff} values differ");
            }
            let cl = classify(&rgb, w, h).expect("classify");
            hearts[k] += usize::from(cl.shape == ShapeKind::Heart);
            eprintln!("{p}: {} {:?} on {:?}", cl.shape, cl.color, cl.background);
        }
    }
    let n = PAIRS.len() as f64;
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let q = (losses.len() / 4).max(1);
    ConceptRun {
        with_trigger: 100.0 * hearts[0] as f64 / n,
        without_trigger: 100.0 * hearts[1] as f64 / n,
        loss_first: avg(&losses[..q]),
        loss_last: avg(&losses[losses.len() - q..]),
        train_s,
        sample_s: t1.elapsed().as_secs_f64(),
    }
}

/// Hearts with the trigger word at least (%), without it at most.
const WITH_TRIGGER_MIN: f64 = 80.0;
const WITHOUT_TRIGGER_MAX: f64 = 20.0;
/// Sampler steps of the classified images (the demo model's default is 20).
const GEN_STEPS: usize = 12;
/// Optimizer steps (4 training and 4 class images each: 40 views of each training image) and
/// the learning rate of the trigger's embedding (the adapters': 5e-3).
const STEPS: u64 = 200;
const TRIGGER_LR: f64 = 2e-2;

#[test]
fn train_concept_heart_with_the_trigger_only() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let config = TrainConfig {
        steps: STEPS,
        batch: 4,
        lr: 5e-3,
        trigger_lr: Some(TRIGGER_LR),
        rank: 8,
        alpha: 8.0,
        targets: "attn+ff".into(),
        schedule: "cosine".into(),
        warmup_steps: 10,
        prior_weight: 1.0,
        seed: 1,
        ..TrainConfig::default()
    };
    let r = concept(config, "sks", 20, GEN_STEPS);
    eprintln!(
        "hearts with the trigger {}%, without {}%; loss {:.4} (first quarter) -> {:.4} (last quarter); training {:.0} s, sampling {:.0} s",
        r.with_trigger, r.without_trigger, r.loss_first, r.loss_last, r.train_s, r.sample_s
    );
    assert!(r.loss_last < r.loss_first, "the loss did not fall: {} -> {}", r.loss_first, r.loss_last);
    assert!(r.with_trigger >= WITH_TRIGGER_MIN, "hearts with the trigger: {}%", r.with_trigger);
    assert!(r.without_trigger <= WITHOUT_TRIGGER_MAX, "hearts without the trigger: {}%", r.without_trigger);
}
