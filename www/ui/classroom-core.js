// What the classroom's demonstrations share: the bundled demo adapters (www/adapters/) and the
// ones made in the page, generating images with chosen adapters and strengths, labelled image
// grids that download as one PNG, pixel differences, number lists, form controls.
//
// The classroom's adapters are its own: added to the engine and kept disabled except while a
// demonstration draws with them; the LoRA panel's cards are switched off for those images and
// restored afterwards (as the X/Y grid does).
import { $, el } from "./dom.js";
import { adapters as cards, override, restoreAll } from "./lora.js";
import { loadDefaultModel } from "./model.js";
import { annotatedPng, drawLabelledGrid } from "./grid.js";

/** Prompt, seed and steps every image demonstration shares (overridable in the URL). */
export const IMAGE_DEFAULTS = { prompt: "a red sks shape on a blue background", seed: "3", steps: "12" };

// --- the bundled adapters and the ones made here -------------------------------------------------

let manifest = null;
/** Classroom adapters on the engine: key → {id, key, name, rank, alpha, enabled}. */
const loaded = new Map();
/** Adapter loads in flight: key → Promise. */
const loading = new Map();

/** The bundled adapters (adapters/adapters.json): [{key, file, concept, rank, alpha, steps, label}]. */
export async function bundled() {
  if (!manifest) {
    const r = await fetch(new URL("adapters/adapters.json", document.baseURI));
    if (!r.ok) throw new Error(`the bundled demo adapters are missing from this build (adapters/adapters.json: ${r.status})`);
    manifest = (await r.json()).adapters;
  }
  return manifest;
}

async function install(app, key, file, info) {
  const card = await app.engine.call("lora_add", { file });
  await app.engine.call("lora_set", { id: card.id, te: 0, unet: 0, enabled: false });
  const a = { id: card.id, key, name: file.name, rank: info.rank, alpha: info.alpha, enabled: false, bytes: file.size };
  loaded.set(key, a);
  return a;
}

/** A bundled adapter on the engine (added once, kept disabled). */
export function adapter(app, key) {
  if (loaded.has(key)) return Promise.resolve(loaded.get(key));
  if (!loading.has(key)) {
    const p = (async () => {
      const info = (await bundled()).find((b) => b.key === key);
      if (!info) throw new Error(`no bundled adapter "${key}" (available: ${manifest.map((b) => b.key).join(", ")})`);
      const r = await fetch(new URL(`adapters/${info.file}`, document.baseURI));
      if (!r.ok) throw new Error(`adapters/${info.file}: ${r.status} ${r.statusText}`);
      const file = new File([await r.blob()], info.file);
      return install(app, key, file, info);
    })().finally(() => loading.delete(key));
    loading.set(key, p);
  }
  return loading.get(key);
}

/** Adds adapter bytes made in the page (a resized adapter) under `key`; replaces an older one. */
export async function addMade(app, key, bytes, name, info) {
  if (loaded.has(key)) return loaded.get(key);
  return install(app, key, new File([bytes], name), info);
}

/** The engine's adapter with this id, if the classroom added it. */
export const byId = (id) => [...loaded.values()].find((a) => a.id === id);

/** Forgets the classroom's adapters (the model changed: the engine re-fitted or dropped them). */
export async function forgetAll(app) {
  epoch++;
  const all = [...loaded.values()];
  loaded.clear();
  for (const a of all) await app.engine.call("lora_remove", { id: a.id }).catch(() => {});
}

// --- drawing images with chosen adapters ---------------------------------------------------------

/** Images made by earlier runs, by everything that decides them (generation is deterministic). */
const made = new Map();
const MADE_MAX = 300;
let epoch = 0;

/** What decides a job's image: the model, its parameters, the adapters and their strengths. */
function jobKey(app, job) {
  return JSON.stringify([epoch, app.model?.name, app.model?.weights, job.model ?? "", job.prompt, Number(job.seed), Number(job.steps),
    job.adapters.map(([a, s]) => [a.id, s]).sort((x, y) => x[0] - y[0]), (job.blocks ?? []).map(([a, w]) => [a.id, w])]);
}

