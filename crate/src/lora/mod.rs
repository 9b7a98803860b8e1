//! LoRA-family adapter files: reading every format users bring (kohya sd-scripts, LyCORIS,
//! diffusers / PEFT, legacy diffusers attention processors), normalising their layer names to
//! the engine's module paths, their metadata, checking them against a model, and the CPU
//! reference of what each adapter does to a layer's weight.
//!
//! - [`read_lora`] / [`read_lora_for`]: a safetensors file → [`LoraFile`] (one
//!   [`LayerAdapter`] per adapted module, with its [`Delta`], optional [`Dora`], and the scale
//!   the file implies).
//! - [`ModelLayers`] + [`match_model`]: every adapter layer against the shapes of a loaded
//!   model; nothing matching (an SDXL file on SD1.5) is an error with counts and examples.
//! - [`Delta::delta_weight`] and [`merged_weight`]: ΔW and the adapted weight, accumulated in
//!   f64; the definition the GPU path is tested against.
//! - [`fuse`]: merging adapters into a model and writing it, one tensor at a time.
//! - [`svd`], [`spectrum`], [`resize`]: ΔW's singular values and heat map, and reducing an
//!   adapter's rank by SVD (kohya's resize); [`params`]: trained values per algorithm;
//!   [`blocks`]: per-block strengths (A1111's LoRA Block Weight).
//!
//! Formats and the maths follow the writers' own code: LyCORIS 4.1.3 `modules/*.py` and
//! `functional/*.py`, PEFT 0.21 `tuners/lora/{layer,dora,variants}.py`, diffusers 0.42
//! `loaders/lora_conversion_utils.py` and `utils/peft_utils.py` (see the docs of each item).

pub mod blocks;
mod delta;
pub mod fuse;
mod layers;
mod merge;
mod metadata;
mod names;
mod parse;
pub mod params;
mod pattern;
pub mod resize;
pub mod spectrum;
mod summary;
pub mod svd;

pub use layers::{match_model, LayerInfo, LayerShape, MatchReport, ModelLayers};
pub use merge::{merged_bias, merged_weight};
pub use metadata::{Metadata, PeftConfig};
pub use names::{kohya_to_dotted, BaseModel};
pub use parse::{open_lora, read_lora, read_lora_for};
pub use summary::{BlockCount, Summary, ValueCount};

use crate::error::{Error, Result};
use serde::Serialize;

/// The model component an adapter layer belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    TextEncoder,
    Unet,
}

impl Target {
    /// The diffusers component folder name (`text_encoder`, `unet`).
    pub fn name(self) -> &'static str {
        match self {
            Target::TextEncoder => "text_encoder",
            Target::Unet => "unet",
        }
    }
}

/// A tensor held on the host as f32 values, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A tensor of `shape` holding `data`; errors when the lengths disagree.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(Error::Invalid(format!(
                "tensor of shape {shape:?} needs {numel} values but {} were given",
                data.len()
            )));
        }
        Ok(HostTensor { shape, data })
    }

    /// All zeros.
    pub fn zeros(shape: Vec<usize>) -> Self {
        let numel = shape.iter().product();
        HostTensor { shape, data: vec![0.0; numel] }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Number of dimensions.
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }

    /// Size of dimension `i` (1 past the last dimension, like broadcasting).
    pub fn dim(&self, i: usize) -> usize {
        self.shape.get(i).copied().unwrap_or(1)
    }

    /// The product of the dimensions after the first (columns of the 2-D view).
    pub fn cols(&self) -> usize {
        self.shape.iter().skip(1).product()
    }
}

/// One Kronecker factor of a LoKr adapter: a full matrix, or a low-rank pair whose matrix is
/// `a · b` (LyCORIS `lokr_w*_a` [rows, r] · `lokr_w*_b` [r, cols…]). With a Tucker core
/// (`lokr_t2`) the second factor's pair is `a` [r, rows], `b` [r, cols] and the matrix is
/// `Σ_ij t2[i,j,…] a[i,p] b[j,q]` (LyCORIS `rebuild_tucker`).
#[derive(Clone, Debug, PartialEq)]
pub enum Factor {
    Full(HostTensor),
    LowRank { a: HostTensor, b: HostTensor },
}

impl Factor {
    /// The rank of a low-rank pair (rows of `b`, the convention LyCORIS' bypass path and
    /// ComfyUI use; also correct for the Tucker layout).
    pub fn rank(&self) -> Option<usize> {
        match self {
            Factor::Full(_) => None,
            Factor::LowRank { b, .. } => Some(b.dim(0)),
        }
    }
}

