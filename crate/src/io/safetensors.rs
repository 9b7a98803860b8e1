//! Streaming safetensors reader: only the 8-byte header length and the JSON header are read
//! up front; each tensor's bytes are read on demand from its byte range, converted to f32 in
//! bounded chunks and (optionally) uploaded to the GPU, so a model loads tensor by tensor
//! without ever holding the file.
//!
//! Format (<https://github.com/huggingface/safetensors>): `u64` little-endian header length N,
//! N bytes of UTF-8 JSON `{"name": {"dtype": "F16", "shape": [..], "data_offsets": [b, e]},
//! ..., "__metadata__": {"key": "value"}}`, then the data; offsets are relative to the end of
//! the header, tensors are little-endian and row-major.
//!
//! Validation (every failure is an [`Error::Format`] naming the file and, where one is at fault,
//! the tensor): header length larger than the file or above 100 MB (the reference loader's
//! limit), non-UTF-8 or non-object JSON, unknown dtype, malformed entries, shape products that
//! overflow, byte lengths that disagree with dtype × shape, offsets that run backwards or past
//! the end of the file, and overlapping tensors. Gaps between tensors and trailing bytes (which
//! the reference writer never produces) are tolerated because they make no read ambiguous.
//! Non-string `__metadata__` values are kept as their JSON text.

use super::RangeRead;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::quant::DType;
use crate::tensor::Tensor;
use half::{bf16, f16};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};

pub use ::safetensors::Dtype;

/// Largest JSON header accepted (the `safetensors` crate's own limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Bytes read per step when converting a tensor; bounds the temporary raw buffer.
const CHUNK_BYTES: usize = 4 << 20;

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file: `start..end`.
    pub start: u64,
    pub end: u64,
}

impl TensorEntry {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
    /// Length of the data in bytes.
    pub fn byte_len(&self) -> u64 {
        self.end - self.start
    }
}

/// An opened safetensors source: header parsed and validated, data not read.
pub struct SafetensorsFile<R: RangeRead> {
    reader: R,
    name: String,
    /// Tensors in file order (by start offset).
    tensors: Vec<TensorEntry>,
    index: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
    data_start: u64,
}

impl<R: RangeRead> std::fmt::Debug for SafetensorsFile<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("name", &self.name)
            .field("len", &self.reader.len())
            .field("tensors", &self.tensors.len())
            .field("metadata", &self.metadata)
            .finish()
    }
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

#[cfg(not(target_arch = "wasm32"))]
impl SafetensorsFile<super::LocalFile> {
    /// Opens a local file (native only); errors name the path.
    pub fn open_path(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let file = super::LocalFile::open(path)?;
        let name = file.path().to_string();
        Self::open(file, name)
    }
}

