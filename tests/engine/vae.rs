//! AutoencoderKL against diffusers: the tiny fixture VAEs (tests/fixtures/models/tiny-sd15-{a,b}/vae)
//! encode the recorded image and decode the recorded latents; outputs are compared with
//! tests/fixtures/refs/<model>/vae.safetensors (moments, mean, clamped logvar, std,
//! decoded_from_mean) and with a sampler case's final image. The large-channel attention path
//! (matmul + softmax, chunked over queries) is checked against the CPU reference directly.
//!
//! Error measure: relative L2 error `||got - want|| / ||want||` (= sqrt(nmse)).
//! Measured on lavapipe with f32 (and, identically, f16) weights: model a: moments 9.0e-7,
//! decoded 2.6e-6; model b: moments 1.5e-6, decoded 3.4e-6 (3.0e-6 without f16/subgroups);
//! pipeline image after postprocessing 2.5e-7 / 2.1e-7 — bound 2e-5 (target 1e-4).
//! q8_0 / q4_0 weights against diffusers' f32 model (model b): moments 1.4e-2 / 0.36, decoded
//! 3.6e-2 / 0.67 (bounds 0.1 / 1.0); against the same model with the weights dequantized to f32
//! on the CPU: bit-identical (0), bound 2e-5.
//! Tiled decode (diffusers' `enable_tiling()` with 4×4 / 3×3 latent tiles): 2.6e-6 / 2.5e-6
//! (model a), 2.7e-6 / 2.4e-6 (model b), bound 2e-5.

use crate::common::*;
use loralab::io::safetensors::SafetensorsFile;
use loralab::io::LocalFile;
use loralab::model::checkpoint::open_path;
use loralab::model::config::VaeConfig;
use loralab::model::vae::{to_image_01, to_rgb8, AutoencoderKL, DiagonalGaussian, VaeParts};
use loralab::model::vae_blocks::{attention_by_matmul, single_head_attention};
use loralab::model::vae_tiling::{decoder_peak_tensor_bytes, needs_tiling, VaeTiling};
use loralab::model::{SafetensorsSource, WeightPolicy, WeightSource};
use loralab::ops::attention::reference;
use loralab::quant::{nmse, round_trip, DType};
use loralab::{Error, Gpu, Tensor};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn config(model: &str) -> VaeConfig {
    let path = fixtures().join(format!("models/{model}/vae/config.json"));
    VaeConfig::from_json(&std::fs::read_to_string(&path).unwrap(), "vae/config.json").unwrap()
}

fn weights(model: &str) -> SafetensorsSource<LocalFile> {
    let path = fixtures().join(format!("models/{model}/vae/diffusion_pytorch_model.safetensors"));
    // The diffusers folder stores the component's parameters without a prefix.
    SafetensorsSource::new(SafetensorsFile::open_path(path).unwrap(), "")
}

fn refs(model: &str, file: &str) -> SafetensorsFile<LocalFile> {
    SafetensorsFile::open_path(fixtures().join(format!("refs/{model}/{file}.safetensors"))).unwrap()
}

fn load(gpu: &Gpu, model: &str, dtype: DType) -> AutoencoderKL {
    AutoencoderKL::load(gpu, &config(model), &weights(model), WeightPolicy::new(dtype), VaeParts::Both).unwrap()
}

fn upload(gpu: &Gpu, r: &SafetensorsFile<LocalFile>, name: &str) -> Tensor {
    let e = r.get(name).unwrap_or_else(|| panic!("reference tensor {name}"));
    Tensor::from_f32(gpu, &e.shape.clone(), &r.read_f32(name).unwrap()).unwrap()
}

fn rel(got: &[f32], want: &[f32]) -> f64 {
    assert!(got.iter().all(|v| v.is_finite()), "non-finite output");
    nmse(got, want).sqrt()
}

fn check(what: &str, got: &[f32], want: &[f32], bound: f64) -> f64 {
    let e = rel(got, want);
    eprintln!("{what}: relative error {e:.2e} (bound {bound:.0e})");
    assert!(e <= bound, "{what}: relative error {e:e} > {bound:e}");
    e
}

