//! The denoising UNet of SD1.x / SD2.x, after diffusers'
//! `models/unets/unet_2d_condition.py` (`UNet2DConditionModel`), built entirely from its
//! `unet/config.json`. Parameters come by diffusers name (`down_blocks.0.resnets.0.conv1.weight`,
//! …) from a [`WeightSource`].
//!
//! Layout: the latent sample and every feature map are NCHW `[B, C, H, W]` f32; the
//! transformers work on `[B, H·W, C]` tokens.

use super::embeddings::{TimestepEmbedding, Timesteps};
use super::resnet::{Conv2d, GroupNorm};
use super::unet_blocks::{BlockSpec, DownBlock, MidBlock, UpBlock};
use super::weights::{WeightPolicy, WeightSource};
use crate::error::{shape_err, Error, Result};
use crate::gpu::Gpu;
use crate::ops::elementwise::{silu, unary, Unary};
use crate::tensor::Tensor;
use serde::Deserialize;

/// A config value given once for every block or as a per-block list.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    Each(Vec<T>),
    One(T),
}

impl<T: Clone> PerBlock<T> {
    /// The value of each of `n` blocks (a list must have `n` entries).
    pub fn expand(&self, n: usize, what: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::Invalid(format!(
                "UNet config: {what} has {} entries but there are {n} down blocks",
                v.len()
            ))),
        }
    }
}

fn d_true() -> bool {
    true
}
fn d_4() -> usize {
    4
}
fn d_1() -> usize {
    1
}
fn d_3() -> usize {
    3
}
fn d_1f() -> f32 {
    1.0
}
fn d_eps() -> f32 {
    1e-5
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_down() -> Vec<String> {
    ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"].map(String::from).to_vec()
}
fn d_up() -> Vec<String> {
    ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"].map(String::from).to_vec()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_layers() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d_one() -> PerBlock<PerBlock<usize>> {
    PerBlock::One(PerBlock::One(1))
}
fn d_cross() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn d_heads() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn d_false() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn d_silu() -> String {
    "silu".into()
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}

/// `unet/config.json` of a `UNet2DConditionModel`, with diffusers' defaults for absent keys.
#[derive(Clone, Debug, Deserialize)]
pub struct UNetConfig {
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
    #[serde(default = "d_4")]
    pub in_channels: usize,
    #[serde(default = "d_4")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f32,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_false")]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "d_1")]
    pub downsample_padding: usize,
    #[serde(default = "d_1f")]
    pub mid_block_scale_factor: f32,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    pub norm_eps: f32,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "d_one")]
    pub transformer_layers_per_block: PerBlock<PerBlock<usize>>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<PerBlock<usize>>>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// Number of heads per block in diffusers' legacy naming (see [`UNetConfig::heads`]).
    #[serde(default = "d_heads")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "d_1f")]
    pub resnet_out_scale_factor: f32,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_3")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_3")]
    pub conv_out_kernel: usize,
    #[serde(default = "d_default")]
    pub attention_type: String,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
}

impl UNetConfig {
    /// Parses `unet/config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Format {
            file: "unet/config.json".into(),
            tensor: None,
            message: format!("is not a UNet2DConditionModel config: {e}"),
        })
    }

    /// Heads per down block: `num_attention_heads or attention_head_dim`, as diffusers reads
    /// the config (SD1.x/SD2.x store the head COUNT in `attention_head_dim`).
    pub fn heads(&self) -> Result<Vec<usize>> {
        let n = self.down_block_types.len();
        match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads"),
            None => self.attention_head_dim.expand(n, "attention_head_dim"),
        }
    }

    /// Rejects settings this implementation does not cover (SDXL's added embeddings, class
    /// embeddings, scale-shift time conditioning, …) instead of computing something else.
    pub fn check_supported(&self) -> Result<()> {
        let unsupported = |what: String| {
            Err(Error::Invalid(format!("UNet config: {what} is not supported (SD1.x/SD2.x UNets only)")))
        };
        let n = self.down_block_types.len();
        if n == 0 || self.block_out_channels.len() != n || self.up_block_types.len() != n {
            return unsupported(format!(
                "{} down blocks, {} up blocks and {} block_out_channels",
                n,
                self.up_block_types.len(),
                self.block_out_channels.len()
            ));
        }
        for t in &self.down_block_types {
            if t != "DownBlock2D" && t != "CrossAttnDownBlock2D" {
                return unsupported(format!("down block type {t:?}"));
            }
        }
        for t in &self.up_block_types {
            if t != "UpBlock2D" && t != "CrossAttnUpBlock2D" {
                return unsupported(format!("up block type {t:?}"));
            }
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return unsupported(format!("mid block type {:?}", self.mid_block_type));
        }
        let checks: [(bool, String); 12] = [
            (self.act_fn != "silu" && self.act_fn != "swish", format!("act_fn {:?}", self.act_fn)),
            (self.norm_num_groups.is_none(), "norm_num_groups null".into()),
            (self.class_embed_type.is_some() || self.num_class_embeds.is_some(), "class embeddings".into()),
            (self.addition_embed_type.is_some(), format!("addition_embed_type {:?}", self.addition_embed_type)),
            (self.encoder_hid_dim_type.is_some() || self.encoder_hid_dim.is_some(), "encoder_hid_dim".into()),
            (self.dual_cross_attention, "dual_cross_attention".into()),
            (self.resnet_time_scale_shift != "default", format!("resnet_time_scale_shift {:?}", self.resnet_time_scale_shift)),
            (self.time_embedding_type != "positional", format!("time_embedding_type {:?}", self.time_embedding_type)),
            (
                self.time_embedding_dim.is_some() || self.time_embedding_act_fn.is_some() || self.timestep_post_act.is_some(),
                "time_embedding_dim / time_embedding_act_fn / timestep_post_act".into(),
            ),
            (self.attention_type != "default", format!("attention_type {:?}", self.attention_type)),
            (self.cross_attention_norm.is_some(), "cross_attention_norm".into()),
            (self.class_embeddings_concat, "class_embeddings_concat".into()),
        ];
        if let Some((_, what)) = checks.into_iter().find(|(bad, _)| *bad) {
            return unsupported(what);
        }
        Ok(())
    }
}

