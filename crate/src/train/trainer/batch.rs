//! What a training step trains on: the cached posteriors and prompt embeddings of a dataset,
//! the order images are drawn in, each sample's random numbers, the noisy latents and targets,
//! and the loss with its gradient.
//!
//! Samples form one endless stream per dataset (training images = stream 0, regularization
//! images = stream 1): sample `i` is position `i mod E` of epoch `i div E` (`E` = images ×
//! repeats), whose order is [`Dataset::epoch_order`]`(seed, epoch)`; its mirroring is
//! [`Dataset::augment`]`(image, seed, epoch).flip`. Every random number of sample `i` comes from
//! its own generator seeded by (seed, stream, i), drawn in this order: the posterior's
//! standard-normal draw, the timestep, the noise. So what a sample is depends only on the seed
//! and its index, not on how samples are grouped into micro-batches and steps, nor on where a
//! run was interrupted.

use crate::error::{shape_err, Error, Result};
use crate::gpu::Gpu;
use crate::model::vae::AutoencoderKL;
use crate::rng::Rng;
use crate::sampler::PredictionType;
use crate::tensor::Tensor;
use crate::train::data::{Augment, Dataset};

/// The stream of training images.
pub(super) const TRAIN_STREAM: u64 = 0;
/// The stream of regularization images.
pub(super) const REG_STREAM: u64 = 1;

/// SplitMix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator of sample `index` of `stream` in a run seeded with `seed`.
pub(super) fn sample_rng(seed: u64, stream: u64, index: u64) -> Rng {
    Rng::new(mix(mix(seed ^ mix(stream)) ^ index))
}

/// A diagonal Gaussian posterior on the host (`mean`, `std`, latent-sized).
struct Posterior {
    mean: Vec<f32>,
    std: Vec<f32>,
}

/// The noise schedule of training (diffusers' `DDPMScheduler.add_noise` / `get_velocity`).
#[derive(Clone, Debug)]
pub(super) struct NoiseSchedule {
    pub alphas_cumprod: Vec<f32>,
    pub prediction: PredictionType,
}

/// A dataset with its posteriors and prompt embeddings, cached once.
pub(super) struct Split {
    pub dataset: Dataset,
    /// Per image; the mirrored image's posterior beside it when flips are on.
    posteriors: Vec<(Posterior, Option<Posterior>)>,
    /// Per image: `[tokens, dim]` prompt embeddings of its caption.
    pub embeds: Vec<Vec<f32>>,
    stream: u64,
    order: Option<(u64, Vec<usize>)>,
}

/// One sample of a micro-batch.
pub(super) struct Sample {
    pub image: usize,
    pub timestep: usize,
    /// `[C, h, w]`.
    pub noisy: Vec<f32>,
    pub target: Vec<f32>,
    /// Loss weight (1, or the prior-preservation weight).
    pub weight: f32,
    pub stream: u64,
}

impl Split {
    /// Encodes every image (and its mirror image when the dataset flips) with `vae`, keeping
    /// the posteriors' moments on the host.
    pub async fn encode(gpu: &Gpu, vae: &AutoencoderKL, dataset: Dataset, embeds: Vec<Vec<f32>>, stream: u64) -> Result<Split> {
        let r = dataset.options.resolution as usize;
        let mut posteriors = Vec::with_capacity(dataset.len());
        for i in 0..dataset.len() {
            let a = dataset.augment(i, 0, 0);
            let one = |flip: bool| {
                let pixels = dataset.image(i, Augment { flip, ..a })?;
                let t = Tensor::from_f32(gpu, &[1, 3, r, r], &pixels)?;
                vae.encode(gpu, &t)
            };
            let plain = one(false)?.read(gpu).await?;
            let flipped = if dataset.options.flip { Some(one(true)?.read(gpu).await?) } else { None };
            posteriors.push((
                Posterior { mean: plain.mean, std: plain.std },
                flipped.map(|f| Posterior { mean: f.mean, std: f.std }),
            ));
        }
        if embeds.len() != dataset.len() {
            return Err(Error::Invalid(format!("{} prompt embeddings for {} images", embeds.len(), dataset.len())));
        }
        Ok(Split { dataset, posteriors, embeds, stream, order: None })
    }

    /// Latent values per image.
    pub fn latent_len(&self) -> usize {
        self.posteriors.first().map_or(0, |p| p.0.mean.len())
    }

