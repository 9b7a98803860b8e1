//! Shape kind by template matching, for blurred shapes. Each component's soft membership (how
//! far each pixel's colour has moved from the background towards the shape's colour, 0–1) is
//! compared with every kind's ideal shape, drawn with 4×4 supersampling at the component's
//! centroid and at the size its mass gives, then blurred: a blurred triangle is matched
//! against blurred triangles, not against the sharp outline its threshold no longer has. The
//! kind whose best (size, blur) leaves the smallest squared error wins.
//!
//! The ideal shapes are the demo data's, in a unit box: a circle, an axis-aligned square, a
//! triangle with its apex at the top centre and its base along the bottom, a regular pentagram
//! point up (the box as wide as the star, which is 0.951 of that high, centred), and the heart
//! curve (u² + v² − 1)³ − u² v³ ≤ 0 scaled to fill the box.

use super::ShapeKind;
use serde::Serialize;
use std::sync::OnceLock;

/// The kinds templates exist for.
const KINDS: [ShapeKind; 5] = ShapeKind::NAMED;

/// Relative sizes tried around the size the mass gives.
const SCALES: [f32; 5] = [0.9, 0.95, 1.0, 1.05, 1.1];

/// Gaussian blurs (σ, pixels) tried.
const BLURS: [f32; 6] = [0.0, 0.6, 1.2, 1.8, 2.4, 3.0];

/// Relative error above which no template fits (sharp shapes fit within 0.05, shapes blurred
/// by a small autoencoder within 0.2).
pub(crate) const OTHER_ERROR: f32 = 0.35;

/// How well each kind's template fits the shapes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TemplateFit {
    pub kind: ShapeKind,
    /// 1 − (best error / second-best error).
    pub confidence: f32,
    /// The best fit's blur σ in pixels.
    pub blur: f32,
    /// Per kind: squared error over the squared membership (0 = exact).
    pub errors: Vec<(ShapeKind, f32)>,
}

/// A region of soft membership to match: `w × h` values (row-major) with its top-left corner
/// at `(x0, y0)` in the image.
pub(crate) struct Window {
    pub x0: usize,
    pub y0: usize,
    pub w: usize,
    pub h: usize,
    pub m: Vec<f32>,
}

/// Whether `(u, v)` (box units, origin at the box centre, v down) lies in the unit shape.
fn inside_unit(kind: ShapeKind, u: f32, v: f32) -> bool {
    match kind {
        ShapeKind::Circle => u * u + v * v <= 0.25,
        ShapeKind::Square => u.abs() <= 0.5 && v.abs() <= 0.5,
        ShapeKind::Triangle => v <= 0.5 && u.abs() <= (v + 0.5) / 2.0,
        ShapeKind::Star => {
            let pts = star_points();
            let mut inside = false;
            for i in 0..10 {
                let (a, b) = (pts[i], pts[(i + 9) % 10]);
                if (a.1 > v) != (b.1 > v) && u < (b.0 - a.0) * (v - a.1) / (b.1 - a.1) + a.0 {
                    inside = !inside;
                }
            }
            inside
        }
        ShapeKind::Heart => {
            let (x, y) = (u * 2.0 * 1.139, -(v * 2.0 * 1.118 - 0.118));
            (x * x + y * y - 1.0).powi(3) - x * x * y.powi(3) <= 0.0
        }
        ShapeKind::Other => false,
    }
}

/// The pentagram's ten vertices in the unit box.
fn star_points() -> &'static [(f32, f32); 10] {
    static P: OnceLock<[(f32, f32); 10]> = OnceLock::new();
    P.get_or_init(|| {
        let outer = 1.0 / (2.0 * 72f32.to_radians().sin());
        let inner = outer * 18f32.to_radians().sin() / 54f32.to_radians().sin();
        let height = outer * (1.0 + 36f32.to_radians().cos());
        let cy = -height / 2.0 + outer;
        std::array::from_fn(|i| {
            let r = if i % 2 == 0 { outer } else { inner };
            let a = (i as f32 * 36.0 - 90.0).to_radians();
            (r * a.cos(), cy + r * a.sin())
        })
    })
}

/// Per kind: area over the box area and the centroid's offset from the box centre, measured on
/// a 256 × 256 grid.
fn unit_stats() -> &'static [(f32, f32, f32); 5] {
    static S: OnceLock<[(f32, f32, f32); 5]> = OnceLock::new();
    S.get_or_init(|| {
        const N: usize = 256;
        KINDS.map(|kind| {
            let (mut n, mut su, mut sv) = (0usize, 0f64, 0f64);
            for j in 0..N {
                for i in 0..N {
                    let (u, v) = ((i as f32 + 0.5) / N as f32 - 0.5, (j as f32 + 0.5) / N as f32 - 0.5);
                    if inside_unit(kind, u, v) {
                        n += 1;
                        su += f64::from(u);
                        sv += f64::from(v);
                    }
                }
            }
            let n_f = n.max(1) as f64;
            ((n as f64 / (N * N) as f64) as f32, (su / n_f) as f32, (sv / n_f) as f32)
        })
    })
}

