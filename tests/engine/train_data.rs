//! Training datasets (`loralab::train::data`): images encoded here as PNG, JPEG and WebP with
//! the `image` crate, EXIF orientation in a JPEG, resize / crop sizes and pixel values, seeded
//! crops and flips, caption matching and defaults, kohya repeats, tag frequency, and errors
//! that name the file at fault.

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use loralab::train::data::{Augment, CaptionSource, CropMode, Dataset, DatasetOptions};
use loralab::Error;
use std::collections::BTreeMap;
use std::io::Cursor;

fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(img.clone()).write_to(&mut out, format).expect("encode");
    out.into_inner()
}

/// Pixel (x, y) = (4x, 4y, 200): every pixel of a small image tells where it came from.
fn coords(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| Rgb([(4 * x) as u8, (4 * y) as u8, 200]))
}

fn solid(w: u32, h: u32, c: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb(c))
}

fn v(c: u8) -> f32 {
    c as f32 / 127.5 - 1.0
}

fn opts() -> DatasetOptions {
    DatasetOptions::new(64, "ohwx", "cat")
}

fn files(list: &[(&str, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    list.iter().map(|(n, b)| (n.to_string(), b.clone())).collect()
}

fn load(list: &[(&str, Vec<u8>)], o: DatasetOptions) -> Dataset {
    Dataset::from_files(files(list), o).unwrap_or_else(|e| panic!("{e}"))
}

fn err(list: &[(&str, Vec<u8>)], o: DatasetOptions) -> Error {
    Dataset::from_files(files(list), o).expect_err("should fail")
}

/// [3, r, r] value of channel c at (x, y).
fn at(t: &[f32], r: usize, c: usize, x: usize, y: usize) -> f32 {
    t[c * r * r + y * r + x]
}

#[test]
fn train_data_formats_sizes_and_values() {
    let png = encode(&coords(40, 20), ImageFormat::Png);
    let jpg = encode(&solid(90, 120, [10, 120, 250]), ImageFormat::Jpeg);
    let webp = encode(&solid(100, 75, [30, 60, 90]), ImageFormat::WebP);
    let ds = load(&[("a.png", png), ("b.jpg", jpg), ("c.webp", webp)], DatasetOptions::new(16, "ohwx", "cat"));
    assert_eq!(ds.len(), 3);
    let sizes: Vec<(u32, u32, (u32, u32))> = ds.items.iter().map(|i| (i.width, i.height, i.resized_size())).collect();
    // Shorter side = 16, the longer rounded to the nearest pixel: 40×20 → 32×16, 90×120 → 16×21
    // (21.33), 100×75 → 21×16 (21.33).
    assert_eq!(sizes, vec![(40, 20, (32, 16)), (90, 120, (16, 21)), (100, 75, (21, 16))]);
    // Solid colours stay exact through resize and JPEG / lossless WebP.
    let jpg_t = ds.image(1, ds.augment(1, 0, 0)).unwrap();
    assert_eq!(jpg_t.len(), 3 * 16 * 16);
    for (c, want) in [10u8, 120, 250].iter().enumerate() {
        let got = at(&jpg_t, 16, c, 7, 7);
        assert!((got - v(*want)).abs() < 4.0 / 127.5, "jpeg channel {c}: {got} vs {}", v(*want));
    }
    let webp_t = ds.image(2, Augment { x: 5, y: 0, flip: false }).unwrap();
    assert!(webp_t.chunks(256).zip([30u8, 60, 90]).all(|(plane, c)| plane.iter().all(|&x| x == v(c))));
    // A crop that does not fit is refused.
    assert!(ds.image(2, Augment { x: 6, y: 0, flip: false }).is_err());
    assert!(ds.image(3, Augment { x: 0, y: 0, flip: false }).is_err());
}

#[test]
fn train_data_crop_and_flip_are_exact_and_seeded() {
    // 32×16 at resolution 16: no resize; the centre crop starts at x = 8.
    let ds = load(&[("a.png", encode(&coords(32, 16), ImageFormat::Png))], DatasetOptions::new(16, "ohwx", "cat"));
    let aug = ds.augment(0, 1, 0);
    assert_eq!(aug, Augment { x: 8, y: 0, flip: false });
    let t = ds.image(0, aug).unwrap();
    for (x, y) in [(0, 0), (15, 3), (7, 15)] {
        assert_eq!(at(&t, 16, 0, x, y), v(4 * (x as u8 + 8)));
        assert_eq!(at(&t, 16, 1, x, y), v(4 * y as u8));
        assert_eq!(at(&t, 16, 2, x, y), v(200));
    }
    // Mirrored: column c shows source column x + 15 − c.
    let f = ds.image(0, Augment { x: 8, y: 0, flip: true }).unwrap();
    assert_eq!(at(&f, 16, 0, 0, 2), v(4 * 23));
    assert_eq!(at(&f, 16, 0, 15, 2), v(4 * 8));

    // Random crops and flips: the same (seed, epoch, image) gives the same result; other
    // seeds / epochs move the crop and flip about half the time.
    let mut o = DatasetOptions::new(16, "ohwx", "cat");
    o.crop = CropMode::Random;
    o.flip = true;
    let ds = load(&[("a.png", encode(&coords(32, 16), ImageFormat::Png))], o);
    let augs: Vec<Augment> = (0..64).map(|e| ds.augment(0, 7, e)).collect();
    assert_eq!(augs, (0..64).map(|e| ds.augment(0, 7, e)).collect::<Vec<_>>());
    assert!(augs.iter().all(|a| a.x <= 16 && a.y == 0));
    let xs: std::collections::BTreeSet<u32> = augs.iter().map(|a| a.x).collect();
    assert!(xs.len() > 5, "random crops hardly move: {xs:?}");
    let flips = augs.iter().filter(|a| a.flip).count();
    assert!((16..=48).contains(&flips), "{flips} of 64 flipped");
    assert_ne!(augs, (0..64).map(|e| ds.augment(0, 8, e)).collect::<Vec<_>>());
    // batch() is the images with their augmentations, in order.
    let b = ds.batch(&[0, 0], 7, 3).unwrap();
    assert_eq!(b.len(), 2 * 3 * 16 * 16);
    assert_eq!(&b[..768], ds.image(0, ds.augment(0, 7, 3)).unwrap().as_slice());
}

#[test]
fn train_data_downscaling_averages() {
    // A 1-pixel black / white checkerboard, 256×128 → 128×64: an area-like filter gives grey,
    // point sampling would keep ±1.
    let board = RgbImage::from_fn(256, 128, |x, y| if (x + y) % 2 == 0 { Rgb([0, 0, 0]) } else { Rgb([255, 255, 255]) });
    let ds = load(&[("board.png", encode(&board, ImageFormat::Png))], opts());
    assert_eq!(ds.items[0].resized_size(), (128, 64));
    let t = ds.image(0, ds.augment(0, 0, 0)).unwrap();
    let worst = t.iter().map(|x| x.abs()).fold(0f32, f32::max);
    assert!(worst < 0.05, "downscaled checkerboard is not grey: |v| up to {worst}");
    // Upscaling a small image works (with a warning).
    let ds = load(&[("small.png", encode(&solid(8, 8, [1, 2, 3]), ImageFormat::Png))], opts());
    assert_eq!(ds.items[0].resized_size(), (64, 64));
    assert!(ds.warnings.iter().any(|w| w.contains("small.png") && w.contains("upscaled")), "{:?}", ds.warnings);
}

/// A JPEG with an EXIF APP1 segment holding only the orientation tag.
fn jpeg_with_orientation(img: &RgbImage, orientation: u16) -> Vec<u8> {
    let jpg = encode(img, ImageFormat::Jpeg);
    assert_eq!(&jpg[..2], &[0xFF, 0xD8]);
    let mut tiff = b"MM\0\x2A\0\0\0\x08".to_vec();
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one IFD entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes());
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = vec![0xFF, 0xD8, 0xFF, 0xE1];
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpg[2..]);
    out
}

