//! A [`WeightSource`] that synthesises every parameter it is asked for, for benchmarks and
//! memory measurements of full-size models without a weights file.
//!
//! Values are cheap, seeded and reproducible: each parameter has its own xorshift64* stream
//! seeded from the source's seed and a hash (FNV-1a) of the parameter's name, so the same
//! name gets the same values whatever order modules load in. Values are uniform (not normal:
//! a uniform needs no transcendental functions, and a benchmark only needs the right sizes and
//! sane magnitudes) with these standard deviations:
//!
//! - matrices of linear and convolution layers (rank ≥ 2): `1/√fan_in`, `fan_in` being the
//!   product of the dimensions after the first, so activations keep their scale layer to layer;
//! - norm scales (1-D `….weight` of a parameter whose name contains `norm`): `1 ± 0.02`;
//! - biases and everything else (embedding tables included): 0.02.
//!
//! The values are generated directly in the requested storage type (f32 and f16 bits; for q8_0
//! and q4_0 uniform random quants under one per-tensor block scale, padding quants zero), so no
//! f32 copy of a quantized tensor is made. About 1 ns per value on one core: SD1.5's 860 M UNet
//! parameters take a second or two.

use crate::error::Result;
use crate::gpu::Gpu;
use crate::model::weights::WeightSource;
use crate::quant::{padded_cols, DType, Packed, BLOCK};
use crate::tensor::Tensor;
use half::f16;
use std::collections::HashSet;
use std::sync::Mutex;

/// Synthesised parameters for any name and shape (see the module docs).
pub struct RandomWeights {
    seed: u64,
    what: String,
    loaded: Mutex<Loaded>,
}

#[derive(Default)]
struct Loaded {
    names: HashSet<String>,
    values: u64,
    bytes: u64,
}

/// xorshift64* (Vigna): 64 bits of state, one multiply per output.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // SplitMix64 finaliser so nearby seeds give unrelated streams; never zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        XorShift((z ^ (z >> 31)) | 1)
    }
    #[inline]
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3))
}

/// Uniform in `[-1, 1)` from 32 random bits.
#[inline]
fn unit(bits: u32) -> f32 {
    (bits >> 8) as f32 * (2.0 / (1u32 << 24) as f32) - 1.0
}

