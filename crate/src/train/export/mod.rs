//! Writing trained low-rank layers as a kohya sd-scripts LoRA `.safetensors` — the inverse of
//! [`crate::lora::read_lora`] for `networks.lora` files.
//!
//! Per layer (diffusers module path `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
//! text encoder `text_model.encoder.layers.0.self_attn.q_proj`) the kohya name is
//! `lora_unet_` / `lora_te_` + the path with `_` for `.`, and the tensors are:
//! - linear layers: `.lora_down.weight` [R, in], `.lora_up.weight` [out, R];
//! - convolutions (also 1×1, like kohya's `Conv2d` LoRA modules): `.lora_down.weight`
//!   [R, in, k, k], `.lora_up.weight` [out, R, 1, 1];
//! - `.alpha`: a scalar; ΔW = up · down · alpha / R.
//!
//! Every tensor is stored in one type (F32, F16 or BF16, as kohya's `save_precision`
//! converts all of them, alpha included), in name order (the order Python's safetensors
//! writes tensors of one type), so that `sshs_model_hash` — SHA-256 of the bytes after the
//! header, what A1111 and the additional-networks extension compute for a LoRA — is the same
//! whichever writer made the file. `sshs_legacy_hash` is, as kohya computes it, the first 8
//! hex digits of the SHA-256 of the 64 KiB at 1 MiB of the file written with only the `ss_*`
//! entries in its metadata.

mod pyfmt;
mod record;

pub use pyfmt::{py_f32, py_f64, py_json};
pub use record::{ModelHashes, TrainingRecord};

use crate::error::{Error, Result};
use crate::io::safetensors_write::{SafetensorsWriter, WriteEntry};
use crate::io::RangeRead;
use crate::lora::{kohya_to_dotted, HostTensor, LayerShape, Target};
use half::{bf16, f16};
use safetensors::Dtype;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

/// The storage type of every tensor of an exported file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportDtype {
    F32,
    F16,
    Bf16,
}

impl ExportDtype {
    fn dtype(self) -> Dtype {
        match self {
            ExportDtype::F32 => Dtype::F32,
            ExportDtype::F16 => Dtype::F16,
            ExportDtype::Bf16 => Dtype::BF16,
        }
    }

    fn push(self, out: &mut Vec<u8>, v: f32) {
        match self {
            ExportDtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
            ExportDtype::F16 => out.extend_from_slice(&f16::from_f32(v).to_bits().to_le_bytes()),
            ExportDtype::Bf16 => out.extend_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes()),
        }
    }

    /// kohya's `save_precision` names: `float`, `fp16`, `bf16`.
    pub fn kohya_name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "float",
            ExportDtype::F16 => "fp16",
            ExportDtype::Bf16 => "bf16",
        }
    }
}

/// One trained low-rank layer.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainedLayer {
    pub target: Target,
    /// The engine's (diffusers) module path.
    pub module: String,
    /// The adapted module's weight shape.
    pub shape: LayerShape,
    /// [R, in·k·k] (or already [R, in, k, k]).
    pub down: HostTensor,
    /// [out, R] (or [out, R, 1, 1]).
    pub up: HostTensor,
    pub alpha: f32,
}

impl TrainedLayer {
    /// The rank R.
    pub fn rank(&self) -> usize {
        self.down.dim(0)
    }

    /// The file's key prefix, checked to read back to the same module (see [`kohya_name`]).
    pub fn kohya_name(&self) -> Result<String> {
        kohya_name(self.target, &self.module)
    }

