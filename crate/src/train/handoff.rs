//! The hand-off zip for training elsewhere: the dataset in kohya sd-scripts' DreamBooth layout
//! and a `train_network.py` configuration with the settings of the run, so a user who
//! outgrows the browser continues on a bigger machine with the same data and settings.
//!
//! ```text
//! <name>_kohya/
//!   README.txt
//!   config.toml                 train_network.py --config_file config.toml
//!   img/<N>_<words>/<image>     the original files (re-encoded as PNG when their EXIF
//!   img/<N>_<words>/<stem>.txt  orientation turns them: kohya does not apply it)
//!   reg/<N>_<class>/…           regularization images, when there are any
//! ```
//!
//! Every image gets a `.txt` caption holding the caption trained with here (defaults and the
//! prepended trigger word included), so kohya trains on the same text.

use super::data::{decode_image, safe_folder_name, Dataset};
use super::export::{py_f32, py_f64, ExportDtype, TrainingRecord};
use super::zip::ZipWriter;
use crate::error::{Error, Result};
use std::collections::HashSet;
use std::io::Write;

/// The placeholder for the base model path that the user replaces.
pub const MODEL_PLACEHOLDER: &str = "EDIT ME: path to the base model (.safetensors file or diffusers folder)";

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// kohya's `optimizer_type` from the record's optimizer (`torch.optim.adamw.AdamW(…)` →
/// `AdamW`) and its `key=value` arguments.
fn optimizer_type(optimizer: &str) -> (String, Vec<String>) {
    let (class, args) = match optimizer.split_once('(') {
        Some((c, a)) => (c, a.strip_suffix(')').unwrap_or(a)),
        None => (optimizer, ""),
    };
    let name = class.rsplit('.').next().unwrap_or(class).trim();
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut current = String::new();
    for c in args.chars() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(current.trim().to_string());
                current.clear();
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    if !current.trim().is_empty() {
        out.push(current.trim().to_string());
    }
    out.retain(|a| a.contains('='));
    (if name.is_empty() { "AdamW".to_string() } else { name.to_string() }, out)
}

