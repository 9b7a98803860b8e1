//! `loralab generate`: text to image with a Stable Diffusion 1.x/2.x model (a diffusers folder
//! or a single `.safetensors` checkpoint), writing a PNG with A1111-style `parameters` text and
//! an XMP packet (AI-generated, the software, the model's and adapters' files with SHA-256
//! hashes and licences) and, on request, the pipeline's intermediate tensors.

use loralab::io::safetensors::SafetensorsFile;
use loralab::lora::read_lora_for;
use loralab::parameters::a1111_sampler;
use loralab::model::config::PipelineConfig;
use loralab::io::xmp::{FileRecord, ModelRecord, Provenance};
use loralab::licence::Licence;
use loralab::model::checkpoint::{is_pickle_name, open_path, refuse_pickle, Checkpoint, LocalDir};
use loralab::pipeline::{GenerateOptions, StableDiffusionPipeline, StepProgress, WeightPlan};
use loralab::sampler::SamplerKind;
use loralab::{DType, Gpu, GpuOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

pub const USAGE: &str = "  loralab generate --model PATH --prompt TEXT --out IMAGE.png [options]
                                        text to image; PATH is a diffusers folder or a single
                                        .safetensors checkpoint
      --negative TEXT                   negative prompt (default: none, i.e. \"\")
      --seed N                          noise seed (default: random, printed)
      --steps N                         denoising steps (default: the model's recommended
                                        number, model_index.json `_loralab_defaults`, else 20)
      --cfg F                           guidance scale (default: the model's recommended one,
                                        else 7.5; <= 1 turns guidance off)
      --sampler NAME                    ddim|euler|euler_a|dpmpp_2m|dpmpp_2m_karras|lcm (default:
                                        the model's scheduler class where the engine has it,
                                        else euler_a)
      --width W --height H              image size in pixels (default: the model's, 512 for SD1.5)
      --weights TYPE                    f32|f16|q8_0|q4_0 storage of the layer matrices (default f32)
      --clip-skip N                     A1111 clip skip: 1 = last layer (default), 2 = penultimate
      --config DIR                      configs + tokenizer of a single-file checkpoint, from a
                                        diffusers folder (default: Stable Diffusion 1.5's)
      --init-latents FILE.safetensors   initial noise: tensor `latents` [1,4,H/8,W/8]
      --dump FILE.safetensors           write prompt_embeds, negative_prompt_embeds,
                                        latents_step_{i} and image [1,3,H,W] (f32)
      --lora FILE[:W | :TE_W:UNET_W]    apply an adapter (LoRA, LoCon, LoHa, LoKr, IA3, full,
                                        DoRA; kohya, LyCORIS, diffusers/PEFT files) unmerged at
                                        strength W (default 1), or separate text-encoder / UNet
                                        strengths; repeatable, adapters add up
      --embedding FILE                  load a textual-inversion embedding (A1111 or diffusers
                                        .safetensors); its trigger word works in the prompt;
                                        repeatable
                                        A1111 tags in the prompt, <lora:NAME:W> or
                                        <lora:NAME:TE_W:UNET_W>, set the strengths of the --lora
                                        adapter NAME (its file stem) and are removed from the text
      --plain                           no shader-f16 / subgroups
";

struct Args {
    model: PathBuf,
    config: Option<PathBuf>,
    out: PathBuf,
    dump: Option<PathBuf>,
    init_latents: Option<PathBuf>,
    weights: DType,
    clip_skip: usize,
    plain: bool,
    /// (file, text-encoder strength, UNet strength)
    loras: Vec<(PathBuf, f32, f32)>,
    embeddings: Vec<PathBuf>,
    /// The adapters' (name, strengths) after the prompt's tags, for the PNG text.
    adapters_used: Vec<(String, (f32, f32))>,
    opts: GenerateOptions,
    /// Which of `--steps`, `--cfg`, `--sampler` were given (the model's recommendations fill
    /// the others).
    given: Vec<&'static str>,
}

/// `FILE`, `FILE:W` or `FILE:TE_W:UNET_W` (numbers taken from the right, so paths with `:`
/// still work).
fn parse_lora(v: &str) -> Result<(PathBuf, f32, f32), String> {
    let num = |s: &str| s.parse::<f32>().ok().filter(|x| x.is_finite());
    let parts: Vec<&str> = v.rsplitn(3, ':').collect();
    let (file, te, unet) = match parts.as_slice() {
        [u, t, f] if num(u).is_some() && num(t).is_some() => (f.to_string(), num(t), num(u)),
        [w, rest @ ..] if num(w).is_some() && !rest.is_empty() => {
            let file = v[..v.len() - w.len() - 1].to_string();
            (file, num(w), num(w))
        }
        _ => (v.to_string(), Some(1.0), Some(1.0)),
    };
    if file.is_empty() {
        return Err(usage_err(format!("--lora {v}: needs a file name before the strengths")));
    }
    Ok((PathBuf::from(file), te.unwrap_or(1.0), unet.unwrap_or(1.0)))
}

fn usage_err(message: impl std::fmt::Display) -> String {
    format!("`loralab generate`: {message}")
}

fn parse_num<T: std::str::FromStr>(name: &str, v: &str, what: &str) -> Result<T, String> {
    v.trim().parse().map_err(|_| usage_err(format!("`{name} {v}`: expected {what}")))
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut model = None;
    let mut prompt = None;
    let mut out = None;
    let mut a = Args {
        model: PathBuf::new(),
        config: None,
        out: PathBuf::new(),
        dump: None,
        init_latents: None,
        weights: DType::F32,
        clip_skip: 1,
        plain: false,
        loras: vec![],
        embeddings: vec![],
        adapters_used: vec![],
        opts: GenerateOptions { sampler: SamplerKind::EulerAncestral, ..Default::default() },
        given: vec![],
    };
    let mut seed = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        if name == "--plain" {
            a.plain = true;
            continue;
        }
        let known = [
            "--model",
            "--prompt",
            "--negative",
            "--seed",
            "--steps",
            "--cfg",
            "--sampler",
            "--width",
            "--height",
            "--weights",
            "--clip-skip",
            "--config",
            "--init-latents",
            "--dump",
            "--out",
            "--lora",
            "--embedding",
        ];
        if !known.contains(&name) {
            return Err(usage_err(format!("unknown option `{arg}`")));
        }
        let v = match inline {
            Some(v) => v,
            None => it.next().cloned().ok_or_else(|| usage_err(format!("option `{name}` needs a value")))?,
        };
        match name {
            "--model" => model = Some(PathBuf::from(v)),
            "--prompt" => prompt = Some(v),
            "--negative" => a.opts.negative = v,
            "--seed" => seed = Some(parse_num::<u64>(name, &v, "a whole number 0..2^64")?),
            "--steps" => {
                a.given.push("steps");
                a.opts.steps = parse_num(name, &v, "a positive whole number")?;
                if a.opts.steps == 0 {
                    return Err(usage_err(format!("`--steps {v}`: expected a positive whole number")));
                }
            }
            "--cfg" => {
                a.given.push("cfg");
                a.opts.cfg = parse_num(name, &v, "a number")?;
                if !a.opts.cfg.is_finite() || a.opts.cfg < 0.0 {
                    return Err(usage_err(format!("`--cfg {v}`: expected a number >= 0")));
                }
            }
            "--sampler" => {
                a.given.push("sampler");
                a.opts.sampler = SamplerKind::parse(&v).map_err(|_| {
                    usage_err(format!(
                        "`--sampler {v}`: unknown sampler (one of ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lcm)"
                    ))
                })?
            }
            "--width" | "--height" => {
                let n: usize = parse_num(name, &v, "a positive whole number of pixels")?;
                if n == 0 {
                    return Err(usage_err(format!("`{name} {v}`: expected a positive whole number of pixels")));
                }
                if name == "--width" {
                    a.opts.width = Some(n)
                } else {
                    a.opts.height = Some(n)
                }
            }
            "--weights" => {
                a.weights = match v.to_ascii_lowercase().as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "q8_0" => DType::Q8_0,
                    "q4_0" => DType::Q4_0,
                    _ => {
                        return Err(usage_err(format!(
                            "`--weights {v}`: unknown weight type (one of f32, f16, q8_0, q4_0)"
                        )))
                    }
                }
            }
            "--clip-skip" => {
                a.clip_skip = parse_num(name, &v, "a whole number >= 1 (1 = last layer)")?;
                if a.clip_skip == 0 {
                    return Err(usage_err(format!("`--clip-skip {v}`: expected a whole number >= 1 (1 = last layer)")));
                }
            }
            "--config" => a.config = Some(PathBuf::from(v)),
            "--init-latents" => a.init_latents = Some(PathBuf::from(v)),
            "--dump" => a.dump = Some(PathBuf::from(v)),
            "--out" => out = Some(PathBuf::from(v)),
            "--lora" => a.loras.push(parse_lora(&v)?),
            "--embedding" => a.embeddings.push(PathBuf::from(v)),
            _ => unreachable!("listed above"),
        }
    }
    a.model = model
        .ok_or_else(|| usage_err("option `--model PATH` needs a value (a diffusers folder or a .safetensors file)"))?;
    a.opts.prompt = prompt.ok_or_else(|| usage_err("option `--prompt TEXT` needs a value"))?;
    a.out = out.ok_or_else(|| usage_err("option `--out IMAGE.png` needs a value"))?;
    a.opts.clip_skip = a.clip_skip - 1;
    a.opts.seed = seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        (t.as_nanos() as u64) % 4_294_967_296
    });
    Ok(a)
}

