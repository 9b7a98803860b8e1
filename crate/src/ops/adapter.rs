//! The packed adapter data that matmul.wgsl and conv2d.wgsl read with `ADAPTER`
//! (`shaders/common/adapter.wgsl`), and its CPU reference.
//!
//! One layer's adapters become, for a weight `W₀ [N, K]` (`K = Cin·kh·kw` for a convolution):
//! - a low-rank part: `R` stacked columns, `t = down·x` computed before the kernel (one GEMM
//!   or convolution with every adapter's `down` stacked), `up [N, R]` and a per-column scale
//!   (`alpha/r · strength` of the column's adapter);
//! - weight terms added while the kernel stages `W₀`: dense matrices (f32 or f16) or Kronecker
//!   products generated from their factors, each with a scale and optional row / column vectors;
//! - optional vectors scaling `W₀` by `row[n] + col[k]`, and a bias delta.
//!
//! The data is one u32 buffer laid out by [`Layout`]: a small *dynamic* region first (column
//! scales, the term table, the vectors: everything that depends on strengths), then the
//! *static* region (`up`, term data). A strength change rewrites the dynamic region only.

use super::Params;
use crate::error::{shape_err, Error, Result};
use crate::gpu::{Bind, GpuBuffer};
use crate::tensor::Tensor;

/// "No vector" in the table and parameters.
pub const NONE: u32 = u32::MAX;
/// Words per term in the term table.
pub const TERM_WORDS: usize = 10;

/// Word offsets the shader reads (`AdapterParams` in common/adapter.wgsl).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdapterParams {
    pub rank: u32,
    pub up: u32,
    pub col_scale: u32,
    pub terms: u32,
    pub table: u32,
    pub base_row: u32,
    pub base_col: u32,
    pub bias: u32,
}

impl AdapterParams {
    pub fn words(&self) -> [u32; 8] {
        [self.rank, self.up, self.col_scale, self.terms, self.table, self.base_row, self.base_col, self.bias]
    }
}

/// A layer's adapters as kernel operands: the packed data, its offsets, and the low-rank
/// activations of this call (`None` when the layer has no low-rank part).
pub struct Operands<'a> {
    pub data: &'a GpuBuffer,
    pub params: AdapterParams,
    /// `[rows, R]` for a linear layer, `[B, R, Ho, Wo]` for a convolution.
    pub lowrank: Option<&'a Tensor>,
}

impl Operands<'_> {
    fn check_lowrank(&self, op: &'static str, want: &[usize]) -> Result<()> {
        match (self.lowrank, self.params.rank) {
            (None, 0) => Ok(()),
            (Some(t), r) if r > 0 => {
                t.expect_f32(op)?;
                if t.shape() != want {
                    return Err(shape_err(op, format!("low-rank activations {:?} must be {want:?}", t.shape())));
                }
                Ok(())
            }
            (t, r) => Err(shape_err(
                op,
                format!("adapter rank {r} but low-rank activations {:?}", t.map(|t| t.shape().to_vec())),
            )),
        }
    }

    /// Whether the kernel must change the weight while staging it (`ADAPTER_W`): a scale of
    /// the base (IA³, DoRA) or weight terms (LoHa, LoKr, full, DoRA). Plain LoRA / LoCon layers
    /// only add their low-rank part and bias, and skip that work.
    pub fn adapts_weight(&self) -> bool {
        let p = &self.params;
        p.terms > 0 || p.base_row != NONE || p.base_col != NONE
    }

    /// For a GEMM with `rows` rows of output.
    pub fn check(&self, op: &'static str, rows: usize, _n: usize) -> Result<()> {
        self.check_lowrank(op, &[rows, self.params.rank as usize])
    }

    /// For a convolution with output `[B, Cout, Ho, Wo]`.
    pub fn check_conv(&self, out: [usize; 4]) -> Result<()> {
        self.check_lowrank("conv2d", &[out[0], self.params.rank as usize, out[2], out[3]])
    }

    /// Appends the offsets to the kernel's uniform (which must be 16-byte aligned there).
    pub fn append(&self, mut p: Params) -> Params {
        debug_assert!(p.0.len().is_multiple_of(4));
        p.0.extend(self.params.words());
        p
    }

    /// Binds the activations (binding 6; the data buffer stands in when there is no low-rank
    /// part, as the binding must exist) and the data (binding 7).
    pub fn bind<'b>(&'b self, binds: &mut Vec<Bind<'b>>) {
        binds.push((6, self.lowrank.map_or(self.data, |t| t.buffer())));
        binds.push((7, self.data));
    }
}

