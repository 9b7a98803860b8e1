//! The hand-off zip (`loralab::train::handoff`) read back with a minimal zip reader written
//! here (end record, central directory, local headers, CRC-32, raw deflate through
//! miniz_oxide): the kohya folder layout, original image bytes, re-encoded upright copies of
//! EXIF-rotated images, one caption per image, and the `train_network.py` configuration.
//!
//! `LORALAB_KEEP_HANDOFF=<path>` also writes the archive there (for checking it with other
//! zip and TOML readers).

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use loralab::train::data::{CropMode, Dataset, DatasetOptions};
use loralab::train::export::{ExportDtype, TrainingRecord};
use loralab::train::handoff::{kohya_config, write_handoff, MODEL_PLACEHOLDER};
use loralab::train::zip::ZipWriter;
use std::collections::BTreeMap;
use std::io::Cursor;

fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(img.clone()).write_to(&mut out, format).expect("encode");
    out.into_inner()
}

fn u16_at(b: &[u8], i: usize) -> usize {
    u16::from_le_bytes([b[i], b[i + 1]]) as usize
}

fn u32_at(b: &[u8], i: usize) -> usize {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as usize
}

/// Every entry of a zip without comment or zip64: name → contents, in central-directory
/// order; checks signatures, that local and central headers agree, and every CRC-32.
fn read_zip(z: &[u8]) -> Vec<(String, Vec<u8>)> {
    let end = z.len() - 22;
    assert_eq!(u32_at(z, end), 0x0605_4b50, "end record");
    let (count, cd_size, cd_start) = (u16_at(z, end + 10), u32_at(z, end + 12), u32_at(z, end + 16));
    assert_eq!(cd_start + cd_size, end, "central directory ends at the end record");
    let mut out = Vec::new();
    let mut p = cd_start;
    for _ in 0..count {
        assert_eq!(u32_at(z, p), 0x0201_4b50, "central header");
        let (flags, method, crc) = (u16_at(z, p + 8), u16_at(z, p + 10), u32_at(z, p + 16));
        let (csize, size, nlen) = (u32_at(z, p + 20), u32_at(z, p + 24), u16_at(z, p + 28));
        let (elen, clen, local) = (u16_at(z, p + 30), u16_at(z, p + 32), u32_at(z, p + 42));
        let name = String::from_utf8(z[p + 46..p + 46 + nlen].to_vec()).unwrap();
        assert_eq!(flags & 0x0800, 0x0800, "UTF-8 flag");
        assert_eq!(u32_at(z, local), 0x0403_4b50, "local header of {name}");
        assert_eq!(&z[local + 6..local + 26], &z[p + 8..p + 28], "{name}: local and central headers differ");
        let lnlen = u16_at(z, local + 26);
        let data_start = local + 30 + lnlen + u16_at(z, local + 28);
        assert_eq!(&z[local + 30..local + 30 + lnlen], name.as_bytes());
        let raw = &z[data_start..data_start + csize];
        let data = match method {
            0 => raw.to_vec(),
            8 => miniz_oxide::inflate::decompress_to_vec(raw).expect("inflate"),
            m => panic!("{name}: method {m}"),
        };
        assert_eq!(data.len(), size, "{name}: size");
        assert_eq!(crc32fast::hash(&data) as usize, crc, "{name}: CRC-32");
        out.push((name, data));
        p += 46 + nlen + elen + clen;
    }
    assert_eq!(p, end);
    out
}

/// A JPEG whose EXIF orientation is 6 (turn 90° clockwise to view).
fn rotated_jpeg(img: &RgbImage) -> Vec<u8> {
    let jpg = encode(img, ImageFormat::Jpeg);
    let tiff: Vec<u8> = [&b"MM\0\x2A\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0\x06\0\0"[..], &[0u8; 4]].concat();
    let app1 = [&b"Exif\0\0"[..], &tiff].concat();
    [&[0xFF, 0xD8, 0xFF, 0xE1][..], &((app1.len() + 2) as u16).to_be_bytes(), &app1, &jpg[2..]].concat()
}

fn record() -> TrainingRecord {
    TrainingRecord {
        output_name: "ohwx cat".into(),
        network_dim: 8,
        network_alpha: 4.0,
        conv_dim: Some(4),
        conv_alpha: Some(1.0),
        learning_rate: 1e-4,
        unet_lr: Some(2e-4),
        text_encoder_lr: Some(5e-5),
        train_text_encoder: true,
        lr_scheduler: "cosine_with_restarts".into(),
        lr_warmup_steps: 50,
        max_train_steps: 1500,
        batch_size: 2,
        seed: 77,
        mixed_precision: "bf16".into(),
        clip_skip: Some(2),
        resolution: 512,
        flip_aug: true,
        optimizer: "torch.optim.adamw.AdamW(weight_decay=0.01)".into(),
        ..TrainingRecord::default()
    }
}

