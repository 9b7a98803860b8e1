//! 2-D convolution as an implicit GEMM (`shaders/conv2d.wgsl`).
//!
//! `y = conv2d(x, w) + bias` with PyTorch `nn.Conv2d` semantics (zero padding, one group, no
//! dilation). The weight `[Cout, Cin, kh, kw]` is read as the `[Cout, Cin·kh·kw]` matrix it is
//! stored as (f32, f16, q8_0 or q4_0, dequantized while the kernel loads its tile); the input
//! is gathered im2col-style on the fly, never materialised.

use super::adapter::Operands;
use super::Params;
use crate::error::{shape_err, Error, Result};
use crate::gpu::{Bind, Gpu};
use crate::shader::{self, ShaderSource, WEIGHT_AXIS};
use crate::tensor::Tensor;

const SHADER: &str = "conv2d.wgsl";

pub static SHADERS: &[ShaderSource] = &[ShaderSource {
    name: SHADER,
    source: crate::wgsl!("conv2d.wgsl"),
    flag_axes: &[WEIGHT_AXIS, &["", "BIAS"], &["", "ADAPTER", "ADAPTER+ADAPTER_W"]],
    values: &[("BM", "64u"), ("BN", "64u"), ("KT", "32u"), ("KH", "3u"), ("KW", "3u")],
    entries: &["conv2d"],
    top_level: true,
}];

/// Stride and zero padding, equal along both axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: usize,
    pub padding: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Self { stride: 1, padding: 0 }
    }
}

pub use super::gemm::Tiles;

/// Output height/width of a convolution, or `None` if the kernel does not fit the padded input.
pub fn out_size(h: usize, w: usize, kh: usize, kw: usize, p: Conv2dParams) -> Option<(usize, usize)> {
    if p.stride == 0 || kh == 0 || kw == 0 || kh > h + 2 * p.padding || kw > w + 2 * p.padding {
        return None;
    }
    Some(((h + 2 * p.padding - kh) / p.stride + 1, (w + 2 * p.padding - kw) / p.stride + 1))
}

