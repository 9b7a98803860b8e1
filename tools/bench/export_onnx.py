#!/usr/bin/env python3
"""Export the UNets of the browser benchmark to ONNX (onnxruntime-web runs them; loralab runs
the same weights from the diffusers folder written next to them).

Models (each in OUT/<name>/):
  demo  the web app's demo model (www/models/demo/unet, f16 weights on disk, exported in f32),
        8x8 latents (its sample_size), batch 2 (classifier-free guidance).
  mid   an SD1.5-architecture UNet with block_out_channels (128, 256, 512), layers_per_block 2,
        8 attention heads, cross_attention_dim 768, random weights (torch.manual_seed(0)),
        32x32 latents, batch 2. Saved as a diffusers folder (unet/config.json +
        unet/diffusion_pytorch_model.safetensors, f32) so loralab loads the very same weights.

For every model OUT/<name>/ gets unet/ (the diffusers folder), unet.onnx (f32, one file,
static shapes: sample [2,4,h,w], timestep [2], encoder_hidden_states [2,77,D] -> out_sample
[2,4,h,w]), with --f16 also unet-f16.onnx (every tensor f16), and meta.json (shapes,
parameter count, the onnxruntime CPU check against torch, versions). A model whose meta.json
already matches this script's settings is skipped unless --force is given.

Each exported f32 graph is run with onnxruntime on the CPU on seeded inputs and compared with
the torch module; the export fails if the relative error exceeds 1e-4.

  ~/.cache/loralab/fixtures-venv/bin/python tools/bench/export_onnx.py [--out DIR] [--models demo,mid] [--f16]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_OUT = Path.home() / ".cache/loralab/bench-onnx"
# Bump when the exported graphs or the folder layout change (forces a re-export).
FORMAT = 1

MID_CONFIG = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [128, 256, 512],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}


def pinned() -> dict[str, str]:
    out = {}
    for req in (REPO / "tools/fixtures/requirements.txt", HERE / "requirements.txt"):
        for line in req.read_text().splitlines():
            line = line.split("#")[0].strip()
            if "==" in line:
                name, ver = line.split("==")
                out[name.strip()] = ver.strip()
    return out


def check_versions(names: list[str], allow: bool) -> dict[str, str]:
    from importlib.metadata import version

    want = pinned()
    have = {n: version(n) for n in names}
    bad = [f"{n}: pinned {want[n]}, installed {have[n]}" for n in names if n in want and have[n].split("+")[0] != want[n]]
    if bad:
        msg = "package versions differ from the pins (tools/bench/requirements.txt, tools/fixtures/requirements.txt):\n  " + "\n  ".join(bad)
        if not allow:
            sys.exit(msg + "\n(re-run with --allow-version-mismatch to export anyway)")
        print("warning: " + msg, file=sys.stderr)
    return have


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inputs(torch, cfg: dict, hw: int, dtype):
    """Seeded example inputs: latents, one timestep per batch item, prompt embeddings."""
    g = torch.Generator().manual_seed(1234)
    sample = torch.randn(2, cfg["in_channels"], hw, hw, generator=g)
    timestep = torch.tensor([981.0, 981.0])
    ctx = torch.randn(2, 77, cfg["cross_attention_dim"], generator=g)
    return sample.to(dtype), timestep.to(dtype), ctx.to(dtype)


def export(torch, unet, cfg: dict, hw: int, path: Path, dtype) -> float:
    """Exports `unet` at `dtype` to `path` (one file); returns the export time in seconds."""

    class Step(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    m = Step(unet.to(dtype)).eval()
    args = inputs(torch, cfg, hw, dtype)
    t0 = time.time()
    with torch.no_grad():
        prog = torch.onnx.export(
            m,
            args,
            dynamo=True,
            input_names=["sample", "timestep", "encoder_hidden_states"],
            output_names=["out_sample"],
            external_data=False,
            optimize=True,
        )
    prog.save(str(path), external_data=False)
    return time.time() - t0


def check_cpu(torch, unet, cfg: dict, hw: int, path: Path) -> dict:
    """Runs the f32 graph with onnxruntime's CPU provider and compares it with torch."""
    import numpy as np
    import onnxruntime as ort

    sample, t, ctx = inputs(torch, cfg, hw, torch.float32)
    with torch.no_grad():
        want = unet.float()(sample, t, ctx, return_dict=False)[0].numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["out_sample"], {"sample": sample.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ctx.numpy()})[0]
    err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    if not np.isfinite(got).all() or err > 1e-4:
        sys.exit(f"{path}: onnxruntime CPU output differs from torch (relative error {err:.3g}); the export is wrong")
    return {"relative_error": err, "output_rms": float(np.sqrt((want.astype(np.float64) ** 2).mean()))}


