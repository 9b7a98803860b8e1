//! Group norm (+ SiLU), layer norm and softmax (`shaders/norm.wgsl`), with PyTorch's
//! semantics (`torch.nn.GroupNorm`, `torch.nn.LayerNorm` over the last dimension,
//! `torch.softmax(scale * x, -1)`). Reductions use subgroup operations where the device has
//! them and a workgroup-memory tree otherwise.

use super::{groups as workgroups_for, Params};
use crate::error::{shape_err, Result};
use crate::gpu::{GpuBuffer, Gpu};
use crate::shader::{Defines, ShaderSource};
use crate::tensor::Tensor;

const SHADER: &str = "norm.wgsl";

pub static SHADERS: &[ShaderSource] = &[ShaderSource {
    name: SHADER,
    source: crate::wgsl!("norm.wgsl"),
    flag_axes: &[&["", "SUBGROUPS"]],
    values: &[],
    entries: &["layer_norm", "softmax", "gn_partial", "gn_stats", "gn_apply"],
    top_level: true,
}];

/// Invocations per workgroup (`WG` in the shader).
const WG: usize = 256;
/// Values of a group one `gn_partial` workgroup reduces.
const GN_CHUNK: usize = WG * 16;

fn defines(gpu: &Gpu) -> Defines {
    Defines::new().flag_if("SUBGROUPS", gpu.caps().subgroups)
}

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

/// Checks an optional per-channel affine parameter; returns (flag bit if present, buffer to bind).
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

/// `torch.nn.GroupNorm(groups, C, eps)` on `x: [B, C, *spatial]`, with optional affine
/// `gamma`, `beta: [C]`, followed by SiLU when `silu` is set (the resnet `norm → SiLU` pair).
pub fn group_norm(
    gpu: &Gpu,
    x: &Tensor,
    groups: usize,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    const OP: &str = "group_norm";
    x.expect_f32(OP)?;
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
    let y = Tensor::empty(gpu, s)?;
    let n = x.numel();
    if n == 0 {
        return Ok(y);
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
    let partial = gpu.alloc((ngroups * chunks * 2 * 4) as u64, "group_norm partial stats")?;
    let stats = gpu.alloc((ngroups * 2 * 4) as u64, "group_norm stats")?;
    let def = defines(gpu);
    gpu.dispatch(
        SHADER,
        "gn_partial",
        &def,
        &p,
        &[(1, x.buffer()), (5, &partial)],
        gpu.grid(u32::try_from(ngroups * chunks).unwrap_or(u32::MAX)),
    )?;
    gpu.dispatch(
        SHADER,
        "gn_stats",
        &def,
        &p,
        &[(5, &partial), (6, &stats)],
        gpu.grid(u32::try_from(ngroups).unwrap_or(u32::MAX)),
    )?;
    gpu.dispatch(
        SHADER,
        "gn_apply",
        &def,
        &p,
        &[(1, x.buffer()), (2, g_buf), (3, b_buf), (4, y.buffer()), (6, &stats)],
        gpu.grid(workgroups_for(n, WG)),
    )?;
    Ok(y)
}

/// `torch.nn.LayerNorm(D, eps)` over the last dimension of `x: [..., D]`, with optional
/// `gamma`, `beta: [D]`.
pub fn layer_norm(
    gpu: &Gpu,
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
) -> Result<Tensor> {
    const OP: &str = "layer_norm";
    x.expect_f32(OP)?;
    let d = x.shape().last().copied().unwrap_or(0);
    if d == 0 {
        return Err(shape_err(OP, format!("x {:?} needs a non-empty last dimension", x.shape())));
    }
    let (g_bit, g_buf) = affine_param(OP, "gamma", gamma, d, x, 1)?;
    let (b_bit, b_buf) = affine_param(OP, "beta", beta, d, x, 2)?;
    let y = Tensor::empty(gpu, x.shape())?;
    let rows = x.numel() / d;
    let p = P { rows, d, flags: g_bit | b_bit, eps, ..Default::default() }.words();
    gpu.dispatch(
        SHADER,
        "layer_norm",
        &defines(gpu),
        &p,
        &[(1, x.buffer()), (2, g_buf), (3, b_buf), (4, y.buffer())],
        gpu.grid(u32::try_from(rows).unwrap_or(u32::MAX)),
    )?;
    Ok(y)
}

/// `softmax(scale · x)` along the last dimension of `x: [..., D]` (max-subtracted).
pub fn softmax(gpu: &Gpu, x: &Tensor, scale: f32) -> Result<Tensor> {
    const OP: &str = "softmax";
    x.expect_f32(OP)?;
    let d = x.shape().last().copied().unwrap_or(0);
    if d == 0 {
        return Err(shape_err(OP, format!("x {:?} needs a non-empty last dimension", x.shape())));
    }
    let y = Tensor::empty(gpu, x.shape())?;
    let rows = x.numel() / d;
    let p = P { rows, d, scale, ..Default::default() }.words();
    gpu.dispatch(
        SHADER,
        "softmax",
        &defines(gpu),
        &p,
        &[(1, x.buffer()), (4, y.buffer())],
        gpu.grid(u32::try_from(rows).unwrap_or(u32::MAX)),
    )?;
    Ok(y)
}

/// CPU references in f64.
pub mod reference {
    fn affine(v: f64, c: usize, gamma: Option<&[f32]>, beta: Option<&[f32]>) -> f64 {
        let g = gamma.map_or(1.0, |g| g[c] as f64);
        let b = beta.map_or(0.0, |b| b[c] as f64);
        v * g + b
    }

    /// Group norm of `x: [b, c, spatial]` (+ SiLU).
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm(
        x: &[f32],
        b: usize,
        c: usize,
        spatial: usize,
        groups: usize,
        gamma: Option<&[f32]>,
        beta: Option<&[f32]>,
        eps: f32,
        silu: bool,
    ) -> Vec<f32> {
        let cpg = c / groups;
        let d = cpg * spatial;
        let mut y = vec![0f32; x.len()];
        for g in 0..b * groups {
            let v = &x[g * d..(g + 1) * d];
            let mean = v.iter().map(|&a| a as f64).sum::<f64>() / d as f64;
            let var = v.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            let rstd = 1.0 / (var + eps as f64).sqrt();
            for (i, &a) in v.iter().enumerate() {
                let ch = (g % groups) * cpg + i / spatial;
                let mut r = affine((a as f64 - mean) * rstd, ch, gamma, beta);
                if silu {
                    r /= 1.0 + (-r).exp();
                }
                y[g * d + i] = r as f32;
            }
        }
        y
    }

    /// Layer norm over rows of `d` values.
    pub fn layer_norm(
        x: &[f32],
        d: usize,
        gamma: Option<&[f32]>,
        beta: Option<&[f32]>,
        eps: f32,
    ) -> Vec<f32> {
        x.chunks(d)
            .flat_map(|v| {
                let mean = v.iter().map(|&a| a as f64).sum::<f64>() / d as f64;
                let var = v.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                let rstd = 1.0 / (var + eps as f64).sqrt();
                v.iter()
                    .enumerate()
                    .map(move |(i, &a)| affine((a as f64 - mean) * rstd, i, gamma, beta) as f32)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Softmax of `scale · x` over rows of `d` values.
    pub fn softmax(x: &[f32], d: usize, scale: f32) -> Vec<f32> {
        x.chunks(d)
            .flat_map(|v| {
                let s: Vec<f64> = v.iter().map(|&a| scale as f64 * a as f64).collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|a| (a - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                e.into_iter().map(move |a| (a / sum) as f32).collect::<Vec<_>>()
            })
            .collect()
    }
}