/// Checks operands; returns `[B, Cout, Ho, Wo]`.
fn check(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, p: Conv2dParams) -> Result<[usize; 4]> {
    x.expect_f32("conv2d")?;
    let (xs, ws) = (x.shape(), w.shape());
    if xs.len() != 4 || ws.len() != 4 {
        return Err(shape_err(
            "conv2d",
            format!("input {xs:?} must be [B, Cin, H, W] and weight {ws:?} [Cout, Cin, kh, kw]"),
        ));
    }
    let (b, cin, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
    let (cout, wcin, kh, kw) = (ws[0], ws[1], ws[2], ws[3]);
    if wcin != cin {
        return Err(shape_err(
            "conv2d",
            format!("weight {ws:?} expects {wcin} input channels, input {xs:?} has {cin}"),
        ));
    }
    let (ho, wo) = out_size(h, wd, kh, kw, p).ok_or_else(|| {
        shape_err(
            "conv2d",
            format!(
                "kernel {kh}x{kw} (weight {ws:?}) does not fit input {xs:?} with padding {} and \
                 stride {}",
                p.padding, p.stride
            ),
        )
    })?;
    if let Some(bt) = bias {
        bt.expect_f32("conv2d bias")?;
        if bt.shape() != [cout] {
            return Err(shape_err(
                "conv2d",
                format!("bias {:?} must be [{cout}] for weight {ws:?}", bt.shape()),
            ));
        }
    }
    if [b, cin, cout].contains(&0) {
        return Err(shape_err("conv2d", format!("empty operand: input {xs:?}, weight {ws:?}")));
    }
    Ok([b, cout, ho, wo])
}

/// `y = conv2d(x, w) + bias`: x `[B, Cin, H, W]` f32, w `[Cout, Cin, kh, kw]` in any weight
/// storage type, bias `[Cout]` f32; returns `[B, Cout, Ho, Wo]`.
pub fn conv2d(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
) -> Result<Tensor> {
    let tiles = Tiles::choose(gpu.caps(), w.shape().first().copied().unwrap_or(1));
    conv2d_with(gpu, x, w, bias, p, tiles)
}

/// [`conv2d`] with unmerged adapters on `w` (`ops::adapter`): the kernel applies the adapter
/// terms while staging the weight and adds the low-rank part from `ad.lowrank`
/// (`[B, R, Ho, Wo]`, the stacked down convolutions of `x`).
pub fn conv2d_adapted(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
    ad: &Operands<'_>,
) -> Result<Tensor> {
    let tiles = Tiles::choose(gpu.caps(), w.shape().first().copied().unwrap_or(1));
    conv2d_inner(gpu, x, w, bias, p, tiles, Some(ad))
}

/// [`conv2d`] with explicit tiling (for tests and benchmarks).
pub fn conv2d_with(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
    tiles: Tiles,
) -> Result<Tensor> {
    conv2d_inner(gpu, x, w, bias, p, tiles, None)
}

fn conv2d_inner(
    gpu: &Gpu,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
    tiles: Tiles,
    adapter: Option<&Operands<'_>>,
) -> Result<Tensor> {
    let out = check(x, w, bias, p)?;
    if !tiles.fits(gpu.caps())
    {
        return Err(Error::Invalid(format!("conv2d: tiling {tiles:?} is not usable on this device")));
    }
    let (xs, ws) = (x.shape(), w.shape());
    let (cin, h, wd) = (xs[1], xs[2], xs[3]);
    let (cout, kh, kw) = (ws[0], ws[2], ws[3]);
    let (ho, wo) = (out[2], out[3]);
    let k = cin * kh * kw;
    let n = out[0] * ho * wo;
    if let Some(ad) = adapter {
        ad.check_conv(out)?;
    }
    let y = Tensor::empty(gpu, &out)?;
    let m_tiles = cout.div_ceil(tiles.bm);
    let n_tiles = n.div_ceil(tiles.bn);
    let groups = u32::try_from(m_tiles * n_tiles).map_err(|_| {
        shape_err("conv2d", format!("input {xs:?} with weight {ws:?} needs too many workgroups"))
    })?;
    let defines = tiles
        .defines()
        .value("KH", format!("{kh}u"))
        .value("KW", format!("{kw}u"));
    let defines = shader::weight_defines(defines, w.dtype())
        .flag_if("BIAS", bias.is_some())
        .flag_if("ADAPTER", adapter.is_some())
        .flag_if("ADAPTER_W", adapter.is_some_and(|a| a.adapts_weight()));
    let mut params = Params::new()
        .u(cin)
        .u(h)
        .u(wd)
        .u(cout)
        .u(ho)
        .u(wo)
        .u(p.stride)
        .u(p.padding)
        .u(k)
        .u(n)
        .u(m_tiles);
    let mut binds: Vec<Bind<'_>> = vec![(1, x.buffer()), (2, w.buffer())];
    if let Some(s) = w.scales() {
        binds.push((3, s));
    }
    if let Some(bt) = bias {
        binds.push((4, bt.buffer()));
    }
    binds.push((5, y.buffer()));
    if let Some(ad) = adapter {
        params = ad.append(params.u(0));
        ad.bind(&mut binds);
    }
    gpu.dispatch(SHADER, "conv2d", &defines, &params.0, &binds, gpu.grid(groups))?;
    Ok(y)
}

/// CPU reference (f64 accumulation).
pub mod reference {
    use super::{out_size, Conv2dParams};

    /// `x` `[b, cin, h, w]`, `w` `[cout, cin, kh, kw]` (already dequantized), `bias` `[cout]`;
    /// returns `[b, cout, ho, wo]` row-major. Panics on shapes that do not fit.
    #[allow(clippy::too_many_arguments)]
    pub fn conv2d(
        x: &[f32],
        [b, cin, h, wd]: [usize; 4],
        w: &[f32],
        [cout, kh, kw]: [usize; 3],
        bias: Option<&[f32]>,
        p: Conv2dParams,
    ) -> Vec<f32> {
        let (ho, wo) = out_size(h, wd, kh, kw, p).expect("reference conv2d: kernel does not fit");
        assert_eq!(x.len(), b * cin * h * wd);
        assert_eq!(w.len(), cout * cin * kh * kw);
        let mut y = vec![0f32; b * cout * ho * wo];
        for bi in 0..b {
            for co in 0..cout {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut s = bias.map_or(0.0, |bv| bv[co] as f64);
                        for ci in 0..cin {
                            for ky in 0..kh {
                                let iy = (oy * p.stride + ky) as isize - p.padding as isize;
                                if iy < 0 || iy >= h as isize {
                                    continue;
                                }
                                for kx in 0..kw {
                                    let ix = (ox * p.stride + kx) as isize - p.padding as isize;
                                    if ix < 0 || ix >= wd as isize {
                                        continue;
                                    }
                                    let xv = x[((bi * cin + ci) * h + iy as usize) * wd + ix as usize];
                                    let wv = w[((co * cin + ci) * kh + ky) * kw + kx];
                                    s += xv as f64 * wv as f64;
                                }
                            }
                        }
                        y[((bi * cout + co) * ho + oy) * wo + ox] = s as f32;
                    }
                }
            }
        }
        y
    }
}
