//! Textual-inversion embeddings: learned token vectors added to a loaded tokenizer and text
//! encoder so that a trigger word in a prompt feeds them.
//!
//! Files (safetensors only; pickled `.pt` / `.bin` embeddings are refused like pickled
//! checkpoints):
//! - A1111 / kohya: one tensor `emb_params` `[n, dim]` (also the flattened `.pt` layout
//!   `string_to_param.*`). The trigger word is the file's stem (`EasyNegative.safetensors` →
//!   `EasyNegative`), as in A1111; diffusers needs it passed as `token=`.
//! - diffusers (`learned_embeds.safetensors`): one tensor named by its token (`<cat-toy>`),
//!   `[dim]` or `[n, dim]`.
//!
//! Loading follows diffusers' `load_textual_inversion`: an n-vector embedding adds n tokens,
//! `T`, `T_1`, …, `T_{n-1}`, with consecutive ids after the vocabulary; writing `T` in a prompt
//! feeds all n (see [`crate::model::tokenizer::added`] for how added tokens are matched). The
//! token must not already be in the vocabulary, nor `T_1`. The vectors' size must equal the
//! text encoder's hidden size (768 for SD1.x, 1024 for SD2.x).
//!
//! Matching is diffusers' (transformers' added tokens, found inside words too); A1111 instead
//! looks for the trigger word's BPE tokens, so there `lxstyle` does not fire inside
//! `lxstyles`. Prompts that write the trigger word as a word of its own behave the same.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::io::safetensors::{Dtype, SafetensorsFile};
use crate::io::RangeRead;
use crate::model::checkpoint::{is_pickle_name, refuse_pickle};
use crate::model::clip::ClipTextModel;
use crate::model::tokenizer::ClipTokenizer;

/// Which writer's layout a file has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbeddingLayout {
    /// `emb_params` or `string_to_param.*`; the token is the file's stem.
    A1111,
    /// One tensor named by its token.
    Diffusers,
}

/// A textual-inversion embedding read from a file.
#[derive(Clone, Debug, PartialEq)]
pub struct TextualInversion {
    /// The trigger word.
    pub token: String,
    /// The file it came from (for messages).
    pub file: String,
    /// The tensor holding the vectors.
    pub tensor: String,
    pub layout: EmbeddingLayout,
    /// Size of each vector.
    pub dim: usize,
    /// `n × dim` values, f32.
    pub vectors: Vec<f32>,
}

impl TextualInversion {
    /// Number of vectors (tokens it adds).
    pub fn n_vectors(&self) -> usize {
        self.vectors.len() / self.dim.max(1)
    }

    /// The tokens it adds: `token`, `token_1`, … `token_{n-1}`.
    pub fn tokens(&self) -> Vec<String> {
        (0..self.n_vectors()).map(|i| if i == 0 { self.token.clone() } else { format!("{}_{i}", self.token) }).collect()
    }

    /// The same embedding under another trigger word (diffusers' `token=` argument).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = token.into();
        self
    }

    /// Checks the vectors' size against a text encoder's hidden size.
    pub fn check_dim(&self, hidden_size: usize) -> Result<()> {
        if self.dim == hidden_size {
            return Ok(());
        }
        Err(Error::Format {
            file: self.file.clone(),
            tensor: Some(self.tensor.clone()),
            message: format!(
                "embedding vectors have {} values but this text encoder's hidden size is {hidden_size} \
                 (SD1.x embeddings have 768, SD2.x 1024): it was trained for another base model",
                self.dim
            ),
        })
    }
}

/// The stem of a file name or path: the last component without its extension
/// (`dir/EasyNegative.safetensors` → `EasyNegative`).
pub fn file_stem(name: &str) -> &str {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    match base.rfind('.') {
        Some(i) if i > 0 => &base[..i],
        _ => base,
    }
}

/// Opens `reader` (named `name`, a path or URL) as an embedding; pickled files are refused by
/// name and by their zip / pickle magic bytes.
pub fn open_textual_inversion<R: RangeRead>(reader: R, name: &str) -> Result<TextualInversion> {
    if is_pickle_name(name) {
        return Err(refuse_pickle(name));
    }
    let mut magic = [0u8; 4];
    if reader.len() >= 4
        && reader.read_at(0, &mut magic).is_ok()
        && (magic == *b"PK\x03\x04" || magic[0] == 0x80 && (2..=5).contains(&magic[1]))
    {
        return Err(refuse_pickle(name));
    }
    read_textual_inversion(&SafetensorsFile::open(reader, name)?)
}

/// Opens a local embedding file (native only).
#[cfg(not(target_arch = "wasm32"))]
pub fn open_path(path: impl AsRef<std::path::Path>) -> Result<TextualInversion> {
    let name = path.as_ref().display().to_string();
    if is_pickle_name(&name) {
        return Err(refuse_pickle(&name));
    }
    open_textual_inversion(crate::io::LocalFile::open(path)?, &name)
}

