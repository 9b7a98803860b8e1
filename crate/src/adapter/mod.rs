//! Unmerged adapters on a loaded model: installing the layers of any number of adapter files
//! into a model's [`Linear`](crate::nn::Linear) / [`Conv2d`](crate::nn::Conv2d) / norm layers,
//! and changing their strengths.
//!
//! The base weights are never touched: each adapted layer gets a [`LayerAdapters`] (its packed
//! data on the GPU, `crate::ops::adapter`) that the kernels read beside the base weight. A
//! strength change rewrites each affected layer's small dynamic region (no upload of adapter
//! weights, no pipeline change); a layer whose adapters are all at strength 0 runs the plain
//! kernel, so the output equals the base model's bit for bit. Installing a different set of
//! adapters rebuilds only the adapter data.

pub mod build;
pub mod fuse;

use crate::error::{Error, Result};
use crate::gpu::{Gpu, GpuBuffer};
use crate::lora::{Delta, LayerAdapter, LoraFile, Target};
use crate::nn::{LayerMut, VisitLayers};
use crate::ops::adapter::{self, Dynamic, Layout, Operands, Shape, Static, TermKind};
use crate::ops::elementwise::{add, scale};
use crate::quant::DType;
use crate::tensor::Tensor;
use build::{Built, Contribution};
use std::collections::HashMap;
use std::sync::Arc;

/// The kind of weight an adapter applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    Linear,
    /// A convolution with `taps = kh·kw` weights per input channel.
    Conv { taps: usize },
}

/// One layer's installed adapters. Clones share the GPU data (a model reloaded from its
/// weights gets the same adapters back without rebuilding them).
#[derive(Clone)]
pub struct LayerAdapters {
    shape: Shape,
    layout: Layout,
    data: Arc<GpuBuffer>,
    /// Stacked down projections: `[R, K]` (linear) or `[R, Cin, kh, kw]` (convolution).
    down: Option<Tensor>,
    contributions: Vec<(usize, Contribution)>,
    active: bool,
}

impl LayerAdapters {
    /// Whether any adapter on the layer has a non-zero strength.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The stacked down projection, when the layer has a low-rank part.
    pub fn down(&self) -> Option<&Tensor> {
        self.down.as_ref()
    }

    /// Kernel operands with this call's low-rank activations.
    pub fn operands<'a>(&'a self, lowrank: Option<&'a Tensor>) -> Operands<'a> {
        Operands { data: &self.data, params: self.layout.params, lowrank }
    }

    /// GPU bytes held.
    pub fn bytes(&self) -> u64 {
        self.data.size() + self.down.as_ref().map_or(0, |d| d.bytes())
    }

    /// Rewrites the dynamic region for these strengths (one per adapter index).
    fn set_strengths(&mut self, gpu: &Gpu, strengths: &[f32]) -> Result<()> {
        let d = dynamic(&self.shape, &self.contributions, strengths);
        self.active = self.contributions.iter().any(|(i, _)| strengths.get(*i).copied().unwrap_or(0.0) != 0.0);
        let words = adapter::dynamic_words(&self.shape, &self.layout, &d)?;
        if !words.is_empty() {
            gpu.write(&self.data, 0, bytemuck::cast_slice(&words))?;
        }
        Ok(())
    }
}

