//! The image side of the evaluator: background, shape pixels, components, colour and kind.

use super::shape::{shape_features, ShapeFeatures};
use super::template::{self, TemplateFit, Window};
use super::{distance, Color, ShapeKind};
use crate::error::{Error, Result};
use serde::Serialize;

/// The smallest colour distance (sRGB, 0–441) from the background that can count as a shape:
/// the Otsu threshold is raised to this on images with little contrast, so that noise on a
/// plain background is not read as shapes. The closest pair of palette colours (yellow,
/// orange) are 81 apart.
pub const MIN_CONTRAST: f32 = 30.0;

/// Components smaller than this share of the largest are specks, not shapes.
const MIN_SHARE_OF_LARGEST: f32 = 0.2;

/// Components smaller than this share of the image are specks.
const MIN_SHARE_OF_IMAGE: f32 = 0.005;

/// Confidence of each guess, 0–1.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Confidences {
    /// Share of border pixels nearest the background colour.
    pub background: f32,
    /// (d₂ − d₁) / (d₂ + d₁) for the distances of the shape's median colour to the nearest and
    /// second-nearest palette colours.
    pub color: f32,
    /// Softmax weight of the shape kind's fit.
    pub shape: f32,
}

/// What [`classify`] reads from an image.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Classification {
    pub background: Color,
    /// `None` when no shape was found.
    pub color: Option<Color>,
    /// The kind whose template fits the components best; `Other` when no shape was found or
    /// none fits.
    pub shape: ShapeKind,
    /// The kind the largest component's measures fit best (a second opinion: when it differs,
    /// the shape confidence is halved).
    pub shape_by_measures: Option<ShapeKind>,
    /// Number of sizeable components.
    pub count: usize,
    /// The smallest of [`Confidences`].
    pub confidence: f32,
    pub confidences: Confidences,
    /// Mean of the border pixels nearest the background colour.
    pub background_rgb: [f32; 3],
    /// Per-channel median of the largest component's interior.
    pub shape_rgb: Option<[f32; 3]>,
    /// Distance from the background above which pixels belong to shapes.
    pub threshold: f32,
    /// Pixel counts of the sizeable components, largest first.
    pub areas: Vec<usize>,
    /// Measures of the largest component.
    pub features: Option<ShapeFeatures>,
    /// How each kind's template fits the sizeable components.
    pub template: Option<TemplateFit>,
}

/// Classifies an 8-bit RGB image (`[H, W, 3]` row-major, any size from 3×3; the demo model
/// draws 64×64).
pub fn classify(rgb: &[u8], width: usize, height: usize) -> Result<Classification> {
    if width < 3 || height < 3 || width.checked_mul(height).and_then(|n| n.checked_mul(3)) != Some(rgb.len()) {
        return Err(Error::Invalid(format!(
            "eval::classify: {} bytes for a {width}x{height} RGB image (need width, height >= 3 and 3 bytes per pixel)",
            rgb.len()
        )));
    }
    let pixel = |i: usize| [rgb[3 * i], rgb[3 * i + 1], rgb[3 * i + 2]].map(f32::from);

    // Background: the palette colour most border pixels are nearest to.
    let ring = (width.min(height) / 32).max(1);
    let mut votes = [0usize; 8];
    let mut sums = [[0f64; 3]; 8];
    for y in 0..height {
        for x in 0..width {
            if x >= ring && y >= ring && x + ring < width && y + ring < height {
                continue;
            }
            let p = pixel(y * width + x);
            let (c, _, _) = Color::nearest(p, None);
            let k = c as usize;
            votes[k] += 1;
            for ch in 0..3 {
                sums[k][ch] += f64::from(p[ch]);
            }
        }
    }
    let border: usize = votes.iter().sum();
    let (bg_index, bg_votes) = votes.iter().copied().enumerate().fold((0, 0), |a, (i, v)| if v > a.1 { (i, v) } else { a });
    let background = Color::ALL[bg_index];
    let background_rgb = sums[bg_index].map(|s| (s / bg_votes.max(1) as f64) as f32);

    // Shape pixels: far from the observed background.
    let n = width * height;
    let dist: Vec<f32> = (0..n).map(|i| distance(pixel(i), background_rgb)).collect();
    let threshold = otsu(&dist).max(MIN_CONTRAST);
    let mask: Vec<bool> = dist.iter().map(|&d| d > threshold).collect();

    let mut comps = components(&mask, width, height);
    comps.sort_by_key(|c| std::cmp::Reverse(c.len()));
    let largest = comps.first().map_or(0, Vec::len);
    let min_area = (MIN_SHARE_OF_IMAGE * n as f32).max(MIN_SHARE_OF_LARGEST * largest as f32).max(4.0);
    comps.retain(|c| c.len() as f32 >= min_area);

    let bg_conf = bg_votes as f32 / border.max(1) as f32;
    let Some(main) = comps.first() else {
        return Ok(Classification {
            background,
            color: None,
            shape: ShapeKind::Other,
            shape_by_measures: None,
            count: 0,
            confidence: 0.0,
            confidences: Confidences { background: bg_conf, color: 0.0, shape: 0.0 },
            background_rgb,
            shape_rgb: None,
            threshold,
            areas: vec![],
            features: None,
            template: None,
        });
    };

    // Colour: median of the interior (edge pixels blend into the background).
    let inside = |x: usize, y: usize| x < width && y < height && mask[y * width + x];
    let interior: Vec<(usize, usize)> = main
        .iter()
        .copied()
        .filter(|&(x, y)| {
            x > 0 && y > 0 && inside(x - 1, y) && inside(x + 1, y) && inside(x, y - 1) && inside(x, y + 1)
        })
        .collect();
    let sample = if interior.len() >= (main.len() / 4).max(4) { &interior } else { main };
    let shape_rgb = median_rgb(rgb, width, sample);
    let (color, d1, d2) = Color::nearest(shape_rgb, Some(background));
    let color_conf = if d1 + d2 > 0.0 { (d2 - d1) / (d2 + d1) } else { 0.0 };

    let features = shape_features(main);
    let windows = membership_windows(&dist, width, height, &comps, distance(shape_rgb, background_rgb));
    let fit = template::fit(&windows);
    let by_measures = features.as_ref().map(|f| f.fit().kind);
    let agree = if by_measures == Some(fit.kind) { 1.0 } else { 0.5 };
    let (shape, shape_conf) = if fit.errors.iter().all(|(_, e)| e.is_nan() || *e > template::OTHER_ERROR) {
        (ShapeKind::Other, 0.0)
    } else {
        (fit.kind, fit.confidence * agree)
    };
    let confidences = Confidences { background: bg_conf, color: color_conf, shape: shape_conf };
    Ok(Classification {
        background,
        color: Some(color),
        shape,
        shape_by_measures: by_measures,
        count: comps.len(),
        confidence: bg_conf.min(color_conf).min(shape_conf),
        confidences,
        background_rgb,
        shape_rgb: Some(shape_rgb),
        threshold,
        areas: comps.iter().map(Vec::len).collect(),
        features,
        template: Some(fit),
    })
}

