//! Kernel self-test: every op family on small random inputs against its CPU `reference`, by
//! normalised mean squared error with a stated bound. Runs natively (`loralab selftest`) and in
//! the browser (the web page), so a user can check the kernels on their own adapter in seconds.
//!
//! A failing op never aborts the run: its case is reported as failed with the engine's message.

use crate::error::Result;
use crate::gpu::{AdapterSummary, Caps, Gpu, PoolStats};
use crate::ops::attention::{self, AttentionOpts};
use crate::ops::conv::{self, Conv2dParams};
use crate::ops::elementwise::{self as ew, Binary, Unary};
use crate::ops::matmul::{self, MatmulOpts};
use crate::ops::{layout, norm, quantize};
use crate::quant::{self, nmse, DType};
use crate::rng::Rng;
use crate::tensor::Tensor;
use serde::Serialize;
use std::future::Future;

/// Named error bounds (normalised mean squared error), the same as the engine tests use.
pub mod bounds {
    /// Exactly representable arithmetic (copies, additions of f32 values).
    pub const STRICT: f64 = 1e-10;
    /// f32 arithmetic with accumulation-order differences.
    pub const F32: f64 = 1e-7;
    /// Transcendental functions (exp, tanh, erf) whose GPU versions are approximate.
    pub const TRANSCENDENTAL: f64 = 1e-6;
}

/// The adapter and the state of the engine on it (for `loralab info` and the web page).
#[derive(Clone, Debug, Serialize)]
pub struct DeviceInfo {
    pub adapter: AdapterSummary,
    /// What the kernels use: enabled optional features and the device limits.
    pub caps: Caps,
    /// Every feature the adapter offers, enabled or not.
    pub adapter_features: Vec<String>,
    pub memory: PoolStats,
    /// Compiled compute pipelines.
    pub pipelines: usize,
}

/// Describes the adapter, its limits and the engine's pool and pipeline state.
pub fn describe(gpu: &Gpu) -> DeviceInfo {
    DeviceInfo {
        adapter: gpu.adapter(),
        caps: gpu.caps().clone(),
        adapter_features: gpu.adapter_features(),
        memory: gpu.memory(),
        pipelines: gpu.pipeline_count(),
    }
}

/// One comparison of a kernel with its CPU reference.
#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    /// `family.op`, e.g. `elementwise.unary`.
    pub op: String,
    /// The variant and shape, e.g. `Silu n=4099`.
    pub case: String,
    /// `Σ(gpu-cpu)² / Σcpu²`; NaN (`null` in JSON) when the op failed.
    pub nmse: f64,
    pub bound: f64,
    pub passed: bool,
    /// Wall time of upload, dispatch and readback (first use includes the pipeline build).
    pub ms: f64,
    /// The engine's message when the op returned an error or produced non-finite values.
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SelfTestReport {
    pub adapter: AdapterSummary,
    pub caps: Caps,
    /// Op families with cases in this run.
    pub families: Vec<String>,
    pub cases: Vec<CaseResult>,
    pub passed: bool,
    pub failed: usize,
    pub total_ms: f64,
}

/// Runs the self-test, timing cases with the platform clock (natively `Instant`; on wasm32,
/// where the standard library has no clock, times are 0: use [`run_with_clock`]).
pub async fn run(gpu: &Gpu) -> SelfTestReport {
    #[cfg(not(target_arch = "wasm32"))]
    {
        let t0 = std::time::Instant::now();
        run_with_clock(gpu, &move || t0.elapsed().as_secs_f64() * 1e3).await
    }
    #[cfg(target_arch = "wasm32")]
    {
        run_with_clock(gpu, &|| 0.0).await
    }
}

/// Runs the self-test; `now` returns a time in milliseconds (e.g. `performance.now()`).
pub async fn run_with_clock(gpu: &Gpu, now: &dyn Fn() -> f64) -> SelfTestReport {
    let start = now();
    let mut r = Runner { gpu, now, cases: Vec::new(), families: Vec::new() };
    elementwise_cases(&mut r).await;
    matmul_cases(&mut r).await;
    conv_cases(&mut r).await;
    norm_cases(&mut r).await;
    layout_cases(&mut r).await;
    attention_cases(&mut r).await;
    quantize_cases(&mut r).await;
    let failed = r.cases.iter().filter(|c| !c.passed).count();
    SelfTestReport {
        adapter: gpu.adapter(),
        caps: gpu.caps().clone(),
        families: r.families,
        passed: failed == 0 && !r.cases.is_empty(),
        failed,
        cases: r.cases,
        total_ms: now() - start,
    }
}

