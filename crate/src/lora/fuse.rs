//! Merging adapters into a model and writing the result, one tensor at a time on the CPU:
//! each tensor of the model's files is read, the adapters of its module applied with
//! [`merged_weight`] / [`merged_bias`], and written out under its original key (so a
//! single-file checkpoint keeps its CompVis names and a folder its diffusers ones). Adapter
//! layers that name modules the model lacks are skipped (the match report says how many);
//! layers that do not fit their module are errors.

use super::merge::merged_bias;
use super::{layers::check_fit, merged_weight, HostTensor, LayerAdapter, LayerShape, LoraFile, ModelLayers, Target};
use crate::error::{Error, Result};
use crate::io::safetensors::SafetensorsFile;
use crate::io::safetensors_write::{SafetensorsWriter, WriteEntry};
use crate::io::RangeRead;
use crate::model::checkpoint::{Checkpoint, Component};
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;

/// Storage of the written tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputDType {
    /// Each tensor keeps its stored type.
    Keep,
    /// Floating-point tensors are written as F16 (integer tensors keep their type).
    F16,
    /// Floating-point tensors are written as F32.
    F32,
}

impl OutputDType {
    fn of(self, source: Dtype) -> Dtype {
        let float = matches!(source, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64);
        match self {
            OutputDType::F16 if float => Dtype::F16,
            OutputDType::F32 if float => Dtype::F32,
            _ => source,
        }
    }
}

/// One adapter file at a strength.
#[derive(Clone, Copy, Debug)]
pub struct Weighted<'a> {
    pub file: &'a LoraFile,
    pub strength: f32,
}

/// What a merge wrote.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FuseReport {
    /// Tensors written (all files).
    pub tensors: usize,
    /// Tensors changed by adapters.
    pub merged: usize,
    /// Adapter layers skipped because the model has no such module.
    pub skipped_layers: usize,
}

/// The adapters of each module, checked against the model.
pub struct Plan<'a> {
    by_module: HashMap<(Target, String), Vec<(&'a LayerAdapter, f32)>>,
    pub skipped_layers: usize,
}

