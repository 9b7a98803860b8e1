//! Scoring generated images of the demo data (docs/demo-model.md): plain backgrounds with one
//! or two shapes of one kind and one colour from a fixed palette. [`classify`] reads an RGB8
//! image back into (background colour, shape colour, shape kind, count); [`parse_prompts`]
//! reads an evaluation prompt file (JSON Lines with the expected attributes);
//! [`Score`] tallies how often the classifier agrees with what the prompts asked for.
//!
//! The classifier is written for this data, not trained: background = the palette colour most
//! border pixels are nearest to; shape pixels = pixels far from the observed background (an
//! Otsu split of the colour distances, never below [`MIN_CONTRAST`]); components = 4-connected
//! groups of shape pixels, small ones ignored; shape colour = the palette colour nearest the
//! median of the largest component's interior; shape kind = the kind whose ideal shape, drawn
//! at each component's centroid and mass and blurred, best matches the components' soft
//! membership (the `template` module), with the largest component's fill ratio, solidity,
//! centroid height, top notch and outline harmonics fitted to per-kind prototypes as a second
//! opinion (the `shape` module documents the measures and their ranges).

mod classify;
mod prompts;
mod shape;
mod template;

pub use classify::{classify, Classification, Confidences, MIN_CONTRAST};
pub use prompts::{parse_prompts, parse_records, EvalRecord, Expected};
pub use shape::{shape_features, ShapeFeatures, ShapeFit};
pub use template::TemplateFit;

use crate::sampler::{SamplerConfig, SamplerKind};
use serde::Serialize;

/// The demo palette (sRGB fill values of the generator).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
    White,
    Black,
}

impl Color {
    pub const ALL: [Color; 8] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::Purple,
        Color::Orange,
        Color::White,
        Color::Black,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::Orange => "orange",
            Color::White => "white",
            Color::Black => "black",
        }
    }

    /// The exact fill value the generator draws with.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [220, 40, 40],
            Color::Green => [40, 170, 60],
            Color::Blue => [40, 80, 220],
            Color::Yellow => [240, 215, 40],
            Color::Purple => [140, 60, 200],
            Color::Orange => [245, 135, 30],
            Color::White => [245, 245, 245],
            Color::Black => [20, 20, 20],
        }
    }

    /// A palette name (case-insensitive; `grey`/`gray` are not in the palette).
    pub fn parse(s: &str) -> Option<Color> {
        let s = s.trim().to_ascii_lowercase();
        Color::ALL.into_iter().find(|c| c.name() == s)
    }

    /// The palette colour nearest to `rgb` (Euclidean in sRGB), skipping `except`, with its
    /// distance and the distance of the runner-up.
    pub fn nearest(rgb: [f32; 3], except: Option<Color>) -> (Color, f32, f32) {
        let mut best = (Color::Red, f32::INFINITY, f32::INFINITY);
        for c in Color::ALL {
            if Some(c) == except {
                continue;
            }
            let d = distance(rgb, c.rgb().map(f32::from));
            if d < best.1 {
                best = (c, d, best.1);
            } else if d < best.2 {
                best.2 = d;
            }
        }
        best
    }
}

impl std::fmt::Display for Color {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

pub(crate) fn distance(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

/// The demo shapes: the four of base training, the held-out heart, and `Other` for a mask
/// that fits none of them (or no shape at all).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShapeKind {
    Circle,
    Square,
    Triangle,
    Star,
    Heart,
    Other,
}

impl ShapeKind {
    /// The kinds a prompt can ask for.
    pub const NAMED: [ShapeKind; 5] =
        [ShapeKind::Circle, ShapeKind::Square, ShapeKind::Triangle, ShapeKind::Star, ShapeKind::Heart];

    pub fn name(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
            ShapeKind::Star => "star",
            ShapeKind::Heart => "heart",
            ShapeKind::Other => "other",
        }
    }

    /// One of [`Self::NAMED`] by name (case-insensitive).
    pub fn parse(s: &str) -> Option<ShapeKind> {
        let s = s.trim().to_ascii_lowercase();
        ShapeKind::NAMED.into_iter().find(|k| k.name() == s)
    }
}

impl std::fmt::Display for ShapeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The sampler a model's `scheduler/scheduler_config.json` names in `_class_name`, where the
/// engine has it (`use_karras_sigmas` picks DPM++ 2M Karras); `None` for a class it does not
/// run (PNDM, SD1.5's stock choice) or no class.
pub fn recommended_sampler(config: &SamplerConfig) -> Option<SamplerKind> {
    let class = config.class_name.as_deref()?;
    let karras = config.use_karras_sigmas == Some(true);
    match class {
        "DPMSolverMultistepScheduler" if karras => Some(SamplerKind::DpmPp2MKarras),
        _ => SamplerKind::ALL.into_iter().find(|k| k.diffusers_class() == class && *k != SamplerKind::DpmPp2MKarras),
    }
}

/// Correct / total of one attribute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub correct: usize,
    pub total: usize,
}

impl Tally {
    pub fn add(&mut self, correct: bool) {
        self.total += 1;
        self.correct += usize::from(correct);
    }

    /// Percentage correct (0 when nothing was counted).
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * self.correct as f64 / self.total as f64
        }
    }
}

/// The quality bar, in percent: shape colour, background colour, shape kind.
pub const BAR: Bar = Bar { color: 90.0, background: 90.0, shape: 80.0 };

/// Minimum percentages per attribute.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Bar {
    pub color: f64,
    pub background: f64,
    pub shape: f64,
}

/// Agreement of classified images with their prompts, per attribute. `count` covers only the
/// prompts that state a count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Score {
    pub color: Tally,
    pub background: Tally,
    pub shape: Tally,
    pub count: Tally,
}

/// Which attributes of one image agree with its prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Agreement {
    pub color: bool,
    pub background: bool,
    pub shape: bool,
    /// `None` when the prompt states no count.
    pub count: Option<bool>,
}

impl Agreement {
    pub fn of(expected: &Expected, got: &Classification) -> Agreement {
        Agreement {
            color: got.color == Some(expected.color),
            background: got.background == expected.background,
            shape: got.shape == expected.shape,
            count: expected.count.map(|n| got.count == n),
        }
    }
}

impl Score {
    /// Adds one image; returns how it agreed.
    pub fn add(&mut self, expected: &Expected, got: &Classification) -> Agreement {
        let a = Agreement::of(expected, got);
        self.color.add(a.color);
        self.background.add(a.background);
        self.shape.add(a.shape);
        if let Some(c) = a.count {
            self.count.add(c);
        }
        a
    }

    /// Whether every attribute meets `bar` (false when nothing was scored).
    pub fn meets(&self, bar: &Bar) -> bool {
        self.color.total > 0
            && self.color.percent() >= bar.color
            && self.background.percent() >= bar.background
            && self.shape.percent() >= bar.shape
    }
}
