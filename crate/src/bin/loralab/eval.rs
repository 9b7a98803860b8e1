//! `loralab eval`: generates one image per evaluation prompt with each weight type and scores
//! them with the demo-data classifier (`loralab::eval`): shape colour, background colour, shape
//! kind and count, against the quality bar.

use loralab::eval::{classify, parse_prompts, recommended_sampler, Agreement, Classification, EvalRecord, Expected, Score, Tally, BAR};
use loralab::model::checkpoint::{is_pickle_name, open_path, refuse_pickle};
use loralab::pipeline::{GenerateOptions, StableDiffusionPipeline, WeightPlan};
use loralab::sampler::SamplerKind;
use loralab::{DType, Gpu, GpuOptions};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

pub const USAGE: &str = "  loralab eval --model PATH --prompts FILE [options]
                                        one image per prompt of a JSON Lines file ({\"prompt\",
                                        \"shape\", \"color\", \"background\", \"count\"}) for each
                                        weight type, scored by the demo-data classifier: shape
                                        colour, background colour, shape kind, count
      --weights LIST                    comma-separated f32, f16, q8_0, q4_0 (default f32,q8_0,q4_0)
      --steps N                         denoising steps (default 20)
      --sampler NAME                    default: the model's scheduler class where the engine has
                                        it, else euler_a
      --cfg F                           guidance scale (default: the model's recommended one,
                                        model_index.json `_loralab_defaults`, else 7.5)
      --seed N                          seed of the first prompt; prompt i uses N + i (default 0)
      --limit N                         only the first N prompts
      --save-dir DIR                    write the images as PNG, the guesses in the file names
      --check                           exit 1 when a weight type misses the quality bar
      --json                            machine-readable report on stdout
      --plain                           no shader-f16 / subgroups
";

fn usage_err(message: impl std::fmt::Display) -> String {
    format!("`loralab eval`: {message}")
}

struct Args {
    model: PathBuf,
    prompts: PathBuf,
    weights: Vec<DType>,
    steps: usize,
    sampler: Option<SamplerKind>,
    cfg: Option<f32>,
    seed: u64,
    limit: Option<usize>,
    save_dir: Option<PathBuf>,
    check: bool,
    json: bool,
    plain: bool,
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        model: PathBuf::new(),
        prompts: PathBuf::new(),
        weights: vec![DType::F32, DType::Q8_0, DType::Q4_0],
        steps: 20,
        sampler: None,
        cfg: None,
        seed: 0,
        limit: None,
        save_dir: None,
        check: false,
        json: false,
        plain: false,
    };
    let (mut model, mut prompts) = (None, None);
    let positive = |name: &str, v: &str| {
        v.trim().parse::<usize>().ok().filter(|n| *n >= 1).ok_or_else(|| usage_err(format!("`{name} {v}`: expected a positive whole number")))
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        match name {
            "--json" => {
                a.json = true;
                continue;
            }
            "--plain" => {
                a.plain = true;
                continue;
            }
            "--check" => {
                a.check = true;
                continue;
            }
            "--model" | "--prompts" | "--weights" | "--steps" | "--sampler" | "--cfg" | "--seed" | "--limit" | "--save-dir" => {}
            _ => return Err(usage_err(format!("unknown option `{arg}`"))),
        }
        let v = match inline {
            Some(v) => v,
            None => it.next().cloned().ok_or_else(|| usage_err(format!("option `{name}` needs a value")))?,
        };
        match name {
            "--model" => model = Some(PathBuf::from(v)),
            "--prompts" => prompts = Some(PathBuf::from(v)),
            "--weights" => {
                a.weights = v
                    .split(',')
                    .map(|w| {
                        DType::parse(w.trim()).ok_or_else(|| {
                            usage_err(format!("`--weights {v}`: unknown weight type `{w}`; expected a comma-separated list of f32, f16, q8_0, q4_0"))
                        })
                    })
                    .collect::<Result<_, _>>()?
            }
            "--steps" => a.steps = positive(name, &v)?,
            "--limit" => a.limit = Some(positive(name, &v)?),
            "--sampler" => {
                a.sampler = Some(SamplerKind::parse(&v).map_err(|_| {
                    usage_err(format!("`--sampler {v}`: unknown sampler; expected a sampler name: ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lcm"))
                })?)
            }
            "--cfg" => {
                a.cfg = Some(v.trim().parse::<f32>().ok().filter(|c| c.is_finite() && *c >= 0.0).ok_or_else(|| usage_err(format!("`--cfg {v}`: expected a number >= 0")))?)
            }
            "--seed" => a.seed = v.trim().parse().map_err(|_| usage_err(format!("`--seed {v}`: expected a whole number 0..2^64")))?,
            "--save-dir" => a.save_dir = Some(PathBuf::from(v)),
            _ => unreachable!("listed above"),
        }
    }
    a.model = model.ok_or_else(|| usage_err("option `--model PATH` needs a value (a diffusers folder or a .safetensors file)"))?;
    a.prompts = prompts.ok_or_else(|| usage_err("option `--prompts FILE` needs a value (JSON Lines: prompt, shape, color, background, count)"))?;
    Ok(a)
}

#[derive(Serialize)]
struct ImageReport {
    index: usize,
    /// Line of the prompt file.
    line: usize,
    prompt: String,
    seed: u64,
    expected: Expected,
    guess: Classification,
    agreement: Agreement,
    seconds: f64,
    file: Option<String>,
}

#[derive(Serialize)]
struct Percent {
    color: f64,
    background: f64,
    shape: f64,
    count: f64,
}

#[derive(Serialize)]
struct WeightReport {
    /// `f32`, `f16`, `q8_0` or `q4_0`.
    weights: &'static str,
    load_seconds: f64,
    seconds_per_image: f64,
    score: Score,
    percent: Percent,
    meets_bar: bool,
    images: Vec<ImageReport>,
}

#[derive(Serialize)]
struct Report {
    model: String,
    prompts: String,
    images_per_weight_type: usize,
    steps: usize,
    /// Short name (`euler_a`, `dpmpp_2m`, ...).
    sampler: &'static str,
    /// Where the sampler came from: `option`, `scheduler config` or `default`.
    sampler_from: &'static str,
    cfg: f32,
    /// Where the guidance scale came from: `option`, `model` or `default`.
    cfg_from: &'static str,
    seed: u64,
    width: usize,
    height: usize,
    bar: loralab::eval::Bar,
    results: Vec<WeightReport>,
}

fn guess_name(g: &Classification) -> String {
    let color = g.color.map_or("none", |c| c.name());
    let count = if g.count > 1 { format!("{}x-", g.count) } else { String::new() };
    format!("{count}{color}-{}-on-{}", g.shape, g.background)
}

fn cell(t: &Tally) -> String {
    format!("{:5.1} % ({}/{})", t.percent(), t.correct, t.total)
}

fn format_report(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let last = r.seed + r.images_per_weight_type as u64 - 1;
    let _ = writeln!(
        o,
        "{}: {} prompts from {}, {}x{}, {} {} steps ({}), cfg {} ({}), seeds {}..={last}",
        r.model, r.images_per_weight_type, r.prompts, r.width, r.height, r.steps, r.sampler, r.sampler_from, r.cfg, r.cfg_from, r.seed
    );
    let _ = writeln!(
        o,
        "{:<8} {:<19} {:<19} {:<19} {:<19} {:>8} {:>7}  bar",
        "weights", "shape colour", "background", "shape kind", "count", "s/image", "load s"
    );
    for w in &r.results {
        let count = if w.score.count.total == 0 { "-".to_string() } else { cell(&w.score.count) };
        let _ = writeln!(
            o,
            "{:<8} {:<19} {:<19} {:<19} {:<19} {:>8.3} {:>7.2}  {}",
            w.weights,
            cell(&w.score.color),
            cell(&w.score.background),
            cell(&w.score.shape),
            count,
            w.seconds_per_image,
            w.load_seconds,
            if w.meets_bar { "met" } else { "MISSED" }
        );
    }
    let _ = writeln!(
        o,
        "bar: shape colour >= {} %, background >= {} %, shape kind >= {} %",
        BAR.color, BAR.background, BAR.shape
    );
    o
}

/// The image's file name: weight type, index, whether all three attributes agree, the guesses.
fn image_name(weights: DType, index: usize, g: &Classification, ok: bool) -> String {
    format!("{}-{index:03}-{}-{}.png", weights.name(), if ok { "ok" } else { "miss" }, guess_name(g))
}

/// Writes `rgb` as `dir/name` with the prompt and the expected attributes as PNG text, and the
/// XMP packet `xmp`.
fn save_png(dir: &Path, name: &str, rec: &EvalRecord, size: (usize, usize), rgb: &[u8], xmp: &str) -> Result<String, String> {
    let e = &rec.expected;
    let text = format!(
        "{}\nExpected: {} {} on {}{}",
        rec.prompt.as_deref().unwrap_or(""),
        e.color,
        e.shape,
        e.background,
        e.count.map(|n| format!(", count {n}")).unwrap_or_default()
    );
    let png = loralab::io::png::encode_rgb8_xmp(size.0, size.1, rgb, &[("parameters", &text)], xmp).map_err(|e| e.to_string())?;
    let path = dir.join(name);
    std::fs::write(&path, png).map_err(|e| format!("--save-dir {}: cannot write: {e}", path.display()))?;
    Ok(path.display().to_string())
}

pub fn run(args: &[String]) -> Result<ExitCode, String> {
    let a = parse_args(args)?;
    // The prompt file is checked before any model loading.
    let prompts_name = a.prompts.display().to_string();
    let text = std::fs::read_to_string(&a.prompts).map_err(|e| format!("--prompts {prompts_name}: cannot read: {e}"))?;
    let mut records = parse_prompts(&text, &prompts_name).map_err(|e| e.to_string())?;
    if let Some(n) = a.limit {
        records.truncate(n);
    }
    let name = a.model.display().to_string();
    if is_pickle_name(&name) && !a.model.is_dir() {
        return Err(format!("--model {}", refuse_pickle(&name)));
    }
    if !a.model.exists() {
        return Err(format!("--model {name}: no such file or directory"));
    }
    if let Some(d) = &a.save_dir {
        std::fs::create_dir_all(d).map_err(|e| format!("--save-dir {}: cannot create: {e}", d.display()))?;
    }

    let gpu_opts = GpuOptions { disable_f16: a.plain, disable_subgroups: a.plain, ..Default::default() };
    let gpu: Gpu = pollster::block_on(Gpu::new(gpu_opts)).map_err(|e| e.to_string())?;
    let mut report: Option<Report> = None;
    let mut xmp = None;
    for &weights in &a.weights {
        let t0 = Instant::now();
        let ck = open_path(&a.model, None).map_err(|e| e.to_string())?;
        if a.save_dir.is_some() && xmp.is_none() {
            let (_, record) = super::generate::model_provenance(&a.model, &ck)?;
            xmp = Some(loralab::io::xmp::Provenance::new(record, vec![]).to_xmp());
        }
        let recommended = recommended_sampler(&ck.config.scheduler);
        let model_cfg = ck.model_index.as_ref().and_then(|m| m.defaults.guidance_scale);
        let (cfg, cfg_from) = match (a.cfg, model_cfg) {
            (Some(c), _) => (c, "option"),
            (None, Some(c)) => (c, "model"),
            (None, None) => (7.5, "default"),
        };
        let pipe = StableDiffusionPipeline::load(&gpu, ck, WeightPlan::new(weights)).map_err(|e| e.to_string())?;
        let load_seconds = t0.elapsed().as_secs_f64();
        let (sampler, sampler_from) = match (a.sampler, recommended) {
            (Some(s), _) => (s, "option"),
            (None, Some(s)) => (s, "scheduler config"),
            (None, None) => (SamplerKind::EulerAncestral, "default"),
        };
        let (width, height) = pipe.default_size();
        eprintln!("loaded {name} ({weights} weights) in {load_seconds:.2} s; {} {sampler} steps, {width}x{height}", a.steps);
        let r = report.get_or_insert_with(|| Report {
            model: name.clone(),
            prompts: prompts_name.clone(),
            images_per_weight_type: records.len(),
            steps: a.steps,
            sampler: sampler.name(),
            sampler_from,
            cfg,
            cfg_from,
            seed: a.seed,
            width,
            height,
            bar: BAR,
            results: vec![],
        });
        let mut score = Score::default();
        let mut images = Vec::with_capacity(records.len());
        let mut total_seconds = 0.0;
        for (index, rec) in records.iter().enumerate() {
            let seed = a.seed.wrapping_add(index as u64);
            let prompt = rec.prompt.clone().unwrap_or_default();
            let opts = GenerateOptions { prompt: prompt.clone(), seed, steps: a.steps, cfg, sampler, ..Default::default() };
            let t = Instant::now();
            let out = pollster::block_on(pipe.generate(&gpu, &opts, &mut |_| {}))
                .map_err(|e| format!("{prompts_name}: line {}: {e}", rec.line))?;
            let rgb = out.to_rgb8();
            let seconds = t.elapsed().as_secs_f64();
            total_seconds += seconds;
            let [_, _, h, w] = out.image_shape;
            let guess = classify(&rgb, w, h).map_err(|e| e.to_string())?;
            let agreement = score.add(&rec.expected, &guess);
            let ok = agreement.color && agreement.background && agreement.shape;
            let file = match &a.save_dir {
                Some(d) => {
                    let name = image_name(weights, index, &guess, ok);
                    Some(save_png(d, &name, rec, (w, h), &rgb, xmp.as_deref().unwrap_or_default())?)
                }
                None => None,
            };
            eprintln!(
                "[{weights}] {}/{} seed {seed}: {:?} -> {} ({:.2} s){}",
                index + 1,
                records.len(),
                prompt,
                guess_name(&guess),
                seconds,
                if ok { "" } else { "  MISS" }
            );
            images.push(ImageReport { index, line: rec.line, prompt, seed, expected: rec.expected, guess, agreement, seconds, file });
        }
        let percent = Percent {
            color: score.color.percent(),
            background: score.background.percent(),
            shape: score.shape.percent(),
            count: score.count.percent(),
        };
        r.results.push(WeightReport {
            weights: weights.name(),
            load_seconds,
            seconds_per_image: total_seconds / records.len().max(1) as f64,
            score,
            percent,
            meets_bar: score.meets(&BAR),
            images,
        });
        // Free this weight type's buffers before the next loads.
        drop(pipe);
        gpu.trim();
    }
    let Some(report) = report else {
        return Err(usage_err("`--weights` lists no weight type"));
    };
    if a.json {
        super::out(&(super::json(&report)? + "\n"));
    } else {
        super::out(&format_report(&report));
    }
    let missed = report.results.iter().any(|w| !w.meets_bar);
    Ok(if a.check && missed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}
