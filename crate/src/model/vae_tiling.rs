//! Tiled VAE decoding, following diffusers' `AutoencoderKL.tiled_decode` / `blend_v` / `blend_h`
//! (`diffusers/models/autoencoders/autoencoder_kl.py`): the latents are cut into overlapping
//! square tiles, each tile goes through `post_quant_conv` and the decoder on its own (so the
//! activation peak is one tile's), and the decoded tiles are blended with linear ramps over the
//! overlap and cropped.
//!
//! Tile positions, blending and cropping are diffusers' exactly, with
//! `tile_sample_min_size = tile_latent · downscale`:
//! - `overlap_size = ⌊tile_latent · (1 − overlap)⌋` latent pixels between tile origins, rows
//!   and columns starting at `0, overlap_size, …` while inside the latents (edge tiles are
//!   smaller);
//! - `blend_extent = ⌊tile_sample · overlap⌋`, `row_limit = tile_sample − blend_extent`;
//! - in row-major order each decoded tile is blended in place with the (already blended) tile
//!   above, then with the one to its left: `b[y] = a[len_a − e + y]·(1 − y/e) + b[y]·(y/e)` for
//!   `y < e = min(len_a, len_b, blend_extent)`; then its top-left `row_limit × row_limit` is
//!   kept and the kept parts are concatenated.
//!
//! The blending runs on the host over read-back tiles (in f32 as PyTorch does; decoded images
//! are small next to the decoder's activations); the result is uploaded as one tensor.

use super::config::{SampleSize, VaeConfig};
use super::vae::AutoencoderKL;
use crate::error::{shape_err, Error, Result};
use crate::gpu::Caps;
use crate::gpu::Gpu;
use crate::ops::elementwise::{unary, Unary};
use crate::tensor::Tensor;

/// How [`AutoencoderKL::decode_tiled`] cuts the latents.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VaeTiling {
    /// Tile side in latent pixels (`tile_latent_min_size`); the decoded tile side is
    /// `tile_latent · downscale` (`tile_sample_min_size`).
    pub tile_latent: usize,
    /// `tile_overlap_factor` (diffusers: 0.25).
    pub overlap: f32,
}

impl VaeTiling {
    /// diffusers' defaults for a VAE config: `tile_sample_min_size = sample_size` (the height
    /// for `[h, w]`; 32 when absent, diffusers' default), `tile_latent_min_size =
    /// int(sample_size / 2^(levels − 1))`, overlap 0.25.
    pub fn diffusers_default(config: &VaeConfig) -> Self {
        let sample = match &config.sample_size {
            Some(SampleSize::Square(s)) => *s,
            Some(SampleSize::HeightWidth([h, _])) => *h,
            None => 32,
        };
        let tile_latent = (sample / (1 << (config.levels() - 1))).max(1);
        Self { tile_latent, overlap: 0.25 }
    }

    /// The tiling a decode on this adapter uses: [`Self::diffusers_default`] when one of its
    /// tiles fits `max_storage_buffer_binding_size`, else the largest smaller square tile that
    /// does. (For SD1.5 the default tile is a whole 512×512 image, so under a 128 MiB limit a
    /// 512×512 decode runs in 45×45-latent tiles instead of 64×64.)
    pub fn for_adapter(config: &VaeConfig, caps: &Caps) -> Self {
        let mut t = Self::diffusers_default(config);
        while t.tile_latent > 1 && needs_tiling(config, caps, t.tile_latent, t.tile_latent) {
            t.tile_latent -= 1;
        }
        t
    }
}

