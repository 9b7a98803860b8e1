//! From a file's layer adapters to the kernel's operands ([`crate::ops::adapter`]): the
//! factors each algorithm is applied with, and what each strength changes.
//!
//! - LoRA / LoCon: `R` low-rank columns (Tucker `lora_mid` folded into the down convolution,
//!   which keeps the rank), scale `alpha/r · s` per column.
//! - LoKr: a Kronecker term from its two factors (low-rank factors multiplied out, `lokr_t2`
//!   rebuilt), never the product.
//! - LoHa and full: a dense term (ΔW without its scale), `scale · s`; full's `diff_b` a bias delta.
//! - IA³: `1 + s·w` on the weight's rows (or columns, `on_input`).
//! - DoRA: a dense ΔW term and a row (or column) renormalisation computed from the base weight's
//!   norms, so a strength change only recomputes vectors.

use super::LayerKind;
use crate::error::{Error, Result};
use crate::lora::{Delta, DoraKind, Factor, HostTensor, LayerAdapter};
use crate::ops::adapter::TermKind;

/// What one strength drives in a layer's dynamic region.
#[derive(Clone, Debug)]
pub enum Contribution {
    /// Columns `first .. first + len` of the low-rank part, each `scale · s`.
    LowRank { first: usize, len: usize, scale: f32 },
    /// Term `term` has scale `scale · s`.
    Term { term: usize, scale: f32 },
    /// Rows (or columns) of W₀ scaled by `1 + s·w` (w expanded to N or K values).
    Ia3 { w: Vec<f32>, on_input: bool },
    /// `s · b` added to the bias.
    Bias { b: Vec<f32> },
    /// DoRA on term `term` (ΔW = `scale` · the term's matrix); see [`dora_vectors`].
    Dora { term: usize, scale: f32, kind: DoraKind, magnitude: Vec<f32>, norms: Option<Norms> },
}

/// Per-channel sums over W₀ and ΔW (the term's matrix, unscaled) along the DoRA norm axis:
/// ‖W₀ + t·ΔW‖² = n0 + 2t·n1 + t²·n2.
#[derive(Clone, Debug)]
pub struct Norms {
    pub n0: Vec<f64>,
    pub n1: Vec<f64>,
    pub n2: Vec<f64>,
}

/// One layer's adapters, host side, before packing.
#[derive(Default)]
pub struct Built {
    /// Stacked down matrices, `[R, K]` row-major (`K = Cin·kh·kw`).
    pub down: Vec<f32>,
    /// Stacked up matrices, `[N, R]`.
    pub up_cols: Vec<Vec<f32>>,
    pub rank: usize,
    /// Term storage and data (`(matrix, second factor)`).
    pub terms: Vec<(TermKind, Vec<f32>, Vec<f32>)>,
    /// Per adapter (index into the caller's list): its contributions.
    pub contributions: Vec<(usize, Contribution)>,
}

fn bad(a: &LayerAdapter, msg: String) -> Error {
    Error::Format { file: String::new(), tensor: Some(a.key.clone()), message: msg }
}

/// `a [m, r] · b [r, n]` (row-major, f64 accumulation).
pub fn matmul(a: &[f32], b: &[f32], m: usize, r: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for q in 0..r {
                s += a[i * r + q] as f64 * b[q * n + j] as f64;
            }
            out[i * n + j] = s as f32;
        }
    }
    out
}

/// `Σ_ij t[i, j, tap] · a[i, p] · b[j, q]` → `[P, Q, taps]` (LyCORIS `rebuild_tucker`):
/// t `[ri, rj, taps]`, a `[ri, P]`, b `[rj, Q]`.
fn tucker(t: &HostTensor, a: &HostTensor, b: &HostTensor) -> Option<(Vec<f32>, usize, usize, usize)> {
    let (ri, rj) = (*t.shape.first()?, *t.shape.get(1)?);
    let taps: usize = t.shape.iter().skip(2).product();
    let (p, q) = (a.cols(), b.cols());
    if a.shape.first() != Some(&ri) || b.shape.first() != Some(&rj) || t.numel() != ri * rj * taps {
        return None;
    }
    // u[i, q, tap] = Σ_j t[i, j, tap] b[j, q]
    let mut u = vec![0f64; ri * q * taps];
    for i in 0..ri {
        for j in 0..rj {
            for tap in 0..taps {
                let tv = t.data[(i * rj + j) * taps + tap] as f64;
                if tv == 0.0 {
                    continue;
                }
                for qq in 0..q {
                    u[(i * q + qq) * taps + tap] += tv * b.data[j * q + qq] as f64;
                }
            }
        }
    }
    let mut out = vec![0f32; p * q * taps];
    for pp in 0..p {
        for e in 0..q * taps {
            let mut s = 0f64;
            for i in 0..ri {
                s += a.data[i * p + pp] as f64 * u[i * q * taps + e];
            }
            out[pp * q * taps + e] = s as f32;
        }
    }
    Some((out, p, q, taps))
}

