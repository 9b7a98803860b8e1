//! The CompVis → diffusers parameter names of single-file Stable Diffusion 1.x checkpoints,
//! following diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint` and
//! `convert_ldm_clip_checkpoint` (diffusers/loaders/single_file_utils.py), plus the older
//! diffusers folder names that mean the same parameters. The UNet's `input_blocks` /
//! `output_blocks` numbering comes from the configuration (levels and layers per block).

use super::Component;
use crate::error::{Error, Result};
use crate::model::config::{PipelineConfig, UNetConfig};

/// Per-configuration numbering of the CompVis UNet's `input_blocks` and `output_blocks`.
struct UNetNumbering {
    /// `input_blocks.i` → (level, resnet/attention index or None for the downsampler).
    input: Vec<(usize, Option<usize>)>,
    /// `output_blocks.i` → (up block, layer index, whether the layer ends with the upsampler).
    output: Vec<(usize, usize, bool)>,
}

impl UNetNumbering {
    fn new(cfg: &UNetConfig) -> Self {
        let n = cfg.levels();
        let mut input = vec![(0, None)]; // input_blocks.0 is conv_in
        for level in 0..n {
            for j in 0..cfg.layers_per_block(level) {
                input.push((level, Some(j)));
            }
            if level + 1 < n {
                input.push((level, None));
            }
        }
        let mut output = Vec::new();
        for up in 0..n {
            let layers = cfg.layers_per_block(n - 1 - up) + 1;
            for j in 0..layers {
                output.push((up, j, j + 1 == layers && up + 1 < n));
            }
        }
        UNetNumbering { input, output }
    }
}

/// What the mapping makes of one key of a single-file checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mapped {
    /// A parameter of `component` under its diffusers name; `squeeze` when the file stores a
    /// linear weight as a 1×1 convolution `[C, C, 1, 1]` that diffusers keeps as `[C, C]`.
    Param { component: Component, name: String, squeeze: bool },
    /// A key loaders ignore (schedule buffers, `position_ids`, EMA copies, ...).
    Ignored,
}

/// Renames the CompVis UNet resnet parts (`in_layers.0` → `norm1`, ...).
fn unet_resnet_part(rest: &str) -> Option<String> {
    const PARTS: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("emb_layers.1.", "time_emb_proj."),
        ("skip_connection.", "conv_shortcut."),
    ];
    PARTS.iter().find_map(|(from, to)| rest.strip_prefix(from).map(|r| format!("{to}{r}")))
}

/// Renames the CompVis VAE resnet parts (`nin_shortcut` → `conv_shortcut`).
fn vae_resnet_part(rest: &str) -> String {
    match rest.strip_prefix("nin_shortcut.") {
        Some(r) => format!("conv_shortcut.{r}"),
        None => rest.to_string(),
    }
}

