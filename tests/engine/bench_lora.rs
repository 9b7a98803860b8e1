//! `loralab bench lora` smoke run: the quick configuration through the library function; the
//! report's structure and that every figure is a positive, finite measurement (no timing
//! bounds: the machine is shared). Plus the step sizes the layer profile assigns to SD1.5 layers.

use super::common::block;
use loralab::bench::lora::synth::{kohya_data_bytes, target_layers};
use loralab::bench::lora::{
    format_lora_table, layer_rows, process_cpu_ms, run_lora, LoraBenchOptions, ALPHA, QUICK_FILE_RANK, RANK,
};
use loralab::bench::unet::BenchShapes;
use loralab::lora::Target;
use loralab::model::random_weights::RandomWeights;
use loralab::model::unet::UNet2DConditionModel;
use loralab::pipeline::WeightPlan;
use loralab::{DType, Gpu, GpuOptions};

/// A device of its own: the pool's live bytes must not see other tests' tensors.
fn own_gpu() -> Gpu {
    // SAFETY: called before this test's device exists; no environment is read concurrently.
    unsafe { loralab::gpu::ensure_xdg_runtime_dir() };
    block(Gpu::new(GpuOptions::default())).expect("GPU tests need an adapter")
}

fn positive(what: &str, v: f64) {
    assert!(v.is_finite() && v > 0.0, "{what} = {v}");
}

#[test]
fn quick_lora_bench_reports_every_count_and_part() {
    let gpu = own_gpu();
    let opts = LoraBenchOptions {
        weights: vec![DType::F16, DType::Q4_0],
        adapters: vec![0, 1, 2],
        warmup: 1,
        small_warmup: true,
        steps_timed: 2,
        strength_samples: 3,
        profile: Some(true),
        file: true,
        file_rank: None,
        quick: true,
        seed: 3,
        cpu_clock: None,
    };
    let t0 = std::time::Instant::now();
    let clock = move || t0.elapsed().as_secs_f64() * 1e3;
    let r = block(run_lora(&gpu, &opts, &clock)).unwrap();

    // The adapters: rank 16, alpha 8 on the quick UNet's attention, feed-forward and projection
    // layers (12 per transformer: 8 attention projections, 2 feed-forward, proj_in/out; one
    // transformer in down_blocks.0, one in the mid block, two in up_blocks.1).
    let a = &r.adapters;
    assert_eq!((a.rank, a.alpha, a.scale), (RANK, ALPHA, ALPHA / RANK as f32));
    assert_eq!(a.layers, 48, "{a:?}");
    let s = BenchShapes::quick();
    let mut unet = UNet2DConditionModel::load(&gpu, &s.unet, &RandomWeights::new(3, "unet"), WeightPlan::new(DType::F16).unet).unwrap();
    let targets = target_layers(&mut unet, Target::Unet);
    drop(unet);
    assert_eq!(targets.len(), a.layers);
    assert_eq!(a.params, targets.iter().map(|l| (RANK * (l.n + l.k)) as u64).sum::<u64>());
    assert_eq!(r.goal_met, None, "the goal is judged on full-size runs only");
    assert_eq!(r.warmup_latents, [2, 4, 8, 8], "a quarter of the 16x16 side, at least 8");
    assert_eq!((r.cpu_clock.as_deref(), r.goal_clock.as_str()), (None, "wall clock"));

    assert_eq!(r.cases.len(), 2);
    for (c, dt) in r.cases.iter().zip(["f16", "q4_0"]) {
        assert_eq!(c.weights, dt);
        assert!(c.unet_weight_bytes > 0);
        let counts: Vec<usize> = c.steps.iter().map(|x| x.adapters).collect();
        assert_eq!(counts, [0, 1, 2]);
        for x in &c.steps {
            assert_eq!(x.steps_timed, 2, "{x:?}");
            for v in [x.step_ms_median, x.step_ms_min, x.step_ms_max] {
                positive("step ms", v);
            }
            assert!(x.step_ms_min <= x.step_ms_median && x.step_ms_median <= x.step_ms_max, "{x:?}");
            let o = x.overhead_pct.expect("a 0-adapter case was run");
            assert!(o.is_finite(), "{x:?}");
            assert_eq!((x.step_cpu_ms_median, x.overhead_cpu_pct), (None, None));
            if x.adapters == 0 {
                assert_eq!((o, x.adapter_gpu_bytes, x.install_ms), (0.0, 0, 0.0));
            } else {
                positive("install ms", x.install_ms);
            }
        }
        // At least the f32 factors of each adapter (down and up) live on the GPU.
        let bytes: Vec<u64> = c.steps.iter().map(|x| x.adapter_gpu_bytes).collect();
        assert!(bytes[1] >= 4 * a.params && bytes[2] >= 2 * 4 * a.params, "{bytes:?}");

        let sc: Vec<usize> = c.strength_changes.iter().map(|x| x.adapters).collect();
        assert_eq!(sc, [1, 2]);
        for x in &c.strength_changes {
            assert_eq!((x.layers, x.samples), (a.layers, 3), "{x:?}");
            positive("strength change ms", x.ms_median);
        }

        let p = c.profile.as_ref().expect("profile requested");
        assert_eq!((p.adapters, p.clock.as_str()), (1, "wall clock"));
        assert_eq!(p.shapes.iter().map(|x| x.layers).sum::<usize>(), a.layers, "every adapted layer is in one shape");
        for x in &p.shapes {
            assert_eq!(x.rank, RANK);
            assert_eq!(Some(x.rows), layer_rows(&x.example, &s, 77), "{x:?}");
            for v in [x.base_ms, x.down_ms, x.empty_ms, x.adapted_ms] {
                positive("profile ms", v);
            }
        }
        positive("profile base", p.base_ms);
        positive("profile down", p.down_ms);
        for v in [p.variant_ms, p.lowrank_ms, p.down_pct, p.variant_pct, p.lowrank_pct] {
            assert!(v.is_finite(), "{p:?}");
        }
    }

    // The file: rank 8 kohya on the quick UNet's 48 layers and the text encoder's 2 × 6.
    let f = r.file.as_ref().expect("file measurement requested");
    assert_eq!((f.rank, f.unet_layers, f.text_encoder_layers, f.weights.as_str()), (QUICK_FILE_RANK, 48, 12, "f16"));
    let data = kohya_data_bytes(&targets, QUICK_FILE_RANK);
    assert!(f.file_bytes > data, "header plus at least the UNet layers' data: {} vs {data}", f.file_bytes);
    for v in [f.write_ms, f.parse_ms, f.parse_mb_s, f.install_ms, f.install_mb_s] {
        positive("file figure", v);
    }
    assert!(f.adapter_gpu_bytes > 0);

    let table = format_lora_table(&r);
    for want in ["overhead", "strength change", "layer profile", "read_lora", "goal"] {
        assert!(table.contains(want), "{want} missing:\n{table}");
    }
    let json = serde_json::to_string(&r).unwrap();
    assert!(json.contains("overhead_pct") && json.contains("install_mb_s"), "{json}");
    block(gpu.sync()).unwrap();
    assert_eq!(gpu.memory().live_bytes, 0, "nothing stays live after the run");
}

