//! ΔW of one adapter layer as numbers to look at: its singular values (the spectrum, and the
//! energy the top k of them hold), its weight shape inferred from the file alone, and a
//! downsampled heat map of ΔW.
//!
//! Every algorithm that has a ΔW is decomposed without forming it where it has structure:
//! LoRA / LoCon are `up · down` (Tucker `lora_mid` folded into down); LoHa's Hadamard product
//! of two rank-r products is the product of their Khatri–Rao factors (rank ≤ r²); LoKr's
//! singular values are products of its two factors' ([`svd::svd_kron`]); full diffs are
//! decomposed densely. IA³ and norm diffs have no ΔW.

use super::svd::{self, Matrix, Svd};
use super::{Delta, Factor, HostTensor, LayerAdapter, LayerShape, ModelLayers};
use crate::error::{Error, Result};
use serde::Serialize;

/// ΔW in a shape that keeps its structure (the file's scale included).
enum Form {
    /// `left [m, p] · right [p, n]`.
    Product(Matrix, Matrix),
    Dense(Matrix),
    /// `kron(first, second)`.
    Kron(Box<Form>, Box<Form>),
}

fn err(l: &LayerAdapter, message: String) -> Error {
    Error::Format { file: String::new(), tensor: Some(l.key.clone()), message }
}

fn mat(t: &HostTensor, rows: usize, cols: usize) -> Option<Matrix> {
    Matrix::from_f32(rows, cols, &t.data)
}

/// `t [ri, rj, k, k]`, `wb [rj, Q]`: `T[i, (q, s)] = Σ_j t[i, j, s] · wb[j, q]` as `[ri, Q·k·k]`.
fn core_times(t: &HostTensor, wb: &HostTensor) -> Option<Matrix> {
    let (ri, rj) = (t.dim(0), t.dim(1));
    let kk = t.dim(2) * t.dim(3);
    let q = wb.cols();
    if wb.dim(0) != rj || t.numel() != ri * rj * kk || wb.numel() != rj * q {
        return None;
    }
    let mut out = Matrix::zeros(ri, q * kk);
    for i in 0..ri {
        for j in 0..rj {
            for s in 0..kk {
                let x = t.data[(i * rj + j) * kk + s] as f64;
                if x == 0.0 {
                    continue;
                }
                for qq in 0..q {
                    out.data[i * q * kk + qq * kk + s] += x * wb.data[j * q + qq] as f64;
                }
            }
        }
    }
    Some(out)
}

/// A Tucker half `Σ_ij t[i,j,s] wa[i,p] wb[j,q]` as `waᵀ [P, ri] · core_times(t, wb)`.
fn tucker(t: &HostTensor, wa: &HostTensor, wb: &HostTensor) -> Option<(Matrix, Matrix)> {
    let left = mat(wa, wa.dim(0), wa.cols())?.transpose();
    let right = core_times(t, wb)?;
    (left.cols == right.rows).then_some((left, right))
}

/// `(L₁R₁) ⊙ (L₂R₂)` = `KR(L₁, L₂) · KR(R₁ᵀ, R₂ᵀ)ᵀ` (row-wise / column-wise Kronecker products).
fn khatri_rao(l1: &Matrix, r1: &Matrix, l2: &Matrix, r2: &Matrix) -> Option<(Matrix, Matrix)> {
    let (m, n) = (l1.rows, r1.cols);
    if l2.rows != m || r2.cols != n || l1.cols != r1.rows || l2.cols != r2.rows {
        return None;
    }
    let (p1, p2) = (l1.cols, l2.cols);
    let p = p1 * p2;
    let mut left = Matrix::zeros(m, p);
    for i in 0..m {
        for a in 0..p1 {
            for b in 0..p2 {
                left.data[i * p + a * p2 + b] = l1.at(i, a) * l2.at(i, b);
            }
        }
    }
    let mut right = Matrix::zeros(p, n);
    for a in 0..p1 {
        for b in 0..p2 {
            let row = &mut right.data[(a * p2 + b) * n..(a * p2 + b + 1) * n];
            for (j, o) in row.iter_mut().enumerate() {
                *o = r1.at(a, j) * r2.at(b, j);
            }
        }
    }
    Some((left, right))
}

