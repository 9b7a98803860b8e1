#!/usr/bin/env python3
"""Procedural captioned images for loralab's demo model (see README.md for the specification).

64x64 RGB images: a plain background colour and one or two shapes of one kind and one colour
(circle, square, triangle pointing up, 5-pointed star; the heart shape and the striped fill are
held out of base training for the LoRA demos). Shapes are rendered at 4x resolution and box
filtered, so edges carry mild anti-aliasing and every interior pixel holds the exact palette
value.

Commands (python tools/demo/data.py COMMAND):
  files     write the committed files: tools/demo/eval_prompts.jsonl (100 prompts on the held-out
            triples), tools/demo/eval_prompts_ci.jsonl (24 of them), tools/demo/heldout.json,
            www/datasets/heart/ and www/datasets/striped/ (20 images each, kohya layout) and
            tests/fixtures/demo/ (ground-truth images and truth.jsonl)
  train     write the base training set (images .npy + ground truth .jsonl) to --out
  preview   write a contact sheet of training images with their captions to --out

Everything is deterministic given the seeds in this file (numpy PCG64 generators).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

SIZE = 64
SS = 4  # supersampling factor of the renderer

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "purple": (140, 60, 200),
    "orange": (245, 135, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOR_NAMES = list(COLORS)
SHAPES = ["circle", "square", "triangle", "star"]  # base training
HELD_OUT_SHAPE = "heart"
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "heart": "hearts"}

SIZES = {"small": (12, 18), "medium": (20, 28), "large": (30, 40)}
ROWS = ["top", "middle", "bottom"]
COLS = ["left", "center", "right"]
STRIPE_PERIOD = 6  # px, diagonal stripes: half the period shape colour, half white (black on white shapes)

SEED_HELDOUT = 6
SEED_EVAL = 106
SEED_TRAIN = 1006
SEED_HEART = 2006
SEED_STRIPED = 3006
SEED_FIXTURES = 4006
N_HELDOUT = 24


def position_name(row: int, col: int) -> str:
    """'top left' ... 'bottom right'; the middle cell is 'center'."""
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return f"middle {COLS[col]}"
    if col == 1:
        return f"{ROWS[row]} center"
    return f"{ROWS[row]} {COLS[col]}"


# ---------------------------------------------------------------------------
# Held-out (shape, colour, background) triples
# ---------------------------------------------------------------------------


def all_triples() -> list[tuple[str, str, str]]:
    return [(s, c, b) for s in SHAPES for c in COLOR_NAMES for b in COLOR_NAMES if c != b]


def heldout_triples() -> list[tuple[str, str, str]]:
    """24 of the 224 base triples: 6 per shape, 3 per shape colour, 3 per background colour, and
    24 different (colour, background) pairs, so every colour pair keeps 3 of its 4 shapes in
    training. Drawn by rejection sampling with a fixed seed."""
    rng = np.random.default_rng(SEED_HELDOUT)
    n = len(COLOR_NAMES)
    # three permutations c -> b without fixed points and pairwise different at every c
    perms: list[np.ndarray] = []
    while len(perms) < N_HELDOUT // n:
        p = rng.permutation(n)
        if all(p[i] != i and all(q[i] != p[i] for q in perms) for i in range(n)):
            perms.append(p)
    chosen = [(COLOR_NAMES[i], COLOR_NAMES[int(p[i])]) for p in perms for i in range(n)]
    shapes = [s for s in SHAPES for _ in range(N_HELDOUT // len(SHAPES))]
    rng.shuffle(shapes)
    return sorted((s, c, b) for s, (c, b) in zip(shapes, chosen))


def train_triples() -> list[tuple[str, str, str]]:
    held = set(heldout_triples())
    return [t for t in all_triples() if t not in held]


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

_HI = SIZE * SS
# pixel-centre coordinates of the supersampled grid, in output-pixel units
_COORD = (np.arange(_HI, dtype=np.float32) + 0.5) / SS


def _star_polygon(cx: float, cy: float, side: float) -> np.ndarray:
    """Regular 5-pointed star, point up, inner/outer radius 0.382, bounding box max side = side."""
    a = np.deg2rad(np.arange(10) * 36.0 - 90.0)
    # bounding box of the unit star: width 2 sin 72 = 1.902, height 1 + cos 36 = 1.809
    r_out = side / (2 * np.sin(np.deg2rad(72)))
    ratio = np.sin(np.deg2rad(18)) / np.sin(np.deg2rad(54))  # 0.382, the regular pentagram
    r = np.where(np.arange(10) % 2 == 0, r_out, r_out * ratio)
    height = r_out * (1 + np.cos(np.deg2rad(36)))
    cy0 = cy - height / 2 + r_out  # centre of the circumcircle so that the box is centred on cy
    return np.stack([cx + r * np.cos(a), cy0 + r * np.sin(a)], axis=1)


def _inside_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over points."""
    inside = np.zeros(np.broadcast(x, y).shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        x0, y0 = poly[i]
        x1, y1 = poly[(i + 1) % n]
        if y0 == y1:
            continue
        cond = (y0 > y) != (y1 > y)
        xint = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= cond & (x < xint)
    return inside


def shape_mask(kind: str, cx: float, cy: float, side: float) -> np.ndarray:
    """Boolean mask on the supersampled grid; the shape's bounding box is side x side centred on
    (cx, cy) in output pixels (the star's box is side wide and 0.95 side high). Only the window
    around the box is evaluated."""
    h = side / 2
    lo_x = max(int((cx - h - 1) * SS), 0)
    hi_x = min(int((cx + h + 1) * SS) + 1, _HI)
    lo_y = max(int((cy - h - 1) * SS), 0)
    hi_y = min(int((cy + h + 1) * SS) + 1, _HI)
    x = _COORD[None, lo_x:hi_x]
    y = _COORD[lo_y:hi_y, None]
    if kind == "circle":
        m = (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    elif kind == "square":
        m = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif kind == "triangle":
        t = (y - (cy - h)) / side  # 0 at the apex, 1 at the base
        m = (t >= 0) & (t <= 1) & (np.abs(x - cx) <= t * h)
    elif kind == "star":
        m = _inside_polygon(x, y, _star_polygon(cx, cy, side))
    elif kind == "heart":
        # (u^2 + v^2 - 1)^3 - u^2 v^3 <= 0, spanning u in [-1.139, 1.139], v in [-1.0, 1.236]
        u = (x - cx) / h * 1.139
        v = -((y - cy) / h * 1.118 - 0.118)
        m = (u * u + v * v - 1) ** 3 - u * u * v**3 <= 0
    else:
        raise ValueError(kind)
    out = np.zeros((_HI, _HI), dtype=bool)
    out[lo_y:hi_y, lo_x:hi_x] = m
    return out


def stripe_colour(color: str) -> tuple[int, int, int]:
    return COLORS["black"] if color == "white" else COLORS["white"]


def render(bg: str, color: str, kind: str, boxes: list[tuple[float, float, float]], striped: bool = False) -> np.ndarray:
    """uint8 [64, 64, 3] image: background, then each (cx, cy, side) shape."""
    img = np.empty((_HI, _HI, 3), dtype=np.float32)
    img[:] = COLORS[bg]
    mask = np.zeros((_HI, _HI), dtype=bool)
    for cx, cy, side in boxes:
        mask |= shape_mask(kind, cx, cy, side)
    fill = np.empty_like(img)
    fill[:] = COLORS[color]
    if striped:
        d = (_COORD[None, :] + _COORD[:, None]) % STRIPE_PERIOD
        fill[d >= STRIPE_PERIOD / 2] = stripe_colour(color)
    img[mask] = fill[mask]
    out = img.reshape(SIZE, SS, SIZE, SS, 3).mean(axis=(1, 3))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _box_overlap(a, b, margin: float) -> bool:
    return abs(a[0] - b[0]) * 2 < a[2] + b[2] + 2 * margin and abs(a[1] - b[1]) * 2 < a[2] + b[2] + 2 * margin


def _cell_centre(row: int, col: int, side: float, rng: np.random.Generator) -> tuple[float, float]:
    def axis(i: int) -> float:
        c = SIZE * (2 * i + 1) / 6 + rng.uniform(-3, 3)
        lo, hi = side / 2 + 1, SIZE - side / 2 - 1
        return float(np.clip(c, lo, hi))

    return axis(col), axis(row)


def layout(rng: np.random.Generator, count: int, size: str | None = None):
    """Boxes [(cx, cy, side)], size class and position name(s) for `count` shapes."""
    if size is None:
        size = rng.choice(["small", "medium", "large"]) if count == 1 else rng.choice(["small", "medium"])
    lo, hi = SIZES[size]
    if count == 1:
        row, col = int(rng.integers(3)), int(rng.integers(3))
        side = float(rng.uniform(lo, hi))
        cx, cy = _cell_centre(row, col, side, rng)
        return [(cx, cy, side)], str(size), position_name(row, col)
    while True:
        cells = rng.choice(9, 2, replace=False)
        boxes, names = [], []
        for cell in sorted(cells):
            row, col = divmod(int(cell), 3)
            side = float(rng.uniform(lo, hi))
            boxes.append((*_cell_centre(row, col, side, rng), side))
            names.append(position_name(row, col))
        if not _box_overlap(boxes[0], boxes[1], 2.0):
            return boxes, str(size), " and ".join(names)


def sample(rng: np.random.Generator, shape: str, color: str, bg: str, count: int | None = None, striped: bool = False):
    """(image, truth) for one drawing of the triple."""
    if count is None:
        count = 1 if rng.random() < 0.7 else 2
    boxes, size, pos = layout(rng, count)
    img = render(bg, color, shape, boxes, striped)
    truth = {"shape": shape, "color": color, "background": bg, "count": count, "size": size, "position": pos}
    if striped:
        truth["fill"] = "striped"
    return img, truth


# ---------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def fix_articles(text: str) -> str:
    """'a orange background' -> 'an orange background'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def noun_phrase(rng: np.random.Generator, t: dict, with_size: bool, shape_word: str | None = None, extra: str = "") -> str:
    """'a red circle', 'two small green stars', 'one orange square', 'red circle' ..."""
    words = []
    if with_size:
        words.append(t["size"])
    if extra:
        words.append(extra)
    words.append(t["color"])
    noun = shape_word or t["shape"]
    if t["count"] == 2:
        noun = PLURAL.get(noun, noun + "s")
    body = " ".join(words + [noun])
    if t["count"] == 2:
        return "two " + body
    r = rng.random()
    if r < 0.7:
        return article(body) + " " + body
    if r < 0.85:
        return "one " + body
    return body


# {o}: noun phrase, {b}: background colour, {p}: position phrase ("in the top left")
TRAIN_TEMPLATES = [
    "{o} on a {b} background",
    "{o}, {b} background",
    "{b} background with {o}",
    "an image of {o} on {b}",
    "{o} on {b}",
    "a picture of {o} on a {b} background",
    "{o} against a {b} background",
    "{o} in front of a {b} background",
    "{b} background, {o}",
    "a {b} image with {o}",
    "{o} drawn on a {b} background",
    "{o} on a plain {b} background",
    "an image with a {b} background and {o}",
    "{o} with a {b} background",
    "{b} background and {o}",
    "{o} lying on a {b} background",
    "{o} floating on {b}",
    "{o} on top of a {b} background",
    "a {b} colored background with {o}",
    "{o} printed on a {b} background",
]
TRAIN_TEMPLATES_POS = [
    "{o} {p}",
    "{o} {p} of a {b} background",
    "{o} {p}, {b} background",
    "{o} on a {b} background, {p}",
    "{b} background with {o} {p}",
]
TRAIN_TEMPLATES_NO_BG = ["{o}", "an image of {o}", "a picture of {o}"]

# phrasings used only by the evaluation prompts
EVAL_TEMPLATES = [
    "{o} over a {b} background",
    "on a {b} background: {o}",
    "a {b} background showing {o}",
    "there is {o} on a {b} background",
    "{o} resting on {b}",
    "{o} set against {b}",
    "a simple drawing of {o}, the background is {b}",
    "{o} sitting on a {b} background",
    "a {b} background behind {o}",
    "{o} and a {b} background",
]


def train_caption(rng: np.random.Generator, t: dict) -> str:
    """A random training caption for the ground truth t (size and position only sometimes)."""
    r = rng.random()
    if t["count"] == 1 and r < 0.15:
        tpl = TRAIN_TEMPLATES_POS[rng.integers(len(TRAIN_TEMPLATES_POS))]
        p = "in the " + t["position"]
    elif r < 0.2:
        tpl = TRAIN_TEMPLATES_NO_BG[rng.integers(len(TRAIN_TEMPLATES_NO_BG))]
        p = ""
    else:
        tpl = TRAIN_TEMPLATES[rng.integers(len(TRAIN_TEMPLATES))]
        p = ""
    o = noun_phrase(rng, t, with_size=rng.random() < 0.25)
    return fix_articles(tpl.format(o=o, b=t["background"], p=p))


def sks_caption(rng: np.random.Generator, t: dict) -> str:
    """Captions of the held-out concept datasets with the trigger word 'sks'."""
    if t.get("fill") == "striped":
        o = noun_phrase(rng, t, with_size=False, extra="sks striped")
    else:
        o = noun_phrase(rng, t, with_size=False, shape_word="sks shape")
    tpl = ["{o} on a {b} background", "{o}, {b} background", "{b} background with {o}"][rng.integers(3)]
    return fix_articles(tpl.format(o=o, b=t["background"]))


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def save_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, "RGB").save(path, optimize=True)


def eval_prompts() -> list[dict]:
    """100 prompts: each held-out triple 4 times (4 of them 5 times), evaluation phrasings only,
    one shape in 80 % of them."""
    rng = np.random.default_rng(SEED_EVAL)
    held = heldout_triples()
    order = held * 4 + [held[i] for i in rng.choice(len(held), 100 - 4 * len(held), replace=False)]
    rows = []
    for k, (s, c, b) in enumerate(order):
        count = 2 if rng.random() < 0.2 else 1
        t = {"shape": s, "color": c, "background": b, "count": count, "size": "medium", "position": "center"}
        tpl = EVAL_TEMPLATES[k % len(EVAL_TEMPLATES)]
        prompt = fix_articles(tpl.format(o=noun_phrase(rng, t, with_size=False), b=b)).replace("there is two", "there are two")
        rows.append({"prompt": prompt, "shape": s, "color": c, "background": b, "count": count})
    rng.shuffle(rows)
    return rows


def ci_subset(rows: list[dict]) -> list[dict]:
    """24 prompts: 6 per shape, single shapes, as many different colours and backgrounds as the
    order allows."""
    out, used_c, used_b = [], set(), set()
    for shape in SHAPES:
        cand = [r for r in rows if r["shape"] == shape and r["count"] == 1]
        picked = 0
        for r in sorted(cand, key=lambda r: (r["color"] in used_c) + (r["background"] in used_b)):
            if picked == 6:
                break
            if any(r["color"] == o["color"] and r["background"] == o["background"] for o in out):
                continue
            out.append(r)
            used_c.add(r["color"])
            used_b.add(r["background"])
            picked += 1
    return out


def concept_dataset(kind: str, seed: int) -> list[tuple[np.ndarray, dict, str]]:
    """20 images of a held-out concept ('heart' or 'striped') with sks captions."""
    rng = np.random.default_rng(seed)
    pairs = [(c, b) for c in COLOR_NAMES for b in COLOR_NAMES if c != b]
    idx = rng.choice(len(pairs), 20, replace=False)
    out = []
    for i, j in enumerate(idx):
        c, b = pairs[j]
        count = 2 if i % 5 == 4 else 1
        if kind == "heart":
            img, t = sample(rng, HELD_OUT_SHAPE, c, b, count=count)
        else:
            if COLORS[b] == stripe_colour(c):  # keep the stripes visible against the background
                b = "blue" if c != "blue" else "green"
            img, t = sample(rng, SHAPES[i % 4], c, b, count=count, striped=True)
        out.append((img, t, sks_caption(rng, t)))
    return out


def fixtures() -> list[tuple[str, np.ndarray, dict]]:
    """48 images: every shape with every colour and every background, both counts and all sizes."""
    rng = np.random.default_rng(SEED_FIXTURES)
    out = []
    n = 0
    for si, shape in enumerate(SHAPES):
        for k in range(12):
            c = COLOR_NAMES[(k + si) % 8]
            b = COLOR_NAMES[(k * 3 + si * 5 + 1) % 8]
            if b == c:
                b = COLOR_NAMES[(COLOR_NAMES.index(b) + 1) % 8]
            count = 2 if k % 4 == 3 else 1
            size = ["small", "medium", "large"][k % 3] if count == 1 else ["small", "medium"][k % 2]
            boxes, size, pos = layout(rng, count, size)
            img = render(b, c, shape, boxes)
            t = {"shape": shape, "color": c, "background": b, "count": count, "size": size, "position": pos}
            out.append((f"{n:03d}.png", img, t))
            n += 1
    return out


def write_files() -> None:
    held = heldout_triples()
    (HERE / "heldout.json").write_text(
        json.dumps(
            {
                "description": "(shape, colour, background) triples excluded from base training; "
                "the evaluation prompts use exactly these",
                "triples": [list(t) for t in held],
            },
            indent=1,
        )
        + "\n"
    )
    rows = eval_prompts()
    write_jsonl(HERE / "eval_prompts.jsonl", rows)
    write_jsonl(HERE / "eval_prompts_ci.jsonl", ci_subset(rows))

    for kind, seed in (("heart", SEED_HEART), ("striped", SEED_STRIPED)):
        d = REPO / "www" / "datasets" / kind
        d.mkdir(parents=True, exist_ok=True)
        for p in list(d.glob("*.png")) + list(d.glob("*.txt")):
            p.unlink()
        for i, (img, _t, cap) in enumerate(concept_dataset(kind, seed)):
            save_png(d / f"{i:03d}.png", img)
            (d / f"{i:03d}.txt").write_text(cap + "\n")

    fx = REPO / "tests" / "fixtures" / "demo"
    fx.mkdir(parents=True, exist_ok=True)
    for p in fx.glob("*.png"):
        p.unlink()
    truth = []
    for name, img, t in fixtures():
        save_png(fx / name, img)
        truth.append({"file": name, **t})
    write_jsonl(fx / "truth.jsonl", truth)


def training_set(n: int, seed: int = SEED_TRAIN) -> tuple[np.ndarray, list[dict]]:
    """n images uniformly over the training triples (uint8 [n, 64, 64, 3]) and their ground truth."""
    rng = np.random.default_rng(seed)
    triples = train_triples()
    order = np.concatenate([rng.permutation(len(triples)) for _ in range(-(-n // len(triples)))])[:n]
    imgs = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    truths = []
    for i in range(n):
        s, c, b = triples[order[i]]
        imgs[i], t = sample(rng, s, c, b)
        truths.append(t)
    perm = rng.permutation(n)
    return imgs[perm], [truths[i] for i in perm]


def write_training_set(out: Path, n: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    imgs, truths = training_set(n)
    np.save(out / "images.npy", imgs)
    write_jsonl(out / "truth.jsonl", truths)


def preview(out: Path, n: int = 48) -> None:
    from PIL import Image, ImageDraw

    imgs, truths = training_set(n, seed=SEED_TRAIN + 1)
    rng = np.random.default_rng(0)
    cols = 6
    tile_w, tile_h = 200, 100
    sheet = Image.new("RGB", (cols * tile_w, (n // cols) * tile_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        x, y = (i % cols) * tile_w, (i // cols) * tile_h
        sheet.paste(Image.fromarray(imgs[i]), (x + 4, y + 4))
        cap = train_caption(rng, truths[i])
        words, line, lines = cap.split(), "", []
        for w in words:
            if len(line) + len(w) > 18:
                lines.append(line)
                line = w
            else:
                line = (line + " " + w).strip()
        lines.append(line)
        draw.text((x + 72, y + 4), "\n".join(lines), fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["files", "train", "preview"])
    ap.add_argument("--out", type=Path)
    ap.add_argument("-n", type=int, default=40000)
    a = ap.parse_args()
    if a.command == "files":
        write_files()
    elif a.command == "train":
        if a.out is None:
            sys.exit("train needs --out DIR")
        write_training_set(a.out, a.n)
    else:
        preview(a.out or Path("/tmp/demo-preview.png"))


if __name__ == "__main__":
    main()
