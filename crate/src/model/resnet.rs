//! Convolutional building blocks of the UNet and the VAE, after diffusers' `models/resnet.py`
//! (`ResnetBlock2D`, with or without a time embedding), `models/downsampling.py`
//! (`Downsample2D`) and `models/upsampling.py` (`Upsample2D`), made of [`crate::nn`] layers.
//! Activations are NCHW `[B, C, H, W]` f32.

use super::weights::{WeightPolicy, WeightSource};
use crate::error::{shape_err, Result};
use crate::gpu::Gpu;
use crate::nn::{join, Conv2d, GroupNorm, Linear, POINTWISE, SAME3};
use crate::ops::conv::Conv2dParams;
use crate::ops::elementwise::{add, binary, scale, Binary};
use crate::ops::layout::{pad2d, upsample_nearest2x};
use crate::tensor::Tensor;

/// diffusers' `ResnetBlock2D` as SD models configure it (pre-norm, SiLU, `time_embedding_norm
/// = "default"`, no dropout at inference):
/// `h = conv1(silu(norm1(x))) [+ time_emb_proj(silu(temb))[:, :, None, None]]`,
/// `h = conv2(silu(norm2(h)))`, `out = (shortcut(x) + h) / output_scale_factor`, where the
/// shortcut is a 1×1 `conv_shortcut` when the channel count changes. The VAE builds it with
/// `temb_channels=None`: no `time_emb_proj`, no time term.
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f32,
    out_channels: usize,
}

/// Construction settings of a [`ResnetBlock2D`].
#[derive(Clone, Copy, Debug)]
pub struct ResnetSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding, or `None` for a block without one (the VAE's).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f32,
    pub output_scale_factor: f32,
}

impl ResnetBlock2D {
    pub fn load(
        gpu: &Gpu,
        src: &dyn WeightSource,
        policy: WeightPolicy,
        prefix: &str,
        s: ResnetSpec,
    ) -> Result<Self> {
        let p = |n: &str| join(prefix, n);
        let (cin, cout) = (s.in_channels, s.out_channels);
        Ok(Self {
            norm1: GroupNorm::load(gpu, src, &p("norm1"), s.groups, cin, s.eps, policy)?,
            conv1: Conv2d::load(gpu, src, &p("conv1"), cin, cout, 3, SAME3, policy)?,
            time_emb_proj: match s.temb_channels {
                Some(t) => Some(Linear::load(gpu, src, &p("time_emb_proj"), t, cout, true, policy)?),
                None => None,
            },
            norm2: GroupNorm::load(gpu, src, &p("norm2"), s.groups, cout, s.eps, policy)?,
            conv2: Conv2d::load(gpu, src, &p("conv2"), cout, cout, 3, SAME3, policy)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::load(gpu, src, &p("conv_shortcut"), cin, cout, 1, POINTWISE, policy)?)
            } else {
                None
            },
            output_scale_factor: s.output_scale_factor,
            out_channels: cout,
        })
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// `x: [B, Cin, H, W]`, `temb_act: [B, T]` = SiLU of the time embedding (shared by every
    /// resnet, so the caller applies the activation once; `None` exactly when the block has
    /// no time embedding); returns `[B, Cout, H, W]`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, temb_act: Option<&Tensor>) -> Result<Tensor> {
        self.forward_owned(gpu, x.clone(), temb_act)
    }

    /// [`forward`](Self::forward) taking the input by value: every intermediate, and the input
    /// once the shortcut has used it, is released as soon as it is dead, so a caller handing
    /// over its last reference keeps at most input + normalised input + one output-sized
    /// tensor alive.
    pub fn forward_owned(&self, gpu: &Gpu, x: Tensor, temb_act: Option<&Tensor>) -> Result<Tensor> {
        let n = self.norm1.forward(gpu, &x, true)?;
        let mut h = self.conv1.forward(gpu, &n)?;
        drop(n);
        match (&self.time_emb_proj, temb_act) {
            (Some(proj), Some(temb)) => {
                let t = proj.forward(gpu, temb)?;
                let (b, c) = (t.dim(0), t.dim(1));
                if b != h.dim(0) {
                    return Err(shape_err(
                        "ResnetBlock2D",
                        format!("time embedding {:?} does not match the batch of {:?}", t.shape(), h.shape()),
                    ));
                }
                h = add(gpu, &h, &t.reshape(&[b, c, 1, 1])?)?;
            }
            (None, None) => {}
            (proj, _) => {
                return Err(shape_err(
                    "ResnetBlock2D",
                    format!(
                        "a time embedding must be given exactly when the block has time_emb_proj (it {})",
                        if proj.is_some() { "has one" } else { "has none" }
                    ),
                ))
            }
        }
        let n = self.norm2.forward(gpu, &h, true)?;
        drop(h);
        let h = self.conv2.forward(gpu, &n)?;
        drop(n);
        let short = match &self.conv_shortcut {
            Some(conv) => conv.forward(gpu, &x)?,
            None => x,
        };
        if self.output_scale_factor == 1.0 {
            add(gpu, &short, &h)
        } else {
            // (shortcut + h) / s = shortcut/s + h/s
            let inv = 1.0 / self.output_scale_factor;
            let short = scale(gpu, &short, inv)?;
            binary(gpu, &short, &h, Binary::AddScaled(inv))
        }
    }
}

/// diffusers' `Downsample2D(use_conv=True, padding)`: a 3×3 convolution with stride 2 and
/// the given zero padding (the UNet's `downsample_padding`, 1 in SD). With `padding=0` (the
/// VAE encoder) the input first gets `F.pad(x, (0, 1, 0, 1))`, one zero column on the right
/// and one zero row at the bottom, through `ops::layout::pad2d`.
pub struct Downsample2D {
    conv: Conv2d,
    pad_bottom_right: bool,
}

impl Downsample2D {
    pub fn load(
        gpu: &Gpu,
        src: &dyn WeightSource,
        policy: WeightPolicy,
        prefix: &str,
        channels: usize,
        padding: usize,
    ) -> Result<Self> {
        let params = Conv2dParams { stride: 2, padding };
        Ok(Self {
            conv: Conv2d::load(gpu, src, &join(prefix, "conv"), channels, channels, 3, params, policy)?,
            pad_bottom_right: padding == 0,
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        if self.pad_bottom_right {
            self.conv.forward(gpu, &pad2d(gpu, x, [0, 1, 0, 1])?)
        } else {
            self.conv.forward(gpu, x)
        }
    }
}

/// diffusers' `Upsample2D(use_conv=True)`: nearest-neighbour 2× then a 3×3 convolution.
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn load(
        gpu: &Gpu,
        src: &dyn WeightSource,
        policy: WeightPolicy,
        prefix: &str,
        channels: usize,
    ) -> Result<Self> {
        Ok(Self { conv: Conv2d::load(gpu, src, &join(prefix, "conv"), channels, channels, 3, SAME3, policy)? })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        self.forward_owned(gpu, x.clone())
    }

    /// [`forward`](Self::forward) taking the input by value, released once upsampled.
    pub fn forward_owned(&self, gpu: &Gpu, x: Tensor) -> Result<Tensor> {
        let up = upsample_nearest2x(gpu, &x)?;
        drop(x);
        self.conv.forward(gpu, &up)
    }
}

crate::visit_layers!(ResnetBlock2D: norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut);
crate::visit_layers!(Downsample2D: conv);
crate::visit_layers!(Upsample2D: conv);
