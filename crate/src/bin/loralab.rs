//! The `loralab` command line: adapter information, the kernel self-test and text-to-image
//! generation on this machine's GPU (Vulkan / Metal / DX12 / GL through wgpu).

#[path = "loralab/bench_lora.rs"]
mod bench_lora;
#[path = "loralab/bench_train.rs"]
mod bench_train;
#[path = "loralab/eval.rs"]
mod eval;
#[path = "loralab/generate.rs"]
mod generate;
#[path = "loralab/lora.rs"]
mod lora;
#[path = "loralab/lora_tools.rs"]
mod lora_tools;
#[path = "loralab/merge.rs"]
mod merge;
#[path = "loralab/train.rs"]
mod train;

use loralab::selftest::{self, DeviceInfo, SelfTestReport};
use loralab::{Gpu, GpuOptions};
use std::process::ExitCode;

const USAGE: &str = "\
loralab: Stable-Diffusion-class engine on WebGPU

Usage:
  loralab info [--json] [--plain]       adapter, backend, driver, limits, features, engine state
  loralab selftest [--json] [--plain]   every kernel against its CPU reference (exit 1 on failure)
  loralab bench kernels [--json] [--plain] [--quick] [--iters N] [--warmup N] [--filter TEXT]
                                        GFLOP/s and GB/s of matmul (f32/f16/q8_0/q4_0), conv2d 3x3
                                        and attention at Stable Diffusion 1.5 shapes
  loralab bench unet [--json] [--plain] [--quick] [--weights f32,f16,q8_0,q4_0] [--steps-timed N]
                     [--warmup N] [--seed N]
                                        one SD1.5 UNet step (64x64 latents, batch 2) per weight type
                                        with random weights: time and peak memory, plus the whole
                                        512x512 pipeline's peak memory
{BENCH_LORA}{BENCH_TRAIN}{EVAL}{GENERATE}{LORA}{MERGE}{TRAIN}  loralab help                          this text

Options:
  --json    machine-readable output on stdout
  --plain   do not use shader-f16 or subgroups even where the adapter has them
            (the path a browser without those features takes)

Environment:
  WGPU_BACKEND=vulkan|gl|metal|dx12   choose the native backend
  WGPU_ADAPTER_NAME=<substring>       choose an adapter by name
";

fn usage() -> String {
    USAGE.replace("{BENCH_LORA}", bench_lora::USAGE).replace("{BENCH_TRAIN}", bench_train::USAGE).replace("{EVAL}", eval::USAGE).replace("{GENERATE}", generate::USAGE).replace("{LORA}", &format!("{}{}", lora::USAGE, lora_tools::USAGE)).replace("{MERGE}", merge::USAGE).replace("{TRAIN}", train::USAGE)
}

/// Options shared by the subcommands.
#[derive(Default)]
struct Flags {
    json: bool,
    plain: bool,
}

fn parse_flags(cmd: &str, args: &[String]) -> Result<Flags, String> {
    let mut f = Flags::default();
    for a in args {
        match a.as_str() {
            "--json" => f.json = true,
            "--plain" => f.plain = true,
            other => return Err(format!("`loralab {cmd}`: unknown option `{other}`")),
        }
    }
    Ok(f)
}

fn open(flags: &Flags) -> Result<Gpu, String> {
    let opts = GpuOptions {
        disable_f16: flags.plain,
        disable_subgroups: flags.plain,
        ..Default::default()
    };
    pollster::block_on(Gpu::new(opts)).map_err(|e| e.to_string())
}

/// Appends a line to a String (formatting into a String cannot fail).
macro_rules! w {
    ($o:expr) => { $o.push('\n') };
    ($o:expr, $($t:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($o, $($t)*);
    }};
}

