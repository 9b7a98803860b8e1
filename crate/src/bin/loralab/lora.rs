//! `loralab lora inspect`: what an adapter file is (format, algorithms, ranks, alphas, layers
//! per target and block, size, storage types, metadata, trigger words) and, with a model,
//! which of its layers fit that model.

use loralab::io::LocalFile;
use loralab::lora::{match_model, open_lora, ModelLayers};
use loralab::model::checkpoint::open_path;
use loralab::model::config::PipelineConfig;
use std::path::PathBuf;
use std::process::ExitCode;

pub const USAGE: &str = "  loralab lora inspect FILE [--model PATH] [--config DIR] [--json]
                                        an adapter file (kohya, LyCORIS, PEFT/diffusers): format,
                                        algorithms, ranks, alphas, layers per block, size, dtypes,
                                        metadata, trigger words; with --model, which layers fit it
";

fn usage_err(message: impl std::fmt::Display) -> String {
    format!("`loralab lora inspect`: {message}")
}

/// Reads `path` as an adapter file with `cfg`'s block numbering for CompVis names.
pub fn read(path: &std::path::Path, cfg: &PipelineConfig) -> Result<loralab::lora::LoraFile, String> {
    let name = path.display().to_string();
    if !path.is_file() {
        return Err(format!("{name}: no such file"));
    }
    let reader = LocalFile::open(path).map_err(|e| e.to_string())?;
    open_lora(reader, &name, cfg).map_err(|e| e.to_string())
}

pub fn run(args: &[String]) -> Result<ExitCode, String> {
    match args.split_first() {
        Some((sub, rest)) if sub == "inspect" => inspect(rest),
        Some((sub, rest)) if sub == "resize" => super::lora_tools::resize(rest),
        Some((sub, rest)) if sub == "spectrum" => super::lora_tools::spectrum(rest),
        Some((sub, rest)) if sub == "params" => super::lora_tools::params(rest),
        Some((sub, _)) => Err(format!("`loralab lora {sub}`: unknown subcommand (available: inspect, resize, spectrum, params)")),
        None => Err("`loralab lora` needs a subcommand: `loralab lora inspect FILE`".to_string()),
    }
}

fn inspect(args: &[String]) -> Result<ExitCode, String> {
    let mut file = None;
    let mut model = None;
    let mut config = None;
    let mut json = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || {
            inline.clone().or_else(|| it.next().cloned()).ok_or_else(|| usage_err(format!("option `{name}` needs a value")))
        };
        match name {
            "--json" => json = true,
            "--model" => model = Some(PathBuf::from(value()?)),
            "--config" => config = Some(PathBuf::from(value()?)),
            other if other.starts_with("--") => return Err(usage_err(format!("unknown option `{other}`"))),
            path if file.is_none() => file = Some(PathBuf::from(path)),
            extra => return Err(usage_err(format!("unexpected argument `{extra}` (one FILE at a time)"))),
        }
    }
    let file = file.ok_or_else(|| usage_err("needs a FILE (an adapter .safetensors)"))?;
    let (lora, report) = match model {
        Some(m) => {
            let ck = open_path(&m, config.as_deref()).map_err(|e| format!("--model {e}"))?;
            let lora = read(&file, &ck.config)?;
            let layers = ModelLayers::from_checkpoint(&ck).map_err(|e| format!("--model {e}"))?;
            let report = match_model(&lora, &layers).map_err(|e| e.to_string())?;
            (lora, Some(report))
        }
        None => (read(&file, &PipelineConfig::sd15())?, None),
    };
    let summary = lora.summary(report);
    let text = if json {
        serde_json::to_string_pretty(&summary).map_err(|e| format!("serialising the report failed: {e}"))? + "\n"
    } else {
        summary.to_text()
    };
    super::out(&text);
    Ok(ExitCode::SUCCESS)
}
