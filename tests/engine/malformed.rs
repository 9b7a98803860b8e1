//! The malformed-file corpus (tests/fixtures/malformed/, written by
//! tools/fixtures/malformed.py, listed in its manifest.json) through the command line: adapters
//! through `loralab lora inspect` (and one through `loralab generate --lora`), models through
//! `loralab generate --model`, training images through `loralab train --images`; PNGs dropped
//! for their parameters through `parameters::read_png`, the call the page makes. Every refusal
//! exits non-zero with the manifest's message and never panics; the images the engine accepts
//! decode to the right size and colours.

use loralab::train::data::{decode_image, Dataset, DatasetOptions};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[derive(Deserialize)]
struct Case {
    file: String,
    #[serde(rename = "use")]
    usage: String,
    expect: String,
    message: Vec<String>,
}

#[derive(Deserialize)]
struct Manifest {
    cases: Vec<Case>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn dir() -> PathBuf {
    root().join("tests/fixtures/malformed")
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(dir().join("manifest.json")).expect("manifest.json");
    serde_json::from_str::<Manifest>(&text).expect("manifest.json parses").cases
}

fn tiny_model() -> PathBuf {
    root().join("tests/fixtures/models/tiny-sd15-a")
}

fn loralab(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loralab")).args(args).current_dir(root()).output().expect("run loralab")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loralab-malformed-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// Runs one case's command; `None` for the cases the command line does not read.
fn run_cli(c: &Case) -> Option<Output> {
    let path = dir().join(&c.file);
    let p = path.as_os_str();
    let model = tiny_model();
    let out = scratch("out");
    Some(match c.usage.as_str() {
        "lora" => loralab(&["lora".as_ref(), "inspect".as_ref(), p]),
        "lora_on_model" => loralab(&["lora".as_ref(), "inspect".as_ref(), p, "--model".as_ref(), model.as_os_str()]),
        "model" => {
            let png = out.join("x.png");
            loralab(&["generate".as_ref(), "--model".as_ref(), p, "--prompt".as_ref(), "a cat".as_ref(), "--out".as_ref(), png.as_os_str()])
        }
        "image" if c.expect == "error" => {
            let images = scratch(&c.file.replace('.', "_"));
            std::fs::copy(&path, images.join(&c.file)).expect("copy image");
            let lora = out.join("x.safetensors");
            let o = loralab(&[
                "train".as_ref(),
                "--model".as_ref(),
                model.as_os_str(),
                "--images".as_ref(),
                images.as_os_str(),
                "--trigger".as_ref(),
                "sks".as_ref(),
                "--steps".as_ref(),
                "1".as_ref(),
                "--out".as_ref(),
                lora.as_os_str(),
            ]);
            let _ = std::fs::remove_dir_all(&images);
            o
        }
        _ => return None,
    })
}

#[test]
fn every_case_through_the_command_line() {
    let cases = cases();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let mut failures = Vec::new();
    let mut ran = 0;
    for c in &cases {
        let Some(o) = run_cli(c) else { continue };
        ran += 1;
        let stderr = String::from_utf8_lossy(&o.stderr);
        if stderr.contains("panicked") {
            failures.push(format!("{}: panicked:\n{stderr}", c.file));
            continue;
        }
        assert_eq!(c.expect, "error", "{}: the command line only runs refusals", c.file);
        if o.status.success() {
            failures.push(format!("{}: exit 0, expected a refusal; stderr:\n{stderr}", c.file));
            continue;
        }
        for m in &c.message {
            if !stderr.contains(m.as_str()) {
                failures.push(format!("{}: stderr lacks `{m}`:\n{stderr}", c.file));
            }
        }
    }
    assert!(ran >= 40, "{ran} cases ran through the command line");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn dropped_pngs_are_refused_with_their_name() {
    let mut n = 0;
    for c in cases().iter().filter(|c| c.usage == "png") {
        n += 1;
        let bytes = std::fs::read(dir().join(&c.file)).expect("read case");
        let r = std::panic::catch_unwind(|| loralab::parameters::read_png(&bytes, &c.file));
        let r = r.unwrap_or_else(|_| panic!("{}: read_png panicked", c.file));
        assert_eq!(c.expect, "error", "{}", c.file);
        let e = r.err().unwrap_or_else(|| panic!("{}: accepted", c.file)).to_string();
        for m in &c.message {
            assert!(e.contains(m.as_str()), "{}: `{e}` lacks `{m}`", c.file);
        }
    }
    assert!(n >= 5, "{n} PNG cases");
}

/// The unusual images the engine takes: a 1×1 PNG (upscaled, with a warning), a CMYK JPEG and
/// a 16-bit greyscale PNG (converted to 8-bit RGB).
#[test]
fn unusual_images_are_converted() {
    let accepted: Vec<Case> = cases().into_iter().filter(|c| c.expect == "accept").collect();
    assert_eq!(accepted.iter().map(|c| c.file.as_str()).collect::<Vec<_>>(), ["img_1x1.png", "img_cmyk.jpg", "img_16bit.png"]);
    for c in &accepted {
        let bytes = std::fs::read(dir().join(&c.file)).expect("read case");
        let ds = Dataset::from_files(vec![(c.file.clone(), bytes.clone())], DatasetOptions::new(64, "sks", "dog"))
            .unwrap_or_else(|e| panic!("{}: {e}", c.file));
        assert_eq!(ds.len(), 1);
        let warnings = ds.warnings.join("\n");
        for m in &c.message {
            assert!(warnings.contains(m.as_str()), "{}: warnings `{warnings}` lack `{m}`", c.file);
        }
        let img = decode_image(&c.file, &bytes).expect("decodes").rgb;
        match c.file.as_str() {
            "img_1x1.png" => {
                assert_eq!(img.dimensions(), (1, 1));
                assert_eq!(img.get_pixel(0, 0).0, [10, 200, 30]);
            }
            "img_cmyk.jpg" => {
                // Written from an RGB gradient: red rises left to right, green top to bottom.
                assert_eq!(img.dimensions(), (32, 24));
                let (tl, tr, bl) = (img.get_pixel(1, 1).0, img.get_pixel(30, 1).0, img.get_pixel(1, 22).0);
                assert!(tr[0] as i32 - tl[0] as i32 > 150, "red {tl:?} → {tr:?}");
                assert!(bl[1] as i32 - tl[1] as i32 > 150, "green {tl:?} → {bl:?}");
                assert!((tl[2] as i32 - 128).abs() < 40, "blue {tl:?}");
            }
            "img_16bit.png" => {
                assert_eq!(img.dimensions(), (24, 16));
                for (x, y) in [(0, 0), (5, 3), (23, 15)] {
                    let p = img.get_pixel(x, y).0;
                    let expect = ((((x * 2700 + y * 1000) % 65536) as f64) / 257.0).round() as i32;
                    assert!(p[0] == p[1] && p[1] == p[2], "grey {p:?}");
                    assert!((p[0] as i32 - expect).abs() <= 1, "({x},{y}): {p:?} vs {expect}");
                }
            }
            other => panic!("unexpected accepted case {other}"),
        }
    }
}

/// A damaged adapter given to `loralab generate --lora` (read after the model is loaded on the
/// GPU) is refused the same way.
#[test]
fn generate_refuses_a_damaged_lora() {
    let model = tiny_model();
    let lora = dir().join("lora_nan.safetensors");
    let out = scratch("generate").join("x.png");
    let o = loralab(&[
        "generate".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--lora".as_ref(),
        lora.as_os_str(),
        "--prompt".as_ref(),
        "a cat".as_ref(),
        "--steps".as_ref(),
        "1".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !out.exists(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("--lora") && stderr.contains("lora_nan.safetensors") && stderr.contains("NaN or infinite"), "{stderr}");
}
