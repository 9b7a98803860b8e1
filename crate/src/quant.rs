//! Weight storage formats and their host-side (CPU reference) packing.
//!
//! - `F16`: two values per u32 word, element `2i` in the low half (as `unpack2x16float`).
//! - `Q8_0` / `Q4_0`: ggml's block semantics: blocks of 32 consecutive values along a row
//!   share one f16 scale `d`; q8_0 stores `round(x/d)` with `d = max|x|/127`; q4_0 stores
//!   `q` in 0..15 with value `(q-8)·d`, `d = -m/8` where `m` is the value of largest magnitude.
//!   The layout is repacked for the shaders: quants and scales live in two buffers of whole u32
//!   words. Quants are row-major over rows padded to a multiple of 32 values (padding is 0);
//!   q8_0 holds 4 values per word (element `4i+j` in byte `j`, signed), q4_0 8 per word
//!   (element `8i+j` in bits `4j..4j+4`). Scales are f16, two per word, one per block, blocks
//!   numbered row-major.

use half::f16;

pub const BLOCK: usize = 32;

/// Storage type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum DType {
    F32,
    F16,
    Q8_0,
    Q4_0,
}

impl DType {
    pub const ALL: [DType; 4] = [DType::F32, DType::F16, DType::Q8_0, DType::Q4_0];

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name().eq_ignore_ascii_case(s))
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q8_0 | DType::Q4_0)
    }

    /// Bytes of the main buffer for a `rows × cols` matrix.
    pub fn data_bytes(self, rows: usize, cols: usize) -> usize {
        match self {
            DType::F32 => rows * cols * 4,
            DType::F16 => (rows * cols).div_ceil(2) * 4,
            DType::Q8_0 => rows * padded_cols(cols),
            DType::Q4_0 => rows * padded_cols(cols) / 2,
        }
    }

    /// Bytes of the scale buffer (quantized types only).
    pub fn scale_bytes(self, rows: usize, cols: usize) -> usize {
        if self.is_quantized() {
            (rows * padded_cols(cols) / BLOCK).div_ceil(2) * 4
        } else {
            0
        }
    }

    /// Average bits per stored value (scales included), for size reports.
    pub fn bits_per_value(self) -> f64 {
        match self {
            DType::F32 => 32.0,
            DType::F16 => 16.0,
            DType::Q8_0 => 8.5,
            DType::Q4_0 => 4.5,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Row length rounded up to whole blocks.
pub fn padded_cols(cols: usize) -> usize {
    cols.div_ceil(BLOCK) * BLOCK
}

/// Packed words of a tensor: (data, scales).
pub struct Packed {
    pub data: Vec<u32>,
    pub scales: Vec<u32>,
}

fn pack_f16_words(vals: impl ExactSizeIterator<Item = f16>) -> Vec<u32> {
    let mut out = vec![0u32; vals.len().div_ceil(2)];
    for (i, v) in vals.enumerate() {
        out[i / 2] |= (v.to_bits() as u32) << (16 * (i % 2));
    }
    out
}

fn unpack_f16_word(words: &[u32], i: usize) -> f32 {
    f16::from_bits((words[i / 2] >> (16 * (i % 2))) as u16).to_f32()
}

/// One q8_0 block: (scale, quants).
pub fn quantize_block_q8_0(x: &[f32; BLOCK]) -> (f16, [i8; BLOCK]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; BLOCK];
    for (qi, v) in q.iter_mut().zip(x) {
        *qi = (v * id).round() as i8;
    }
    (f16::from_f32(d), q)
}

/// One q4_0 block: (scale, quants in 0..=15).
pub fn quantize_block_q4_0(x: &[f32; BLOCK]) -> (f16, [u8; BLOCK]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0u8; BLOCK];
    for (qi, v) in q.iter_mut().zip(x) {
        // Truncation toward zero as ggml's `(int8_t)(x + 8.5f)`; the argument is >= 0.5.
        *qi = ((v * id + 8.5) as i8).clamp(0, 15) as u8;
    }
    (f16::from_f32(d), q)
}

