//! The denoising UNet of SD1.x / SD2.x, after diffusers'
//! `models/unets/unet_2d_condition.py` (`UNet2DConditionModel`), built entirely from its
//! `unet/config.json` (the shared [`UNetConfig`] of `model::config`). Parameters come by
//! diffusers name (`down_blocks.0.resnets.0.conv1.weight`, …) from a [`WeightSource`].
//!
//! Layout: the latent sample and every feature map are NCHW `[B, C, H, W]` f32; the
//! transformers work on `[B, H·W, C]` tokens.

use super::config::{PerLevel, UNetConfig};
use super::embeddings::{TimestepEmbedding, Timesteps};
use super::unet_blocks::{BlockSpec, DownBlock, MidBlock, UpBlock};
use super::weights::{WeightPolicy, WeightSource};
use crate::error::{shape_err, Error, Result};
use crate::gpu::Gpu;
use crate::nn::{Conv2d, GroupNorm};
use crate::ops::conv::Conv2dParams;
use crate::ops::elementwise::{silu, unary, Unary};
use crate::tensor::Tensor;

/// diffusers' `UNet2DConditionModel` for SD1.x / SD2.x configurations.
pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    /// Builds the model `config` describes, loading every parameter from `src` (matrices of
    /// linear and convolution layers stored per `policy`). A parameter missing or shaped
    /// differently from what the config implies, or a layer present in the weights that the
    /// config does not have, is an error naming the tensor.
    pub fn load(gpu: &Gpu, config: &UNetConfig, src: &dyn WeightSource, policy: WeightPolicy) -> Result<Self> {
        let c = config;
        c.check_supported()?;
        let n = c.levels();
        let ch = &c.block_out_channels;
        // diffusers: `mid_block_only_cross_attention` defaults to `only_cross_attention` when
        // that is a single bool, else to false.
        let mid_only_cross = c.mid_block_only_cross_attention.unwrap_or(match &c.only_cross_attention {
            PerLevel::One(b) => *b,
            PerLevel::Each(_) => false,
        });
        let groups = c.norm_groups();
        let temb_dim = c.time_embed_dim();
        let base = BlockSpec {
            cross_attention: true,
            num_layers: 1,
            transformer_layers: vec![],
            in_channels: 0,
            out_channels: 0,
            prev_output_channel: 0,
            temb_channels: temb_dim,
            resample: false,
            eps: c.norm_eps as f32,
            groups,
            cross_attention_dim: 0,
            heads: 0,
            use_linear_projection: c.use_linear_projection,
            only_cross_attention: false,
            downsample_padding: c.downsample_padding,
            output_scale_factor: 1.0,
        };

        let pad_in = (c.conv_in_kernel - 1) / 2;
        let same = |padding| Conv2dParams { stride: 1, padding };
        let conv_in = Conv2d::load(gpu, src, "conv_in", c.in_channels, ch[0], c.conv_in_kernel, same(pad_in), policy)?;
        let time_proj =
            Timesteps { num_channels: ch[0], flip_sin_to_cos: c.flip_sin_to_cos, downscale_freq_shift: c.freq_shift as f32 };
        let time_embedding =
            TimestepEmbedding::load(gpu, src, policy, "time_embedding", ch[0], temb_dim, c.time_cond_proj_dim)?;

        let mut down_specs = Vec::with_capacity(n);
        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let layers = c.layers_per_block(i);
            let s = BlockSpec {
                cross_attention: c.down_has_attention(i),
                num_layers: layers,
                transformer_layers: vec![c.transformer_layers(i); layers],
                in_channels: if i == 0 { ch[0] } else { ch[i - 1] },
                out_channels: ch[i],
                resample: i + 1 < n,
                cross_attention_dim: c.cross_attention_dim(i),
                heads: c.heads(i),
                only_cross_attention: c.only_cross_attention(i),
                ..base.clone()
            };
            down_blocks.push(DownBlock::load(gpu, src, policy, &format!("down_blocks.{i}"), &s)?);
            down_specs.push(s);
        }
        let mid_spec = BlockSpec {
            num_layers: 1,
            transformer_layers: vec![c.transformer_layers(n - 1)],
            in_channels: ch[n - 1],
            out_channels: ch[n - 1],
            cross_attention_dim: c.cross_attention_dim(n - 1),
            heads: c.heads(n - 1),
            only_cross_attention: mid_only_cross,
            output_scale_factor: c.mid_block_scale_factor as f32,
            ..base.clone()
        };
        let mid_block = MidBlock::load(gpu, src, policy, "mid_block", &mid_spec)?;

        let mut up_specs = Vec::with_capacity(n);
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[n - 1];
        // Up block i mirrors down level n-1-i (diffusers reverses every per-level list,
        // `transformer_layers_per_block` included).
        for i in 0..n {
            let r = n - 1 - i;
            let layers = c.layers_per_block(r) + 1;
            let prev = out_ch;
            out_ch = ch[r];
            let s = BlockSpec {
                cross_attention: c.up_has_attention(i),
                num_layers: layers,
                transformer_layers: vec![c.transformer_layers(r); layers],
                in_channels: ch[r.saturating_sub(1)],
                out_channels: out_ch,
                prev_output_channel: prev,
                resample: i + 1 < n,
                cross_attention_dim: c.cross_attention_dim(r),
                heads: c.heads(r),
                only_cross_attention: c.only_cross_attention(r),
                ..base.clone()
            };
            up_blocks.push(UpBlock::load(gpu, src, policy, &format!("up_blocks.{i}"), &s)?);
            up_specs.push(s);
        }
        let conv_norm_out = GroupNorm::load(gpu, src, "conv_norm_out", groups, ch[0], c.norm_eps as f32, policy)?;
        let pad_out = (c.conv_out_kernel - 1) / 2;
        let conv_out = Conv2d::load(gpu, src, "conv_out", ch[0], c.out_channels, c.conv_out_kernel, same(pad_out), policy)?;

        check_no_extra_layers(src, &down_specs, &mid_spec, &up_specs)?;
        Ok(Self {
            config: config.clone(),
            conv_in,
            time_proj,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Width of `encoder_hidden_states` the first cross-attention expects.
    pub fn cross_attention_dim(&self) -> usize {
        self.config.cross_attention_dim(0)
    }

    /// Factor the sample's height and width must be a multiple of (2^(levels-1)).
    pub fn size_multiple(&self) -> usize {
        1 << (self.down_blocks.len() - 1)
    }

    /// The noise (or v) prediction: `sample: [B, in_channels, h, w]`, `timesteps`: one value
    /// per batch item or one shared value, `encoder_hidden_states: [B, 77, D]`; returns
    /// `[B, out_channels, h, w]`. `h` and `w` must be multiples of [`Self::size_multiple`].
    pub fn forward(&self, gpu: &Gpu, sample: &Tensor, timesteps: &[f32], encoder_hidden_states: &Tensor) -> Result<Tensor> {
        self.forward_with_cond(gpu, sample, timesteps, encoder_hidden_states, None)
    }

    /// [`Self::forward`] with `timestep_cond: [B, time_cond_proj_dim]` for UNets that have a
    /// `time_embedding.cond_proj` (LCM-distilled models' guidance embedding).
    pub fn forward_with_cond(
        &self,
        gpu: &Gpu,
        sample: &Tensor,
        timesteps: &[f32],
        encoder_hidden_states: &Tensor,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        const OP: &str = "UNet2DConditionModel";
        let (s, e) = (sample.shape(), encoder_hidden_states.shape());
        let m = self.size_multiple();
        if s.len() != 4 || s[1] != self.config.in_channels || s[2] % m != 0 || s[3] % m != 0 || s[0] == 0 {
            return Err(shape_err(
                OP,
                format!(
                    "sample {s:?} must be [B, {}, h, w] with h and w multiples of {m}",
                    self.config.in_channels
                ),
            ));
        }
        let b = s[0];
        if e.len() != 3 || e[0] != b || e[2] != self.cross_attention_dim() {
            return Err(shape_err(
                OP,
                format!(
                    "encoder_hidden_states {e:?} must be [{b}, tokens, {}] for sample {s:?}",
                    self.cross_attention_dim()
                ),
            ));
        }
        let t: Vec<f32> = match timesteps.len() {
            1 => vec![timesteps[0]; b],
            n if n == b => timesteps.to_vec(),
            n => return Err(shape_err(OP, format!("{n} timesteps for a batch of {b}"))),
        };
        if self.time_embedding.has_cond_proj() != timestep_cond.is_some() {
            return Err(shape_err(
                OP,
                "timestep_cond must be given exactly when the config has time_cond_proj_dim",
            ));
        }

        let t_emb = self.time_proj.forward(gpu, &t)?;
        let emb = self.time_embedding.forward(gpu, &t_emb, timestep_cond)?;
        let temb_act = silu(gpu, &emb)?;

        let x = if self.config.center_input_sample {
            let x = unary(gpu, sample, Unary::Scale(2.0))?;
            unary(gpu, &x, Unary::AddScalar(-1.0))?
        } else {
            sample.clone()
        };
        let mut h = self.conv_in.forward(gpu, &x)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            h = block.forward(gpu, &h, &temb_act, encoder_hidden_states, &mut skips)?;
        }
        h = self.mid_block.forward(gpu, &h, &temb_act, encoder_hidden_states)?;
        for block in &self.up_blocks {
            h = block.forward(gpu, &h, &mut skips, &temb_act, encoder_hidden_states)?;
        }
        let h = self.conv_norm_out.forward(gpu, &h, true)?;
        self.conv_out.forward(gpu, &h)
    }
}

