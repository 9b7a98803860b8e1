//! Backward of group norm (+ SiLU), layer norm and softmax: the f64 references against finite
//! differences of the f64 forward (which must agree with the forward op's own reference), then
//! the kernels against the references on both devices.

use crate::common::*;
use crate::gradcheck::{assert_grad, dot, f64s, numeric_grad};
use loralab::ops::grad::norm::{self as gn, reference, GN_CHUNK};
use loralab::ops::norm as fwd;
use loralab::{Error, Tensor};

fn f32s(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn max_abs_diff(a: &[f64], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - *y as f64).abs()).fold(0.0, f64::max)
}

/// (shape [B, C, spatial...], groups, affine, silu, mean offset of x)
type GnCase = (&'static [usize], usize, bool, bool, f32);

fn gn_dims(shape: &[usize]) -> (usize, usize, usize) {
    (shape[0], shape[1], shape[2..].iter().product())
}

#[test]
fn group_norm_reference_gradient_matches_finite_differences() {
    let cases: &[GnCase] = &[
        (&[1, 2, 1], 1, false, false, 0.0),
        (&[2, 4, 1], 2, true, true, 0.0),
        (&[1, 3, 5], 1, true, false, 3.0),
        (&[2, 6, 3], 3, true, true, 0.0),
        (&[1, 4, 2, 3], 4, true, true, -1.0),
        (&[1, 6, 7], 2, false, true, 0.0),
    ];
    for (ci, &(shape, g, affine, silu, offset)) in cases.iter().enumerate() {
        let (b, c, sp) = gn_dims(shape);
        let n = b * c * sp;
        let x: Vec<f64> = f64s(&randn(n, ci as u64)).into_iter().map(|v| v + offset as f64).collect();
        let dy = f64s(&randn(n, 10 + ci as u64));
        let gamma = f64s(&randu(c, 0.5, 1.5, 20 + ci as u64));
        let beta = f64s(&randn(c, 30 + ci as u64));
        let (og, ob) = if affine { (Some(&gamma[..]), Some(&beta[..])) } else { (None, None) };
        // A group of two normalises to about ±1 whatever its values, so its gradient is of the
        // order of eps; a large eps keeps it above finite-difference noise.
        let eps = if c / g * sp == 2 { 0.1 } else { 1e-5 };
        let loss = |x: &[f64]| dot(&dy, &reference::group_norm(x, b, c, sp, g, og, ob, eps, silu));
        let numeric = numeric_grad(&loss, &x, 1e-6);
        let analytic = reference::group_norm_backward(&x, &dy, b, c, sp, g, og, ob, eps, silu);
        assert_grad(&format!("group_norm {shape:?} G={g} affine={affine} silu={silu}"), &analytic, &numeric, 1e-6);
    }
}

#[test]
fn group_norm_reference_forward_is_the_ops_forward() {
    let (b, c, sp, g) = (2, 6, 5, 3);
    let x = randn(b * c * sp, 1);
    let gamma = randu(c, 0.5, 1.5, 2);
    let beta = randn(c, 3);
    for silu in [false, true] {
        let ours = reference::group_norm(&f64s(&x), b, c, sp, g, Some(&f64s(&gamma)), Some(&f64s(&beta)), 1e-5, silu);
        let theirs = fwd::reference::group_norm(&x, b, c, sp, g, Some(&gamma), Some(&beta), 1e-5, silu);
        assert!(max_abs_diff(&ours, &theirs) < 1e-6, "silu={silu}");
    }
    let ours = reference::layer_norm(&f64s(&x), 10, Some(&f64s(&gamma[..1]).repeat(10)), None, 1e-5);
    let theirs = fwd::reference::layer_norm(&x, 10, Some(&gamma[..1].repeat(10)), None, 1e-5);
    assert!(max_abs_diff(&ours, &theirs) < 1e-6);
    let ours = reference::softmax(&f64s(&x), 15, 0.3);
    let theirs = fwd::reference::softmax(&x, 15, 0.3);
    assert!(max_abs_diff(&ours, &theirs) < 1e-7);
}

#[test]
fn group_norm_backward_matches_reference() {
    let cases: &[GnCase] = &[
        (&[1, 4, 1, 1], 2, false, false, 0.0),
        (&[3, 6], 3, true, true, 0.0),
        (&[2, 6, 3, 5], 3, true, true, 0.0),
        (&[1, 2, 3], 1, true, false, 5.0),
        (&[1, 32, 7, 9], 32, true, true, 0.0),
        (&[2, 64, 8, 8], 32, true, true, 20.0),
        (&[1, 8, 40, 50], 2, false, true, -3.0),   // 8000 values a group: 2 chunks, the last partial
        (&[1, 4, 128, 160], 1, true, false, 10.0), // 81920 values: 20 chunks
        (&[2, 10, 3, 37, 3], 5, true, true, 0.0),  // 3 spatial dims
    ];
    assert!(8000 > GN_CHUNK && 8000 % GN_CHUNK != 0 && 4 * 128 * 160 > 16 * GN_CHUNK);
    for gpu in gpus() {
        for (ci, &(shape, g, affine, silu, offset)) in cases.iter().enumerate() {
            let (b, c, sp) = gn_dims(shape);
            let n = b * c * sp;
            let x: Vec<f32> = randn(n, 40 + ci as u64).into_iter().map(|v| v + offset).collect();
            let dy = randn(n, 50 + ci as u64);
            let gamma = randu(c, 0.5, 1.5, 60 + ci as u64);
            let beta = randn(c, 70 + ci as u64);
            let tx = Tensor::from_f32(gpu, shape, &x).unwrap();
            let tdy = Tensor::from_f32(gpu, shape, &dy).unwrap();
            let tg = Tensor::from_f32(gpu, &[c], &gamma).unwrap();
            let tb = Tensor::from_f32(gpu, &[c], &beta).unwrap();
            let (og, ob) = if affine { (Some(&tg), Some(&tb)) } else { (None, None) };
            // Groups of two values: their gradient is of the order of eps and ill-conditioned in
            // f32 for a tiny eps (see the finite-difference test).
            let eps = if c / g * sp == 2 { 0.1 } else { 1e-5 };
            let dx = gn::group_norm_backward(gpu, &tx, &tdy, g, og, ob, eps, silu).unwrap();
            assert_eq!(dx.shape(), shape);
            let (gf, bf) = (f64s(&gamma), f64s(&beta));
            let (rg, rb) = if affine { (Some(&gf[..]), Some(&bf[..])) } else { (None, None) };
            let want = reference::group_norm_backward(&f64s(&x), &f64s(&dy), b, c, sp, g, rg, rb, eps as f64, silu);
            let what = format!("group_norm_backward {shape:?} G={g} affine={affine} silu={silu} +{offset} subgroups={}", gpu.caps().subgroups);
            assert_nmse(&what, &read(gpu, &dx), &f32s(&want), if silu { TRANSCENDENTAL } else { F32_BOUND });
        }
    }
}

#[test]
fn group_norm_backward_is_bit_reproducible() {
    let gpu = gpu();
    let shape = [1, 8, 40, 50];
    let n = 8 * 40 * 50;
    let tx = Tensor::from_f32(gpu, &shape, &randn(n, 5)).unwrap();
    let tdy = Tensor::from_f32(gpu, &shape, &randn(n, 6)).unwrap();
    let tg = Tensor::from_f32(gpu, &[8], &randu(8, 0.5, 1.5, 7)).unwrap();
    let tb = Tensor::from_f32(gpu, &[8], &randn(8, 8)).unwrap();
    let run = || read(gpu, &gn::group_norm_backward(gpu, &tx, &tdy, 2, Some(&tg), Some(&tb), 1e-5, true).unwrap());
    let (a, b) = (run(), run());
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
}

#[test]
fn norm_backward_fixed_values() {
    for gpu in gpus() {
        // x = torch.tensor([[[1., 2.], [3., 5.]]], requires_grad=True)
        // F.silu(F.group_norm(x, 1, torch.tensor([2., 0.5]), torch.tensor([0.1, -0.3]), eps=1e-5))
        //     .backward(torch.tensor([[[1., -2.], [0.5, 3.]]]))
        let x = Tensor::from_f32(gpu, &[1, 2, 2], &[1.0, 2.0, 3.0, 5.0]).unwrap();
        let dy = Tensor::from_f32(gpu, &[1, 2, 2], &[1.0, -2.0, 0.5, 3.0]).unwrap();
        let g = Tensor::from_f32(gpu, &[2], &[2.0, 0.5]).unwrap();
        let b = Tensor::from_f32(gpu, &[2], &[0.1, -0.3]).unwrap();
        let dx = read(gpu, &gn::group_norm_backward(gpu, &x, &dy, 1, Some(&g), Some(&b), 1e-5, true).unwrap());
        let want = [0.18725093, -0.18787594, -0.09269275, 0.09331776];
        assert!(dx.iter().zip(want).all(|(a, w)| (a - w).abs() < 2e-6), "group norm {dx:?}");
        // F.layer_norm(torch.tensor([[1., 2., 4.]]), (3,), torch.tensor([1., 2., 3.]), None, 1e-5)
        //     .backward(torch.tensor([[1., 0., -1.]]))
        let x = Tensor::from_f32(gpu, &[1, 3], &[1.0, 2.0, 4.0]).unwrap();
        let dy = Tensor::from_f32(gpu, &[1, 3], &[1.0, 0.0, -1.0]).unwrap();
        let g = Tensor::from_f32(gpu, &[3], &[1.0, 2.0, 3.0]).unwrap();
        let dx = read(gpu, &gn::layer_norm_backward(gpu, &x, &dy, Some(&g), 1e-5).unwrap());
        let want = [-0.11453084, 0.17181258, -0.05728174];
        assert!(dx.iter().zip(want).all(|(a, w)| (a - w).abs() < 2e-6), "layer norm {dx:?}");
        // torch.softmax(0.5 * x, -1).backward(torch.tensor([[1., -1., 2.]])) for x = [[1., 2., 3.]]
        let y: Vec<f32> = f32s(&reference::softmax(&[1.0, 2.0, 3.0], 3, 0.5));
        let y = Tensor::from_f32(gpu, &[1, 3], &y).unwrap();
        let dy = Tensor::from_f32(gpu, &[1, 3], &[1.0, -1.0, 2.0]).unwrap();
        let dx = read(gpu, &gn::softmax_backward(gpu, &y, &dy, 0.5).unwrap());
        let want = [0.010053225, -0.29062092, 0.28056769];
        assert!(dx.iter().zip(want).all(|(a, w)| (a - w).abs() < 2e-6), "softmax {dx:?}");
    }
}

#[test]
fn layer_norm_reference_gradient_matches_finite_differences() {
    // (rows, d, affine, offset, eps): a row of two normalises to about ±1 whatever its values,
    // so its gradient is of the order of eps; a large eps keeps it above finite-difference noise.
    let cases = [(1usize, 1usize, true, 0.0f64, 1e-5), (1, 2, false, 0.0, 0.1), (3, 5, true, 2.0, 1e-5), (2, 17, true, 0.0, 1e-5)];
    for (ci, &(rows, d, affine, offset, eps)) in cases.iter().enumerate() {
        let x: Vec<f64> = f64s(&randn(rows * d, 80 + ci as u64)).into_iter().map(|v| v + offset).collect();
        let dy = f64s(&randn(rows * d, 90 + ci as u64));
        let gamma = f64s(&randu(d, 0.5, 1.5, 100 + ci as u64));
        let beta = f64s(&randn(d, 110 + ci as u64));
        let og = affine.then_some(&gamma[..]);
        let loss = |x: &[f64]| dot(&dy, &reference::layer_norm(x, d, og, Some(&beta), eps));
        let numeric = numeric_grad(&loss, &x, 1e-6);
        let analytic = reference::layer_norm_backward(&x, &dy, d, og, eps);
        assert_grad(&format!("layer_norm [{rows}, {d}] affine={affine}"), &analytic, &numeric, 1e-6);
    }
}

#[test]
fn layer_norm_backward_matches_reference() {
    // (shape, gamma, offset)
    let cases: &[(&[usize], bool, f32)] = &[
        (&[1, 1], true, 0.0),
        (&[4, 3], true, 0.0),
        (&[2, 5, 77], false, 3.0),
        (&[7, 255], true, 0.0),
        (&[4, 320], true, 20.0),
        (&[3, 257], true, 0.0),
        (&[2, 1280], false, -10.0),
        (&[1, 3000], true, 0.0),
        (&[300, 64], true, 0.0),
    ];
    for gpu in gpus() {
        for (ci, &(shape, affine, offset)) in cases.iter().enumerate() {
            let d = *shape.last().unwrap();
            let n: usize = shape.iter().product();
            let x: Vec<f32> = randn(n, 120 + ci as u64).into_iter().map(|v| v + offset).collect();
            let dy = randn(n, 130 + ci as u64);
            let gamma = randu(d, 0.5, 1.5, 140 + ci as u64);
            let tx = Tensor::from_f32(gpu, shape, &x).unwrap();
            let tdy = Tensor::from_f32(gpu, shape, &dy).unwrap();
            let tg = Tensor::from_f32(gpu, &[d], &gamma).unwrap();
            let dx = gn::layer_norm_backward(gpu, &tx, &tdy, affine.then_some(&tg), 1e-5).unwrap();
            let gf = f64s(&gamma);
            let want = reference::layer_norm_backward(&f64s(&x), &f64s(&dy), d, affine.then_some(&gf[..]), 1e-5);
            let what = format!("layer_norm_backward {shape:?} affine={affine} +{offset} subgroups={}", gpu.caps().subgroups);
            assert_nmse(&what, &read(gpu, &dx), &f32s(&want), F32_BOUND);
        }
    }
}

#[test]
fn softmax_reference_gradient_matches_finite_differences() {
    for (ci, &(rows, d, scale)) in [(1usize, 1usize, 1.0f64), (2, 3, 1.0), (3, 8, 0.125), (1, 13, -2.0)].iter().enumerate() {
        let x = f64s(&randn(rows * d, 150 + ci as u64));
        let dy = f64s(&randn(rows * d, 160 + ci as u64));
        let loss = |x: &[f64]| dot(&dy, &reference::softmax(x, d, scale));
        let numeric = numeric_grad(&loss, &x, 1e-6);
        let analytic = reference::softmax_backward(&reference::softmax(&x, d, scale), &dy, d, scale);
        // A one-element row is constant: both gradients are exactly zero there.
        assert_grad(&format!("softmax [{rows}, {d}] scale={scale}"), &analytic, &numeric, 1e-6);
    }
}

#[test]
fn softmax_backward_matches_reference() {
    // (shape, scale, spread of the logits)
    let cases: &[(&[usize], f32, f32)] = &[
        (&[1, 1], 1.0, 1.0),
        (&[5, 3], 1.0, 1.0),
        (&[2, 8, 77], 0.125, 10.0),
        (&[3, 256], 1.0, 3.0),
        (&[2, 257], -2.0, 2.0),
        (&[4, 4096], 0.125, 20.0),
        (&[1000, 9], 1.0, 1.0),
    ];
    for gpu in gpus() {
        for (ci, &(shape, scale, spread)) in cases.iter().enumerate() {
            let d = *shape.last().unwrap();
            let n: usize = shape.iter().product();
            let logits: Vec<f64> = f64s(&randn(n, 170 + ci as u64)).into_iter().map(|v| v * spread as f64).collect();
            let y = f32s(&reference::softmax(&logits, d, scale as f64));
            let dy = randn(n, 180 + ci as u64);
            let ty = Tensor::from_f32(gpu, shape, &y).unwrap();
            let tdy = Tensor::from_f32(gpu, shape, &dy).unwrap();
            let dx = gn::softmax_backward(gpu, &ty, &tdy, scale).unwrap();
            let want = reference::softmax_backward(&f64s(&y), &f64s(&dy), d, scale as f64);
            let what = format!("softmax_backward {shape:?} scale={scale} subgroups={}", gpu.caps().subgroups);
            assert_nmse(&what, &read(gpu, &dx), &f32s(&want), F32_BOUND);
        }
    }
}

#[test]
fn norm_backward_rejects_bad_shapes() {
    let gpu = gpu();
    let x = Tensor::zeros(gpu, &[1, 6, 4, 4]).unwrap();
    let dy = Tensor::zeros(gpu, &[1, 6, 4, 4]).unwrap();
    let e = gn::group_norm_backward(gpu, &x, &dy, 4, None, None, 1e-5, false).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "group_norm_backward", .. }) && e.to_string().contains("[1, 6, 4, 4]"), "{e}");
    let short = Tensor::zeros(gpu, &[1, 6, 4, 3]).unwrap();
    let e = gn::group_norm_backward(gpu, &x, &short, 3, None, None, 1e-5, false).unwrap_err();
    assert!(e.to_string().contains("dy [1, 6, 4, 3]"), "{e}");
    let g5 = Tensor::zeros(gpu, &[5]).unwrap();
    let e = gn::group_norm_backward(gpu, &x, &dy, 3, None, Some(&g5), 1e-5, true).unwrap_err();
    assert!(e.to_string().contains("beta") && e.to_string().contains("[5]"), "{e}");
    let e = gn::layer_norm_backward(gpu, &x, &dy, Some(&g5), 1e-5).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "layer_norm_backward", .. }) && e.to_string().contains("gamma"), "{e}");
    let e = gn::softmax_backward(gpu, &x, &short, 1.0).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "softmax_backward", .. }), "{e}");
    let empty = Tensor::zeros(gpu, &[3, 0]).unwrap();
    assert!(gn::softmax_backward(gpu, &empty, &empty, 1.0).is_err());
}
