use crate::common::*;
use loralab::ops::attention::{self as at, reference, AttentionOpts, Tiles};
use loralab::{Error, Gpu, Tensor};

/// f32 scores and accumulation with an online softmax against the f64 reference (observed
/// up to ~5e-13 on lavapipe).
const ATTN_BOUND: f64 = 1e-10;
/// Inputs ×30 give scores in the hundreds to thousands: an f32 score carries an absolute error
/// of ~1e-4, a relative error of the probabilities (observed up to ~1e-11).
const ATTN_LARGE_BOUND: f64 = 1e-8;

#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    nq: usize,
    nk: usize,
    h: usize,
    d: usize,
    causal: bool,
    mag: f32,
}

const fn case(b: usize, nq: usize, nk: usize, h: usize, d: usize, causal: bool) -> Case {
    Case { b, nq, nk, h, d, causal, mag: 1.0 }
}

fn data(c: &Case, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let hd = c.h * c.d;
    let scale = |v: Vec<f32>| v.into_iter().map(|x| x * c.mag).collect::<Vec<_>>();
    (
        scale(randn(c.b * c.nq * hd, seed)),
        scale(randn(c.b * c.nk * hd, seed + 1)),
        randn(c.b * c.nk * hd, seed + 2),
    )
}

/// Runs one case on `gpu` (with explicit tiles when given) and compares with the reference.
fn check(gpu: &Gpu, c: Case, tiles: Option<Tiles>, seed: u64) {
    let hd = c.h * c.d;
    let (q, k, v) = data(&c, seed);
    let tq = Tensor::from_f32(gpu, &[c.b, c.nq, hd], &q).unwrap();
    let tk = Tensor::from_f32(gpu, &[c.b, c.nk, hd], &k).unwrap();
    let tv = Tensor::from_f32(gpu, &[c.b, c.nk, hd], &v).unwrap();
    let opts = AttentionOpts { heads: c.h, scale: None, causal: c.causal };
    let y = match tiles {
        Some(t) => at::attention_tiled(gpu, &tq, &tk, &tv, opts, t),
        None => at::attention(gpu, &tq, &tk, &tv, opts),
    }
    .unwrap();
    assert_eq!(y.shape(), &[c.b, c.nq, hd]);
    let got = read(gpu, &y);
    let want = reference::attention(&q, &k, &v, c.b, c.nq, c.nk, c.h, c.d, None, c.causal);
    let bound = if c.mag > 1.0 { ATTN_LARGE_BOUND } else { ATTN_BOUND };
    assert_nmse(&format!("{c:?} tiles {tiles:?}"), &got, &want, bound);
}

/// The tiles chosen for SwiftShader / browser WebGPU's 16 KiB of workgroup memory.
fn tiles_16k(d: usize) -> Tiles {
    at::tiles_for(d, 16 << 10, 256).unwrap()
}

const CASES: &[Case] = &[
    // self-attention, awkward lengths
    case(1, 1, 1, 1, 40, false),
    case(1, 7, 7, 1, 40, true),
    case(2, 77, 77, 8, 40, true),
    case(1, 333, 333, 2, 64, false),
    case(2, 100, 100, 1, 80, true),
    case(1, 129, 129, 2, 160, false),
    // cross-attention against 77 text tokens, and a single key
    case(2, 333, 77, 8, 40, false),
    case(1, 64, 77, 2, 64, false),
    case(1, 45, 77, 1, 160, false),
    case(2, 33, 1, 2, 80, false),
    case(1, 5, 1, 1, 40, true),
    // odd head dims, up to the largest
    case(1, 37, 50, 3, 7, false),
    case(1, 20, 30, 1, 1, true),
    case(1, 40, 45, 1, 256, true),
];

#[test]
fn attention_matches_reference() {
    for gpu in gpus() {
        for (i, c) in CASES.iter().enumerate() {
            check(gpu, *c, None, 100 + i as u64);
        }
    }
}

#[test]
fn attention_with_16k_tiles_matches_reference() {
    let gpu = gpu_plain();
    for (i, c) in CASES.iter().enumerate() {
        check(gpu, *c, Some(tiles_16k(c.d)), 200 + i as u64);
    }
}

#[test]
fn attention_large_scores_do_not_overflow() {
    // Scores of several thousand: exp() of them overflows f32 without the running max.
    for gpu in gpus() {
        for (i, c) in [case(1, 77, 77, 8, 40, true), case(2, 70, 77, 2, 64, false), case(1, 50, 200, 1, 160, false)]
            .into_iter()
            .enumerate()
        {
            check(gpu, Case { mag: 30.0, ..c }, None, 300 + i as u64);
        }
    }
}

#[test]
fn attention_large_self_and_cross() {
    let gpu = gpu();
    check(gpu, case(1, 1024, 1024, 2, 40, false), None, 400);
    check(gpu, case(1, 4096, 77, 2, 40, false), None, 401);
}

