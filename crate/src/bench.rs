//! Kernel benchmarks at Stable Diffusion 1.5 shapes (`loralab bench kernels`).
//!
//! Each case runs `warmup` times, then `iters` timed samples; a sample records one run, or for
//! fast kernels as many runs as fill 25 ms, and waits for the GPU once. The median time per run
//! gives GFLOP/s (2 flops per multiply-add) and, where the kernel is
//! memory-bound in practice, GB/s of the bytes it must read and write at least once.
//! The clock is passed in so the same code runs natively and in a browser.

pub mod lora;
pub mod train;
pub mod unet;

use crate::error::Result;
use crate::gpu::{AdapterSummary, Gpu};
use crate::ops::{attention, conv, matmul};
use crate::quant::DType;
use crate::rng::Rng;
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub warmup: usize,
    pub iters: usize,
    /// Small shapes (a smoke run for tests / slow adapters).
    pub quick: bool,
    /// Only cases whose name contains this text.
    pub filter: Option<String>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self { warmup: 1, iters: 5, quick: false, filter: None }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResult {
    pub kernel: String,
    pub shape: String,
    pub weights: String,
    /// Timed samples (the median / min / max are over these).
    pub samples: usize,
    /// Runs recorded back to back in each sample (more for fast kernels).
    pub runs_per_sample: usize,
    /// Milliseconds per run.
    pub ms_median: f64,
    pub ms_min: f64,
    pub ms_max: f64,
    pub gflops: f64,
    /// Minimum bytes moved per run / median time, for memory-bound kernels.
    pub gbps: Option<f64>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub adapter: AdapterSummary,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub results: Vec<BenchResult>,
}

struct Case {
    kernel: &'static str,
    shape: String,
    weights: DType,
    flops: f64,
    bytes: f64,
    report_gbps: bool,
}

fn randn(shape: &[usize], seed: u64) -> Vec<f32> {
    Rng::new(seed).normal_vec(shape.iter().product())
}

/// Each timed sample lasts at least this long: fast kernels are repeated inside one sample so
/// the cost of submitting and waiting for the GPU does not dominate.
const MIN_SAMPLE_MS: f64 = 25.0;

/// Times `f` (which records GPU work): per-run milliseconds of each sample, and the runs per
/// sample. A sample records `reps` runs and waits for the GPU once.
async fn time<F: FnMut() -> Result<Tensor>>(
    gpu: &Gpu,
    opts: &BenchOptions,
    clock: &dyn Fn() -> f64,
    mut f: F,
) -> Result<(Vec<f64>, usize)> {
    for _ in 0..opts.warmup {
        let _y = f()?;
        gpu.sync().await?;
    }
    let t0 = clock();
    let _y = f()?;
    gpu.sync().await?;
    let once = (clock() - t0).max(1e-3);
    let reps = ((MIN_SAMPLE_MS / once).ceil() as usize).clamp(1, 1000);
    let mut ms = Vec::with_capacity(opts.iters);
    for _ in 0..opts.iters.max(1) {
        let t0 = clock();
        for _ in 0..reps {
            let _y = f()?;
        }
        gpu.sync().await?;
        ms.push((clock() - t0) / reps as f64);
    }
    Ok((ms, reps))
}

fn summarize(case: Case, (mut ms, reps): (Vec<f64>, usize)) -> BenchResult {
    ms.sort_by(|a, b| a.total_cmp(b));
    let med = ms[ms.len() / 2];
    BenchResult {
        kernel: case.kernel.to_string(),
        shape: case.shape,
        weights: case.weights.name().to_string(),
        samples: ms.len(),
        runs_per_sample: reps,
        ms_median: med,
        ms_min: ms[0],
        ms_max: ms[ms.len() - 1],
        gflops: case.flops / (med * 1e6),
        gbps: case.report_gbps.then(|| case.bytes / (med * 1e6)),
    }
}

fn wanted(opts: &BenchOptions, name: &str) -> bool {
    opts.filter.as_deref().is_none_or(|f| name.contains(f))
}

