//! The weight (and bias) a stack of adapters gives a layer at given strengths: the CPU
//! definition the GPU path and `loralab merge` follow.

use super::{Delta, Dora, DoraKind, HostTensor, LayerAdapter, LayerShape};
use crate::error::{Error, Result};

fn invalid(message: String) -> Error {
    Error::Invalid(message)
}

/// The weight and bias of a layer with `adapters` applied at their strengths, accumulated in
/// f64. Adapters stack additively, each contributing what it changes relative to the *base*
/// weight (what diffusers / PEFT and LyCORIS do with several adapters active on one module):
///
/// `W' = W + Σᵢ (Wᵢ(sᵢ) − W)`, `b' = b + Σᵢ Δbᵢ(sᵢ)`
///
/// where `Wᵢ(s)` is the weight adapter i alone gives at strength s, with the semantics of the
/// library that writes that kind of file (ΔW includes the file's scale):
///
/// - LoRA / LoCon / LoHa / LoKr: `W + s·ΔW` (kohya, LyCORIS, PEFT alike).
/// - LyCORIS `full`: `W + s·diff`, `b + s·diff_b` (the bias diff is dropped when the layer has
///   no bias, as LyCORIS does). Norm layers: `w + s·w_norm`, `b + s·b_norm`.
/// - (IA)³ (LyCORIS `IA3Module`, weight-merge forward): `W ⊙ (1 + s·w)` with w broadcast over
///   the output channels (rows), or over the input channels when `on_input`; the bias is
///   unchanged.
/// - DoRA from PEFT (`lora_magnitude_vector`; diffusers scales PEFT's `scaling` by the
///   strength): `V = W + s·ΔW`, `Wᵢ(s) = m ⊙ V / ‖V‖`, the norm taken per output channel over
///   all its inputs (and kernel taps), no epsilon. At s ≠ 0 the weight is always renormalised
///   to m, so as s → 0 it tends to `m ⊙ W / ‖W‖`, not W.
/// - DoRA from LyCORIS (`dora_scale`; `weight_decompose` with the multiplier): `V = W + ΔW`
///   (ΔW at the file's scale, *not* multiplied by s), `f = m / (‖V‖ + ε)` with ε = f32's
///   machine epsilon and the norm per output channel (or per input channel over outputs and
///   taps, for `[1, in, …]` magnitudes), `Wᵢ(s) = V ⊙ (s·(f − 1) + 1)`. The strength only
///   scales the renormalisation: at s → 0 the weight tends to `W + ΔW`, not W.
///
/// Strength 0 means the adapter is off (it contributes nothing), so `s = 0` gives the base
/// exactly for every algorithm; for the two DoRA variants this is not the limit s → 0 of the
/// library formulas above, which is why it is stated here.
///
/// `base` has the layer's weight shape; `base_bias` its bias when it has one.
pub fn merged_weight(
    adapters: &[(&LayerAdapter, f32)],
    base: &HostTensor,
    base_bias: Option<&HostTensor>,
    layer: &LayerShape,
) -> Result<(HostTensor, Option<HostTensor>)> {
    let shape = layer.weight_shape();
    if base.shape != shape && base.numel() != shape.iter().product::<usize>() {
        return Err(invalid(format!(
            "base weight has shape {:?} but the layer is {} ({shape:?})",
            base.shape,
            layer.describe()
        )));
    }
    let (rows, cols) = (layer.out_dim(), layer.cols());
    let w: Vec<f64> = base.data.iter().map(|&v| v as f64).collect();
    let mut acc = w.clone();
    if let Some(b) = base_bias {
        if b.numel() != rows {
            return Err(invalid(format!("base bias has {} values but the layer has {rows} outputs", b.numel())));
        }
    }
    for &(a, s) in adapters {
        if s == 0.0 {
            continue;
        }
        let s = s as f64;
        let named = |e: Error| match e {
            Error::Shape { message, .. } | Error::Invalid(message) => {
                invalid(format!("adapter `{}` on `{}`: {message}", a.key, a.module))
            }
            other => other,
        };
        match &a.delta {
            Delta::Ia3 { .. } if matches!(layer, LayerShape::Norm { .. }) => {
                return Err(invalid(format!("adapter `{}`: IA³ cannot apply to `{}`, a norm layer", a.key, a.module)));
            }
            Delta::Ia3 { weight, on_input } => {
                let n = if *on_input { layer.in_dim() } else { rows };
                if weight.numel() != n {
                    return Err(invalid(format!(
                        "adapter `{}`: IA³ vector has {} values but `{}` has {n} channels there",
                        a.key,
                        weight.numel(),
                        a.module
                    )));
                }
                let taps = cols / layer.in_dim().max(1);
                for (idx, (o, &wv)) in acc.iter_mut().zip(&w).enumerate() {
                    let ch = if *on_input { (idx % cols) / taps } else { idx / cols };
                    *o += wv * s * weight.data[ch] as f64;
                }
            }
            delta => {
                let dw = delta.delta_weight(layer).map_err(named)?;
                let dw: Vec<f64> = dw.data.iter().map(|&v| v as f64).collect();
                match &a.dora {
                    None => {
                        for (o, d) in acc.iter_mut().zip(&dw) {
                            *o += s * d;
                        }
                    }
                    Some(dora) => {
                        let wi = dora_weight(dora, &w, &dw, s, rows, cols, layer).map_err(named)?;
                        for ((o, wi), wv) in acc.iter_mut().zip(&wi).zip(&w) {
                            *o += wi - wv;
                        }
                    }
                }
            }
        }
    }
    let weight = HostTensor { shape: base.shape.clone(), data: acc.into_iter().map(|v| v as f32).collect() };
    let bias = base_bias.map(|b| merged_bias(adapters, b)).transpose()?;
    Ok((weight, bias))
}

