use crate::common::*;
use loralab::ops::quantize::{quantize, reference};
use loralab::quant::{relative_rmse_bound, rmse, round_trip, BLOCK};
use loralab::{DType, Gpu, Tensor};

const TYPES: [DType; 3] = [DType::F16, DType::Q8_0, DType::Q4_0];

/// Raw packed words of a tensor: (data, scales).
fn words(gpu: &Gpu, t: &Tensor) -> (Vec<u32>, Vec<u32>) {
    let (rows, cols) = t.rows_cols();
    let get = |buf: &loralab::gpu::GpuBuffer, bytes: usize| -> Vec<u32> {
        let b = block(gpu.read(buf, bytes as u64)).unwrap();
        b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    };
    let data = get(t.buffer(), t.dtype().data_bytes(rows, cols).next_multiple_of(4));
    let scales = match t.scales() {
        Some(s) => get(s, t.dtype().scale_bytes(rows, cols)),
        None => vec![],
    };
    (data, scales)
}

/// Test data: normal values with some all-zero blocks, one block of tiny values (f16
/// subnormal scales) and, where `wide`, values beyond f16's range.
fn data(rows: usize, cols: usize, seed: u64, wide: bool) -> Vec<f32> {
    let mut x = randn(rows * cols, seed);
    if cols >= 2 * BLOCK {
        for v in &mut x[BLOCK..2 * BLOCK] {
            *v = 0.0;
        }
    }
    if rows > 1 {
        for v in &mut x[cols..cols + cols.min(BLOCK)] {
            *v *= 1e-6;
        }
    }
    if wide && x.len() > 4 {
        x[2] = 7.0e4;
        x[3] = -1.0e-7;
        x[4] = 65519.0; // rounds to f16 max
    }
    x
}

#[test]
fn packed_words_match_the_cpu_packing() {
    // Expected bit-exact: scales use round-to-nearest f16 conversion and a corrected division,
    // like the CPU. Tolerance on quants: a driver that fuses `x·id + 8.5` into one FMA may
    // move a value lying within an ULP of a rounding boundary by one step; at most 1 in 10^4
    // quants may differ, by one step. Lavapipe is checked to be exact (mismatches printed).
    let gpu = gpu();
    let shapes: [&[usize]; 8] = [&[1, 1], &[3, 64], &[5, 36], &[7, 100], &[2, 3, 5], &[33, 1000], &[1, 31], &[4, 3, 3, 3]];
    for (si, shape) in shapes.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let (rows, cols) = (shape[0], n / shape[0]);
        let x = data(rows, cols, 30 + si as u64, false);
        let tx = Tensor::from_f32(gpu, shape, &x).unwrap();
        for dt in TYPES {
            let t = quantize(gpu, &tx, dt).unwrap();
            assert_eq!((t.shape(), t.dtype()), (shape, dt));
            let (data, scales) = words(gpu, &t);
            let want = reference::quantize(&x, rows, cols, dt);
            assert_eq!(scales, want.scales, "{dt} {shape:?}: scales");
            let (per_word, bits) = match dt {
                DType::F16 => (2, 16),
                DType::Q8_0 => (4, 8),
                _ => (8, 4),
            };
            let mut diff = 0;
            for (i, (g, w)) in data.iter().zip(&want.data).enumerate() {
                for j in 0..per_word {
                    let f = |v: u32| ((v >> (bits * j)) & ((1u32 << bits) - 1)) as i32;
                    if f(*g) != f(*w) {
                        diff += 1;
                        assert!(dt != DType::F16, "f16 {shape:?}: word {i} {g:#x} != {w:#x}");
                        let step = if dt == DType::Q8_0 {
                            (f(*g) as u8 as i8 as i32 - f(*w) as u8 as i8 as i32).abs()
                        } else {
                            (f(*g) - f(*w)).abs()
                        };
                        assert_eq!(step, 1, "{dt} {shape:?}: word {i} {g:#x} != {w:#x}");
                    }
                }
            }
            if diff > 0 {
                eprintln!("{dt} {shape:?}: {diff} quants differ by one step");
            }
            assert!(diff * 10_000 <= data.len() * per_word, "{dt} {shape:?}: {diff} quants differ");
            assert_eq!(data.len(), want.data.len());
        }
    }
}

#[test]
fn f16_conversion_edge_values() {
    // Round to nearest even, subnormals, overflow to infinity, signed zero.
    let gpu = gpu_plain();
    let x = [0.0f32, -0.0, 1.0, 1.0 + 1.0 / 2048.0, 1.0 + 3.0 / 2048.0, 65504.0, 65520.0, 1e9, -1e9,
        5.96e-8, 2.9e-8, 3.0e-8, 1e-10, 6.1e-5, -3.3e-6, 0.1, -2.5];
    let tx = Tensor::from_f32(gpu, &[x.len()], &x).unwrap();
    let t = quantize(gpu, &tx, DType::F16).unwrap();
    let (data, _) = words(gpu, &t);
    assert_eq!(data, reference::quantize(&x, x.len(), 1, DType::F16).data);
}

#[test]
fn round_trip_error_is_within_the_storage_bound() {
    for gpu in gpus() {
        for (si, (rows, cols)) in [(16usize, 320usize), (9, 45), (1, 1000)].into_iter().enumerate() {
            let x = randn(rows * cols, 60 + si as u64);
            let rms = (x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64).sqrt();
            let tx = Tensor::from_f32(gpu, &[rows, cols], &x).unwrap();
            for dt in TYPES {
                let y = read(gpu, &quantize(gpu, &tx, dt).unwrap());
                let e = rmse(&y, &x) / rms;
                assert!(e <= relative_rmse_bound(dt), "{dt} {rows}x{cols}: relative rmse {e}");
                // Dequantized values equal the CPU round trip.
                assert_nmse(&format!("{dt} {rows}x{cols}"), &y, &round_trip(&x, rows, cols, dt), 0.0);
            }
        }
    }
}

#[test]
fn f32_is_returned_as_is_and_non_f32_is_an_error() {
    let gpu = gpu();
    let x = Tensor::from_f32(gpu, &[2, 2], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    assert_eq!(read(gpu, &quantize(gpu, &x, DType::F32).unwrap()), [1.0, 2.0, 3.0, 4.0]);
    let q = quantize(gpu, &x, DType::Q8_0).unwrap();
    let e = quantize(gpu, &q, DType::Q4_0).unwrap_err().to_string();
    assert!(e.contains("quantize") && e.contains("q8_0"), "{e}");
}
