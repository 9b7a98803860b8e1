// Generate panel and output: the form, batches, per-step progress with elapsed time and ETA, the
// live preview (each step's small RGBA image scaled up smoothly), the gallery (newest first,
// each PNG downloadable with its `parameters` chunk) and restoring parameters from a PNG.
import { $, el, duration, randomSeed } from "./dom.js";
import { SKIP } from "./engine.js";
import { clearImages, loadImages, saveImage } from "./saved.js";

const GALLERY_MAX = 60;
let outstanding = 0;
let failed = false;

/** The form's generation parameters (the engine's `generate` arguments). */
export function readForm() {
  const num = (id) => Number($(id).value);
  return {
    prompt: $("prompt").value,
    negative: $("negative").value,
    seed: num("seed"),
    steps: num("steps"),
    cfg: num("cfg"),
    sampler: $("sampler").value,
    width: num("width"),
    height: num("height"),
  };
}

/** Checks the form; shows the browser's message on the first bad field. */
export function formValid() {
  const form = $("gen-form");
  if (!form.checkValidity()) {
    form.reportValidity();
    return false;
  }
  return true;
}

/** Puts parameters (from a PNG or a gallery item) into the form and locks the seed. */
export function fillForm(p) {
  const set = (id, v) => {
    if (v !== null && v !== undefined && v !== "") $(id).value = String(v);
  };
  set("prompt", p.prompt);
  $("negative").value = p.negative ?? "";
  set("seed", p.seed);
  set("steps", p.steps);
  set("cfg", p.cfg);
  if (p.sampler && [...$("sampler").options].some((o) => o.value === p.sampler)) $("sampler").value = p.sampler;
  set("width", p.width);
  set("height", p.height);
  if (p.seed !== null && p.seed !== undefined) $("seed-random").checked = false;
}

function setStatus(text) {
  $("gen-status").textContent = text;
}

function showError(text) {
  $("gen-error").textContent = text;
  $("gen-error").hidden = !text;
}

// --- progress and preview ----------------------------------------------------------------------

const scratch = document.createElement("canvas");

function sizeStage(width, height) {
  const c = $("preview");
  if (c.width !== width || c.height !== height) {
    c.width = width;
    c.height = height;
  }
  return c.getContext("2d");
}

function drawPreview(p, params) {
  const { width, height } = p;
  const rgba = p.rgba instanceof Uint8ClampedArray ? p.rgba : new Uint8ClampedArray(p.rgba);
  if (!width || !height || rgba.length !== width * height * 4) return;
  scratch.width = width;
  scratch.height = height;
  scratch.getContext("2d").putImageData(new ImageData(rgba, width, height), 0, 0);
  const ctx = sizeStage(params.width || width * 8, params.height || height * 8);
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(scratch, 0, 0, ctx.canvas.width, ctx.canvas.height);
}

async function drawResult(blob, width, height) {
  const bitmap = await createImageBitmap(blob);
  const ctx = sizeStage(width || bitmap.width, height || bitmap.height);
  ctx.drawImage(bitmap, 0, 0, ctx.canvas.width, ctx.canvas.height);
  bitmap.close();
}

/**
 * A step-event handler for one image. Events come after each step; the first one's `step` is 0
 * when the engine counts from 0 and 1 when it counts steps done, so the bar shows steps done.
 */
function stepHandler(getParams, label) {
  let offset = null;
  return (e) => {
    if (e.event !== "step") return;
    if (offset === null) offset = e.step === 0 ? 1 : 0;
    const done = e.step + offset;
    const bar = $("gen-progress");
    bar.max = e.steps;
    bar.value = done;
    const elapsed = Number(e.elapsed_ms);
    const left = done > 0 ? (elapsed / done) * (e.steps - done) : NaN;
    setStatus(`${label} · step ${done} of ${e.steps} · ${duration(elapsed)} elapsed · ETA ${duration(left)}`);
    if (e.preview) drawPreview(e.preview, getParams());
  };
}

