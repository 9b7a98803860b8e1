//! Kernel self-test: every op family on small random inputs against its CPU `reference`, by
//! normalised mean squared error with a stated bound. Runs natively (`loralab selftest`) and in
//! the browser (the web page), so a user can check the kernels on their own adapter in seconds.
//!
//! A failing op never aborts the run: its case is reported as failed with the engine's message.

use crate::error::Result;
use crate::gpu::{AdapterSummary, Caps, Gpu, PoolStats};
use crate::ops::elementwise::{self as ew, Binary, Unary};
use crate::quant::nmse;
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
