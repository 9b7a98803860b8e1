//! The optimizer (`ops::grad::optim`): AdamW against an f64 reference over several steps, the
//! global gradient norm and clipping, the fixed-order sum of partial results, and the
//! learning-rate schedules against values worked out from diffusers' formulas.

use crate::common::*;
use crate::gradcheck::f64s;
use loralab::ops::grad::optim::{
    adamw_step, clip_grads, grad_norm, reference, sum_partials, AdamW, Clip, LrSchedule,
};
use loralab::Tensor;

fn close(what: &str, got: f64, want: f64) {
    assert!((got - want).abs() <= 1e-12 * want.abs().max(1.0), "{what}: got {got}, want {want}");
}

#[test]
fn schedules_follow_the_diffusers_formulas() {
    let c = LrSchedule::Constant;
    for step in [0, 1, 999] {
        close("constant", c.factor(step), 1.0);
    }
    // constant_with_warmup: step / warmup, then 1.
    let cw = LrSchedule::ConstantWithWarmup { warmup: 10 };
    for (step, want) in [(0, 0.0), (3, 0.3), (9, 0.9), (10, 1.0), (500, 1.0)] {
        close(&format!("constant_with_warmup {step}"), cw.factor(step), want);
    }
    close("no warmup", LrSchedule::ConstantWithWarmup { warmup: 0 }.factor(0), 1.0);
    // linear: warmup, then (total − step) / (total − warmup), floored at 0.
    let lin = LrSchedule::Linear { warmup: 10, total: 110 };
    for (step, want) in [(0, 0.0), (5, 0.5), (10, 1.0), (60, 0.5), (85, 0.25), (110, 0.0), (200, 0.0)] {
        close(&format!("linear {step}"), lin.factor(step), want);
    }
    close("linear without warmup", LrSchedule::Linear { warmup: 0, total: 100 }.factor(30), 0.7);
    // cosine (0.5 cycles): 0.5·(1 + cos(π·progress)); past the end it rises again, unclamped.
    let cos = LrSchedule::Cosine { warmup: 10, total: 110, cycles: 0.5 };
    for (step, want) in [
        (4, 0.4),
        (10, 1.0),
        (35, 0.853_553_390_593_273_7), // progress 0.25: (1 + cos(π/4)) / 2
        (40, 0.793_892_626_146_236_6), // progress 0.3: (1 + cos(0.3π)) / 2
        (60, 0.5),
        (110, 0.0),
        (160, 0.5), // progress 1.5: cos(1.5π) = 0
    ] {
        close(&format!("cosine {step}"), cos.factor(step), want);
    }
    // cosine_with_restarts, 3 cycles: 0.5·(1 + cos(π·((3·progress) mod 1))), 0 from the end.
    let cr = LrSchedule::CosineWithRestarts { warmup: 10, total: 110, cycles: 3 };
    for (step, want) in [
        (5, 0.5),
        (10, 1.0),
        (35, 0.146_446_609_406_726_27), // 0.75 of a cycle
        (43, 0.000_246_719_817_134_2),  // 0.99 of the first cycle
        (44, 0.999_013_364_214_135_8),  // 0.02 into the second: restarted
        (110, 0.0),
        (150, 0.0),
    ] {
        close(&format!("cosine_with_restarts {step}"), cr.factor(step), want);
    }
    close("lr", lin.lr(1e-4, 60), 5e-5);
    // get_scheduler's names; "cosine" always has half a cycle there.
    assert_eq!(LrSchedule::from_name("cosine", 10, 110, 7).unwrap(), cos);
    assert_eq!(LrSchedule::from_name("cosine_with_restarts", 10, 110, 3).unwrap(), cr);
    assert_eq!(LrSchedule::from_name("linear", 10, 110, 1).unwrap(), lin);
    assert_eq!(LrSchedule::from_name("constant", 10, 110, 1).unwrap(), c);
    assert_eq!(LrSchedule::from_name("constant_with_warmup", 10, 110, 1).unwrap(), cw);
    let e = LrSchedule::from_name("polynomial", 10, 110, 1).unwrap_err().to_string();
    assert!(e.contains("polynomial") && e.contains("cosine_with_restarts"), "{e}");
}

