//! diffusers' `AutoencoderKL` (`diffusers/models/autoencoders/autoencoder_kl.py`, with `Encoder`,
//! `Decoder` and `DiagonalGaussianDistribution` from `autoencoders/vae.py`) on the engine's
//! kernels, sized by `vae/config.json` ([`VaeConfig`]). Blocks are in [`super::vae_blocks`].
//!
//! Latent conventions, as StableDiffusionPipeline uses them:
//! - [`AutoencoderKL::decode`] takes latents as a sampler produces them (*scaled*) and undoes the
//!   scaling first: `z = latents / scaling_factor (+ shift_factor)`; [`AutoencoderKL::decode_unscaled`]
//!   takes `z` directly (what diffusers' `vae.decode` takes). Both return the image in about
//!   [-1, 1], unclamped; [`to_image_01`] / [`to_rgb8`] are the pipeline's postprocessing.
//! - [`AutoencoderKL::encode`] returns the posterior's moments and mean, unscaled (`vae.encode(x)
//!   .latent_dist`); [`AutoencoderKL::scale_latents`] gives what a sampler starts from.
//!
//! The posterior's log-variance (clamped to [-30, 20]) and standard deviation are latent-sized
//! and computed on the host from the read-back moments ([`LatentDist::read`]).

use super::config::VaeConfig;
use super::vae_blocks::{BlockDims, MidBlock, ResampleBlock, VAE_NORM_EPS};
use super::weights::{WeightPolicy, WeightSource};
use crate::error::{shape_err, Result};
use crate::gpu::Gpu;
use crate::nn::{Conv2d, GroupNorm, POINTWISE, SAME3};
use crate::ops::elementwise::{unary, Unary};
use crate::tensor::Tensor;

/// Where the encoder and decoder find their parameters and how they are stored.
struct Loader<'a> {
    gpu: &'a Gpu,
    src: &'a dyn WeightSource,
    policy: WeightPolicy,
}

/// `Encoder` (double_z): conv_in, down blocks, mid block, group norm + SiLU, conv_out to
/// `2·latent_channels`.
pub struct Encoder {
    conv_in: Conv2d,
    down: Vec<ResampleBlock>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn load(l: &Loader, c: &VaeConfig) -> Result<Self> {
        let ch = &c.block_out_channels;
        let g = c.norm_num_groups;
        let last = *ch.last().unwrap_or(&0);
        let mut down = Vec::with_capacity(ch.len());
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let prefix = format!("encoder.down_blocks.{i}");
            let downsample = i + 1 < ch.len();
            let dims = BlockDims { layers: c.layers_per_block, cin, cout, groups: g };
            down.push(ResampleBlock::load_down(l.gpu, l.src, l.policy, &prefix, dims, downsample)?);
            cin = cout;
        }
        Ok(Self {
            conv_in: Conv2d::load(l.gpu, l.src, "encoder.conv_in", c.in_channels, ch[0], 3, SAME3, l.policy)?,
            down,
            mid: MidBlock::load(l.gpu, l.src, l.policy, "encoder.mid_block", last, g, c.mid_block_add_attention)?,
            norm_out: GroupNorm::load(l.gpu, l.src, "encoder.conv_norm_out", g, last, VAE_NORM_EPS, l.policy)?,
            conv_out: Conv2d::load(l.gpu, l.src, "encoder.conv_out", last, 2 * c.latent_channels, 3, SAME3, l.policy)?,
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(gpu, x)?;
        for b in &self.down {
            h = b.forward_owned(gpu, h)?;
        }
        let h = self.mid.forward_owned(gpu, h)?;
        let n = self.norm_out.forward(gpu, &h, true)?;
        drop(h);
        self.conv_out.forward(gpu, &n)
    }
}

/// `Decoder`: conv_in, mid block, up blocks (`layers_per_block + 1` resnets each), group norm +
/// SiLU, conv_out.
pub struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    up: Vec<ResampleBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(l: &Loader, c: &VaeConfig) -> Result<Self> {
        let ch = &c.block_out_channels;
        let g = c.norm_num_groups;
        let last = *ch.last().unwrap_or(&0);
        let mut up = Vec::with_capacity(ch.len());
        let mut cin = last;
        for (i, &cout) in ch.iter().rev().enumerate() {
            let prefix = format!("decoder.up_blocks.{i}");
            let upsample = i + 1 < ch.len();
            let dims = BlockDims { layers: c.layers_per_block + 1, cin, cout, groups: g };
            up.push(ResampleBlock::load_up(l.gpu, l.src, l.policy, &prefix, dims, upsample)?);
            cin = cout;
        }
        Ok(Self {
            conv_in: Conv2d::load(l.gpu, l.src, "decoder.conv_in", c.latent_channels, last, 3, SAME3, l.policy)?,
            mid: MidBlock::load(l.gpu, l.src, l.policy, "decoder.mid_block", last, g, c.mid_block_add_attention)?,
            up,
            norm_out: GroupNorm::load(l.gpu, l.src, "decoder.conv_norm_out", g, ch[0], VAE_NORM_EPS, l.policy)?,
            conv_out: Conv2d::load(l.gpu, l.src, "decoder.conv_out", ch[0], c.out_channels, 3, SAME3, l.policy)?,
        })
    }

