//! The UNet's spatial transformer, after diffusers' `models/transformers/transformer_2d.py`
//! (`Transformer2DModel`, continuous input), `models/attention.py` (`BasicTransformerBlock`,
//! `FeedForward` with `GEGLU`) and `models/attention_processor.py` (`Attention` with
//! `AttnProcessor2_0`), plus the `nn.Linear` / `nn.LayerNorm` layers they are made of.
//! Token activations are `[B, N, C]` f32.

use super::resnet::{join, GroupNorm};
use super::weights::{WeightPolicy, WeightSource};
use crate::error::{shape_err, Result};
use crate::gpu::Gpu;
use crate::ops::attention::{attention, AttentionOpts};
use crate::ops::elementwise::{add, geglu};
use crate::ops::layout::transpose_last2;
use crate::ops::matmul::linear;
use crate::ops::norm::layer_norm;
use crate::tensor::Tensor;

/// `nn.Linear(in, out, bias)`: weight `[out, in]` stored per the policy's matrix type.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(
        gpu: &Gpu,
        src: &dyn WeightSource,
        policy: WeightPolicy,
        prefix: &str,
        din: usize,
        dout: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = src.load(gpu, &join(prefix, "weight"), &[dout, din], policy.matrix())?;
        let bias = if bias { Some(src.load(gpu, &join(prefix, "bias"), &[dout], policy.vector())?) } else { None };
        Ok(Self { weight, bias })
    }

    /// `x: [..., in]` → `[..., out]`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        linear(gpu, x, &self.weight, self.bias.as_ref())
    }
}

/// `nn.LayerNorm(dim, eps)` with affine parameters.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f32,
}

impl LayerNorm {
    pub fn load(
        gpu: &Gpu,
        src: &dyn WeightSource,
        policy: WeightPolicy,
        prefix: &str,
        dim: usize,
        eps: f32,
    ) -> Result<Self> {
        Ok(Self {
            weight: src.load(gpu, &join(prefix, "weight"), &[dim], policy.vector())?,
            bias: src.load(gpu, &join(prefix, "bias"), &[dim], policy.vector())?,
            eps,
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        layer_norm(gpu, x, Some(&self.weight), Some(&self.bias), self.eps)
    }
}

/// diffusers' `Attention` (bias-free `to_q`/`to_k`/`to_v`, `to_out.0` with bias) with
/// `scaled_dot_product_attention` at scale `dim_head^-0.5`. Self-attention when no context is
/// given, cross-attention over the context otherwise.
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    /// `query_dim` → `heads · dim_head` (inner), keys/values from `context_dim` (the query dim
    /// for self-attention); `to_out.0` maps inner back to `query_dim`.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        gpu: &Gpu,
        src: &dyn WeightSource,
        policy: WeightPolicy,
        prefix: &str,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        dim_head: usize,
    ) -> Result<Self> {
        let p = |n: &str| join(prefix, n);
        let inner = heads * dim_head;
        Ok(Self {
            to_q: Linear::load(gpu, src, policy, &p("to_q"), query_dim, inner, false)?,
            to_k: Linear::load(gpu, src, policy, &p("to_k"), context_dim, inner, false)?,
            to_v: Linear::load(gpu, src, policy, &p("to_v"), context_dim, inner, false)?,
            to_out: Linear::load(gpu, src, policy, &p("to_out.0"), inner, query_dim, true)?,
            heads,
        })
    }

    /// `x: [B, N, query_dim]`, `context: [B, M, context_dim]` (or `None`) → `[B, N, query_dim]`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        if ctx.rank() != 3 || x.rank() != 3 || ctx.dim(0) != x.dim(0) {
            return Err(shape_err(
                "Attention",
                format!("hidden states {:?} and context {:?} must be [B, N, C] with one batch", x.shape(), ctx.shape()),
            ));
        }
        let q = self.to_q.forward(gpu, x)?;
        let k = self.to_k.forward(gpu, ctx)?;
        let v = self.to_v.forward(gpu, ctx)?;
        let o = attention(gpu, &q, &k, &v, AttentionOpts::new(self.heads))?;
        self.to_out.forward(gpu, &o)
    }
}

/// diffusers' `FeedForward(dim, activation_fn="geglu")`: `net.0.proj` maps to 2·inner (hidden and
/// gate halves), `hidden · gelu(gate)`, then `net.2` back to `dim` (inner = 4·dim).
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn load(gpu: &Gpu, src: &dyn WeightSource, policy: WeightPolicy, prefix: &str, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: Linear::load(gpu, src, policy, &join(prefix, "net.0.proj"), dim, 2 * inner, true)?,
            out: Linear::load(gpu, src, policy, &join(prefix, "net.2"), inner, dim, true)?,
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(gpu, x)?;
        let h = geglu(gpu, &h)?;
        self.out.forward(gpu, &h)
    }
}

/// diffusers' `BasicTransformerBlock` with `norm_type="layer_norm"`:
/// `x += attn1(norm1(x))` (self-attention, or cross-attention when `only_cross_attention`),
/// `x += attn2(norm2(x), context)`, `x += ff(norm3(x))`.
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