/// The dynamic values for these strengths.
fn dynamic(shape: &Shape, contributions: &[(usize, Contribution)], strengths: &[f32]) -> Dynamic {
    let mut d = Dynamic {
        col_scale: vec![0.0; shape.rank],
        terms: shape.terms.iter().map(|&(_, row, col)| (0.0, row.then(|| vec![1.0; shape.n]), col.then(|| vec![1.0; shape.k]))).collect(),
        // W₀'s scale is row[n] + col[k]: the 1 lives in the row part when there is one.
        base_row: shape.base_row.then(|| vec![1.0; shape.n]),
        base_col: shape.base_col.then(|| vec![if shape.base_row { 0.0 } else { 1.0 }; shape.k]),
        bias: shape.bias.then(|| vec![0.0; shape.n]),
    };
    for (idx, c) in contributions {
        let s = strengths.get(*idx).copied().unwrap_or(0.0);
        if s == 0.0 {
            // Off (DoRA's formulas do not vanish at s = 0; strength 0 means no adapter).
            continue;
        }
        match c {
            Contribution::LowRank { first, len, scale } => d.col_scale[*first..first + len].fill(scale * s),
            Contribution::Term { term, scale } => d.terms[*term].0 = scale * s,
            // Adapters that rescale W₀ stack additively: each adds (its scale − 1).
            Contribution::Ia3 { w, on_input } => {
                let v = if *on_input { d.base_col.as_mut() } else { d.base_row.as_mut() };
                if let Some(v) = v {
                    v.iter_mut().zip(w).for_each(|(x, w)| *x += s * w);
                }
            }
            Contribution::Bias { b } => {
                if let Some(v) = d.bias.as_mut() {
                    v.iter_mut().zip(b).for_each(|(x, b)| *x += s * b);
                }
            }
            Contribution::Dora { term, scale, kind, magnitude, norms } => {
                let Some(norms) = norms else { continue };
                let (base, ts, tv) = build::dora_vectors(*kind, magnitude, norms, *scale, s);
                let per_in = matches!(kind, crate::lora::DoraKind::Lycoris { on_output: false });
                let taps = if per_in { shape.k / magnitude.len().max(1) } else { 1 };
                let expand = |v: Vec<f32>| -> Vec<f32> {
                    if per_in {
                        v.iter().flat_map(|&x| std::iter::repeat_n(x, taps)).collect()
                    } else {
                        v
                    }
                };
                let (base, tv) = (expand(base), expand(tv));
                d.terms[*term].0 = ts;
                let slot = if per_in { &mut d.terms[*term].2 } else { &mut d.terms[*term].1 };
                if let Some(v) = slot {
                    v.iter_mut().zip(&tv).for_each(|(x, t)| *x *= t);
                }
                let bv = if per_in { d.base_col.as_mut() } else { d.base_row.as_mut() };
                if let Some(v) = bv {
                    v.iter_mut().zip(&base).for_each(|(x, b)| *x += b - 1.0);
                }
            }
        }
    }
    d
}

/// A norm layer's adapted affine parameters.
#[derive(Clone)]
pub struct NormAdapters {
    /// Effective parameters for the current strengths.
    pub weight: Tensor,
    pub bias: Tensor,
    base_weight: Tensor,
    base_bias: Tensor,
    deltas: Vec<(usize, Option<Tensor>, Option<Tensor>)>,
    active: bool,
}

impl NormAdapters {
    pub fn is_active(&self) -> bool {
        self.active
    }

    fn update(&mut self, gpu: &Gpu, strengths: &[f32]) -> Result<()> {
        let (base_w, base_b) = (&self.base_weight, &self.base_bias);
        let (mut w, mut b) = (None::<Tensor>, None::<Tensor>);
        self.active = false;
        for (idx, dw, db) in &self.deltas {
            let s = strengths.get(*idx).copied().unwrap_or(0.0);
            if s == 0.0 {
                continue;
            }
            self.active = true;
            for (acc, base, d) in [(&mut w, base_w, dw), (&mut b, base_b, db)] {
                if let Some(d) = d {
                    let cur = acc.take().map_or_else(|| Ok(base.clone()), Ok::<Tensor, Error>)?;
                    *acc = Some(add(gpu, &cur, &scale(gpu, d, s)?)?);
                }
            }
        }
        self.weight = w.unwrap_or_else(|| base_w.clone());
        self.bias = b.unwrap_or_else(|| base_b.clone());
        Ok(())
    }
}

/// What [`install`] did to one model component.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InstallReport {
    /// Adapted layers.
    pub layers: usize,
    /// Adapter layers (over all files) that found their module.
    pub matched: usize,
    /// Adapter layers whose module the model does not have, per file: (file, examples).
    pub unmatched: Vec<(String, usize, Vec<String>)>,
    /// GPU bytes of adapter data.
    pub bytes: u64,
}

