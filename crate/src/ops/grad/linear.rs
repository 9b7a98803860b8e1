//! `nn.Linear` with a trainable LoRA on a frozen weight, forward and backward, on the matmul
//! kernels (`shaders/matmul.wgsl`) and [`super::optim::sum_partials`].
//!
//! Forward: `y = x·W₀ᵀ + b + s·(x·Aᵀ)·Bᵀ` for `x: [..., K]`, the frozen `W₀: [N, K]` in any
//! storage type (f32, f16, q8_0, q4_0, dequantized inside the kernel), `A: [R, K]`
//! (lora_down), `B: [N, R]` (lora_up), `s = alpha/rank · strength`. With `h = x·Aᵀ` and the
//! upstream gradient `dy: [..., N]`, `g = s·dy·B`:
//! - `dx = dy·W₀ + g·A` (W₀ read as stored, `[N, K]`, without a transpose: row `n` of the
//!   reduction is row `n` of the weight, so quantized blocks are read whole);
//! - `dA = gᵀ·x`, `dB = s·dyᵀ·h`: reductions over every row of the batch. Both are computed as
//!   `(small)ᵀ·(large)` products whose transposed operand is the narrow one (`g` or `h`,
//!   `[rows, R]`), split into chunks of rows that run in parallel and are then added in chunk
//!   order ([`transposed_product`]); `dB` comes out as `dBᵀ` and is transposed (`[R, N]`).

use super::optim::sum_partials;
use crate::error::{shape_err, Result};
use crate::gpu::Gpu;
use crate::ops::elementwise::{binary, Binary};
use crate::ops::gemm::Tiles;
use crate::ops::layout::transpose_last2;
use crate::ops::matmul::{linear, matmul, matmul_tiled, MatmulOpts};
use crate::tensor::Tensor;

/// A trainable LoRA on a linear layer: `down: [R, K]`, `up: [N, R]` (f32) and the scale
/// `s = alpha/rank · strength`.
#[derive(Clone, Copy)]
pub struct Lora<'a> {
    pub down: &'a Tensor,
    pub up: &'a Tensor,
    pub scale: f32,
}

/// Parameter gradients of a LoRA (`d_down` shaped like `down`, `d_up` like `up`) and, when
/// asked for, the input gradient.
pub struct LoraGrads {
    pub dx: Option<Tensor>,
    pub d_down: Tensor,
    pub d_up: Tensor,
}

/// Sizes of one call: rows (the product of the leading dims), K, N, R and the leading dims.
struct Dims {
    rows: usize,
    k: usize,
    n: usize,
    r: usize,
    lead: Vec<usize>,
}

fn dims(op: &'static str, x: &Tensor, w: &Tensor, lora: &Lora<'_>) -> Result<Dims> {
    x.expect_f32(op)?;
    lora.down.expect_f32(op)?;
    lora.up.expect_f32(op)?;
    if x.rank() < 1 || w.rank() != 2 || lora.down.rank() != 2 || lora.up.rank() != 2 {
        return Err(shape_err(
            op,
            format!(
                "needs x [..., K], W [N, K], down [R, K], up [N, R]; got x {:?}, W {:?}, down {:?}, up {:?}",
                x.shape(),
                w.shape(),
                lora.down.shape(),
                lora.up.shape()
            ),
        ));
    }
    let (n, k) = (w.dim(0), w.dim(1));
    let r = lora.down.dim(0);
    if x.dim(-1) != k || lora.down.dim(1) != k || lora.up.shape() != [n, r] {
        return Err(shape_err(
            op,
            format!(
                "x {:?}, W {:?}, down {:?} and up {:?} do not fit x [..., K], W [N, K], down [R, K], up [N, R]",
                x.shape(),
                w.shape(),
                lora.down.shape(),
                lora.up.shape()
            ),
        ));
    }
    let lead = x.shape()[..x.rank() - 1].to_vec();
    let rows: usize = lead.iter().product();
    if rows == 0 || r == 0 || n == 0 || k == 0 {
        let (xs, ws, ds) = (x.shape(), w.shape(), lora.down.shape());
        return Err(shape_err(op, format!("empty operand: x {xs:?}, W {ws:?}, down {ds:?}")));
    }
    Ok(Dims { rows, k, n, r, lead })
}

fn with_last(lead: &[usize], last: usize) -> Vec<usize> {
    let mut s = lead.to_vec();
    s.push(last);
    s
}

