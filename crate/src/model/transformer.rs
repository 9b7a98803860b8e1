//! The UNet's spatial transformer, after diffusers' `models/transformers/transformer_2d.py`
//! (`Transformer2DModel`, continuous input), `models/attention.py` (`BasicTransformerBlock`,
//! `FeedForward` with `GEGLU`) and `models/attention_processor.py` (`Attention` with
//! `AttnProcessor2_0`, also used by the VAE and, with CLIP's names, the text encoder).
//! Token activations are `[B, N, C]` f32.

use super::weights::{WeightPolicy, WeightSource};
use crate::error::{shape_err, Result};
use crate::gpu::Gpu;
use crate::nn::{join, GroupNorm, LayerNorm, Linear};
use crate::ops::attention::{self, AttentionOpts};
use crate::ops::elementwise::{add, geglu};
use crate::ops::layout::transpose_last2;
use crate::ops::matmul::{matmul, MatmulOpts};
use crate::ops::norm::softmax;
use crate::tensor::Tensor;

/// Names of an attention module's query, key, value and output projections.
pub type ProjectionNames = [&'static str; 4];
/// diffusers' `Attention`.
pub const DIFFUSERS_PROJECTIONS: ProjectionNames = ["to_q", "to_k", "to_v", "to_out.0"];
/// transformers' `CLIPAttention`.
pub const CLIP_PROJECTIONS: ProjectionNames = ["q_proj", "k_proj", "v_proj", "out_proj"];

/// Construction settings of an [`Attention`].
#[derive(Clone, Copy, Debug)]
pub struct AttentionSpec {
    /// Width of the hidden states (queries in, output out).
    pub query_dim: usize,
    /// Width of the keys' and values' source (the query dim for self-attention).
    pub context_dim: usize,
    pub heads: usize,
    pub dim_head: usize,
    /// Whether the query / key / value projections have a bias (the output one always has).
    pub qkv_bias: bool,
    /// Causal mask (CLIP's text encoder).
    pub causal: bool,
    pub names: ProjectionNames,
}

/// Multi-head attention with its projections, as diffusers' `Attention` run by
/// `AttnProcessor2_0` and transformers' `CLIPAttention` compute it:
/// `out(sdpa(q(x), k(ctx), v(ctx)))` at scale `dim_head^-0.5`, with `ctx = x` for
/// self-attention. The UNet's transformers use it with bias-free q/k/v, the VAE's mid-block
/// attention with one head of size C and biases, CLIP with biases and a causal mask.
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    causal: bool,
}