/// The kohya `train_network.py` configuration (TOML; its sections are only for reading, kohya
/// merges them) for `record`'s settings.
pub fn kohya_config(record: &TrainingRecord, save_precision: ExportDtype, has_reg: bool) -> String {
    let s = |v: &str| toml_str(v);
    let b = |v: bool| v.to_string();
    let mut sections: Vec<(&str, Vec<(&str, String)>)> = Vec::new();
    let model_hint = match &record.sd_model_name {
        Some(n) => format!("EDIT ME: path to {n} (the base model this LoRA was trained on)"),
        None => MODEL_PLACEHOLDER.to_string(),
    };
    sections.push((
        "model",
        vec![
            ("pretrained_model_name_or_path", s(&model_hint)),
            ("v2", b(record.v2)),
            ("v_parameterization", b(record.v_parameterization)),
        ],
    ));
    let mut dataset = vec![("train_data_dir", s("img"))];
    if has_reg {
        dataset.push(("reg_data_dir", s("reg")));
        dataset.push(("prior_loss_weight", py_f64(record.prior_loss_weight)));
    }
    dataset.extend([
        ("resolution", s(&format!("{0},{0}", record.resolution))),
        ("caption_extension", s(".txt")),
        ("enable_bucket", b(false)),
        ("flip_aug", b(record.flip_aug)),
        ("random_crop", b(record.random_crop)),
        // kohya refuses cached latents with random crops.
        ("cache_latents", b(record.cache_latents && !record.random_crop)),
    ]);
    sections.push(("dataset", dataset));
    let mut network = vec![
        ("network_module", s("networks.lora")),
        ("network_dim", record.network_dim.to_string()),
        ("network_alpha", py_f32(record.network_alpha)),
    ];
    if let Some(d) = record.conv_dim {
        let alpha = py_f32(record.conv_alpha.unwrap_or(1.0));
        network.push(("network_args", format!("[{}, {}]", s(&format!("conv_dim={d}")), s(&format!("conv_alpha={alpha}")))));
    }
    if !record.train_text_encoder {
        network.push(("network_train_unet_only", b(true)));
    }
    sections.push(("network", network));
    let (opt, opt_args) = optimizer_type(&record.optimizer);
    let mut optimizer = vec![("optimizer_type", s(&opt))];
    if !opt_args.is_empty() {
        optimizer.push(("optimizer_args", format!("[{}]", opt_args.iter().map(|a| s(a)).collect::<Vec<_>>().join(", "))));
    }
    optimizer.push(("learning_rate", py_f64(record.learning_rate)));
    if let Some(lr) = record.unet_lr {
        optimizer.push(("unet_lr", py_f64(lr)));
    }
    if let (Some(lr), true) = (record.text_encoder_lr, record.train_text_encoder) {
        optimizer.push(("text_encoder_lr", py_f64(lr)));
    }
    optimizer.extend([
        ("lr_scheduler", s(&record.lr_scheduler)),
        ("lr_warmup_steps", record.lr_warmup_steps.to_string()),
        ("max_grad_norm", py_f64(record.max_grad_norm)),
    ]);
    sections.push(("optimizer", optimizer));
    let mut training = vec![
        ("max_train_steps", record.max_train_steps.to_string()),
        ("train_batch_size", record.batch_size.max(1).to_string()),
        ("gradient_accumulation_steps", record.gradient_accumulation_steps.max(1).to_string()),
        ("gradient_checkpointing", b(record.gradient_checkpointing)),
        ("seed", record.seed.to_string()),
        ("mixed_precision", s(&record.mixed_precision)),
    ];
    if let Some(c) = record.clip_skip {
        training.push(("clip_skip", c.to_string()));
    }
    if let Some(n) = record.noise_offset {
        training.push(("noise_offset", py_f64(n)));
    }
    if let Some(g) = record.min_snr_gamma {
        training.push(("min_snr_gamma", py_f64(g)));
    }
    sections.push(("training", training));
    sections.push((
        "output",
        vec![
            ("output_dir", s("output")),
            ("output_name", s(&record.output_name)),
            ("save_model_as", s("safetensors")),
            ("save_precision", s(save_precision.kohya_name())),
        ],
    ));
    let mut out = format!(
        "# kohya sd-scripts train_network.py configuration for \"{}\", written by loralab.\n\
         # 1. Replace pretrained_model_name_or_path below with the base model's path.\n\
         # 2. From this folder run:\n\
         #    accelerate launch <sd-scripts>/train_network.py --config_file config.toml\n",
        record.output_name.replace(['\n', '\r'], " ")
    );
    if let Some(lr) = record.trigger_lr {
        out.push_str(&format!(
            "# loralab also learned the trigger word's embedding (pivotal tuning, learning rate {}); \
             train_network.py has no such option, so there the trigger stays an ordinary word.\n",
            py_f64(lr)
        ));
    }
    for (name, keys) in sections {
        out.push_str(&format!("\n[{name}]\n"));
        for (k, v) in keys {
            out.push_str(&format!("{k} = {v}\n"));
        }
    }
    out
}