#[test]
fn train_data_exif_orientation() {
    // Stored 32×16: left half red, right half blue.
    let stored = RgbImage::from_fn(32, 16, |x, _| if x < 16 { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) });
    let o = DatasetOptions::new(16, "ohwx", "cat");
    let red = |t: &[f32], x: usize, y: usize| at(t, 16, 0, x, y) > 0.5 && at(t, 16, 2, x, y) < -0.5;
    let blue = |t: &[f32], x: usize, y: usize| at(t, 16, 2, x, y) > 0.5 && at(t, 16, 0, x, y) < -0.5;
    // 6: rotate 90° clockwise to view → 16×32, the stored left (red) on top.
    let ds = load(&[("rot.jpg", jpeg_with_orientation(&stored, 6))], o.clone());
    let it = &ds.items[0];
    assert_eq!((it.width, it.height, it.reoriented), (16, 32, true));
    let t = ds.image(0, Augment { x: 0, y: 0, flip: false }).unwrap();
    assert!(red(&t, 8, 2) && red(&t, 2, 14), "top rows should be red");
    let t = ds.image(0, Augment { x: 0, y: 16, flip: false }).unwrap();
    assert!(blue(&t, 8, 2) && blue(&t, 8, 13), "bottom rows should be blue");
    // 3: rotate 180° → red on the right.
    let ds = load(&[("r180.jpg", jpeg_with_orientation(&stored, 3))], o.clone());
    assert_eq!((ds.items[0].width, ds.items[0].height), (32, 16));
    let t = ds.image(0, Augment { x: 16, y: 0, flip: false }).unwrap();
    assert!(red(&t, 8, 8));
    // 1 (and no EXIF): as stored.
    let ds = load(&[("plain.jpg", jpeg_with_orientation(&stored, 1))], o);
    assert!(!ds.items[0].reoriented);
    let t = ds.image(0, Augment { x: 0, y: 0, flip: false }).unwrap();
    assert!(red(&t, 8, 8));
}

