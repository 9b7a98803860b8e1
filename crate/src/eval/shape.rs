//! Shape kind from one component's mask. Seven measures separate the demo shapes; the ranges
//! are those of the generator's shapes (tools/demo/data.py) from 12 to 40 pixels:
//!
//! | kind | fill (area / box) | solidity (area / hull) | centroid height | top notch | outline harmonics |
//! |---|---|---|---|---|---|
//! | circle | 0.69–0.84 (π/4) | 0.89–0.97 | 0.47–0.53 | ≤ 0 | all ≤ 0.05 |
//! | square | 0.98–1 | 0.99–1 | 0.5 | 0 | 4th 0.12–0.16 |
//! | triangle (apex up) | 0.50–0.62 | 0.88–0.96 | 0.63–0.67 (2/3) | < 0 | 3rd 0.25–0.36 |
//! | star (regular pentagram) | 0.34–0.51 | 0.49–0.66 | 0.49–0.59 | < 0 | 5th 0.30–0.50 |
//! | heart | 0.66–0.78 | 0.87–0.96 | 0.40–0.48 | 0–0.14 | 3rd 0.10–0.16 |
//!
//! Centroid height is measured from the box's top, over the box height; the notch is how far
//! the top edge at the centre column lies below the highest point of each side (a heart's two
//! lobes), over the box height; the harmonics are those of the outline's distance from the
//! centroid over the angle, relative to its mean. The hull is taken over pixel corners, so a
//! filled rectangle has solidity exactly 1. Blur rounds corners and fills a star's notches
//! (fill and solidity rise towards a circle's) but keeps the dominant harmonic. Each kind is a
//! prototype with a tolerance per measure; the fit is the kind with the smallest squared,
//! tolerance-scaled distance, its confidence the softmax weight of that distance among the
//! kinds.

use super::ShapeKind;
use serde::Serialize;

/// Measures of one component (coordinates in pixels).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ShapeFeatures {
    pub area: usize,
    /// Bounding box: left, top, width, height.
    pub bbox: [usize; 4],
    pub fill: f32,
    pub solidity: f32,
    /// Box width / height.
    pub aspect: f32,
    pub centroid_y: f32,
    pub notch: f32,
    /// Relative amplitudes of harmonics 1–6 of the outline's distance from the centroid over
    /// the angle: a star's five points show as harmonic 5, a triangle's corners as 3, a
    /// square's as 4; a circle has none. Blur lowers them but keeps which one stands out.
    pub harmonics: [f32; 6],
}

/// How [`ShapeFeatures`] fit the kinds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ShapeFit {
    /// The best kind, or `Other` when even the best is far from its prototype.
    pub kind: ShapeKind,
    /// Softmax weight of the best kind (0 for `Other`).
    pub confidence: f32,
    /// Squared, tolerance-scaled distance to each named kind's prototype.
    pub distances: Vec<(ShapeKind, f32)>,
}