/// Output of one case: (GPU result, CPU reference).
type Compared = Result<(Vec<f32>, Vec<f32>)>;

struct Runner<'a> {
    gpu: &'a Gpu,
    now: &'a dyn Fn() -> f64,
    cases: Vec<CaseResult>,
    families: Vec<String>,
}

impl Runner<'_> {
    fn family(&mut self, name: &str) {
        self.families.push(name.to_string());
    }

    async fn check(&mut self, op: &str, case: String, bound: f64, f: impl Future<Output = Compared>) {
        let t0 = (self.now)();
        let out = f.await;
        let ms = (self.now)() - t0;
        let (nmse, passed, error) = match out {
            Err(e) => (f64::NAN, false, Some(e.to_string())),
            Ok((got, want)) if got.len() != want.len() => (
                f64::NAN,
                false,
                Some(format!("{} values returned, {} expected", got.len(), want.len())),
            ),
            Ok((got, want)) => {
                let e = nmse(&got, &want);
                if got.iter().all(|v| v.is_finite()) {
                    (e, e <= bound, None)
                } else {
                    (e, false, Some("non-finite output".to_string()))
                }
            }
        };
        self.cases.push(CaseResult { op: op.to_string(), case, nmse, bound, passed, ms, error });
    }
}

fn randn(n: usize, seed: u64) -> Vec<f32> {
    Rng::new(seed).normal_vec(n)
}

async fn elementwise_cases(r: &mut Runner<'_>) {
    r.family("elementwise");
    let gpu = r.gpu;
    let unary = [
        Unary::Copy,
        Unary::Scale(-0.5),
        Unary::Silu,
        Unary::Gelu,
        Unary::GeluTanh,
        Unary::QuickGelu,
        Unary::AddScalar(3.0),
    ];
    for (i, op) in unary.into_iter().enumerate() {
        let n = if i == 0 { 1 } else { 4099 };
        let bound = match op {
            Unary::Copy | Unary::Scale(_) | Unary::AddScalar(_) => bounds::STRICT,
            _ => bounds::TRANSCENDENTAL,
        };
        let name = format!("{op:?} n={n}");
        r.check("elementwise.unary", name, bound, async move {
            let mut x = randn(n, 1 + i as u64);
            if n > 3 {
                // Extremes must not overflow in any activation.
                x[0] = 80.0;
                x[1] = -80.0;
                x[2] = 0.0;
            }
            let t = Tensor::from_f32(gpu, &[n], &x)?;
            let got = ew::unary(gpu, &t, op)?.to_f32(gpu).await?;
            let want = x.iter().map(|v| ew::reference::unary(*v, op)).collect();
            Ok((got, want))
        })
        .await;
    }

    let shapes: [(&[usize], &[usize]); 2] = [(&[2, 3, 4, 5], &[3, 1, 1]), (&[257, 33], &[33])];
    let ops = [Binary::Add, Binary::Mul, Binary::Sub, Binary::AddScaled(0.25)];
    for (si, (sa, sb)) in shapes.into_iter().enumerate() {
        for (oi, op) in ops.into_iter().enumerate() {
            let name = format!("{op:?} {sa:?} by {sb:?}");
            r.check("elementwise.binary", name, bounds::F32, async move {
                let (inner, m) = ew::broadcast(sa, sb).ok_or_else(|| {
                    crate::Error::Invalid(format!("{sb:?} does not broadcast over {sa:?}"))
                })?;
                let seed = 100 + 10 * si as u64 + oi as u64;
                let a = randn(sa.iter().product(), seed);
                let b = randn(sb.iter().product(), seed + 1000);
                let ta = Tensor::from_f32(gpu, sa, &a)?;
                let tb = Tensor::from_f32(gpu, sb, &b)?;
                let got = ew::binary(gpu, &ta, &tb, op)?.to_f32(gpu).await?;
                Ok((got, ew::reference::binary(&a, &b, inner, m, op)))
            })
            .await;
        }
    }
}

