//! `loralab lora resize | spectrum | params`: reducing an adapter's rank by SVD, the singular
//! values of its layers' ΔW, and the values each adapter algorithm trains.

use loralab::lora::params::{counts_for_model, counts_for_shape, ParamCounts, TargetSet};
use loralab::lora::resize::{resize as resize_file, ResizeMethod, ResizeOptions};
use loralab::lora::spectrum::spectrum as layer_spectrum;
use loralab::lora::{LayerAdapter, LoraFile, ModelLayers};
use loralab::model::checkpoint::open_path;
use loralab::model::config::PipelineConfig;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

pub const USAGE: &str = "  loralab lora resize FILE (--rank R | --energy F | --fro F | --cumulative F | --ratio X)
                    [--max-rank R] [--out OUT] [--dtype f16|bf16|f32] [--model PATH] [--json]
                                        reduce an adapter's rank by SVD (any format with a weight
                                        delta: LoRA, LoCon, LoHa, LoKr, full) and write a kohya LoRA;
                                        --energy keeps a fraction of Σσ² per layer, --fro / --cumulative
                                        / --ratio as kohya's sv_fro / sv_cumulative / sv_ratio; with a
                                        dynamic method --rank (or --max-rank) caps the rank; prints
                                        old/new rank, energy kept and Frobenius error per layer
  loralab lora spectrum FILE [--layer NAME] [--top K] [--json]
                                        singular values of each layer's ΔW and the energy the top K
                                        hold (default 4); with --layer, that layer's values
  loralab lora params (--shape DxK[xKHxKW] | --model PATH [--target attn|attn+ff|attn+ff+conv|unet])
                      --rank R [--json]
                                        values trained by full fine-tuning, LoRA, LoHa, LoKr and IA³
                                        for one layer or the model's UNet, and file sizes per dtype
";

/// Appends a formatted line to a String.
macro_rules! w {
    ($o:expr, $($t:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($o, $($t)*);
    }};
}

fn usage_err(cmd: &str, message: impl std::fmt::Display) -> String {
    format!("`loralab lora {cmd}`: {message}")
}

/// `--name value`, `--name=value` and flags, in order.
struct Args {
    cmd: &'static str,
    positional: Vec<String>,
    options: Vec<(String, Option<String>)>,
}

impl Args {
    fn parse(cmd: &'static str, args: &[String], with_value: &[&str], flags: &[&str]) -> Result<Self, String> {
        let mut out = Args { cmd, positional: vec![], options: vec![] };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            if flags.contains(&name.as_str()) {
                out.options.push((name, None));
            } else if with_value.contains(&name.as_str()) {
                let v = match inline {
                    Some(v) => v,
                    None => it.next().cloned().ok_or_else(|| usage_err(cmd, format!("option `{name}` needs a value")))?,
                };
                out.options.push((name, Some(v)));
            } else if name.starts_with("--") {
                return Err(usage_err(cmd, format!("unknown option `{name}`")));
            } else {
                out.positional.push(arg.clone());
            }
        }
        Ok(out)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.options.iter().rev().find(|(n, _)| n == name).and_then(|(_, v)| v.as_deref())
    }

    fn flag(&self, name: &str) -> bool {
        self.options.iter().any(|(n, _)| n == name)
    }

    fn number<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, String> {
        self.get(name)
            .map(|v| v.parse::<T>().map_err(|_| usage_err(self.cmd, format!("`{name} {v}`: expected a number"))))
            .transpose()
    }

    fn file(&self) -> Result<PathBuf, String> {
        match self.positional.as_slice() {
            [f] => Ok(PathBuf::from(f)),
            [] => Err(usage_err(self.cmd, "needs a FILE (an adapter .safetensors)")),
            [_, extra, ..] => Err(usage_err(self.cmd, format!("unexpected argument `{extra}` (one FILE at a time)"))),
        }
    }
}

fn model_layers(path: &str) -> Result<ModelLayers, String> {
    let ck = open_path(Path::new(path), None).map_err(|e| format!("--model {e}"))?;
    ModelLayers::from_checkpoint(&ck).map_err(|e| format!("--model {e}"))
}

