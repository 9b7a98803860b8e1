//! The classifier on images from the demo data generator (tools/demo/data.py): the ground-truth
//! fixtures (tests/fixtures/demo: every shape, colour and background, both counts, all sizes)
//! and the held-out heart dataset (www/datasets/heart, kohya captions).

use loralab::eval::{classify, parse_records, Color, Expected, Score, ShapeKind};
use std::path::{Path, PathBuf};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn classify_png(path: &Path) -> loralab::eval::Classification {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let png = loralab::io::png::decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(png.channels, 3, "{}: RGB", path.display());
    classify(&png.pixels, png.width, png.height).expect("classify")
}

fn assert_at_least(what: &str, s: &Score, percent: f64) {
    for (name, t) in [("shape colour", s.color), ("background", s.background), ("shape kind", s.shape), ("count", s.count)] {
        assert!(t.total > 0, "{what}: no {name} counted");
        assert!(t.percent() >= percent, "{what}: {name} {}/{} ({:.1} %) < {percent} %", t.correct, t.total, t.percent());
    }
}

/// tests/fixtures/demo/truth.jsonl: at least 98 % right on every attribute.
#[test]
fn generator_fixtures() {
    let dir = repo("tests/fixtures/demo");
    let truth = dir.join("truth.jsonl");
    let text = std::fs::read_to_string(&truth).unwrap_or_else(|e| panic!("{}: {e}", truth.display()));
    let records = parse_records(&text, &truth.display().to_string(), false).expect("truth.jsonl parses");
    assert!(records.len() >= 40, "{} records", records.len());
    let mut score = Score::default();
    for r in &records {
        let file = r.extra.get("file").and_then(|v| v.as_str()).unwrap_or_else(|| panic!("line {}: no `file`", r.line));
        let g = classify_png(&dir.join(file));
        let a = score.add(&r.expected, &g);
        if !(a.color && a.background && a.shape && a.count != Some(false)) {
            eprintln!("{file}: want {:?}, got {:?} {} x{} on {} ({:?})", r.expected, g.color, g.shape, g.count, g.background, g.template);
        }
    }
    eprintln!("{} fixture images: {score:?}", records.len());
    assert_at_least("tests/fixtures/demo", &score, 98.0);
}

/// What a heart caption says: `COLOUR sks shape(s)` and `BACKGROUND background` in any order,
/// `two` for two shapes.
fn caption_truth(caption: &str) -> Expected {
    let words: Vec<&str> = caption.split(|c: char| !c.is_ascii_alphabetic()).filter(|w| !w.is_empty()).collect();
    let background = words
        .windows(2)
        .find(|w| w[1] == "background")
        .and_then(|w| Color::parse(w[0]))
        .unwrap_or_else(|| panic!("no background colour in `{caption}`"));
    let color = words
        .windows(2)
        .find(|w| w[1] == "sks")
        .and_then(|w| Color::parse(w[0]))
        .unwrap_or_else(|| panic!("no shape colour in `{caption}`"));
    let count = if words.contains(&"two") { 2 } else { 1 };
    Expected { shape: ShapeKind::Heart, color, background, count: Some(count) }
}

/// The held-out heart concept (www/datasets/heart): the classifier knows hearts too, so LoRA
/// demos are scored the same way.
#[test]
fn heart_dataset() {
    let dir = repo("www/datasets/heart");
    let mut score = Score::default();
    let mut n = 0;
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    names.sort();
    for png in names {
        let caption = std::fs::read_to_string(png.with_extension("txt")).expect("caption file");
        let want = caption_truth(caption.trim());
        let g = classify_png(&png);
        let a = score.add(&want, &g);
        if !(a.color && a.background && a.shape && a.count != Some(false)) {
            eprintln!("{}: want {want:?}, got {:?} {} x{} on {}", png.display(), g.color, g.shape, g.count, g.background);
        }
        n += 1;
    }
    assert_eq!(n, 20, "{}: 20 images", dir.display());
    eprintln!("heart dataset: {score:?}");
    assert_at_least("www/datasets/heart", &score, 98.0);
}
