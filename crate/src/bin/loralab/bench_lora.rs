//! `loralab bench lora`: UNet step time with 0, 1, 4 and 8 unmerged rank-16 adapters, the cost
//! of a strength change, and parse + install throughput of a 144 MiB kohya file.

use loralab::bench::lora::{format_lora_table, process_cpu_ms, run_lora, LoraBenchOptions};
use std::process::ExitCode;

pub const USAGE: &str = "  loralab bench lora [--json] [--plain] [--quick] [--weights f16,q4_0] [--adapters 0,1,4,8]
                     [--steps-timed N] [--warmup N] [--small-warmup] [--strength-samples N]
                     [--profile | --no-profile] [--no-file] [--file-rank N] [--seed N]
                                        SD1.5 UNet step (64x64 latents, batch 2) with N rank-16
                                        LoRAs unmerged vs merged (0), strength-change time, parse and
                                        install MB/s of a rank-128 kohya file (144 MiB); --profile
                                        splits one adapter's cost per layer (default: when over 5 %);
                                        --small-warmup warms up on 16x16 latents (slow adapters)
";

fn err(message: impl std::fmt::Display) -> String {
    format!("`loralab bench lora`: {message}")
}

fn list<T>(name: &str, v: &str, parse: impl Fn(&str) -> Option<T>, expected: &str) -> Result<Vec<T>, String> {
    v.split(',')
        .map(|x| parse(x.trim()).ok_or_else(|| err(format!("`{name} {v}`: `{x}` is not valid; expected a comma-separated list of {expected}"))))
        .collect()
}

pub fn run(args: &[String]) -> Result<ExitCode, String> {
    let mut flags = super::Flags::default();
    // Process CPU time beside wall time: on a software adapter the work a step took.
    let mut opts = LoraBenchOptions { cpu_clock: Some(process_cpu_ms), ..Default::default() };
    let count = |name: &str, v: &str, min: usize| {
        v.parse::<usize>()
            .ok()
            .filter(|n| *n >= min)
            .ok_or_else(|| err(format!("`{name} {v}`: expected a whole number of at least {min}")))
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or_else(|| err(format!("option `{name}` needs a value")));
        match a.as_str() {
            "--json" => flags.json = true,
            "--plain" => flags.plain = true,
            "--quick" => opts.quick = true,
            "--profile" => opts.profile = Some(true),
            "--no-profile" => opts.profile = Some(false),
            "--no-file" => opts.file = false,
            "--small-warmup" => opts.small_warmup = true,
            "--steps-timed" => opts.steps_timed = count("--steps-timed", &value("--steps-timed")?, 1)?,
            "--warmup" => opts.warmup = count("--warmup", &value("--warmup")?, 0)?,
            "--strength-samples" => opts.strength_samples = count("--strength-samples", &value("--strength-samples")?, 1)?,
            "--file-rank" => opts.file_rank = Some(count("--file-rank", &value("--file-rank")?, 1)?),
            "--seed" => {
                let v = value("--seed")?;
                opts.seed = v.parse().map_err(|_| err(format!("`--seed {v}`: expected a whole number")))?;
            }
            "--weights" => {
                let v = value("--weights")?;
                opts.weights = list("--weights", &v, loralab::DType::parse, "f32, f16, q8_0, q4_0")?;
            }
            "--adapters" => {
                let v = value("--adapters")?;
                opts.adapters = list("--adapters", &v, |x| x.parse::<usize>().ok(), "adapter counts such as 0,1,4,8")?;
            }
            other => return Err(err(format!("unknown option `{other}`"))),
        }
    }
    let gpu = super::open(&flags)?;
    let t0 = std::time::Instant::now();
    let clock = move || t0.elapsed().as_secs_f64() * 1e3;
    let report = pollster::block_on(run_lora(&gpu, &opts, &clock)).map_err(|e| e.to_string())?;
    if flags.json {
        super::out(&(super::json(&report)? + "\n"));
    } else {
        super::out(&format_lora_table(&report));
    }
    Ok(ExitCode::SUCCESS)
}
