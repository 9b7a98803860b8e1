// X/Y grid: columns are strengths, rows are seeds (one adapter's strength varies) or adapters
// (each alone at each strength); every cell is one `generate`, drawn with labels onto one canvas
// that downloads as one PNG (with the engine's XMP record: AI-generated, model, adapters). The
// cards' strengths are restored afterwards.
import { $, el } from "./dom.js";
import { adapters, override, restoreAll } from "./lora.js";
import { formValid, readForm, runGenerate, fileName } from "./generate.js";

const MAX_CELLS = 64;
let gridUrl = null;

function numbers(text, what, { integer = false } = {}) {
  const parts = text.split(/[,\s]+/).filter(Boolean);
  if (!parts.length) throw new Error(`Give at least one ${what}.`);
  return parts.map((p) => {
    const v = Number(p);
    if (!Number.isFinite(v) || (integer && (!Number.isInteger(v) || v < 0 || v >= 2 ** 32))) {
      throw new Error(`"${p}" is not a valid ${what}.`);
    }
    return v;
  });
}

function showError(text) {
  $("grid-error").textContent = text;
  $("grid-error").hidden = !text;
}

function updateAdapterChoices() {
  const select = $("grid-adapter");
  const before = select.value;
  select.replaceChildren(...[...adapters.values()].map((a) => el("option", { value: String(a.id) }, a.name)));
  if ([...select.options].some((o) => o.value === before)) select.value = before;
}

function updateMode() {
  const seeds = $("grid-mode").value === "seeds";
  $("grid-adapter-field").hidden = !seeds;
}

/** The rows of the grid: [{label, seed, values: Map(adapter → {te, unet, enabled}) for strength x}]. */
function plan(mode, base) {
  const all = [...adapters.values()];
  if (!all.length) throw new Error("Add a LoRA first: the columns are adapter strengths.");
  if (mode === "seeds") {
    const target = adapters.get(Number($("grid-adapter").value)) ?? all[0];
    const seeds = numbers($("grid-seeds").value, "seed", { integer: true });
    return seeds.map((seed) => ({
      label: String(seed),
      seed,
      values: (x) => new Map([[target, { te: x, unet: x, enabled: true }]]),
      title: target.name,
    }));
  }
  return all.map((a) => ({
    label: a.name,
    seed: base.seed,
    values: (x) => new Map(all.map((b) => [b, b === a ? { te: x, unet: x, enabled: true } : { te: b.te, unet: b.unet, enabled: false }])),
  }));
}

/**
 * Draws a labelled grid onto `canvas`: `cells` [{row, col, blob}] (PNG blobs of `width` ×
 * `height`, drawn `scale` times larger without smoothing), column labels on top, row labels on
 * the left and the two axes' names (`corner`: [columns, rows]) in the top-left corner.
 * `outline(row, col)` may return a colour to frame a cell with. The cells' geometry goes into
 * the canvas's data attributes (`left`, `top`, `cellWidth`, `cellHeight`, `rows`, `cols`).
 */
export async function drawLabelledGrid(canvas, { cells, rows, cols, width, height, corner, scale = 1, outline = null }) {
  const ctx = canvas.getContext("2d");
  const w = width * scale;
  const h = height * scale;
  const font = Math.max(12, Math.min(28, Math.round(Math.min(w, h) / 12)));
  const setFont = () => { ctx.font = `${font}px system-ui, sans-serif`; };
  setFont();
  const left = Math.ceil(Math.max(...[...rows, ...corner].map((t) => ctx.measureText(String(t)).width))) + font;
  const top = Math.round(font * 3);
  canvas.width = left + cols.length * w;
  canvas.height = top + rows.length * h;
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.fillStyle = "#111111";
  setFont();
  ctx.textBaseline = "middle";
  ctx.textAlign = "left";
  ctx.fillText(corner[0], font / 2, top * 0.3);
  ctx.fillText(corner[1], font / 2, top * 0.72);
  ctx.textAlign = "center";
  cols.forEach((x, c) => ctx.fillText(String(x), left + c * w + w / 2, top / 2, w - 4));
  ctx.textAlign = "right";
  rows.forEach((r, i) => ctx.fillText(String(r), left - font / 2, top + i * h + h / 2));
  ctx.imageSmoothingEnabled = scale === 1;
  for (const { row, col, blob } of cells) {
    const bitmap = await createImageBitmap(blob);
    ctx.drawImage(bitmap, left + col * w, top + row * h, w, h);
    bitmap.close();
    const colour = outline?.(row, col);
    if (colour) {
      ctx.strokeStyle = colour;
      ctx.lineWidth = Math.max(2, Math.round(scale * 1.5));
      ctx.strokeRect(left + col * w + ctx.lineWidth / 2, top + row * h + ctx.lineWidth / 2, w - ctx.lineWidth, h - ctx.lineWidth);
    }
  }
  Object.assign(canvas.dataset, { left, top, cellWidth: w, cellHeight: h, rows: rows.length, cols: cols.length });
}