    /// (down shape, up shape) as the file stores them.
    fn file_shapes(&self) -> (Vec<usize>, Vec<usize>) {
        let r = self.rank();
        match self.shape {
            LayerShape::Conv { in_channels, out_channels, kernel } => {
                (vec![r, in_channels, kernel, kernel], vec![out_channels, r, 1, 1])
            }
            _ => (vec![r, self.shape.in_dim()], vec![self.shape.out_dim(), r]),
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |m: String| Error::Invalid(format!("{} layer `{}`: {m}", self.target.name(), self.module));
        if matches!(self.shape, LayerShape::Norm { .. }) {
            return Err(bad("a norm layer cannot hold a low-rank adapter".into()));
        }
        let r = self.rank();
        if r == 0 || self.down.numel() != r * self.shape.cols() {
            return Err(bad(format!(
                "lora_down has shape {:?}; a rank-R adapter on a {} needs R × {} values",
                self.down.shape,
                self.shape.describe(),
                self.shape.cols()
            )));
        }
        if self.up.numel() != self.shape.out_dim() * r || self.up.dim(0) != self.shape.out_dim() {
            return Err(bad(format!(
                "lora_up has shape {:?}; expected [{}, {r}] for rank {r}",
                self.up.shape,
                self.shape.out_dim()
            )));
        }
        if !self.alpha.is_finite() || self.alpha < 0.0 {
            return Err(bad(format!("alpha {} is not a finite number ≥ 0", self.alpha)));
        }
        if let Some(v) = self.down.data.iter().chain(&self.up.data).find(|v| !v.is_finite()) {
            return Err(bad(format!("holds {v}: training diverged (try a lower learning rate)")));
        }
        Ok(())
    }
}

/// The kohya key prefix of a module: `lora_unet_<path with _ for .>` or
/// `lora_te_<path>` (text-encoder paths get the `text_model.` prefix kohya's names have).
/// Errors when the name would not read back to the same module (a path with `_` inside a
/// word this engine's reader does not know).
pub fn kohya_name(target: Target, module: &str) -> Result<String> {
    let bad = |m: &str| Error::Invalid(format!("{} module `{module}`: {m}", target.name()));
    if module.is_empty() || !module.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
        return Err(bad("a module path has letters, digits, `_` and `.` only"));
    }
    let path = match target {
        Target::TextEncoder if !module.starts_with("text_model.") => format!("text_model.{module}"),
        _ => module.to_string(),
    };
    let flat = path.replace('.', "_");
    if kohya_to_dotted(&flat) != path {
        return Err(bad(&format!(
            "its kohya name `{flat}` would read back as `{}`",
            kohya_to_dotted(&flat)
        )));
    }
    let prefix = match target {
        Target::Unet => "lora_unet_",
        Target::TextEncoder => "lora_te_",
    };
    Ok(format!("{prefix}{flat}"))
}

/// One tensor of the file: (name, shape, values).
type Planned<'a> = (String, Vec<usize>, &'a [f32]);

/// A learned token embedding written into a LoRA file (A1111's bundled embeddings).
#[derive(Clone, Debug, PartialEq)]
pub struct BundledEmbedding {
    /// The trigger word that calls it.
    pub name: String,
    /// `[vectors, dim]`.
    pub shape: [usize; 2],
    pub values: Vec<f32>,
}

impl BundledEmbedding {
    /// Its key in a LoRA file, `bundle_emb.<name>.string_to_param.*`: the layout A1111's
    /// `Lora` extension reads (kohya sd-scripts skips it; diffusers' `load_lora_weights`
    /// refuses unknown keys, so there the file's other keys are loaded and the embedding is
    /// given to `load_textual_inversion`, see [`export_embedding`]).
    pub fn key(&self) -> String {
        format!("bundle_emb.{}.string_to_param.*", self.name)
    }

    fn check(&self) -> Result<()> {
        let bad_name = self.name.is_empty() || self.name.contains('.') || self.name.chars().any(char::is_whitespace);
        if bad_name {
            return Err(Error::Invalid(format!(
                "embedding name `{}`: it must be one word without dots to be stored in a LoRA file",
                self.name
            )));
        }
        if self.shape[0] == 0 || self.shape[1] == 0 || self.values.len() != self.shape[0] * self.shape[1] {
            return Err(Error::Invalid(format!(
                "embedding `{}`: {} values do not make {:?}",
                self.name,
                self.values.len(),
                self.shape
            )));
        }
        if let Some(v) = self.values.iter().find(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!("embedding `{}` holds {v}", self.name)));
        }
        Ok(())
    }
}

/// An A1111 textual-inversion file (`emb_params` `[vectors, dim]`) of `emb`: the trigger word
/// is the file's stem (`sks.safetensors`), as A1111 and ComfyUI name embeddings; diffusers
/// loads it with `load_textual_inversion(path, token="sks")`.
pub fn export_embedding(emb: &BundledEmbedding, dtype: ExportDtype) -> Result<Vec<u8>> {
    emb.check()?;
    let mut data = Vec::with_capacity(emb.values.len() * 4);
    emb.values.iter().for_each(|v| dtype.push(&mut data, *v));
    let entries = vec![WriteEntry::new("emb_params".to_string(), dtype.dtype(), &emb.shape)];
    let meta = BTreeMap::from([("name".to_string(), emb.name.clone())]);
    let mut w = SafetensorsWriter::new(Vec::with_capacity(data.len() + 256), "(embedding export)", entries, &meta)?;
    w.write_raw("emb_params", &data)?;
    w.finish()
}

