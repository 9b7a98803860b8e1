//! Adapters inside the matmul and conv2d kernels (`ops::adapter`, `common/adapter.wgsl`)
//! against the CPU reference: every term kind, stacked, on every base weight type, with the
//! small-device tiles too.

use crate::common::*;
use loralab::ops::adapter::{self, reference, Dynamic, Operands, Shape, Static, TermKind};
use loralab::ops::conv::{conv2d_adapted, reference as conv_ref, Conv2dParams};
use loralab::ops::matmul::{linear_adapted, reference as mm_ref};
use loralab::quant::round_trip;
use loralab::{DType, Gpu, Tensor};

/// Which parts a case has.
#[derive(Clone, Copy)]
struct Parts {
    rank: usize,
    dense_f32: bool,
    dense_f16: bool,
    /// Kronecker factors (a, c): N = a·c; b, d chosen from K.
    kron: Option<(usize, usize)>,
    base_row: bool,
    base_col: bool,
    bias: bool,
    vectors: bool,
}

const ALL: Parts = Parts {
    rank: 12,
    dense_f32: true,
    dense_f16: true,
    kron: Some((4, 0)),
    base_row: true,
    base_col: true,
    bias: true,
    vectors: true,
};

/// Random adapter data for a `[n, k]` weight (`kk` taps per input channel).
fn build(n: usize, k: usize, kk: usize, parts: Parts, seed: u64) -> (Shape, Dynamic, Static) {
    let mut shape = Shape { n, k, rank: parts.rank, terms: vec![], base_row: parts.base_row, base_col: parts.base_col, bias: parts.bias };
    let mut d = Dynamic {
        col_scale: randu(parts.rank, -0.8, 0.8, seed),
        base_row: parts.base_row.then(|| randu(n, 0.5, 1.5, seed + 1)),
        base_col: parts.base_col.then(|| randu(k, 0.5, 1.5, seed + 2)),
        bias: parts.bias.then(|| randn(n, seed + 3)),
        terms: vec![],
    };
    let mut s = Static { up: randn(n * parts.rank, seed + 4), terms: vec![] };
    let mut add = |kind: TermKind, m0: Vec<f32>, m1: Vec<f32>, i: u64| {
        let row = parts.vectors && i.is_multiple_of(2);
        let col = parts.vectors && i % 2 == 1;
        shape.terms.push((kind, row, col));
        d.terms.push((
            0.3 + 0.1 * i as f32,
            row.then(|| randu(n, 0.5, 1.5, seed + 10 + i)),
            col.then(|| randu(k, 0.5, 1.5, seed + 20 + i)),
        ));
        s.terms.push((m0, m1));
    };
    if parts.dense_f32 {
        add(TermKind::DenseF32, randn(n * k, seed + 5), vec![], 0);
    }
    if parts.dense_f16 {
        add(TermKind::DenseF16, randn(n * k, seed + 6), vec![], 1);
    }
    if let Some((a, _)) = parts.kron {
        let c = n / a;
        let cin = k / kk;
        let b = if cin.is_multiple_of(2) { 2 } else { 1 };
        let dd = cin / b;
        add(TermKind::Kron { a, b, c, d: dd, kk }, randn(a * b, seed + 7), randn(c * dd * kk, seed + 8), 2);
    }
    (shape, d, s)
}

fn upload(gpu: &Gpu, shape: &Shape, d: &Dynamic, s: &Static) -> (loralab::gpu::GpuBuffer, adapter::AdapterParams) {
    let layout = shape.layout().unwrap();
    let mut words = adapter::dynamic_words(shape, &layout, d).unwrap();
    words.extend(adapter::static_words(shape, &layout, s).unwrap());
    assert_eq!(words.len(), layout.total_words);
    (gpu.upload(bytemuck::cast_slice(&words), "adapter data").unwrap(), layout.params)
}

fn add_bias(bias: &[f32], d: &Dynamic) -> Vec<f32> {
    match &d.bias {
        Some(db) => bias.iter().zip(db).map(|(a, b)| a + b).collect(),
        None => bias.to_vec(),
    }
}

fn linear_case(gpu: &Gpu, dt: DType, rows: usize, k: usize, n: usize, parts: Parts, seed: u64) {
    let (shape, d, s) = build(n, k, 1, parts, seed);
    let x = randn(rows * k, seed + 30);
    let w0 = randn(n * k, seed + 31);
    let bias = randn(n, seed + 32);
    let t = randn(rows * parts.rank, seed + 33);
    let (data, params) = upload(gpu, &shape, &d, &s);
    let tx = Tensor::from_f32(gpu, &[rows, k], &x).unwrap();
    let tw = Tensor::from_f32_as(gpu, &[n, k], &w0, dt).unwrap();
    let tb = Tensor::from_f32(gpu, &[n], &bias).unwrap();
    let tt = (parts.rank > 0).then(|| Tensor::from_f32(gpu, &[rows, parts.rank], &t).unwrap());
    let ops = Operands { data: &data, params, lowrank: tt.as_ref() };
    let y = linear_adapted(gpu, &tx, &tw, Some(&tb), &ops).unwrap();
    let got = read(gpu, &y);

    let weff = reference::adapted_weight(&shape, &round_trip(&w0, n, k, dt), &d, &s);
    let mut want = mm_ref::linear(&x, &weff, Some(&add_bias(&bias, &d)), rows, k, n);
    if parts.rank > 0 {
        let up = reference::scaled_up(&shape, &d, &s);
        let low = mm_ref::linear(&t, &up, None, rows, parts.rank, n);
        want.iter_mut().zip(low).for_each(|(a, b)| *a += b);
    }
    assert_nmse(&format!("linear adapted {dt} rows {rows} k {k} n {n} rank {}", parts.rank), &got, &want, F32_BOUND);
}

