//! Backward of a convolution on a frozen weight of every storage type, with a trainable LoCon
//! adapter (`ops::grad::conv`): the f64 reference against finite differences, then the
//! kernels against the reference on both devices.

use crate::common::*;
use crate::gradcheck::{assert_grad, dot, f64s, numeric_grad};
use loralab::ops::conv::Conv2dParams;
use loralab::ops::gemm::Tiles;
use loralab::ops::grad::conv::{
    conv2d_input_grad, conv2d_input_grad_with, conv2d_weight_grad, conv2d_weight_grad_with, locon_conv2d,
    locon_conv2d_backward, pixel_chunks, reference, Locon,
};
use loralab::quant::round_trip;
use loralab::{DType, Gpu, Tensor};

/// f32 sums on the device against the f64 reference on the same (dequantized) operands.
const BOUND: f64 = STRICT;

fn rand64(n: usize, seed: u64) -> Vec<f64> {
    f64s(&randn(n, seed))
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// One convolution: input `[b, cin, h, w]`, `cout` channels, a `k×k` kernel, stride, padding,
/// LoCon rank `r`.
#[derive(Clone, Copy, Debug)]
struct Shape {
    b: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
    r: usize,
}

impl Shape {
    fn dims(&self) -> reference::Dims {
        ([self.b, self.cin, self.h, self.w], [self.cout, self.k, self.k])
    }
    fn params(&self) -> Conv2dParams {
        Conv2dParams { stride: self.stride, padding: self.pad }
    }
    fn out(&self) -> [usize; 4] {
        let (ho, wo) = loralab::ops::conv::out_size(self.h, self.w, self.k, self.k, self.params()).unwrap();
        [self.b, self.cout, ho, wo]
    }
    fn x_len(&self) -> usize {
        self.b * self.cin * self.h * self.w
    }
    fn w_len(&self) -> usize {
        self.cout * self.cin * self.k * self.k
    }
}

#[allow(clippy::too_many_arguments)]
const fn sh(
    b: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
    r: usize,
) -> Shape {
    Shape { b, cin, h, w, cout, k, stride, pad, r }
}

#[test]
fn reference_backward_matches_finite_differences() {
    let shapes = [
        sh(1, 1, 1, 1, 1, 1, 1, 0, 1),
        sh(2, 3, 5, 4, 2, 3, 1, 1, 2),
        sh(1, 2, 6, 5, 3, 3, 2, 1, 1), // stride 2, even and odd sizes
        sh(2, 3, 4, 4, 2, 1, 1, 0, 3), // 1×1, R > Cout
        sh(1, 2, 7, 7, 2, 3, 2, 0, 2), // stride 2 without padding (the padded-separately downsampler)
    ];
    for (i, s) in shapes.iter().enumerate() {
        let seed = 20 + 9 * i as u64;
        let (d, p, r) = (s.dims(), s.params(), s.r);
        let out: usize = s.out().iter().product();
        let x = rand64(s.x_len(), seed);
        let w = rand64(s.w_len(), seed + 1);
        let bias = rand64(s.cout, seed + 2);
        let down = rand64(r * s.cin * s.k * s.k, seed + 3);
        let up = rand64(s.cout * r, seed + 4);
        let u = rand64(out, seed + 5);
        let sc = 0.6;
        let (dx, d_down, d_up) = reference::backward(&x, &w, &down, &up, r, sc, &u, d, p);
        let what = format!("{s:?}");
        let f = |x: &[f64], w: &[f64], down: &[f64], up: &[f64]| {
            reference::forward(x, w, Some(&bias), down, up, r, sc, d, p).0
        };
        let loss_x = |v: &[f64]| dot(&u, &f(v, &w, &down, &up));
        assert_grad(&format!("dx {what}"), &dx, &numeric_grad(&loss_x, &x, 1e-6), 1e-7);
        let loss_d = |v: &[f64]| dot(&u, &f(&x, &w, v, &up));
        assert_grad(&format!("d_down {what}"), &d_down, &numeric_grad(&loss_d, &down, 1e-6), 1e-7);
        let loss_u = |v: &[f64]| dot(&u, &f(&x, &w, &down, v));
        assert_grad(&format!("d_up {what}"), &d_up, &numeric_grad(&loss_u, &up, 1e-6), 1e-7);
        // The frozen convolution's own pieces: input and weight gradients of conv(x, w).
        let loss_cx = |v: &[f64]| dot(&u, &reference::conv(v, &w, d, p));
        let gx = reference::input_grad(&u, &w, d, p);
        assert_grad(&format!("conv dx {what}"), &gx, &numeric_grad(&loss_cx, &x, 1e-6), 1e-7);
        let loss_cw = |v: &[f64]| dot(&u, &reference::conv(&x, v, d, p));
        let gw = reference::weight_grad(&u, &x, d, p);
        assert_grad(&format!("conv dW {what}"), &gw, &numeric_grad(&loss_cw, &w, 1e-6), 1e-7);
    }
}

/// Shapes for the kernels: few and many channels (each tile shape), 3×3 and 1×1, stride 2 with
/// and without padding, sizes that are not multiples of a tile.
const GPU_SHAPES: [Shape; 6] = [
    sh(1, 1, 1, 1, 1, 1, 1, 0, 1),
    sh(2, 3, 7, 5, 4, 3, 1, 1, 2),
    sh(1, 20, 9, 10, 12, 3, 2, 1, 4),
    sh(2, 36, 5, 6, 40, 1, 1, 0, 8),
    sh(1, 9, 8, 8, 70, 3, 2, 0, 3),
    sh(2, 70, 6, 6, 17, 3, 1, 1, 5),
];

fn dequantized(w: &[f32], s: &Shape, dt: DType) -> Vec<f64> {
    f64s(&round_trip(w, s.cout, s.cin * s.k * s.k, dt))
}

#[test]
fn input_grad_on_every_weight_type() {
    let mut seed = 500;
    for gpu in gpus() {
        for dt in DType::ALL {
            for s in &GPU_SHAPES {
                seed += 3;
                let out = s.out();
                let dy = randn(out.iter().product(), seed);
                let w = randn(s.w_len(), seed + 1);
                let tdy = Tensor::from_f32(gpu, &out, &dy).unwrap();
                let tw = Tensor::from_f32_as(gpu, &[s.cout, s.cin, s.k, s.k], &w, dt).unwrap();
                let dx = conv2d_input_grad(gpu, &tdy, &tw, [s.h, s.w], s.params()).unwrap();
                assert_eq!(dx.shape(), [s.b, s.cin, s.h, s.w]);
                let want = reference::input_grad(&f64s(&dy), &dequantized(&w, s, dt), s.dims(), s.params());
                assert_nmse(&format!("{dt} {s:?}"), &read(gpu, &dx), &f32s(&want), BOUND);
            }
        }
    }
}

#[test]
fn weight_grad_is_chunked_and_repeats() {
    // Enough chunks for the device, each a whole number of slices, within the pixel count.
    assert_eq!(pixel_chunks(100, 1, 10, 32), (128, 1));
    assert_eq!(pixel_chunks(8192, 1, 10, 32), (128, 64));
    assert_eq!(pixel_chunks(8192, 4, 10, 32), (256, 32));
    let (chunk, chunks) = pixel_chunks(8192, 1, 64 << 20, 32);
    assert_eq!((chunk, chunks), (8192, 1), "partial results are bounded in memory");
    let mut seed = 700;
    for gpu in gpus() {
        for s in GPU_SHAPES.iter().chain([sh(2, 4, 16, 16, 6, 3, 1, 1, 1)].iter()) {
            seed += 3;
            let out = s.out();
            let dy = randn(out.iter().product(), seed);
            let x = randn(s.x_len(), seed + 1);
            let tdy = Tensor::from_f32(gpu, &out, &dy).unwrap();
            let tx = Tensor::from_f32(gpu, &[s.b, s.cin, s.h, s.w], &x).unwrap();
            let run = || read(gpu, &conv2d_weight_grad(gpu, &tdy, &tx, [s.k, s.k], s.params(), 0.25).unwrap());
            let got = run();
            let dw = reference::weight_grad(&f64s(&dy), &f64s(&x), s.dims(), s.params());
            let want: Vec<f64> = dw.iter().map(|v| 0.25 * v).collect();
            assert_nmse(&format!("{s:?}"), &got, &f32s(&want), BOUND);
            assert_eq!(got, run(), "{s:?}: bit-reproducible");
        }
    }
}

/// The tiles of a 16 KiB / 64-invocation device and the narrow ones, on the default device.
#[test]
fn small_device_tiles() {
    let gpu = gpu();
    let tiles = [
        Tiles { bm: 32, bn: 32, kt: 16 },
        Tiles { bm: 8, bn: 256, kt: 8 },
        Tiles { bm: 16, bn: 128, kt: 4 },
        Tiles { bm: 64, bn: 64, kt: 16 },
    ];
    let mut seed = 900;
    for t in tiles {
        for s in &GPU_SHAPES[1..] {
            seed += 3;
            let out = s.out();
            let dy = randn(out.iter().product(), seed);
            let w = randn(s.w_len(), seed + 1);
            let x = randn(s.x_len(), seed + 2);
            let tdy = Tensor::from_f32(gpu, &out, &dy).unwrap();
            let tx = Tensor::from_f32(gpu, &[s.b, s.cin, s.h, s.w], &x).unwrap();
            let dt = DType::Q4_0;
            let tw = Tensor::from_f32_as(gpu, &[s.cout, s.cin, s.k, s.k], &w, dt).unwrap();
            let dx = conv2d_input_grad_with(gpu, &tdy, &tw, [s.h, s.w], s.params(), Some(t)).unwrap();
            let want = reference::input_grad(&f64s(&dy), &dequantized(&w, s, dt), s.dims(), s.params());
            assert_nmse(&format!("dx {t:?} {s:?}"), &read(gpu, &dx), &f32s(&want), BOUND);
            let dw = conv2d_weight_grad_with(gpu, &tdy, &tx, [s.k, s.k], s.params(), 1.0, Some(t)).unwrap();
            let want = reference::weight_grad(&f64s(&dy), &f64s(&x), s.dims(), s.params());
            assert_nmse(&format!("dW {t:?} {s:?}"), &read(gpu, &dw), &f32s(&want), BOUND);
        }
    }
}

fn run_locon(gpu: &Gpu, s: &Shape, dt: DType, seed: u64) {
    let (p, r, k) = (s.params(), s.r, s.k);
    let out = s.out();
    let x = randn(s.x_len(), seed);
    let w = randn(s.w_len(), seed + 1);
    let bias = randn(s.cout, seed + 2);
    let down = randn(r * s.cin * k * k, seed + 3);
    let up = randn(s.cout * r, seed + 4);
    let dy = randn(out.iter().product(), seed + 5);
    let sc = 2.0 / r as f32;
    let tx = Tensor::from_f32(gpu, &[s.b, s.cin, s.h, s.w], &x).unwrap();
    let tw = Tensor::from_f32_as(gpu, &[s.cout, s.cin, k, k], &w, dt).unwrap();
    let tb = Tensor::from_f32(gpu, &[s.cout], &bias).unwrap();
    let tdown = Tensor::from_f32(gpu, &[r, s.cin, k, k], &down).unwrap();
    let tup = Tensor::from_f32(gpu, &[s.cout, r, 1, 1], &up).unwrap();
    let tdy = Tensor::from_f32(gpu, &out, &dy).unwrap();
    let lora = Locon { down: &tdown, up: &tup, scale: sc };
    let wq = dequantized(&w, s, dt);
    let (x64, down64, up64) = (f64s(&x), f64s(&down), f64s(&up));
    let what = format!("{dt} {s:?}");

    let (y, t) = locon_conv2d(gpu, &tx, &tw, Some(&tb), p, &lora).unwrap();
    let (y_want, t_want) = reference::forward(&x64, &wq, Some(&f64s(&bias)), &down64, &up64, r, sc as f64, s.dims(), p);
    assert_eq!((y.shape(), t.shape()), (&out[..], &[s.b, r, out[2], out[3]][..]));
    assert_nmse(&format!("y {what}"), &read(gpu, &y), &f32s(&y_want), BOUND);
    assert_nmse(&format!("t {what}"), &read(gpu, &t), &f32s(&t_want), BOUND);

    let (dx_want, dd_want, du_want) =
        reference::backward(&x64, &wq, &down64, &up64, r, sc as f64, &f64s(&dy), s.dims(), p);
    let g = locon_conv2d_backward(gpu, &tx, &tw, p, &lora, Some(&t), &tdy, true).unwrap();
    let dx = g.dx.expect("dx was asked for");
    assert_eq!((dx.shape(), g.d_down.shape(), g.d_up.shape()), (tx.shape(), tdown.shape(), tup.shape()));
    assert_nmse(&format!("dx {what}"), &read(gpu, &dx), &f32s(&dx_want), BOUND);
    let d_down = read(gpu, &g.d_down);
    let d_up = read(gpu, &g.d_up);
    assert_nmse(&format!("d_down {what}"), &d_down, &f32s(&dd_want), BOUND);
    assert_nmse(&format!("d_up {what}"), &d_up, &f32s(&du_want), BOUND);

    let g2 = locon_conv2d_backward(gpu, &tx, &tw, p, &lora, None, &tdy, false).unwrap();
    assert!(g2.dx.is_none());
    assert_eq!(read(gpu, &g2.d_down), d_down, "{what}: d_down repeats");
    assert_eq!(read(gpu, &g2.d_up), d_up, "{what}: d_up repeats");
}

#[test]
fn locon_forward_and_backward_match_the_reference() {
    let mut seed = 1100;
    for gpu in gpus() {
        for dt in DType::ALL {
            for s in &GPU_SHAPES {
                seed += 7;
                run_locon(gpu, s, dt, seed);
            }
        }
    }
}

#[test]
fn mismatched_operands_are_errors() {
    let gpu = gpu();
    let t = |s: &[usize]| Tensor::zeros(gpu, s).unwrap();
    let p = Conv2dParams { stride: 1, padding: 1 };
    let (x, w, dy) = (t(&[1, 3, 5, 5]), t(&[4, 3, 3, 3]), t(&[1, 4, 5, 5]));
    let (down, up) = (t(&[2, 3, 3, 3]), t(&[4, 2, 1, 1]));
    let ok = Locon { down: &down, up: &up, scale: 1.0 };
    assert!(locon_conv2d_backward(gpu, &x, &w, p, &ok, None, &dy, true).is_ok());
    let bad_down = t(&[2, 3, 1, 1]);
    assert!(locon_conv2d_backward(gpu, &x, &w, p, &Locon { down: &bad_down, ..ok }, None, &dy, true).is_err());
    let bad_up = t(&[2, 4, 1, 1]);
    assert!(locon_conv2d(gpu, &x, &w, None, p, &Locon { up: &bad_up, ..ok }).is_err());
    assert!(locon_conv2d_backward(gpu, &x, &w, p, &ok, None, &t(&[1, 4, 4, 4]), true).is_err());
    assert!(locon_conv2d_backward(gpu, &x, &w, p, &ok, Some(&t(&[1, 3, 5, 5])), &dy, true).is_err());
    assert!(conv2d_input_grad(gpu, &dy, &w, [6, 6], Conv2dParams { stride: 1, padding: 0 }).is_err());
    assert!(conv2d_weight_grad(gpu, &dy, &t(&[1, 3, 6, 6]), [3, 3], p, 1.0).is_err());
    let big = Tiles { bm: 256, bn: 256, kt: 32 };
    assert!(conv2d_input_grad_with(gpu, &dy, &w, [5, 5], p, Some(big)).is_err());
}
