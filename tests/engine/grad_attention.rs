//! Backward of the fused attention: the f64 reference against finite differences, the forward's
//! saved log-sum-exp, and the GPU gradients against the reference on both devices.

use crate::common::*;
use crate::gradcheck::{assert_grad, dot, f64s, numeric_grad};
use loralab::ops::attention::{self as at, AttentionOpts};
use loralab::ops::grad::attention::{self as ga, reference, reference::Dims, Grads, Saved, Tiles};
use loralab::rng::Rng;
use loralab::{Error, Gpu, Tensor};

#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    nq: usize,
    nk: usize,
    h: usize,
    d: usize,
    causal: bool,
    /// Magnitude of q and k (scores grow with its square).
    mag: f32,
}

const fn case(b: usize, nq: usize, nk: usize, h: usize, d: usize, causal: bool) -> Case {
    Case { b, nq, nk, h, d, causal, mag: 1.0 }
}

impl Case {
    fn dims(&self) -> Dims {
        Dims { causal: self.causal, ..Dims::new(self.b, self.nq, self.nk, self.h, self.d) }
    }
    fn opts(&self) -> AttentionOpts {
        AttentionOpts { heads: self.h, scale: None, causal: self.causal }
    }
}

/// q, k, v and the output's gradient.
struct Data {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    g: Vec<f32>,
}

fn data(c: &Case, seed: u64) -> Data {
    let hd = c.h * c.d;
    let scaled = |v: Vec<f32>| v.into_iter().map(|x| x * c.mag).collect();
    Data {
        q: scaled(randn(c.b * c.nq * hd, seed)),
        k: scaled(randn(c.b * c.nk * hd, seed + 1)),
        v: randn(c.b * c.nk * hd, seed + 2),
        g: randn(c.b * c.nq * hd, seed + 3),
    }
}