/** The canvas as a PNG Blob with the engine's XMP record (AI-generated, model, adapters) and `description`. */
export async function annotatedPng(app, canvas, name, description) {
  const drawn = await new Promise((ok) => canvas.toBlob(ok, "image/png"));
  const { png } = await app.engine.call("png_annotate", { file: drawn, name, description });
  return new Blob([png], { type: "image/png" });
}

async function draw(app, cells, rows, cols, width, height, axis) {
  const canvas = $("grid-canvas");
  await drawLabelledGrid(canvas, { cells, rows: rows.map((r) => r.label), cols, width, height, corner: ["strength →", `${axis} ↓`] });
  canvas.hidden = false;
  canvas.setAttribute("aria-label", `X/Y grid: ${rows.length} rows (${rows.map((r) => r.label).join(", ")}) × strengths ${cols.join(", ")}`);
  const description = `X/Y grid: strengths ${cols.join(", ")} × ${axis} ${rows.map((r) => r.label).join(", ")}`;
  const blob = await annotatedPng(app, canvas, "grid.png", description);
  if (gridUrl) URL.revokeObjectURL(gridUrl);
  gridUrl = URL.createObjectURL(blob);
  const link = $("grid-download");
  link.href = gridUrl;
  link.download = fileName(`grid-${rows[0].seed}`, readForm().prompt);
  link.hidden = false;
}

async function renderGrid(app) {
  showError("");
  if (!formValid()) return;
  const base = readForm();
  let cols;
  let rows;
  try {
    cols = numbers($("grid-strengths").value, "strength");
    rows = plan($("grid-mode").value, base);
    if (rows.length * cols.length > MAX_CELLS) throw new Error(`${rows.length * cols.length} cells: at most ${MAX_CELLS}.`);
  } catch (err) {
    showError(err.message);
    return;
  }
  const button = $("grid-button");
  button.disabled = true;
  $("grid").dataset.state = "running";
  const n = rows.length * cols.length;
  const jobs = [];
  rows.forEach((r, row) => cols.forEach((x, col) => {
    override(app, r.values(x));
    const k = row * cols.length + col + 1;
    jobs.push(runGenerate(app, { ...base, seed: r.seed }, `Grid cell ${k} of ${n}`).then((res) => ({ row, col, blob: res.blob, res })));
  }));
  restoreAll(app);
  const settled = await Promise.allSettled(jobs);
  button.disabled = false;
  const failure = settled.find((s) => s.status === "rejected");
  if (failure) {
    $("grid").dataset.state = "error";
    showError(`The grid stopped: ${failure.reason.message}`);
    if (app.isFatal(failure.reason)) app.fatal(failure.reason);
    return;
  }
  const cells = settled.map((s) => s.value);
  const axis = $("grid-mode").value === "seeds" ? `seed (${rows[0].title})` : "adapter";
  try {
    await draw(app, cells, rows, cols, cells[0].res.width, cells[0].res.height, axis);
  } catch (err) {
    $("grid").dataset.state = "error";
    showError(`The grid could not be saved: ${err.message}`);
    if (app.isFatal(err)) app.fatal(err);
    return;
  }
  $("grid").dataset.state = "done";
}

export function initGrid(app) {
  app.onAdapters = updateAdapterChoices;
  $("grid-mode").addEventListener("change", updateMode);
  updateMode();
  $("grid-form").addEventListener("submit", (e) => {
    e.preventDefault();
    renderGrid(app);
  });
}
