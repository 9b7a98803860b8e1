//! The entry points through which the engine reads untrusted bytes, one per fuzz target.
//!
//! The fuzz targets (`fuzz/fuzz_targets/*.rs`) and the stable regression test
//! (`tests/engine/fuzz_replay.rs`, which replays the committed corpora and crash inputs) both
//! include this file, so a crash found by the fuzzer is replayed through exactly the same calls.
//! Every function must return normally for every input: errors are expected, panics are bugs.
//! Errors are also checked to name the file they are about.

#![allow(dead_code)]

use loralab::io::safetensors::SafetensorsFile;
use loralab::lora::{open_lora, LayerShape};
use loralab::model::checkpoint::{read_folder_config, read_folder_tokenizer, ModelFiles};
use loralab::model::config::{ClipTextConfig, ModelIndex, PipelineConfig, SamplerConfig, UNetConfig, VaeConfig};
use loralab::model::ClipTokenizer;
use loralab::sampler::{Sampler, SamplerKind};
use loralab::train::data::{decode_image_limited, resize_short_side, square_to_chw, Augment};
use loralab::Error;
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// The most pixels a fuzzed training image may have (the engine's own cap is 50 megapixels).
/// Decoding and resizing cost grows with the pixel count while the code they run does not
/// change with it (the same refusal from the header above the cap; below it the same decoder
/// and Lanczos passes, downscaling or upscaling), so a small cap keeps each execution fast.
pub const FUZZ_MAX_PIXELS: u64 = 1 << 16;

/// Separator of the parts of a multi-file input (never valid inside UTF-8 text).
const SEP: u8 = 0xff;

/// An error must say which file it is about (or be one that has no file, like a shape error
/// inside the engine) and must not be empty.
fn check(e: &Error, file_hint: &str) {
    let text = e.to_string();
    assert!(!text.trim().is_empty(), "empty error message: {e:?}");
    match e {
        Error::Format { file, .. } | Error::Io { file, .. } => {
            assert!(!file.is_empty(), "error without a file name: {text}");
            assert!(text.contains(file_hint), "error does not name `{file_hint}`: {text}");
        }
        _ => {}
    }
}

