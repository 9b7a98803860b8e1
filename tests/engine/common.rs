//! Shared test set-up: one device with every feature the adapter has, one with `shader-f16`
//! and subgroups turned off (the SwiftShader-like path), and comparison helpers.

#![allow(dead_code)]

use loralab::quant::nmse;
use loralab::rng::Rng;
use loralab::sampler::{PredictionType, SamplerConfig, SamplerKind};
use loralab::{Gpu, GpuOptions};
use std::sync::OnceLock;

fn open(opts: GpuOptions) -> Gpu {
    // SAFETY: runs inside a OnceLock initialiser before the device exists; the tests read no
    // environment variables concurrently.
    unsafe { loralab::gpu::ensure_xdg_runtime_dir() };
    pollster::block_on(Gpu::new(opts))
        .unwrap_or_else(|e| panic!("GPU tests need an adapter (install mesa-vulkan-drivers): {e}"))
}

/// The device with all optional features the adapter offers.
pub fn gpu() -> &'static Gpu {
    static G: OnceLock<Gpu> = OnceLock::new();
    G.get_or_init(|| open(GpuOptions::default()))
}

/// A device without `shader-f16` and subgroups.
pub fn gpu_plain() -> &'static Gpu {
    static G: OnceLock<Gpu> = OnceLock::new();
    G.get_or_init(|| open(GpuOptions { disable_f16: true, disable_subgroups: true, ..Default::default() }))
}

/// Both devices, for tests that must pass on each kernel variant.
pub fn gpus() -> [&'static Gpu; 2] {
    [gpu(), gpu_plain()]
}

pub fn block<F: std::future::Future>(f: F) -> F::Output {
    pollster::block_on(f)
}

pub fn randn(n: usize, seed: u64) -> Vec<f32> {
    Rng::new(seed).normal_vec(n)
}

pub fn randu(n: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    Rng::new(seed).uniform_vec(n, lo, hi)
}

/// Named error bounds (normalised mean squared error), shared with the self-test.
pub use loralab::selftest::bounds::{F32 as F32_BOUND, STRICT, TRANSCENDENTAL};

/// Asserts `nmse(got, want) <= bound`, printing the first differing elements otherwise.
pub fn assert_nmse(what: &str, got: &[f32], want: &[f32], bound: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    let e = nmse(got, want);
    // Written so that a NaN error also fails.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    if !(e <= bound) {
        let diffs: Vec<String> = got
            .iter()
            .zip(want)
            .enumerate()
            .filter(|(_, (g, w))| (**g - **w).abs() > 1e-4 * (1.0 + w.abs()))
            .take(8)
            .map(|(i, (g, w))| format!("[{i}] got {g} want {w}"))
            .collect();
        panic!("{what}: nmse {e:e} > {bound:e}; {}", diffs.join(", "));
    }
}

/// Uploads, runs `f` and reads back.
pub fn read(gpu: &Gpu, t: &loralab::Tensor) -> Vec<f32> {
    block(t.to_f32(gpu)).expect("readback")
}

/// The sampler kind and config overrides of a fixture case (see manifest notes).
pub fn fixture_case_sampler(case: &str, base: &SamplerConfig) -> (SamplerKind, SamplerConfig) {
    let mut c = base.clone();
    let kind = match case {
        "ddim" => SamplerKind::Ddim,
        "ddim_vpred" => {
            c.prediction_type = Some(PredictionType::VPrediction);
            SamplerKind::Ddim
        }
        "euler" => SamplerKind::Euler,
        "euler_a" => SamplerKind::EulerAncestral,
        "dpmpp_2m" => SamplerKind::DpmPp2M,
        "dpmpp_2m_karras" => SamplerKind::DpmPp2MKarras,
        "lcm" | "lcm_cfg1.5" => SamplerKind::Lcm,
        other => panic!("fixture case {other} has no sampler mapping"),
    };
    (kind, c)
}
