//! `loralab bench train` smoke run: the quick configuration through the library function (the
//! report's structure, every figure a positive finite measurement, checkpointing lowering the
//! peak), and the command line's table and errors. No timing bounds: the machine is shared.

use super::common::block;
use loralab::bench::train::{format_train_table, run_train, TrainBenchOptions, TrainModel};
use loralab::{Gpu, GpuOptions};

/// A device of its own: the pool's peak must not see other tests' tensors.
fn own_gpu() -> Gpu {
    // SAFETY: called before this test's device exists; no environment is read concurrently.
    unsafe { loralab::gpu::ensure_xdg_runtime_dir() };
    block(Gpu::new(GpuOptions::default())).expect("GPU tests need an adapter")
}

#[test]
fn quick_train_bench_reports_both_checkpointing_cases() {
    let gpu = own_gpu();
    let opts = TrainBenchOptions { steps_timed: 2, ..TrainBenchOptions::quick() };
    let t0 = std::time::Instant::now();
    let clock = move || t0.elapsed().as_secs_f64() * 1e3;
    let r = block(run_train(&gpu, &opts, &clock)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((r.rank, r.alpha, r.batch, r.targets.as_str(), r.weights.as_str()), (16, 8.0, 1, "attn", "q4_0"));
    assert_eq!(r.goal_met, None, "the quick configuration is not judged");
    assert_eq!(r.cases.len(), 2);
    for c in &r.cases {
        assert_eq!(c.model, TrainModel::Quick);
        assert_eq!(c.latents, [1, 4, 16, 16]);
        assert_eq!(c.steps_timed, 2);
        // The quick UNet's 4 transformers × 8 attention projections; A [16, K] and B [N, 16].
        assert_eq!(c.adapter_layers, 32, "{c:?}");
        assert!(c.adapter_params > 0 && c.adapter_state_bytes >= 16 * c.adapter_params, "{c:?}");
        for (what, v) in [("median", c.step_ms_median), ("min", c.step_ms_min), ("max", c.step_ms_max)] {
            assert!(v.is_finite() && v > 0.0, "{what} {v}");
        }
        assert!(c.step_ms_min <= c.step_ms_median && c.step_ms_median <= c.step_ms_max);
        assert!(c.loss.is_finite() && c.loss > 0.0);
        assert!(c.peak_bytes > c.unet_weight_bytes + c.adapter_state_bytes, "{c:?}");
        assert_eq!(c.beyond_weights_bytes, c.peak_bytes - c.unet_weight_bytes);
    }
    let (off, on) = (&r.cases[0], &r.cases[1]);
    assert!(!off.checkpointing && on.checkpointing);
    assert_eq!((off.unet_weight_bytes, off.adapter_params), (on.unet_weight_bytes, on.adapter_params));
    assert!(on.peak_bytes < off.peak_bytes, "checkpointing must lower the peak: {} vs {}", on.peak_bytes, off.peak_bytes);
    let table = format_train_table(&r);
    assert!(table.contains("quick (16x16 latents)") && table.contains("not judged"), "{table}");
}

#[test]
fn bench_train_cli_prints_the_table_and_refuses_bad_options() {
    let run = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_loralab")).args(["bench", "train"]).args(args).output().expect("run");
    let o = run(&["--quick", "--checkpointing", "on", "--steps-timed", "1", "--warmup", "0", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON report");
    assert_eq!(v["cases"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["cases"][0]["checkpointing"], true);
    for (args, want) in [
        (&["--models", "sdxl"][..], "`--models sdxl`"),
        (&["--checkpointing", "maybe"], "`--checkpointing maybe`"),
        (&["--rank", "0"], "`--rank 0`"),
        (&["--frob"], "unknown option `--frob`"),
    ] {
        let o = run(args);
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
        assert!(e.contains(want), "{args:?}: {e}");
    }
}
