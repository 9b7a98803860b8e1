use crate::common::*;
use loralab::ops::elementwise::{self as ew, reference, Binary, Unary};
use loralab::Tensor;

#[test]
fn unary_ops_match_reference() {
    let ops = [
        Unary::Copy,
        Unary::Scale(-0.5),
        Unary::Silu,
        Unary::Gelu,
        Unary::GeluTanh,
        Unary::QuickGelu,
        Unary::AddScalar(3.0),
    ];
    for gpu in gpus() {
        for (si, n) in [1usize, 7, 256, 1000, 70_001].into_iter().enumerate() {
            let mut x = randn(n, si as u64);
            // Extremes must not overflow (NaN/Inf) in any activation.
            if n > 4 {
                x[0] = 80.0;
                x[1] = -80.0;
                x[2] = 0.0;
            }
            let t = Tensor::from_f32(gpu, &[n], &x).unwrap();
            for op in ops {
                let y = read(gpu, &ew::unary(gpu, &t, op).unwrap());
                let want: Vec<f32> = x.iter().map(|v| reference::unary(*v, op)).collect();
                assert_nmse(&format!("{op:?} n={n}"), &y, &want, TRANSCENDENTAL);
            }
        }
    }
}

#[test]
fn gelu_fixed_values() {
    // torch.nn.functional.gelu(torch.tensor([-3., -1., 0., 0.5, 2.])) (exact erf form)
    let gpu = gpu();
    let x = [-3.0f32, -1.0, 0.0, 0.5, 2.0];
    let want = [-0.0040496, -0.1586553, 0.0, 0.3457312, 1.9544998];
    let y = read(gpu, &ew::unary(gpu, &Tensor::from_f32(gpu, &[5], &x).unwrap(), Unary::Gelu).unwrap());
    for (g, w) in y.iter().zip(want) {
        assert!((g - w).abs() < 2e-6, "{y:?}");
    }
}

#[test]
fn binary_ops_broadcast() {
    let gpu = gpu();
    let cases: [(&[usize], &[usize]); 6] = [
        (&[5, 3], &[5, 3]),
        (&[4, 7], &[7]),
        (&[2, 3, 4, 5], &[2, 3, 1, 1]),
        (&[2, 3, 4, 5], &[3, 1, 1]),
        (&[3, 1, 4], &[1]),
        (&[1000, 33], &[33]),
    ];
    for (ci, (sa, sb)) in cases.into_iter().enumerate() {
        let (inner, m) = ew::broadcast(sa, sb).unwrap();
        let na: usize = sa.iter().product();
        let nb: usize = sb.iter().product();
        let a = randn(na, 10 + ci as u64);
        let b = randn(nb, 20 + ci as u64);
        let ta = Tensor::from_f32(gpu, sa, &a).unwrap();
        let tb = Tensor::from_f32(gpu, sb, &b).unwrap();
        for op in [Binary::Add, Binary::Mul, Binary::Sub, Binary::AddScaled(0.25)] {
            let y = read(gpu, &ew::binary(gpu, &ta, &tb, op).unwrap());
            let want = reference::binary(&a, &b, inner, m, op);
            assert_nmse(&format!("{op:?} {sa:?} {sb:?}"), &y, &want, STRICT);
        }
    }
}

#[test]
fn broadcast_rules() {
    assert_eq!(ew::broadcast(&[2, 3, 4, 5], &[2, 3, 1, 1]), Some((20, 6)));
    assert_eq!(ew::broadcast(&[4, 7], &[7]), Some((1, 7)));
    assert_eq!(ew::broadcast(&[4, 7], &[4]), None);
    assert_eq!(ew::broadcast(&[2, 3, 4], &[2, 1, 4]), None);
    assert_eq!(ew::broadcast(&[3], &[2, 3]), None);
    let gpu = gpu();
    let a = Tensor::zeros(gpu, &[4, 7]).unwrap();
    let b = Tensor::zeros(gpu, &[4]).unwrap();
    let e = ew::add(gpu, &a, &b).unwrap_err().to_string();
    assert!(e.contains("[4]") && e.contains("[4, 7]"), "{e}");
}

#[test]
fn geglu_matches_reference() {
    for gpu in gpus() {
        for (ci, s) in [vec![1usize, 2], vec![3, 6], vec![5, 2 * 257], vec![2, 77, 2 * 1280]].into_iter().enumerate() {
            let n: usize = s.iter().product();
            let d = s[s.len() - 1] / 2;
            let x = randn(n, 40 + ci as u64);
            let t = Tensor::from_f32(gpu, &s, &x).unwrap();
            let y = ew::geglu(gpu, &t).unwrap();
            assert_eq!(y.shape().last(), Some(&d));
            assert_eq!(y.numel(), n / 2);
            assert_nmse(&format!("geglu {s:?}"), &read(gpu, &y), &reference::geglu(&x, d), TRANSCENDENTAL);
        }
    }
    // hidden [1, 2], gate [-1, 0.5]: [1 · gelu(-1), 2 · gelu(0.5)] = [-0.1586553, 0.6914624]
    let gpu = gpu();
    let x = Tensor::from_f32(gpu, &[1, 4], &[1.0, 2.0, -1.0, 0.5]).unwrap();
    let y = read(gpu, &ew::geglu(gpu, &x).unwrap());
    assert!((y[0] + 0.1586553).abs() < 2e-6 && (y[1] - 0.6914624).abs() < 2e-6, "{y:?}");
    let e = ew::geglu(gpu, &Tensor::zeros(gpu, &[2, 3]).unwrap()).unwrap_err();
    assert!(e.to_string().contains("geglu") && e.to_string().contains("[2, 3]"), "{e}");
}
