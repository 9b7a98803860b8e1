use crate::common::*;
use loralab::ops::layout::{self, reference};
use loralab::{Error, Tensor};

#[test]
fn upsample_nearest2x_is_exact() {
    let gpu = gpu_plain();
    for (ci, s) in [[1usize, 1, 1, 1], [2, 3, 5, 7], [1, 4, 32, 17]].into_iter().enumerate() {
        let n: usize = s.iter().product();
        let x = randn(n, ci as u64);
        let t = Tensor::from_f32(gpu, &s, &x).unwrap();
        let y = layout::upsample_nearest2x(gpu, &t).unwrap();
        assert_eq!(y.shape(), &[s[0], s[1], 2 * s[2], 2 * s[3]]);
        assert_eq!(read(gpu, &y), reference::upsample_nearest2x(&x, s[0] * s[1], s[2], s[3]), "{s:?}");
    }
    // [[1, 2]] -> [[1, 1, 2, 2], [1, 1, 2, 2]]
    let t = Tensor::from_f32(gpu, &[1, 1, 1, 2], &[1.0, 2.0]).unwrap();
    let y = read(gpu, &layout::upsample_nearest2x(gpu, &t).unwrap());
    assert_eq!(y, [1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0]);
    let e = layout::upsample_nearest2x(gpu, &Tensor::zeros(gpu, &[2, 3]).unwrap()).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "upsample_nearest2x", .. }), "{e}");
}

#[test]
fn concat_any_dim() {
    let gpu = gpu_plain();
    let cases: &[(&[&[usize]], usize)] = &[
        (&[&[3], &[1]], 0),
        (&[&[2, 3, 4, 5], &[2, 7, 4, 5]], 1), // UNet skip connection
        (&[&[2, 1, 4, 5], &[2, 2, 4, 5], &[2, 3, 4, 5]], 1),
        (&[&[1, 3, 4], &[2, 3, 4]], 0),
        (&[&[2, 3, 4], &[2, 3, 1], &[2, 3, 9]], 2),
        (&[&[2, 3, 4, 5], &[2, 3, 6, 5]], 2),
        (&[&[1, 320, 17, 19], &[1, 640, 17, 19]], 1),
    ];
    for (ci, &(shapes, dim)) in cases.iter().enumerate() {
        let data: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| randn(s.iter().product(), (10 * ci + i) as u64))
            .collect();
        let ts: Vec<Tensor> =
            shapes.iter().zip(&data).map(|(s, d)| Tensor::from_f32(gpu, s, d).unwrap()).collect();
        let refs: Vec<&Tensor> = ts.iter().collect();
        let y = layout::concat(gpu, &refs, dim).unwrap();
        let mut want_shape = shapes[0].to_vec();
        want_shape[dim] = shapes.iter().map(|s| s[dim]).sum();
        assert_eq!(y.shape(), &want_shape[..]);
        let parts: Vec<(&[f32], &[usize])> = data.iter().map(|d| &d[..]).zip(shapes.iter().copied()).collect();
        assert_eq!(read(gpu, &y), reference::concat(&parts, dim), "{shapes:?} dim {dim}");
    }
    // [[1, 2]] ++ [[3]] on dim 1 -> [[1, 2, 3]]
    let a = Tensor::from_f32(gpu, &[1, 2], &[1.0, 2.0]).unwrap();
    let b = Tensor::from_f32(gpu, &[1, 1], &[3.0]).unwrap();
    assert_eq!(read(gpu, &layout::concat(gpu, &[&a, &b], 1).unwrap()), [1.0, 2.0, 3.0]);
    // Errors: one input, mismatched dims, dim out of range.
    for (ts, dim) in [(vec![&a], 1), (vec![&a, &b], 0), (vec![&a, &b], 2)] {
        let e = layout::concat(gpu, &ts, dim).unwrap_err();
        assert!(matches!(e, Error::Shape { op: "concat", .. }) && e.to_string().contains("[1, 2]"), "{e}");
    }
}

