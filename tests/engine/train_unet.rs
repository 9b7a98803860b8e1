//! Training forward and backward of the UNet (`model::backward`): the training forward against
//! the inference forward (no adapter / B = 0, and the same adapter installed through
//! `crate::adapter`), every adapter gradient against torch autograd
//! (tests/fixtures/train/grads.safetensors, `tools/fixtures/train_grads.py`: the tiny fixture
//! UNet with a rank-4 LoRA / LoCon on the `attn+ff+conv` targets, loss = mse(unet(x, t, c), y))
//! for f32, q8_0 and q4_0 bases, gradient checkpointing on / off, and bad inputs.
//!
//! Error measure: NMSE = Σ(got − want)² / Σwant² per tensor. Bounds and what they cover are
//! next to each constant; the measured values are printed by the tests.

use super::common::{block, gpu, gpus, read};
use loralab::adapter;
use loralab::io::safetensors::SafetensorsFile;
use loralab::io::LocalFile;
use loralab::lora::Target;
use loralab::model::backward::{mse_loss_grad, LoraConfig, LoraParams, Targets, TrainOptions, TrainUNet};
use loralab::model::config::UNetConfig;
use loralab::model::unet::UNet2DConditionModel;
use loralab::model::{SafetensorsSource, WeightPolicy, WeightSource};
use loralab::quant::{nmse, round_trip};
use loralab::{DType, Error, Gpu, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The training forward with an adapter against the inference kernels with the same adapter
/// installed (the same f32 operations, the low-rank term fused in a different order), and
/// against torch's prediction. Measured on lavapipe: 9.4e-13 and 1.6e-12.
const FORWARD_BOUND: f64 = 1e-10;
/// Engine f32 gradients against torch f32 autograd, per tensor. Measured on lavapipe: worst
/// 3.2e-11 (full features) and 5.0e-11 (no f16 / subgroups) over the 158 tensors.
const GRAD_BOUND: f64 = 1e-9;
/// A quantized base against the f32 model holding the same rounded weights: the same numbers
/// (measured: bit-identical predictions and gradients for q8_0 and q4_0).
const ROUNDED_BOUND: f64 = 1e-12;
/// A quantized base's gradients against the f32 base's (torch): the quantization changes the
/// function, so only the overall direction is checked — NMSE over all gradients together.
/// Measured: q8_0 5.4e-4, q4_0 0.149 (the tiny model's random full-scale weights with K = 16..128
/// lose much to 4-bit blocks; its forward is 0.25 relative error from diffusers' with q4_0).
const Q8_BOUND: f64 = 3e-3;
const Q4_BOUND: f64 = 0.3;

/// The tests share the one device and measure its memory: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn config() -> UNetConfig {
    let text = std::fs::read_to_string(fixtures().join("models/tiny-sd15-a/unet/config.json")).unwrap();
    UNetConfig::from_json(&text, "config.json").unwrap()
}

fn source() -> SafetensorsSource<LocalFile> {
    let path = fixtures().join("models/tiny-sd15-a/unet/diffusion_pytorch_model.safetensors");
    SafetensorsSource::new(SafetensorsFile::open_path(path).unwrap(), "")
}

fn load(gpu: &Gpu, dtype: DType) -> UNet2DConditionModel {
    UNet2DConditionModel::load(gpu, &config(), &source(), WeightPolicy::new(dtype)).unwrap()
}

/// The fixture weights rounded to `dtype` and held as f32.
struct RoundTrip {
    inner: SafetensorsSource<LocalFile>,
    dtype: DType,
}