/// Bytes of the largest activation the decoder holds for latents `latent_h × latent_w` (batch
/// 1): over the levels, `channels × resolution² × 4` of every block input and output, including
/// the upsampled tensors, and the final image.
pub fn decoder_peak_tensor_bytes(config: &VaeConfig, latent_h: usize, latent_w: usize) -> u64 {
    let ch = &config.block_out_channels;
    let last = *ch.last().unwrap_or(&0) as u64;
    let mut px = (latent_h * latent_w) as u64;
    let mut peak = last * px;
    let mut cin = last;
    let levels = ch.len();
    for (i, &cout) in ch.iter().rev().enumerate() {
        let cout = cout as u64;
        peak = peak.max(cin.max(cout) * px);
        if i + 1 < levels {
            px *= 4;
            peak = peak.max(cout * px);
        }
        cin = cout;
    }
    peak = peak.max(config.out_channels as u64 * px);
    peak * 4
}

/// Whether a decode of `latent_h × latent_w` latents needs an activation larger than the
/// adapter's `max_storage_buffer_binding_size` (or `max_buffer_size`, if smaller: the limit
/// `Gpu::alloc` enforces). On lavapipe (128 MiB) the SD1.5 decoder allocates 45×45 latents
/// and refuses 46×46, as this predicts.
pub fn needs_tiling(config: &VaeConfig, caps: &Caps, latent_h: usize, latent_w: usize) -> bool {
    let limit = caps.max_storage_buffer_binding_size.min(caps.max_buffer_size);
    decoder_peak_tensor_bytes(config, latent_h, latent_w) > limit
}

/// A decoded tile on the host: `[b, c, h, w]` row-major.
struct HostTile {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    v: Vec<f32>,
}

impl HostTile {
    fn at(&self, bc: usize, y: usize, x: usize) -> usize {
        (bc * self.h + y) * self.w + x
    }
}

/// diffusers' `blend_v(a, b)`: ramps `b`'s top rows from `a`'s bottom rows, in place.
fn blend_v(a: &HostTile, b: &mut HostTile, extent: usize) {
    let e = extent.min(a.h).min(b.h);
    for y in 0..e {
        let (wa, wb) = ((1.0 - y as f64 / e as f64) as f32, (y as f64 / e as f64) as f32);
        for bc in 0..b.b * b.c {
            for x in 0..b.w.min(a.w) {
                let i = b.at(bc, y, x);
                b.v[i] = a.v[a.at(bc, a.h - e + y, x)] * wa + b.v[i] * wb;
            }
        }
    }
}

/// diffusers' `blend_h(a, b)`: ramps `b`'s left columns from `a`'s right columns, in place.
fn blend_h(a: &HostTile, b: &mut HostTile, extent: usize) {
    let e = extent.min(a.w).min(b.w);
    for x in 0..e {
        let (wa, wb) = ((1.0 - x as f64 / e as f64) as f32, (x as f64 / e as f64) as f32);
        for bc in 0..b.b * b.c {
            for y in 0..b.h.min(a.h) {
                let i = b.at(bc, y, x);
                b.v[i] = a.v[a.at(bc, y, a.w - e + x)] * wa + b.v[i] * wb;
            }
        }
    }
}

impl AutoencoderKL {
    /// [`needs_tiling`] for this VAE's config.
    pub fn needs_tiling(&self, caps: &Caps, latent_h: usize, latent_w: usize) -> bool {
        needs_tiling(self.config(), caps, latent_h, latent_w)
    }

    /// [`AutoencoderKL::decode`] by tiles: sampler latents `[B, latent_channels, h, w]`
    /// (scaled) to the image diffusers' `tiled_decode` gives for `latents / scaling_factor
    /// (+ shift_factor)`.
    pub async fn decode_tiled(&self, gpu: &Gpu, latents: &Tensor, tiling: VaeTiling) -> Result<Tensor> {
        let c = self.config();
        let z = unary(gpu, latents, Unary::Scale((1.0 / c.scaling_factor) as f32))?;
        let z = match c.shift_factor {
            Some(s) if s != 0.0 => unary(gpu, &z, Unary::AddScalar(s as f32))?,
            _ => z,
        };
        self.decode_unscaled_tiled(gpu, &z, tiling).await
    }

