//! The UNet's levels, after diffusers' `models/unets/unet_2d_blocks.py`: `DownBlock2D` /
//! `CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn` and `UpBlock2D` / `CrossAttnUpBlock2D`.
//! A block without attention is the cross-attention block with no transformers, so one type
//! covers both variants of each level.

use super::resnet::{Downsample2D, ResnetBlock2D, ResnetSpec, Upsample2D};
use super::transformer::{Transformer2DModel, TransformerSpec};
use super::weights::{WeightPolicy, WeightSource};
use crate::error::{shape_err, Result};
use crate::gpu::Gpu;
use crate::nn::join;
use crate::ops::layout::concat;
use crate::tensor::Tensor;

/// Construction settings of one down, mid or up block, as `get_down_block` /
/// `get_mid_block` / `get_up_block` receive them from `UNet2DConditionModel`.
#[derive(Clone, Debug)]
pub struct BlockSpec {
    /// `CrossAttn*` (transformers after each resnet) or plain.
    pub cross_attention: bool,
    /// Resnets in the block (`layers_per_block`, +1 for up blocks; 1 for the mid block).
    pub num_layers: usize,
    /// Transformer layers of each attention in the block (one entry per resnet).
    pub transformer_layers: Vec<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Up blocks: channels coming from the block below.
    pub prev_output_channel: usize,
    pub temb_channels: usize,
    /// Downsampler (down blocks) or upsampler (up blocks).
    pub resample: bool,
    pub eps: f32,
    pub groups: usize,
    pub cross_attention_dim: usize,
    pub heads: usize,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
    pub downsample_padding: usize,
    pub output_scale_factor: f32,
}

impl BlockSpec {
    fn resnet(&self, in_channels: usize, out_channels: usize) -> ResnetSpec {
        ResnetSpec {
            in_channels,
            out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
            output_scale_factor: self.output_scale_factor,
        }
    }

    /// diffusers builds `Transformer2DModel(heads, out_channels // heads, in_channels=out_channels)`.
    fn transformer(&self, layer: usize) -> Result<TransformerSpec> {
        let c = self.out_channels;
        if self.heads == 0 || self.heads > c {
            return Err(shape_err(
                "UNet2DConditionModel",
                format!("{} attention heads do not fit a block of {c} channels", self.heads),
            ));
        }
        Ok(TransformerSpec {
            channels: c,
            heads: self.heads,
            dim_head: c / self.heads,
            layers: self.transformer_layers.get(layer).copied().unwrap_or(1),
            cross_attention_dim: self.cross_attention_dim,
            groups: self.groups,
            use_linear_projection: self.use_linear_projection,
            only_cross_attention: self.only_cross_attention,
            norm_eps: 1e-5,
        })
    }
}

fn load_attentions(
    gpu: &Gpu,
    src: &dyn WeightSource,
    policy: WeightPolicy,
    prefix: &str,
    s: &BlockSpec,
    count: usize,
) -> Result<Vec<Transformer2DModel>> {
    if !s.cross_attention {
        return Ok(vec![]);
    }
    (0..count)
        .map(|i| Transformer2DModel::load(gpu, src, policy, &join(prefix, &format!("attentions.{i}")), &s.transformer(i)?))
        .collect()
}

/// `DownBlock2D` / `CrossAttnDownBlock2D`: resnets (each followed by a transformer in the
/// cross-attention variant), then an optional stride-2 downsampler. Every layer's output is
/// kept as a skip connection for the up path.
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    pub fn load(gpu: &Gpu, src: &dyn WeightSource, policy: WeightPolicy, prefix: &str, s: &BlockSpec) -> Result<Self> {
        let resnets = (0..s.num_layers)
            .map(|i| {
                let cin = if i == 0 { s.in_channels } else { s.out_channels };
                ResnetBlock2D::load(gpu, src, policy, &join(prefix, &format!("resnets.{i}")), s.resnet(cin, s.out_channels))
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_attentions(gpu, src, policy, prefix, s, s.num_layers)?;
        let downsampler = if s.resample {
            Some(Downsample2D::load(gpu, src, policy, &join(prefix, "downsamplers.0"), s.out_channels, s.downsample_padding)?)
        } else {
            None
        };
        Ok(Self { resnets, attentions, downsampler })
    }

    /// Runs the block on `x`, pushing each layer's output (and the downsampled output) onto
    /// `skips`; returns the block's output.
    pub fn forward(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        temb_act: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(gpu, &h, Some(temb_act))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(gpu, &h, context)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(gpu, &h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// `UNetMidBlock2DCrossAttn`: `resnets.0`, then (`attentions.i`, `resnets.i+1`) pairs.
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub fn load(gpu: &Gpu, src: &dyn WeightSource, policy: WeightPolicy, prefix: &str, s: &BlockSpec) -> Result<Self> {
        let c = s.in_channels;
        let resnets = (0..=s.num_layers)
            .map(|i| ResnetBlock2D::load(gpu, src, policy, &join(prefix, &format!("resnets.{i}")), s.resnet(c, c)))
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_attentions(gpu, src, policy, prefix, s, s.num_layers)?;
        Ok(Self { resnets, attentions })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor, temb_act: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(gpu, x, Some(temb_act))?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(gpu, &h, context)?;
            h = resnet.forward(gpu, &h, Some(temb_act))?;
        }
        Ok(h)
    }
}

/// `UpBlock2D` / `CrossAttnUpBlock2D`: each resnet takes the running features concatenated
/// (on channels) with the most recent skip connection, followed by a transformer in the
/// cross-attention variant; then an optional nearest-2× upsampler.
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    pub fn load(gpu: &Gpu, src: &dyn WeightSource, policy: WeightPolicy, prefix: &str, s: &BlockSpec) -> Result<Self> {
        let n = s.num_layers;
        let resnets = (0..n)
            .map(|i| {
                let skip = if i == n - 1 { s.in_channels } else { s.out_channels };
                let cin = if i == 0 { s.prev_output_channel } else { s.out_channels };
                ResnetBlock2D::load(gpu, src, policy, &join(prefix, &format!("resnets.{i}")), s.resnet(cin + skip, s.out_channels))
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_attentions(gpu, src, policy, prefix, s, n)?;
        let upsampler = if s.resample {
            Some(Upsample2D::load(gpu, src, policy, &join(prefix, "upsamplers.0"), s.out_channels)?)
        } else {
            None
        };
        Ok(Self { resnets, attentions, upsampler })
    }

    /// Number of skip connections the block consumes.
    pub fn skips_needed(&self) -> usize {
        self.resnets.len()
    }

    /// Runs the block, popping one skip connection per resnet from the end of `skips`.
    pub fn forward(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb_act: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| shape_err("UpBlock", "ran out of skip connections"))?;
            if skip.shape()[2..] != h.shape()[2..] {
                return Err(shape_err(
                    "UpBlock",
                    format!(
                        "features {:?} and skip connection {:?} differ in size; the sample's height \
                         and width must be multiples of 2^(levels-1)",
                        h.shape(),
                        skip.shape()
                    ),
                ));
            }
            h = concat(gpu, &[&h, &skip], 1)?;
            h = resnet.forward(gpu, &h, Some(temb_act))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(gpu, &h, context)?;
            }
        }
        if let Some(up) = &self.upsampler {
            h = up.forward(gpu, &h)?;
        }
        Ok(h)
    }
}

crate::visit_layers!(DownBlock: resnets, attentions, downsampler);
crate::visit_layers!(MidBlock: resnets, attentions);
crate::visit_layers!(UpBlock: resnets, attentions, upsampler);
