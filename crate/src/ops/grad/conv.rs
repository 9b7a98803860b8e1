//! Backward of `nn.Conv2d` on a frozen weight of any storage type, with a trainable LoCon
//! adapter (`shaders/grad_conv2d.wgsl`).
//!
//! Forward: `y = conv(x, W₀) + b + s·conv1x1(t, up)`, `t = conv(x, down)` with `down:
//! [R, Cin, kh, kw]` (the base's kernel, stride and padding), `up: [Cout, R, 1, 1]`,
//! `s = alpha/rank · strength`. From `dy: [B, Cout, Ho, Wo]`, with `g = s·conv1x1(dy, upᵀ)`
//! (`[B, R, Ho, Wo]`, the gradient at `t`):
//! - `dx = convᵀ(dy, W₀) + convᵀ(g, down)`: one gathering kernel (no atomics), the low-rank
//!   term as more reduction steps of the same GEMM;
//! - `d_down = Σ_pixels g ⊗ im2col(x)`, `d_up = s·Σ_pixels dy ⊗ t`: one weight-gradient kernel
//!   that splits the pixels into chunks summed in parallel, then added in chunk order
//!   ([`super::optim::sum_partials`]).

use super::optim::sum_partials;
use crate::error::{shape_err, Error, Result};
use crate::gpu::{Bind, Gpu};
use crate::ops::conv::{conv2d, out_size, Conv2dParams};
use crate::ops::elementwise::{binary, scale, Binary};
use crate::ops::gemm::Tiles;
use crate::ops::layout::transpose_last2;
use crate::ops::Params;
use crate::quant::DType;
use crate::shader::{self, Defines, ShaderSource, WEIGHT_AXIS};
use crate::tensor::Tensor;

const SHADER: &str = "grad_conv2d.wgsl";

pub static SHADERS: &[ShaderSource] = &[ShaderSource {
    name: SHADER,
    source: crate::wgsl!("grad_conv2d.wgsl"),
    flag_axes: &[WEIGHT_AXIS, &["", "LOWRANK"]],
    values: &[("BM", "64u"), ("BN", "64u"), ("KT", "32u"), ("KH", "3u"), ("KW", "3u")],
    entries: &["conv2d_input_grad", "conv2d_weight_grad"],
    top_level: true,
}];

/// Most bytes of per-chunk partial weight gradients kept at once.
const PARTIAL_BYTES: usize = 64 << 20;

/// A trainable LoCon adapter on a convolution: `down: [R, Cin, kh, kw]`, `up: [Cout, R, 1, 1]`
/// (f32) and the scale `s = alpha/rank · strength`.
#[derive(Clone, Copy)]
pub struct Locon<'a> {
    pub down: &'a Tensor,
    pub up: &'a Tensor,
    pub scale: f32,
}

/// Parameter gradients of a LoCon adapter (shaped like `down` and `up`) and, when asked for,
/// the input gradient.
pub struct LoconGrads {
    pub dx: Option<Tensor>,
    pub d_down: Tensor,
    pub d_up: Tensor,
}

/// Geometry of one convolution: `[B, Cin, H, W]` in, `[Cout, Cin, kh, kw]` weight,
/// `[B, Cout, Ho, Wo]` out.
#[derive(Clone, Copy, Debug)]
struct Geom {
    b: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    p: Conv2dParams,
}

impl Geom {
    fn new(op: &'static str, x: [usize; 4], w: &[usize], p: Conv2dParams) -> Result<Geom> {
        let [b, cin, h, wd] = x;
        let (cout, kh, kw) = match *w {
            [co, ci, kh, kw] if ci == cin => (co, kh, kw),
            _ => {
                return Err(shape_err(op, format!("weight {w:?} must be [Cout, {cin}, kh, kw] for input {x:?}")));
            }
        };
        let (ho, wo) = out_size(h, wd, kh, kw, p).ok_or_else(|| {
            let (pad, stride) = (p.padding, p.stride);
            shape_err(op, format!("kernel {kh}x{kw} does not fit input {x:?} with padding {pad} and stride {stride}"))
        })?;
        if [b, cin, cout, ho, wo].contains(&0) {
            return Err(shape_err(op, format!("empty operand: input {x:?}, weight {w:?}")));
        }
        Ok(Geom { b, cin, h, w: wd, cout, kh, kw, ho, wo, p })
    }

    fn out_shape(&self) -> [usize; 4] {
        [self.b, self.cout, self.ho, self.wo]
    }

