//! Backward of group norm (+ SiLU), layer norm and softmax (`shaders/grad_norm.wgsl`), the
//! forward ops of [`crate::ops::norm`]. The affine parameters are frozen, so each op returns
//! only the gradient with respect to its input.
//!
//! Group norm recomputes its per-(batch, group) mean and rstd from `x` rather than taking them
//! from the forward: the forward does not keep them, the extra read of `x` is cheap next to the
//! convolutions around it, and the backward then needs nothing but the forward's inputs. Large
//! groups are split into chunks of [`GN_CHUNK`] values so that the work spreads over many
//! workgroups; every reduction runs in a fixed order, so results are bit-reproducible.

use crate::error::{shape_err, Result};
use crate::gpu::{Gpu, GpuBuffer};
use crate::ops::{groups as workgroups_for, Params};
use crate::shader::{Defines, ShaderSource};
use crate::tensor::Tensor;

const SHADER: &str = "grad_norm.wgsl";

pub static SHADERS: &[ShaderSource] = &[ShaderSource {
    name: SHADER,
    source: crate::wgsl!("grad_norm.wgsl"),
    flag_axes: &[],
    values: &[],
    entries: &[
        "layer_norm_grad",
        "softmax_grad",
        "gnb_partial_stats",
        "gnb_stats",
        "gnb_partial_grad",
        "gnb_grad",
        "gnb_dx",
    ],
    top_level: true,
}];

/// Invocations per workgroup (`WG` in the shader).
const WG: usize = 256;
/// Values of a group one chunk workgroup reduces.
pub const GN_CHUNK: usize = WG * 16;

/// The `Params` struct of the shader.
#[derive(Default)]
struct P {
    rows: usize,
    d: usize,
    chunk: usize,
    chunks: usize,
    spatial: usize,
    channels: usize,
    cpg: usize,
    flags: usize,
    eps: f32,
    scale: f32,
    n: usize,
}

impl P {
    fn words(&self) -> Vec<u32> {
        Params::new()
            .u(self.rows)
            .u(self.d)
            .u(self.chunk)
            .u(self.chunks)
            .u(self.spatial)
            .u(self.channels)
            .u(self.cpg)
            .u(self.flags)
            .f(self.eps)
            .f(self.scale)
            .u(self.n)
            .0
    }
}

/// Checks that `dy` matches `x` (both f32).
fn same_shape(op: &'static str, x: &Tensor, dy: &Tensor, xname: &str) -> Result<()> {
    x.expect_f32(op)?;
    dy.expect_f32(op)?;
    if x.shape() != dy.shape() {
        return Err(shape_err(
            op,
            format!("dy {:?} must have the shape of {xname} {:?}", dy.shape(), x.shape()),
        ));
    }
    Ok(())
}

/// Checks an optional per-channel parameter; returns (flag bit if present, buffer to bind).
fn affine_param<'a>(
    op: &'static str,
    what: &str,
    t: Option<&'a Tensor>,
    len: usize,
    x: &'a Tensor,
    bit: usize,
) -> Result<(usize, &'a GpuBuffer)> {
    match t {
        None => Ok((0, x.buffer())),
        Some(t) => {
            t.expect_f32(op)?;
            if t.numel() != len || t.rank() != 1 {
                return Err(shape_err(
                    op,
                    format!("{what} must be [{len}], got {:?} (x {:?})", t.shape(), x.shape()),
                ));
            }
            Ok((bit, t.buffer()))
        }
    }
}

/// The last dimension of `x`, which must be non-empty.
fn last_dim(op: &'static str, x: &Tensor) -> Result<usize> {
    match x.shape().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => Err(shape_err(op, format!("x {:?} needs a non-empty last dimension", x.shape()))),
    }
}

fn grid1(gpu: &Gpu, n: usize) -> [u32; 3] {
    gpu.grid(u32::try_from(n).unwrap_or(u32::MAX))
}