/// Reads the embedding in an opened safetensors file (layouts in the module docs).
pub fn read_textual_inversion<R: RangeRead>(file: &SafetensorsFile<R>) -> Result<TextualInversion> {
    let name = file.name();
    if is_pickle_name(name) {
        return Err(refuse_pickle(name));
    }
    let err = |tensor: Option<&str>, message: String| Error::Format {
        file: name.to_string(),
        tensor: tensor.map(str::to_string),
        message,
    };
    let names: Vec<&str> = file.tensors().iter().map(|t| t.name.as_str()).collect();
    if names.contains(&"clip_l") && names.contains(&"clip_g") {
        return Err(err(
            None,
            "an SDXL embedding (`clip_l` + `clip_g`, one part per text encoder) does not fit a \
             Stable Diffusion 1.x/2.x text encoder"
                .into(),
        ));
    }
    let entry = match file.tensors() {
        [one] => one,
        [] => return Err(err(None, "holds no tensors: not a textual-inversion embedding".into())),
        more => {
            return Err(err(
                None,
                format!(
                    "holds {} tensors ({}); a textual-inversion embedding has one (`emb_params`, \
                     `string_to_param.*` or the token's name): is this a LoRA or a model?",
                    more.len(),
                    preview(&names)
                ),
            ))
        }
    };
    let t = entry.name.as_str();
    let a1111 = t == "emb_params" || t.starts_with("string_to_param.");
    let (layout, token) = if a1111 {
        (EmbeddingLayout::A1111, file_stem(name).to_string())
    } else {
        (EmbeddingLayout::Diffusers, t.to_string())
    };
    if token.trim().is_empty() {
        let what = if a1111 { "the file name has no stem to use" } else { "the tensor's name is blank" };
        return Err(err(Some(t), format!("no trigger word: {what}; give one explicitly")));
    }
    read_vectors(file, entry, token, layout)
}

/// The embedding held by one tensor of `file` (`[dim]` or `[vectors, dim]`, a float type,
/// finite), called by `token`: a textual-inversion file's only tensor, or an embedding bundled
/// in a LoRA file (`bundle_emb.<token>.…`).
pub fn read_vectors<R: RangeRead>(
    file: &SafetensorsFile<R>,
    entry: &crate::io::safetensors::TensorEntry,
    token: String,
    layout: EmbeddingLayout,
) -> Result<TextualInversion> {
    let name = file.name();
    let t = entry.name.as_str();
    let err = |tensor: Option<&str>, message: String| Error::Format {
        file: name.to_string(),
        tensor: tensor.map(str::to_string),
        message,
    };
    if !matches!(entry.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) {
        return Err(err(Some(t), format!("dtype {} is not a float type (F32, F16, BF16, F64)", entry.dtype)));
    }
    let (n, dim) = match entry.shape[..] {
        [d] => (1, d),
        [n, d] => (n, d),
        _ => {
            return Err(err(
                Some(t),
                format!("has shape {:?}; an embedding is [dim] or [vectors, dim]", entry.shape),
            ))
        }
    };
    if n == 0 || dim == 0 {
        return Err(err(Some(t), format!("has shape {:?}: no vectors", entry.shape)));
    }
    let vectors = file.read_f32(t)?;
    if vectors.iter().any(|v| !v.is_finite()) {
        return Err(err(Some(t), "contains NaN or infinite values".into()));
    }
    Ok(TextualInversion { token, file: name.to_string(), tensor: t.to_string(), layout, dim, vectors })
}

fn preview(names: &[&str]) -> String {
    let mut shown: Vec<String> = names.iter().take(4).map(|n| format!("`{n}`")).collect();
    if names.len() > 4 {
        shown.push(format!("… {} more", names.len() - 4));
    }
    shown.join(", ")
}

/// Adds an embedding to a tokenizer and its text encoder: its tokens get the ids after those
/// already added and its vectors those ids' rows. Returns the ids. Fails, changing nothing, when
/// the vectors' size is not the encoder's hidden size, a token is taken (in the vocabulary, or
/// added before, or `token_1` is), or the two do not agree on the ids after the vocabulary.
pub fn add_embedding(
    gpu: &Gpu,
    tokenizer: &mut ClipTokenizer,
    text_encoder: &mut ClipTextModel,
    embedding: &TextualInversion,
) -> Result<Vec<u32>> {
    embedding.check_dim(text_encoder.config().hidden_size)?;
    check_pair(tokenizer, text_encoder)?;
    let taken = |t: &str| Error::Format {
        file: embedding.file.clone(),
        tensor: Some(embedding.tensor.clone()),
        message: format!(
            "the trigger word `{t}` is already a token; unload the embedding that uses it or load this \
             one under another token"
        ),
    };
    let first_extra = format!("{}_1", embedding.token);
    if tokenizer.token_id(&first_extra).is_some() {
        return Err(taken(&first_extra));
    }
    // `T_<k>` would be read as one more vector of a loaded embedding `T`.
    if let Some((stem, k)) = embedding.token.rsplit_once('_') {
        if !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()) && tokenizer.added_tokens().iter().any(|(t, _)| t == stem) {
            return Err(Error::Format {
                file: embedding.file.clone(),
                tensor: Some(embedding.tensor.clone()),
                message: format!(
                    "the trigger word `{}` would be read as a vector of the loaded embedding `{stem}`; \
                     load this one under another token",
                    embedding.token
                ),
            });
        }
    }
    let tokens = embedding.tokens();
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let ids = tokenizer.add_tokens(&refs).map_err(|e| match e {
        Error::Invalid(message) => {
            Error::Format { file: embedding.file.clone(), tensor: Some(embedding.tensor.clone()), message }
        }
        other => other,
    })?;
    let mut rows = text_encoder.added_token_rows().to_vec();
    rows.extend_from_slice(&embedding.vectors);
    if let Err(e) = text_encoder.set_added_token_rows(gpu, &rows) {
        tokenizer.remove_added_tokens(&refs)?;
        return Err(e);
    }
    Ok(ids)
}