/// Encodes the reference image and decodes the reference latents; checks every output.
fn parity(gpu: &Gpu, model: &str, dtype: DType, bound: f64) {
    let vae = load(gpu, model, dtype);
    let r = refs(model, "vae");
    let tag = format!("{model} {dtype}");

    let dist = vae.encode(gpu, &upload(gpu, &r, "image")).unwrap();
    assert_eq!(dist.moments.shape(), &[1, 8, 8, 8]);
    assert_eq!(dist.mean.shape(), &[1, 4, 8, 8]);
    check(&format!("{tag} moments"), &read(gpu, &dist.moments), &r.read_f32("moments").unwrap(), bound);
    check(&format!("{tag} mean"), &read(gpu, &dist.mean), &r.read_f32("latent_mean").unwrap(), bound);
    let g = block(dist.read(gpu)).unwrap();
    check(&format!("{tag} logvar"), &g.logvar, &r.read_f32("latent_logvar").unwrap(), bound);
    check(&format!("{tag} std"), &g.std, &r.read_f32("latent_std").unwrap(), bound);
    let scaled = vae.scale_latents(gpu, &dist.mean).unwrap();
    check(&format!("{tag} scaled mean"), &read(gpu, &scaled), &r.read_f32("latent_mean_scaled").unwrap(), bound);

    // The pipeline's convention: sampler latents are scaled; decode divides first.
    let want = r.read_f32("decoded_from_mean").unwrap();
    let img = vae.decode(gpu, &upload(gpu, &r, "latent_mean_scaled")).unwrap();
    assert_eq!(img.shape(), &[1, 3, 64, 64]);
    check(&format!("{tag} decode(scaled)"), &read(gpu, &img), &want, bound);
    let img = vae.decode_unscaled(gpu, &upload(gpu, &r, "latent_mean")).unwrap();
    check(&format!("{tag} decode_unscaled"), &read(gpu, &img), &want, bound);
}

/// Measured at most 3.5e-6 (see the file comment).
const F32_REL: f64 = 2e-5;
/// Against diffusers' f32 model: measured 3.6e-2 (q8_0) and 0.67 (q4_0) on the decoded image of
/// these tiny random networks, whose narrow layers (8–16 channels, no trained structure) pass
/// every weight's rounding error straight through. The exact check of the quantized path is
/// [`vae_quantized_weights_match_dequantized_f32`].
const Q8_REL: f64 = 0.1;
const Q4_REL: f64 = 1.0;

/// The fixture's parameters with every matrix requested as q8_0 / q4_0 rounded through that
/// format on the CPU and uploaded as f32: the model a quantized VAE must reproduce.
struct Dequantized(SafetensorsSource<LocalFile>);

