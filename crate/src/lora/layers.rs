//! The layers of a loaded model (module path → weight shape) and the check of an adapter file
//! against them.

use super::{BaseModel, Delta, DoraKind, Factor, LayerAdapter, LoraFile, Target};
use crate::error::{Error, Result};
use crate::io::RangeRead;
use crate::model::checkpoint::{Checkpoint, Component};
use crate::model::config::PipelineConfig;
use serde::Serialize;
use std::collections::BTreeMap;

/// The weight shape of one adaptable module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerShape {
    /// Weight [out_features, in_features].
    Linear { in_features: usize, out_features: usize },
    /// Weight [out_channels, in_channels, kernel, kernel].
    Conv { in_channels: usize, out_channels: usize, kernel: usize },
    /// GroupNorm / LayerNorm: weight and bias [channels].
    Norm { channels: usize },
}

impl LayerShape {
    /// The shape of a module's `weight`: 2-D linear, 4-D square convolution, 1-D norm.
    pub fn from_weight_shape(shape: &[usize]) -> Option<Self> {
        match *shape {
            [out, inp] => Some(LayerShape::Linear { in_features: inp, out_features: out }),
            [out, inp, kh, kw] if kh == kw => Some(LayerShape::Conv { in_channels: inp, out_channels: out, kernel: kh }),
            [c] => Some(LayerShape::Norm { channels: c }),
            _ => None,
        }
    }

    /// The weight's shape.
    pub fn weight_shape(&self) -> Vec<usize> {
        match *self {
            LayerShape::Linear { in_features, out_features } => vec![out_features, in_features],
            LayerShape::Conv { in_channels, out_channels, kernel } => vec![out_channels, in_channels, kernel, kernel],
            LayerShape::Norm { channels } => vec![channels],
        }
    }

    /// Output features / channels.
    pub fn out_dim(&self) -> usize {
        match *self {
            LayerShape::Linear { out_features, .. } => out_features,
            LayerShape::Conv { out_channels, .. } => out_channels,
            LayerShape::Norm { channels } => channels,
        }
    }

    /// Input features / channels.
    pub fn in_dim(&self) -> usize {
        match *self {
            LayerShape::Linear { in_features, .. } => in_features,
            LayerShape::Conv { in_channels, .. } => in_channels,
            LayerShape::Norm { channels } => channels,
        }
    }

    /// Kernel size (1 for linear layers and norms).
    pub fn kernel(&self) -> usize {
        match *self {
            LayerShape::Conv { kernel, .. } => kernel,
            _ => 1,
        }
    }

    /// Columns of the weight's 2-D view: in · k · k (1 for norms).
    pub fn cols(&self) -> usize {
        match self {
            LayerShape::Norm { .. } => 1,
            _ => self.in_dim() * self.kernel() * self.kernel(),
        }
    }

    /// "linear 320→640", "3×3 convolution 320→640", "norm of 320 channels".
    pub fn describe(&self) -> String {
        match *self {
            LayerShape::Linear { in_features, out_features } => format!("linear {in_features}→{out_features}"),
            LayerShape::Conv { in_channels, out_channels, kernel } => {
                format!("{kernel}×{kernel} convolution {in_channels}→{out_channels}")
            }
            LayerShape::Norm { channels } => format!("norm of {channels} channels"),
        }
    }
}

/// One module of a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    pub shape: LayerShape,
    /// Whether the module has a bias.
    pub bias: bool,
}

/// The adaptable modules of a model's UNet and text encoder, with its configuration (whose
/// block numbering maps CompVis names in adapter files).
#[derive(Clone, Debug)]
pub struct ModelLayers {
    pub config: PipelineConfig,
    layers: BTreeMap<(Target, String), LayerInfo>,
}

impl ModelLayers {
    /// No layers yet.
    pub fn new(config: PipelineConfig) -> Self {
        ModelLayers { config, layers: BTreeMap::new() }
    }

    /// Adds (or replaces) a module.
    pub fn insert(&mut self, target: Target, module: impl Into<String>, info: LayerInfo) {
        self.layers.insert((target, module.into()), info);
    }

    /// The module `module` of `target`.
    pub fn get(&self, target: Target, module: &str) -> Option<&LayerInfo> {
        self.layers.get(&(target, module.to_string()))
    }