/// Splits `"<index>.<rest>"`.
fn split_index(s: &str) -> Option<(usize, &str)> {
    let (i, rest) = s.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

/// Maps one key of a single-file CompVis checkpoint to its component and diffusers name.
/// `Ok(None)` means the key is not one this mapping knows (the caller decides whether that
/// matters); errors are keys whose block numbering does not fit the configuration.
pub fn compvis_to_diffusers(key: &str, cfg: &PipelineConfig) -> Result<Option<Mapped>> {
    const IGNORED: [&str; 4] = [
        "model_ema.",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.transformer.embeddings.position_ids",
        "cond_stage_model.transformer.text_projection",
    ];
    if IGNORED.iter().any(|p| key.starts_with(p)) || !key.contains('.') {
        // Schedule buffers (betas, alphas_cumprod, ...) are top-level names without a dot.
        return Ok(Some(Mapped::Ignored));
    }
    let param = |component, name: String, squeeze| Ok(Some(Mapped::Param { component, name, squeeze }));
    if let Some(rest) = key.strip_prefix("cond_stage_model.transformer.") {
        let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
        return param(Component::TextEncoder, format!("text_model.{rest}"), false);
    }
    if let Some(rest) = key.strip_prefix("first_stage_model.") {
        return Ok(vae_key(rest, cfg.vae.levels()).map(|(name, squeeze)| Mapped::Param {
            component: Component::Vae,
            name,
            squeeze,
        }));
    }
    if let Some(rest) = key.strip_prefix("model.diffusion_model.") {
        return unet_key(key, rest, &cfg.unet)
            .map(|o| o.map(|name| Mapped::Param { component: Component::Unet, name, squeeze: false }));
    }
    Ok(None)
}

fn unet_key(key: &str, rest: &str, cfg: &UNetConfig) -> Result<Option<String>> {
    let numbering = UNetNumbering::new(cfg);
    let mismatch = |what: &str, i: usize, count: usize| Error::Format {
        file: String::new(),
        tensor: Some(key.to_string()),
        message: format!(
            "{what}.{i} does not exist in a UNet with {} levels and layers_per_block {:?} ({count} {what}); \
             the checkpoint needs another configuration (pass its config folder)",
            cfg.levels(),
            cfg.layers_per_block
        ),
    };
    const FIXED: [(&str, &str); 4] = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    if let Some(name) = FIXED.iter().find_map(|(from, to)| rest.strip_prefix(from).map(|r| format!("{to}{r}"))) {
        return Ok(Some(name));
    }
    if let Some(r) = rest.strip_prefix("input_blocks.") {
        let Some((i, r)) = split_index(r) else { return Ok(None) };
        let &(level, layer) =
            numbering.input.get(i).ok_or_else(|| mismatch("input_blocks", i, numbering.input.len()))?;
        let Some((sub, r)) = split_index(r) else { return Ok(None) };
        return Ok(match (i, layer, sub) {
            (0, _, 0) => Some(format!("conv_in.{r}")),
            (0, _, _) => None,
            (_, None, 0) => r.strip_prefix("op.").map(|r| format!("down_blocks.{level}.downsamplers.0.conv.{r}")),
            (_, Some(j), 0) => unet_resnet_part(r).map(|p| format!("down_blocks.{level}.resnets.{j}.{p}")),
            (_, Some(j), 1) => Some(format!("down_blocks.{level}.attentions.{j}.{r}")),
            _ => None,
        });
    }
    if let Some(r) = rest.strip_prefix("middle_block.") {
        let Some((sub, r)) = split_index(r) else { return Ok(None) };
        return Ok(match sub {
            0 | 2 => unet_resnet_part(r).map(|p| format!("mid_block.resnets.{}.{p}", sub / 2)),
            1 => Some(format!("mid_block.attentions.0.{r}")),
            _ => return Err(mismatch("middle_block", sub, 3)),
        });
    }
    if let Some(r) = rest.strip_prefix("output_blocks.") {
        let Some((i, r)) = split_index(r) else { return Ok(None) };
        let &(up, j, upsample) =
            numbering.output.get(i).ok_or_else(|| mismatch("output_blocks", i, numbering.output.len()))?;
        let Some((sub, r)) = split_index(r) else { return Ok(None) };
        // Layer parts: 0 = resnet, then the transformer when the block has attention, then the
        // upsampler when the layer ends the block.
        let attn = cfg.up_has_attention(up);
        let upsampler_sub = if attn { 2 } else { 1 };
        return Ok(match sub {
            0 => unet_resnet_part(r).map(|p| format!("up_blocks.{up}.resnets.{j}.{p}")),
            1 if attn => Some(format!("up_blocks.{up}.attentions.{j}.{r}")),
            s if upsample && s == upsampler_sub => {
                r.strip_prefix("conv.").map(|r| format!("up_blocks.{up}.upsamplers.0.conv.{r}"))
            }
            _ => None,
        });
    }
    Ok(None)
}

/// `first_stage_model.` key (without the prefix) → (diffusers name, squeeze 1×1 conv).
fn vae_key(rest: &str, levels: usize) -> Option<(String, bool)> {
    const TOP: [&str; 2] = ["quant_conv.", "post_quant_conv."];
    const SAME: [&str; 2] = ["conv_in.", "conv_out."];
    let (coder, r) = rest.split_once('.')?;
    if coder != "encoder" && coder != "decoder" {
        return TOP.iter().any(|p| rest.starts_with(p)).then(|| (rest.to_string(), false));
    }
    if SAME.iter().any(|p| r.starts_with(p)) {
        return Some((rest.to_string(), false));
    }
    if let Some(p) = r.strip_prefix("norm_out.") {
        return Some((format!("{coder}.conv_norm_out.{p}"), false));
    }
    if let Some(m) = r.strip_prefix("mid.") {
        if let Some(p) = m.strip_prefix("block_1.") {
            return Some((format!("{coder}.mid_block.resnets.0.{}", vae_resnet_part(p)), false));
        }
        if let Some(p) = m.strip_prefix("block_2.") {
            return Some((format!("{coder}.mid_block.resnets.1.{}", vae_resnet_part(p)), false));
        }
        let p = m.strip_prefix("attn_1.")?;
        const ATTN: [(&str, &str); 5] =
            [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")];
        let (from, to) = ATTN.iter().find(|(from, _)| p.starts_with(from))?;
        let squeeze = *from != "norm.";
        return Some((format!("{coder}.mid_block.attentions.0.{to}{}", &p[from.len()..]), squeeze));
    }
    let (dir, new_dir) = if coder == "encoder" { ("down.", "down_blocks") } else { ("up.", "up_blocks") };
    let (i, p) = split_index(r.strip_prefix(dir)?)?;
    if i >= levels {
        return None;
    }
    // The decoder's `up.i` counts from the lowest resolution's opposite end.
    let block = if coder == "encoder" { i } else { levels - 1 - i };
    if let Some(p) = p.strip_prefix("block.") {
        let (j, p) = split_index(p)?;
        return Some((format!("{coder}.{new_dir}.{block}.resnets.{j}.{}", vae_resnet_part(p)), false));
    }
    let sampler = if coder == "encoder" { "downsample.conv." } else { "upsample.conv." };
    let kind = if coder == "encoder" { "downsamplers" } else { "upsamplers" };
    p.strip_prefix(sampler).map(|p| (format!("{coder}.{new_dir}.{block}.{kind}.0.conv.{p}"), false))
}

/// Names older diffusers folders use for the same parameter: VAE attention before diffusers
/// 0.14 (`query`/`key`/`value`/`proj_attn`) and text encoders written without `text_model.`
/// (transformers 5). Returns the folder-file name for a key found in a folder's file.
pub(super) fn folder_key_to_diffusers(component: Component, key: &str) -> String {
    match component {
        Component::TextEncoder if !key.starts_with("text_model.") && !key.starts_with("text_projection") => {
            format!("text_model.{key}")
        }
        Component::Vae if key.contains(".mid_block.attentions.0.") => {
            const OLD: [(&str, &str); 4] =
                [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")];
            let mut k = key.to_string();
            for (from, to) in OLD {
                k = k.replace(from, to);
            }
            k
        }
        _ => key.to_string(),
    }
}