    /// The uniform (see `Params` in the shader).
    fn params(&self, m_tiles: usize, n_tiles: usize, rank: usize, chunk: usize, chunks: usize, alpha: f32) -> Vec<u32> {
        Params::new()
            .u(self.cin)
            .u(self.h)
            .u(self.w)
            .u(self.cout)
            .u(self.ho)
            .u(self.wo)
            .u(self.p.stride)
            .u(self.p.padding)
            .u(self.b)
            .u(m_tiles)
            .u(n_tiles)
            .u(rank)
            .u(chunk)
            .u(chunks)
            .f(alpha)
            .0
    }

    fn defines(&self, tiles: Tiles) -> Defines {
        tiles.defines().value("KH", format!("{}u", self.kh)).value("KW", format!("{}u", self.kw))
    }
}

fn shape4(op: &'static str, what: &str, t: &Tensor) -> Result<[usize; 4]> {
    t.expect_f32(op)?;
    <[usize; 4]>::try_from(t.shape()).map_err(|_| shape_err(op, format!("{what} {:?} must be [B, C, H, W]", t.shape())))
}

fn checked_tiles(gpu: &Gpu, tiles: Tiles) -> Result<Tiles> {
    if !tiles.fits(gpu.caps()) {
        return Err(Error::Invalid(format!("conv2d backward: tiling {tiles:?} is not usable on this device")));
    }
    Ok(tiles)
}

fn workgroups(op: &'static str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| shape_err(op, format!("needs {n} workgroups, more than a dispatch can address")))
}

/// `dx` of a convolution: `convᵀ(dy, W₀)` (+ `convᵀ(g, down)` with `lowrank = Some((down, g))`).
fn input_grad(
    gpu: &Gpu,
    g: &Geom,
    dy: &Tensor,
    w: &Tensor,
    lowrank: Option<(&Tensor, &Tensor)>,
    tiles: Option<Tiles>,
) -> Result<Tensor> {
    const OP: &str = "conv2d_input_grad";
    let tiles = checked_tiles(gpu, tiles.unwrap_or_else(|| Tiles::choose(gpu.caps(), g.cin)))?;
    let m_tiles = g.cin.div_ceil(tiles.bm);
    let n_tiles = (g.b * g.h * g.w).div_ceil(tiles.bn);
    let dx = Tensor::empty(gpu, &[g.b, g.cin, g.h, g.w])?;
    let rank = lowrank.map_or(0, |(down, _)| down.dim(0));
    let defines = shader::weight_defines(g.defines(tiles), w.dtype()).flag_if("LOWRANK", lowrank.is_some());
    let mut binds: Vec<Bind<'_>> = vec![(1, dy.buffer()), (2, w.buffer())];
    if let Some(s) = w.scales() {
        binds.push((3, s));
    }
    binds.push((4, dx.buffer()));
    if let Some((down, gt)) = lowrank {
        binds.push((5, down.buffer()));
        binds.push((6, gt.buffer()));
    }
    let groups = workgroups(OP, m_tiles * n_tiles)?;
    gpu.dispatch(SHADER, OP, &defines, &g.params(m_tiles, n_tiles, rank, 0, 0, 0.0), &binds, gpu.grid(groups))?;
    Ok(dx)
}

/// `alpha · Σ_{b, oy, ox} dy ⊗ im2col(x)`: `[Cout, Cin·kh·kw]`.
fn weight_grad(gpu: &Gpu, g: &Geom, dy: &Tensor, x: &Tensor, alpha: f32, tiles: Option<Tiles>) -> Result<Tensor> {
    const OP: &str = "conv2d_weight_grad";
    let tiles = checked_tiles(gpu, tiles.unwrap_or_else(|| Tiles::choose(gpu.caps(), g.cout)))?;
    let k = g.cin * g.kh * g.kw;
    let m_tiles = g.cout.div_ceil(tiles.bm);
    let n_tiles = k.div_ceil(tiles.bn);
    let (chunk, chunks) = pixel_chunks(g.b * g.ho * g.wo, m_tiles * n_tiles, g.cout * k, tiles.kt);
    let part = Tensor::empty(gpu, &[chunks, g.cout, k])?;
    let defines = g.defines(tiles).flag("W_F32");
    let binds: Vec<Bind<'_>> = vec![(1, dy.buffer()), (7, x.buffer()), (8, part.buffer())];
    let groups = workgroups(OP, m_tiles * n_tiles * chunks)?;
    gpu.dispatch(SHADER, OP, &defines, &g.params(m_tiles, n_tiles, 0, chunk, chunks, alpha), &binds, gpu.grid(groups))?;
    sum_partials(gpu, &part)?.reshape(&[g.cout, g.cin, g.kh, g.kw])
}

