//! Streaming safetensors writer: the header (every tensor's name, dtype, shape and byte range,
//! plus `__metadata__`) is written first from the declared entries, then each tensor's data in
//! the declared order, so a model can be written one tensor at a time without holding it.
//!
//! The layout is the reference writer's: `u64` little-endian header length, the JSON header
//! padded with spaces to a multiple of 8 bytes, then the data, contiguous, little-endian,
//! row-major. Values given as f32 are converted to the entry's dtype (F32, F16 and BF16 with
//! round to nearest even, F64; integers rounded to nearest and saturated, BOOL as non-zero);
//! other dtypes take raw bytes.

use crate::error::{Error, Result};
use half::{bf16, f16};
use safetensors::Dtype;
use std::collections::{BTreeMap, HashSet};
use std::io::Write;

/// One tensor to be written.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl WriteEntry {
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: &[usize]) -> Self {
        WriteEntry { name: name.into(), dtype, shape: shape.to_vec() }
    }

    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn byte_len(&self) -> usize {
        self.numel() * self.dtype.bitsize() / 8
    }
}

/// Writes a safetensors file to `out`: create it with every entry (the header goes out at
/// once), then give each tensor's data in order, then [`SafetensorsWriter::finish`].
pub struct SafetensorsWriter<W: Write> {
    out: W,
    name: String,
    entries: Vec<WriteEntry>,
    next: usize,
}

fn io_err(file: &str, e: std::io::Error) -> Error {
    Error::Io { file: file.to_string(), message: format!("writing failed: {e}") }
}

impl<W: Write> SafetensorsWriter<W> {
    /// Writes the header for `entries` (in this order) and `metadata`; `name` is used in errors.
    pub fn new(mut out: W, name: &str, entries: Vec<WriteEntry>, metadata: &BTreeMap<String, String>) -> Result<Self> {
        let invalid = |m: String| Error::Invalid(format!("{name}: {m}"));
        let mut seen = HashSet::new();
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            let m: serde_json::Map<String, serde_json::Value> =
                metadata.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
            header.insert("__metadata__".into(), serde_json::Value::Object(m));
        }
        let mut offset = 0usize;
        for e in &entries {
            if e.name == "__metadata__" || !seen.insert(e.name.as_str()) {
                return Err(invalid(format!("tensor name `{}` is reserved or given twice", e.name)));
            }
            if (e.numel() * e.dtype.bitsize()) % 8 != 0 {
                return Err(invalid(format!("tensor `{}`: {} × {} is not a whole number of bytes", e.name, e.numel(), e.dtype)));
            }
            let end = offset + e.byte_len();
            header.insert(
                e.name.clone(),
                serde_json::json!({ "dtype": e.dtype.to_string(), "shape": e.shape, "data_offsets": [offset, end] }),
            );
            offset = end;
        }
        let mut json = serde_json::to_vec(&serde_json::Value::Object(header))
            .map_err(|e| invalid(format!("header could not be serialised: {e}")))?;
        while json.len() % 8 != 0 {
            json.push(b' ');
        }
        out.write_all(&(json.len() as u64).to_le_bytes()).map_err(|e| io_err(name, e))?;
        out.write_all(&json).map_err(|e| io_err(name, e))?;
        Ok(SafetensorsWriter { out, name: name.to_string(), entries, next: 0 })
    }

    fn take(&mut self, name: &str) -> Result<WriteEntry> {
        let e = self.entries.get(self.next).cloned().ok_or_else(|| {
            Error::Invalid(format!("{}: tensor `{name}` written after every declared tensor", self.name))
        })?;
        if e.name != name {
            return Err(Error::Invalid(format!(
                "{}: tensor `{name}` written where `{}` was declared next",
                self.name, e.name
            )));
        }
        self.next += 1;
        Ok(e)
    }

    /// Writes the next tensor from f32 values, converted to its declared dtype (see the module
    /// docs).
    pub fn write_f32(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let e = self.take(name)?;
        if values.len() != e.numel() {
            return Err(Error::Invalid(format!(
                "{}: tensor `{name}` of shape {:?} needs {} values, got {}",
                self.name,
                e.shape,
                e.numel(),
                values.len()
            )));
        }
        let mut buf = Vec::with_capacity(e.byte_len().min(1 << 22));
        for chunk in values.chunks(1 << 20) {
            buf.clear();
            match e.dtype {
                Dtype::F32 => chunk.iter().for_each(|v| buf.extend_from_slice(&v.to_le_bytes())),
                Dtype::F16 => chunk.iter().for_each(|v| buf.extend_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes())),
                Dtype::BF16 => chunk.iter().for_each(|v| buf.extend_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes())),
                Dtype::F64 => chunk.iter().for_each(|v| buf.extend_from_slice(&(*v as f64).to_le_bytes())),
                Dtype::I64 => chunk.iter().for_each(|v| buf.extend_from_slice(&(v.round() as i64).to_le_bytes())),
                Dtype::I32 => chunk.iter().for_each(|v| buf.extend_from_slice(&(v.round() as i32).to_le_bytes())),
                Dtype::I16 => chunk.iter().for_each(|v| buf.extend_from_slice(&(v.round() as i16).to_le_bytes())),
                Dtype::I8 => chunk.iter().for_each(|v| buf.push(v.round() as i8 as u8)),
                Dtype::U8 => chunk.iter().for_each(|v| buf.push(v.round() as u8)),
                Dtype::BOOL => chunk.iter().for_each(|v| buf.push((*v != 0.0) as u8)),
                other => {
                    return Err(Error::Invalid(format!(
                        "{}: tensor `{name}` is declared {other}; f32 values can only be written as F32, F16, \
                         BF16, F64, I64, I32, I16, I8, U8 or BOOL",
                        self.name
                    )))
                }
            }
            self.out.write_all(&buf).map_err(|err| io_err(&self.name, err))?;
        }
        Ok(())
    }

    /// Writes the next tensor's raw little-endian bytes.
    pub fn write_raw(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let e = self.take(name)?;
        if bytes.len() != e.byte_len() {
            return Err(Error::Invalid(format!(
                "{}: tensor `{name}` ({} {:?}) needs {} bytes, got {}",
                self.name,
                e.dtype,
                e.shape,
                e.byte_len(),
                bytes.len()
            )));
        }
        self.out.write_all(bytes).map_err(|err| io_err(&self.name, err))
    }

    /// Checks that every declared tensor was written, flushes, and returns the sink.
    pub fn finish(mut self) -> Result<W> {
        if let Some(e) = self.entries.get(self.next) {
            return Err(Error::Invalid(format!(
                "{}: {} declared tensors were not written (next: `{}`)",
                self.name,
                self.entries.len() - self.next,
                e.name
            )));
        }
        self.out.flush().map_err(|e| io_err(&self.name, e))?;
        Ok(self.out)
    }
}

/// A whole safetensors file in memory from f32 tensors `(name, dtype, shape, values)`.
pub fn to_bytes(tensors: &[(&str, Dtype, &[usize], &[f32])], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let entries = tensors.iter().map(|(n, d, s, _)| WriteEntry::new(*n, *d, s)).collect();
    let mut w = SafetensorsWriter::new(Vec::new(), "(memory)", entries, metadata)?;
    for (n, _, _, v) in tensors {
        w.write_f32(n, v)?;
    }
    w.finish()
}
