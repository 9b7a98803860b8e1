//! Plain-text table of a [`LoraBenchReport`] (MB = 10⁶ bytes).

use super::LoraBenchReport;
use std::fmt::Write as _;

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn pct(p: Option<f64>) -> String {
    p.map_or_else(|| "-".to_string(), |p| format!("{p:+.1} %"))
}

/// The report as text.
pub fn format_lora_table(r: &LoraBenchReport) -> String {
    let mut s = String::new();
    let a = &r.adapters;
    let _ = writeln!(
        s,
        "adapter: {} ({}, {}), shader-f16: {}, subgroups: {}",
        r.adapter.name, r.adapter.backend, r.adapter.device_type, r.shader_f16, r.subgroups
    );
    let _ = writeln!(
        s,
        "model: {}, UNet latents {:?} (batch 2 = classifier-free guidance), prompt embeddings {:?}, weights: {}",
        r.model, r.latents, r.context, r.weights_source
    );
    let _ = writeln!(
        s,
        "adapters: {}, rank {}, alpha {} (scale {}), on {} UNet layers ({}), {:.2}M parameters each",
        a.format,
        a.rank,
        a.alpha,
        a.scale,
        a.layers,
        a.targets.join(", "),
        a.params as f64 / 1e6
    );
    let _ = writeln!(
        s,
        "0 adapters = the same adapters merged (merged weights have the base's shapes and storage type)\n"
    );
    let _ = writeln!(
        s,
        "UNet step (after {} warm-up step(s) on {:?} latents; adapter counts interleaved round by round)",
        r.warmup, r.warmup_latents
    );
    let _ = writeln!(
        s,
        "{:<7} {:>8} {:>6} {:>11} {:>10} {:>10} {:>10} {:>14} {:>11}",
        "weights", "adapters", "steps", "median ms", "min ms", "max ms", "overhead", "adapter GPU", "install ms"
    );
    for c in &r.cases {
        for x in &c.steps {
            let _ = writeln!(
                s,
                "{:<7} {:>8} {:>6} {:>11.1} {:>10.1} {:>10.1} {:>10} {:>14} {:>11.1}",
                c.weights,
                x.adapters,
                x.steps_timed,
                x.step_ms_median,
                x.step_ms_min,
                x.step_ms_max,
                pct(x.overhead_pct),
                mb(x.adapter_gpu_bytes),
                x.install_ms
            );
        }
    }
    if let Some(clock) = &r.cpu_clock {
        let _ = writeln!(s, "\nUNet step in {clock}");
        let _ = writeln!(
            s,
            "{:<7} {:>8} {:>12} {:>10} {:>10} {:>10}",
            "weights", "adapters", "median ms", "min ms", "max ms", "overhead"
        );
        for c in &r.cases {
            for x in &c.steps {
                let f = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"));
                let _ = writeln!(
                    s,
                    "{:<7} {:>8} {:>12} {:>10} {:>10} {:>10}",
                    c.weights,
                    x.adapters,
                    f(x.step_cpu_ms_median),
                    f(x.step_cpu_ms_min),
                    f(x.step_cpu_ms_max),
                    pct(x.overhead_cpu_pct)
                );
            }
        }
    }
    let _ = writeln!(s, "\nstrength change (set_strengths for every installed adapter, up to a GPU sync)");
    let _ = writeln!(
        s,
        "{:<7} {:>8} {:>7} {:>8} {:>11} {:>10} {:>10}",
        "weights", "adapters", "layers", "samples", "median ms", "min ms", "max ms"
    );
    for c in &r.cases {
        for x in &c.strength_changes {
            let _ = writeln!(
                s,
                "{:<7} {:>8} {:>7} {:>8} {:>11.3} {:>10.3} {:>10.3}",
                c.weights, x.adapters, x.layers, x.samples, x.ms_median, x.ms_min, x.ms_max
            );
        }
    }
    for c in &r.cases {
        let Some(p) = &c.profile else { continue };
        let _ = writeln!(
            s,
            "\nlayer profile, {} with {} adapter ({} ms per call; sums over the adapted layers of one step)",
            p.weights, p.adapters, p.clock
        );
        let _ = writeln!(
            s,
            "{:<60} {:>6} {:>5} {:>5} {:>3} {:>6} {:>9} {:>9} {:>9} {:>9}",
            "example layer", "rows", "K", "N", "R", "layers", "base", "down", "empty", "adapted"
        );
        for x in &p.shapes {
            let _ = writeln!(
                s,
                "{:<60} {:>6} {:>5} {:>5} {:>3} {:>6} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                x.example, x.rows, x.k, x.n, x.rank, x.layers, x.base_ms, x.down_ms, x.empty_ms, x.adapted_ms
            );
        }
        let _ = writeln!(
            s,
            "sum: base {:.1} ms; down projections {:.1} ms ({:+.1} %); adapter kernel variant {:.1} ms ({:+.1} %); \
             low-rank reduction steps {:.1} ms ({:+.1} %)",
            p.base_ms, p.down_ms, p.down_pct, p.variant_ms, p.variant_pct, p.lowrank_ms, p.lowrank_pct
        );
        let _ = writeln!(
            s,
            "(empty: the adapter kernel with data that adds nothing; adapted − empty: the R low-rank columns)"
        );
    }
    if let Some(f) = &r.file {
        let _ = writeln!(s, "\nparse + install of one adapter file ({}, from {})", f.format, f.source);
        let _ = writeln!(
            s,
            "rank {}, alpha {}: {} UNet + {} text-encoder layers, {} ({:.1} MiB); written in {:.0} ms",
            f.rank,
            f.alpha,
            f.unet_layers,
            f.text_encoder_layers,
            mb(f.file_bytes),
            f.file_bytes as f64 / (1u64 << 20) as f64,
            f.write_ms
        );
        let _ = writeln!(s, "read_lora: {:.0} ms, {:.0} MB/s", f.parse_ms, f.parse_mb_s);
        let _ = writeln!(
            s,
            "install ({} base, UNet + text encoder): {:.0} ms, {:.0} MB/s of file; {} on the GPU",
            f.weights,
            f.install_ms,
            f.install_mb_s,
            mb(f.adapter_gpu_bytes)
        );
    }
    let cpu = r.goal_clock != "wall clock";
    let one: Vec<String> = r
        .cases
        .iter()
        .filter_map(|c| {
            let x = c.steps.iter().find(|x| x.adapters == 1)?;
            Some(format!("{} {}", c.weights, pct(x.judged_overhead(cpu))))
        })
        .collect();
    let met = match r.goal_met {
        Some(true) => "met",
        Some(false) => "not met",
        None => "n/a (needs a full-size run with 0 and 1 adapters)",
    };
    let _ = writeln!(s, "\ngoal: {}\n  one adapter ({}): {}; {}", r.goal, r.goal_clock, one.join(", "), met);
    s
}