/// Errors when the weights hold a layer the config does not describe (more blocks, resnets,
/// transformer layers or resamplers than configured): such a file belongs to another model.
fn check_no_extra_layers(src: &dyn WeightSource, down: &[BlockSpec], mid: &BlockSpec, up: &[BlockSpec]) -> Result<()> {
    let mut absent: Vec<String> = vec![
        format!("down_blocks.{}.resnets.0.conv1.weight", down.len()),
        format!("up_blocks.{}.resnets.0.conv1.weight", up.len()),
        format!("mid_block.resnets.{}.conv1.weight", mid.num_layers + 1),
    ];
    let mut block = |prefix: String, s: &BlockSpec, resnets: usize, attentions: usize, resample: &str| {
        absent.push(format!("{prefix}.resnets.{resnets}.conv1.weight"));
        if s.cross_attention {
            absent.push(format!("{prefix}.attentions.{attentions}.norm.weight"));
            for a in 0..attentions {
                let l = s.transformer_layers.get(a).copied().unwrap_or(1);
                absent.push(format!("{prefix}.attentions.{a}.transformer_blocks.{l}.norm1.weight"));
            }
        } else {
            absent.push(format!("{prefix}.attentions.0.norm.weight"));
        }
        if !s.resample && !resample.is_empty() {
            absent.push(format!("{prefix}.{resample}.0.conv.weight"));
        }
    };
    for (i, s) in down.iter().enumerate() {
        block(format!("down_blocks.{i}"), s, s.num_layers, s.num_layers, "downsamplers");
    }
    block("mid_block".into(), mid, mid.num_layers + 1, mid.num_layers, "");
    for (i, s) in up.iter().enumerate() {
        block(format!("up_blocks.{i}"), s, s.num_layers, s.num_layers, "upsamplers");
    }
    match absent.into_iter().find(|name| src.contains(name)) {
        Some(name) => Err(Error::Format {
            file: src.describe(),
            tensor: Some(name),
            message: "belongs to a layer the UNet config does not have; the weights are for \
                      another model configuration"
                .into(),
        }),
        None => Ok(()),
    }
}

crate::visit_layers!(UNet2DConditionModel: conv_in, time_embedding, down_blocks, mid_block, up_blocks, conv_norm_out, conv_out);
