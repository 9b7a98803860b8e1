//! Training forward and backward of the whole `UNet2DConditionModel`
//! ([`crate::model::unet`]) with respect to its trainable adapters.

use super::blocks::{BlockShape, Ctx, DownBlock, DownTape, MidBlock, MidTape, UpBlock, UpTape};
use super::layers::{need, Conv, ConvSaved, GNorm, Layers, Lin};
use super::params::LoraParams;
use crate::error::{shape_err, Error, Result};
use crate::gpu::Gpu;
use crate::model::config::{PerLevel, UNetConfig};
use crate::model::embeddings::Timesteps;
use crate::model::unet::UNet2DConditionModel;
use crate::ops::elementwise::{add, binary, scale, silu, unary, Binary, Unary};
use crate::tensor::Tensor;

/// Options of one training forward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrainOptions {
    /// Gradient checkpointing: each resnet, transformer and resampler keeps only its input, and
    /// runs its forward again just before its backward (about one more forward pass of time,
    /// for much less memory between the passes). The gradients are the same.
    pub checkpointing: bool,
}

/// The UNet's frozen base with trainable adapters: the training forward and its backward.
pub struct TrainUNet {
    config: UNetConfig,
    params: LoraParams,
    time_proj: Timesteps,
    linear_1: Lin,
    linear_2: Lin,
    cond_proj: Option<Lin>,
    conv_in: Conv,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    conv_norm_out: GNorm,
    conv_out: Conv,
}

/// What a training forward keeps for its backward (released as the backward uses it).
pub struct Tape {
    temb_act: Tensor,
    context: Tensor,
    checkpointing: bool,
    down: Vec<DownTape>,
    mid: MidTape,
    up: Vec<UpTape>,
    /// `conv_norm_out`'s input.
    norm_out_x: Tensor,
    conv_out: ConvSaved,
    out_shape: Vec<usize>,
    skips: usize,
}

impl TrainUNet {
    /// The training structure over `model`'s weights (shared, not copied) with `params`, which
    /// must have been made for this model ([`LoraParams::new`]).
    pub fn new(model: &mut UNet2DConditionModel, params: LoraParams) -> Result<Self> {
        let c = model.config().clone();
        let n = c.levels();
        let ch = c.block_out_channels.clone();
        let mid_only_cross = c.mid_block_only_cross_attention.unwrap_or(match &c.only_cross_attention {
            PerLevel::One(b) => *b,
            PerLevel::Each(_) => false,
        });
        let shape = |level: usize, resnets: usize, attention: bool, resample: bool| BlockShape {
            resnets,
            attention,
            channels: ch[level],
            heads: c.heads(level),
            transformer_layers: c.transformer_layers(level),
            only_cross_attention: c.only_cross_attention(level),
            resample,
            output_scale_factor: 1.0,
        };
        let mut layers = Layers::collect(model, &params);
        let conv_in = layers.conv("conv_in")?;
        let linear_1 = layers.linear("time_embedding.linear_1")?;
        let linear_2 = layers.linear("time_embedding.linear_2")?;
        let cond_proj =
            if c.time_cond_proj_dim.is_some() { Some(layers.linear("time_embedding.cond_proj")?) } else { None };
        let down = (0..n)
            .map(|i| {
                let s = shape(i, c.layers_per_block(i), c.down_has_attention(i), i + 1 < n);
                DownBlock::build(&mut layers, &format!("down_blocks.{i}"), &s)
            })
            .collect::<Result<Vec<_>>>()?;
        let mid_shape = BlockShape {
            only_cross_attention: mid_only_cross,
            output_scale_factor: c.mid_block_scale_factor as f32,
            ..shape(n - 1, 1, true, false)
        };
        let mid = MidBlock::build(&mut layers, "mid_block", &mid_shape)?;
        let up = (0..n)
            .map(|i| {
                let r = n - 1 - i;
                let s = shape(r, c.layers_per_block(r) + 1, c.up_has_attention(i), i + 1 < n);
                UpBlock::build(&mut layers, &format!("up_blocks.{i}"), &s)
            })
            .collect::<Result<Vec<_>>>()?;
        let conv_norm_out = layers.group_norm("conv_norm_out")?;
        let conv_out = layers.conv("conv_out")?;
        layers.finish()?;
        let time_proj =
            Timesteps { num_channels: ch[0], flip_sin_to_cos: c.flip_sin_to_cos, downscale_freq_shift: c.freq_shift as f32 };
        Ok(Self { config: c, params, time_proj, linear_1, linear_2, cond_proj, conv_in, down, mid, up, conv_norm_out, conv_out })
    }

