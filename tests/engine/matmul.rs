use crate::common::*;
use loralab::ops::matmul::{self as mm, reference, MatmulOpts, Tiles};
use loralab::quant::{nmse, relative_rmse_bound, round_trip};
use loralab::{DType, Tensor};

/// f32 accumulation against the f64 reference on the same (dequantized) operands: the GPU
/// dequantizes exactly, so only the order of f32 sums differs.
const ACCUM_BOUND: f64 = STRICT;

/// Error of a product over weights stored as `dt`, relative to the f32 weights: the output's
/// NMSE is about the square of the weights' relative RMSE (random data, many terms).
fn storage_bound(dt: DType) -> f64 {
    relative_rmse_bound(dt).powi(2) + ACCUM_BOUND
}

/// One matmul case: `a: [lead..., m, k]` against a weight of type `dt` shared by all batches.
struct Case {
    lead: Vec<usize>,
    m: usize,
    k: usize,
    n: usize,
    dt: DType,
    trans_b: bool,
    bias: bool,
    alpha: f32,
}

fn run_shared(gpu: &loralab::Gpu, c: &Case, tiles: Option<Tiles>, seed: u64) {
    let batch: usize = c.lead.iter().product();
    let (wr, wc) = if c.trans_b { (c.n, c.k) } else { (c.k, c.n) };
    let a = randn(batch * c.m * c.k, seed);
    let w = randn(wr * wc, seed + 1);
    let bias = randn(c.n, seed + 2);
    let mut sa = c.lead.clone();
    sa.extend([c.m, c.k]);
    let ta = Tensor::from_f32(gpu, &sa, &a).unwrap();
    let tw = Tensor::from_f32_as(gpu, &[wr, wc], &w, c.dt).unwrap();
    let tb = Tensor::from_f32(gpu, &[c.n], &bias).unwrap();
    let opts = MatmulOpts { trans_b: c.trans_b, bias: c.bias.then_some(&tb), alpha: c.alpha };
    let y = match tiles {
        Some(t) => mm::matmul_tiled(gpu, &ta, &tw, opts, t),
        None => mm::matmul(gpu, &ta, &tw, opts),
    }
    .unwrap();
    let mut so = c.lead.clone();
    so.extend([c.m, c.n]);
    assert_eq!(y.shape(), &so[..]);
    let got = read(gpu, &y);
    let dims = (batch, c.m, c.k, c.n);
    let bias = c.bias.then_some(&bias[..]);
    let wq = round_trip(&w, wr, wc, c.dt);
    let what = format!(
        "{} {}{}{} lead {:?} m {} k {} n {} tiles {tiles:?}",
        c.dt,
        if c.trans_b { "[N,K]" } else { "[K,N]" },
        if c.bias { " +bias" } else { "" },
        if c.alpha != 1.0 { " alpha" } else { "" },
        c.lead,
        c.m,
        c.k,
        c.n
    );
    let want = reference::matmul(&a, &wq, bias, dims, c.trans_b, false, c.alpha);
    assert_nmse(&what, &got, &want, ACCUM_BOUND);
    if c.k >= 32 && c.m * c.n >= 64 {
        // Against the original f32 weights (bias left out): the storage type's own error.
        let exact = reference::matmul(&a, &w, None, dims, c.trans_b, false, c.alpha);
        let got_nb: Vec<f32> = match bias {
            Some(b) => got.iter().enumerate().map(|(i, v)| v - b[i % c.n]).collect(),
            None => got.clone(),
        };
        let e = nmse(&got_nb, &exact);
        assert!(e <= storage_bound(c.dt), "{what}: nmse vs f32 weights {e:e} > {:e}", storage_bound(c.dt));
    }
}

#[test]
fn fixed_debug_case() {
    // [[1,2,3],[4,5,6]] · [[7,8],[9,10],[11,12]] = [[58,64],[139,154]]
    for gpu in gpus() {
        let a = Tensor::from_f32(gpu, &[2, 3], &[1., 2., 3., 4., 5., 6.]).unwrap();
        let bias = Tensor::from_f32(gpu, &[2], &[0.5, -1.0]).unwrap();
        for dt in [DType::F32, DType::F16] {
            let b = Tensor::from_f32_as(gpu, &[3, 2], &[7., 8., 9., 10., 11., 12.], dt).unwrap();
            let y = read(gpu, &mm::matmul(gpu, &a, &b, MatmulOpts::default()).unwrap());
            assert_eq!(y, [58., 64., 139., 154.], "{dt}");
            // nn.Linear with W = Bᵀ and a bias.
            let w = Tensor::from_f32_as(gpu, &[2, 3], &[7., 9., 11., 8., 10., 12.], dt).unwrap();
            let y = read(gpu, &mm::linear(gpu, &a, &w, Some(&bias)).unwrap());
            assert_eq!(y, [58.5, 63., 139.5, 153.], "{dt}");
        }
        // alpha scales the product, not the bias.
        let w = Tensor::from_f32(gpu, &[2, 3], &[7., 9., 11., 8., 10., 12.]).unwrap();
        let opts = MatmulOpts { trans_b: true, bias: Some(&bias), alpha: 0.5 };
        let y = read(gpu, &mm::matmul(gpu, &a, &w, opts).unwrap());
        assert_eq!(y, [29.5, 31., 70.0, 76.]);
    }
}

