//! Merging into a model on the local file system: a single `.safetensors` checkpoint written
//! back as one file with its own keys, or a diffusers folder (from a folder, or from a single
//! file together with a folder holding its configurations) with configs, tokenizer and
//! scheduler copied and the three component files written.

use super::{diffusers_keys, merge_metadata, same_keys, write_merged, FuseReport, OutputDType, Plan, Weighted};
use crate::error::{Error, Result};
use crate::io::LocalFile;
use crate::lora::ModelLayers;
use crate::model::checkpoint::{open_path, Checkpoint, Component, Layout};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::Io { file: path.display().to_string(), message: format!("{what}: {e}") }
}

/// Writes through `<path>.partial`, renamed into place once complete.
fn write_file(path: &Path, body: impl FnOnce(std::io::BufWriter<std::fs::File>) -> Result<std::io::BufWriter<std::fs::File>>) -> Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let file = std::fs::File::create(&partial).map_err(|e| io_err(&partial, "cannot create", e))?;
    let result = body(std::io::BufWriter::new(file)).and_then(|w| {
        w.into_inner().map_err(|e| io_err(&partial, "writing failed", e.into_error())).map(drop)
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, path).map_err(|e| io_err(path, "cannot move the finished file into place", e))
}

/// Whether `path` is one of the weight files of the UNet, text encoder or VAE folder.
fn is_component_weights(rel: &Path) -> bool {
    let mut parts = rel.components().map(|c| c.as_os_str().to_string_lossy().to_string());
    let (Some(dir), Some(file), None) = (parts.next(), parts.next(), parts.next()) else { return false };
    let weights = [".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json"];
    Component::ALL.iter().any(|c| c.folder() == dir) && weights.iter().any(|e| file.ends_with(e))
}

/// Copies every file of `from` into `to` except the component weight files.
fn copy_folder(from: &Path, to: &Path, rel: &Path) -> Result<()> {
    let dir = from.join(rel);
    let entries = std::fs::read_dir(&dir).map_err(|e| io_err(&dir, "cannot list", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err(&dir, "cannot list", e))?;
        let name = rel.join(entry.file_name());
        let src = from.join(&name);
        if src.is_dir() {
            std::fs::create_dir_all(to.join(&name)).map_err(|e| io_err(&to.join(&name), "cannot create", e))?;
            copy_folder(from, to, &name)?;
        } else if !is_component_weights(&name) {
            std::fs::copy(&src, to.join(&name)).map_err(|e| io_err(&src, "cannot copy", e))?;
        }
    }
    Ok(())
}

/// Merges `adapters` into the model at `model` (a diffusers folder, or a single `.safetensors`
/// checkpoint whose configuration comes from `config_dir` or else SD1.5's) and writes `out`:
/// a single-file checkpoint when it ends in `.safetensors` (the model must be a single file:
/// its keys are kept), else a diffusers folder. The adapters' names and strengths go into
/// each written file's metadata.
pub fn fuse_to_path(
    model: &Path,
    config_dir: Option<&Path>,
    adapters: &[Weighted<'_>],
    out: &Path,
    dtype: OutputDType,
) -> Result<FuseReport> {
    let ck = open_path(model, config_dir)?;
    let layers = ModelLayers::from_checkpoint(&ck)?;
    let plan = Plan::new(adapters, &layers)?;
    let mut report = FuseReport { skipped_layers: plan.skipped_layers, ..Default::default() };
    let (mkey, mvalue) = merge_metadata(adapters);
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(model, out) {
        return Err(Error::Invalid(format!("--out {} is the model itself; write to a new path", out.display())));
    }
    let single_out = out.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    let out_name = out.display().to_string();
    if single_out {
        if ck.layout != Layout::SingleFile {
            return Err(Error::Invalid(format!(
                "{}: a diffusers folder cannot be written as a single-file checkpoint here; give an output folder (a path without .safetensors)",
                model.display()
            )));
        }
        let src = ck.unet.file();
        let items = same_keys(src, &ck, None)?;
        let mut meta = src.metadata().clone();
        meta.insert(mkey, mvalue);
        write_file(out, |w| write_merged(src, &items, &plan, &layers, dtype, &meta, w, &out_name, &mut report))?;
        return Ok(report);
    }
    let configs = match (ck.layout, config_dir) {
        (Layout::Folder, _) => model.to_path_buf(),
        (Layout::SingleFile, Some(dir)) => dir.to_path_buf(),
        (Layout::SingleFile, None) => {
            return Err(Error::Invalid(format!(
                "{}: writing a single-file checkpoint as a diffusers folder needs its configuration folder (--config DIR); \
                 or give an output path ending in .safetensors",
                model.display()
            )))
        }
    };
    std::fs::create_dir_all(out).map_err(|e| io_err(out, "cannot create", e))?;
    copy_folder(&configs, out, Path::new(""))?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(mkey, mvalue);
    for c in Component::ALL {
        write_component(&ck, c, &plan, &layers, dtype, &meta, out, &mut report)?;
    }
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn write_component(
    ck: &Checkpoint<LocalFile>,
    c: Component,
    plan: &Plan<'_>,
    layers: &ModelLayers,
    dtype: OutputDType,
    meta: &BTreeMap<String, String>,
    out: &Path,
    report: &mut FuseReport,
) -> Result<()> {
    let dir = out.join(c.folder());
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, "cannot create", e))?;
    let path = dir.join(c.weight_files()[0]);
    let name = path.display().to_string();
    let src = ck.weights(c).file();
    let items = match ck.layout {
        Layout::Folder => same_keys(src, ck, Some(c))?,
        Layout::SingleFile => diffusers_keys(ck, c)?,
    };
    let mut file_meta = meta.clone();
    if ck.layout == Layout::Folder {
        for (k, v) in src.metadata() {
            file_meta.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    write_file(&path, |w| write_merged(src, &items, plan, layers, dtype, &file_meta, w, &name, report))
}