impl WeightSource for RoundTrip {
    fn load(&self, gpu: &Gpu, name: &str, shape: &[usize], dtype: DType) -> loralab::Result<Tensor> {
        let t = self.inner.load(gpu, name, shape, DType::F32)?;
        if dtype == DType::F32 {
            return Ok(t);
        }
        let (rows, cols) = t.rows_cols();
        Tensor::from_f32(gpu, shape, &round_trip(&read(gpu, &t), rows, cols, self.dtype))
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

fn fixture() -> SafetensorsFile<LocalFile> {
    SafetensorsFile::open_path(fixtures().join("train/grads.safetensors")).unwrap()
}

fn upload(gpu: &Gpu, f: &SafetensorsFile<LocalFile>, name: &str) -> Tensor {
    let shape = f.get(name).unwrap_or_else(|| panic!("fixture tensor {name} missing")).shape.clone();
    Tensor::from_f32(gpu, &shape, &f.read_f32(name).unwrap()).unwrap()
}

fn meta(f: &SafetensorsFile<LocalFile>, key: &str) -> f32 {
    f.metadata().get(key).unwrap_or_else(|| panic!("fixture metadata {key} missing")).parse().unwrap()
}

/// The fixture's adapter configuration.
fn fixture_config(f: &SafetensorsFile<LocalFile>) -> LoraConfig {
    let rank = meta(f, "rank") as usize;
    assert_eq!(f.metadata().get("targets").map(String::as_str), Some("attn+ff+conv"));
    LoraConfig {
        targets: Targets::AttnFfConv,
        rank,
        alpha: meta(f, "alpha"),
        conv_rank: rank,
        conv_alpha: meta(f, "conv_alpha"),
        seed: 1,
    }
}

/// Adapters on `unet` holding the fixture's A and B; checks that the target sets agree.
fn fixture_params(gpu: &Gpu, unet: &mut UNet2DConditionModel, f: &SafetensorsFile<LocalFile>) -> LoraParams {
    let params = LoraParams::new(gpu, unet, &fixture_config(f)).unwrap();
    let modules: Vec<&str> = f.tensors().iter().filter_map(|t| t.name.strip_suffix(".down")).collect();
    assert_eq!(params.layers().len(), modules.len(), "adapted layers: engine vs torch");
    for m in modules {
        let l = params.get(m).unwrap_or_else(|| panic!("the engine does not adapt {m}"));
        let (down, up) = (f.read_f32(&format!("{m}.down")).unwrap(), f.read_f32(&format!("{m}.up")).unwrap());
        params.set(gpu, m, &down, &up).unwrap();
        assert_eq!(l.rank, meta(f, "rank") as usize);
    }
    params
}

struct Inputs {
    sample: Tensor,
    timesteps: Vec<f32>,
    context: Tensor,
    target: Tensor,
}

fn inputs(gpu: &Gpu, f: &SafetensorsFile<LocalFile>) -> Inputs {
    Inputs {
        sample: upload(gpu, f, "sample"),
        timesteps: f.read_f32("timesteps").unwrap(),
        context: upload(gpu, f, "encoder_hidden_states"),
        target: upload(gpu, f, "target"),
    }
}

/// One training step's loss and gradients: (loss, prediction, [(name, dA, dB)]).
type Grads = Vec<(String, Vec<f32>, Vec<f32>)>;

fn step(gpu: &Gpu, train: &TrainUNet, x: &Inputs, checkpointing: bool) -> (f64, Vec<f32>, Grads) {
    train.params().zero_grads(gpu);
    let opts = TrainOptions { checkpointing };
    let (pred, tape) = train.forward(gpu, &x.sample, &x.timesteps, &x.context, None, opts).unwrap();
    let d_out = mse_loss_grad(gpu, &pred, &x.target).unwrap();
    train.backward(gpu, tape, &d_out).unwrap();
    let p = read(gpu, &pred);
    let t = read(gpu, &x.target);
    let loss = p.iter().zip(&t).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / p.len() as f64;
    let grads = train
        .params()
        .layers()
        .iter()
        .map(|l| (l.module.clone(), read(gpu, &l.d_down), read(gpu, &l.d_up)))
        .collect();
    (loss, p, grads)
}

/// Worst per-tensor NMSE of `got` against the fixture's gradients.
fn worst_against_fixture(f: &SafetensorsFile<LocalFile>, got: &Grads, label: &str) -> f64 {
    let mut worst = (0f64, String::new());
    for (m, da, db) in got {
        for (suffix, g) in [("down", da), ("up", db)] {
            let want = f.read_f32(&format!("{m}.{suffix}.grad")).unwrap();
            assert!(g.iter().all(|v| v.is_finite()), "{label} {m}.{suffix}: non-finite gradient");
            let e = nmse(g, &want);
            if e.is_nan() || e > worst.0 {
                worst = (e, format!("{m}.{suffix}"));
            }
        }
    }
    eprintln!("{label}: worst gradient NMSE {:.2e} ({})", worst.0, worst.1);
    worst.0
}

fn flat(g: &Grads) -> Vec<f32> {
    g.iter().flat_map(|(_, a, b)| a.iter().chain(b).copied()).collect()
}

#[test]
fn train_unet_lora_params_targets_and_init() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = gpu();
    let mut unet = load(gpu, DType::F32);
    // The tiny UNet has 4 transformers of one block each and 8 resnets (3 with a shortcut).
    for (targets, count) in [(Targets::Attn, 32), (Targets::AttnFf, 48), (Targets::AttnFfConv, 79)] {
        let cfg = LoraConfig { targets, ..LoraConfig::default() };
        let p = LoraParams::new(gpu, &mut unet, &cfg).unwrap();
        assert_eq!(p.layers().len(), count, "{}", targets.name());
        assert_eq!(Targets::from_name(targets.name()).unwrap(), targets);
        assert_eq!(p.trainable().len(), 2 * count);
        for l in p.layers() {
            let fan_in: usize = l.down.shape()[1..].iter().product();
            let a = read(gpu, &l.down);
            let bound = 1.0 / (fan_in as f32).sqrt();
            assert!(a.iter().all(|v| v.abs() <= bound) && a.iter().any(|v| *v != 0.0), "{}: A init", l.module);
            assert!(read(gpu, &l.up).iter().all(|v| *v == 0.0), "{}: B = 0", l.module);
            assert_eq!(l.scale(), cfg.alpha / cfg.rank as f32);
        }
    }
    let p = LoraParams::new(gpu, &mut unet, &LoraConfig { targets: Targets::AttnFfConv, ..Default::default() }).unwrap();
    let proj = p.get("down_blocks.0.attentions.0.proj_in").unwrap();
    assert_eq!(proj.file_shapes(), (vec![4, 16, 1, 1], vec![16, 4, 1, 1]));
    let conv = p.get("down_blocks.0.resnets.0.conv1").unwrap();
    assert_eq!((conv.down.shape(), conv.up.shape()), (&[4, 16, 3, 3][..], &[16, 4, 1, 1][..]));
    assert_eq!(
        p.trainable()[0].name,
        format!("lora_unet_{}.lora_down.weight", p.layers()[0].module.replace('.', "_"))
    );
    // Same seed, same values.
    let again = LoraParams::new(gpu, &mut unet, &LoraConfig { targets: Targets::AttnFfConv, ..Default::default() }).unwrap();
    assert_eq!(read(gpu, &p.layers()[5].down), read(gpu, &again.layers()[5].down));
}

#[test]
fn train_unet_forward_matches_inference() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = gpu();
    let f = fixture();
    let x = inputs(gpu, &f);
    let mut unet = load(gpu, DType::F32);
    let plain = read(gpu, &unet.forward(gpu, &x.sample, &x.timesteps, &x.context).unwrap());

