//! DDIM (Song et al., arXiv:2010.02502), following diffusers/schedulers/scheduling_ddim.py:
//! integer timesteps by `timestep_spacing`, the previous timestep is always
//! `t − num_train_timesteps / n`, ᾱ before timestep 0 is `final_alpha_cumprod`
//! (1 with `set_alpha_to_one`, else ᾱ₀), optional clipping of x̂₀ and η-scaled noise.

use super::schedule::{np_arange, np_linspace, round_half_even};
use super::{predict_x0_eps, to_f32, Params, Sampler, StepOutput, TimestepSpacing};

/// The inference timesteps (descending integers, as f32).
pub(super) fn timesteps(p: &Params, n: usize) -> Vec<f32> {
    let big = p.num_train_timesteps;
    let ts: Vec<i64> = match p.timestep_spacing {
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (big - 1) as f64, n, true).into_iter().rev().map(|t| round_half_even(t) as i64).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = (big / n) as i64;
            (0..n as i64).rev().map(|i| i * ratio + p.steps_offset as i64).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = big as f64 / n as f64;
            np_arange(big as f64, 0.0, -ratio).into_iter().map(|t| round_half_even(t) as i64 - 1).collect()
        }
    };
    ts.into_iter().map(|t| t as f32).collect()
}

pub(super) fn step(s: &Sampler, model_output: &[f32], t: f32, sample: &[f32], noise: Option<&[f32]>) -> StepOutput {
    let p = &s.params;
    let n = s.timesteps.len() as i64;
    let prev_t = t as i64 - p.num_train_timesteps as i64 / n;
    let alpha_prod_t = s.alpha_at(t);
    let alpha_prod_prev = if prev_t >= 0 { s.alpha_at(prev_t as f32) } else { s.final_alpha_cumprod };
    let (mut x0, eps) = predict_x0_eps(p.prediction_type, alpha_prod_t, model_output, sample);
    if p.clip_sample {
        let r = p.clip_sample_range;
        x0.iter_mut().for_each(|v| *v = v.clamp(-r, r));
    }
    // σ_t(η) of formula (16); 0 for plain DDIM.
    let (beta_t, beta_prev) = (1.0 - alpha_prod_t, 1.0 - alpha_prod_prev);
    let variance = (beta_prev / beta_t) * (1.0 - alpha_prod_t / alpha_prod_prev);
    let std_dev = s.eta * variance.sqrt();
    let dir_coef = (1.0 - alpha_prod_prev - std_dev * std_dev).sqrt() as f64;
    let x0_coef = alpha_prod_prev.sqrt() as f64;
    let prev: Vec<f32> = (0..sample.len())
        .map(|i| {
            let mut v = x0_coef * x0[i] + dir_coef * eps[i];
            if let Some(z) = noise {
                v += std_dev as f64 * z[i] as f64;
            }
            v as f32
        })
        .collect();
    StepOutput { prev_sample: prev, denoised: to_f32(&x0) }
}
