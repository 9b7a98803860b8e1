//! Data movement: nearest 2x upsample, concatenation, last-two-dims transpose, last-dim slice,
//! the sinusoidal timestep embedding, the embedding-table gather and zero padding
//! (`shaders/layout.wgsl`).

use super::{groups, Params};
use crate::error::{shape_err, Result};
use crate::gpu::Gpu;
use crate::quant::DType;
use crate::shader::{Defines, ShaderSource};
use crate::tensor::Tensor;

const SHADER: &str = "layout.wgsl";

pub static SHADERS: &[ShaderSource] = &[ShaderSource {
    name: SHADER,
    source: crate::wgsl!("layout.wgsl"),
    flag_axes: &[],
    values: &[],
    entries: &["upsample2x", "concat_part", "slice_last", "transpose", "timestep_embedding", "embedding", "pad2d"],
    top_level: true,
}];

const WG: usize = 256;
const TILE: usize = 16;

/// Params words: n, a, b, c, d, f0 (meaning per entry point, see the shader).
fn params(n: usize, a: usize, b: usize, c: usize, d: usize, f0: f32) -> Vec<u32> {
    Params::new().u(n).u(a).u(b).u(c).u(d).f(f0).0
}

fn elementwise(gpu: &Gpu, entry: &'static str, p: &[u32], x: &Tensor, y: &Tensor) -> Result<()> {
    gpu.dispatch(
        SHADER,
        entry,
        &Defines::new(),
        p,
        &[(1, x.buffer()), (2, y.buffer())],
        gpu.grid(groups(y.numel(), WG)),
    )
}

/// Nearest-neighbour 2x upsampling of `x: [B, C, H, W]` to `[B, C, 2H, 2W]`
/// (`F.interpolate(x, scale_factor=2, mode="nearest")`).
pub fn upsample_nearest2x(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    const OP: &str = "upsample_nearest2x";
    x.expect_f32(OP)?;
    let s = x.shape();
    if s.len() != 4 {
        return Err(shape_err(OP, format!("x must be [B, C, H, W], got {s:?}")));
    }
    let y = Tensor::empty(gpu, &[s[0], s[1], 2 * s[2], 2 * s[3]])?;
    elementwise(gpu, "upsample2x", &params(y.numel(), s[3], 0, 0, 0, 0.0), x, &y)?;
    Ok(y)
}

/// `torch.cat(tensors, dim)` of f32 tensors (at least two) that agree on every other dimension.
pub fn concat(gpu: &Gpu, tensors: &[&Tensor], dim: usize) -> Result<Tensor> {
    const OP: &str = "concat";
    let shapes: Vec<&[usize]> = tensors.iter().map(|t| t.shape()).collect();
    if tensors.len() < 2 {
        return Err(shape_err(OP, format!("needs at least two tensors, got {shapes:?}")));
    }
    for t in tensors {
        t.expect_f32(OP)?;
    }
    let first = shapes[0];
    let same_rest = |s: &[usize]| {
        s.len() == first.len()
            && s.iter().zip(first).enumerate().all(|(i, (a, b))| i == dim || a == b)
    };
    if dim >= first.len() || !shapes.iter().all(|s| same_rest(s)) {
        return Err(shape_err(
            OP,
            format!("cannot concatenate {shapes:?} along dim {dim}: other dims must match"),
        ));
    }
    let outer: usize = first[..dim].iter().product();
    let inner: usize = first[dim + 1..].iter().product();
    let total: usize = shapes.iter().map(|s| s[dim]).sum();
    let mut out_shape = first.to_vec();
    out_shape[dim] = total;
    let y = Tensor::empty(gpu, &out_shape)?;
    let mut off = 0;
    for (t, s) in tensors.iter().zip(&shapes) {
        let len = s[dim];
        let p = params(t.numel(), len * inner, total * inner, off * inner, 0, 0.0);
        gpu.dispatch(
            SHADER,
            "concat_part",
            &Defines::new(),
            &p,
            &[(1, t.buffer()), (2, y.buffer())],
            gpu.grid(groups(t.numel(), WG)),
        )?;
        off += len;
    }
    debug_assert_eq!(outer * total * inner, y.numel());
    Ok(y)
}

