"""Write the trained demo model as a diffusers folder (www/models/demo/ by default).

f16 safetensors; text-encoder keys carry the `text_model.` prefix as Stable Diffusion 1.x files
do (transformers 5 saves them without it); the standard CLIP tokenizer files (vocab.json,
merges.txt, as in SD1.x repositories); the SD1.5 noise schedule with the recommended sampler's
class in scheduler_config.json. The folder is then reloaded with diffusers and compared with
the trained weights (rounded to f16), and its size is checked against the 10 MB budget.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train  # noqa: E402

OUT = train.REPO / "www" / "models" / "demo"
BUDGET = 10_000_000  # bytes, every file of the folder
MODEL_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]

# Euler ancestral ("Euler a") with SD1.5's schedule: the sampler the model was checked with.
SCHEDULER_CONFIG = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "_diffusers_version": "0.42.1",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

# The settings the model recommends, in model_index.json under a private key (diffusers skips
# keys that start with "_"); loralab reads them as its defaults for this model. Guidance above
# about 7 overshoots on this small model (colours wash out, shapes smear); 4-6 keeps every
# score over the bar (tools/demo/README.md).
RECOMMENDED = {"guidance_scale": 5.0, "num_inference_steps": 20}


def rewrite_text_encoder_keys(path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}
    save_file(dict(sorted(sd.items())), str(path), metadata=meta)


def export(work: Path, cfg: dict, out: Path = OUT, use_ema: bool = True) -> dict:
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    te, unet, vae, tok = train.load_trained(work, cfg, use_ema=use_ema)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    keep = {"MODEL_CARD.md"}
    if out.exists():
        for p in out.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    pipe.to(torch.float16)
    pipe.save_pretrained(str(out), safe_serialization=True)
    pipe.to(torch.float32)
    rewrite_text_encoder_keys(out / "text_encoder" / "model.safetensors")
    (out / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)  # SD1.x repositories ship vocab + merges
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(train.TOKENIZER_DIR / name, out / "tokenizer" / name)
    index = json.loads((out / "model_index.json").read_text())
    index["_loralab_defaults"] = RECOMMENDED
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2, sort_keys=True) + "\n")

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name not in keep)
    if files != sorted(MODEL_FILES):
        raise SystemExit(f"unexpected files in {out}: {sorted(set(files) ^ set(MODEL_FILES))}")
    sizes = {f: (out / f).stat().st_size for f in files}
    total = sum(sizes.values()) + sum((out / k).stat().st_size for k in keep if (out / k).exists())

    # reload with diffusers and compare with the trained weights rounded to f16
    from safetensors.torch import load_file

    assert all(k.startswith("text_model.") for k in load_file(str(out / "text_encoder" / "model.safetensors")))
    back = StableDiffusionPipeline.from_pretrained(str(out), dtype=torch.float32, safety_checker=None)
    for name, ref in (("text_encoder", te), ("unet", unet), ("vae", vae)):
        sa, sb = ref.state_dict(), getattr(back, name).state_dict()
        if set(sa) != set(sb):
            raise SystemExit(f"{name}: reloaded keys differ: {sorted(set(sa) ^ set(sb))[:8]}")
        for k in sa:
            if not torch.equal(sa[k].to(torch.float16).float(), sb[k].float()):
                raise SystemExit(f"{name}: {k} differs after reloading")
    if type(back.scheduler).__name__ != SCHEDULER_CONFIG["_class_name"]:
        raise SystemExit(f"scheduler reloads as {type(back.scheduler).__name__}")
    record = {
        "files": sizes,
        "total_bytes": total,
        "parameters": {
            "text_encoder": train.n_params(te),
            "text_encoder_token_table": te.embeddings.token_embedding.weight.numel(),
            "unet": train.n_params(unet),
            "vae": train.n_params(vae),
            "vae_encoder": sum(p.numel() for n, p in vae.named_parameters() if n.startswith(("encoder.", "quant_conv."))),
            "vae_decoder": sum(p.numel() for n, p in vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))),
        },
        "vae_scaling_factor": vae.config.scaling_factor,
    }
    print(json.dumps(record, indent=1))
    if total > BUDGET:
        raise SystemExit(f"{out}: {total} bytes, over the {BUDGET}-byte budget")
    return record
