//! A small rasteriser for the demo data: shapes of the palette on a plain background, with
//! 4×4 supersampled edges, optional Gaussian blur and noise (what an imperfect generated image
//! looks like).

use loralab::eval::{Color, ShapeKind};
use loralab::rng::Rng;

/// One shape: kind, bounding-box side in pixels, centre of the box.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub kind: ShapeKind,
    pub size: f32,
    pub cx: f32,
    pub cy: f32,
}

/// An RGB f32 canvas (0–255).
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub px: Vec<[f32; 3]>,
}

/// The star's inner radius over its outer radius: the regular pentagram's
/// sin 18° / sin 54° ≈ 0.382.
pub const STAR_INNER: f32 = 0.381_966;

impl Canvas {
    pub fn new(width: usize, height: usize, background: Color) -> Canvas {
        Canvas { width, height, px: vec![background.rgb().map(f32::from); width * height] }
    }

    /// Draws `shape` in `color`, blending edge pixels by coverage.
    pub fn draw(&mut self, shape: Shape, color: Color) {
        let c = color.rgb().map(f32::from);
        let r = shape.size / 2.0 + 1.0;
        let (x0, x1) = ((shape.cx - r).floor().max(0.0) as usize, ((shape.cx + r).ceil() as usize).min(self.width));
        let (y0, y1) = ((shape.cy - r).floor().max(0.0) as usize, ((shape.cy + r).ceil() as usize).min(self.height));
        const S: usize = 4;
        for y in y0..y1 {
            for x in x0..x1 {
                let mut hits = 0;
                for sy in 0..S {
                    for sx in 0..S {
                        let px = x as f32 + (sx as f32 + 0.5) / S as f32;
                        let py = y as f32 + (sy as f32 + 0.5) / S as f32;
                        hits += usize::from(inside(&shape, px, py));
                    }
                }
                if hits > 0 {
                    let a = hits as f32 / (S * S) as f32;
                    let p = &mut self.px[y * self.width + x];
                    for ch in 0..3 {
                        p[ch] = p[ch] * (1.0 - a) + c[ch] * a;
                    }
                }
            }
        }
    }

    /// Separable Gaussian blur (edges clamped).
    pub fn blur(&mut self, sigma: f32) {
        let rad = (3.0 * sigma).ceil() as isize;
        let k: Vec<f32> = (-rad..=rad).map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp()).collect();
        let norm: f32 = k.iter().sum();
        let (w, h) = (self.width as isize, self.height as isize);
        for pass in 0..2 {
            let src = self.px.clone();
            for y in 0..h {
                for x in 0..w {
                    let mut acc = [0f32; 3];
                    for (j, kv) in k.iter().enumerate() {
                        let o = j as isize - rad;
                        let (sx, sy) = if pass == 0 { ((x + o).clamp(0, w - 1), y) } else { (x, (y + o).clamp(0, h - 1)) };
                        let p = src[(sy * w + sx) as usize];
                        for ch in 0..3 {
                            acc[ch] += p[ch] * kv;
                        }
                    }
                    self.px[(y * w + x) as usize] = acc.map(|v| v / norm);
                }
            }
        }
    }

    /// Adds uniform noise in ±`amp` to every channel.
    pub fn noise(&mut self, amp: f32, seed: u64) {
        let mut rng = Rng::new(seed);
        let n = self.px.len() * 3;
        let u = rng.uniform_vec(n, -amp, amp);
        for (i, p) in self.px.iter_mut().enumerate() {
            for ch in 0..3 {
                p[ch] += u[3 * i + ch];
            }
        }
    }

    pub fn rgb8(&self) -> Vec<u8> {
        self.px.iter().flat_map(|p| p.map(|v| v.round().clamp(0.0, 255.0) as u8)).collect()
    }
}

fn inside(s: &Shape, x: f32, y: f32) -> bool {
    let half = s.size / 2.0;
    let (dx, dy) = (x - s.cx, y - s.cy);
    match s.kind {
        ShapeKind::Circle => dx * dx + dy * dy <= half * half,
        ShapeKind::Square => dx.abs() <= half && dy.abs() <= half,
        // Apex at the top centre, base along the bottom of the box.
        ShapeKind::Triangle => dy <= half && dx.abs() <= (dy + half) / 2.0,
        ShapeKind::Star => {
            // Point up; outer radius so that the star's width (2 R sin 72°) is the box side, the
            // box (height R (1 + cos 36°)) centred on the centre.
            let outer = s.size / (2.0 * (72f32).to_radians().sin());
            let height = outer * (1.0 + (36f32).to_radians().cos());
            let centre_y = s.cy - height / 2.0 + outer;
            let pts: Vec<(f32, f32)> = (0..10)
                .map(|i| {
                    let r = if i % 2 == 0 { outer } else { outer * STAR_INNER };
                    let a = (i as f32 * 36.0 - 90.0).to_radians();
                    (s.cx + r * a.cos(), centre_y + r * a.sin())
                })
                .collect();
            point_in_polygon(&pts, x, y)
        }
        ShapeKind::Heart => {
            // The classic heart curve (u² + v² − 1)³ − u² v³ ≤ 0, which spans u in ±1.139 and
            // v in [−1, 1.236], scaled to the box.
            let u = dx / half * 1.139;
            let v = -(dy / half * 1.118 - 0.118);
            (u * u + v * v - 1.0).powi(3) - u * u * v.powi(3) <= 0.0
        }
        ShapeKind::Other => false,
    }
}

fn point_in_polygon(pts: &[(f32, f32)], x: f32, y: f32) -> bool {
    let mut inside = false;
    let n = pts.len();
    for i in 0..n {
        let (a, b) = (pts[i], pts[(i + n - 1) % n]);
        if (a.1 > y) != (b.1 > y) && x < (b.0 - a.0) * (y - a.1) / (b.1 - a.1) + a.0 {
            inside = !inside;
        }
    }
    inside
}

/// What happens to a drawn image: Gaussian blur σ and uniform noise ±`noise` (seeded), each
/// when non-zero.
#[derive(Clone, Copy, Debug)]
pub struct Soften {
    pub blur: f32,
    pub noise: f32,
    pub seed: u64,
}

/// No blur, no noise.
pub const SHARP: Soften = Soften { blur: 0.0, noise: 0.0, seed: 0 };

/// One image: `shapes` in `color` on `background`, then softened.
pub fn image(w: usize, h: usize, background: Color, color: Color, shapes: &[Shape], soften: Soften) -> Vec<u8> {
    let mut c = Canvas::new(w, h, background);
    for s in shapes {
        c.draw(*s, color);
    }
    if soften.blur > 0.0 {
        c.blur(soften.blur);
    }
    if soften.noise > 0.0 {
        c.noise(soften.noise, soften.seed);
    }
    c.rgb8()
}
