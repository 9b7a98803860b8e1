//! Training the text encoder with the UNet (`model::backward::TrainClip` and
//! `TrainUNet::backward_with_context_grad`): the training forward against the inference
//! encoder (B = 0), and every adapter gradient of both models against torch autograd
//! (tests/fixtures/train/te_grads.safetensors, `tools/fixtures/train_grads.py --case te`: the
//! tiny fixture model with rank-4 LoRA on the text encoder's attention and MLP projections and
//! the UNet's attention projections, loss = mse(unet(x, t, text_encoder(ids)), y)), with and
//! without gradient checkpointing; kohya's `lora_te_` names; clip skip.
//!
//! Error measure: NMSE = Σ(got − want)² / Σwant² per tensor.

use super::common::{gpu, read};
use loralab::io::safetensors::SafetensorsFile;
use loralab::io::LocalFile;
use loralab::model::backward::{mse_loss_grad, LoraConfig, LoraParams, Targets, TrainClip, TrainOptions, TrainUNet};
use loralab::model::checkpoint::open_path;
use loralab::model::clip::{ClipTextModel, EncodeOpts};
use loralab::model::unet::UNet2DConditionModel;
use loralab::pipeline::WeightPlan;
use loralab::quant::nmse;
use loralab::{DType, Gpu, Tensor};
use std::path::{Path, PathBuf};

/// The training forward with B = 0 against the inference encoder: the same kernels on the
/// same values. Measured on lavapipe: 0 (bit-identical), clip skip 0 and 1.
const FORWARD_BOUND: f64 = 1e-12;
/// Engine f32 prompt embeddings and prediction (non-zero adapters) against torch's. Measured
/// on lavapipe: embeddings 8.7e-14, prediction 1.3e-12.
const PRED_BOUND: f64 = 1e-10;
/// Engine f32 gradients against torch f32 autograd, per tensor. Measured on lavapipe: worst
/// 7.1e-11 of the text encoder's 24 tensors, 1.3e-10 of the UNet's 64 (its cross-attention
/// `to_k`, whose input is the trained prompt embedding).
const GRAD_BOUND: f64 = 1e-8;

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/tiny-sd15-a")
}

fn fixture() -> SafetensorsFile<LocalFile> {
    SafetensorsFile::open_path(tiny().join("../../train/te_grads.safetensors")).unwrap()
}

fn meta(f: &SafetensorsFile<LocalFile>, key: &str) -> String {
    f.metadata().get(key).unwrap_or_else(|| panic!("fixture metadata {key} missing")).clone()
}

fn upload(gpu: &Gpu, f: &SafetensorsFile<LocalFile>, name: &str) -> Tensor {
    let shape = f.get(name).unwrap_or_else(|| panic!("fixture tensor {name} missing")).shape.clone();
    Tensor::from_f32(gpu, &shape, &f.read_f32(name).unwrap()).unwrap()
}

fn models(gpu: &Gpu) -> (ClipTextModel, UNet2DConditionModel) {
    let ck = open_path(tiny(), None).unwrap();
    let plan = WeightPlan::new(DType::F32);
    let te = ClipTextModel::load(gpu, &ck.config.text_encoder, &ck.text_encoder, plan.text_encoder).unwrap();
    let unet = UNet2DConditionModel::load(gpu, &ck.config.unet, &ck.unet, plan.unet).unwrap();
    (te, unet)
}

/// Sets every adapter of `params` to the fixture's `<prefix>.<module>` A and B; checks that the
/// engine adapts the same layers as torch.
fn set_from(gpu: &Gpu, params: &LoraParams, f: &SafetensorsFile<LocalFile>, prefix: &str) {
    let modules: Vec<String> = f
        .tensors()
        .iter()
        .filter_map(|t| t.name.strip_prefix(&format!("{prefix}."))?.strip_suffix(".down").map(str::to_string))
        .collect();
    assert_eq!(params.layers().len(), modules.len(), "{prefix}: adapted layers, engine vs torch");
    for m in modules {
        let down = f.read_f32(&format!("{prefix}.{m}.down")).unwrap();
        let up = f.read_f32(&format!("{prefix}.{m}.up")).unwrap();
        params.set(gpu, &m, &down, &up).unwrap_or_else(|e| panic!("{prefix}.{m}: {e}"));
    }
}

fn ids(f: &SafetensorsFile<LocalFile>) -> Vec<Vec<u32>> {
    let v = f.read_f32("input_ids").unwrap();
    v.chunks(77).map(|r| r.iter().map(|&x| x as u32).collect()).collect()
}