impl WeightSource for Dequantized {
    fn load(&self, gpu: &Gpu, name: &str, shape: &[usize], dtype: DType) -> loralab::Result<Tensor> {
        let file = self.0.file();
        let values = file.read_f32(name)?;
        let fs = file.entry(name)?.shape.clone();
        let (rows, cols) = (fs[0], fs[1..].iter().product());
        let values = if dtype.is_quantized() { round_trip(&values, rows, cols, dtype) } else { values };
        Tensor::from_f32(gpu, shape, &values)
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
}

#[test]
fn vae_a_matches_diffusers_f32() {
    parity(gpu(), "tiny-sd15-a", DType::F32, F32_REL);
}

#[test]
fn vae_b_matches_diffusers_f32_both_devices() {
    for gpu in gpus() {
        parity(gpu, "tiny-sd15-b", DType::F32, F32_REL);
    }
}

#[test]
fn vae_f16_weights_are_lossless_here() {
    // The fixture weights are exactly representable in f16.
    parity(gpu(), "tiny-sd15-a", DType::F16, F32_REL);
}

#[test]
fn vae_quantized_weights() {
    parity(gpu(), "tiny-sd15-b", DType::Q8_0, Q8_REL);
    parity(gpu(), "tiny-sd15-b", DType::Q4_0, Q4_REL);
}

#[test]
fn vae_from_single_file_checkpoints() {
    // CompVis names (first_stage_model.*, attention q/k/v/proj_out as 1×1 convolutions) mapped
    // by the checkpoint loader; a: float16 file, b: bfloat16 file, same numbers as the folders.
    let gpu = gpu();
    for model in ["tiny-sd15-a", "tiny-sd15-b"] {
        let dir = fixtures().join("models");
        let ck = open_path(dir.join(format!("{model}.safetensors")), Some(&dir.join(model))).unwrap();
        let policy = WeightPolicy::default();
        let vae = AutoencoderKL::load(gpu, &ck.config.vae, &ck.vae, policy, VaeParts::Both).unwrap();
        let r = refs(model, "vae");
        let moments = read(gpu, &vae.encode(gpu, &upload(gpu, &r, "image")).unwrap().moments);
        check(&format!("{model} single file: moments"), &moments, &r.read_f32("moments").unwrap(), F32_REL);
        let img = read(gpu, &vae.decode(gpu, &upload(gpu, &r, "latent_mean_scaled")).unwrap());
        check(&format!("{model} single file: decoded"), &img, &r.read_f32("decoded_from_mean").unwrap(), F32_REL);
    }
}

#[test]
fn vae_quantized_weights_match_dequantized_f32() {
    // Quantized storage changes nothing but the weights' values: measured bit-identical.
    let gpu = gpu();
    let model = "tiny-sd15-b";
    let r = refs(model, "vae");
    let image = upload(gpu, &r, "image");
    let latents = upload(gpu, &r, "latent_mean_scaled");
    for dtype in [DType::Q8_0, DType::Q4_0] {
        let policy = WeightPolicy::new(dtype);
        let quant = AutoencoderKL::load(gpu, &config(model), &weights(model), policy, VaeParts::Both).unwrap();
        let deq = Dequantized(weights(model));
        let deq = AutoencoderKL::load(gpu, &config(model), &deq, policy, VaeParts::Both).unwrap();
        let m = |v: &AutoencoderKL| read(gpu, &v.encode(gpu, &image).unwrap().moments);
        check(&format!("{dtype} vs dequantized: moments"), &m(&quant), &m(&deq), F32_REL);
        let d = |v: &AutoencoderKL| read(gpu, &v.decode(gpu, &latents).unwrap());
        check(&format!("{dtype} vs dequantized: decoded"), &d(&quant), &d(&deq), F32_REL);
    }
}

#[test]
fn vae_decodes_sampler_output_to_pipeline_image() {
    // image = (vae.decode(latents_step_3 / scaling_factor) / 2 + 0.5).clamp(0, 1)
    let gpu = gpu();
    for model in ["tiny-sd15-a", "tiny-sd15-b"] {
        let policy = WeightPolicy::default();
        let vae = AutoencoderKL::load(gpu, &config(model), &weights(model), policy, VaeParts::DecoderOnly).unwrap();
        let r = refs(model, "ddim");
        let img = vae.decode(gpu, &upload(gpu, &r, "latents_step_3")).unwrap();
        let got = to_image_01(&read(gpu, &img));
        let want = r.read_f32("image").unwrap();
        check(&format!("{model} ddim image"), &got, &want, F32_REL);
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "{model}: largest pixel difference {worst}");
        // A decoder-only VAE refuses to encode.
        let e = vae.encode(gpu, &Tensor::zeros(gpu, &[1, 3, 64, 64]).unwrap()).err().unwrap();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
    }
}

#[test]
fn postprocessing_and_posterior_on_the_host() {
    assert_eq!(to_image_01(&[-3.0, -1.0, 0.0, 0.5, 1.0, 2.0]), [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]);
    // [1, 3, 1, 2] NCHW -> NHWC bytes; 0.5 · 255 = 127.5 rounds to even like numpy.
    let px = to_rgb8(&[-1.0, 1.0, 0.0, 0.2, 1.0, -1.0], [1, 3, 1, 2]).unwrap();
    assert_eq!(px, [0, 128, 255, 255, 153, 0]);
    assert!(to_rgb8(&[0.0; 5], [1, 3, 1, 2]).is_err());
    // Moments [1, 2, 1, 2]: mean channel, then logvar clamped to [-30, 20].
    let g = DiagonalGaussian::from_moments(&[1.0, 2.0, -40.0, 30.0], [1, 2, 1, 2]).unwrap();
    assert_eq!(g.shape, [1, 1, 1, 2]);
    assert_eq!(g.mean, [1.0, 2.0]);
    assert_eq!(g.logvar, [-30.0, 20.0]);
    assert!((g.std[1] - 10f32.exp()).abs() < 1e-2);
    assert_eq!(g.sample(&[0.0, 1.0]).unwrap(), [1.0, 2.0 + 10f32.exp()]);
    assert!(DiagonalGaussian::from_moments(&[0.0; 3], [1, 3, 1, 1]).is_err());
}

