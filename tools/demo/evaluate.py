#!/usr/bin/env python3
"""Generate the evaluation prompts with diffusers' StableDiffusionPipeline on the CPU and score
the images with score.py (the Python counterpart of `loralab eval`).

  python tools/demo/evaluate.py --model www/models/demo            # the exported folder
  python tools/demo/evaluate.py --checkpoint ~/.cache/loralab/demo/unet.pt   # while training

Prints the percentages of correct shape colour, background colour and shape kind, writes a
contact sheet (--sheet) and per-prompt results (--json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import export  # noqa: E402
import score  # noqa: E402
import train  # noqa: E402

SAMPLERS = {
    "euler_a": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
}


def scheduler(name: str):
    import diffusers

    cls = getattr(diffusers, SAMPLERS[name])
    cfg = dict(train.SD15_BETAS, steps_offset=1, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False)
    if name == "dpmpp_2m":
        cfg.update(algorithm_type="dpmsolver++", solver_order=2)
    return cls.from_config(cfg)


def pipeline_from_checkpoint(work: Path, ckpt: Path | None, ema: bool):
    from diffusers import StableDiffusionPipeline

    cfg = json.loads((work / "config.json").read_text())
    te, unet, vae, tok = train.load_trained(work, cfg, use_ema=ema, path=ckpt)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler("euler_a"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def generate(pipe, prompts: list[str], steps: int, cfg_scale: float, seed: int, batch: int = 50) -> list[np.ndarray]:
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        gens = [torch.Generator().manual_seed(seed + i + k) for k in range(len(chunk))]
        with torch.no_grad():
            r = pipe(chunk, num_inference_steps=steps, guidance_scale=cfg_scale, generator=gens, output_type="np")
        out += [np.clip(np.rint(im * 255), 0, 255).astype(np.uint8) for im in r.images]
    return out


def contact_sheet(path: Path, rows: list[dict], images: list[np.ndarray], per: list[dict]) -> None:
    from PIL import Image, ImageDraw

    cols = 10
    tw, th = 68, 80
    sheet = Image.new("RGB", (cols * tw, -(-len(images) // cols) * th), "white")
    d = ImageDraw.Draw(sheet)
    for i, (img, p) in enumerate(zip(images, per)):
        x, y = (i % cols) * tw, (i // cols) * th
        sheet.paste(Image.fromarray(img), (x + 2, y + 2))
        ok = p["ok"]
        mark = "".join(k[0].upper() if ok[k] else "." for k in ("color", "background", "shape"))
        d.text((x + 2, y + 67), f"{i} {mark}", fill="black" if all(ok.values()) else "red")
    sheet.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="diffusers folder")
    ap.add_argument("--checkpoint", type=Path, help="training checkpoint (unet.pt or a snapshot)")
    ap.add_argument("--work", type=Path, default=train.DEFAULT_WORK)
    ap.add_argument("--no-ema", action="store_true")
    ap.add_argument("--prompts", type=Path, default=HERE / "eval_prompts.jsonl")
    ap.add_argument("--sampler", choices=list(SAMPLERS), default=None, help="default: the model's own scheduler")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=None, help="default: the model's recommended guidance, else 7.5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sheet", type=Path, default=Path("/tmp/demo-eval.png"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.model:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(a.model), dtype=torch.float32, safety_checker=None)
    else:
        pipe = pipeline_from_checkpoint(a.work, a.checkpoint, not a.no_ema)
    if a.sampler:
        pipe.scheduler = scheduler(a.sampler)
    if a.cfg is None:
        index = json.loads((a.model / "model_index.json").read_text()) if a.model else {}
        a.cfg = index.get("_loralab_defaults", {}).get("guidance_scale", export.RECOMMENDED["guidance_scale"] if not a.model else 7.5)
    pipe.set_progress_bar_config(disable=True)
    rows = [json.loads(l) for l in open(a.prompts) if l.strip()]
    t0 = time.time()
    images = generate(pipe, [r["prompt"] for r in rows], a.steps, a.cfg, a.seed)
    res = score.score(rows, images)
    p = res["percent"]
    print(f"{type(pipe.scheduler).__name__} steps {a.steps} cfg {a.cfg}: shape colour {p['color']:.0f} %, "
          f"background {p['background']:.0f} %, shape kind {p['shape']:.0f} % on {res['n']} prompts "
          f"({time.time() - t0:.0f}s)")
    contact_sheet(a.sheet, rows, images, res["per_prompt"])
    if a.json:
        a.json.write_text(json.dumps({"percent": p, "per_prompt": res["per_prompt"]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
