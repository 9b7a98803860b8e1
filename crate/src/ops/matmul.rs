//! Tiled matmul / linear with bias on f32, f16, q8_0 and q4_0 weights (`shaders/matmul.wgsl`).
//!
//! `matmul` computes `C = alpha·A·op(B) + bias` for `A: [batch..., M, K]` (f32) and `B` either a
//! weight matrix shared by every batch (any storage type, stored `[K, N]`, or `[N, K]` with
//! `trans_b`) or an f32 tensor with the same leading batch dimensions as `A`. `linear` is
//! PyTorch's `nn.Linear`: `y = x·Wᵀ + b` with `W: [N, K]`. Weights are dequantized while the
//! kernel stages them in workgroup memory; there is no separate dequantization pass.

use super::adapter::Operands;
use super::{groups, Params};
use crate::error::{shape_err, Error, Result};
use crate::gpu::Gpu;
use crate::quant::DType;
use crate::shader::{weight_defines, ShaderSource, WEIGHT_AXIS};
use crate::tensor::Tensor;

const SHADER: &str = "matmul.wgsl";

pub static SHADERS: &[ShaderSource] = &[ShaderSource {
    name: SHADER,
    source: crate::wgsl!("matmul.wgsl"),
    flag_axes: &[WEIGHT_AXIS, &["", "TRANS_B"], &["", "BIAS"], &["", "A_VEC4"], &["", "ADAPTER", "ADAPTER+ADAPTER_W"]],
    values: &[("BM", "64u"), ("BN", "64u"), ("KT", "32u")],
    entries: &["matmul"],
    top_level: true,
}];

pub use super::gemm::Tiles;

/// Options of [`matmul`].
#[derive(Clone, Copy, Debug)]
pub struct MatmulOpts<'a> {
    /// `B` is stored `[N, K]` (and used transposed) instead of `[K, N]`.
    pub trans_b: bool,
    /// `[N]` f32, added after scaling.
    pub bias: Option<&'a Tensor>,
    /// Scale applied to `A·op(B)`.
    pub alpha: f32,
}

impl Default for MatmulOpts<'_> {
    fn default() -> Self {
        Self { trans_b: false, bias: None, alpha: 1.0 }
    }
}

/// `C = alpha·A·op(B) + bias`, with tiles chosen from the device's limits and N.
pub fn matmul(gpu: &Gpu, a: &Tensor, b: &Tensor, opts: MatmulOpts<'_>) -> Result<Tensor> {
    // N (a malformed B is reported by the shape checks).
    let n = match b.rank() {
        r if r >= 2 && opts.trans_b => b.dim(-2),
        r if r >= 2 => b.dim(-1),
        _ => usize::MAX,
    };
    matmul_tiled(gpu, a, b, opts, Tiles::for_columns(gpu.caps(), n))
}

/// [`matmul`] with explicit tiles (tests use it to exercise the small-device variants).
pub fn matmul_tiled(
    gpu: &Gpu,
    a: &Tensor,
    b: &Tensor,
    opts: MatmulOpts<'_>,
    tiles: Tiles,
) -> Result<Tensor> {
    matmul_inner(gpu, a, b, opts, tiles, None)
}

/// `y = x·W'ᵀ + b'` for a weight `W₀ [N, K]` with unmerged adapters (`ops::adapter`): the
/// kernel applies the adapter terms while staging W₀ and adds the low-rank part from
/// `ad.lowrank` (`[..., R]`, the stacked down projections of `x`).
pub fn linear_adapted(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    ad: &Operands<'_>,
) -> Result<Tensor> {
    let (rows, k, n, lead) = linear_dims(x, w)?;
    let x2 = x.reshape(&[rows, k])?;
    // The activations come as [..., R] like x.
    let t2 = match ad.lowrank {
        Some(t) => Some(t.reshape(&[t.numel() / t.dim(-1).max(1), t.dim(-1)])?),
        None => None,
    };
    let ad2 = Operands { data: ad.data, params: ad.params, lowrank: t2.as_ref() };
    let y = matmul_inner(
        gpu,
        &x2,
        w,
        MatmulOpts { trans_b: true, bias, alpha: 1.0 },
        Tiles::for_columns(gpu.caps(), n),
        Some(&ad2),
    )?;
    let mut shape = lead;
    shape.push(n);
    y.reshape(&shape)
}

