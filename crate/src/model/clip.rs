//! The CLIP text encoder of Stable Diffusion, following transformers' `CLIPTextModel`
//! (`transformers/models/clip/modeling_clip.py`: `CLIPTextEmbeddings`, `CLIPEncoderLayer`,
//! `CLIPAttention`, `CLIPMLP`, `CLIPTextTransformer`), on the engine's kernels.
//!
//! `embeddings = token_embedding[ids] + position_embedding[0..S]`, then `num_hidden_layers`
//! pre-LN layers
//!
//! ```text
//! h = h + out_proj(causal_attention(q_proj(ln1(h)), k_proj(ln1(h)), v_proj(ln1(h))))
//! h = h + fc2(act(fc1(ln2(h))))
//! ```
//!
//! and `final_layer_norm`. `hidden_states[0]` is the embedding output, `hidden_states[k]` the
//! output of layer k (no final norm); `last_hidden_state = final_layer_norm(hidden_states[L])`
//! is what SD1.x pipelines use as `prompt_embeds`.
//!
//! Clip skip: diffusers' `clip_skip = k` takes `final_layer_norm(hidden_states[-(k + 1)])`
//! (k = 0: the ordinary output, k = 1: the penultimate layer). A1111's "Clip skip N" is
//! diffusers `clip_skip = N - 1` (A1111's default 1 = no skip, A1111 2 = penultimate). SD2.x
//! uses the penultimate layer of OpenCLIP ViT-H; its diffusers `text_encoder/config.json`
//! already drops the last layer (23 layers), so it runs with `clip_skip = 0`; a 24-layer
//! encoder would need `clip_skip = 1`. SDXL-style conditioning takes
//! `hidden_states[-(k + 2)]` without the final norm: [`EncodeOpts::final_norm`] = false.
//! Layers after the chosen one are not run.
//!
//! Token ids from `vocab_size` upwards (tokens added for textual inversion) read their rows from
//! a small separate f32 table ([`ClipTextModel::set_added_token_rows`]); the vocabulary's table
//! is neither copied nor re-uploaded.

use crate::error::{shape_err, Error, Result};
use crate::gpu::Gpu;
pub use crate::model::config::ClipTextConfig;
use crate::model::transformer::{Attention, AttentionSpec, CLIP_PROJECTIONS};
use crate::model::weights::{WeightPolicy, WeightSource};
use crate::nn::{LayerNorm, Linear};
use crate::ops::elementwise::{add, mul, unary, Unary};
use crate::ops::layout::embedding;
use crate::quant::DType;
use crate::tensor::Tensor;

const OP: &str = "clip_text_model";

/// The MLP activation named by `hidden_act`: `quick_gelu` (OpenAI CLIP, SD1.x) or `gelu`
/// (exact erf GELU; OpenCLIP, SD2.x).
pub fn activation(config: &ClipTextConfig) -> Result<Unary> {
    match config.hidden_act.as_str() {
        "quick_gelu" => Ok(Unary::QuickGelu),
        "gelu" => Ok(Unary::Gelu),
        other => Err(Error::Invalid(format!(
            "CLIP text encoder: hidden_act `{other}` is not supported (quick_gelu, gelu)"
        ))),
    }
}

/// Which hidden state [`ClipTextModel::encode`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodeOpts {
    /// diffusers' `clip_skip`: 0 = last layer, 1 = penultimate, ... (A1111 "Clip skip N" is
    /// N - 1 here).
    pub clip_skip: usize,
    /// Apply `final_layer_norm` to the chosen state (diffusers SD1.x/SD2.x: yes; SDXL: no).
    pub final_norm: bool,
}

impl Default for EncodeOpts {
    fn default() -> Self {
        Self { clip_skip: 0, final_norm: true }
    }
}

impl EncodeOpts {
    /// diffusers `clip_skip = k` (final norm applied).
    pub fn clip_skip(k: usize) -> Self {
        Self { clip_skip: k, final_norm: true }
    }
    /// A1111's "Clip skip N" (N >= 1; 1 = no skip), i.e. diffusers `clip_skip = N - 1`.
    pub fn a1111(n: usize) -> Self {
        Self::clip_skip(n.saturating_sub(1))
    }
    /// The penultimate layer (diffusers `clip_skip = 1`).
    pub fn penultimate() -> Self {
        Self::clip_skip(1)
    }
}