pub fn resize(args: &[String]) -> Result<ExitCode, String> {
    let a = Args::parse(
        "resize",
        args,
        &["--rank", "--energy", "--fro", "--cumulative", "--ratio", "--max-rank", "--out", "--dtype", "--model"],
        &["--json"],
    )?;
    let file = a.file()?;
    let rank: Option<usize> = a.number("--rank")?;
    let dynamic: Vec<ResizeMethod> = [
        a.number::<f64>("--energy")?.map(ResizeMethod::Energy),
        a.number::<f64>("--fro")?.map(ResizeMethod::Fro),
        a.number::<f64>("--cumulative")?.map(ResizeMethod::Cumulative),
        a.number::<f64>("--ratio")?.map(ResizeMethod::Ratio),
    ]
    .into_iter()
    .flatten()
    .collect();
    let (method, cap) = match (rank, dynamic.as_slice()) {
        (_, [_, _, ..]) => return Err(usage_err("resize", "give one of --energy, --fro, --cumulative, --ratio")),
        (Some(r), []) => (ResizeMethod::Rank(r), None),
        (r, [m]) => (*m, r),
        (None, []) => return Err(usage_err("resize", "needs --rank R or --energy F (or --fro / --cumulative / --ratio)")),
    };
    let max_rank: Option<usize> = a.number("--max-rank")?;
    let mut opts = ResizeOptions::new(method);
    opts.max_rank = match (cap, max_rank) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    opts.set_dtype(a.get("--dtype").unwrap_or("f16")).map_err(|e| usage_err("resize", format!("--dtype: {e}")))?;
    let (lora, model) = match a.get("--model") {
        Some(m) => {
            let ck = open_path(Path::new(m), None).map_err(|e| format!("--model {e}"))?;
            let lora = super::lora::read(&file, &ck.config)?;
            (lora, Some(ModelLayers::from_checkpoint(&ck).map_err(|e| format!("--model {e}"))?))
        }
        None => (super::lora::read(&file, &PipelineConfig::sd15())?, None),
    };
    let out_path = match a.get("--out") {
        Some(o) => PathBuf::from(o),
        None => {
            let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("lora");
            let tag = match method {
                ResizeMethod::Rank(r) => format!("r{r}"),
                ResizeMethod::Energy(f) => format!("e{f}"),
                ResizeMethod::Fro(f) => format!("fro{f}"),
                ResizeMethod::Cumulative(f) => format!("cum{f}"),
                ResizeMethod::Ratio(x) => format!("ratio{x}"),
            };
            file.with_file_name(format!("{stem}-resized-{tag}.safetensors"))
        }
    };
    if out_path == file {
        return Err(usage_err("resize", "--out names the input file; choose another name"));
    }
    let t0 = Instant::now();
    let resized = resize_file(&lora, &opts, model.as_ref()).map_err(|e| e.to_string())?;
    let svd_s = t0.elapsed().as_secs_f64();
    let out_name = out_path.display().to_string();
    let f = std::fs::File::create(&out_path).map_err(|e| format!("{out_name}: cannot create: {e}"))?;
    resized.write(std::io::BufWriter::new(f), &out_name).map_err(|e| e.to_string())?;
    let bytes = std::fs::metadata(&out_path).map(|m| m.len()).unwrap_or(0);
    if a.flag("--json") {
        let v = serde_json::json!({
            "file": lora.file, "out": out_name, "method": method.describe(), "max_rank": opts.max_rank,
            "seconds": svd_s, "bytes": bytes, "report": resized,
        });
        super::out(&(super::json(&v)? + "\n"));
        return Ok(ExitCode::SUCCESS);
    }
    let mut o = String::new();
    w!(o, "{}: {} layers, {} → {}", lora.file, resized.layers.len(), method.describe(), out_name);
    w!(o, "{:<72} {:>6} {:>8} {:>8} {:>9} {:>11}", "layer", "algo", "old rank", "new rank", "energy", "Frob. error");
    for l in &resized.layers {
        let old = l.old_rank.map_or("full".to_string(), |r| r.to_string());
        w!(o, "{:<72} {:>6} {:>8} {:>8} {:>8.4}% {:>11.3e}", l.name, l.algorithm, old, l.new_rank, l.energy * 100.0, l.error);
    }
    let total_e: f64 = resized.layers.iter().map(|l| l.error * l.error).sum::<f64>().sqrt();
    let mean_energy = resized.layers.iter().map(|l| l.energy).sum::<f64>() / resized.layers.len().max(1) as f64;
    w!(
        o,
        "total: {} → {} values ({:.1}% of the input's), mean energy kept {:.3}%, total Frobenius error {:.3e}, {} written, {:.2} s",
        resized.old_params,
        resized.new_params,
        100.0 * resized.new_params as f64 / resized.old_params.max(1) as f64,
        mean_energy * 100.0,
        total_e,
        super::mib(bytes),
        svd_s
    );
    for wmsg in &resized.warnings {
        w!(o, "warning: {wmsg}");
    }
    super::out(&o);
    Ok(ExitCode::SUCCESS)
}

