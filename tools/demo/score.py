"""A Python classifier for demo images, used while training to check diffusers' outputs.

It follows the method of loralab's evaluator (crate/src/eval, `loralab eval`, described in
docs/demo-model.md), which is the reference: background = the palette colour most border
pixels are nearest to; shape pixels = pixels farther from the background than an Otsu threshold
(at least 30); the largest 4-connected component gives the shape colour (palette colour nearest
the median of its interior, background excluded); the kind is the template (circle, square,
triangle, star, heart; 5 sizes around the one the mass gives, Gaussian blur 0-3 px) that best
fits every sizeable component's soft membership, `other` when none fits within 0.35. The
evaluator's mask measures (fill, solidity, centroid, notch, harmonics) are kept as a second
opinion (`shape_by_measures`).
"""

from __future__ import annotations

import math

import numpy as np

from data import COLORS, COLOR_NAMES

PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)
MIN_CONTRAST = 30.0
MIN_SHARE_OF_LARGEST = 0.2
MIN_SHARE_OF_IMAGE = 0.005
OTHER_DISTANCE = 50.0

# (value, tolerance, side) for fill, solidity, centroid_y, notch, h2, h3, h4
_FLAT = (0.0, 0.05, "above")
PROTOTYPES = {
    "circle": [(0.78, 0.06, "both"), (0.94, 0.04, "below"), (0.5, 0.05, "both"), _FLAT, _FLAT, _FLAT, _FLAT],
    "square": [(0.96, 0.05, "below"), (0.97, 0.04, "below"), (0.5, 0.05, "both"), (0.02, 0.04, "above"), _FLAT,
               (0.14, 0.04, "both"), _FLAT],
    "triangle": [(0.55, 0.07, "both"), (0.93, 0.05, "below"), (0.64, 0.05, "both"), _FLAT, (0.28, 0.06, "both"),
                 _FLAT, _FLAT],
    "star": [(0.45, 0.09, "both"), (0.62, 0.1, "both"), (0.55, 0.06, "both"), _FLAT, _FLAT, _FLAT,
             (0.30, 0.08, "both")],
    "heart": [(0.63, 0.06, "both"), (0.89, 0.04, "both"), (0.39, 0.04, "both"), (0.12, 0.06, "both"),
              (0.25, 0.06, "both"), _FLAT, _FLAT],
}


def nearest(rgb: np.ndarray, except_idx: int | None = None) -> int:
    d = np.linalg.norm(PALETTE - rgb[None], axis=1)
    if except_idx is not None:
        d[except_idx] = np.inf
    return int(np.argmin(d))


def otsu(values: np.ndarray) -> float:
    mx = float(values.max())
    if not mx > 0:
        return 0.0
    scale = 255.0 / mx
    hist = np.bincount(np.minimum((np.maximum(values, 0) * scale).astype(np.int64), 255), minlength=256).astype(np.float64)
    total = hist.sum()
    sum_all = (np.arange(256) * hist).sum()
    w0 = np.cumsum(hist)[:-1]
    s0 = np.cumsum(np.arange(256) * hist)[:-1]
    w1 = total - w0
    ok = (w0 > 0) & (w1 > 0)
    m0 = np.where(ok, s0 / np.where(w0 > 0, w0, 1), 0)
    m1 = np.where(ok, (sum_all - s0) / np.where(w1 > 0, w1, 1), 0)
    var = np.where(ok, w0 * w1 * (m0 - m1) ** 2, -1)
    return (int(np.argmax(var)) + 1) / scale


def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    h, w = mask.shape
    seen = np.zeros_like(mask)
    out = []
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0, x0] or seen[y0, x0]:
                continue
            seen[y0, x0] = True
            stack = [(x0, y0)]
            comp = []
            while stack:
                x, y = stack.pop()
                comp.append((x, y))
                for nx, ny in ((x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1)):
                    if 0 <= nx < w and 0 <= ny < h and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((nx, ny))
            out.append(comp)
    return out


