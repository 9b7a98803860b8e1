// What the training panel shows while a run goes: the figures of the last step, the loss curve
// (a canvas: every step's loss, faint, and the smoothed loss), the sample images and the
// checkpoints with their download links.
import { $, el, bytes, duration, fillList } from "./dom.js";

/** [step, loss, smoothed loss, lr] of every step shown. */
let points = [];

const fmtLoss = (v) => (Number.isFinite(v) ? v.toFixed(4) : "–");
const fmtLr = (v) => (Number.isFinite(v) ? v.toExponential(2) : "–");

/** The figures of the last step. */
export function showStats(r) {
  const speed = Number.isFinite(r?.it_s) && r.it_s > 0
    ? (r.it_s >= 1 ? `${r.it_s.toFixed(2)} it/s` : `${(1 / r.it_s).toFixed(1)} s/it`)
    : "–";
  const eta = Number.isFinite(r?.eta_s) ? duration(r.eta_s * 1000) : "–";
  fillList($("train-stats"), [
    ["Step", r ? `${r.step} of ${r.steps}` : "–"],
    ["Loss (smoothed)", r ? `${fmtLoss(r.loss_avg)} (last ${fmtLoss(r.loss)})` : "–"],
    ["Learning rate", r ? fmtLr(r.lr) : "–"],
    ["Speed", speed],
    ["Time left", r?.finished ? "done" : eta],
  ]);
  const bar = $("train-progress");
  if (r) {
    bar.max = r.steps;
    bar.value = r.step;
  } else {
    bar.value = 0;
  }
}

/** Replaces the curve's points ([[step, loss, avg, lr]]). */
export function setLosses(list) {
  points = list.map((p) => [...p]);
  drawLoss();
}

/** Adds one step's point. */
export function addLoss(r) {
  points = points.filter(([s]) => s < r.step);
  points.push([r.step, r.loss, r.loss_avg, r.lr]);
  drawLoss();
}