/// Installs the layers of `files` that target `target` into `model` (replacing whatever was
/// installed), at `strengths` (one per file). Layers of the model without adapters are left
/// plain. Layers the model does not have are counted in the report.
pub async fn install(
    gpu: &Gpu,
    model: &mut dyn VisitLayers,
    target: Target,
    files: &[&LoraFile],
    strengths: &[f32],
) -> Result<InstallReport> {
    let mut by_module: HashMap<&str, Vec<(usize, &LayerAdapter)>> = HashMap::new();
    for (i, f) in files.iter().enumerate() {
        for a in f.layers.iter().filter(|a| a.target == target) {
            by_module.entry(a.module.as_str()).or_default().push((i, a));
        }
    }
    // DoRA renormalises with the base weight's norms: read those (dequantized) weights first.
    let dora: std::collections::HashSet<&str> =
        by_module.iter().filter(|(_, l)| l.iter().any(|(_, a)| a.dora.is_some())).map(|(m, _)| *m).collect();
    let mut to_read: Vec<(String, Tensor)> = vec![];
    model.visit_layers(&mut |layer| match layer {
        LayerMut::Linear(l) if dora.contains(l.name.as_str()) => to_read.push((l.name.clone(), l.weight.clone())),
        LayerMut::Conv2d(c) if dora.contains(c.name.as_str()) => to_read.push((c.name.clone(), c.weight.clone())),
        _ => {}
    });
    let mut base: HashMap<String, Vec<f32>> = HashMap::new();
    for (name, w) in to_read {
        base.insert(name, w.to_f32(gpu).await?);
    }

    let mut report = InstallReport::default();
    let mut found: std::collections::HashSet<String> = Default::default();
    let mut failure: Option<Error> = None;
    model.visit_layers(&mut |layer| {
        if failure.is_some() {
            return;
        }
        let name = layer.name().to_string();
        let list = by_module.get(name.as_str());
        let res = match layer {
            LayerMut::Linear(l) => {
                l.adapters = None;
                match list {
                    Some(list) => install_weighted(gpu, &l.weight, l.bias.is_some(), LayerKind::Linear, list, strengths, base.get(&name))
                        .map(|a| l.adapters = Some(a)),
                    None => Ok(()),
                }
            }
            LayerMut::Conv2d(c) => {
                c.adapters = None;
                let taps = c.weight.shape()[2..].iter().product();
                match list {
                    Some(list) => install_weighted(gpu, &c.weight, c.bias.is_some(), LayerKind::Conv { taps }, list, strengths, base.get(&name))
                        .map(|a| c.adapters = Some(a)),
                    None => Ok(()),
                }
            }
            LayerMut::GroupNorm(g) => {
                g.adapters = None;
                match list {
                    Some(list) => install_norm(gpu, &g.weight, &g.bias, list, strengths).map(|a| g.adapters = Some(a)),
                    None => Ok(()),
                }
            }
            LayerMut::LayerNorm(g) => {
                g.adapters = None;
                match list {
                    Some(list) => install_norm(gpu, &g.weight, &g.bias, list, strengths).map(|a| g.adapters = Some(a)),
                    None => Ok(()),
                }
            }
        };
        match res {
            Ok(()) => {
                if let Some(list) = list {
                    report.layers += 1;
                    report.matched += list.len();
                    found.insert(name);
                }
            }
            Err(e) => failure = Some(e),
        }
    });
    if let Some(e) = failure {
        clear(model);
        return Err(e);
    }
    for (i, f) in files.iter().enumerate() {
        let missing: Vec<String> = f
            .layers
            .iter()
            .filter(|a| a.target == target && !found.contains(&a.module))
            .map(|a| a.key.clone())
            .collect();
        if !missing.is_empty() {
            report.unmatched.push((files[i].file.clone(), missing.len(), missing.into_iter().take(5).collect()));
        }
    }
    model.visit_layers(&mut |layer| {
        report.bytes += match layer {
            LayerMut::Linear(l) => l.adapters.as_ref().map_or(0, |a| a.bytes()),
            LayerMut::Conv2d(c) => c.adapters.as_ref().map_or(0, |a| a.bytes()),
            _ => 0,
        }
    });
    Ok(report)
}

/// The adapters installed in a model, by layer, to attach to a fresh copy of the same model.
#[derive(Clone, Default)]
pub struct Installed {
    weighted: HashMap<String, LayerAdapters>,
    norms: HashMap<String, NormAdapters>,
}

impl Installed {
    pub fn is_empty(&self) -> bool {
        self.weighted.is_empty() && self.norms.is_empty()
    }

    /// Sets the strength of each file (see [`set_strengths`]); attach the result to the model.
    pub fn set_strengths(&mut self, gpu: &Gpu, strengths: &[f32]) -> Result<()> {
        self.set_strengths_by_layer(gpu, strengths, &|_, _| 1.0)
    }

    /// As [`set_strengths`](Self::set_strengths), each file's strength multiplied per layer by
    /// `factor(layer name, file index)` (per-block weights, [`crate::lora::blocks`]).
    pub fn set_strengths_by_layer(&mut self, gpu: &Gpu, strengths: &[f32], factor: &dyn Fn(&str, usize) -> f32) -> Result<()> {
        for (name, a) in self.weighted.iter_mut() {
            a.set_strengths(gpu, &layer_strengths(strengths, name, factor))?;
        }
        for (name, a) in self.norms.iter_mut() {
            a.update(gpu, &layer_strengths(strengths, name, factor))?;
        }
        Ok(())
    }
}