def _hull_area(points: list[tuple[int, int]]) -> float:
    pts = sorted(set(points))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(seq):
        chain = []
        for p in seq:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    lower, upper = half(pts), half(reversed(pts))
    poly = lower[:-1] + upper[:-1]
    s = sum(poly[i][0] * poly[(i + 1) % len(poly)][1] - poly[(i + 1) % len(poly)][0] * poly[i][1] for i in range(len(poly)))
    return abs(s) / 2.0


def _harmonics(pixels, cx, cy, bins=36):
    r = np.full(bins, np.nan)
    for x, y in pixels:
        dx, dy = x + 0.5 - cx, y + 0.5 - cy
        b = int(((math.atan2(dy, dx) + math.tau) % math.tau) / math.tau * bins) % bins
        d = math.hypot(dx, dy) + 0.5
        if not r[b] >= d:
            r[b] = d
    filled = [i for i in range(bins) if np.isfinite(r[i])]
    if not filled:
        return [0.0] * 6
    full = r.copy()
    for i in range(bins):
        if np.isfinite(full[i]):
            continue
        prev = next((j for j in ((i - k) % bins for k in range(1, bins)) if np.isfinite(r[j])), i)
        nxt = next((j for j in ((i + k) % bins for k in range(1, bins)) if np.isfinite(r[j])), i)
        dp, dn = (i - prev) % bins, (nxt - i) % bins
        full[i] = (r[prev] * dn + r[nxt] * dp) / (dp + dn) if dp + dn > 0 else r[prev]
    c0 = full.sum()
    out = []
    for k in range(1, 7):
        a = math.tau * k * (np.arange(bins) + 0.5) / bins
        re, im = (full * np.cos(a)).sum(), -(full * np.sin(a)).sum()
        out.append(2 * math.hypot(re, im) / c0)
    return out


def _notch(tops: list[int], h: int) -> float:
    w = len(tops)
    if w < 5:
        return 0.0
    centre = (w - 1) / 2
    mids = [t for i, t in enumerate(tops) if abs(i - centre) <= 0.5]
    band = max(int(round(w * 0.15)), 1)
    left_end = max(math.floor(centre) - band, 0)
    right_start = min(math.ceil(centre) + band + 1, w)
    left, right = tops[:left_end], tops[right_start:]
    if not mids or not left or not right:
        return 0.0
    return (min(mids) - max(min(left), min(right))) / h


def features(pixels: list[tuple[int, int]]) -> dict:
    xs = np.array([p[0] for p in pixels])
    ys = np.array([p[1] for p in pixels])
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    w, h = x1 - x0 + 1, y1 - y0 + 1
    rows_l = np.full(h, 10**9)
    rows_r = np.full(h, -1)
    np.minimum.at(rows_l, ys - y0, xs)
    np.maximum.at(rows_r, ys - y0, xs)
    tops = np.full(w, 10**9)
    np.minimum.at(tops, xs - x0, ys - y0)
    corners = []
    for i in range(h):
        if rows_r[i] < 0:
            continue
        y = y0 + i
        l, r = int(rows_l[i]), int(rows_r[i]) + 1
        corners += [(l, y), (l, y + 1), (r, y), (r, y + 1)]
    hull = _hull_area(corners)
    area = len(pixels)
    cx = x0 + (xs - x0 + 0.5).mean()
    cy = y0 + (ys - y0 + 0.5).mean()
    return {
        "fill": area / (w * h),
        "solidity": min(area / hull, 1.0) if hull > 0 else 1.0,
        "centroid_y": float((ys - y0 + 0.5).mean() / h),
        "notch": _notch([int(t) for t in tops], h),
        "harmonics": _harmonics(pixels, cx, cy),
    }


def fit(f: dict) -> str:
    h = f["harmonics"]
    values = [f["fill"], f["solidity"], f["centroid_y"], f["notch"], h[2], h[3], h[4]]
    best, best_d = "other", math.inf
    for kind, proto in PROTOTYPES.items():
        d = 0.0
        for v, (mu, tol, side) in zip(values, proto):
            if (side == "below" and v > mu) or (side == "above" and v < mu):
                continue
            d += ((v - mu) / tol) ** 2
        if d < best_d:
            best, best_d = kind, d
    return best if best_d <= OTHER_DISTANCE else "other"



# ---------------------------------------------------------------------------
# Template matching (crate/src/eval/template.rs)
# ---------------------------------------------------------------------------