/// The bias a stack of adapters gives a layer whose bias is `base_bias` (the bias part of
/// [`merged_weight`]): `b + Σᵢ sᵢ·Δbᵢ` over LyCORIS `diff_b` and `b_norm`; the other
/// algorithms leave the bias unchanged.
pub fn merged_bias(adapters: &[(&LayerAdapter, f32)], base_bias: &HostTensor) -> Result<HostTensor> {
    let mut b: Vec<f64> = base_bias.data.iter().map(|&v| v as f64).collect();
    for &(a, s) in adapters {
        let Some(db) = a.delta.delta_bias().filter(|_| s != 0.0) else { continue };
        if db.numel() != b.len() {
            return Err(invalid(format!(
                "adapter `{}`: bias diff has {} values but `{}` has {} outputs",
                a.key,
                db.numel(),
                a.module,
                b.len()
            )));
        }
        for (o, &d) in b.iter_mut().zip(&db.data) {
            *o += s as f64 * d as f64;
        }
    }
    Ok(HostTensor { shape: base_bias.shape.clone(), data: b.into_iter().map(|v| v as f32).collect() })
}

/// The weight one DoRA adapter gives at strength `s` (see [`merged_weight`]); `w` and `dw` are
/// [rows, cols] (cols = in · k · k).
fn dora_weight(
    dora: &Dora,
    w: &[f64],
    dw: &[f64],
    s: f64,
    rows: usize,
    cols: usize,
    layer: &LayerShape,
) -> Result<Vec<f64>> {
    let m: Vec<f64> = dora.magnitude.data.iter().map(|&v| v as f64).collect();
    match dora.kind {
        DoraKind::Peft => {
            if m.len() != rows {
                return Err(invalid(format!("DoRA magnitude has {} values for {rows} output channels", m.len())));
            }
            let mut v: Vec<f64> = w.iter().zip(dw).map(|(a, b)| a + s * b).collect();
            for (r, row) in v.chunks_mut(cols).enumerate() {
                let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
                let f = m[r] / norm;
                row.iter_mut().for_each(|x| *x *= f);
            }
            Ok(v)
        }
        DoraKind::Lycoris { on_output } => {
            let eps = f32::EPSILON as f64;
            let mut v: Vec<f64> = w.iter().zip(dw).map(|(a, b)| a + b).collect();
            let factor = |norm: f64, mag: f64| s * (mag / (norm + eps) - 1.0) + 1.0;
            if on_output {
                if m.len() != rows {
                    return Err(invalid(format!("dora_scale has {} values for {rows} output channels", m.len())));
                }
                for (r, row) in v.chunks_mut(cols).enumerate() {
                    let f = factor(row.iter().map(|x| x * x).sum::<f64>().sqrt(), m[r]);
                    row.iter_mut().for_each(|x| *x *= f);
                }
            } else {
                let inp = layer.in_dim();
                let taps = cols / inp.max(1);
                if m.len() != inp {
                    return Err(invalid(format!("dora_scale has {} values for {inp} input channels", m.len())));
                }
                let mut sq = vec![0.0f64; inp];
                for (idx, x) in v.iter().enumerate() {
                    sq[(idx % cols) / taps] += x * x;
                }
                let f: Vec<f64> = sq.iter().zip(&m).map(|(q, &mag)| factor(q.sqrt(), mag)).collect();
                for (idx, x) in v.iter_mut().enumerate() {
                    *x *= f[(idx % cols) / taps];
                }
            }
            Ok(v)
        }
    }
}
