//! Euler and Euler ancestral samplers on the Karras et al. σ parametrisation, following
//! diffusers/schedulers/scheduling_euler_discrete.py (s_churn = 0) and
//! scheduling_euler_ancestral_discrete.py: σ(t) interpolated linearly at the (possibly
//! fractional) inference timesteps, optionally replaced by Karras sigmas, then a final σ.

use super::schedule::{
    interp_index, karras_sigmas, log_sigmas, np_arange, np_linspace, round_half_even, sigma_to_t, train_sigmas,
};
use super::{to_f32, FinalSigmas, Params, PredictionType, StepOutput, TimestepSpacing};

/// (timesteps, sigmas with the final σ appended).
pub(super) fn timesteps(p: &Params, alphas_cumprod: &[f32], n: usize) -> (Vec<f32>, Vec<f32>) {
    let big = p.num_train_timesteps;
    // numpy float32 timesteps.
    let ts: Vec<f32> = match p.timestep_spacing {
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (big - 1) as f64, n, true).into_iter().rev().map(|t| t as f32).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = big / n;
            (0..n).rev().map(|i| (i * ratio) as f32 + p.steps_offset as f32).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = big as f64 / n as f64;
            np_arange(big as f64, 0.0, -ratio).into_iter().map(|t| round_half_even(t) as f32 - 1.0).collect()
        }
    };
    let train = train_sigmas(alphas_cumprod);
    let mut sigmas: Vec<f64> = ts.iter().map(|&t| interp_index(t as f64, &train)).collect();
    let mut ts = ts;
    if p.use_karras_sigmas {
        let sigma_min = p.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
        let sigma_max = p.sigma_max.unwrap_or(sigmas[0]);
        sigmas = karras_sigmas(sigma_min, sigma_max, n);
        let logs = log_sigmas(&train);
        ts = sigmas.iter().map(|&s| sigma_to_t(s, &logs) as f32).collect();
    }
    sigmas.push(final_sigma(p.final_sigmas_type, alphas_cumprod));
    (ts, sigmas.into_iter().map(|s| s as f32).collect())
}

/// The σ after the last step: 0, or σ at training timestep 0 (f32 like diffusers).
pub(super) fn final_sigma(kind: FinalSigmas, alphas_cumprod: &[f32]) -> f64 {
    match kind {
        FinalSigmas::Zero => 0.0,
        FinalSigmas::SigmaMin => ((1.0 - alphas_cumprod[0]) / alphas_cumprod[0]).sqrt() as f64,
    }
}

/// x̂₀ from the model output at σ (f32 coefficients, f64 per element).
fn predict_x0(prediction: PredictionType, sigma: f32, model_output: &[f32], sample: &[f32]) -> Vec<f64> {
    let s2 = sigma * sigma + 1.0;
    let v_out = (-sigma / s2.sqrt()) as f64;
    model_output
        .iter()
        .zip(sample)
        .map(|(&m, &x)| match prediction {
            PredictionType::Epsilon => x as f64 - sigma as f64 * m as f64,
            PredictionType::VPrediction => m as f64 * v_out + x as f64 / s2 as f64,
            PredictionType::Sample => m as f64,
        })
        .collect()
}

pub(super) fn step(p: &Params, sigmas: &[f32], i: usize, model_output: &[f32], sample: &[f32]) -> StepOutput {
    let sigma = sigmas[i];
    let x0 = predict_x0(p.prediction_type, sigma, model_output, sample);
    let dt = (sigmas[i + 1] - sigma) as f64;
    let prev = sample
        .iter()
        .zip(&x0)
        .map(|(&x, &x0)| {
            let x = x as f64;
            let derivative = (x - x0) / sigma as f64;
            (x + derivative * dt) as f32
        })
        .collect();
    StepOutput { prev_sample: prev, denoised: to_f32(&x0) }
}

pub(super) fn step_ancestral(
    p: &Params,
    sigmas: &[f32],
    i: usize,
    model_output: &[f32],
    sample: &[f32],
    noise: &[f32],
) -> StepOutput {
    let (from, to) = (sigmas[i], sigmas[i + 1]);
    let x0 = predict_x0(p.prediction_type, from, model_output, sample);
    let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
    let down = (to * to - up * up).sqrt();
    let dt = (down - from) as f64;
    let prev = (0..sample.len())
        .map(|k| {
            let x = sample[k] as f64;
            let derivative = (x - x0[k]) / from as f64;
            (x + derivative * dt + noise[k] as f64 * up as f64) as f32
        })
        .collect();
    StepOutput { prev_sample: prev, denoised: to_f32(&x0) }
}