#[test]
fn train_data_captions_repeats_and_tags() {
    let img = |c: u8| encode(&solid(64, 64, [c, c, c]), ImageFormat::Png);
    let list = vec![
        ("data/10_sks dog/a.png", img(1)),
        ("data/10_sks dog/a.txt", b"Sks dog, Grass , sunny\nignored second line".to_vec()),
        ("data/10_sks dog/a.caption", b"not used: .txt wins".to_vec()),
        ("data/10_sks dog/b.jpg", encode(&solid(64, 64, [9, 9, 9]), ImageFormat::Jpeg)),
        ("data/10_sks dog/c.webp", encode(&solid(64, 64, [5, 5, 5]), ImageFormat::WebP)),
        ("data/10_sks dog/c.caption", b"a photo, grass".to_vec()),
        ("data/3_style/d.png", img(2)),
        ("data/3_style/e.png", img(3)),
        ("data/3_style/e.txt", b" \n".to_vec()),
        ("data/photos/f.png", img(4)),
        ("g.png", img(5)),
        ("g.txt", b"ohwx cat on a sofa, indoors".to_vec()),
        ("data/10_sks dog/orphan.txt", b"nobody".to_vec()),
        ("data/.DS_Store", b"junk".to_vec()),
        ("notes.md", b"# notes".to_vec()),
    ];
    let ds = load(&list, opts());
    let got: Vec<(&str, &str, u32, &str, CaptionSource)> = ds
        .items
        .iter()
        .map(|i| (i.file.as_str(), i.folder.as_str(), i.repeats, i.caption.as_str(), i.caption_source))
        .collect();
    assert_eq!(
        got,
        vec![
            ("data/10_sks dog/a.png", "10_sks dog", 10, "ohwx, Sks dog, Grass , sunny", CaptionSource::File),
            ("data/10_sks dog/b.jpg", "10_sks dog", 10, "ohwx, sks dog", CaptionSource::Folder),
            ("data/10_sks dog/c.webp", "10_sks dog", 10, "ohwx, a photo, grass", CaptionSource::File),
            ("data/3_style/d.png", "3_style", 3, "ohwx, style", CaptionSource::Folder),
            ("data/3_style/e.png", "3_style", 3, "ohwx, style", CaptionSource::Folder),
            ("data/photos/f.png", "1_ohwx cat", 1, "ohwx cat", CaptionSource::Default),
            ("g.png", "1_ohwx cat", 1, "ohwx cat on a sofa, indoors", CaptionSource::File),
        ]
    );
    assert_eq!(ds.items[0].caption_file.as_deref(), Some("data/10_sks dog/a.txt"));
    for w in ["orphan.txt", "e.txt", "notes.md"] {
        assert!(ds.warnings.iter().any(|m| m.contains(w)), "no warning about {w}: {:?}", ds.warnings);
    }
    assert!(!ds.warnings.iter().any(|m| m.contains("DS_Store")));
    // Repeats: 3 × 10 + 2 × 3 + 2 × 1.
    assert_eq!(ds.num_train_images(), 38);
    let dirs = ds.dataset_dirs();
    assert_eq!(
        dirs.iter().map(|(k, d)| (k.as_str(), d.n_repeats, d.img_count)).collect::<Vec<_>>(),
        vec![("10_sks dog", 10, 3), ("1_ohwx cat", 1, 2), ("3_style", 3, 2)]
    );
    let order = ds.epoch_order(5, 0);
    assert_eq!(order.len(), 38);
    for (i, it) in ds.items.iter().enumerate() {
        assert_eq!(order.iter().filter(|&&j| j == i).count(), it.repeats as usize);
    }
    assert_eq!(order, ds.epoch_order(5, 0));
    assert_ne!(order, ds.epoch_order(5, 1));
    // Tag frequency as kohya counts it: per folder, lower-case, once per image.
    let tf = ds.tag_frequency();
    let want: BTreeMap<String, BTreeMap<String, u64>> = [
        ("10_sks dog", vec![("ohwx", 3), ("sks dog", 2), ("grass", 2), ("sunny", 1), ("a photo", 1)]),
        ("3_style", vec![("ohwx", 2), ("style", 2)]),
        ("1_ohwx cat", vec![("ohwx cat", 1), ("ohwx cat on a sofa", 1), ("indoors", 1)]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(|(t, n)| (t.to_string(), n)).collect()))
    .collect();
    assert_eq!(tf, want);

    // Without prepending, captions stay as written.
    let mut o = opts();
    o.prepend_trigger = false;
    o.default_repeats = 4;
    let ds = load(&list, o);
    assert_eq!(ds.items[0].caption, "Sks dog, Grass , sunny");
    assert_eq!((ds.items[5].folder.as_str(), ds.items[5].repeats), ("4_ohwx cat", 4));
}

