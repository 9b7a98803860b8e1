//! Training forward and backward of diffusers' `Attention` (as `AttnProcessor2_0` runs it in
//! the UNet: bias-free q/k/v, no mask; CLIP's self-attention with biases and a causal mask
//! uses it too) and `FeedForward` with GEGLU, mirroring
//! [`crate::model::transformer::Attention`] and [`crate::model::transformer::FeedForward`].
//!
//! Attention runs the fused kernel's [`attention_with_lse`] (the same output as the inference
//! kernel, bit for bit), keeping q, k, v, the output and the log-sum-exp for
//! [`attention_backward`], which recomputes the probabilities tile by tile.

use super::layers::{need, LowRankSaved, Lin, Layers};
use super::params::LoraParams;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::nn::join;
use crate::ops::attention::{attention_with_lse, AttentionOpts};
use crate::ops::elementwise::geglu;
use crate::ops::grad::activation::{accumulate, geglu_backward};
use crate::ops::grad::attention::{attention_backward, Saved};
use crate::tensor::Tensor;

/// diffusers' `Attention` with its four projections.
pub(super) struct Attn {
    to_q: Lin,
    to_k: Lin,
    to_v: Lin,
    to_out: Lin,
    heads: usize,
    /// Keys and values come from the encoder hidden states (`attn2`, or `attn1` with
    /// `only_cross_attention`), whose gradient is wanted only when the text encoder trains.
    cross: bool,
    /// CLIP's causal mask.
    causal: bool,
}

pub(super) struct AttnSaved {
    q_in: LowRankSaved,
    k_in: LowRankSaved,
    v_in: LowRankSaved,
    out_in: LowRankSaved,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
}

impl Attn {
    pub fn build(layers: &mut Layers<'_>, prefix: &str, heads: usize, cross: bool) -> Result<Self> {
        Self::build_named(layers, prefix, ["to_q", "to_k", "to_v", "to_out.0"], heads, cross, false)
    }

    /// The projections under other names (CLIP's `q_proj`, `k_proj`, `v_proj`, `out_proj`),
    /// optionally with a causal mask.
    pub fn build_named(
        layers: &mut Layers<'_>,
        prefix: &str,
        names: [&str; 4],
        heads: usize,
        cross: bool,
        causal: bool,
    ) -> Result<Self> {
        let p = |n: &str| join(prefix, n);
        Ok(Self {
            to_q: layers.linear(&p(names[0]))?,
            to_k: layers.linear(&p(names[1]))?,
            to_v: layers.linear(&p(names[2]))?,
            to_out: layers.linear(&p(names[3]))?,
            heads,
            cross,
            causal,
        })
    }

    /// The inference path's options: one head runs at an explicit `1/√D` scale (as
    /// `single_head_attention` passes it), several at the kernel's default (the same value).
    fn opts(&self, q: &Tensor) -> AttentionOpts {
        let d = q.shape().last().copied().unwrap_or(1) / self.heads.max(1);
        let scale = (self.heads == 1).then(|| 1.0 / (d as f32).sqrt());
        AttentionOpts { heads: self.heads, scale, causal: self.causal }
    }

    /// `x: [B, N, dim]`, `context: [B, M, cross_dim]` → `[B, N, dim]`.
    pub fn forward(&self, gpu: &Gpu, p: &LoraParams, x: &Tensor, context: &Tensor) -> Result<(Tensor, AttnSaved)> {
        let src = if self.cross { context } else { x };
        let (q, q_in) = self.to_q.forward(gpu, p, x)?;
        let (k, k_in) = self.to_k.forward(gpu, p, src)?;
        let (v, v_in) = self.to_v.forward(gpu, p, src)?;
        let (o, lse) = attention_with_lse(gpu, &q, &k, &v, self.opts(&q))?;
        let (y, out_in) = self.to_out.forward(gpu, p, &o)?;
        Ok((y, AttnSaved { q_in, k_in, v_in, out_in, q, k, v, o, lse }))
    }

    /// The gradient at `x` for output gradient `dy`, adding the projections' adapter gradients.
    /// A cross-attention adds the gradient at the encoder hidden states to `d_context` when one
    /// is given (the text encoder trains), and computes none otherwise.
    pub fn backward(
        &self,
        gpu: &Gpu,
        p: &LoraParams,
        s: AttnSaved,
        dy: &Tensor,
        d_context: Option<&Tensor>,
    ) -> Result<Tensor> {
        let opts = self.opts(&s.q);
        let d_o = need(self.to_out.backward(gpu, p, s.out_in, dy, true)?, "to_out")?;
        let saved = Saved { q: &s.q, k: &s.k, v: &s.v, out: &s.o, lse: &s.lse };
        let g = attention_backward(gpu, &saved, &d_o, opts)?;
        drop((d_o, s.q, s.k, s.v, s.o, s.lse));
        let dx = need(self.to_q.backward(gpu, p, s.q_in, &g.dq, true)?, "to_q")?;
        drop(g.dq);
        // Keys and values read `x` (self-attention) or the encoder hidden states, whose
        // gradient is wanted only when the text encoder trains.
        let sink = if self.cross { d_context } else { Some(&dx) };
        if let (Some(dk), Some(acc)) = (self.to_k.backward(gpu, p, s.k_in, &g.dk, sink.is_some())?, sink) {
            accumulate(gpu, acc, &dk, 1.0)?;
        }
        drop(g.dk);
        if let (Some(dv), Some(acc)) = (self.to_v.backward(gpu, p, s.v_in, &g.dv, sink.is_some())?, sink) {
            accumulate(gpu, acc, &dv, 1.0)?;
        }
        Ok(dx)
    }
}

/// diffusers' `FeedForward(dim, activation_fn="geglu")`.
pub(super) struct Ff {
    proj: Lin,
    out: Lin,
}

pub(super) struct FfSaved {
    proj_in: LowRankSaved,
    /// `net.0.proj`'s output (GEGLU's input).
    h: Tensor,
    out_in: LowRankSaved,
}

impl Ff {
    pub fn build(layers: &mut Layers<'_>, prefix: &str) -> Result<Self> {
        Ok(Self { proj: layers.linear(&join(prefix, "net.0.proj"))?, out: layers.linear(&join(prefix, "net.2"))? })
    }

    pub fn forward(&self, gpu: &Gpu, p: &LoraParams, x: &Tensor) -> Result<(Tensor, FfSaved)> {
        let (h, proj_in) = self.proj.forward(gpu, p, x)?;
        let g = geglu(gpu, &h)?;
        let (y, out_in) = self.out.forward(gpu, p, &g)?;
        Ok((y, FfSaved { proj_in, h, out_in }))
    }

    pub fn backward(&self, gpu: &Gpu, p: &LoraParams, s: FfSaved, dy: &Tensor) -> Result<Tensor> {
        let dg = need(self.out.backward(gpu, p, s.out_in, dy, true)?, "ff.net.2")?;
        let dh = geglu_backward(gpu, &s.h, &dg)?;
        drop((dg, s.h));
        need(self.proj.backward(gpu, p, s.proj_in, &dh, true)?, "ff.net.0.proj")
    }
}
