//! Finite-difference gradient checks for the backward kernels' CPU references (f64).

#![allow(dead_code)]

/// Central differences of the scalar `f` at `x`: `(f(x + h·eᵢ) − f(x − h·eᵢ)) / 2h` for every
/// `i`, with `h = eps · max(1, |xᵢ|)`.
pub fn numeric_grad(f: &dyn Fn(&[f64]) -> f64, x: &[f64], eps: f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let xi = x[i];
            let h = eps * xi.abs().max(1.0);
            x[i] = xi + h;
            let up = f(&x);
            x[i] = xi - h;
            let down = f(&x);
            x[i] = xi;
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// `Σ wᵢ·yᵢ`: the scalar loss whose gradient with respect to `y` is `w` (the upstream
/// gradient a backward kernel receives).
pub fn dot(w: &[f64], y: &[f64]) -> f64 {
    assert_eq!(w.len(), y.len(), "dot: lengths");
    w.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// Asserts that an analytic gradient matches a numeric one: relative error
/// `‖a − n‖ / max(‖n‖, 1e-12) <= tol`, printing the worst elements otherwise.
pub fn assert_grad(what: &str, analytic: &[f64], numeric: &[f64], tol: f64) {
    assert_eq!(analytic.len(), numeric.len(), "{what}: lengths");
    assert!(analytic.iter().all(|v| v.is_finite()), "{what}: non-finite analytic gradient");
    let diff: f64 = analytic.iter().zip(numeric).map(|(a, n)| (a - n) * (a - n)).sum::<f64>().sqrt();
    let norm: f64 = numeric.iter().map(|n| n * n).sum::<f64>().sqrt();
    let rel = diff / norm.max(1e-12);
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    if !(rel <= tol) {
        let mut worst: Vec<(usize, f64, f64)> = analytic.iter().zip(numeric).enumerate().map(|(i, (a, n))| (i, *a, *n)).collect();
        worst.sort_by(|x, y| (y.1 - y.2).abs().total_cmp(&(x.1 - x.2).abs()));
        let shown: Vec<String> = worst.iter().take(6).map(|(i, a, n)| format!("[{i}] analytic {a:.6e} numeric {n:.6e}")).collect();
        panic!("{what}: relative gradient error {rel:.3e} > {tol:.1e}\n  {}", shown.join("\n  "));
    }
}

/// Converts to f64.
pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

#[test]
fn numeric_gradient_of_a_known_function() {
    // f(x) = Σ xᵢ³ + x₀·x₁ → ∂f/∂x₀ = 3x₀² + x₁, ∂f/∂x₁ = 3x₁² + x₀, ∂f/∂x₂ = 3x₂².
    let f = |x: &[f64]| x.iter().map(|v| v * v * v).sum::<f64>() + x[0] * x[1];
    let x = [0.5, -1.25, 2.0];
    let want = [3.0 * 0.25 - 1.25, 3.0 * 1.5625 + 0.5, 12.0];
    let got = numeric_grad(&f, &x, 1e-5);
    assert_grad("cubic", &got, &want, 1e-8);
    let wrong = [want[0], want[1], want[2] + 0.1];
    assert!(std::panic::catch_unwind(|| assert_grad("wrong", &wrong, &got, 1e-6)).is_err());
}