/// Swaps the last two dimensions: `[batch..., R, C] -> [batch..., C, R]`.
pub fn transpose_last2(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    const OP: &str = "transpose_last2";
    x.expect_f32(OP)?;
    let s = x.shape();
    if s.len() < 2 {
        return Err(shape_err(OP, format!("x needs at least two dimensions, got {s:?}")));
    }
    let (r, c) = (s[s.len() - 2], s[s.len() - 1]);
    let mut out = s.to_vec();
    out.swap(s.len() - 2, s.len() - 1);
    let y = Tensor::empty(gpu, &out)?;
    let batch: usize = s[..s.len() - 2].iter().product();
    let (tr, tc) = (r.div_ceil(TILE), c.div_ceil(TILE));
    let tiles = batch * tr * tc;
    gpu.dispatch(
        SHADER,
        "transpose",
        &Defines::new(),
        &params(tiles, r, c, tr, tc, 0.0),
        &[(1, x.buffer()), (2, y.buffer())],
        gpu.grid(u32::try_from(tiles).unwrap_or(u32::MAX)),
    )?;
    Ok(y)
}

/// `x[..., start .. start + len]` of `x: [..., D]` (GEGLU halves, q/k/v chunks).
pub fn slice_last(gpu: &Gpu, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    const OP: &str = "slice_last";
    x.expect_f32(OP)?;
    let s = x.shape();
    let d = s.last().copied().unwrap_or(0);
    if s.is_empty() || len == 0 || start + len > d {
        return Err(shape_err(OP, format!("cannot take {start}..{} of the last dim of {s:?}", start + len)));
    }
    let mut out = s.to_vec();
    *out.last_mut().unwrap() = len;
    let y = Tensor::empty(gpu, &out)?;
    elementwise(gpu, "slice_last", &params(y.numel(), d, len, start, 0, 0.0), x, &y)?;
    Ok(y)
}

/// diffusers' `get_timestep_embedding(timesteps, dim, flip_sin_to_cos, downscale_freq_shift,
/// max_period=max_period)` (scale 1): `[N, dim]`, `[sin, cos]` of `t · exp(-ln(max_period) ·
/// j / (dim/2 - shift))`, `[cos, sin]` when flipped, a zero column last for odd `dim`.
pub fn timestep_embedding(
    gpu: &Gpu,
    timesteps: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f32,
    max_period: f32,
) -> Result<Tensor> {
    const OP: &str = "timestep_embedding";
    let half = dim / 2;
    if timesteps.is_empty() || half == 0 || (half as f32 - downscale_freq_shift) == 0.0 {
        return Err(shape_err(
            OP,
            format!(
                "needs timesteps (got {}) and dim >= 2 with dim/2 != shift (dim {dim}, shift \
                 {downscale_freq_shift})",
                timesteps.len()
            ),
        ));
    }
    let t = Tensor::from_f32(gpu, &[timesteps.len()], timesteps)?;
    let y = Tensor::empty(gpu, &[timesteps.len(), dim])?;
    let f0 = (-(max_period as f64).ln() / (half as f64 - downscale_freq_shift as f64)) as f32;
    let p = params(y.numel(), dim, flip_sin_to_cos as usize, 0, 0, f0);
    elementwise(gpu, "timestep_embedding", &p, &t, &y)?;
    Ok(y)
}

/// `nn.Embedding`: rows `ids` of `table: [rows, D]` (stored f32 or f16), giving `[ids.len(), D]`
/// f32. Ids past the table are an error.
pub fn embedding(gpu: &Gpu, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    const OP: &str = "embedding";
    if table.rank() != 2 {
        return Err(shape_err(OP, format!("table must be [rows, D], got {:?}", table.shape())));
    }
    let (rows, d) = (table.dim(0), table.dim(1));
    let f16 = match table.dtype() {
        DType::F32 => false,
        DType::F16 => true,
        other => {
            return Err(crate::error::Error::DType {
                op: OP,
                message: format!("table {:?} must be stored f32 or f16, got {other}", table.shape()),
            })
        }
    };
    if ids.is_empty() || d == 0 {
        return Err(shape_err(OP, format!("needs ids (got {}) and a table with columns ({:?})", ids.len(), table.shape())));
    }
    if let Some((pos, &bad)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= rows) {
        return Err(shape_err(
            OP,
            format!("id {bad} at position {pos} is outside table {:?} ({rows} rows)", table.shape()),
        ));
    }
    let id_buf = gpu.upload(bytemuck::cast_slice(ids), "embedding ids")?;
    let y = Tensor::empty(gpu, &[ids.len(), d])?;
    gpu.dispatch(
        SHADER,
        "embedding",
        &Defines::new(),
        &params(y.numel(), d, f16 as usize, rows, 0, 0.0),
        &[(2, y.buffer()), (3, table.buffer()), (4, &id_buf)],
        gpu.grid(groups(y.numel(), WG)),
    )?;
    Ok(y)
}

