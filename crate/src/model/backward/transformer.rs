//! Training forward and backward of diffusers' `BasicTransformerBlock` and
//! `Transformer2DModel` (continuous input), mirroring [`crate::model::transformer`].

use super::attention::{Attn, AttnSaved, Ff, FfSaved};
use super::layers::{need, LNorm, GNorm, Layers, Lin, LowRankSaved};
use super::params::LoraParams;
use crate::error::{shape_err, Result};
use crate::gpu::Gpu;
use crate::nn::join;
use crate::ops::elementwise::add;
use crate::ops::grad::activation::accumulate;
use crate::ops::layout::transpose_last2;
use crate::tensor::Tensor;

/// `x += attn1(norm1(x))`, `x += attn2(norm2(x), context)`, `x += ff(norm3(x))`.
pub(super) struct Block {
    norm1: LNorm,
    attn1: Attn,
    norm2: LNorm,
    attn2: Attn,
    norm3: LNorm,
    ff: Ff,
}

pub(super) struct BlockSaved {
    /// The inputs of norm1, norm2 and norm3.
    x0: Tensor,
    x1: Tensor,
    x2: Tensor,
    a1: AttnSaved,
    a2: AttnSaved,
    f: FfSaved,
}

impl Block {
    fn build(layers: &mut Layers<'_>, prefix: &str, heads: usize, only_cross: bool) -> Result<Self> {
        let p = |n: &str| join(prefix, n);
        Ok(Self {
            norm1: layers.layer_norm(&p("norm1"))?,
            attn1: Attn::build(layers, &p("attn1"), heads, only_cross)?,
            norm2: layers.layer_norm(&p("norm2"))?,
            attn2: Attn::build(layers, &p("attn2"), heads, true)?,
            norm3: layers.layer_norm(&p("norm3"))?,
            ff: Ff::build(layers, &p("ff"))?,
        })
    }

    fn forward(&self, gpu: &Gpu, p: &LoraParams, x: &Tensor, context: &Tensor) -> Result<(Tensor, BlockSaved)> {
        let n = self.norm1.forward(gpu, x)?;
        let (a, a1) = self.attn1.forward(gpu, p, &n, context)?;
        drop(n);
        let x1 = add(gpu, x, &a)?;
        drop(a);
        let n = self.norm2.forward(gpu, &x1)?;
        let (a, a2) = self.attn2.forward(gpu, p, &n, context)?;
        drop(n);
        let x2 = add(gpu, &x1, &a)?;
        drop(a);
        let n = self.norm3.forward(gpu, &x2)?;
        let (f, fs) = self.ff.forward(gpu, p, &n)?;
        drop(n);
        let y = add(gpu, &x2, &f)?;
        Ok((y, BlockSaved { x0: x.clone(), x1, x2, a1, a2, f: fs }))
    }

    fn backward(&self, gpu: &Gpu, p: &LoraParams, s: BlockSaved, dy: &Tensor, d_context: Option<&Tensor>) -> Result<Tensor> {
        // Each residual step `y = x + f(norm(x))`: dx = dy + norm'ᵀ(f'ᵀ(dy)).
        let dn = self.ff.backward(gpu, p, s.f, dy)?;
        let dx2 = self.norm3.backward(gpu, &s.x2, &dn)?;
        drop((dn, s.x2));
        accumulate(gpu, &dx2, dy, 1.0)?;
        let dn = self.attn2.backward(gpu, p, s.a2, &dx2, d_context)?;
        let dx1 = self.norm2.backward(gpu, &s.x1, &dn)?;
        drop((dn, s.x1));
        accumulate(gpu, &dx1, &dx2, 1.0)?;
        drop(dx2);
        let dn = self.attn1.backward(gpu, p, s.a1, &dx1, d_context)?;
        let dx0 = self.norm1.backward(gpu, &s.x0, &dn)?;
        drop((dn, s.x0));
        accumulate(gpu, &dx0, &dx1, 1.0)?;
        Ok(dx0)
    }
}