// Pipeline builds dominate the run time on software adapters (2–3 s each for the tiled kernels
// on SwiftShader), so the tiled families use few kernel variants: f32 and q4_0 weights in
// matmul, q8_0 in conv (f16 weights go through the same loader; `tests/engine` covers every
// storage type on every kernel). Shapes within a variant are awkward on purpose.

async fn matmul_cases(r: &mut Runner<'_>) {
    r.family("matmul");
    let gpu = r.gpu;
    // Shared weights [K, N] with bias and alpha, then per-batch B (same kernel variant).
    let (batch, m, k, n) = (2, 37, 70, 45);
    let name = format!("A [{batch}, {m}, {k}] B [{k}, {n}] + bias, alpha 0.5");
    r.check("matmul.matmul", name, bounds::F32, async move {
        let (a, b, bias) = (randn(batch * m * k, 200), randn(k * n, 201), randn(n, 202));
        let ta = Tensor::from_f32(gpu, &[batch, m, k], &a)?;
        let tb = Tensor::from_f32(gpu, &[k, n], &b)?;
        let tbias = Tensor::from_f32(gpu, &[n], &bias)?;
        let opts = MatmulOpts { trans_b: false, bias: Some(&tbias), alpha: 0.5 };
        let got = matmul::matmul(gpu, &ta, &tb, opts)?.to_f32(gpu).await?;
        Ok((got, matmul::reference::matmul(&a, &b, Some(&bias), (batch, m, k, n), false, false, 0.5)))
    })
    .await;
    let (batch, m, k, n) = (3, 1, 70, 9);
    let name = format!("A [{batch}, {m}, {k}] per-batch B [{batch}, {k}, {n}] + bias");
    r.check("matmul.matmul", name, bounds::F32, async move {
        let (a, b, bias) = (randn(batch * m * k, 210), randn(batch * k * n, 211), randn(n, 212));
        let ta = Tensor::from_f32(gpu, &[batch, m, k], &a)?;
        let tb = Tensor::from_f32(gpu, &[batch, k, n], &b)?;
        let tbias = Tensor::from_f32(gpu, &[n], &bias)?;
        let opts = MatmulOpts { trans_b: false, bias: Some(&tbias), alpha: 1.0 };
        let got = matmul::matmul(gpu, &ta, &tb, opts)?.to_f32(gpu).await?;
        Ok((got, matmul::reference::matmul(&a, &b, Some(&bias), (batch, m, k, n), false, true, 1.0)))
    })
    .await;
    // nn.Linear on 4-bit weights, against the reference on the dequantized weights.
    let (dt, rows, k, n) = (DType::Q4_0, 9, 100, 70);
    r.check("matmul.linear", format!("{dt} x [{rows}, {k}] W [{n}, {k}] + bias"), bounds::F32, async move {
        let (x, w, bias) = (randn(rows * k, 240), randn(n * k, 241), randn(n, 242));
        let tx = Tensor::from_f32(gpu, &[rows, k], &x)?;
        let tw = Tensor::from_f32_as(gpu, &[n, k], &w, dt)?;
        let tb = Tensor::from_f32(gpu, &[n], &bias)?;
        let got = matmul::linear(gpu, &tx, &tw, Some(&tb))?.to_f32(gpu).await?;
        let wq = quant::round_trip(&w, n, k, dt);
        Ok((got, matmul::reference::linear(&x, &wq, Some(&bias), rows, k, n)))
    })
    .await;
}

async fn conv_cases(r: &mut Runner<'_>) {
    r.family("conv");
    let gpu = r.gpu;
    // (x shape, (cout, kh, kw), stride, padding, weight storage): one kernel variant (8-bit
    // weights), with and without stride.
    let cases = [([1, 5, 9, 11], (8, 3, 3), 1, 1, DType::Q8_0), ([2, 32, 7, 6], (8, 3, 3), 2, 1, DType::Q8_0)];
    for (i, (xs, (cout, kh, kw), stride, padding, dt)) in cases.into_iter().enumerate() {
        let p = Conv2dParams { stride, padding };
        let ws = [cout, xs[1], kh, kw];
        let name = format!("{dt} x {xs:?} w {ws:?} stride {stride} pad {padding} + bias");
        r.check("conv.conv2d", name, bounds::F32, async move {
            let seed = 300 + 10 * i as u64;
            let x = randn(xs.iter().product(), seed);
            let w = randn(ws.iter().product(), seed + 1);
            let bias = randn(cout, seed + 2);
            let tx = Tensor::from_f32(gpu, &xs, &x)?;
            let tw = Tensor::from_f32_as(gpu, &ws, &w, dt)?;
            let tb = Tensor::from_f32(gpu, &[cout], &bias)?;
            let got = conv::conv2d(gpu, &tx, &tw, Some(&tb), p)?.to_f32(gpu).await?;
            let wq = quant::round_trip(&w, cout, xs[1] * kh * kw, dt);
            Ok((got, conv::reference::conv2d(&x, xs, &wq, [cout, kh, kw], Some(&bias), p)))
        })
        .await;
    }
}

