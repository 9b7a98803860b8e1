//! Training the text encoder's LoRA beside the UNet's ([`super::TrainConfig::te_lr`]), as
//! kohya's `train_text_encoder` does: the prompt embeddings are not cached; each micro-batch
//! runs the text encoder's training forward ([`TrainClip`]) on its samples' captions, the UNet's
//! backward returns the gradient at the prompt embeddings, and the text encoder's backward
//! takes it to its adapters. The adapters are in one AdamW parameter group of their own, at
//! `te_lr` on the run's schedule; clipping is over both groups together.
//!
//! With [`super::TrainConfig::trigger_lr`] the trigger word is also learned as a token of its
//! own (pivotal tuning): it is added to a copy of the tokenizer as `T` (and `T_1`, … when the
//! word is several BPE tokens), the vectors start from the word's BPE token rows, so the first
//! step sees exactly the prompts the base model sees, and the backward's gradient at the
//! embeddings, summed over the positions holding each added id, trains them in a third AdamW
//! group. The text encoder's adapters are then optional (`te_lr` may be `None`).

use super::config::TrainConfig;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::model::backward::{token_row_grads, ClipTape, LoraParams, TrainClip, TrainOptions};
use crate::model::clip::ClipTextModel;
use crate::model::tokenizer::ClipTokenizer;
use crate::ops::grad::activation::accumulate;
use crate::tensor::Tensor;

/// The trigger word learned as a token of its own.
pub(super) struct TriggerEmbedding {
    /// The trigger word (the added token `T`; `T_1`, … follow it).
    pub word: String,
    /// The added ids, `vocab_size..vocab_size + n`.
    ids: Vec<u32>,
    /// `[1 + n, dim]` f32 in [`ClipTextModel::embeddings_with_added`]'s layout: row 0 stays
    /// zero (its gradient is always zero, so AdamW never moves it).
    pub table: Tensor,
    pub grad: Tensor,
    pub moments: (Tensor, Tensor),
}

impl TriggerEmbedding {
    /// The name of the table in checkpoints.
    pub fn state_name(&self) -> String {
        format!("trigger_embedding.{}", self.word)
    }

    /// The learned vectors `[n, dim]` (without the zero row).
    pub async fn vectors(&self, gpu: &Gpu) -> Result<(Vec<usize>, Vec<f32>)> {
        let v = self.table.to_f32(gpu).await?;
        let d = self.table.shape()[1];
        Ok((vec![self.ids.len(), d], v[d..].to_vec()))
    }
}

/// The text encoder with its trainable adapters and their optimizer state.
pub(super) struct TextTraining {
    model: ClipTextModel,
    pub train: TrainClip,
    /// AdamW's moments per trainable tensor, in [`LoraParams::trainable`] order.
    pub moments: Vec<(Tensor, Tensor)>,
    /// The learned trigger token, with [`super::TrainConfig::trigger_lr`].
    pub trigger: Option<TriggerEmbedding>,
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
    /// Adapters on the encoder layers the run's `clip_skip` reads (with `te_lr`), the trigger
    /// token (with `trigger_lr`), and the captions' token ids.
    pub async fn new(
        gpu: &Gpu,
        mut model: ClipTextModel,
        tok: &ClipTokenizer,
        config: &TrainConfig,
        trigger: &str,
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
        let params = match config.te_lr {
            Some(_) => LoraParams::new_text_encoder(gpu, &mut model, &config.lora()?, layers)?,
            None => LoraParams::none(&config.lora()?),
        };
        let train = TrainClip::new(&mut model, params, layers, true)?;
        let moments = train
            .params()
            .trainable()
            .iter()
            .map(|t| Ok((Tensor::zeros(gpu, t.param.shape())?, Tensor::zeros(gpu, t.param.shape())?)))
            .collect::<Result<Vec<_>>>()?;
        let (tok, trigger) = match config.trigger_lr {
            Some(_) => {
                let (tok, t) = Self::trigger_token(gpu, &model, tok, trigger, captions[0]).await?;
                (std::borrow::Cow::Owned(tok), Some(t))
            }
            None => (std::borrow::Cow::Borrowed(tok), None),
        };
        let ids = [tokenize(&tok, captions[0]), tokenize(&tok, captions[1])];
        Ok(Self { model, train, moments, trigger, ids, sample_ids: tokenize(&tok, sample_prompts) })
    }