/// A Kronecker factor as a full `[rows, cols·taps]` matrix.
fn factor_matrix(f: &Factor, t2: Option<&HostTensor>) -> Option<(Vec<f32>, usize, usize)> {
    match (f, t2) {
        (Factor::Full(m), _) => Some((m.data.clone(), m.shape[0], m.cols())),
        (Factor::LowRank { a, b }, Some(t)) => {
            let (w, p, q, taps) = tucker(t, a, b)?;
            Some((w, p, q * taps))
        }
        (Factor::LowRank { a, b }, None) => {
            let (m, r) = (a.shape[0], a.cols());
            if b.shape.first() != Some(&r) {
                return None;
            }
            Some((matmul(&a.data, &b.data, m, r, b.cols()), m, b.cols()))
        }
    }
}

/// The dense ΔW `[N, K]` (without scale) of LoHa / full / a DoRA's low-rank part.
fn dense_delta(a: &LayerAdapter, n: usize, k: usize) -> Result<Vec<f32>> {
    let shape_err = |what: &str| bad(a, format!("{what} does not make the layer's [{n}, {k}] weight"));
    match &a.delta {
        Delta::LoHa { w1a, w1b, w2a, w2b, t1, t2, .. } => {
            let half = |wa: &HostTensor, wb: &HostTensor, t: &Option<HostTensor>| -> Result<Vec<f32>> {
                match t {
                    Some(t) => match tucker(t, wa, wb) {
                        Some((w, p, q, taps)) if p == n && q * taps == k => Ok(w),
                        _ => Err(shape_err("the LoHa Tucker product")),
                    },
                    None => {
                        let r = wa.cols();
                        if wa.shape[0] != n || wb.shape.first() != Some(&r) || wb.cols() != k {
                            return Err(shape_err("the LoHa factors"));
                        }
                        Ok(matmul(&wa.data, &wb.data, n, r, k))
                    }
                }
            };
            let h1 = half(w1a, w1b, t1)?;
            let h2 = half(w2a, w2b, t2)?;
            Ok(h1.iter().zip(&h2).map(|(x, y)| x * y).collect())
        }
        Delta::Full { diff, .. } => {
            if diff.shape.first() != Some(&n) || diff.cols() != k {
                return Err(shape_err("the full diff"));
            }
            Ok(diff.data.clone())
        }
        Delta::LowRank { down, up, mid, .. } => {
            let (d, r) = lowrank_down(a, down, mid.as_ref(), k)?;
            if up.shape.first() != Some(&n) || up.cols() != r {
                return Err(shape_err("the up matrix"));
            }
            Ok(matmul(&up.data, &d, n, r, k))
        }
        Delta::LoKr { w1, w2, t2, .. } => {
            let (m1, a1, b1) = factor_matrix(w1, None).ok_or_else(|| shape_err("the LoKr w1 factor"))?;
            let (m2, c2, d2) = factor_matrix(w2, t2.as_ref()).ok_or_else(|| shape_err("the LoKr w2 factor"))?;
            if a1 * c2 != n || b1 * d2 != k {
                return Err(shape_err("the LoKr factors"));
            }
            let mut out = vec![0f32; n * k];
            // kron on the [rows, cols·taps] views: taps stay innermost.
            for i in 0..a1 {
                for j in 0..b1 {
                    let w = m1[i * b1 + j];
                    for r in 0..c2 {
                        for q in 0..d2 {
                            out[(i * c2 + r) * k + j * d2 + q] = w * m2[r * d2 + q];
                        }
                    }
                }
            }
            Ok(out)
        }
        _ => Err(bad(a, "this adapter has no weight delta for DoRA to renormalise".into())),
    }
}