    /// Every module, sorted by target and path.
    pub fn iter(&self) -> impl Iterator<Item = (Target, &str, &LayerInfo)> {
        self.layers.iter().map(|((t, m), i)| (*t, m.as_str(), i))
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// The modules of a checkpoint's UNet and text encoder from their weight names and shapes
    /// (headers only): 2-D weights are linear layers, 4-D square ones convolutions, 1-D norms.
    /// Embedding tables are not adaptable layers and are left out.
    pub fn from_checkpoint<R: RangeRead>(ck: &Checkpoint<R>) -> Result<Self> {
        let mut out = ModelLayers::new(ck.config.clone());
        for (target, component) in [(Target::Unet, Component::Unet), (Target::TextEncoder, Component::TextEncoder)] {
            let w = ck.weights(component);
            let names: Vec<&str> = w.names().collect();
            for name in &names {
                let Some(module) = name.strip_suffix(".weight") else { continue };
                if module.contains(".embeddings.") {
                    continue;
                }
                let Some(shape) = LayerShape::from_weight_shape(&w.shape(name)?) else { continue };
                let bias = names.binary_search(&format!("{module}.bias").as_str()).is_ok();
                out.insert(target, module, LayerInfo { shape, bias });
            }
        }
        Ok(out)
    }

    /// What the model is, from its cross-attention width.
    pub fn describe(&self) -> String {
        let width = self.config.unet.cross_attention_dim.at(0);
        let family = match width {
            768 => "Stable Diffusion 1.x",
            1024 => "Stable Diffusion 2.x",
            2048 => "SDXL",
            _ => "a Stable Diffusion-style model",
        };
        format!("{family} (cross-attention width {width})")
    }
}

/// The outcome of checking a file against a model that it fits (at least partly).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MatchReport {
    /// Adapter layers for components this engine has.
    pub total: usize,
    pub matched: usize,
    /// Matched / total per target.
    pub by_target: Vec<(Target, usize, usize)>,
    /// Keys of layers naming modules the model does not have (ignored when applied).
    pub unmatched: Vec<String>,
    /// Layers for components the engine does not have (SDXL's second text encoder).
    pub other_components: usize,
    /// Set when not every layer matched.
    pub warning: Option<String>,
}

const EXAMPLES: usize = 3;