    // B = 0: the adapters add exactly nothing.
    let params = LoraParams::new(gpu, &mut unet, &fixture_config(&f)).unwrap();
    let train = TrainUNet::new(&mut unet, params).unwrap();
    for checkpointing in [false, true] {
        let (y, _) = train.forward(gpu, &x.sample, &x.timesteps, &x.context, None, TrainOptions { checkpointing }).unwrap();
        assert!(read(gpu, &y) == plain, "B = 0 (checkpointing {checkpointing}): training forward differs from inference");
    }

    // The fixture's non-zero adapter, also installed through the inference adapter path.
    let params = fixture_params(gpu, &mut unet, &f);
    let file = block(params.to_lora_file(gpu, "training")).unwrap();
    let train = TrainUNet::new(&mut unet, params).unwrap();
    let (y, _) = train.forward(gpu, &x.sample, &x.timesteps, &x.context, None, TrainOptions::default()).unwrap();
    let got = read(gpu, &y);
    let report = block(adapter::install(gpu, &mut unet, Target::Unet, &[&file], &[1.0])).unwrap();
    assert_eq!((report.layers, report.unmatched.len()), (79, 0));
    let want = read(gpu, &unet.forward(gpu, &x.sample, &x.timesteps, &x.context).unwrap());
    let e = nmse(&got, &want);
    let torch = nmse(&got, &f.read_f32("noise_pred").unwrap());
    let shift = nmse(&plain, &want);
    eprintln!("training forward vs installed adapter: NMSE {e:.2e}; vs torch {torch:.2e}; adapter's effect {shift:.2e}");
    assert!(e <= FORWARD_BOUND, "training forward vs inference with the adapter: NMSE {e:e}");
    assert!(torch <= FORWARD_BOUND, "training forward vs torch: NMSE {torch:e}");
    assert!(shift > 1e-3, "the fixture adapter should change the output (NMSE {shift:e})");
}