function begin() {
  if (outstanding++ === 0) failed = false;
  $("output").dataset.state = "running";
}

function end(ok) {
  if (!ok) failed = true;
  if (--outstanding === 0) $("output").dataset.state = failed ? "error" : "done";
}

/**
 * Queues one `generate`. `makeParams` is the parameters or a function giving them (or `SKIP`)
 * when the engine is free; `label` names the image in the status line. Resolves to the engine's
 * value plus `params` (or `SKIP`).
 */
export function runGenerate(app, makeParams, label) {
  let params = null;
  begin();
  return app.engine.call("generate", () => {
    params = typeof makeParams === "function" ? makeParams() : makeParams;
    if (params === SKIP) return SKIP;
    $("gen-progress").max = params.steps;
    $("gen-progress").value = 0;
    setStatus(`${label} · starting…`);
    return params;
  }, { onEvent: stepHandler(() => params, label) }).then(async (value) => {
    end(true);
    if (value === SKIP) return SKIP;
    const blob = new Blob([value.png], { type: "image/png" });
    await drawResult(blob, value.width, value.height).catch(() => {});
    setStatus(`${label} · done in ${duration(value.ms)} (seed ${value.seed}, ${value.width}×${value.height})`);
    showNotes(value.notes);
    app.refreshDevice();
    return { ...value, blob, params: { ...params, seed: value.seed, width: value.width, height: value.height } };
  }, (err) => {
    end(false);
    setStatus(`${label} · failed`);
    throw err;
  });
}

function showNotes(notes) {
  $("notes").replaceChildren(...(notes ?? []).map((n) => el("li", {}, n)));
}

// --- gallery -----------------------------------------------------------------------------------

/** A file name from the seed and the prompt: `1234-a-watercolor-painting.png`. */
export function fileName(seed, prompt) {
  const words = String(prompt ?? "")
    .replace(/<[^>]*>/g, " ")
    .toLowerCase()
    .replace(/[^a-z0-9]+/g, "-")
    .replace(/^-+|-+$/g, "")
    .slice(0, 48)
    .replace(/-+$/, "");
  return `${seed}${words ? `-${words}` : ""}.png`;
}

function shorten(text, n) {
  const t = String(text ?? "").trim();
  return t.length > n ? `${t.slice(0, n - 1)}…` : t;
}

/** Adds a result at the top of the gallery; a live result replaces the live one on top. */
export function addToGallery(result, { live = false, restored = false } = {}) {
  const gallery = $("gallery");
  const p = result.params;
  const url = URL.createObjectURL(result.blob);
  const alt = `Generated image: seed ${result.seed}, ${result.width}×${result.height}, “${shorten(p.prompt, 80)}”`;
  const item = el("li", { class: "item", dataset: { seed: String(result.seed), live: live ? "1" : "" } },
    el("figure", {},
      el("img", { src: url, alt, width: result.width, height: result.height }),
      el("figcaption", {},
        el("span", {}, `seed ${result.seed} · ${result.width}×${result.height} · ${p.steps} steps · ${p.sampler} · CFG ${p.cfg}`),
        el("span", { class: "muted" }, `${duration(result.ms)}${live ? " · live" : ""}${restored ? " · kept from an earlier visit" : ""}`)),
      el("div", { class: "buttons" },
        el("a", { class: "button-link small", href: url, download: fileName(result.seed, p.prompt) }, "Download PNG"),
        el("button", { type: "button", class: "small secondary", onclick: () => fillForm(p) }, "Use parameters"))));
  item.urlToRevoke = url;
  const top = gallery.firstElementChild;
  if (live && top?.dataset.live) {
    URL.revokeObjectURL(top.urlToRevoke);
    top.replaceWith(item);
  } else {
    gallery.prepend(item);
  }
  while (gallery.children.length > GALLERY_MAX) {
    const last = gallery.lastElementChild;
    URL.revokeObjectURL(last.urlToRevoke);
    last.remove();
  }
}