#[test]
fn attention_tiny_case_by_hand() {
    // One head, D = 2, scale 1, two queries, three keys.
    //   q0 = (1, 0), q1 = (0, 2); k = (0,0), (1,0), (0,1) → scores q0: (0, 1, 0), q1: (0, 0, 2)
    //   v = (1, 2), (3, 4), (5, 6)
    //   q0: weights (1, e, 1) / (2 + e) → o = (1 + 3e + 5, 2 + 4e + 6) / (2 + e)
    //   q1: weights (1, 1, e²) / (2 + e²) → o = (1 + 3 + 5e², 2 + 4 + 6e²) / (2 + e²)
    //   causal: q0 sees k0 only → (1, 2); q1 sees k0, k1 → weights (1, 1)/2 → (2, 3)
    let e = std::f32::consts::E;
    let e2 = e * e;
    let want = [
        (6.0 + 3.0 * e) / (2.0 + e),
        (8.0 + 4.0 * e) / (2.0 + e),
        (4.0 + 5.0 * e2) / (2.0 + e2),
        (6.0 + 6.0 * e2) / (2.0 + e2),
    ];
    let want_causal = [1.0, 2.0, 2.0, 3.0];
    for gpu in gpus() {
        let q = Tensor::from_f32(gpu, &[1, 2, 2], &[1.0, 0.0, 0.0, 2.0]).unwrap();
        let k = Tensor::from_f32(gpu, &[1, 3, 2], &[0.0, 0.0, 1.0, 0.0, 0.0, 1.0]).unwrap();
        let v = Tensor::from_f32(gpu, &[1, 3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        for (causal, want) in [(false, want), (true, want_causal)] {
            let opts = AttentionOpts { heads: 1, scale: Some(1.0), causal };
            let got = read(gpu, &at::attention(gpu, &q, &k, &v, opts).unwrap());
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-5, "causal {causal}: {got:?} vs {want:?}");
            }
            let r = reference::attention(
                &[1.0, 0.0, 0.0, 2.0],
                &[0.0, 0.0, 1.0, 0.0, 0.0, 1.0],
                &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                1, 2, 3, 1, 2, Some(1.0), causal,
            );
            for (g, w) in r.iter().zip(want) {
                assert!((g - w).abs() < 1e-6, "reference, causal {causal}: {r:?} vs {want:?}");
            }
        }
    }
}

#[test]
fn attention_tiles_fit_the_limits() {
    for d in [1, 7, 40, 64, 80, 160, 256] {
        for (bytes, inv) in [(16 << 10, 256), (32 << 10, 256), (16 << 10, 128)] {
            let t = at::tiles_for(d, bytes, inv).unwrap_or_else(|| panic!("d {d} {bytes}"));
            assert!(t.workgroup_bytes(d) <= bytes as usize && t.invocations() <= inv as usize, "{t:?}");
        }
    }
    assert_eq!(at::tiles_for(257, 32 << 10, 256), None);
    assert_eq!(at::tiles_for(0, 32 << 10, 256), None);
}

#[test]
fn attention_shape_errors() {
    let gpu = gpu();
    let z = |s: &[usize]| Tensor::zeros(gpu, s).unwrap();
    let opts = |heads| AttentionOpts::new(heads);
    let shape_err = |r: loralab::Result<Tensor>| match r {
        Err(Error::Shape { op, message }) => {
            assert_eq!(op, "attention");
            message
        }
        other => panic!("expected a shape error, got {other:?}"),
    };
    // H·D mismatch: 80 columns are not 3 heads
    let m = shape_err(at::attention(gpu, &z(&[1, 4, 80]), &z(&[1, 5, 80]), &z(&[1, 5, 80]), opts(3)));
    assert!(m.contains("[1, 4, 80]"), "{m}");
    // q and k column counts differ
    shape_err(at::attention(gpu, &z(&[1, 4, 80]), &z(&[1, 5, 64]), &z(&[1, 5, 64]), opts(1)));
    // k and v lengths differ; batch differs
    shape_err(at::attention(gpu, &z(&[1, 4, 80]), &z(&[1, 5, 80]), &z(&[1, 6, 80]), opts(1)));
    shape_err(at::attention(gpu, &z(&[2, 4, 80]), &z(&[1, 5, 80]), &z(&[1, 5, 80]), opts(1)));
    // head dimension too large
    let m = shape_err(at::attention(gpu, &z(&[1, 4, 512]), &z(&[1, 5, 512]), &z(&[1, 5, 512]), opts(1)));
    assert!(m.contains("512"), "{m}");
    // no heads, no keys, wrong rank
    shape_err(at::attention(gpu, &z(&[1, 4, 80]), &z(&[1, 5, 80]), &z(&[1, 5, 80]), opts(0)));
    shape_err(at::attention(gpu, &z(&[1, 4, 80]), &z(&[1, 0, 80]), &z(&[1, 0, 80]), opts(1)));
    shape_err(at::attention(gpu, &z(&[4, 80]), &z(&[5, 80]), &z(&[5, 80]), opts(1)));
    // tiles beyond the device
    let big = Tiles { bq: 64, bk: 512 };
    shape_err(at::attention_tiled(gpu, &z(&[1, 4, 80]), &z(&[1, 5, 80]), &z(&[1, 5, 80]), opts(1), big));
}