/// The layer profile's input rows follow diffusers' SD1.5 UNet: 64×64 latents halve per down
/// level (down_blocks.i at level i, up_blocks.j at level 3 − j, the mid block at the bottom),
/// batch 2, and the cross-attention keys and values see the 77 prompt tokens.
#[test]
fn profile_rows_follow_the_sd15_resolutions() {
    let s = BenchShapes::sd15();
    let t = ".attentions.0.transformer_blocks.0";
    for (name, rows) in [
        (format!("down_blocks.0{t}.attn1.to_q"), 2 * 64 * 64),
        (format!("down_blocks.1{t}.ff.net.0.proj"), 2 * 32 * 32),
        (format!("down_blocks.2{t}.attn2.to_q"), 2 * 16 * 16),
        ("mid_block.attentions.0.proj_in".to_string(), 2 * 8 * 8),
        (format!("up_blocks.1{t}.attn1.to_out.0"), 2 * 16 * 16),
        (format!("up_blocks.3{t}.ff.net.2"), 2 * 64 * 64),
        (format!("up_blocks.2{t}.attn2.to_k"), 2 * 77),
        (format!("down_blocks.0{t}.attn2.to_v"), 2 * 77),
    ] {
        assert_eq!(layer_rows(&name, &s, 77), Some(rows), "{name}");
    }
    assert_eq!(layer_rows("conv_in", &s, 77), None);
    assert_eq!(layer_rows("time_embedding.linear_1", &s, 77), None);
}

/// With a CPU clock every step also records the process CPU time it took (Linux).
#[test]
fn quick_lora_bench_records_cpu_time() {
    let gpu = own_gpu();
    let opts = LoraBenchOptions {
        weights: vec![DType::Q4_0],
        adapters: vec![0, 1],
        warmup: 0,
        steps_timed: 1,
        profile: Some(false),
        file: false,
        quick: true,
        cpu_clock: Some(process_cpu_ms),
        ..Default::default()
    };
    let before = process_cpu_ms().expect("/proc/self/stat is readable on Linux");
    let t0 = std::time::Instant::now();
    let clock = move || t0.elapsed().as_secs_f64() * 1e3;
    let r = block(run_lora(&gpu, &opts, &clock)).unwrap();
    assert!(r.cpu_clock.is_some() && r.file.is_none());
    // On a software adapter the goal is judged in CPU time.
    let cpu = gpu.adapter().device_type == "Cpu";
    assert_eq!(r.goal_clock, if cpu { "process CPU time" } else { "wall clock" });
    let c = &r.cases[0];
    assert!(c.profile.is_none());
    for x in &c.steps {
        positive("step CPU ms", x.step_cpu_ms_median.expect("a CPU clock was given"));
        assert!(x.overhead_cpu_pct.is_some_and(f64::is_finite), "{x:?}");
    }
    assert_eq!(c.steps[0].overhead_cpu_pct, Some(0.0));
    // The steps' CPU time is part of what the process used meanwhile.
    let used = process_cpu_ms().unwrap() - before;
    let steps: f64 = c.steps.iter().filter_map(|x| x.step_cpu_ms_median).sum();
    assert!(steps <= used, "{steps} ms of {used} ms");
    assert!(format_lora_table(&r).contains("process CPU time"));
}