    /// Every activation is released as soon as it is dead (blocks take their input by value),
    /// so the peak is the largest resnet's input + normalised input + output.
    pub fn forward(&self, gpu: &Gpu, z: &Tensor) -> Result<Tensor> {
        let h = self.conv_in.forward(gpu, z)?;
        let mut h = self.mid.forward_owned(gpu, h)?;
        for b in &self.up {
            h = b.forward_owned(gpu, h)?;
        }
        let n = self.norm_out.forward(gpu, &h, true)?;
        drop(h);
        self.conv_out.forward(gpu, &n)
    }
}

/// Which halves of the autoencoder to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VaeParts {
    /// Encoder and decoder (img2img, training).
    Both,
    /// Decoder only (text-to-image needs nothing else).
    DecoderOnly,
}

/// The output of [`AutoencoderKL::encode`]: the posterior `DiagonalGaussianDistribution` on the
/// GPU, unscaled.
pub struct LatentDist {
    /// `quant_conv` output `[B, 2·latent_channels, h, w]`: mean, then log-variance (unclamped).
    pub moments: Tensor,
    /// `[B, latent_channels, h, w]`.
    pub mean: Tensor,
}

/// The posterior on the host: `mean`, `logvar` clamped to [-30, 20], `std = exp(logvar / 2)`,
/// each `[B, latent_channels, h, w]` row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct DiagonalGaussian {
    pub shape: [usize; 4],
    pub mean: Vec<f32>,
    pub logvar: Vec<f32>,
    pub std: Vec<f32>,
}

impl DiagonalGaussian {
    /// Splits moments `[B, 2L, h, w]` as `torch.chunk(moments, 2, dim=1)` does.
    pub fn from_moments(moments: &[f32], [b, c2, h, w]: [usize; 4]) -> Result<Self> {
        if !c2.is_multiple_of(2) || moments.len() != b * c2 * h * w {
            return Err(shape_err(
                "DiagonalGaussian",
                format!("{} moments for shape [{b}, {c2}, {h}, {w}] (needs an even channel count)", moments.len()),
            ));
        }
        let plane = (c2 / 2) * h * w;
        let (mut mean, mut logvar) = (Vec::with_capacity(b * plane), Vec::with_capacity(b * plane));
        for m in moments.chunks(2 * plane) {
            mean.extend_from_slice(&m[..plane]);
            logvar.extend(m[plane..].iter().map(|v| v.clamp(-30.0, 20.0)));
        }
        let std = logvar.iter().map(|&v| (0.5 * v as f64).exp() as f32).collect();
        Ok(Self { shape: [b, c2 / 2, h, w], mean, logvar, std })
    }

    /// `mean + std · noise` (`latent_dist.sample()` with the given N(0, 1) draws).
    pub fn sample(&self, noise: &[f32]) -> Result<Vec<f32>> {
        if noise.len() != self.mean.len() {
            let m = format!("{} noise values for shape {:?}", noise.len(), self.shape);
            return Err(shape_err("DiagonalGaussian::sample", m));
        }
        Ok(self.mean.iter().zip(&self.std).zip(noise).map(|((m, s), n)| m + s * n).collect())
    }
}

impl LatentDist {
    /// Reads the moments back and forms mean / clamped log-variance / std on the host.
    pub async fn read(&self, gpu: &Gpu) -> Result<DiagonalGaussian> {
        let s = self.moments.shape();
        DiagonalGaussian::from_moments(&self.moments.to_f32(gpu).await?, [s[0], s[1], s[2], s[3]])
    }
}