#[test]
fn train_data_regularization_set() {
    let img = encode(&solid(64, 80, [7, 7, 7]), ImageFormat::Png);
    let ds = load(&[("1_cat/r1.png", img.clone()), ("r2.png", img)], DatasetOptions::regularization(64, "cat"));
    let caps: Vec<&str> = ds.items.iter().map(|i| i.caption.as_str()).collect();
    assert_eq!(caps, vec!["cat", "cat"]);
    assert_eq!(ds.items[1].folder, "1_cat");
    assert_eq!(ds.num_train_images(), 2);
}

#[test]
fn train_data_errors_name_the_file() {
    let good = encode(&solid(64, 64, [1, 1, 1]), ImageFormat::Png);
    let mut truncated = good.clone();
    truncated.truncate(good.len() / 2);
    let gif_bytes = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec();
    // A PNG whose header claims 60000×60000 pixels (its CRC fixed): refused before decoding.
    let mut huge = good.clone();
    huge[16..24].copy_from_slice(&[0, 0, 0xEA, 0x60, 0, 0, 0xEA, 0x60]);
    let crc = crc32fast::hash(&huge[12..29]);
    huge[29..33].copy_from_slice(&crc.to_be_bytes());
    type Case<'a> = (Vec<(&'a str, Vec<u8>)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (vec![("ok.png", good.clone()), ("10_x/broken.png", truncated)], "10_x/broken.png", "damaged"),
        (vec![("text.jpg", b"hello, not an image".to_vec())], "text.jpg", "not a PNG, JPEG or WebP"),
        (vec![("empty.webp", vec![])], "empty.webp", "empty"),
        (vec![("anim.png", gif_bytes)], "anim.png", "GIF"),
        (vec![("pic.bmp", b"BM".to_vec())], "pic.bmp", "PNG, JPEG or WebP"),
        (vec![("a.png", good.clone()), ("a.txt", vec![0xC3, 0x28])], "a.txt", "UTF-8"),
        (vec![("0_none/a.png", good.clone())], "0_none/a.png", "repeat count is 0"),
        (vec![("huge.png", huge)], "huge.png", "60000×60000"),
    ];
    for (list, file, what) in cases {
        let e = err(&list, opts());
        let msg = e.to_string();
        match &e {
            Error::Format { file: f, .. } => assert_eq!(f, file, "{msg}"),
            other => panic!("{file}: expected a format error, got {other:?}"),
        }
        assert!(msg.contains(what), "{file}: `{msg}` does not mention `{what}`");
    }
    let msg = err(&[("notes.txt", b"x".to_vec())], opts()).to_string();
    assert!(msg.contains("no PNG, JPEG or WebP images"), "{msg}");
    let msg = err(&[("a.png", good.clone())], DatasetOptions::new(100, "a", "b")).to_string();
    assert!(msg.contains("multiple of 8"), "{msg}");
}

#[test]
fn train_data_from_dir() {
    let dir = std::env::temp_dir().join(format!("loralab-train-data-{}", std::process::id()));
    let sub = dir.join("5_ohwx cat");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::write(sub.join("a.png"), encode(&solid(64, 64, [1, 2, 3]), ImageFormat::Png)).unwrap();
    std::fs::write(sub.join("a.txt"), "ohwx cat, red").unwrap();
    std::fs::write(dir.join("b.jpg"), encode(&solid(64, 64, [4, 5, 6]), ImageFormat::Jpeg)).unwrap();
    let ds = Dataset::from_dir(&dir, opts()).unwrap();
    let mut got: Vec<(String, u32, String)> = ds.items.iter().map(|i| (i.file.clone(), i.repeats, i.caption.clone())).collect();
    got.sort();
    assert_eq!(
        got,
        vec![("5_ohwx cat/a.png".into(), 5, "ohwx cat, red".into()), ("b.jpg".into(), 1, "ohwx cat".into())]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