fn readme(record: &TrainingRecord, root: &str, has_reg: bool, train: &Dataset) -> String {
    let mut r = format!(
        "{root}: the dataset and settings of the LoRA \"{}\" for kohya sd-scripts.\n\n\
         img/     {} training images in {} folder(s) named <repeats>_<words>, each with a .txt caption\n",
        record.output_name,
        train.len(),
        train.dataset_dirs().len()
    );
    if has_reg {
        r.push_str("reg/     regularization images, same layout\n");
    }
    r.push_str(
        "config.toml  train_network.py settings (resolution, network dim/alpha, learning rates,\n\
         \x20            scheduler, warmup, steps, batch size, seed, precision, output name)\n\n\
         To train:\n\
         1. Install kohya sd-scripts (https://github.com/kohya-ss/sd-scripts) and run\n\
         \x20  `accelerate config` once.\n\
         2. Edit config.toml: set pretrained_model_name_or_path to your base model.\n\
         3. In this folder: accelerate launch <path to sd-scripts>/train_network.py --config_file config.toml\n\
         The LoRA is written to output/ and loads in loralab, A1111, ComfyUI and diffusers.\n",
    );
    r
}

/// A unique file name in a folder: `stem.ext`, else `stem_2.ext`, … (stems compared without
/// case, since each image has its own `stem.txt`).
fn unique_stem(used: &mut HashSet<String>, folder: &str, stem: &str) -> String {
    let mut candidate = stem.to_string();
    let mut n = 2;
    while !used.insert(format!("{folder}/{}", candidate.to_lowercase())) {
        candidate = format!("{stem}_{n}");
        n += 1;
    }
    candidate
}

/// Writes the hand-off zip to `out`. `source(name)` gives the original bytes of a dataset
/// file by the name it was loaded under (the page re-reads its `File`s; natively a file
/// read). `unix_seconds` dates the entries.
pub fn write_handoff<W: Write>(
    out: W,
    record: &TrainingRecord,
    save_precision: ExportDtype,
    train: &Dataset,
    reg: Option<&Dataset>,
    source: &mut dyn FnMut(&str) -> Result<Vec<u8>>,
    unix_seconds: i64,
) -> Result<W> {
    let root = format!("{}_kohya", safe_folder_name(&record.output_name));
    let has_reg = reg.is_some_and(|r| !r.is_empty());
    let mut zip = ZipWriter::new(out, unix_seconds);
    zip.add(&format!("{root}/README.txt"), readme(record, &root, has_reg, train).as_bytes(), true)?;
    zip.add(&format!("{root}/config.toml"), kohya_config(record, save_precision, has_reg).as_bytes(), true)?;
    let mut used = HashSet::new();
    for (dir, ds) in [("img", Some(train)), ("reg", reg)] {
        let Some(ds) = ds else { continue };
        for item in &ds.items {
            let folder = format!("{root}/{dir}/{}", safe_folder_name(&item.folder));
            let base = item.file.rsplit(['/', '\\']).next().unwrap_or(&item.file);
            let (stem, ext) = match base.rsplit_once('.') {
                Some((s, e)) if !s.is_empty() => (s, e),
                _ => (base, "png"),
            };
            let stem = unique_stem(&mut used, &folder, &safe_folder_name(stem));
            let bytes = source(&item.file)?;
            if item.reoriented {
                let img = decode_image(&item.file, &bytes)?;
                let png = crate::io::png::encode_rgb8(img.rgb.width() as usize, img.rgb.height() as usize, img.rgb.as_raw(), &[])
                    .map_err(|e| Error::Format { file: item.file.clone(), tensor: None, message: e.to_string() })?;
                zip.add(&format!("{folder}/{stem}.png"), &png, false)?;
            } else {
                zip.add(&format!("{folder}/{stem}.{ext}"), &bytes, false)?;
            }
            zip.add(&format!("{folder}/{stem}.txt"), format!("{}\n", item.caption).as_bytes(), true)?;
        }
    }
    zip.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimizer_names_and_arguments() {
        assert_eq!(optimizer_type("torch.optim.adamw.AdamW"), ("AdamW".into(), vec![]));
        assert_eq!(
            optimizer_type("torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.999))"),
            ("AdamW".into(), vec!["weight_decay=0.01".into(), "betas=(0.9, 0.999)".into()])
        );
        assert_eq!(toml_str("a\"b\\c\u{1}"), "\"a\\\"b\\\\c\\u0001\"");
    }
}