def build(name: str, out: Path, f16: bool, force: bool, versions: dict) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    d = out / name
    meta_path = d / "meta.json"
    settings = {"format": FORMAT, "f16": f16}
    if name == "demo":
        src = REPO / "www/models/demo/unet"
        settings["source_sha256"] = sha256(src / "diffusion_pytorch_model.safetensors")
    else:
        src = None
        settings["config"] = MID_CONFIG
    if meta_path.exists() and not force:
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") == settings and (d / "unet.onnx").exists():
            print(f"{name}: up to date ({d})")
            return
    if d.exists():
        shutil.rmtree(d)
    (d / "unet").mkdir(parents=True)
    torch.manual_seed(0)
    if src is not None:
        unet = UNet2DConditionModel.from_pretrained(str(src), torch_dtype=torch.float32)
        for f in ("config.json", "diffusion_pytorch_model.safetensors"):
            shutil.copyfile(src / f, d / "unet" / f)
    else:
        unet = UNet2DConditionModel(**MID_CONFIG)
        unet.save_pretrained(str(d / "unet"), safe_serialization=True)
    unet = unet.float().eval()
    cfg = dict(unet.config)
    hw = int(cfg["sample_size"])
    params = sum(p.numel() for p in unet.parameters())
    print(f"{name}: {params:,} parameters, latents [2, {cfg['in_channels']}, {hw}, {hw}], exporting f32 ...", flush=True)
    secs = export(torch, unet, cfg, hw, d / "unet.onnx", torch.float32)
    check = check_cpu(torch, unet, cfg, hw, d / "unet.onnx")
    print(f"{name}: unet.onnx {os.path.getsize(d / 'unet.onnx') / 1e6:.1f} MB in {secs:.0f} s; "
          f"onnxruntime CPU vs torch relative error {check['relative_error']:.2e}", flush=True)
    files = {"f32": "unet.onnx"}
    if f16:
        export(torch, unet, cfg, hw, d / "unet-f16.onnx", torch.float16)
        files["f16"] = "unet-f16.onnx"
        print(f"{name}: unet-f16.onnx {os.path.getsize(d / 'unet-f16.onnx') / 1e6:.1f} MB", flush=True)
    meta = {
        "name": name,
        "settings": settings,
        "parameters": params,
        "sample": [2, cfg["in_channels"], hw, hw],
        "timestep": [2],
        "encoder_hidden_states": [2, 77, cfg["cross_attention_dim"]],
        "block_out_channels": list(cfg["block_out_channels"]),
        "onnx": files,
        "diffusers_folder": "unet",
        "onnxruntime_cpu_check": check,
        "versions": versions,
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--models", default="demo,mid")
    ap.add_argument("--f16", action="store_true", help="also export unet-f16.onnx")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--allow-version-mismatch", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    versions = check_versions(["torch", "diffusers", "onnx", "onnxscript", "onnxruntime"], args.allow_version_mismatch)
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in ("demo", "mid"):
            sys.exit(f"unknown model `{name}`: expected demo or mid")
        build(name, out, args.f16, args.force, versions)


if __name__ == "__main__":
    main()