#[test]
fn transpose_last2_is_exact() {
    let gpu = gpu_plain();
    let cases: &[&[usize]] = &[
        &[1, 1],
        &[1, 300],
        &[300, 1],
        &[3, 17, 33],
        &[2, 2, 16, 16],
        &[2, 320, 1024], // [B, C, H·W] -> [B, H·W, C]
        &[1, 4096, 40],
    ];
    for (ci, s) in cases.iter().enumerate() {
        let n: usize = s.iter().product();
        let (r, c) = (s[s.len() - 2], s[s.len() - 1]);
        let x = randn(n, 70 + ci as u64);
        let t = Tensor::from_f32(gpu, s, &x).unwrap();
        let y = layout::transpose_last2(gpu, &t).unwrap();
        let mut ws = s.to_vec();
        ws.swap(s.len() - 2, s.len() - 1);
        assert_eq!(y.shape(), &ws[..]);
        assert_eq!(read(gpu, &y), reference::transpose_last2(&x, n / (r * c), r, c), "{s:?}");
    }
    let t = Tensor::from_f32(gpu, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    assert_eq!(read(gpu, &layout::transpose_last2(gpu, &t).unwrap()), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    assert!(layout::transpose_last2(gpu, &Tensor::zeros(gpu, &[4]).unwrap()).is_err());
}

#[test]
fn slice_last_is_exact() {
    let gpu = gpu_plain();
    for (ci, (s, start, len)) in
        [(vec![1usize], 0usize, 1usize), (vec![4, 6], 3, 3), (vec![2, 5, 2560], 1280, 1280), (vec![7, 960], 320, 320)]
            .into_iter()
            .enumerate()
    {
        let n: usize = s.iter().product();
        let d = *s.last().unwrap();
        let x = randn(n, 80 + ci as u64);
        let t = Tensor::from_f32(gpu, &s, &x).unwrap();
        let y = layout::slice_last(gpu, &t, start, len).unwrap();
        assert_eq!(y.shape().last(), Some(&len));
        assert_eq!(read(gpu, &y), reference::slice_last(&x, d, start, len), "{s:?}");
    }
    let t = Tensor::zeros(gpu, &[2, 4]).unwrap();
    let e = layout::slice_last(gpu, &t, 3, 2).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "slice_last", .. }) && e.to_string().contains("[2, 4]"), "{e}");
    assert!(layout::slice_last(gpu, &t, 0, 0).is_err());
}

fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() <= tol, "{what}: [{i}] got {g} want {w} (all: {got:?})");
    }
}

#[test]
fn timestep_embedding_fixed_values() {
    // Computed independently from the formula (Python's math module):
    // dim 4, shift 0 -> half 2, freqs [1, exp(-ln(10000)/2) = 0.01].
    let gpu = gpu();
    let t = [0.0f32, 1.0, 999.0];
    let y = read(gpu, &layout::timestep_embedding(gpu, &t, 4, false, 0.0, 10000.0).unwrap());
    #[rustfmt::skip]
    let want = [
        0.0, 0.0, 1.0, 1.0,
        0.8414709848078965, 0.00999983333416666, 0.5403023058681398, 0.9999500004166653,
        -0.026460752737064126, -0.5356033346142868, 0.9996498529808264, -0.8444696962887752,
    ];
    assert_close("temb dim 4", &y, &want, 2e-5);
    // dim 5, shift 1, flipped -> freqs [1, 1e-4], [cos, cos, sin, sin, 0].
    let y = read(gpu, &layout::timestep_embedding(gpu, &t, 5, true, 1.0, 10000.0).unwrap());
    #[rustfmt::skip]
    let want = [
        1.0, 1.0, 0.0, 0.0, 0.0,
        0.5403023058681398, 0.999999995, 0.8414709848078965, 9.999999983333325e-05, 0.0,
        0.9996498529808264, 0.995014143644653, -0.026460752737064126, 0.09973391573129901, 0.0,
    ];
    assert_close("temb dim 5 flipped shift 1", &y, &want, 2e-5);
}

#[test]
fn timestep_embedding_matches_reference() {
    let gpu = gpu();
    let t: Vec<f32> = randu(6, 0.0, 1000.0, 90).into_iter().map(f32::round).chain([0.0, 999.0]).collect();
    // SD1.5's time_proj, then odd and tiny dims.
    for (dim, flip, shift) in [(320, true, 0.0), (321, false, 1.0), (2, true, 0.0), (3, false, 0.0)] {
        let y = layout::timestep_embedding(gpu, &t, dim, flip, shift, 10000.0).unwrap();
        assert_eq!(y.shape(), &[t.len(), dim]);
        let want = reference::timestep_embedding(&t, dim, flip, shift, 10000.0);
        assert_nmse(&format!("temb dim {dim}"), &read(gpu, &y), &want, TRANSCENDENTAL);
    }
    assert!(layout::timestep_embedding(gpu, &t, 1, true, 0.0, 10000.0).is_err());
    assert!(layout::timestep_embedding(gpu, &[], 4, true, 0.0, 10000.0).is_err());
}