/// Construction settings shared by a [`Transformer2DModel`] and its blocks.
#[derive(Clone, Copy, Debug)]
pub struct TransformerSpec {
    /// Channels of the feature map (in and out).
    pub channels: usize,
    pub heads: usize,
    pub dim_head: usize,
    pub layers: usize,
    pub cross_attention_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
    /// LayerNorm eps inside the blocks (the transformer's `norm_eps`, 1e-5).
    pub norm_eps: f32,
}

impl TransformerSpec {
    pub fn inner_dim(&self) -> usize {
        self.heads * self.dim_head
    }
}

impl BasicTransformerBlock {
    pub fn load(
        gpu: &Gpu,
        src: &dyn WeightSource,
        policy: WeightPolicy,
        prefix: &str,
        s: &TransformerSpec,
    ) -> Result<Self> {
        let p = |n: &str| join(prefix, n);
        let dim = s.inner_dim();
        let attn1_ctx = if s.only_cross_attention { s.cross_attention_dim } else { dim };
        Ok(Self {
            norm1: LayerNorm::load(gpu, src, policy, &p("norm1"), dim, s.norm_eps)?,
            attn1: Attention::load(gpu, src, policy, &p("attn1"), dim, attn1_ctx, s.heads, s.dim_head)?,
            norm2: LayerNorm::load(gpu, src, policy, &p("norm2"), dim, s.norm_eps)?,
            attn2: Attention::load(gpu, src, policy, &p("attn2"), dim, s.cross_attention_dim, s.heads, s.dim_head)?,
            norm3: LayerNorm::load(gpu, src, policy, &p("norm3"), dim, s.norm_eps)?,
            ff: FeedForward::load(gpu, src, policy, &p("ff"), dim)?,
            only_cross_attention: s.only_cross_attention,
        })
    }

    /// `x: [B, N, dim]`, `context: [B, M, cross_attention_dim]`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let n = self.norm1.forward(gpu, x)?;
        let a = self.attn1.forward(gpu, &n, self.only_cross_attention.then_some(context))?;
        let x = add(gpu, x, &a)?;
        let n = self.norm2.forward(gpu, &x)?;
        let a = self.attn2.forward(gpu, &n, Some(context))?;
        let x = add(gpu, &x, &a)?;
        let n = self.norm3.forward(gpu, &x)?;
        let f = self.ff.forward(gpu, &n)?;
        add(gpu, &x, &f)
    }
}

/// diffusers' `Transformer2DModel` on continuous input: `GroupNorm(eps=1e-6)`, `proj_in`,
/// the blocks on `[B, H·W, inner]` tokens, `proj_out`, plus the input as residual.
/// `proj_in`/`proj_out` are 1×1 convolutions (`[out, in, 1, 1]`) or, with
/// `use_linear_projection`, linear layers; both act per pixel, so both run as a linear layer
/// on the token layout.
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
    channels: usize,
}

impl Transformer2DModel {
    pub fn load(
        gpu: &Gpu,
        src: &dyn WeightSource,
        policy: WeightPolicy,
        prefix: &str,
        s: &TransformerSpec,
    ) -> Result<Self> {
        let p = |n: &str| join(prefix, n);
        let (c, inner) = (s.channels, s.inner_dim());
        if s.heads == 0 || s.dim_head == 0 {
            return Err(shape_err(
                "Transformer2DModel",
                format!("{prefix}: {c} channels with {} heads leave no head dimension", s.heads),
            ));
        }
        // A 1×1 conv weight [out, in, 1, 1] is accepted for the [out, in] request (the source
        // drops size-1 dimensions); the policy stores it as the same matrix.
        let proj_in = Linear::load(gpu, src, policy, &p("proj_in"), c, inner, true)?;
        let proj_out = Linear::load(gpu, src, policy, &p("proj_out"), inner, c, true)?;
        let blocks = (0..s.layers)
            .map(|i| BasicTransformerBlock::load(gpu, src, policy, &p(&format!("transformer_blocks.{i}")), s))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::load(gpu, src, policy, &p("norm"), s.groups, c, 1e-6)?,
            proj_in,
            blocks,
            proj_out,
            channels: c,
        })
    }

    /// `x: [B, C, H, W]`, `context: [B, M, cross_attention_dim]` → `[B, C, H, W]`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let s = x.shape();
        if s.len() != 4 || s[1] != self.channels {
            return Err(shape_err(
                "Transformer2DModel",
                format!("input {s:?} must be [B, {}, H, W]", self.channels),
            ));
        }
        let (b, c, hw) = (s[0], s[1], s[2] * s[3]);
        let h = self.norm.forward(gpu, x, false)?;
        let h = transpose_last2(gpu, &h.reshape(&[b, c, hw])?)?; // [B, HW, C]
        let mut h = self.proj_in.forward(gpu, &h)?;
        for block in &self.blocks {
            h = block.forward(gpu, &h, context)?;
        }
        let h = self.proj_out.forward(gpu, &h)?; // [B, HW, C]
        let h = transpose_last2(gpu, &h)?.reshape(s)?;
        add(gpu, &h, x)
    }
}
