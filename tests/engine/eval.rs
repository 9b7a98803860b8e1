//! The demo-data evaluator: the classifier on images drawn here with the palette (every shape,
//! colour and background; sizes, positions, two shapes, blur and noise, other image sizes),
//! evaluation prompt files and their errors, the sampler a model recommends, and the scores.
//! `generator` scores the demo generator's own images (tests/fixtures/demo, the heart dataset);
//! `cli` runs `loralab eval` through the binary.

mod cli;
mod demo;
mod draw;
mod generator;

use draw::{image, Shape, Soften, SHARP};
use loralab::eval::{
    classify, parse_prompts, parse_records, recommended_sampler, Classification, Color, Expected, Score, ShapeKind, BAR,
};
use loralab::rng::Rng;
use loralab::sampler::{SamplerConfig, SamplerKind};

/// `None` when the classification matches; otherwise what differs.
fn mismatch(g: &Classification, bg: Color, color: Color, kind: ShapeKind, count: usize) -> Option<String> {
    if g.background == bg && g.color == Some(color) && g.shape == kind && g.count == count {
        return None;
    }
    Some(format!(
        "want {color} {kind} x{count} on {bg}, got {:?} {} x{} on {} (features {:?}, areas {:?}, threshold {:.1})",
        g.color, g.shape, g.count, g.background, g.features, g.areas, g.threshold
    ))
}

fn pairs() -> Vec<(Color, Color)> {
    let mut v = vec![];
    for bg in Color::ALL {
        for c in Color::ALL {
            if c != bg {
                v.push((bg, c));
            }
        }
    }
    v
}

fn shape(kind: ShapeKind, size: f32, cx: f32, cy: f32) -> Shape {
    Shape { kind, size, cx, cy }
}

#[test]
fn every_shape_colour_and_background() {
    let mut failures = vec![];
    let mut n = 0;
    let mut min_conf = f32::INFINITY;
    for kind in ShapeKind::NAMED {
        for (i, (bg, color)) in pairs().into_iter().enumerate() {
            let (dx, dy) = ((i % 5) as f32 - 2.0, (i % 3) as f32 - 1.0);
            let rgb = image(64, 64, bg, color, &[shape(kind, 24.0, 32.0 + dx, 32.0 + dy)], SHARP);
            let g = classify(&rgb, 64, 64).expect("classify");
            n += 1;
            min_conf = min_conf.min(g.confidence);
            if let Some(m) = mismatch(&g, bg, color, kind, 1) {
                failures.push(m);
            }
        }
    }
    eprintln!("{n} images, {} wrong, lowest confidence {min_conf:.3}", failures.len());
    assert!(failures.is_empty(), "{} of {n} wrong:\n{}", failures.len(), failures.join("\n"));
    assert!(min_conf > 0.5, "lowest confidence {min_conf}");
}

/// Centres on the 3×3 grid of regions with jitter, keeping the box inside the image.
fn grid_centre(w: f32, size: f32, cell: usize, rng: &mut Rng) -> (f32, f32) {
    let j = rng.uniform_vec(2, -3.0, 3.0);
    let lim = |v: f32| v.clamp(size / 2.0 + 1.0, w - size / 2.0 - 1.0);
    let at = |k: usize| w * (1.0 + 2.0 * k as f32) / 6.0;
    (lim(at(cell % 3) + j[0]), lim(at(cell / 3) + j[1]))
}