#[test]
fn train_handoff_zip_layout_and_contents() {
    let red = RgbImage::from_pixel(24, 16, Rgb([200, 10, 10]));
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    files.insert("10_ohwx cat/a.png".into(), encode(&red, ImageFormat::Png));
    files.insert("10_ohwx cat/a.txt".into(), b"ohwx cat, sofa".to_vec());
    files.insert("10_ohwx cat/rot.jpg".into(), rotated_jpeg(&red));
    files.insert("x/same.png".into(), encode(&red, ImageFormat::Png));
    files.insert("y/same.png".into(), encode(&RgbImage::from_pixel(16, 16, Rgb([1, 2, 3])), ImageFormat::Png));
    files.insert("y/same.webp".into(), encode(&red, ImageFormat::WebP));
    let mut o = DatasetOptions::new(16, "ohwx", "cat");
    o.flip = true;
    let train = Dataset::from_files(files.iter().map(|(k, v)| (k.clone(), v.clone())).collect(), o).unwrap();
    let reg_files = vec![("1_cat/r.png".to_string(), encode(&red, ImageFormat::Png))];
    let reg = Dataset::from_files(reg_files.clone(), DatasetOptions::regularization(16, "cat")).unwrap();
    let all: BTreeMap<String, Vec<u8>> = files.clone().into_iter().chain(reg_files).collect();
    let mut source = |name: &str| all.get(name).cloned().ok_or_else(|| loralab::Error::Invalid(format!("{name} missing")));
    let zip = write_handoff(Vec::new(), &record(), ExportDtype::F16, &train, Some(&reg), &mut source, 1_767_225_600).unwrap();
    if let Some(p) = std::env::var_os("LORALAB_KEEP_HANDOFF") {
        std::fs::write(p, &zip).unwrap();
    }
    let entries = read_zip(&zip);
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    let root = "ohwx cat_kohya";
    let want: Vec<String> = [
        "README.txt",
        "config.toml",
        "img/10_ohwx cat/a.png",
        "img/10_ohwx cat/a.txt",
        "img/10_ohwx cat/rot.png",
        "img/10_ohwx cat/rot.txt",
        "img/1_ohwx cat/same.png",
        "img/1_ohwx cat/same.txt",
        "img/1_ohwx cat/same_2.png",
        "img/1_ohwx cat/same_2.txt",
        "img/1_ohwx cat/same_3.webp",
        "img/1_ohwx cat/same_3.txt",
        "reg/1_cat/r.png",
        "reg/1_cat/r.txt",
    ]
    .iter()
    .map(|n| format!("{root}/{n}"))
    .collect();
    assert_eq!(names, want.iter().map(String::as_str).collect::<Vec<_>>());
    let get = |n: &str| entries.iter().find(|(k, _)| k == &format!("{root}/{n}")).map(|(_, v)| v.clone()).unwrap();
    // Originals byte for byte; captions as trained; the rotated JPEG upright as PNG.
    assert_eq!(get("img/10_ohwx cat/a.png"), files["10_ohwx cat/a.png"]);
    assert_eq!(get("img/1_ohwx cat/same_3.webp"), files["y/same.webp"]);
    assert_eq!(get("img/10_ohwx cat/a.txt"), b"ohwx cat, sofa\n");
    assert_eq!(get("img/10_ohwx cat/rot.txt"), b"ohwx cat\n");
    assert_eq!(get("reg/1_cat/r.txt"), b"cat\n");
    let upright = image::load_from_memory(&get("img/10_ohwx cat/rot.png")).unwrap();
    assert_eq!((upright.width(), upright.height()), (16, 24));
    // Text is deflated, images stored.
    let readme = String::from_utf8(get("README.txt")).unwrap();
    assert!(readme.contains("train_network.py") && readme.contains("reg/"), "{readme}");
    let config = String::from_utf8(get("config.toml")).unwrap();
    assert_eq!(config, kohya_config(&record(), ExportDtype::F16, true));
    for line in [
        "train_data_dir = \"img\"",
        "reg_data_dir = \"reg\"",
        "resolution = \"512,512\"",
        "caption_extension = \".txt\"",
        "flip_aug = true",
        "network_module = \"networks.lora\"",
        "network_dim = 8",
        "network_alpha = 4.0",
        "network_args = [\"conv_dim=4\", \"conv_alpha=1.0\"]",
        "optimizer_type = \"AdamW\"",
        "optimizer_args = [\"weight_decay=0.01\"]",
        "learning_rate = 0.0001",
        "unet_lr = 0.0002",
        "text_encoder_lr = 5e-05",
        "lr_scheduler = \"cosine_with_restarts\"",
        "lr_warmup_steps = 50",
        "max_train_steps = 1500",
        "train_batch_size = 2",
        "seed = 77",
        "mixed_precision = \"bf16\"",
        "clip_skip = 2",
        "output_name = \"ohwx cat\"",
        "save_precision = \"fp16\"",
        "save_model_as = \"safetensors\"",
        "cache_latents = true",
    ] {
        assert!(config.lines().any(|l| l == line), "config lacks `{line}`:\n{config}");
    }
    assert!(config.contains(MODEL_PLACEHOLDER), "{config}");
    assert!(!config.contains("network_train_unet_only"));
    assert!(!config.contains("pivotal"));
    // A learned trigger word has no sd-scripts equivalent: the configuration says so.
    let c = kohya_config(&TrainingRecord { trigger_lr: Some(0.02), ..record() }, ExportDtype::F16, true);
    assert!(c.lines().any(|l| l.starts_with('#') && l.contains("pivotal tuning, learning rate 0.02") && l.contains("ordinary word")), "{c}");
}