    pub fn params(&self) -> &LoraParams {
        &self.params
    }

    pub fn into_params(self) -> LoraParams {
        self.params
    }

    /// Factor the sample's height and width must be a multiple of.
    pub fn size_multiple(&self) -> usize {
        1 << (self.down.len() - 1)
    }

    /// The training forward: the same computation as [`UNet2DConditionModel::forward_with_cond`]
    /// with the adapters applied (`sample: [B, in_channels, h, w]`, one timestep per batch item
    /// or one shared, `encoder_hidden_states: [B, M, D]`), returning the prediction and the
    /// [`Tape`] for [`Self::backward`].
    ///
    /// The time embedding runs as in inference and keeps nothing: it has no adapters and the
    /// timestep has no gradient, so the backward stops at the resnets' `time_emb_proj`.
    pub fn forward(
        &self,
        gpu: &Gpu,
        sample: &Tensor,
        timesteps: &[f32],
        encoder_hidden_states: &Tensor,
        timestep_cond: Option<&Tensor>,
        opts: TrainOptions,
    ) -> Result<(Tensor, Tape)> {
        const OP: &str = "TrainUNet::forward";
        let c = &self.config;
        let (s, e) = (sample.shape(), encoder_hidden_states.shape());
        let m = self.size_multiple();
        if s.len() != 4 || s[1] != c.in_channels || s[2] % m != 0 || s[3] % m != 0 || s[0] == 0 {
            return Err(shape_err(
                OP,
                format!("sample {s:?} must be [B, {}, h, w] with h and w multiples of {m}", c.in_channels),
            ));
        }
        let b = s[0];
        if e.len() != 3 || e[0] != b || e[2] != c.cross_attention_dim(0) {
            return Err(shape_err(
                OP,
                format!("encoder_hidden_states {e:?} must be [{b}, tokens, {}] for sample {s:?}", c.cross_attention_dim(0)),
            ));
        }
        let t: Vec<f32> = match timesteps.len() {
            1 => vec![timesteps[0]; b],
            n if n == b => timesteps.to_vec(),
            n => return Err(shape_err(OP, format!("{n} timesteps for a batch of {b}"))),
        };
        let p = &self.params;
        let t_emb = self.time_proj.forward(gpu, &t)?;
        let t_emb = match (&self.cond_proj, timestep_cond) {
            (Some(proj), Some(cond)) => add(gpu, &t_emb, &proj.forward(gpu, p, cond)?.0)?,
            (None, None) => t_emb,
            _ => return Err(shape_err(OP, "timestep_cond must be given exactly when the config has time_cond_proj_dim")),
        };
        let h = self.linear_1.forward(gpu, p, &t_emb)?.0;
        let h = silu(gpu, &h)?;
        let emb = self.linear_2.forward(gpu, p, &h)?.0;
        let temb_act = silu(gpu, &emb)?;
        drop((t_emb, h, emb));

        let x = if c.center_input_sample {
            let x = unary(gpu, sample, Unary::Scale(2.0))?;
            unary(gpu, &x, Unary::AddScalar(-1.0))?
        } else {
            sample.clone()
        };
        let ctx = Ctx { temb_act: &temb_act, context: encoder_hidden_states, checkpoint: opts.checkpointing, d_context: None };
        let mut h = self.conv_in.forward(gpu, p, &x)?.0;
        drop(x);
        let mut skips = vec![h.clone()];
        let mut down = Vec::with_capacity(self.down.len());
        for block in &self.down {
            let (y, tape) = block.forward(gpu, p, &ctx, &h, &mut skips)?;
            down.push(tape);
            h = y;
        }
        let n_skips = skips.len();
        let (y, mid) = self.mid.forward(gpu, p, &ctx, &h)?;
        h = y;
        let mut up = Vec::with_capacity(self.up.len());
        for block in &self.up {
            let (y, tape) = block.forward(gpu, p, &ctx, &h, &mut skips)?;
            up.push(tape);
            h = y;
        }
        let n = self.conv_norm_out.forward(gpu, &h, true)?;
        let (out, conv_out) = self.conv_out.forward(gpu, p, &n)?;
        drop(n);
        let tape = Tape {
            temb_act: temb_act.clone(),
            context: encoder_hidden_states.clone(),
            checkpointing: opts.checkpointing,
            down,
            mid,
            up,
            norm_out_x: h,
            conv_out,
            out_shape: out.shape().to_vec(),
            skips: n_skips,
        };
        Ok((out, tape))
    }