/// How a weight term's matrix is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TermKind {
    /// `[N, K]` f32.
    DenseF32,
    /// `[N, K]` f16 (pairs per word).
    DenseF16,
    /// `kron(w1 [a, b], w2 [c, d·kk])` with `N = a·c`, `K = b·d·kk` (kk: kernel taps), f32
    /// factors: element `(i·c + r, (j·d + l)·kk + tap) = w1[i, j] · w2[r, l·kk + tap]`.
    Kron { a: usize, b: usize, c: usize, d: usize, kk: usize },
}

impl TermKind {
    fn code(&self) -> u32 {
        match self {
            TermKind::DenseF32 => 0,
            TermKind::DenseF16 => 1,
            TermKind::Kron { .. } => 2,
        }
    }
}

/// The shape of one layer's adapter data: what [`Layout`] needs, no values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Weight rows (output features / channels).
    pub n: usize,
    /// Weight columns (input features, or `Cin·kh·kw`).
    pub k: usize,
    /// Stacked low-rank columns.
    pub rank: usize,
    /// Each term's storage and whether it has a row / column vector.
    pub terms: Vec<(TermKind, bool, bool)>,
    pub base_row: bool,
    pub base_col: bool,
    pub bias: bool,
}

/// Word offsets of everything in the buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub params: AdapterParams,
    /// Row / column vector offsets of each term (NONE when absent).
    pub term_vectors: Vec<(u32, u32)>,
    /// Data offsets of each term (Kron: w1 then w2).
    pub term_data: Vec<(u32, u32)>,
    /// Words of the dynamic region (from offset 0).
    pub dynamic_words: usize,
    /// Words in all.
    pub total_words: usize,
}

fn off(v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Invalid(format!("adapter data of {v} words exceeds the 32-bit index range")))
}

impl Shape {
    /// Lays the data out: dynamic region, then static.
    pub fn layout(&self) -> Result<Layout> {
        let mut at = 0usize;
        let mut take = |len: usize| {
            let o = at;
            at += len;
            off(o).map(|o| (o, at))
        };
        let mut take = |len: usize| take(len).map(|(o, _)| o);
        let col_scale = take(self.rank)?;
        let table = take(self.terms.len() * TERM_WORDS)?;
        let base_row = if self.base_row { take(self.n)? } else { NONE };
        let base_col = if self.base_col { take(self.k)? } else { NONE };
        let bias = if self.bias { take(self.n)? } else { NONE };
        let mut term_vectors = Vec::with_capacity(self.terms.len());
        for &(_, row, col) in &self.terms {
            let r = if row { take(self.n)? } else { NONE };
            let c = if col { take(self.k)? } else { NONE };
            term_vectors.push((r, c));
        }
        let dynamic_words = take(0)? as usize;
        let up = take(self.n * self.rank)?;
        let mut term_data = Vec::with_capacity(self.terms.len());
        for &(kind, _, _) in &self.terms {
            term_data.push(match kind {
                TermKind::DenseF32 => (take(self.n * self.k)?, NONE),
                TermKind::DenseF16 => (take((self.n * self.k).div_ceil(2))?, NONE),
                TermKind::Kron { a, b, c, d, kk } => {
                    if a * c != self.n || b * d * kk != self.k {
                        return Err(Error::Invalid(format!(
                            "Kronecker factors [{a}, {b}] ⊗ [{c}, {d}·{kk}] do not make a [{}, {}] weight",
                            self.n, self.k
                        )));
                    }
                    (take(a * b)?, take(c * d * kk)?)
                }
            });
        }
        let total_words = take(0)? as usize;
        Ok(Layout {
            params: AdapterParams {
                rank: off(self.rank)?,
                up,
                col_scale,
                terms: off(self.terms.len())?,
                table,
                base_row,
                base_col,
                bias,
            },
            term_vectors,
            term_data,
            dynamic_words,
            total_words,
        })
    }
}