#[test]
fn train_unet_gradients_match_torch_autograd() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let f = fixture();
    let want_loss = f.read_f32("loss").unwrap()[0] as f64;
    let mut f32_grads = None;
    for (i, gpu) in gpus().into_iter().enumerate() {
        let x = inputs(gpu, &f);
        let mut unet = load(gpu, DType::F32);
        let params = fixture_params(gpu, &mut unet, &f);
        let train = TrainUNet::new(&mut unet, params).unwrap();
        let (loss, _, grads) = step(gpu, &train, &x, false);
        eprintln!("device {i}: loss {loss:.7} (torch {want_loss:.7})");
        assert!((loss - want_loss).abs() <= 1e-5 * want_loss, "loss {loss} vs torch {want_loss}");
        let e = worst_against_fixture(&f, &grads, &format!("device {i} f32"));
        assert!(e <= GRAD_BOUND, "f32 gradients vs torch: worst NMSE {e:e} > {GRAD_BOUND:e}");
        f32_grads.get_or_insert(grads);
    }
    let gpu = gpu();
    let x = inputs(gpu, &f);
    let want_all: Vec<f32> = f32_grads
        .iter()
        .flat_map(|g| g.iter())
        .flat_map(|(m, _, _)| {
            let d = f.read_f32(&format!("{m}.down.grad")).unwrap();
            d.into_iter().chain(f.read_f32(&format!("{m}.up.grad")).unwrap())
        })
        .collect();
    for (dtype, bound) in [(DType::Q8_0, Q8_BOUND), (DType::Q4_0, Q4_BOUND)] {
        let mut unet = load(gpu, dtype);
        let params = fixture_params(gpu, &mut unet, &f);
        let train = TrainUNet::new(&mut unet, params).unwrap();
        let (_, pred, grads) = step(gpu, &train, &x, false);

        let rounded = RoundTrip { inner: source(), dtype };
        // The quantized policy asks for the matrices as `dtype`; the source hands them over as
        // f32 tensors of the rounded values.
        let mut same = UNet2DConditionModel::load(gpu, &config(), &rounded, WeightPolicy::new(dtype)).unwrap();
        let params = fixture_params(gpu, &mut same, &f);
        let train = TrainUNet::new(&mut same, params).unwrap();
        let (_, pred_r, grads_r) = step(gpu, &train, &x, false);
        let e_pred = nmse(&pred, &pred_r);
        let e_rounded = grads.iter().zip(&grads_r).map(|(a, b)| nmse(&a.1, &b.1).max(nmse(&a.2, &b.2))).fold(0f64, f64::max);
        let e_torch = nmse(&flat(&grads), &want_all);
        eprintln!("{dtype}: vs f32 with rounded weights: prediction {e_pred:.2e}, worst gradient {e_rounded:.2e}; all gradients vs torch f32 {e_torch:.2e}");
        assert!(e_pred <= ROUNDED_BOUND && e_rounded <= ROUNDED_BOUND, "{dtype} vs rounded f32: {e_pred:e} / {e_rounded:e}");
        assert!(e_torch <= bound, "{dtype} gradients vs f32: NMSE {e_torch:e} > {bound:e}");
    }
}

