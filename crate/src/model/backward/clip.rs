//! Training forward and backward of the CLIP text encoder ([`crate::model::clip`]) with respect
//! to its LoRA adapters, for training the text encoder beside the UNet.
//!
//! The token and position embeddings are frozen and have no adapters: the training forward
//! starts from [`ClipTextModel::embeddings`] and runs the encoder layers the prompt embedding is
//! taken from (`num_hidden_layers − clip_skip`), each
//!
//! ```text
//! h = h + out_proj(causal_attention(q_proj(ln1(h)), k_proj(ln1(h)), v_proj(ln1(h))))
//! h = h + fc2(act(fc1(ln2(h))))
//! ```
//!
//! then `final_layer_norm` (when the pipeline applies it). The backward goes from the gradient
//! at the prompt embedding (the UNet's [`super::TrainUNet::backward_with_context_grad`]) back
//! to the first layer, adding each adapter's gradients, and on request to the embeddings (for
//! a trained trigger-word embedding).
//! With [`TrainOptions::checkpointing`] each layer keeps only its input and runs its forward
//! again before its backward.

use super::attention::{Attn, AttnSaved};
use super::blocks::Kept;
use super::layers::{need, LNorm, Layers, Lin, LowRankSaved};
use super::params::LoraParams;
use super::unet::TrainOptions;
use crate::error::{shape_err, Error, Result};
use crate::gpu::Gpu;
use crate::model::clip::{activation, ClipTextModel};
use crate::model::transformer::CLIP_PROJECTIONS;
use crate::ops::elementwise::{add, unary, Unary};
use crate::ops::grad::activation::{accumulate, gelu_backward, quick_gelu_backward};
use crate::tensor::Tensor;

/// `CLIPEncoderLayer`.
struct Layer {
    ln1: LNorm,
    attn: Attn,
    ln2: LNorm,
    fc1: Lin,
    fc2: Lin,
}

struct LayerSaved {
    /// The inputs of `layer_norm1` and `layer_norm2`.
    x0: Tensor,
    x1: Tensor,
    attn: AttnSaved,
    fc1: LowRankSaved,
    /// `fc1`'s output (the activation's input).
    h: Tensor,
    fc2: LowRankSaved,
}

/// The text encoder's frozen base with trainable adapters.
pub struct TrainClip {
    params: LoraParams,
    layers: Vec<Layer>,
    final_norm: Option<LNorm>,
    act: Unary,
    hidden: usize,
}

/// What a training forward keeps for its backward.
pub struct ClipTape {
    layers: Vec<Kept<LayerSaved>>,
    /// `final_layer_norm`'s input.
    final_x: Option<Tensor>,
    out_shape: Vec<usize>,
}

impl Layer {
    fn forward(&self, gpu: &Gpu, p: &LoraParams, act: Unary, x: &Tensor) -> Result<(Tensor, LayerSaved)> {
        let n = self.ln1.forward(gpu, x)?;
        let (a, attn) = self.attn.forward(gpu, p, &n, &n)?;
        drop(n);
        let x1 = add(gpu, x, &a)?;
        drop(a);
        let n = self.ln2.forward(gpu, &x1)?;
        let (h, fc1) = self.fc1.forward(gpu, p, &n)?;
        drop(n);
        let g = unary(gpu, &h, act)?;
        let (f, fc2) = self.fc2.forward(gpu, p, &g)?;
        drop(g);
        let y = add(gpu, &x1, &f)?;
        Ok((y, LayerSaved { x0: x.clone(), x1, attn, fc1, h, fc2 }))
    }

    /// The gradient at the layer's input (`None` unless `want_dx`).
    fn backward(&self, gpu: &Gpu, p: &LoraParams, act: Unary, s: LayerSaved, dy: &Tensor, want_dx: bool) -> Result<Option<Tensor>> {
        let dg = need(self.fc2.backward(gpu, p, s.fc2, dy, true)?, "mlp.fc2")?;
        let dh = match act {
            Unary::QuickGelu => quick_gelu_backward(gpu, &s.h, &dg)?,
            Unary::Gelu => gelu_backward(gpu, &s.h, &dg)?,
            other => return Err(Error::Invalid(format!("CLIP training: no gradient for the activation {other:?}"))),
        };
        drop((dg, s.h));
        let dn = need(self.fc1.backward(gpu, p, s.fc1, &dh, true)?, "mlp.fc1")?;
        drop(dh);
        let dx1 = self.ln2.backward(gpu, &s.x1, &dn)?;
        drop((dn, s.x1));
        accumulate(gpu, &dx1, dy, 1.0)?;
        let dn = self.attn.backward(gpu, p, s.attn, &dx1, None)?;
        if !want_dx {
            return Ok(None);
        }
        let dx0 = self.ln1.backward(gpu, &s.x0, &dn)?;
        drop((dn, s.x0));
        accumulate(gpu, &dx0, &dx1, 1.0)?;
        Ok(Some(dx0))
    }
}