impl Attention {
    /// `query_dim` → `heads · dim_head` (inner) for q, `context_dim` → inner for k and v,
    /// inner → `query_dim` for the output projection.
    pub fn load(gpu: &Gpu, src: &dyn WeightSource, policy: WeightPolicy, prefix: &str, s: AttentionSpec) -> Result<Self> {
        let p = |n: &str| join(prefix, n);
        let inner = s.heads * s.dim_head;
        let [q, k, v, out] = s.names;
        Ok(Self {
            to_q: Linear::load(gpu, src, &p(q), s.query_dim, inner, s.qkv_bias, policy)?,
            to_k: Linear::load(gpu, src, &p(k), s.context_dim, inner, s.qkv_bias, policy)?,
            to_v: Linear::load(gpu, src, &p(v), s.context_dim, inner, s.qkv_bias, policy)?,
            to_out: Linear::load(gpu, src, &p(out), inner, s.query_dim, true, policy)?,
            heads: s.heads,
            causal: s.causal,
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
        let o = scaled_dot_product_attention(gpu, &q, &k, &v, self.heads, self.causal)?;
        drop((q, k, v));
        self.to_out.forward(gpu, &o)
    }
}

/// `softmax(q·kᵀ/sqrt(D) [+ causal mask])·v` per head for `q: [B, Nq, H·D]`, `k, v: [B, Nk, H·D]`:
/// the flash kernel, or for one unmasked head of a size the kernel does not take,
/// [`single_head_attention`]'s matmul path.
pub fn scaled_dot_product_attention(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    causal: bool,
) -> Result<Tensor> {
    if heads == 1 && !causal {
        let d = q.shape().last().copied().unwrap_or(0);
        return single_head_attention(gpu, q, k, v, 1.0 / (d as f32).sqrt());
    }
    attention::attention(gpu, q, k, v, AttentionOpts { heads, scale: None, causal })
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
            proj: Linear::load(gpu, src, &join(prefix, "net.0.proj"), dim, 2 * inner, true, policy)?,
            out: Linear::load(gpu, src, &join(prefix, "net.2"), inner, dim, true, policy)?,
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(gpu, x)?;
        let g = geglu(gpu, &h)?;
        drop(h);
        self.out.forward(gpu, &g)
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
        let attn = |context_dim| AttentionSpec {
            query_dim: dim,
            context_dim,
            heads: s.heads,
            dim_head: s.dim_head,
            qkv_bias: false,
            causal: false,
            names: DIFFUSERS_PROJECTIONS,
        };
        let attn1_ctx = if s.only_cross_attention { s.cross_attention_dim } else { dim };
        Ok(Self {
            norm1: LayerNorm::load(gpu, src, &p("norm1"), dim, s.norm_eps, policy)?,
            attn1: Attention::load(gpu, src, policy, &p("attn1"), attn(attn1_ctx))?,
            norm2: LayerNorm::load(gpu, src, &p("norm2"), dim, s.norm_eps, policy)?,
            attn2: Attention::load(gpu, src, policy, &p("attn2"), attn(s.cross_attention_dim))?,
            norm3: LayerNorm::load(gpu, src, &p("norm3"), dim, s.norm_eps, policy)?,
            ff: FeedForward::load(gpu, src, policy, &p("ff"), dim)?,
            only_cross_attention: s.only_cross_attention,
        })
    }

    /// `x: [B, N, dim]`, `context: [B, M, cross_attention_dim]`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        // Each intermediate is released as soon as it is dead.
        let n = self.norm1.forward(gpu, x)?;
        let a = self.attn1.forward(gpu, &n, self.only_cross_attention.then_some(context))?;
        drop(n);
        let x = add(gpu, x, &a)?;
        drop(a);
        let n = self.norm2.forward(gpu, &x)?;
        let a = self.attn2.forward(gpu, &n, Some(context))?;
        drop(n);
        let x = add(gpu, &x, &a)?;
        drop(a);
        let n = self.norm3.forward(gpu, &x)?;
        let f = self.ff.forward(gpu, &n)?;
        drop(n);
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
        let proj_in = Linear::load(gpu, src, &p("proj_in"), c, inner, true, policy)?;
        let proj_out = Linear::load(gpu, src, &p("proj_out"), inner, c, true, policy)?;
        let blocks = (0..s.layers)
            .map(|i| BasicTransformerBlock::load(gpu, src, policy, &p(&format!("transformer_blocks.{i}")), s))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::load(gpu, src, &p("norm"), s.groups, c, 1e-6, policy)?,
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
        let n = self.norm.forward(gpu, x, false)?;
        let t = transpose_last2(gpu, &n.reshape(&[b, c, hw])?)?; // [B, HW, C]
        drop(n);
        let mut h = self.proj_in.forward(gpu, &t)?;
        drop(t);
        for block in &self.blocks {
            h = block.forward(gpu, &h, context)?;
        }
        let p = self.proj_out.forward(gpu, &h)?; // [B, HW, C]
        drop(h);
        let o = transpose_last2(gpu, &p)?.reshape(s)?;
        drop(p);
        add(gpu, &o, x)
    }
}