impl<R: RangeRead> SafetensorsFile<R> {
    /// Reads and validates the header of `reader`; `name` (a path or URL) is used in errors.
    pub fn open(reader: R, name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let file_len = reader.len();
        let err = |message: String| Error::Format { file: name.clone(), tensor: None, message };
        if file_len < 8 {
            return Err(err(format!(
                "not a safetensors file: {file_len} bytes, shorter than the 8-byte header length"
            )));
        }
        let mut len_bytes = [0u8; 8];
        read(&reader, &name, 0, &mut len_bytes)?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > file_len - 8 {
            return Err(err(format!(
                "header length {header_len} bytes is larger than the file ({file_len} bytes): \
                 truncated or not a safetensors file"
            )));
        }
        if header_len > MAX_HEADER_BYTES {
            return Err(err(format!("header length {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")));
        }
        let mut header = vec![0u8; header_len as usize];
        read(&reader, &name, 8, &mut header)?;
        let text = std::str::from_utf8(&header).map_err(|e| err(format!("header is not valid UTF-8: {e}")))?;
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| err(format!("header is not valid JSON: {e}")))?;
        let serde_json::Value::Object(map) = json else {
            return Err(err("header is not a JSON object".into()));
        };
        let data_start = 8 + header_len;
        let mut metadata = BTreeMap::new();
        let mut tensors = Vec::with_capacity(map.len());
        for (key, value) in map {
            if key == "__metadata__" {
                let serde_json::Value::Object(m) = value else {
                    return Err(err("`__metadata__` is not a JSON object".into()));
                };
                for (k, v) in m {
                    let v = match v {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    metadata.insert(k, v);
                }
                continue;
            }
            tensors.push(parse_entry(&name, key, value, data_start, file_len)?);
        }
        tensors.sort_by_key(|t| (t.start, t.end));
        for pair in tensors.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if b.start < a.end {
                return Err(Error::Format {
                    file: name.clone(),
                    tensor: Some(b.name.clone()),
                    message: format!(
                        "data_offsets [{}, {}] overlap tensor `{}` [{}, {}]",
                        b.start - data_start,
                        b.end - data_start,
                        a.name,
                        a.start - data_start,
                        a.end - data_start
                    ),
                });
            }
        }
        let index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(SafetensorsFile { reader, name, tensors, index, metadata, data_start })
    }

    /// The name given at open (path or URL).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every tensor, in file order.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    /// The `__metadata__` table (empty when absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Offset of the first data byte (8 + header length).
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// The entry for `name`, if present.
    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The entry for `name`, or an error naming the file and tensor.
    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.get(name).ok_or_else(|| self.format_err(name, "not found in this file".into()))
    }

    /// The underlying reader.
    pub fn reader(&self) -> &R {
        &self.reader
    }

    fn format_err(&self, tensor: &str, message: String) -> Error {
        Error::Format { file: self.name.clone(), tensor: Some(tensor.to_string()), message }
    }

    /// The raw little-endian bytes of one tensor.
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let e = self.entry(name)?;
        let len = usize::try_from(e.byte_len())
            .map_err(|_| self.format_err(name, format!("{} bytes do not fit in memory", e.byte_len())))?;
        let mut buf = vec![0u8; len];
        read(&self.reader, &self.name, e.start, &mut buf)?;
        Ok(buf)
    }

    /// One tensor's values converted to f32 (F32, F16, BF16, F64 and the integer and BOOL
    /// types; F64 and 32/64-bit integers round to the nearest f32). Reads in bounded chunks:
    /// peak memory is the output plus `CHUNK_BYTES`.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        let width = element_bytes(e.dtype).ok_or_else(|| {
            self.format_err(
                name,
                format!(
                    "dtype {} cannot be converted to f32 (supported: F32, F16, BF16, F64, \
                     I8, U8, I16, U16, I32, U32, I64, U64, BOOL)",
                    e.dtype
                ),
            )
        })?;
        let numel = usize::try_from(e.numel())
            .ok()
            .filter(|n| n.checked_mul(4).is_some())
            .ok_or_else(|| self.format_err(name, format!("{} elements do not fit in memory", e.numel())))?;
        let mut out = Vec::with_capacity(numel);
        let step = (CHUNK_BYTES / width) * width;
        let mut raw = vec![0u8; step.min(numel * width)];
        let mut offset = e.start;
        while offset < e.end {
            let n = ((e.end - offset) as usize).min(step);
            let chunk = &mut raw[..n];
            read(&self.reader, &self.name, offset, chunk)?;
            convert_into(e.dtype, chunk, &mut out);
            offset += n as u64;
        }
        Ok(out)
    }

    /// Reads one tensor and uploads it to the GPU stored as `dtype` (see `Tensor::from_f32_as`),
    /// so a model can stream its weights tensor by tensor.
    pub fn load(&self, gpu: &Gpu, name: &str, dtype: DType) -> Result<Tensor> {
        let values = self.read_f32(name)?;
        let shape = self.entry(name)?.shape.clone();
        Tensor::from_f32_as(gpu, &shape, &values, dtype).map_err(|e| match e {
            Error::Invalid(m) | Error::Shape { message: m, .. } | Error::DType { message: m, .. } => {
                self.format_err(name, m)
            }
            other => other,
        })
    }
}

/// Reads a byte range, attaching the file name to errors that lack one.
fn read<R: RangeRead>(reader: &R, file: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
    reader.read_at(offset, buf).map_err(|e| match e {
        Error::Io { file: f, message } if f.is_empty() => Error::Io { file: file.to_string(), message },
        Error::Io { .. } => e,
        other => Error::Io { file: file.to_string(), message: other.to_string() },
    })
}

