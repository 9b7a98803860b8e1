//! `loralab bench train`: LoRA training step time and GPU memory for the demo model's UNet and
//! SD1.5's at 512x512, with and without gradient checkpointing.

use loralab::bench::lora::process_cpu_ms;
use loralab::bench::train::{format_train_table, run_train, TrainBenchOptions, TrainModel};
use loralab::model::backward::Targets;
use std::process::ExitCode;

pub const USAGE: &str = "  loralab bench train [--json] [--plain] [--quick] [--models demo,sd15] [--weights q4_0]
                      [--rank N] [--alpha F] [--targets attn] [--batch N] [--checkpointing off,on]
                      [--steps-timed N] [--warmup N] [--seed N]
                                        one LoRA training step (forward, backward, AdamW) of the
                                        demo UNet and SD1.5's at 512x512 (random weights, rank 16,
                                        batch 1, q4_0): time, adapter state and peak GPU memory
";

fn err(message: impl std::fmt::Display) -> String {
    format!("`loralab bench train`: {message}")
}

pub fn run(args: &[String]) -> Result<ExitCode, String> {
    let mut flags = super::Flags::default();
    let mut opts = TrainBenchOptions { cpu_clock: Some(process_cpu_ms), ..Default::default() };
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
            "--quick" => opts.models = TrainBenchOptions::quick().models,
            "--models" => {
                let v = value("--models")?;
                opts.models = v
                    .split(',')
                    .map(|m| TrainModel::parse(m.trim()).ok_or_else(|| err(format!("`--models {v}`: `{m}` is not valid; expected a list of demo, sd15, quick"))))
                    .collect::<Result<_, _>>()?;
            }
            "--weights" => {
                let v = value("--weights")?;
                opts.weights = loralab::DType::parse(&v).ok_or_else(|| err(format!("`--weights {v}`: expected a weight type: f32, f16, q8_0 or q4_0")))?;
            }
            "--rank" => opts.rank = count("--rank", &value("--rank")?, 1)?,
            "--alpha" => {
                let v = value("--alpha")?;
                opts.alpha = v.parse::<f32>().ok().filter(|a| a.is_finite() && *a >= 0.0).ok_or_else(|| err(format!("`--alpha {v}`: expected a number >= 0")))?;
            }
            "--targets" => {
                let v = value("--targets")?;
                opts.targets = Targets::from_name(&v).map_err(|_| err(format!("`--targets {v}`: expected a target set: attn, attn+ff or attn+ff+conv")))?;
            }
            "--batch" => opts.batch = count("--batch", &value("--batch")?, 1)?,
            "--checkpointing" => {
                let v = value("--checkpointing")?;
                opts.checkpointing = v
                    .split(',')
                    .map(|c| match c.trim() {
                        "on" => Ok(true),
                        "off" => Ok(false),
                        x => Err(err(format!("`--checkpointing {v}`: `{x}` is not valid; expected a list of off, on"))),
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--steps-timed" => opts.steps_timed = count("--steps-timed", &value("--steps-timed")?, 1)?,
            "--warmup" => opts.warmup = count("--warmup", &value("--warmup")?, 0)?,
            "--seed" => {
                let v = value("--seed")?;
                opts.seed = v.parse().map_err(|_| err(format!("`--seed {v}`: expected a whole number")))?;
            }
            other => return Err(err(format!("unknown option `{other}`"))),
        }
    }
    let gpu = super::open(&flags)?;
    let t0 = std::time::Instant::now();
    let clock = move || t0.elapsed().as_secs_f64() * 1e3;
    let report = pollster::block_on(run_train(&gpu, &opts, &clock)).map_err(|e| e.to_string())?;
    if flags.json {
        super::out(&(super::json(&report)? + "\n"));
    } else {
        super::out(&format_train_table(&report));
    }
    Ok(ExitCode::SUCCESS)
}
