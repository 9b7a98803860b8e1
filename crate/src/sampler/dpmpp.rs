//! DPM-Solver++ multistep, orders 1–2 (Lu et al., arXiv:2211.01095), following
//! diffusers/schedulers/scheduling_dpmsolver_multistep.py with `algorithm_type="dpmsolver++"`:
//! the model output is converted to x̂₀, the first step (and the last, with
//! `lower_order_final` / a zero final σ) is first order, the others use the previous x̂₀ too
//! (midpoint or Heun form). Timesteps are integers; with Karras sigmas they are the rounded
//! σ → t inverses.

use super::euler::final_sigma;
use super::schedule::{
    interp_index, karras_sigmas, log_sigmas, np_arange, np_linspace, round_half_even, sigma_to_t, train_sigmas,
};
use super::{to_f32, BetaSchedule, Params, PredictionType, SolverType, StepOutput, TimestepSpacing};

/// The multistep history: the converted outputs of the previous step and how many low-order
/// steps have run.
#[derive(Clone, Debug, Default)]
pub(super) struct State {
    prev_x0: Option<Vec<f64>>,
    lower_order_nums: usize,
}

/// (timesteps, sigmas with the final σ appended).
pub(super) fn timesteps(p: &Params, alphas_cumprod: &[f32], n: usize) -> (Vec<f32>, Vec<f32>) {
    let big = p.num_train_timesteps;
    // Timesteps whose λ = log α − log σ falls below lambda_min_clipped are cut off the end.
    let lambda_value = p.lambda_min_clipped as f32;
    let clipped = alphas_cumprod
        .iter()
        .rev()
        .filter(|&&a| {
            let lambda = a.sqrt().ln() - (1.0 - a).sqrt().ln();
            lambda < lambda_value
        })
        .count();
    let last = big - clipped;
    let ts: Vec<f64> = match p.timestep_spacing {
        TimestepSpacing::Linspace => {
            let v = np_linspace(0.0, last as f64 - 1.0, n + 1, true);
            v[1..].iter().rev().map(|&t| round_half_even(t)).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = last / (n + 1);
            (1..=n).rev().map(|i| (i * ratio + p.steps_offset) as f64).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = big as f64 / n as f64;
            np_arange(last as f64, 0.0, -ratio).into_iter().map(|t| round_half_even(t) - 1.0).collect()
        }
    };
    let train = train_sigmas(alphas_cumprod);
    let (ts, mut sigmas): (Vec<f64>, Vec<f64>) = if p.use_karras_sigmas {
        let sigmas = karras_sigmas(train[0] as f64, train[big - 1] as f64, n);
        let logs = log_sigmas(&train);
        let ts = sigmas
            .iter()
            .map(|&s| {
                let t = sigma_to_t(s, &logs);
                if p.beta_schedule != BetaSchedule::SquaredCosCapV2 {
                    round_half_even(t)
                } else {
                    t
                }
            })
            .collect();
        (ts, sigmas)
    } else {
        let sigmas = ts.iter().map(|&t| interp_index(t, &train)).collect();
        (ts, sigmas)
    };
    sigmas.push(final_sigma(p.final_sigmas_type, alphas_cumprod));
    // torch int64 conversion truncates.
    (ts.into_iter().map(|t| t.trunc() as f32).collect(), sigmas.into_iter().map(|s| s as f32).collect())
}

/// (α_t, σ_t, λ_t) for a sampler σ, in f32 like diffusers' `_sigma_to_alpha_sigma_t`.
fn alpha_sigma_lambda(sigma: f32) -> (f32, f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let sigma_t = sigma * alpha;
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

pub(super) fn step(
    p: &Params,
    sigmas: &[f32],
    state: &mut State,
    i: usize,
    n: usize,
    model_output: &[f32],
    sample: &[f32],
) -> StepOutput {
    let lower_order_final = i == n - 1
        && (p.euler_at_final || (p.lower_order_final && n < 15) || p.final_sigmas_type == super::FinalSigmas::Zero);
    // convert_model_output: x̂₀ at the current σ.
    let (alpha_s0, sigma_s0, lambda_s0) = alpha_sigma_lambda(sigmas[i]);
    let x0: Vec<f64> = model_output
        .iter()
        .zip(sample)
        .map(|(&m, &x)| {
            let (m, x) = (m as f64, x as f64);
            match p.prediction_type {
                PredictionType::Epsilon => (x - sigma_s0 as f64 * m) / alpha_s0 as f64,
                PredictionType::Sample => m,
                PredictionType::VPrediction => alpha_s0 as f64 * x - sigma_s0 as f64 * m,
            }
        })
        .collect();
    let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(sigmas[i + 1]);
    let h = lambda_t - lambda_s0;
    let ratio = (sigma_t / sigma_s0) as f64;
    let c0 = alpha_t * ((-h).exp() - 1.0);
    let first_order = p.solver_order == 1 || state.lower_order_nums < 1 || lower_order_final;
    let prev: Vec<f32> = match (&state.prev_x0, first_order) {
        (Some(m1), false) => {
            let (_, _, lambda_s1) = alpha_sigma_lambda(sigmas[i - 1]);
            let h0 = lambda_s0 - lambda_s1;
            let inv_r0 = (1.0 / (h0 / h)) as f64;
            let c1 = match p.solver_type {
                SolverType::Midpoint => -(0.5 * c0),
                SolverType::Heun => alpha_t * (((-h).exp() - 1.0) / h + 1.0),
            } as f64;
            (0..sample.len())
                .map(|k| {
                    let d1 = inv_r0 * (x0[k] - m1[k]);
                    (ratio * sample[k] as f64 - c0 as f64 * x0[k] + c1 * d1) as f32
                })
                .collect()
        }
        _ => (0..sample.len()).map(|k| (ratio * sample[k] as f64 - c0 as f64 * x0[k]) as f32).collect(),
    };
    if state.lower_order_nums < p.solver_order {
        state.lower_order_nums += 1;
    }
    let denoised = to_f32(&x0);
    state.prev_x0 = Some(x0);
    StepOutput { prev_sample: prev, denoised }
}
