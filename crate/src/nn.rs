//! The layers every model is made of, each holding its parameters on the GPU: `torch.nn`'s
//! `Linear`, `Conv2d`, `GroupNorm` and `LayerNorm`. Every linear and convolution layer of the
//! CLIP text encoder, the UNet and the VAE is one of these two types, so whatever changes how
//! a weight matrix is applied (quantized storage, adapters) changes it in one place.
//!
//! Parameters load by name from a [`WeightSource`] below a module prefix (`"a.b"` →
//! `"a.b.weight"`, `"a.b.bias"`); weight matrices are stored as the policy's matrix type,
//! biases and norm parameters as its vector type (f32).
//!
//! Each layer remembers its module path (`name`, the prefix it was loaded under, which is
//! diffusers' module path) and can carry adapters ([`crate::adapter`]): installed through
//! [`VisitLayers`], applied inside the kernels at every forward call, removed without touching
//! the base weights.

use crate::adapter::{LayerAdapters, NormAdapters};
use crate::error::{shape_err, Result};
use crate::gpu::Gpu;
use crate::model::weights::{WeightPolicy, WeightSource};
use crate::ops::conv::{conv2d, conv2d_adapted, Conv2dParams};
use crate::ops::matmul::{linear, linear_adapted};
use crate::ops::norm::{group_norm, layer_norm};
use crate::tensor::Tensor;

/// Stride 1, padding 1: a 3×3 convolution that keeps the size.
pub const SAME3: Conv2dParams = Conv2dParams { stride: 1, padding: 1 };
/// Stride 1, no padding: a 1×1 convolution.
pub const POINTWISE: Conv2dParams = Conv2dParams { stride: 1, padding: 0 };

/// Joins a module prefix and a parameter name (`"a.b"` + `"weight"`; an empty prefix gives the
/// name alone).
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// `nn.Linear(in_features, out_features, bias)`: weight `[out, in]` stored per the policy's
/// matrix type, optional f32 bias `[out]`.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Module path (`"down_blocks.0.attentions.0.proj_in"`).
    pub name: String,
    /// Unmerged adapters applied in the kernel.
    pub adapters: Option<LayerAdapters>,
}

impl Linear {
    /// Loads `{prefix}.weight` (`[dout, din]`) and, when `bias` is set, `{prefix}.bias`.
    pub fn load(
        gpu: &Gpu,
        src: &dyn WeightSource,
        prefix: &str,
        din: usize,
        dout: usize,
        bias: bool,
        policy: WeightPolicy,
    ) -> Result<Self> {
        let weight = src.load(gpu, &join(prefix, "weight"), &[dout, din], policy.matrix())?;
        let bias = if bias { Some(src.load(gpu, &join(prefix, "bias"), &[dout], policy.vector())?) } else { None };
        Ok(Self { weight, bias, name: prefix.to_string(), adapters: None })
    }

    /// `x: [..., in]` → `[..., out]`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        match self.adapters.as_ref().filter(|a| a.is_active()) {
            None => linear(gpu, x, &self.weight, self.bias.as_ref()),
            Some(a) => {
                let t = match a.down() {
                    Some(down) => Some(linear(gpu, x, down, None)?),
                    None => None,
                };
                linear_adapted(gpu, x, &self.weight, self.bias.as_ref(), &a.operands(t.as_ref()))
            }
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dim(1)
    }

    pub fn out_features(&self) -> usize {
        self.weight.dim(0)
    }
}

/// `nn.Conv2d(cin, cout, kernel, stride, padding)` with a square kernel and symmetric zero
/// padding: weight `[cout, cin, k, k]` stored per the policy's matrix type, f32 bias `[cout]`.
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub params: Conv2dParams,
    /// Module path (`"down_blocks.0.resnets.0.conv1"`).
    pub name: String,
    /// Unmerged adapters applied in the kernel.
    pub adapters: Option<LayerAdapters>,
}

impl Conv2d {
    /// Loads `{prefix}.weight` and `{prefix}.bias` (every convolution of SD models has one).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        gpu: &Gpu,
        src: &dyn WeightSource,
        prefix: &str,
        cin: usize,
        cout: usize,
        kernel: usize,
        params: Conv2dParams,
        policy: WeightPolicy,
    ) -> Result<Self> {
        let weight = src.load(gpu, &join(prefix, "weight"), &[cout, cin, kernel, kernel], policy.matrix())?;
        let bias = Some(src.load(gpu, &join(prefix, "bias"), &[cout], policy.vector())?);
        Ok(Self { weight, bias, params, name: prefix.to_string(), adapters: None })
    }

    /// `x: [B, cin, H, W]` → `[B, cout, Ho, Wo]`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        match self.adapters.as_ref().filter(|a| a.is_active()) {
            None => conv2d(gpu, x, &self.weight, self.bias.as_ref(), self.params),
            Some(a) => {
                let t = match a.down() {
                    Some(down) => Some(conv2d(gpu, x, down, None, self.params)?),
                    None => None,
                };
                conv2d_adapted(gpu, x, &self.weight, self.bias.as_ref(), self.params, &a.operands(t.as_ref()))
            }
        }
    }

    pub fn out_channels(&self) -> usize {
        self.weight.dim(0)
    }
}