/// `GroupNorm(eps=1e-6)`, `proj_in`, the blocks on `[B, H·W, inner]` tokens, `proj_out`, plus
/// the input as residual; `proj_in` / `proj_out` run as linear layers on the token layout
/// (1×1 convolutions or, with `use_linear_projection`, linear layers).
pub(super) struct Transformer {
    norm: GNorm,
    proj_in: Lin,
    blocks: Vec<Block>,
    proj_out: Lin,
    channels: usize,
}

pub(super) struct TransformerSaved {
    x: Tensor,
    proj_in: LowRankSaved,
    blocks: Vec<BlockSaved>,
    proj_out: LowRankSaved,
}

impl Transformer {
    pub fn build(
        layers: &mut Layers<'_>,
        prefix: &str,
        channels: usize,
        heads: usize,
        depth: usize,
        only_cross: bool,
    ) -> Result<Self> {
        let p = |n: &str| join(prefix, n);
        let norm = layers.group_norm(&p("norm"))?;
        let proj_in = layers.linear(&p("proj_in"))?;
        let blocks = (0..depth)
            .map(|i| Block::build(layers, &p(&format!("transformer_blocks.{i}")), heads, only_cross))
            .collect::<Result<Vec<_>>>()?;
        let proj_out = layers.linear(&p("proj_out"))?;
        Ok(Self { norm, proj_in, blocks, proj_out, channels })
    }

    /// `x: [B, C, H, W]`, `context: [B, M, cross_attention_dim]` → `[B, C, H, W]`.
    pub fn forward(&self, gpu: &Gpu, p: &LoraParams, x: &Tensor, context: &Tensor) -> Result<(Tensor, TransformerSaved)> {
        let s = x.shape();
        if s.len() != 4 || s[1] != self.channels {
            return Err(shape_err("Transformer2DModel", format!("input {s:?} must be [B, {}, H, W]", self.channels)));
        }
        let (b, c, hw) = (s[0], s[1], s[2] * s[3]);
        let n = self.norm.forward(gpu, x, false)?;
        let t = transpose_last2(gpu, &n.reshape(&[b, c, hw])?)?; // [B, HW, C]
        drop(n);
        let (mut h, proj_in) = self.proj_in.forward(gpu, p, &t)?;
        drop(t);
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let (y, bs) = block.forward(gpu, p, &h, context)?;
            blocks.push(bs);
            h = y;
        }
        let (o, proj_out) = self.proj_out.forward(gpu, p, &h)?; // [B, HW, C]
        drop(h);
        let o = transpose_last2(gpu, &o)?.reshape(s)?;
        let y = add(gpu, &o, x)?;
        Ok((y, TransformerSaved { x: x.clone(), proj_in, blocks, proj_out }))
    }

    /// The gradient at `x`; the cross-attentions add theirs at the context to `d_context` when
    /// one is given.
    pub fn backward(
        &self,
        gpu: &Gpu,
        p: &LoraParams,
        s: TransformerSaved,
        dy: &Tensor,
        d_context: Option<&Tensor>,
    ) -> Result<Tensor> {
        let shape = s.x.shape().to_vec();
        let (b, c, hw) = (shape[0], shape[1], shape[2] * shape[3]);
        let d_o = transpose_last2(gpu, &dy.reshape(&[b, c, hw])?)?; // [B, HW, C]
        let mut dh = need(self.proj_out.backward(gpu, p, s.proj_out, &d_o, true)?, "proj_out")?;
        drop(d_o);
        for (block, bs) in self.blocks.iter().zip(s.blocks).rev() {
            dh = block.backward(gpu, p, bs, &dh, d_context)?;
        }
        let dt = need(self.proj_in.backward(gpu, p, s.proj_in, &dh, true)?, "proj_in")?;
        drop(dh);
        let dn = transpose_last2(gpu, &dt)?.reshape(&shape)?; // [B, C, H, W]
        drop(dt);
        let dx = self.norm.backward(gpu, &s.x, &dn, false)?;
        accumulate(gpu, &dx, dy, 1.0)?;
        Ok(dx)
    }
}