function drawLoss() {
  const canvas = $("train-loss");
  const dpr = Math.min(2, window.devicePixelRatio || 1);
  const cssW = canvas.clientWidth || 480;
  const cssH = canvas.clientHeight || 180;
  if (canvas.width !== Math.round(cssW * dpr) || canvas.height !== Math.round(cssH * dpr)) {
    canvas.width = Math.round(cssW * dpr);
    canvas.height = Math.round(cssH * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  const style = getComputedStyle(document.documentElement);
  const fg = style.getPropertyValue("--fg").trim() || "#000";
  const muted = style.getPropertyValue("--muted").trim() || "#666";
  const accent = style.getPropertyValue("--accent").trim() || "#1f4d7a";
  const line = style.getPropertyValue("--line").trim() || "#ccc";
  const last = points.at(-1);
  // For tests and tools: the number of steps drawn and the last [step, loss, smoothed, lr].
  canvas.dataset.points = String(points.length);
  canvas.dataset.last = last ? JSON.stringify(last) : "";
  canvas.setAttribute("aria-label", "Loss curve");
  canvas.title = last ? `Loss curve: ${points.length} steps, smoothed loss ${fmtLoss(last[2])} at step ${last[0]}` : "Loss curve: no steps yet";
  const pad = { l: 48, r: 10, t: 10, b: 22 };
  const w = cssW - pad.l - pad.r;
  const h = cssH - pad.t - pad.b;
  ctx.font = "11px system-ui, sans-serif";
  ctx.strokeStyle = line;
  ctx.lineWidth = 1;
  ctx.strokeRect(pad.l, pad.t, w, h);
  if (!points.length) {
    ctx.fillStyle = muted;
    ctx.fillText("The loss appears here once training runs.", pad.l + 8, pad.t + h / 2);
    return;
  }
  const values = points.flatMap(([, l, a]) => [l, a]).filter(Number.isFinite);
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (!(hi > lo)) {
    hi = lo + 1e-3;
    lo -= 1e-3;
  }
  const s0 = Math.min(0, points[0][0] - 1);
  const s1 = Math.max(points.at(-1)[0], s0 + 1);
  const x = (s) => pad.l + ((s - s0) / (s1 - s0)) * w;
  const y = (v) => pad.t + (1 - (v - lo) / (hi - lo)) * h;
  ctx.fillStyle = muted;
  ctx.textAlign = "right";
  ctx.fillText(hi.toPrecision(3), pad.l - 4, pad.t + 9);
  ctx.fillText(lo.toPrecision(3), pad.l - 4, pad.t + h);
  ctx.textAlign = "center";
  ctx.fillText(`step ${s1}`, pad.l + w - 20, cssH - 6);
  ctx.fillText("loss", pad.l + w / 2, cssH - 6);
  const path = (k, colour, width) => {
    ctx.beginPath();
    let started = false;
    for (const p of points) {
      if (!Number.isFinite(p[k])) continue;
      if (started) ctx.lineTo(x(p[0]), y(p[k]));
      else ctx.moveTo(x(p[0]), y(p[k]));
      started = true;
    }
    ctx.strokeStyle = colour;
    ctx.lineWidth = width;
    ctx.stroke();
  };
  ctx.globalAlpha = 0.35;
  path(1, fg, 1);
  ctx.globalAlpha = 1;
  path(2, accent, 2);
  if (points.length === 1) {
    ctx.fillStyle = accent;
    ctx.beginPath();
    ctx.arc(x(points[0][0]), y(points[0][2]), 3, 0, 2 * Math.PI);
    ctx.fill();
  }
}

const urls = new Set();
function objectUrl(file) {
  const u = URL.createObjectURL(file);
  urls.add(u);
  return u;
}

/** Adds sample images ([{step, prompt, file}]), newest step first. */
export function addSamples(list) {
  const ol = $("train-samples");
  for (const s of [...list].reverse()) {
    const url = objectUrl(s.file);
    const name = `sample-step-${s.step}-${s.prompt.replace(/[^A-Za-z0-9]+/g, "_").slice(0, 40)}.png`;
    ol.prepend(el("li", { dataset: { step: String(s.step) } },
      el("figure", {},
        el("img", { src: url, alt: `Sample at step ${s.step}: ${s.prompt}`, width: 128, height: 128 }),
        el("figcaption", {}, el("span", {}, `Step ${s.step}`), el("span", { class: "muted" }, s.prompt),
          el("a", { href: url, download: name, class: "small" }, "Download")))));
  }
  $("train-samples-empty").hidden = ol.children.length > 0;
}

/** Lists the checkpoints ([{step, file}]) with download links; `name` is the LoRA's name. */
export function setCheckpoints(list, name) {
  const ul = $("train-checkpoints");
  ul.replaceChildren(...list.map((c) => {
    const file = `${name || "lora"}-step-${c.step}.safetensors`;
    return el("li", { dataset: { step: String(c.step) } },
      el("a", { href: objectUrl(c.file), download: file }, `Download checkpoint at step ${c.step}`),
      el("span", { class: "muted" }, ` ${bytes(c.file.size)}`));
  }));
  $("train-checkpoints-empty").hidden = list.length > 0;
}

/** Adds a download link for an exported file ({name, file}) to the list under the buttons. */
export function addDownload({ name, file }, label) {
  const ul = $("train-downloads");
  for (const li of ul.querySelectorAll("li")) if (li.dataset.name === name) li.remove();
  const a = el("a", { href: objectUrl(file), download: name }, `${label}: ${name}`);
  ul.append(el("li", { dataset: { name } }, a, el("span", { class: "muted" }, ` ${bytes(file.size)}`)));
  return a;
}

/** Clears everything a previous run showed. */
export function resetView() {
  points = [];
  drawLoss();
  showStats(null);
  $("train-samples").replaceChildren();
  $("train-samples-empty").hidden = false;
  $("train-checkpoints").replaceChildren();
  $("train-checkpoints-empty").hidden = false;
  $("train-downloads").replaceChildren();
  for (const u of urls) URL.revokeObjectURL(u);
  urls.clear();
}

/** Redraws the curve at the canvas's current size. */
export const redrawLoss = drawLoss;