/// One term's strength-dependent values: scale, row vector `[N]`, column vector `[K]`.
pub type TermScales = (f32, Option<Vec<f32>>, Option<Vec<f32>>);

/// The strength-dependent values of one layer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dynamic {
    /// `[R]`.
    pub col_scale: Vec<f32>,
    /// Per term.
    pub terms: Vec<TermScales>,
    pub base_row: Option<Vec<f32>>,
    pub base_col: Option<Vec<f32>>,
    pub bias: Option<Vec<f32>>,
}

/// The strength-independent values of one layer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Static {
    /// `[N, R]`.
    pub up: Vec<f32>,
    /// Per term: the matrix (dense `[N, K]`) or the two Kronecker factors.
    pub terms: Vec<(Vec<f32>, Vec<f32>)>,
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::Invalid(format!("adapter {what} has {got} values, the layout needs {want}")));
    }
    Ok(())
}

/// Words of the dynamic region (written at offset 0 of the buffer).
pub fn dynamic_words(shape: &Shape, layout: &Layout, d: &Dynamic) -> Result<Vec<u32>> {
    let mut w = vec![0u32; layout.dynamic_words];
    fn put(w: &mut [u32], o: u32, v: &[f32], what: &str, len: usize) -> Result<()> {
        check_len(what, v.len(), len)?;
        let o = o as usize;
        for (i, x) in v.iter().enumerate() {
            w[o + i] = x.to_bits();
        }
        Ok(())
    }
    let p = &layout.params;
    put(&mut w, p.col_scale, &d.col_scale, "column scales", shape.rank)?;
    for (name, o, v, len) in [
        ("row scale", p.base_row, &d.base_row, shape.n),
        ("column scale", p.base_col, &d.base_col, shape.k),
        ("bias delta", p.bias, &d.bias, shape.n),
    ] {
        match (o, v) {
            (NONE, None) => {}
            (o, Some(v)) if o != NONE => put(&mut w, o, v, name, len)?,
            _ => return Err(Error::Invalid(format!("adapter {name}: values and layout disagree"))),
        }
    }
    check_len("term list", d.terms.len(), shape.terms.len())?;
    for (t, ((scale, row, col), &(kind, _, _))) in d.terms.iter().zip(&shape.terms).enumerate() {
        let (rv, cv) = layout.term_vectors[t];
        let (d0, d1) = layout.term_data[t];
        for (o, v, len, name) in [(rv, row, shape.n, "term row vector"), (cv, col, shape.k, "term column vector")] {
            match (o, v) {
                (NONE, None) => {}
                (o, Some(v)) if o != NONE => put(&mut w, o, v, name, len)?,
                _ => return Err(Error::Invalid(format!("adapter {name}: values and layout disagree"))),
            }
        }
        let (b, c, dd, kk) = match kind {
            TermKind::Kron { b, c, d, kk, .. } => (b, c, d, kk),
            _ => (0, 0, 0, 0),
        };
        let h = p.table as usize + t * TERM_WORDS;
        let row = [kind.code(), d0, scale.to_bits(), rv, cv, d1, off(b)?, off(c)?, off(dd)?, off(kk)?];
        w[h..h + TERM_WORDS].copy_from_slice(&row);
    }
    Ok(w)
}

