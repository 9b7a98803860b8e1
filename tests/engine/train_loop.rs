//! The training loop (`loralab::train::trainer`): a few steps on the tiny fixture model (finite
//! loss, adapters move, B leaves 0), resume from a checkpoint equals the uninterrupted run bit
//! for bit, gradient accumulation against one larger batch. The command line is in
//! `train_cli.rs`, the concept test on the demo model in `train_concept.rs`.

use super::common::{block, gpu};
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use loralab::io::safetensors::SafetensorsFile;
use loralab::model::checkpoint::{open_path, Checkpoint};
use loralab::pipeline::WeightPlan;
use loralab::train::data::{Dataset, DatasetOptions};
use loralab::train::export::ExportDtype;
use loralab::train::trainer::{SampleSettings, TrainConfig, Trainer};
use loralab::{DType, Error, Gpu};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Accumulated gradients against one batch's (f32 sums in another order). Measured on lavapipe: see
/// the test's output.
const GRAD_ACCUM_BOUND: f64 = 1e-10;
/// The adapters after 3 AdamW steps from those gradients.
const PARAM_ACCUM_BOUND: f64 = 1e-8;

/// Training runs are heavy on lavapipe: one at a time.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn tiny() -> PathBuf {
    repo().join("tests/fixtures/models/tiny-sd15-a")
}

pub fn png(img: &RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(img.clone()).write_to(&mut out, ImageFormat::Png).expect("png");
    out.into_inner()
}

/// `n` 64×64 images: a plain background with one filled disc or square, and captions.
pub fn shapes_files(n: usize) -> Vec<(String, Vec<u8>)> {
    let colours = [[220, 40, 40], [40, 170, 60], [40, 80, 220], [240, 215, 40]];
    let mut out = vec![];
    for i in 0..n {
        let (bg, fg) = (colours[i % 4], colours[(i + 1 + i / 4) % 4]);
        let disc = i % 2 == 0;
        let (cx, cy, r) = (20.0 + (i * 7 % 24) as f32, 24.0 + (i * 5 % 16) as f32, 10.0 + (i % 3) as f32 * 3.0);
        let img = RgbImage::from_fn(64, 64, |x, y| {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let inside = if disc { dx * dx + dy * dy <= r * r } else { dx.abs() <= r && dy.abs() <= r };
            Rgb(if inside { fg } else { bg })
        });
        out.push((format!("img{i:02}.png"), png(&img)));
        let what = if disc { "disc" } else { "block" };
        out.push((format!("img{i:02}.txt"), format!("a {what} on a plain background").into_bytes()));
    }
    out
}

fn dataset(n: usize, flip: bool) -> Dataset {
    let opts = DatasetOptions { flip, ..DatasetOptions::new(64, "sks", "shape") };
    Dataset::from_files(shapes_files(n), opts).expect("dataset")
}

fn tiny_ck() -> Checkpoint<loralab::io::LocalFile> {
    open_path(tiny(), None).expect("tiny model")
}

fn trainer(g: &Gpu, config: TrainConfig, flip: bool) -> Trainer {
    trainer_with(g, config, flip, false)
}

/// A trainer on the tiny model with 4 training images (and 3 regularization images with `reg`).
fn trainer_with(g: &Gpu, config: TrainConfig, flip: bool, reg: bool) -> Trainer {
    let reg = reg.then(|| {
        let opts = DatasetOptions { flip, ..DatasetOptions::regularization(64, "shape") };
        let files: Vec<(String, Vec<u8>)> = shapes_files(7).into_iter().skip(8).filter(|(n, _)| n.ends_with(".png")).collect();
        Dataset::from_files(files, opts).expect("regularization images")
    });
    block(Trainer::new(g, &tiny_ck(), WeightPlan::new(DType::F32), dataset(4, flip), reg, config, SampleSettings::default()))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Every tensor of a safetensors file: (name, shape, bytes).
fn tensors(file: &[u8]) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let f = SafetensorsFile::open(file, "(memory)").expect("safetensors");
    f.tensors().iter().map(|t| (t.name.clone(), t.shape.clone(), f.read_bytes(&t.name).expect("read"))).collect()
}

