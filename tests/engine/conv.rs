use crate::common::*;
use loralab::ops::conv::{self, conv2d, conv2d_with, reference, Conv2dParams, Tiles};
use loralab::quant::round_trip;
use loralab::{DType, Gpu, Tensor};

/// One convolution problem: input [b, cin, h, w], weight [cout, cin, k, k].
#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    bias: bool,
}

const fn case(b: usize, cin: usize, cout: usize, h: usize, w: usize, k: usize, stride: usize, pad: usize, bias: bool) -> Case {
    Case { b, cin, cout, h, w, k, stride, pad, bias }
}

/// Runs `c` with weights stored as `dt` (through `tiles` if given) and compares with the
/// reference on the dequantized weights. The only difference left is f32 summation order.
fn check(gpu: &Gpu, c: Case, dt: DType, tiles: Option<Tiles>, seed: u64) {
    let kk = c.cin * c.k * c.k;
    let x = randn(c.b * c.cin * c.h * c.w, seed);
    let wv: Vec<f32> = randn(c.cout * kk, seed + 1).iter().map(|v| v / (kk as f32).sqrt()).collect();
    let bv = randn(c.cout, seed + 2);
    let tx = Tensor::from_f32(gpu, &[c.b, c.cin, c.h, c.w], &x).unwrap();
    let tw = Tensor::from_f32_as(gpu, &[c.cout, c.cin, c.k, c.k], &wv, dt).unwrap();
    let tb = Tensor::from_f32(gpu, &[c.cout], &bv).unwrap();
    let bias = c.bias.then_some(&tb);
    let p = Conv2dParams { stride: c.stride, padding: c.pad };
    let y = match tiles {
        Some(t) => conv2d_with(gpu, &tx, &tw, bias, p, t),
        None => conv2d(gpu, &tx, &tw, bias, p),
    }
    .unwrap_or_else(|e| panic!("{c:?} {dt}: {e}"));
    let (ho, wo) = conv::out_size(c.h, c.w, c.k, c.k, p).unwrap();
    assert_eq!(y.shape(), [c.b, c.cout, ho, wo]);
    let wq = round_trip(&wv, c.cout, kk, dt);
    let want = reference::conv2d(
        &x,
        [c.b, c.cin, c.h, c.w],
        &wq,
        [c.cout, c.k, c.k],
        c.bias.then_some(&bv[..]),
        p,
    );
    assert_nmse(&format!("{c:?} {dt} {tiles:?}"), &read(gpu, &y), &want, F32_BOUND);
}

/// Shapes Stable Diffusion uses, shrunk, plus awkward ones: Cin 1 and 3, Cout not a tile
/// multiple, odd sizes, 1x1 images, batch 2, Cin·9 not a multiple of 32, large K.
const CASES: &[Case] = &[
    case(1, 4, 32, 8, 8, 3, 1, 1, true),    // conv_in-like
    case(2, 3, 70, 9, 7, 3, 1, 1, false),   // batch 2, Cin 3, Cout 70, odd H/W
    case(1, 1, 5, 6, 5, 3, 1, 0, true),     // Cin 1, K 9, no padding
    case(1, 7, 65, 11, 13, 3, 2, 1, true),  // downsample, Cin·9 = 63
    case(2, 5, 9, 10, 10, 3, 2, 0, false),  // stride 2 without padding
    case(1, 37, 40, 5, 6, 1, 1, 0, true),   // 1x1 shortcut, K 37
    case(2, 6, 3, 7, 7, 1, 2, 0, false),    // 1x1 stride 2, Cout 3
    case(1, 3, 17, 1, 1, 3, 1, 1, true),    // 1x1 image, 3x3 padded kernel
    case(2, 2, 4, 1, 1, 1, 1, 0, false),    // 1x1 image, 1x1 kernel
    case(1, 1, 1, 3, 4, 1, 1, 1, true),     // 1x1 kernel with padding
    case(1, 48, 66, 9, 9, 3, 1, 1, true),   // K 432, several k tiles
    case(1, 130, 8, 4, 5, 3, 1, 1, false),  // K 1170, few channels
];

#[test]
fn conv2d_matches_reference_for_every_weight_type() {
    for (gi, gpu) in gpus().into_iter().enumerate() {
        for dt in DType::ALL {
            for (ci, c) in CASES.iter().enumerate() {
                check(gpu, *c, dt, None, (gi * 1000 + ci * 10) as u64);
            }
        }
    }
}