KINDS = ["circle", "square", "triangle", "star", "heart"]
SCALES = [0.9, 0.95, 1.0, 1.05, 1.1]
BLURS = [0.0, 0.6, 1.2, 1.8, 2.4, 3.0]
OTHER_ERROR = 0.35


def _star_unit() -> np.ndarray:
    outer = 1.0 / (2.0 * math.sin(math.radians(72)))
    inner = outer * math.sin(math.radians(18)) / math.sin(math.radians(54))
    height = outer * (1.0 + math.cos(math.radians(36)))
    cy = -height / 2.0 + outer
    pts = []
    for i in range(10):
        r = outer if i % 2 == 0 else inner
        a = math.radians(i * 36.0 - 90.0)
        pts.append((r * math.cos(a), cy + r * math.sin(a)))
    return np.array(pts)


_STAR = _star_unit()


def inside_unit(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if kind == "circle":
        return u * u + v * v <= 0.25
    if kind == "square":
        return (np.abs(u) <= 0.5) & (np.abs(v) <= 0.5)
    if kind == "triangle":
        return (v <= 0.5) & (np.abs(u) <= (v + 0.5) / 2.0)
    if kind == "star":
        inside = np.zeros(np.broadcast(u, v).shape, dtype=bool)
        for i in range(10):
            a, b = _STAR[i], _STAR[(i + 9) % 10]
            cond = (a[1] > v) != (b[1] > v)
            with np.errstate(divide="ignore", invalid="ignore"):
                xint = (b[0] - a[0]) * (v - a[1]) / (b[1] - a[1]) + a[0]
            inside ^= cond & (u < xint)
        return inside
    if kind == "heart":
        x = u * 2.0 * 1.139
        y = -(v * 2.0 * 1.118 - 0.118)
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    raise ValueError(kind)


def _unit_stats() -> dict:
    n = 256
    c = (np.arange(n) + 0.5) / n - 0.5
    u, v = c[None, :], c[:, None]
    out = {}
    for k in KINDS:
        m = inside_unit(k, u, v)
        cnt = m.sum()
        uu = np.broadcast_to(u, m.shape)[m]
        vv = np.broadcast_to(v, m.shape)[m]
        out[k] = (cnt / (n * n), uu.sum() / max(cnt, 1), vv.sum() / max(cnt, 1))
    return out


_STATS = _unit_stats()


def _render(kind: str, bx: float, by: float, side: float, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    sub = (np.arange(4) + 0.5) / 4
    xs = (x0 + np.arange(w)[:, None] + sub[None, :]).ravel()  # w*4
    ys = (y0 + np.arange(h)[:, None] + sub[None, :]).ravel()  # h*4
    u = ((xs - bx) / side)[None, :]
    v = ((ys - by) / side)[:, None]
    m = inside_unit(kind, u, v).astype(np.float32)
    return m.reshape(h, 4, w, 4).mean(axis=(1, 3))


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    rad = math.ceil(3 * sigma)
    k = np.exp(-(np.arange(-rad, rad + 1) ** 2) / (2 * sigma * sigma))
    k /= k.sum()
    m = np.zeros((n, n))
    for i in range(n):
        for t in range(-rad, rad + 1):
            j = i + t
            if 0 <= j < n:
                m[i, j] = k[t + rad]
    return m


def _best_error(kind: str, win: tuple) -> float:
    x0, y0, m = win
    h, w = m.shape
    mass = m.sum()
    if mass <= 0:
        return math.inf
    cx = (m * (x0 + np.arange(w) + 0.5)[None, :]).sum() / mass
    cy = (m * (y0 + np.arange(h) + 0.5)[:, None]).sum() / mass
    area, du, dv = _STATS[kind]
    side0 = math.sqrt(mass / area)
    best = math.inf
    mats = {s: (_blur_matrix(h, s), _blur_matrix(w, s)) for s in BLURS if s > 0}
    for f in SCALES:
        side = side0 * f
        t = _render(kind, cx - du * side, cy - dv * side, side, x0, y0, w, h)
        for s in BLURS:
            b = t if s == 0 else mats[s][0] @ t @ mats[s][1].T
            best = min(best, float(((b - m) ** 2).sum()))
    return best


def template_kind(windows: list[tuple]) -> tuple[str, dict]:
    norm = max(sum(float((m * m).sum()) for _, _, m in windows), 1e-30)
    errors = {k: sum(_best_error(k, win) for win in windows) / norm for k in KINDS}
    best = min(KINDS, key=lambda k: errors[k])
    if not errors[best] <= OTHER_ERROR:
        return "other", errors
    return best, errors


def _windows(dist: np.ndarray, comps: list, contrast: float) -> list[tuple]:
    h, w = dist.shape
    label = np.full((h, w), -1)
    for k, c in enumerate(comps):
        for x, y in c:
            label[y, x] = k
    contrast = max(contrast, MIN_CONTRAST)
    out = []
    for k, c in enumerate(comps):
        xs = [p[0] for p in c]
        ys = [p[1] for p in c]
        bx, by = min(xs), min(ys)
        bw, bh = max(xs) - bx + 1, max(ys) - by + 1
        margin = 3 + max(bw, bh) // 4
        x0, y0 = max(bx - margin, 0), max(by - margin, 0)
        x1, y1 = min(bx + bw + margin, w), min(by + bh + margin, h)
        lab = label[y0:y1, x0:x1]
        m = np.clip(dist[y0:y1, x0:x1] / contrast, 0, 1)
        m = np.where((lab == -1) | (lab == k), m, 0.0)
        out.append((x0, y0, m))
    return out


def classify(img: np.ndarray) -> dict:
    """img: uint8 [H, W, 3] -> {"background", "color", "shape", "count"}."""
    h, w, _ = img.shape
    px = img.astype(np.float32)
    ring = max(min(w, h) // 32, 1)
    border = np.ones((h, w), dtype=bool)
    border[ring : h - ring, ring : w - ring] = False
    bp = px[border]
    near = np.argmin(np.linalg.norm(bp[:, None, :] - PALETTE[None], axis=2), axis=1)
    votes = np.bincount(near, minlength=8)
    bg = int(np.argmax(votes))
    bg_rgb = bp[near == bg].mean(axis=0)
    dist = np.linalg.norm(px - bg_rgb[None, None], axis=2)
    thr = max(otsu(dist.ravel()), MIN_CONTRAST)
    mask = dist > thr
    comps = sorted(components(mask), key=len, reverse=True)
    largest = len(comps[0]) if comps else 0
    min_area = max(MIN_SHARE_OF_IMAGE * h * w, MIN_SHARE_OF_LARGEST * largest, 4.0)
    comps = [c for c in comps if len(c) >= min_area]
    out = {"background": COLOR_NAMES[bg], "color": None, "shape": "other", "count": len(comps)}
    if not comps:
        return out
    main = comps[0]

    def inside(x, y):
        return 0 <= x < w and 0 <= y < h and mask[y, x]

    interior = [(x, y) for x, y in main if inside(x - 1, y) and inside(x + 1, y) and inside(x, y - 1) and inside(x, y + 1)]
    sample = interior if len(interior) >= max(len(main) // 4, 4) else main
    vals = np.array([img[y, x] for x, y in sample])
    med = np.sort(vals, axis=0)[(len(vals) + 1) // 2 - 1].astype(np.float32)
    out["color"] = COLOR_NAMES[nearest(med, bg)]
    out["shape_by_measures"] = fit(features(main))
    contrast = float(np.linalg.norm(med - bg_rgb))
    out["shape"], _ = template_kind(_windows(dist, comps, contrast))
    return out


def score(rows: list[dict], images: list[np.ndarray]) -> dict:
    """Percent correct per attribute, and the per-prompt classifications."""
    tally = {"color": 0, "background": 0, "shape": 0}
    per = []
    for r, img in zip(rows, images):
        c = classify(img)
        ok = {k: c[k] == r[k] for k in tally}
        for k in tally:
            tally[k] += ok[k]
        per.append({**r, "got": c, "ok": ok})
    n = max(len(rows), 1)
    return {"percent": {k: 100.0 * v / n for k, v in tally.items()}, "n": len(rows), "per_prompt": per}
