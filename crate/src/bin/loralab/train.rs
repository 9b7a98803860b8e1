//! `loralab train`: trains a LoRA on a folder of images (kohya's layout) and writes it as a
//! kohya `.safetensors`, with resumable checkpoints, progress samples and a progress bar.

use loralab::model::checkpoint::{is_pickle_name, open_path, refuse_pickle, LocalDir};
use loralab::model::config::SampleSize;
use loralab::pipeline::WeightPlan;
use loralab::sampler::SamplerKind;
use loralab::train::data::{with_trigger, Dataset, DatasetOptions};
use loralab::train::export::{model_hashes, ExportDtype, TrainingRecord};
use loralab::train::trainer::{
    format_duration, without_trigger, SampleImage, SampleSettings, StepReport, Throughput, TrainConfig, Trainer, SCHEDULES,
};
use loralab::{DType, Gpu, GpuOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub const USAGE: &str = "  loralab train --model PATH --images DIR --trigger WORD --out FILE.safetensors [options]
                                        train a LoRA on the images in DIR (kohya layout: NAME.png +
                                        NAME.txt captions, optional N_words/ folders for repeats)
      --class WORD                      class word; captionless images get `TRIGGER CLASS`
      --reg-images DIR                  regularization (class) images: prior preservation
      --prior-weight F                  their loss weight (default 1)
      --rank R --alpha A                adapter rank and alpha (default 16, 8)
      --targets attn|attn+ff|attn+ff+conv
                                        layers adapted (default attn)
      --conv-rank R --conv-alpha A      3x3 convolutions with attn+ff+conv (default 8, 4)
      --lr F                            learning rate (default 1e-4)
      --te-lr F                         also train the text encoder's LoRA at this rate
                                        (default: the UNet only)
      --trigger-lr F                    also learn the trigger word's own embedding at this
                                        rate (pivotal tuning): bundled in the LoRA file
                                        (A1111 `bundle_emb`) and written as TRIGGER.safetensors
                                        beside it (a textual-inversion file)
      --steps N                         optimizer steps (default 1000)
      --batch N --grad-accum N          images per micro-batch, micro-batches per step (1, 1)
      --schedule NAME                   constant|constant_with_warmup|linear|cosine|
                                        cosine_with_restarts (default constant)
      --warmup N --cycles N             warm-up steps (0); cosine_with_restarts cycles (1)
      --max-grad-norm F                 gradient-norm clipping (default 1; 0 = off)
      --weight-decay F                  AdamW weight decay (default 0.01)
      --resolution N                    training image side (default: the model's, 512 for SD1.5)
      --flip                            mirror images left-right at random
      --repeats N                       repeats of images outside N_words/ folders (default 1)
      --weights f32|f16|q8_0|q4_0       storage of the frozen model (default f32)
      --checkpointing                   gradient checkpointing: less memory, slower steps
      --clip-skip N                     A1111 clip skip of the captions (1 = last layer)
      --seed N                          seed of everything random (default 0)
      --save-every N                    every N steps write FILE-state.safetensors (for --resume)
                                        and FILE-stepN.safetensors (default 0: at the end only)
      --resume FILE                     continue from a state file (same settings and images)
      --sample-every N                  every N steps and at the end, PNGs next to the output
                                        with and without the trigger word
      --sample-prompt TEXT              sample prompt, repeatable (default: the first caption)
      --sample-steps N --sample-cfg F --sample-seed N
                                        sampling (default: the model's steps and guidance, seed 0)
      --export-dtype f32|f16|bf16       tensor type of the written LoRA (default f16)
      --config DIR                      configs + tokenizer of a single-file checkpoint
      --plain                           no shader-f16 / subgroups
";

fn usage_err(message: impl std::fmt::Display) -> String {
    format!("`loralab train`: {message}")
}

fn num<T: std::str::FromStr>(name: &str, v: &str, what: &str) -> Result<T, String> {
    v.trim().parse().map_err(|_| usage_err(format!("`{name} {v}`: expected {what}")))
}

fn positive(name: &str, v: &str) -> Result<u64, String> {
    num::<u64>(name, v, "a positive whole number").and_then(|n| {
        if n == 0 {
            Err(usage_err(format!("`{name} {v}`: expected a positive whole number")))
        } else {
            Ok(n)
        }
    })
}

fn real(name: &str, v: &str, min: f64) -> Result<f64, String> {
    let x: f64 = num(name, v, &format!("a number >= {min}"))?;
    if !x.is_finite() || x < min {
        return Err(usage_err(format!("`{name} {v}`: expected a number >= {min}")));
    }
    Ok(x)
}

/// Options that take a value.
const KNOWN: [&str; 40] = [
    "--te-lr", "--trigger-lr", "--model", "--config", "--images", "--reg-images", "--trigger", "--class", "--out", "--resume", "--prior-weight",
    "--rank", "--alpha", "--conv-rank", "--conv-alpha", "--targets", "--lr", "--steps", "--batch", "--grad-accum",
    "--schedule", "--warmup", "--cycles", "--max-grad-norm", "--weight-decay", "--clip-skip", "--seed", "--resolution",
    "--repeats", "--weights", "--save-every", "--sample-every", "--sample-prompt", "--sample-steps", "--sample-cfg",
    "--sample-seed", "--export-dtype", "--flip", "--checkpointing", "--plain",
];

/// The option of each [`TrainConfig`] field, for its validation messages.
const FLAGS: [(&str, &str); 19] = [
    ("te_lr", "--te-lr"),
    ("trigger_lr", "--trigger-lr"),
    ("targets", "--targets"),
    ("rank", "--rank"),
    ("alpha", "--alpha"),
    ("conv_rank", "--conv-rank"),
    ("conv_alpha", "--conv-alpha"),
    ("lr", "--lr"),
    ("schedule", "--schedule"),
    ("warmup_steps", "--warmup"),
    ("cycles", "--cycles"),
    ("steps", "--steps"),
    ("batch", "--batch"),
    ("grad_accum", "--grad-accum"),
    ("weight_decay", "--weight-decay"),
    ("max_grad_norm", "--max-grad-norm"),
    ("prior_weight", "--prior-weight"),
    ("seed", "--seed"),
    ("clip_skip", "--clip-skip"),
];

/// A [`TrainConfig`] message with the command line's option names.
fn with_flags(message: &str) -> String {
    let mut m = message.to_string();
    for (field, flag) in FLAGS {
        m = m.replace(&format!("training setting `{field}`"), &format!("`{flag}`"));
    }
    m
}

struct Args {
    model: PathBuf,
    config_dir: Option<PathBuf>,
    images: PathBuf,
    reg_images: Option<PathBuf>,
    trigger: String,
    class: String,
    out: PathBuf,
    resume: Option<PathBuf>,
    train: TrainConfig,
    resolution: Option<u32>,
    flip: bool,
    repeats: u32,
    weights: DType,
    save_every: u64,
    sample_every: u64,
    sample_prompts: Vec<String>,
    sample_steps: Option<usize>,
    sample_cfg: Option<f32>,
    sample_seed: u64,
    export_dtype: ExportDtype,
    plain: bool,
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        model: PathBuf::new(),
        config_dir: None,
        images: PathBuf::new(),
        reg_images: None,
        trigger: String::new(),
        class: String::new(),
        out: PathBuf::new(),
        resume: None,
        train: TrainConfig::default(),
        resolution: None,
        flip: false,
        repeats: 1,
        weights: DType::F32,
        save_every: 0,
        sample_every: 0,
        sample_prompts: vec![],
        sample_steps: None,
        sample_cfg: None,
        sample_seed: 0,
        export_dtype: ExportDtype::F16,
        plain: false,
    };
    let (mut model, mut images, mut trigger, mut out) = (None, None, None, None);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        match name {
            "--flip" => {
                a.flip = true;
                continue;
            }
            "--checkpointing" => {
                a.train.checkpointing = true;
                continue;
            }
            "--plain" => {
                a.plain = true;
                continue;
            }
            _ => {}
        }
        if !KNOWN.contains(&name) {
            return Err(usage_err(format!("unknown option `{arg}` (see `loralab help`)")));
        }
        let v = match inline {
            Some(v) => v,
            None => it.next().cloned().ok_or_else(|| usage_err(format!("option `{name}` needs a value")))?,
        };
        let t = &mut a.train;
        match name {
            "--model" => model = Some(PathBuf::from(v)),
            "--config" => a.config_dir = Some(PathBuf::from(v)),
            "--images" => images = Some(PathBuf::from(v)),
            "--reg-images" => a.reg_images = Some(PathBuf::from(v)),
            "--trigger" => trigger = Some(v),
            "--class" => a.class = v,
            "--out" => out = Some(PathBuf::from(v)),
            "--resume" => a.resume = Some(PathBuf::from(v)),
            "--prior-weight" => t.prior_weight = real(name, &v, 0.0)? as f32,
            "--rank" => t.rank = positive(name, &v)? as usize,
            "--alpha" => t.alpha = real(name, &v, 0.0)? as f32,
            "--conv-rank" => t.conv_rank = positive(name, &v)? as usize,
            "--conv-alpha" => t.conv_alpha = real(name, &v, 0.0)? as f32,
            "--targets" => {
                loralab::model::backward::Targets::from_name(&v)
                    .map_err(|_| usage_err(format!("`--targets {v}`: expected a target set: attn, attn+ff or attn+ff+conv")))?;
                t.targets = v;
            }
            "--lr" => t.lr = real(name, &v, 0.0)?,
            "--te-lr" => t.te_lr = Some(real(name, &v, 0.0)?),
            "--trigger-lr" => t.trigger_lr = Some(real(name, &v, 0.0)?),
            "--steps" => t.steps = positive(name, &v)?,
            "--batch" => t.batch = positive(name, &v)? as usize,
            "--grad-accum" => t.grad_accum = positive(name, &v)? as usize,
            "--schedule" => {
                if !SCHEDULES.contains(&v.as_str()) {
                    return Err(usage_err(format!("`--schedule {v}`: expected a schedule: {}", SCHEDULES.join(", "))));
                }
                t.schedule = v;
            }
            "--warmup" => t.warmup_steps = num(name, &v, "a whole number of steps")?,
            "--cycles" => t.cycles = positive(name, &v)?,
            "--max-grad-norm" => t.max_grad_norm = real(name, &v, 0.0)? as f32,
            "--weight-decay" => t.weight_decay = real(name, &v, 0.0)?,
            "--clip-skip" => t.clip_skip = (positive(name, &v)? - 1) as usize,
            "--seed" => t.seed = num(name, &v, "a whole number 0..2^64")?,
            "--resolution" => a.resolution = Some(positive(name, &v)?.min(u32::MAX as u64) as u32),
            "--repeats" => a.repeats = positive(name, &v)?.min(u32::MAX as u64) as u32,
            "--weights" => {
                a.weights = DType::parse(&v.to_ascii_lowercase())
                    .ok_or_else(|| usage_err(format!("`--weights {v}`: expected a weight type: f32, f16, q8_0 or q4_0")))?
            }
            "--save-every" => a.save_every = num(name, &v, "a whole number of steps")?,
            "--sample-every" => a.sample_every = num(name, &v, "a whole number of steps")?,
            "--sample-prompt" => a.sample_prompts.push(v),
            "--sample-steps" => a.sample_steps = Some(positive(name, &v)? as usize),
            "--sample-cfg" => a.sample_cfg = Some(real(name, &v, 0.0)? as f32),
            "--sample-seed" => a.sample_seed = num(name, &v, "a whole number 0..2^64")?,
            "--export-dtype" => {
                a.export_dtype = match v.to_ascii_lowercase().as_str() {
                    "f32" => ExportDtype::F32,
                    "f16" => ExportDtype::F16,
                    "bf16" => ExportDtype::Bf16,
                    _ => return Err(usage_err(format!("`--export-dtype {v}`: expected a tensor type: f32, f16 or bf16"))),
                }
            }
            _ => return Err(usage_err(format!("unknown option `{arg}` (see `loralab help`)"))),
        }
    }
    a.model = model.ok_or_else(|| usage_err("option `--model PATH` needs a value (a diffusers folder or a .safetensors file)"))?;
    a.images = images.ok_or_else(|| usage_err("option `--images DIR` needs a value (a folder of training images)"))?;
    a.trigger = trigger.ok_or_else(|| usage_err("option `--trigger WORD` needs a value (the word that calls up the concept)"))?;
    a.out = out.ok_or_else(|| usage_err("option `--out FILE.safetensors` needs a value"))?;
    if a.trigger.trim().is_empty() || a.trigger.contains(',') {
        return Err(usage_err(format!("`--trigger {}`: expected a word (no commas)", a.trigger)));
    }
    if a.out.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Err(usage_err(format!("`--out {}`: expected a file name ending in .safetensors", a.out.display())));
    }
    a.train.validate().map_err(|e| usage_err(with_flags(&e.to_string())))?;
    let out_stem = a.out.file_stem().map(|s| s.to_string_lossy().to_lowercase());
    if a.train.trigger_lr.is_some() && out_stem.as_deref() == Some(a.trigger.trim().to_lowercase().as_str()) {
        return Err(usage_err(format!(
            "`--out {}`: with --trigger-lr the learned embedding is written as {}.safetensors; give the LoRA another name",
            a.out.display(),
            a.trigger.trim()
        )));
    }
    Ok(a)
}