/// Random q, k, v `[b, nq|nk, d]`, scaled so scores are O(1..5).
fn qkv(b: usize, nq: usize, nk: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (randn(b * nq * d, seed), randn(b * nk * d, seed + 1), randn(b * nk * d, seed + 2))
}

#[test]
fn large_head_attention_by_matmul_matches_reference() {
    // SD's VAE mid block has one head of C = 512 (above the flash kernel's limit).
    for gpu in gpus() {
        for (ci, &(b, nq, nk, d, max_bytes)) in [
            (1usize, 64usize, 64usize, 512usize, u64::MAX), // one block
            (2, 67, 67, 320, 2 * 67 * 4 * 5),               // 5-row chunks, last one short
            (1, 33, 19, 512, 1),                            // one query row at a time
            (3, 10, 41, 264, 3 * 41 * 4 * 4),
        ]
        .iter()
        .enumerate()
        {
            let (q, k, v) = qkv(b, nq, nk, d, 10 * ci as u64);
            let scale = 1.0 / (d as f32).sqrt();
            let tq = Tensor::from_f32(gpu, &[b, nq, d], &q).unwrap();
            let tk = Tensor::from_f32(gpu, &[b, nk, d], &k).unwrap();
            let tv = Tensor::from_f32(gpu, &[b, nk, d], &v).unwrap();
            let want = reference::attention(&q, &k, &v, b, nq, nk, 1, d, Some(scale), false);
            let got = attention_by_matmul(gpu, &tq, &tk, &tv, scale, max_bytes).unwrap();
            assert_eq!(got.shape(), &[b, nq, d]);
            assert_nmse(&format!("attention_by_matmul {b}x{nq}x{nk}x{d}"), &read(gpu, &got), &want, F32_BOUND);
            // The dispatcher takes this path for D > 256 by itself.
            if d > 256 {
                let got = single_head_attention(gpu, &tq, &tk, &tv, scale).unwrap();
                assert_nmse(&format!("single_head_attention D={d}"), &read(gpu, &got), &want, F32_BOUND);
            }
        }
    }
    // Both paths agree where the flash kernel applies.
    let gpu = gpu();
    let (b, n, d) = (2, 50, 16);
    let (q, k, v) = qkv(b, n, n, d, 99);
    let t = |x: &[f32]| Tensor::from_f32(gpu, &[b, n, d], x).unwrap();
    let flash = read(gpu, &single_head_attention(gpu, &t(&q), &t(&k), &t(&v), 0.25).unwrap());
    let mm = read(gpu, &attention_by_matmul(gpu, &t(&q), &t(&k), &t(&v), 0.25, 1000).unwrap());
    assert_nmse("flash vs matmul attention", &mm, &flash, F32_BOUND);
    let e = attention_by_matmul(gpu, &t(&q), &Tensor::zeros(gpu, &[b, n, d + 1]).unwrap(), &t(&v), 1.0, 1 << 20)
        .unwrap_err();
    assert!(matches!(e, Error::Shape { op: "attention_by_matmul", .. }), "{e}");
}

#[test]
fn vae_errors_name_the_mismatch() {
    let gpu = gpu_plain();
    let src = weights("tiny-sd15-a");
    let load = |c: &VaeConfig| {
        AutoencoderKL::load(gpu, c, &src, WeightPolicy::default(), VaeParts::Both).err().unwrap()
    };

    // Channels that differ from the file: the parameter and both shapes are named.
    let mut c = config("tiny-sd15-a");
    c.block_out_channels = vec![8, 16, 16, 32];
    let e = load(&c);
    assert!(matches!(&e, Error::Format { tensor: Some(_), .. }), "{e}");
    assert!(e.to_string().contains("has shape"), "{e}");
    // More layers than the file has: the missing parameter is named.
    let mut c = config("tiny-sd15-a");
    c.layers_per_block = 2;
    let e = load(&c);
    assert!(e.to_string().contains("encoder.down_blocks.0.resnets.1") && e.to_string().contains("missing"), "{e}");
    // A config the engine cannot run names the field.
    let mut c = config("tiny-sd15-a");
    c.act_fn = "relu".into();
    let e = load(&c);
    assert!(e.to_string().contains("act_fn"), "{e}");
    let bad = r#"{"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"], "norm_num_groups": 4}"#;
    assert!(VaeConfig::from_json(bad, "vae/config.json").is_err());

    // Inputs of the wrong shape.
    let vae = load_ok(gpu);
    let e = vae.decode(gpu, &Tensor::zeros(gpu, &[1, 3, 8, 8]).unwrap()).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "vae decode", .. }), "{e}");
    let e = vae.encode(gpu, &Tensor::zeros(gpu, &[1, 4, 64, 64]).unwrap()).err().unwrap();
    assert!(matches!(e, Error::Shape { op: "vae encode", .. }), "{e}");
}

