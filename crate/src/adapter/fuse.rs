//! Fusing adapters into a loaded model's weights (diffusers' `fuse_lora`) and undoing it.
//!
//! Each adapted layer's weight is read back (dequantized), merged on the CPU with
//! [`crate::lora::merged_weight`] (the same definition the kernels follow unmerged) and stored
//! again in the layer's own type: on a quantized base that means dequantize, add, requantize,
//! and the rounding can swallow part of a small adapter — the report says how much (which is
//! why unmerged is the default). The original tensors are kept, so [`unfuse`] restores the base
//! bit for bit.

use crate::error::Result;
use crate::gpu::Gpu;
use crate::lora::{merged_weight, HostTensor, LayerAdapter, LayerShape, LoraFile, Target};
use crate::nn::{LayerMut, VisitLayers};
use crate::quant::{round_trip, DType};
use crate::tensor::Tensor;
use std::collections::HashMap;

/// The original parameters of fused layers, by module path: (weight, bias).
#[derive(Clone, Default)]
pub struct Originals(HashMap<String, (Tensor, Option<Tensor>)>);

impl Originals {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// What fusing did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FuseReport {
    /// Layers whose weights changed.
    pub layers: usize,
    /// Storage of the fused weights, when quantized: the largest share of a layer's adapter
    /// change that requantization lost (RMS of the rounding error over RMS of the change).
    pub worst_loss: Option<(String, f64)>,
}

impl FuseReport {
    /// A warning for the user when requantization lost a noticeable part of an adapter.
    pub fn warning(&self) -> Option<String> {
        let (layer, loss) = self.worst_loss.as_ref()?;
        (*loss > 0.05).then(|| {
            format!(
                "fusing into quantized weights lost up to {:.0} % of an adapter's change (layer `{layer}`); \
                 unmerged adapters (the default) or f16/f32 weights keep it whole",
                loss * 100.0
            )
        })
    }
}

enum Param {
    Weight(Tensor, Option<Tensor>),
    Norm(Tensor, Tensor),
}