fn values(g: &Gpu, t: &Trainer) -> Vec<(String, Vec<f32>)> {
    t.params().trainable().iter().map(|p| (p.name.clone(), block(p.param.to_f32(g)).expect("read"))).collect()
}

fn run(g: &Gpu, t: &mut Trainer, steps: u64) -> Vec<f64> {
    (0..steps).map(|_| block(t.step(g)).unwrap_or_else(|e| panic!("{e}")).loss).collect()
}

fn export(g: &Gpu, t: &Trainer) -> Vec<u8> {
    block(t.export(g, &t.training_record(), ExportDtype::F32)).expect("export")
}

/// Trains `config` (4 training and 3 regularization images) for the first half of an
/// uninterrupted run's steps (`all`, its losses), saves, and resumes in a new trainer with
/// gradient checkpointing (which changes memory, not results): the later losses and the
/// exported tensors must equal the uninterrupted run's (`want`). Returns the checkpoint.
fn assert_resumes_exactly(g: &Gpu, config: &TrainConfig, flip: bool, all: &[f64], want: &[u8]) -> Vec<u8> {
    let half = all.len() / 2;
    let mut first = trainer_with(g, config.clone(), flip, true);
    assert_eq!(run(g, &mut first, half as u64), all[..half]);
    let state = block(first.save_state(g)).expect("state");
    drop(first);
    let mut second = trainer_with(g, TrainConfig { checkpointing: true, ..config.clone() }, flip, true);
    second.load_state(g, &state, "half.safetensors").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(run(g, &mut second, (all.len() - half) as u64), all[half..], "losses after resuming");
    assert_eq!(tensors(&export(g, &second)), tensors(want), "the resumed run's LoRA differs from the uninterrupted run's");
    state
}

#[test]
fn train_loop_steps_move_the_adapters() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let g = gpu();
    let config = TrainConfig { steps: 4, batch: 2, lr: 1e-3, rank: 4, alpha: 4.0, seed: 7, ..TrainConfig::default() };
    let mut t = trainer(g, config, true);
    let before = values(g, &t);
    assert!(before.iter().filter(|(n, _)| n.ends_with("lora_up.weight")).all(|(_, v)| v.iter().all(|x| *x == 0.0)));
    let losses = run(g, &mut t, 4);
    eprintln!("losses {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");
    let after = values(g, &t);
    let moved = |suffix: &str| {
        before.iter().zip(&after).filter(|((n, _), _)| n.ends_with(suffix)).all(|((_, a), (_, b))| a != b)
    };
    // B leaves 0 at the first step (its gradient is A·x times the output gradient); A follows
    // once B is non-zero.
    assert!(moved("lora_up.weight"), "every B must change");
    assert!(moved("lora_down.weight"), "every A must change");
    assert!(after.iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
    assert_eq!(t.steps_done(), 4);
    assert!(t.is_finished());
    assert!(block(t.step(g)).unwrap_err().to_string().contains("finished"));
}