/// Forward: `(y, h)` with `y = x·W₀ᵀ + b + s·h·Bᵀ: [..., N]` and `h = x·Aᵀ: [..., R]` (kept for
/// [`lora_linear_backward`]).
pub fn lora_linear(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    lora: &Lora<'_>,
) -> Result<(Tensor, Tensor)> {
    dims("lora_linear", x, w, lora)?;
    let h = linear(gpu, x, lora.down, None)?;
    let base = linear(gpu, x, w, bias)?;
    let low = linear(gpu, &h, lora.up, None)?;
    let y = binary(gpu, &base, &low, Binary::AddScaled(lora.scale))?;
    Ok((y, h))
}

/// The input gradient of a frozen `nn.Linear`: `dx = dy·W₀` for `dy: [..., N]` and `W₀: [N, K]`
/// in any storage type; returns `[..., K]`.
pub fn linear_input_grad(gpu: &Gpu, dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    const OP: &str = "linear_input_grad";
    dy.expect_f32(OP)?;
    if dy.rank() < 1 || w.rank() != 2 || dy.dim(-1) != w.dim(0) {
        let (ds, ws) = (dy.shape(), w.shape());
        return Err(shape_err(OP, format!("needs dy [..., N] and W [N, K], got dy {ds:?}, W {ws:?}")));
    }
    let lead = &dy.shape()[..dy.rank() - 1];
    let rows: usize = lead.iter().product();
    let dx = matmul(gpu, &dy.reshape(&[rows, w.dim(0)])?, w, MatmulOpts::default())?;
    dx.reshape(&with_last(lead, w.dim(1)))
}

/// Backward of [`lora_linear`] from `dy: [..., N]`: the LoRA's gradients, and `dx` when
/// `want_dx`. `h` is the forward's `x·Aᵀ` (recomputed when `None`).
pub fn lora_linear_backward(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    lora: &Lora<'_>,
    h: Option<&Tensor>,
    dy: &Tensor,
    want_dx: bool,
) -> Result<LoraGrads> {
    const OP: &str = "lora_linear_backward";
    let d = dims(OP, x, w, lora)?;
    dy.expect_f32(OP)?;
    if dy.shape() != with_last(&d.lead, d.n) {
        return Err(shape_err(OP, format!("dy {:?} must be {:?}", dy.shape(), with_last(&d.lead, d.n))));
    }
    if let Some(h) = h {
        h.expect_f32(OP)?;
        if h.shape() != with_last(&d.lead, d.r) {
            return Err(shape_err(OP, format!("h {:?} must be {:?}", h.shape(), with_last(&d.lead, d.r))));
        }
    }
    let x2 = x.reshape(&[d.rows, d.k])?;
    let dy2 = dy.reshape(&[d.rows, d.n])?;
    let h2 = match h {
        Some(h) => h.reshape(&[d.rows, d.r])?,
        None => linear(gpu, &x2, lora.down, None)?,
    };
    // g = s·dy·B: [rows, R].
    let g = matmul(gpu, &dy2, lora.up, MatmulOpts { alpha: lora.scale, ..Default::default() })?;
    let dx = if want_dx {
        let base = matmul(gpu, &dy2, w, MatmulOpts::default())?;
        let low = matmul(gpu, &g, lora.down, MatmulOpts::default())?;
        Some(binary(gpu, &base, &low, Binary::Add)?.reshape(&with_last(&d.lead, d.k))?)
    } else {
        None
    };
    let d_down = transposed_product(gpu, &g, &x2, 1.0)?;
    let d_up_t = transposed_product(gpu, &h2, &dy2, lora.scale)?;
    let d_up = transpose_last2(gpu, &d_up_t)?;
    Ok(LoraGrads { dx, d_down, d_up })
}

/// Chunks of rows for a reduction of `rows` rows whose output has `tiles` workgroup tiles:
/// enough chunks for about 128 workgroups, each chunk at least 128 rows, at most 64 chunks, and
/// a divisor of `rows` (so every chunk has the same length).
pub fn row_chunks(rows: usize, tiles: usize) -> usize {
    let want = (128 / tiles.max(1)).clamp(1, 64).min(rows / 128).max(1);
    (1..=want).rev().find(|c| rows.is_multiple_of(*c)).unwrap_or(1)
}