/// The low-rank down matrix `[r, K]`, Tucker `mid` folded in.
fn lowrank_down(a: &LayerAdapter, down: &HostTensor, mid: Option<&HostTensor>, k: usize) -> Result<(Vec<f32>, usize)> {
    let r = down.shape[0];
    match mid {
        None => {
            if down.cols() != k {
                return Err(bad(a, format!("lora_down {:?} does not fit the layer ({k} inputs per output)", down.shape)));
            }
            Ok((down.data.clone(), r))
        }
        Some(m) => {
            // down [r_in, cin] (1×1), mid [r_out, r_in, kh, kw]: eff[a, ci, tap] = Σ_b mid[a, b, tap] down[b, ci].
            let cin = down.cols();
            let (ro, ri) = (m.shape[0], *m.shape.get(1).unwrap_or(&0));
            let taps: usize = m.shape.iter().skip(2).product();
            if ri != r || cin * taps != k || m.numel() != ro * ri * taps {
                return Err(bad(
                    a,
                    format!("lora_mid {:?} with lora_down {:?} does not fit the layer ({k} inputs per output)", m.shape, down.shape),
                ));
            }
            let mut out = vec![0f32; ro * k];
            for o in 0..ro {
                for ci in 0..cin {
                    for tap in 0..taps {
                        let mut s = 0f64;
                        for b in 0..ri {
                            s += m.data[(o * ri + b) * taps + tap] as f64 * down.data[b * cin + ci] as f64;
                        }
                        out[(o * cin + ci) * taps + tap] = s as f32;
                    }
                }
            }
            Ok((out, ro))
        }
    }
}

/// Expands a per-input-channel vector to the K = Cin·taps weight columns.
fn expand_cols(v: &[f32], taps: usize) -> Vec<f32> {
    v.iter().flat_map(|&x| std::iter::repeat_n(x, taps)).collect()
}

/// Builds one layer's operands from `adapters` (index, adapter) for a `[n, k]` weight.
/// `dense` is the storage of dense terms (f16 on reduced-precision bases).
/// `has_bias`: LyCORIS drops a `diff_b` on a layer without bias.
pub fn build(
    kind: LayerKind,
    n: usize,
    k: usize,
    adapters: &[(usize, &LayerAdapter)],
    dense: TermKind,
    has_bias: bool,
) -> Result<Built> {
    let taps = match kind {
        LayerKind::Linear => 1,
        LayerKind::Conv { taps } => taps,
    };
    let mut b = Built::default();
    let mut up_parts: Vec<(Vec<f32>, usize)> = vec![];
    for &(idx, a) in adapters {
        if a.dora.is_some() {
            let delta = dense_delta(a, n, k)?;
            let term = b.terms.len();
            b.terms.push((dense, delta, vec![]));
            let d = a.dora.as_ref().map(|d| (d.kind, d.magnitude.data.clone()));
            if let Some((kind, magnitude)) = d {
                let want = match kind {
                    DoraKind::Lycoris { on_output: false } => k / taps,
                    _ => n,
                };
                if magnitude.len() != want {
                    return Err(bad(a, format!("DoRA magnitude has {} values, the layer needs {want}", magnitude.len())));
                }
                b.contributions.push((idx, Contribution::Dora { term, scale: a.delta.scale(), kind, magnitude, norms: None }));
            }
            continue;
        }
        match &a.delta {
            Delta::LowRank { down, up, mid, scale } => {
                let (d, r) = lowrank_down(a, down, mid.as_ref(), k)?;
                if up.shape.first() != Some(&n) || up.cols() != r {
                    return Err(bad(a, format!("lora_up {:?} does not fit rank {r} and {n} outputs", up.shape)));
                }
                b.contributions.push((idx, Contribution::LowRank { first: b.rank, len: r, scale: *scale }));
                b.down.extend(d);
                up_parts.push((up.data.clone(), r));
                b.rank += r;
            }
            Delta::LoKr { w1, w2, t2, scale } => {
                let bad_f = |w: &str| bad(a, format!("the LoKr {w} factor is malformed"));
                let (m1, a1, b1) = factor_matrix(w1, None).ok_or_else(|| bad_f("w1"))?;
                let (m2, c2, d2) = factor_matrix(w2, t2.as_ref()).ok_or_else(|| bad_f("w2"))?;
                if a1 * c2 != n || b1 * d2 != k || !d2.is_multiple_of(taps) {
                    return Err(bad(a, format!("LoKr factors [{a1}, {b1}] ⊗ [{c2}, {d2}] do not make the layer's [{n}, {k}] weight")));
                }
                let term = b.terms.len();
                b.terms.push((TermKind::Kron { a: a1, b: b1, c: c2, d: d2 / taps, kk: taps }, m1, m2));
                b.contributions.push((idx, Contribution::Term { term, scale: *scale }));
            }
            Delta::LoHa { scale, .. } => {
                let delta = dense_delta(a, n, k)?;
                let term = b.terms.len();
                b.terms.push((dense, delta, vec![]));
                b.contributions.push((idx, Contribution::Term { term, scale: *scale }));
            }
            Delta::Full { diff_b, .. } => {
                let delta = dense_delta(a, n, k)?;
                let term = b.terms.len();
                b.terms.push((dense, delta, vec![]));
                b.contributions.push((idx, Contribution::Term { term, scale: 1.0 }));
                if let Some(db) = diff_b.as_ref().filter(|_| has_bias) {
                    if db.numel() != n {
                        return Err(bad(a, format!("diff_b has {} values, the layer has {n} outputs", db.numel())));
                    }
                    b.contributions.push((idx, Contribution::Bias { b: db.data.clone() }));
                }
            }
            Delta::Ia3 { weight, on_input } => {
                let w = if *on_input { expand_cols(&weight.data, taps) } else { weight.data.clone() };
                let want = if *on_input { k } else { n };
                if w.len() != want {
                    return Err(bad(a, format!("IA³ weight has {} values, the layer needs {}", weight.numel(), want / if *on_input { taps } else { 1 })));
                }
                b.contributions.push((idx, Contribution::Ia3 { w, on_input: *on_input }));
            }
            Delta::Norm { .. } => {
                return Err(bad(a, "a norm-layer diff on a linear or convolution layer".into()));
            }
        }
    }
    b.up_cols = up_parts.into_iter().map(|(u, _)| u).collect();
    Ok(b)
}

