//! Adapters applied unmerged inside the kernels (`loralab::adapter`) against the CPU
//! reference `lora::merged_weight`: every algorithm (LoRA, LoCon with and without Tucker,
//! LoHa with and without Tucker, LoKr full / low-rank / Tucker, IA³ on outputs and inputs,
//! full with bias diff, DoRA from PEFT and from LyCORIS on both axes, norm diffs) on the tiny
//! SD1.5-architecture UNet, stacked, at several strengths and on quantized bases: the UNet
//! with adapters in the kernels must match a UNet loaded with the merged weights. Strength 0
//! must give the base model's output bit for bit.
//!
//! Measured on lavapipe (relative error of the UNet output): f32 base ≤ 1e-6 for every
//! algorithm alone and stacked; quantized bases 8e-7 for the factored algorithms and
//! ≤ 1.4e-4 stacked, from the f16 storage of dense terms (LoHa, full, DoRA) on reduced-precision
//! bases. The adapters change the output by 60–90 %.

use super::common::{block, gpu, randn, randu};
use loralab::adapter;
use loralab::io::safetensors::SafetensorsFile;
use loralab::io::LocalFile;
use loralab::lora::{
    merged_weight, Delta, Dora, DoraKind, Factor, HostTensor, LayerAdapter, LayerShape, LoraFile, Target,
};
use loralab::model::config::UNetConfig;
use loralab::model::unet::UNet2DConditionModel;
use loralab::model::{SafetensorsSource, WeightPolicy, WeightSource};
use loralab::quant::{nmse, round_trip};
use loralab::{DType, Gpu, Result, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn unet_file() -> SafetensorsFile<LocalFile> {
    SafetensorsFile::open_path(fixtures().join("models/tiny-sd15-a/unet/diffusion_pytorch_model.safetensors")).unwrap()
}

fn config() -> UNetConfig {
    let text = std::fs::read_to_string(fixtures().join("models/tiny-sd15-a/unet/config.json")).unwrap();
    UNetConfig::from_json(&text, "unet/config.json").unwrap()
}

/// The base weights with some tensors replaced (host values, stored per the policy).
struct Overlay {
    base: SafetensorsSource<LocalFile>,
    over: HashMap<String, HostTensor>,
}

impl WeightSource for Overlay {
    fn load(&self, gpu: &Gpu, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        match self.over.get(name) {
            // Merged weights stay exact (f32): they already hold the dequantized base.
            Some(t) => Tensor::from_f32_as(gpu, shape, &t.data, if t.shape.len() > 1 { DType::F32 } else { dtype }),
            None => self.base.load(gpu, name, shape, dtype),
        }
    }
    fn contains(&self, name: &str) -> bool {
        self.over.contains_key(name) || self.base.contains(name)
    }
    fn describe(&self) -> String {
        "merged weights".into()
    }
}

fn ht(shape: &[usize], seed: u64, scale: f32) -> HostTensor {
    let n: usize = shape.iter().product();
    HostTensor::new(shape.to_vec(), randn(n, seed).iter().map(|v| v * scale).collect()).unwrap()
}

fn layer(module: &str, delta: Delta, dora: Option<Dora>) -> LayerAdapter {
    LayerAdapter { target: Target::Unet, module: module.into(), key: format!("test.{module}"), delta, dora, alpha: None }
}

fn file(name: &str, layers: Vec<LayerAdapter>) -> LoraFile {
    LoraFile {
        file: name.into(),
        format: loralab::lora::Format::Lycoris,
        algorithms: vec![],
        layers,
        metadata: Default::default(),
        unrecognised: vec![],
        other_components: vec![],
        base: loralab::lora::BaseModel::Sd1,
        base_reason: None,
        bytes: 0,
        dtypes: vec![],
        warnings: vec![],
        embeddings: vec![],
    }
}

/// Weight shape of a module in the fixture UNet.
fn wshape(f: &SafetensorsFile<LocalFile>, module: &str) -> Vec<usize> {
    f.get(&format!("{module}.weight")).unwrap_or_else(|| panic!("no {module}")).shape.clone()
}

const Q: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
const K: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k";
const OUT: &str = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0";
const FF: &str = "mid_block.attentions.0.transformer_blocks.0.ff.net.2";
const PROJ: &str = "mid_block.attentions.0.proj_in";
const CONV1: &str = "down_blocks.0.resnets.0.conv1";
const CONV2: &str = "up_blocks.0.resnets.1.conv2";
const SHORT: &str = "up_blocks.1.resnets.0.conv_shortcut";
const TEMB: &str = "down_blocks.1.resnets.0.time_emb_proj";
const CONV_IN: &str = "conv_in";
const NORM: &str = "down_blocks.1.resnets.0.norm2";

/// Adapter files covering every algorithm, each on a few modules of the fixture UNet.
fn adapters(f: &SafetensorsFile<LocalFile>) -> Vec<LoraFile> {
    let s = |m: &str| wshape(f, m);
    let lowrank = |m: &str, r: usize, seed: u64, tucker: bool| {
        let w = s(m);
        let (out, inp) = (w[0], w[1]);
        let k = w.get(2).copied().unwrap_or(1);
        let (down, mid) = if tucker {
            (ht(&[r, inp, 1, 1], seed, 0.3), Some(ht(&[r, r, k, k], seed + 1, 0.3)))
        } else if w.len() == 4 {
            (ht(&[r, inp, k, k], seed, 0.3), None)
        } else {
            (ht(&[r, inp], seed, 0.3), None)
        };
        let up = if w.len() == 4 { ht(&[out, r, 1, 1], seed + 2, 0.3) } else { ht(&[out, r], seed + 2, 0.3) };
        Delta::LowRank { down, up, mid, scale: 0.75 }
    };
    let loha = |m: &str, r: usize, seed: u64, tucker: bool| {
        let w = s(m);
        let (out, inp) = (w[0], w[1]);
        let k = w.get(2).copied().unwrap_or(1);
        if tucker {
            Delta::LoHa {
                w1a: ht(&[r, out], seed, 0.5),
                w1b: ht(&[r, inp], seed + 1, 0.5),
                w2a: ht(&[r, out], seed + 2, 0.5),
                w2b: ht(&[r, inp], seed + 3, 0.5),
                t1: Some(ht(&[r, r, k, k], seed + 4, 0.5)),
                t2: Some(ht(&[r, r, k, k], seed + 5, 0.5)),
                scale: 0.5,
            }
        } else {
            Delta::LoHa {
                w1a: ht(&[out, r], seed, 0.5),
                w1b: ht(&[r, inp * k * k], seed + 1, 0.5),
                w2a: ht(&[out, r], seed + 2, 0.5),
                w2b: ht(&[r, inp * k * k], seed + 3, 0.5),
                t1: None,
                t2: None,
                scale: 0.5,
            }
        }
    };
    // LoKr with w1 [a, b]: out = a·c, in = b·d.
    let lokr = |m: &str, a: usize, b: usize, seed: u64, w2kind: u8| {
        let w = s(m);
        let (out, inp) = (w[0], w[1]);
        let k = w.get(2).copied().unwrap_or(1);
        let (c, d) = (out / a, inp / b);
        let mut w2shape = vec![c, d];
        if w.len() == 4 {
            w2shape.extend([k, k]);
        }
        let (w2, t2, scale) = match w2kind {
            0 => (Factor::Full(ht(&w2shape, seed + 1, 0.4)), None, 1.0),
            1 => (Factor::LowRank { a: ht(&[c, 2], seed + 1, 0.4), b: ht(&[2, d * k * k], seed + 2, 0.4) }, None, 0.6),
            _ => (
                Factor::LowRank { a: ht(&[2, c], seed + 1, 0.4), b: ht(&[2, d], seed + 2, 0.4) },
                Some(ht(&[2, 2, k, k], seed + 3, 0.4)),
                0.6,
            ),
        };
        Delta::LoKr { w1: Factor::Full(ht(&[a, b], seed, 0.4)), w2, t2, scale }
    };
    let ia3 = |m: &str, seed: u64, on_input: bool| {
        let w = s(m);
        Delta::Ia3 { weight: HostTensor::new(vec![w[usize::from(on_input)]], randu(w[usize::from(on_input)], -0.5, 0.5, seed)).unwrap(), on_input }
    };
    let full = |m: &str, seed: u64| {
        let w = s(m);
        Delta::Full { diff: ht(&w, seed, 0.05), diff_b: Some(ht(&[w[0]], seed + 1, 0.1)) }
    };
    // DoRA magnitudes: the base norms scaled by 0.8 .. 1.2.
    let dora = |m: &str, seed: u64, kind: DoraKind| {
        let w = s(m);
        let base = f.read_f32(&format!("{m}.weight")).unwrap();
        let (out, cols) = (w[0], base.len() / w[0]);
        let per_in = matches!(kind, DoraKind::Lycoris { on_output: false });
        let len = if per_in { w[1] } else { out };
        let taps = cols / w[1];
        let mut norms = vec![0f64; len];
        for r in 0..out {
            for c in 0..cols {
                let ch = if per_in { c / taps } else { r };
                norms[ch] += (base[r * cols + c] as f64).powi(2);
            }
        }
        let jitter = randu(len, 0.8, 1.2, seed);
        let m: Vec<f32> = norms.iter().zip(jitter).map(|(n, j)| n.sqrt() as f32 * j).collect();
        Dora { magnitude: HostTensor::new(vec![len], m).unwrap(), kind }
    };
    let c = s(NORM)[0];
    vec![
        file("lora", vec![layer(Q, lowrank(Q, 4, 1, false), None), layer(FF, lowrank(FF, 3, 2, false), None), layer(PROJ, lowrank(PROJ, 2, 3, false), None), layer(TEMB, lowrank(TEMB, 2, 4, false), None)]),
        file("locon", vec![layer(CONV1, lowrank(CONV1, 4, 10, false), None), layer(SHORT, lowrank(SHORT, 3, 11, false), None), layer(CONV_IN, lowrank(CONV_IN, 2, 12, true), None), layer(Q, lowrank(Q, 2, 13, false), None)]),
        file("loha", vec![layer(K, loha(K, 3, 20, false), None), layer(CONV2, loha(CONV2, 2, 21, true), None), layer(CONV1, loha(CONV1, 2, 22, false), None)]),
        file("lokr", vec![layer(OUT, lokr(OUT, 4, 2, 30, 0), None), layer(CONV2, lokr(CONV2, 2, 4, 31, 2), None), layer(FF, lokr(FF, 2, 4, 32, 1), None), layer(CONV1, lokr(CONV1, 4, 2, 33, 0), None)]),
        file("ia3", vec![layer(Q, ia3(Q, 40, false), None), layer(FF, ia3(FF, 41, true), None), layer(CONV2, ia3(CONV2, 42, true), None)]),
        file("full", vec![layer(TEMB, full(TEMB, 50), None), layer(CONV1, full(CONV1, 51), None), layer(Q, full(Q, 52), None),
            layer(NORM, Delta::Norm { weight: Some(ht(&[c], 53, 0.2)), bias: Some(ht(&[c], 54, 0.2)) }, None)]),
        file("dora", vec![
            layer(OUT, lowrank(OUT, 3, 60, false), Some(dora(OUT, 61, DoraKind::Peft))),
            layer(CONV1, lowrank(CONV1, 2, 62, false), Some(dora(CONV1, 63, DoraKind::Lycoris { on_output: true }))),
            layer(FF, lowrank(FF, 2, 64, false), Some(dora(FF, 65, DoraKind::Lycoris { on_output: false }))),
            layer(CONV2, lowrank(CONV2, 2, 66, false), Some(dora(CONV2, 67, DoraKind::Lycoris { on_output: false }))),
        ]),
    ]
}

/// The UNet with `files` merged at `strengths` on the CPU (lora::merged_weight), f32.
fn merged_unet(gpu: &Gpu, f: &SafetensorsFile<LocalFile>, files: &[LoraFile], strengths: &[f32], base_dt: DType) -> UNet2DConditionModel {
    let mut by_module: HashMap<&str, Vec<(&LayerAdapter, f32)>> = HashMap::new();
    for (file, &s) in files.iter().zip(strengths) {
        for l in &file.layers {
            by_module.entry(l.module.as_str()).or_default().push((l, s));
        }
    }
    let mut over = HashMap::new();
    for (module, list) in by_module {
        let wname = format!("{module}.weight");
        let shape = wshape(f, module);
        let mut w = f.read_f32(&wname).unwrap();
        if shape.len() > 1 {
            let rows = shape[0];
            w = round_trip(&w, rows, w.len() / rows, base_dt);
        }
        let base = HostTensor::new(shape.clone(), w).unwrap();
        let bname = format!("{module}.bias");
        let bias = f.get(&bname).map(|_| HostTensor::new(vec![shape[0]], f.read_f32(&bname).unwrap()).unwrap());
        let ls = LayerShape::from_weight_shape(&shape).unwrap();
        let (mw, mb) = merged_weight(&list, &base, bias.as_ref(), &ls).unwrap_or_else(|e| panic!("{module}: {e}"));
        over.insert(wname, mw);
        if let Some(mb) = mb {
            over.insert(bname, mb);
        }
    }
    let src = Overlay { base: SafetensorsSource::new(unet_file(), ""), over };
    UNet2DConditionModel::load(gpu, &config(), &src, WeightPolicy::new(base_dt)).unwrap()
}

struct Inputs {
    sample: Tensor,
    ehs: Tensor,
}

fn inputs(gpu: &Gpu) -> Inputs {
    Inputs {
        sample: Tensor::from_f32(gpu, &[1, 4, 8, 8], &randn(256, 7)).unwrap(),
        ehs: Tensor::from_f32(gpu, &[1, 77, 8], &randn(77 * 8, 8)).unwrap(),
    }
}

fn run(gpu: &Gpu, u: &UNet2DConditionModel, x: &Inputs) -> Vec<f32> {
    let y = u.forward(gpu, &x.sample, &[500.0], &x.ehs).unwrap();
    block(y.to_f32(gpu)).unwrap()
}

fn rel(got: &[f32], want: &[f32]) -> f64 {
    assert!(got.iter().all(|v| v.is_finite()), "non-finite output");
    nmse(got, want).sqrt()
}

fn check(base_dt: DType, strengths_sets: &[Vec<f32>], bound: f64) {
    let gpu = gpu();
    let f = unet_file();
    let files = adapters(&f);
    let refs: Vec<&LoraFile> = files.iter().collect();
    let x = inputs(gpu);
    let mut u = UNet2DConditionModel::load(gpu, &config(), &SafetensorsSource::new(unet_file(), ""), WeightPolicy::new(base_dt)).unwrap();
    let base_out = run(gpu, &u, &x);
    let first = &strengths_sets[0];
    let report = block(adapter::install(gpu, &mut u, Target::Unet, &refs, first)).unwrap();
    assert!(report.unmatched.is_empty(), "{:?}", report.unmatched);
    assert_eq!(report.matched, files.iter().map(|f| f.layers.len()).sum::<usize>());
    for (i, strengths) in strengths_sets.iter().enumerate() {
        if i > 0 {
            adapter::set_strengths(gpu, &mut u, strengths).unwrap();
        }
        let got = run(gpu, &u, &x);
        let want = run(gpu, &merged_unet(gpu, &f, &files, strengths, base_dt), &x);
        let e = rel(&got, &want);
        let change = rel(&want, &base_out);
        eprintln!("{base_dt} strengths {strengths:?}: relative error {e:.2e} (adapters change the output by {change:.2e})");
        assert!(change > 1e-2, "the adapters hardly change the output ({change:.2e})");
        assert!(e < bound, "{base_dt} strengths {strengths:?}: relative error {e:.2e} > {bound:e}");
    }
    // All strengths 0: the plain kernels run, bit for bit the base output.
    adapter::set_strengths(gpu, &mut u, &vec![0.0; files.len()]).unwrap();
    assert_eq!(run(gpu, &u, &x), base_out, "strength 0 differs from the base model");
    adapter::clear(&mut u);
    assert_eq!(run(gpu, &u, &x), base_out, "removing the adapters did not restore the base model");
}

#[test]
fn every_algorithm_stacked_matches_merged_weights_f32() {
    let sets = vec![vec![1.0; 7], vec![0.5, -0.7, 1.3, 0.25, 2.0, -1.0, 0.6], {
        let mut v = vec![0.0; 7];
        v[6] = 0.8; // DoRA alone
        v
    }];
    check(DType::F32, &sets, 2e-5);
}

#[test]
fn every_algorithm_on_quantized_bases() {
    // Dense terms are stored f16 on reduced-precision bases; the base is dequantized exactly.
    let sets = vec![vec![1.0; 7], vec![0.5, -0.7, 1.3, 0.25, 2.0, -1.0, 0.6]];
    check(DType::Q8_0, &sets, 5e-4);
    check(DType::Q4_0, &sets, 5e-4);
    check(DType::F16, &sets, 5e-4);
}

#[test]
fn each_algorithm_alone() {
    let gpu = gpu();
    let f = unet_file();
    let files = adapters(&f);
    let x = inputs(gpu);
    for (dt, bound) in [(DType::F32, 2e-5), (DType::Q8_0, 5e-4)] {
        for (i, file) in files.iter().enumerate() {
            let mut u = UNet2DConditionModel::load(gpu, &config(), &SafetensorsSource::new(unet_file(), ""), WeightPolicy::new(dt)).unwrap();
            block(adapter::install(gpu, &mut u, Target::Unet, &[file], &[0.9])).unwrap();
            let got = run(gpu, &u, &x);
            let want = run(gpu, &merged_unet(gpu, &f, std::slice::from_ref(&files[i]), &[0.9], dt), &x);
            let e = rel(&got, &want);
            eprintln!("{dt} {}: relative error {e:.2e}", file.file);
            assert!(e < bound, "{dt} {}: relative error {e:.2e}", file.file);
        }
    }
}