#[test]
fn train_loop_resume_equals_the_uninterrupted_run() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let g = gpu();
    let config = TrainConfig {
        steps: 6,
        batch: 2,
        grad_accum: 2,
        lr: 2e-3,
        rank: 4,
        alpha: 2.0,
        targets: "attn+ff+conv".into(),
        schedule: "cosine".into(),
        warmup_steps: 2,
        prior_weight: 0.5,
        seed: 3,
        ..TrainConfig::default()
    };
    let mut straight = trainer_with(g, config.clone(), true, true);
    let all = run(g, &mut straight, 6);
    let (want, want_state) = (export(g, &straight), block(straight.save_state(g)).expect("state"));
    drop(straight);

    let mut first = trainer_with(g, config.clone(), true, true);
    assert_eq!(run(g, &mut first, 3), all[..3]);
    let state = block(first.save_state(g)).expect("state");
    drop(first);
    // Gradient checkpointing changes memory, not results: the resumed half uses it.
    let mut second = trainer_with(g, TrainConfig { checkpointing: true, ..config.clone() }, true, true);
    second.load_state(g, &state, "half.safetensors").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(second.steps_done(), 3);
    assert_eq!(run(g, &mut second, 3), all[3..], "losses after resuming");
    // The files differ in `ss_gradient_checkpointing` only: compare the tensors.
    let got = export(g, &second);
    assert_eq!(tensors(&got), tensors(&want), "the resumed run's LoRA differs from the uninterrupted run's");
    assert_eq!(tensors(&block(second.save_state(g)).expect("state")), tensors(&want_state), "optimizer state differs");

    // Checkpoints of other settings, other data or other kinds are refused, naming the file.
    let mut other = trainer_with(g, TrainConfig { lr: 1e-3, ..config.clone() }, true, true);
    let e = other.load_state(g, &state, "half.safetensors").unwrap_err().to_string();
    assert!(e.contains("half.safetensors") && e.contains("lr: 0.001 vs 0.002"), "{e}");
    let mut unflipped = trainer_with(g, config.clone(), false, true);
    let e = unflipped.load_state(g, &state, "half.safetensors").unwrap_err().to_string();
    assert!(e.contains("other images"), "{e}");
    let e = second.load_state(g, &want, "lora.safetensors").unwrap_err().to_string();
    assert!(e.contains("lora.safetensors") && e.contains("not a training checkpoint"), "{e}");
    let e = second.load_state(g, &state[..state.len() / 2], "cut.safetensors").unwrap_err();
    assert!(matches!(&e, Error::Format { file, .. } if file == "cut.safetensors"), "{e}");
}

/// Normalised squared difference of two parameter sets.
fn nmse_all(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f64 {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            d += ((x - y) as f64).powi(2);
            n += (*y as f64).powi(2);
        }
    }
    d / n.max(1e-30)
}

fn grads(g: &Gpu, t: &Trainer) -> Vec<(String, Vec<f32>)> {
    t.params().trainable().iter().map(|p| (p.name.clone(), block(p.grad.to_f32(g)).expect("read"))).collect()
}

/// K micro-batches of b images train on the same samples as one batch of K·b (every sample's
/// image, flip, posterior draw, timestep and noise depend on its index alone), and the
/// accumulated gradient is that of the mean loss over the K·b samples: the same up to the
/// order the per-sample contributions are summed in.
#[test]
fn train_loop_accumulation_equals_one_larger_batch() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let g = gpu();
    let base = TrainConfig { steps: 3, lr: 1e-3, rank: 4, alpha: 4.0, targets: "attn+ff".into(), seed: 11, ..TrainConfig::default() };
    let mut results = vec![];
    for (batch, grad_accum) in [(4, 1), (2, 2), (1, 4)] {
        let mut t = trainer_with(g, TrainConfig { batch, grad_accum, ..base.clone() }, true, true);
        let first = block(t.step(g)).expect("step");
        let gr = grads(g, &t);
        let rest = run(g, &mut t, 2);
        results.push((first, gr, rest, values(g, &t)));
    }
    let (one, ref_grads, ref_rest, ref_params) = &results[0];
    for (r, (batch, accum)) in results[1..].iter().zip([(2, 2), (1, 4)]) {
        let gd = nmse_all(&r.1, ref_grads);
        let pd = nmse_all(&r.3, ref_params);
        eprintln!("batch {batch} x {accum}: loss {} vs {}, gradient NMSE {gd:e}, parameters after 3 steps {pd:e}", r.0.loss, one.loss);
        assert!((r.0.loss - one.loss).abs() <= 1e-9 * one.loss, "loss {} vs {}", r.0.loss, one.loss);
        assert!((r.0.grad_norm - one.grad_norm).abs() <= 1e-4 * one.grad_norm);
        assert!(gd <= GRAD_ACCUM_BOUND, "gradient NMSE {gd:e}");
        assert!(pd <= PARAM_ACCUM_BOUND, "parameter NMSE {pd:e}");
        for (a, b) in r.2.iter().zip(ref_rest) {
            assert!((a - b).abs() <= 1e-4 * b, "later losses {:?} vs {ref_rest:?}", r.2);
        }
    }
}