fn parse_entry(
    file: &str,
    name: String,
    value: serde_json::Value,
    data_start: u64,
    file_len: u64,
) -> Result<TensorEntry> {
    let err = |message: String| Error::Format { file: file.to_string(), tensor: Some(name.clone()), message };
    let raw: RawEntry = serde_json::from_value(value)
        .map_err(|e| err(format!("malformed header entry (want dtype, shape, data_offsets): {e}")))?;
    let dtype: Dtype = serde_json::from_value(serde_json::Value::String(raw.dtype.clone()))
        .map_err(|_| err(format!("unknown dtype `{}`", raw.dtype)))?;
    let numel = raw.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let bits = numel.and_then(|n| n.checked_mul(dtype.bitsize() as u64));
    let Some(bits) = bits else {
        return Err(err(format!("shape {:?} of {dtype} overflows a 64-bit byte count", raw.shape)));
    };
    if bits % 8 != 0 {
        return Err(err(format!("shape {:?} of {dtype} is not a whole number of bytes", raw.shape)));
    }
    let need = bits / 8;
    let [b, e] = raw.data_offsets;
    if e < b {
        return Err(err(format!("data_offsets [{b}, {e}] run backwards")));
    }
    if e - b != need {
        return Err(err(format!(
            "dtype {dtype} with shape {:?} needs {need} bytes but data_offsets [{b}, {e}] span {}",
            raw.shape,
            e - b
        )));
    }
    let end = data_start.checked_add(e).filter(|&end| end <= file_len);
    let Some(end) = end else {
        return Err(err(format!(
            "data_offsets [{b}, {e}] end past the end of the file ({} data bytes after the \
             header; truncated?)",
            file_len - data_start
        )));
    };
    let shape = raw
        .shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| err(format!("shape {:?} does not fit this platform's sizes", raw.shape)))?;
    Ok(TensorEntry { name: name.clone(), dtype, shape, start: data_start + b, end })
}

/// Bytes per element of the dtypes `read_f32` converts.
pub fn element_bytes(dtype: Dtype) -> Option<usize> {
    Some(match dtype {
        Dtype::BOOL | Dtype::U8 | Dtype::I8 => 1,
        Dtype::F16 | Dtype::BF16 | Dtype::I16 | Dtype::U16 => 2,
        Dtype::F32 | Dtype::I32 | Dtype::U32 => 4,
        Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        _ => return None,
    })
}

/// Appends the f32 values of little-endian `bytes` of `dtype` (a whole number of elements;
/// `dtype` one that `element_bytes` accepts).
fn convert_into(dtype: Dtype, bytes: &[u8], out: &mut Vec<f32>) {
    fn each<const N: usize>(bytes: &[u8], out: &mut Vec<f32>, f: impl Fn([u8; N]) -> f32) {
        out.extend(bytes.chunks_exact(N).map(|c| f(c.try_into().expect("chunks_exact"))));
    }
    match dtype {
        Dtype::F32 => each(bytes, out, f32::from_le_bytes),
        Dtype::F16 => each(bytes, out, |b| f16::from_bits(u16::from_le_bytes(b)).to_f32()),
        Dtype::BF16 => each(bytes, out, |b| bf16::from_bits(u16::from_le_bytes(b)).to_f32()),
        Dtype::F64 => each(bytes, out, |b| f64::from_le_bytes(b) as f32),
        Dtype::BOOL => each(bytes, out, |b: [u8; 1]| if b[0] != 0 { 1.0 } else { 0.0 }),
        Dtype::U8 => each(bytes, out, |b: [u8; 1]| b[0] as f32),
        Dtype::I8 => each(bytes, out, |b: [u8; 1]| b[0] as i8 as f32),
        Dtype::I16 => each(bytes, out, |b| i16::from_le_bytes(b) as f32),
        Dtype::U16 => each(bytes, out, |b| u16::from_le_bytes(b) as f32),
        Dtype::I32 => each(bytes, out, |b| i32::from_le_bytes(b) as f32),
        Dtype::U32 => each(bytes, out, |b| u32::from_le_bytes(b) as f32),
        Dtype::I64 => each(bytes, out, |b| i64::from_le_bytes(b) as f32),
        Dtype::U64 => each(bytes, out, |b| u64::from_le_bytes(b) as f32),
        other => unreachable!("convert_into called with unsupported dtype {other}"),
    }
}
