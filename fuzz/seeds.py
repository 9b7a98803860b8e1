"""Writes the seed inputs of each fuzz target under fuzz/seeds/<target>/ from the committed
fixtures (tests/fixtures/...): small adapters, the malformed-file corpus, the tiny model's
configuration and tokenizer files, PNGs with parameters, training images. The fuzzer starts
from these; `cargo fuzz cmin` then keeps the inputs that add coverage in fuzz/corpus/.

    python3 fuzz/seeds.py
"""

import glob
import json
import os
import shutil
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "seeds")
FIX = os.path.join(ROOT, "tests", "fixtures")
SEP = b"\xff"


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def small(paths, limit=16384):
    return [p for p in sorted(paths) if os.path.getsize(p) <= limit]


shutil.rmtree(OUT, ignore_errors=True)
malformed = os.path.join(FIX, "malformed")
adapters = sorted(glob.glob(os.path.join(FIX, "lora", "*.safetensors")))

# safetensors_header: small real files and every broken container.
for p in small(adapters) + small(glob.glob(os.path.join(malformed, "*.safetensors"))):
    put("safetensors_header", os.path.basename(p), read(p))

# lora_parse: raw small files (mode 0) and every fixture's key names and shapes (mode 1).
for p in small(adapters) + small(glob.glob(os.path.join(malformed, "lora_*"))):
    put("lora_parse", "raw-" + os.path.basename(p), b"\x00" + read(p))
for p in adapters:
    data = read(p)
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    lines = []
    for k, v in header.items():
        if k == "__metadata__":
            continue
        lines.append(k + "|" + ",".join(str(min(d, 8)) for d in v["shape"]))
    for i in range(0, len(lines), 48):
        put("lora_parse", f"keys-{os.path.basename(p)}-{i}", b"\x01" + "\n".join(lines[i : i + 48]).encode())

# model_config: the tiny model's configuration files joined with 0xFF, and the broken folders.
order = [
    "model_index.json",
    "unet/config.json",
    "text_encoder/config.json",
    "vae/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
]
folders = [os.path.join(FIX, "models", "tiny-sd15-a")] + sorted(glob.glob(os.path.join(malformed, "model_*/")))
for folder in folders:
    parts = [read(os.path.join(folder, rel)) if os.path.exists(os.path.join(folder, rel)) else b"" for rel in order]
    put("model_config", os.path.basename(folder.rstrip("/")), SEP.join(parts))

# tokenizer: prompts (mode 0), a tiny vocabulary + merges (1), tokenizer configs (2), added tokens (3).
prompts = [
    "a photo of a cat, <lora:style:0.7>, (masterpiece:1.2)",
    "Ünïcödé  téxt\twith   spaces 日本語 🙂 <|startoftext|>x<|endoftext|>",
    "don't won't it's 123 4567 a.b,c",
]
for i, t in enumerate(prompts):
    put("tokenizer", f"prompt-{i}", b"\x00" + t.encode())
    put("tokenizer", f"added-{i}", b"\x03" + ("sks,<tok>," + t).encode())
vocab = {"a": 0, "b": 1, "a</w>": 2, "b</w>": 3, "ab</w>": 4, "<|startoftext|>": 5, "<|endoftext|>": 6}
put("tokenizer", "vocab", b"\x01" + json.dumps(vocab).encode() + SEP + b"#version: 0.2\na b</w>\n" + SEP + b"ab ba")
tok = os.path.join(FIX, "models", "tiny-sd15-a", "tokenizer")
for name in ["tokenizer_config.json", "special_tokens_map.json"]:
    put("tokenizer", "config-" + name, b"\x02" + read(os.path.join(tok, name)))

# png_parameters: PNGs (mode 0) and parameters texts (mode 1).
for p in sorted(glob.glob(os.path.join(malformed, "png_*.png"))):
    if os.path.getsize(p) <= 16384:
        put("png_parameters", os.path.basename(p), b"\x00" + read(p))
for p in small(glob.glob(os.path.join(FIX, "**", "*.png"), recursive=True), 8192)[:4]:
    put("png_parameters", "fixture-" + os.path.basename(p), b"\x00" + read(p))
texts = [
    "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, Model: \"my, model\"",
    "cat\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 1, Size: 64x64",
]
for i, t in enumerate(texts):
    put("png_parameters", f"text-{i}", b"\x01" + t.encode())

# train_image: the malformed and unusual images, and small fixture PNGs.
for p in sorted(glob.glob(os.path.join(malformed, "img_*"))):
    put("train_image", os.path.basename(p), b"\x00" + read(p))
for p in small(glob.glob(os.path.join(FIX, "**", "*.png"), recursive=True), 8192)[:4]:
    put("train_image", "fixture-" + os.path.basename(p), b"\x01" + read(p))

for t in sorted(os.listdir(OUT)):
    print(t, len(os.listdir(os.path.join(OUT, t))))
