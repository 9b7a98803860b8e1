//! Training of LoRA / LoCon adapters on the UNet (and LoRA on the CLIP text encoder): the
//! training forward of diffusers' `UNet2DConditionModel` and its backward with respect to the
//! adapters' parameters, the base
//! frozen in its loaded weight type (f32, f16, q8_0 or q4_0, dequantized inside the kernels).
//!
//! - [`LoraParams`] ([`params`]): the trainable adapters (kohya's layout and initialisation),
//!   their gradient buffers, and the named tensors an optimizer or exporter needs.
//! - [`TrainUNet`] ([`unet`]): built over a loaded [`UNet2DConditionModel`]'s weights (shared,
//!   not copied). [`TrainUNet::forward`] computes what the inference forward computes with the
//!   same adapter installed, adapted layers through [`crate::ops::grad::linear::lora_linear`] /
//!   [`crate::ops::grad::conv::locon_conv2d`] and attention through
//!   [`crate::ops::attention::attention_with_lse`], and returns a [`Tape`] of what each module's
//!   backward needs; [`TrainUNet::backward`] goes from the loss gradient at the prediction back
//!   through `conv_out`, `conv_norm_out`, the up blocks (a skip concatenation's gradient split
//!   on channels and added to the skip's), the mid block and the down blocks, adding each
//!   adapter's gradients to its buffers; residual branches add up in place
//!   ([`crate::ops::grad::activation::accumulate`]); saved tensors are released as soon as
//!   their backward step has used them.
//! - The time embedding (`time_proj`, `time_embedding`) runs as in inference and is not
//!   differentiated: it has no adapters and the timestep has no gradient. The resnets'
//!   `time_emb_proj` adapters (target set `attn+ff+conv`) get their gradients from the
//!   resnets' backward; nothing flows further up the time path. Likewise `conv_in` has no
//!   adapter and the noisy sample needs no gradient, so the backward ends at the first down
//!   block's adapters.
//! - [`TrainOptions::checkpointing`]: gradient checkpointing per resnet, transformer and
//!   resampler (keep the input, recompute the module's forward before its backward): the same
//!   gradients for less memory.
//!
//! - [`TrainClip`] ([`clip`]): the text encoder's training forward from its (frozen)
//!   embeddings and its backward from the gradient at the prompt embedding, which
//!   [`TrainUNet::backward_with_context_grad`] returns.
//!
//! Submodules: `layers` (frozen layers linked to adapters), `attention`, `transformer`,
//! `resnet`, `blocks` (levels and checkpointing), `unet`, `clip`.
//!
//! [`UNet2DConditionModel`]: crate::model::unet::UNet2DConditionModel

mod attention;
mod blocks;
pub mod clip;
mod layers;
pub mod params;
mod resnet;
mod transformer;
pub mod unet;

pub use clip::{token_row_grads, ClipTape, TrainClip};
pub use params::{LoraConfig, LoraKind, LoraLayer, LoraParams, Targets, Trainable};
pub use unet::{mse_loss_grad, Tape, TrainOptions, TrainUNet};
