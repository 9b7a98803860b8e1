//! Training forward and backward of the UNet's levels (`DownBlock2D` /
//! `CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D` / `CrossAttnUpBlock2D`),
//! mirroring [`crate::model::unet_blocks`], with optional gradient checkpointing.
//!
//! The unit of checkpointing is one module: a resnet, a transformer, a down- or upsampler.
//! With checkpointing a module keeps only its input ([`Kept::Input`]) and its forward runs
//! again, keeping everything, just before its backward; without it the module keeps what its
//! backward needs ([`Kept::Saved`]). Both run the same kernels on the same inputs, so the
//! gradients are identical.

use super::layers::{ConvSaved, Layers};
use super::params::LoraParams;
use super::resnet::{Downsample, Resnet, ResnetSaved, Upsample};
use super::transformer::{Transformer, TransformerSaved};
use crate::error::{shape_err, Error, Result};
use crate::gpu::Gpu;
use crate::nn::join;
use crate::ops::grad::activation::accumulate;
use crate::ops::layout::concat;
use crate::tensor::Tensor;

/// A module's forward state: everything its backward needs, or only its input.
pub(super) enum Kept<S> {
    Saved(S),
    Input(Tensor),
}

impl<S> Kept<S> {
    pub(super) fn new(checkpoint: bool, x: &Tensor, saved: S) -> Self {
        if checkpoint {
            drop(saved);
            Kept::Input(x.clone())
        } else {
            Kept::Saved(saved)
        }
    }

    /// The saved state, recomputing the module's forward from its input when checkpointed.
    pub(super) fn restore(self, forward: impl FnOnce(&Tensor) -> Result<(Tensor, S)>) -> Result<S> {
        match self {
            Kept::Saved(s) => Ok(s),
            Kept::Input(x) => Ok(forward(&x)?.1),
        }
    }
}

/// Per-call inputs every module may read.
pub(super) struct Ctx<'a> {
    pub temb_act: &'a Tensor,
    pub context: &'a Tensor,
    pub checkpoint: bool,
    /// Where the backward adds the gradient at `context` (`None`: not wanted).
    pub d_context: Option<&'a Tensor>,
}

/// The block's shape as the config gives it (see `UNet2DConditionModel::load`).
pub(super) struct BlockShape {
    pub resnets: usize,
    pub attention: bool,
    pub channels: usize,
    pub heads: usize,
    pub transformer_layers: usize,
    pub only_cross_attention: bool,
    pub resample: bool,
    pub output_scale_factor: f32,
}

