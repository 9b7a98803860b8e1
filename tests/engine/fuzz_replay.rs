//! Replays, on the stable toolchain, what the fuzzers found: every input of the committed
//! minimized corpora (fuzz/corpus/<target>/), every crash input kept as a regression
//! (fuzz/regressions/<target>/), and the malformed-file corpus, through the same entry points
//! the fuzz targets call (fuzz/src/entries.rs is compiled into this test). None may panic.

#[path = "../../fuzz/src/entries.rs"]
mod entries;

use std::path::{Path, PathBuf};

type Entry = fn(&[u8]);

const TARGETS: [(&str, Entry); 6] = [
    ("safetensors_header", entries::safetensors_header),
    ("lora_parse", entries::lora_parse),
    ("model_config", entries::model_config),
    ("tokenizer", entries::tokenizer),
    ("png_parameters", entries::png_parameters),
    ("train_image", entries::train_image),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Runs `entry` on `data`, turning a panic into a failure message naming the input.
fn replay(name: &str, entry: Entry, data: &[u8], what: &Path, failures: &mut Vec<String>) {
    if std::panic::catch_unwind(|| entry(data)).is_err() {
        failures.push(format!("{name}: {} panicked", what.display()));
    }
}

#[test]
fn corpora_and_regressions_replay_without_panics() {
    let mut failures = Vec::new();
    let mut counts = Vec::new();
    for (name, entry) in TARGETS {
        let mut n = 0;
        for sub in ["corpus", "regressions"] {
            for f in files(&fuzz_dir().join(sub).join(name)) {
                let data = std::fs::read(&f).expect("read input");
                replay(name, entry, &data, &f, &mut failures);
                n += 1;
            }
        }
        counts.push(format!("{name}: {n}"));
        assert!(n > 0, "fuzz/corpus/{name} is empty");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("replayed {}", counts.join(", "));
}

/// The malformed-file corpus through the fuzz entry points, in every mode a file can be read.
#[test]
fn malformed_corpus_through_the_fuzz_entries() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/malformed");
    let mut failures = Vec::new();
    let mut n = 0;
    for f in files(&dir) {
        let data = std::fs::read(&f).expect("read case");
        n += 1;
        replay("safetensors_header", entries::safetensors_header, &data, &f, &mut failures);
        for mode in [0u8, 2] {
            let mut input = vec![mode];
            input.extend_from_slice(&data);
            replay("lora_parse", entries::lora_parse, &input, &f, &mut failures);
            replay("png_parameters", entries::png_parameters, &input, &f, &mut failures);
            replay("train_image", entries::train_image, &input, &f, &mut failures);
        }
    }
    assert!(n >= 30, "{n} malformed files");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Inputs that are valid for each entry (so the replay exercises the success paths too).
#[test]
fn fuzz_entries_accept_valid_inputs() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let lora = std::fs::read(fixtures.join("lora/lycoris_ia3.safetensors")).expect("fixture");
    let file = loralab::io::safetensors::SafetensorsFile::open(lora.as_slice(), "ia3").expect("opens");
    assert!(!file.tensors().is_empty());
    entries::safetensors_header(&lora);
    let mut input = vec![0u8];
    input.extend_from_slice(&lora);
    entries::lora_parse(&input);
    let synth = entries::synth_safetensors(b"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight|2,8\nlora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight|8,2");
    let lora = loralab::io::safetensors::SafetensorsFile::open(synth.as_slice(), "synth").expect("synthesised file opens");
    let parsed = loralab::lora::read_lora(&lora).expect("synthesised adapter parses");
    assert_eq!(parsed.layers.len(), 1);
    let png = loralab::io::png::encode_rgb8(2, 2, &[0; 12], &[("parameters", "a cat\nSteps: 3, Seed: 1")]).expect("png");
    let (p, _) = loralab::parameters::read_png(&png, "x.png").expect("reads");
    assert_eq!(p.steps, Some(3));
    let mut input = vec![0u8];
    input.extend_from_slice(&png);
    entries::png_parameters(&input);
    entries::train_image(&input);
    let img = loralab::train::data::decode_image_limited("x.png", &png, entries::FUZZ_MAX_PIXELS).expect("decodes");
    assert_eq!(img.rgb.dimensions(), (2, 2));
    let refused = loralab::train::data::decode_image_limited("x.png", &png, 3).expect_err("over the limit");
    assert!(refused.to_string().contains("2×2 pixels, more than the 3 pixels"), "{refused}");
}

/// Training images whose long side is more than 16 times their short side are refused from the
/// header (resized to the training resolution they would take gigabytes); 16:1 is still read.
#[test]
fn elongated_training_images_are_refused() {
    use loralab::train::data::decode_image;
    let png = |w: usize, h: usize| loralab::io::png::encode_rgb8(w, h, &vec![7; w * h * 3], &[]).expect("png");
    assert_eq!(decode_image("ok.png", &png(1, 16)).expect("16:1 decodes").rgb.dimensions(), (1, 16));
    assert_eq!(decode_image("ok.png", &png(32, 2)).expect("16:1 decodes").rgb.dimensions(), (32, 2));
    for (w, h) in [(1, 17), (40, 2), (1, 65536)] {
        let e = decode_image("strip.png", &png(w, h)).expect_err("too elongated").to_string();
        assert!(e.contains("strip.png") && e.contains(&format!("{w}×{h} pixels")) && e.contains("16 times"), "{e}");
    }
}
