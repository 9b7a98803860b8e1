//! Fused flash-style scaled dot-product attention (`shaders/attention.wgsl`).
//!
//! `q: [B, Nq, H·D]`, `k, v: [B, Nk, H·D]` with heads interleaved in the last dimension (head h
//! owns columns `h·D..(h+1)·D`), as diffusers' attention processors hold them around head
//! splitting; the output is `[B, Nq, H·D]` in the same layout. Each invocation owns one query
//! row (and its output accumulator) in registers; key and value tiles are staged in workgroup
//! memory and visited under an online softmax, so the Nq × Nk score matrix never exists.
//! [`attention_with_lse`] also returns each row's log-sum-exp, which the backward
//! (`ops::grad::attention`) needs.

use super::Params;
use crate::error::{shape_err, Result};
use crate::gpu::Gpu;
use crate::shader::{Defines, ShaderSource};
use crate::tensor::Tensor;

const SHADER: &str = "attention.wgsl";

pub static SHADERS: &[ShaderSource] = &[ShaderSource {
    name: SHADER,
    source: crate::wgsl!("attention.wgsl"),
    flag_axes: &[&["", "SAVE_LSE"]],
    values: &[("HEAD_DIM", "40u"), ("BQ", "64u"), ("BK", "48u")],
    entries: &["attention"],
    top_level: true,
}];

/// The largest head dimension supported.
pub const MAX_HEAD_DIM: usize = 256;

/// Options of [`attention`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionOpts {
    /// Number of heads H; the last dimension is H·D.
    pub heads: usize,
    /// Softmax scale; `None` means `1/sqrt(D)`.
    pub scale: Option<f32>,
    /// Mask key j > query i.
    pub causal: bool,
}

impl AttentionOpts {
    pub fn new(heads: usize) -> Self {
        Self { heads, scale: None, causal: false }
    }
}

/// Tile sizes of one kernel variant: `bq` queries per workgroup (one invocation each), keys
/// staged `bk` at a time (a multiple of 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiles {
    pub bq: usize,
    pub bk: usize,
}

/// Queries per workgroup when the device allows it.
pub const DEFAULT_BQ: usize = 64;
/// Longest key tile used.
pub const MAX_BK: usize = 64;

impl Tiles {
    /// Workgroup memory the kernel uses for head dimension `d`, in bytes (keys and values as
    /// rows of ceil(d/4) vec4).
    pub fn workgroup_bytes(&self, d: usize) -> usize {
        2 * self.bk * d.div_ceil(4) * 16
    }

    pub fn invocations(&self) -> usize {
        self.bq
    }

    /// The valued defines of the shader variant for head dimension `d`.
    pub fn defines(&self, d: usize) -> Defines {
        Defines::new()
            .value("HEAD_DIM", format!("{d}u"))
            .value("BQ", format!("{}u", self.bq))
            .value("BK", format!("{}u", self.bk))
    }
}

/// Tile sizes for head dimension `d` within `workgroup_bytes` of workgroup memory and
/// `max_invocations` per workgroup. `None` when `d` is 0, above [`MAX_HEAD_DIM`], or no
/// tiling fits.
pub fn tiles_for(d: usize, workgroup_bytes: u32, max_invocations: u32) -> Option<Tiles> {
    if d == 0 || d > MAX_HEAD_DIM {
        return None;
    }
    let bq = DEFAULT_BQ.min(max_invocations as usize);
    let per_key = Tiles { bq, bk: 1 }.workgroup_bytes(d);
    let bk = (workgroup_bytes as usize / per_key).min(MAX_BK) / 4 * 4;
    (bq >= 1 && bk >= 4).then_some(Tiles { bq, bk })
}

/// Checks shapes and returns (B, Nq, Nk, D).
pub(crate) fn check(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttentionOpts) -> Result<(usize, usize, usize, usize)> {
    const OP: &str = "attention";
    for t in [q, k, v] {
        t.expect_f32(OP)?;
    }
    let shapes = || format!("q {:?}, k {:?}, v {:?}, {} heads", q.shape(), k.shape(), v.shape(), opts.heads);
    if q.rank() != 3 || k.rank() != 3 || v.rank() != 3 {
        return Err(shape_err(OP, format!("needs [B, N, H·D] tensors; got {}", shapes())));
    }
    let (b, nq, hd) = (q.dim(0), q.dim(1), q.dim(2));
    let (nk, khd) = (k.dim(1), k.dim(2));
    if k.dim(0) != b || v.shape() != k.shape() || khd != hd {
        return Err(shape_err(OP, format!("k and v must be [B, Nk, H·D] matching q; got {}", shapes())));
    }
    if opts.heads == 0 || hd % opts.heads != 0 {
        return Err(shape_err(OP, format!("last dimension {hd} is not a multiple of the head count; got {}", shapes())));
    }
    let d = hd / opts.heads;
    if d == 0 || d > MAX_HEAD_DIM {
        return Err(shape_err(OP, format!("head dimension {d} outside 1..={MAX_HEAD_DIM}; got {}", shapes())));
    }
    if nk == 0 && b * nq > 0 {
        return Err(shape_err(OP, format!("needs at least one key; got {}", shapes())));
    }
    Ok((b, nq, nk, d))
}

/// `softmax(scale · Q·Kᵀ [+ causal mask]) · V` per head, for `q: [B, Nq, H·D]`,
/// `k, v: [B, Nk, H·D]`; returns `[B, Nq, H·D]`.
pub fn attention(gpu: &Gpu, q: &Tensor, k: &Tensor, v: &Tensor, opts: AttentionOpts) -> Result<Tensor> {
    let (_, _, _, d) = check(q, k, v, &opts)?;
    attention_tiled(gpu, q, k, v, opts, device_tiles(gpu, d)?)
}