    /// diffusers' `vae.tiled_decode(z)`: `z` already divided by `scaling_factor`.
    pub async fn decode_unscaled_tiled(&self, gpu: &Gpu, z: &Tensor, tiling: VaeTiling) -> Result<Tensor> {
        let s = z.shape().to_vec();
        if s.len() != 4 || s[1] != self.config().latent_channels || s.contains(&0) {
            let m = format!("input {s:?} must be [B, {}, H, W] for this VAE", self.config().latent_channels);
            return Err(shape_err("vae decode_tiled", m));
        }
        if tiling.tile_latent == 0 || !(0.0..1.0).contains(&tiling.overlap) {
            return Err(Error::Invalid(format!("vae decode_tiled: bad tiling {tiling:?}")));
        }
        let (b, lc, h, w) = (s[0], s[1], s[2], s[3]);
        let tl = tiling.tile_latent;
        let ov = tiling.overlap as f64;
        let tile_sample = tl * self.downscale();
        let overlap_size = ((tl as f64 * (1.0 - ov)) as usize).max(1);
        let blend_extent = (tile_sample as f64 * ov) as usize;
        let row_limit = tile_sample - blend_extent;
        let zh = z.to_f32(gpu).await?;

        let mut prev_row: Vec<HostTile> = Vec::new();
        // Kept parts per tile row: (rows, [cols, tile]) pieces, concatenated at the end.
        let mut out_rows: Vec<(usize, Vec<(usize, Vec<f32>)>)> = Vec::new();
        for i in (0..h).step_by(overlap_size) {
            let mut row: Vec<HostTile> = Vec::new();
            for (jx, j) in (0..w).step_by(overlap_size).enumerate() {
                let (th, tw) = (tl.min(h - i), tl.min(w - j));
                let mut t = Vec::with_capacity(b * lc * th * tw);
                for bc in 0..b * lc {
                    for y in 0..th {
                        let o = (bc * h + i + y) * w + j;
                        t.extend_from_slice(&zh[o..o + tw]);
                    }
                }
                let tile = Tensor::from_f32(gpu, &[b, lc, th, tw], &t)?;
                let dec = self.decode_unscaled(gpu, &tile)?;
                let ds = dec.shape().to_vec();
                let mut cur = HostTile { b, c: ds[1], h: ds[2], w: ds[3], v: dec.to_f32(gpu).await? };
                drop(dec);
                if let Some(above) = prev_row.get(jx) {
                    blend_v(above, &mut cur, blend_extent);
                }
                if let Some(left) = row.last() {
                    blend_h(left, &mut cur, blend_extent);
                }
                row.push(cur);
            }
            let kh = row_limit.min(row[0].h);
            let pieces = row
                .iter()
                .map(|t| {
                    let kw = row_limit.min(t.w);
                    let mut v = Vec::with_capacity(t.b * t.c * kh * kw);
                    for bc in 0..t.b * t.c {
                        for y in 0..kh.min(t.h) {
                            let o = t.at(bc, y, 0);
                            v.extend_from_slice(&t.v[o..o + kw]);
                        }
                    }
                    (kw, v)
                })
                .collect();
            out_rows.push((kh, pieces));
            prev_row = row;
        }
        let oc = prev_row.first().map(|t| t.c).unwrap_or(self.config().out_channels);
        let oh: usize = out_rows.iter().map(|r| r.0).sum();
        let ow: usize = out_rows.first().map(|r| r.1.iter().map(|p| p.0).sum()).unwrap_or(0);
        let mut out = vec![0f32; b * oc * oh * ow];
        let mut y0 = 0;
        for (kh, pieces) in &out_rows {
            let mut x0 = 0;
            for (kw, v) in pieces {
                for bc in 0..b * oc {
                    for y in 0..*kh {
                        let src = (bc * kh + y) * kw;
                        let dst = (bc * oh + y0 + y) * ow + x0;
                        out[dst..dst + kw].copy_from_slice(&v[src..src + kw]);
                    }
                }
                x0 += kw;
            }
            y0 += kh;
        }
        Tensor::from_f32(gpu, &[b, oc, oh, ow], &out)
    }
}