// --- the Generate button, batches, live re-generation -------------------------------------------

async function generateBatch(app) {
  showError("");
  if (!formValid()) return;
  const base = readForm();
  const count = Math.max(1, Math.floor(Number($("batch").value) || 1));
  if ($("seed-random").checked) base.seed = randomSeed();
  $("seed").value = String(base.seed);
  const jobs = [];
  for (let i = 0; i < count; i++) {
    const params = { ...base, seed: (base.seed + i) % 2 ** 32 };
    const label = count > 1 ? `Image ${i + 1} of ${count}` : "Image";
    jobs.push(runGenerate(app, params, label).then((r) => {
      addToGallery(r);
      app.lastResult = r;
      saveImage(r, GALLERY_MAX);
    }));
  }
  const failure = (await Promise.allSettled(jobs)).find((r) => r.status === "rejected");
  if (failure) {
    showError(`Generation failed: ${failure.reason.message}`);
    if (app.isFatal(failure.reason)) app.fatal(failure.reason);
  }
}

let livePending = false;

/**
 * Re-generates the newest image's parameters (same seed) with the current adapter strengths.
 * Nothing running is cancelled: one live request waits in the queue and takes the newest state.
 */
export function regenerateLive(app) {
  if (livePending || !app.lastResult) return;
  livePending = true;
  runGenerate(app, () => {
    livePending = false;
    return { ...readForm(), seed: app.lastResult.params.seed };
  }, "Live").then((r) => {
    if (r === SKIP) return;
    addToGallery(r, { live: true });
    app.lastResult = r;
  }, (err) => {
    livePending = false;
    showError(`Live generation failed: ${err.message}`);
    if (app.isFatal(err)) app.fatal(err);
  });
}

/** Reads a PNG's parameters through the engine and puts them into the form. */
export async function restoreParameters(app, file) {
  showError("");
  try {
    const p = await app.engine.call("parameters_read", { file });
    fillForm(p);
    setStatus(`Restored the parameters of ${file.name} (seed ${p.seed ?? "–"}).`);
  } catch (err) {
    showError(`${file.name}: ${err.message}`);
    if (app.isFatal(err)) app.fatal(err);
  }
}

/** Puts the images kept in this browser back into the gallery (oldest first, so newest on top). */
async function restoreGallery() {
  const images = (await loadImages()) ?? [];
  for (const r of images) addToGallery(r, { restored: true });
  if (images.length) setStatus(`${images.length} ${images.length === 1 ? "image" : "images"} kept from an earlier visit.`);
}

async function clearGallery() {
  const gallery = $("gallery");
  for (const item of [...gallery.children]) {
    URL.revokeObjectURL(item.urlToRevoke);
    item.remove();
  }
  if (await clearImages()) setStatus("The saved images were deleted from this browser.");
}

export function initGenerate(app) {
  restoreGallery();
  $("clear-gallery").addEventListener("click", clearGallery);
  const form = $("gen-form");
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    generateBatch(app);
  });
  form.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
  // Typing a seed locks it.
  $("seed").addEventListener("input", () => { $("seed-random").checked = false; });
  $("params-input").addEventListener("change", (e) => {
    const file = e.target.files[0];
    e.target.value = "";
    if (file) restoreParameters(app, file);
  });
  app.onModel = (m) => {
    if (m.default_width) $("width").value = String(m.default_width);
    if (m.default_height) $("height").value = String(m.default_height);
    if (m.sampler && [...$("sampler").options].some((o) => o.value === m.sampler)) $("sampler").value = m.sampler;
    // The model's recommended guidance and steps (the demo model: CFG 5, 20 steps).
    if (m.guidance_scale != null) $("cfg").value = String(m.guidance_scale);
    if (m.steps) $("steps").value = String(m.steps);
  };
}