#[test]
fn every_weight_type_orientation_and_bias() {
    let gpu = gpu();
    // K = 1, 37: A read value by value; K = 64, 1000, 70: four at a time.
    let shapes: [(usize, usize, usize); 6] =
        [(1, 1, 1), (1, 64, 1), (7, 1, 5), (33, 1000, 17), (65, 70, 129), (3, 37, 64)];
    let mut seed = 100;
    for dt in DType::ALL {
        for trans_b in [false, true] {
            for bias in [false, true] {
                for &(m, k, n) in &shapes {
                    seed += 3;
                    let c = Case { lead: vec![], m, k, n, dt, trans_b, bias, alpha: 1.0 };
                    run_shared(gpu, &c, None, seed);
                }
            }
        }
    }
}

#[test]
fn batched_with_shared_weights_and_alpha() {
    let gpu = gpu();
    let mut seed = 500;
    for dt in DType::ALL {
        for trans_b in [false, true] {
            seed += 3;
            let c = Case { lead: vec![2, 3], m: 19, k: 45, n: 70, dt, trans_b, bias: true, alpha: -0.75 };
            run_shared(gpu, &c, None, seed);
        }
    }
}

#[test]
fn batched_b_per_batch() {
    let gpu = gpu();
    for (ci, trans_b) in [false, true].into_iter().enumerate() {
        let (lead, m, k, n) = (vec![3usize, 2], 66usize, 40usize, 31usize);
        let batch: usize = lead.iter().product();
        let a = randn(batch * m * k, 700 + ci as u64);
        let b = randn(batch * k * n, 710 + ci as u64);
        let bias = randn(n, 720);
        let mut sa = lead.clone();
        sa.extend([m, k]);
        let mut sb = lead.clone();
        sb.extend(if trans_b { [n, k] } else { [k, n] });
        let ta = Tensor::from_f32(gpu, &sa, &a).unwrap();
        let tb = Tensor::from_f32(gpu, &sb, &b).unwrap();
        let tbias = Tensor::from_f32(gpu, &[n], &bias).unwrap();
        let opts = MatmulOpts { trans_b, bias: Some(&tbias), alpha: 2.0 };
        let y = mm::matmul(gpu, &ta, &tb, opts).unwrap();
        assert_eq!(y.shape(), &[3, 2, m, n]);
        let want = reference::matmul(&a, &b, Some(&bias), (batch, m, k, n), trans_b, true, 2.0);
        assert_nmse(&format!("batched B trans_b={trans_b}"), &read(gpu, &y), &want, ACCUM_BOUND);
    }
}

#[test]
fn small_device_tiles() {
    // The tiles `Tiles::for_caps` picks on devices with less workgroup memory or fewer
    // invocations than lavapipe.
    let gpu = gpu_plain();
    let tiles = [
        Tiles { bm: 64, bn: 64, kt: 16 },
        Tiles { bm: 32, bn: 64, kt: 8 },
        Tiles { bm: 32, bn: 32, kt: 4 },
        Tiles { bm: 128, bn: 64, kt: 8 },
    ];
    for (ti, t) in tiles.into_iter().enumerate() {
        for (di, dt) in [DType::F32, DType::Q4_0].into_iter().enumerate() {
            for trans_b in [false, true] {
                let c = Case { lead: vec![2], m: 45, k: 77, n: 70, dt, trans_b, bias: true, alpha: 1.0 };
                run_shared(gpu, &c, Some(t), 900 + (ti * 4 + di * 2) as u64);
            }
        }
    }
}

#[test]
fn linear_keeps_leading_dims() {
    let gpu = gpu();
    let (k, n) = (96, 40);
    let x = randn(2 * 5 * k, 1);
    let w = randn(n * k, 2);
    let b = randn(n, 3);
    let tx = Tensor::from_f32(gpu, &[2, 5, k], &x).unwrap();
    let tb = Tensor::from_f32(gpu, &[n], &b).unwrap();
    for dt in DType::ALL {
        let tw = Tensor::from_f32_as(gpu, &[n, k], &w, dt).unwrap();
        let y = mm::linear(gpu, &tx, &tw, Some(&tb)).unwrap();
        assert_eq!(y.shape(), &[2, 5, n]);
        let want = reference::linear(&x, &round_trip(&w, n, k, dt), Some(&b), 10, k, n);
        assert_nmse(&format!("linear {dt}"), &read(gpu, &y), &want, ACCUM_BOUND);
    }
    // A 1-D input is one row.
    let x1 = Tensor::from_f32(gpu, &[k], &x[..k]).unwrap();
    let tw = Tensor::from_f32(gpu, &[n, k], &w).unwrap();
    let y = mm::linear(gpu, &x1, &tw, None).unwrap();
    assert_eq!(y.shape(), &[n]);
    assert_nmse("linear 1-D", &read(gpu, &y), &reference::linear(&x[..k], &w, None, 1, k, n), ACCUM_BOUND);
}

