//! Thin singular value decompositions on the host, in f64: the maths behind LoRA resizing, ΔW
//! spectra and the classroom's "why low rank works".
//!
//! - [`svd_jacobi`]: one-sided (Hestenes) Jacobi on the matrix itself — simple and accurate to
//!   working precision, O(m·n²) per sweep; the reference the other paths are tested against.
//! - [`svd`]: a dense matrix; Householder QR of its tall orientation first, then Jacobi on the
//!   square triangle.
//! - [`svd_product`]: a matrix given as `left [m, p] · right [p, n]` with small `p` (ΔW = B·A of
//!   a LoRA): QR of `left` and of `rightᵀ`, Jacobi on the `p × p` core `R₁·R₂ᵀ`; an SD1.5
//!   1280×1280 layer at rank 128 takes milliseconds.
//! - [`svd_kron`]: `kron(W₁, W₂)` from the two factors' decompositions (the singular values of
//!   a Kronecker product are the products of the factors' singular values).
//!
//! Singular values come sorted, largest first (all `q = min(m, n, p)` of them); `u` and `v`
//! hold the matching singular vectors as columns, for the first `k ≤ q` values (`u [m, k]`,
//! `v [n, k]`; the factored paths form only as many as the caller asks for).

/// A dense row-major f64 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Matrix {
    /// All zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Matrix { rows, cols, data: vec![0.0; rows * cols] }
    }

    /// The identity (`n × n`).
    pub fn identity(n: usize) -> Self {
        let mut m = Matrix::zeros(n, n);
        (0..n).for_each(|i| m.data[i * n + i] = 1.0);
        m
    }

    /// From row-major f32 values; `None` when the length is not `rows · cols`.
    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Option<Self> {
        (values.len() == rows * cols).then(|| Matrix { rows, cols, data: values.iter().map(|&v| v as f64).collect() })
    }

    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    pub fn transpose(&self) -> Matrix {
        let mut out = Matrix::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                out.data[j * self.rows + i] = self.data[i * self.cols + j];
            }
        }
        out
    }

    /// `self · other`; `None` when the inner dimensions differ.
    pub fn matmul(&self, other: &Matrix) -> Option<Matrix> {
        if self.cols != other.rows {
            return None;
        }
        let (m, k, n) = (self.rows, self.cols, other.cols);
        let mut out = Matrix::zeros(m, n);
        for i in 0..m {
            let row = &mut out.data[i * n..(i + 1) * n];
            for (p, &a) in self.data[i * k..(i + 1) * k].iter().enumerate() {
                if a == 0.0 {
                    continue;
                }
                for (o, &b) in row.iter_mut().zip(&other.data[p * n..(p + 1) * n]) {
                    *o += a * b;
                }
            }
        }
        Some(out)
    }

    /// Σ aᵢⱼ².
    pub fn frobenius_sq(&self) -> f64 {
        self.data.iter().map(|v| v * v).sum()
    }

    /// Every value times `s`.
    pub fn scaled(mut self, s: f64) -> Matrix {
        self.data.iter_mut().for_each(|v| *v *= s);
        self
    }

    /// The columns, each as a vector.
    fn columns(&self) -> Vec<Vec<f64>> {
        (0..self.cols).map(|j| (0..self.rows).map(|i| self.data[i * self.cols + j]).collect()).collect()
    }

    /// A matrix from its columns (all of length `rows`).
    fn from_columns(rows: usize, cols: &[Vec<f64>]) -> Matrix {
        let mut m = Matrix::zeros(rows, cols.len());
        for (j, c) in cols.iter().enumerate() {
            for (i, &v) in c.iter().enumerate() {
                m.data[i * cols.len() + j] = v;
            }
        }
        m
    }
}

/// A thin singular value decomposition `A = U · diag(s) · Vᵀ`.
#[derive(Clone, Debug)]
pub struct Svd {
    /// `[m, k]`, orthonormal columns (a column whose singular value is 0 may be 0).
    pub u: Matrix,
    /// All `q` values, largest first (`q ≥ k`).
    pub s: Vec<f64>,
    /// `[n, k]`, orthonormal columns (likewise).
    pub v: Matrix,
}