/// Worst per-tensor NMSE of the adapters' gradients against the fixture's.
fn worst(gpu: &Gpu, params: &LoraParams, f: &SafetensorsFile<LocalFile>, prefix: &str) -> f64 {
    let mut worst = (0f64, String::new());
    for l in params.layers() {
        for (suffix, g) in [("down", &l.d_down), ("up", &l.d_up)] {
            let name = format!("{prefix}.{}.{suffix}.grad", l.module);
            let got = read(gpu, g);
            assert!(got.iter().all(|v| v.is_finite()), "{name}: non-finite gradient");
            let e = nmse(&got, &f.read_f32(&name).unwrap());
            if e.is_nan() || e > worst.0 {
                worst = (e, name);
            }
        }
    }
    eprintln!("{prefix}: worst gradient NMSE {:.2e} ({})", worst.0, worst.1);
    worst.0
}

#[test]
fn train_clip_forward_with_zero_b_is_the_inference_encoder() {
    let g = gpu();
    let (mut te, _) = models(g);
    let config = LoraConfig { rank: 4, alpha: 2.0, seed: 3, ..LoraConfig::default() };
    let f = fixture();
    let rows = ids(&f);
    let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    for clip_skip in [0usize, 1] {
        let layers = 2 - clip_skip;
        let params = LoraParams::new_text_encoder(g, &mut te, &config, layers).unwrap();
        assert_eq!(params.layers().len(), 6 * layers);
        let names: Vec<String> = params.trainable().iter().map(|t| t.name.clone()).collect();
        assert!(names.contains(&"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight".to_string()), "{names:?}");
        assert_eq!(names.iter().any(|n| n.starts_with("lora_te_text_model_encoder_layers_1_mlp_fc2.")), clip_skip == 0);
        let train = TrainClip::new(&mut te, params, layers, true).unwrap();
        let e = te.embeddings(g, &rows).unwrap();
        let (got, _tape) = train.forward(g, &e, TrainOptions::default()).unwrap();
        let want = te.encode(g, &rows, EncodeOpts::clip_skip(clip_skip)).unwrap();
        let err = nmse(&read(g, &got), &read(g, &want));
        eprintln!("clip_skip {clip_skip}: training forward vs inference NMSE {err:e}");
        assert!(err <= FORWARD_BOUND, "clip_skip {clip_skip}: {err:e}");
    }
    let e = LoraParams::new_text_encoder(g, &mut te, &LoraConfig { rank: 0, ..config.clone() }, 2).err().expect("rank 0 refused");
    assert!(e.to_string().contains("rank"), "{e}");
    let params = LoraParams::new_text_encoder(g, &mut te, &config, 2).unwrap();
    let e = TrainClip::new(&mut te, params, 3, true).err().expect("3 layers of 2 refused");
    assert!(e.to_string().contains("3 encoder layers"), "{e}");
}

#[test]
fn train_clip_gradients_match_torch_autograd() {
    let g = gpu();
    let f = fixture();
    assert_eq!(meta(&f, "targets"), "attn");
    let rank: usize = meta(&f, "rank").parse().unwrap();
    let alpha: f32 = meta(&f, "alpha").parse().unwrap();
    let config = LoraConfig { targets: Targets::Attn, rank, alpha, seed: 1, ..LoraConfig::default() };
    let (mut te, mut unet) = models(g);
    let te_params = LoraParams::new_text_encoder(g, &mut te, &config, 2).unwrap();
    set_from(g, &te_params, &f, "te");
    let clip = TrainClip::new(&mut te, te_params, 2, true).unwrap();
    let unet_params = LoraParams::new(g, &mut unet, &config).unwrap();
    set_from(g, &unet_params, &f, "unet");
    let train = TrainUNet::new(&mut unet, unet_params).unwrap();

    let rows = ids(&f);
    let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let (sample, target) = (upload(g, &f, "sample"), upload(g, &f, "target"));
    let ts = f.read_f32("timesteps").unwrap();
    let mut runs = vec![];
    for checkpointing in [false, true] {
        let opts = TrainOptions { checkpointing };
        clip.params().zero_grads(g);
        train.params().zero_grads(g);
        let e = te.embeddings(g, &rows).unwrap();
        let (ctx, ctape) = clip.forward(g, &e, opts).unwrap();
        let (pred, tape) = train.forward(g, &sample, &ts, &ctx, None, opts).unwrap();
        let d = mse_loss_grad(g, &pred, &target).unwrap();
        let d_ctx = train.backward_with_context_grad(g, tape, &d).unwrap();
        assert_eq!(d_ctx.shape(), ctx.shape());
        clip.backward(g, ctape, &d_ctx, false).unwrap();
        let (ce, pe) = (nmse(&read(g, &ctx), &f.read_f32("prompt_embeds").unwrap()), nmse(&read(g, &pred), &f.read_f32("noise_pred").unwrap()));
        eprintln!("checkpointing {checkpointing}: prompt embeds NMSE {ce:e}, prediction NMSE {pe:e}");
        assert!(ce <= PRED_BOUND && pe <= PRED_BOUND, "{ce:e} {pe:e}");
        let (wt, wu) = (worst(g, clip.params(), &f, "te"), worst(g, train.params(), &f, "unet"));
        assert!(wt <= GRAD_BOUND, "text encoder gradients: {wt:e}");
        assert!(wu <= GRAD_BOUND, "UNet gradients: {wu:e}");
        let all: Vec<Vec<f32>> =
            clip.params().layers().iter().flat_map(|l| [read(g, &l.d_down), read(g, &l.d_up)]).collect();
        runs.push(all);
    }
    assert_eq!(runs[0], runs[1], "checkpointing changed the text encoder's gradients");
}

