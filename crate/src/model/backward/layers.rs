//! The frozen layers of a loaded model as training uses them: the same weights (shared GPU
//! storage, in their loaded type), each linear or convolution layer linked to its trainable
//! adapter when it has one. Each layer's forward returns what its backward needs ("saved"),
//! and only that: an unadapted linear or convolution needs nothing but its weight for the input
//! gradient, an adapted one keeps its input and low-rank activation for the adapter's gradients.
//!
//! Adapters installed on the model for inference ([`crate::adapter`]) are not applied: training
//! runs on the base weights.

use super::params::LoraParams;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::nn::{LayerMut, VisitLayers};
use crate::ops::conv::{conv2d, Conv2dParams};
use crate::ops::grad::conv::{conv2d_input_grad, locon_conv2d, locon_conv2d_backward, Locon};
use crate::ops::grad::linear::{linear_input_grad, lora_linear, lora_linear_backward, Lora};
use crate::ops::grad::norm::{group_norm_backward, layer_norm_backward};
use crate::ops::matmul::linear;
use crate::ops::norm::{group_norm, layer_norm};
use crate::tensor::Tensor;
use std::collections::HashMap;

/// A layer's parameters, copied (sharing storage) out of the model.
enum Frozen {
    Linear { weight: Tensor, bias: Option<Tensor> },
    Conv { weight: Tensor, bias: Option<Tensor>, params: Conv2dParams },
    GroupNorm(GNorm),
    LayerNorm(LNorm),
}

/// The layers of a model by module path, handed out once each while the training structure is
/// built; every adapter must find its layer.
pub(super) struct Layers<'p> {
    map: HashMap<String, Frozen>,
    params: &'p LoraParams,
    bound: Vec<bool>,
}

fn missing(name: &str, what: &str) -> Error {
    Error::Invalid(format!("the model has no {what} `{name}` where its configuration puts one"))
}

impl<'p> Layers<'p> {
    pub fn collect(model: &mut dyn VisitLayers, params: &'p LoraParams) -> Self {
        let mut map = HashMap::new();
        model.visit_layers(&mut |layer| {
            let (name, f) = match layer {
                LayerMut::Linear(l) => (&l.name, Frozen::Linear { weight: l.weight.clone(), bias: l.bias.clone() }),
                LayerMut::Conv2d(c) => {
                    (&c.name, Frozen::Conv { weight: c.weight.clone(), bias: c.bias.clone(), params: c.params })
                }
                LayerMut::GroupNorm(g) => (
                    &g.name,
                    Frozen::GroupNorm(GNorm { weight: g.weight.clone(), bias: g.bias.clone(), groups: g.groups, eps: g.eps }),
                ),
                LayerMut::LayerNorm(g) => {
                    (&g.name, Frozen::LayerNorm(LNorm { weight: g.weight.clone(), bias: g.bias.clone(), eps: g.eps }))
                }
            };
            map.insert(name.clone(), f);
        });
        Self { map, params, bound: vec![false; params.layers().len()] }
    }

    pub fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    fn adapter(&mut self, name: &str) -> Option<usize> {
        let i = self.params.find(name)?;
        if let Some(b) = self.bound.get_mut(i) {
            *b = true;
        }
        Some(i)
    }

    pub fn linear(&mut self, name: &str) -> Result<Lin> {
        match self.map.remove(name) {
            Some(Frozen::Linear { weight, bias }) => Ok(Lin { weight, bias, lora: self.adapter(name) }),
            _ => Err(missing(name, "linear layer")),
        }
    }

    pub fn conv(&mut self, name: &str) -> Result<Conv> {
        match self.map.remove(name) {
            Some(Frozen::Conv { weight, bias, params }) => Ok(Conv { weight, bias, params, lora: self.adapter(name) }),
            _ => Err(missing(name, "convolution")),
        }
    }

    pub fn group_norm(&mut self, name: &str) -> Result<GNorm> {
        match self.map.remove(name) {
            Some(Frozen::GroupNorm(g)) => Ok(g),
            _ => Err(missing(name, "group norm")),
        }
    }

    pub fn layer_norm(&mut self, name: &str) -> Result<LNorm> {
        match self.map.remove(name) {
            Some(Frozen::LayerNorm(g)) => Ok(g),
            _ => Err(missing(name, "layer norm")),
        }
    }

    /// Errors when an adapter's layer is not part of the training structure.
    pub fn finish(self) -> Result<()> {
        match self.bound.iter().position(|b| !b) {
            Some(i) => Err(Error::Invalid(format!(
                "the adapter on `{}` belongs to no layer the training pass runs",
                self.params.layers().get(i).map_or("?", |l| l.module.as_str())
            ))),
            None => Ok(()),
        }
    }
}

/// What an adapted layer keeps: its input and low-rank activation (`None` when unadapted).
pub(super) struct LowRankSaved(Option<(Tensor, Tensor)>);

/// A frozen `nn.Linear`, with its LoRA when it has one.
pub(super) struct Lin {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<usize>,
}

impl Lin {
    pub fn adapted(&self) -> bool {
        self.lora.is_some()
    }

