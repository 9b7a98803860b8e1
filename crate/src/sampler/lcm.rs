//! Latent consistency model sampling (Luo et al., arXiv:2310.04378), following
//! diffusers/schedulers/scheduling_lcm.py: timesteps are picked from the `original_inference_steps`
//! skipping-step schedule, each step forms the consistency-model output
//! `c_out · x̂₀ + c_skip · x` and, except at the last step, re-noises it to the next timestep.

use super::schedule::np_linspace;
use super::{predict_x0_eps, to_f32, Params, Sampler, StepOutput};

/// The inference timesteps (descending integers, as f32), or why `n` does not fit.
pub(super) fn timesteps(p: &Params, n: usize) -> Result<Vec<f32>, String> {
    let original = p.original_inference_steps;
    let k = p.num_train_timesteps / original;
    // lcm_origin_timesteps = [1..=original] · k − 1, reversed.
    let origin: Vec<i64> = (1..=original as i64).rev().map(|i| i * k as i64 - 1).collect();
    if origin.len() / n < 1 {
        return Err(format!("{n} steps exceed the {} original LCM timesteps", origin.len()));
    }
    if n > original {
        return Err(format!("{n} steps exceed original_inference_steps {original}"));
    }
    Ok(np_linspace(0.0, origin.len() as f64, n, false).into_iter().map(|x| origin[x.floor() as usize] as f32).collect())
}

/// (c_skip, c_out) of the boundary condition at timestep `t` (σ_data = 0.5), in f32 as diffusers.
pub(super) fn scalings(p: &Params, t: f32) -> (f32, f32) {
    let scaled = t * p.timestep_scaling as f32;
    let d = scaled * scaled + 0.25;
    (0.25 / d, scaled / d.sqrt())
}

pub(super) fn step(s: &Sampler, model_output: &[f32], t: f32, sample: &[f32], noise: Option<&[f32]>) -> StepOutput {
    let p = &s.params;
    let i = s.step_index;
    let prev_t = s.timesteps.get(i + 1).copied().unwrap_or(t);
    let alpha_prod_t = s.alpha_at(t);
    let alpha_prod_prev = if prev_t >= 0.0 { s.alpha_at(prev_t) } else { s.final_alpha_cumprod };
    let (c_skip, c_out) = scalings(p, t);
    let (mut x0, _) = predict_x0_eps(p.prediction_type, alpha_prod_t, model_output, sample);
    if p.clip_sample {
        let r = p.clip_sample_range;
        x0.iter_mut().for_each(|v| *v = v.clamp(-r, r));
    }
    let denoised: Vec<f64> =
        x0.iter().zip(sample).map(|(&x, &smp)| c_out as f64 * x + c_skip as f64 * smp as f64).collect();
    let prev = match noise {
        Some(z) if i + 1 < s.timesteps.len() => {
            let (a, b) = (alpha_prod_prev.sqrt() as f64, (1.0 - alpha_prod_prev).sqrt() as f64);
            denoised.iter().zip(z).map(|(&d, &z)| (a * d + b * z as f64) as f32).collect()
        }
        _ => to_f32(&denoised),
    };
    StepOutput { prev_sample: prev, denoised: to_f32(&denoised) }
}