/// Loss `Σ out · r` of the text encoder (no adapters) over `rows`, the added tokens' rows read
/// from `table` (`[1 + n, dim]`).
fn weighted_sum(g: &Gpu, te: &ClipTextModel, train: &TrainClip, rows: &[&[u32]], table: &[f32], r: &[f32]) -> f64 {
    let dim = te.config().hidden_size;
    let t = Tensor::from_f32(g, &[table.len() / dim, dim], table).unwrap();
    let e = te.embeddings_with_added(g, rows, &t).unwrap();
    let (out, _tape) = train.forward(g, &e, TrainOptions::default()).unwrap();
    read(g, &out).iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// A learned token's rows (pivotal tuning): with the added table at the rows of their base
/// tokens the embeddings equal the model's own; the backward's gradient at the embeddings,
/// summed per added id (`token_row_grads`), against central differences of the f32 forward,
/// with and without checkpointing.
#[test]
fn train_clip_added_token_gradients_match_finite_differences() {
    let g = gpu();
    let (mut te, _) = models(g);
    let dim = te.config().hidden_size;
    let vocab = te.config().vocab_size as u32;
    let base: [u32; 2] = [1000, 2000];
    // Two rows of 12 tokens: the added ids (vocab, vocab + 1) where the base tokens were, once
    // and twice.
    let plain: Vec<Vec<u32>> =
        vec![vec![49406, 320, 1000, 2000, 530, 320, 1125, 49407, 49407, 49407, 49407, 49407], vec![49406, 1000, 2000, 539, 1000, 2000, 49407, 49407, 49407, 49407, 49407, 49407]];
    let added: Vec<Vec<u32>> = plain.iter().map(|r| r.iter().map(|&t| base.iter().position(|&b| b == t).map_or(t, |k| vocab + k as u32)).collect()).collect();
    let plain_rows: Vec<&[u32]> = plain.iter().map(Vec::as_slice).collect();
    let rows: Vec<&[u32]> = added.iter().map(Vec::as_slice).collect();
    let mut table = vec![0.0f32; dim];
    table.extend(super::common::block(te.token_rows_f32(g, &base)).unwrap());
    let t = Tensor::from_f32(g, &[3, dim], &table).unwrap();
    let same = nmse(&read(g, &te.embeddings_with_added(g, &rows, &t).unwrap()), &read(g, &te.embeddings(g, &plain_rows).unwrap()));
    assert_eq!(same, 0.0, "added rows equal to their base tokens' give the same embeddings");
    // Rows moved away from the base, so the check is not at a special point.
    let mut rng = loralab::rng::Rng::new(5);
    for v in &mut table[dim..] {
        *v += (rng.uniform() as f32 - 0.5) * 0.6;
    }
    let r = rng.uniform_vec(2 * 12 * dim, -1.0, 1.0);
    for checkpointing in [false, true] {
        let train = TrainClip::new(&mut te, LoraParams::none(&LoraConfig::default()), 2, true).unwrap();
        let t = Tensor::from_f32(g, &[3, dim], &table).unwrap();
        let e = te.embeddings_with_added(g, &rows, &t).unwrap();
        let (out, tape) = train.forward(g, &e, TrainOptions { checkpointing }).unwrap();
        let d_out = Tensor::from_f32(g, out.shape(), &r).unwrap();
        let de = train.backward(g, tape, &d_out, true).unwrap().expect("embedding gradient");
        let got = loralab::model::backward::token_row_grads(&rows, &read(g, &de), vocab, 2, dim).unwrap();
        assert!(got[..dim].iter().all(|&v| v == 0.0), "row 0 has no gradient");
        let (mut worst, mut scale) = (0.0f64, 0.0f64);
        let h = 1e-2f32;
        for idx in [dim, dim + 7, dim + dim / 2, 2 * dim + 3, 3 * dim - 1] {
            let mut p = table.clone();
            p[idx] += h;
            let up = weighted_sum(g, &te, &train, &rows, &p, &r);
            p[idx] -= 2.0 * h;
            let down = weighted_sum(g, &te, &train, &rows, &p, &r);
            let fd = (up - down) / (2.0 * h as f64);
            worst = worst.max((fd - got[idx] as f64).abs());
            scale = scale.max(fd.abs());
        }
        eprintln!("checkpointing {checkpointing}: added-token gradient vs central differences: worst |Δ| {worst:e} of max |g| {scale:e}");
        assert!(scale > 1e-3, "the gradient is not trivially zero");
        assert!(worst <= 5e-3 * scale, "worst {worst:e} of {scale:e}");
    }
}
