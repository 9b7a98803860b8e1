//! Per-block adapter weights (A1111's LoRA Block Weight extension): a strength multiplier for
//! each block of the UNet, in the extension's 26-entry order `BASE, IN00…IN11, M00,
//! OUT00…OUT11` (CompVis `input_blocks.N`, `middle_block`, `output_blocks.N`; BASE is the text
//! encoder).
//!
//! Module paths map to blocks with the model's `layers_per_block`: for SD1.5,
//! `down_blocks.i.{resnets,attentions}.j` → `IN(1 + 3i + j)`, `down_blocks.i.downsamplers` →
//! `IN(3 + 3i)`, `up_blocks.i.{resnets,attentions}.j` → `OUT(3i + j)`, upsamplers →
//! `OUT(3i + 2)`, `conv_in` → IN00, `mid_block` → M00, `conv_norm_out` / `conv_out` → OUT11
//! (the CompVis `out.*` after the last output block) and `time_embedding` → BASE.
//!
//! The extension's 17-entry SD1.5 list names only the blocks holding attention layers
//! (`BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03…OUT11`); the blocks it leaves out get
//! weight 0 when it is expanded to 26 (as the ComfyUI Inspire pack's `expand_lbw` does; an
//! attention-only LoRA has no layers there).

use super::Target;
use crate::error::{Error, Result};
use crate::model::config::UNetConfig;

/// The 26 block names, in the extension's order.
pub const BLOCK_NAMES: [&str; 26] = [
    "BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "IN09", "IN10", "IN11", "M00",
    "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
];

/// The 17-entry SD1.5 list's blocks (indices into [`BLOCK_NAMES`]).
pub const LBW17: [usize; 17] = [0, 2, 3, 5, 6, 8, 9, 13, 17, 18, 19, 20, 21, 22, 23, 24, 25];

const MID: usize = 13;
const OUT0: usize = 14;

/// The coarse group of a layer: text encoder, UNet input, middle or output blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    Te,
    In,
    Mid,
    Out,
    /// UNet layers outside the three (`time_embedding`).
    Base,
}

impl Group {
    pub fn name(self) -> &'static str {
        match self {
            Group::Te => "te",
            Group::In => "in",
            Group::Mid => "mid",
            Group::Out => "out",
            Group::Base => "base",
        }
    }
}

/// The UNet's down-block depths (`layers_per_block` per level), which number the CompVis
/// blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockLayout {
    layers: Vec<usize>,
}

impl BlockLayout {
    pub fn new(cfg: &UNetConfig) -> Self {
        BlockLayout { layers: (0..cfg.levels()).map(|i| cfg.layers_per_block(i)).collect() }
    }

    /// SD1.x / 2.x: four levels of two.
    pub fn sd15() -> Self {
        BlockLayout { layers: vec![2; 4] }
    }

    /// The index into [`BLOCK_NAMES`] of a module.
    pub fn block(&self, target: Target, module: &str) -> usize {
        if target == Target::TextEncoder {
            return 0;
        }
        let parts: Vec<&str> = module.split('.').collect();
        let num = |s: Option<&&str>| s.and_then(|s| s.parse::<usize>().ok());
        let depth = |level: usize| self.layers.get(level).copied().unwrap_or(2);
        let n = self.layers.len();
        let idx = match parts.first().copied() {
            Some("conv_in") => 1,
            Some("mid_block") => MID,
            Some("conv_norm_out" | "conv_out") => OUT0 + 11,
            Some("down_blocks") => {
                let i = num(parts.get(1)).unwrap_or(0);
                let offset = 1 + (0..i).map(|l| depth(l) + 1).sum::<usize>();
                let j = match parts.get(2).copied() {
                    Some("downsamplers") => depth(i),
                    _ => num(parts.get(3)).unwrap_or(0),
                };
                1 + (offset + j).min(11)
            }
            Some("up_blocks") => {
                let i = num(parts.get(1)).unwrap_or(0);
                let rev = |u: usize| depth(n.saturating_sub(1 + u)) + 1;
                let offset: usize = (0..i).map(rev).sum();
                let j = match parts.get(2).copied() {
                    Some("upsamplers") => rev(i) - 1,
                    _ => num(parts.get(3)).unwrap_or(0),
                };
                OUT0 + (offset + j).min(11)
            }
            _ => 0,
        };
        idx
    }

    /// The coarse group of a module.
    pub fn group(&self, target: Target, module: &str) -> Group {
        if target == Target::TextEncoder {
            return Group::Te;
        }
        match self.block(target, module) {
            0 => Group::Base,
            i if i < MID => Group::In,
            MID => Group::Mid,
            _ => Group::Out,
        }
    }
}