/// Writes `layers` as a kohya LoRA file with `record`'s metadata; returns the file's bytes.
pub fn export_kohya(layers: &[TrainedLayer], record: &TrainingRecord, dtype: ExportDtype) -> Result<Vec<u8>> {
    export_kohya_with(layers, &[], record, dtype)
}

/// [`export_kohya`] with learned token embeddings bundled in ([`BundledEmbedding::key`]).
pub fn export_kohya_with(
    layers: &[TrainedLayer],
    embeddings: &[BundledEmbedding],
    record: &TrainingRecord,
    dtype: ExportDtype,
) -> Result<Vec<u8>> {
    if layers.is_empty() {
        return Err(Error::Invalid("no trained layers to export".into()));
    }
    let mut seen = BTreeSet::new();
    let alphas: Vec<[f32; 1]> = layers.iter().map(|l| [l.alpha]).collect();
    let mut planned: Vec<Planned> = Vec::with_capacity(layers.len() * 3);
    for (layer, alpha) in layers.iter().zip(&alphas) {
        layer.check()?;
        let name = layer.kohya_name()?;
        if !seen.insert(name.clone()) {
            return Err(Error::Invalid(format!("{} module `{}` is given twice", layer.target.name(), layer.module)));
        }
        let (down_shape, up_shape) = layer.file_shapes();
        planned.push((format!("{name}.alpha"), vec![], alpha));
        planned.push((format!("{name}.lora_down.weight"), down_shape, &layer.down.data));
        planned.push((format!("{name}.lora_up.weight"), up_shape, &layer.up.data));
    }
    for e in embeddings {
        e.check()?;
        if !seen.insert(e.key()) {
            return Err(Error::Invalid(format!("embedding `{}` is given twice", e.name)));
        }
        planned.push((e.key(), e.shape.to_vec(), &e.values));
    }
    planned.sort_by(|a, b| a.0.cmp(&b.0));
    let mut data = Vec::new();
    let mut ranges = Vec::with_capacity(planned.len());
    for (_, _, values) in &planned {
        let start = data.len();
        values.iter().for_each(|v| dtype.push(&mut data, *v));
        ranges.push(start..data.len());
    }
    let write = |meta: &BTreeMap<String, String>| -> Result<Vec<u8>> {
        let entries = planned.iter().map(|(n, s, _)| WriteEntry::new(n.clone(), dtype.dtype(), s)).collect();
        let mut w = SafetensorsWriter::new(Vec::with_capacity(data.len() + 4096), "(LoRA export)", entries, meta)?;
        for ((name, _, _), range) in planned.iter().zip(&ranges) {
            w.write_raw(name, &data[range.clone()])?;
        }
        w.finish()
    };
    let mut meta = record.metadata();
    let ss_only: BTreeMap<String, String> = meta.iter().filter(|(k, _)| k.starts_with("ss_")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let legacy_file = write(&ss_only)?;
    let window = legacy_file.get(0x10_0000..).map_or(&[][..], |rest| &rest[..rest.len().min(0x1_0000)]);
    meta.insert("sshs_model_hash".into(), hex(&Sha256::digest(&data)));
    meta.insert("sshs_legacy_hash".into(), hex(&Sha256::digest(window))[..8].to_string());
    write(&meta)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of the bytes after a safetensors file's header: A1111's LoRA hash
/// ("AutoV3" on Civitai, the additional-networks extension's `sshs_model_hash`).
pub fn safetensors_data_hash(file: &[u8]) -> Result<String> {
    let n = file
        .get(..8)
        .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        .and_then(|n| usize::try_from(n).ok())
        .and_then(|n| n.checked_add(8))
        .filter(|&end| end <= file.len())
        .ok_or_else(|| Error::Format { file: String::new(), tensor: None, message: "not a safetensors file (header length past the end)".into() })?;
    Ok(hex(&Sha256::digest(&file[n..])))
}

/// A base model file's hashes (reads it once, in 1 MiB pieces).
pub fn model_hashes<R: RangeRead + ?Sized>(reader: &R) -> Result<ModelHashes> {
    let len = reader.len();
    let mut full = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(buf.len() as u64) as usize;
        reader.read_at(offset, &mut buf[..n])?;
        full.update(&buf[..n]);
        offset += n as u64;
    }
    let start = 0x10_0000u64.min(len);
    let n = (len - start).min(0x1_0000) as usize;
    let mut window = vec![0u8; n];
    reader.read_at(start, &mut window)?;
    Ok(ModelHashes { sha256: hex(&full.finalize()), legacy: hex(&Sha256::digest(&window))[..8].to_string() })
}