/// `CLIPEncoderLayer`.
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn load(gpu: &Gpu, src: &dyn WeightSource, c: &ClipTextConfig, i: usize, p: WeightPolicy) -> Result<Self> {
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let eps = c.layer_norm_eps as f32;
        let n = |s: &str| format!("text_model.encoder.layers.{i}.{s}");
        // scale = head_dim^-0.5, causal mask as create_causal_mask.
        let attn = AttentionSpec {
            query_dim: d,
            context_dim: d,
            heads: c.num_attention_heads,
            dim_head: c.head_dim(),
            qkv_bias: true,
            causal: true,
            names: CLIP_PROJECTIONS,
        };
        Ok(Self {
            layer_norm1: LayerNorm::load(gpu, src, &n("layer_norm1"), d, eps, p)?,
            self_attn: Attention::load(gpu, src, p, &n("self_attn"), attn)?,
            layer_norm2: LayerNorm::load(gpu, src, &n("layer_norm2"), d, eps, p)?,
            fc1: Linear::load(gpu, src, &n("mlp.fc1"), d, f, true, p)?,
            fc2: Linear::load(gpu, src, &n("mlp.fc2"), f, d, true, p)?,
        })
    }

    /// `h: [B, S, D]` -> `[B, S, D]`.
    fn forward(&self, gpu: &Gpu, h: &Tensor, act: Unary) -> Result<Tensor> {
        let x = self.layer_norm1.forward(gpu, h)?;
        let h = add(gpu, h, &self.self_attn.forward(gpu, &x, None)?)?;
        let x = self.layer_norm2.forward(gpu, &h)?;
        let x = unary(gpu, &self.fc1.forward(gpu, &x)?, act)?;
        add(gpu, &h, &self.fc2.forward(gpu, &x)?)
    }
}

/// transformers' `CLIPTextModel` with its parameters on the GPU.
pub struct ClipTextModel {
    config: ClipTextConfig,
    act: Unary,
    token_embedding: Tensor,
    /// Rows of the token ids after the vocabulary, `n × hidden_size` (host copy).
    added_rows: Vec<f32>,
    /// `[1 + n, hidden_size]` f32: a zero row, then `added_rows`; `None` when n = 0.
    added_table: Option<Tensor>,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
}

impl ClipTextModel {
    /// Loads every parameter (transformers names, `text_model.` prefix) from `source`: linear
    /// weights as `policy.matrix()`, everything else, the token embedding included, as f32.
    pub fn load(gpu: &Gpu, config: &ClipTextConfig, source: &dyn WeightSource, policy: WeightPolicy) -> Result<Self> {
        Self::load_with_table(gpu, config, source, policy, DType::F32)
    }