    /// A copy of `tok` with `word` added as `word`, `word_1`, … (one token per BPE token of the
    /// word) and the table of their vectors, initialised from those BPE tokens' rows.
    async fn trigger_token(
        gpu: &Gpu,
        model: &ClipTextModel,
        tok: &ClipTokenizer,
        word: &str,
        captions: &[&str],
    ) -> Result<(ClipTokenizer, TriggerEmbedding)> {
        let word = word.trim();
        if word.is_empty() {
            return Err(Error::Invalid(
                "training setting `trigger_lr`: training the trigger word's embedding needs a trigger word".into(),
            ));
        }
        if word.chars().any(char::is_whitespace) {
            return Err(Error::Invalid(format!(
                "training setting `trigger_lr`: the trigger `{word}` has several words; a learned trigger embedding is one word (e.g. `sks`)"
            )));
        }
        let base_ids = tok.encode(word);
        let (s, e) = (tok.start_id(), tok.end_id());
        let base_ids: Vec<u32> = base_ids.into_iter().filter(|&t| t != s && t != e).collect();
        if base_ids.is_empty() || base_ids.len() > 8 {
            return Err(Error::Invalid(format!(
                "training setting `trigger_lr`: the trigger `{word}` makes {} tokens; use a short word (1 to 8 tokens)",
                base_ids.len()
            )));
        }
        let names: Vec<String> =
            (0..base_ids.len()).map(|i| if i == 0 { word.to_string() } else { format!("{word}_{i}") }).collect();
        let mut tok = tok.clone();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let ids = tok.add_tokens(&refs).map_err(|e| Error::Invalid(format!("training setting `trigger_lr`: {e}")))?;
        if !captions.iter().any(|c| tok.encode(c).contains(&ids[0])) {
            return Err(Error::Invalid(format!(
                "training setting `trigger_lr`: no training caption contains the trigger `{word}`, so its embedding would not learn; \
                 add it to the captions (or turn on prepending the trigger)"
            )));
        }
        let d = model.config().hidden_size;
        let rows = model.token_rows_f32(gpu, &base_ids).await?;
        let mut table = vec![0.0f32; d];
        table.extend_from_slice(&rows);
        let shape = [base_ids.len() + 1, d];
        let t = TriggerEmbedding {
            word: word.to_string(),
            ids,
            table: Tensor::from_f32(gpu, &shape, &table)?,
            grad: Tensor::zeros(gpu, &shape)?,
            moments: (Tensor::zeros(gpu, &shape)?, Tensor::zeros(gpu, &shape)?),
        };
        Ok((tok, t))
    }

    /// Zeroes the adapters' and the trigger's gradients.
    pub fn zero_grads(&self, gpu: &Gpu) {
        self.params().zero_grads(gpu);
        if let Some(t) = &self.trigger {
            gpu.zero(t.grad.buffer());
        }
    }

    /// The backward from the gradient at the prompt embeddings (see [`TrainClip::backward`]);
    /// with a trigger token, its rows' gradients are added from the embeddings' gradient at
    /// the positions of `rows` holding its ids.
    pub async fn backward(&self, gpu: &Gpu, tape: ClipTape, rows: &[&[u32]], d_context: &Tensor) -> Result<()> {
        let Some(t) = &self.trigger else {
            self.train.backward(gpu, tape, d_context, false)?;
            return Ok(());
        };
        let de = self.train.backward(gpu, tape, d_context, true)?;
        let de = de.ok_or_else(|| Error::Invalid("the text encoder's backward gave no embedding gradient".into()))?;
        let values = de.to_f32(gpu).await?;
        drop(de);
        let grad = token_row_grads(rows, &values, t.ids[0], t.ids.len(), t.table.shape()[1])?;
        let g = Tensor::from_f32(gpu, t.grad.shape(), &grad)?;
        accumulate(gpu, &t.grad, &g, 1.0)
    }

    pub fn params(&self) -> &LoraParams {
        self.train.params()
    }

    /// GPU bytes of the adapters, their gradients and the optimizer state.
    pub fn bytes(&self) -> u64 {
        let trigger = self.trigger.as_ref().map_or(0, |t| t.table.bytes() * 4);
        self.params().bytes() + self.moments.iter().map(|(m, v)| m.bytes() + v.bytes()).sum::<u64>() + trigger
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
        let e = match &self.trigger {
            Some(t) => self.model.embeddings_with_added(gpu, rows, &t.table)?,
            None => self.model.embeddings(gpu, rows)?,
        };
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
