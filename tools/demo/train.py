#!/usr/bin/env python3
"""Train loralab's demo model: a tiny Stable-Diffusion-architecture text-to-image model on the
procedural images of data.py, on the CPU.

Phases (python tools/demo/train.py PHASE [--work DIR]; `all` runs them in order):
  data     render the base training set (data.py) into WORK/data
  vae      train the AutoencoderKL (reconstruction + small KL), checkpointing to WORK/vae.pt
  latents  encode the training set with the frozen VAE encoder (posterior mean and std) and
           set the VAE's scaling_factor from the latents' standard deviation
  decoder  fine-tune the VAE decoder on those latents, the encoder frozen (WORK/decoder.pt);
           the latents do not change, so this can run before or after the UNet
  text     pre-train the CLIP text encoder alone to name the caption's attributes (WORK/text.pt)
  unet     train the CLIP text encoder and the UNet together from scratch (epsilon prediction,
           SD1.5 noise schedule, 10 % caption dropout for classifier-free guidance),
           checkpointing to WORK/unet.pt
  export   write the diffusers folder (f16 safetensors) to www/models/demo/ (see export.py)

Every phase resumes from its checkpoint when interrupted and records its wall time in
WORK/times.json; losses go to WORK/vae.log and WORK/unet.log. Seeds are fixed; the configs
are in CONFIG below and are written with the model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
import data  # noqa: E402

DEFAULT_WORK = Path(os.path.expanduser("~/.cache/loralab/demo"))
TOKENIZER_DIR = REPO / "tests" / "fixtures" / "models" / "tiny-sd15-a" / "tokenizer"

CONFIG = {
    "seed": 6,
    "threads": 1,
    "n_images": 24000,
    "vae": {
        "model": {
            "block_out_channels": [8, 16, 32, 64],
            "layers_per_block": 1,
            "norm_num_groups": 2,
            "latent_channels": 4,
        },
        "steps": 4000,
        "batch": 16,
        "lr": 2e-3,
        "min_lr": 1e-4,
        "warmup": 50,
        "kl_weight": 1e-6,
        "edge_weight": 4.0,
    },
    # decoder fine-tuning with the encoder frozen (as Stable Diffusion's ft-MSE decoders) on the
    # stored latents: the latents, and so the UNet's training data, do not change
    "decoder": {
        "steps": 2500,
        "batch": 16,
        "lr": 1e-3,
        "min_lr": 5e-5,
        "warmup": 50,
        "edge_weight": 4.0,
        # half of the latents are pushed away from the mean latent by a factor up to `extrapolate`
        # and given Gaussian noise (`latent_noise` x the latents' std): classifier-free
        # guidance overshoots like that, and the decoder learns to draw such latents cleanly
        "aug_prob": 0.5,
        "extrapolate": 1.35,
        "latent_noise": 0.1,
    },
    "text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_act": "quick_gelu",
    },
    "unet": {
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    },
    "text_pretrain": {
        "steps": 800,
        "batch": 128,
        "lr": 2e-3,
        "min_lr": 1e-4,
        "warmup": 50,
    },
    "train": {
        "steps": 6000,
        "batch": 64,
        "lr": 1e-3,
        "min_lr": 5e-5,
        "warmup": 100,
        "weight_decay": 0.01,
        "cond_drop": 0.1,
        "random_token_prob": 0.3,
        "article_drop_prob": 0.15,
        "aux_weight": 0.1,
        "min_snr_gamma": 5.0,
        "noise_offset": 0.0,
        "ema": 0.998,
    },
}

SD15_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


# ---------------------------------------------------------------------------
# Bookkeeping
# ---------------------------------------------------------------------------


def log(path: Path, msg: str) -> None:
    line = time.strftime("%H:%M:%S ") + msg
    print(line, flush=True)
    with open(path, "a") as f:
        f.write(line + "\n")


def add_time(work: Path, phase: str, seconds: float) -> None:
    p = work / "times.json"
    t = json.loads(p.read_text()) if p.exists() else {}
    t[phase] = t.get(phase, 0.0) + seconds
    p.write_text(json.dumps(t, indent=1) + "\n")


def step_rngs(seed: int, phase: int, step: int) -> np.random.Generator:
    """The random state of one training step, a function of (seed, phase, step) only, so a
    resumed run draws exactly what an uninterrupted one would."""
    torch.manual_seed(seed * 1_000_003 + phase * 100_003 + step)
    return np.random.default_rng([seed, phase, step])


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_at(step: int, cfg: dict) -> float:
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    p = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
    return cfg["min_lr"] + 0.5 * (cfg["lr"] - cfg["min_lr"]) * (1 + math.cos(math.pi * min(p, 1.0)))


def make_optimizer(params, lr: float, weight_decay: float = 0.0):
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def build_vae(cfg: dict):
    from diffusers import AutoencoderKL

    m = cfg["model"]
    n = len(m["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(m["block_out_channels"]),
        layers_per_block=m["layers_per_block"],
        norm_num_groups=m["norm_num_groups"],
        latent_channels=m["latent_channels"],
        sample_size=data.SIZE,
    )


def build_text_encoder(cfg: dict):
    from transformers import CLIPTextConfig, CLIPTextModel

    te_cfg = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=cfg["hidden_size"],
        layer_norm_eps=1e-5,
        # the ids of Stable Diffusion 1.5's text_encoder/config.json
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        **cfg,
    )
    return CLIPTextModel(te_cfg)


def build_unet(cfg: dict, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=data.SIZE // 8,
        in_channels=4,
        out_channels=4,
        cross_attention_dim=cross_attention_dim,
        block_out_channels=tuple(cfg["block_out_channels"]),
        layers_per_block=cfg["layers_per_block"],
        down_block_types=tuple(cfg["down_block_types"]),
        up_block_types=tuple(cfg["up_block_types"]),
        attention_head_dim=cfg["attention_head_dim"],
        norm_num_groups=cfg["norm_num_groups"],
    )


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def load_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


class SparseTokenEmbedding(torch.nn.Module):
    """The CLIP token table split for training: the rows of the caption vocabulary are trained,
    every other row keeps its initial value (so unseen words look like the random tokens that
    training inserts and learns to ignore). `merged()` gives the full table back."""

    def __init__(self, table: torch.Tensor, trained_ids: list[int]):
        super().__init__()
        self.register_buffer("table", table.detach().clone())
        ids = torch.tensor(sorted(set(trained_ids)), dtype=torch.long)
        self.register_buffer("ids", ids)
        lookup = torch.full((table.shape[0],), -1, dtype=torch.long)
        lookup[ids] = torch.arange(len(ids))
        self.register_buffer("lookup", lookup)
        self.rows = torch.nn.Parameter(table[ids].detach().clone())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        base = self.table[input_ids]
        idx = self.lookup[input_ids]
        hit = idx >= 0
        trained = self.rows[idx.clamp(min=0)]
        return torch.where(hit[..., None], trained, base)

    def merged(self) -> torch.Tensor:
        t = self.table.clone()
        t[self.ids] = self.rows.detach()
        return t


def caption_vocabulary(tok) -> list[int]:
    """Token ids of every word the training captions can contain (and BOS/EOS)."""
    words = set()
    templates = data.TRAIN_TEMPLATES + data.TRAIN_TEMPLATES_POS + data.TRAIN_TEMPLATES_NO_BG
    for tpl in templates:
        words.update(tpl.replace("{o}", "").replace("{b}", "").replace("{p}", "").replace(",", " , ").split())
    words.update(data.COLOR_NAMES)
    words.update(data.SHAPES)
    words.update(data.PLURAL[s] for s in data.SHAPES)
    words.update(data.SIZES)
    words.update(["a", "an", "one", "two", "in", "the", ",", "top", "middle", "bottom", "left", "right", "center"])
    ids = set()
    for w in words:
        ids.update(tok(w, add_special_tokens=False).input_ids)
    ids.update([tok.bos_token_id, tok.eos_token_id])
    return sorted(ids)


# ---------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------


def phase_data(work: Path, cfg: dict) -> None:
    out = work / "data"
    if (out / "images.npy").exists():
        print("data: present")
        return
    t0 = time.time()
    data.write_training_set(out, cfg["n_images"])
    add_time(work, "data", time.time() - t0)
    print(f"data: {cfg['n_images']} images in {time.time() - t0:.0f}s")


def load_images(work: Path) -> torch.Tensor:
    imgs = np.load(work / "data" / "images.npy")
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def reconstruction_loss(y: torch.Tensor, x: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """Squared + half absolute error; pixels within one pixel of a colour edge weigh
    1 + edge_weight (the shapes' outlines, a small part of each image, carry what the
    evaluator measures)."""
    spread = F.max_pool2d(x, 3, 1, 1) + F.max_pool2d(-x, 3, 1, 1)
    w = 1.0 + edge_weight * (spread.sum(1, keepdim=True) > 0.05).float()
    err = y - x
    return ((err * err + 0.5 * err.abs()) * w).mean() / w.mean()


def phase_vae(work: Path, cfg: dict) -> None:
    vc = cfg["vae"]
    ckpt = work / "vae.pt"
    logf = work / "vae.log"
    torch.manual_seed(cfg["seed"])
    vae = build_vae(vc)
    opt = make_optimizer(vae.parameters(), vc["lr"])
    step = 0
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step = st["step"]
    if step >= vc["steps"]:
        print("vae: done")
        return
    log(logf, f"vae: {n_params(vae)} parameters, from step {step}")
    imgs = load_images(work)
    vae.train()
    t0 = time.time()
    last_save = t0
    run = []
    while step < vc["steps"]:
        lr = lr_at(step, vc)
        for group in opt.param_groups:
            group["lr"] = lr
        g = step_rngs(cfg["seed"], 1, step)
        idx = torch.from_numpy(g.integers(0, len(imgs), vc["batch"]))
        x = to_unit(imgs[idx])
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample()).sample
        rec = reconstruction_loss(y, x, vc["edge_weight"])
        kl = post.kl().mean()
        loss = rec + vc["kl_weight"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        run.append(rec.item())
        if step % 25 == 0 or step == vc["steps"]:
            log(logf, f"vae step {step} rec {np.mean(run):.5f} kl {kl.item():.1f} lr {lr:.2e} {time.time() - t0:.0f}s")
            run = []
        if time.time() - last_save > 120 or step == vc["steps"]:
            save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
            add_time(work, "vae", time.time() - last_save)
            last_save = time.time()


def phase_decoder(work: Path, cfg: dict) -> None:
    dc = cfg["decoder"]
    ckpt = work / "decoder.pt"
    logf = work / "vae.log"
    vae = build_vae(cfg["vae"])
    vae.load_state_dict(torch.load(work / "vae.pt", weights_only=False)["model"])
    trainable = [p for n, p in vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))]
    for p in vae.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    opt = make_optimizer(trainable, dc["lr"])
    step = 0
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step = st["step"]
    if step >= dc["steps"]:
        print("decoder: done")
        return
    log(logf, f"decoder: {sum(p.numel() for p in trainable)} parameters, from step {step}")
    imgs = load_images(work)
    lat = torch.load(work / "latents.pt")
    mean, std = lat["mean"], lat["std"]
    centre = mean.mean(dim=(0, 2, 3), keepdim=True)
    spread = mean.std(dim=(0, 2, 3), keepdim=True)
    vae.eval()
    vae.decoder.train()
    t0 = time.time()
    last_save = t0
    run = []
    while step < dc["steps"]:
        lr = lr_at(step, dc)
        for group in opt.param_groups:
            group["lr"] = lr
        g = step_rngs(cfg["seed"], 3, step)
        idx = torch.from_numpy(g.integers(0, len(imgs), dc["batch"]))
        x = to_unit(imgs[idx])
        z = mean[idx] + std[idx] * torch.randn_like(mean[idx])
        aug = (torch.rand(len(idx), 1, 1, 1) < dc["aug_prob"]).float()
        factor = 1.0 + (dc["extrapolate"] - 1.0) * torch.rand(len(idx), 1, 1, 1)
        pushed = centre + factor * (z - centre) + dc["latent_noise"] * spread * torch.randn_like(z)
        z = aug * pushed + (1 - aug) * z
        rec = reconstruction_loss(vae.decode(z).sample, x, dc["edge_weight"])
        opt.zero_grad(set_to_none=True)
        rec.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        step += 1
        run.append(rec.item())
        if step % 25 == 0 or step == dc["steps"]:
            log(logf, f"decoder step {step} rec {np.mean(run):.5f} lr {lr:.2e} {time.time() - t0:.0f}s")
            run = []
        if time.time() - last_save > 120 or step == dc["steps"]:
            save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
            add_time(work, "decoder", time.time() - last_save)
            last_save = time.time()


def load_vae(work: Path, cfg: dict):
    """The trained VAE: the fine-tuned decoder when there is one, the scaling factor once the
    latents are computed."""
    vae = build_vae(cfg["vae"])
    p = work / "decoder.pt"
    vae.load_state_dict(torch.load(p if p.exists() else work / "vae.pt", weights_only=False)["model"])
    vae.eval()
    p = work / "latents.pt"
    if p.exists():
        vae.register_to_config(scaling_factor=torch.load(p)["scaling_factor"])
    return vae


def phase_latents(work: Path, cfg: dict) -> None:
    p = work / "latents.pt"
    if p.exists():
        print("latents: present")
        return
    t0 = time.time()
    vae = load_vae(work, cfg)
    imgs = load_images(work)
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(imgs), 256):
            d = vae.encode(to_unit(imgs[i : i + 256])).latent_dist
            means.append(d.mean)
            stds.append(d.std)
    mean = torch.cat(means)
    std = torch.cat(stds)
    g = torch.Generator().manual_seed(cfg["seed"])
    sample = mean + std * torch.randn(mean.shape, generator=g)
    scaling = float(1.0 / sample.std())
    torch.save({"mean": mean, "std": std, "scaling_factor": scaling}, p)
    # reconstruction error of the frozen VAE on the training set (means)
    with torch.no_grad():
        rec = vae.decode(mean[:256]).sample
        err = (rec - to_unit(imgs[:256])).abs().mean().item() * 127.5
    add_time(work, "latents", time.time() - t0)
    log(work / "vae.log", f"latents: mean {mean.mean():.3f} std {sample.std():.3f} scaling_factor {scaling:.4f}; "
        f"mean |error| {err:.2f}/255; {time.time() - t0:.0f}s")


class CaptionSampler:
    """Token ids for a batch of ground truths: a fresh random caption per draw, 77 tokens padded
    with EOS like the pipeline's tokenizer call, empty captions for classifier-free guidance and
    random extra tokens (from outside the caption vocabulary) inserted now and then; with the
    attributes each caption names (shape, colour, background or 'not said', count; -100 for
    the empty captions) for the text encoder's auxiliary objective."""

    def __init__(self, tok, truths: list[dict], cfg: dict, trained_ids: list[int]):
        self.tok = tok
        self.truths = truths
        self.cfg = cfg
        self.empty = tok("", padding="max_length", max_length=77, truncation=True).input_ids
        vocab = np.ones(49406, dtype=bool)
        vocab[[i for i in trained_ids if i < 49406]] = False
        self.untrained = np.nonzero(vocab)[0]
        self.cache: dict[str, list[int]] = {}

    def word_ids(self, word: str) -> list[int]:
        """Token ids of one whitespace-separated word (CLIP's tokenizer splits at whitespace, so
        a caption's ids are its words' ids in order)."""
        ids = self.cache.get(word)
        if ids is None:
            ids = self.cache[word] = self.tok(word, add_special_tokens=False).input_ids
        return ids

    def ids(self, idx: np.ndarray, rng: np.random.Generator, cond_drop: float) -> tuple[torch.Tensor, torch.Tensor]:
        out, labels = [], []
        for i in idx:
            if rng.random() < cond_drop:
                out.append(self.empty)
                labels.append([-100] * 4)
                continue
            t = self.truths[int(i)]
            words = data.train_caption(rng, t).split()
            bg = data.COLOR_NAMES.index(t["background"]) if t["background"] in words else len(data.COLOR_NAMES)
            labels.append([data.SHAPES.index(t["shape"]), data.COLOR_NAMES.index(t["color"]), bg, t["count"] - 1])
            if rng.random() < self.cfg["article_drop_prob"]:
                words = [w for w in words if w not in ("a", "an", "the")] or words
            ids = []
            insert = rng.random() < self.cfg["random_token_prob"]
            slots = set()
            if insert:
                # random tokens between words, never between a colour and the word it qualifies
                free = [k for k in range(len(words) + 1) if k == 0 or words[k - 1] not in data.COLORS]
                slots = set(rng.choice(free, size=min(len(free), int(rng.integers(1, 4))), replace=False).tolist())
            for k, w in enumerate(words):
                if k in slots:
                    ids.append(int(rng.choice(self.untrained)))
                ids += self.word_ids(w)
            if len(words) in slots:
                ids.append(int(rng.choice(self.untrained)))
            ids = [self.tok.bos_token_id] + ids[:75] + [self.tok.eos_token_id]
            ids += [self.tok.eos_token_id] * (77 - len(ids))
            out.append(ids)
        return torch.tensor(out, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


class AttributeHeads(torch.nn.Module):
    """Linear read-outs of the text encoder's last position (which attends to the whole
    caption): shape, colour, background (or 'not said') and count. Used only in training."""

    SIZES = (len(data.SHAPES), len(data.COLOR_NAMES), len(data.COLOR_NAMES) + 1, 2)

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, sum(self.SIZES))

    def loss(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over the four attributes and the fraction predicted right."""
        logits = self.proj(hidden_states[:, -1]).split(self.SIZES, dim=1)
        total = hidden_states.new_zeros(())
        right, n = 0, 0
        for k, lg in enumerate(logits):
            y = labels[:, k]
            keep = y >= 0
            if keep.any():
                total = total + F.cross_entropy(lg[keep], y[keep])
                right += int((lg[keep].argmax(1) == y[keep]).sum())
                n += int(keep.sum())
        return total, torch.tensor(right / max(n, 1))


def phase_text(work: Path, cfg: dict) -> None:
    """Pre-train the text encoder alone on the attribute objective, so that the UNet meets
    informative caption embeddings from its first step."""
    pc = cfg["text_pretrain"]
    out = work / "text.pt"
    if out.exists():
        print("text: done")
        return
    logf = work / "unet.log"
    t0 = time.time()
    torch.manual_seed(cfg["seed"] + 1)
    tok = load_tokenizer()
    te = build_text_encoder(cfg["text_encoder"])
    trained_ids = caption_vocabulary(tok)
    te.embeddings.token_embedding = SparseTokenEmbedding(te.embeddings.token_embedding.weight, trained_ids)
    heads = AttributeHeads(cfg["text_encoder"]["hidden_size"])
    truths = [json.loads(l) for l in open(work / "data" / "truth.jsonl")]
    captions = CaptionSampler(tok, truths, cfg["train"], trained_ids)
    params = list(te.parameters()) + list(heads.parameters())
    opt = make_optimizer(params, pc["lr"])
    te.train()
    for step in range(pc["steps"]):
        lr = lr_at(step, pc)
        for group in opt.param_groups:
            group["lr"] = lr
        g = step_rngs(cfg["seed"], 4, step)
        ids, labels = captions.ids(g.integers(0, len(truths), pc["batch"]), g, 0.0)
        loss, acc = heads.loss(te(ids).last_hidden_state, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            log(logf, f"text step {step + 1} loss {loss.item():.4f} accuracy {acc.item():.3f} {time.time() - t0:.0f}s")
    save_atomic({"te": te.state_dict(), "heads": heads.state_dict()}, out)
    add_time(work, "text", time.time() - t0)


def phase_unet(work: Path, cfg: dict) -> None:
    from diffusers import DDPMScheduler

    tc = cfg["train"]
    ckpt = work / "unet.pt"
    logf = work / "unet.log"
    torch.manual_seed(cfg["seed"] + 1)
    tok = load_tokenizer()
    te = build_text_encoder(cfg["text_encoder"])
    unet = build_unet(cfg["unet"], cfg["text_encoder"]["hidden_size"])
    trained_ids = caption_vocabulary(tok)
    emb = SparseTokenEmbedding(te.embeddings.token_embedding.weight, trained_ids)
    te.embeddings.token_embedding = emb
    heads = AttributeHeads(cfg["text_encoder"]["hidden_size"])
    if (work / "text.pt").exists():
        pre = torch.load(work / "text.pt", weights_only=False)
        te.load_state_dict(pre["te"])
        heads.load_state_dict(pre["heads"])

    decay, no_decay = [], []
    for m in (te, unet, heads):
        for name, p in m.named_parameters():
            (no_decay if p.ndim < 2 or "embedding" in name or name == "rows" else decay).append(p)
    opt = make_optimizer(
        [{"params": decay, "weight_decay": tc["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}], tc["lr"]
    )
    params = [p for m in (te, unet) for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    step = 0
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        te.load_state_dict(st["te"])
        unet.load_state_dict(st["unet"])
        heads.load_state_dict(st["heads"])
        opt.load_state_dict(st["opt"])
        ema = st["ema"]
        step = st["step"]
    if step >= tc["steps"]:
        print("unet: done")
        return
    log(logf, f"unet: {n_params(unet)} parameters; text encoder {n_params(te)} trainable "
        f"({len(trained_ids)} token rows trained) from step {step}")

    lat = torch.load(work / "latents.pt")
    mean, std, scale = lat["mean"], lat["std"], lat["scaling_factor"]
    truths = [json.loads(l) for l in open(work / "data" / "truth.jsonl")]
    captions = CaptionSampler(tok, truths, tc, trained_ids)
    sched = DDPMScheduler(**SD15_BETAS)
    ac = sched.alphas_cumprod.float()
    snr = ac / (1 - ac)
    w_t = torch.clamp(snr, max=tc["min_snr_gamma"]) / snr

    te.train()
    unet.train()
    t0 = time.time()
    last_save = t0
    run = []
    while step < tc["steps"]:
        lr = lr_at(step, tc)
        for group in opt.param_groups:
            group["lr"] = lr
        g = step_rngs(cfg["seed"], 2, step)
        idx = g.integers(0, len(mean), tc["batch"])
        ti = torch.from_numpy(idx)
        x0 = (mean[ti] + std[ti] * torch.randn_like(mean[ti])) * scale
        noise = torch.randn_like(x0)
        if tc["noise_offset"]:
            noise = noise + tc["noise_offset"] * torch.randn(x0.shape[0], x0.shape[1], 1, 1)
        t = torch.randint(0, 1000, (x0.shape[0],))
        xt = sched.add_noise(x0, noise, t)
        ids, labels = captions.ids(idx, g, tc["cond_drop"])
        cond = te(ids).last_hidden_state
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        aux, acc = heads.loss(cond, labels)
        loss = (per * w_t[t]).mean() + tc["aux_weight"] * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params + list(heads.parameters()), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - tc["ema"])
        step += 1
        run.append((per.mean().item(), acc.item()))
        if step % 25 == 0 or step == tc["steps"]:
            mse, acc_m = np.mean(run, axis=0)
            log(logf, f"unet step {step} mse {mse:.4f} text accuracy {acc_m:.3f} lr {lr:.2e} {time.time() - t0:.0f}s")
            run = []
        if time.time() - last_save > 180 or step == tc["steps"] or step % 500 == 0:
            save_atomic(
                {"te": te.state_dict(), "unet": unet.state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(),
                 "ema": ema, "step": step,
                 "trained_ids": trained_ids},
                ckpt,
            )
            add_time(work, "unet", time.time() - last_save)
            last_save = time.time()
            if step % 500 == 0 or step == tc["steps"]:
                os.makedirs(work / "snapshots", exist_ok=True)
                torch.save({"te": te.state_dict(), "unet": unet.state_dict(), "ema": ema, "step": step},
                           work / "snapshots" / f"unet-{step:05d}.pt")


def load_trained(work: Path, cfg: dict, use_ema: bool = True, path: Path | None = None):
    """(text encoder, unet, vae, tokenizer) from the UNet checkpoint (EMA weights by default),
    with the token table merged back into a plain nn.Embedding."""
    st = torch.load(path or work / "unet.pt", weights_only=False)
    tok = load_tokenizer()
    te = build_text_encoder(cfg["text_encoder"])
    unet = build_unet(cfg["unet"], cfg["text_encoder"]["hidden_size"])
    plain = te.embeddings.token_embedding
    emb = SparseTokenEmbedding(plain.weight, caption_vocabulary(tok))
    te.embeddings.token_embedding = emb
    te.load_state_dict(st["te"])
    unet.load_state_dict(st["unet"])
    if use_ema:
        params = [p for m in (te, unet) for p in m.parameters()]
        with torch.no_grad():
            for p, e in zip(params, st["ema"]):
                p.copy_(e)
    with torch.no_grad():
        plain.weight.copy_(emb.merged())
    te.embeddings.token_embedding = plain
    te.eval()
    unet.eval()
    return te, unet, load_vae(work, cfg), tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["data", "vae", "decoder", "latents", "text", "unet", "export", "all"])
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--threads", type=int, default=CONFIG["threads"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config entry, e.g. --set train.steps=4000 (JSON value)")
    a = ap.parse_args()
    cfg = json.loads(json.dumps(CONFIG))
    for kv in a.set:
        k, v = kv.split("=", 1)
        d = cfg
        *path, last = k.split(".")
        for p in path:
            d = d[p]
        d[last] = json.loads(v)
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    cfg_path = a.work / "config.json"
    if cfg_path.exists() and json.loads(cfg_path.read_text()) != cfg:
        print(f"note: {cfg_path} differs from this run's config; the new one is recorded", file=sys.stderr)
    cfg_path.write_text(json.dumps(cfg, indent=1) + "\n")
    phases = ["data", "vae", "latents", "decoder", "text", "unet", "export"] if a.phase == "all" else [a.phase]
    for ph in phases:
        if ph == "data":
            phase_data(a.work, cfg)
        elif ph == "vae":
            phase_vae(a.work, cfg)
        elif ph == "decoder":
            phase_decoder(a.work, cfg)
        elif ph == "latents":
            phase_latents(a.work, cfg)
        elif ph == "text":
            phase_text(a.work, cfg)
        elif ph == "unet":
            phase_unet(a.work, cfg)
        else:
            import export

            export.export(a.work, cfg)


if __name__ == "__main__":
    main()
