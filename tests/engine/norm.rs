use crate::common::*;
use loralab::ops::norm::{self, reference};
use loralab::{Error, Tensor};

/// `n` normal values with mean `offset` (a large offset defeats E[x²] - E[x]² in f32).
fn data(n: usize, offset: f32, seed: u64) -> Vec<f32> {
    randn(n, seed).into_iter().map(|v| v + offset).collect()
}

#[test]
fn group_norm_matches_reference() {
    // (shape, groups, affine, silu, offset)
    let cases: &[(&[usize], usize, bool, bool, f32)] = &[
        (&[1, 4, 1, 1], 2, false, false, 0.0),
        (&[3, 6], 3, true, false, 0.0),
        (&[2, 6, 3, 5], 3, true, true, 0.0),
        (&[1, 2, 3], 1, true, false, 5.0),
        (&[1, 32, 7, 9], 32, true, true, 0.0),
        (&[2, 64, 8, 8], 32, true, true, 100.0),
        (&[1, 8, 40, 50], 2, false, true, -30.0),   // 8000 values: 2 chunks, the last partial
        (&[1, 4, 128, 160], 1, true, false, 1000.0), // 81920 values: 20 chunks
        (&[2, 10, 3, 37, 3], 5, true, true, 0.0),    // 3 spatial dims
    ];
    for gpu in gpus() {
        for (ci, &(shape, g, affine, silu, offset)) in cases.iter().enumerate() {
            let (b, c) = (shape[0], shape[1]);
            let spatial: usize = shape[2..].iter().product();
            let x = data(b * c * spatial, offset, ci as u64);
            let gamma = randu(c, 0.5, 1.5, 100 + ci as u64);
            let beta = randn(c, 200 + ci as u64);
            let tx = Tensor::from_f32(gpu, shape, &x).unwrap();
            let tg = Tensor::from_f32(gpu, &[c], &gamma).unwrap();
            let tb = Tensor::from_f32(gpu, &[c], &beta).unwrap();
            let (og, ob) = if affine { (Some(&tg), Some(&tb)) } else { (None, None) };
            let y = norm::group_norm(gpu, &tx, g, og, ob, 1e-5, silu).unwrap();
            assert_eq!(y.shape(), shape);
            let (rg, rb) = if affine { (Some(&gamma[..]), Some(&beta[..])) } else { (None, None) };
            let want = reference::group_norm(&x, b, c, spatial, g, rg, rb, 1e-5, silu);
            let what = format!("group_norm {shape:?} G={g} affine={affine} silu={silu} +{offset} subgroups={}", gpu.caps().subgroups);
            assert_nmse(&what, &read(gpu, &y), &want, F32_BOUND);
        }
    }
}

#[test]
fn group_norm_sd_vae_sized_group() {
    // One group of 512/32 channels at 128x128 (262144 values) with a large offset; only gamma.
    let gpu = gpu();
    let (c, h, w, g) = (64usize, 128usize, 128usize, 4usize);
    let x = data(c * h * w, 50.0, 7);
    let gamma = randu(c, 0.5, 1.5, 8);
    let tx = Tensor::from_f32(gpu, &[1, c, h, w], &x).unwrap();
    let tg = Tensor::from_f32(gpu, &[c], &gamma).unwrap();
    let y = read(gpu, &norm::group_norm(gpu, &tx, g, Some(&tg), None, 1e-6, true).unwrap());
    let want = reference::group_norm(&x, 1, c, h * w, g, Some(&gamma), None, 1e-6, true);
    assert_nmse("group_norm large group", &y, &want, F32_BOUND);
}

#[test]
fn group_norm_fixed_values() {
    // x = [[1, 2], [3, 4]] as [B=1, C=2, L=2].
    for gpu in gpus() {
        let x = Tensor::from_f32(gpu, &[1, 2, 2], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        // One group: mean 2.5, var 1.25 -> (x - 2.5) / sqrt(1.25).
        let y = read(gpu, &norm::group_norm(gpu, &x, 1, None, None, 0.0, false).unwrap());
        let want = [-1.3416408, -0.4472136, 0.4472136, 1.3416408];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
        // Two groups: [-1, 1] each; gamma [2, 1], beta [0, 1]; then SiLU:
        // silu(-2) = -0.23840584, silu(2) = 1.7615942, silu(0) = 0, silu(2) = 1.7615942.
        let g = Tensor::from_f32(gpu, &[2], &[2.0, 1.0]).unwrap();
        let b = Tensor::from_f32(gpu, &[2], &[0.0, 1.0]).unwrap();
        let y = read(gpu, &norm::group_norm(gpu, &x, 2, Some(&g), Some(&b), 0.0, true).unwrap());
        let want = [-0.23840584, 1.7615942, 0.0, 1.7615942];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }
}

#[test]
fn group_norm_rejects_bad_shapes() {
    let gpu = gpu();
    let x = Tensor::zeros(gpu, &[1, 6, 4, 4]).unwrap();
    let e = norm::group_norm(gpu, &x, 4, None, None, 1e-5, false).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "group_norm", .. }), "{e}");
    assert!(e.to_string().contains("[1, 6, 4, 4]"), "{e}");
    let g = Tensor::zeros(gpu, &[5]).unwrap();
    let e = norm::group_norm(gpu, &x, 3, Some(&g), None, 1e-5, false).unwrap_err();
    assert!(e.to_string().contains("gamma") && e.to_string().contains("[5]"), "{e}");
    assert!(norm::group_norm(gpu, &Tensor::zeros(gpu, &[6]).unwrap(), 3, None, None, 1e-5, false).is_err());
    assert!(norm::group_norm(gpu, &x, 0, None, None, 1e-5, false).is_err());
}

