//! ΔW of each adapter algorithm on the CPU, accumulated in f64: the reference the GPU path is
//! tested against. Each follows the LyCORIS 4.1.3 rebuild of the same name
//! (`functional/locon.py` `_diff_weight`, `functional/loha.py` `_diff_weight`,
//! `functional/lokr.py` `_kron_weight`, `functional/general.py` `rebuild_tucker`) and
//! PEFT's `get_delta_weight` for LoRA (`lora_B @ lora_A · scaling`).

use super::{Delta, Factor, HostTensor, LayerShape};
use crate::error::{Error, Result};

fn shape_err(message: String) -> Error {
    Error::Shape { op: "lora delta", message }
}

fn to_f64(t: &HostTensor) -> Vec<f64> {
    t.data.iter().map(|&v| v as f64).collect()
}

/// `a` [m, k] · `b` [k, n].
fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; m * n];
    for i in 0..m {
        let row = &mut out[i * n..(i + 1) * n];
        for (p, &av) in a[i * k..(i + 1) * k].iter().enumerate() {
            if av == 0.0 {
                continue;
            }
            for (o, &bv) in row.iter_mut().zip(&b[p * n..(p + 1) * n]) {
                *o += av * bv;
            }
        }
    }
    out
}

/// Transpose of `a` [m, n].
fn transpose(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[j * m + i] = a[i * n + j];
        }
    }
    out
}

/// `T[i, q, s] = Σ_j t[i, j, s] · wb[j, q]` with t [ri, rj, k, k], wb [rj, Q] (its columns
/// flattened when it has more dimensions): T as [ri, Q·k·k].
fn core_times(t: &HostTensor, wb: &HostTensor) -> Vec<f64> {
    let (ri, rj) = (t.dim(0), t.dim(1));
    let kk = t.dim(2) * t.dim(3);
    let q = wb.cols();
    let (tv, wbv) = (to_f64(t), to_f64(wb));
    let mut out = vec![0.0f64; ri * q * kk];
    for i in 0..ri {
        for j in 0..rj {
            for s in 0..kk {
                let x = tv[(i * rj + j) * kk + s];
                if x == 0.0 {
                    continue;
                }
                for qq in 0..q {
                    out[(i * q + qq) * kk + s] += x * wbv[j * q + qq];
                }
            }
        }
    }
    out
}

/// Tucker rebuild `R[p, q, s] = Σ_ij t[i, j, s] · wa[i, p] · wb[j, q]` with t [ri, rj, k, k],
/// wa [ri, P], wb [rj, Q]: R as [P, Q·k·k] (the `[P, Q, k, k]` layout).
fn tucker(t: &HostTensor, wa: &HostTensor, wb: &HostTensor) -> (Vec<f64>, usize, usize) {
    let (ri, p) = (wa.dim(0), wa.dim(1));
    let cols = wb.cols() * t.dim(2) * t.dim(3);
    let wa_t = transpose(&to_f64(wa), ri, p);
    (matmul(&wa_t, &core_times(t, wb), p, ri, cols), p, cols)
}

/// A factor's matrix as [rows, cols] (a low-rank pair multiplied out; a 4-D full factor
/// flattened after its first dimension).
fn factor_matrix(f: &Factor, t2: Option<&HostTensor>) -> (Vec<f64>, usize, usize) {
    match (f, t2) {
        (Factor::Full(w), _) => (to_f64(w), w.dim(0), w.cols()),
        (Factor::LowRank { a, b }, Some(t)) => tucker(t, a, b),
        (Factor::LowRank { a, b }, None) => {
            let (m, r, n) = (a.dim(0), a.dim(1), b.cols());
            (matmul(&to_f64(a), &to_f64(b), m, r, n), m, n)
        }
    }
}

/// `kron(w1 [a, c], w2 [b, n])` = [a·b, c·n]: the LoKr ΔW in the `[out, in, k, k]` layout when
/// `n` = d·k·k (kron of a 2-D w1 with a 4-D w2 is this flattened).
fn kron(w1: &[f64], a: usize, c: usize, w2: &[f64], b: usize, n: usize) -> Vec<f64> {
    let cols = c * n;
    let mut out = vec![0.0f64; a * b * cols];
    for i in 0..a {
        for p in 0..b {
            let row = &mut out[(i * b + p) * cols..(i * b + p + 1) * cols];
            for j in 0..c {
                let x = w1[i * c + j];
                for (o, &y) in row[j * n..(j + 1) * n].iter_mut().zip(&w2[p * n..(p + 1) * n]) {
                    *o = x * y;
                }
            }
        }
    }
    out
}