/// Packs a row-major `rows × cols` f32 matrix into `dtype`'s layout.
pub fn pack(values: &[f32], rows: usize, cols: usize, dtype: DType) -> Packed {
    assert_eq!(values.len(), rows * cols, "pack: length must be rows*cols");
    match dtype {
        DType::F32 => Packed { data: values.iter().map(|v| v.to_bits()).collect(), scales: vec![] },
        DType::F16 => Packed {
            data: pack_f16_words(values.iter().map(|v| f16::from_f32(*v))),
            scales: vec![],
        },
        DType::Q8_0 | DType::Q4_0 => {
            let kp = padded_cols(cols);
            let per_word = if dtype == DType::Q8_0 { 4 } else { 8 };
            let mut data = vec![0u32; rows * kp / per_word];
            let mut scales = Vec::with_capacity(rows * kp / BLOCK);
            for r in 0..rows {
                for b in 0..kp / BLOCK {
                    let mut blk = [0f32; BLOCK];
                    for (j, slot) in blk.iter_mut().enumerate() {
                        let c = b * BLOCK + j;
                        if c < cols {
                            *slot = values[r * cols + c];
                        }
                    }
                    let base = r * kp + b * BLOCK;
                    if dtype == DType::Q8_0 {
                        let (d, q) = quantize_block_q8_0(&blk);
                        scales.push(d);
                        for (j, qv) in q.iter().enumerate() {
                            let e = base + j;
                            data[e / 4] |= (*qv as u8 as u32) << (8 * (e % 4));
                        }
                    } else {
                        let (d, q) = quantize_block_q4_0(&blk);
                        scales.push(d);
                        for (j, qv) in q.iter().enumerate() {
                            let e = base + j;
                            data[e / 8] |= (*qv as u32) << (4 * (e % 8));
                        }
                    }
                }
            }
            Packed { data, scales: pack_f16_words(scales.into_iter()) }
        }
    }
}

/// Unpacks `dtype`'s layout back to a row-major f32 matrix (the dequantization reference).
pub fn unpack(p: &Packed, rows: usize, cols: usize, dtype: DType) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * cols);
    let kp = padded_cols(cols);
    for r in 0..rows {
        for c in 0..cols {
            let v = match dtype {
                DType::F32 => f32::from_bits(p.data[r * cols + c]),
                DType::F16 => unpack_f16_word(&p.data, r * cols + c),
                DType::Q8_0 => {
                    let e = r * kp + c;
                    let q = (p.data[e / 4] >> (8 * (e % 4))) as u8 as i8;
                    q as f32 * unpack_f16_word(&p.scales, e / BLOCK)
                }
                DType::Q4_0 => {
                    let e = r * kp + c;
                    let q = (p.data[e / 8] >> (4 * (e % 8))) & 15;
                    (q as f32 - 8.0) * unpack_f16_word(&p.scales, e / BLOCK)
                }
            };
            out.push(v);
        }
    }
    out
}

/// Round-trips values through `dtype` on the CPU.
pub fn round_trip(values: &[f32], rows: usize, cols: usize, dtype: DType) -> Vec<f32> {
    unpack(&pack(values, rows, cols, dtype), rows, cols, dtype)
}

/// Root-mean-square error between two equally long slices.
pub fn rmse(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    if a.is_empty() {
        return 0.0;
    }
    let s: f64 = a.iter().zip(b).map(|(x, y)| ((*x as f64) - (*y as f64)).powi(2)).sum();
    (s / a.len() as f64).sqrt()
}

/// Normalised mean squared error, `Σ(a-b)² / Σb²` (ggml's test-backend-ops metric).
pub fn nmse(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += ((*g as f64) - (*w as f64)).powi(2);
        den += (*w as f64).powi(2);
    }
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// Error bounds of the storage types, stated once and reused by tests: the largest RMSE of a
/// round trip relative to the RMS of normally distributed data.
pub fn relative_rmse_bound(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 0.0,
        DType::F16 => 6e-4,
        DType::Q8_0 => 1e-2,
        DType::Q4_0 => 0.2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(n: usize, seed: u64) -> Vec<f32> {
        crate::rng::Rng::new(seed).normal_vec(n)
    }

    #[test]
    fn round_trip_errors_are_within_bounds() {
        for (rows, cols) in [(3, 64), (5, 36), (1, 1), (7, 100)] {
            let x = normal(rows * cols, 7);
            let rms = (x.iter().map(|v| (v * v) as f64).sum::<f64>() / x.len() as f64).sqrt();
            for dt in DType::ALL {
                let y = round_trip(&x, rows, cols, dt);
                let e = rmse(&x, &y) / rms;
                assert!(e <= relative_rmse_bound(dt), "{dt} {rows}x{cols}: rel rmse {e}");
            }
        }
    }

    #[test]
    fn q4_0_matches_ggml_on_a_known_block() {
        let mut x = [0f32; BLOCK];
        for (i, v) in x.iter_mut().enumerate() {
            *v = i as f32 - 10.0; // largest magnitude is 21 (positive)
        }
        let (d, q) = quantize_block_q4_0(&x);
        assert_eq!(d.to_f32(), f16::from_f32(21.0 / -8.0).to_f32());
        // x = 21 -> x/d = -8 -> q = 0; x = -10 -> 3.81 -> 12.31 -> 12
        assert_eq!(q[31], 0);
        assert_eq!(q[0], 12);
    }

    #[test]
    fn q8_0_zero_block_is_zero() {
        let (d, q) = quantize_block_q8_0(&[0.0; BLOCK]);
        assert_eq!(d.to_f32(), 0.0);
        assert!(q.iter().all(|v| *v == 0));
    }
}