#[test]
fn embedding_gathers_rows() {
    use loralab::quant::DType;
    for gpu in gpus() {
        for (ci, &(rows, d, n)) in [(1usize, 1usize, 1usize), (5, 3, 7), (1000, 8, 77), (33, 257, 5)].iter().enumerate() {
            let table = randn(rows * d, 40 + ci as u64);
            let ids: Vec<u32> = (0..n).map(|i| ((i * 7919 + ci) % rows) as u32).collect();
            for dtype in [DType::F32, DType::F16] {
                let t = Tensor::from_f32_as(gpu, &[rows, d], &table, dtype).unwrap();
                let y = layout::embedding(gpu, &t, &ids).unwrap();
                assert_eq!(y.shape(), &[n, d]);
                // The f16 table's values are what the tensor holds after conversion.
                let held = read(gpu, &t);
                assert_eq!(read(gpu, &y), reference::embedding(&held, d, &ids), "{rows}x{d} {dtype} ids {n}");
            }
        }
    }
    // [[1, 2], [3, 4], [5, 6]] at [2, 0, 2] -> [[5, 6], [1, 2], [5, 6]]
    let gpu = gpu_plain();
    let t = Tensor::from_f32(gpu, &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    assert_eq!(read(gpu, &layout::embedding(gpu, &t, &[2, 0, 2]).unwrap()), [5.0, 6.0, 1.0, 2.0, 5.0, 6.0]);
    // Errors: id past the table, empty ids, quantized table, not a matrix.
    let e = layout::embedding(gpu, &t, &[0, 3]).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "embedding", .. }) && e.to_string().contains("id 3"), "{e}");
    assert!(layout::embedding(gpu, &t, &[]).is_err());
    let q = Tensor::from_f32_as(gpu, &[2, 32], &randn(64, 1), DType::Q8_0).unwrap();
    assert!(matches!(layout::embedding(gpu, &q, &[0]).unwrap_err(), Error::DType { op: "embedding", .. }));
    let e = layout::embedding(gpu, &t.reshape(&[6]).unwrap(), &[0]).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "embedding", .. }), "{e}");
}

#[test]
fn pad2d_is_exact() {
    let gpu = gpu_plain();
    let cases: &[([usize; 4], [usize; 4])] = &[
        ([1, 1, 1, 1], [0, 1, 0, 1]), // diffusers' Downsample2D (0, 1, 0, 1)
        ([2, 3, 5, 7], [0, 1, 0, 1]),
        ([1, 2, 4, 4], [1, 1, 1, 1]),
        ([1, 3, 6, 9], [2, 0, 3, 0]),
        ([2, 1, 3, 2], [0, 0, 0, 0]),
        ([1, 4, 33, 17], [1, 2, 3, 4]),
    ];
    for (ci, &(s, pads)) in cases.iter().enumerate() {
        let n: usize = s.iter().product();
        let x = randn(n, 50 + ci as u64);
        let t = Tensor::from_f32(gpu, &s, &x).unwrap();
        let y = layout::pad2d(gpu, &t, pads).unwrap();
        assert_eq!(y.shape(), &[s[0], s[1], s[2] + pads[0] + pads[1], s[3] + pads[2] + pads[3]]);
        assert_eq!(read(gpu, &y), reference::pad2d(&x, s[0] * s[1], s[2], s[3], pads), "{s:?} {pads:?}");
    }
    // [[1, 2], [3, 4]] padded (0, 1, 0, 1) -> [[1, 2, 0], [3, 4, 0], [0, 0, 0]]
    let t = Tensor::from_f32(gpu, &[1, 1, 2, 2], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    let y = read(gpu, &layout::pad2d(gpu, &t, [0, 1, 0, 1]).unwrap());
    assert_eq!(y, [1.0, 2.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
    let e = layout::pad2d(gpu, &Tensor::zeros(gpu, &[2, 3]).unwrap(), [0, 1, 0, 1]).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "pad2d", .. }), "{e}");
}