fn finish(values: Vec<f64>, scale: f64, layer: &LayerShape) -> HostTensor {
    HostTensor { shape: layer.weight_shape(), data: values.into_iter().map(|v| (v * scale) as f32).collect() }
}

/// Checks that a ΔW of [rows, cols] fits the layer's weight.
fn check(rows: usize, cols: usize, layer: &LayerShape, what: &str) -> Result<()> {
    let (out, lcols) = (layer.out_dim(), layer.cols());
    if rows != out || cols != lcols {
        return Err(shape_err(format!(
            "{what} gives a ΔW of {rows}×{cols} but the layer is {} (weight {out}×{lcols})",
            layer.describe()
        )));
    }
    Ok(())
}

impl Delta {
    /// ΔW in the layer's weight shape ([out, in] or [out, in, k, k]; [channels] for norms)
    /// including the file's scale (alpha / r, the LoKr rule) but not the user's strength.
    /// IA³ has no ΔW of its own (it scales the base weight; see [`super::merged_weight`]), and a
    /// layer's DoRA renormalisation is not included here.
    pub fn delta_weight(&self, layer: &LayerShape) -> Result<HostTensor> {
        if let LayerShape::Norm { channels } = *layer {
            return match self {
                Delta::Norm { weight, .. } => match weight {
                    Some(w) if w.numel() != channels => Err(shape_err(format!(
                        "w_norm has {} values but the norm has {channels} channels",
                        w.numel()
                    ))),
                    Some(w) => Ok(HostTensor { shape: vec![channels], data: w.data.clone() }),
                    None => Ok(HostTensor::zeros(vec![channels])),
                },
                other => Err(shape_err(format!("{:?} adapter on a norm layer", other.algorithm()))),
            };
        }
        match self {
            Delta::LowRank { down, up, mid, scale } => {
                let (out, r) = (up.dim(0), up.dim(1));
                let (dmat, cols) = match mid {
                    None => (to_f64(down), down.cols()),
                    // M[a, (i, s)] = Σ_b mid[a, b, s] · down[b, i]; ΔW = up · M.
                    Some(m) => (core_times(m, down), down.cols() * m.dim(2) * m.dim(3)),
                };
                check(out, cols, layer, "the low-rank pair")?;
                Ok(finish(matmul(&to_f64(up), &dmat, out, r, cols), *scale as f64, layer))
            }
            Delta::LoHa { w1a, w1b, w2a, w2b, t1, t2, scale } => {
                let (h1, h2, rows, cols) = match (t1, t2) {
                    (Some(t1), Some(t2)) => {
                        let (h1, rows, cols) = tucker(t1, w1a, w1b);
                        let (h2, ..) = tucker(t2, w2a, w2b);
                        (h1, h2, rows, cols)
                    }
                    _ => {
                        let (rows, cols) = (w1a.dim(0), w1b.cols());
                        let h1 = matmul(&to_f64(w1a), &to_f64(w1b), rows, w1a.dim(1), cols);
                        let h2 = matmul(&to_f64(w2a), &to_f64(w2b), rows, w2a.dim(1), cols);
                        (h1, h2, rows, cols)
                    }
                };
                check(rows, cols, layer, "LoHa")?;
                let prod = h1.iter().zip(&h2).map(|(a, b)| a * b).collect();
                Ok(finish(prod, *scale as f64, layer))
            }
            Delta::LoKr { w1, w2, t2, scale } => {
                let (m1, a, c) = factor_matrix(w1, None);
                let (m2, b, n) = factor_matrix(w2, t2.as_ref());
                check(a * b, c * n, layer, "LoKr kron(w1, w2)")?;
                Ok(finish(kron(&m1, a, c, &m2, b, n), *scale as f64, layer))
            }
            Delta::Ia3 { .. } => Err(Error::Invalid(
                "an IA³ adapter scales the base weight and has no ΔW of its own; use merged_weight".into(),
            )),
            Delta::Full { diff, .. } => {
                check(diff.dim(0), diff.cols(), layer, "the full diff")?;
                Ok(HostTensor { shape: layer.weight_shape(), data: diff.data.clone() })
            }
            Delta::Norm { .. } => Err(shape_err(format!("norm parameter diffs on {}", layer.describe()))),
        }
    }

    /// The bias difference a LyCORIS `full` (`diff_b`) or norm (`b_norm`) layer carries.
    pub fn delta_bias(&self) -> Option<&HostTensor> {
        match self {
            Delta::Full { diff_b, .. } => diff_b.as_ref(),
            Delta::Norm { bias, .. } => bias.as_ref(),
            _ => None,
        }
    }
}