#[test]
fn conv2d_every_tiling_is_correct() {
    let gpu = gpu();
    let caps = gpu.caps();
    let mut tilings: Vec<Tiles> = [1, 4, 16, 32, 64, 320].iter().map(|&c| Tiles::choose(caps, c)).collect();
    tilings.push(Tiles { bm: 32, bn: 32, kt: 8 }); // 16 invocations
    tilings.push(Tiles { bm: 128, bn: 128, kt: 16 }); // 256 invocations
    tilings.push(Tiles { bm: 8, bn: 64, kt: 4 }); // pixel quads re-decoded per slice row
    tilings.push(Tiles { bm: 64, bn: 8, kt: 12 }); // K slice not a power of two
    tilings.dedup();
    for t in tilings {
        assert!(t.is_valid() && t.workgroup_bytes() <= caps.max_workgroup_storage as usize, "{t:?}");
        check(gpu, case(2, 7, 37, 9, 11, 3, 1, 1, true), DType::Q4_0, Some(t), 7);
        check(gpu, case(1, 19, 70, 8, 9, 3, 2, 1, false), DType::F16, Some(t), 8);
    }
}

#[test]
fn conv2d_tiles_fit_the_weakest_adapter() {
    let mut caps = gpu().caps().clone();
    caps.max_workgroup_storage = 16384;
    caps.max_invocations_per_workgroup = 256;
    for cout in [1, 3, 4, 8, 16, 30, 32, 64, 320, 512] {
        let t = Tiles::choose(&caps, cout);
        assert!(t.is_valid() && t.invocations() <= 256 && t.workgroup_bytes() <= 16384, "{t:?}");
    }
}

#[test]
fn conv2d_fixed_values() {
    // x = [[1,2,3],[4,5,6],[7,8,9]]; channel 0 a Laplacian + 0.5, channel 1 a box sum - 1.
    let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
    let w = [0., 1., 0., 1., -4., 1., 0., 1., 0., 1., 1., 1., 1., 1., 1., 1., 1., 1.];
    let bias = [0.5f32, -1.0];
    let lap = [2., 1., -4., -3., 0., -7., -16., -11., -22.];
    let boxs = [12., 21., 16., 27., 45., 33., 24., 39., 28.];
    for gpu in gpus() {
        let tx = Tensor::from_f32(gpu, &[1, 1, 3, 3], &x).unwrap();
        let tw = Tensor::from_f32(gpu, &[2, 1, 3, 3], &w).unwrap();
        let tb = Tensor::from_f32(gpu, &[2], &bias).unwrap();
        let y = read(gpu, &conv2d(gpu, &tx, &tw, Some(&tb), Conv2dParams { stride: 1, padding: 1 }).unwrap());
        let want: Vec<f32> =
            lap.iter().map(|v| v + 0.5).chain(boxs.iter().map(|v| v - 1.0)).collect();
        assert_eq!(y, want);

        // Stride 2 keeps the corners.
        let y = conv2d(gpu, &tx, &tw, None, Conv2dParams { stride: 2, padding: 1 }).unwrap();
        assert_eq!(y.shape(), [1, 2, 2, 2]);
        assert_eq!(read(gpu, &y), [2., -4., -16., -22., 12., 16., 24., 28.]);

        // No padding: one output, the centre.
        let y = conv2d(gpu, &tx, &tw, None, Conv2dParams { stride: 1, padding: 0 }).unwrap();
        assert_eq!(y.shape(), [1, 2, 1, 1]);
        assert_eq!(read(gpu, &y), [0., 45.]);

        // 1x1 kernel over two channels, stride 2: 2·x0 - x1 at the corners.
        let x2: Vec<f32> = x.iter().copied().chain(x.iter().map(|v| v * 10.0)).collect();
        let tx2 = Tensor::from_f32(gpu, &[1, 2, 3, 3], &x2).unwrap();
        let tw2 = Tensor::from_f32(gpu, &[1, 2, 1, 1], &[2.0, -1.0]).unwrap();
        let y = read(gpu, &conv2d(gpu, &tx2, &tw2, None, Conv2dParams { stride: 2, padding: 0 }).unwrap());
        assert_eq!(y, [-8., -24., -56., -72.]);
    }
}