fn split(data: &[u8]) -> Vec<&[u8]> {
    data.split(|&b| b == SEP).collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---------------------------------------------------------------------------------------------

/// A safetensors file: header, tensor table, every tensor converted to f32.
pub fn safetensors_header(data: &[u8]) {
    let file = match SafetensorsFile::open(data, "fuzz.safetensors") {
        Ok(f) => f,
        Err(e) => return check(&e, "fuzz.safetensors"),
    };
    let _ = file.metadata().len();
    for t in file.tensors() {
        assert!(t.start >= file.data_start() && t.end <= data.len() as u64 && t.start <= t.end);
        match file.read_f32(&t.name) {
            Ok(v) => assert_eq!(v.len() as u64, t.numel(), "tensor `{}`", t.name),
            Err(e) => check(&e, "fuzz.safetensors"),
        }
        if let Err(e) = file.read_bytes(&t.name) {
            check(&e, "fuzz.safetensors");
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// Builds a valid safetensors file whose tensors are named by the lines of `spec`
/// (`name` or `name|d0,d1,…`; dimensions 1–8, at most 64 tensors), so that the fuzzer explores
/// key names and shapes rather than the container. A name given twice keeps its last shape.
pub fn synth_safetensors(spec: &[u8]) -> Vec<u8> {
    let spec = text(spec);
    // name -> (shape, data offsets); sorted, so the header is written in one order.
    let mut tensors: BTreeMap<&str, (Vec<u64>, u64, u64)> = BTreeMap::new();
    let mut data: Vec<u8> = Vec::new();
    for (i, line) in spec.lines().take(64).enumerate() {
        let (name, dims) = match line.split_once('|') {
            Some((n, d)) => (n, d),
            None => (line, "2,2"),
        };
        if name.is_empty() || name == "__metadata__" {
            continue;
        }
        let mut shape: Vec<u64> =
            dims.split(',').filter_map(|d| d.trim().parse::<u64>().ok()).map(|d| d.clamp(1, 8)).take(4).collect();
        if shape.is_empty() && !dims.trim().is_empty() {
            shape.push(1);
        }
        let numel: u64 = shape.iter().product();
        let start = data.len() as u64;
        data.reserve(numel as usize * 4);
        for k in 0..numel {
            let v = ((i as u64 * 31 + k) % 17) as f32 * 0.01 - 0.08;
            data.extend_from_slice(&v.to_le_bytes());
        }
        tensors.insert(name, (shape, start, data.len() as u64));
    }
    let mut json = String::with_capacity(64 + spec.len() * 2);
    let quoted = |out: &mut String, s: &str| {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
    };
    json.push('{');
    if let Some((k, v)) = spec.lines().find_map(|l| l.strip_prefix("#meta ")).and_then(|m| m.split_once('=')) {
        json.push_str("\"__metadata__\":{");
        quoted(&mut json, k);
        json.push(':');
        quoted(&mut json, v);
        json.push_str("},");
    }
    for (name, (shape, start, end)) in &tensors {
        quoted(&mut json, name);
        let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
        json.push_str(&format!(r#":{{"dtype":"F32","shape":[{}],"data_offsets":[{start},{end}]}},"#, dims.join(",")));
    }
    if json.ends_with(',') {
        json.pop();
    }
    json.push('}');
    let mut out = Vec::with_capacity(8 + json.len() + data.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(&data);
    out
}

/// An adapter file: format detection, key mapping, per-layer consistency checks, the summary,
/// and ΔW against layer shapes that may or may not fit.
pub fn lora_parse(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else { return };
    let synth;
    let bytes: &[u8] = if sel & 1 == 1 {
        synth = synth_safetensors(rest);
        &synth
    } else {
        rest
    };
    let cfg = if sel & 2 == 2 { PipelineConfig::sd21() } else { PipelineConfig::sd15() };
    let lora = match open_lora(bytes, "fuzz.safetensors", &cfg) {
        Ok(l) => l,
        Err(e) => return check(&e, "fuzz.safetensors"),
    };
    let summary = lora.summary(None);
    let _ = summary.to_text();
    let _ = lora.display_name();
    for layer in &lora.layers {
        let _ = layer.block();
        for shape in [&[4usize, 4][..], &[4, 4, 3, 3], &[8]] {
            if let Some(s) = LayerShape::from_weight_shape(shape) {
                let _ = layer.delta.delta_weight(&s);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// A model folder held in memory, for [`model_config`].
pub struct MemFiles(pub BTreeMap<String, Vec<u8>>);

impl ModelFiles for MemFiles {
    type Reader = Vec<u8>;
    fn open(&self, path: &str) -> loralab::Result<Option<Vec<u8>>> {
        Ok(self.0.get(path).cloned())
    }
    fn exists(&self, path: &str) -> bool {
        self.0.contains_key(path)
    }
    fn display(&self, path: &str) -> String {
        format!("fuzz-model/{path}")
    }
}

/// The files a model folder's configuration is read from, in the order [`model_config`] takes
/// the parts of its input.
pub const CONFIG_FILES: [&str; 8] = [
    "model_index.json",
    "unet/config.json",
    "text_encoder/config.json",
    "vae/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "tokenizer/vocab.json",
];

/// A model folder's configuration files (parts separated by 0xFF in [`CONFIG_FILES`]' order):
/// each parsed on its own, then the folder as a whole, then what the engine derives from it
/// (per-level accessors, the samplers' schedules).
pub fn model_config(data: &[u8]) {
    let parts = split(data);
    let get = |i: usize| parts.get(i).map(|p| text(p)).unwrap_or_default();
    let f = "fuzz-config.json";
    if let Err(e) = ModelIndex::from_json(&get(0), f) {
        check(&e, f);
    }
    if let Ok(u) = UNetConfig::from_json(&get(1), f).map_err(|e| check(&e, f)) {
        unet_accessors(&u);
    }
    if let Ok(c) = ClipTextConfig::from_json(&get(2), f).map_err(|e| check(&e, f)) {
        let _ = c.head_dim();
    }
    if let Ok(v) = VaeConfig::from_json(&get(3), f).map_err(|e| check(&e, f)) {
        let _ = v.levels();
    }
    if let Ok(s) = SamplerConfig::from_json(&get(4), f).map_err(|e| check(&e, f)) {
        samplers(&s);
    }
    let mut files = BTreeMap::new();
    for (i, name) in CONFIG_FILES.iter().enumerate() {
        if let Some(p) = parts.get(i) {
            files.insert(name.to_string(), p.to_vec());
        }
    }
    files.insert("tokenizer/merges.txt".into(), b"#version: 0.2\n".to_vec());
    let has_vocab = files.contains_key("tokenizer/vocab.json");
    let mem = MemFiles(files);
    match read_folder_config(&mem) {
        Ok((_, cfg)) => {
            unet_accessors(&cfg.unet);
            let _ = cfg.unet.check_supported();
        }
        Err(e) => check(&e, "fuzz-model/"),
    }
    // Without a vocabulary the folder gets the embedded CLIP table (trusted, and slow to build
    // once per input); its configuration files are then applied to a small tokenizer instead.
    if has_vocab {
        if let Err(e) = read_folder_tokenizer(&mem) {
            check(&e, "fuzz-model/");
        }
    } else {
        for i in [5, 6] {
            if let Err(e) = tiny_tokenizer().with_config_json(&get(i)) {
                check(&e, "");
            }
        }
    }
}

fn unet_accessors(u: &UNetConfig) {
    let _ = (u.norm_groups(), u.time_embed_dim());
    for level in 0..u.levels() {
        let _ = (u.layers_per_block(level), u.heads(level), u.head_dim(level), u.transformer_layers(level));
        let _ = (u.cross_attention_dim(level), u.only_cross_attention(level), u.down_has_attention(level));
        let _ = u.up_has_attention(level);
    }
}

fn samplers(cfg: &SamplerConfig) {
    for kind in SamplerKind::ALL {
        if let Ok(mut s) = Sampler::new(kind, cfg) {
            for steps in [1, 4, 25] {
                let _ = s.set_timesteps(steps);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// A small vocabulary (bytes, a few merges, the special tokens) for tokenizer modes that
/// need a tokenizer of their own: built once, a fresh copy per input (the vocabulary is fixed,
/// what those modes fuzz is the configuration or the added tokens applied to it).
fn tiny_tokenizer() -> ClipTokenizer {
    static TOK: OnceLock<ClipTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let chars = loralab::model::tokenizer::bytes_to_unicode();
        let mut vocab = serde_json::Map::new();
        let mut id = 0u32;
        for c in chars {
            vocab.insert(c.to_string(), id.into());
            vocab.insert(format!("{c}</w>"), (id + 256).into());
            id += 1;
        }
        for (i, t) in ["th", "the</w>", "ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"].iter().enumerate() {
            vocab.insert(t.to_string(), (512 + i as u32).into());
        }
        let merges = "#version: 0.2\nt h\nth e</w>\nc a\nca t</w>\n";
        ClipTokenizer::from_vocab_merges(&serde_json::Value::Object(vocab).to_string(), merges)
            .expect("the built-in tiny vocabulary is valid")
    })
    .clone()
}

fn standard_tokenizer() -> &'static ClipTokenizer {
    static TOK: OnceLock<ClipTokenizer> = OnceLock::new();
    TOK.get_or_init(|| ClipTokenizer::standard().expect("the embedded CLIP table loads"))
}

/// The tokenizer: the standard CLIP table encoding arbitrary text (mode 0), a vocabulary and
/// merges from the input (1), a tokenizer configuration (2), added tokens (3).
pub fn tokenizer(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else { return };
    match sel % 4 {
        0 => {
            let t = text(rest);
            let tok = standard_tokenizer();
            let ids = tok.encode(&t);
            assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
            let padded = tok.encode_padded(&t);
            assert_eq!(padded.len(), tok.max_length());
        }
        1 => {
            let parts = split(rest);
            let vocab = parts.first().map(|p| text(p)).unwrap_or_default();
            let merges = parts.get(1).map(|p| text(p)).unwrap_or_default();
            match ClipTokenizer::from_vocab_merges(&vocab, &merges) {
                Ok(tok) => {
                    let sample = parts.get(2).map(|p| text(p)).unwrap_or_else(|| "a photo of the cat".into());
                    let _ = tok.encode(&sample);
                    let _ = tok.encode_padded(&sample);
                }
                Err(e) => check(&e, ""),
            }
        }
        2 => match tiny_tokenizer().with_config_json(&text(rest)) {
            Ok(tok) => {
                let padded = tok.encode_padded("the cat");
                assert_eq!(padded.len(), tok.max_length());
            }
            Err(e) => check(&e, ""),
        },
        _ => {
            let t = text(rest);
            let mut tok = tiny_tokenizer();
            let words: Vec<&str> = t.split(',').take(8).collect();
            if tok.add_tokens(&words).is_ok() {
                let _ = tok.encode(&t);
                let _ = tok.remove_added_tokens(&words);
            }
            let _ = tok.encode(&t);
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// A PNG dropped on the page: decoded with its text chunks, its A1111 `parameters` read, and an
/// XMP packet put into it (the chunk walk of `add_xmp`). Mode bit 0 set: the input is the
/// `parameters` text itself.
pub fn png_parameters(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else { return };
    if sel & 1 == 1 {
        if let Err(e) = loralab::parameters::parse(&text(rest), "fuzz.png") {
            check(&e, "fuzz.png");
        }
        return;
    }
    match loralab::io::png::decode_file(rest, "fuzz.png") {
        Ok(png) => assert_eq!(png.pixels.len(), png.width * png.height * png.channels),
        Err(e) => check(&e, "fuzz.png"),
    }
    if let Err(e) = loralab::parameters::read_png(rest, "fuzz.png") {
        check(&e, "fuzz.png");
    }
    if let Err(e) = loralab::io::png::add_xmp(rest, "<x:xmpmeta xmlns:x=\"adobe:ns:meta/\"/>", "fuzz.png") {
        check(&e, "fuzz.png");
    }
}

// ---------------------------------------------------------------------------------------------

/// A training image: decoded (by its contents), turned upright by its EXIF orientation,
/// resized so the short side is 16 pixels and cropped to the square the VAE encodes (mirrored
/// when bit 0 of the first byte is set).
pub fn train_image(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else { return };
    match decode_image_limited("fuzz.img", rest, FUZZ_MAX_PIXELS) {
        Ok(img) => {
            let (w, h) = img.rgb.dimensions();
            assert!(w > 0 && h > 0 && w as u64 * h as u64 <= FUZZ_MAX_PIXELS);
            let res = 16;
            let small = resize_short_side(&img.rgb, res);
            assert_eq!(small.width().min(small.height()), res);
            let mut out = vec![0f32; 3 * 16 * 16];
            let aug = Augment { x: (small.width() - res) / 2, y: (small.height() - res) / 2, flip: sel & 1 == 1 };
            square_to_chw(&small, res, aug, &mut out).expect("a centred crop of the resized image fits");
            assert!(out.iter().all(|v| (-1.0..=1.0).contains(v)));
        }
        Err(e) => check(&e, "fuzz.img"),
    }
}
