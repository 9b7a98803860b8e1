//! Training forward and backward of diffusers' `ResnetBlock2D` (with a time embedding),
//! `Downsample2D` and `Upsample2D`, mirroring [`crate::model::resnet`].

use super::layers::{need, Conv, ConvSaved, GNorm, Layers, Lin, LowRankSaved};
use super::params::LoraParams;
use crate::error::{shape_err, Error, Result};
use crate::gpu::Gpu;
use crate::nn::join;
use crate::ops::elementwise::{add, binary, scale, Binary};
use crate::ops::grad::activation::{accumulate, upsample_nearest2x_backward};
use crate::ops::layout::upsample_nearest2x;
use crate::ops::matmul::linear;
use crate::tensor::Tensor;

/// `h = conv1(silu(norm1(x))) + time_emb_proj(temb_act)[:, :, None, None]`,
/// `h = conv2(silu(norm2(h)))`, `out = (shortcut(x) + h) / output_scale_factor`.
pub(super) struct Resnet {
    norm1: GNorm,
    conv1: Conv,
    time_emb_proj: Lin,
    norm2: GNorm,
    conv2: Conv,
    conv_shortcut: Option<Conv>,
    output_scale_factor: f32,
}

pub(super) struct ResnetSaved {
    x: Tensor,
    conv1: ConvSaved,
    time: LowRankSaved,
    /// norm2's input.
    h: Tensor,
    conv2: ConvSaved,
    shortcut: Option<ConvSaved>,
}

/// `Σ_{y,x} t[b, c, y, x]`: `[B, C, H, W]` → `[B, C]`, one fixed-order matmul with a ones vector.
fn spatial_sum(gpu: &Gpu, t: &Tensor) -> Result<Tensor> {
    let s = t.shape();
    let (bc, hw) = (s[0] * s[1], s[2] * s[3]);
    let ones = Tensor::from_f32(gpu, &[1, hw], &vec![1.0; hw])?;
    linear(gpu, &t.reshape(&[bc, hw])?, &ones, None)?.reshape(&[s[0], s[1]])
}

impl Resnet {
    pub fn build(layers: &mut Layers<'_>, prefix: &str, output_scale_factor: f32) -> Result<Self> {
        let p = |n: &str| join(prefix, n);
        let shortcut = p("conv_shortcut");
        Ok(Self {
            norm1: layers.group_norm(&p("norm1"))?,
            conv1: layers.conv(&p("conv1"))?,
            time_emb_proj: layers.linear(&p("time_emb_proj"))?,
            norm2: layers.group_norm(&p("norm2"))?,
            conv2: layers.conv(&p("conv2"))?,
            conv_shortcut: if layers.has(&shortcut) { Some(layers.conv(&shortcut)?) } else { None },
            output_scale_factor,
        })
    }

    /// `x: [B, Cin, H, W]`, `temb_act: [B, T]` (SiLU of the time embedding) → `[B, Cout, H, W]`.
    pub fn forward(&self, gpu: &Gpu, p: &LoraParams, x: &Tensor, temb_act: &Tensor) -> Result<(Tensor, ResnetSaved)> {
        let n = self.norm1.forward(gpu, x, true)?;
        let (h, conv1) = self.conv1.forward(gpu, p, &n)?;
        drop(n);
        let (t, time) = self.time_emb_proj.forward(gpu, p, temb_act)?;
        let (b, c) = (t.dim(0), t.dim(1));
        if b != h.dim(0) {
            return Err(shape_err(
                "ResnetBlock2D",
                format!("time embedding {:?} does not match the batch of {:?}", t.shape(), h.shape()),
            ));
        }
        let h = add(gpu, &h, &t.reshape(&[b, c, 1, 1])?)?;
        drop(t);
        let n = self.norm2.forward(gpu, &h, true)?;
        let (h2, conv2) = self.conv2.forward(gpu, p, &n)?;
        drop(n);
        let (short, shortcut) = match &self.conv_shortcut {
            Some(conv) => {
                let (s, saved) = conv.forward(gpu, p, x)?;
                (s, Some(saved))
            }
            None => (x.clone(), None),
        };
        let y = if self.output_scale_factor == 1.0 {
            add(gpu, &short, &h2)?
        } else {
            let inv = 1.0 / self.output_scale_factor;
            binary(gpu, &scale(gpu, &short, inv)?, &h2, Binary::AddScaled(inv))?
        };
        Ok((y, ResnetSaved { x: x.clone(), conv1, time, h, conv2, shortcut }))
    }