/// The layer `name` names: our module path, the key as written, or the kohya key.
pub fn find_layer<'a>(lora: &'a LoraFile, name: &str) -> Result<&'a LayerAdapter, String> {
    let kohya = |l: &LayerAdapter| loralab::lora::resize::kohya_key(l.target, &l.module);
    lora.layers.iter().find(|l| l.module == name || l.key == name || kohya(l) == name).ok_or_else(|| {
        let examples: Vec<String> = lora.layers.iter().take(3).map(|l| format!("`{}`", l.module)).collect();
        format!("{}: no layer `{name}` (layers are named like {})", lora.file, examples.join(", "))
    })
}

pub fn spectrum(args: &[String]) -> Result<ExitCode, String> {
    let a = Args::parse("spectrum", args, &["--layer", "--top"], &["--json"])?;
    let file = a.file()?;
    let top: usize = a.number("--top")?.unwrap_or(4);
    let lora = super::lora::read(&file, &PipelineConfig::sd15())?;
    let layers: Vec<&LayerAdapter> = match a.get("--layer") {
        Some(name) => vec![find_layer(&lora, name)?],
        None => lora.layers.iter().collect(),
    };
    let single = a.get("--layer").is_some();
    let mut rows = vec![];
    for l in layers {
        let named = |e: loralab::Error| match e {
            loralab::Error::Format { tensor, message, .. } => loralab::Error::Format { file: lora.file.clone(), tensor, message },
            other => other,
        };
        match layer_spectrum(l, None).map_err(named) {
            Ok(s) => rows.push((l, Some(s), None)),
            Err(e) if single => return Err(e.to_string()),
            Err(e) => rows.push((l, None, Some(e.to_string()))),
        }
    }
    if a.flag("--json") {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(l, s, e)| serde_json::json!({ "layer": l.module, "key": l.key, "algorithm": l.delta.algorithm().name(), "spectrum": s, "error": e }))
            .collect();
        super::out(&(super::json(&v)? + "\n"));
        return Ok(ExitCode::SUCCESS);
    }
    let mut o = String::new();
    if single {
        if let Some((l, Some(s), _)) = rows.first() {
            w!(o, "{} ({}, shape {:?}, rank {})", l.module, l.delta.algorithm().name(), s.shape, s.rank.map_or("full".into(), |r| r.to_string()));
            w!(o, "{:>4} {:>14} {:>10}", "i", "σ", "energy");
            for (i, (sv, e)) in s.singular.iter().zip(&s.energy).enumerate().take(if a.get("--top").is_some() { top } else { usize::MAX }) {
                w!(o, "{:>4} {:>14.6e} {:>9.4}%", i + 1, sv, e * 100.0);
            }
        }
    } else {
        w!(o, "{}: singular values of each layer's ΔW; energy = share of Σσ² in the top {top}", lora.file);
        w!(o, "{:<72} {:>6} {:>5} {:>12} {:>9} {:>6} {:>6}", "layer", "algo", "rank", "σ1", "energy", "k 90%", "k 99%");
        for (l, s, e) in &rows {
            match s {
                Some(s) => {
                    let k = |f: f64| s.energy.iter().position(|&e| e >= f - 1e-12).map_or(s.energy.len(), |i| i + 1);
                    let e_top = s.energy.get(top.min(s.energy.len()).saturating_sub(1)).copied().unwrap_or(1.0);
                    w!(
                        o,
                        "{:<72} {:>6} {:>5} {:>12.4e} {:>8.3}% {:>6} {:>6}",
                        l.module,
                        l.delta.algorithm().name(),
                        s.rank.map_or("full".into(), |r| r.to_string()),
                        s.singular.first().copied().unwrap_or(0.0),
                        e_top * 100.0,
                        k(0.9),
                        k(0.99)
                    );
                }
                None => w!(o, "{:<72} {:>6}  {}", l.module, l.delta.algorithm().name(), e.as_deref().unwrap_or("")),
            }
        }
    }
    super::out(&o);
    Ok(ExitCode::SUCCESS)
}