fn matmul_inner(
    gpu: &Gpu,
    a: &Tensor,
    b: &Tensor,
    opts: MatmulOpts<'_>,
    tiles: Tiles,
    adapter: Option<&Operands<'_>>,
) -> Result<Tensor> {
    const OP: &str = "matmul";
    a.expect_f32(OP)?;
    let ra = a.rank();
    if ra < 2 {
        return Err(shape_err(OP, format!("A must be [..., M, K], got {:?}", a.shape())));
    }
    let (m, k) = (a.dim(-2), a.dim(-1));
    let lead = &a.shape()[..ra - 2];
    let batch: usize = lead.iter().product();
    let rb = b.rank();
    if rb < 2 {
        return Err(shape_err(OP, format!("B must be a matrix, got {:?} (A {:?})", b.shape(), a.shape())));
    }
    let (rows_b, cols_b) = (b.dim(-2), b.dim(-1));
    // Rows of B per batch (0 when shared).
    let b_rows = if rb == 2 {
        0
    } else {
        if b.dtype() != DType::F32 {
            return Err(Error::DType {
                op: OP,
                message: format!("a batched B {:?} must be f32, got {}", b.shape(), b.dtype()),
            });
        }
        if rb != ra || &b.shape()[..rb - 2] != lead {
            return Err(shape_err(
                OP,
                format!("batched B {:?} must have A's batch dimensions (A {:?})", b.shape(), a.shape()),
            ));
        }
        rows_b
    };
    let (bk, n) = if opts.trans_b { (cols_b, rows_b) } else { (rows_b, cols_b) };
    if bk != k {
        let want = if opts.trans_b { "[N, K]" } else { "[K, N]" };
        return Err(shape_err(
            OP,
            format!("A {:?} (K = {k}) does not fit B {:?} stored as {want}", a.shape(), b.shape()),
        ));
    }
    if let Some(bias) = opts.bias {
        bias.expect_f32(OP)?;
        if bias.shape() != [n] {
            return Err(shape_err(OP, format!("bias {:?} must be [{n}] for B {:?}", bias.shape(), b.shape())));
        }
    }
    if !tiles.fits(gpu.caps()) {
        return Err(Error::Invalid(format!("matmul tiles {tiles:?} are not supported on this device")));
    }
    let limit = u32::MAX as usize;
    if batch * m * n >= limit || a.numel() >= limit || b.numel() >= limit {
        return Err(shape_err(OP, format!("A {:?} × B {:?} exceeds 2^32 elements", a.shape(), b.shape())));
    }

    if let Some(ad) = adapter {
        if b_rows != 0 {
            return Err(shape_err(OP, "adapters apply to a weight matrix, not a batched B".to_string()));
        }
        ad.check(OP, batch * m, n)?;
    }

    let mut out_shape = lead.to_vec();
    out_shape.extend([m, n]);
    let c = Tensor::empty(gpu, &out_shape)?;
    let defines = weight_defines(
        tiles
            .defines()
            .flag_if("TRANS_B", opts.trans_b)
            .flag_if("BIAS", opts.bias.is_some())
            .flag_if("A_VEC4", k % 4 == 0)
            .flag_if("ADAPTER", adapter.is_some())
            .flag_if("ADAPTER_W", adapter.is_some_and(|a| a.adapts_weight())),
        b.dtype(),
    );
    let tiles_n = n.div_ceil(tiles.bn);
    let tiles_m = m.div_ceil(tiles.bm);
    let mut params = Params::new()
        .u(m)
        .u(n)
        .u(k)
        .u(batch)
        .u(tiles_n)
        .u(tiles_m)
        .u(b_rows)
        .f(opts.alpha);
    let mut binds = vec![(1, a.buffer()), (2, b.buffer())];
    if let Some(s) = b.scales() {
        binds.push((3, s));
    }
    if let Some(bias) = opts.bias {
        binds.push((4, bias.buffer()));
    }
    binds.push((5, c.buffer()));
    if let Some(ad) = adapter {
        params = ad.append(params);
        ad.bind(&mut binds);
    }
    let workgroups = tiles_n * tiles_m * batch;
    gpu.dispatch(SHADER, "matmul", &defines, &params.0, &binds, gpu.grid(groups(workgroups, 1)))?;
    Ok(c)
}

