//! Backward of the fused attention ([`crate::ops::attention`]), FlashAttention-2 style
//! (`shaders/grad_attention.wgsl`).
//!
//! The forward's [`attention_with_lse`](crate::ops::attention::attention_with_lse) keeps each
//! row's log-sum-exp `L: [B·H, Nq]`, so the probabilities `P = exp(scale·Q·Kᵀ − L)` can be
//! recomputed tile by tile and the Nq × Nk score matrix never exists in the backward either.
//! Two dispatches: `grad_q` over query blocks computes `D = rowsum(dO ⊙ O)` and `dQ`;
//! `grad_kv` over key blocks reads `D` and computes `dK` and `dV`. No atomics: each gradient
//! element is summed by one invocation in a fixed order, so results are bit-reproducible.
//! Layouts as in the forward: `[B, N, H·D]` with heads interleaved in the last dimension.

use crate::error::{shape_err, Result};
use crate::gpu::Gpu;
use crate::ops::attention::{self as fwd, AttentionOpts, MAX_HEAD_DIM};
use crate::ops::Params;
use crate::shader::{Defines, ShaderSource};
use crate::tensor::Tensor;

const SHADER: &str = "grad_attention.wgsl";
const OP: &str = "attention_backward";

pub static SHADERS: &[ShaderSource] = &[ShaderSource {
    name: SHADER,
    source: crate::wgsl!("grad_attention.wgsl"),
    flag_axes: &[],
    values: &[("HEAD_DIM", "40u"), ("ROWS", "64u"), ("STAGE", "48u")],
    entries: &["grad_q", "grad_kv"],
    top_level: true,
}];

/// Tile sizes of the backward kernels: `rows` queries (`grad_q`) or keys (`grad_kv`) per
/// workgroup, one invocation each; the other side staged `stage` rows at a time (a multiple
/// of 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiles {
    pub rows: usize,
    pub stage: usize,
}

/// Rows per workgroup when the device allows it.
pub const DEFAULT_ROWS: usize = 64;
/// Longest staged tile used.
pub const MAX_STAGE: usize = 64;

impl Tiles {
    /// Workgroup memory the kernels use for head dimension `d`, in bytes: two tiles of rows of
    /// ceil(d/4) vec4, and L and D of the staged queries.
    pub fn workgroup_bytes(&self, d: usize) -> usize {
        self.stage * (2 * d.div_ceil(4) * 16 + 8)
    }

    pub fn invocations(&self) -> usize {
        self.rows
    }

    /// The valued defines of the shader variant for head dimension `d`.
    pub fn defines(&self, d: usize) -> Defines {
        Defines::new()
            .value("HEAD_DIM", format!("{d}u"))
            .value("ROWS", format!("{}u", self.rows))
            .value("STAGE", format!("{}u", self.stage))
    }
}

/// Tile sizes for head dimension `d` within `workgroup_bytes` of workgroup memory and
/// `max_invocations` per workgroup, chosen as the forward's `tiles_for`. `None` when `d` is 0,
/// above [`MAX_HEAD_DIM`], or no tiling fits.
pub fn tiles_for(d: usize, workgroup_bytes: u32, max_invocations: u32) -> Option<Tiles> {
    if d == 0 || d > MAX_HEAD_DIM {
        return None;
    }
    let rows = DEFAULT_ROWS.min(max_invocations as usize);
    let per_row = Tiles { rows, stage: 1 }.workgroup_bytes(d);
    let stage = (workgroup_bytes as usize / per_row).min(MAX_STAGE) / 4 * 4;
    (rows >= 1 && stage >= 4).then_some(Tiles { rows, stage })
}

/// What the backward needs from the forward: its inputs, its output and the log-sum-exp
/// `lse: [B·H, Nq]` of [`attention_with_lse`](crate::ops::attention::attention_with_lse).
#[derive(Clone, Copy)]
pub struct Saved<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub out: &'a Tensor,
    pub lse: &'a Tensor,
}

/// Gradients of the loss with respect to the forward's inputs, each shaped like its input.
pub struct Grads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