/// `dir/stem` of the output, for the files written beside it.
fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "lora".into());
    out.with_file_name(format!("{stem}{suffix}"))
}

/// Writes through a temporary file and a rename, so an interrupted write leaves the old file.
fn write_file(option: &str, path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| format!("{option} {}: cannot write: {e}", path.display()))
}

fn read_dataset(flag: &str, dir: &Path, opts: DatasetOptions) -> Result<Dataset, String> {
    if !dir.is_dir() {
        return Err(format!("{flag} {}: no such folder", dir.display()));
    }
    let ds = Dataset::from_dir(dir, opts).map_err(|e| format!("{flag} {}: {e}", dir.display()))?;
    for w in &ds.warnings {
        eprintln!("warning: {flag} {}: {w}", dir.display());
    }
    Ok(ds)
}

/// SHA-256 of the listing `"<sha256>  <path>\n"` of every image and caption file under `dir`
/// (paths relative to it, `/`-separated, sorted): what `sha256sum` prints for the files, and
/// the same digest the web app records for a dataset.
fn dataset_sha256(flag: &str, dir: &Path) -> Result<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(root, &path, out)?;
                continue;
            }
            let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
            if !matches!(ext.as_str(), "png" | "jpg" | "jpeg" | "jpe" | "jfif" | "webp" | "txt" | "caption") {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let name = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
            let bytes = std::fs::read(&path)?;
            let digest = loralab::provenance::sha256_hex(&bytes[..]).map_err(|e| std::io::Error::other(e.to_string()))?;
            out.push((name, digest));
        }
        Ok(())
    }
    let mut listing = vec![];
    walk(dir, dir, &mut listing).map_err(|e| format!("{flag} {}: cannot read: {e}", dir.display()))?;
    listing.sort();
    let text: String = listing.iter().map(|(name, sha)| format!("{sha}  {name}\n")).collect();
    loralab::provenance::sha256_hex(text.as_bytes()).map_err(|e| e.to_string())
}

fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The progress line: step, bar, loss, learning rate, speed, time left.
fn progress_line(r: &StepReport, total: u64, speed: &Throughput) -> String {
    const WIDTH: usize = 24;
    let filled = (r.step as usize * WIDTH) / total.max(1) as usize;
    let bar: String = (0..WIDTH).map(|i| if i < filled { '#' } else { '.' }).collect();
    let rate = speed.rate().map_or("? it/s".to_string(), |r| if r >= 1.0 { format!("{r:.2} it/s") } else { format!("{:.2} s/it", 1.0 / r) });
    let eta = speed.eta(total).map_or("?".into(), format_duration);
    format!(
        "step {}/{total} [{bar}] loss {:.4} (avg {:.4}) lr {:.2e} {rate} ETA {eta}",
        r.step, r.loss, r.loss_avg, r.lr
    )
}

fn save_samples(gpu: &Gpu, trainer: &mut Trainer, out: &Path) -> Result<(), String> {
    let t = Instant::now();
    let images: Vec<SampleImage> = pollster::block_on(trainer.samples(gpu)).map_err(|e| format!("sampling: {e}"))?;
    for (i, s) in images.iter().enumerate() {
        let kind = if i % 2 == 0 { "trigger" } else { "no-trigger" };
        let path = sibling(out, &format!("-step{:06}-sample{}-{kind}.png", s.step, i / 2));
        let text = format!("{}\nSteps: training step {}", s.prompt, s.step);
        let png = loralab::io::png::encode_rgb8(s.width, s.height, &s.rgb, &[("parameters", &text)]).map_err(|e| e.to_string())?;
        write_file("--sample-every", &path, &png)?;
    }
    eprintln!("\nwrote {} samples in {:.1} s", images.len(), t.elapsed().as_secs_f64());
    Ok(())
}

