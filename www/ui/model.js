// Model panel: the demo model on open, a folder or checkpoint from disk (picker or drop), a URL
// (downloaded once into the Origin Private File System by the engine), the weight type, the
// cached models, and load progress.
import { $, el, bytes, ext } from "./dom.js";
import { lastModel, saveLastModel } from "./saved.js";

/** The last source that loaded (weight type changes reload it). */
let lastSource = null;

function progress(e) {
  if (e.event !== "progress") return;
  const bar = $("model-progress");
  const total = Number(e.total);
  const done = Number(e.done);
  let pct = "";
  if (total > 0 && Number.isFinite(done)) {
    bar.max = total;
    bar.value = Math.min(done, total);
    pct = ` · ${Math.floor((100 * Math.min(done, total)) / total)} %`;
  } else {
    bar.removeAttribute("value");
  }
  const what = [e.phase, e.label].filter(Boolean).join(": ");
  $("model-progress-label").textContent = `${what || "Loading"}${pct}`;
}

/** The model panel's licence line: name, what it allows, where it was found, a link to its text. */
function showLicence(licence) {
  const line = $("model-licence");
  if (!licence) {
    line.hidden = true;
    return;
  }
  const unknown = !licence.known?.length;
  line.classList.toggle("unknown", unknown);
  const link = licence.url?.startsWith("https://")
    ? [" ", el("a", { href: licence.url, target: "_blank", rel: "noopener noreferrer" }, "Read the licence")]
    : [];
  line.replaceChildren(
    "Licence: ", el("span", { class: "licence-name" }, licence.name), ` · ${licence.summary}`,
    el("span", { class: "muted" }, ` (${licence.inferred ? "inferred: " : "from "}${licence.source})`),
    ...link,
  );
  line.hidden = false;
}

function describeSource(s) {
  if (s.source === "demo") return "the demo model";
  if (s.source === "url") return s.url;
  return s.paths.length === 1 ? s.paths[0] : `${s.paths[0].split("/")[0]} (${s.paths.length} files)`;
}

/** Loads a model: `{source: "demo"}`, `{source: "url", url}` or `{source: "files", files, paths}`. */
export async function loadModel(app, source) {
  const panel = $("model");
  panel.dataset.state = "loading";
  $("model-error").hidden = true;
  $("model-load").hidden = false;
  $("model-progress").value = 0;
  $("model-progress-label").textContent = app.engine.current ? "Waiting for the engine…" : "Starting…";
  $("model-current").textContent = `Loading ${describeSource(source)}…`;
  try {
    const value = await app.engine.call("load_model", () => ({ ...source, weights: $("weights").value }), { onEvent: progress });
    app.model = value;
    lastSource = source;
    panel.dataset.state = "loaded";
    const size = value.default_width && value.default_height ? ` · ${value.default_width}×${value.default_height}` : "";
    $("model-current").textContent = `${value.name} · ${value.weights} · ${bytes(value.bytes)}${size}`;
    showLicence(value.licence);
    app.onModel?.(value);
    saveLastModel(source.source === "url" ? source.url : null, value.weights);
    if (source.source === "url") refreshCache(app);
  } catch (err) {
    panel.dataset.state = "error";
    $("model-current").textContent = app.model
      ? `${app.model.name} · ${app.model.weights} (the last model that loaded)`
      : "No model loaded.";
    $("model-error").textContent = `Could not load ${describeSource(source)}: ${err.message}`;
    $("model-error").hidden = false;
    if (app.isFatal(err)) app.fatal(err);
  } finally {
    $("model-load").hidden = true;
    app.showActivity?.();
    app.refreshDevice();
  }
}

export function loadDefaultModel(app) {
  return loadModel(app, { source: "demo" });
}

/**
 * On open: the model last loaded from a URL when the browser's cache still has it complete (no
 * request leaves the page for it), else the demo model.
 */
export async function loadStartModel(app) {
  const last = await lastModel();
  if (last?.url) {
    let cached = [];
    try {
      cached = await app.engine.call("cache_list");
    } catch {
      cached = [];
    }
    if (cached.some((m) => m.url === last.url && m.complete !== false)) {
      if (["f32", "f16", "q8_0", "q4_0"].includes(last.weights)) $("weights").value = last.weights;
      await loadModel(app, { source: "url", url: last.url });
      if (app.model) return;
    }
  }
  await loadDefaultModel(app);
}

/** Loads dropped or picked files ([{file, path}]): a diffusers folder or one checkpoint. */
export function loadModelFiles(app, items) {
  const usable = items.filter(({ file }) => file.size > 0 || ext(file.name) === "json" || ext(file.name) === "txt");
  if (!usable.length) return;
  const single = usable.filter(({ file }) => ext(file.name) === "safetensors");
  const folder = usable.some(({ path }) => path.includes("/"));
  if (!folder && single.length !== 1) {
    $("model-error").textContent = "Drop a diffusers model folder or exactly one .safetensors checkpoint.";
    $("model-error").hidden = false;
    return;
  }
  const chosen = folder ? usable : single;
  return loadModel(app, { source: "files", files: chosen.map((i) => i.file), paths: chosen.map((i) => i.path) });
}

/** Lists the models cached in the Origin Private File System. */
export async function refreshCache(app) {
  const list = $("cache-list");
  let models;
  try {
    models = await app.engine.call("cache_list");
  } catch (err) {
    list.replaceChildren(el("li", { class: "error-text" }, `Could not list cached models: ${err.message}`));
    if (app.isFatal(err)) app.fatal(err);
    return;
  }
  if (!models.length) {
    list.replaceChildren(el("li", { class: "muted" }, "No cached models."));
    return;
  }
  list.replaceChildren(...models.map((m) => el("li", { class: "cached", dataset: { name: m.name } },
    el("span", { class: "cached-name" }, el("strong", {}, m.name), " ", el("span", { class: "muted" }, bytes(m.bytes))),
    m.url ? el("span", { class: "cached-url muted", title: m.url }, m.url) : null,
    el("span", { class: "cached-actions" },
      el("button", { type: "button", class: "small", "aria-label": `Load ${m.name}`,
        onclick: () => loadModel(app, { source: "url", url: m.url }), disabled: !m.url }, "Load"),
      el("button", { type: "button", class: "small danger", "aria-label": `Remove ${m.name}`,
        onclick: () => removeCached(app, m.name) }, "Remove")),
  )));
}

async function removeCached(app, name) {
  try {
    await app.engine.call("cache_remove", { name });
  } catch (err) {
    $("model-error").textContent = `Could not remove ${name}: ${err.message}`;
    $("model-error").hidden = false;
    if (app.isFatal(err)) app.fatal(err);
  }
  refreshCache(app);
}

export function initModel(app) {
  $("load-demo").addEventListener("click", () => loadDefaultModel(app));
  $("weights").addEventListener("change", () => {
    if (lastSource) loadModel(app, lastSource);
  });
  $("open-folder").addEventListener("change", (e) => {
    const files = [...e.target.files];
    e.target.value = "";
    loadModelFiles(app, files.map((file) => ({ file, path: file.webkitRelativePath || file.name })));
  });
  $("open-file").addEventListener("change", (e) => {
    const files = [...e.target.files];
    e.target.value = "";
    loadModelFiles(app, files.map((file) => ({ file, path: file.name })));
  });
  $("url-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const url = $("model-url").value.trim();
    if (url) loadModel(app, { source: "url", url });
  });
}
