//! Where an unmerged adapter's cost goes, layer by layer. An adapted linear layer runs two
//! kernels where the plain layer runs one (`nn::Linear::forward`): the stacked down projection
//! `t = x·Dᵀ` (`[rows, R]`, a separate GEMM) and the base GEMM with the adapter
//! (`linear_adapted`: R more reduction steps for `up`, plus reading the packed data). For every
//! adapted layer shape of the UNet at the step's sizes this times the three kernels alone on the
//! model's own weights and adapters:
//!
//! - `base`: `linear(x, W₀, b)` (the merged / no-adapter layer);
//! - `down`: `linear(x, D)` (the extra dispatch);
//! - `empty`: `linear_adapted` with adapter data that adds nothing (rank 0, no terms): the
//!   adapter variant of the kernel alone (its per-element staging hook and epilogue checks);
//! - `adapted`: `linear_adapted(x, W₀, b, t)` (the base kernel with the R extra slices);
//!
//! so the overhead splits into the down projection (`down`), the kernel variant
//! (`empty − base`) and the low-rank reduction steps (`adapted − empty`), each summed over the
//! model's layers of that shape.

use super::{median_min_max, time_kernel, KernelTiming};
use crate::bench::unet::BenchShapes;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::nn::{LayerMut, VisitLayers};
use crate::ops::adapter::{AdapterParams, Operands, NONE};
use crate::ops::matmul::{linear, linear_adapted};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// One layer shape: `rows × k → n`, and how many of the model's adapted layers have it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProfileShape {
    /// A layer with this shape (module path).
    pub example: String,
    pub rows: usize,
    pub k: usize,
    pub n: usize,
    /// Stacked low-rank columns (R).
    pub rank: usize,
    pub layers: usize,
    /// Milliseconds per call (median).
    pub base_ms: f64,
    pub down_ms: f64,
    pub empty_ms: f64,
    pub adapted_ms: f64,
}

/// The per-shape timings and their sums over every adapted layer.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerProfile {
    pub weights: String,
    /// What the milliseconds measure (wall clock, or process CPU time).
    pub clock: String,
    /// Adapters installed while profiling.
    pub adapters: usize,
    pub shapes: Vec<ProfileShape>,
    /// Sums over the adapted layers (ms per step): the plain kernels, the down projections,
    /// the adapter variant's own cost (`empty − base`) and the low-rank reduction steps
    /// (`adapted − empty`).
    pub base_ms: f64,
    pub down_ms: f64,
    pub variant_ms: f64,
    pub lowrank_ms: f64,
    /// The three parts as % of `base_ms`.
    pub down_pct: f64,
    pub variant_pct: f64,
    pub lowrank_pct: f64,
}

/// Rows of a UNet layer's input in one step of `s`: batch × pixels at its block's resolution
/// (batch × context tokens for the cross-attention keys and values).
pub fn layer_rows(name: &str, s: &BenchShapes, context_tokens: usize) -> Option<usize> {
    let levels = s.unet.block_out_channels.len();
    let index = |rest: &str| rest.split('.').next().and_then(|i| i.parse::<usize>().ok());
    let level = if let Some(rest) = name.strip_prefix("down_blocks.") {
        index(rest)?
    } else if let Some(rest) = name.strip_prefix("up_blocks.") {
        levels.checked_sub(1 + index(rest)?)?
    } else if name.starts_with("mid_block.") {
        levels.checked_sub(1)?
    } else {
        return None;
    };
    let [b, _, mut h, mut w] = s.latents;
    if name.ends_with("attn2.to_k") || name.ends_with("attn2.to_v") {
        return Some(b * context_tokens);
    }
    // Each downsampler halves the size, rounding up (stride 2, padding 1).
    for _ in 0..level {
        h = h.div_ceil(2);
        w = w.div_ceil(2);
    }
    Some(b * h * w)
}

struct Group {
    example: String,
    weight: Tensor,
    bias: Option<Tensor>,
    adapters: crate::adapter::LayerAdapters,
    rows: usize,
    layers: usize,
}

