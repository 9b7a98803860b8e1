//! Backward of a linear layer with a trainable LoRA on a frozen weight of every storage type
//! (`ops::grad::linear`): the f64 reference against finite differences, then the kernels
//! against the reference on both devices.

use crate::common::*;
use crate::gradcheck::{assert_grad, dot, f64s, numeric_grad};
use loralab::ops::grad::linear::{
    self as gl, linear_input_grad, lora_linear, lora_linear_backward, reference, row_chunks, transposed_product, Lora,
};
use loralab::quant::round_trip;
use loralab::{DType, Gpu, Tensor};

/// f32 sums on the device against the f64 reference on the same (dequantized) operands.
const BOUND: f64 = STRICT;

fn rand64(n: usize, seed: u64) -> Vec<f64> {
    f64s(&randn(n, seed))
}

#[test]
fn reference_backward_matches_finite_differences() {
    // (rows, K, N, R): single elements, sizes that are not multiples of anything, R > K.
    let shapes = [(1, 1, 1, 1), (3, 5, 4, 2), (2, 7, 3, 1), (4, 3, 6, 5), (5, 2, 2, 3)];
    for (i, &(rows, k, n, r)) in shapes.iter().enumerate() {
        let seed = 10 + 7 * i as u64;
        let d = (rows, k, n, r);
        let (x, w, down) = (rand64(rows * k, seed), rand64(n * k, seed + 1), rand64(r * k, seed + 2));
        let (up, u) = (rand64(n * r, seed + 3), rand64(rows * n, seed + 4));
        let bias = rand64(n, seed + 5);
        let s = 0.75;
        let (dx, d_down, d_up) = reference::backward(&x, &w, &down, &up, s, &u, d);
        let what = format!("rows {rows} K {k} N {n} R {r}");
        let loss_x = |v: &[f64]| dot(&u, &reference::forward(v, &w, Some(&bias), &down, &up, s, d).0);
        assert_grad(&format!("dx {what}"), &dx, &numeric_grad(&loss_x, &x, 1e-6), 1e-7);
        let loss_a = |v: &[f64]| dot(&u, &reference::forward(&x, &w, Some(&bias), v, &up, s, d).0);
        assert_grad(&format!("d_down {what}"), &d_down, &numeric_grad(&loss_a, &down, 1e-6), 1e-7);
        let loss_b = |v: &[f64]| dot(&u, &reference::forward(&x, &w, Some(&bias), &down, v, s, d).0);
        assert_grad(&format!("d_up {what}"), &d_up, &numeric_grad(&loss_b, &up, 1e-6), 1e-7);
        // The frozen layer's input gradient alone (no adapter: s = 0).
        let frozen = |v: &[f64]| dot(&u, &reference::forward(v, &w, None, &down, &up, 0.0, d).0);
        let dx0 = reference::input_grad(&u, &w, rows, k, n);
        assert_grad(&format!("frozen dx {what}"), &dx0, &numeric_grad(&frozen, &x, 1e-6), 1e-7);
    }
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// `dy·W₀` reads the stored `[N, K]` weight without a transpose: every storage type, K that is
/// odd (f16 rows straddle words) or not a multiple of 32 (quantized rows end in padding).
#[test]
fn input_grad_reads_every_weight_type_untransposed() {
    // (lead, N, K)
    let shapes: [(&[usize], usize, usize); 5] =
        [(&[1], 1, 1), (&[3], 5, 33), (&[2, 7], 37, 70), (&[65], 64, 96), (&[4, 3], 40, 31)];
    let mut seed = 300;
    for gpu in gpus() {
        for dt in DType::ALL {
            for &(lead, n, k) in &shapes {
                seed += 5;
                let rows: usize = lead.iter().product();
                let dy = randn(rows * n, seed);
                let w = randn(n * k, seed + 1);
                let mut shape = lead.to_vec();
                shape.push(n);
                let tdy = Tensor::from_f32(gpu, &shape, &dy).unwrap();
                let tw = Tensor::from_f32_as(gpu, &[n, k], &w, dt).unwrap();
                let dx = linear_input_grad(gpu, &tdy, &tw).unwrap();
                *shape.last_mut().unwrap() = k;
                assert_eq!(dx.shape(), &shape[..]);
                let wq = f64s(&round_trip(&w, n, k, dt));
                let want = reference::input_grad(&f64s(&dy), &wq, rows, k, n);
                assert_nmse(&format!("{dt} lead {lead:?} N {n} K {k}"), &read(gpu, &dx), &f32s(&want), BOUND);
            }
        }
    }
}

struct Case {
    lead: Vec<usize>,
    k: usize,
    n: usize,
    r: usize,
}

fn run_case(gpu: &Gpu, c: &Case, dt: DType, seed: u64) {
    let rows: usize = c.lead.iter().product();
    let (k, n, r) = (c.k, c.n, c.r);
    let x = randn(rows * k, seed);
    let w = randn(n * k, seed + 1);
    let bias = randn(n, seed + 2);
    let down = randn(r * k, seed + 3);
    let up = randn(n * r, seed + 4);
    let dy = randn(rows * n, seed + 5);
    let s = 1.5 / r as f32;
    let shape = |last: usize| {
        let mut v = c.lead.clone();
        v.push(last);
        v
    };
    let tx = Tensor::from_f32(gpu, &shape(k), &x).unwrap();
    let tw = Tensor::from_f32_as(gpu, &[n, k], &w, dt).unwrap();
    let tb = Tensor::from_f32(gpu, &[n], &bias).unwrap();
    let tdown = Tensor::from_f32(gpu, &[r, k], &down).unwrap();
    let tup = Tensor::from_f32(gpu, &[n, r], &up).unwrap();
    let tdy = Tensor::from_f32(gpu, &shape(n), &dy).unwrap();
    let lora = Lora { down: &tdown, up: &tup, scale: s };

    let wq = f64s(&round_trip(&w, n, k, dt));
    let d = (rows, k, n, r);
    let (x64, down64, up64) = (f64s(&x), f64s(&down), f64s(&up));
    let what = format!("{dt} lead {:?} K {k} N {n} R {r}", c.lead);

    let (y, h) = lora_linear(gpu, &tx, &tw, Some(&tb), &lora).unwrap();
    assert_eq!((y.shape(), h.shape()), (&shape(n)[..], &shape(r)[..]));
    let (y_want, h_want) = reference::forward(&x64, &wq, Some(&f64s(&bias)), &down64, &up64, s as f64, d);
    assert_nmse(&format!("y {what}"), &read(gpu, &y), &f32s(&y_want), BOUND);
    assert_nmse(&format!("h {what}"), &read(gpu, &h), &f32s(&h_want), BOUND);

    let (dx_want, dd_want, du_want) = reference::backward(&x64, &wq, &down64, &up64, s as f64, &f64s(&dy), d);
    let g = lora_linear_backward(gpu, &tx, &tw, &lora, Some(&h), &tdy, true).unwrap();
    let dx = g.dx.expect("dx was asked for");
    assert_eq!((dx.shape(), g.d_down.shape(), g.d_up.shape()), (&shape(k)[..], &[r, k][..], &[n, r][..]));
    assert_nmse(&format!("dx {what}"), &read(gpu, &dx), &f32s(&dx_want), BOUND);
    let d_down = read(gpu, &g.d_down);
    let d_up = read(gpu, &g.d_up);
    assert_nmse(&format!("d_down {what}"), &d_down, &f32s(&dd_want), BOUND);
    assert_nmse(&format!("d_up {what}"), &d_up, &f32s(&du_want), BOUND);

    // Recomputing h, and leaving dx out, gives the same parameter gradients bit for bit.
    let g2 = lora_linear_backward(gpu, &tx, &tw, &lora, None, &tdy, false).unwrap();
    assert!(g2.dx.is_none());
    assert_eq!(read(gpu, &g2.d_down), d_down, "{what}: d_down repeats");
    assert_eq!(read(gpu, &g2.d_up), d_up, "{what}: d_up repeats");
}

#[test]
fn lora_forward_and_backward_match_the_reference() {
    let cases = [
        Case { lead: vec![1], k: 1, n: 1, r: 1 },
        Case { lead: vec![2, 5], k: 12, n: 9, r: 3 },
        Case { lead: vec![3, 100], k: 40, n: 24, r: 4 },
        // Enough rows to split the reductions into chunks; K past one tile.
        Case { lead: vec![2, 640], k: 70, n: 33, r: 8 },
        Case { lead: vec![1, 257], k: 33, n: 17, r: 16 },
    ];
    let mut seed = 1000;
    for gpu in gpus() {
        for dt in DType::ALL {
            for c in &cases {
                seed += 11;
                run_case(gpu, c, dt, seed);
            }
        }
    }
}

#[test]
fn transposed_product_is_split_into_equal_chunks_and_repeats() {
    // Chunks divide the rows, grow with the rows, and stop at 64.
    assert_eq!(row_chunks(100, 1), 1);
    assert_eq!(row_chunks(257, 1), 1); // prime: one chunk
    assert_eq!(row_chunks(1280, 2), 10);
    assert_eq!(row_chunks(8192, 2), 64);
    assert_eq!(row_chunks(8192, 200), 1);
    for rows in [1, 7, 128, 1000, 4096] {
        for tiles in [1, 3, 64, 500] {
            let c = row_chunks(rows, tiles);
            assert!((1..=64).contains(&c) && rows % c == 0, "rows {rows} tiles {tiles}: {c}");
        }
    }
    for gpu in gpus() {
        for &(rows, p, q) in &[(1, 1, 1), (300, 5, 7), (4096, 4, 130), (1000, 33, 9)] {
            let a = randn(rows * p, rows as u64);
            let b = randn(rows * q, rows as u64 + 1);
            let ta = Tensor::from_f32(gpu, &[rows, p], &a).unwrap();
            let tb = Tensor::from_f32(gpu, &[rows, q], &b).unwrap();
            let got = read(gpu, &transposed_product(gpu, &ta, &tb, -0.5).unwrap());
            let mut want = vec![0f32; p * q];
            for i in 0..p {
                for j in 0..q {
                    let s: f64 = (0..rows).map(|m| a[m * p + i] as f64 * b[m * q + j] as f64).sum();
                    want[i * q + j] = (-0.5 * s) as f32;
                }
            }
            assert_nmse(&format!("rows {rows} P {p} Q {q}"), &got, &want, BOUND);
            let again = read(gpu, &transposed_product(gpu, &ta, &tb, -0.5).unwrap());
            assert_eq!(got, again, "rows {rows}: bit-reproducible");
        }
    }
}

#[test]
fn mismatched_operands_are_errors() {
    let gpu = gpu();
    let t = |s: &[usize]| Tensor::zeros(gpu, s).unwrap();
    let (x, w, down, up, dy) = (t(&[4, 6]), t(&[5, 6]), t(&[2, 6]), t(&[5, 2]), t(&[4, 5]));
    let ok = Lora { down: &down, up: &up, scale: 1.0 };
    assert!(lora_linear_backward(gpu, &x, &w, &ok, None, &dy, true).is_ok());
    let bad_up = t(&[2, 5]);
    let bad = Lora { up: &bad_up, ..ok };
    assert!(lora_linear_backward(gpu, &x, &w, &bad, None, &dy, true).is_err());
    assert!(lora_linear_backward(gpu, &x, &w, &ok, None, &t(&[4, 6]), true).is_err());
    assert!(lora_linear_backward(gpu, &x, &w, &ok, Some(&t(&[4, 3])), &dy, true).is_err());
    assert!(lora_linear(gpu, &t(&[4, 5]), &w, None, &ok).is_err());
    assert!(linear_input_grad(gpu, &t(&[4, 6]), &w).is_err());
    assert!(gl::transposed_product(gpu, &t(&[3, 2]), &t(&[4, 2]), 1.0).is_err());
}