/// With `te_lr` the text encoder's adapters train too (kohya's names, B leaving 0), the export
/// holds `lora_te_*` beside `lora_unet_*` with `ss_text_encoder_lr`,
/// and resuming from a checkpoint (text-encoder adapters and moments included) equals the
/// uninterrupted run bit for bit.
#[test]
fn train_loop_trains_the_text_encoder_and_resumes_exactly() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let g = gpu();
    let config = TrainConfig {
        steps: 4,
        batch: 1,
        grad_accum: 2,
        lr: 2e-3,
        te_lr: Some(1e-3),
        rank: 4,
        alpha: 2.0,
        schedule: "cosine".into(),
        warmup_steps: 1,
        prior_weight: 0.5,
        seed: 13,
        ..TrainConfig::default()
    };
    let te_values = |t: &Trainer| -> Vec<(String, Vec<f32>)> {
        let p = t.text_encoder_params().expect("text encoder adapters");
        p.trainable().iter().map(|p| (p.name.clone(), block(p.param.to_f32(g)).expect("read"))).collect()
    };
    let mut straight = trainer_with(g, config.clone(), true, true);
    let before = te_values(&straight);
    assert_eq!(before.len(), 2 * 6 * 2, "A and B of 6 projections in each of the tiny encoder's 2 layers");
    assert!(before.iter().all(|(n, _)| n.starts_with("lora_te_text_model_encoder_layers_")));
    let all = run(g, &mut straight, 4);
    let after = te_values(&straight);
    for ((n, a), (_, b)) in before.iter().zip(&after) {
        assert_ne!(a, b, "{n} did not change");
        assert!(b.iter().all(|v| v.is_finite()), "{n}");
    }
    let want = export(g, &straight);
    drop(straight);
    let file = SafetensorsFile::open(&want[..], "te.safetensors").expect("export");
    let lora = loralab::lora::read_lora(&file).unwrap_or_else(|e| panic!("{e}"));
    let te_layers = lora.layers.iter().filter(|l| l.target == loralab::lora::Target::TextEncoder).count();
    assert_eq!((te_layers, lora.layers.len()), (12, 12 + 32), "text encoder + UNet attention layers");
    let m = file.metadata();
    assert_eq!(m.get("ss_text_encoder_lr").map(String::as_str), Some("0.001"));

    let state = assert_resumes_exactly(g, &config, true, &all, &want);
    // A UNet-only run cannot resume a run that trained the text encoder.
    let mut unet_only = trainer_with(g, TrainConfig { te_lr: None, ..config.clone() }, true, true);
    let e = unet_only.load_state(g, &state, "half.safetensors").unwrap_err().to_string();
    assert!(e.contains("te_lr"), "{e}");
}