/**
 * Generates one image per job, in order, as one uninterrupted run on the engine's queue:
 * job = {adapters: [[classroom adapter, strength]…], blocks: [[adapter, [in, mid, out]]…],
 * prompt, seed, steps, model (a tag when the engine holds other weights than the demo model's)}.
 * Adapters not named are off; the LoRA panel's cards are off meanwhile. An image an earlier run
 * made for the same job is reused (never for a job with a `model` tag). Resolves to
 * [{blob, width, height, ms}].
 */
export function generateAll(app, jobs, onProgress = () => {}) {
  const keys = jobs.map((j) => (j.model ? null : jobKey(app, j)));
  const fresh = jobs.map((_, i) => i).filter((i) => !keys[i] || !made.has(keys[i]));
  const done = fresh.length ? generateFresh(app, fresh.map((i) => jobs[i]), onProgress) : Promise.resolve([]);
  return done.then((out) => {
    const results = keys.map((k) => (k ? made.get(k) : null));
    fresh.forEach((i, n) => {
      results[i] = out[n];
      if (keys[i]) made.set(keys[i], out[n]);
    });
    while (made.size > MADE_MAX) made.delete(made.keys().next().value);
    return results;
  });
}

function generateFresh(app, jobs, onProgress) {
  const e = app.engine;
  const fail = (err) => {
    if (app.isFatal(err)) app.fatal(err);
    throw err;
  };
  override(app, new Map([...cards.values()].map((c) => [c, { te: c.te, unet: c.unet, enabled: false }])));
  // Strength and block-weight changes: a failure fails the run.
  const side = [];
  const state = new Map();
  const set = (a, s) => {
    if (state.has(a.id) && state.get(a.id) === s) return;
    state.set(a.id, s);
    side.push(e.call("lora_set", { id: a.id, te: s ?? 0, unet: s ?? 0, enabled: s !== null }));
  };
  const results = jobs.map((job, i) => {
    const wanted = new Map(job.adapters.map(([a, s]) => [a.id, s]));
    for (const a of loaded.values()) set(a, wanted.has(a.id) ? wanted.get(a.id) : null);
    for (const [a, w] of job.blocks ?? []) side.push(e.call("set_block_weights", { id: a.id, weights: w }));
    const steps = Number(job.steps);
    const r = e.call("generate", {
      prompt: job.prompt, negative: "", seed: Number(job.seed), steps, cfg: app.model?.guidance_scale ?? 5,
      sampler: app.model?.sampler ?? "euler_a", width: app.model?.default_width ?? 64, height: app.model?.default_height ?? 64,
    }, { onEvent: (ev) => { if (ev.event === "step") onProgress(i + (ev.step + 1) / steps, jobs.length); } })
      .then((v) => ({ blob: new Blob([v.png], { type: "image/png" }), width: v.width, height: v.height, ms: v.ms }), fail);
    for (const [a] of job.blocks ?? []) side.push(e.call("set_block_weights", { id: a.id, weights: [1, 1, 1] }));
    return r;
  });
  for (const a of loaded.values()) set(a, null);
  restoreAll(app);
  return Promise.all([...results, ...side.map((p) => p.catch(fail))]).then((all) => all.slice(0, jobs.length));
}

/** RGBA pixels of a PNG blob. */
export async function pixels(blob) {
  const bmp = await createImageBitmap(blob);
  const c = new OffscreenCanvas(bmp.width, bmp.height);
  const ctx = c.getContext("2d");
  ctx.drawImage(bmp, 0, 0);
  bmp.close();
  return ctx.getImageData(0, 0, c.width, c.height).data;
}

/** Largest and mean absolute difference of two images' RGB values (0–255). */
export async function difference(a, b) {
  const [x, y] = await Promise.all([pixels(a), pixels(b)]);
  let max = 0;
  let sum = 0;
  let n = 0;
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    if (i % 4 === 3) continue;
    const d = Math.abs(x[i] - y[i]);
    max = Math.max(max, d);
    sum += d;
    n++;
  }
  return { max, mean: n ? sum / n : 0 };
}

