//! Backward of SiLU, exact GELU, quick GELU, GEGLU and the nearest 2× upsample, and in-place gradient
//! accumulation for residual branches (`shaders/grad_activation.wgsl`). The forward ops are
//! [`crate::ops::elementwise`] (`Unary::Silu`, `Unary::Gelu`, `Unary::QuickGelu`, `geglu`) and
//! [`crate::ops::layout::upsample_nearest2x`].

use crate::error::{shape_err, Error, Result};
use crate::gpu::{Bind, Gpu};
use crate::ops::{groups, Params};
use crate::shader::{Defines, ShaderSource};
use crate::tensor::Tensor;

const SHADER: &str = "grad_activation.wgsl";

pub static SHADERS: &[ShaderSource] = &[ShaderSource {
    name: SHADER,
    source: crate::wgsl!("grad_activation.wgsl"),
    flag_axes: &[],
    values: &[],
    entries: &["silu_grad", "gelu_grad", "quick_gelu_grad", "geglu_grad", "upsample2x_grad", "accumulate"],
    top_level: true,
}];

/// Invocations per workgroup (`WG` in the shader).
const WG: usize = 256;

/// Runs `entry` with one invocation per element of `n` (`Params`: n, d, alpha).
fn run(gpu: &Gpu, entry: &'static str, n: usize, d: usize, alpha: f32, binds: &[Bind<'_>]) -> Result<()> {
    gpu.dispatch(
        SHADER,
        entry,
        &Defines::new(),
        &Params::new().u(n).u(d).f(alpha).0,
        binds,
        gpu.grid(groups(n, WG)),
    )
}

/// Checks that `x` and `dy` are f32 with equal shapes.
fn same_shape(op: &'static str, x: &Tensor, dy: &Tensor) -> Result<()> {
    x.expect_f32(op)?;
    dy.expect_f32(op)?;
    if x.shape() != dy.shape() {
        return Err(shape_err(op, format!("dy {:?} must have the shape of x {:?}", dy.shape(), x.shape())));
    }
    Ok(())
}

fn elementwise_grad(
    gpu: &Gpu,
    op: &'static str,
    entry: &'static str,
    x: &Tensor,
    dy: &Tensor,
) -> Result<Tensor> {
    same_shape(op, x, dy)?;
    let dx = Tensor::empty(gpu, x.shape())?;
    let binds = [(1, x.buffer()), (2, dy.buffer()), (3, dx.buffer())];
    run(gpu, entry, x.numel(), 0, 0.0, &binds)?;
    Ok(dx)
}

/// Input gradient of SiLU at `x` given the output gradient `dy` (same shape).
pub fn silu_backward(gpu: &Gpu, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    elementwise_grad(gpu, "silu_backward", "silu_grad", x, dy)
}

/// Input gradient of the exact (erf) GELU at `x` given `dy` (same shape).
pub fn gelu_backward(gpu: &Gpu, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    elementwise_grad(gpu, "gelu_backward", "gelu_grad", x, dy)
}

/// Input gradient of CLIP's quick GELU `x·σ(1.702·x)` at `x` given `dy` (same shape).
pub fn quick_gelu_backward(gpu: &Gpu, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    elementwise_grad(gpu, "quick_gelu_backward", "quick_gelu_grad", x, dy)
}

/// Input gradient of [`crate::ops::elementwise::geglu`] at `x: [..., 2D]` given
/// `dy: [..., D]`: `[..., 2D]`, the hidden half's gradient first, then the gate's.
pub fn geglu_backward(gpu: &Gpu, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    const OP: &str = "geglu_backward";
    x.expect_f32(OP)?;
    dy.expect_f32(OP)?;
    let (s, ds) = (x.shape(), dy.shape());
    let d2 = s.last().copied().unwrap_or(0);
    let fits = d2 > 0
        && d2.is_multiple_of(2)
        && ds.len() == s.len()
        && ds[..ds.len() - 1] == s[..s.len() - 1]
        && ds.last() == Some(&(d2 / 2));
    if !fits {
        return Err(shape_err(
            OP,
            format!("x {s:?} needs an even, non-empty last dim 2D and dy {ds:?} the same shape with D"),
        ));
    }
    let dx = Tensor::empty(gpu, s)?;
    let binds = [(1, x.buffer()), (2, dy.buffer()), (3, dx.buffer())];
    run(gpu, "geglu_grad", dy.numel(), d2 / 2, 0.0, &binds)?;
    Ok(dx)
}

/// Input gradient of [`crate::ops::layout::upsample_nearest2x`] given
/// `dy: [B, C, 2H, 2W]`: `[B, C, H, W]`, each value the sum of its 2×2 block of `dy`.
pub fn upsample_nearest2x_backward(gpu: &Gpu, dy: &Tensor) -> Result<Tensor> {
    const OP: &str = "upsample_nearest2x_backward";
    dy.expect_f32(OP)?;
    let s = dy.shape();
    if s.len() != 4 || !s[2].is_multiple_of(2) || !s[3].is_multiple_of(2) {
        return Err(shape_err(OP, format!("dy must be [B, C, 2H, 2W] with even height and width, got {s:?}")));
    }
    let dx = Tensor::empty(gpu, &[s[0], s[1], s[2] / 2, s[3] / 2])?;
    run(gpu, "upsample2x_grad", dx.numel(), s[3] / 2, 0.0, &[(2, dy.buffer()), (3, dx.buffer())])?;
    Ok(dx)
}