/// Input gradient of [`crate::ops::norm::group_norm`] on `x: [B, C, *spatial]` with the same
/// `groups`, `gamma`, `beta`, `eps` and `silu` as the forward, given the output gradient `dy`
/// (shaped like `x`). `beta` only matters with `silu` (the SiLU sees `gamma · x̂ + beta`).
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward(
    gpu: &Gpu,
    x: &Tensor,
    dy: &Tensor,
    groups: usize,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    const OP: &str = "group_norm_backward";
    same_shape(OP, x, dy, "x")?;
    let s = x.shape();
    if s.len() < 2 || s[1] == 0 || groups == 0 || !s[1].is_multiple_of(groups) {
        return Err(shape_err(
            OP,
            format!("x {s:?} must be [B, C, ...] with C divisible by {groups} groups"),
        ));
    }
    let (b, c) = (s[0], s[1]);
    let spatial: usize = s[2..].iter().product();
    let (g_bit, g_buf) = affine_param(OP, "gamma", gamma, c, x, 1)?;
    let (b_bit, b_buf) = affine_param(OP, "beta", beta, c, x, 2)?;
    let dx = Tensor::empty(gpu, s)?;
    let n = x.numel();
    if n == 0 {
        return Ok(dx);
    }
    let cpg = c / groups;
    let d = cpg * spatial;
    let ngroups = b * groups;
    let chunks = d.div_ceil(GN_CHUNK);
    let p = P {
        rows: ngroups,
        d,
        chunk: GN_CHUNK,
        chunks,
        spatial,
        channels: c,
        cpg,
        flags: g_bit | b_bit | if silu { 4 } else { 0 },
        eps,
        scale: 0.0,
        n,
    }
    .words();
    let partial = gpu.alloc((ngroups * chunks * 2 * 4) as u64, "group_norm_backward partial sums")?;
    let stats = gpu.alloc((ngroups * 4 * 4) as u64, "group_norm_backward stats")?;
    let def = Defines::new();
    let (xb, dyb) = (x.buffer(), dy.buffer());
    let per_chunk = grid1(gpu, ngroups * chunks);
    let per_group = grid1(gpu, ngroups);
    gpu.dispatch(SHADER, "gnb_partial_stats", &def, &p, &[(1, xb), (6, &partial)], per_chunk)?;
    gpu.dispatch(SHADER, "gnb_stats", &def, &p, &[(6, &partial), (7, &stats)], per_group)?;
    gpu.dispatch(
        SHADER,
        "gnb_partial_grad",
        &def,
        &p,
        &[(1, xb), (2, dyb), (3, g_buf), (4, b_buf), (6, &partial), (7, &stats)],
        per_chunk,
    )?;
    gpu.dispatch(SHADER, "gnb_grad", &def, &p, &[(6, &partial), (7, &stats)], per_group)?;
    gpu.dispatch(
        SHADER,
        "gnb_dx",
        &def,
        &p,
        &[(1, xb), (2, dyb), (3, g_buf), (4, b_buf), (5, dx.buffer()), (7, &stats)],
        gpu.grid(workgroups_for(n, WG)),
    )?;
    Ok(dx)
}

/// Input gradient of [`crate::ops::norm::layer_norm`] over the last dimension of
/// `x: [..., D]` with the forward's `gamma: [D]` and `eps`, given `dy` shaped like `x`
/// (`beta` does not enter the input gradient).
pub fn layer_norm_backward(
    gpu: &Gpu,
    x: &Tensor,
    dy: &Tensor,
    gamma: Option<&Tensor>,
    eps: f32,
) -> Result<Tensor> {
    const OP: &str = "layer_norm_backward";
    same_shape(OP, x, dy, "x")?;
    let d = last_dim(OP, x)?;
    let (g_bit, g_buf) = affine_param(OP, "gamma", gamma, d, x, 1)?;
    let dx = Tensor::empty(gpu, x.shape())?;
    let rows = x.numel() / d;
    let p = P { rows, d, flags: g_bit, eps, ..Default::default() }.words();
    gpu.dispatch(
        SHADER,
        "layer_norm_grad",
        &Defines::new(),
        &p,
        &[(1, x.buffer()), (2, dy.buffer()), (3, g_buf), (5, dx.buffer())],
        grid1(gpu, rows),
    )?;
    Ok(dx)
}

/// Input gradient of [`crate::ops::norm::softmax`]`(x, scale)` along the last dimension, from
/// the forward's output `y: [..., D]` and `dy` shaped like it:
/// `dx = scale · y ⊙ (dy − Σ dy ⊙ y)` per row.
pub fn softmax_backward(gpu: &Gpu, y: &Tensor, dy: &Tensor, scale: f32) -> Result<Tensor> {
    const OP: &str = "softmax_backward";
    same_shape(OP, y, dy, "y")?;
    let d = last_dim(OP, y)?;
    let dx = Tensor::empty(gpu, y.shape())?;
    let rows = y.numel() / d;
    let p = P { rows, d, scale, ..Default::default() }.words();
    gpu.dispatch(
        SHADER,
        "softmax_grad",
        &Defines::new(),
        &p,
        &[(1, y.buffer()), (2, dy.buffer()), (5, dx.buffer())],
        grid1(gpu, rows),
    )?;
    Ok(dx)
}

/// CPU references in f64: the forward ops and their input gradients.
pub mod reference {
    fn sigmoid(v: f64) -> f64 {
        1.0 / (1.0 + (-v).exp())
    }

    /// (mean, rstd) of `v` (biased variance, as PyTorch's norms).
    fn moments(v: &[f64], eps: f64) -> (f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / n;
        (mean, 1.0 / (var + eps).sqrt())
    }

