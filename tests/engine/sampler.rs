//! Samplers against diffusers 0.42.1: every sampler case of both fixture models
//! (tests/fixtures/refs/<model>/<case>.safetensors) is replayed from the recorded initial
//! latents with the recorded raw UNet outputs and recorded noise, chaining our own latents from
//! step to step, and compared with the reference timesteps, sigmas, UNet inputs, guided outputs
//! and latents after every step. Error measure: max |got − want| / max |want| over the tensor
//! (bound 2e-6; measured <= 3.1e-7 on both models, all cases). Unit tests check the training schedules, timestep spacings and Karras sigmas
//! against values printed by diffusers 0.42.1 (constructed with `from_config` on SD1.5's
//! scheduler config), config parsing and misuse errors. CPU only: no GPU involved.

use loralab::io::safetensors::SafetensorsFile;
use loralab::sampler::guidance::{cfg_combine, guidance_embedding, Guidance};
use loralab::sampler::schedule;
use super::common::fixture_case_sampler;
use loralab::sampler::{BetaSchedule, Sampler, SamplerConfig, SamplerKind, TimestepSpacing};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest parse")
}

fn sd15_config(model: &str) -> SamplerConfig {
    let path = fixtures().join(format!("models/{model}/scheduler/scheduler_config.json"));
    let text = std::fs::read_to_string(&path).expect("scheduler_config.json");
    SamplerConfig::from_json(&text, "scheduler_config.json").expect("parse scheduler config")
}

/// max |got − want| / max |want|.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length");
    let scale = want.iter().fold(0f64, |m, &w| m.max((w as f64).abs())).max(f64::MIN_POSITIVE);
    let diff = got.iter().zip(want).fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
    diff / scale
}

fn assert_close(what: &str, got: &[f32], want: &[f32], bound: f64) -> f64 {
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite values");
    let e = rel_err(got, want);
    assert!(e <= bound, "{what}: max relative error {e:e} > {bound:e}");
    e
}