/// `softmax(scale·q·kᵀ)·v` with one head for `q: [B, Nq, D]`, `k, v: [B, Nk, D]`: the fused
/// flash kernel when it supports D (at most `ops::attention::MAX_HEAD_DIM` and fitting the
/// device's workgroup memory), else [`attention_by_matmul`] (SD's VAE has D = C = 512).
pub fn single_head_attention(gpu: &Gpu, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    let d = q.shape().last().copied().unwrap_or(0);
    let caps = gpu.caps();
    if attention::tiles_for(d, caps.max_workgroup_storage, caps.max_invocations_per_workgroup).is_some() {
        attention::attention(gpu, q, k, v, AttentionOpts { heads: 1, scale: Some(scale), causal: false })
    } else {
        let limit = caps.max_storage_buffer_binding_size.min(caps.max_buffer_size);
        attention_by_matmul(gpu, q, k, v, scale, limit.min(MAX_SCORE_BYTES))
    }
}

/// The largest score block [`single_head_attention`] materialises at once: 16 MiB, a quarter
/// of the `[4096, 4096]` scores of SD's VAE mid block at 512×512, so the attention's working
/// set (score block + probabilities) stays far below the decoder's resnet activations.
/// Chunking over queries does not change the result: every score row and output row is
/// computed the same way whatever the chunk.
pub const MAX_SCORE_BYTES: u64 = 16 << 20;

/// Exact single-head attention from `ops::matmul` and `ops::norm::softmax`, for any head size:
/// per chunk of queries, `S = q_c·kᵀ` (`[B, rows, Nk]`), `P = softmax(scale·S)`, `O_c = P·v`.
/// Chunks hold as many query rows as keep `S` within `max_score_bytes` (at least one row), so
/// the score block stays inside the device's storage-binding limit.
pub fn attention_by_matmul(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    max_score_bytes: u64,
) -> Result<Tensor> {
    const OP: &str = "attention_by_matmul";
    for t in [q, k, v] {
        t.expect_f32(OP)?;
    }
    let shapes = || format!("q {:?}, k {:?}, v {:?}", q.shape(), k.shape(), v.shape());
    if q.rank() != 3 || k.rank() != 3 || v.shape() != k.shape() || k.dim(0) != q.dim(0) || k.dim(2) != q.dim(2) {
        return Err(shape_err(OP, format!("needs q [B, Nq, D] and k, v [B, Nk, D]; got {}", shapes())));
    }
    let (b, nq, d) = (q.dim(0), q.dim(1), q.dim(2));
    let nk = k.dim(1);
    if b * nq * nk * d == 0 {
        return Err(shape_err(OP, format!("empty operand; got {}", shapes())));
    }
    let row_bytes = (b * nk * 4) as u64;
    let rows = ((max_score_bytes / row_bytes) as usize).clamp(1, nq);
    let block = |qc: &Tensor| -> Result<Tensor> {
        let s = matmul(gpu, qc, k, MatmulOpts { trans_b: true, bias: None, alpha: 1.0 })?;
        let p = softmax(gpu, &s, scale)?;
        drop(s);
        matmul(gpu, &p, v, MatmulOpts::default())
    };
    if rows == nq {
        return block(q);
    }
    let out = Tensor::empty(gpu, &[b, nq, d])?;
    let f = 4u64;
    let mut start = 0;
    while start < nq {
        let len = rows.min(nq - start);
        let qc = Tensor::empty(gpu, &[b, len, d])?;
        for bi in 0..b {
            let src = ((bi * nq + start) * d) as u64 * f;
            gpu.copy(q.buffer(), src, qc.buffer(), (bi * len * d) as u64 * f, (len * d) as u64 * f);
        }
        let oc = block(&qc)?;
        for bi in 0..b {
            let dst = ((bi * nq + start) * d) as u64 * f;
            gpu.copy(oc.buffer(), (bi * len * d) as u64 * f, out.buffer(), dst, (len * d) as u64 * f);
        }
        start += len;
    }
    Ok(out)
}

crate::visit_layers!(Attention: to_q, to_k, to_v, to_out);
crate::visit_layers!(FeedForward: proj, out);
crate::visit_layers!(BasicTransformerBlock: norm1, attn1, norm2, attn2, norm3, ff);
crate::visit_layers!(Transformer2DModel: norm, proj_in, blocks, proj_out);