    /// `rstd · (g − mean(g) − x̂ · mean(g·x̂))` over one normalised set.
    fn norm_dx(xhat: &[f64], g: &[f64], rstd: f64) -> Vec<f64> {
        let n = xhat.len() as f64;
        let mg = g.iter().sum::<f64>() / n;
        let mgx = g.iter().zip(xhat).map(|(a, b)| a * b).sum::<f64>() / n;
        xhat.iter().zip(g).map(|(xh, gv)| rstd * (gv - mg - xh * mgx)).collect()
    }

    /// Group norm (+ SiLU) of `x: [b, c, spatial]`, as `ops::norm::reference::group_norm`.
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm(
        x: &[f64],
        b: usize,
        c: usize,
        spatial: usize,
        groups: usize,
        gamma: Option<&[f64]>,
        beta: Option<&[f64]>,
        eps: f64,
        silu: bool,
    ) -> Vec<f64> {
        let d = c / groups * spatial;
        let mut y = Vec::with_capacity(x.len());
        for (gi, v) in x.chunks(d).enumerate().take(b * groups) {
            let (mean, rstd) = moments(v, eps);
            for (i, a) in v.iter().enumerate() {
                let ch = (gi % groups) * (c / groups) + i / spatial;
                let xhat = (a - mean) * rstd;
                let z = xhat * gamma.map_or(1.0, |g| g[ch]) + beta.map_or(0.0, |b| b[ch]);
                y.push(if silu { z * sigmoid(z) } else { z });
            }
        }
        y
    }

    /// Gradient of [`group_norm`] with respect to `x`, given the output gradient `dy`.
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm_backward(
        x: &[f64],
        dy: &[f64],
        b: usize,
        c: usize,
        spatial: usize,
        groups: usize,
        gamma: Option<&[f64]>,
        beta: Option<&[f64]>,
        eps: f64,
        silu: bool,
    ) -> Vec<f64> {
        let d = c / groups * spatial;
        let mut dx = Vec::with_capacity(x.len());
        for (gi, (v, dv)) in x.chunks(d).zip(dy.chunks(d)).enumerate().take(b * groups) {
            let (mean, rstd) = moments(v, eps);
            let xhat: Vec<f64> = v.iter().map(|a| (a - mean) * rstd).collect();
            let g: Vec<f64> = (0..v.len())
                .map(|i| {
                    let ch = (gi % groups) * (c / groups) + i / spatial;
                    let ga = gamma.map_or(1.0, |g| g[ch]);
                    let mut dz = dv[i];
                    if silu {
                        let z = xhat[i] * ga + beta.map_or(0.0, |b| b[ch]);
                        let s = sigmoid(z);
                        dz *= s * (1.0 + z * (1.0 - s));
                    }
                    dz * ga
                })
                .collect();
            dx.extend(norm_dx(&xhat, &g, rstd));
        }
        dx
    }

    /// Layer norm over rows of `d` values.
    pub fn layer_norm(
        x: &[f64],
        d: usize,
        gamma: Option<&[f64]>,
        beta: Option<&[f64]>,
        eps: f64,
    ) -> Vec<f64> {
        x.chunks(d)
            .flat_map(|v| {
                let (mean, rstd) = moments(v, eps);
                v.iter()
                    .enumerate()
                    .map(move |(i, a)| {
                        (a - mean) * rstd * gamma.map_or(1.0, |g| g[i]) + beta.map_or(0.0, |b| b[i])
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Gradient of [`layer_norm`] with respect to `x`, given `dy`.
    pub fn layer_norm_backward(
        x: &[f64],
        dy: &[f64],
        d: usize,
        gamma: Option<&[f64]>,
        eps: f64,
    ) -> Vec<f64> {
        x.chunks(d)
            .zip(dy.chunks(d))
            .flat_map(|(v, dv)| {
                let (mean, rstd) = moments(v, eps);
                let xhat: Vec<f64> = v.iter().map(|a| (a - mean) * rstd).collect();
                let g: Vec<f64> =
                    dv.iter().enumerate().map(|(i, a)| a * gamma.map_or(1.0, |g| g[i])).collect();
                norm_dx(&xhat, &g, rstd)
            })
            .collect()
    }

    /// Softmax of `scale · x` over rows of `d` values.
    pub fn softmax(x: &[f64], d: usize, scale: f64) -> Vec<f64> {
        x.chunks(d)
            .flat_map(|v| {
                let m = v.iter().map(|a| scale * a).fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = v.iter().map(|a| (scale * a - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                e.into_iter().map(move |a| a / sum).collect::<Vec<_>>()
            })
            .collect()
    }

    /// Gradient of [`softmax`] with respect to `x`, from its output `y` and `dy`.
    pub fn softmax_backward(y: &[f64], dy: &[f64], d: usize, scale: f64) -> Vec<f64> {
        y.chunks(d)
            .zip(dy.chunks(d))
            .flat_map(|(yv, dv)| {
                let s: f64 = yv.iter().zip(dv).map(|(a, b)| a * b).sum();
                yv.iter().zip(dv).map(move |(a, b)| scale * a * (b - s)).collect::<Vec<_>>()
            })
            .collect()
    }
}