#[allow(clippy::too_many_arguments)]
fn conv_case(gpu: &Gpu, dt: DType, b: usize, cin: usize, hw: usize, cout: usize, ks: usize, p: Conv2dParams, parts: Parts, seed: u64) {
    let kk = ks * ks;
    let k = cin * kk;
    let (shape, d, s) = build(cout, k, kk, parts, seed);
    let x = randn(b * cin * hw * hw, seed + 40);
    let w0 = randn(cout * k, seed + 41);
    let bias = randn(cout, seed + 42);
    let ho = (hw + 2 * p.padding - ks) / p.stride + 1;
    let t = randn(b * parts.rank * ho * ho, seed + 43);
    let (data, params) = upload(gpu, &shape, &d, &s);
    let tx = Tensor::from_f32(gpu, &[b, cin, hw, hw], &x).unwrap();
    let tw = Tensor::from_f32_as(gpu, &[cout, cin, ks, ks], &w0, dt).unwrap();
    let tb = Tensor::from_f32(gpu, &[cout], &bias).unwrap();
    let tt = (parts.rank > 0).then(|| Tensor::from_f32(gpu, &[b, parts.rank, ho, ho], &t).unwrap());
    let ops = Operands { data: &data, params, lowrank: tt.as_ref() };
    let y = conv2d_adapted(gpu, &tx, &tw, Some(&tb), p, &ops).unwrap();
    let got = read(gpu, &y);

    let weff = reference::adapted_weight(&shape, &round_trip(&w0, cout, k, dt), &d, &s);
    let mut want = conv_ref::conv2d(&x, [b, cin, hw, hw], &weff, [cout, ks, ks], Some(&add_bias(&bias, &d)), p);
    if parts.rank > 0 {
        let up = reference::scaled_up(&shape, &d, &s);
        let px = ho * ho;
        for bi in 0..b {
            for co in 0..cout {
                for q in 0..px {
                    let mut acc = 0f64;
                    for j in 0..parts.rank {
                        acc += up[co * parts.rank + j] as f64 * t[(bi * parts.rank + j) * px + q] as f64;
                    }
                    want[(bi * cout + co) * px + q] += acc as f32;
                }
            }
        }
    }
    assert_nmse(&format!("conv2d adapted {dt} {b}x{cin}x{hw}² -> {cout} k{ks} rank {}", parts.rank), &got, &want, F32_BOUND);
}

#[test]
fn linear_every_term_every_weight_type() {
    for gpu in gpus() {
        for dt in [DType::F32, DType::F16, DType::Q8_0, DType::Q4_0] {
            linear_case(gpu, dt, 37, 64, 48, ALL, 1);
        }
    }
}

#[test]
fn linear_ragged_shapes_and_single_parts() {
    let gpu = gpu();
    // K not a multiple of 4 or of the slice, R not a multiple of 4, N not a multiple of the tile.
    linear_case(gpu, DType::F32, 5, 30, 20, Parts { rank: 7, ..ALL }, 2);
    linear_case(gpu, DType::F16, 70, 40, 36, Parts { rank: 33, kron: Some((6, 0)), ..ALL }, 3);
    let none = Parts { rank: 0, dense_f32: false, dense_f16: false, kron: None, base_row: false, base_col: false, bias: false, vectors: false };
    linear_case(gpu, DType::F32, 9, 32, 16, Parts { rank: 4, ..none }, 4);
    linear_case(gpu, DType::F32, 9, 32, 16, Parts { dense_f16: true, ..none }, 5);
    linear_case(gpu, DType::Q4_0, 9, 64, 16, Parts { kron: Some((2, 0)), ..none }, 6);
    linear_case(gpu, DType::F32, 9, 32, 16, Parts { base_col: true, ..none }, 7);
    linear_case(gpu, DType::F32, 9, 32, 16, Parts { base_row: true, bias: true, ..none }, 8);
}

#[test]
fn conv_every_term_every_weight_type() {
    let same = Conv2dParams { stride: 1, padding: 1 };
    for gpu in gpus() {
        for dt in [DType::F32, DType::F16, DType::Q8_0, DType::Q4_0] {
            conv_case(gpu, dt, 2, 8, 9, 16, 3, same, ALL, 11);
        }
    }
    let gpu = gpu();
    conv_case(gpu, DType::F32, 1, 6, 10, 12, 3, Conv2dParams { stride: 2, padding: 1 }, Parts { rank: 5, kron: Some((3, 0)), ..ALL }, 12);
    conv_case(gpu, DType::F16, 2, 16, 6, 40, 1, Conv2dParams { stride: 1, padding: 0 }, Parts { rank: 9, kron: Some((5, 0)), ..ALL }, 13);
    conv_case(gpu, DType::F32, 1, 4, 5, 4, 3, same, Parts { rank: 3, kron: Some((2, 0)), ..ALL }, 14);
}