fn load_ok(gpu: &Gpu) -> AutoencoderKL {
    load(gpu, "tiny-sd15-a", DType::F32)
}

/// diffusers' tiled decode (refs/<model>/vae_tiled.safetensors): 4×4 latent tiles over 8×8
/// latents (3×3 overlapping tiles) and 3×3 tiles over 8×11 latents, whose kept parts sum to a
/// 70×82 image as diffusers' cropping gives. Same f32 bound as the untiled decode.
fn tiled_parity(gpu: &Gpu, model: &str) {
    let vae = load(gpu, model, DType::F32);
    let r = refs(model, "vae_tiled");
    let plain = refs(model, "vae");
    let t4 = VaeTiling { tile_latent: 4, overlap: 0.25 };
    let img = block(vae.decode_tiled(gpu, &upload(gpu, &plain, "latent_mean_scaled"), t4)).unwrap();
    assert_eq!(img.shape(), &r.get("decoded_tiled_t4").unwrap().shape[..]);
    check(&format!("{model} decode_tiled t4"), &read(gpu, &img), &r.read_f32("decoded_tiled_t4").unwrap(), F32_REL);
    let t3 = VaeTiling { tile_latent: 3, overlap: 0.25 };
    let img = block(vae.decode_unscaled_tiled(gpu, &upload(gpu, &r, "z_wide"), t3)).unwrap();
    let want_shape = r.get("decoded_tiled_t3_wide").unwrap().shape.clone();
    assert_eq!(img.shape(), &want_shape[..]);
    let want = r.read_f32("decoded_tiled_t3_wide").unwrap();
    check(&format!("{model} decode_unscaled_tiled t3 wide"), &read(gpu, &img), &want, F32_REL);
}

#[test]
fn vae_tiled_decode_matches_diffusers() {
    let gpu = gpu();
    tiled_parity(&gpu, "tiny-sd15-a");
    tiled_parity(&gpu, "tiny-sd15-b");
}

#[test]
fn vae_needs_tiling_for_sd15_512_under_128_mib() {
    let gpu = gpu();
    let sd15 = VaeConfig::sd15();
    // Largest SD1.5 decoder tensor at 64×64 latents: 256 channels at 512×512 (256 MiB).
    assert_eq!(decoder_peak_tensor_bytes(&sd15, 64, 64), 256 << 20);
    let mut caps = gpu.caps().clone();
    caps.max_storage_buffer_binding_size = 128 << 20;
    assert!(needs_tiling(&sd15, &caps, 64, 64));
    assert!(!needs_tiling(&sd15, &caps, 32, 32));
    caps.max_storage_buffer_binding_size = 2 << 30;
    assert!(!needs_tiling(&sd15, &caps, 64, 64));
    let d = VaeTiling::diffusers_default(&sd15);
    assert_eq!(d, VaeTiling { tile_latent: 64, overlap: 0.25 });
    // diffusers' 64×64-latent tile is the whole 512×512 image: under 128 MiB the tile shrinks
    // to the largest that fits (45: 256 channels × 360² × 4 B = 126.6 MiB).
    caps.max_storage_buffer_binding_size = 128 << 20;
    assert_eq!(VaeTiling::for_adapter(&sd15, &caps), VaeTiling { tile_latent: 45, overlap: 0.25 });
    caps.max_storage_buffer_binding_size = 2 << 30;
    assert_eq!(VaeTiling::for_adapter(&sd15, &caps), d);
    // The fixture VAEs (64×64 images) never need it on lavapipe.
    let vae = load(&gpu, "tiny-sd15-a", DType::F32);
    assert!(!vae.needs_tiling(gpu.caps(), 8, 8));
}