/// Writes to stdout; a closed pipe (`loralab info | head`) is not an error.
fn out(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, String> {
    serde_json::to_string_pretty(v).map_err(|e| format!("serialising the report failed: {e}"))
}

fn mib(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn format_info(d: &DeviceInfo) -> String {
    let mut o = String::new();
    let a = &d.adapter;
    let c = &d.caps;
    w!(o, "adapter      {}", a.name);
    w!(o, "backend      {}", a.backend);
    w!(o, "device type  {}", a.device_type);
    w!(o, "vendor/dev   {:#06x} / {:#06x}", a.vendor, a.device);
    let driver = [a.driver.as_str(), a.driver_info.as_str()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    w!(o, "driver       {}", if driver.is_empty() { "(not reported)" } else { &driver });
    w!(o);
    w!(o, "features used by the kernels");
    w!(o, "  shader-f16        {}", yes_no(c.shader_f16));
    let sg = if c.subgroups {
        format!("yes (size {}..{})", c.subgroup_min_size, c.subgroup_max_size)
    } else {
        "no".to_string()
    };
    w!(o, "  subgroups         {sg}");
    w!(o, "  timestamp-query   {}", yes_no(c.timestamp_query));
    w!(o);
    w!(o, "limits");
    w!(o, "  max buffer size                   {}", mib(c.max_buffer_size));
    w!(o, "  max storage buffer binding        {}", mib(c.max_storage_buffer_binding_size));
    w!(o, "  storage buffers per stage         {}", c.max_storage_buffers_per_stage);
    w!(o, "  workgroup storage                 {}", mib(c.max_workgroup_storage as u64));
    w!(o, "  invocations per workgroup         {}", c.max_invocations_per_workgroup);
    w!(o, "  workgroup size x                  {}", c.max_workgroup_size_x);
    w!(o, "  workgroups per dimension          {}", c.max_workgroups_per_dimension);
    w!(o, "  storage offset alignment          {}", c.min_storage_offset_alignment);
    w!(o);
    w!(o, "adapter features  {}", d.adapter_features.join(", "));
    w!(o);
    w!(o, "engine");
    w!(o, "  pipelines compiled    {}", d.pipelines);
    w!(o, 
        "  buffer pool           {} live, {} peak, {} kept for reuse",
        mib(d.memory.live_bytes),
        mib(d.memory.peak_live_bytes),
        mib(d.memory.free_bytes)
    );
    o
}

fn format_selftest(r: &SelfTestReport) -> String {
    let mut o = String::new();
    w!(o, "self-test on {} ({}, {})", r.adapter.name, r.adapter.backend, r.adapter.device_type);
    w!(o, 
        "f16 {}, subgroups {}; families: {}",
        yes_no(r.caps.shader_f16),
        yes_no(r.caps.subgroups),
        r.families.join(", ")
    );
    w!(o);
    w!(o, "{:<4} {:<26} {:<44} {:>10} {:>8} {:>8}", "", "op", "case", "nmse", "bound", "ms");
    for c in &r.cases {
        w!(o, 
            "{:<4} {:<26} {:<44} {:>10.2e} {:>8.0e} {:>8.1}",
            if c.passed { "ok" } else { "FAIL" },
            c.op,
            c.case,
            c.nmse,
            c.bound,
            c.ms
        );
        if let Some(e) = &c.error {
            w!(o, "       {e}");
        }
    }
    w!(o);
    w!(o, 
        "{} of {} cases passed in {:.0} ms",
        r.cases.len() - r.failed,
        r.cases.len(),
        r.total_ms
    );
    o
}

fn info(args: &[String]) -> Result<ExitCode, String> {
    let flags = parse_flags("info", args)?;
    let gpu = open(&flags)?;
    let d = selftest::describe(&gpu);
    if flags.json {
        out(&(json(&d)? + "\n"));
    } else {
        out(&format_info(&d));
    }
    Ok(ExitCode::SUCCESS)
}

fn run_selftest(args: &[String]) -> Result<ExitCode, String> {
    let flags = parse_flags("selftest", args)?;
    let gpu = open(&flags)?;
    let r = pollster::block_on(selftest::run(&gpu));
    if flags.json {
        out(&(json(&r)? + "\n"));
    } else {
        out(&format_selftest(&r));
    }
    Ok(if r.passed { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn run_bench(args: &[String]) -> Result<ExitCode, String> {
    let (what, rest) = match args.split_first() {
        Some((w, r)) if !w.starts_with("--") => (w.as_str(), r),
        _ => return Err("`loralab bench` needs a suite: `loralab bench kernels`, `loralab bench unet`, `loralab bench lora` or `loralab bench train`".to_string()),
    };
    match what {
        "kernels" => {}
        "unet" => return run_bench_unet(rest),
        "lora" => return bench_lora::run(rest),
        "train" => return bench_train::run(rest),
        _ => return Err(format!("`loralab bench {what}`: unknown suite (available: kernels, unet, lora, train)")),
    }
    let mut flags = Flags::default();
    let mut opts = loralab::bench::BenchOptions::default();
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next().cloned().ok_or_else(|| format!("`loralab bench`: option `{name}` needs a value"))
        };
        match a.as_str() {
            "--json" => flags.json = true,
            "--plain" => flags.plain = true,
            "--quick" => opts.quick = true,
            "--iters" => {
                let v = value("--iters")?;
                opts.iters = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    format!("`loralab bench`: `--iters {v}`: expected a positive whole number")
                })?;
            }
            "--warmup" => {
                let v = value("--warmup")?;
                opts.warmup = v.parse().map_err(|_| {
                    format!("`loralab bench`: `--warmup {v}`: expected a whole number")
                })?;
            }
            "--filter" => opts.filter = Some(value("--filter")?),
            other => return Err(format!("`loralab bench`: unknown option `{other}`")),
        }
    }
    let gpu = open(&flags)?;
    let t0 = std::time::Instant::now();
    let clock = move || t0.elapsed().as_secs_f64() * 1e3;
    let report = pollster::block_on(loralab::bench::run_kernels(&gpu, &opts, &clock))
        .map_err(|e| e.to_string())?;
    if flags.json {
        out(&(json(&report)? + "\n"));
    } else {
        out(&loralab::bench::format_table(&report));
    }
    Ok(ExitCode::SUCCESS)
}

fn run_bench_unet(args: &[String]) -> Result<ExitCode, String> {
    use loralab::bench::unet;
    let mut flags = Flags::default();
    let mut opts = unet::UnetBenchOptions::default();
    let mut it = args.iter();
    let count = |name: &str, v: &str, min: usize| {
        v.parse::<usize>().ok().filter(|n| *n >= min).ok_or_else(|| {
            format!("`loralab bench unet`: `{name} {v}`: expected a whole number of at least {min}")
        })
    };
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next().cloned().ok_or_else(|| format!("`loralab bench unet`: option `{name}` needs a value"))
        };
        match a.as_str() {
            "--json" => flags.json = true,
            "--plain" => flags.plain = true,
            "--quick" => opts.quick = true,
            "--steps-timed" => opts.steps_timed = count("--steps-timed", &value("--steps-timed")?, 1)?,
            "--warmup" => opts.warmup = count("--warmup", &value("--warmup")?, 0)?,
            "--seed" => {
                let v = value("--seed")?;
                opts.seed = v.parse().map_err(|_| format!("`loralab bench unet`: `--seed {v}`: expected a whole number"))?;
            }
            "--weights" => {
                let v = value("--weights")?;
                opts.weights = v
                    .split(',')
                    .map(|w| {
                        loralab::DType::parse(w.trim()).ok_or_else(|| {
                            format!("`loralab bench unet`: `--weights {v}`: unknown weight type `{w}`; expected a comma-separated list of f32, f16, q8_0, q4_0")
                        })
                    })
                    .collect::<Result<_, _>>()?;
            }
            other => return Err(format!("`loralab bench unet`: unknown option `{other}`")),
        }
    }
    let gpu = open(&flags)?;
    let t0 = std::time::Instant::now();
    let clock = move || t0.elapsed().as_secs_f64() * 1e3;
    let report = pollster::block_on(unet::run_unet(&gpu, &opts, &clock)).map_err(|e| e.to_string())?;
    if flags.json {
        out(&(json(&report)? + "\n"));
    } else {
        out(&unet::format_unet_table(&report));
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { loralab::gpu::ensure_xdg_runtime_dir() };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r),
        None => {
            out(&usage());
            return ExitCode::from(2);
        }
    };
    let result = match cmd {
        "info" => info(rest),
        "selftest" | "self-test" => run_selftest(rest),
        "bench" => run_bench(rest),
        "eval" => eval::run(rest),
        "generate" => generate::run(rest),
        "lora" => lora::run(rest),
        "merge" => merge::run(rest),
        "train" => train::run(rest),
        "help" | "--help" | "-h" => {
            out(&usage());
            Ok(ExitCode::SUCCESS)
        }
        other => {
            eprintln!("loralab: unknown command `{other}`; run `loralab help` for the list");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("loralab: {msg}");
            // Bad options are usage errors (2); a missing GPU or failed run is 1.
            if msg.contains("unknown option") || msg.contains("needs a") || msg.contains("expected a") || msg.contains("unknown suite") || msg.contains("unknown subcommand") {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