/// Removes the embedding whose trigger word is `token` (its tokens `token`, `token_1`, …);
/// the embeddings added after it move down to fill the ids.
pub fn remove_embedding(
    gpu: &Gpu,
    tokenizer: &mut ClipTokenizer,
    text_encoder: &mut ClipTextModel,
    token: &str,
) -> Result<()> {
    check_pair(tokenizer, text_encoder)?;
    let added = tokenizer.added_tokens();
    let id_of = |t: &str| added.iter().find(|(a, _)| a == t).map(|&(_, id)| id);
    let Some(first) = id_of(token) else {
        let loaded: Vec<String> = embeddings(tokenizer).into_iter().map(|(t, _)| t).collect();
        return Err(Error::Invalid(format!("no embedding with trigger word `{token}` is loaded (loaded: {loaded:?})")));
    };
    let mut group = vec![(token.to_string(), first)];
    for k in 1.. {
        let t = format!("{token}_{k}");
        match id_of(&t) {
            Some(id) => group.push((t, id)),
            None => break,
        }
    }
    let base = tokenizer.first_added_id();
    let d = text_encoder.config().hidden_size;
    let drop: Vec<usize> = group.iter().map(|&(_, id)| (id - base) as usize).collect();
    let rows: Vec<f32> = text_encoder
        .added_token_rows()
        .chunks(d)
        .enumerate()
        .filter(|(i, _)| !drop.contains(i))
        .flat_map(|(_, r)| r.iter().copied())
        .collect();
    text_encoder.set_added_token_rows(gpu, &rows)?;
    let names: Vec<&str> = group.iter().map(|(t, _)| t.as_str()).collect();
    tokenizer.remove_added_tokens(&names)
}

/// The loaded embeddings: (trigger word, number of vectors), in id order. Tokens `T_k` that
/// follow an added `T` count as its vectors.
pub fn embeddings(tokenizer: &ClipTokenizer) -> Vec<(String, usize)> {
    let added = tokenizer.added_tokens();
    let mut out: Vec<(String, usize)> = Vec::new();
    for (t, _) in &added {
        if let Some(last) = out.last_mut() {
            if *t == format!("{}_{}", last.0, last.1) {
                last.1 += 1;
                continue;
            }
        }
        out.push((t.clone(), 1));
    }
    out
}

/// The tokenizer's added ids must be the text encoder's rows after its vocabulary.
fn check_pair(tokenizer: &ClipTokenizer, text_encoder: &ClipTextModel) -> Result<()> {
    let vocab = text_encoder.config().vocab_size;
    let (first, n_tok, n_rows) =
        (tokenizer.first_added_id() as usize, tokenizer.added_tokens().len(), text_encoder.num_added_tokens());
    if first != vocab || n_tok != n_rows {
        return Err(Error::Invalid(format!(
            "tokenizer and text encoder disagree: the tokenizer adds {n_tok} tokens from id {first}, the \
             text encoder has {n_rows} rows after its vocabulary of {vocab}; use the pair loaded together"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems() {
        assert_eq!(file_stem("dir/EasyNegative.safetensors"), "EasyNegative");
        assert_eq!(file_stem("C:\\emb\\bad-hands-5.v2.safetensors"), "bad-hands-5.v2");
        assert_eq!(file_stem("noext"), "noext");
        assert_eq!(file_stem(".hidden"), ".hidden");
    }

    #[test]
    fn multi_vector_tokens() {
        let ti = TextualInversion {
            token: "emb".into(),
            file: "f".into(),
            tensor: "emb_params".into(),
            layout: EmbeddingLayout::A1111,
            dim: 2,
            vectors: vec![0.0; 6],
        };
        assert_eq!(ti.n_vectors(), 3);
        assert_eq!(ti.tokens(), ["emb", "emb_1", "emb_2"]);
        assert!(ti.check_dim(2).is_ok());
        let e = ti.check_dim(768).unwrap_err().to_string();
        assert!(e.contains("f: tensor `emb_params`") && e.contains("768"), "{e}");
    }
}