#[test]
fn sizes_and_positions() {
    let pairs = pairs();
    let mut rng = Rng::new(7);
    let mut failures = vec![];
    let mut n = 0;
    for kind in ShapeKind::NAMED {
        for size in [12.0, 14.0, 16.0, 18.0, 20.0, 24.0, 28.0, 30.0, 35.0, 40.0] {
            for cell in 0..9 {
                let (bg, color) = pairs[n % pairs.len()];
                let (cx, cy) = grid_centre(64.0, size, cell, &mut rng);
                let rgb = image(64, 64, bg, color, &[shape(kind, size, cx, cy)], SHARP);
                let g = classify(&rgb, 64, 64).expect("classify");
                n += 1;
                if let Some(m) = mismatch(&g, bg, color, kind, 1) {
                    failures.push(format!("size {size} at ({cx:.1}, {cy:.1}): {m}"));
                }
            }
        }
    }
    eprintln!("{n} images, {} wrong", failures.len());
    assert!(failures.is_empty(), "{} of {n} wrong:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn two_shapes() {
    let pairs = pairs();
    let mut failures = vec![];
    let mut n = 0;
    for kind in ShapeKind::NAMED {
        for (k, size) in [12.0, 16.0, 20.0, 24.0, 28.0].into_iter().enumerate() {
            // Side by side, above each other, and diagonally.
            let layouts = [((16.0, 32.0), (48.0, 32.0)), ((32.0, 16.0), (32.0, 48.0)), ((16.0, 16.0), (47.0, 47.0))];
            for (l, (a, b)) in layouts.into_iter().enumerate() {
                let (bg, color) = pairs[(7 * n + 3) % pairs.len()];
                let shapes = [shape(kind, size, a.0, a.1), shape(kind, size * if k % 2 == 0 { 1.0 } else { 0.8 }, b.0, b.1)];
                let rgb = image(64, 64, bg, color, &shapes, SHARP);
                let g = classify(&rgb, 64, 64).expect("classify");
                n += 1;
                if let Some(m) = mismatch(&g, bg, color, kind, 2) {
                    failures.push(format!("size {size} layout {l}: {m}"));
                }
            }
        }
    }
    eprintln!("{n} images, {} wrong", failures.len());
    assert!(failures.is_empty(), "{} of {n} wrong:\n{}", failures.len(), failures.join("\n"));
}

/// Blur and noise as in an imperfect generated image: colours and counts stay exact, shape
/// kinds at least 98 %.
#[test]
fn blurred_and_noisy() {
    let pairs = pairs();
    let mut rng = Rng::new(11);
    let (mut n, mut kind_wrong) = (0, 0);
    let mut failures = vec![];
    for (blur, noise) in [(0.7, 6.0), (1.0, 10.0), (1.3, 12.0)] {
        for kind in ShapeKind::NAMED {
            for size in [14.0, 18.0, 24.0, 30.0, 38.0] {
                for cell in [0, 4, 8] {
                    let (bg, color) = pairs[(5 * n + 1) % pairs.len()];
                    let (cx, cy) = grid_centre(64.0, size, cell, &mut rng);
                    let rgb = image(64, 64, bg, color, &[shape(kind, size, cx, cy)], Soften { blur, noise, seed: n as u64 });
                    let g = classify(&rgb, 64, 64).expect("classify");
                    n += 1;
                    if g.background != bg || g.color != Some(color) || g.count != 1 {
                        failures.push(format!("blur {blur} noise {noise} size {size}: {}", mismatch(&g, bg, color, kind, 1).unwrap_or_default()));
                    } else if g.shape != kind {
                        kind_wrong += 1;
                        eprintln!("blur {blur} noise {noise} size {size}: {}", mismatch(&g, bg, color, kind, 1).unwrap_or_default());
                    }
                }
            }
        }
    }
    eprintln!("{n} images: {} colour/count errors, {kind_wrong} shape-kind errors", failures.len());
    assert!(failures.is_empty(), "{} of {n} wrong:\n{}", failures.len(), failures.join("\n"));
    assert!(kind_wrong * 50 <= n, "{kind_wrong} of {n} shape kinds wrong");
}

#[test]
fn other_image_sizes() {
    let mut failures = vec![];
    for (w, h) in [(32usize, 32usize), (96, 96), (128, 80), (48, 64)] {
        let side = w.min(h) as f32;
        for (i, kind) in ShapeKind::NAMED.into_iter().enumerate() {
            let (bg, color) = pairs()[11 * i + w % 7];
            let s = shape(kind, side * 0.45, w as f32 / 2.0, h as f32 / 2.0);
            let g = classify(&image(w, h, bg, color, &[s], SHARP), w, h).expect("classify");
            if let Some(m) = mismatch(&g, bg, color, kind, 1) {
                failures.push(format!("{w}x{h}: {m}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn blank_noise_and_bad_buffers() {
    // A plain background: no shape, its colour still read.
    let g = classify(&image(64, 64, Color::Purple, Color::Red, &[], Soften { blur: 1.0, noise: 8.0, seed: 3 }), 64, 64).expect("classify");
    assert_eq!((g.background, g.color, g.shape, g.count), (Color::Purple, None, ShapeKind::Other, 0));
    assert_eq!(g.confidence, 0.0);
    // Uniform noise: no panic, and no confident answer.
    let noise: Vec<u8> = Rng::new(5).uniform_vec(64 * 64 * 3, 0.0, 255.0).into_iter().map(|v| v as u8).collect();
    let g = classify(&noise, 64, 64).expect("classify");
    assert!(g.confidence < 0.5, "noise classified with confidence {}: {g:?}", g.confidence);
    // Wrong lengths and tiny images are errors, not panics.
    for (len, w, h) in [(64 * 64 * 3 - 1, 64, 64), (0, 0, 0), (12, 2, 2), (3 * 64, 64, 0)] {
        let err = classify(&vec![0u8; len], w, h).expect_err("bad buffer");
        assert!(err.to_string().contains(&format!("{w}x{h}")), "{err}");
    }
}

#[test]
fn clean_images_are_more_confident_than_blurred_ones() {
    let s = [shape(ShapeKind::Triangle, 22.0, 30.0, 33.0)];
    let clean = classify(&image(64, 64, Color::Blue, Color::Orange, &s, SHARP), 64, 64).expect("classify");
    let soft = classify(&image(64, 64, Color::Blue, Color::Orange, &s, Soften { blur: 1.5, noise: 20.0, seed: 1 }), 64, 64).expect("classify");
    assert!(clean.confidence > 0.9, "{clean:?}");
    assert!(soft.confidences.color < clean.confidences.color, "{soft:?} vs {clean:?}");
    assert!(soft.confidences.background < clean.confidences.background + 1e-6, "{soft:?} vs {clean:?}");
}

const PROMPTS: &str = r#"{"prompt": "a red circle on a blue background", "shape": "circle", "color": "red", "background": "blue", "count": 1}

{"prompt": "two yellow squares, green background", "shape": "Square", "color": "yellow", "background": "GREEN", "count": 2, "size": "small"}
{"prompt": "a black star", "shape": "star", "color": "black", "background": "white"}
"#;

#[test]
fn prompt_files() {
    let recs = parse_prompts(PROMPTS, "p.jsonl").expect("parses");
    assert_eq!(recs.len(), 3);
    assert_eq!(recs.iter().map(|r| r.line).collect::<Vec<_>>(), [1, 3, 4]);
    assert_eq!(recs[0].prompt.as_deref(), Some("a red circle on a blue background"));
    assert_eq!(
        recs[1].expected,
        Expected { shape: ShapeKind::Square, color: Color::Yellow, background: Color::Green, count: Some(2) }
    );
    assert_eq!(recs[1].extra.get("size").and_then(|v| v.as_str()), Some("small"));
    assert_eq!(recs[2].expected.count, None);
    // Ground-truth files need no prompt.
    let truth = r#"{"file": "000.png", "shape": "heart", "color": "white", "background": "black", "count": 1}"#;
    let recs = parse_records(truth, "truth.jsonl", false).expect("parses");
    assert_eq!((recs[0].prompt.clone(), recs[0].expected.shape), (None, ShapeKind::Heart));
    assert_eq!(recs[0].extra["file"], "000.png");
}

#[test]
fn prompt_file_errors_name_the_file_line_and_field() {
    let good = r#"{"prompt": "a", "shape": "circle", "color": "red", "background": "blue"}"#;
    let cases: &[(&str, &[&str])] = &[
        ("{\"prompt\": \"a\", \"shape\": ", &["e.jsonl: line 3: malformed JSON"]),
        (r#"{"prompt": "a", "shape": "circle", "color": "pink", "background": "blue"}"#, &["line 3", "`color`", "unknown colour `pink`", "red, green, blue"]),
        (r#"{"prompt": "a", "shape": "circle", "color": "red", "background": "grey"}"#, &["line 3", "`background`", "`grey`"]),
        (r#"{"prompt": "a", "shape": "hexagon", "color": "red", "background": "blue"}"#, &["line 3", "unknown shape `hexagon`", "circle, square"]),
        (r#"{"shape": "circle", "color": "red", "background": "blue"}"#, &["line 3", "field `prompt` is missing"]),
        (r#"{"prompt": 5, "shape": "circle", "color": "red", "background": "blue"}"#, &["line 3", "`prompt` must be a string"]),
        (r#"{"prompt": "a", "shape": "circle", "color": "red"}"#, &["line 3", "field `background` is missing"]),
        (r#"{"prompt": "a", "shape": "circle", "color": "red", "background": "red"}"#, &["line 3", "both red"]),
        (r#"{"prompt": "a", "shape": "circle", "color": "red", "background": "blue", "count": 0}"#, &["line 3", "`count`", ">= 1"]),
        (r#"{"prompt": "a", "shape": "circle", "color": "red", "background": "blue", "count": "two"}"#, &["line 3", "`count`"]),
        ("[1, 2]", &["line 3", "must be a JSON object"]),
    ];
    for (bad, needles) in cases {
        let text = format!("{good}\n\n{bad}\n{good}\n");
        let err = parse_prompts(&text, "e.jsonl").expect_err(bad).to_string();
        assert!(err.starts_with("e.jsonl: "), "{err}");
        for n in *needles {
            assert!(err.contains(n), "{bad}: `{err}` lacks `{n}`");
        }
    }
    let err = parse_prompts("\n  \n", "empty.jsonl").expect_err("empty").to_string();
    assert!(err.contains("empty.jsonl") && err.contains("no records"), "{err}");
}

#[test]
fn recommended_sampler_from_the_scheduler_config() {
    let cfg = |class: &str, karras: Option<bool>| SamplerConfig {
        class_name: Some(class.to_string()),
        use_karras_sigmas: karras,
        ..Default::default()
    };
    assert_eq!(recommended_sampler(&cfg("EulerAncestralDiscreteScheduler", None)), Some(SamplerKind::EulerAncestral));
    assert_eq!(recommended_sampler(&cfg("EulerDiscreteScheduler", Some(true))), Some(SamplerKind::Euler));
    assert_eq!(recommended_sampler(&cfg("DPMSolverMultistepScheduler", None)), Some(SamplerKind::DpmPp2M));
    assert_eq!(recommended_sampler(&cfg("DPMSolverMultistepScheduler", Some(true))), Some(SamplerKind::DpmPp2MKarras));
    assert_eq!(recommended_sampler(&cfg("DDIMScheduler", None)), Some(SamplerKind::Ddim));
    assert_eq!(recommended_sampler(&cfg("LCMScheduler", None)), Some(SamplerKind::Lcm));
    assert_eq!(recommended_sampler(&cfg("PNDMScheduler", None)), None);
    assert_eq!(recommended_sampler(&SamplerConfig::default()), None);
}

#[test]
fn scores_and_the_bar() {
    let e = Expected { shape: ShapeKind::Star, color: Color::Red, background: Color::Blue, count: Some(2) };
    let star = image(64, 64, Color::Blue, Color::Red, &[shape(ShapeKind::Star, 20.0, 16.0, 16.0), shape(ShapeKind::Star, 20.0, 46.0, 46.0)], SHARP);
    let right = classify(&star, 64, 64).expect("classify");
    let wrong = classify(&image(64, 64, Color::White, Color::Red, &[shape(ShapeKind::Square, 20.0, 30.0, 30.0)], SHARP), 64, 64)
        .expect("classify");
    let mut s = Score::default();
    let a = s.add(&e, &right);
    assert!(a.color && a.background && a.shape && a.count == Some(true), "{a:?} {right:?}");
    let a = s.add(&e, &wrong);
    assert!(a.color && !a.background && !a.shape && a.count == Some(false), "{a:?}");
    s.add(&Expected { count: None, ..e }, &right);
    assert_eq!((s.color.correct, s.color.total, s.background.correct, s.shape.correct), (3, 3, 2, 2));
    assert_eq!((s.count.correct, s.count.total), (1, 2));
    assert!((s.shape.percent() - 200.0 / 3.0).abs() < 1e-9);
    assert!(!s.meets(&BAR));
    s.add(&e, &right);
    s.add(&e, &right);
    s.add(&e, &right);
    s.add(&e, &right);
    // 7 images: background and shape 6/7 = 85.7 %: shape meets 80 %, background misses 90 %.
    assert!(!s.meets(&BAR));
    for _ in 0..3 {
        s.add(&e, &right);
    }
    // 10 images, 9 right: 90 % everywhere.
    assert!(s.meets(&BAR), "{s:?}");
    assert!(!Score::default().meets(&BAR));
}

/// The outline harmonics behind the shape fit: a square's four corners show as harmonic 4, a
/// triangle's three as 3, a star's five points as 5; a circle has none above 0.06; sharp or
/// blurred, small or large.
#[test]
fn outline_harmonics_name_the_corners() {
    for blur in [0.0, 1.0] {
        for size in [16.0, 24.0, 36.0] {
            for (kind, dominant) in [(ShapeKind::Square, 4), (ShapeKind::Triangle, 3), (ShapeKind::Star, 5), (ShapeKind::Circle, 0)] {
                let rgb = image(64, 64, Color::Blue, Color::Yellow, &[shape(kind, size, 31.3, 32.6)], Soften { blur, noise: 0.0, seed: 1 });
                let f = classify(&rgb, 64, 64).expect("classify").features.expect("a shape");
                let h = f.harmonics;
                if dominant == 0 {
                    assert!(h.iter().all(|v| *v < 0.06), "{kind} {size} blur {blur}: {h:?}");
                    continue;
                }
                let top = h[dominant - 1];
                assert!(top > 0.1, "{kind} {size} blur {blur}: {h:?}");
                for (k, v) in h.iter().enumerate().take(5) {
                    assert!(k + 1 == dominant || *v < 0.6 * top, "{kind} {size} blur {blur}: harmonic {} {v} vs {top}: {h:?}", k + 1);
                }
            }
        }
    }
}

/// Heavy blur (σ 2 pixels, as a small autoencoder's decoder leaves shapes): the measures of the
/// thresholded mask lose corners and star points, the blurred templates still tell the kinds
/// apart (at least 97 % of 125 shapes of 18–36 pixels).
#[test]
fn heavy_blur_is_read_by_the_templates() {
    let pairs = pairs();
    let mut rng = Rng::new(13);
    let (mut n, mut kinds, mut measures) = (0, 0, 0);
    for kind in ShapeKind::NAMED {
        for size in [18.0, 22.0, 26.0, 30.0, 36.0] {
            for cell in [0, 2, 4, 6, 8] {
                let (bg, color) = pairs[(3 * n + 2) % pairs.len()];
                let (cx, cy) = grid_centre(64.0, size, cell, &mut rng);
                let rgb = image(64, 64, bg, color, &[shape(kind, size, cx, cy)], Soften { blur: 2.0, noise: 10.0, seed: n as u64 });
                let g = classify(&rgb, 64, 64).expect("classify");
                n += 1;
                assert!(g.background == bg && g.color == Some(color) && g.count == 1, "{}", mismatch(&g, bg, color, kind, 1).unwrap_or_default());
                kinds += usize::from(g.shape == kind);
                measures += usize::from(g.shape_by_measures == Some(kind));
                let blur = g.template.as_ref().map_or(0.0, |t| t.blur);
                if g.shape == kind {
                    assert!((1.2..=3.0).contains(&blur), "{kind} {size}: fitted blur {blur}");
                }
            }
        }
    }
    eprintln!("σ 2: templates {kinds}/{n}, measures {measures}/{n}");
    assert!(kinds * 100 >= 97 * n, "templates {kinds}/{n}");
}