    /// `x: [..., K]` → `[..., N]`.
    pub fn forward(&self, gpu: &Gpu, p: &LoraParams, x: &Tensor) -> Result<(Tensor, LowRankSaved)> {
        match self.lora {
            None => Ok((linear(gpu, x, &self.weight, self.bias.as_ref())?, LowRankSaved(None))),
            Some(i) => {
                let l = p.layer(i)?;
                let lora = Lora { down: &l.down, up: &l.up, scale: l.scale() };
                let (y, h) = lora_linear(gpu, x, &self.weight, self.bias.as_ref(), &lora)?;
                Ok((y, LowRankSaved(Some((x.clone(), h)))))
            }
        }
    }

    /// Adds the adapter's gradients for output gradient `dy`; returns the input gradient when
    /// `want_dx`.
    pub fn backward(
        &self,
        gpu: &Gpu,
        p: &LoraParams,
        saved: LowRankSaved,
        dy: &Tensor,
        want_dx: bool,
    ) -> Result<Option<Tensor>> {
        match (self.lora, saved.0) {
            (None, _) if want_dx => Ok(Some(linear_input_grad(gpu, dy, &self.weight)?)),
            (None, _) => Ok(None),
            (Some(i), Some((x, h))) => {
                let l = p.layer(i)?;
                let lora = Lora { down: &l.down, up: &l.up, scale: l.scale() };
                let g = lora_linear_backward(gpu, &x, &self.weight, &lora, Some(&h), dy, want_dx)?;
                drop((x, h));
                l.accumulate(gpu, &g.d_down, &g.d_up)?;
                Ok(g.dx)
            }
            (Some(_), None) => Err(Error::Invalid("a LoRA layer's backward got no saved forward state".into())),
        }
    }
}

/// What a convolution keeps: its input's size, and for an adapted one the input and `t`.
pub(super) struct ConvSaved {
    hw: [usize; 2],
    lowrank: LowRankSaved,
}

/// A frozen `nn.Conv2d`, with its LoCon when it has one.
pub(super) struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    params: Conv2dParams,
    lora: Option<usize>,
}

impl Conv {
    pub fn params(&self) -> Conv2dParams {
        self.params
    }

    /// `x: [B, Cin, H, W]` → `[B, Cout, Ho, Wo]`.
    pub fn forward(&self, gpu: &Gpu, p: &LoraParams, x: &Tensor) -> Result<(Tensor, ConvSaved)> {
        let hw = [x.shape().get(2).copied().unwrap_or(0), x.shape().get(3).copied().unwrap_or(0)];
        match self.lora {
            None => {
                let y = conv2d(gpu, x, &self.weight, self.bias.as_ref(), self.params)?;
                Ok((y, ConvSaved { hw, lowrank: LowRankSaved(None) }))
            }
            Some(i) => {
                let l = p.layer(i)?;
                let lora = Locon { down: &l.down, up: &l.up, scale: l.scale() };
                let (y, t) = locon_conv2d(gpu, x, &self.weight, self.bias.as_ref(), self.params, &lora)?;
                Ok((y, ConvSaved { hw, lowrank: LowRankSaved(Some((x.clone(), t))) }))
            }
        }
    }

    /// Adds the adapter's gradients for `dy`; returns the input gradient when `want_dx`.
    pub fn backward(
        &self,
        gpu: &Gpu,
        p: &LoraParams,
        saved: ConvSaved,
        dy: &Tensor,
        want_dx: bool,
    ) -> Result<Option<Tensor>> {
        match (self.lora, saved.lowrank.0) {
            (None, _) if want_dx => Ok(Some(conv2d_input_grad(gpu, dy, &self.weight, saved.hw, self.params)?)),
            (None, _) => Ok(None),
            (Some(i), Some((x, t))) => {
                let l = p.layer(i)?;
                let lora = Locon { down: &l.down, up: &l.up, scale: l.scale() };
                let g = locon_conv2d_backward(gpu, &x, &self.weight, self.params, &lora, Some(&t), dy, want_dx)?;
                drop((x, t));
                l.accumulate(gpu, &g.d_down, &g.d_up)?;
                Ok(g.dx)
            }
            (Some(_), None) => Err(Error::Invalid("a LoCon layer's backward got no saved forward state".into())),
        }
    }
}

/// A frozen `nn.GroupNorm` (optionally followed by SiLU).
pub(super) struct GNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f32,
}

impl GNorm {
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, silu: bool) -> Result<Tensor> {
        group_norm(gpu, x, self.groups, Some(&self.weight), Some(&self.bias), self.eps, silu)
    }

    /// The input gradient at the forward's input `x`.
    pub fn backward(&self, gpu: &Gpu, x: &Tensor, dy: &Tensor, silu: bool) -> Result<Tensor> {
        group_norm_backward(gpu, x, dy, self.groups, Some(&self.weight), Some(&self.bias), self.eps, silu)
    }
}

/// A frozen `nn.LayerNorm`.
pub(super) struct LNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LNorm {
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        layer_norm(gpu, x, Some(&self.weight), Some(&self.bias), self.eps)
    }

    /// The input gradient at the forward's input `x`.
    pub fn backward(&self, gpu: &Gpu, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        layer_norm_backward(gpu, x, dy, Some(&self.weight), self.eps)
    }
}

/// `Some(t)` or an error naming the layer whose input gradient was missing.
pub(super) fn need(t: Option<Tensor>, what: &str) -> Result<Tensor> {
    t.ok_or_else(|| Error::Invalid(format!("{what}: the input gradient was not computed")))
}
