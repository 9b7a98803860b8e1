//! The optimizer side of training (`shaders/optim.wgsl`): torch.optim.AdamW on flat f32
//! tensors, the global gradient norm and clipping of torch.nn.utils.clip_grad_norm_, the
//! fixed-order sum of a split reduction's partial results, and the learning-rate schedules of
//! diffusers.optimization.get_scheduler ([`LrSchedule`]).
//!
//! Every reduction sums in an order that depends only on the shapes, so training repeats bit
//! for bit on one device.

use super::super::{groups, Params};
use crate::error::{shape_err, Error, Result};
use crate::gpu::Gpu;
use crate::shader::{Defines, ShaderSource};
use crate::tensor::Tensor;

const SHADER: &str = "optim.wgsl";

pub static SHADERS: &[ShaderSource] = &[ShaderSource {
    name: SHADER,
    source: crate::wgsl!("optim.wgsl"),
    flag_axes: &[&["", "CLIP"]],
    values: &[],
    entries: &["sum_partials", "sq_partials", "norm_finish", "clip_scale", "adamw"],
    top_level: true,
}];

const WG: usize = 256;
/// Elements one `sq_partials` workgroup sums (WG · SQ_PER_THREAD in the shader).
const SQ_CHUNK: usize = WG * 8;

/// The uniform words: `n`, `count`, then the f32 fields in shader order.
fn params(n: usize, count: usize, f: [f32; 8]) -> Vec<u32> {
    let mut p = Params::new().u(n).u(count).u(0).u(0);
    for v in f {
        p = p.f(v);
    }
    p.0
}

fn expect_f32(op: &'static str, what: &str, t: &Tensor) -> Result<()> {
    t.expect_f32(op).map_err(|_| Error::DType { op, message: format!("{what} must be f32, got {}", t.dtype()) })
}

/// `out = Σ_c part[c]` over the leading dimension of `part: [count, rest...]`, in order
/// `c = 0, 1, ..`; returns `[rest...]`.
pub fn sum_partials(gpu: &Gpu, part: &Tensor) -> Result<Tensor> {
    const OP: &str = "sum_partials";
    expect_f32(OP, "partial sums", part)?;
    let (count, rest) = match part.shape().split_first() {
        Some((&c, rest)) if c > 0 && !rest.is_empty() => (c, rest),
        _ => return Err(shape_err(OP, format!("partial sums {:?} must be [count, ...]", part.shape()))),
    };
    if count == 1 {
        return part.reshape(rest);
    }
    let out = Tensor::empty(gpu, rest)?;
    let n = out.numel();
    gpu.dispatch(
        SHADER,
        "sum_partials",
        &Defines::new(),
        &params(n, count, [0.0; 8]),
        &[(1, part.buffer()), (2, out.buffer())],
        gpu.grid(groups(n, WG)),
    )?;
    Ok(out)
}

/// The global L2 norm of the gradients, `sqrt(Σ_t Σ_i g_t[i]²)`, as a `[1]` tensor left on the
/// device (clipping and [`adamw_step`] read it there): per-workgroup sums of squares of each
/// tensor, then one workgroup adds them up.
pub fn grad_norm(gpu: &Gpu, grads: &[&Tensor]) -> Result<Tensor> {
    const OP: &str = "grad_norm";
    if grads.is_empty() {
        return Err(shape_err(OP, "needs at least one gradient tensor"));
    }
    for g in grads {
        expect_f32(OP, "gradient", g)?;
    }
    let total: usize = grads.iter().map(|g| g.numel().div_ceil(SQ_CHUNK)).sum();
    let partials = Tensor::empty(gpu, &[total.max(1)])?;
    let norm = Tensor::empty(gpu, &[1])?;
    let mut at = 0;
    for g in grads {
        let n = g.numel();
        let wgs = n.div_ceil(SQ_CHUNK);
        gpu.dispatch(
            SHADER,
            "sq_partials",
            &Defines::new(),
            &params(n, at, [0.0; 8]),
            &[(3, g.buffer()), (4, partials.buffer())],
            gpu.grid(groups(wgs, 1)),
        )?;
        at += wgs;
    }
    gpu.dispatch(
        SHADER,
        "norm_finish",
        &Defines::new(),
        &params(total, 0, [0.0; 8]),
        &[(4, partials.buffer()), (5, norm.buffer())],
        [1, 1, 1],
    )?;
    Ok(norm)
}

fn check_norm(op: &'static str, norm: &Tensor) -> Result<()> {
    expect_f32(op, "norm", norm)?;
    if norm.numel() != 1 {
        return Err(shape_err(op, format!("the norm must be one value, got {:?}", norm.shape())));
    }
    Ok(())
}