fn factor_form(f: &Factor, t2: Option<&HostTensor>) -> Option<Form> {
    Some(match (f, t2) {
        (Factor::Full(w), _) => Form::Dense(mat(w, w.dim(0), w.cols())?),
        (Factor::LowRank { a, b }, Some(t)) => {
            let (l, r) = tucker(t, a, b)?;
            Form::Product(l, r)
        }
        (Factor::LowRank { a, b }, None) => Form::Product(mat(a, a.dim(0), a.cols())?, mat(b, b.dim(0), b.cols())?),
    })
}

fn scale_form(f: Form, s: f64) -> Form {
    match f {
        Form::Product(l, r) => Form::Product(l.scaled(s), r),
        Form::Dense(d) => Form::Dense(d.scaled(s)),
        Form::Kron(a, b) => Form::Kron(Box::new(scale_form(*a, s)), b),
    }
}

/// The error for a layer without a ΔW.
fn no_delta(l: &LayerAdapter) -> Error {
    match l.delta {
        Delta::Ia3 { .. } => err(l, "an IA³ layer scales the base weight and has no ΔW of its own".into()),
        _ => err(l, "a norm layer's parameter diff is not a weight matrix and has no ΔW".into()),
    }
}

fn form(l: &LayerAdapter) -> Result<Form> {
    let bad = |what: &str| err(l, format!("the {what} tensors do not fit together"));
    let f = match &l.delta {
        Delta::LowRank { down, up, mid, scale } => {
            let r = down.dim(0);
            let right = match mid {
                None => mat(down, r, down.cols()),
                Some(m) => core_times(m, down),
            }
            .ok_or_else(|| bad("lora_down / lora_mid"))?;
            let left = mat(up, up.dim(0), up.cols()).filter(|u| u.cols == right.rows).ok_or_else(|| bad("lora_up / lora_down"))?;
            Form::Product(left.scaled(*scale as f64), right)
        }
        Delta::LoHa { w1a, w1b, w2a, w2b, t1, t2, scale } => {
            let halves = match (t1, t2) {
                (Some(t1), Some(t2)) => tucker(t1, w1a, w1b).zip(tucker(t2, w2a, w2b)),
                _ => {
                    let h = |a: &HostTensor, b: &HostTensor| Some((mat(a, a.dim(0), a.cols())?, mat(b, b.dim(0), b.cols())?));
                    h(w1a, w1b).zip(h(w2a, w2b))
                }
            };
            let ((l1, r1), (l2, r2)) = halves.ok_or_else(|| bad("LoHa"))?;
            let (left, right) = khatri_rao(&l1, &r1, &l2, &r2).ok_or_else(|| bad("LoHa"))?;
            Form::Product(left.scaled(*scale as f64), right)
        }
        Delta::LoKr { w1, w2, t2, scale } => {
            let a = factor_form(w1, None).ok_or_else(|| bad("lokr_w1"))?;
            let b = factor_form(w2, t2.as_ref()).ok_or_else(|| bad("lokr_w2"))?;
            Form::Kron(Box::new(scale_form(a, *scale as f64)), Box::new(b))
        }
        Delta::Full { diff, .. } => Form::Dense(mat(diff, diff.dim(0), diff.cols()).ok_or_else(|| bad("diff"))?),
        Delta::Ia3 { .. } | Delta::Norm { .. } => return Err(no_delta(l)),
    };
    Ok(f)
}

fn form_svd(f: &Form, vectors: &dyn Fn(&[f64]) -> usize) -> Option<Svd> {
    match f {
        Form::Product(l, r) => svd::svd_product_with(l, r, vectors),
        Form::Dense(d) => Some(svd::svd(d)),
        Form::Kron(a, b) => {
            let all = |s: &[f64]| s.len();
            Some(svd::svd_kron(&form_svd(a, &all)?, &form_svd(b, &all)?, vectors))
        }
    }
}

