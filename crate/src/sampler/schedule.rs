//! Noise-schedule arithmetic shared by the samplers, reproducing diffusers 0.42.1 bit for bit
//! where it can: the training schedule (betas, ᾱ = alphas_cumprod, σ) is float32 as torch
//! computes it in the schedulers' `__init__`, the inference schedule (timestep spacing,
//! interpolation, Karras sigmas, σ → t) is float64 as numpy computes it in `set_timesteps`.
//! Follows diffusers/schedulers/scheduling_ddim.py (`betas_for_alpha_bar`,
//! `rescale_zero_terminal_snr`) and scheduling_euler_discrete.py (`_sigma_to_t`,
//! `_convert_to_karras`).

use super::config::BetaSchedule;

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU: both ends rounded to f32, an f32
/// step, the first half counted up from `start` and the second half down from `end`, each value
/// rounded once (torch's kernel is contracted to a fused multiply-add; the f64 expression below
/// is exact for these operand sizes, so one rounding to f32 gives the same value).
pub fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start as f32];
    }
    let (a, b) = (start as f32, end as f32);
    let step = (b - a) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                (a as f64 + step as f64 * i as f64) as f32
            } else {
                (b as f64 - step as f64 * (n - i - 1) as f64) as f32
            }
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine ᾱ(t) of Improved DDPM (float64, then f32).
pub fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// The training betas for a schedule (`trained_betas` overrides it when given).
pub fn betas(schedule: BetaSchedule, beta_start: f64, beta_end: f64, n: usize, trained: Option<&[f64]>) -> Vec<f32> {
    if let Some(t) = trained {
        return t.iter().map(|&b| b as f32).collect();
    }
    match schedule {
        BetaSchedule::Linear => torch_linspace_f32(beta_start, beta_end, n),
        BetaSchedule::ScaledLinear => {
            torch_linspace_f32(beta_start.powf(0.5), beta_end.powf(0.5), n).into_iter().map(|b| b * b).collect()
        }
        BetaSchedule::SquaredCosCapV2 => cosine_betas(n),
    }
}

/// `torch.cumprod(1 - betas)`: torch accumulates a float32 cumulative product in double and
/// rounds each prefix to f32.
pub fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (arXiv:2305.08891, Algorithm 1), in f32 as diffusers does.
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let sqrt_ac: Vec<f32> = alphas_cumprod(betas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt_ac[0], sqrt_ac[sqrt_ac.len() - 1]);
    let scale = first / (first - last);
    let bar: Vec<f32> = sqrt_ac
        .iter()
        .map(|&s| {
            let r = (s - last) * scale;
            r * r
        })
        .collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// σ(t) = sqrt((1 − ᾱ_t) / ᾱ_t) for every training timestep, in f32.
pub fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.linspace(start, stop, n, endpoint)` (float64).
pub fn np_linspace(start: f64, stop: f64, n: usize, endpoint: bool) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    let div = if endpoint { n.saturating_sub(1) } else { n };
    if div == 0 {
        return vec![start];
    }
    let step = (stop - start) / div as f64;
    let mut y: Vec<f64> = (0..n)
        .map(|i| if step == 0.0 { i as f64 / div as f64 * (stop - start) + start } else { i as f64 * step + start })
        .collect();
    if endpoint && n > 1 {
        y[n - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` for floats: length ceil((stop − start) / step); numpy fills
/// `start + i·d` with `d` the difference of its first two values.
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let d = (start + step) - start;
    (0..len).map(|i| if i == 1 { start + step } else { start + i as f64 * d }).collect()
}

/// `np.round` (half to even).
pub fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, arange(len(fp)), fp)` with numpy's formula (slope · (x − xp[j]) + fp[j]).
pub fn interp_index(x: f64, fp: &[f32]) -> f64 {
    let Some(last) = fp.len().checked_sub(1) else { return 0.0 };
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return fp[j] as f64;
    }
    let slope = (fp[j + 1] as f64 - fp[j] as f64) / 1.0;
    let r = slope * (x - j as f64) + fp[j] as f64;
    if r.is_nan() {
        slope * (x - (j + 1) as f64) + fp[j + 1] as f64
    } else {
        r
    }
}

/// Karras et al. (2022) sigmas: `(σ_max^(1/ρ) + ramp·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ`, ρ = 7,
/// over `n` points from σ_max down to σ_min (float64).
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n, true).into_iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho)).collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose σ is `sigma`, interpolated
/// linearly in log σ between the two neighbouring training timesteps. `log_sigmas` is
/// `np.log` of the f32 training sigmas (so float32, ascending with t).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // One training timestep (`num_train_timesteps: 1`): nothing to interpolate between.
    if n < 2 {
        return 0.0;
    }
    // numpy: cumsum(dists >= 0).argmax() = the last index whose log σ is <= log_sigma (0 if none).
    let mut low = 0usize;
    for (i, &l) in log_sigmas.iter().enumerate() {
        if log_sigma - l as f64 >= 0.0 {
            low = i;
        }
    }
    let low = low.min(n - 2);
    let high = low + 1;
    let (lo, hi) = (log_sigmas[low], log_sigmas[high]);
    let w = ((lo as f64 - log_sigma) / (lo - hi) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// `np.log` of the training sigmas, element by element in f32.
pub fn log_sigmas(train_sigmas: &[f32]) -> Vec<f32> {
    train_sigmas.iter().map(|s| s.ln()).collect()
}