/// The measures of the pixels `(x, y)` of one component (none: `None`).
pub fn shape_features(pixels: &[(usize, usize)]) -> Option<ShapeFeatures> {
    let (&(fx, fy), _) = pixels.split_first()?;
    let (mut x0, mut x1, mut y0, mut y1) = (fx, fx, fy, fy);
    for &(x, y) in pixels {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let (w, h) = (x1 - x0 + 1, y1 - y0 + 1);
    // Per row: leftmost and rightmost pixel; per column: topmost.
    let mut rows = vec![(usize::MAX, 0usize); h];
    let mut tops = vec![usize::MAX; w];
    let (mut sum_x, mut sum_y) = (0.0f64, 0.0f64);
    for &(x, y) in pixels {
        let r = &mut rows[y - y0];
        r.0 = r.0.min(x);
        r.1 = r.1.max(x);
        let t = &mut tops[x - x0];
        *t = (*t).min(y - y0);
        sum_x += (x - x0) as f64 + 0.5;
        sum_y += (y - y0) as f64 + 0.5;
    }
    let mut corners = Vec::with_capacity(4 * h);
    for (i, &(l, r)) in rows.iter().enumerate() {
        if l == usize::MAX {
            continue;
        }
        let y = (y0 + i) as i64;
        let (l, r) = (l as i64, r as i64 + 1);
        corners.extend([(l, y), (l, y + 1), (r, y), (r, y + 1)]);
    }
    let hull_area = polygon_area(&convex_hull(corners));
    let area = pixels.len();
    let fill = area as f32 / (w * h) as f32;
    let solidity = if hull_area > 0.0 { (area as f64 / hull_area) as f32 } else { 1.0 };
    Some(ShapeFeatures {
        area,
        bbox: [x0, y0, w, h],
        fill,
        solidity: solidity.min(1.0),
        aspect: w as f32 / h as f32,
        centroid_y: (sum_y / area as f64 / h as f64) as f32,
        notch: notch(&tops, h),
        harmonics: harmonics(pixels, x0 as f64 + sum_x / area as f64, y0 as f64 + sum_y / area as f64),
    })
}

/// Angular bins of the outline.
const BINS: usize = 36;

/// Harmonics 1–6 of the farthest pixel distance from the centroid `(cx, cy)` per angular bin
/// (empty bins interpolated from their neighbours), each as 2·|cₖ| / c₀.
fn harmonics(pixels: &[(usize, usize)], cx: f64, cy: f64) -> [f32; 6] {
    use std::f64::consts::TAU;
    let mut r = [f64::NAN; BINS];
    for &(x, y) in pixels {
        let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
        let bin = (((dy.atan2(dx) + TAU) % TAU) / TAU * BINS as f64) as usize % BINS;
        // The pixel's far half reaches about half a pixel further out.
        let d = (dx * dx + dy * dy).sqrt() + 0.5;
        if r[bin].is_nan() || r[bin] < d {
            r[bin] = d;
        }
    }
    if r.iter().all(|v| v.is_nan()) {
        return [0.0; 6];
    }
    let mut full = r;
    for (i, slot) in full.iter_mut().enumerate() {
        if slot.is_finite() {
            continue;
        }
        // Nearest filled bins before and after, circularly.
        let prev = (1..BINS).map(|k| (i + BINS - k) % BINS).find(|&j| r[j].is_finite()).unwrap_or(i);
        let next = (1..BINS).map(|k| (i + k) % BINS).find(|&j| r[j].is_finite()).unwrap_or(i);
        let (dp, dn) = (((i + BINS - prev) % BINS) as f64, ((next + BINS - i) % BINS) as f64);
        *slot = if dp + dn > 0.0 { (r[prev] * dn + r[next] * dp) / (dp + dn) } else { r[prev] };
    }
    let c0: f64 = full.iter().sum();
    let mut out = [0f32; 6];
    for (k, o) in out.iter_mut().enumerate() {
        let (mut re, mut im) = (0.0, 0.0);
        for (i, v) in full.iter().enumerate() {
            let a = TAU * (k + 1) as f64 * (i as f64 + 0.5) / BINS as f64;
            re += v * a.cos();
            im -= v * a.sin();
        }
        *o = (2.0 * (re * re + im * im).sqrt() / c0) as f32;
    }
    out
}

/// Depth of the top edge at the centre column below the lower of the two sides' highest
/// points, over the height (positive for a heart's dip, ≤ 0 for the other shapes).
fn notch(tops: &[usize], h: usize) -> f32 {
    let w = tops.len();
    if w < 5 {
        return 0.0;
    }
    let centre = (w - 1) as f32 / 2.0;
    let mid = tops
        .iter()
        .enumerate()
        .filter(|(i, _)| (*i as f32 - centre).abs() <= 0.5)
        .map(|(_, t)| *t)
        .min()
        .unwrap_or(usize::MAX);
    let side = |range: std::ops::Range<usize>| tops[range].iter().copied().min().unwrap_or(usize::MAX);
    let band = ((w as f32 * 0.15).round() as usize).max(1);
    let left_end = (centre.floor() as usize).saturating_sub(band);
    let right_start = (centre.ceil() as usize + band + 1).min(w);
    let (left, right) = (side(0..left_end), side(right_start..w));
    if mid == usize::MAX || left == usize::MAX || right == usize::MAX {
        return 0.0;
    }
    (mid as f32 - left.max(right) as f32) / h as f32
}

/// Convex hull of integer points (Andrew's monotone chain), counter-clockwise.
fn convex_hull(mut pts: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    pts.sort_unstable();
    pts.dedup();
    if pts.len() < 3 {
        return pts;
    }
    let mut lower = half_hull(pts.iter().copied());
    let mut upper = half_hull(pts.iter().rev().copied());
    lower.pop();
    upper.pop();
    lower.extend(upper);
    lower
}

/// One chain of the monotone-chain hull: points kept only where the path turns left.
fn half_hull(points: impl Iterator<Item = (i64, i64)>) -> Vec<(i64, i64)> {
    let cross = |o: (i64, i64), a: (i64, i64), b: (i64, i64)| (a.0 - o.0) * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0);
    let mut chain: Vec<(i64, i64)> = Vec::new();
    for p in points {
        while let [.., a, b] = chain[..] {
            if cross(a, b, p) > 0 {
                break;
            }
            chain.pop();
        }
        chain.push(p);
    }
    chain
}