/// torch.nn.utils.clip_grad_norm_'s scaling, in place: every gradient is multiplied by
/// `min(max_norm / (norm + 1e-6), 1)`, `norm` being [`grad_norm`]'s result.
pub fn clip_grads(gpu: &Gpu, grads: &[&Tensor], norm: &Tensor, max_norm: f32) -> Result<()> {
    const OP: &str = "clip_grads";
    check_norm(OP, norm)?;
    for g in grads {
        expect_f32(OP, "gradient", g)?;
        let n = g.numel();
        let mut f = [0.0; 8];
        f[7] = max_norm;
        gpu.dispatch(
            SHADER,
            "clip_scale",
            &Defines::new(),
            &params(n, 0, f),
            &[(5, norm.buffer()), (6, g.buffer())],
            gpu.grid(groups(n, WG)),
        )?;
    }
    Ok(())
}

/// torch.optim.AdamW's hyperparameters other than the learning rate (which the schedule gives
/// per step). `Default` is torch's: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

impl AdamW {
    /// The step's scalars as torch computes them in Python floats (f64) before the f32 tensor
    /// arithmetic: `[decay, beta2, 1 − beta1, 1 − beta2, step_size, sqrt(bias_correction2), eps]`.
    pub fn scalars(&self, lr: f64, step: u64) -> [f64; 7] {
        let t = step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        [1.0 - lr * self.weight_decay, self.beta2, 1.0 - self.beta1, 1.0 - self.beta2, lr / bc1, bc2.sqrt(), self.eps]
    }
}

/// Gradient clipping folded into [`adamw_step`]: the gradient is scaled by
/// `min(max_norm / (norm + 1e-6), 1)` as it is read (the same f32 product clip_grad_norm_ stores).
#[derive(Clone, Copy)]
pub struct Clip<'a> {
    /// [`grad_norm`]'s `[1]` result.
    pub norm: &'a Tensor,
    pub max_norm: f32,
}

/// One AdamW step on `param` with gradient `grad`, updating `param`, `m` (exp_avg) and `v`
/// (exp_avg_sq) in place; all flat f32 tensors of one size. `step` counts from 1 (torch's
/// state step after its increment); `lr` is this step's learning rate.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    gpu: &Gpu,
    hp: &AdamW,
    lr: f64,
    step: u64,
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    clip: Option<Clip<'_>>,
) -> Result<()> {
    const OP: &str = "adamw_step";
    let n = param.numel();
    for (what, t) in [("param", param), ("grad", grad), ("exp_avg", m), ("exp_avg_sq", v)] {
        expect_f32(OP, what, t)?;
        if t.numel() != n {
            return Err(shape_err(OP, format!("{what} {:?} must have param's {n} elements", t.shape())));
        }
    }
    if step == 0 || step > i32::MAX as u64 {
        return Err(Error::Invalid(format!("{OP}: step {step} must count from 1")));
    }
    let s = hp.scalars(lr, step);
    let max_norm = clip.map_or(0.0, |c| c.max_norm);
    let f = [s[0] as f32, s[1] as f32, s[2] as f32, s[3] as f32, s[4] as f32, s[5] as f32, s[6] as f32, max_norm];
    let mut binds = vec![(6, grad.buffer()), (7, param.buffer()), (8, m.buffer()), (9, v.buffer())];
    if let Some(c) = clip {
        check_norm(OP, c.norm)?;
        binds.push((5, c.norm.buffer()));
    }
    gpu.dispatch(
        SHADER,
        "adamw",
        &Defines::new().flag_if("CLIP", clip.is_some()),
        &params(n, 0, f),
        &binds,
        gpu.grid(groups(n, WG)),
    )
}

/// The learning-rate schedules of `diffusers.optimization.get_scheduler`, as the multiplier of
/// the base learning rate (a `LambdaLR` factor).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrSchedule {
    /// `1`.
    Constant,
    /// `step / warmup` during warmup, then `1`.
    ConstantWithWarmup { warmup: u64 },
    /// Linear warmup, then linear decay to 0 at `total`.
    Linear { warmup: u64, total: u64 },
    /// Linear warmup, then `0.5·(1 + cos(π·cycles·2·progress))` (get_scheduler uses
    /// `cycles = 0.5`: a half cosine down to 0).
    Cosine { warmup: u64, total: u64, cycles: f64 },
    /// Linear warmup, then `cycles` half cosines, each restarting at 1; 0 from `total` on.
    CosineWithRestarts { warmup: u64, total: u64, cycles: u64 },
}