fn examples(keys: &[&str]) -> String {
    let shown: Vec<String> = keys.iter().take(EXAMPLES).map(|k| format!("`{k}`")).collect();
    let more = keys.len().saturating_sub(EXAMPLES);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// Checks every adapter layer of `file` against `layers`: layers whose module exists must fit
/// its shape exactly (else an [`Error::Format`] naming the file and key); a file none of whose
/// layers fit, or one made for SDXL, is an error with counts, examples and what the file seems
/// to be for; layers naming modules the model lacks are reported in a warning.
pub fn match_model(file: &LoraFile, layers: &ModelLayers) -> Result<MatchReport> {
    let mut matched = 0;
    let mut unmatched: Vec<&str> = Vec::new();
    let mut misfit: Vec<(&LayerAdapter, String)> = Vec::new();
    let mut by_target: BTreeMap<Target, (usize, usize)> = BTreeMap::new();
    for l in &file.layers {
        let entry = by_target.entry(l.target).or_default();
        entry.1 += 1;
        match layers.get(l.target, &l.module) {
            None => unmatched.push(&l.key),
            Some(info) => match check_fit(l, &info.shape) {
                Ok(()) => {
                    matched += 1;
                    entry.0 += 1;
                }
                Err(m) => misfit.push((l, m)),
            },
        }
    }
    let total = file.layers.len();
    let foreign = file.base == BaseModel::Sdxl && layers.config.unet.cross_attention_dim.at(0) != 2048;
    if matched == 0 || foreign {
        let mut what = format!(
            "none of its {total} adapter layers can be applied to this model, {}: ",
            layers.describe()
        );
        if foreign && matched > 0 {
            what = format!(
                "it is not for this model, {} ({matched} of its {total} layers happen to fit by name and shape): ",
                layers.describe()
            );
        }
        let mut parts = Vec::new();
        if !misfit.is_empty() {
            let keys: Vec<&str> = misfit.iter().map(|(l, _)| l.key.as_str()).collect();
            parts.push(format!("{} name modules it has but with other shapes ({})", misfit.len(), examples(&keys)));
        }
        if !unmatched.is_empty() {
            parts.push(format!("{} name modules it does not have ({})", unmatched.len(), examples(&unmatched)));
        }
        if !file.other_components.is_empty() {
            parts.push(format!("{} adapt a second text encoder", file.other_components.len()));
        }
        let seems = match (&file.base, &file.base_reason) {
            (BaseModel::Unknown, _) => String::new(),
            (b, Some(r)) => format!("; the file seems to be for {} ({r})", b.describe()),
            (b, None) => format!("; the file seems to be for {}", b.describe()),
        };
        return Err(Error::Format {
            file: file.file.clone(),
            tensor: None,
            message: format!("{what}{}{seems}", parts.join("; ")),
        });
    }
    if let Some((l, m)) = misfit.first() {
        return Err(Error::Format {
            file: file.file.clone(),
            tensor: Some(l.key.clone()),
            message: format!(
                "{m} ({} of the file's {total} layers do not fit this model, {})",
                misfit.len(),
                layers.describe()
            ),
        });
    }
    let warning = (!unmatched.is_empty() || !file.other_components.is_empty()).then(|| {
        let mut w = format!("{matched} of {total} adapter layers match this model");
        if !unmatched.is_empty() {
            w += &format!("; {} name modules it does not have and are ignored ({})", unmatched.len(), examples(&unmatched));
        }
        if !file.other_components.is_empty() {
            w += &format!("; {} adapt a second text encoder (SDXL) and are ignored", file.other_components.len());
        }
        w
    });
    Ok(MatchReport {
        total,
        matched,
        by_target: by_target.into_iter().map(|(t, (m, n))| (t, m, n)).collect(),
        unmatched: unmatched.into_iter().map(str::to_string).collect(),
        other_components: file.other_components.len(),
        warning,
    })
}

/// Whether adapter `l` fits a module of `shape`; the error says how it does not.
pub(crate) fn check_fit(l: &LayerAdapter, shape: &LayerShape) -> std::result::Result<(), String> {
    let m = &l.module;
    let kernel_name = |k: usize| if k == 1 { "linear (or 1×1)".to_string() } else { format!("{k}×{k} convolution") };
    if let LayerShape::Norm { channels } = *shape {
        return match &l.delta {
            Delta::Norm { weight, bias } => {
                let n = weight.as_ref().or(bias.as_ref()).map_or(channels, |t| t.numel());
                if n == channels {
                    Ok(())
                } else {
                    Err(format!("norm diffs have {n} channels but `{m}` has {channels}"))
                }
            }
            d => Err(format!("a {:?} adapter cannot apply to `{m}`, a norm layer", d.algorithm())),
        };
    }
    let (out, inp, k) = (shape.out_dim(), shape.in_dim(), shape.kernel());
    // The adapter's [rows, cols] and, where it says so, its kernel.
    let (rows, cols, adapter_k): (usize, usize, Option<usize>) = match &l.delta {
        Delta::LowRank { down, up, mid, .. } => {
            let ak = mid.as_ref().map_or(down.dim(2), |t| t.dim(2));
            let ak = if down.ndim() == 4 || mid.is_some() { ak } else { 1 };
            (up.dim(0), down.dim(1) * ak * ak, Some(ak))
        }
        Delta::LoHa { w1a, w1b, t1, .. } => match t1 {
            Some(t) => (w1a.dim(1), w1b.dim(1) * t.dim(2) * t.dim(3), Some(t.dim(2))),
            None => (w1a.dim(0), w1b.cols(), None),
        },
        Delta::LoKr { w1, w2, t2, .. } => {
            let dims = |f: &Factor| match f {
                Factor::Full(w) => (w.dim(0), w.cols()),
                Factor::LowRank { a, b } => (a.dim(0), b.cols()),
            };
            let (a, c) = dims(w1);
            let (b, n) = match (w2, t2) {
                (Factor::LowRank { a, b }, Some(t)) => (a.dim(1), b.dim(1) * t.dim(2) * t.dim(3)),
                _ => dims(w2),
            };
            (a * b, c * n, None)
        }
        Delta::Ia3 { weight, on_input } => {
            let (want, what) = if *on_input { (inp, "input") } else { (out, "output") };
            return if weight.numel() == want {
                Ok(())
            } else {
                Err(format!("IA³ vector has {} values but `{m}` has {want} {what} channels", weight.numel()))
            };
        }
        Delta::Full { diff, .. } => (diff.dim(0), diff.cols(), (diff.ndim() == 4).then(|| diff.dim(2))),
        Delta::Norm { .. } => return Err(format!("norm diffs cannot apply to `{m}`, a {}", shape.describe())),
    };
    if let Some(ak) = adapter_k {
        if ak != k {
            return Err(format!("is a {} adapter but `{m}` is a {}", kernel_name(ak), shape.describe()));
        }
    }
    if rows != out {
        return Err(format!("has {rows} outputs but `{m}` ({}) has {out}", shape.describe()));
    }
    if cols != shape.cols() {
        return Err(if adapter_k.is_some() || cols % (k * k) != 0 {
            format!("takes {} inputs but `{m}` ({}) takes {inp}", cols / (k * k).max(1), shape.describe())
        } else {
            format!("has {cols} input columns but `{m}` ({}) has {}", shape.describe(), shape.cols())
        });
    }
    if let Some(d) = &l.dora {
        let (want, what) = match d.kind {
            DoraKind::Lycoris { on_output: false } => (inp, "input"),
            _ => (out, "output"),
        };
        if d.magnitude.numel() != want {
            return Err(format!("DoRA magnitude has {} values but `{m}` has {want} {what} channels", d.magnitude.numel()));
        }
    }
    Ok(())
}