/// PyTorch's `nn.Linear`: `y = x·Wᵀ + b` for `x: [..., K]` (f32), `w: [N, K]` (any storage
/// type), `bias: [N]` (f32); `y: [..., N]`.
pub fn linear(gpu: &Gpu, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (rows, k, n, mut shape) = linear_dims(x, w)?;
    let y = matmul(gpu, &x.reshape(&[rows, k])?, w, MatmulOpts { trans_b: true, bias, alpha: 1.0 })?;
    shape.push(n);
    y.reshape(&shape)
}

/// (rows, K, N, leading dims) of `x [..., K]` times `w [N, K]`ᵀ.
fn linear_dims(x: &Tensor, w: &Tensor) -> Result<(usize, usize, usize, Vec<usize>)> {
    const OP: &str = "linear";
    x.expect_f32(OP)?;
    if x.rank() < 1 || w.rank() != 2 {
        return Err(shape_err(OP, format!("needs x [..., K] and w [N, K], got x {:?}, w {:?}", x.shape(), w.shape())));
    }
    let (n, k) = (w.dim(0), w.dim(1));
    if x.dim(-1) != k {
        return Err(shape_err(OP, format!("x {:?} has K = {} but w {:?} has K = {k}", x.shape(), x.dim(-1), w.shape())));
    }
    let lead = x.shape()[..x.rank() - 1].to_vec();
    let rows: usize = lead.iter().product();
    Ok((rows, k, n, lead))
}

/// CPU references with f64 accumulation, on f32 (already dequantized) operands.
pub mod reference {
    /// `C = alpha·A·op(B) + bias` for `A: [batch, M, K]`; `b` holds one matrix (shared) or
    /// `batch` matrices (`b_batched`), each `[K, N]`, or `[N, K]` with `trans_b`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        a: &[f32],
        b: &[f32],
        bias: Option<&[f32]>,
        (batch, m, k, n): (usize, usize, usize, usize),
        trans_b: bool,
        b_batched: bool,
        alpha: f32,
    ) -> Vec<f32> {
        let mut c = vec![0f32; batch * m * n];
        for bt in 0..batch {
            let ab = &a[bt * m * k..];
            let bb = if b_batched { &b[bt * k * n..] } else { b };
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0f64;
                    for l in 0..k {
                        let w = if trans_b { bb[j * k + l] } else { bb[l * n + j] };
                        s += ab[i * k + l] as f64 * w as f64;
                    }
                    s *= alpha as f64;
                    if let Some(bias) = bias {
                        s += bias[j] as f64;
                    }
                    c[(bt * m + i) * n + j] = s as f32;
                }
            }
        }
        c
    }

    /// `y = x·Wᵀ + b` for `x: [rows, K]`, `w: [N, K]`.
    pub fn linear(x: &[f32], w: &[f32], bias: Option<&[f32]>, rows: usize, k: usize, n: usize) -> Vec<f32> {
        matmul(x, w, bias, (1, rows, k, n), true, false, 1.0)
    }
}