/// Copies (sharing GPU data) of the adapters installed in `model`.
pub fn snapshot(model: &mut dyn VisitLayers) -> Installed {
    let mut out = Installed::default();
    model.visit_layers(&mut |layer| match layer {
        LayerMut::Linear(l) => {
            if let Some(a) = &l.adapters {
                out.weighted.insert(l.name.clone(), a.clone());
            }
        }
        LayerMut::Conv2d(c) => {
            if let Some(a) = &c.adapters {
                out.weighted.insert(c.name.clone(), a.clone());
            }
        }
        LayerMut::GroupNorm(g) => {
            if let Some(a) = &g.adapters {
                out.norms.insert(g.name.clone(), a.clone());
            }
        }
        LayerMut::LayerNorm(g) => {
            if let Some(a) = &g.adapters {
                out.norms.insert(g.name.clone(), a.clone());
            }
        }
    });
    out
}

/// Attaches `installed` to a freshly loaded copy of the model it was taken from.
pub fn attach(model: &mut dyn VisitLayers, installed: &Installed) {
    model.visit_layers(&mut |layer| match layer {
        LayerMut::Linear(l) => l.adapters = installed.weighted.get(&l.name).cloned(),
        LayerMut::Conv2d(c) => c.adapters = installed.weighted.get(&c.name).cloned(),
        LayerMut::GroupNorm(g) => g.adapters = installed.norms.get(&g.name).cloned(),
        LayerMut::LayerNorm(g) => g.adapters = installed.norms.get(&g.name).cloned(),
    });
}

/// Removes every adapter from `model`.
pub fn clear(model: &mut dyn VisitLayers) {
    model.visit_layers(&mut |layer| match layer {
        LayerMut::Linear(l) => l.adapters = None,
        LayerMut::Conv2d(c) => c.adapters = None,
        LayerMut::GroupNorm(g) => g.adapters = None,
        LayerMut::LayerNorm(g) => g.adapters = None,
    });
}

/// Sets the strength of each installed file (indices as given to [`install`]): rewrites small
/// per-layer regions only.
pub fn set_strengths(gpu: &Gpu, model: &mut dyn VisitLayers, strengths: &[f32]) -> Result<()> {
    set_strengths_by_layer(gpu, model, strengths, &|_, _| 1.0)
}

/// Each file's strength times `factor(layer name, file index)`.
fn layer_strengths(strengths: &[f32], name: &str, factor: &dyn Fn(&str, usize) -> f32) -> Vec<f32> {
    strengths.iter().enumerate().map(|(i, s)| s * factor(name, i)).collect()
}

/// As [`set_strengths`], each file's strength multiplied per layer by `factor(layer name, file
/// index)`: per-block weights ([`crate::lora::blocks`]) are this, a uniform write per layer.
pub fn set_strengths_by_layer(
    gpu: &Gpu,
    model: &mut dyn VisitLayers,
    strengths: &[f32],
    factor: &dyn Fn(&str, usize) -> f32,
) -> Result<()> {
    let mut failure = None;
    model.visit_layers(&mut |layer| {
        if failure.is_some() {
            return;
        }
        let s = layer_strengths(strengths, layer.name(), factor);
        let r = match layer {
            LayerMut::Linear(l) => l.adapters.as_mut().map_or(Ok(()), |a| a.set_strengths(gpu, &s)),
            LayerMut::Conv2d(c) => c.adapters.as_mut().map_or(Ok(()), |a| a.set_strengths(gpu, &s)),
            LayerMut::GroupNorm(g) => g.adapters.as_mut().map_or(Ok(()), |a| a.update(gpu, &s)),
            LayerMut::LayerNorm(g) => g.adapters.as_mut().map_or(Ok(()), |a| a.update(gpu, &s)),
        };
        if let Err(e) = r {
            failure = Some(e);
        }
    });
    failure.map_or(Ok(()), Err)
}