#[test]
fn train_handoff_config_variants_and_errors() {
    // UNet only, random crops (no cached latents), no regularization images, a known base.
    let mut r = record();
    r.train_text_encoder = false;
    r.conv_dim = None;
    r.random_crop = true;
    r.sd_model_name = Some("v1-5-pruned-emaonly.safetensors".into());
    let c = kohya_config(&r, ExportDtype::F32, false);
    for line in ["network_train_unet_only = true", "cache_latents = false", "random_crop = true", "save_precision = \"float\""] {
        assert!(c.lines().any(|l| l == line), "lacks `{line}`:\n{c}");
    }
    for absent in ["text_encoder_lr", "reg_data_dir", "network_args"] {
        assert!(!c.contains(absent), "has `{absent}`:\n{c}");
    }
    assert!(c.contains("v1-5-pruned-emaonly.safetensors"));
    // A file the source cannot give fails with its name.
    let img = encode(&RgbImage::from_pixel(16, 16, Rgb([9, 9, 9])), ImageFormat::Png);
    let mut o = DatasetOptions::new(16, "ohwx", "cat");
    o.crop = CropMode::Random;
    let train = Dataset::from_files(vec![("5_a/k.png".into(), img)], o).unwrap();
    let mut source = |name: &str| -> loralab::Result<Vec<u8>> {
        Err(loralab::Error::Io { file: name.to_string(), message: "gone".into() })
    };
    let e = write_handoff(Vec::new(), &r, ExportDtype::F16, &train, None, &mut source, 0).unwrap_err().to_string();
    assert!(e.contains("5_a/k.png") && e.contains("gone"), "{e}");
}

#[test]
fn train_handoff_zip_writer() {
    let mut z = ZipWriter::new(Vec::new(), 0);
    let text = "abc ".repeat(1000);
    z.add("dir/text.txt", text.as_bytes(), true).unwrap();
    z.add("dir/random.bin", &[1, 2, 3], true).unwrap(); // deflate is larger: stored
    z.add("empty", &[], false).unwrap();
    z.add("ünï.txt", b"x", false).unwrap();
    assert!(z.add("dir/text.txt", b"again", true).unwrap_err().to_string().contains("twice"));
    for bad in ["/abs", "a/../b", "a\\b", ""] {
        assert!(z.add(bad, b"x", false).is_err(), "{bad:?} accepted");
    }
    let bytes = z.finish().unwrap();
    let e = read_zip(&bytes);
    assert_eq!(e.len(), 4);
    assert_eq!(e[0].1, text.as_bytes());
    assert_eq!((e[1].1.as_slice(), e[2].1.len(), e[3].0.as_str()), (&[1u8, 2, 3][..], 0, "ünï.txt"));
    // The text was compressed, the three bytes stored.
    assert!(bytes.len() < text.len() / 4, "{} bytes", bytes.len());
    // MS-DOS dates: 2026-01-01 00:00:02 and the 1980 floor.
    assert_eq!(loralab::train::zip::dos_time_date(1_767_225_602), (1, (46 << 9) | (1 << 5) | 1));
    assert_eq!(loralab::train::zip::dos_time_date(0), (0, (1 << 5) | 1));
}