/// What an adapter layer adds to (or does with) its module's weight.
#[derive(Clone, Debug, PartialEq)]
pub enum Delta {
    /// LoRA / LoCon. Linear: down [r,in], up [out,r]. Conv: down [r,in,k,k], up [out,r,1,1];
    /// Tucker: down [r,in,1,1], mid [r,r,k,k], up [out,r,1,1]. scale = alpha / r (alpha = r
    /// when absent or 0; PEFT: `lora_alpha / r`, or `/ √r` with `use_rslora`).
    /// ΔW = scale · up · down (with Tucker: `Σ_ab up[o,a] mid[a,b,kh,kw] down[b,i]`).
    LowRank { down: HostTensor, up: HostTensor, mid: Option<HostTensor>, scale: f32 },
    /// LoHa: ΔW = scale · (w1a·w1b) ⊙ (w2a·w2b), scale = alpha / r with r = rows of `w1b`.
    /// Without Tucker, w*a [out,r] and w*b [r, in·k·k]; with Tucker (`hada_t1/t2` [r,r,k,k]),
    /// w*a [r,out], w*b [r,in] and each half is `Σ_ij t[i,j,…] wb[j,q] wa[i,p]`.
    LoHa {
        w1a: HostTensor,
        w1b: HostTensor,
        w2a: HostTensor,
        w2b: HostTensor,
        t1: Option<HostTensor>,
        t2: Option<HostTensor>,
        scale: f32,
    },
    /// LoKr: ΔW = scale · kron(w1, w2) (w1 [a,c], w2 [b,d(,k,k)], out = a·b, in = c·d).
    /// scale = 1 when both factors are full matrices, else alpha / r (r = the low-rank
    /// factor's rank; alpha = r when absent or 0), as LyCORIS `LokrModule`.
    LoKr { w1: Factor, w2: Factor, t2: Option<HostTensor>, scale: f32 },
    /// (IA)³: the weight is scaled per output channel (or per input channel when `on_input`):
    /// W' = W ⊙ (1 + strength · weight). `weight` holds one value per channel.
    Ia3 { weight: HostTensor, on_input: bool },
    /// LyCORIS `full`: dense ΔW (`diff`) and Δbias (`diff_b`).
    Full { diff: HostTensor, diff_b: Option<HostTensor> },
    /// GroupNorm / LayerNorm parameter diffs (LyCORIS w_norm / b_norm).
    Norm { weight: Option<HostTensor>, bias: Option<HostTensor> },
}

impl Delta {
    /// The algorithm this delta is.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Delta::LowRank { down, mid, .. } => {
                let k = if mid.is_some() { 2 } else { down.dim(2).max(down.dim(3)) };
                if down.ndim() == 4 && k > 1 {
                    Algorithm::LoCon
                } else {
                    Algorithm::Lora
                }
            }
            Delta::LoHa { .. } => Algorithm::LoHa,
            Delta::LoKr { .. } => Algorithm::LoKr,
            Delta::Ia3 { .. } => Algorithm::Ia3,
            Delta::Full { .. } => Algorithm::Full,
            Delta::Norm { .. } => Algorithm::Norm,
        }
    }

    /// The rank of the low-rank factorisation, where there is one (LoKr: the low-rank
    /// factor's; `None` when both LoKr factors are full).
    pub fn rank(&self) -> Option<usize> {
        match self {
            Delta::LowRank { down, .. } => Some(down.dim(0)),
            Delta::LoHa { w1b, .. } => Some(w1b.dim(0)),
            Delta::LoKr { w1, w2, .. } => w1.rank().or_else(|| w2.rank()),
            _ => None,
        }
    }

    /// The scale the file implies (alpha / r and the LoKr rule); 1 for the algorithms
    /// without one.
    pub fn scale(&self) -> f32 {
        match self {
            Delta::LowRank { scale, .. } | Delta::LoHa { scale, .. } | Delta::LoKr { scale, .. } => *scale,
            _ => 1.0,
        }
    }
}

/// Which library's DoRA a magnitude comes from; they differ in the norm axis, the epsilon and
/// what the strength scales (see [`merged_weight`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DoraKind {
    /// PEFT `lora_magnitude_vector`: one magnitude per output channel.
    Peft,
    /// LyCORIS `dora_scale`: per output channel (`[out, 1, …]`, `wd_on_out`) or per input
    /// channel (`[1, in, …]`).
    Lycoris { on_output: bool },
}

/// DoRA's magnitude vector: after ΔW is added, the weight is renormalised to this magnitude.
#[derive(Clone, Debug, PartialEq)]
pub struct Dora {
    /// One value per output (or input) channel, flattened.
    pub magnitude: HostTensor,
    pub kind: DoraKind,
}