/// Merges the layers of `files` targeting `target` at `strengths` into `model`'s weights and
/// removes any installed adapters. Returns the originals for [`unfuse`].
pub async fn fuse(
    gpu: &Gpu,
    model: &mut dyn VisitLayers,
    target: Target,
    files: &[&LoraFile],
    strengths: &[f32],
) -> Result<(Originals, FuseReport)> {
    let mut by_module: HashMap<&str, Vec<(&LayerAdapter, f32)>> = HashMap::new();
    for (f, &s) in files.iter().zip(strengths) {
        for a in f.layers.iter().filter(|a| a.target == target && s != 0.0) {
            by_module.entry(a.module.as_str()).or_default().push((a, s));
        }
    }
    let mut params: Vec<(String, Param)> = vec![];
    model.visit_layers(&mut |layer| {
        if !by_module.contains_key(layer.name()) {
            return;
        }
        let p = match layer {
            LayerMut::Linear(l) => (l.name.clone(), Param::Weight(l.weight.clone(), l.bias.clone())),
            LayerMut::Conv2d(c) => (c.name.clone(), Param::Weight(c.weight.clone(), c.bias.clone())),
            LayerMut::GroupNorm(g) => (g.name.clone(), Param::Norm(g.weight.clone(), g.bias.clone())),
            LayerMut::LayerNorm(g) => (g.name.clone(), Param::Norm(g.weight.clone(), g.bias.clone())),
        };
        params.push(p);
    });
    let mut report = FuseReport::default();
    let mut merged: HashMap<String, (Tensor, Option<Tensor>)> = HashMap::new();
    for (name, p) in &params {
        let list = &by_module[name.as_str()];
        let (w, b) = match p {
            Param::Weight(w, b) => (w, b.as_ref()),
            Param::Norm(w, b) => (w, Some(b)),
        };
        let shape = w.shape().to_vec();
        let layer = LayerShape::from_weight_shape(&shape)
            .ok_or_else(|| crate::error::Error::Invalid(format!("layer `{name}` has an unsupported weight shape {shape:?}")))?;
        let base = HostTensor::new(shape.clone(), w.to_f32(gpu).await?)?;
        let bias = match b {
            Some(b) => Some(HostTensor::new(vec![b.numel()], b.to_f32(gpu).await?)?),
            None => None,
        };
        let (mw, mb) = merged_weight(list, &base, bias.as_ref(), &layer)?;
        let dt = w.dtype();
        if dt.is_quantized() {
            let rows = shape[0];
            let cols = mw.numel() / rows.max(1);
            let q = round_trip(&mw.data, rows, cols, dt);
            let (mut err, mut change) = (0f64, 0f64);
            for ((m, q), b) in mw.data.iter().zip(&q).zip(&base.data) {
                err += ((m - q) as f64).powi(2);
                change += ((m - b) as f64).powi(2);
            }
            let loss = if change > 0.0 { (err / change).sqrt() } else { 0.0 };
            if report.worst_loss.as_ref().is_none_or(|(_, l)| loss > *l) {
                report.worst_loss = Some((name.clone(), loss));
            }
        }
        let nw = Tensor::from_f32_as(gpu, &shape, &mw.data, if shape.len() > 1 { dt } else { DType::F32 })?;
        let nb = match mb {
            Some(mb) => Some(Tensor::from_f32(gpu, &[mb.numel()], &mb.data)?),
            None => None,
        };
        merged.insert(name.clone(), (nw, nb));
    }
    let mut originals = Originals::default();
    model.visit_layers(&mut |layer| {
        let Some((w, b)) = merged.remove(layer.name()) else { return };
        match layer {
            LayerMut::Linear(l) => {
                l.adapters = None;
                let old = (std::mem::replace(&mut l.weight, w), if b.is_some() { std::mem::replace(&mut l.bias, b) } else { l.bias.clone() });
                originals.0.insert(l.name.clone(), old);
            }
            LayerMut::Conv2d(c) => {
                c.adapters = None;
                let old = (std::mem::replace(&mut c.weight, w), if b.is_some() { std::mem::replace(&mut c.bias, b) } else { c.bias.clone() });
                originals.0.insert(c.name.clone(), old);
            }
            LayerMut::GroupNorm(g) => {
                g.adapters = None;
                let nb = b.unwrap_or_else(|| g.bias.clone());
                originals.0.insert(g.name.clone(), (std::mem::replace(&mut g.weight, w), Some(std::mem::replace(&mut g.bias, nb))));
            }
            LayerMut::LayerNorm(g) => {
                g.adapters = None;
                let nb = b.unwrap_or_else(|| g.bias.clone());
                originals.0.insert(g.name.clone(), (std::mem::replace(&mut g.weight, w), Some(std::mem::replace(&mut g.bias, nb))));
            }
        }
    });
    super::clear(model);
    report.layers = originals.len();
    Ok((originals, report))
}

/// Puts the original weights back (adapters stay removed).
pub fn unfuse(model: &mut dyn VisitLayers, originals: &Originals) {
    model.visit_layers(&mut |layer| {
        let Some((w, b)) = originals.0.get(layer.name()) else { return };
        match layer {
            LayerMut::Linear(l) => {
                l.weight = w.clone();
                l.bias = b.clone();
            }
            LayerMut::Conv2d(c) => {
                c.weight = w.clone();
                c.bias = b.clone();
            }
            LayerMut::GroupNorm(g) => {
                g.weight = w.clone();
                if let Some(b) = b {
                    g.bias = b.clone();
                }
            }
            LayerMut::LayerNorm(g) => {
                g.weight = w.clone();
                if let Some(b) = b {
                    g.bias = b.clone();
                }
            }
        }
    });
}