impl<'a> Plan<'a> {
    /// Groups the layers of `adapters` by module; layers must fit their module's shape.
    pub fn new(adapters: &[Weighted<'a>], layers: &ModelLayers) -> Result<Self> {
        let mut by_module: HashMap<(Target, String), Vec<(&LayerAdapter, f32)>> = HashMap::new();
        let mut skipped = 0;
        for w in adapters {
            for l in &w.file.layers {
                let Some(info) = layers.get(l.target, &l.module) else {
                    skipped += 1;
                    continue;
                };
                check_fit(l, &info.shape).map_err(|m| Error::Format {
                    file: w.file.file.clone(),
                    tensor: Some(l.key.clone()),
                    message: m,
                })?;
                by_module.entry((l.target, l.module.clone())).or_default().push((l, w.strength));
            }
        }
        Ok(Plan { by_module, skipped_layers: skipped })
    }

    /// The adapters of `module` of `target`.
    pub fn adapters(&self, target: Target, module: &str) -> Option<&[(&'a LayerAdapter, f32)]> {
        self.by_module.get(&(target, module.to_string())).map(Vec::as_slice)
    }

    /// The merged value of parameter `name` (diffusers name) of `component`, or `None` when no
    /// adapter touches it. `values` are its stored values, `shape` its diffusers shape.
    pub fn apply(
        &self,
        component: Component,
        name: &str,
        shape: &[usize],
        values: &[f32],
        layers: &ModelLayers,
    ) -> Result<Option<Vec<f32>>> {
        let target = match component {
            Component::Unet => Target::Unet,
            Component::TextEncoder => Target::TextEncoder,
            Component::Vae => return Ok(None),
        };
        let (module, is_bias) = match (name.strip_suffix(".weight"), name.strip_suffix(".bias")) {
            (Some(m), _) => (m, false),
            (_, Some(m)) => (m, true),
            _ => return Ok(None),
        };
        let Some(adapters) = self.adapters(target, module) else { return Ok(None) };
        if is_bias && adapters.iter().all(|(a, _)| a.delta.delta_bias().is_none()) {
            return Ok(None);
        }
        let base = HostTensor::new(shape.to_vec(), values.to_vec())?;
        if is_bias {
            return Ok(Some(merged_bias(adapters, &base)?.data));
        }
        let layer: LayerShape = layers
            .get(target, module)
            .map(|i| i.shape)
            .ok_or_else(|| Error::Invalid(format!("{} module `{module}` is not in the model's layer table", target.name())))?;
        Ok(Some(merged_weight(adapters, &base, None, &layer)?.0.data))
    }
}

/// Metadata naming the merged adapters and their strengths (`loralab_merged_loras`, a JSON
/// list of `{"name", "file", "strength"}`).
pub fn merge_metadata(adapters: &[Weighted<'_>]) -> (String, String) {
    let list: Vec<serde_json::Value> = adapters
        .iter()
        .map(|w| serde_json::json!({ "name": w.file.display_name(), "file": w.file.file, "strength": w.strength }))
        .collect();
    ("loralab_merged_loras".to_string(), serde_json::Value::Array(list).to_string())
}

/// One tensor to write: its key in the output, its key in the source, the shape to write, and
/// the parameter it is (component, diffusers name, diffusers shape) when it is one.
#[derive(Clone, Debug)]
pub struct Item {
    pub out_key: String,
    pub src_key: String,
    pub shape: Vec<usize>,
    pub param: Option<(Component, String, Vec<usize>)>,
}

/// The tensors of `src` in file order under their own keys, with the parameters of `ck`'s
/// components (`only` one of them, for a folder's component file) mapped.
pub fn same_keys<R: RangeRead>(src: &SafetensorsFile<R>, ck: &Checkpoint<R>, only: Option<Component>) -> Result<Vec<Item>> {
    let mut params: HashMap<&str, (Component, String, Vec<usize>)> = HashMap::new();
    for c in Component::ALL.into_iter().filter(|c| only.is_none_or(|o| o == *c)) {
        let w = ck.weights(c);
        for name in w.names() {
            if let Some(key) = w.file_key(name) {
                params.insert(key, (c, name.to_string(), w.shape(name)?));
            }
        }
    }
    Ok(src
        .tensors()
        .iter()
        .map(|t| Item {
            out_key: t.name.clone(),
            src_key: t.name.clone(),
            shape: t.shape.clone(),
            param: params.get(t.name.as_str()).cloned(),
        })
        .collect())
}

/// The parameters of one component under their diffusers names and shapes (a single-file
/// checkpoint's component written as a diffusers folder file), in source file order.
pub fn diffusers_keys<R: RangeRead>(ck: &Checkpoint<R>, component: Component) -> Result<Vec<Item>> {
    let w = ck.weights(component);
    let mut items = Vec::new();
    for name in w.names() {
        let Some(key) = w.file_key(name) else { continue };
        let shape = w.shape(name)?;
        let start = w.file().get(key).map_or(0, |t| t.start);
        items.push((
            start,
            Item { out_key: name.to_string(), src_key: key.to_string(), shape: shape.clone(), param: Some((component, name.to_string(), shape)) },
        ));
    }
    items.sort_by_key(|(start, _)| *start);
    Ok(items.into_iter().map(|(_, i)| i).collect())
}

/// Streams `items` of `src` to `out` (a safetensors file named `out_name` in messages), the
/// parameters merged with `plan`, floating-point tensors stored as `dtype` says.
#[allow(clippy::too_many_arguments)]
pub fn write_merged<R: RangeRead, W: Write>(
    src: &SafetensorsFile<R>,
    items: &[Item],
    plan: &Plan<'_>,
    layers: &ModelLayers,
    dtype: OutputDType,
    metadata: &BTreeMap<String, String>,
    out: W,
    out_name: &str,
    report: &mut FuseReport,
) -> Result<W> {
    let mut entries = Vec::with_capacity(items.len());
    for i in items {
        let t = src.entry(&i.src_key)?;
        entries.push(WriteEntry::new(i.out_key.clone(), dtype.of(t.dtype), &i.shape));
    }
    let mut w = SafetensorsWriter::new(out, out_name, entries, metadata)?;
    for i in items {
        let t = src.entry(&i.src_key)?;
        let out_dtype = dtype.of(t.dtype);
        let float = matches!(out_dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64);
        let merged = match &i.param {
            Some((component, name, shape)) if float => {
                let values = src.read_f32(&i.src_key)?;
                let m = plan.apply(*component, name, shape, &values, layers).map_err(|e| match e {
                    Error::Invalid(m) => Error::Format { file: src.name().to_string(), tensor: Some(i.src_key.clone()), message: m },
                    other => other,
                })?;
                Some(m.map(|v| (v, true)).unwrap_or((values, false)))
            }
            _ => None,
        };
        match merged {
            Some((values, changed)) => {
                report.merged += changed as usize;
                w.write_f32(&i.out_key, &values)?;
            }
            None if out_dtype == t.dtype || !float => w.write_raw(&i.out_key, &src.read_bytes(&i.src_key)?)?,
            None => w.write_f32(&i.out_key, &src.read_f32(&i.src_key)?)?,
        }
        report.tensors += 1;
    }
    w.finish()
}

#[cfg(not(target_arch = "wasm32"))]
mod local;
#[cfg(not(target_arch = "wasm32"))]
pub use local::fuse_to_path;