/// Profiles every adapted linear layer of `model` (adapters installed and active) at the step
/// sizes of `s`.
#[allow(clippy::too_many_arguments)]
pub async fn profile_layers(
    gpu: &Gpu,
    model: &mut dyn VisitLayers,
    s: &BenchShapes,
    context_tokens: usize,
    weights: &str,
    adapters: usize,
    timing: KernelTiming,
    clock: &dyn Fn() -> f64,
) -> Result<LayerProfile> {
    let mut groups: Vec<Group> = vec![];
    let mut unknown: Option<String> = None;
    model.visit_layers(&mut |layer| {
        let LayerMut::Linear(l) = layer else { return };
        let Some(a) = l.adapters.as_ref().filter(|a| a.is_active()) else { return };
        let Some(rows) = layer_rows(&l.name, s, context_tokens) else {
            unknown.get_or_insert_with(|| l.name.clone());
            return;
        };
        let (k, n) = (l.in_features(), l.out_features());
        match groups.iter_mut().find(|g| g.rows == rows && g.weight.dim(1) == k && g.weight.dim(0) == n) {
            Some(g) => g.layers += 1,
            None => groups.push(Group {
                example: l.name.clone(),
                weight: l.weight.clone(),
                bias: l.bias.clone(),
                adapters: a.clone(),
                rows,
                layers: 1,
            }),
        }
    });
    if let Some(name) = unknown {
        return Err(Error::Invalid(format!("bench lora: no step size known for the adapted layer `{name}`")));
    }
    // Adapter data that adds nothing: rank 0, no terms, no vectors.
    let nothing = gpu.upload(&[0u8; 16], "empty adapter data")?;
    let empty = Operands {
        data: &nothing,
        params: AdapterParams { rank: 0, up: 0, col_scale: 0, terms: 0, table: 0, base_row: NONE, base_col: NONE, bias: NONE },
        lowrank: None,
    };
    let mut shapes = vec![];
    for (i, g) in groups.iter().enumerate() {
        let (k, n) = (g.weight.dim(1), g.weight.dim(0));
        let x = Tensor::from_f32(gpu, &[g.rows, k], &Rng::new(1000 + i as u64).normal_vec(g.rows * k))?;
        let down = g.adapters.down().ok_or_else(|| {
            Error::Invalid(format!("bench lora: the adapters of `{}` have no low-rank part", g.example))
        })?;
        let bias = g.bias.as_ref();
        let base = time_kernel(gpu, timing, clock, || linear(gpu, &x, &g.weight, bias)).await?;
        let down_t = time_kernel(gpu, timing, clock, || linear(gpu, &x, down, None)).await?;
        let empty_t = time_kernel(gpu, timing, clock, || linear_adapted(gpu, &x, &g.weight, bias, &empty)).await?;
        let t = linear(gpu, &x, down, None)?;
        let ops = g.adapters.operands(Some(&t));
        let adapted = time_kernel(gpu, timing, clock, || linear_adapted(gpu, &x, &g.weight, bias, &ops)).await?;
        shapes.push(ProfileShape {
            example: g.example.clone(),
            rows: g.rows,
            k,
            n,
            rank: down.dim(0),
            layers: g.layers,
            base_ms: median_min_max(base).0,
            down_ms: median_min_max(down_t).0,
            empty_ms: median_min_max(empty_t).0,
            adapted_ms: median_min_max(adapted).0,
        });
    }
    let sum = |f: &dyn Fn(&ProfileShape) -> f64| shapes.iter().map(|p| f(p) * p.layers as f64).sum::<f64>();
    let base_ms = sum(&|p| p.base_ms);
    let down_ms = sum(&|p| p.down_ms);
    let variant_ms = sum(&|p| p.empty_ms - p.base_ms);
    let lowrank_ms = sum(&|p| p.adapted_ms - p.empty_ms);
    let pct = |v: f64| if base_ms > 0.0 { 100.0 * v / base_ms } else { 0.0 };
    Ok(LayerProfile {
        weights: weights.to_string(),
        clock: "wall clock".into(),
        adapters,
        down_pct: pct(down_ms),
        variant_pct: pct(variant_ms),
        lowrank_pct: pct(lowrank_ms),
        shapes,
        base_ms,
        down_ms,
        variant_ms,
        lowrank_ms,
    })
}
