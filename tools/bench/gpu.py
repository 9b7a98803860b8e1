#!/usr/bin/env python3
"""loralab vs diffusers/torch: one UNet step on the same GPU, random weights, one command.

  python tools/bench/gpu.py [--loralab PATH] [--steps-timed 5] [--warmup 2] [--json-out FILE]
  python tools/bench/gpu.py --quick        # tiny config on the CPU: checks the script end to end

Default: Stable Diffusion 1.5's UNet shapes (859.5 M parameters), latents [2, 4, 64, 64]
(batch 2 = classifier-free guidance), prompt embeddings [2, 77, 768], timestep 981.
- loralab: `loralab bench unet --json --weights f32,f16` (Vulkan through wgpu; random weights
  from its own generator) — its step is: upload the latents, the UNet forward, read back.
- diffusers: `UNet2DConditionModel` with the same config and random weights (torch's default
  initialisation, torch.manual_seed(0)) in fp32 and fp16 on CUDA; the step is the same: the
  latents copied from host memory, the forward pass, the prediction copied back (`.cpu()`,
  which waits for the GPU).
- With --kernels, also `loralab bench kernels --json`, and with --fp32-peak-tflops P each
  kernel's throughput as a fraction of that FP32 peak (H200: about 67).

--quick uses loralab's small configuration (`bench unet --quick`: block_out_channels
(32, 64), latents [2, 4, 16, 16]) and the same config in torch on the CPU (fp32 only unless a
GPU is present). Prints a JSON report with both engines' median / min / max step times and the
ratios loralab / torch (lower is better for loralab).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

SD15 = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}
# loralab's `bench unet --quick` configuration (crate/src/bench/unet.rs, BenchShapes::quick).
QUICK = {
    **SD15,
    "sample_size": 16,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 2,
    "cross_attention_dim": 32,
}


def summary(ms: list[float]) -> dict:
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "runs": len(ms)}


def default_loralab() -> str:
    target = os.environ.get("CARGO_TARGET_DIR", str(REPO / "target"))
    return str(Path(target) / "release" / "loralab")


def run_loralab(exe: str, args: list[str]) -> dict:
    cmd = [exe, "bench", *args, "--json"]
    print("# " + " ".join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    start = p.stdout.find("{")
    if start < 0:
        sys.exit(f"{' '.join(cmd)} printed no JSON report:\n{p.stdout[-2000:]}")
    return json.loads(p.stdout[start:])


def torch_steps(cfg: dict, device: str, dtype_name: str, warmup: int, timed: int) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype_name]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).to(device=device, dtype=dtype).eval()
    hw = cfg["sample_size"]
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, cfg["in_channels"], hw, hw, generator=g).to(dtype).numpy()
    ctx = torch.randn(2, 77, cfg["cross_attention_dim"], generator=g).to(device=device, dtype=dtype)
    t = torch.tensor([981.0, 981.0], device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    ms = []
    with torch.inference_mode():
        for i in range(warmup + timed):
            sync()
            t0 = time.perf_counter()
            x = torch.from_numpy(sample).to(device)
            out = unet(x, t, ctx, return_dict=False)[0].float().cpu()
            dt = (time.perf_counter() - t0) * 1000
            if not torch.isfinite(out).all():
                sys.exit(f"torch {dtype_name} on {device}: non-finite output")
            if i >= warmup:
                ms.append(dt)
    params = sum(p.numel() for p in unet.parameters())
    del unet
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"dtype": dtype_name, "device": device, "parameters": params, **summary(ms)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loralab", default=default_loralab(), help="the loralab binary (default: $CARGO_TARGET_DIR/release/loralab)")
    ap.add_argument("--quick", action="store_true", help="tiny config (CPU check of the script)")
    ap.add_argument("--steps-timed", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--kernels", action="store_true", help="also run `loralab bench kernels`")
    ap.add_argument("--fp32-peak-tflops", type=float, default=None)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    import torch
    import diffusers

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not args.quick and not cuda:
        sys.exit("no CUDA device: the full-size comparison needs a GPU (use --quick for a CPU check)")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = QUICK if args.quick else SD15
    report: dict = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python tools/bench/gpu.py " + " ".join(sys.argv[1:]),
        "config": "quick (loralab bench unet --quick)" if args.quick else "SD1.5 UNet",
        "latents": [2, 4, cfg["sample_size"], cfg["sample_size"]],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "torch_device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }
    lora_args = ["unet", "--weights", "f32,f16", "--steps-timed", str(args.steps_timed), "--warmup", str(args.warmup)]
    if args.quick:
        lora_args.append("--quick")
    lr = run_loralab(args.loralab, lora_args)
    if list(lr["latents"]) != report["latents"]:
        sys.exit(f"loralab ran latents {lr['latents']}, torch would run {report['latents']}: the configs differ")
    report["loralab"] = {
        "adapter": lr["adapter"],
        "cases": [
            {"weights": c["weights"], "parameters": c["unet_params"], "median_ms": c["step_ms_median"],
             "min_ms": c["step_ms_min"], "max_ms": c["step_ms_max"], "runs": c["steps_timed"]}
            for c in lr["cases"]
        ],
    }
    report["torch_runs"] = []
    for dt in ["fp32", "fp16"] if cuda else ["fp32"]:
        print(f"# diffusers {dt} on {device}", file=sys.stderr, flush=True)
        report["torch_runs"].append(torch_steps(cfg, device, dt, args.warmup, args.steps_timed))
    for c in report["loralab"]["cases"]:
        for t in report["torch_runs"]:
            if c["parameters"] != t["parameters"]:
                sys.exit(f"parameter counts differ: loralab {c['parameters']}, torch {t['parameters']}")
    # loralab f32 weights against torch fp32; loralab f16 weights (f32 arithmetic) against torch fp16.
    pairs = {"f32": "fp32", "f16": "fp16"}
    report["ratios"] = [
        {"loralab": c["weights"], "torch": t["dtype"], "ratio": c["median_ms"] / t["median_ms"]}
        for c in report["loralab"]["cases"]
        for t in report["torch_runs"]
        if pairs.get(c["weights"]) == t["dtype"] or (not cuda and t["dtype"] == "fp32")
    ]
    if args.kernels:
        k = run_loralab(args.loralab, ["kernels", *(["--quick"] if args.quick else [])])
        rows = k.get("results", [])
        if args.fp32_peak_tflops:
            for r in rows:
                r["fraction_of_fp32_peak"] = r.get("gflops", 0) / (args.fp32_peak_tflops * 1000)
        report["kernels"] = {"adapter": k.get("adapter"), "fp32_peak_tflops": args.fp32_peak_tflops, "results": rows}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    for r in report["ratios"]:
        print(f"# loralab {r['loralab']} / torch {r['torch']}: {r['ratio']:.2f}", file=sys.stderr)


if __name__ == "__main__":
    main()