/// Checks shapes and returns (B, Nq, Nk, D).
fn check(s: &Saved<'_>, d_out: &Tensor, opts: &AttentionOpts) -> Result<(usize, usize, usize, usize)> {
    let (b, nq, nk, d) = fwd::check(s.q, s.k, s.v, opts)?;
    for t in [s.out, s.lse, d_out] {
        t.expect_f32(OP)?;
    }
    if s.out.shape() != s.q.shape() || d_out.shape() != s.q.shape() {
        return Err(shape_err(
            OP,
            format!(
                "the output {:?} and its gradient {:?} must be shaped like q {:?}",
                s.out.shape(),
                d_out.shape(),
                s.q.shape()
            ),
        ));
    }
    if s.lse.shape() != [b * opts.heads, nq] {
        return Err(shape_err(
            OP,
            format!(
                "the log-sum-exp must be [B·H, Nq] = [{}, {nq}]; got {:?} (from attention_with_lse)",
                b * opts.heads,
                s.lse.shape()
            ),
        ));
    }
    Ok((b, nq, nk, d))
}

/// Gradients of `softmax(scale · Q·Kᵀ [+ causal mask]) · V` with respect to Q, K and V, given
/// the forward's saved tensors and the output's gradient `d_out: [B, Nq, H·D]`; `opts` must be
/// the forward's.
pub fn attention_backward(gpu: &Gpu, saved: &Saved<'_>, d_out: &Tensor, opts: AttentionOpts) -> Result<Grads> {
    let (_, _, _, d) = check(saved, d_out, &opts)?;
    let caps = gpu.caps();
    let tiles = tiles_for(d, caps.max_workgroup_storage, caps.max_invocations_per_workgroup).ok_or_else(|| {
        shape_err(OP, format!("head dimension {d} does not fit {} bytes of workgroup memory", caps.max_workgroup_storage))
    })?;
    attention_backward_tiled(gpu, saved, d_out, opts, tiles)
}

/// [`attention_backward`] with explicit tile sizes (which must fit the device).
pub fn attention_backward_tiled(
    gpu: &Gpu,
    saved: &Saved<'_>,
    d_out: &Tensor,
    opts: AttentionOpts,
    tiles: Tiles,
) -> Result<Grads> {
    let (b, nq, nk, d) = check(saved, d_out, &opts)?;
    let caps = gpu.caps();
    if tiles.rows == 0
        || tiles.stage == 0
        || !tiles.stage.is_multiple_of(4)
        || tiles.invocations() > (caps.max_invocations_per_workgroup as usize).min(256)
        || tiles.workgroup_bytes(d) > caps.max_workgroup_storage as usize
    {
        return Err(shape_err(
            OP,
            format!(
                "tiles {tiles:?} for head dimension {d} need {} bytes / {} invocations; the device allows {} / {}",
                tiles.workgroup_bytes(d),
                tiles.invocations(),
                caps.max_workgroup_storage,
                caps.max_invocations_per_workgroup
            ),
        ));
    }
    let Saved { q, k, v, out, lse } = *saved;
    let dq = Tensor::empty(gpu, q.shape())?;
    let dk = Tensor::empty(gpu, k.shape())?;
    let dv = Tensor::empty(gpu, v.shape())?;
    let delta = Tensor::empty(gpu, &[b * opts.heads, nq])?;
    let scale = opts.scale.unwrap_or(1.0 / (d as f32).sqrt());
    let defines = tiles.defines(d);
    let params = |rows: usize| {
        Params::new()
            .u(b)
            .u(nq)
            .u(nk)
            .u(opts.heads)
            .u(rows.div_ceil(tiles.rows))
            .u(opts.causal as usize)
            .f(scale * std::f32::consts::LOG2_E)
            .f(scale)
    };
    let grid = |rows: usize| gpu.grid(u32::try_from(b * opts.heads * rows.div_ceil(tiles.rows)).unwrap_or(u32::MAX));
    let inputs = [(1, q.buffer()), (2, k.buffer()), (3, v.buffer()), (4, d_out.buffer()), (5, lse.buffer())];
    let mut binds = inputs.to_vec();
    binds.extend([(6, out.buffer()), (7, delta.buffer()), (8, dq.buffer())]);
    gpu.dispatch(SHADER, "grad_q", &defines, &params(nq).0, &binds, grid(nq))?;
    let mut binds = inputs.to_vec();
    binds.extend([(7, delta.buffer()), (9, dk.buffer()), (10, dv.buffer())]);
    gpu.dispatch(SHADER, "grad_kv", &defines, &params(nk).0, &binds, grid(nk))?;
    Ok(Grads { dq, dk, dv })
}

