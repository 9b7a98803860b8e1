//! The layers every model is made of, each holding its parameters on the GPU: `torch.nn`'s
//! `Linear`, `Conv2d`, `GroupNorm` and `LayerNorm`. Every linear and convolution layer of the
//! CLIP text encoder, the UNet and the VAE is one of these two types, so whatever changes how
//! a weight matrix is applied (quantized storage, adapters) changes it in one place.
//!
//! Parameters load by name from a [`WeightSource`] below a module prefix (`"a.b"` →
//! `"a.b.weight"`, `"a.b.bias"`); weight matrices are stored as the policy's matrix type,
//! biases and norm parameters as its vector type (f32).

use crate::error::{shape_err, Result};
use crate::gpu::Gpu;
use crate::model::weights::{WeightPolicy, WeightSource};
use crate::ops::conv::{conv2d, Conv2dParams};
use crate::ops::matmul::linear;
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
        Ok(Self { weight, bias })
    }

    /// `x: [..., in]` → `[..., out]`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        linear(gpu, x, &self.weight, self.bias.as_ref())
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
        Ok(Self { weight, bias, params })
    }

    /// `x: [B, cin, H, W]` → `[B, cout, Ho, Wo]`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        conv2d(gpu, x, &self.weight, self.bias.as_ref(), self.params)
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
        })
    }

    /// `x: [B, C, *spatial]`, normalised per group, then SiLU when `silu` is set.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, silu: bool) -> Result<Tensor> {
        group_norm(gpu, x, self.groups, Some(&self.weight), Some(&self.bias), self.eps, silu)
    }
}

/// `nn.LayerNorm(dim, eps)` with affine parameters, over the last dimension.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f32,
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
        })
    }

    /// `x: [..., dim]` → `[..., dim]`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        layer_norm(gpu, x, Some(&self.weight), Some(&self.bias), self.eps)
    }
}