/// The device's tiles for head dimension `d`.
fn device_tiles(gpu: &Gpu, d: usize) -> Result<Tiles> {
    let caps = gpu.caps();
    tiles_for(d, caps.max_workgroup_storage, caps.max_invocations_per_workgroup).ok_or_else(|| {
        shape_err(
            "attention",
            format!("head dimension {d} does not fit {} bytes of workgroup memory", caps.max_workgroup_storage),
        )
    })
}

/// [`attention`] with explicit tile sizes (which must fit the device).
pub fn attention_tiled(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: AttentionOpts,
    tiles: Tiles,
) -> Result<Tensor> {
    run(gpu, q, k, v, opts, tiles, None)
}

/// [`attention`] that also returns `L: [B·H, Nq]`, each row's log-sum-exp of its scaled scores
/// `L[b·H + h, i] = ln Σ_j exp(scale · q_i·k_j)` (over the visible keys), so that the
/// probabilities are `exp(scale · q_i·k_j − L)`. The output equals [`attention`]'s bit for bit.
pub fn attention_with_lse(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: AttentionOpts,
) -> Result<(Tensor, Tensor)> {
    let (_, _, _, d) = check(q, k, v, &opts)?;
    attention_with_lse_tiled(gpu, q, k, v, opts, device_tiles(gpu, d)?)
}

/// [`attention_with_lse`] with explicit tile sizes (which must fit the device).
pub fn attention_with_lse_tiled(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: AttentionOpts,
    tiles: Tiles,
) -> Result<(Tensor, Tensor)> {
    let (b, nq, _, _) = check(q, k, v, &opts)?;
    let lse = Tensor::empty(gpu, &[b * opts.heads, nq])?;
    let out = run(gpu, q, k, v, opts, tiles, Some(&lse))?;
    Ok((out, lse))
}

/// Dispatches the kernel; with `lse` (`[B·H, Nq]`) the SAVE_LSE variant, which also writes it.
fn run(
    gpu: &Gpu,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: AttentionOpts,
    tiles: Tiles,
    lse: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, nq, nk, d) = check(q, k, v, &opts)?;
    let caps = gpu.caps();
    if tiles.bq == 0
        || tiles.bk == 0
        || !tiles.bk.is_multiple_of(4)
        || tiles.invocations() > (caps.max_invocations_per_workgroup as usize).min(256)
        || tiles.workgroup_bytes(d) > caps.max_workgroup_storage as usize
    {
        return Err(shape_err(
            "attention",
            format!(
                "tiles {tiles:?} for head dimension {d} need {} bytes / {} invocations; the device allows {} / {}",
                tiles.workgroup_bytes(d),
                tiles.invocations(),
                caps.max_workgroup_storage,
                caps.max_invocations_per_workgroup
            ),
        ));
    }
    let out = Tensor::empty(gpu, q.shape())?;
    let scale = opts.scale.unwrap_or(1.0 / (d as f32).sqrt());
    let q_tiles = nq.div_ceil(tiles.bq);
    let defines = tiles.defines(d).flag_if("SAVE_LSE", lse.is_some());
    let params = Params::new()
        .u(b)
        .u(nq)
        .u(nk)
        .u(opts.heads)
        .u(q_tiles)
        .u(opts.causal as usize)
        .f(scale * std::f32::consts::LOG2_E);
    let mut binds = vec![(1, q.buffer()), (2, k.buffer()), (3, v.buffer()), (4, out.buffer())];
    if let Some(l) = lse {
        binds.push((5, l.buffer()));
    }
    gpu.dispatch(
        SHADER,
        "attention",
        &defines,
        &params.0,
        &binds,
        gpu.grid(u32::try_from(b * opts.heads * q_tiles).unwrap_or(u32::MAX)),
    )?;
    Ok(out)
}

/// CPU reference: f64 arithmetic, the whole score row at once, plain softmax (max-subtracted).
pub mod reference {
    /// Same layout and semantics as [`super::attention`]; `scale` defaults to `1/sqrt(D)`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        b: usize,
        nq: usize,
        nk: usize,
        heads: usize,
        d: usize,
        scale: Option<f32>,
        causal: bool,
    ) -> Vec<f32> {
        let hd = heads * d;
        let scale = scale.map_or(1.0 / (d as f64).sqrt(), |s| s as f64);
        let mut out = vec![0f32; b * nq * hd];
        let mut s = vec![0f64; nk];
        for bi in 0..b {
            for h in 0..heads {
                for i in 0..nq {
                    let qr = &q[(bi * nq + i) * hd + h * d..][..d];
                    let visible = if causal { nk.min(i + 1) } else { nk };
                    for (j, sj) in s.iter_mut().enumerate().take(visible) {
                        let kr = &k[(bi * nk + j) * hd + h * d..][..d];
                        *sj = scale * qr.iter().zip(kr).map(|(a, c)| *a as f64 * *c as f64).sum::<f64>();
                    }
                    let m = s[..visible].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let mut sum = 0.0;
                    for sj in &mut s[..visible] {
                        *sj = (*sj - m).exp();
                        sum += *sj;
                    }
                    let o = &mut out[(bi * nq + i) * hd + h * d..][..d];
                    for (dd, od) in o.iter_mut().enumerate() {
                        let acc: f64 = (0..visible).map(|j| s[j] * v[(bi * nk + j) * hd + h * d + dd] as f64).sum();
                        *od = (acc / sum) as f32;
                    }
                }
            }
        }
        out
    }
}