    /// [`load`](Self::load) with the token embedding table stored as `table` (f32 or f16;
    /// f16 halves the largest non-matrix parameter, `vocab_size × hidden_size`).
    pub fn load_with_table(
        gpu: &Gpu,
        config: &ClipTextConfig,
        source: &dyn WeightSource,
        policy: WeightPolicy,
        table: DType,
    ) -> Result<Self> {
        config.validate("text_encoder/config.json")?;
        let act = activation(config)?;
        if !matches!(table, DType::F32 | DType::F16) {
            return Err(Error::DType {
                op: OP,
                message: format!("the token embedding table can be stored f32 or f16, not {table}"),
            });
        }
        let c = config;
        let d = c.hidden_size;
        let token_embedding =
            source.load(gpu, "text_model.embeddings.token_embedding.weight", &[c.vocab_size, d], table)?;
        let position_embedding = source.load(
            gpu,
            "text_model.embeddings.position_embedding.weight",
            &[c.max_position_embeddings, d],
            DType::F32,
        )?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::load(gpu, source, c, i, policy))
            .collect::<Result<Vec<_>>>()?;
        // A file with more layers than the config (a 24-layer OpenCLIP encoder under SD2's
        // 23-layer config) loads the config's layers, as diffusers does.
        let final_layer_norm =
            LayerNorm::load(gpu, source, "text_model.final_layer_norm", d, c.layer_norm_eps as f32, policy)?;
        Ok(Self {
            config: c.clone(),
            act,
            token_embedding,
            added_rows: Vec::new(),
            added_table: None,
            position_embedding,
            layers,
            final_layer_norm,
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Number of token ids after the vocabulary that have rows ([`set_added_token_rows`](Self::set_added_token_rows)).
    pub fn num_added_tokens(&self) -> usize {
        self.added_rows.len() / self.config.hidden_size.max(1)
    }

    /// The rows of the token ids after the vocabulary, `num_added_tokens × hidden_size` f32.
    pub fn added_token_rows(&self) -> &[f32] {
        &self.added_rows
    }

    /// Sets the rows of token ids `vocab_size..vocab_size + n` (textual-inversion vectors) to
    /// `rows` (`n × hidden_size` f32, n may be 0). Only this small table is uploaded.
    pub fn set_added_token_rows(&mut self, gpu: &Gpu, rows: &[f32]) -> Result<()> {
        let d = self.config.hidden_size;
        if d == 0 || !rows.len().is_multiple_of(d) {
            return Err(shape_err(OP, format!("added token rows: {} values are not rows of {d}", rows.len())));
        }
        if rows.iter().any(|v| !v.is_finite()) {
            return Err(Error::Invalid("added token rows contain NaN or infinite values".into()));
        }
        self.added_table = if rows.is_empty() {
            None
        } else {
            let mut table = vec![0.0f32; d];
            table.extend_from_slice(rows);
            Some(Tensor::from_f32(gpu, &[rows.len() / d + 1, d], &table)?)
        };
        self.added_rows = rows.to_vec();
        Ok(())
    }

    /// Token embedding rows `[N, D]` for `ids`. Vocabulary ids read the loaded table; when
    /// added ids are present the rows are
    /// `table[id, added ids as 0] * mask + added_table[id - vocab_size + 1, vocabulary ids as 0]`
    /// with mask 1 on vocabulary ids and 0 on added ids (row 0 of the added table is zeros), so
    /// every row is its table's row exactly.
    fn token_rows(&self, gpu: &Gpu, ids: &[u32], added: Option<&Tensor>) -> Result<Tensor> {
        let v = self.config.vocab_size as u32;
        let Some(extra) = added.filter(|_| ids.iter().any(|&t| t >= v)) else {
            return embedding(gpu, &self.token_embedding, ids);
        };
        let base_ids: Vec<u32> = ids.iter().map(|&t| if t >= v { 0 } else { t }).collect();
        let mask: Vec<f32> = ids.iter().map(|&t| if t >= v { 0.0 } else { 1.0 }).collect();
        let extra_ids: Vec<u32> = ids.iter().map(|&t| if t >= v { t - v + 1 } else { 0 }).collect();
        let base = embedding(gpu, &self.token_embedding, &base_ids)?;
        let mask = Tensor::from_f32(gpu, &[ids.len(), 1], &mask)?;
        add(gpu, &mul(gpu, &base, &mask)?, &embedding(gpu, extra, &extra_ids)?)
    }

    /// The token embedding rows of vocabulary ids `ids`, `ids.len() × hidden_size` f32.
    pub async fn token_rows_f32(&self, gpu: &Gpu, ids: &[u32]) -> Result<Vec<f32>> {
        let v = self.config.vocab_size as u32;
        if let Some(bad) = ids.iter().find(|&&t| t >= v) {
            return Err(shape_err(OP, format!("token id {bad} is outside the vocabulary of {v}")));
        }
        if ids.is_empty() {
            return Ok(vec![]);
        }
        embedding(gpu, &self.token_embedding, ids)?.to_f32(gpu).await
    }

    /// Checks token id rows (same length, within the position table and the vocabulary plus
    /// the added tokens) and returns (batch, sequence length).
    fn check_ids(&self, ids: &[&[u32]], added: usize) -> Result<(usize, usize)> {
        let c = &self.config;
        let s = ids.first().map_or(0, |r| r.len());
        if s == 0 || ids.iter().any(|r| r.len() != s) {
            let lens: Vec<usize> = ids.iter().map(|r| r.len()).collect();
            return Err(shape_err(OP, format!("needs token id rows of one non-zero length, got lengths {lens:?}")));
        }
        if s > c.max_position_embeddings {
            return Err(shape_err(
                OP,
                format!("{s} tokens exceed max_position_embeddings {}", c.max_position_embeddings),
            ));
        }
        let known = c.vocab_size + added;
        if let Some(bad) = ids.iter().flat_map(|r| r.iter()).find(|&&t| t as usize >= known) {
            return Err(shape_err(
                OP,
                format!(
                    "token id {bad} is outside the vocabulary of {} and the {added} added tokens",
                    c.vocab_size,
                ),
            ));
        }
        Ok((ids.len(), s))
    }

    /// `CLIPTextEmbeddings`: `[B, S, D]`.
    pub fn embeddings(&self, gpu: &Gpu, ids: &[&[u32]]) -> Result<Tensor> {
        self.embeddings_impl(gpu, ids, self.added_table.as_ref(), self.num_added_tokens())
    }

    /// [`embeddings`](Self::embeddings) with the added tokens' rows read from `added`,
    /// `[1 + n, hidden_size]` f32 laid out as the model's own added table (row 0 zeros, then the
    /// rows of ids `vocab_size..vocab_size + n`) instead of the model's: the rows a training run
    /// learns (the trigger word's embedding) without re-uploading a table each step.
    pub fn embeddings_with_added(&self, gpu: &Gpu, ids: &[&[u32]], added: &Tensor) -> Result<Tensor> {
        let d = self.config.hidden_size;
        let n = match added.shape() {
            [rows, dim] if *rows >= 1 && *dim == d && added.dtype() == DType::F32 => rows - 1,
            s => return Err(shape_err(OP, format!("the added token table {s:?} must be f32 [1 + n, {d}]"))),
        };
        self.embeddings_impl(gpu, ids, Some(added), n)
    }

    fn embeddings_impl(&self, gpu: &Gpu, ids: &[&[u32]], added: Option<&Tensor>, n_added: usize) -> Result<Tensor> {
        let (b, s) = self.check_ids(ids, n_added)?;
        let d = self.config.hidden_size;
        let flat: Vec<u32> = ids.iter().flat_map(|r| r.iter().copied()).collect();
        let tok = self.token_rows(gpu, &flat, added)?.reshape(&[b, s, d])?;
        let positions: Vec<u32> = (0..s as u32).collect();
        let pos = embedding(gpu, &self.position_embedding, &positions)?;
        add(gpu, &tok, &pos)
    }

    /// Runs the embeddings and the first `layers` encoder layers; returns every hidden state
    /// (`layers + 1` of them, `[B, S, D]` each; index 0 is the embedding output).
    fn run(&self, gpu: &Gpu, ids: &[&[u32]], layers: usize, keep_all: bool) -> Result<Vec<Tensor>> {
        let mut h = self.embeddings(gpu, ids)?;
        let mut states = Vec::new();
        for layer in &self.layers[..layers] {
            let next = layer.forward(gpu, &h, self.act)?;
            if keep_all {
                states.push(h);
            }
            h = next;
        }
        states.push(h);
        Ok(states)
    }

    /// transformers' `output_hidden_states=True`: `num_hidden_layers + 1` tensors `[B, S, D]`.
    pub fn hidden_states(&self, gpu: &Gpu, ids: &[&[u32]]) -> Result<Vec<Tensor>> {
        self.run(gpu, ids, self.layers.len(), true)
    }

    /// `final_layer_norm` of a hidden state.
    pub fn final_layer_norm(&self, gpu: &Gpu, h: &Tensor) -> Result<Tensor> {
        self.final_layer_norm.forward(gpu, h)
    }

    /// The prompt embedding `[B, S, D]` for token id rows `ids` (each row one padded prompt):
    /// `final_layer_norm(hidden_states[-(clip_skip + 1)])` (without the norm when
    /// `opts.final_norm` is false). `clip_skip` must be below the layer count + 1.
    pub fn encode(&self, gpu: &Gpu, ids: &[&[u32]], opts: EncodeOpts) -> Result<Tensor> {
        let n = self.layers.len();
        if opts.clip_skip > n {
            return Err(shape_err(
                OP,
                format!("clip_skip {} needs more than the model's {n} layers", opts.clip_skip),
            ));
        }
        let h = self.run(gpu, ids, n - opts.clip_skip, false)?.pop().expect("one state");
        if opts.final_norm {
            self.final_layer_norm(gpu, &h)
        } else {
            Ok(h)
        }
    }

    /// `pooler_output` as transformers computes it for `last_hidden_state: [B, S, D]`: the
    /// row of each sequence's end token (the highest id when `eos_token_id` is the legacy 2,
    /// else the first `eos_token_id`), `[B, D]`.
    pub fn pooled(&self, gpu: &Gpu, last_hidden_state: &Tensor, ids: &[&[u32]]) -> Result<Tensor> {
        let (b, s) = self.check_ids(ids, self.num_added_tokens())?;
        let d = self.config.hidden_size;
        if last_hidden_state.shape() != [b, s, d] {
            return Err(shape_err(
                OP,
                format!("pooled: hidden state {:?} does not match ids [{b}, {s}]", last_hidden_state.shape()),
            ));
        }
        let eos = self.config.eos_token_id.as_ref().map(|v| v.at(0) as u64);
        let rows: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(bi, r)| {
                let j = match eos {
                    Some(e) if e != 2 => r.iter().position(|&t| t as u64 == e).unwrap_or(0),
                    // argmax: first position of the highest id.
                    _ => r.iter().enumerate().fold(0, |best, (j, &t)| if t > r[best] { j } else { best }),
                };
                (bi * s + j) as u32
            })
            .collect();
        embedding(gpu, &last_hidden_state.reshape(&[b * s, d])?, &rows)
    }

    /// Number of encoder layers loaded.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

crate::visit_layers!(EncoderLayer: layer_norm1, self_attn, layer_norm2, fc1, fc2);
crate::visit_layers!(ClipTextModel: layers, final_layer_norm);