impl Svd {
    /// `U_k · diag(s_k) · V_kᵀ`: the best rank-`k` approximation (Eckart–Young); `k` at most
    /// the vectors formed.
    pub fn reconstruct(&self, k: usize) -> Matrix {
        let k = k.min(self.u.cols);
        let (m, n, q) = (self.u.rows, self.v.rows, self.u.cols);
        let mut out = Matrix::zeros(m, n);
        for i in 0..m {
            let row = &mut out.data[i * n..(i + 1) * n];
            for r in 0..k {
                let a = self.u.data[i * q + r] * self.s[r];
                if a == 0.0 {
                    continue;
                }
                for (j, o) in row.iter_mut().enumerate() {
                    *o += a * self.v.data[j * q + r];
                }
            }
        }
        out
    }

    /// Σ sᵢ² (= ‖A‖_F²).
    pub fn energy(&self) -> f64 {
        self.s.iter().map(|s| s * s).sum()
    }

    /// The fraction of Σ sᵢ² held by the first 1, 2, … singular values.
    pub fn cumulative_energy(&self) -> Vec<f64> {
        let total = self.energy();
        let mut acc = 0.0;
        self.s
            .iter()
            .map(|s| {
                acc += s * s;
                if total > 0.0 {
                    acc / total
                } else {
                    1.0
                }
            })
            .collect()
    }

    /// Column `r` of `u` (length m) and of `v` (length n).
    pub fn vectors(&self, r: usize) -> (Vec<f64>, Vec<f64>) {
        let q = self.u.cols;
        ((0..self.u.rows).map(|i| self.u.data[i * q + r]).collect(), (0..self.v.rows).map(|j| self.v.data[j * q + r]).collect())
    }

    /// Swaps the roles of `u` and `v` (the decomposition of Aᵀ).
    fn transposed(self) -> Svd {
        Svd { u: self.v, s: self.s, v: self.u }
    }
}

/// Σ aᵢbᵢ with eight partial sums (lets the compiler vectorise).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f64>() + tail
}