/// Runs every kernel case; `clock` returns milliseconds.
pub async fn run_kernels(
    gpu: &Gpu,
    opts: &BenchOptions,
    clock: &dyn Fn() -> f64,
) -> Result<BenchReport> {
    let mut results = Vec::new();
    let q = opts.quick;

    // Linear layers: (M tokens, K in, N out) as in SD1.5's UNet.
    let mm_shapes: &[(usize, usize, usize)] = if q {
        &[(256, 64, 64), (128, 96, 160)]
    } else {
        &[(4096, 320, 320), (4096, 640, 1280), (1024, 1280, 5120)]
    };
    for &(m, k, n) in mm_shapes {
        for dt in DType::ALL {
            let name = format!("matmul {}", dt.name());
            if !wanted(opts, &name) {
                continue;
            }
            let x = Tensor::from_f32(gpu, &[m, k], &randn(&[m, k], 1))?;
            let w = Tensor::from_f32_as(gpu, &[n, k], &randn(&[n, k], 2), dt)?;
            let b = Tensor::from_f32(gpu, &[n], &randn(&[n], 3))?;
            let ms = time(gpu, opts, clock, || matmul::linear(gpu, &x, &w, Some(&b))).await?;
            let wbytes = (dt.data_bytes(n, k) + dt.scale_bytes(n, k)) as f64;
            results.push(summarize(
                Case {
                    kernel: "matmul",
                    shape: format!("M={m} K={k} N={n}"),
                    weights: dt,
                    flops: 2.0 * (m * n * k) as f64,
                    bytes: wbytes + 4.0 * (m * k + m * n) as f64,
                    report_gbps: true,
                },
                ms,
            ));
        }
    }

    // 3x3 convolution, stride 1, padding 1.
    let (hw, c) = if q { (16, 32) } else { (64, 320) };
    for dt in DType::ALL {
        let name = format!("conv2d {}", dt.name());
        if !wanted(opts, &name) {
            continue;
        }
        let x = Tensor::from_f32(gpu, &[1, c, hw, hw], &randn(&[c, hw, hw], 4))?;
        let w = Tensor::from_f32_as(gpu, &[c, c, 3, 3], &randn(&[c, c, 3, 3], 5), dt)?;
        let b = Tensor::from_f32(gpu, &[c], &randn(&[c], 6))?;
        let p = conv::Conv2dParams { stride: 1, padding: 1 };
        let ms = time(gpu, opts, clock, || conv::conv2d(gpu, &x, &w, Some(&b), p)).await?;
        results.push(summarize(
            Case {
                kernel: "conv2d 3x3",
                shape: format!("{hw}x{hw}x{c} -> {c}"),
                weights: dt,
                flops: 2.0 * (hw * hw * c * c * 9) as f64,
                bytes: (dt.data_bytes(c, c * 9) + 8 * hw * hw * c) as f64,
                report_gbps: false,
            },
            ms,
        ));
    }

    // Attention: 8 heads of 40 over 64x64 latents; self (4096 keys) and cross (77 keys).
    let (nq, heads, d) = if q { (256, 2, 40) } else { (4096, 8, 40) };
    for nk in [nq, 77] {
        let name = format!("attention nk={nk}");
        if !wanted(opts, &name) {
            continue;
        }
        let qt = Tensor::from_f32(gpu, &[1, nq, heads * d], &randn(&[nq, heads * d], 7))?;
        let kt = Tensor::from_f32(gpu, &[1, nk, heads * d], &randn(&[nk, heads * d], 8))?;
        let vt = Tensor::from_f32(gpu, &[1, nk, heads * d], &randn(&[nk, heads * d], 9))?;
        let o = attention::AttentionOpts { heads, scale: None, causal: false };
        let ms = time(gpu, opts, clock, || attention::attention(gpu, &qt, &kt, &vt, o)).await?;
        results.push(summarize(
            Case {
                kernel: "attention",
                shape: format!("q={nq} k={nk} heads={heads}x{d}"),
                weights: DType::F32,
                flops: 4.0 * (nq * nk * heads * d) as f64,
                bytes: 4.0 * (2 * nq + 2 * nk) as f64 * (heads * d) as f64,
                report_gbps: false,
            },
            ms,
        ));
    }

    Ok(BenchReport {
        adapter: gpu.adapter(),
        shader_f16: gpu.caps().shader_f16,
        subgroups: gpu.caps().subgroups,
        results,
    })
}

/// A plain-text table of a report.
pub fn format_table(r: &BenchReport) -> String {
    let mut s = format!(
        "adapter: {} ({}, {}), shader-f16: {}, subgroups: {}\n",
        r.adapter.name, r.adapter.backend, r.adapter.device_type, r.shader_f16, r.subgroups
    );
    s.push_str(&format!(
        "{:<12} {:<28} {:<7} {:>10} {:>10} {:>10} {:>9} {:>8}\n",
        "kernel", "shape", "weights", "median ms", "min ms", "max ms", "GFLOP/s", "GB/s"
    ));
    for x in &r.results {
        s.push_str(&format!(
            "{:<12} {:<28} {:<7} {:>10.2} {:>10.2} {:>10.2} {:>9.1} {:>8}\n",
            x.kernel,
            x.shape,
            x.weights,
            x.ms_median,
            x.ms_min,
            x.ms_max,
            x.gflops,
            x.gbps.map_or("-".to_string(), |g| format!("{g:.1}"))
        ));
    }
    s
}