pub fn run(args: &[String]) -> Result<ExitCode, String> {
    let a = parse_args(args)?;
    let model_name = a.model.display().to_string();
    if is_pickle_name(&model_name) && !a.model.is_dir() {
        return Err(format!("--model {}", refuse_pickle(&model_name)));
    }
    if !a.model.exists() {
        return Err(format!("--model {model_name}: no such file or directory"));
    }
    if let Some(p) = a.resume.as_ref().filter(|p| !p.is_file()) {
        return Err(format!("--resume {}: no such file", p.display()));
    }
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty() && !d.is_dir()) {
        return Err(format!("--out {}: the folder {} does not exist", a.out.display(), dir.display()));
    }
    let started = now_unix();
    let t0 = Instant::now();
    let ck = open_path(&a.model, a.config_dir.as_deref()).map_err(|e| format!("--model {e}"))?;
    let f = 1usize << (ck.config.vae.levels().saturating_sub(1));
    let resolution = a.resolution.unwrap_or(match &ck.config.unet.sample_size {
        Some(SampleSize::Square(s)) => (s * f) as u32,
        Some(SampleSize::HeightWidth([h, w])) => ((*h).min(*w) * f) as u32,
        None => 512,
    });
    let opts = DatasetOptions { flip: a.flip, default_repeats: a.repeats, ..DatasetOptions::new(resolution, &a.trigger, &a.class) };
    let train = read_dataset("--images", &a.images, opts)?;
    let reg = match &a.reg_images {
        Some(dir) => {
            let o = DatasetOptions { flip: a.flip, ..DatasetOptions::regularization(resolution, &a.class) };
            Some(read_dataset("--reg-images", dir, o)?)
        }
        None => None,
    };
    let defaults = ck.model_index.as_ref().map(|m| m.defaults.clone()).unwrap_or_default();
    let mut prompts = vec![];
    if a.sample_every > 0 {
        let base = if a.sample_prompts.is_empty() {
            train.items.first().map(|i| vec![i.caption.clone()]).unwrap_or_default()
        } else {
            a.sample_prompts.clone()
        };
        for p in base {
            prompts.push(with_trigger(&p, &a.trigger));
            prompts.push(without_trigger(&p, &a.trigger));
        }
    }
    let samples = SampleSettings {
        prompts,
        steps: a.sample_steps.or(defaults.num_inference_steps).unwrap_or(20),
        cfg: a.sample_cfg.or(defaults.guidance_scale).unwrap_or(7.5),
        sampler: loralab::eval::recommended_sampler(&ck.config.scheduler).unwrap_or(SamplerKind::EulerAncestral),
        seed: a.sample_seed,
        ..SampleSettings::default()
    };
    if let Some(w) = a.train.steps_warning(train.num_train_images()) {
        eprintln!("warning: {w}");
    }
    let gpu_opts = GpuOptions { disable_f16: a.plain, disable_subgroups: a.plain, ..Default::default() };
    let gpu = pollster::block_on(Gpu::new(gpu_opts)).map_err(|e| e.to_string())?;
    let n_images = (train.len(), reg.as_ref().map_or(0, |r| r.len()));
    let mut trainer = pollster::block_on(Trainer::new(&gpu, &ck, WeightPlan::new(a.weights), train, reg, a.train.clone(), samples))
        .map_err(|e| e.to_string())?;
    let c = trainer.config();
    eprintln!(
        "loaded {model_name} ({} weights) and cached {} training + {} regularization images at {resolution}x{resolution} in {:.1} s",
        a.weights,
        n_images.0,
        n_images.1,
        t0.elapsed().as_secs_f64()
    );
    eprintln!(
        "training {} LoRA layers ({} values, rank {}, alpha {}, targets {}): {} steps of {} x {} images, lr {:e} {}",
        trainer.params().layers().len(),
        trainer.params().param_count(),
        c.rank,
        c.alpha,
        c.targets,
        c.steps,
        c.batch,
        c.grad_accum,
        c.lr,
        c.schedule
    );
    if let (Some(te), Some(lr)) = (trainer.text_encoder_params(), c.te_lr) {
        eprintln!("and {} text-encoder LoRA layers ({} values), lr {lr:e}", te.layers().len(), te.param_count());
    }
    if let Some(p) = &a.resume {
        let bytes = std::fs::read(p).map_err(|e| format!("--resume {}: cannot read: {e}", p.display()))?;
        trainer.load_state(&gpu, &bytes, &p.display().to_string()).map_err(|e| format!("--resume {e}"))?;
        eprintln!("resumed from {} at step {}", p.display(), trainer.steps_done());
    }

    // The base model's licence and the dataset's digest go into the file's metadata (no images,
    // no captions beyond the tag counts kohya records).
    let folder = a.model.is_dir().then(|| LocalDir(a.model.clone()));
    let licence = loralab::provenance::model_licence(&ck, folder.as_ref());
    eprintln!("base model licence {}", licence.line());
    let digest = dataset_sha256("--images", &a.images)?;
    let mut record_base = TrainingRecord {
        output_name: a.out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        sd_model_name: a.model.file_name().map(|s| s.to_string_lossy().into_owned()),
        training_started_at: started,
        license: loralab::provenance::licence_id(&licence),
        training_comment: Some(format!(
            "dataset: {} images, SHA-256 {digest} (sha256sum of the image and caption files, sorted by path); base model {}",
            n_images.0,
            a.model.file_name().map_or_else(|| a.model.display().to_string(), |s| s.to_string_lossy().into_owned())
        )),
        ..TrainingRecord::default()
    };
    if a.model.is_file() {
        let reader = loralab::io::LocalFile::open(&a.model).map_err(|e| format!("--model {e}"))?;
        record_base.sd_model_hashes = Some(model_hashes(&reader).map_err(|e| format!("--model {e}"))?);
    }
    let record = |trainer: &Trainer| TrainingRecord {
        output_name: record_base.output_name.clone(),
        sd_model_name: record_base.sd_model_name.clone(),
        sd_model_hashes: record_base.sd_model_hashes.clone(),
        training_started_at: started,
        training_finished_at: now_unix(),
        license: record_base.license.clone(),
        training_comment: record_base.training_comment.clone(),
        ..trainer.training_record()
    };

    let total = trainer.config().steps;
    let tty = std::io::stderr().is_terminal();
    let every_line = (total / 20).max(1);
    let mut speed = Throughput::default();
    let clock = Instant::now();
    speed.mark(trainer.steps_done(), 0.0);
    while !trainer.is_finished() {
        let r = pollster::block_on(trainer.step(&gpu)).map_err(|e| e.to_string())?;
        speed.mark(r.step, clock.elapsed().as_secs_f64());
        let line = progress_line(&r, total, &speed);
        if tty {
            eprint!("\r{line}\x1b[K");
            let _ = std::io::stderr().flush();
        } else if r.step % every_line == 0 || r.step == total {
            eprintln!("{line}");
        }
        let last = r.step == total;
        if a.save_every > 0 && (r.step % a.save_every == 0 || last) {
            let state = pollster::block_on(trainer.save_state(&gpu)).map_err(|e| e.to_string())?;
            let state_path = sibling(&a.out, "-state.safetensors");
            write_file("--save-every", &state_path, &state)?;
            if !last {
                let lora = pollster::block_on(trainer.export(&gpu, &record(&trainer), a.export_dtype)).map_err(|e| e.to_string())?;
                write_file("--save-every", &sibling(&a.out, &format!("-step{:06}.safetensors", r.step)), &lora)?;
            }
            if tty {
                eprintln!();
            }
            eprintln!("saved {} at step {}", state_path.display(), r.step);
        }
        if a.sample_every > 0 && (r.step % a.sample_every == 0 || last) {
            save_samples(&gpu, &mut trainer, &a.out)?;
        }
    }
    if tty {
        eprintln!();
    }
    let lora = pollster::block_on(trainer.export(&gpu, &record(&trainer), a.export_dtype)).map_err(|e| e.to_string())?;
    write_file("--out", &a.out, &lora)?;
    if let Some(emb) = pollster::block_on(trainer.trigger_embedding(&gpu)).map_err(|e| e.to_string())? {
        let path = a.out.with_file_name(format!("{}.safetensors", emb.name));
        let bytes = loralab::train::export::export_embedding(&emb, a.export_dtype).map_err(|e| e.to_string())?;
        write_file("--trigger-lr", &path, &bytes)?;
        eprintln!("wrote {} (the trigger word `{}`, {} vectors, also bundled in the LoRA)", path.display(), emb.name, emb.shape[0]);
    }
    eprintln!(
        "wrote {} ({:.1} MB, {} steps) in {}",
        a.out.display(),
        lora.len() as f64 / 1e6,
        trainer.steps_done(),
        format_duration(t0.elapsed().as_secs_f64())
    );
    Ok(ExitCode::SUCCESS)
}