/// The stacked up matrix `[N, R]` from each adapter's `[N, rᵢ]`.
pub fn stack_up(parts: &[Vec<f32>], n: usize, rank: usize) -> Vec<f32> {
    let mut up = vec![0f32; n * rank];
    let mut c0 = 0;
    for p in parts {
        let r = p.len() / n.max(1);
        for row in 0..n {
            up[row * rank + c0..row * rank + c0 + r].copy_from_slice(&p[row * r..row * r + r]);
        }
        c0 += r;
    }
    up
}

/// Per-channel DoRA norm sums of W₀ `[N, K]` and ΔW along the kind's axis (`taps` columns per
/// input channel).
pub fn dora_norms(w0: &[f32], delta: &[f32], n: usize, k: usize, taps: usize, kind: DoraKind) -> Norms {
    let per_in = matches!(kind, DoraKind::Lycoris { on_output: false });
    let len = if per_in { k / taps } else { n };
    let (mut n0, mut n1, mut n2) = (vec![0f64; len], vec![0f64; len], vec![0f64; len]);
    for r in 0..n {
        for c in 0..k {
            let ch = if per_in { c / taps } else { r };
            let (w, d) = (w0[r * k + c] as f64, delta[r * k + c] as f64);
            n0[ch] += w * w;
            n1[ch] += w * d;
            n2[ch] += d * d;
        }
    }
    Norms { n0, n1, n2 }
}

/// DoRA at strength `s` as (base vector, term scale, term vector), all along the norm axis
/// (rows, or input channels for LyCORIS `[1, in, …]` magnitudes), as `lora::merged_weight`
/// defines them:
/// - PEFT: `W' = g ⊙ (W₀ + c·s·ΔW)`, `g = m / ‖W₀ + c·s·ΔW‖` (the norm taken at strength s,
///   as PEFT's scaling does);
/// - LyCORIS: `W' = (W₀ + c·ΔW) ⊙ (s·(f − 1) + 1)`, `f = m / (‖W₀ + c·ΔW‖ + ε)` (its
///   `weight_decompose` with the multiplier).
pub fn dora_vectors(kind: DoraKind, magnitude: &[f32], norms: &Norms, c: f32, s: f32) -> (Vec<f32>, f32, Vec<f32>) {
    let norm = |t: f64| -> Vec<f64> {
        (0..magnitude.len()).map(|i| (norms.n0[i] + 2.0 * t * norms.n1[i] + t * t * norms.n2[i]).max(0.0).sqrt()).collect()
    };
    match kind {
        DoraKind::Peft => {
            let t = c as f64 * s as f64;
            let g: Vec<f32> = norm(t).iter().zip(magnitude).map(|(nv, &m)| (m as f64 / nv) as f32).collect();
            (g.clone(), c * s, g)
        }
        DoraKind::Lycoris { .. } => {
            let eps = f32::EPSILON as f64;
            let g: Vec<f32> = norm(c as f64)
                .iter()
                .zip(magnitude)
                .map(|(nv, &m)| (s as f64 * (m as f64 / (nv + eps) - 1.0) + 1.0) as f32)
                .collect();
            (g.clone(), c, g)
        }
    }
}