/// `(chunk, chunks)` for a reduction over `pixels` output pixels whose result has `tiles`
/// workgroup tiles of `out` values in all: enough chunks for about 128 workgroups, each at
/// least 4 slices of `kt` pixels, at most 64, and partial results within [`PARTIAL_BYTES`].
pub fn pixel_chunks(pixels: usize, tiles: usize, out: usize, kt: usize) -> (usize, usize) {
    let by_memory = (PARTIAL_BYTES / (4 * out.max(1))).max(1);
    let want = (128 / tiles.max(1)).clamp(1, 64).min(by_memory).min(pixels / (4 * kt)).max(1);
    let chunk = pixels.div_ceil(want).next_multiple_of(kt);
    (chunk, pixels.div_ceil(chunk))
}

/// The input gradient of a frozen convolution: `dx = convᵀ(dy, W₀)` for `dy: [B, Cout, Ho, Wo]`,
/// `w: [Cout, Cin, kh, kw]` in any storage type and the input's `[H, W]` (a stride-2
/// convolution's output does not determine it); returns `[B, Cin, H, W]`.
pub fn conv2d_input_grad(gpu: &Gpu, dy: &Tensor, w: &Tensor, input_hw: [usize; 2], p: Conv2dParams) -> Result<Tensor> {
    conv2d_input_grad_with(gpu, dy, w, input_hw, p, None)
}

/// [`conv2d_input_grad`] with explicit tiles (`None`: chosen from the device and `Cin`), for
/// tests of the small-device variants.
pub fn conv2d_input_grad_with(
    gpu: &Gpu,
    dy: &Tensor,
    w: &Tensor,
    input_hw: [usize; 2],
    p: Conv2dParams,
    tiles: Option<Tiles>,
) -> Result<Tensor> {
    const OP: &str = "conv2d_input_grad";
    let ds = shape4(OP, "dy", dy)?;
    let cin = w.shape().get(1).copied().unwrap_or(0);
    let g = Geom::new(OP, [ds[0], cin, input_hw[0], input_hw[1]], w.shape(), p)?;
    if ds != g.out_shape() {
        return Err(shape_err(OP, format!("dy {ds:?} must be {:?} for weight {:?}", g.out_shape(), w.shape())));
    }
    input_grad(gpu, &g, dy, w, None, tiles)
}

/// The weight gradient of a convolution: `alpha · Σ_{b, oy, ox} dy[b, co, oy, ox] ·
/// x[b, ci, oy·s + ky − pad, ox·s + kx − pad]` for `x: [B, Cin, H, W]`, `dy: [B, Cout, Ho, Wo]`
/// and the kernel size `[kh, kw]`; returns `[Cout, Cin, kh, kw]`.
pub fn conv2d_weight_grad(
    gpu: &Gpu,
    dy: &Tensor,
    x: &Tensor,
    kernel: [usize; 2],
    p: Conv2dParams,
    alpha: f32,
) -> Result<Tensor> {
    conv2d_weight_grad_with(gpu, dy, x, kernel, p, alpha, None)
}

/// [`conv2d_weight_grad`] with explicit tiles (`None`: chosen from the device and `Cout`).
pub fn conv2d_weight_grad_with(
    gpu: &Gpu,
    dy: &Tensor,
    x: &Tensor,
    kernel: [usize; 2],
    p: Conv2dParams,
    alpha: f32,
    tiles: Option<Tiles>,
) -> Result<Tensor> {
    const OP: &str = "conv2d_weight_grad";
    let xs = shape4(OP, "x", x)?;
    let ds = shape4(OP, "dy", dy)?;
    let g = Geom::new(OP, xs, &[ds[1], xs[1], kernel[0], kernel[1]], p)?;
    if ds != g.out_shape() {
        return Err(shape_err(OP, format!("dy {ds:?} must be {:?} for x {xs:?} and kernel {kernel:?}", g.out_shape())));
    }
    weight_grad(gpu, &g, dy, x, alpha, tiles)
}

/// Checks a LoCon against the base convolution; returns the geometry and R.
fn check_locon(op: &'static str, x: &Tensor, w: &Tensor, p: Conv2dParams, lora: &Locon<'_>) -> Result<(Geom, usize)> {
    let xs = shape4(op, "x", x)?;
    let g = Geom::new(op, xs, w.shape(), p)?;
    for (what, t) in [("down", lora.down), ("up", lora.up)] {
        if t.dtype() != DType::F32 {
            return Err(Error::DType { op, message: format!("LoCon {what} must be f32, got {}", t.dtype()) });
        }
    }
    let r = lora.down.shape().first().copied().unwrap_or(0);
    if r == 0 || lora.down.shape() != [r, g.cin, g.kh, g.kw] || lora.up.shape() != [g.cout, r, 1, 1] {
        return Err(shape_err(
            op,
            format!(
                "LoCon down {:?} / up {:?} must be [R, {}, {}, {}] / [{}, R, 1, 1] for weight {:?}",
                lora.down.shape(),
                lora.up.shape(),
                g.cin,
                g.kh,
                g.kw,
                g.cout,
                w.shape()
            ),
        ));
    }
    Ok((g, r))
}