fn parse_shape(s: &str) -> Result<Vec<usize>, String> {
    let dims: Result<Vec<usize>, _> = s.split(['x', 'X', ',']).map(|d| d.trim().parse::<usize>()).collect();
    match dims {
        Ok(d) if d.len() == 2 || d.len() == 4 => Ok(d),
        _ => Err(usage_err("params", format!("`--shape {s}`: expected DxK (a linear layer) or OUTxINxKHxKW (a convolution)"))),
    }
}

pub fn params(args: &[String]) -> Result<ExitCode, String> {
    let a = Args::parse("params", args, &["--shape", "--rank", "--model", "--target"], &["--json"])?;
    if let Some(extra) = a.positional.first() {
        return Err(usage_err("params", format!("unexpected argument `{extra}`")));
    }
    let rank: usize = a.number("--rank")?.ok_or_else(|| usage_err("params", "needs --rank R"))?;
    let (what, counts): (String, ParamCounts) = match (a.get("--shape"), a.get("--model")) {
        (Some(s), None) => {
            let shape = parse_shape(s)?;
            (format!("a {} layer", s), counts_for_shape(&shape, rank).map_err(|e| usage_err("params", e))?)
        }
        (None, Some(m)) => {
            let target = a.get("--target").unwrap_or("attn+ff");
            let t = TargetSet::parse(target).map_err(|e| usage_err("params", e))?;
            let layers = model_layers(m)?;
            (format!("{m}: UNet {target} layers"), counts_for_model(&layers, t, rank).map_err(|e| format!("{m}: {e}"))?)
        }
        _ => return Err(usage_err("params", "give either --shape DxK or --model PATH")),
    };
    if a.flag("--json") {
        super::out(&(super::json(&counts)? + "\n"));
        return Ok(ExitCode::SUCCESS);
    }
    let mut o = String::new();
    w!(o, "{what} ({} layer{}), rank {rank}", counts.layers, if counts.layers == 1 { "" } else { "s" });
    w!(o, "{:<6} {:>16} {:>12} {:>12} {:>12}", "", "trained values", "f32", "f16", "bf16");
    let v = &counts.values;
    let b = &counts.bytes;
    for (name, n, f32b, f16b, bf16b) in [
        ("full", v.full, b.f32.full, b.f16.full, b.bf16.full),
        ("LoRA", v.lora, b.f32.lora, b.f16.lora, b.bf16.lora),
        ("LoHa", v.loha, b.f32.loha, b.f16.loha, b.bf16.loha),
        ("LoKr", v.lokr, b.f32.lokr, b.f16.lokr, b.bf16.lokr),
        ("IA3", v.ia3, b.f32.ia3, b.f16.ia3, b.bf16.ia3),
    ] {
        w!(o, "{name:<6} {n:>16} {:>12} {:>12} {:>12}", super::mib(f32b), super::mib(f16b), super::mib(bf16b));
    }
    w!(o, "LoRA trains {:.1}× fewer values than full fine-tuning ({} alpha scalars not counted as trained)", counts.lora_ratio, counts.alphas);
    super::out(&o);
    Ok(ExitCode::SUCCESS)
}