async fn norm_cases(r: &mut Runner<'_>) {
    r.family("norm");
    let gpu = r.gpu;
    for (i, (shape, groups, affine, silu)) in
        [([2usize, 8, 5, 7], 4usize, true, true), ([1, 6, 33, 1], 3, false, false)].into_iter().enumerate()
    {
        let name = format!("x {shape:?} groups={groups} affine={affine} silu={silu}");
        r.check("norm.group_norm", name, bounds::F32, async move {
            let seed = 400 + 10 * i as u64;
            let c = shape[1];
            let x: Vec<f32> = randn(shape.iter().product(), seed).iter().map(|v| 3.0 * v + 1.5).collect();
            let (g, b) = (randn(c, seed + 1), randn(c, seed + 2));
            let tx = Tensor::from_f32(gpu, &shape, &x)?;
            let (tg, tb) = (Tensor::from_f32(gpu, &[c], &g)?, Tensor::from_f32(gpu, &[c], &b)?);
            let (tg, tb) = if affine { (Some(&tg), Some(&tb)) } else { (None, None) };
            let got = norm::group_norm(gpu, &tx, groups, tg, tb, 1e-5, silu)?.to_f32(gpu).await?;
            let (g, b) = if affine { (Some(&g[..]), Some(&b[..])) } else { (None, None) };
            let spatial = shape[2] * shape[3];
            Ok((got, norm::reference::group_norm(&x, shape[0], c, spatial, groups, g, b, 1e-5, silu)))
        })
        .await;
    }
    let (rows, d) = (7, 320);
    r.check("norm.layer_norm", format!("x [{rows}, {d}] affine"), bounds::F32, async move {
        let x: Vec<f32> = randn(rows * d, 420).iter().map(|v| 2.0 * v - 0.5).collect();
        let (g, b) = (randn(d, 421), randn(d, 422));
        let tx = Tensor::from_f32(gpu, &[rows, d], &x)?;
        let (tg, tb) = (Tensor::from_f32(gpu, &[d], &g)?, Tensor::from_f32(gpu, &[d], &b)?);
        let got = norm::layer_norm(gpu, &tx, Some(&tg), Some(&tb), 1e-5)?.to_f32(gpu).await?;
        Ok((got, norm::reference::layer_norm(&x, d, Some(&g), Some(&b), 1e-5)))
    })
    .await;
    for (i, (rows, d, scale)) in [(5usize, 300usize, 0.125f32), (3, 1, 1.0)].into_iter().enumerate() {
        r.check("norm.softmax", format!("x [{rows}, {d}] scale={scale}"), bounds::TRANSCENDENTAL, async move {
            let x: Vec<f32> = randn(rows * d, 430 + i as u64).iter().map(|v| 8.0 * v).collect();
            let tx = Tensor::from_f32(gpu, &[rows, d], &x)?;
            let got = norm::softmax(gpu, &tx, scale)?.to_f32(gpu).await?;
            Ok((got, norm::reference::softmax(&x, d, scale)))
        })
        .await;
    }
}