fn polygon_area(poly: &[(i64, i64)]) -> f64 {
    let n = poly.len();
    let twice: i64 = (0..n).map(|i| {
        let (a, b) = (poly[i], poly[(i + 1) % n]);
        a.0 * b.1 - b.0 * a.1
    }).sum();
    twice.unsigned_abs() as f64 / 2.0
}

/// Which side of a prototype value is penalised.
#[derive(Clone, Copy)]
enum Side {
    Both,
    /// Only values below the prototype (e.g. solidity of a convex shape).
    Below,
    /// Only values above it.
    Above,
}

/// (prototype, tolerance, side) for fill, solidity, centroid height, notch and harmonics 3, 4
/// and 5 (measured on drawn shapes from 12 to 40 pixels, sharp and blurred).
type Prototype = [(f32, f32, Side); 7];

fn prototype(kind: ShapeKind) -> Option<Prototype> {
    use Side::*;
    // "None of this harmonic" and "no notch".
    let flat = (0.0, 0.05, Above);
    Some(match kind {
        ShapeKind::Circle => [(0.78, 0.06, Both), (0.94, 0.04, Below), (0.5, 0.05, Both), flat, flat, flat, flat],
        ShapeKind::Square => {
            [(0.96, 0.05, Below), (0.97, 0.04, Below), (0.5, 0.05, Both), (0.02, 0.04, Above), flat, (0.14, 0.04, Both), flat]
        }
        ShapeKind::Triangle => [(0.55, 0.07, Both), (0.93, 0.05, Below), (0.64, 0.05, Both), flat, (0.28, 0.06, Both), flat, flat],
        ShapeKind::Star => [(0.42, 0.12, Both), (0.57, 0.12, Both), (0.55, 0.06, Both), flat, flat, flat, (0.38, 0.1, Both)],
        ShapeKind::Heart => {
            [(0.75, 0.05, Both), (0.94, 0.04, Below), (0.43, 0.03, Both), (0.05, 0.04, Both), (0.12, 0.03, Both), flat, flat]
        }
        ShapeKind::Other => return None,
    })
}

/// Distance beyond which no kind fits (about seven tolerances on one measure).
const OTHER_DISTANCE: f32 = 50.0;

impl ShapeFeatures {
    /// The kind these measures fit best.
    pub fn fit(&self) -> ShapeFit {
        let h = self.harmonics;
        let values = [self.fill, self.solidity, self.centroid_y, self.notch, h[2], h[3], h[4]];
        let distances: Vec<(ShapeKind, f32)> = ShapeKind::NAMED
            .iter()
            .filter_map(|&k| {
                let p = prototype(k)?;
                let d = values
                    .iter()
                    .zip(p)
                    .map(|(&v, (mu, tol, side))| {
                        let z = (v - mu) / tol;
                        match side {
                            Side::Below if v > mu => 0.0,
                            Side::Above if v < mu => 0.0,
                            _ => z * z,
                        }
                    })
                    .sum();
                Some((k, d))
            })
            .collect();
        let (best, best_d) = distances
            .iter()
            .copied()
            .fold((ShapeKind::Other, f32::INFINITY), |acc, (k, d)| if d < acc.1 { (k, d) } else { acc });
        if best_d.is_nan() || best_d > OTHER_DISTANCE {
            return ShapeFit { kind: ShapeKind::Other, confidence: 0.0, distances };
        }
        let total: f32 = distances.iter().map(|(_, d)| (-(d - best_d) / 2.0).exp()).sum();
        ShapeFit { kind: best, confidence: 1.0 / total, distances }
    }
}