fn build_level(
    layers: &mut Layers<'_>,
    prefix: &str,
    s: &BlockShape,
    resnets: usize,
    attentions: usize,
) -> Result<(Vec<Resnet>, Vec<Transformer>)> {
    let r = (0..resnets)
        .map(|i| Resnet::build(layers, &join(prefix, &format!("resnets.{i}")), s.output_scale_factor))
        .collect::<Result<Vec<_>>>()?;
    let a = if s.attention {
        (0..attentions)
            .map(|i| {
                let p = join(prefix, &format!("attentions.{i}"));
                Transformer::build(layers, &p, s.channels, s.heads, s.transformer_layers, s.only_cross_attention)
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        vec![]
    };
    Ok((r, a))
}

fn resnet_fwd(gpu: &Gpu, p: &LoraParams, c: &Ctx<'_>, r: &Resnet, x: &Tensor) -> Result<(Tensor, Kept<ResnetSaved>)> {
    let (y, s) = r.forward(gpu, p, x, c.temb_act)?;
    Ok((y, Kept::new(c.checkpoint, x, s)))
}

fn resnet_bwd(
    gpu: &Gpu,
    p: &LoraParams,
    c: &Ctx<'_>,
    r: &Resnet,
    k: Kept<ResnetSaved>,
    dy: &Tensor,
    want_dx: bool,
) -> Result<Option<Tensor>> {
    let s = k.restore(|x| r.forward(gpu, p, x, c.temb_act))?;
    r.backward(gpu, p, s, dy, want_dx)
}

fn attn_fwd(gpu: &Gpu, p: &LoraParams, c: &Ctx<'_>, a: &Transformer, x: &Tensor) -> Result<(Tensor, Kept<TransformerSaved>)> {
    let (y, s) = a.forward(gpu, p, x, c.context)?;
    Ok((y, Kept::new(c.checkpoint, x, s)))
}

fn attn_bwd(gpu: &Gpu, p: &LoraParams, c: &Ctx<'_>, a: &Transformer, k: Kept<TransformerSaved>, dy: &Tensor) -> Result<Tensor> {
    let s = k.restore(|x| a.forward(gpu, p, x, c.context))?;
    a.backward(gpu, p, s, dy, c.d_context)
}

/// `g + extra` in place on `g` (a skip connection's gradient joining the main path's).
fn join_grad(gpu: &Gpu, g: Tensor, extra: Option<Tensor>) -> Result<Tensor> {
    if let Some(e) = extra {
        accumulate(gpu, &g, &e, 1.0)?;
    }
    Ok(g)
}

fn missing_grad() -> Error {
    Error::Invalid("UNet backward: a block's input gradient was not computed".into())
}

/// Down block: resnets (each followed by a transformer in the cross-attention variant), then
/// an optional stride-2 downsampler; every layer's output is a skip connection.
pub(super) struct DownBlock {
    resnets: Vec<Resnet>,
    attentions: Vec<Transformer>,
    downsampler: Option<Downsample>,
}

pub(super) struct DownTape {
    layers: Vec<(Kept<ResnetSaved>, Option<Kept<TransformerSaved>>)>,
    downsampler: Option<Kept<ConvSaved>>,
    /// Index of the first skip connection the block pushed.
    first_skip: usize,
}

impl DownBlock {
    pub fn build(layers: &mut Layers<'_>, prefix: &str, s: &BlockShape) -> Result<Self> {
        let (resnets, attentions) = build_level(layers, prefix, s, s.resnets, s.resnets)?;
        let downsampler = if s.resample { Some(Downsample::build(layers, &join(prefix, "downsamplers.0"))?) } else { None };
        Ok(Self { resnets, attentions, downsampler })
    }

    pub fn forward(
        &self,
        gpu: &Gpu,
        p: &LoraParams,
        c: &Ctx<'_>,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<(Tensor, DownTape)> {
        let first_skip = skips.len();
        let mut h = x.clone();
        let mut layers = Vec::with_capacity(self.resnets.len());
        for (i, resnet) in self.resnets.iter().enumerate() {
            let (y, rk) = resnet_fwd(gpu, p, c, resnet, &h)?;
            h = y;
            let ak = match self.attentions.get(i) {
                Some(attn) => {
                    let (y, ak) = attn_fwd(gpu, p, c, attn, &h)?;
                    h = y;
                    Some(ak)
                }
                None => None,
            };
            layers.push((rk, ak));
            skips.push(h.clone());
        }
        let downsampler = match &self.downsampler {
            Some(down) => {
                let (y, s) = down.forward(gpu, p, &h)?;
                let k = Kept::new(c.checkpoint, &h, s);
                h = y;
                skips.push(h.clone());
                Some(k)
            }
            None => None,
        };
        Ok((h, DownTape { layers, downsampler, first_skip }))
    }

    /// From the gradient at the block's output and the gradients of its skip connections
    /// (`dskips`, indexed like the forward's skip list, taken out as used) to the gradient at
    /// its input (when `want_dx`).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        gpu: &Gpu,
        p: &LoraParams,
        c: &Ctx<'_>,
        t: DownTape,
        dy: Tensor,
        dskips: &mut [Option<Tensor>],
        want_dx: bool,
    ) -> Result<Option<Tensor>> {
        let mut skip = t.first_skip + t.layers.len() + usize::from(t.downsampler.is_some());
        let mut take = |dskips: &mut [Option<Tensor>]| {
            skip -= 1;
            dskips.get_mut(skip).and_then(Option::take)
        };
        let mut g = dy;
        if let (Some(down), Some(k)) = (&self.downsampler, t.downsampler) {
            g = join_grad(gpu, g, take(dskips))?;
            let s = k.restore(|x| down.forward(gpu, p, x))?;
            g = down.backward(gpu, p, s, &g)?;
        }
        for (i, (rk, ak)) in t.layers.into_iter().enumerate().rev() {
            g = join_grad(gpu, g, take(dskips))?;
            if let (Some(attn), Some(ak)) = (self.attentions.get(i), ak) {
                g = attn_bwd(gpu, p, c, attn, ak, &g)?;
            }
            let want = want_dx || i > 0;
            let resnet = self.resnets.get(i).ok_or_else(missing_grad)?;
            match resnet_bwd(gpu, p, c, resnet, rk, &g, want)? {
                Some(dx) => g = dx,
                None if !want => return Ok(None),
                None => return Err(missing_grad()),
            }
        }
        Ok(Some(g))
    }
}

/// `UNetMidBlock2DCrossAttn`: `resnets.0`, then (`attentions.i`, `resnets.i+1`) pairs.
pub(super) struct MidBlock {
    resnets: Vec<Resnet>,
    attentions: Vec<Transformer>,
}

pub(super) struct MidTape {
    first: Kept<ResnetSaved>,
    pairs: Vec<(Kept<TransformerSaved>, Kept<ResnetSaved>)>,
}

impl MidBlock {
    pub fn build(layers: &mut Layers<'_>, prefix: &str, s: &BlockShape) -> Result<Self> {
        let (resnets, attentions) = build_level(layers, prefix, s, s.resnets + 1, s.resnets)?;
        if attentions.len() != s.resnets {
            return Err(Error::Invalid(format!("{prefix}: the mid block needs one transformer per resnet pair")));
        }
        Ok(Self { resnets, attentions })
    }

    pub fn forward(&self, gpu: &Gpu, p: &LoraParams, c: &Ctx<'_>, x: &Tensor) -> Result<(Tensor, MidTape)> {
        let (first_resnet, rest) = self.resnets.split_first().ok_or_else(|| Error::Invalid("mid block without resnets".into()))?;
        let (mut h, first) = resnet_fwd(gpu, p, c, first_resnet, x)?;
        let mut pairs = Vec::with_capacity(rest.len());
        for (attn, resnet) in self.attentions.iter().zip(rest) {
            let (y, ak) = attn_fwd(gpu, p, c, attn, &h)?;
            let (y, rk) = resnet_fwd(gpu, p, c, resnet, &y)?;
            h = y;
            pairs.push((ak, rk));
        }
        Ok((h, MidTape { first, pairs }))
    }

    pub fn backward(&self, gpu: &Gpu, p: &LoraParams, c: &Ctx<'_>, t: MidTape, dy: Tensor) -> Result<Tensor> {
        let mut g = dy;
        for ((attn, resnet), (ak, rk)) in self.attentions.iter().zip(&self.resnets[1..]).zip(t.pairs).rev() {
            g = resnet_bwd(gpu, p, c, resnet, rk, &g, true)?.ok_or_else(missing_grad)?;
            g = attn_bwd(gpu, p, c, attn, ak, &g)?;
        }
        resnet_bwd(gpu, p, c, &self.resnets[0], t.first, &g, true)?.ok_or_else(missing_grad)
    }
}

/// Up block: each resnet takes the running features concatenated on channels with the most
/// recent skip connection (then a transformer in the cross-attention variant); then an
/// optional nearest-2× upsampler.
pub(super) struct UpBlock {
    resnets: Vec<Resnet>,
    attentions: Vec<Transformer>,
    upsampler: Option<Upsample>,
}

pub(super) struct UpLayer {
    resnet: Kept<ResnetSaved>,
    attention: Option<Kept<TransformerSaved>>,
    /// The skip connection's index and the running features' channels at the concatenation.
    skip: usize,
    channels: usize,
}

pub(super) struct UpTape {
    layers: Vec<UpLayer>,
    upsampler: Option<Kept<ConvSaved>>,
}

/// Splits `g: [B, C1 + C2, H, W]` on channels into `[B, C1, H, W]` and `[B, C2, H, W]` (the
/// gradient of a channel concatenation).
fn split_channels(gpu: &Gpu, g: &Tensor, c1: usize) -> Result<(Tensor, Tensor)> {
    let s = g.shape();
    if s.len() != 4 || c1 == 0 || c1 >= s[1] {
        return Err(shape_err("split_channels", format!("cannot split {s:?} after {c1} channels")));
    }
    let (b, c, hw) = (s[0], s[1], s[2] * s[3]);
    let c2 = c - c1;
    let a = Tensor::empty(gpu, &[b, c1, s[2], s[3]])?;
    let d = Tensor::empty(gpu, &[b, c2, s[2], s[3]])?;
    let f = 4u64;
    for bi in 0..b {
        let base = (bi * c * hw) as u64 * f;
        gpu.copy(g.buffer(), base, a.buffer(), (bi * c1 * hw) as u64 * f, (c1 * hw) as u64 * f);
        gpu.copy(g.buffer(), base + (c1 * hw) as u64 * f, d.buffer(), (bi * c2 * hw) as u64 * f, (c2 * hw) as u64 * f);
    }
    Ok((a, d))
}

impl UpBlock {
    pub fn build(layers: &mut Layers<'_>, prefix: &str, s: &BlockShape) -> Result<Self> {
        let (resnets, attentions) = build_level(layers, prefix, s, s.resnets, s.resnets)?;
        let upsampler = if s.resample { Some(Upsample::build(layers, &join(prefix, "upsamplers.0"))?) } else { None };
        Ok(Self { resnets, attentions, upsampler })
    }

    /// Runs the block, popping one skip connection per resnet from the end of `skips`.
    pub fn forward(
        &self,
        gpu: &Gpu,
        p: &LoraParams,
        c: &Ctx<'_>,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<(Tensor, UpTape)> {
        let mut h = x.clone();
        let mut layers = Vec::with_capacity(self.resnets.len());
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| shape_err("UpBlock", "ran out of skip connections"))?;
            if skip.shape()[2..] != h.shape()[2..] {
                return Err(shape_err(
                    "UpBlock",
                    format!(
                        "features {:?} and skip connection {:?} differ in size; the sample's height \
                         and width must be multiples of 2^(levels-1)",
                        h.shape(),
                        skip.shape()
                    ),
                ));
            }
            let channels = h.dim(1);
            let cat = concat(gpu, &[&h, &skip], 1)?;
            drop(skip);
            let (y, rk) = resnet_fwd(gpu, p, c, resnet, &cat)?;
            drop(cat);
            h = y;
            let attention = match self.attentions.get(i) {
                Some(attn) => {
                    let (y, ak) = attn_fwd(gpu, p, c, attn, &h)?;
                    h = y;
                    Some(ak)
                }
                None => None,
            };
            layers.push(UpLayer { resnet: rk, attention, skip: skips.len(), channels });
        }
        let upsampler = match &self.upsampler {
            Some(up) => {
                let (y, s) = up.forward(gpu, p, &h)?;
                let k = Kept::new(c.checkpoint, &h, s);
                h = y;
                Some(k)
            }
            None => None,
        };
        Ok((h, UpTape { layers, upsampler }))
    }

    /// From the gradient at the block's output to the gradient at its input; each skip
    /// connection's gradient goes to `dskips[index]`.
    pub fn backward(
        &self,
        gpu: &Gpu,
        p: &LoraParams,
        c: &Ctx<'_>,
        t: UpTape,
        dy: Tensor,
        dskips: &mut [Option<Tensor>],
    ) -> Result<Tensor> {
        let mut g = dy;
        if let (Some(up), Some(k)) = (&self.upsampler, t.upsampler) {
            let s = k.restore(|x| up.forward(gpu, p, x))?;
            g = up.backward(gpu, p, s, &g)?;
        }
        for (i, l) in t.layers.into_iter().enumerate().rev() {
            if let (Some(attn), Some(ak)) = (self.attentions.get(i), l.attention) {
                g = attn_bwd(gpu, p, c, attn, ak, &g)?;
            }
            let resnet = self.resnets.get(i).ok_or_else(missing_grad)?;
            let gc = resnet_bwd(gpu, p, c, resnet, l.resnet, &g, true)?.ok_or_else(missing_grad)?;
            let (dh, dskip) = split_channels(gpu, &gc, l.channels)?;
            drop(gc);
            let slot = dskips.get_mut(l.skip).ok_or_else(|| Error::Invalid(format!("no skip connection {}", l.skip)))?;
            *slot = Some(dskip);
            g = dh;
        }
        Ok(g)
    }
}