/// `alpha·aᵀ·b` for `a: [rows, P]` (P small: a rank) and `b: [rows, Q]`, f32; returns
/// `[P, Q]`. The rows are split into equal chunks multiplied in parallel (one batched matmul
/// over the chunks, `a`'s chunks transposed), then the chunk products are added in chunk order.
pub fn transposed_product(gpu: &Gpu, a: &Tensor, b: &Tensor, alpha: f32) -> Result<Tensor> {
    const OP: &str = "transposed_product";
    a.expect_f32(OP)?;
    b.expect_f32(OP)?;
    if a.rank() != 2 || b.rank() != 2 || a.dim(0) != b.dim(0) {
        let (sa, sb) = (a.shape(), b.shape());
        return Err(shape_err(OP, format!("needs a [rows, P] and b [rows, Q], got {sa:?} and {sb:?}")));
    }
    let (rows, p, q) = (a.dim(0), a.dim(1), b.dim(1));
    // At least 16 rows per tile: Mesa 22.3's lavapipe leaks about 1 MB of host memory per
    // dispatch of the 8-row matmul variant (BM = 8), which a training run dispatches twice per
    // adapter per micro-batch.
    let tiles = Tiles::choose(gpu.caps(), p.max(16));
    let chunks = row_chunks(rows, p.div_ceil(tiles.bm) * q.div_ceil(tiles.bn));
    let len = rows / chunks;
    let at = transpose_last2(gpu, &a.reshape(&[chunks, len, p])?)?;
    let bt = b.reshape(&[chunks, len, q])?;
    let part = matmul_tiled(gpu, &at, &bt, MatmulOpts { alpha, ..Default::default() }, tiles)?;
    sum_partials(gpu, &part)
}

/// CPU references in f64 (row-major slices; `W₀` already dequantized).
pub mod reference {
    /// `(rows, K, N, R)`.
    pub type Dims = (usize, usize, usize, usize);

    /// `y = x·W₀ᵀ + b + s·h·Bᵀ` and `h = x·Aᵀ` for `x: [rows, K]`, `w: [N, K]`, `down: [R, K]`,
    /// `up: [N, R]`; returns `(y [rows, N], h [rows, R])`.
    pub fn forward(
        x: &[f64],
        w: &[f64],
        bias: Option<&[f64]>,
        down: &[f64],
        up: &[f64],
        scale: f64,
        (rows, k, n, r): Dims,
    ) -> (Vec<f64>, Vec<f64>) {
        let mut h = vec![0.0; rows * r];
        for i in 0..rows {
            for j in 0..r {
                h[i * r + j] = (0..k).map(|l| x[i * k + l] * down[j * k + l]).sum();
            }
        }
        let mut y = vec![0.0; rows * n];
        for i in 0..rows {
            for o in 0..n {
                let base: f64 = (0..k).map(|l| x[i * k + l] * w[o * k + l]).sum();
                let low: f64 = (0..r).map(|j| h[i * r + j] * up[o * r + j]).sum();
                y[i * n + o] = base + bias.map_or(0.0, |b| b[o]) + scale * low;
            }
        }
        (y, h)
    }

    /// `dx = dy·W₀` of a frozen linear layer: `dy: [rows, N]`, `w: [N, K]`; returns `[rows, K]`.
    pub fn input_grad(dy: &[f64], w: &[f64], rows: usize, k: usize, n: usize) -> Vec<f64> {
        let mut dx = vec![0.0; rows * k];
        for i in 0..rows {
            for l in 0..k {
                dx[i * k + l] = (0..n).map(|o| dy[i * n + o] * w[o * k + l]).sum();
            }
        }
        dx
    }

    /// Gradients of [`forward`] from `dy: [rows, N]`: `(dx [rows, K], d_down [R, K], d_up [N, R])`.
    pub fn backward(
        x: &[f64],
        w: &[f64],
        down: &[f64],
        up: &[f64],
        scale: f64,
        dy: &[f64],
        (rows, k, n, r): Dims,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (_, h) = forward(x, w, None, down, up, scale, (rows, k, n, r));
        // g = s·dy·B: [rows, R].
        let mut g = vec![0.0; rows * r];
        for i in 0..rows {
            for j in 0..r {
                g[i * r + j] = scale * (0..n).map(|o| dy[i * n + o] * up[o * r + j]).sum::<f64>();
            }
        }
        let mut dx = input_grad(dy, w, rows, k, n);
        for i in 0..rows {
            for l in 0..k {
                dx[i * k + l] += (0..r).map(|j| g[i * r + j] * down[j * k + l]).sum::<f64>();
            }
        }
        let mut d_down = vec![0.0; r * k];
        for j in 0..r {
            for l in 0..k {
                d_down[j * k + l] = (0..rows).map(|i| g[i * r + j] * x[i * k + l]).sum();
            }
        }
        let mut d_up = vec![0.0; n * r];
        for o in 0..n {
            for j in 0..r {
                d_up[o * r + j] = scale * (0..rows).map(|i| dy[i * n + o] * h[i * r + j]).sum::<f64>();
            }
        }
        (dx, d_down, d_up)
    }
}