impl RandomWeights {
    /// A source whose parameters are drawn from `seed`; `what` names it in messages.
    pub fn new(seed: u64, what: impl Into<String>) -> Self {
        Self { seed, what: what.into(), loaded: Mutex::new(Loaded::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parameters loaded so far and their values.
    pub fn loaded_values(&self) -> u64 {
        self.lock().values
    }

    /// GPU bytes of the parameters loaded so far (data and scales).
    pub fn loaded_bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// `(centre, half-width)` of the uniform distribution of parameter `name`.
    fn distribution(name: &str, shape: &[usize]) -> (f32, f32) {
        let sqrt3 = 3f32.sqrt();
        if shape.len() >= 2 && !name.contains("embedding") {
            let fan_in: usize = shape[1..].iter().product();
            (0.0, sqrt3 / (fan_in.max(1) as f32).sqrt())
        } else if name.ends_with(".weight") && name.contains("norm") {
            (1.0, 0.02 * sqrt3)
        } else {
            (0.0, 0.02 * sqrt3)
        }
    }

    /// Packed words of a `rows × cols` matrix of uniform values in `centre ± half` as `dtype`.
    pub fn generate(seed: u64, rows: usize, cols: usize, dtype: DType, centre: f32, half: f32) -> Packed {
        let mut rng = XorShift::new(seed);
        let n = rows * cols;
        match dtype {
            DType::F32 => {
                let mut data = Vec::with_capacity(n);
                while data.len() < n {
                    let r = rng.next();
                    data.push((centre + half * unit(r as u32)).to_bits());
                    if data.len() < n {
                        data.push((centre + half * unit((r >> 32) as u32)).to_bits());
                    }
                }
                Packed { data, scales: vec![] }
            }
            DType::F16 => {
                let h = |bits: u32| f16::from_f32(centre + half * unit(bits)).to_bits() as u32;
                let mut data: Vec<u32> = (0..n / 2)
                    .map(|_| {
                        let r = rng.next();
                        h(r as u32) | (h((r >> 32) as u32) << 16)
                    })
                    .collect();
                if n % 2 == 1 {
                    data.push(h(rng.next() as u32));
                }
                Packed { data, scales: vec![] }
            }
            DType::Q8_0 | DType::Q4_0 => {
                // Quantized storage holds no offset: a centred distribution is assumed (norm
                // scales are never quantized).
                let q8 = dtype == DType::Q8_0;
                let kp = padded_cols(cols);
                let words = dtype.data_bytes(rows, cols).div_ceil(4);
                let mut data: Vec<u32> = Vec::with_capacity(words);
                while data.len() < words {
                    let r = rng.next();
                    data.push(r as u32);
                    if data.len() < words {
                        data.push((r >> 32) as u32);
                    }
                }
                // q8_0: quants -128..=127 times d; q4_0: (q - 8) times d with q in 0..=15.
                let d = f16::from_f32(if q8 { half / 127.5 } else { half / 8.0 }).to_bits() as u32;
                let blocks = rows * kp / BLOCK;
                let scales = vec![d | (d << 16); blocks.div_ceil(2)];
                if kp != cols {
                    // Padding quants must stand for zero (byte 0 for q8_0, nibble 8 for q4_0).
                    for r in 0..rows {
                        for e in r * kp + cols..(r + 1) * kp {
                            if q8 {
                                data[e / 4] &= !(0xFF << (8 * (e % 4)));
                            } else {
                                let s = 4 * (e % 8);
                                data[e / 8] = (data[e / 8] & !(0xF << s)) | (8 << s);
                            }
                        }
                    }
                }
                Packed { data, scales }
            }
        }
    }
}

impl WeightSource for RandomWeights {
    fn load(&self, gpu: &Gpu, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let (rows, cols) = match shape.split_first() {
            Some((r, rest)) => (*r, rest.iter().product()),
            None => (1, 1),
        };
        let (centre, half) = Self::distribution(name, shape);
        let packed = Self::generate(self.seed ^ fnv1a(name), rows, cols, dtype, centre, half);
        let t = Tensor::from_packed(gpu, shape, dtype, &packed)?;
        let mut l = self.lock();
        l.names.insert(name.to_string());
        l.values += (rows * cols) as u64;
        l.bytes += t.bytes();
        Ok(t)
    }

    /// Only names already loaded: the source has whatever a module asks for, and nothing a
    /// module merely probes for (such as layers of another configuration).
    fn contains(&self, name: &str) -> bool {
        self.lock().names.contains(name)
    }

    fn describe(&self) -> String {
        format!("random weights ({}, seed {})", self.what, self.seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::unpack;

    #[test]
    fn every_storage_type_has_the_requested_spread() {
        let (rows, cols) = (7, 45); // padded rows for the quantized types
        for dt in DType::ALL {
            let p = RandomWeights::generate(3, rows, cols, dt, 0.0, 0.5);
            let v = unpack(&p, rows, cols, dt);
            let mean = v.iter().sum::<f32>() / v.len() as f32;
            let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
            assert!(mean.abs() < 0.05 && max <= 0.51 && (var.sqrt() - 0.5 / 3f32.sqrt()).abs() < 0.04, "{dt}: {mean} {max} {var}");
            if dt.is_quantized() {
                let kp = padded_cols(cols);
                let padded = unpack(&p, rows, kp, dt);
                assert!((0..rows).all(|r| padded[r * kp + cols..(r + 1) * kp].iter().all(|&x| x == 0.0)), "{dt}");
            }
        }
        let g = RandomWeights::generate(4, 1, 1000, DType::F32, 1.0, 0.02);
        assert!(unpack(&g, 1, 1000, DType::F32).iter().all(|x| (x - 1.0).abs() <= 0.02));
    }
}
