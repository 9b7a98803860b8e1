//! diffusers `UNet2DConditionModel` configuration (models/unets/unet_2d_condition.py).

use super::{check_at_most, check_list_len, err, parse, PerLevel, SampleSize, MAX_DEPTH, MAX_WIDTH};
use crate::error::{Error, Result};
use serde::Deserialize;

/// diffusers `UNet2DConditionModel` configuration (`unet/config.json`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    pub sample_size: Option<SampleSize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerLevel<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerLevel<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: PerLevel<usize>,
    pub transformer_layers_per_block: PerLevel<usize>,
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    pub encoder_hid_dim: Option<usize>,
    pub encoder_hid_dim_type: Option<String>,
    /// The number of heads when `num_attention_heads` is absent (diffusers' historical naming).
    pub attention_head_dim: PerLevel<usize>,
    pub num_attention_heads: Option<PerLevel<usize>>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub num_class_embeds: Option<usize>,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub resnet_skip_time_act: bool,
    pub resnet_out_scale_factor: f64,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    /// LCM-distilled UNets: width of the guidance-scale embedding added to the time embedding.
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub attention_type: String,
    pub class_embeddings_concat: bool,
    pub mid_block_only_cross_attention: Option<bool>,
    pub cross_attention_norm: Option<String>,
}

