//! The building blocks of diffusers' AutoencoderKL, following
//! `diffusers/models/unets/unet_2d_blocks.py` (`DownEncoderBlock2D`, `UpDecoderBlock2D`,
//! `UNetMidBlock2D`) and `diffusers/models/attention_processor.py` (`Attention` built with
//! `_from_deprecated_attn_block`, run by `AttnProcessor2_0`: one head of size C over the H·W
//! positions, residual, `rescale_output_factor`). The resnets and resamplers are the UNet's
//! ([`super::resnet`]: `ResnetBlock2D` with `temb_channels=None`, `Downsample2D` with
//! `padding=0`), the attention projections [`super::transformer::Attention`]'s.
//!
//! Every block takes and returns `[B, C, H, W]` f32 activations.

use super::resnet::{Downsample2D, ResnetBlock2D, ResnetSpec, Upsample2D};
use super::transformer::{Attention, AttentionSpec, DIFFUSERS_PROJECTIONS};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::model::weights::{WeightPolicy, WeightSource};
use crate::nn::{join, GroupNorm};
use crate::ops::elementwise::{add, scale};
use crate::ops::layout::transpose_last2;
use crate::tensor::Tensor;

pub use super::transformer::{attention_by_matmul, single_head_attention, MAX_SCORE_BYTES};

/// The epsilon diffusers' VAE passes to every resnet, attention and output group norm.
pub const VAE_NORM_EPS: f32 = 1e-6;

/// Sizes of one encoder / decoder block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockDims {
    /// Resnets in the block.
    pub layers: usize,
    /// Channels entering the block (its first resnet's input).
    pub cin: usize,
    /// Channels of every resnet output and of the resampler.
    pub cout: usize,
    /// Group-norm groups.
    pub groups: usize,
}

/// The VAE's `ResnetBlock2D`: no time embedding, eps 1e-6, `output_scale_factor=1`.
fn resnet(
    gpu: &Gpu,
    src: &dyn WeightSource,
    policy: WeightPolicy,
    prefix: &str,
    cin: usize,
    cout: usize,
    groups: usize,
) -> Result<ResnetBlock2D> {
    let spec = ResnetSpec {
        in_channels: cin,
        out_channels: cout,
        temb_channels: None,
        groups,
        eps: VAE_NORM_EPS,
        output_scale_factor: 1.0,
    };
    ResnetBlock2D::load(gpu, src, policy, prefix, spec)
}

/// A VAE encoder / decoder block: resnets, then an optional 2× down- or upsampler.
pub struct ResampleBlock {
    resnets: Vec<ResnetBlock2D>,
    down: Option<Downsample2D>,
    up: Option<Upsample2D>,
}

impl ResampleBlock {
    fn resnets(
        gpu: &Gpu,
        src: &dyn WeightSource,
        policy: WeightPolicy,
        prefix: &str,
        dims: BlockDims,
    ) -> Result<Vec<ResnetBlock2D>> {
        let BlockDims { layers, cin, cout, groups } = dims;
        (0..layers)
            .map(|i| {
                let cin = if i == 0 { cin } else { cout };
                resnet(gpu, src, policy, &join(prefix, &format!("resnets.{i}")), cin, cout, groups)
            })
            .collect()
    }

    /// `DownEncoderBlock2D(num_layers, cin, cout, add_downsample)` at `prefix`; the
    /// downsampler is `Downsample2D(padding=0)`.
    pub fn load_down(
        gpu: &Gpu,
        src: &dyn WeightSource,
        policy: WeightPolicy,
        prefix: &str,
        dims: BlockDims,
        downsample: bool,
    ) -> Result<Self> {
        let down = downsample
            .then(|| Downsample2D::load(gpu, src, policy, &join(prefix, "downsamplers.0"), dims.cout, 0))
            .transpose()?;
        Ok(Self { resnets: Self::resnets(gpu, src, policy, prefix, dims)?, down, up: None })
    }