#[test]
fn layer_norm_matches_reference() {
    // (shape, gamma, beta, offset)
    let cases: &[(&[usize], bool, bool, f32)] = &[
        (&[1, 1], true, true, 0.0),
        (&[4, 3], true, false, 0.0),
        (&[2, 5, 77], false, true, 3.0),
        (&[7, 255], true, true, 0.0),
        (&[4, 320], true, true, 200.0),
        (&[3, 257], true, true, 0.0),
        (&[2, 1280], false, false, -10.0),
        (&[1, 3000], true, true, 0.0),
        (&[300, 64], true, true, 0.0),
    ];
    for gpu in gpus() {
        for (ci, &(shape, ug, ub, offset)) in cases.iter().enumerate() {
            let d = *shape.last().unwrap();
            let n: usize = shape.iter().product();
            let x = data(n, offset, 30 + ci as u64);
            let gamma = randu(d, 0.5, 1.5, 40 + ci as u64);
            let beta = randn(d, 50 + ci as u64);
            let tx = Tensor::from_f32(gpu, shape, &x).unwrap();
            let tg = Tensor::from_f32(gpu, &[d], &gamma).unwrap();
            let tb = Tensor::from_f32(gpu, &[d], &beta).unwrap();
            let y = norm::layer_norm(gpu, &tx, ug.then_some(&tg), ub.then_some(&tb), 1e-5).unwrap();
            let want = reference::layer_norm(&x, d, ug.then_some(&gamma[..]), ub.then_some(&beta[..]), 1e-5);
            let what = format!("layer_norm {shape:?} subgroups={}", gpu.caps().subgroups);
            assert_nmse(&what, &read(gpu, &y), &want, F32_BOUND);
        }
    }
}

#[test]
fn layer_norm_fixed_values_and_errors() {
    for gpu in gpus() {
        // torch.nn.functional.layer_norm([1, 2, 3], (3,), eps=0) = [-1.2247449, 0, 1.2247449]
        let x = Tensor::from_f32(gpu, &[1, 3], &[1.0, 2.0, 3.0]).unwrap();
        let y = read(gpu, &norm::layer_norm(gpu, &x, None, None, 0.0).unwrap());
        for (a, b) in y.iter().zip([-1.2247449, 0.0, 1.2247449]) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
    }
    let gpu = gpu();
    let x = Tensor::zeros(gpu, &[2, 4]).unwrap();
    let g = Tensor::zeros(gpu, &[3]).unwrap();
    let e = norm::layer_norm(gpu, &x, Some(&g), None, 1e-5).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "layer_norm", .. }) && e.to_string().contains("[2, 4]"), "{e}");
}

#[test]
fn softmax_matches_reference() {
    // (shape, scale, spread of the inputs)
    let cases: &[(&[usize], f32, f32)] = &[
        (&[1, 1], 1.0, 1.0),
        (&[5, 3], 1.0, 1.0),
        (&[2, 8, 77], 0.125, 10.0),
        (&[3, 256], 1.0, 30.0),
        (&[2, 257], -2.0, 5.0),
        (&[4, 4096], 0.125, 100.0),
        (&[1000, 9], 1.0, 1.0),
    ];
    for gpu in gpus() {
        for (ci, &(shape, scale, spread)) in cases.iter().enumerate() {
            let d = *shape.last().unwrap();
            let n: usize = shape.iter().product();
            let x: Vec<f32> = randn(n, 60 + ci as u64).into_iter().map(|v| v * spread).collect();
            let tx = Tensor::from_f32(gpu, shape, &x).unwrap();
            let y = read(gpu, &norm::softmax(gpu, &tx, scale).unwrap());
            let want = reference::softmax(&x, d, scale);
            let what = format!("softmax {shape:?} scale={scale} subgroups={}", gpu.caps().subgroups);
            assert_nmse(&what, &y, &want, F32_BOUND);
        }
    }
}

#[test]
fn softmax_fixed_values() {
    for gpu in gpus() {
        // torch.softmax([1, 2, 3]) = [0.09003057, 0.24472847, 0.66524096]; huge inputs stay finite.
        let x = Tensor::from_f32(gpu, &[2, 3], &[1.0, 2.0, 3.0, 1001.0, 1002.0, 1003.0]).unwrap();
        let y = read(gpu, &norm::softmax(gpu, &x, 1.0).unwrap());
        let want = [0.09003057, 0.24472847, 0.66524096];
        for (i, a) in y.iter().enumerate() {
            assert!((a - want[i % 3]).abs() < 1e-6, "{y:?}");
        }
    }
}
