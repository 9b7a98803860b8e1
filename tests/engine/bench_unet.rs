//! `loralab bench unet` smoke run: the quick configuration with random weights through the
//! library function (no timing assertions), plus the memory accounting the report relies on.

use super::common::block;
use loralab::bench::unet::{
    format_unet_table, measure_decode, measure_staged, measure_step, run_unet, BenchShapes, UnetBenchOptions,
};
use loralab::{DType, Gpu, GpuOptions};

/// A device of its own: the pool's peak counters must not see other tests' tensors.
fn own_gpu() -> Gpu {
    // SAFETY: called before this test's device exists; no environment is read concurrently.
    unsafe { loralab::gpu::ensure_xdg_runtime_dir() };
    block(Gpu::new(GpuOptions::default())).expect("GPU tests need an adapter")
}

#[test]
fn quick_unet_bench_reports_every_weight_type() {
    let gpu = own_gpu();
    let opts = UnetBenchOptions { weights: DType::ALL.to_vec(), warmup: 0, steps_timed: 1, quick: true, seed: 1 };
    let t0 = std::time::Instant::now();
    let clock = move || t0.elapsed().as_secs_f64() * 1e3;
    let r = block(run_unet(&gpu, &opts, &clock)).unwrap();
    assert_eq!(r.cases.len(), 4);
    assert_eq!(r.goal_met_all_loaded, None, "the goal is judged on full-size runs only");
    for c in &r.cases {
        let p = &c.pipeline;
        assert!(c.step_ms_median > 0.0 && c.unet_params > 0, "{c:?}");
        assert_eq!(p.unet_weight_bytes, c.unet_weight_bytes);
        assert!(p.text_encoder_weight_bytes > 0 && p.vae_decoder_weight_bytes > 0 && p.step_peak_bytes > 0, "{p:?}");
        // Everything resident at once holds at least the three components' weights.
        let weights = p.text_encoder_weight_bytes + p.unet_weight_bytes + p.vae_decoder_weight_bytes;
        assert!(p.all_loaded_peak_bytes.unwrap() > weights, "{p:?}");
        assert!(p.staged_peak_bytes.unwrap() <= p.all_loaded_peak_bytes.unwrap(), "{p:?}");
    }
    // Smaller weight types hold fewer bytes.
    let w: Vec<u64> = r.cases.iter().map(|c| c.unet_weight_bytes).collect();
    assert!(w[0] > w[1] && w[1] > w[2] && w[2] > w[3], "{w:?}");
    let table = format_unet_table(&r);
    assert!(table.contains("q4_0") && table.contains("1.2 GB"), "{table}");
    assert!(serde_json::to_string(&r).unwrap().contains("all_loaded_peak_bytes"));
    // Nothing is left live after the run.
    assert_eq!(gpu.memory().live_bytes, 0);

    // The staged figure, computed from the measured parts, is what running that order measures.
    for (i, dt) in [DType::F32, DType::Q4_0].into_iter().enumerate() {
        let measured = block(measure_staged(&gpu, &BenchShapes::quick(), dt, 1)).unwrap();
        let case = &r.cases[if i == 0 { 0 } else { 3 }];
        assert_eq!(Some(measured), case.pipeline.staged_peak_bytes, "{dt}");
    }
}

/// The decode and a UNet step measured alone agree with the whole-pipeline run's phases.
#[test]
fn quick_decode_measured_alone_matches_the_pipeline_phase() {
    let gpu = own_gpu();
    let s = BenchShapes::quick();
    let opts = UnetBenchOptions { weights: vec![DType::Q4_0], warmup: 0, steps_timed: 1, quick: true, seed: 1 };
    let t0 = std::time::Instant::now();
    let clock = move || t0.elapsed().as_secs_f64() * 1e3;
    let r = block(run_unet(&gpu, &opts, &clock)).unwrap();
    let p = &r.cases[0].pipeline;
    for read_back in [true, false] {
        let d = block(measure_decode(&gpu, &s, DType::Q4_0, 1, read_back)).unwrap();
        assert_eq!(d.vae_decoder_weight_bytes, p.vae_decoder_weight_bytes);
        assert_eq!(Some(d.decode_peak_bytes), p.decode_peak_bytes, "read_back {read_back}");
        let step = block(measure_step(&gpu, &s, DType::Q4_0, 1, read_back)).unwrap();
        assert_eq!(step, p.step_peak_bytes, "read_back {read_back}");
    }
    block(gpu.sync()).unwrap();
    assert_eq!(gpu.memory().live_bytes, 0);
}

/// SD1.5 peaks at q4_0, recorded without waiting for the GPU: one UNet step at 64×64 latents
/// (batch 2), the VAE decode (f16 decoder matrices) at 256×256 and, where the adapter's
/// storage-binding limit allows its 256 MiB activations, 512×512:
/// `cargo test -p loralab --test engine sd15_decode_peak -- --ignored --nocapture`.
#[test]
#[ignore]
fn sd15_decode_peak() {
    // A device per measurement, never waited for: each figure is known once its work is
    // recorded, and the process exits without running it.
    let gpu = own_gpu();
    let step = block(measure_step(&gpu, &BenchShapes::sd15(), DType::Q4_0, 0, false)).unwrap();
    println!("SD1.5 UNet step [2, 4, 64, 64] (q4_0): activation peak {step} bytes");
    std::mem::forget(gpu);
    for side in [32usize, 64] {
        let gpu = own_gpu();
        let s = BenchShapes { latents: [2, 4, side, side], ..BenchShapes::sd15() };
        match block(measure_decode(&gpu, &s, DType::Q4_0, 0, false)) {
            Ok(d) => println!(
                "SD1.5 {0}x{0} VAE decode (q4_0 plan): decoder weights {1} bytes, decode peak {2} bytes",
                side * 8,
                d.vae_decoder_weight_bytes,
                d.decode_peak_bytes
            ),
            Err(e) => println!("SD1.5 {0}x{0} VAE decode: {e}", side * 8),
        }
        std::mem::forget(gpu);
    }
}