#[test]
fn bad_shapes_are_errors() {
    let gpu = gpu();
    let t = |s: &[usize]| Tensor::zeros(gpu, s).unwrap();
    let q = Tensor::from_f32_as(gpu, &[2, 4, 3], &[0.0; 24], DType::Q8_0).unwrap();
    let cases: Vec<(loralab::Result<Tensor>, &str)> = vec![
        (mm::matmul(gpu, &t(&[4, 3]), &t(&[4, 5]), MatmulOpts::default()), "[4, 5]"),
        (mm::matmul(gpu, &t(&[4, 3]), &t(&[3, 5]), MatmulOpts { trans_b: true, ..Default::default() }), "[3, 5]"),
        (mm::matmul(gpu, &t(&[3]), &t(&[3, 5]), MatmulOpts::default()), "[3]"),
        (mm::matmul(gpu, &t(&[2, 4, 3]), &t(&[3, 3, 5]), MatmulOpts::default()), "[3, 3, 5]"),
        (mm::matmul(gpu, &t(&[2, 4, 4]), &q, MatmulOpts::default()), "q8_0"),
        (
            mm::matmul(gpu, &t(&[4, 3]), &t(&[3, 5]), MatmulOpts { bias: Some(&t(&[4])), ..Default::default() }),
            "[4]",
        ),
        (mm::linear(gpu, &t(&[4, 3]), &t(&[5, 4]), None), "[5, 4]"),
        (mm::linear(gpu, &t(&[4, 3]), &t(&[5, 3, 1]), None), "[5, 3, 1]"),
    ];
    for (i, (r, needle)) in cases.into_iter().enumerate() {
        let e = r.expect_err(&format!("case {i} must fail")).to_string();
        assert!(e.contains(needle) && (e.contains("matmul") || e.contains("linear")), "case {i}: {e}");
    }
}

#[test]
fn gpu_quantized_weights_feed_linear() {
    let gpu = gpu();
    let (m, k, n) = (20, 100, 36);
    let x = randn(m * k, 41);
    let w = randn(n * k, 42);
    let tx = Tensor::from_f32(gpu, &[m, k], &x).unwrap();
    let wf = Tensor::from_f32(gpu, &[n, k], &w).unwrap();
    for dt in [DType::F16, DType::Q8_0, DType::Q4_0] {
        let wq = loralab::ops::quantize::quantize(gpu, &wf, dt).unwrap();
        let y = read(gpu, &mm::linear(gpu, &tx, &wq, None).unwrap());
        let want = reference::linear(&x, &round_trip(&w, n, k, dt), None, m, k, n);
        assert_nmse(&format!("linear on GPU-quantized {dt}"), &y, &want, ACCUM_BOUND);
    }
}

/// CPU seconds used by this process (lavapipe runs kernels on the CPU; on a shared machine
/// this is steadier than wall time).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Timing of the benchmark shapes (run with `--ignored --nocapture`; MATMUL_BENCH_TYPES picks
/// storage types, e.g. `f32,q4_0`, MATMUL_BENCH_SHAPES how many of the three shapes).
#[test]
#[ignore]
fn bench_matmul_shapes() {
    let gpu = gpu();
    let types: Vec<DType> = match std::env::var("MATMUL_BENCH_TYPES") {
        Ok(v) => v.split(',').filter_map(DType::parse).collect(),
        Err(_) => DType::ALL.to_vec(),
    };
    let count = std::env::var("MATMUL_BENCH_SHAPES").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    for (m, k, n) in [(4096, 320, 320), (4096, 640, 1280), (1024, 1280, 5120)].into_iter().take(count) {
        let x = Tensor::from_f32(gpu, &[m, k], &randn(m * k, 1)).unwrap();
        let w32 = randn(n * k, 2);
        for &dt in &types {
            let w = Tensor::from_f32_as(gpu, &[n, k], &w32, dt).unwrap();
            let _ = mm::linear(gpu, &x, &w, None).unwrap();
            block(gpu.sync()).unwrap();
            let (t0, c0) = (std::time::Instant::now(), cpu_seconds());
            let _ = mm::linear(gpu, &x, &w, None).unwrap();
            block(gpu.sync()).unwrap();
            let (s, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
            let gflops = 2.0 * (m * k * n) as f64 / s / 1e9;
            eprintln!("linear M={m} K={k} N={n} {dt}: {:.0} ms ({gflops:.1} GFLOP/s), {cpu:.2} CPU s", s * 1e3);
        }
    }
}