/// The singular value decomposition of a layer's ΔW as a `[out, in·k·k]` matrix (the file's
/// scale included, the user's strength not): every singular value, and singular vectors for
/// at least the first `vectors(σ)` of them.
pub fn layer_svd(l: &LayerAdapter, vectors: &dyn Fn(&[f64]) -> usize) -> Result<Svd> {
    let f = form(l)?;
    form_svd(&f, vectors).ok_or_else(|| err(l, "the adapter's factors do not make a ΔW".into()))
}

/// The module the name suggests is a 3×3 convolution (ResNet convs, down/upsamplers, the
/// UNet's first and last convolutions).
fn conv3_name(module: &str) -> bool {
    let last = module.rsplit('.').next().unwrap_or(module);
    matches!(last, "conv1" | "conv2" | "conv" | "conv_in" | "conv_out")
}

/// The weight shape of the module an adapter layer applies to: the model's where one is given
/// and has the module, else from the tensors (a 4-D factor, a Tucker core or a 4-D diff give
/// the kernel; a flattened LoHa / LoKr on a module named like a 3×3 convolution with a
/// multiple of 9 columns is one). `None` for IA³ and norm layers.
pub fn layer_shape(l: &LayerAdapter, model: Option<&ModelLayers>) -> Option<LayerShape> {
    if let Some(info) = model.and_then(|m| m.get(l.target, &l.module)) {
        if !matches!(info.shape, LayerShape::Norm { .. }) && super::layers::check_fit(l, &info.shape).is_ok() {
            return Some(info.shape);
        }
    }
    let conv = |out: usize, cols: usize, kernel: usize| {
        let kk = kernel * kernel;
        (kk > 0 && cols.is_multiple_of(kk)).then_some(LayerShape::Conv { in_channels: cols / kk, out_channels: out, kernel })
    };
    let guess = |out: usize, cols: usize| {
        if conv3_name(&l.module) && cols.is_multiple_of(9) {
            conv(out, cols, 3)
        } else {
            Some(LayerShape::Linear { in_features: cols, out_features: out })
        }
    };
    match &l.delta {
        Delta::LowRank { down, up, mid, .. } => {
            let out = up.dim(0);
            match mid {
                Some(m) => conv(out, down.dim(1) * m.dim(2) * m.dim(3), m.dim(2)),
                None if down.ndim() == 4 => conv(out, down.cols(), down.dim(2)),
                None => Some(LayerShape::Linear { in_features: down.dim(1), out_features: out }),
            }
        }
        Delta::LoHa { w1a, w1b, t1, .. } => match t1 {
            Some(t) => conv(w1a.dim(1), w1b.dim(1) * t.dim(2) * t.dim(3), t.dim(2)),
            None => guess(w1a.dim(0), w1b.cols()),
        },
        Delta::LoKr { w1, w2, t2, .. } => {
            let (a, c) = match w1 {
                Factor::Full(w) => (w.dim(0), w.cols()),
                Factor::LowRank { a, b } => (a.dim(0), b.cols()),
            };
            match (w2, t2) {
                (Factor::LowRank { a: wa, b: wb }, Some(t)) => conv(a * wa.dim(1), c * wb.dim(1) * t.dim(2) * t.dim(3), t.dim(2)),
                (Factor::Full(w), _) if w.ndim() == 4 => conv(a * w.dim(0), c * w.cols(), w.dim(2)),
                (Factor::Full(w), _) => guess(a * w.dim(0), c * w.cols()),
                (Factor::LowRank { a: wa, b: wb }, None) => guess(a * wa.dim(0), c * wb.cols()),
            }
        }
        Delta::Full { diff, .. } if diff.ndim() == 4 => conv(diff.dim(0), diff.cols(), diff.dim(2)),
        Delta::Full { diff, .. } => Some(LayerShape::Linear { in_features: diff.cols(), out_features: diff.dim(0) }),
        Delta::Ia3 { .. } | Delta::Norm { .. } => None,
    }
}