/// The template of `kind` with box side `side` centred at `(bx, by)` (image pixels) over the
/// window, each pixel its covered share (4 × 4 samples).
fn render(kind: ShapeKind, bx: f32, by: f32, side: f32, win: &Window) -> Vec<f32> {
    const S: usize = 4;
    let mut out = vec![0f32; win.w * win.h];
    let half = side / 2.0 + 1.0;
    for j in 0..win.h {
        let py = (win.y0 + j) as f32;
        if py + 1.0 < by - half || py > by + half {
            continue;
        }
        for i in 0..win.w {
            let px = (win.x0 + i) as f32;
            if px + 1.0 < bx - half || px > bx + half {
                continue;
            }
            let mut hits = 0;
            for sy in 0..S {
                for sx in 0..S {
                    let u = (px + (sx as f32 + 0.5) / S as f32 - bx) / side;
                    let v = (py + (sy as f32 + 0.5) / S as f32 - by) / side;
                    hits += usize::from(inside_unit(kind, u, v));
                }
            }
            out[j * win.w + i] = hits as f32 / (S * S) as f32;
        }
    }
    out
}

/// Separable Gaussian blur with zeros outside the window.
fn blur(img: &[f32], w: usize, h: usize, sigma: f32) -> Vec<f32> {
    if sigma <= 0.0 {
        return img.to_vec();
    }
    let rad = (3.0 * sigma).ceil() as isize;
    let k: Vec<f32> = (-rad..=rad).map(|i| (-((i * i) as f32) / (2.0 * sigma * sigma)).exp()).collect();
    let norm: f32 = k.iter().sum();
    let k: Vec<f32> = k.iter().map(|v| v / norm).collect();
    let (wi, hi) = (w as isize, h as isize);
    let mut tmp = vec![0f32; w * h];
    for y in 0..hi {
        for x in 0..wi {
            let mut acc = 0.0;
            for (t, kv) in k.iter().enumerate() {
                let sx = x + t as isize - rad;
                if (0..wi).contains(&sx) {
                    acc += img[(y * wi + sx) as usize] * kv;
                }
            }
            tmp[(y * wi + x) as usize] = acc;
        }
    }
    let mut out = vec![0f32; w * h];
    for y in 0..hi {
        for x in 0..wi {
            let mut acc = 0.0;
            for (t, kv) in k.iter().enumerate() {
                let sy = y + t as isize - rad;
                if (0..hi).contains(&sy) {
                    acc += tmp[(sy * wi + x) as usize] * kv;
                }
            }
            out[(y * wi + x) as usize] = acc;
        }
    }
    out
}

/// Smallest squared error of `kind`'s template over (size, blur) on one window, and that blur.
fn best_error(kind: ShapeKind, stats: (f32, f32, f32), win: &Window) -> (f32, f32) {
    let (mut mass, mut sx, mut sy) = (0f64, 0f64, 0f64);
    for j in 0..win.h {
        for i in 0..win.w {
            let m = f64::from(win.m[j * win.w + i]);
            mass += m;
            sx += m * ((win.x0 + i) as f64 + 0.5);
            sy += m * ((win.y0 + j) as f64 + 0.5);
        }
    }
    if mass <= 0.0 {
        return (f32::INFINITY, 0.0);
    }
    let (cx, cy) = ((sx / mass) as f32, (sy / mass) as f32);
    let (area, du, dv) = stats;
    let side0 = (mass as f32 / area).sqrt();
    let mut best = (f32::INFINITY, 0.0);
    for f in SCALES {
        let side = side0 * f;
        let t = render(kind, cx - du * side, cy - dv * side, side, win);
        for sigma in BLURS {
            let b = blur(&t, win.w, win.h, sigma);
            let e: f32 = b.iter().zip(&win.m).map(|(a, m)| (a - m) * (a - m)).sum();
            if e < best.0 {
                best = (e, sigma);
            }
        }
    }
    best
}

/// Fits every kind to the windows (one per shape) together.
pub(crate) fn fit(windows: &[Window]) -> TemplateFit {
    let stats = unit_stats();
    let norm: f32 = windows.iter().flat_map(|w| &w.m).map(|m| m * m).sum::<f32>().max(f32::MIN_POSITIVE);
    let mut errors = Vec::with_capacity(KINDS.len());
    let mut blurs = Vec::with_capacity(KINDS.len());
    for (k, kind) in KINDS.into_iter().enumerate() {
        let (mut e, mut sigma_sum) = (0.0, 0.0);
        for w in windows {
            let (err, sigma) = best_error(kind, stats[k], w);
            e += err;
            sigma_sum += sigma;
        }
        errors.push((kind, e / norm));
        blurs.push(sigma_sum / windows.len().max(1) as f32);
    }
    let mut order: Vec<usize> = (0..errors.len()).collect();
    order.sort_by(|&a, &b| errors[a].1.total_cmp(&errors[b].1));
    let (best, second) = (order[0], order[1]);
    let (eb, es) = (errors[best].1, errors[second].1);
    let confidence = if es > 0.0 && eb.is_finite() { (1.0 - eb / es).clamp(0.0, 1.0) } else { 0.0 };
    TemplateFit { kind: errors[best].0, confidence, blur: blurs[best], errors }
}