/// Words of the static region (written right after the dynamic region).
pub fn static_words(shape: &Shape, layout: &Layout, s: &Static) -> Result<Vec<u32>> {
    let base = layout.dynamic_words;
    let mut w = vec![0u32; layout.total_words - base];
    check_len("up matrix", s.up.len(), shape.n * shape.rank)?;
    let up = layout.params.up as usize - base;
    for (i, x) in s.up.iter().enumerate() {
        w[up + i] = x.to_bits();
    }
    check_len("term list", s.terms.len(), shape.terms.len())?;
    for (t, ((m0, m1), &(kind, _, _))) in s.terms.iter().zip(&shape.terms).enumerate() {
        let (d0, d1) = layout.term_data[t];
        let d0 = d0 as usize - base;
        match kind {
            TermKind::DenseF32 => {
                check_len("dense term", m0.len(), shape.n * shape.k)?;
                for (i, x) in m0.iter().enumerate() {
                    w[d0 + i] = x.to_bits();
                }
            }
            TermKind::DenseF16 => {
                check_len("dense term", m0.len(), shape.n * shape.k)?;
                for (i, pair) in m0.chunks(2).enumerate() {
                    let lo = half::f16::from_f32(pair[0]).to_bits() as u32;
                    let hi = pair.get(1).map_or(0, |&x| half::f16::from_f32(x).to_bits() as u32);
                    w[d0 + i] = lo | (hi << 16);
                }
            }
            TermKind::Kron { a, b, c, d, kk } => {
                check_len("Kronecker w1", m0.len(), a * b)?;
                check_len("Kronecker w2", m1.len(), c * d * kk)?;
                let d1 = d1 as usize - base;
                for (i, x) in m0.iter().enumerate() {
                    w[d0 + i] = x.to_bits();
                }
                for (i, x) in m1.iter().enumerate() {
                    w[d1 + i] = x.to_bits();
                }
            }
        }
    }
    Ok(w)
}

/// CPU references (f64 accumulation).
pub mod reference {
    use super::{Dynamic, Shape, Static, TermKind};

    /// The weight `[N, K]` the kernel multiplies by, without the low-rank part:
    /// `W₀ · (row[n] + col[k]) + Σ scale · row_t · col_t · T` (an absent row or col vector
    /// counts 0; both absent: W₀ as is). Dense f16 terms are rounded to f16.
    pub fn adapted_weight(shape: &Shape, w0: &[f32], d: &Dynamic, s: &Static) -> Vec<f32> {
        let (n, k) = (shape.n, shape.k);
        let mut w = vec![0f32; n * k];
        for r in 0..n {
            for c in 0..k {
                let mut v = w0[r * k + c] as f64;
                if d.base_row.is_some() || d.base_col.is_some() {
                    let f = d.base_row.as_ref().map_or(0.0, |br| br[r] as f64)
                        + d.base_col.as_ref().map_or(0.0, |bc| bc[c] as f64);
                    v *= f;
                }
                for (t, &(kind, _, _)) in shape.terms.iter().enumerate() {
                    let (scale, row, col) = &d.terms[t];
                    let mut sc = *scale as f64;
                    if let Some(rv) = row {
                        sc *= rv[r] as f64;
                    }
                    if let Some(cv) = col {
                        sc *= cv[c] as f64;
                    }
                    let (m0, m1) = &s.terms[t];
                    let x = match kind {
                        TermKind::DenseF32 => m0[r * k + c] as f64,
                        TermKind::DenseF16 => half::f16::from_f32(m0[r * k + c]).to_f64(),
                        TermKind::Kron { b, c: c2, d: dd, kk, .. } => {
                            let (ci, tap) = (c / kk, c % kk);
                            let (j, l) = (ci / dd, ci % dd);
                            let (i, r2) = (r / c2, r % c2);
                            m0[i * b + j] as f64 * m1[r2 * dd * kk + l * kk + tap] as f64
                        }
                    };
                    v += sc * x;
                }
                w[r * k + c] = v as f32;
            }
        }
        w
    }

    /// `up · diag(col_scale)`, `[N, R]`: the low-rank part's effective up matrix.
    pub fn scaled_up(shape: &Shape, d: &Dynamic, s: &Static) -> Vec<f32> {
        let mut u = s.up.clone();
        for r in 0..shape.n {
            for j in 0..shape.rank {
                u[r * shape.rank + j] *= d.col_scale[j];
            }
        }
        u
    }
}