fn f32_list(v: &Value) -> Vec<f32> {
    v.as_array().expect("list").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

/// Replays one fixture case; returns the largest latents error over its steps.
fn replay(model: &str, case: &str, info: &Value) -> f64 {
    let base = sd15_config(model);
    let (kind, config) = fixture_case_sampler(case, &base);
    let mut s = Sampler::new(kind, &config).unwrap();

    // The manifest's effective config, read as a config file, must give the same settings.
    let effective = SamplerConfig::from_value(&info["scheduler_config"], "manifest").unwrap();
    let s_eff = Sampler::new(kind, &effective).unwrap();
    assert_eq!(s.params(), s_eff.params(), "{model}/{case}: defaults differ from diffusers' effective config");

    let steps = info["num_inference_steps"].as_u64().unwrap() as usize;
    s.set_timesteps(steps).unwrap();
    let refs = SafetensorsFile::open_path(fixtures().join(format!("refs/{model}/{case}.safetensors"))).unwrap();
    let read = |name: &str| refs.read_f32(name).unwrap_or_else(|e| panic!("{model}/{case}: {e}"));

    assert_eq!(s.timesteps(), &read("timesteps")[..], "{model}/{case}: timesteps");
    assert_eq!(s.timesteps(), &f32_list(&info["unet_timesteps"])[..], "{model}/{case}: UNet timesteps");
    if refs.get("sigmas").is_some() {
        let e = assert_close(&format!("{model}/{case}: sigmas"), s.sigmas(), &read("sigmas"), 1e-6);
        assert!(e <= 1e-7, "{model}/{case}: sigmas should agree to f32 rounding, error {e:e}");
    } else {
        assert!(s.sigmas().is_empty());
    }
    let init_sigma = info["init_noise_sigma"].as_f64().unwrap();
    assert!(
        ((s.init_noise_sigma() as f64 - init_sigma) / init_sigma).abs() < 1e-7,
        "{model}/{case}: init_noise_sigma {} vs {init_sigma}",
        s.init_noise_sigma()
    );

    let scale = info["guidance_scale"].as_f64().unwrap() as f32;
    let guidance = Guidance::for_unet(scale, None);
    assert_eq!(
        matches!(guidance, Guidance::ClassifierFree { .. }),
        info["classifier_free_guidance"].as_bool().unwrap(),
        "{model}/{case}: guidance mode"
    );
    let noise_steps: Vec<usize> =
        info["noise_steps"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();

    let init = SafetensorsFile::open_path(fixtures().join(format!("refs/{model}/latents.safetensors"))).unwrap();
    let mut latents = s.initial_latents(&init.read_f32("latents").unwrap());
    let mut worst = 0f64;
    let timesteps = s.timesteps().to_vec();
    for (i, &t) in timesteps.iter().enumerate() {
        let input = s.scale_model_input(&latents, t).unwrap();
        assert_close(
            &format!("{model}/{case}: model input {i}"),
            &input,
            &read(&format!("model_input_step_{i}")),
            1e-5,
        );

        let unet = read(&format!("unet_output_step_{i}"));
        assert_eq!(unet.len(), guidance.batch() * latents.len(), "{model}/{case}: UNet batch");
        let guided = guidance.combine(&unet).unwrap();
        assert_close(
            &format!("{model}/{case}: guided output {i}"),
            &guided,
            &read(&format!("model_output_step_{i}")),
            1e-6,
        );

        assert_eq!(s.draws_noise(), noise_steps.contains(&i), "{model}/{case}: step {i} draws noise");
        let noise = noise_steps.contains(&i).then(|| read(&format!("noise_step_{i}")));
        let out = s.step(&guided, t, &latents, noise.as_deref()).unwrap();
        let e = assert_close(
            &format!("{model}/{case}: latents after step {i}"),
            &out.prev_sample,
            &read(&format!("latents_step_{i}")),
            2e-6,
        );
        worst = worst.max(e);
        assert!(out.denoised.iter().all(|v| v.is_finite()));
        latents = out.prev_sample;
    }
    worst
}

#[test]
fn sampler_cases_match_diffusers() {
    let m = manifest();
    let mut lines = Vec::new();
    let mut count = 0;
    for model in ["tiny-sd15-a", "tiny-sd15-b"] {
        let cases = m["pipelines"][model]["cases"].as_object().expect("cases");
        assert!(cases.len() >= 8, "{model}: expected every sampler case");
        for (case, info) in cases {
            let e = replay(model, case, info);
            lines.push(format!("{model}/{case}: max latents error {e:.2e}"));
            count += 1;
        }
    }
    assert_eq!(count, 16);
    eprintln!("{}", lines.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Schedules (values printed by diffusers 0.42.1 / torch 2.15 on the CPU)

const IDX: [usize; 8] = [0, 1, 2, 499, 500, 997, 998, 999];

/// `exact`: bit-for-bit; otherwise |Δβ| <= 1e-6 and ᾱ within 1e-4 relative (torch's f32
/// `sqrt` on the CPU is not correctly rounded, and the zero-SNR rescale divides neighbouring
/// ᾱ, so its last bits depend on the CPU that ran diffusers).
fn check_schedule(name: &str, betas: &[f32], want_betas: &[f64], want_ac: &[f64], exact: bool) {
    let ac = schedule::alphas_cumprod(betas);
    for (k, &i) in IDX.iter().enumerate() {
        let (b, a) = (betas[i] as f64, ac[i] as f64);
        if exact {
            assert_eq!(betas[i], want_betas[k] as f32, "{name}: beta[{i}]");
            assert_eq!(ac[i], want_ac[k] as f32, "{name}: alphas_cumprod[{i}]");
        } else {
            assert!((b - want_betas[k]).abs() <= 1e-6, "{name}: beta[{i}] {b} vs {}", want_betas[k]);
            let ok = (a - want_ac[k]).abs() <= 1e-4 * want_ac[k];
            assert!(ok || (a == 0.0 && want_ac[k] == 0.0), "{name}: alphas_cumprod[{i}] {a} vs {}", want_ac[k]);
        }
    }
}

#[rustfmt::skip]
#[test]
fn beta_schedules_match_torch() {
    use BetaSchedule::*;
    let n = 1000;
    check_schedule("linear", &schedule::betas(Linear, 0.00085, 0.012, n, None),
        &[0.0008500000112690032, 0.0008611611556261778, 0.0008723223581910133, 0.006419419310986996, 0.006430580746382475, 0.011977678164839745, 0.011988839134573936, 0.012000000104308128],
        &[0.9991499781608582, 0.9982895255088806, 0.9974187016487122, 0.1618121713399887, 0.16077162325382233, 0.0016175328055396676, 0.0015981405740603805, 0.0015789627796038985],
        true);
    let scaled = schedule::betas(ScaledLinear, 0.00085, 0.012, n, None);
    check_schedule("scaled_linear", &scaled,
        &[0.0008499999530613422, 0.0008546985918655992, 0.0008594102109782398, 0.0048037925735116005, 0.004814953543245792, 0.011964765377342701, 0.01198237482458353, 0.011999999172985554],
        &[0.9991499781608582, 0.9982960224151611, 0.9974380731582642, 0.27766942977905273, 0.27633246779441833, 0.0047738985158503056, 0.004716695751994848, 0.00466009508818388],
        true);
    check_schedule("squaredcos_cap_v2", &schedule::betas(SquaredCosCapV2, 0.00085, 0.012, n, None),
        &[4.128422369831242e-05, 4.614175122696906e-05, 5.099948248243891e-05, 0.003145886119455099, 0.003155691549181938, 0.5555537343025208, 0.7499994039535522, 0.9990000128746033],
        &[0.9999586939811707, 0.9999125599861145, 0.9998615384101868, 0.4938434660434723, 0.4922850430011749, 9.715042324387468e-06, 2.428766265438753e-06, 2.4287349909002387e-09],
        true);
    check_schedule("scaled_linear, zero terminal SNR", &schedule::rescale_zero_terminal_snr(&scaled),
        &[0.0008500218391418457, 0.0009172558784484863, 0.0009224414825439453, 0.0055155158042907715, 0.0055304765701293945, 0.557568371295929, 0.7511317729949951, 1.0],
        &[0.9991499781608582, 0.9982334971427917, 0.9973126649856567, 0.24235899746418, 0.2410186380147934, 7.907651706773322e-07, 1.9679633567193378e-07, 0.0],
        false);
    // trained_betas are taken as given (as f32).
    let trained: Vec<f64> = (0..10).map(|i| 0.001 * (i + 1) as f64).collect();
    assert_eq!(schedule::betas(Linear, 0.1, 0.2, 10, Some(&trained))[3], 0.004f32);
}

#[rustfmt::skip]
const KARRAS_SIGMAS_10: [f32; 11] = [14.614646911621094, 9.102937698364258, 5.478401184082031, 3.1686110496520996, 1.7494231462478638, 0.9140765070915222, 0.44692090153694153, 0.20139986276626587, 0.08191105723381042, 0.02916753478348255, 0.0];

#[rustfmt::skip]
#[test]
fn karras_sigmas_match_diffusers() {
    let base = sd15_config("tiny-sd15-a");
    let mut d = Sampler::new(SamplerKind::DpmPp2MKarras, &base).unwrap();
    d.set_timesteps(10).unwrap();
    assert_eq!(d.timesteps(), &[999.0, 916.0, 815.0, 687.0, 523.0, 327.0, 146.0, 41.0, 7.0, 0.0]);
    assert_close("dpm karras 10 sigmas", d.sigmas(), &KARRAS_SIGMAS_10, 1e-7);

    d.set_timesteps(25).unwrap();
    let want_t = [999, 970, 938, 905, 868, 829, 786, 739, 687, 630, 568, 500, 427, 352, 278, 207, 146, 96, 59, 34, 18, 9, 4, 1, 0];
    assert_eq!(d.timesteps(), &want_t.map(|t| t as f32));
    let want_s = [14.614646911621094, 12.283041954040527, 10.27783203125, 8.560018539428711, 7.094420433044434, 5.849390983581543, 4.796544075012207, 3.9104936122894287, 3.1686110496520996,
        2.550793409347534, 2.03924560546875, 1.6182764768600464, 1.2741053104400635, 0.9946830868721008, 0.7695227861404419, 0.5895429253578186, 0.44692090153694153, 0.33495765924453735,
        0.2479517161846161, 0.18108350038528442, 0.13030873239040375, 0.0922609269618988, 0.06416227668523788, 0.04374285787343979, 0.02916753478348255, 0.0];
    assert_close("dpm karras 25 sigmas", d.sigmas(), &want_s.map(|s| s as f32), 1e-7);

    // Euler with use_karras_sigmas keeps the fractional σ → t inverses.
    let mut c = base.clone();
    c.use_karras_sigmas = Some(true);
    let mut e = Sampler::new(SamplerKind::Euler, &c).unwrap();
    e.set_timesteps(10).unwrap();
    let want_t = [999.0, 916.2840576171875, 815.0449829101562, 687.1532592773438, 523.198974609375, 327.1472473144531, 145.93905639648438, 40.856876373291016, 6.732410907745361, 0.0];
    assert_close("euler karras 10 timesteps", e.timesteps(), &want_t.map(|t| t as f32), 1e-6);
    assert_close("euler karras 10 sigmas", e.sigmas(), &KARRAS_SIGMAS_10, 1e-7);
    assert_eq!(e.init_noise_sigma(), 14.614646911621094f32);

    // The formula itself: end points are σ_max and σ_min, ρ = 7 in between.
    let k = schedule::karras_sigmas(0.1, 10.0, 3);
    assert!((k[0] - 10.0).abs() < 1e-12 && (k[2] - 0.1).abs() < 1e-12);
    let mid = ((10f64.powf(1.0 / 7.0) + 0.1f64.powf(1.0 / 7.0)) / 2.0).powi(7);
    assert!((k[1] - mid).abs() < 1e-12);
}

fn spaced(kind: SamplerKind, spacing: TimestepSpacing, n: usize) -> Sampler {
    let mut c = sd15_config("tiny-sd15-a");
    c.timestep_spacing = Some(spacing);
    let mut s = Sampler::new(kind, &c).unwrap();
    s.set_timesteps(n).unwrap();
    s
}

#[rustfmt::skip]
#[test]
fn timestep_spacings_match_diffusers() {
    use SamplerKind::*;
    use TimestepSpacing::*;
    let cases: &[(SamplerKind, TimestepSpacing, usize, &[f32])] = &[
        (Ddim, Leading, 5, &[801., 601., 401., 201., 1.]),
        (Ddim, Leading, 7, &[853., 711., 569., 427., 285., 143., 1.]),
        (Ddim, Trailing, 5, &[999., 799., 599., 399., 199.]),
        (Ddim, Trailing, 7, &[999., 856., 713., 570., 428., 285., 142.]),
        (Ddim, Linspace, 5, &[999., 749., 500., 250., 0.]),
        (Ddim, Linspace, 7, &[999., 832., 666., 500., 333., 166., 0.]),
        (Euler, Leading, 5, &[801., 601., 401., 201., 1.]),
        (Euler, Trailing, 7, &[999., 856., 713., 570., 428., 285., 142.]),
        (Euler, Linspace, 5, &[999.0, 749.25, 499.5, 249.75, 0.0]),
        (Euler, Linspace, 7, &[999.0, 832.5, 666.0, 499.5, 333.0, 166.5, 0.0]),
        (DpmPp2M, Leading, 5, &[831., 665., 499., 333., 167.]),
        (DpmPp2M, Leading, 7, &[876., 751., 626., 501., 376., 251., 126.]),
        (DpmPp2M, Trailing, 7, &[999., 856., 713., 570., 428., 285., 142.]),
        (DpmPp2M, Linspace, 5, &[999., 799., 599., 400., 200.]),
        (DpmPp2M, Linspace, 7, &[999., 856., 714., 571., 428., 285., 143.]),
    ];
    for &(kind, spacing, n, want) in cases {
        assert_eq!(spaced(kind, spacing, n).timesteps(), want, "{kind} {spacing:?} {n}");
    }
    let sig: &[(SamplerKind, TimestepSpacing, usize, &[f64], f64)] = &[
        (Euler, Leading, 5, &[5.134433269500732, 2.2928547859191895, 1.1682164669036865, 0.574050784111023, 0.04131447896361351, 0.0], 5.2309088706970215),
        (Euler, Trailing, 7, &[14.614646911621094, 6.668572902679443, 3.5138795375823975, 2.054476737976074, 1.276235818862915, 0.7900615334510803, 0.43806231021881104, 0.0], 14.614646911621094),
        (Euler, Linspace, 5, &[14.614646911621094, 4.086089611053467, 1.6155834197998047, 0.6951509714126587, 0.02916753478348255, 0.0], 14.614646911621094),
        (EulerAncestral, Linspace, 7, &[14.614646911621094, 5.948918342590332, 2.9183084964752197, 1.6155834197998047, 0.9323583841323853, 0.49355348944664, 0.02916753478348255, 0.0], 14.614646911621094),
        (DpmPp2M, Leading, 7, &[7.371846675872803, 4.116698265075684, 2.510922431945801, 1.6236929893493652, 1.0760315656661987, 0.6983985900878906, 0.4022183418273926, 0.0], 1.0),
        (DpmPp2M, Linspace, 5, &[14.614646911621094, 5.087765216827393, 2.2764639854431152, 1.1643916368484497, 0.5716663599014282, 0.0], 1.0),
    ];
    for &(kind, spacing, n, want, init) in sig {
        let s = spaced(kind, spacing, n);
        let want: Vec<f32> = want.iter().map(|&x| x as f32).collect();
        assert_close(&format!("{kind} {spacing:?} {n} sigmas"), s.sigmas(), &want, 1e-7);
        assert_eq!(s.init_noise_sigma(), init as f32, "{kind} {spacing:?} {n} init_noise_sigma");
    }
    let lcm: [(usize, &[f32]); 4] = [(1, &[999.]), (2, &[999., 499.]), (6, &[999., 839., 679., 499., 339., 179.]), (8, &[999., 879., 759., 639., 499., 379., 259., 139.])];
    for (n, want) in lcm {
        assert_eq!(spaced(Lcm, Leading, n).timesteps(), want, "lcm {n}");
    }
    // Helpers against numpy's definitions.
    assert_eq!(schedule::np_linspace(0.0, 50.0, 4, false), vec![0.0, 12.5, 25.0, 37.5]);
    assert_eq!(schedule::round_half_even(499.5), 500.0);
    assert_eq!(schedule::round_half_even(832.5), 832.0);
    assert_eq!(schedule::np_arange(1000.0, 0.0, -250.0), vec![1000.0, 750.0, 500.0, 250.0]);
}

// ---------------------------------------------------------------------------------------------
// Config, guidance and misuse

#[test]
fn scheduler_config_parsing() {
    let c = sd15_config("tiny-sd15-a");
    assert_eq!(c.class_name.as_deref(), Some("PNDMScheduler"));
    assert_eq!(c.beta_schedule, Some(BetaSchedule::ScaledLinear));
    assert_eq!((c.beta_start, c.beta_end, c.steps_offset), (Some(0.00085), Some(0.012), Some(1)));
    assert_eq!((c.clip_sample, c.set_alpha_to_one, c.timestep_spacing), (Some(false), Some(false), None));
    // Class defaults fill the absent keys.
    let ddim = Sampler::new(SamplerKind::Ddim, &c).unwrap();
    assert_eq!(ddim.params().timestep_spacing, TimestepSpacing::Leading);
    let euler = Sampler::new(SamplerKind::Euler, &c).unwrap();
    assert_eq!(euler.params().timestep_spacing, TimestepSpacing::Linspace);
    let empty = Sampler::new(SamplerKind::Ddim, &SamplerConfig::default()).unwrap();
    assert!(empty.params().clip_sample && empty.params().set_alpha_to_one);
    assert_eq!(empty.params().beta_schedule, BetaSchedule::Linear);
    let lcm = Sampler::new(SamplerKind::Lcm, &SamplerConfig::default()).unwrap();
    assert_eq!(lcm.params().beta_schedule, BetaSchedule::ScaledLinear);

    // Python's -Infinity, unknown keys and nulls.
    let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
        "note": "NaN and Infinity inside strings stay", "trained_betas": null, "whatever": [1, 2]}"#;
    let c = SamplerConfig::from_json(text, "s.json").unwrap();
    assert_eq!(c.lambda_min_clipped, Some(f64::NEG_INFINITY));
    assert_eq!(c.trained_betas, None);

    for (text, field) in [
        (r#"{"beta_schedule": "cosine"}"#, "beta_schedule"),
        (r#"{"prediction_type": "flow"}"#, "prediction_type"),
        (r#"{"timestep_spacing": 3}"#, "timestep_spacing"),
        (r#"{"steps_offset": -1}"#, "steps_offset"),
        (r#"{"beta_start": "small"}"#, "beta_start"),
        (r#"{"clip_sample": "no"}"#, "clip_sample"),
        (r#"{"num_train_timesteps": 0}"#, "num_train_timesteps"),
        (r#"{"num_train_timesteps": 4000000000}"#, "num_train_timesteps"),
        (r#"{"num_train_timesteps": 3, "trained_betas": [0.1, 0.2]}"#, "trained_betas"),
    ] {
        let e = SamplerConfig::from_json(text, "bad.json").unwrap_err().to_string();
        assert!(e.contains(&format!("`{field}`")) && e.contains("bad.json"), "{text}: {e}");
    }
    assert!(SamplerConfig::from_json("{", "broken.json").unwrap_err().to_string().contains("broken.json"));

    // Settings the samplers do not implement are refused, naming the field.
    for (text, kind, field) in [
        (r#"{"thresholding": true}"#, SamplerKind::Ddim, "thresholding"),
        (r#"{"algorithm_type": "sde-dpmsolver++"}"#, SamplerKind::DpmPp2M, "algorithm_type"),
        (r#"{"solver_order": 3}"#, SamplerKind::DpmPp2MKarras, "solver_order"),
        (r#"{"interpolation_type": "log_linear"}"#, SamplerKind::Euler, "interpolation_type"),
        (r#"{"prediction_type": "sample"}"#, SamplerKind::EulerAncestral, "prediction_type"),
    ] {
        let c = SamplerConfig::from_json(text, "x.json").unwrap();
        let e = Sampler::new(kind, &c).unwrap_err().to_string();
        assert!(e.contains(&format!("`{field}`")), "{text}: {e}");
    }
}

#[test]
fn guidance_modes_and_embedding() {
    assert_eq!(Guidance::for_unet(7.5, None), Guidance::ClassifierFree { scale: 7.5 });
    assert_eq!(Guidance::for_unet(1.0, None), Guidance::Off);
    assert_eq!(Guidance::for_unet(8.0, Some(256)), Guidance::Embedded { w: 7.0, dim: 256 });
    assert_eq!(Guidance::for_unet(1.0, None).batch(), 1);
    let out = cfg_combine(&[1.0, 2.0, 3.0, 6.0], 1.5).unwrap();
    assert_eq!(out, vec![4.0, 8.0]);
    assert!(cfg_combine(&[1.0, 2.0, 3.0], 2.0).is_err());
    // w = 0: sin part 0, cos part 1; odd sizes are zero-padded.
    let e = guidance_embedding(0.0, 9);
    assert_eq!(e, vec![0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
    let e = guidance_embedding(0.001, 4); // w·1000 = 1, frequencies 1 and 1e-4
    assert!((e[0] - 1f32.sin()).abs() < 1e-6 && (e[1] - 1e-4f32.sin()).abs() < 1e-9);
    assert!((e[2] - 1f32.cos()).abs() < 1e-6);
}

#[test]
fn sampler_misuse_is_an_error() {
    let c = sd15_config("tiny-sd15-a");
    let mut s = Sampler::new(SamplerKind::DpmPp2M, &c).unwrap();
    let x = vec![0.5f32; 16];
    assert!(s.step(&x, 999.0, &x, None).unwrap_err().to_string().contains("set_timesteps"));
    assert!(s.set_timesteps(0).is_err() && s.set_timesteps(1001).is_err());
    s.set_timesteps(3).unwrap();
    let t = s.timesteps().to_vec();
    assert!(s.step(&x, t[1], &x, None).unwrap_err().to_string().contains("timestep"));
    assert!(s.step(&x[..8], t[0], &x, None).is_err());
    for &ti in &t {
        s.step(&x, ti, &x, None).unwrap();
    }
    assert!(s.step(&x, t[2], &x, None).unwrap_err().to_string().contains("done"));
    let mut l = Sampler::new(SamplerKind::Lcm, &c).unwrap();
    assert!(l.set_timesteps(51).is_err());
    assert!(SamplerKind::parse("euler_a").unwrap() == SamplerKind::EulerAncestral);
    assert!(SamplerKind::parse("DPM++ 2M Karras").unwrap() == SamplerKind::DpmPp2MKarras);
    assert!(SamplerKind::parse("heun").is_err());
    for k in SamplerKind::ALL {
        assert_eq!(SamplerKind::parse(k.name()).unwrap(), k);
    }
}

#[test]
fn seeded_noise_is_reproducible() {
    let c = sd15_config("tiny-sd15-b");
    let run = |seed: u64| {
        let mut s = Sampler::new(SamplerKind::EulerAncestral, &c).unwrap();
        s.set_noise_seed(seed);
        s.set_timesteps(3).unwrap();
        let mut x = s.initial_latents(&loralab::rng::Rng::new(7).normal_vec(64));
        for t in s.timesteps().to_vec() {
            let eps: Vec<f32> = x.iter().map(|v| 0.1 * v).collect();
            assert!(s.draws_noise());
            x = s.step(&eps, t, &x, None).unwrap().prev_sample;
        }
        x
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4));
    // DDIM with η > 0 draws noise; with η = 0 it does not.
    let mut d = Sampler::new(SamplerKind::Ddim, &c).unwrap();
    d.set_timesteps(2).unwrap();
    assert!(!d.draws_noise());
    d.set_eta(1.0);
    assert!(d.draws_noise());
}