#[test]
fn train_unet_checkpointing_gives_identical_gradients() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = gpu();
    let f = fixture();
    let x = inputs(gpu, &f);
    let mut unet = load(gpu, DType::F32);
    let params = fixture_params(gpu, &mut unet, &f);
    let train = TrainUNet::new(&mut unet, params).unwrap();
    let (loss, pred, grads) = step(gpu, &train, &x, false);
    let (loss_c, pred_c, grads_c) = step(gpu, &train, &x, true);
    assert_eq!(loss, loss_c);
    assert!(pred == pred_c, "checkpointing changed the prediction");
    for ((m, a, b), (_, ac, bc)) in grads.iter().zip(&grads_c) {
        assert!(a == ac && b == bc, "{m}: gradients differ with checkpointing");
    }
    // Two backward passes without zeroing add up.
    train.params().zero_grads(gpu);
    let opts = TrainOptions::default();
    for _ in 0..2 {
        let (pred, tape) = train.forward(gpu, &x.sample, &x.timesteps, &x.context, None, opts).unwrap();
        train.backward(gpu, tape, &mse_loss_grad(gpu, &pred, &x.target).unwrap()).unwrap();
    }
    let l = &train.params().layers()[3];
    let twice: Vec<f32> = grads[3].1.iter().map(|v| 2.0 * v).collect();
    let e = nmse(&read(gpu, &l.d_down), &twice);
    assert!(e <= 1e-12, "accumulated gradients: NMSE {e:e}");

    // Memory held between the passes (the tape), at batch 2 and 8×8 latents.
    let held = |checkpointing| {
        gpu.flush();
        let before = gpu.memory().live_bytes;
        let (pred, tape) = train.forward(gpu, &x.sample, &x.timesteps, &x.context, None, TrainOptions { checkpointing }).unwrap();
        let bytes = gpu.memory().live_bytes - before;
        drop((pred, tape));
        bytes
    };
    let (full, ckpt) = (held(false), held(true));
    eprintln!("tape: {full} bytes without checkpointing, {ckpt} bytes with");
    assert!(ckpt < full, "checkpointing should hold less: {ckpt} vs {full}");
}

fn is_shape(r: loralab::Result<impl Sized>) -> bool {
    matches!(r, Err(Error::Shape { .. }))
}

#[test]
fn train_unet_rejects_bad_inputs() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = gpu();
    let f = fixture();
    let x = inputs(gpu, &f);
    let mut unet = load(gpu, DType::F32);
    let params = LoraParams::new(gpu, &mut unet, &LoraConfig::default()).unwrap();
    let m = params.layers()[0].module.clone();
    assert!(is_shape(params.set(gpu, &m, &[0.0; 3], &[0.0; 3])));
    assert!(matches!(params.set(gpu, "conv_in", &[], &[]), Err(Error::Invalid(_))));
    assert!(matches!(Targets::from_name("everything"), Err(Error::Invalid(_))));
    assert!(matches!(LoraParams::new(gpu, &mut unet, &LoraConfig { rank: 0, ..Default::default() }), Err(Error::Invalid(_))));

    let train = TrainUNet::new(&mut unet, params).unwrap();
    let o = TrainOptions::default();
    let t = &x.timesteps;
    let z = |s: &[usize]| Tensor::zeros(gpu, s).unwrap();
    assert!(is_shape(train.forward(gpu, &z(&[2, 3, 8, 8]), t, &x.context, None, o)), "channels");
    assert!(is_shape(train.forward(gpu, &z(&[2, 4, 7, 8]), t, &x.context, None, o)), "odd size");
    assert!(is_shape(train.forward(gpu, &z(&[2, 4, 8]), t, &x.context, None, o)), "rank");
    assert!(is_shape(train.forward(gpu, &x.sample, t, &z(&[2, 77, 9]), None, o)), "context width");
    assert!(is_shape(train.forward(gpu, &x.sample, t, &z(&[1, 77, 8]), None, o)), "context batch");
    assert!(is_shape(train.forward(gpu, &x.sample, &[1.0, 2.0, 3.0], &x.context, None, o)), "timesteps");
    assert!(is_shape(train.forward(gpu, &x.sample, t, &x.context, Some(&z(&[2, 4])), o)), "timestep_cond");
    let (pred, tape) = train.forward(gpu, &x.sample, &[10.0], &x.context, None, o).unwrap();
    assert!(is_shape(train.backward(gpu, tape, &z(&[2, 4, 8, 4]))), "output gradient");
    assert!(is_shape(mse_loss_grad(gpu, &pred, &z(&[1, 4, 8, 8]))));
}