impl LrSchedule {
    /// The schedule `get_scheduler(name, num_warmup_steps = warmup, num_training_steps = total,
    /// num_cycles = cycles)` builds (`cycles` only affects `cosine_with_restarts`; `cosine`
    /// always has 0.5 there).
    pub fn from_name(name: &str, warmup: u64, total: u64, cycles: u64) -> Result<Self> {
        Ok(match name {
            "constant" => LrSchedule::Constant,
            "constant_with_warmup" => LrSchedule::ConstantWithWarmup { warmup },
            "linear" => LrSchedule::Linear { warmup, total },
            "cosine" => LrSchedule::Cosine { warmup, total, cycles: 0.5 },
            "cosine_with_restarts" => LrSchedule::CosineWithRestarts { warmup, total, cycles },
            other => {
                return Err(Error::Invalid(format!(
                    "unknown learning-rate schedule `{other}`: use constant, constant_with_warmup, linear, \
                     cosine or cosine_with_restarts"
                )))
            }
        })
    }

    /// The factor for the optimizer step with index `step` (0-based: the first step gets
    /// `factor(0)`, as LambdaLR gives before its `step()` has been called).
    pub fn factor(&self, step: u64) -> f64 {
        let s = step as f64;
        let warm = |warmup: u64| s / (warmup.max(1) as f64);
        // Progress after warmup: (step − warmup) / max(1, total − warmup).
        let progress = |warmup: u64, total: u64| (s - warmup as f64) / (total as f64 - warmup as f64).max(1.0);
        match *self {
            LrSchedule::Constant => 1.0,
            LrSchedule::ConstantWithWarmup { warmup } => {
                if step < warmup {
                    warm(warmup)
                } else {
                    1.0
                }
            }
            LrSchedule::Linear { warmup, total } => {
                if step < warmup {
                    return warm(warmup);
                }
                let left = (total as f64 - s) / (total as f64 - warmup as f64).max(1.0);
                left.max(0.0)
            }
            LrSchedule::Cosine { warmup, total, cycles } => {
                if step < warmup {
                    return warm(warmup);
                }
                let p = progress(warmup, total);
                (0.5 * (1.0 + (std::f64::consts::PI * cycles * 2.0 * p).cos())).max(0.0)
            }
            LrSchedule::CosineWithRestarts { warmup, total, cycles } => {
                if step < warmup {
                    return warm(warmup);
                }
                let p = progress(warmup, total);
                if p >= 1.0 {
                    return 0.0;
                }
                (0.5 * (1.0 + (std::f64::consts::PI * ((cycles as f64 * p).rem_euclid(1.0))).cos())).max(0.0)
            }
        }
    }

    /// `base_lr · factor(step)`.
    pub fn lr(&self, base_lr: f64, step: u64) -> f64 {
        base_lr * self.factor(step)
    }
}

/// CPU references in f64.
pub mod reference {
    use super::AdamW;

    /// One AdamW step in f64: `g = grad · coef` (`coef` the clip factor, 1 without clipping),
    /// `param ·= 1 − lr·wd`, `m = β₁m + (1 − β₁)g`, `v = β₂v + (1 − β₂)g²`,
    /// `param −= lr/(1 − β₁ᵗ) · m / (sqrt(v)/sqrt(1 − β₂ᵗ) + eps)`.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step(
        hp: &AdamW,
        lr: f64,
        step: u64,
        param: &mut [f64],
        grad: &[f64],
        m: &mut [f64],
        v: &mut [f64],
        coef: f64,
    ) {
        let t = step as i32;
        let bc1 = 1.0 - hp.beta1.powi(t);
        let bc2 = 1.0 - hp.beta2.powi(t);
        for i in 0..param.len() {
            let g = grad[i] * coef;
            param[i] *= 1.0 - lr * hp.weight_decay;
            m[i] = hp.beta1 * m[i] + (1.0 - hp.beta1) * g;
            v[i] = hp.beta2 * v[i] + (1.0 - hp.beta2) * g * g;
            let denom = v[i].sqrt() / bc2.sqrt() + hp.eps;
            param[i] -= lr / bc1 * m[i] / denom;
        }
    }

    /// `sqrt(Σ_t Σ_i g_t[i]²)`.
    pub fn grad_norm(grads: &[&[f64]]) -> f64 {
        grads.iter().flat_map(|g| g.iter()).map(|x| x * x).sum::<f64>().sqrt()
    }

    /// clip_grad_norm_'s factor: `min(max_norm / (norm + 1e-6), 1)`.
    pub fn clip_coef(norm: f64, max_norm: f64) -> f64 {
        (max_norm / (norm + 1e-6)).min(1.0)
    }
}