/// Forward: `(y, t)` with `y = conv(x, W₀) + b + s·conv1x1(t, up)` and `t = conv(x, down)`
/// (`[B, R, Ho, Wo]`, kept for [`locon_conv2d_backward`]).
pub fn locon_conv2d(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
    lora: &Locon<'_>,
) -> Result<(Tensor, Tensor)> {
    check_locon("locon_conv2d", x, w, p, lora)?;
    let t = conv2d(gpu, x, lora.down, None, p)?;
    let base = conv2d(gpu, x, w, bias, p)?;
    let low = conv2d(gpu, &t, lora.up, None, Conv2dParams { stride: 1, padding: 0 })?;
    Ok((binary(gpu, &base, &low, Binary::AddScaled(lora.scale))?, t))
}

/// Backward of [`locon_conv2d`] from `dy: [B, Cout, Ho, Wo]`: the adapter's gradients, and
/// `dx` when `want_dx`. `t` is the forward's `conv(x, down)` (recomputed when `None`).
#[allow(clippy::too_many_arguments)]
pub fn locon_conv2d_backward(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    p: Conv2dParams,
    lora: &Locon<'_>,
    t: Option<&Tensor>,
    dy: &Tensor,
    want_dx: bool,
) -> Result<LoconGrads> {
    const OP: &str = "locon_conv2d_backward";
    let (g, r) = check_locon(OP, x, w, p, lora)?;
    let ds = shape4(OP, "dy", dy)?;
    if ds != g.out_shape() {
        return Err(shape_err(OP, format!("dy {ds:?} must be {:?}", g.out_shape())));
    }
    let low_shape = [g.b, r, g.ho, g.wo];
    let t = match t {
        Some(t) => {
            if shape4(OP, "t", t)? != low_shape {
                return Err(shape_err(OP, format!("t {:?} must be {low_shape:?}", t.shape())));
            }
            t.clone()
        }
        None => conv2d(gpu, x, lora.down, None, p)?,
    };
    // g = s·conv1x1(dy, upᵀ): the gradient at t.
    let up_t = transpose_last2(gpu, &lora.up.reshape(&[g.cout, r])?)?;
    let up_t = scale(gpu, &up_t, lora.scale)?.reshape(&[r, g.cout, 1, 1])?;
    let pointwise = Conv2dParams { stride: 1, padding: 0 };
    let grad_t = conv2d(gpu, dy, &up_t, None, pointwise)?;
    let dx = if want_dx { Some(input_grad(gpu, &g, dy, w, Some((lora.down, &grad_t)), None)?) } else { None };
    let d_down = weight_grad(gpu, &Geom { cout: r, ..g }, &grad_t, x, 1.0, None)?;
    let up_geom = Geom::new(OP, low_shape, &[g.cout, r, 1, 1], pointwise)?;
    let d_up = weight_grad(gpu, &up_geom, dy, &t, lora.scale, None)?;
    Ok(LoconGrads { dx, d_down, d_up })
}

/// CPU references in f64 (row-major slices; weights already dequantized).
pub mod reference {
    use crate::ops::conv::{out_size, Conv2dParams};

    /// `[B, Cin, H, W]` input, `[Cout, kh, kw]` kernel.
    pub type Dims = ([usize; 4], [usize; 3]);

    /// `(b, cin, h, w, cout, kh, kw, ho, wo)`.
    type Geom = (usize, usize, usize, usize, usize, usize, usize, usize, usize);

    fn geom(([b, cin, h, w], [cout, kh, kw]): Dims, p: Conv2dParams) -> Geom {
        let (ho, wo) = out_size(h, w, kh, kw, p).expect("reference: kernel does not fit");
        (b, cin, h, w, cout, kh, kw, ho, wo)
    }