/// diffusers' `AutoencoderKL`.
pub struct AutoencoderKL {
    config: VaeConfig,
    encoder: Option<Encoder>,
    quant_conv: Option<Conv2d>,
    decoder: Decoder,
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    /// Loads the parts asked for from `src` (diffusers names: `encoder.*`, `decoder.*`,
    /// `quant_conv.*`, `post_quant_conv.*`), storing conv and linear matrices as
    /// `policy.matrix()`. The config is validated first; a parameter missing from `src` or
    /// shaped differently from what the config implies is an error naming it.
    pub fn load(
        gpu: &Gpu,
        config: &VaeConfig,
        src: &dyn WeightSource,
        policy: WeightPolicy,
        parts: VaeParts,
    ) -> Result<Self> {
        config.validate("vae/config.json")?;
        let l = Loader { gpu, src, policy };
        let lc = config.latent_channels;
        let (encoder, quant_conv) = match parts {
            VaeParts::Both => (
                Some(Encoder::load(&l, config)?),
                if config.use_quant_conv {
                    Some(Conv2d::load(gpu, src, "quant_conv", 2 * lc, 2 * lc, 1, POINTWISE, policy)?)
                } else {
                    None
                },
            ),
            VaeParts::DecoderOnly => (None, None),
        };
        Ok(Self {
            config: config.clone(),
            encoder,
            quant_conv,
            decoder: Decoder::load(&l, config)?,
            post_quant_conv: if config.use_post_quant_conv {
                Some(Conv2d::load(gpu, src, "post_quant_conv", lc, lc, 1, POINTWISE, policy)?)
            } else {
                None
            },
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Spatial factor between image and latents (8 for SD).
    pub fn downscale(&self) -> usize {
        1 << (self.config.levels() - 1)
    }

    fn check_nchw(&self, what: &'static str, x: &Tensor, channels: usize) -> Result<()> {
        let s = x.shape();
        if s.len() != 4 || s[1] != channels || s.contains(&0) {
            return Err(shape_err(what, format!("input {s:?} must be [B, {channels}, H, W] for this VAE")));
        }
        Ok(())
    }

    /// Decodes sampler latents `[B, latent_channels, h, w]` (scaled by `scaling_factor`, as
    /// the denoising loop produces them) to an image `[B, out_channels, 8h, 8w]` in about
    /// [-1, 1]: `decode_unscaled(latents / scaling_factor + shift_factor)`.
    pub fn decode(&self, gpu: &Gpu, latents: &Tensor) -> Result<Tensor> {
        self.check_nchw("vae decode", latents, self.config.latent_channels)?;
        let z = unary(gpu, latents, Unary::Scale((1.0 / self.config.scaling_factor) as f32))?;
        let z = match self.config.shift_factor {
            Some(s) if s != 0.0 => unary(gpu, &z, Unary::AddScalar(s as f32))?,
            _ => z,
        };
        self.decode_unscaled_owned(gpu, z)
    }

    /// diffusers' `vae.decode(z)`: `z` already divided by `scaling_factor`.
    pub fn decode_unscaled(&self, gpu: &Gpu, z: &Tensor) -> Result<Tensor> {
        self.decode_unscaled_owned(gpu, z.clone())
    }

    fn decode_unscaled_owned(&self, gpu: &Gpu, z: Tensor) -> Result<Tensor> {
        self.check_nchw("vae decode", &z, self.config.latent_channels)?;
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(gpu, &z)?,
            None => z,
        };
        self.decoder.forward(gpu, &z)
    }

    /// diffusers' `vae.encode(image).latent_dist` for an image `[B, in_channels, H, W]` in
    /// [-1, 1]: moments and mean (unscaled; see [`Self::scale_latents`]).
    pub fn encode(&self, gpu: &Gpu, image: &Tensor) -> Result<LatentDist> {
        let enc = self.encoder.as_ref().ok_or_else(|| {
            crate::error::Error::Invalid("vae encode: this AutoencoderKL was loaded without its encoder".into())
        })?;
        self.check_nchw("vae encode", image, self.config.in_channels)?;
        let h = enc.forward(gpu, image)?;
        let moments = match &self.quant_conv {
            Some(c) => c.forward(gpu, &h)?,
            None => h,
        };
        let s = moments.shape().to_vec();
        let (b, lc, plane) = (s[0], s[1] / 2, s[2] * s[3]);
        let mean = Tensor::empty(gpu, &[b, lc, s[2], s[3]])?;
        let bytes = (lc * plane * 4) as u64;
        for bi in 0..b {
            gpu.copy(moments.buffer(), 2 * bi as u64 * bytes, mean.buffer(), bi as u64 * bytes, bytes);
        }
        Ok(LatentDist { moments, mean })
    }

    /// What a sampler starts from for encoded latents `z`: `(z - shift_factor) · scaling_factor`.
    pub fn scale_latents(&self, gpu: &Gpu, z: &Tensor) -> Result<Tensor> {
        let z = match self.config.shift_factor {
            Some(s) if s != 0.0 => unary(gpu, z, Unary::AddScalar(-s as f32))?,
            _ => z.clone(),
        };
        unary(gpu, &z, Unary::Scale(self.config.scaling_factor as f32))
    }
}

/// diffusers' postprocessing to [0, 1]: `clamp(x / 2 + 0.5, 0, 1)` elementwise on a read-back
/// decoder output.
pub fn to_image_01(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| (v / 2.0 + 0.5).clamp(0.0, 1.0)).collect()
}

/// `output_type="pil"` pixels: [`to_image_01`], then `255·v` rounded half to even (numpy's
/// `round`), as `[B, H, W, C]` bytes from a decoder output `[B, C, H, W]`.
pub fn to_rgb8(x: &[f32], [b, c, h, w]: [usize; 4]) -> Result<Vec<u8>> {
    if x.len() != b * c * h * w {
        return Err(shape_err("to_rgb8", format!("{} values for shape [{b}, {c}, {h}, {w}]", x.len())));
    }
    let v = to_image_01(x);
    let mut out = vec![0u8; v.len()];
    for bi in 0..b {
        for ci in 0..c {
            for p in 0..h * w {
                out[(bi * h * w + p) * c + ci] = (v[(bi * c + ci) * h * w + p] * 255.0).round_ties_even() as u8;
            }
        }
    }
    Ok(out)
}
