//! `loralab train` end to end on the tiny fixture model: progress, checkpoints, samples, the
//! kohya file and its metadata, resume, and errors naming the option or file.

use super::train_loop::{shapes_files, tiny, SERIAL};
use loralab::io::safetensors::SafetensorsFile;

fn loralab(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_loralab")).arg("train").args(args).output().expect("run loralab")
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn train_loop_cli_writes_a_kohya_lora() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("loralab-train-cli-{}", std::process::id()));
    let images = dir.join("images");
    std::fs::create_dir_all(&images).expect("temp dir");
    for (name, bytes) in shapes_files(4) {
        std::fs::write(images.join(name), bytes).expect("write image");
    }
    let out = dir.join("shapes.safetensors");
    let (model, imgs, outs) = (tiny().display().to_string(), images.display().to_string(), out.display().to_string());
    let common = ["--model", &model, "--images", &imgs, "--trigger", "sks", "--class", "shape", "--out", &outs];
    let settings = ["--rank", "4", "--alpha", "2", "--lr", "1e-3", "--steps", "4", "--batch", "2", "--grad-accum", "1"];
    let more = ["--schedule", "constant_with_warmup", "--warmup", "1", "--flip", "--seed", "5", "--export-dtype", "f32"];
    let o = loralab(&[&common[..], &settings, &more, &["--save-every", "2", "--sample-every", "4", "--sample-steps", "2"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    assert!(log.contains("step 4/4") && log.contains("it/s") | log.contains("s/it") && log.contains("ETA"), "{log}");
    assert!(log.contains("warning: each training image is seen 2.0 times"), "{log}");
    for f in ["shapes-state.safetensors", "shapes-step000002.safetensors", "shapes-step000004-sample0-trigger.png", "shapes-step000004-sample0-no-trigger.png"] {
        assert!(dir.join(f).is_file(), "{f} missing:\n{log}");
    }

    let file = SafetensorsFile::open_path(&out).expect("open the LoRA");
    let lora = loralab::lora::read_lora(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(lora.format, loralab::lora::Format::Kohya);
    assert_eq!(lora.layers.len(), 32, "the tiny UNet's attention projections");
    let m = file.metadata();
    for (k, v) in [
        ("ss_network_module", "networks.lora"),
        ("ss_network_dim", "4"),
        ("ss_network_alpha", "2.0"),
        ("ss_learning_rate", "0.001"),
        ("ss_lr_scheduler", "constant_with_warmup"),
        ("ss_lr_warmup_steps", "1"),
        ("ss_max_train_steps", "4"),
        ("ss_steps", "4"),
        ("ss_batch_size_per_device", "2"),
        ("ss_seed", "5"),
        ("ss_resolution", "(64, 64)"),
        ("ss_flip_aug", "True"),
        ("ss_num_train_images", "4"),
        ("ss_sd_model_name", "tiny-sd15-a"),
        ("ss_output_name", "shapes"),
        ("ss_base_model_version", "sd_v1"),
        ("modelspec.trigger_phrase", "sks"),
    ] {
        assert_eq!(m.get(k).map(String::as_str), Some(v), "{k}");
    }
    // The dataset's digest: sha256sum of the image and caption files, sorted by name, hashed.
    let mut listing: Vec<(String, String)> = std::fs::read_dir(&images)
        .expect("list images")
        .map(|e| {
            let p = e.expect("entry").path();
            let bytes = std::fs::read(&p).expect("read");
            (p.file_name().unwrap().to_string_lossy().into_owned(), loralab::provenance::sha256_hex(&bytes[..]).unwrap())
        })
        .collect();
    listing.sort();
    let text: String = listing.iter().map(|(n, h)| format!("{h}  {n}\n")).collect();
    let digest = loralab::provenance::sha256_hex(text.as_bytes()).unwrap();
    let comment = &m["ss_training_comment"];
    assert!(comment.starts_with(&format!("dataset: 4 images, SHA-256 {digest} ")) && comment.ends_with("base model tiny-sd15-a"), "{comment}");
    let tags: serde_json::Value = serde_json::from_str(&m["ss_tag_frequency"]).expect("tag frequency JSON");
    assert_eq!(tags["1_sks shape"]["sks"], 4, "{tags}");
    assert!(m["ss_training_finished_at"].parse::<f64>().unwrap() >= m["ss_training_started_at"].parse::<f64>().unwrap());

    // Resuming from the final state trains nothing more and writes the same tensors.
    let resumed = dir.join("resumed.safetensors");
    let (state, res) = (dir.join("shapes-state.safetensors").display().to_string(), resumed.display().to_string());
    let args = [&common[..8], &["--class", "shape", "--out", &res, "--resume", &state], &settings, &more].concat();
    let o = loralab(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resumed from"), "{}", stderr(&o));
    let again = SafetensorsFile::open_path(&resumed).expect("open");
    assert_eq!(again.metadata()["sshs_model_hash"], m["sshs_model_hash"]);

    // Bad input: clear errors naming the option or file, exit codes 2 (usage) and 1.
    let mut bad_dir = images.clone();
    bad_dir.set_file_name("missing");
    let bad = |extra: &[&str], code: i32, want: &[&str]| {
        let o = loralab(extra);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{extra:?}: {e}");
        for w in want {
            assert!(e.contains(w), "{extra:?}: `{w}` not in: {e}");
        }
    };
    bad(&common[2..], 2, &["--model PATH"]);
    bad(&[&common[..], &["--rank", "0"]].concat(), 2, &["--rank 0", "positive"]);
    bad(&[&common[..], &["--schedule", "step"]].concat(), 2, &["--schedule step", "cosine_with_restarts"]);
    bad(&[&common[..], &["--te-lr", "0"]].concat(), 1, &["--te-lr", "(0, 1]"]);
    bad(&[&common[..], &["--te-lr", "-1e-5"]].concat(), 2, &["--te-lr -1e-5", ">= 0"]);
    bad(&[&common[..], &["--warmup", "50", "--steps", "10"]].concat(), 1, &["--warmup", "10 steps"]);
    bad(&[&common[..], &["--frobnicate"]].concat(), 2, &["unknown option `--frobnicate`"]);
    bad(&[&common[..8], &["--out", "x.ckpt"]].concat(), 2, &["--out x.ckpt", ".safetensors"]);
    let missing = bad_dir.display().to_string();
    bad(&[&common[..2], &["--images", &missing], &common[4..]].concat(), 1, &["--images", &missing, "no such folder"]);
    bad(&[&common[..], &["--resume", &outs]].concat(), 1, &["--resume", &outs, "not a training checkpoint"]);
    bad(&[&common[..], &settings, &more, &["--lr", "5e-4", "--resume", &state]].concat(), 1, &["--resume", "lr: 0.0005 vs 0.001"]);
    // Learning the trigger word: its embedding is bundled in the LoRA and written beside it.
    let trig = dir.join("trig.safetensors").display().to_string();
    let o = loralab(&[&common[..8], &["--out", &trig], &settings[..6], &["--steps", "2", "--trigger-lr", "1e-2"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("sks.safetensors") && stderr(&o).contains("bundled"), "{}", stderr(&o));
    let lora = SafetensorsFile::open_path(&trig).expect("open");
    let bundled = lora.get("bundle_emb.sks.string_to_param.*").expect("bundled embedding").shape.clone();
    let alone = SafetensorsFile::open_path(dir.join("sks.safetensors")).expect("the embedding file");
    assert_eq!(alone.get("emb_params").expect("emb_params").shape, bundled);
    assert_eq!(alone.read_f32("emb_params").unwrap(), lora.read_f32("bundle_emb.sks.string_to_param.*").unwrap());
    let clash = dir.join("sks.safetensors").display().to_string();
    bad(&[&common[..8], &["--out", &clash, "--trigger-lr", "1e-2"]].concat(), 1, &["with --trigger-lr", "another name"]);
    bad(&[&common[..], &["--trigger-lr", "2"]].concat(), 1, &["--trigger-lr", "(0, 1]"]);
    std::fs::write(images.join("broken.png"), b"not a png").expect("write");
    bad(&common, 1, &["broken.png", "PNG"]);
    let _ = std::fs::remove_dir_all(&dir);
}