/// One adapted module of a file.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerAdapter {
    pub target: Target,
    /// Our module path — exactly the prefix the engine's nn::Linear / nn::Conv2d / norms are
    /// loaded under: UNet "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    /// "down_blocks.0.resnets.0.conv1", "mid_block.attentions.0.proj_in", "conv_in",
    /// "time_embedding.linear_1"; text encoder "text_model.encoder.layers.0.self_attn.q_proj",
    /// "text_model.encoder.layers.0.mlp.fc1".
    pub module: String,
    /// The key prefix as written in the file (for messages).
    pub key: String,
    pub delta: Delta,
    pub dora: Option<Dora>,
    /// The alpha that gave the scale (`None` for algorithms without one, or when the file
    /// gives none and alpha = r applies).
    pub alpha: Option<f32>,
}

impl LayerAdapter {
    /// The block the module belongs to, for summaries: `down_blocks.1`, `mid_block`,
    /// `up_blocks.0`, `conv_in`, `time_embedding`; `encoder.layers.3` for the text encoder.
    pub fn block(&self) -> String {
        names::block_of(&self.module)
    }
}

/// The layout family a file's keys follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// kohya sd-scripts: `lora_unet_*` / `lora_te_*` with `lora_down` / `lora_up` / `alpha`.
    Kohya,
    /// LyCORIS: the kohya prefixes with LoHa / LoKr / IA³ / full / norm / DoRA tensors.
    Lycoris,
    /// diffusers / PEFT: `unet.<module>.lora_A.weight` / `lora_B.weight`.
    Peft,
    /// diffusers attention processors before PEFT: `…processor.to_q_lora.down.weight`,
    /// `…lora_linear_layer.down.weight`.
    DiffusersLegacy,
}

/// An adapter algorithm present in a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Low-rank on linear layers (and 1×1 convolutions).
    Lora,
    /// Low-rank on convolutions with a kernel larger than 1×1 (LoCon / LoRA-C3Lier).
    LoCon,
    LoHa,
    LoKr,
    Ia3,
    Full,
    Dora,
    Norm,
}

impl Algorithm {
    /// The usual name (`LoRA`, `LoCon`, `LoHa`, `LoKr`, `IA3`, `full`, `DoRA`, `norm`).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Lora => "LoRA",
            Algorithm::LoCon => "LoCon",
            Algorithm::LoHa => "LoHa",
            Algorithm::LoKr => "LoKr",
            Algorithm::Ia3 => "IA3",
            Algorithm::Full => "full",
            Algorithm::Dora => "DoRA",
            Algorithm::Norm => "norm",
        }
    }
}

impl Format {
    /// The usual name (`kohya`, `LyCORIS`, `PEFT`, `diffusers (legacy)`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Kohya => "kohya",
            Format::Lycoris => "LyCORIS",
            Format::Peft => "PEFT",
            Format::DiffusersLegacy => "diffusers (legacy)",
        }
    }
}

/// A parsed adapter file.
#[derive(Clone, Debug)]
pub struct LoraFile {
    /// The name the file was opened under.
    pub file: String,
    pub format: Format,
    /// Sorted, each once.
    pub algorithms: Vec<Algorithm>,
    pub layers: Vec<LayerAdapter>,
    pub metadata: Metadata,
    /// Keys that are not part of any adapter this engine understands (they are ignored).
    pub unrecognised: Vec<String>,
    /// Key prefixes of adapter layers for components this engine does not have (SDXL's second
    /// text encoder, `lora_te2_*`); ignored.
    pub other_components: Vec<String>,
    /// The base model the keys, widths and metadata point to.
    pub base: BaseModel,
    /// What `base` was concluded from.
    pub base_reason: Option<String>,
    /// The file's size in bytes.
    pub bytes: u64,
    /// Storage types of the tensors (`F16`, `F32`, `BF16`), sorted, each once.
    pub dtypes: Vec<String>,
    /// Things worth telling the user that do not stop the file from loading.
    pub warnings: Vec<String>,
    /// Textual-inversion embeddings bundled in the file (A1111's `bundle_emb.<token>.*`,
    /// e.g. a trigger word learned with the adapter): loading the adapter makes their tokens
    /// usable in prompts.
    pub embeddings: Vec<crate::model::textual_inversion::TextualInversion>,
}

impl LoraFile {
    /// The layers of one target.
    pub fn layers_of(&self, target: Target) -> impl Iterator<Item = &LayerAdapter> {
        self.layers.iter().filter(move |l| l.target == target)
    }

    /// A short display name: the file name without directories and extension.
    pub fn display_name(&self) -> String {
        let base = self.file.rsplit(['/', '\\']).next().unwrap_or(&self.file);
        base.strip_suffix(".safetensors").unwrap_or(base).to_string()
    }
}