/// One window per component: its bounding box grown by a margin for blur, holding each
/// pixel's membership `distance from the background / contrast` clamped to 0–1, with the
/// pixels of the other components set to 0.
fn membership_windows(dist: &[f32], width: usize, height: usize, comps: &[Vec<(usize, usize)>], contrast: f32) -> Vec<Window> {
    let mut label = vec![usize::MAX; width * height];
    for (k, c) in comps.iter().enumerate() {
        for &(x, y) in c {
            label[y * width + x] = k;
        }
    }
    let contrast = contrast.max(MIN_CONTRAST);
    comps
        .iter()
        .enumerate()
        .filter_map(|(k, c)| {
            let f = shape_features(c)?;
            let [bx, by, bw, bh] = f.bbox;
            let margin = 3 + bw.max(bh) / 4;
            let (x0, y0) = (bx.saturating_sub(margin), by.saturating_sub(margin));
            let (x1, y1) = ((bx + bw + margin).min(width), (by + bh + margin).min(height));
            let (w, h) = (x1 - x0, y1 - y0);
            let mut m = vec![0f32; w * h];
            for j in 0..h {
                for i in 0..w {
                    let idx = (y0 + j) * width + x0 + i;
                    let l = label[idx];
                    if l == usize::MAX || l == k {
                        m[j * w + i] = (dist[idx] / contrast).clamp(0.0, 1.0);
                    }
                }
            }
            Some(Window { x0, y0, w, h, m })
        })
        .collect()
}

/// Otsu's threshold of `values` (≥ 0): the cut of a 256-bin histogram over [0, max] that
/// maximises the between-class variance. Returns the cut's value (0 for constant input).
pub(crate) fn otsu(values: &[f32]) -> f32 {
    const BINS: usize = 256;
    let max = values.iter().copied().fold(0.0f32, f32::max);
    if max <= 0.0 {
        return 0.0;
    }
    let scale = (BINS - 1) as f32 / max;
    let mut hist = [0f64; BINS];
    for &v in values {
        let b = ((v.max(0.0) * scale) as usize).min(BINS - 1);
        hist[b] += 1.0;
    }
    let total: f64 = hist.iter().sum();
    let sum_all: f64 = hist.iter().enumerate().map(|(i, h)| i as f64 * h).sum();
    let (mut w0, mut sum0) = (0.0f64, 0.0f64);
    let (mut best, mut best_var) = (0usize, -1.0f64);
    for (i, &h) in hist.iter().enumerate().take(BINS - 1) {
        w0 += h;
        sum0 += i as f64 * h;
        let w1 = total - w0;
        if w0 == 0.0 || w1 == 0.0 {
            continue;
        }
        let (m0, m1) = (sum0 / w0, (sum_all - sum0) / w1);
        let var = w0 * w1 * (m0 - m1) * (m0 - m1);
        if var > best_var {
            best_var = var;
            best = i;
        }
    }
    // Pixels in bins 0..=best are below the cut.
    (best + 1) as f32 / scale
}

/// 4-connected components of `mask` as lists of `(x, y)`.
fn components(mask: &[bool], width: usize, height: usize) -> Vec<Vec<(usize, usize)>> {
    let mut seen = vec![false; mask.len()];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut comp = Vec::new();
        while let Some(i) = stack.pop() {
            let (x, y) = (i % width, i / width);
            comp.push((x, y));
            let mut visit = |j: usize| {
                if mask[j] && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < width {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - width);
            }
            if y + 1 < height {
                visit(i + width);
            }
        }
        out.push(comp);
    }
    out
}

/// Per-channel median of the pixels `(x, y)` (non-empty) of an RGB8 image.
fn median_rgb(rgb: &[u8], width: usize, pixels: &[(usize, usize)]) -> [f32; 3] {
    let mut hist = [[0usize; 256]; 3];
    for &(x, y) in pixels {
        let i = 3 * (y * width + x);
        for ch in 0..3 {
            hist[ch][usize::from(rgb[i + ch])] += 1;
        }
    }
    let half = pixels.len().div_ceil(2);
    hist.map(|h| {
        let mut acc = 0;
        h.iter().position(|&c| {
            acc += c;
            acc >= half
        })
        .unwrap_or(0) as f32
    })
}