    /// Sample `index` of this dataset's stream.
    pub fn draw(
        &mut self,
        index: u64,
        seed: u64,
        noise: &NoiseSchedule,
        scaling: (f32, f32),
        weight: f32,
    ) -> Result<Sample> {
        let per_epoch = self.dataset.num_train_images() as u64;
        if per_epoch == 0 {
            return Err(Error::Invalid("the dataset has no images to train on".into()));
        }
        let (epoch, pos) = (index / per_epoch, (index % per_epoch) as usize);
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.order = Some((epoch, self.dataset.epoch_order(seed, epoch)));
        }
        let image = self
            .order
            .as_ref()
            .and_then(|(_, o)| o.get(pos).copied())
            .ok_or_else(|| Error::Invalid(format!("sample {index}: no image at position {pos} of epoch {epoch}")))?;
        let flip = self.dataset.options.flip && self.dataset.augment(image, seed, epoch).flip;
        let (plain, mirrored) = self
            .posteriors
            .get(image)
            .ok_or_else(|| Error::Invalid(format!("image {image} has no cached latents")))?;
        let post = if flip { mirrored.as_ref().unwrap_or(plain) } else { plain };
        let n = post.mean.len();
        let mut rng = sample_rng(seed, self.stream, index);
        let eps_z = rng.normal_vec(n);
        let t_max = noise.alphas_cumprod.len();
        let timestep = rng.range(0, t_max - 1);
        let eps = rng.normal_vec(n);
        let (scale, shift) = scaling;
        let ac = noise.alphas_cumprod[timestep];
        let (sa, sb) = (ac.sqrt(), (1.0 - ac).sqrt());
        let mut noisy = Vec::with_capacity(n);
        let mut target = Vec::with_capacity(n);
        for i in 0..n {
            let z = (post.mean[i] + post.std[i] * eps_z[i] - shift) * scale;
            noisy.push(sa * z + sb * eps[i]);
            target.push(match noise.prediction {
                PredictionType::Epsilon => eps[i],
                PredictionType::VPrediction => sa * eps[i] - sb * z,
                PredictionType::Sample => z,
            });
        }
        Ok(Sample { image, timestep, noisy, target, weight, stream: self.stream })
    }
}

/// The loss of a micro-batch and its gradient at the prediction.
///
/// `loss = Σ_s w_s · mean((pred_s − target_s)²) / n_train` over the micro-batch's samples
/// (training samples weigh 1, regularization samples the prior weight; `n_train` = training
/// images per micro-batch): the mean over the training images plus `prior_weight` × the mean
/// over the regularization images, diffusers' DreamBooth prior-preservation loss. The gradient
/// is also divided by `accum` (the micro-batches of one step), so the accumulated gradient is
/// that of the mean loss over the step's samples.
pub(super) fn loss_and_grad(pred: &[f32], samples: &[Sample], n_train: usize, accum: usize) -> Result<(f64, Vec<f32>)> {
    let per = samples.first().map_or(0, |s| s.target.len());
    if per == 0 || pred.len() != per * samples.len() {
        return Err(shape_err("loss", format!("{} predicted values for {} samples of {per}", pred.len(), samples.len())));
    }
    let mut loss = 0.0f64;
    let mut grad = Vec::with_capacity(pred.len());
    for (p, s) in pred.chunks(per).zip(samples) {
        let w = s.weight as f64 / n_train as f64;
        let sq: f64 = p.iter().zip(&s.target).map(|(a, b)| ((*a - *b) as f64).powi(2)).sum();
        loss += w * sq / per as f64;
        let c = (2.0 * w / (per as f64 * accum as f64)) as f32;
        grad.extend(p.iter().zip(&s.target).map(|(a, b)| c * (a - b)));
    }
    Ok((loss, grad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_generators_differ_by_seed_stream_and_index() {
        let draw = |s, st, i| sample_rng(s, st, i).next_u64();
        let a = draw(1, 0, 0);
        assert_eq!(a, draw(1, 0, 0));
        assert_ne!(a, draw(2, 0, 0));
        assert_ne!(a, draw(1, 1, 0));
        assert_ne!(a, draw(1, 0, 1));
        assert_ne!(draw(0, 0, 1), draw(0, 1, 0));
    }

    #[test]
    fn loss_is_the_weighted_mean_and_its_gradient() {
        let s = |t: Vec<f32>, w| Sample { image: 0, timestep: 0, noisy: vec![], target: t, weight: w, stream: 0 };
        let samples = [s(vec![0.0, 0.0], 1.0), s(vec![1.0, 1.0], 0.5)];
        let pred = [1.0, 3.0, 1.0, 3.0];
        let (loss, grad) = loss_and_grad(&pred, &samples, 1, 2).unwrap();
        // (1 + 9)/2 + 0.5 · (0 + 4)/2 = 6
        assert!((loss - 6.0).abs() < 1e-12);
        // 2·(p − t)·w / (2 · 2)
        assert_eq!(grad, vec![0.5, 1.5, 0.0, 0.5]);
        assert!(loss_and_grad(&pred[..3], &samples, 1, 1).is_err());
    }
}