/// One-sided Jacobi on columns: rotates pairs of columns of `a` until they are orthogonal,
/// accumulating the rotations in `v`. Returns the singular values (column norms) and U.
fn jacobi_columns(mut a: Vec<Vec<f64>>, rows: usize) -> Svd {
    let n = a.len();
    let mut v: Vec<Vec<f64>> = (0..n).map(|j| (0..n).map(|i| if i == j { 1.0 } else { 0.0 }).collect()).collect();
    const TOL: f64 = 1e-15;
    for _sweep in 0..80 {
        let mut rotated = false;
        // Squared column norms, recomputed each sweep and updated after each rotation.
        let mut norms: Vec<f64> = a.iter().map(|c| dot(c, c)).collect();
        for p in 0..n {
            for q in p + 1..n {
                let (alpha, beta) = (norms[p], norms[q]);
                if alpha == 0.0 || beta == 0.0 {
                    continue;
                }
                let gamma = dot(&a[p], &a[q]);
                if gamma.abs() <= TOL * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                norms[p] = (alpha - t * gamma).max(0.0);
                norms[q] = beta + t * gamma;
                let (lo, hi) = a.split_at_mut(q);
                for (x, y) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
                    let (xp, yq) = (*x, *y);
                    *x = c * xp - s * yq;
                    *y = s * xp + c * yq;
                }
                let (lo, hi) = v.split_at_mut(q);
                for (x, y) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
                    let (xp, yq) = (*x, *y);
                    *x = c * xp - s * yq;
                    *y = s * xp + c * yq;
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let mut order: Vec<(f64, usize)> = a.iter().enumerate().map(|(j, c)| (dot(c, c).sqrt(), j)).collect();
    order.sort_by(|x, y| y.0.total_cmp(&x.0));
    let s: Vec<f64> = order.iter().map(|o| o.0).collect();
    let u_cols: Vec<Vec<f64>> = order
        .iter()
        .map(|&(sigma, j)| if sigma > 0.0 { a[j].iter().map(|x| x / sigma).collect() } else { vec![0.0; rows] })
        .collect();
    let v_cols: Vec<Vec<f64>> = order.iter().map(|&(_, j)| v[j].clone()).collect();
    Svd { u: Matrix::from_columns(rows, &u_cols), s, v: Matrix::from_columns(n, &v_cols) }
}

/// The thin SVD by one-sided Jacobi on `a` itself (transposed first when wide): the
/// brute-force reference, O(m·n²) per sweep.
pub fn svd_jacobi(a: &Matrix) -> Svd {
    if a.rows < a.cols {
        return svd_jacobi(&a.transpose()).transposed();
    }
    jacobi_columns(a.columns(), a.rows)
}

/// A Householder QR factorisation: the reflectors (`I − v vᵀ`, |v|² = 2, acting on rows
/// `k..`) and the triangle `R [n, n]`.
struct Householder {
    rows: usize,
    reflectors: Vec<Vec<f64>>,
    r: Matrix,
}

impl Householder {
    /// `Q · [x; 0]` for `x [n, k]`: the first n columns of Q combined by x, `[m, k]`.
    fn apply(&self, x: &Matrix) -> Matrix {
        let m = self.rows;
        let mut cols: Vec<Vec<f64>> = x
            .columns()
            .into_iter()
            .map(|c| {
                let mut full = vec![0.0; m];
                full[..c.len().min(m)].copy_from_slice(&c[..c.len().min(m)]);
                full
            })
            .collect();
        for (k, v) in self.reflectors.iter().enumerate().rev() {
            for c in cols.iter_mut() {
                let f = dot(v, &c[k..]);
                if f != 0.0 {
                    c[k..].iter_mut().zip(v).for_each(|(y, vi)| *y -= f * vi);
                }
            }
        }
        Matrix::from_columns(m, &cols)
    }
}

/// Householder QR of a tall matrix (`rows ≥ cols`).
fn householder(a: &Matrix) -> Householder {
    let (m, n) = (a.rows, a.cols);
    let mut cols = a.columns();
    let mut reflectors: Vec<Vec<f64>> = Vec::with_capacity(n);
    for k in 0..n.min(m) {
        let x = &cols[k][k..];
        let norm = dot(x, x).sqrt();
        let mut v = x.to_vec();
        if norm == 0.0 {
            reflectors.push(vec![0.0; m - k]);
            continue;
        }
        let alpha = if x[0] >= 0.0 { -norm } else { norm };
        v[0] -= alpha;
        let vv = dot(&v, &v);
        if vv == 0.0 {
            reflectors.push(vec![0.0; m - k]);
            continue;
        }
        let scale = (2.0 / vv).sqrt();
        v.iter_mut().for_each(|x| *x *= scale);
        for c in cols.iter_mut().skip(k + 1) {
            let f = dot(&v, &c[k..]);
            c[k..].iter_mut().zip(&v).for_each(|(y, vi)| *y -= f * vi);
        }
        cols[k][k] = alpha;
        cols[k][k + 1..].iter_mut().for_each(|y| *y = 0.0);
        reflectors.push(v);
    }
    let mut r = Matrix::zeros(n, n);
    for (j, c) in cols.iter().enumerate() {
        for (i, &v) in c.iter().enumerate().take(j + 1) {
            r.data[i * n + j] = v;
        }
    }
    Householder { rows: m, reflectors, r }
}

/// Thin Householder QR of a tall matrix (`rows ≥ cols`): `Q [m, n]` with orthonormal columns
/// and upper-triangular `R [n, n]`.
pub fn qr(a: &Matrix) -> (Matrix, Matrix) {
    let h = householder(a);
    (h.apply(&Matrix::identity(a.cols)), h.r)
}

/// The SVD of a square `r` from Jacobi on `rᵀ`'s columns (a triangular factor's transpose
/// converges in a few sweeps, Drmač–Veselić): `r = V_a Σ U_aᵀ` when `rᵀ = U_a Σ V_aᵀ`.
fn svd_square_t(r: &Matrix) -> Svd {
    jacobi_columns(r.transpose().columns(), r.cols).transposed()
}

/// The thin SVD of a dense matrix: QR of its tall orientation, Jacobi on the triangle.
pub fn svd(a: &Matrix) -> Svd {
    if a.rows < a.cols {
        return svd(&a.transpose()).transposed();
    }
    if a.cols == 0 {
        return Svd { u: Matrix::zeros(a.rows, 0), s: vec![], v: Matrix::zeros(0, 0) };
    }
    let (q, r) = qr(a);
    let inner = svd_square_t(&r);
    let u = q.matmul(&inner.u).unwrap_or_else(|| Matrix::zeros(a.rows, inner.s.len()));
    Svd { u, s: inner.s, v: inner.v }
}

/// The thin SVD of `left [m, p] · right [p, n]` without forming the product when `p` is
/// smaller than both sides; `None` when the inner dimensions differ.
pub fn svd_product(left: &Matrix, right: &Matrix) -> Option<Svd> {
    svd_product_with(left, right, &|s| s.len())
}

/// As [`svd_product`], with singular vectors formed only for the first `vectors(σ)` values
/// (the values are all computed first, so the caller can choose from them).
pub fn svd_product_with(left: &Matrix, right: &Matrix, vectors: &dyn Fn(&[f64]) -> usize) -> Option<Svd> {
    if left.cols != right.rows {
        return None;
    }
    let (m, p, n) = (left.rows, left.cols, right.cols);
    if p >= m.min(n) {
        return Some(svd(&left.matmul(right)?));
    }
    let h1 = householder(left);
    let h2 = householder(&right.transpose());
    let core = h1.r.matmul(&h2.r.transpose())?;
    // QR of the core first: Jacobi then runs on a triangle.
    let h3 = householder(&core);
    let inner = svd_square_t(&h3.r);
    let k = vectors(&inner.s).min(inner.s.len());
    let first = |x: &Matrix| {
        let mut out = Matrix::zeros(x.rows, k);
        for i in 0..x.rows {
            out.data[i * k..(i + 1) * k].copy_from_slice(&x.data[i * x.cols..i * x.cols + k]);
        }
        out
    };
    let u = h1.apply(&h3.apply(&first(&inner.u)));
    let v = h2.apply(&first(&inner.v));
    Some(Svd { u, s: inner.s, v })
}

/// The thin SVD of `kron(W₁, W₂)` from those of `W₁ [a, c]` and `W₂ [b, d]`: every product
/// σ₁ᵢ·σ₂ⱼ with singular vectors `kron(u₁ᵢ, u₂ⱼ)`, `kron(v₁ᵢ, v₂ⱼ)`, formed for the first
/// `vectors(σ)` values (the factors' decompositions need all their vectors).
pub fn svd_kron(s1: &Svd, s2: &Svd, vectors: &dyn Fn(&[f64]) -> usize) -> Svd {
    let mut pairs: Vec<(f64, usize, usize)> =
        s1.s.iter().enumerate().flat_map(|(i, a)| s2.s.iter().enumerate().map(move |(j, b)| (a * b, i, j))).collect();
    pairs.sort_by(|x, y| y.0.total_cmp(&x.0));
    let all: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    let k = vectors(&all).min(pairs.len());
    let (m, n) = (s1.u.rows * s2.u.rows, s1.v.rows * s2.v.rows);
    let mut u = Matrix::zeros(m, k);
    let mut v = Matrix::zeros(n, k);
    for (r, &(_, i, j)) in pairs.iter().take(k).enumerate() {
        let (u1, v1) = s1.vectors(i);
        let (u2, v2) = s2.vectors(j);
        for (a, x) in u1.iter().enumerate() {
            for (b, y) in u2.iter().enumerate() {
                u.data[(a * u2.len() + b) * k + r] = x * y;
            }
        }
        for (a, x) in v1.iter().enumerate() {
            for (b, y) in v2.iter().enumerate() {
                v.data[(a * v2.len() + b) * k + r] = x * y;
            }
        }
    }
    Svd { u, s: all, v }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_matrix(rows: usize, cols: usize, seed: u64) -> Matrix {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let data = (0..rows * cols)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Matrix { rows, cols, data }
    }

    fn max_diff(a: &Matrix, b: &Matrix) -> f64 {
        a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    /// ‖QᵀQ − I‖_max over the columns with a non-zero singular value.
    fn orthogonality(q: &Matrix, s: &[f64]) -> f64 {
        let k = s.iter().filter(|&&x| x > 1e-12 * s[0].max(1e-300)).count();
        let mut worst: f64 = 0.0;
        for a in 0..k {
            for b in 0..k {
                let d: f64 = (0..q.rows).map(|i| q.at(i, a) * q.at(i, b)).sum();
                worst = worst.max((d - if a == b { 1.0 } else { 0.0 }).abs());
            }
        }
        worst
    }

    #[test]
    fn jacobi_reconstructs_and_is_orthogonal() {
        for (m, n, seed) in [(7, 5, 1), (5, 9, 2), (16, 16, 3), (1, 4, 4)] {
            let a = rand_matrix(m, n, seed);
            let d = svd_jacobi(&a);
            assert_eq!(d.s.len(), m.min(n));
            assert!(d.s.windows(2).all(|w| w[0] >= w[1]), "not sorted: {:?}", d.s);
            assert!(max_diff(&d.reconstruct(d.s.len()), &a) < 1e-12, "{m}x{n}");
            assert!(orthogonality(&d.u, &d.s) < 1e-12 && orthogonality(&d.v, &d.s) < 1e-12);
            assert!((d.energy() - a.frobenius_sq()).abs() < 1e-10 * a.frobenius_sq());
        }
    }

    #[test]
    fn qr_factors() {
        let a = rand_matrix(12, 5, 9);
        let (q, r) = qr(&a);
        assert!(max_diff(&q.matmul(&r).unwrap(), &a) < 1e-13);
        assert!(orthogonality(&q, &[1.0; 5]) < 1e-13);
        assert!((0..5).all(|i| (0..i).all(|j| r.at(i, j) == 0.0)), "R is not upper triangular");
    }

    #[test]
    fn product_path_matches_the_dense_reference_and_the_truncation_error() {
        // ΔW = B·A of rank 6 in 40×30, plus a rank-deficient pair (two equal columns).
        for (m, p, n, seed) in [(40, 6, 30, 11), (25, 4, 60, 12)] {
            let b = rand_matrix(m, p, seed);
            let mut a = rand_matrix(p, n, seed + 1);
            if seed == 12 {
                let row: Vec<f64> = a.data[..n].to_vec();
                a.data[n..2 * n].copy_from_slice(&row);
            }
            let w = b.matmul(&a).unwrap();
            let fast = svd_product(&b, &a).unwrap();
            let slow = svd_jacobi(&w);
            assert_eq!(fast.s.len(), p);
            for (i, (x, y)) in fast.s.iter().zip(&slow.s).enumerate() {
                assert!((x - y).abs() < 1e-10 * slow.s[0], "σ{i}: {x} vs {y}");
            }
            assert!(slow.s[p..].iter().all(|&s| s < 1e-10 * slow.s[0]), "the product has rank ≤ {p}");
            // ‖ΔW − ΔW_k‖_F² = Σ_{i>k} σᵢ².
            for k in 0..=p {
                let wk = fast.reconstruct(k);
                let err: f64 = w.data.iter().zip(&wk.data).map(|(x, y)| (x - y) * (x - y)).sum();
                let tail: f64 = fast.s[k..].iter().map(|s| s * s).sum();
                assert!((err - tail).abs() < 1e-9 * w.frobenius_sq(), "k={k}: {err} vs {tail}");
            }
            assert!(orthogonality(&fast.u, &fast.s) < 1e-11 && orthogonality(&fast.v, &fast.s) < 1e-11);
        }
    }

    #[test]
    fn partial_vectors() {
        let b = rand_matrix(50, 5, 41);
        let a = rand_matrix(5, 40, 42);
        let all = svd_product(&b, &a).unwrap();
        let two = svd_product_with(&b, &a, &|s| s.iter().filter(|&&x| x >= s[1]).count()).unwrap();
        assert_eq!((two.u.cols, two.v.cols, two.s.len()), (2, 2, 5));
        assert!(max_diff(&two.reconstruct(2), &all.reconstruct(2)) < 1e-12);
    }

    #[test]
    fn dense_path_matches_jacobi() {
        let a = rand_matrix(30, 70, 21);
        let d = svd(&a);
        let j = svd_jacobi(&a);
        for (x, y) in d.s.iter().zip(&j.s) {
            assert!((x - y).abs() < 1e-11 * j.s[0]);
        }
        assert!(max_diff(&d.reconstruct(30), &a) < 1e-12);
        assert!(orthogonality(&d.u, &d.s) < 1e-12 && orthogonality(&d.v, &d.s) < 1e-12);
    }

    #[test]
    fn kron_values_and_vectors() {
        let w1 = rand_matrix(3, 4, 31);
        let w2 = rand_matrix(5, 2, 32);
        let mut k = Matrix::zeros(15, 8);
        for i in 0..3 {
            for j in 0..4 {
                for p in 0..5 {
                    for q in 0..2 {
                        k.data[(i * 5 + p) * 8 + j * 2 + q] = w1.at(i, j) * w2.at(p, q);
                    }
                }
            }
        }
        let d = svd_kron(&svd(&w1), &svd(&w2), &|s| s.len());
        let j = svd_jacobi(&k);
        for (x, y) in d.s.iter().zip(&j.s) {
            assert!((x - y).abs() < 1e-11 * j.s[0], "{x} vs {y}");
        }
        assert!(max_diff(&d.reconstruct(d.s.len()), &k) < 1e-12);
    }
}