#[test]
fn conv2d_shape_errors() {
    let gpu = gpu();
    let p1 = Conv2dParams { stride: 1, padding: 1 };
    let p0 = Conv2dParams { stride: 1, padding: 0 };
    let x = Tensor::zeros(gpu, &[1, 3, 4, 4]).unwrap();
    let w = Tensor::zeros(gpu, &[8, 4, 3, 3]).unwrap();
    let e = conv2d(gpu, &x, &w, None, p1).unwrap_err().to_string();
    assert!(e.contains("conv2d") && e.contains("[1, 3, 4, 4]") && e.contains("[8, 4, 3, 3]"), "{e}");

    // A 3x3 kernel does not fit a 1x2 image without padding, and fits it with padding 1.
    let x = Tensor::zeros(gpu, &[1, 2, 1, 2]).unwrap();
    let w = Tensor::zeros(gpu, &[5, 2, 3, 3]).unwrap();
    let e = conv2d(gpu, &x, &w, None, p0).unwrap_err().to_string();
    assert!(e.contains("conv2d") && e.contains("[1, 2, 1, 2]") && e.contains("3x3"), "{e}");
    assert_eq!(conv2d(gpu, &x, &w, None, p1).unwrap().shape(), [1, 5, 1, 2]);

    let b = Tensor::zeros(gpu, &[4]).unwrap();
    let e = conv2d(gpu, &x, &w, Some(&b), p1).unwrap_err().to_string();
    assert!(e.contains("bias") && e.contains("[4]"), "{e}");
    let e = conv2d(gpu, &x, &w, None, Conv2dParams { stride: 0, padding: 1 }).unwrap_err();
    assert!(e.to_string().contains("stride 0"), "{e}");
    let flat = Tensor::zeros(gpu, &[2, 4]).unwrap();
    assert!(conv2d(gpu, &flat, &w, None, p1).is_err());
    let wq = Tensor::from_f32_as(gpu, &[5, 2, 3, 3], &[0.0; 90], DType::Q8_0).unwrap();
    assert!(conv2d(gpu, &wq, &w, None, p1).is_err(), "quantized activations are refused");
}

/// `cargo test -p loralab --test engine conv2d_speed -- --ignored --nocapture`
/// (LORALAB_CONV_TILES="bm,bn,kt;..." to time other tilings, LORALAB_CONV_DTYPES="f32,q8_0",
/// LORALAB_CONV_REPS=n to average n runs).
#[test]
#[ignore]
fn conv2d_speed() {
    let gpu = gpu();
    eprintln!("{:?}", gpu.adapter());
    let (cin, cout, hw) = (320, 320, 64);
    let x = Tensor::from_f32(gpu, &[1, cin, hw, hw], &randn(cin * hw * hw, 1)).unwrap();
    let wv = randn(cout * cin * 9, 2);
    let b = Tensor::from_f32(gpu, &[cout], &randn(cout, 3)).unwrap();
    let p = Conv2dParams { stride: 1, padding: 1 };
    let flops = 2.0 * (cout * cin * 9 * hw * hw) as f64;
    let tilings: Vec<Tiles> = match std::env::var("LORALAB_CONV_TILES") {
        Ok(s) => s
            .split(';')
            .map(|t| {
                let v: Vec<usize> = t.split(',').map(|n| n.trim().parse().unwrap()).collect();
                Tiles { bm: v[0], bn: v[1], kt: v[2] }
            })
            .collect(),
        Err(_) => vec![Tiles::choose(gpu.caps(), cout)],
    };
    let dtypes: Vec<DType> = match std::env::var("LORALAB_CONV_DTYPES") {
        Ok(s) => s.split(',').map(|d| DType::parse(d).unwrap()).collect(),
        Err(_) => DType::ALL.to_vec(),
    };
    for dt in dtypes {
        let w = Tensor::from_f32_as(gpu, &[cout, cin, 3, 3], &wv, dt).unwrap();
        for &t in &tilings {
            read(gpu, &conv2d_with(gpu, &x, &w, Some(&b), p, t).unwrap()); // compile, warm up
            let reps: usize = std::env::var("LORALAB_CONV_REPS").map_or(1, |r| r.parse().unwrap());
            let start = std::time::Instant::now();
            for _ in 0..reps {
                let _ = conv2d_with(gpu, &x, &w, Some(&b), p, t).unwrap();
            }
            block(gpu.sync()).unwrap();
            let s = start.elapsed().as_secs_f64() / reps as f64;
            eprintln!(
                "conv2d 64x64x320->320 3x3 {dt} {t:?}: {:.0} ms, {:.2} GFLOP/s",
                s * 1e3,
                flops / s / 1e9
            );
        }
    }
}