impl Default for UNetConfig {
    /// diffusers' constructor defaults.
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        UNetConfig {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: s(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: s(&["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
            only_cross_attention: PerLevel::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerLevel::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerLevel::One(1280),
            transformer_layers_per_block: PerLevel::One(1),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerLevel::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".into(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
        }
    }
}

pub const CROSS_ATTN_DOWN: &str = "CrossAttnDownBlock2D";
pub const DOWN: &str = "DownBlock2D";
pub const CROSS_ATTN_UP: &str = "CrossAttnUpBlock2D";
pub const UP: &str = "UpBlock2D";
pub const MID_CROSS_ATTN: &str = "UNetMidBlock2DCrossAttn";

impl UNetConfig {
    /// Stable Diffusion 1.5 (`stable-diffusion-v1-5/unet/config.json`).
    pub fn sd15() -> Self {
        UNetConfig {
            sample_size: Some(SampleSize::Square(64)),
            cross_attention_dim: PerLevel::One(768),
            ..Self::default()
        }
    }

    /// Stable Diffusion 2.1 (768, v-prediction: `stabilityai/stable-diffusion-2-1/unet/config.json`).
    pub fn sd21() -> Self {
        UNetConfig {
            sample_size: Some(SampleSize::Square(96)),
            cross_attention_dim: PerLevel::One(1024),
            attention_head_dim: PerLevel::Each(vec![5, 10, 20, 20]),
            use_linear_projection: true,
            upcast_attention: true,
            ..Self::default()
        }
    }

    /// Parses and validates `unet/config.json`; `file` names it in errors.
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let c: Self = parse(text, file)?;
        c.validate(file)?;
        Ok(c)
    }

    /// Number of resolution levels (entries of `block_out_channels`).
    pub fn levels(&self) -> usize {
        self.block_out_channels.len()
    }
    /// Resnets per down block at `level` (up blocks have one more).
    pub fn layers_per_block(&self, level: usize) -> usize {
        self.layers_per_block.at(level)
    }
    /// Attention heads at down `level` (the mid block uses the last level's).
    pub fn heads(&self, level: usize) -> usize {
        self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim).at(level)
    }
    /// Width of one attention head at down `level`.
    pub fn head_dim(&self, level: usize) -> usize {
        self.block_out_channels[level] / self.heads(level)
    }
    pub fn transformer_layers(&self, level: usize) -> usize {
        self.transformer_layers_per_block.at(level)
    }
    pub fn cross_attention_dim(&self, level: usize) -> usize {
        self.cross_attention_dim.at(level)
    }
    pub fn only_cross_attention(&self, level: usize) -> bool {
        self.only_cross_attention.at(level)
    }
    /// Whether down block `level` has transformer blocks.
    pub fn down_has_attention(&self, level: usize) -> bool {
        self.down_block_types[level] == CROSS_ATTN_DOWN
    }
    /// Whether up block `index` (0 = lowest resolution, as diffusers numbers them) has
    /// transformer blocks.
    pub fn up_has_attention(&self, index: usize) -> bool {
        self.up_block_types[index] == CROSS_ATTN_UP
    }
    /// Group-norm groups (`norm_num_groups`; validation refuses null, which diffusers reads as
    /// "no output norm").
    pub fn norm_groups(&self) -> usize {
        self.norm_num_groups.unwrap_or(32)
    }
    /// Width of the time embedding: `block_out_channels[0] * 4` (validation refuses a
    /// `time_embedding_dim`).
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim.unwrap_or(self.block_out_channels[0] * 4)
    }

    /// Checks that the configuration is one the engine can build.
    pub fn validate(&self, file: &str) -> Result<()> {
        let n = self.levels();
        if n == 0 {
            return Err(err(file, "block_out_channels", "is empty"));
        }
        if let Some(i) = self.block_out_channels.iter().position(|&c| c == 0) {
            return Err(err(file, "block_out_channels", format!("entry {i} is 0")));
        }
        for (field, v) in [("in_channels", self.in_channels), ("out_channels", self.out_channels)] {
            if v == 0 {
                return Err(err(file, field, "is 0"));
            }
            check_at_most(file, field, &[v], MAX_WIDTH)?;
        }
        check_at_most(file, "block_out_channels", &self.block_out_channels, MAX_WIDTH)?;
        for (field, types) in [("down_block_types", &self.down_block_types), ("up_block_types", &self.up_block_types)] {
            if types.len() != n {
                return Err(err(file, field, format!("has {} entries but block_out_channels has {n}", types.len())));
            }
        }
        if let Some((field, message)) = self.unsupported() {
            return Err(err(file, field, message));
        }
        for i in 0..n {
            if self.down_has_attention(i) != self.up_has_attention(n - 1 - i) {
                return Err(err(
                    file,
                    "up_block_types",
                    format!("entry {} does not mirror down_block_types entry {i}", n - 1 - i),
                ));
            }
        }
        check_list_len(file, "only_cross_attention", &self.only_cross_attention, n)?;
        check_list_len(file, "layers_per_block", &self.layers_per_block, n)?;
        check_list_len(file, "cross_attention_dim", &self.cross_attention_dim, n)?;
        check_list_len(file, "transformer_layers_per_block", &self.transformer_layers_per_block, n)?;
        check_list_len(file, "attention_head_dim", &self.attention_head_dim, n)?;
        if let Some(h) = &self.num_attention_heads {
            check_list_len(file, "num_attention_heads", h, n)?;
        }
        for (field, v) in [
            ("layers_per_block", &self.layers_per_block),
            ("cross_attention_dim", &self.cross_attention_dim),
            ("transformer_layers_per_block", &self.transformer_layers_per_block),
            ("attention_head_dim", &self.attention_head_dim),
        ] {
            if v.values().contains(&0) {
                return Err(err(file, field, "contains 0"));
            }
            let max = if matches!(field, "layers_per_block" | "transformer_layers_per_block") { MAX_DEPTH } else { MAX_WIDTH };
            check_at_most(file, field, &v.values(), max)?;
        }
        if let Some(h) = &self.num_attention_heads {
            check_at_most(file, "num_attention_heads", &h.values(), MAX_WIDTH)?;
        }
        let heads_field = if self.num_attention_heads.is_some() { "num_attention_heads" } else { "attention_head_dim" };
        for level in 0..n {
            let (c, h) = (self.block_out_channels[level], self.heads(level));
            if h == 0 || !c.is_multiple_of(h) {
                return Err(err(
                    file,
                    heads_field,
                    format!("{h} heads do not divide level {level}'s {c} channels (block_out_channels)"),
                ));
            }
        }
        let g = self.norm_groups();
        if g == 0 {
            return Err(err(file, "norm_num_groups", "is 0"));
        }
        if let Some(&c) = self.block_out_channels.iter().find(|&&c| !c.is_multiple_of(g)) {
            return Err(err(file, "norm_num_groups", format!("{g} groups do not divide {c} channels")));
        }
        if self.norm_eps.is_nan() || self.norm_eps <= 0.0 {
            return Err(err(file, "norm_eps", format!("{} is not positive", self.norm_eps)));
        }
        for (field, k) in [("conv_in_kernel", self.conv_in_kernel), ("conv_out_kernel", self.conv_out_kernel)] {
            if k % 2 == 0 {
                return Err(err(file, field, format!("{k} is not an odd kernel size")));
            }
        }
        Ok(())
    }

    /// Checks that the engine can run this configuration without naming a file, for a
    /// configuration built or changed in code (`UNet2DConditionModel::load` calls it): level
    /// counts and every setting [`Self::validate`] refuses as unsupported, as
    /// `Error::Invalid`. Sizes that contradict the weights are left to the weight loader.
    pub fn check_supported(&self) -> Result<()> {
        let n = self.levels();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Invalid(format!(
                "UNet config: {} down blocks, {} up blocks and {n} block_out_channels are not supported",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        match self.unsupported() {
            Some((field, message)) => {
                Err(Error::Invalid(format!("UNet config: field `{field}`: {message} (SD1.x/SD2.x UNets only)")))
            }
            None => Ok(()),
        }
    }

    /// The first setting outside what the engine implements (Stable Diffusion 1.x/2.x UNets):
    /// the field and why.
    fn unsupported(&self) -> Option<(&'static str, String)> {
        let not_one_of = |value: &str, allowed: &[&str]| {
            (!allowed.contains(&value))
                .then(|| format!("`{value}` is not supported (supported: {})", allowed.join(", ")))
        };
        let types = [
            ("down_block_types", &self.down_block_types, [CROSS_ATTN_DOWN, DOWN]),
            ("up_block_types", &self.up_block_types, [CROSS_ATTN_UP, UP]),
        ];
        for (field, list, allowed) in types {
            if let Some(m) = list.iter().find_map(|t| not_one_of(t, &allowed)) {
                return Some((field, m));
            }
        }
        if self.mid_block_type.as_deref() != Some(MID_CROSS_ATTN) {
            let m = format!("{:?} is not supported (supported: {MID_CROSS_ATTN})", self.mid_block_type);
            return Some(("mid_block_type", m));
        }
        fn set<T: std::fmt::Debug>(field: &'static str, v: &Option<T>, why: &str) -> Option<(&'static str, String)> {
            v.as_ref().map(|v| (field, format!("{v:?} is not supported: {why}")))
        }
        let sdxl = "SDXL-style added embeddings are not supported (Stable Diffusion 1.x/2.x only)";
        let class = "class-conditioned UNets are not supported";
        let proj = "encoder projections are not supported";
        let sd = "not used by Stable Diffusion 1.x/2.x";
        let found = None
            .or_else(|| set("addition_embed_type", &self.addition_embed_type, sdxl))
            .or_else(|| set("addition_time_embed_dim", &self.addition_time_embed_dim, sdxl))
            .or_else(|| set("class_embed_type", &self.class_embed_type, class))
            .or_else(|| set("num_class_embeds", &self.num_class_embeds, class))
            .or_else(|| {
                set("projection_class_embeddings_input_dim", &self.projection_class_embeddings_input_dim, class)
            })
            .or_else(|| set("encoder_hid_dim", &self.encoder_hid_dim, proj))
            .or_else(|| set("encoder_hid_dim_type", &self.encoder_hid_dim_type, proj))
            .or_else(|| {
                let why = "asymmetric UNets are not supported";
                set("reverse_transformer_layers_per_block", &self.reverse_transformer_layers_per_block, why)
            })
            .or_else(|| set("time_embedding_dim", &self.time_embedding_dim, sd))
            .or_else(|| set("time_embedding_act_fn", &self.time_embedding_act_fn, sd))
            .or_else(|| set("timestep_post_act", &self.timestep_post_act, sd))
            .or_else(|| set("cross_attention_norm", &self.cross_attention_norm, sd));
        if found.is_some() {
            return found;
        }
        if self.norm_num_groups.is_none() {
            return Some(("norm_num_groups", "null (no output group norm) is not supported".into()));
        }
        for (field, on) in [
            ("dual_cross_attention", self.dual_cross_attention),
            ("class_embeddings_concat", self.class_embeddings_concat),
            ("resnet_skip_time_act", self.resnet_skip_time_act),
        ] {
            if on {
                return Some((field, "true is not supported".into()));
            }
        }
        [
            ("act_fn", &self.act_fn, &["silu"]),
            ("resnet_time_scale_shift", &self.resnet_time_scale_shift, &["default"]),
            ("time_embedding_type", &self.time_embedding_type, &["positional"]),
            ("attention_type", &self.attention_type, &["default"]),
        ]
        .into_iter()
        .find_map(|(field, value, allowed)| not_one_of(value, allowed).map(|m| (field, m)))
    }
}