#[allow(clippy::too_many_arguments)]
fn install_weighted(
    gpu: &Gpu,
    weight: &Tensor,
    has_bias: bool,
    kind: LayerKind,
    list: &[(usize, &LayerAdapter)],
    strengths: &[f32],
    base: Option<&Vec<f32>>,
) -> Result<LayerAdapters> {
    let n = weight.dim(0);
    let k = weight.numel() / n.max(1);
    let dense = if weight.dtype() == DType::F32 { TermKind::DenseF32 } else { TermKind::DenseF16 };
    let Built { down, up_cols, rank, terms, mut contributions } = build::build(kind, n, k, list, dense, has_bias)?;
    let taps = match kind {
        LayerKind::Linear => 1,
        LayerKind::Conv { taps } => taps,
    };
    for (_, c) in contributions.iter_mut() {
        if let Contribution::Dora { term, kind, norms, .. } = c {
            let w0 = base.ok_or_else(|| Error::Invalid("DoRA needs the base weight".into()))?;
            *norms = Some(build::dora_norms(w0, &terms[*term].1, n, k, taps, *kind));
        }
    }
    let has = |f: &dyn Fn(&Contribution) -> bool| contributions.iter().any(|(_, c)| f(c));
    let dora_axis = |c: &Contribution, t: usize, per_in: bool| {
        matches!(c, Contribution::Dora { term, kind, .. } if *term == t
            && per_in == matches!(kind, crate::lora::DoraKind::Lycoris { on_output: false }))
    };
    let shape = Shape {
        n,
        k,
        rank,
        terms: terms
            .iter()
            .enumerate()
            .map(|(t, (kind, _, _))| (*kind, has(&|c| dora_axis(c, t, false)), has(&|c| dora_axis(c, t, true))))
            .collect(),
        base_row: has(&|c| {
            matches!(c, Contribution::Ia3 { on_input: false, .. })
                || matches!(c, Contribution::Dora { kind, .. } if !matches!(kind, crate::lora::DoraKind::Lycoris { on_output: false }))
        }),
        base_col: has(&|c| {
            matches!(c, Contribution::Ia3 { on_input: true, .. })
                || matches!(c, Contribution::Dora { kind: crate::lora::DoraKind::Lycoris { on_output: false }, .. })
        }),
        bias: has(&|c| matches!(c, Contribution::Bias { .. })),
    };
    let layout = shape.layout()?;
    let st = Static {
        up: build::stack_up(&up_cols, n, rank),
        terms: terms.into_iter().map(|(_, m0, m1)| (m0, m1)).collect(),
    };
    let mut words = adapter::dynamic_words(&shape, &layout, &dynamic(&shape, &contributions, strengths))?;
    words.extend(adapter::static_words(&shape, &layout, &st)?);
    // Shared by the copies of a layer's adapters (not across threads on wasm32, where GPU
    // handles are not Send).
    #[allow(clippy::arc_with_non_send_sync)]
    let data = Arc::new(gpu.upload(bytemuck::cast_slice(&words), "adapter data")?);
    let down = if rank > 0 {
        let dshape = match kind {
            LayerKind::Linear => vec![rank, k],
            LayerKind::Conv { .. } => {
                let mut s = weight.shape().to_vec();
                s[0] = rank;
                s
            }
        };
        Some(Tensor::from_f32(gpu, &dshape, &down)?)
    } else {
        None
    };
    let active = contributions.iter().any(|(i, _)| strengths.get(*i).copied().unwrap_or(0.0) != 0.0);
    Ok(LayerAdapters { shape, layout, data, down, contributions, active })
}

fn install_norm(
    gpu: &Gpu,
    w: &Tensor,
    b: &Tensor,
    list: &[(usize, &LayerAdapter)],
    strengths: &[f32],
) -> Result<NormAdapters> {
    let c = w.numel();
    let mut deltas = vec![];
    for &(idx, a) in list {
        let Delta::Norm { weight, bias } = &a.delta else {
            return Err(Error::Format {
                file: String::new(),
                tensor: Some(a.key.clone()),
                message: format!("a {} adapter on a normalisation layer", a.delta.algorithm().name()),
            });
        };
        let up = |t: &Option<crate::lora::HostTensor>| -> Result<Option<Tensor>> {
            match t {
                Some(t) if t.numel() == c => Ok(Some(Tensor::from_f32(gpu, &[c], &t.data)?)),
                Some(t) => Err(Error::Format {
                    file: String::new(),
                    tensor: Some(a.key.clone()),
                    message: format!("norm diff has {} values, the layer has {c} channels", t.numel()),
                }),
                None => Ok(None),
            }
        };
        deltas.push((idx, up(weight)?, up(bias)?));
    }
    let mut n = NormAdapters {
        weight: w.clone(),
        bias: b.clone(),
        base_weight: w.clone(),
        base_bias: b.clone(),
        deltas,
        active: false,
    };
    n.update(gpu, strengths)?;
    Ok(n)
}