    /// Calls `f(xi, wi, yi)` for every (input, weight, output) element triple of the convolution.
    fn each_tap(d: Dims, p: Conv2dParams, mut f: impl FnMut(usize, usize, usize)) {
        let (b, cin, h, w, cout, kh, kw, ho, wo) = geom(d, p);
        for bi in 0..b {
            for co in 0..cout {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let yi = ((bi * cout + co) * ho + oy) * wo + ox;
                        for ci in 0..cin {
                            for ky in 0..kh {
                                let iy = (oy * p.stride + ky) as isize - p.padding as isize;
                                if iy < 0 || iy >= h as isize {
                                    continue;
                                }
                                for kx in 0..kw {
                                    let ix = (ox * p.stride + kx) as isize - p.padding as isize;
                                    if ix < 0 || ix >= w as isize {
                                        continue;
                                    }
                                    let xi = ((bi * cin + ci) * h + iy as usize) * w + ix as usize;
                                    let wi = ((co * cin + ci) * kh + ky) * kw + kx;
                                    f(xi, wi, yi);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// `conv(x, w)`: `[B, Cout, Ho, Wo]`.
    pub fn conv(x: &[f64], w: &[f64], d: Dims, p: Conv2dParams) -> Vec<f64> {
        let (b, _, _, _, cout, _, _, ho, wo) = geom(d, p);
        let mut y = vec![0.0; b * cout * ho * wo];
        each_tap(d, p, |xi, wi, yi| y[yi] += x[xi] * w[wi]);
        y
    }

    /// `dx = convᵀ(dy, w)`: `[B, Cin, H, W]`.
    pub fn input_grad(dy: &[f64], w: &[f64], d: Dims, p: Conv2dParams) -> Vec<f64> {
        let mut dx = vec![0.0; d.0.iter().product()];
        each_tap(d, p, |xi, wi, yi| dx[xi] += dy[yi] * w[wi]);
        dx
    }

    /// `dW = Σ dy ⊗ im2col(x)`: `[Cout, Cin, kh, kw]`.
    pub fn weight_grad(dy: &[f64], x: &[f64], d: Dims, p: Conv2dParams) -> Vec<f64> {
        let [cout, kh, kw] = d.1;
        let mut dw = vec![0.0; cout * d.0[1] * kh * kw];
        each_tap(d, p, |xi, wi, yi| dw[wi] += dy[yi] * x[xi]);
        dw
    }

    /// `(y, t)`: `y = conv(x, w) + b + s·conv1x1(t, up)`, `t = conv(x, down)` with `down:
    /// [R, Cin, kh, kw]`, `up: [Cout, R]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        x: &[f64],
        w: &[f64],
        bias: Option<&[f64]>,
        down: &[f64],
        up: &[f64],
        r: usize,
        scale: f64,
        d: Dims,
        p: Conv2dParams,
    ) -> (Vec<f64>, Vec<f64>) {
        let (b, _, _, _, cout, kh, kw, ho, wo) = geom(d, p);
        let t = conv(x, down, (d.0, [r, kh, kw]), p);
        let mut y = conv(x, w, d, p);
        let hw = ho * wo;
        for bi in 0..b {
            for co in 0..cout {
                for q in 0..hw {
                    let low: f64 = (0..r).map(|j| up[co * r + j] * t[(bi * r + j) * hw + q]).sum();
                    y[(bi * cout + co) * hw + q] += bias.map_or(0.0, |bv| bv[co]) + scale * low;
                }
            }
        }
        (y, t)
    }

    /// Gradients of [`forward`] from `dy`: `(dx, d_down [R, Cin, kh, kw], d_up [Cout, R])`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        x: &[f64],
        w: &[f64],
        down: &[f64],
        up: &[f64],
        r: usize,
        scale: f64,
        dy: &[f64],
        d: Dims,
        p: Conv2dParams,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (b, _, _, _, cout, kh, kw, ho, wo) = geom(d, p);
        let low = (d.0, [r, kh, kw]);
        let t = conv(x, down, low, p);
        let hw = ho * wo;
        // g = s·upᵀ·dy at every pixel: [B, R, Ho, Wo].
        let mut g = vec![0.0; b * r * hw];
        let mut d_up = vec![0.0; cout * r];
        for bi in 0..b {
            for q in 0..hw {
                for j in 0..r {
                    g[(bi * r + j) * hw + q] =
                        scale * (0..cout).map(|co| up[co * r + j] * dy[(bi * cout + co) * hw + q]).sum::<f64>();
                }
                for co in 0..cout {
                    for j in 0..r {
                        d_up[co * r + j] += scale * dy[(bi * cout + co) * hw + q] * t[(bi * r + j) * hw + q];
                    }
                }
            }
        }
        let mut dx = input_grad(dy, w, d, p);
        for (a, v) in dx.iter_mut().zip(input_grad(&g, down, low, p)) {
            *a += v;
        }
        let d_down = weight_grad(&g, x, low, p);
        (dx, d_down, d_up)
    }
}
