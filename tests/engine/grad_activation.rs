//! Backward of SiLU, GELU, quick GELU, GEGLU and the nearest 2× upsample, and in-place accumulation: the
//! f64 references against finite differences of the f64 forward (which must agree with the
//! forward op's own reference), then the kernels against the references on both devices.

use crate::common::*;
use crate::gradcheck::{assert_grad, dot, f64s, numeric_grad};
use loralab::ops::elementwise::{self as ew, Unary};
use loralab::ops::grad::activation::{self as act, reference};
use loralab::ops::layout;
use loralab::{Error, Tensor};

fn f32s(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// Normal values with a few extremes that must not overflow.
fn inputs(n: usize, seed: u64) -> Vec<f32> {
    let mut x: Vec<f32> = randn(n, seed).into_iter().map(|v| 2.0 * v).collect();
    for (i, v) in [80.0, -80.0, 0.0, 12.0, -12.0].into_iter().enumerate().take(n / 2) {
        x[2 * i] = v;
    }
    x
}

#[test]
fn activation_reference_gradients_match_finite_differences() {
    for (ci, n) in [1usize, 2, 9, 31].into_iter().enumerate() {
        let x = f64s(&randn(n, ci as u64)).into_iter().map(|v| 2.0 * v).collect::<Vec<_>>();
        let dy = f64s(&randn(n, 10 + ci as u64));
        let silu = |x: &[f64]| dot(&dy, &reference::silu(x));
        assert_grad(&format!("silu n={n}"), &reference::silu_backward(&x, &dy), &numeric_grad(&silu, &x, 1e-6), 1e-7);
        let gelu = |x: &[f64]| dot(&dy, &reference::gelu(x));
        assert_grad(&format!("gelu n={n}"), &reference::gelu_backward(&x, &dy), &numeric_grad(&gelu, &x, 1e-6), 1e-7);
        let qg = |x: &[f64]| dot(&dy, &reference::quick_gelu(x));
        let numeric = numeric_grad(&qg, &x, 1e-6);
        assert_grad(&format!("quick_gelu n={n}"), &reference::quick_gelu_backward(&x, &dy), &numeric, 1e-7);
    }
    for (ci, &(rows, d)) in [(1usize, 1usize), (2, 3), (3, 8)].iter().enumerate() {
        let x = f64s(&randn(rows * 2 * d, 20 + ci as u64));
        let dy = f64s(&randn(rows * d, 30 + ci as u64));
        let loss = |x: &[f64]| dot(&dy, &reference::geglu(x, d));
        let numeric = numeric_grad(&loss, &x, 1e-6);
        assert_grad(&format!("geglu [{rows}, {}]", 2 * d), &reference::geglu_backward(&x, &dy, d), &numeric, 1e-7);
    }
    for (ci, &(bc, h, w)) in [(1usize, 1usize, 1usize), (2, 3, 1), (3, 2, 5)].iter().enumerate() {
        let x = f64s(&randn(bc * h * w, 40 + ci as u64));
        let dy = f64s(&randn(4 * bc * h * w, 50 + ci as u64));
        let loss = |x: &[f64]| dot(&dy, &reference::upsample_nearest2x(x, bc, h, w));
        let numeric = numeric_grad(&loss, &x, 1e-6);
        let analytic = reference::upsample_nearest2x_backward(&dy, bc, h, w);
        assert_grad(&format!("upsample [{bc}, {h}, {w}]"), &analytic, &numeric, 1e-8);
    }
}

#[test]
fn activation_reference_forwards_are_the_ops_forwards() {
    let x = inputs(64, 1);
    let xd = f64s(&x);
    let close = |ours: &[f64], theirs: &[f32], what: &str| {
        let worst = ours.iter().zip(theirs).map(|(a, b)| (a - *b as f64).abs() / (1.0 + a.abs())).fold(0.0, f64::max);
        assert!(worst < 1e-6, "{what}: {worst}");
    };
    let theirs: Vec<f32> = x.iter().map(|&v| ew::reference::unary(v, Unary::Silu)).collect();
    close(&reference::silu(&xd), &theirs, "silu");
    let theirs: Vec<f32> = x.iter().map(|&v| ew::reference::unary(v, Unary::Gelu)).collect();
    close(&reference::gelu(&xd), &theirs, "gelu");
    let theirs: Vec<f32> = x.iter().map(|&v| ew::reference::unary(v, Unary::QuickGelu)).collect();
    close(&reference::quick_gelu(&xd), &theirs, "quick_gelu");
    close(&reference::geglu(&xd, 8), &ew::reference::geglu(&x, 8), "geglu");
    close(&reference::upsample_nearest2x(&xd, 2, 4, 8), &layout::reference::upsample_nearest2x(&x, 2, 4, 8), "upsample");
}

#[test]
fn silu_and_gelu_backward_match_reference() {
    for gpu in gpus() {
        for (si, n) in [1usize, 7, 256, 1000, 70_001].into_iter().enumerate() {
            let x = inputs(n, 60 + si as u64);
            let dy = randn(n, 70 + si as u64);
            let tx = Tensor::from_f32(gpu, &[n], &x).unwrap();
            let tdy = Tensor::from_f32(gpu, &[n], &dy).unwrap();
            let sub = gpu.caps().subgroups;
            let want = reference::silu_backward(&f64s(&x), &f64s(&dy));
            let got = read(gpu, &act::silu_backward(gpu, &tx, &tdy).unwrap());
            assert_nmse(&format!("silu_backward n={n} subgroups={sub}"), &got, &f32s(&want), TRANSCENDENTAL);
            let want = reference::gelu_backward(&f64s(&x), &f64s(&dy));
            let got = read(gpu, &act::gelu_backward(gpu, &tx, &tdy).unwrap());
            assert_nmse(&format!("gelu_backward n={n} subgroups={sub}"), &got, &f32s(&want), TRANSCENDENTAL);
            let want = reference::quick_gelu_backward(&f64s(&x), &f64s(&dy));
            let got = read(gpu, &act::quick_gelu_backward(gpu, &tx, &tdy).unwrap());
            assert_nmse(&format!("quick_gelu_backward n={n} subgroups={sub}"), &got, &f32s(&want), TRANSCENDENTAL);
        }
    }
}

#[test]
fn geglu_backward_matches_reference() {
    let cases: &[&[usize]] = &[&[1, 1], &[3, 5], &[2, 77, 640], &[1, 4, 16, 2560]];
    for gpu in gpus() {
        for (ci, &shape) in cases.iter().enumerate() {
            let d = *shape.last().unwrap();
            let rows: usize = shape[..shape.len() - 1].iter().product();
            let mut xs = shape.to_vec();
            *xs.last_mut().unwrap() = 2 * d;
            let x = inputs(rows * 2 * d, 80 + ci as u64);
            let dy = randn(rows * d, 90 + ci as u64);
            let tx = Tensor::from_f32(gpu, &xs, &x).unwrap();
            let tdy = Tensor::from_f32(gpu, shape, &dy).unwrap();
            let dx = act::geglu_backward(gpu, &tx, &tdy).unwrap();
            assert_eq!(dx.shape(), &xs[..]);
            let want = reference::geglu_backward(&f64s(&x), &f64s(&dy), d);
            let what = format!("geglu_backward {xs:?} subgroups={}", gpu.caps().subgroups);
            assert_nmse(&what, &read(gpu, &dx), &f32s(&want), TRANSCENDENTAL);
        }
    }
}

#[test]
fn upsample_backward_matches_reference() {
    let cases: &[[usize; 4]] = &[[1, 1, 1, 1], [2, 3, 5, 7], [1, 4, 64, 1], [2, 320, 16, 16]];
    for gpu in gpus() {
        for (ci, &[b, c, h, w]) in cases.iter().enumerate() {
            let dy = randn(4 * b * c * h * w, 100 + ci as u64);
            let tdy = Tensor::from_f32(gpu, &[b, c, 2 * h, 2 * w], &dy).unwrap();
            let dx = act::upsample_nearest2x_backward(gpu, &tdy).unwrap();
            assert_eq!(dx.shape(), &[b, c, h, w]);
            let want = reference::upsample_nearest2x_backward(&f64s(&dy), b * c, h, w);
            let what = format!("upsample_nearest2x_backward [{b}, {c}, {h}, {w}] subgroups={}", gpu.caps().subgroups);
            assert_nmse(&what, &read(gpu, &dx), &f32s(&want), STRICT);
        }
    }
}

#[test]
fn accumulate_adds_in_place() {
    for gpu in gpus() {
        for (ci, n) in [1usize, 255, 4097].into_iter().enumerate() {
            let a = randn(n, 110 + ci as u64);
            let g = randn(n, 120 + ci as u64);
            let ta = Tensor::from_f32(gpu, &[n], &a).unwrap();
            let tg = Tensor::from_f32(gpu, &[n], &g).unwrap();
            act::accumulate(gpu, &ta, &tg, 1.0).unwrap();
            act::accumulate(gpu, &ta, &tg, -0.25).unwrap();
            let want = reference::accumulate(&reference::accumulate(&f64s(&a), &f64s(&g), 1.0), &f64s(&g), -0.25);
            assert_nmse(&format!("accumulate n={n}"), &read(gpu, &ta), &f32s(&want), STRICT);
            assert_eq!(read(gpu, &tg), g, "g is left as it was");
        }
    }
}

#[test]
fn activation_backward_fixed_values() {
    // x = torch.tensor([-3., -1., 0., 0.5, 2.], requires_grad=True); F.gelu(x).backward(ones)
    // (and F.silu); GEGLU: x = [[0.5, -1., 2., 1.5, -0.5, 0.25]], h, g = x.chunk(2, -1),
    // (h * F.gelu(g)).backward(torch.tensor([[1., 2., -1.]]))
    for gpu in gpus() {
        let x = Tensor::from_f32(gpu, &[5], &[-3.0, -1.0, 0.0, 0.5, 2.0]).unwrap();
        let ones = Tensor::from_f32(gpu, &[5], &[1.0; 5]).unwrap();
        let checks: [(&str, Vec<f32>, [f32; 5]); 2] = [
            ("gelu", read(gpu, &act::gelu_backward(gpu, &x, &ones).unwrap()), [-0.011945647, -0.08331547, 0.5, 0.8674951, 1.0852318]),
            ("silu", read(gpu, &act::silu_backward(gpu, &x, &ones).unwrap()), [-0.088104106, 0.07232949, 0.5, 0.7399612, 1.0907842]),
        ];
        for (what, got, want) in checks {
            assert!(got.iter().zip(want).all(|(a, w)| (a - w).abs() < 2e-6), "{what} {got:?}");
        }
        let x = Tensor::from_f32(gpu, &[1, 6], &[0.5, -1.0, 2.0, 1.5, -0.5, 0.25]).unwrap();
        let dy = Tensor::from_f32(gpu, &[1, 3], &[1.0, 2.0, -1.0]).unwrap();
        let got = read(gpu, &act::geglu_backward(gpu, &x, &dy).unwrap());
        let want = [1.3997892, -0.30853754, -0.14967658, 0.5637346, -0.26500975, -1.3907467];
        assert!(got.iter().zip(want).all(|(a, w)| (a - w).abs() < 2e-6), "geglu {got:?}");
    }
}

#[test]
fn activation_backward_rejects_bad_shapes() {
    let gpu = gpu();
    let x = Tensor::zeros(gpu, &[2, 6]).unwrap();
    let e = act::silu_backward(gpu, &x, &Tensor::zeros(gpu, &[2, 5]).unwrap()).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "silu_backward", .. }) && e.to_string().contains("[2, 5]"), "{e}");
    let e = act::geglu_backward(gpu, &x, &Tensor::zeros(gpu, &[2, 6]).unwrap()).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "geglu_backward", .. }) && e.to_string().contains("[2, 6]"), "{e}");
    assert!(act::geglu_backward(gpu, &Tensor::zeros(gpu, &[2, 5]).unwrap(), &Tensor::zeros(gpu, &[2, 2]).unwrap()).is_err());
    assert!(act::geglu_backward(gpu, &x, &Tensor::zeros(gpu, &[3, 3]).unwrap()).is_err());
    let e = act::upsample_nearest2x_backward(gpu, &Tensor::zeros(gpu, &[1, 2, 4, 5]).unwrap()).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "upsample_nearest2x_backward", .. }) && e.to_string().contains("[1, 2, 4, 5]"), "{e}");
    assert!(act::accumulate(gpu, &x, &Tensor::zeros(gpu, &[12]).unwrap(), 1.0).is_err());
    let e = act::accumulate(gpu, &x, &x.reshape(&[12]).unwrap().reshape(&[2, 6]).unwrap(), 1.0).unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e}");
}