#[test]
fn one_adamw_step_by_hand() {
    // param 1, grad 0.5, lr 0.1, wd 0.01: param·(1 − 0.001) = 0.999, m = 0.05, v = 0.00025,
    // step_size = 0.1 / 0.1 = 1, denom = sqrt(0.00025) / sqrt(0.001) + 1e-8 = 0.5 + 1e-8,
    // param = 0.999 − 0.05 / (0.5 + 1e-8) = 0.899000002.
    for gpu in gpus() {
        let t = |v: f32| Tensor::from_f32(gpu, &[1], &[v]).unwrap();
        let (p, g, m, v) = (t(1.0), t(0.5), t(0.0), t(0.0));
        adamw_step(gpu, &AdamW::default(), 0.1, 1, &p, &g, &m, &v, None).unwrap();
        let got = [read(gpu, &p)[0], read(gpu, &m)[0], read(gpu, &v)[0]];
        let want = [0.899_000_002f64, 0.05, 0.000_25];
        for (&g, w) in got.iter().zip(want) {
            assert!((g as f64 - w).abs() <= 2e-7 * w.abs(), "got {got:?}, want {want:?}");
        }
    }
}

#[test]
fn adamw_matches_the_reference_over_several_steps() {
    let hps = [AdamW::default(), AdamW { beta1: 0.8, beta2: 0.99, eps: 1e-6, weight_decay: 0.1 }];
    let sched = LrSchedule::Cosine { warmup: 2, total: 8, cycles: 0.5 };
    for gpu in gpus() {
        for (h, hp) in hps.iter().enumerate() {
            for &n in &[1usize, 1000, 3000] {
                for max_norm in [None, Some(0.5f32), Some(1e9f32)] {
                    let what = format!("hp {h} n {n} clip {max_norm:?}");
                    // Small parameters, so their f32 rounding is well below one step's change.
                    let p0: Vec<f32> = randn(n, 40 + n as u64).iter().map(|x| 0.01 * x).collect();
                    let param = Tensor::from_f32(gpu, &[n], &p0).unwrap();
                    let m = Tensor::zeros(gpu, &[n]).unwrap();
                    let v = Tensor::zeros(gpu, &[n]).unwrap();
                    let (mut rp, mut rm, mut rv) = (f64s(&p0), vec![0.0; n], vec![0.0; n]);
                    for step in 1..=6u64 {
                        let g = randn(n, 1000 * step + n as u64);
                        let grad = Tensor::from_f32(gpu, &[n], &g).unwrap();
                        let lr = sched.lr(1e-2, step - 1);
                        let norm = grad_norm(gpu, &[&grad]).unwrap();
                        let clip = max_norm.map(|mx| Clip { norm: &norm, max_norm: mx });
                        adamw_step(gpu, hp, lr, step, &param, &grad, &m, &v, clip).unwrap();
                        let g64 = f64s(&g);
                        let norm64 = reference::grad_norm(&[&g64]);
                        let coef = max_norm.map_or(1.0, |mx| reference::clip_coef(norm64, mx as f64));
                        reference::adamw_step(hp, lr, step, &mut rp, &g64, &mut rm, &mut rv, coef);
                        // The change of the parameters, not the parameters (which barely move).
                        let moved: Vec<f32> = read(gpu, &param).iter().zip(&p0).map(|(a, b)| a - b).collect();
                        let want: Vec<f32> = rp.iter().zip(&p0).map(|(a, &b)| (a - b as f64) as f32).collect();
                        if step > 1 {
                            assert_nmse(&format!("{what} step {step} param change"), &moved, &want, F32_BOUND);
                        } else {
                            // lr 0 in the first warmup step: nothing moves.
                            assert!(moved.iter().all(|&d| d == 0.0), "{what}: moved at lr 0");
                        }
                        let rm32: Vec<f32> = rm.iter().map(|&x| x as f32).collect();
                        let rv32: Vec<f32> = rv.iter().map(|&x| x as f32).collect();
                        assert_nmse(&format!("{what} step {step} exp_avg"), &read(gpu, &m), &rm32, F32_BOUND);
                        assert_nmse(&format!("{what} step {step} exp_avg_sq"), &read(gpu, &v), &rv32, F32_BOUND);
                    }
                }
            }
        }
    }
}