    /// The backward from `d_out` (the loss gradient at the prediction, shaped like it) to every
    /// adapter: adds each layer's gradients to its `d_down` / `d_up` (zero them with
    /// [`LoraParams::zero_grads`] between steps; without that, calls accumulate). Nothing
    /// upstream of `conv_in` is differentiated.
    pub fn backward(&self, gpu: &Gpu, tape: Tape, d_out: &Tensor) -> Result<()> {
        self.backward_into(gpu, tape, d_out, None)
    }

    /// [`Self::backward`], also returning the gradient at `encoder_hidden_states`
    /// (`[B, M, D]`, the sum over every cross-attention's keys and values) for training the
    /// text encoder.
    pub fn backward_with_context_grad(&self, gpu: &Gpu, tape: Tape, d_out: &Tensor) -> Result<Tensor> {
        let d_context = Tensor::zeros(gpu, tape.context.shape())?;
        self.backward_into(gpu, tape, d_out, Some(&d_context))?;
        Ok(d_context)
    }

    fn backward_into(&self, gpu: &Gpu, tape: Tape, d_out: &Tensor, d_context: Option<&Tensor>) -> Result<()> {
        if d_out.shape() != tape.out_shape {
            return Err(shape_err(
                "TrainUNet::backward",
                format!("the output gradient {:?} must be shaped like the output {:?}", d_out.shape(), tape.out_shape),
            ));
        }
        d_out.expect_f32("TrainUNet::backward")?;
        let p = &self.params;
        let Tape { temb_act, context, checkpointing, down, mid, up, norm_out_x, conv_out, skips, .. } = tape;
        let ctx = Ctx { temb_act: &temb_act, context: &context, checkpoint: checkpointing, d_context };
        let dn = need(self.conv_out.backward(gpu, p, conv_out, d_out, true)?, "conv_out")?;
        let mut g = self.conv_norm_out.backward(gpu, &norm_out_x, &dn, true)?;
        drop((dn, norm_out_x));
        let mut dskips: Vec<Option<Tensor>> = vec![None; skips];
        for (block, t) in self.up.iter().zip(up).rev() {
            g = block.backward(gpu, p, &ctx, t, g, &mut dskips)?;
        }
        g = self.mid.backward(gpu, p, &ctx, mid, g)?;
        let mut g = Some(g);
        for (i, (block, t)) in self.down.iter().zip(down).enumerate().rev() {
            let dy = g.take().ok_or_else(|| Error::Invalid("UNet backward: a down block got no gradient".into()))?;
            // conv_in has no adapter and the sample needs no gradient: the first down block
            // stops at its adapters.
            g = block.backward(gpu, p, &ctx, t, dy, &mut dskips, i > 0)?;
        }
        Ok(())
    }
}

/// The gradient of `mean((pred − target)²)` at `pred`: `2·(pred − target) / numel`.
pub fn mse_loss_grad(gpu: &Gpu, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    if pred.shape() != target.shape() {
        return Err(shape_err(
            "mse_loss_grad",
            format!("prediction {:?} and target {:?} differ in shape", pred.shape(), target.shape()),
        ));
    }
    let diff = binary(gpu, pred, target, Binary::Sub)?;
    scale(gpu, &diff, 2.0 / pred.numel().max(1) as f32)
}