async fn layout_cases(r: &mut Runner<'_>) {
    r.family("layout");
    let gpu = r.gpu;
    r.check("layout.upsample_nearest2x", "x [1, 3, 5, 7]".into(), bounds::STRICT, async move {
        let x = randn(3 * 5 * 7, 500);
        let t = Tensor::from_f32(gpu, &[1, 3, 5, 7], &x)?;
        let got = layout::upsample_nearest2x(gpu, &t)?.to_f32(gpu).await?;
        Ok((got, layout::reference::upsample_nearest2x(&x, 3, 5, 7)))
    })
    .await;
    r.check("layout.concat", "[2, 3, 4] and [2, 5, 4] on dim 1".into(), bounds::STRICT, async move {
        let (a, b) = (randn(24, 510), randn(40, 511));
        let ta = Tensor::from_f32(gpu, &[2, 3, 4], &a)?;
        let tb = Tensor::from_f32(gpu, &[2, 5, 4], &b)?;
        let got = layout::concat(gpu, &[&ta, &tb], 1)?.to_f32(gpu).await?;
        Ok((got, layout::reference::concat(&[(&a, &[2, 3, 4]), (&b, &[2, 5, 4])], 1)))
    })
    .await;
    r.check("layout.transpose_last2", "x [2, 19, 33]".into(), bounds::STRICT, async move {
        let x = randn(2 * 19 * 33, 520);
        let t = Tensor::from_f32(gpu, &[2, 19, 33], &x)?;
        let got = layout::transpose_last2(gpu, &t)?.to_f32(gpu).await?;
        Ok((got, layout::reference::transpose_last2(&x, 2, 19, 33)))
    })
    .await;
    r.check("layout.slice_last", "x [4, 10] [3..8]".into(), bounds::STRICT, async move {
        let x = randn(40, 530);
        let t = Tensor::from_f32(gpu, &[4, 10], &x)?;
        let got = layout::slice_last(gpu, &t, 3, 5)?.to_f32(gpu).await?;
        Ok((got, layout::reference::slice_last(&x, 10, 3, 5)))
    })
    .await;
    r.check("layout.timestep_embedding", "t [1, 500, 999] dim 320 flip".into(), bounds::TRANSCENDENTAL, async move {
        let t = [1.0f32, 500.0, 999.0];
        let got = layout::timestep_embedding(gpu, &t, 320, true, 0.0, 10000.0)?.to_f32(gpu).await?;
        Ok((got, layout::reference::timestep_embedding(&t, 320, true, 0.0, 10000.0)))
    })
    .await;
}

async fn attention_cases(r: &mut Runner<'_>) {
    r.family("attention");
    let gpu = r.gpu;
    // (batch, nq, nk, heads, head dim, causal)
    // One head dimension (a kernel constant), so both cases share a pipeline.
    let cases = [(1usize, 50usize, 77usize, 2usize, 40usize, false), (2, 33, 33, 1, 40, true)];
    for (i, (b, nq, nk, heads, d, causal)) in cases.into_iter().enumerate() {
        let name = format!("q [{b}, {nq}, {heads}×{d}] kv [{b}, {nk}, {heads}×{d}] causal={causal}");
        r.check("attention.attention", name, bounds::TRANSCENDENTAL, async move {
            let seed = 600 + 10 * i as u64;
            let hd = heads * d;
            let (q, k, v) = (randn(b * nq * hd, seed), randn(b * nk * hd, seed + 1), randn(b * nk * hd, seed + 2));
            let tq = Tensor::from_f32(gpu, &[b, nq, hd], &q)?;
            let tk = Tensor::from_f32(gpu, &[b, nk, hd], &k)?;
            let tv = Tensor::from_f32(gpu, &[b, nk, hd], &v)?;
            let opts = AttentionOpts { causal, ..AttentionOpts::new(heads) };
            let got = attention::attention(gpu, &tq, &tk, &tv, opts)?.to_f32(gpu).await?;
            Ok((got, attention::reference::attention(&q, &k, &v, b, nq, nk, heads, d, None, causal)))
        })
        .await;
    }
}

async fn quantize_cases(r: &mut Runner<'_>) {
    r.family("quantize");
    let gpu = r.gpu;
    for (i, dt) in [DType::F16, DType::Q8_0, DType::Q4_0].into_iter().enumerate() {
        let (rows, cols) = (9, 70);
        // The GPU must reproduce the CPU packing exactly.
        r.check("quantize.quantize", format!("{dt} [{rows}, {cols}]"), bounds::STRICT, async move {
            let x = randn(rows * cols, 700 + i as u64);
            let t = Tensor::from_f32(gpu, &[rows, cols], &x)?;
            let got = quantize::quantize(gpu, &t, dt)?.to_f32(gpu).await?;
            let want = quant::unpack(&quantize::reference::quantize(&x, rows, cols, dt), rows, cols, dt);
            Ok((got, want))
        })
        .await;
    }
}