fn fixture() -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/optim/adamw.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn nums(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn f32v(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// get_scheduler's learning rates, step by step, as diffusers computed them
/// (tests/fixtures/optim/adamw.json, `tools/fixtures/optim.py`).
#[test]
fn schedules_match_diffusers() {
    let fx = fixture();
    for s in fx["schedules"].as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        let (warmup, total, cycles) = (s["warmup"].as_u64().unwrap(), s["total"].as_u64().unwrap(), s["cycles"].as_u64().unwrap());
        let sched = LrSchedule::from_name(name, warmup, total, cycles).unwrap();
        for (step, want) in nums(&s["lrs"]).into_iter().enumerate() {
            let got = sched.lr(1e-2, step as u64);
            assert!((got - want).abs() <= 1e-15, "{name} warmup {warmup} total {total} step {step}: {got} vs {want}");
        }
    }
}

/// clip_grad_norm_ + AdamW + the cosine schedule over six steps, against torch's own run.
#[test]
fn training_steps_match_torch() {
    let fx = fixture();
    let t = &fx["training"];
    let betas = nums(&t["betas"]);
    let hp = AdamW {
        beta1: betas[0],
        beta2: betas[1],
        eps: t["eps"].as_f64().unwrap(),
        weight_decay: t["weight_decay"].as_f64().unwrap(),
    };
    let sc = &t["schedule"];
    let sched = LrSchedule::from_name(
        sc["name"].as_str().unwrap(),
        sc["warmup"].as_u64().unwrap(),
        sc["total"].as_u64().unwrap(),
        1,
    )
    .unwrap();
    let base_lr = t["base_lr"].as_f64().unwrap();
    let max_norm = t["max_norm"].as_f64().unwrap() as f32;
    let init: Vec<Vec<f64>> = t["init"].as_array().unwrap().iter().map(nums).collect();
    for gpu in gpus() {
        let up = |v: &[f64]| Tensor::from_f32(gpu, &[v.len()], &f32v(v)).unwrap();
        let params: Vec<Tensor> = init.iter().map(|v| up(v)).collect();
        let ms: Vec<Tensor> = init.iter().map(|v| Tensor::zeros(gpu, &[v.len()]).unwrap()).collect();
        let vs: Vec<Tensor> = init.iter().map(|v| Tensor::zeros(gpu, &[v.len()]).unwrap()).collect();
        for (i, st) in t["steps"].as_array().unwrap().iter().enumerate() {
            let grads: Vec<Tensor> = st["grads"].as_array().unwrap().iter().map(|g| up(&nums(g))).collect();
            let refs: Vec<&Tensor> = grads.iter().collect();
            let norm = grad_norm(gpu, &refs).unwrap();
            let (got, want) = (read(gpu, &norm)[0] as f64, st["norm"].as_f64().unwrap());
            assert!((got - want).abs() <= 1e-6 * want, "step {i}: norm {got} vs torch {want}");
            let lr = sched.lr(base_lr, i as u64);
            assert!((lr - st["lr"].as_f64().unwrap()).abs() <= 1e-15, "step {i}: lr {lr} vs torch {}", st["lr"]);
            for (j, g) in grads.iter().enumerate() {
                let clip = Some(Clip { norm: &norm, max_norm });
                adamw_step(gpu, &hp, lr, i as u64 + 1, &params[j], g, &ms[j], &vs[j], clip).unwrap();
            }
        }
        let fin = &t["final"];
        for j in 0..init.len() {
            let moved: Vec<f32> = read(gpu, &params[j]).iter().zip(&init[j]).map(|(a, &b)| a - b as f32).collect();
            let want: Vec<f32> = nums(&fin["params"][j]).iter().zip(&init[j]).map(|(a, &b)| (a - b) as f32).collect();
            assert_nmse(&format!("param {j} change"), &moved, &want, F32_BOUND);
            assert_nmse(&format!("exp_avg {j}"), &read(gpu, &ms[j]), &f32v(&nums(&fin["exp_avg"][j])), F32_BOUND);
            assert_nmse(&format!("exp_avg_sq {j}"), &read(gpu, &vs[j]), &f32v(&nums(&fin["exp_avg_sq"][j])), F32_BOUND);
        }
    }
}

#[test]
fn grad_norm_and_clipping() {
    for gpu in gpus() {
        // One tensor of one element, one of several workgroups, one not a multiple of anything.
        let sizes = [1usize, 5000, 1000, 37];
        let vals: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &n)| randn(n, 70 + i as u64)).collect();
        let make = || -> Vec<Tensor> {
            vals.iter().zip(&sizes).map(|(v, &n)| Tensor::from_f32(gpu, &[n], v).unwrap()).collect()
        };
        let grads = make();
        let refs: Vec<&Tensor> = grads.iter().collect();
        let norm = grad_norm(gpu, &refs).unwrap();
        let got = read(gpu, &norm)[0] as f64;
        let v64: Vec<Vec<f64>> = vals.iter().map(|v| f64s(v)).collect();
        let want = reference::grad_norm(&v64.iter().map(|v| &v[..]).collect::<Vec<_>>());
        assert!((got - want).abs() <= 1e-6 * want, "norm {got} want {want}");
        assert_eq!(read(gpu, &grad_norm(gpu, &refs).unwrap())[0] as f64, got, "bit-reproducible");

        // Below the norm: scaled by max_norm / (norm + 1e-6); the clipped norm is max_norm.
        let max_norm = (want / 4.0) as f32;
        clip_grads(gpu, &refs, &norm, max_norm).unwrap();
        let coef = reference::clip_coef(got, max_norm as f64);
        for (t, v) in grads.iter().zip(&vals) {
            let want: Vec<f32> = v.iter().map(|&x| (x as f64 * coef) as f32).collect();
            assert_nmse("clipped", &read(gpu, t), &want, STRICT);
        }
        let clipped = read(gpu, &grad_norm(gpu, &refs).unwrap())[0];
        assert!((clipped - max_norm).abs() <= 1e-5 * max_norm, "clipped norm {clipped} vs {max_norm}");

        // Above the norm: untouched, bit for bit.
        let grads = make();
        let refs: Vec<&Tensor> = grads.iter().collect();
        let norm = grad_norm(gpu, &refs).unwrap();
        clip_grads(gpu, &refs, &norm, (want * 2.0) as f32).unwrap();
        for (t, v) in grads.iter().zip(&vals) {
            assert_eq!(&read(gpu, t), v);
        }
    }
}