fn f32s(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// Runs the forward with its log-sum-exp and the backward on `gpu`; returns
/// (out, lse, dq, dk, dv) read back.
fn run_gpu(gpu: &Gpu, c: &Case, x: &Data, tiles: Option<Tiles>) -> [Vec<f32>; 5] {
    let hd = c.h * c.d;
    let tq = Tensor::from_f32(gpu, &[c.b, c.nq, hd], &x.q).unwrap();
    let tk = Tensor::from_f32(gpu, &[c.b, c.nk, hd], &x.k).unwrap();
    let tv = Tensor::from_f32(gpu, &[c.b, c.nk, hd], &x.v).unwrap();
    let tg = Tensor::from_f32(gpu, &[c.b, c.nq, hd], &x.g).unwrap();
    let (out, lse) = at::attention_with_lse(gpu, &tq, &tk, &tv, c.opts()).unwrap();
    assert_eq!(lse.shape(), &[c.b * c.h, c.nq]);
    let saved = Saved { q: &tq, k: &tk, v: &tv, out: &out, lse: &lse };
    let Grads { dq, dk, dv } = match tiles {
        Some(t) => ga::attention_backward_tiled(gpu, &saved, &tg, c.opts(), t),
        None => ga::attention_backward(gpu, &saved, &tg, c.opts()),
    }
    .unwrap();
    assert_eq!((dq.shape(), dk.shape(), dv.shape()), (tq.shape(), tk.shape(), tv.shape()));
    [read(gpu, &out), read(gpu, &lse), read(gpu, &dq), read(gpu, &dk), read(gpu, &dv)]
}

/// The GPU gradients of one case against the f64 reference.
fn check(gpu: &Gpu, c: Case, tiles: Option<Tiles>, seed: u64, bound: f64) {
    let x = data(&c, seed);
    let [_, _, dq, dk, dv] = run_gpu(gpu, &c, &x, tiles);
    let (rq, rk, rv) = reference::backward(&f64s(&x.q), &f64s(&x.k), &f64s(&x.v), &f64s(&x.g), &c.dims());
    for (name, got, want) in [("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)] {
        assert_nmse(&format!("{name} {c:?} tiles {tiles:?}"), &got, &f32s(&want), bound);
    }
}

const CASES: &[Case] = &[
    // single token, self-attention with awkward lengths
    case(1, 1, 1, 1, 4, false),
    case(1, 7, 7, 1, 40, true),
    case(2, 77, 77, 2, 40, true),
    case(1, 100, 100, 2, 80, false),
    case(1, 129, 129, 1, 160, false),
    case(1, 67, 67, 8, 8, false),
    // cross-attention against 77 text tokens, and a single key
    case(2, 70, 77, 2, 40, false),
    case(1, 64, 77, 1, 80, false),
    case(1, 45, 77, 1, 160, false),
    case(1, 130, 77, 2, 4, false),
    case(2, 33, 1, 2, 80, false),
    case(1, 5, 1, 1, 40, true),
    // head dims 1, 7 and the largest; causal with fewer or more keys than queries
    case(1, 37, 50, 3, 7, false),
    case(1, 20, 30, 1, 1, true),
    case(1, 30, 20, 1, 12, true),
    case(1, 40, 45, 1, 256, true),
];

/// Random shapes: lengths 1..=150 (or 77 keys), head dims of SD1.5 and the demo model.
fn random_cases(n: usize, seed: u64) -> Vec<Case> {
    let mut r = Rng::new(seed);
    (0..n)
        .map(|_| {
            let nq = r.range(1, 150);
            let nk = if r.uniform() < 0.3 { 77 } else { r.range(1, 150) };
            let d = [4, 8, 40, 80, 160][r.range(0, 4)];
            case(r.range(1, 2), nq, nk, r.range(1, 3), d, r.uniform() < 0.3)
        })
        .collect()
}

#[test]
fn grad_attention_reference_matches_finite_differences() {
    let cases = [
        Dims::new(1, 1, 1, 1, 1),
        Dims::new(1, 3, 4, 1, 2),
        Dims { causal: true, ..Dims::new(2, 4, 3, 2, 3) },
        Dims { scale: Some(0.7), ..Dims::new(1, 5, 2, 2, 4) },
        Dims { causal: true, ..Dims::new(1, 2, 5, 1, 5) },
        Dims { causal: true, scale: Some(1.3), ..Dims::new(1, 5, 2, 1, 3) },
    ];
    for (n, x) in cases.iter().enumerate() {
        let hd = x.heads * x.d;
        let seed = 10 * n as u64;
        let q = f64s(&randn(x.b * x.nq * hd, seed));
        let k = f64s(&randn(x.b * x.nk * hd, seed + 1));
        let v = f64s(&randn(x.b * x.nk * hd, seed + 2));
        let w = f64s(&randn(x.b * x.nq * hd, seed + 3));
        let (dq, dk, dv) = reference::backward(&q, &k, &v, &w, x);
        let nq = numeric_grad(&|t| dot(&w, &reference::forward(t, &k, &v, x).0), &q, 1e-6);
        let nk = numeric_grad(&|t| dot(&w, &reference::forward(&q, t, &v, x).0), &k, 1e-6);
        let nv = numeric_grad(&|t| dot(&w, &reference::forward(&q, &k, t, x).0), &v, 1e-6);
        assert_grad(&format!("dq {x:?}"), &dq, &nq, 1e-7);
        assert_grad(&format!("dk {x:?}"), &dk, &nk, 1e-7);
        assert_grad(&format!("dv {x:?}"), &dv, &nv, 1e-7);

        // The forward against the forward op's own reference, and L against its definition
        // (exponentials of small scores, summed without the running max).
        let (out, lse) = reference::forward(&q, &k, &v, x);
        let f = |t: &[f64]| t.iter().map(|&a| a as f32).collect::<Vec<_>>();
        let want = at::reference::attention(&f(&q), &f(&k), &f(&v), x.b, x.nq, x.nk, x.heads, x.d, x.scale.map(|s| s as f32), x.causal);
        assert_nmse(&format!("forward {x:?}"), &f32s(&out), &want, F32_BOUND);
        let scale = x.scale.unwrap_or(1.0 / (x.d as f64).sqrt());
        for bi in 0..x.b {
            for h in 0..x.heads {
                for i in 0..x.nq {
                    let qr = &q[(bi * x.nq + i) * hd + h * x.d..][..x.d];
                    let visible = if x.causal { x.nk.min(i + 1) } else { x.nk };
                    let sum: f64 = (0..visible)
                        .map(|j| (scale * dot(qr, &k[(bi * x.nk + j) * hd + h * x.d..][..x.d])).exp())
                        .sum();
                    let l = lse[(bi * x.heads + h) * x.nq + i];
                    assert!((l - sum.ln()).abs() < 1e-12, "lse {x:?} row {i}: {l} vs {}", sum.ln());
                }
            }
        }
    }
}

#[test]
fn grad_attention_forward_saves_lse() {
    for gpu in gpus() {
        for (n, c) in CASES.iter().chain(&[Case { mag: 30.0, ..case(2, 70, 77, 2, 40, true) }]).enumerate() {
            let x = data(c, 500 + n as u64);
            let hd = c.h * c.d;
            let [out, lse, ..] = run_gpu(gpu, c, &x, None);
            // The SAVE_LSE variant leaves the output bit-identical to the plain forward.
            let tq = Tensor::from_f32(gpu, &[c.b, c.nq, hd], &x.q).unwrap();
            let tk = Tensor::from_f32(gpu, &[c.b, c.nk, hd], &x.k).unwrap();
            let tv = Tensor::from_f32(gpu, &[c.b, c.nk, hd], &x.v).unwrap();
            let plain = read(gpu, &at::attention(gpu, &tq, &tk, &tv, c.opts()).unwrap());
            assert!(out.iter().zip(&plain).all(|(a, b)| a.to_bits() == b.to_bits()), "{c:?}: output differs");
            let (_, want) = reference::forward(&f64s(&x.q), &f64s(&x.k), &f64s(&x.v), &c.dims());
            assert_nmse(&format!("lse {c:?}"), &lse, &f32s(&want), F32_BOUND);
        }
    }
}

#[test]
fn grad_attention_matches_reference() {
    for gpu in gpus() {
        for (n, c) in CASES.iter().enumerate() {
            check(gpu, *c, None, 100 + n as u64, F32_BOUND);
        }
    }
}

#[test]
fn grad_attention_random_shapes_match_reference() {
    for gpu in gpus() {
        for (n, c) in random_cases(8, 7).into_iter().enumerate() {
            check(gpu, c, None, 600 + n as u64, F32_BOUND);
        }
    }
}

#[test]
fn grad_attention_with_16k_and_odd_tiles_matches_reference() {
    // The tiles chosen for SwiftShader / browser WebGPU's 16 KiB and 256 invocations, and
    // small odd ones that put many tile edges inside each case.
    let gpu = gpu_plain();
    for (n, c) in CASES.iter().enumerate() {
        let t16 = ga::tiles_for(c.d, 16 << 10, 256).unwrap();
        check(gpu, *c, Some(t16), 200 + n as u64, F32_BOUND);
        check(gpu, *c, Some(Tiles { rows: 5, stage: 8 }), 300 + n as u64, F32_BOUND);
    }
}

#[test]
fn grad_attention_large_scores_do_not_overflow() {
    // Scores of several thousand: exp() overflows f32 unless taken relative to L. An f32 score
    // carries an absolute error of ~1e-4 there, a relative error of the probabilities.
    for gpu in gpus() {
        for (n, c) in [case(1, 77, 77, 8, 40, true), case(2, 70, 77, 2, 64, false), case(1, 50, 200, 1, 160, false)]
            .into_iter()
            .enumerate()
        {
            check(gpu, Case { mag: 30.0, ..c }, None, 400 + n as u64, TRANSCENDENTAL);
        }
    }
}

#[test]
fn grad_attention_large_self_and_cross() {
    let gpu = gpu();
    check(gpu, case(1, 1024, 1024, 2, 40, false), None, 700, F32_BOUND);
    check(gpu, case(1, 4096, 77, 2, 40, false), None, 701, F32_BOUND);
}

#[test]
fn grad_attention_is_deterministic() {
    let c = case(2, 150, 77, 2, 40, false);
    let x = data(&c, 800);
    for gpu in gpus() {
        let a = run_gpu(gpu, &c, &x, None);
        let b = run_gpu(gpu, &c, &x, None);
        for (ga, gb) in a.iter().zip(&b) {
            assert!(ga.iter().zip(gb).all(|(p, q)| p.to_bits() == q.to_bits()), "{c:?}: runs differ");
        }
    }
}

#[test]
fn grad_attention_tiles_fit_the_limits() {
    for d in [1, 4, 7, 40, 64, 80, 160, 256] {
        for (bytes, inv) in [(16 << 10, 256), (32 << 10, 256), (16 << 10, 128), (16 << 10, 32)] {
            let t = ga::tiles_for(d, bytes, inv).unwrap_or_else(|| panic!("d {d} {bytes}"));
            assert!(t.workgroup_bytes(d) <= bytes as usize && t.invocations() <= inv as usize, "{t:?}");
            assert!(t.stage.is_multiple_of(4) && t.stage >= 4, "{t:?}");
        }
    }
    assert_eq!(ga::tiles_for(257, 32 << 10, 256), None);
    assert_eq!(ga::tiles_for(0, 32 << 10, 256), None);
}

#[test]
fn grad_attention_shape_errors() {
    let gpu = gpu();
    let z = |s: &[usize]| Tensor::zeros(gpu, s).unwrap();
    let (q, k, v) = (z(&[1, 4, 80]), z(&[1, 5, 80]), z(&[1, 5, 80]));
    let (out, lse, g) = (z(&[1, 4, 80]), z(&[2, 4]), z(&[1, 4, 80]));
    let saved = Saved { q: &q, k: &k, v: &v, out: &out, lse: &lse };
    let opts = AttentionOpts::new(2);
    let shape_err = |r: loralab::Result<Grads>| match r {
        Err(Error::Shape { op, message }) => {
            assert!(op == "attention_backward" || op == "attention", "{op}");
            message
        }
        Err(e) => panic!("expected a shape error, got {e:?}"),
        Ok(_) => panic!("expected a shape error, got gradients"),
    };
    assert!(ga::attention_backward(gpu, &saved, &g, opts).is_ok());
    // L shaped for the wrong head count, a gradient of the wrong shape, the output missing a row
    let bad_lse = z(&[1, 4]);
    let m = shape_err(ga::attention_backward(gpu, &Saved { lse: &bad_lse, ..saved }, &g, opts));
    assert!(m.contains("[2, 4]") && m.contains("[1, 4]"), "{m}");
    shape_err(ga::attention_backward(gpu, &saved, &z(&[1, 4, 40]), opts));
    shape_err(ga::attention_backward(gpu, &Saved { out: &z(&[1, 3, 80]), ..saved }, &g, opts));
    // q, k, v themselves are checked as in the forward; 80 columns are not 3 heads
    shape_err(ga::attention_backward(gpu, &saved, &g, AttentionOpts::new(3)));
    // tiles beyond the device, stage not a multiple of 4
    let big = Tiles { rows: 64, stage: 4096 };
    shape_err(ga::attention_backward_tiled(gpu, &saved, &g, opts, big));
    shape_err(ga::attention_backward_tiled(gpu, &saved, &g, opts, Tiles { rows: 64, stage: 6 }));
}

#[test]
fn grad_attention_without_queries_gives_zero_key_gradients() {
    for gpu in gpus() {
        let q = Tensor::zeros(gpu, &[1, 0, 16]).unwrap();
        let k = Tensor::from_f32(gpu, &[1, 5, 16], &randn(80, 900)).unwrap();
        let v = Tensor::from_f32(gpu, &[1, 5, 16], &randn(80, 901)).unwrap();
        let opts = AttentionOpts::new(2);
        let (out, lse) = at::attention_with_lse(gpu, &q, &k, &v, opts).unwrap();
        assert_eq!(lse.shape(), &[2, 0]);
        let saved = Saved { q: &q, k: &k, v: &v, out: &out, lse: &lse };
        let g = ga::attention_backward(gpu, &saved, &out, opts).unwrap();
        assert_eq!(g.dq.shape(), &[1, 0, 16]);
        for t in [&g.dk, &g.dv] {
            assert_eq!(read(gpu, t), vec![0.0; 80]);
        }
    }
}

#[test]
fn grad_attention_runtime_tiles_validate_with_naga() {
    // The tiles chosen for a browser's defaults, lavapipe, a discrete GPU and a 64-invocation
    // device, for every head dimension the forward takes.
    let src = loralab::shader::all().find(|s| s.name == "grad_attention.wgsl").unwrap();
    let mut n = 0;
    for (bytes, inv) in [(16 << 10, 256), (32 << 10, 1024), (48 << 10, 1024), (16 << 10, 64)] {
        for d in [1, 4, 7, 8, 40, 64, 80, 128, 160, 256] {
            let t = ga::tiles_for(d, bytes, inv).unwrap();
            let code = loralab::shader::preprocess(src.name, &t.defines(d), loralab::shader::Target::Naga).unwrap();
            let module = naga::front::wgsl::parse_str(&code).unwrap_or_else(|e| panic!("{t:?} d {d}: {}", e.emit_to_string(&code)));
            let caps = naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32;
            naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
                .validate(&module)
                .unwrap_or_else(|e| panic!("{t:?} d {d}: {}", e.emit_to_string(&code)));
            for entry in src.entries {
                assert!(module.entry_points.iter().any(|ep| ep.name == *entry), "{entry}");
            }
            n += 1;
        }
    }
    assert_eq!(n, 40);
}
