//! Convolutional building blocks of the UNet, after diffusers' `models/resnet.py`
//! (`ResnetBlock2D`), `models/downsampling.py` (`Downsample2D`) and `models/upsampling.py`
//! (`Upsample2D`), plus the `nn.Conv2d` / `nn.GroupNorm` layers they are made of.
//! Activations are NCHW `[B, C, H, W]` f32.

use super::weights::{WeightPolicy, WeightSource};
use crate::error::{shape_err, Result};
use crate::gpu::Gpu;
use crate::ops::conv::{conv2d, Conv2dParams};
use crate::ops::elementwise::{add, binary, scale, Binary};
use crate::ops::layout::upsample_nearest2x;
use crate::ops::norm::group_norm;
use crate::tensor::Tensor;

use super::transformer::Linear;

/// Joins a module prefix and a parameter name (`"a.b"` + `"weight"`).
pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// `nn.Conv2d(cin, cout, k, stride, padding)` with bias; the weight `[cout, cin, k, k]` is
/// stored per the policy's matrix type.
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub params: Conv2dParams,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        gpu: &Gpu,
        src: &dyn WeightSource,
        policy: WeightPolicy,
        prefix: &str,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = src.load(gpu, &join(prefix, "weight"), &[cout, cin, kernel, kernel], policy.matrix())?;
        let bias = Some(src.load(gpu, &join(prefix, "bias"), &[cout], policy.vector())?);
        Ok(Self { weight, bias, params: Conv2dParams { stride, padding } })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        conv2d(gpu, x, &self.weight, self.bias.as_ref(), self.params)
    }

    pub fn out_channels(&self) -> usize {
        self.weight.dim(0)
    }
}

/// `nn.GroupNorm(groups, channels, eps)` with affine parameters, optionally followed by SiLU.
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f32,
}

impl GroupNorm {
    pub fn load(
        gpu: &Gpu,
        src: &dyn WeightSource,
        policy: WeightPolicy,
        prefix: &str,
        groups: usize,
        channels: usize,
        eps: f32,
    ) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(shape_err(
                "GroupNorm",
                format!("{prefix}: {channels} channels are not divisible into {groups} groups"),
            ));
        }
        Ok(Self {
            weight: src.load(gpu, &join(prefix, "weight"), &[channels], policy.vector())?,
            bias: src.load(gpu, &join(prefix, "bias"), &[channels], policy.vector())?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor, silu: bool) -> Result<Tensor> {
        group_norm(gpu, x, self.groups, Some(&self.weight), Some(&self.bias), self.eps, silu)
    }
}

/// diffusers' `ResnetBlock2D` as SD1.x/SD2.x configure it (pre-norm, SiLU, `time_embedding_norm
/// = "default"`, no dropout at inference):
/// `h = conv1(silu(norm1(x))) + time_emb_proj(silu(temb))[:, :, None, None]`,
/// `h = conv2(silu(norm2(h)))`, `out = (shortcut(x) + h) / output_scale_factor`, where the
/// shortcut is a 1×1 `conv_shortcut` when the channel count changes.
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
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
    pub temb_channels: usize,
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
            norm1: GroupNorm::load(gpu, src, policy, &p("norm1"), s.groups, cin, s.eps)?,
            conv1: Conv2d::load(gpu, src, policy, &p("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: Linear::load(gpu, src, policy, &p("time_emb_proj"), s.temb_channels, cout, true)?,
            norm2: GroupNorm::load(gpu, src, policy, &p("norm2"), s.groups, cout, s.eps)?,
            conv2: Conv2d::load(gpu, src, policy, &p("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::load(gpu, src, policy, &p("conv_shortcut"), cin, cout, 1, 1, 0)?)
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
    /// resnet, so the caller applies the activation once); returns `[B, Cout, H, W]`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward(gpu, x, true)?;
        let h = self.conv1.forward(gpu, &h)?;
        let t = self.time_emb_proj.forward(gpu, temb_act)?;
        let (b, c) = (t.dim(0), t.dim(1));
        if b != h.dim(0) {
            return Err(shape_err(
                "ResnetBlock2D",
                format!("time embedding {:?} does not match the batch of {:?}", t.shape(), h.shape()),
            ));
        }
        let h = add(gpu, &h, &t.reshape(&[b, c, 1, 1])?)?;
        let h = self.norm2.forward(gpu, &h, true)?;
        let h = self.conv2.forward(gpu, &h)?;
        let short = match &self.conv_shortcut {
            Some(conv) => conv.forward(gpu, x)?,
            None => x.clone(),
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

/// diffusers' `Downsample2D(use_conv=True, padding=1)`: a 3×3 convolution with stride 2.
pub struct Downsample2D {
    conv: Conv2d,
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
        if padding != 1 {
            return Err(shape_err(
                "Downsample2D",
                format!("{prefix}: downsample_padding {padding} is not supported (SD models use 1)"),
            ));
        }
        Ok(Self { conv: Conv2d::load(gpu, src, policy, &join(prefix, "conv"), channels, channels, 3, 2, 1)? })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(gpu, x)
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
        Ok(Self { conv: Conv2d::load(gpu, src, policy, &join(prefix, "conv"), channels, channels, 3, 1, 1)? })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let up = upsample_nearest2x(gpu, x)?;
        self.conv.forward(gpu, &up)
    }
}