/// `acc += alpha · g` in place (gradients of a tensor used by several branches, residual
/// connections). `acc` and `g` must have the same shape and distinct storage.
pub fn accumulate(gpu: &Gpu, acc: &Tensor, g: &Tensor, alpha: f32) -> Result<()> {
    const OP: &str = "accumulate";
    acc.expect_f32(OP)?;
    g.expect_f32(OP)?;
    if acc.shape() != g.shape() {
        return Err(shape_err(OP, format!("g {:?} must have the shape of acc {:?}", g.shape(), acc.shape())));
    }
    if std::ptr::eq(acc.buffer(), g.buffer()) {
        return Err(Error::Invalid(format!(
            "accumulate: acc and g {:?} share storage; scale the tensor instead",
            acc.shape()
        )));
    }
    run(gpu, "accumulate", acc.numel(), 0, alpha, &[(2, g.buffer()), (3, acc.buffer())])
}

/// CPU references in f64: the forward functions and their input gradients.
pub mod reference {
    use crate::ops::elementwise::reference::erf;

    fn sigmoid(v: f64) -> f64 {
        1.0 / (1.0 + (-v).exp())
    }

    pub fn silu(x: &[f64]) -> Vec<f64> {
        x.iter().map(|&v| v * sigmoid(v)).collect()
    }

    pub fn silu_backward(x: &[f64], dy: &[f64]) -> Vec<f64> {
        x.iter()
            .zip(dy)
            .map(|(&v, g)| {
                let s = sigmoid(v);
                g * s * (1.0 + v * (1.0 - s))
            })
            .collect()
    }

    fn gelu1(v: f64) -> f64 {
        0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2))
    }

    fn gelu1_grad(v: f64) -> f64 {
        let cdf = 0.5 * (1.0 + erf(v / std::f64::consts::SQRT_2));
        let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
        cdf + v * pdf
    }

    /// Exact GELU, `0.5·x·(1 + erf(x/√2))`.
    pub fn gelu(x: &[f64]) -> Vec<f64> {
        x.iter().map(|&v| gelu1(v)).collect()
    }

    pub fn gelu_backward(x: &[f64], dy: &[f64]) -> Vec<f64> {
        x.iter().zip(dy).map(|(&v, g)| g * gelu1_grad(v)).collect()
    }

    /// CLIP's quick GELU, `x·σ(1.702·x)`.
    pub fn quick_gelu(x: &[f64]) -> Vec<f64> {
        x.iter().map(|&v| v * sigmoid(1.702 * v)).collect()
    }

    pub fn quick_gelu_backward(x: &[f64], dy: &[f64]) -> Vec<f64> {
        x.iter()
            .zip(dy)
            .map(|(&v, g)| {
                let s = sigmoid(1.702 * v);
                g * (s + 1.702 * v * s * (1.0 - s))
            })
            .collect()
    }

    /// GEGLU over rows of `2·d` values: `hidden · gelu(gate)`.
    pub fn geglu(x: &[f64], d: usize) -> Vec<f64> {
        x.chunks(2 * d).flat_map(|r| (0..d).map(move |j| r[j] * gelu1(r[d + j]))).collect()
    }

    /// Gradient of [`geglu`] with respect to `x` (rows of `2·d`), given `dy` (rows of `d`).
    pub fn geglu_backward(x: &[f64], dy: &[f64], d: usize) -> Vec<f64> {
        x.chunks(2 * d)
            .zip(dy.chunks(d))
            .flat_map(|(r, g)| {
                let hidden = (0..d).map(move |j| g[j] * gelu1(r[d + j]));
                let gate = (0..d).map(move |j| g[j] * r[j] * gelu1_grad(r[d + j]));
                hidden.chain(gate).collect::<Vec<_>>()
            })
            .collect()
    }

    /// Nearest 2× upsample of `x: [bc, h, w]`.
    pub fn upsample_nearest2x(x: &[f64], bc: usize, h: usize, w: usize) -> Vec<f64> {
        let mut y = Vec::with_capacity(4 * bc * h * w);
        for p in 0..bc {
            for oy in 0..2 * h {
                for ox in 0..2 * w {
                    y.push(x[(p * h + oy / 2) * w + ox / 2]);
                }
            }
        }
        y
    }

    /// Gradient of [`upsample_nearest2x`] given `dy: [bc, 2h, 2w]`.
    pub fn upsample_nearest2x_backward(dy: &[f64], bc: usize, h: usize, w: usize) -> Vec<f64> {
        let mut dx = vec![0.0; bc * h * w];
        for p in 0..bc {
            for oy in 0..2 * h {
                for ox in 0..2 * w {
                    dx[(p * h + oy / 2) * w + ox / 2] += dy[(p * 2 * h + oy) * 2 * w + ox];
                }
            }
        }
        dx
    }

    /// `acc + alpha · g`.
    pub fn accumulate(acc: &[f64], g: &[f64], alpha: f64) -> Vec<f64> {
        acc.iter().zip(g).map(|(a, b)| a + alpha * b).collect()
    }
}