/// Entries of a transformer-layer spec for `layers` resnets.
fn per_layer(v: &PerBlock<usize>, layers: usize) -> Vec<usize> {
    match v {
        PerBlock::One(n) => vec![*n; layers],
        PerBlock::Each(v) => v.clone(),
    }
}

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
        let n = c.down_block_types.len();
        let ch = &c.block_out_channels;
        let heads = c.heads()?;
        let cross = c.cross_attention_dim.expand(n, "cross_attention_dim")?;
        let layers = c.layers_per_block.expand(n, "layers_per_block")?;
        let tlayers = c.transformer_layers_per_block.expand(n, "transformer_layers_per_block")?;
        let only_cross = c.only_cross_attention.expand(n, "only_cross_attention")?;
        let mid_only_cross = c.mid_block_only_cross_attention.unwrap_or(match &c.only_cross_attention {
            PerBlock::One(b) => *b,
            PerBlock::Each(_) => false,
        });
        let groups = c.norm_num_groups.unwrap_or(32);
        let temb_dim = ch[0] * 4;
        let base = BlockSpec {
            cross_attention: true,
            num_layers: 1,
            transformer_layers: vec![],
            in_channels: 0,
            out_channels: 0,
            prev_output_channel: 0,
            temb_channels: temb_dim,
            resample: false,
            eps: c.norm_eps,
            groups,
            cross_attention_dim: 0,
            heads: 0,
            use_linear_projection: c.use_linear_projection,
            only_cross_attention: false,
            downsample_padding: c.downsample_padding,
            output_scale_factor: 1.0,
        };

        let pad_in = (c.conv_in_kernel - 1) / 2;
        let conv_in = Conv2d::load(gpu, src, policy, "conv_in", c.in_channels, ch[0], c.conv_in_kernel, 1, pad_in)?;
        let time_proj = Timesteps { num_channels: ch[0], flip_sin_to_cos: c.flip_sin_to_cos, downscale_freq_shift: c.freq_shift };
        let time_embedding =
            TimestepEmbedding::load(gpu, src, policy, "time_embedding", ch[0], temb_dim, c.time_cond_proj_dim)?;

        let mut down_specs = Vec::with_capacity(n);
        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let s = BlockSpec {
                cross_attention: c.down_block_types[i] == "CrossAttnDownBlock2D",
                num_layers: layers[i],
                transformer_layers: per_layer(&tlayers[i], layers[i]),
                in_channels: if i == 0 { ch[0] } else { ch[i - 1] },
                out_channels: ch[i],
                resample: i + 1 < n,
                cross_attention_dim: cross[i],
                heads: heads[i],
                only_cross_attention: only_cross[i],
                ..base.clone()
            };
            down_blocks.push(DownBlock::load(gpu, src, policy, &format!("down_blocks.{i}"), &s)?);
            down_specs.push(s);
        }
        let mid_spec = BlockSpec {
            num_layers: 1,
            transformer_layers: per_layer(&tlayers[n - 1], 1),
            in_channels: ch[n - 1],
            out_channels: ch[n - 1],
            cross_attention_dim: cross[n - 1],
            heads: heads[n - 1],
            only_cross_attention: mid_only_cross,
            output_scale_factor: c.mid_block_scale_factor,
            ..base.clone()
        };
        let mid_block = MidBlock::load(gpu, src, policy, "mid_block", &mid_spec)?;

        let rev_t: Vec<PerBlock<usize>> = match &c.reverse_transformer_layers_per_block {
            Some(r) => r.clone(),
            None => tlayers.iter().rev().cloned().collect(),
        };
        if rev_t.len() != n {
            return Err(Error::Invalid(format!(
                "UNet config: reverse_transformer_layers_per_block has {} entries for {n} up blocks",
                rev_t.len()
            )));
        }
        let mut up_specs = Vec::with_capacity(n);
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[n - 1];
        for (i, rev) in rev_t.iter().enumerate() {
            let r = n - 1 - i; // the mirrored down level
            let prev = out_ch;
            out_ch = ch[r];
            let s = BlockSpec {
                cross_attention: c.up_block_types[i] == "CrossAttnUpBlock2D",
                num_layers: layers[r] + 1,
                transformer_layers: per_layer(rev, layers[r] + 1),
                in_channels: ch[r.saturating_sub(1)],
                out_channels: out_ch,
                prev_output_channel: prev,
                resample: i + 1 < n,
                cross_attention_dim: cross[r],
                heads: heads[r],
                only_cross_attention: only_cross[r],
                ..base.clone()
            };
            up_blocks.push(UpBlock::load(gpu, src, policy, &format!("up_blocks.{i}"), &s)?);
            up_specs.push(s);
        }
        let conv_norm_out = GroupNorm::load(gpu, src, policy, "conv_norm_out", groups, ch[0], c.norm_eps)?;
        let pad_out = (c.conv_out_kernel - 1) / 2;
        let conv_out = Conv2d::load(gpu, src, policy, "conv_out", ch[0], c.out_channels, c.conv_out_kernel, 1, pad_out)?;

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
        match &self.config.cross_attention_dim {
            PerBlock::One(d) => *d,
            PerBlock::Each(v) => v[0],
        }
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