impl TrainClip {
    /// The training structure over `model`'s weights (shared, not copied) with `params` made by
    /// [`LoraParams::new_text_encoder`] for the same `layers`; `final_norm` as
    /// [`crate::model::clip::EncodeOpts::final_norm`].
    pub fn new(model: &mut ClipTextModel, params: LoraParams, layers: usize, final_norm: bool) -> Result<Self> {
        let c = model.config().clone();
        if layers == 0 || layers > model.num_layers() {
            return Err(Error::Invalid(format!(
                "CLIP training: {layers} encoder layers asked of a text encoder with {}",
                model.num_layers()
            )));
        }
        let act = activation(&c)?;
        let mut found = Layers::collect(model, &params);
        let mut built = Vec::with_capacity(layers);
        for i in 0..layers {
            let n = |s: &str| format!("text_model.encoder.layers.{i}.{s}");
            built.push(Layer {
                ln1: found.layer_norm(&n("layer_norm1"))?,
                attn: Attn::build_named(&mut found, &n("self_attn"), CLIP_PROJECTIONS, c.num_attention_heads, false, true)?,
                ln2: found.layer_norm(&n("layer_norm2"))?,
                fc1: found.linear(&n("mlp.fc1"))?,
                fc2: found.linear(&n("mlp.fc2"))?,
            });
        }
        let final_norm = if final_norm { Some(found.layer_norm("text_model.final_layer_norm")?) } else { None };
        found.finish()?;
        Ok(Self { params, layers: built, final_norm, act, hidden: c.hidden_size })
    }

    pub fn params(&self) -> &LoraParams {
        &self.params
    }

    /// The prompt embedding `[B, S, D]` from the embeddings `[B, S, D]`
    /// ([`ClipTextModel::embeddings`]), with the adapters applied, and the tape for
    /// [`Self::backward`].
    pub fn forward(&self, gpu: &Gpu, embeddings: &Tensor, opts: TrainOptions) -> Result<(Tensor, ClipTape)> {
        let s = embeddings.shape();
        if s.len() != 3 || s[2] != self.hidden || s[0] == 0 || s[1] == 0 {
            return Err(shape_err("TrainClip::forward", format!("embeddings {s:?} must be [B, tokens, {}]", self.hidden)));
        }
        let p = &self.params;
        let mut h = embeddings.clone();
        let mut kept = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (y, saved) = layer.forward(gpu, p, self.act, &h)?;
            kept.push(Kept::new(opts.checkpointing, &h, saved));
            h = y;
        }
        let (out, final_x) = match &self.final_norm {
            Some(norm) => (norm.forward(gpu, &h)?, Some(h)),
            None => (h, None),
        };
        let out_shape = out.shape().to_vec();
        Ok((out, ClipTape { layers: kept, final_x, out_shape }))
    }

    /// The backward from the gradient at the prompt embedding to every adapter (added to the
    /// adapters' gradient buffers). With `embedding_grad` it also returns the gradient at the
    /// embeddings `[B, S, D]` (the input of [`Self::forward`]), from which the rows of trained
    /// token embeddings take theirs.
    pub fn backward(&self, gpu: &Gpu, tape: ClipTape, d_out: &Tensor, embedding_grad: bool) -> Result<Option<Tensor>> {
        if d_out.shape() != tape.out_shape {
            return Err(shape_err(
                "TrainClip::backward",
                format!("the output gradient {:?} must be shaped like the output {:?}", d_out.shape(), tape.out_shape),
            ));
        }
        let p = &self.params;
        let mut g = match (&self.final_norm, tape.final_x) {
            (Some(norm), Some(x)) => norm.backward(gpu, &x, d_out)?,
            _ => d_out.clone(),
        };
        for (i, (layer, k)) in self.layers.iter().zip(tape.layers).enumerate().rev() {
            let saved = k.restore(|x| layer.forward(gpu, p, self.act, x))?;
            match layer.backward(gpu, p, self.act, saved, &g, i > 0 || embedding_grad)? {
                Some(dx) => g = dx,
                None => return Ok(None),
            }
        }
        Ok(embedding_grad.then_some(g))
    }
}

/// The gradients of added token rows from the gradient at the embeddings: `d_embeddings` is
/// `[B, S, dim]` for the token id rows `ids` (B rows of S); the result is `[1 + n, dim]` in
/// [`ClipTextModel::embeddings_with_added`]'s table layout, row `1 + k` the sum of
/// `d_embeddings` over the positions holding id `first + k` (k < n), row 0 zero.
pub fn token_row_grads(ids: &[&[u32]], d_embeddings: &[f32], first: u32, n: usize, dim: usize) -> Result<Vec<f32>> {
    let positions: usize = ids.iter().map(|r| r.len()).sum();
    if d_embeddings.len() != positions * dim {
        return Err(shape_err(
            "token_row_grads",
            format!("{} gradient values for {positions} positions of {dim}", d_embeddings.len()),
        ));
    }
    let mut grad = vec![0.0f32; (n + 1) * dim];
    for (p, &id) in ids.iter().flat_map(|r| r.iter()).enumerate() {
        let k = id.wrapping_sub(first) as usize;
        if k < n {
            let src = &d_embeddings[p * dim..(p + 1) * dim];
            grad[(k + 1) * dim..(k + 2) * dim].iter_mut().zip(src).for_each(|(a, b)| *a += b);
        }
    }
    Ok(grad)
}

