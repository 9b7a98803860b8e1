//! `loralab merge`: adapters fused into a model's weights on the CPU, one tensor at a time,
//! written as a diffusers folder or a single-file checkpoint.

use loralab::lora::fuse::{fuse_to_path, OutputDType, Weighted};
use loralab::lora::{match_model, ModelLayers};
use loralab::model::checkpoint::{is_pickle_name, open_path, refuse_pickle};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

pub const USAGE: &str = "  loralab merge --model PATH --lora FILE[:W]... --out PATH [--weights f16|f32] [--config DIR]
                                        fuse adapters at strengths W (default 1) into the model on
                                        the CPU; OUT ending in .safetensors: a single-file checkpoint
                                        with the input's CompVis names (single-file input), else a
                                        diffusers folder (configs, tokenizer, scheduler copied);
                                        --weights: storage of float tensors (default: as stored);
                                        --config: configs of a single-file model (for a folder OUT)
";

fn usage_err(message: impl std::fmt::Display) -> String {
    format!("`loralab merge`: {message}")
}

/// `FILE[:W]`: the strength is the text after the last `:` when it reads as a number (so
/// paths with colons still work).
fn parse_lora(v: &str) -> Result<(PathBuf, f32), String> {
    if let Some((path, w)) = v.rsplit_once(':') {
        if let Ok(s) = w.trim().parse::<f32>() {
            if !s.is_finite() {
                return Err(usage_err(format!("`--lora {v}`: expected a finite strength")));
            }
            return Ok((PathBuf::from(path), s));
        }
    }
    Ok((PathBuf::from(v), 1.0))
}

pub fn run(args: &[String]) -> Result<ExitCode, String> {
    let (mut model, mut out, mut config) = (None, None, None);
    let mut loras = Vec::new();
    let mut dtype = OutputDType::Keep;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        if !["--model", "--lora", "--out", "--weights", "--config"].contains(&name) {
            return Err(usage_err(format!("unknown option `{arg}`")));
        }
        let v = match inline {
            Some(v) => v,
            None => it.next().cloned().ok_or_else(|| usage_err(format!("option `{name}` needs a value")))?,
        };
        match name {
            "--model" => model = Some(PathBuf::from(v)),
            "--out" => out = Some(PathBuf::from(v)),
            "--config" => config = Some(PathBuf::from(v)),
            "--lora" => loras.push(parse_lora(&v)?),
            _ => {
                dtype = match v.to_ascii_lowercase().as_str() {
                    "f16" => OutputDType::F16,
                    "f32" => OutputDType::F32,
                    _ => return Err(usage_err(format!("`--weights {v}`: unknown weight type (one of f16, f32)"))),
                }
            }
        }
    }
    let model = model.ok_or_else(|| usage_err("option `--model PATH` needs a value (a diffusers folder or a .safetensors file)"))?;
    let out = out.ok_or_else(|| usage_err("option `--out PATH` needs a value (a folder, or a file ending in .safetensors)"))?;
    if loras.is_empty() {
        return Err(usage_err("option `--lora FILE[:W]` needs a value (give at least one adapter)"));
    }
    let name = model.display().to_string();
    if is_pickle_name(&name) && !model.is_dir() {
        return Err(format!("--model {}", refuse_pickle(&name)));
    }
    let t = Instant::now();
    let ck = open_path(&model, config.as_deref()).map_err(|e| format!("--model {e}"))?;
    let layers = ModelLayers::from_checkpoint(&ck).map_err(|e| format!("--model {e}"))?;
    let mut files = Vec::new();
    for (path, strength) in &loras {
        let f = super::lora::read(path, &ck.config).map_err(|e| format!("--lora {e}"))?;
        let report = match_model(&f, &layers).map_err(|e| format!("--lora {e}"))?;
        for w in f.warnings.iter().chain(&report.warning) {
            eprintln!("warning: {}: {w}", path.display());
        }
        eprintln!(
            "adapter {} ({}, {}): {} of {} layers at strength {strength}",
            path.display(),
            f.format.name(),
            f.algorithms.iter().map(|a| a.name()).collect::<Vec<_>>().join("+"),
            report.matched,
            report.total
        );
        files.push((f, *strength));
    }
    drop(ck);
    let weighted: Vec<Weighted> = files.iter().map(|(f, s)| Weighted { file: f, strength: *s }).collect();
    let report = fuse_to_path(&model, config.as_deref(), &weighted, &out, dtype).map_err(|e| e.to_string())?;
    super::out(&format!(
        "wrote {}: {} tensors, {} changed by {} adapter(s), in {:.1} s\n",
        out.display(),
        report.tensors,
        report.merged,
        weighted.len(),
        t.elapsed().as_secs_f64()
    ));
    Ok(ExitCode::SUCCESS)
}