/// The model's name as A1111 writes it: the file stem or the folder name.
fn model_name(path: &Path) -> String {
    let p = if path.is_dir() { path.file_name() } else { path.file_stem() };
    p.map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

/// The model's licence (printed) and record with its weight files hashed, for the XMP packet.
pub fn model_provenance<R: loralab::io::RangeRead>(path: &Path, ck: &Checkpoint<R>) -> Result<(Licence, ModelRecord), String> {
    let folder = path.is_dir().then(|| LocalDir(path.to_path_buf()));
    let licence = loralab::provenance::model_licence(ck, folder.as_ref());
    eprintln!("licence {}", licence.line());
    let t = Instant::now();
    let record = loralab::provenance::model_record(ck, &model_name(path), &licence).map_err(|e| e.to_string())?;
    let bytes: u64 = record.files.iter().map(|f| f.bytes).sum();
    eprintln!("hashed {} model files ({:.1} MB, SHA-256) in {:.2} s", record.files.len(), bytes as f64 / 1e6, t.elapsed().as_secs_f64());
    Ok((licence, record))
}

/// A1111's `parameters` text.
fn parameters(a: &Args, width: usize, height: usize) -> String {
    let o = &a.opts;
    // A1111 keeps adapters as prompt tags.
    let prompt = loralab::parameters::prompt_with_adapters(&o.prompt, &a.adapters_used);
    let mut settings = vec![
        ("Steps", o.steps.to_string()),
        ("Sampler", a1111_sampler(o.sampler).to_string()),
        ("CFG scale", o.cfg.to_string()),
        ("Seed", o.seed.to_string()),
        ("Size", format!("{width}x{height}")),
        ("Model", model_name(&a.model)),
    ];
    if a.clip_skip > 1 {
        settings.push(("Clip skip", a.clip_skip.to_string()));
    }
    if a.weights != DType::F32 {
        settings.push(("Weights", a.weights.to_string()));
    }
    loralab::parameters::format(&prompt, &o.negative, &settings)
}

/// Reads `latents` from an `--init-latents` file, checking its shape.
fn read_init_latents(path: &Path, want: [usize; 4]) -> Result<Vec<f32>, String> {
    let name = path.display();
    let f = SafetensorsFile::open_path(path).map_err(|e| format!("--init-latents {e}"))?;
    let entry = f.get("latents").ok_or_else(|| {
        let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
        format!("--init-latents {name}: tensor `latents` is missing (the file has: {})", names.join(", "))
    })?;
    if entry.shape != want {
        return Err(format!(
            "--init-latents {name}: tensor `latents` has shape {:?} but this image size needs {want:?}",
            entry.shape
        ));
    }
    f.read_f32("latents").map_err(|e| format!("--init-latents {e}"))
}

fn write_file(option: &str, path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| format!("{option} {}: cannot write: {e}", path.display()))
}