/// `nn.GroupNorm(groups, channels, eps)` with affine parameters, optionally followed by a
/// fused SiLU (the `norm → SiLU` pair of resnets and output heads).
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f32,
    /// Module path.
    pub name: String,
    /// Adapted affine parameters (norm-layer diffs), used instead of `weight`/`bias`.
    pub adapters: Option<NormAdapters>,
}

impl GroupNorm {
    pub fn load(
        gpu: &Gpu,
        src: &dyn WeightSource,
        prefix: &str,
        groups: usize,
        channels: usize,
        eps: f32,
        policy: WeightPolicy,
    ) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(shape_err(
                "GroupNorm",
                format!("{prefix}: {channels} channels are not divisible into {groups} groups"),
            ));
        }
        Ok(Self {
            weight: src.load(gpu, &join(prefix, "weight"), &[channels], policy.vector())?,
            bias: src.load(gpu, &join(prefix, "bias"), &[channels], policy.vector())?,
            groups,
            eps,
            name: prefix.to_string(),
            adapters: None,
        })
    }

    /// `x: [B, C, *spatial]`, normalised per group, then SiLU when `silu` is set.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, silu: bool) -> Result<Tensor> {
        let (w, b) = match self.adapters.as_ref().filter(|a| a.is_active()) {
            Some(a) => (&a.weight, &a.bias),
            None => (&self.weight, &self.bias),
        };
        group_norm(gpu, x, self.groups, Some(w), Some(b), self.eps, silu)
    }
}

/// `nn.LayerNorm(dim, eps)` with affine parameters, over the last dimension.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f32,
    /// Module path.
    pub name: String,
    /// Adapted affine parameters (norm-layer diffs), used instead of `weight`/`bias`.
    pub adapters: Option<NormAdapters>,
}

impl LayerNorm {
    pub fn load(
        gpu: &Gpu,
        src: &dyn WeightSource,
        prefix: &str,
        dim: usize,
        eps: f32,
        policy: WeightPolicy,
    ) -> Result<Self> {
        Ok(Self {
            weight: src.load(gpu, &join(prefix, "weight"), &[dim], policy.vector())?,
            bias: src.load(gpu, &join(prefix, "bias"), &[dim], policy.vector())?,
            eps,
            name: prefix.to_string(),
            adapters: None,
        })
    }

    /// `x: [..., dim]` → `[..., dim]`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let (w, b) = match self.adapters.as_ref().filter(|a| a.is_active()) {
            Some(a) => (&a.weight, &a.bias),
            None => (&self.weight, &self.bias),
        };
        layer_norm(gpu, x, Some(w), Some(b), self.eps)
    }
}

/// One adaptable layer of a model.
pub enum LayerMut<'a> {
    Linear(&'a mut Linear),
    Conv2d(&'a mut Conv2d),
    GroupNorm(&'a mut GroupNorm),
    LayerNorm(&'a mut LayerNorm),
}

impl LayerMut<'_> {
    /// The layer's module path.
    pub fn name(&self) -> &str {
        match self {
            LayerMut::Linear(l) => &l.name,
            LayerMut::Conv2d(l) => &l.name,
            LayerMut::GroupNorm(l) => &l.name,
            LayerMut::LayerNorm(l) => &l.name,
        }
    }
}

/// Models and blocks hand each of their layers to `f`, in a fixed order.
pub trait VisitLayers {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>));
}

impl VisitLayers for Linear {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        f(LayerMut::Linear(self))
    }
}

impl VisitLayers for Conv2d {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        f(LayerMut::Conv2d(self))
    }
}

impl VisitLayers for GroupNorm {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        f(LayerMut::GroupNorm(self))
    }
}

impl VisitLayers for LayerNorm {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        f(LayerMut::LayerNorm(self))
    }
}

impl<T: VisitLayers> VisitLayers for Option<T> {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        if let Some(t) = self {
            t.visit_layers(f)
        }
    }
}

impl<T: VisitLayers> VisitLayers for Vec<T> {
    fn visit_layers(&mut self, f: &mut dyn FnMut(LayerMut<'_>)) {
        for t in self {
            t.visit_layers(f)
        }
    }
}

/// `impl VisitLayers` for a struct by listing its layer fields in order.
#[macro_export]
macro_rules! visit_layers {
    ($ty:ty: $($field:ident),* $(,)?) => {
        impl $crate::nn::VisitLayers for $ty {
            fn visit_layers(&mut self, f: &mut dyn FnMut($crate::nn::LayerMut<'_>)) {
                $($crate::nn::VisitLayers::visit_layers(&mut self.$field, f);)*
            }
        }
    };
}