/// With `trigger_lr` the trigger word is learned as a token of its own (pivotal tuning): its
/// vectors start as the word's BPE token rows and move; the text encoder's adapters stay out
/// unless `te_lr` asks for them; the export bundles the vectors
/// (`bundle_emb.sks.string_to_param.*`) and reading it back gives the embedding; resuming from a
/// checkpoint (the vectors and their moments included) equals the uninterrupted run bit for bit.
#[test]
fn train_loop_learns_the_trigger_embedding_and_resumes_exactly() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let g = gpu();
    let config = TrainConfig {
        steps: 4,
        batch: 1,
        grad_accum: 2,
        lr: 2e-3,
        trigger_lr: Some(5e-3),
        rank: 4,
        alpha: 2.0,
        schedule: "cosine".into(),
        warmup_steps: 1,
        prior_weight: 0.5,
        seed: 17,
        ..TrainConfig::default()
    };
    let mut straight = trainer_with(g, config.clone(), false, true);
    let start = block(straight.trigger_embedding(g)).expect("read").expect("a trigger embedding");
    assert_eq!((start.name.as_str(), start.shape[0]), ("sks", 1), "`sks` is one BPE token");
    // It starts as the word's own row.
    let ck = tiny_ck();
    let te = loralab::model::clip::ClipTextModel::load(g, &ck.config.text_encoder, &ck.text_encoder, WeightPlan::new(DType::F32).text_encoder)
        .expect("text encoder");
    let ids: Vec<u32> = ck.tokenizer.encode("sks").into_iter().filter(|&t| t != ck.tokenizer.start_id() && t != ck.tokenizer.end_id()).collect();
    assert_eq!(start.values, block(te.token_rows_f32(g, &ids)).expect("rows"));
    drop(te);
    assert!(straight.text_encoder_params().is_none_or(|p| p.layers().is_empty()), "no text-encoder adapters without te_lr");
    let all = run(g, &mut straight, 4);
    let end = block(straight.trigger_embedding(g)).expect("read").expect("a trigger embedding");
    assert_ne!(end.values, start.values, "the trigger's vector did not move");
    assert!(end.values.iter().all(|v| v.is_finite()));
    let want = export(g, &straight);
    drop(straight);
    let file = SafetensorsFile::open(&want[..], "trig.safetensors").expect("export");
    assert_eq!(file.metadata().get("loralab_trigger_lr").map(String::as_str), Some("0.005"));
    let e = file.get("bundle_emb.sks.string_to_param.*").expect("bundled embedding");
    assert_eq!(e.shape, vec![1, start.values.len()]);
    let lora = loralab::lora::read_lora(&file).unwrap_or_else(|e| panic!("{e}"));
    assert!(lora.layers.iter().all(|l| l.target == loralab::lora::Target::Unet), "UNet layers only");
    assert_eq!(lora.embeddings.len(), 1);
    assert_eq!((lora.embeddings[0].token.as_str(), &lora.embeddings[0].vectors), ("sks", &end.values));
    assert!(lora.summary(None).to_text().contains("`sks` (1 vectors)"), "{}", lora.summary(None).to_text());
    // The embedding on its own: an A1111 textual-inversion file the engine reads back.
    let alone = loralab::train::export::export_embedding(&end, ExportDtype::F32).expect("embedding file");
    let ti = loralab::model::textual_inversion::read_textual_inversion(&SafetensorsFile::open(&alone[..], "sks.safetensors").expect("file")).expect("embedding");
    assert_eq!((ti.token.as_str(), &ti.vectors), ("sks", &end.values));

    let state = assert_resumes_exactly(g, &config, false, &all, &want);
    let mut plain = trainer_with(g, TrainConfig { trigger_lr: None, ..config.clone() }, false, true);
    let e = plain.load_state(g, &state, "half.safetensors").unwrap_err().to_string();
    assert!(e.contains("trigger_lr"), "{e}");
    drop(plain);
    // A trigger of two words cannot be one learned token.
    let opts = DatasetOptions::new(64, "sks dog", "shape");
    let ds = Dataset::from_files(shapes_files(2), opts).expect("dataset");
    let err = block(Trainer::new(g, &tiny_ck(), WeightPlan::new(DType::F32), ds, None, config.clone(), SampleSettings::default()))
        .err()
        .expect("two-word trigger refused")
        .to_string();
    assert!(err.contains("trigger_lr") && err.contains("several words"), "{err}");
}