/**
 * A labelled image grid with a download link: draws `cells` ([{row, col, blob}]) into a canvas
 * under `host`, cells scaled up for the screen; the link downloads it as one PNG (with the XMP
 * record). Returns the canvas.
 */
export async function showGrid(app, host, { cells, rows, cols, corner, title, file, outline }) {
  const width = cells[0].width ?? 64;
  const height = cells[0].height ?? 64;
  const scale = Math.max(1, Math.ceil(128 / Math.max(width, height)));
  const canvas = el("canvas", { class: "classroom-grid", role: "img", "aria-label": `${title}: rows ${rows.join(", ")}; columns ${cols.join(", ")}` });
  await drawLabelledGrid(canvas, { cells, rows, cols, width, height, corner, scale, outline });
  const link = el("a", { class: "button-link", download: file }, `Download ${title.toLowerCase()} PNG`);
  host.replaceChildren(canvas, el("div", { class: "buttons" }, link));
  const blob = await annotatedPng(app, canvas, file, `${title}: ${corner[1].replace(/ ↓$/, "")} ${rows.join(", ")} × ${corner[0].replace(/ →$/, "")} ${cols.join(", ")}`);
  link.href = URL.createObjectURL(blob);
  return canvas;
}

// --- parameters and the URL ----------------------------------------------------------------------

/** Numbers from "0.5, 1" (commas or spaces); throws on anything else. */
export function numbers(text, what, { min = -Infinity, max = Infinity, count = 8 } = {}) {
  const parts = String(text).split(/[,\s]+/).filter(Boolean);
  if (!parts.length) throw new Error(`Give at least one ${what}.`);
  if (parts.length > count) throw new Error(`At most ${count} values for ${what}.`);
  return parts.map((p) => {
    const v = Number(p);
    if (!Number.isFinite(v) || v < min || v > max) throw new Error(`"${p}" is not a valid ${what} (${min} to ${max}).`);
    return v;
  });
}

/** Waits until the demo model is loaded (offering to load it when another model is). */
export async function demoModel(app, host) {
  const isDemo = () => app.model?.source === "demo" && $("model").dataset.state === "loaded";
  if (isDemo()) return;
  const note = el("p", { class: "hint" }, "Waiting for the demo model…");
  if (app.model && app.model.source !== "demo" && $("model").dataset.state !== "loading") {
    note.replaceChildren("The classroom runs on the demo model, but another model is loaded. ",
      el("button", { type: "button", class: "small", onclick: () => loadDefaultModel(app) }, "Load the demo model"));
  }
  host.replaceChildren(note);
  await new Promise((ok) => {
    const t = setInterval(() => {
      if (isDemo()) {
        clearInterval(t);
        ok();
      }
    }, 200);
  });
  host.replaceChildren();
}

export const query = (params) => Object.entries(params)
  .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(String(v)).replace(/%2C/gi, ",")}`)
  .join("&");

/** The link that opens a demonstration with these parameters. */
export const demoHash = (id, params) => `#classroom/${id}${Object.keys(params).length ? `?${query(params)}` : ""}`;


/** A labelled <select> from [value, text] pairs. */
export function select(label, options, value, onchange) {
  const s = el("select", { "aria-label": label, onchange: () => onchange(s.value) },
    ...options.map(([v, t]) => el("option", { value: v }, t)));
  if (options.some(([v]) => v === value)) s.value = value;
  return el("label", { class: "field" }, label, s);
}

/** A labelled input; `onchange` gets the value on change (Enter or leaving the field). */
export function input(label, value, onchange, attrs = {}) {
  const i = el("input", { type: "text", value: String(value ?? ""), "aria-label": label, onchange: () => onchange(i.value), ...attrs });
  return el("label", { class: "field" }, label, i);
}

/** The adapters a demonstration may pick: the bundled ones. */
export async function adapterChoices() {
  return (await bundled()).map((b) => [b.key, b.label]);
}

/** Whether the classroom has adapters on the engine. */
export const hasAdapters = () => loaded.size > 0;