/// Reads the `--lora` files and sets them on the pipeline; returns each file's record (hashed),
/// by the name it was opened under.
fn load_loras(
    gpu: &Gpu,
    pipe: &mut StableDiffusionPipeline,
    config: &PipelineConfig,
    loras: &[(PathBuf, f32, f32)],
) -> Result<HashMap<String, FileRecord>, String> {
    let t = Instant::now();
    let mut files = vec![];
    let mut records = HashMap::new();
    for (path, _, _) in loras {
        let name = path.display().to_string();
        if is_pickle_name(&name) {
            return Err(format!("--lora {}", refuse_pickle(&name)));
        }
        if !path.is_file() {
            return Err(format!("--lora {name}: no such file"));
        }
        let f = SafetensorsFile::open_path(path).map_err(|e| format!("--lora {e}"))?;
        let lora = read_lora_for(&f, config).map_err(|e| format!("--lora {e}"))?;
        let record = loralab::provenance::file_record(f.reader(), loralab::provenance::file_name(&name))
            .map_err(|e| format!("--lora {e}"))?;
        records.insert(lora.file.clone(), record);
        files.push(std::sync::Arc::new(lora));
    }
    let strengths = loras.iter().map(|(_, te, unet)| (*te, *unet)).collect();
    let report = pollster::block_on(pipe.set_adapters(gpu, files.clone(), strengths)).map_err(|e| format!("--lora {e}"))?;
    for ((path, te, unet), f) in loras.iter().zip(&files) {
        let algos: Vec<String> = f.algorithms.iter().map(|a| a.name().to_string()).collect();
        eprintln!(
            "adapter {} ({:?}, {}; {} layers) text encoder {te}, UNet {unet}",
            path.display(),
            f.format,
            algos.join("+"),
            f.layers.len()
        );
        eprintln!("  licence {}", f.summary(None).licence.line());
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    eprintln!(
        "adapters on {} text-encoder and {} UNet layers ({:.1} MB) in {:.2} s",
        report.text_encoder.layers,
        report.unet.layers,
        (report.text_encoder.bytes + report.unet.bytes) as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    Ok(records)
}

pub fn run(args: &[String]) -> Result<ExitCode, String> {
    let mut a = parse_args(args)?;
    let name = a.model.display().to_string();
    if is_pickle_name(&name) && !a.model.is_dir() {
        return Err(format!("--model {}", refuse_pickle(&name)));
    }
    if !a.model.exists() {
        return Err(format!("--model {}: no such file or directory", a.model.display()));
    }
    if let Some(c) = &a.config {
        if !c.is_dir() {
            return Err(format!("--config {}: not a diffusers folder (no such directory)", c.display()));
        }
    }
    if let Some(p) = &a.init_latents {
        if !p.is_file() {
            return Err(format!("--init-latents {}: no such file", p.display()));
        }
    }

    let t0 = Instant::now();
    let ck = open_path(&a.model, a.config.as_deref()).map_err(|e| e.to_string())?;
    let defaults = ck.model_index.as_ref().map(|m| m.defaults.clone()).unwrap_or_default();
    if !a.given.contains(&"steps") {
        a.opts.steps = defaults.num_inference_steps.unwrap_or(a.opts.steps);
    }
    if !a.given.contains(&"cfg") {
        a.opts.cfg = defaults.guidance_scale.unwrap_or(a.opts.cfg);
    }
    if !a.given.contains(&"sampler") {
        a.opts.sampler = loralab::eval::recommended_sampler(&ck.config.scheduler).unwrap_or(a.opts.sampler);
    }
    let gpu_opts = GpuOptions { disable_f16: a.plain, disable_subgroups: a.plain, ..Default::default() };
    let gpu = pollster::block_on(Gpu::new(gpu_opts)).map_err(|e| e.to_string())?;
    let single_default = !a.model.is_dir() && a.config.is_none();
    let config = ck.config.clone();
    let (_, model_record) = model_provenance(&a.model, &ck)?;
    let mut pipe = StableDiffusionPipeline::load(&gpu, ck, WeightPlan::new(a.weights)).map_err(|e| {
        if single_default {
            format!(
                "{e}\n(a single-file checkpoint is read with Stable Diffusion 1.5's configuration; for another \
                 model pass --config DIR, a diffusers folder with its configs and tokenizer)"
            )
        } else {
            e.to_string()
        }
    })?;
    eprintln!("loaded {} ({} weights) in {:.2} s", a.model.display(), a.weights, t0.elapsed().as_secs_f64());
    let adapter_files = if a.loras.is_empty() { HashMap::new() } else { load_loras(&gpu, &mut pipe, &config, &a.loras)? };
    for path in &a.embeddings {
        let name = path.display().to_string();
        if is_pickle_name(&name) {
            return Err(format!("--embedding {}", refuse_pickle(&name)));
        }
        let emb = loralab::model::textual_inversion::open_path(path).map_err(|e| format!("--embedding {e}"))?;
        let ids = pipe.add_embedding(&gpu, &emb).map_err(|e| format!("--embedding {e}"))?;
        eprintln!("embedding {name}: trigger word `{}` ({} vectors)", emb.token, ids.len());
    }
    // Prompt tags set adapter strengths; the PNG text keeps the prompt as written.
    let mut untagged = a.opts.clone();
    for note in pipe.apply_prompt_tags(&gpu, &mut untagged).map_err(|e| format!("--prompt {e}"))? {
        eprintln!("warning: {note}");
    }
    a.adapters_used = pipe.adapters().iter().map(|(f, s)| (f.display_name(), *s)).collect();
    let adapter_records = pipe
        .adapters()
        .iter()
        .filter(|(_, s)| s.0 != 0.0 || s.1 != 0.0)
        .map(|(f, s)| loralab::provenance::adapter_record(f, adapter_files.get(&f.file).cloned(), Some(*s)))
        .collect();
    let provenance = Provenance::new(model_record, adapter_records);

    let (dw, dh) = pipe.default_size();
    let (width, height) = (a.opts.width.unwrap_or(dw), a.opts.height.unwrap_or(dh));
    let shape = pipe.latents_shape(width, height).map_err(|e| {
        format!("--width {width} --height {height}: {}", e.to_string().trim_start_matches("invalid argument: "))
    })?;
    a.opts.width = Some(width);
    a.opts.height = Some(height);
    if let Some(p) = &a.init_latents {
        a.opts.init_latents = Some(read_init_latents(p, shape)?);
    }
    eprintln!(
        "generating {width}x{height}, {} {} steps, cfg {}, seed {}",
        a.opts.steps, a.opts.sampler, a.opts.cfg, a.opts.seed
    );
    let t1 = Instant::now();
    let mut last = Instant::now();
    let mut progress = |p: &StepProgress<'_>| {
        eprintln!("step {}/{}  t={}  {:.2} s", p.step + 1, p.steps, p.timestep, last.elapsed().as_secs_f64());
        last = Instant::now();
    };
    let run = GenerateOptions { prompt: untagged.prompt.clone(), negative: untagged.negative.clone(), ..a.opts.clone() };
    let out = pollster::block_on(pipe.generate(&gpu, &run, &mut progress)).map_err(|e| e.to_string())?;
    eprintln!("generated in {:.2} s", t1.elapsed().as_secs_f64());
    if let Some(t) = out.vae_tiling {
        let n = t.tile_latent;
        eprintln!("VAE decoded in {n}x{n}-latent tiles (overlap {}): the whole decode exceeds the adapter's binding limit", t.overlap);
    }

    let [_, _, h, w] = out.image_shape;
    let text = parameters(&a, w, h);
    let png = loralab::io::png::encode_rgb8_xmp(w, h, &out.to_rgb8(), &[("parameters", &text)], &provenance.to_xmp())
        .map_err(|e| e.to_string())?;
    write_file("--out", &a.out, &png)?;
    eprintln!("wrote {}", a.out.display());
    if let Some(d) = &a.dump {
        let bytes = out.dump_safetensors().map_err(|e| e.to_string())?;
        write_file("--dump", d, &bytes)?;
        eprintln!("wrote {}", d.display());
    }
    Ok(ExitCode::SUCCESS)
}
