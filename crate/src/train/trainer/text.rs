//! Training the text encoder's LoRA beside the UNet's ([`super::TrainConfig::te_lr`]), as
//! kohya's `train_text_encoder` does: the prompt embeddings are not cached; each micro-batch
//! runs the text encoder's training forward ([`TrainClip`]) on its samples' captions, the UNet's
//! backward returns the gradient at the prompt embeddings, and the text encoder's backward
//! takes it to its adapters. The adapters are in one AdamW parameter group of their own, at
//! `te_lr` on the run's schedule; clipping is over both groups together.

use super::config::TrainConfig;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::model::backward::{ClipTape, LoraParams, TrainClip, TrainOptions};
use crate::model::clip::ClipTextModel;
use crate::model::tokenizer::ClipTokenizer;
use crate::tensor::Tensor;

/// The text encoder with its trainable adapters and their optimizer state.
pub(super) struct TextTraining {
    model: ClipTextModel,
    pub train: TrainClip,
    /// AdamW's moments per trainable tensor, in [`LoraParams::trainable`] order.
    pub moments: Vec<(Tensor, Tensor)>,
    /// Padded token ids per image: the training set's (stream 0), the regularization set's
    /// (stream 1).
    ids: [Vec<Vec<u32>>; 2],
    /// The sample prompts', then the negative prompt's.
    sample_ids: Vec<Vec<u32>>,
}

fn tokenize(tok: &ClipTokenizer, texts: &[&str]) -> Vec<Vec<u32>> {
    texts.iter().map(|t| tok.encode_padded(t)).collect()
}

impl TextTraining {
    /// Adapters on the encoder layers the run's `clip_skip` reads, and the captions' token ids.
    pub fn new(
        gpu: &Gpu,
        mut model: ClipTextModel,
        tok: &ClipTokenizer,
        config: &TrainConfig,
        captions: [&[&str]; 2],
        sample_prompts: &[&str],
    ) -> Result<Self> {
        let layers = model.num_layers().saturating_sub(config.clip_skip);
        if layers == 0 {
            return Err(Error::Invalid(format!(
                "training setting `clip_skip`: {} leaves none of the text encoder's {} layers to train",
                config.clip_skip,
                model.num_layers()
            )));
        }
        let params = LoraParams::new_text_encoder(gpu, &mut model, &config.lora()?, layers)?;
        let train = TrainClip::new(&mut model, params, layers, true)?;
        let moments = train
            .params()
            .trainable()
            .iter()
            .map(|t| Ok((Tensor::zeros(gpu, t.param.shape())?, Tensor::zeros(gpu, t.param.shape())?)))
            .collect::<Result<Vec<_>>>()?;
        let ids = [tokenize(tok, captions[0]), tokenize(tok, captions[1])];
        Ok(Self { model, train, moments, ids, sample_ids: tokenize(tok, sample_prompts) })
    }

    pub fn params(&self) -> &LoraParams {
        self.train.params()
    }

    /// GPU bytes of the adapters, their gradients and the optimizer state.
    pub fn bytes(&self) -> u64 {
        self.params().bytes() + self.moments.iter().map(|(m, v)| m.bytes() + v.bytes()).sum::<u64>()
    }

    /// The token ids of image `image` of sample stream `stream`.
    pub fn ids(&self, stream: u64, image: usize) -> Result<&[u32]> {
        self.ids
            .get(stream as usize)
            .and_then(|s| s.get(image))
            .map(Vec::as_slice)
            .ok_or_else(|| Error::Invalid(format!("image {image} of stream {stream} has no caption tokens")))
    }

    /// The prompt embeddings `[B, tokens, dim]` of token id rows with the adapters applied,
    /// and the tape of the text encoder's backward.
    pub fn encode(&self, gpu: &Gpu, rows: &[&[u32]], opts: TrainOptions) -> Result<(Tensor, ClipTape)> {
        let e = self.model.embeddings(gpu, rows)?;
        self.train.forward(gpu, &e, opts)
    }

    /// The sample prompts' embeddings (then the negative prompt's), `[tokens · dim]` each, with
    /// the adapters as they are now.
    pub async fn sample_embeddings(&self, gpu: &Gpu) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(self.sample_ids.len());
        for ids in &self.sample_ids {
            let (e, tape) = self.encode(gpu, &[ids.as_slice()], TrainOptions::default())?;
            drop(tape);
            out.push(e.to_f32(gpu).await?);
        }
        Ok(out)
    }
}