/// A layer's spectrum.
#[derive(Clone, Debug, Serialize)]
pub struct Spectrum {
    /// Singular values of ΔW, largest first (at most its rank bound).
    pub singular: Vec<f64>,
    /// Cumulative fraction of Σσ² held by the first 1, 2, … values.
    pub energy: Vec<f64>,
    /// The adapter's rank (`None` for full diffs and LoKr with two full factors).
    pub rank: Option<usize>,
    /// `[out, in]` or `[out, in, k, k]`.
    pub shape: Vec<usize>,
}

/// The singular values of a layer's ΔW and their cumulative energy.
pub fn spectrum(l: &LayerAdapter, model: Option<&ModelLayers>) -> Result<Spectrum> {
    let shape = layer_shape(l, model).ok_or_else(|| no_delta(l))?;
    let all = layer_svd(l, &|_| 0)?.s;
    let total: f64 = all.iter().map(|s| s * s).sum();
    let mut acc = 0.0;
    let energy = all
        .iter()
        .map(|s| {
            acc += s * s;
            if total > 0.0 {
                acc / total
            } else {
                1.0
            }
        })
        .collect();
    Ok(Spectrum { singular: all, energy, rank: l.delta.rank(), shape: shape.weight_shape() })
}

/// A downsampled map of a layer's ΔW for a heat map.
#[derive(Clone, Debug, Serialize)]
pub struct DeltaMap {
    pub rows: usize,
    pub cols: usize,
    /// `rows × cols` row-major: in each cell the value of largest magnitude of its block of
    /// `strength · ΔW` (viewed as `[out, in·k·k]`), sign kept.
    pub values: Vec<f32>,
    /// The largest |value| of the whole ΔW.
    pub max: f32,
    /// The full ΔW's size.
    pub full_rows: usize,
    pub full_cols: usize,
}

/// `strength · ΔW` of a layer pooled by largest magnitude to at most `limit × limit` cells.
pub fn delta_map(l: &LayerAdapter, model: Option<&ModelLayers>, strength: f32, limit: usize) -> Result<DeltaMap> {
    let shape = layer_shape(l, model).ok_or_else(|| no_delta(l))?;
    let dw = l.delta.delta_weight(&shape).map_err(|e| err(l, e.to_string()))?;
    let (rows, cols) = (shape.out_dim(), shape.cols());
    Ok(pool_max_abs(&dw.data, rows, cols, strength, limit.max(1)))
}

fn pool_max_abs(data: &[f32], rows: usize, cols: usize, strength: f32, limit: usize) -> DeltaMap {
    let (br, bc) = (rows.div_ceil(limit).max(1), cols.div_ceil(limit).max(1));
    let (pr, pc) = (rows.div_ceil(br), cols.div_ceil(bc));
    let mut values = vec![0f32; pr * pc];
    let mut max = 0f32;
    for i in 0..rows {
        for j in 0..cols {
            let v = data.get(i * cols + j).copied().unwrap_or(0.0) * strength;
            let cell = &mut values[(i / br) * pc + j / bc];
            if v.abs() > cell.abs() {
                *cell = v;
            }
            max = max.max(v.abs());
        }
    }
    DeltaMap { rows: pr, cols: pc, values, max, full_rows: rows, full_cols: cols }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_keeps_the_largest_magnitude_with_its_sign() {
        // 4×6 → limit 2: blocks of 2×3.
        let data: Vec<f32> = (0..24).map(|i| if i == 7 { -100.0 } else { i as f32 }).collect();
        let m = pool_max_abs(&data, 4, 6, 0.5, 2);
        assert_eq!((m.rows, m.cols), (2, 2));
        assert_eq!(m.values, vec![-50.0, 5.5, 10.0, 11.5]);
        assert_eq!(m.max, 50.0);
        // Smaller than the limit: unchanged.
        let m = pool_max_abs(&data, 4, 6, 1.0, 128);
        assert_eq!((m.rows, m.cols, m.values.len()), (4, 6, 24));
    }
}
