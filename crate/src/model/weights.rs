//! Where model modules get their parameters: by the names diffusers / transformers use inside a
//! component (e.g. `text_model.encoder.layers.0.self_attn.q_proj.weight` in `text_encoder/`),
//! whatever layout the file on disk has. Conversion from other layouts happens in a
//! `WeightSource` implementation, once, at load.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::io::safetensors::SafetensorsFile;
use crate::io::RangeRead;
use crate::quant::DType;
use crate::tensor::Tensor;

/// A component's parameters by diffusers name.
pub trait WeightSource {
    /// Loads parameter `name` stored as `dtype`, checking that it has `shape` (a tensor whose
    /// file shape differs only by size-1 dimensions is accepted and reshaped).
    fn load(&self, gpu: &Gpu, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor>;
    /// Whether the component has parameter `name`.
    fn contains(&self, name: &str) -> bool;
    /// The file or component, for messages.
    fn describe(&self) -> String;
}

/// Which storage type a parameter gets: the matrices of linear and convolution layers take the
/// chosen weight type; norms, biases, embeddings and positional tables stay f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightPolicy {
    pub matrices: DType,
}

impl WeightPolicy {
    pub fn new(matrices: DType) -> Self {
        Self { matrices }
    }
    /// Storage of a linear or convolution weight matrix.
    pub fn matrix(&self) -> DType {
        self.matrices
    }
    /// Storage of every other parameter.
    pub fn vector(&self) -> DType {
        DType::F32
    }
}

impl Default for WeightPolicy {
    fn default() -> Self {
        Self::new(DType::F32)
    }
}

/// Checks a file's tensor shape against the shape a module expects.
pub fn check_shape(file: &str, name: &str, found: &[usize], expected: &[usize]) -> Result<()> {
    let squeeze = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
    if found == expected || squeeze(found) == squeeze(expected) {
        Ok(())
    } else {
        Err(Error::Format {
            file: file.to_string(),
            tensor: Some(name.to_string()),
            message: format!(
                "has shape {found:?} but the model's config needs {expected:?}; the file does not \
                 belong to this model configuration"
            ),
        })
    }
}

/// A component stored in one safetensors file under diffusers names, optionally below a
/// common key prefix.
pub struct SafetensorsSource<R: RangeRead> {
    file: SafetensorsFile<R>,
    prefix: String,
}

impl<R: RangeRead> SafetensorsSource<R> {
    pub fn new(file: SafetensorsFile<R>, prefix: impl Into<String>) -> Self {
        Self { file, prefix: prefix.into() }
    }

    pub fn file(&self) -> &SafetensorsFile<R> {
        &self.file
    }
}

impl<R: RangeRead> WeightSource for SafetensorsSource<R> {
    fn load(&self, gpu: &Gpu, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let key = format!("{}{name}", self.prefix);
        let entry = self.file.get(&key).ok_or_else(|| Error::Format {
            file: self.file.name().to_string(),
            tensor: Some(key.clone()),
            message: "is missing; the file is incomplete or made for another model".to_string(),
        })?;
        check_shape(self.file.name(), &key, &entry.shape, shape)?;
        self.file.load(gpu, &key, dtype)?.reshape(shape)
    }

    fn contains(&self, name: &str) -> bool {
        self.file.get(&format!("{}{name}", self.prefix)).is_some()
    }

    fn describe(&self) -> String {
        self.file.name().to_string()
    }
}