/// A strength multiplier per block.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockWeights {
    pub weights: [f32; 26],
}

impl Default for BlockWeights {
    fn default() -> Self {
        BlockWeights { weights: [1.0; 26] }
    }
}

impl BlockWeights {
    /// One weight for the input blocks (IN00–IN11), one for the middle block and one for the
    /// output blocks (OUT00–OUT11); the text encoder and `time_embedding` keep 1.
    pub fn groups(input: f32, mid: f32, out: f32) -> Result<Self> {
        let mut w = [1.0; 26];
        w[1..MID].fill(input);
        w[MID] = mid;
        w[OUT0..].fill(out);
        BlockWeights::checked(w)
    }

    /// The extension's list: 17 entries (SD1.5, the blocks not listed get 0) or 26.
    pub fn from_list(list: &[f32]) -> Result<Self> {
        let mut w = [0.0; 26];
        match list.len() {
            26 => w.copy_from_slice(list),
            17 => LBW17.iter().zip(list).for_each(|(&i, &v)| w[i] = v),
            n => {
                return Err(Error::Invalid(format!(
                    "block weights: {n} values; expected 17 (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03…OUT11) or 26 (BASE, IN00…IN11, M00, OUT00…OUT11)"
                )))
            }
        }
        BlockWeights::checked(w)
    }

    fn checked(w: [f32; 26]) -> Result<Self> {
        match w.iter().position(|v| !v.is_finite()) {
            Some(i) => Err(Error::Invalid(format!("block weight {} is not a finite number", BLOCK_NAMES[i]))),
            None => Ok(BlockWeights { weights: w }),
        }
    }

    /// Whether every weight is 1.
    pub fn is_uniform(&self) -> bool {
        self.weights.iter().all(|&w| w == 1.0)
    }

    /// The weight of a module.
    pub fn weight(&self, layout: &BlockLayout, target: Target, module: &str) -> f32 {
        self.weights[layout.block(target, module)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_blocks_follow_the_compvis_numbering() {
        let l = BlockLayout::sd15();
        let b = |m: &str| BLOCK_NAMES[l.block(Target::Unet, m)];
        assert_eq!(b("conv_in"), "IN00");
        assert_eq!(b("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"), "IN01");
        assert_eq!(b("down_blocks.0.resnets.1.conv1"), "IN02");
        assert_eq!(b("down_blocks.0.downsamplers.0.conv"), "IN03");
        assert_eq!(b("down_blocks.1.attentions.1.proj_in"), "IN05");
        assert_eq!(b("down_blocks.3.resnets.1.conv2"), "IN11");
        assert_eq!(b("mid_block.attentions.0.proj_out"), "M00");
        assert_eq!(b("up_blocks.0.resnets.2.conv1"), "OUT02");
        assert_eq!(b("up_blocks.0.upsamplers.0.conv"), "OUT02");
        assert_eq!(b("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"), "OUT03");
        assert_eq!(b("up_blocks.3.attentions.2.proj_out"), "OUT11");
        assert_eq!(b("conv_out"), "OUT11");
        assert_eq!(b("time_embedding.linear_1"), "BASE");
        assert_eq!(BLOCK_NAMES[l.block(Target::TextEncoder, "text_model.encoder.layers.0.mlp.fc1")], "BASE");
        assert_eq!(l.group(Target::Unet, "down_blocks.2.attentions.0.proj_in"), Group::In);
        assert_eq!(l.group(Target::Unet, "up_blocks.2.attentions.0.proj_in"), Group::Out);
    }

    #[test]
    fn weight_lists() {
        let w = BlockWeights::groups(0.5, 1.0, 0.0).unwrap();
        assert_eq!(w.weights[0], 1.0);
        assert_eq!(w.weights[1..13], [0.5; 12]);
        assert_eq!(w.weights[14..], [0.0; 12]);
        let list: Vec<f32> = (0..17).map(|i| i as f32).collect();
        let w = BlockWeights::from_list(&list).unwrap();
        assert_eq!(w.weights[LBW17[7]], 7.0);
        assert_eq!(w.weights[BLOCK_NAMES.iter().position(|n| *n == "IN03").unwrap()], 0.0);
        assert_eq!(w.weights[25], 16.0);
        assert!(BlockWeights::from_list(&[1.0; 5]).is_err());
        assert!(BlockWeights::groups(f32::NAN, 1.0, 1.0).is_err());
        assert!(BlockWeights::default().is_uniform());
    }
}