/// CPU reference in f64: the forward with its log-sum-exp, and the backward from the whole
/// probability row (`dS = P ⊙ (dP − rowsum(P ⊙ dP))`, independent of the kernels' `dO·O`).
pub mod reference {
    /// Shapes and options: `q: [b, nq, heads·d]`, `k, v: [b, nk, heads·d]`.
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub struct Dims {
        pub b: usize,
        pub nq: usize,
        pub nk: usize,
        pub heads: usize,
        pub d: usize,
        /// Softmax scale; `None` means `1/sqrt(d)`.
        pub scale: Option<f64>,
        /// Mask key j > query i.
        pub causal: bool,
    }

    impl Dims {
        pub fn new(b: usize, nq: usize, nk: usize, heads: usize, d: usize) -> Self {
            Self { b, nq, nk, heads, d, scale: None, causal: false }
        }

        fn scale(&self) -> f64 {
            self.scale.unwrap_or(1.0 / (self.d as f64).sqrt())
        }

        /// Keys visible to query `i`.
        fn visible(&self, i: usize) -> usize {
            if self.causal {
                self.nk.min(i + 1)
            } else {
                self.nk
            }
        }

        fn q_at(&self, bi: usize, i: usize, h: usize) -> usize {
            (bi * self.nq + i) * self.heads * self.d + h * self.d
        }

        fn k_at(&self, bi: usize, j: usize, h: usize) -> usize {
            (bi * self.nk + j) * self.heads * self.d + h * self.d
        }
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// The probability row of query `i` of (batch `bi`, head `h`) over its visible keys, and
    /// the row's log-sum-exp of the scaled scores.
    fn probabilities(q: &[f64], k: &[f64], x: &Dims, bi: usize, h: usize, i: usize) -> (Vec<f64>, f64) {
        let d = x.d;
        let qr = &q[x.q_at(bi, i, h)..][..d];
        let s: Vec<f64> = (0..x.visible(i)).map(|j| x.scale() * dot(qr, &k[x.k_at(bi, j, h)..][..d])).collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = s.iter().map(|sj| (sj - m).exp()).sum();
        let p = s.iter().map(|sj| (sj - m).exp() / sum).collect();
        (p, m + sum.ln())
    }

    /// `softmax(scale · Q·Kᵀ [+ causal mask]) · V` per head: the output `[b, nq, heads·d]` and
    /// the log-sum-exp `[b·heads, nq]`.
    pub fn forward(q: &[f64], k: &[f64], v: &[f64], x: &Dims) -> (Vec<f64>, Vec<f64>) {
        let d = x.d;
        let mut out = vec![0.0; x.b * x.nq * x.heads * d];
        let mut lse = vec![0.0; x.b * x.heads * x.nq];
        for bi in 0..x.b {
            for h in 0..x.heads {
                for i in 0..x.nq {
                    let (p, l) = probabilities(q, k, x, bi, h, i);
                    lse[(bi * x.heads + h) * x.nq + i] = l;
                    let o = &mut out[x.q_at(bi, i, h)..][..d];
                    for (j, pj) in p.iter().enumerate() {
                        for (od, vd) in o.iter_mut().zip(&v[x.k_at(bi, j, h)..][..d]) {
                            *od += pj * vd;
                        }
                    }
                }
            }
        }
        (out, lse)
    }

    /// Gradients `(dq, dk, dv)` of the loss given the output's gradient `d_out: [b, nq, heads·d]`.
    pub fn backward(q: &[f64], k: &[f64], v: &[f64], d_out: &[f64], x: &Dims) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let d = x.d;
        let scale = x.scale();
        let mut dq = vec![0.0; q.len()];
        let mut dk = vec![0.0; k.len()];
        let mut dv = vec![0.0; v.len()];
        for bi in 0..x.b {
            for h in 0..x.heads {
                for i in 0..x.nq {
                    let (p, _) = probabilities(q, k, x, bi, h, i);
                    let qi = x.q_at(bi, i, h);
                    let g = &d_out[qi..][..d];
                    let dp: Vec<f64> = (0..p.len()).map(|j| dot(g, &v[x.k_at(bi, j, h)..][..d])).collect();
                    let row = dot(&p, &dp);
                    for (j, (pj, dpj)) in p.iter().zip(&dp).enumerate() {
                        let ds = pj * (dpj - row);
                        let kj = x.k_at(bi, j, h);
                        for dd in 0..d {
                            dq[qi + dd] += scale * ds * k[kj + dd];
                            dk[kj + dd] += scale * ds * q[qi + dd];
                            dv[kj + dd] += pj * g[dd];
                        }
                    }
                }
            }
        }
        (dq, dk, dv)
    }
}