    /// Adds the adapters' gradients for `dy`; returns the input gradient when `want_dx`.
    pub fn backward(
        &self,
        gpu: &Gpu,
        p: &LoraParams,
        s: ResnetSaved,
        dy: &Tensor,
        want_dx: bool,
    ) -> Result<Option<Tensor>> {
        let scaled;
        let dy = if self.output_scale_factor == 1.0 {
            dy
        } else {
            scaled = scale(gpu, dy, 1.0 / self.output_scale_factor)?;
            &scaled
        };
        let dn = need(self.conv2.backward(gpu, p, s.conv2, dy, true)?, "conv2")?;
        let dh = self.norm2.backward(gpu, &s.h, &dn, true)?;
        drop((dn, s.h));
        if self.time_emb_proj.adapted() {
            // The time term is broadcast over the pixels: its gradient is dh summed over them.
            let dt = spatial_sum(gpu, &dh)?;
            self.time_emb_proj.backward(gpu, p, s.time, &dt, false)?;
        }
        let dn = self.conv1.backward(gpu, p, s.conv1, &dh, want_dx)?;
        drop(dh);
        let dx = match dn {
            Some(dn) => Some(self.norm1.backward(gpu, &s.x, &dn, true)?),
            None => None,
        };
        drop(s.x);
        match (&self.conv_shortcut, s.shortcut) {
            (Some(conv), Some(saved)) => {
                let ds = conv.backward(gpu, p, saved, dy, want_dx)?;
                if let (Some(dx), Some(ds)) = (&dx, &ds) {
                    accumulate(gpu, dx, ds, 1.0)?;
                }
            }
            (None, None) => {
                if let Some(dx) = &dx {
                    accumulate(gpu, dx, dy, 1.0)?;
                }
            }
            _ => return Err(Error::Invalid("ResnetBlock2D backward: shortcut state does not match the block".into())),
        }
        Ok(dx)
    }
}

/// `Downsample2D(use_conv=True, padding=1)`: a 3×3 convolution with stride 2.
pub(super) struct Downsample {
    conv: Conv,
}

impl Downsample {
    pub fn build(layers: &mut Layers<'_>, prefix: &str) -> Result<Self> {
        let conv = layers.conv(&join(prefix, "conv"))?;
        if conv.params().padding == 0 {
            return Err(Error::Invalid(format!(
                "{prefix}: a downsampler without padding (downsample_padding 0) is not supported for training"
            )));
        }
        Ok(Self { conv })
    }

    pub fn forward(&self, gpu: &Gpu, p: &LoraParams, x: &Tensor) -> Result<(Tensor, ConvSaved)> {
        self.conv.forward(gpu, p, x)
    }

    pub fn backward(&self, gpu: &Gpu, p: &LoraParams, s: ConvSaved, dy: &Tensor) -> Result<Tensor> {
        need(self.conv.backward(gpu, p, s, dy, true)?, "downsampler")
    }
}

/// `Upsample2D(use_conv=True)`: nearest-neighbour 2× then a 3×3 convolution.
pub(super) struct Upsample {
    conv: Conv,
}

impl Upsample {
    pub fn build(layers: &mut Layers<'_>, prefix: &str) -> Result<Self> {
        Ok(Self { conv: layers.conv(&join(prefix, "conv"))? })
    }

    pub fn forward(&self, gpu: &Gpu, p: &LoraParams, x: &Tensor) -> Result<(Tensor, ConvSaved)> {
        let up = upsample_nearest2x(gpu, x)?;
        self.conv.forward(gpu, p, &up)
    }

    pub fn backward(&self, gpu: &Gpu, p: &LoraParams, s: ConvSaved, dy: &Tensor) -> Result<Tensor> {
        let d_up = need(self.conv.backward(gpu, p, s, dy, true)?, "upsampler")?;
        upsample_nearest2x_backward(gpu, &d_up)
    }
}