#[test]
fn partial_sums_are_added_in_order() {
    for gpu in gpus() {
        for &(count, rest) in &[(1usize, &[5usize, 3][..]), (3, &[5, 7][..]), (64, &[1][..]), (7, &[300][..])] {
            let n: usize = rest.iter().product();
            let v = randn(count * n, count as u64);
            let mut shape = vec![count];
            shape.extend_from_slice(rest);
            let t = Tensor::from_f32(gpu, &shape, &v).unwrap();
            let s = sum_partials(gpu, &t).unwrap();
            assert_eq!(s.shape(), rest);
            // Summed in f32 in chunk order, exactly as the kernel does.
            let want: Vec<f32> = (0..n).map(|i| (0..count).fold(0f32, |a, c| a + v[c * n + i])).collect();
            assert_eq!(read(gpu, &s), want, "count {count} rest {rest:?}");
        }
    }
}

#[test]
fn bad_arguments_are_errors() {
    let gpu = gpu();
    let t = |n: usize| Tensor::zeros(gpu, &[n]).unwrap();
    let (p, g, m, v) = (t(4), t(4), t(4), t(4));
    let hp = AdamW::default();
    assert!(adamw_step(gpu, &hp, 1e-3, 0, &p, &g, &m, &v, None).is_err(), "step counts from 1");
    assert!(adamw_step(gpu, &hp, 1e-3, 1, &p, &t(5), &m, &v, None).is_err());
    let two = t(2);
    assert!(adamw_step(gpu, &hp, 1e-3, 1, &p, &g, &m, &v, Some(Clip { norm: &two, max_norm: 1.0 })).is_err());
    assert!(grad_norm(gpu, &[]).is_err());
    assert!(clip_grads(gpu, &[&g], &two, 1.0).is_err());
    assert!(sum_partials(gpu, &t(3)).is_err());
    let q = Tensor::from_f32_as(gpu, &[4, 32], &[0.0; 128], loralab::DType::F16).unwrap();
    assert!(grad_norm(gpu, &[&q]).is_err());
}