/// Zero padding of `x: [B, C, H, W]` by `[top, bottom, left, right]` rows / columns
/// (`F.pad(x, (left, right, top, bottom))`), giving `[B, C, H + top + bottom, W + left + right]`.
pub fn pad2d(gpu: &Gpu, x: &Tensor, [top, bottom, left, right]: [usize; 4]) -> Result<Tensor> {
    const OP: &str = "pad2d";
    x.expect_f32(OP)?;
    let s = x.shape();
    if s.len() != 4 {
        return Err(shape_err(OP, format!("x must be [B, C, H, W], got {s:?}")));
    }
    let (h, w) = (s[2], s[3]);
    let (ho, wo) = (h + top + bottom, w + left + right);
    let y = Tensor::empty(gpu, &[s[0], s[1], ho, wo])?;
    let p = Params::new().u(y.numel()).u(w).u(h).u(wo).u(ho).f(0.0).u(top).u(left).0;
    elementwise(gpu, "pad2d", &p, x, &y)?;
    Ok(y)
}

/// CPU references.
pub mod reference {
    /// Zero padding of `[bc, h, w]` planes by `[top, bottom, left, right]`.
    pub fn pad2d(x: &[f32], bc: usize, h: usize, w: usize, [top, bottom, left, right]: [usize; 4]) -> Vec<f32> {
        let (ho, wo) = (h + top + bottom, w + left + right);
        let mut y = vec![0.0; bc * ho * wo];
        for p in 0..bc {
            for iy in 0..h {
                for ix in 0..w {
                    y[(p * ho + iy + top) * wo + ix + left] = x[(p * h + iy) * w + ix];
                }
            }
        }
        y
    }

    /// Rows `ids` of `table` (row length `d`).
    pub fn embedding(table: &[f32], d: usize, ids: &[u32]) -> Vec<f32> {
        ids.iter().flat_map(|&i| table[i as usize * d..(i as usize + 1) * d].to_vec()).collect()
    }

    pub fn upsample_nearest2x(x: &[f32], bc: usize, h: usize, w: usize) -> Vec<f32> {
        let mut y = Vec::with_capacity(x.len() * 4);
        for p in 0..bc {
            for oy in 0..2 * h {
                for ox in 0..2 * w {
                    y.push(x[(p * h + oy / 2) * w + ox / 2]);
                }
            }
        }
        y
    }

    /// Concatenation of `(data, shape)` pairs along `dim`.
    pub fn concat(parts: &[(&[f32], &[usize])], dim: usize) -> Vec<f32> {
        let outer: usize = parts[0].1[..dim].iter().product();
        let inner: usize = parts[0].1[dim + 1..].iter().product();
        let mut y = Vec::new();
        for o in 0..outer {
            for (data, shape) in parts {
                let run = shape[dim] * inner;
                y.extend_from_slice(&data[o * run..(o + 1) * run]);
            }
        }
        y
    }

    pub fn transpose_last2(x: &[f32], batch: usize, r: usize, c: usize) -> Vec<f32> {
        let mut y = vec![0.0; x.len()];
        for b in 0..batch {
            for i in 0..r {
                for j in 0..c {
                    y[b * r * c + j * r + i] = x[b * r * c + i * c + j];
                }
            }
        }
        y
    }

    pub fn slice_last(x: &[f32], d: usize, start: usize, len: usize) -> Vec<f32> {
        x.chunks(d).flat_map(|row| row[start..start + len].to_vec()).collect()
    }

    /// `get_timestep_embedding` in f64.
    pub fn timestep_embedding(t: &[f32], dim: usize, flip: bool, shift: f32, max_period: f32) -> Vec<f32> {
        let half = dim / 2;
        let mut y = Vec::with_capacity(t.len() * dim);
        for &tv in t {
            let args: Vec<f64> = (0..half)
                .map(|j| {
                    let e = -(max_period as f64).ln() * j as f64 / (half as f64 - shift as f64);
                    tv as f64 * e.exp()
                })
                .collect();
            let sin = args.iter().map(|a| a.sin() as f32);
            let cos = args.iter().map(|a| a.cos() as f32);
            if flip {
                y.extend(cos.chain(sin));
            } else {
                y.extend(sin.chain(cos));
            }
            if !dim.is_multiple_of(2) {
                y.push(0.0);
            }
        }
        y
    }
}