    /// `UpDecoderBlock2D(num_layers, cin, cout, add_upsample)` at `prefix`.
    pub fn load_up(
        gpu: &Gpu,
        src: &dyn WeightSource,
        policy: WeightPolicy,
        prefix: &str,
        dims: BlockDims,
        upsample: bool,
    ) -> Result<Self> {
        let up = upsample
            .then(|| Upsample2D::load(gpu, src, policy, &join(prefix, "upsamplers.0"), dims.cout))
            .transpose()?;
        Ok(Self { resnets: Self::resnets(gpu, src, policy, prefix, dims)?, down: None, up })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        self.forward_owned(gpu, x.clone())
    }

    /// [`forward`](Self::forward) taking the input by value: each layer's input is released
    /// as soon as that layer no longer needs it.
    pub fn forward_owned(&self, gpu: &Gpu, x: Tensor) -> Result<Tensor> {
        let mut h = x;
        for r in &self.resnets {
            h = r.forward_owned(gpu, h, None)?;
        }
        if let Some(d) = &self.down {
            h = d.forward(gpu, &h)?;
        }
        if let Some(u) = &self.up {
            h = u.forward_owned(gpu, h)?;
        }
        Ok(h)
    }
}

/// The mid-block attention: group norm, the [`Attention`] projections with one head of size
/// C (scale `1/sqrt(C)`, biases on every projection) over `[B, H·W, C]`, back to
/// `[B, C, H, W]`, plus the input, divided by `rescale_output_factor` (1 in the VAE).
pub struct SpatialAttention {
    norm: GroupNorm,
    attention: Attention,
    rescale_output_factor: f32,
}

impl SpatialAttention {
    pub fn load(
        gpu: &Gpu,
        src: &dyn WeightSource,
        policy: WeightPolicy,
        prefix: &str,
        channels: usize,
        groups: usize,
    ) -> Result<Self> {
        let spec = AttentionSpec {
            query_dim: channels,
            context_dim: channels,
            heads: 1,
            dim_head: channels,
            qkv_bias: true,
            causal: false,
            names: DIFFUSERS_PROJECTIONS,
        };
        Ok(Self {
            norm: GroupNorm::load(gpu, src, &join(prefix, "group_norm"), groups, channels, VAE_NORM_EPS, policy)?,
            attention: Attention::load(gpu, src, policy, prefix, spec)?,
            rescale_output_factor: 1.0,
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let s = x.shape().to_vec();
        let (b, c, n) = (s[0], s[1], s[2] * s[3]);
        let h = self.norm.forward(gpu, x, false)?;
        let t = transpose_last2(gpu, &h.reshape(&[b, c, n])?)?; // [B, N, C]
        drop(h);
        let o = self.attention.forward(gpu, &t, None)?;
        drop(t);
        let ot = transpose_last2(gpu, &o)?.reshape(&s)?; // [B, C, H, W]
        drop(o);
        let y = add(gpu, &ot, x)?;
        drop(ot);
        if self.rescale_output_factor == 1.0 {
            Ok(y)
        } else {
            scale(gpu, &y, 1.0 / self.rescale_output_factor)
        }
    }
}

/// `UNetMidBlock2D(num_layers=1)`: resnet, attention (unless `add_attention` is off), resnet.
pub struct MidBlock {
    resnet0: ResnetBlock2D,
    attention: Option<SpatialAttention>,
    resnet1: ResnetBlock2D,
}

impl MidBlock {
    pub fn load(
        gpu: &Gpu,
        src: &dyn WeightSource,
        policy: WeightPolicy,
        prefix: &str,
        channels: usize,
        groups: usize,
        add_attention: bool,
    ) -> Result<Self> {
        let p = |n: &str| join(prefix, n);
        Ok(Self {
            resnet0: resnet(gpu, src, policy, &p("resnets.0"), channels, channels, groups)?,
            attention: if add_attention {
                Some(SpatialAttention::load(gpu, src, policy, &p("attentions.0"), channels, groups)?)
            } else {
                None
            },
            resnet1: resnet(gpu, src, policy, &p("resnets.1"), channels, channels, groups)?,
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        self.forward_owned(gpu, x.clone())
    }

    /// [`forward`](Self::forward) taking the input by value (released after the first resnet).
    pub fn forward_owned(&self, gpu: &Gpu, x: Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward_owned(gpu, x, None)?;
        if let Some(a) = &self.attention {
            h = a.forward(gpu, &h)?;
        }
        self.resnet1.forward_owned(gpu, h, None)
    }
}
