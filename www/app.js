// The page: starts the engine's Worker (ui/engine.js), then wires the panels (ui/*.js).
// <html data-state> is "loading", then "ready" (the engine opened the GPU), "unavailable" (no
// WebGPU) or "error" (the engine stopped); tests wait on it. Panels carry their own state:
// #model[data-state] none/loading/loaded/error, #output[data-state] idle/running/done/error,
// #device[data-selftest] idle/running/passed/failed/error.
import { $, ext, fillList } from "./ui/dom.js";
import { Engine } from "./ui/engine.js";
import { initDevice, showAdapter, refreshDevice } from "./ui/device.js";
import { initModel, loadStartModel, loadModelFiles, refreshCache } from "./ui/model.js";
import { initGenerate, restoreParameters } from "./ui/generate.js";
import { initLoras, addLoras, restoreLoras } from "./ui/lora.js";
import { setErrorHandler } from "./ui/saved.js";
import { initGrid } from "./ui/grid.js";
import { initTrain } from "./ui/train.js";
import { initClassroom } from "./ui/classroom.js";

const setState = (s) => { document.documentElement.dataset.state = s; };

/** What the modules share. */
const app = {
  engine: new Engine(new URL("./worker.js", import.meta.url)),
  /** The loaded model (`load_model`'s value) or null. */
  model: null,
  /** Calls `fn` after the engine reports something that changes GPU memory. */
  refreshDevice: () => refreshDevice(app),
  /** Shows an engine error: the page-wide notice for lost devices and dead workers. */
  fatal,
  // A lost device is not fatal: the engine opens a new one and reloads the model (onNotice).
  isFatal: (err) => ["NoAdapterError", "WorkerError"].includes(err?.name),
};

function showUnavailable(message) {
  setState("unavailable");
  $("unavailable-message").textContent = message;
  $("unavailable").hidden = false;
  $("app").classList.add("disabled");
  $("engine-status").textContent = "WebGPU unavailable: the engine cannot run in this browser.";
  $("selftest-status").textContent = "WebGPU unavailable: the self-test cannot run in this browser.";
  fillList($("adapter-info"), [["Status", "No WebGPU adapter"]]);
  for (const b of document.querySelectorAll("#app button, #app input, #app select, #app textarea")) b.disabled = true;
}

function fatal(err) {
  if (err?.name === "NoAdapterError") {
    showUnavailable(err.message);
    return;
  }
  setState("error");
  $("error-message").textContent = err?.name === "DeviceLostError"
    ? `The GPU device was lost (${err.message}). Reload the page to start the engine again.`
    : String(err?.message ?? err);
  $("error").hidden = false;
  $("engine-status").textContent = "The engine stopped with an error.";
}

/**
 * What the worker says on its own: the GPU device was lost (a driver reset, the browser reclaimed
 * it) and the engine is reloading the model onto a new one, or has. <html data-device> is
 * "lost", then "recovered" (or "failed"); the form, the cards and the gallery stay as they are.
 */
function onNotice(n) {
  const line = $("device-notice");
  const root = document.documentElement;
  if (n.notice === "device_lost") {
    root.dataset.device = "lost";
    line.textContent = "The GPU was reset; reloading the model…";
    line.hidden = false;
  } else if (n.notice === "device_recovered") {
    root.dataset.device = "recovered";
    const v = n.value ?? {};
    if (v.model) app.model = v.model;
    const extra = v.adapters ? ` with ${v.adapters} ${v.adapters === 1 ? "adapter" : "adapters"}` : "";
    line.textContent = v.model
      ? `The GPU was reset; the model was reloaded${extra}.`
      : "The GPU was reset; the engine is ready again.";
    line.hidden = false;
    app.refreshDevice();
  } else if (n.notice === "device_failed") {
    root.dataset.device = "failed";
    line.hidden = true;
    fatal({ name: "DeviceLostError", message: n.error?.message ?? "the GPU could not be opened again" });
  }
}

/** The header line: what the engine is doing. */
function showActivity() {
  if (document.documentElement.dataset.state !== "ready") return;
  const e = app.engine;
  const NAMES = {
    load_model: "loading the model", generate: "generating", lora_add: "reading an adapter",
    lora_set: "setting strengths", lora_remove: "removing an adapter", self_test: "running the self-test",
    embedding_add: "reading an embedding", parameters_read: "reading PNG parameters", png_annotate: "writing the grid PNG",
    cache_list: "listing cached models", cache_remove: "removing a cached model", device: "reading device info",
    train_saved: "reading the saved training run", train_start: "starting training", train_resume: "resuming training",
    train_step: "training", train_cancel: "cancelling training", train_discard: "discarding the training run",
    train_export: "exporting the LoRA", train_handoff: "writing the hand-off zip",
    lora_layers: "listing adapter layers", lora_spectrum: "computing a spectrum", lora_resize: "resizing an adapter",
    param_counts: "counting parameters", set_block_weights: "setting block weights", lora_delta_map: "computing a weight map",
  };
  const model = app.model ? `Model: ${app.model.name} (${app.model.weights})` : "No model loaded";
  const busy = e.current ? ` · ${NAMES[e.current] ?? e.current}${e.waiting ? ` (${e.waiting} queued)` : ""}…` : " · ready";
  $("engine-status").textContent = model + busy;
}
app.showActivity = showActivity;

/** Drop anywhere: PNGs restore parameters, .safetensors become adapters (the model panel takes models). */
function initDrop() {
  let depth = 0;
  const isFiles = (e) => [...(e.dataTransfer?.types ?? [])].includes("Files");
  document.addEventListener("dragenter", (e) => {
    if (!isFiles(e)) return;
    depth++;
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", (e) => {
    if (!isFiles(e)) return;
    depth = Math.max(0, depth - 1);
    if (!depth) document.body.classList.remove("dragging");
  });
  document.addEventListener("dragover", (e) => {
    if (!isFiles(e)) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
  });
  document.addEventListener("drop", (e) => {
    if (!isFiles(e)) return;
    e.preventDefault();
    depth = 0;
    document.body.classList.remove("dragging");
    if (document.documentElement.dataset.state !== "ready") return;
    // The training panel's image column takes its own drops (PNGs are training images there).
    if (e.target.closest?.("#train-data")) return;
    const files = [...e.dataTransfer.files];
    const png = files.find((f) => ext(f.name) === "png" || f.type === "image/png");
    if (png) restoreParameters(app, png);
    const adapters = files.filter((f) => ext(f.name) === "safetensors");
    if (adapters.length) addLoras(app, adapters);
  });
  // The model panel takes a folder or checkpoint instead.
  const panel = $("model");
  panel.addEventListener("drop", async (e) => {
    if (!isFiles(e)) return;
    // PNGs alone go on to the page (parameters), whatever panel they land on.
    if ([...e.dataTransfer.files].every((f) => ext(f.name) === "png")) return;
    e.preventDefault();
    e.stopPropagation();
    depth = 0;
    document.body.classList.remove("dragging");
    if (document.documentElement.dataset.state !== "ready") return;
    await loadModelFiles(app, await droppedFiles(e.dataTransfer));
  });
}

/** Files of a drop with their paths inside dropped folders ([{file, path}]). */
async function droppedFiles(dt) {
  const entries = [...dt.items].map((i) => i.webkitGetAsEntry?.()).filter(Boolean);
  if (!entries.length) return [...dt.files].map((file) => ({ file, path: file.name }));
  const out = [];
  const walk = async (entry, prefix) => {
    if (entry.isFile) {
      const file = await new Promise((ok, fail) => entry.file(ok, fail));
      out.push({ file, path: prefix + entry.name });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((ok, fail) => reader.readEntries(ok, fail));
        if (!batch.length) break;
        for (const child of batch) await walk(child, `${prefix}${entry.name}/`);
      }
    }
  };
  for (const entry of entries) await walk(entry, "");
  return out;
}

async function main() {
  $("reload").addEventListener("click", () => location.reload());
  initDevice(app);
  initModel(app);
  initGenerate(app);
  initLoras(app);
  initGrid(app);
  initTrain(app);
  initClassroom(app);
  initDrop();
  if (!navigator.gpu) {
    showUnavailable("navigator.gpu is not defined: WebGPU is switched off or not supported in this browser.");
    return;
  }
  app.engine.onchange = showActivity;
  app.engine.onfatal = fatal;
  app.engine.onnotice = onNotice;
  setErrorHandler((message) => {
    $("device-notice").textContent = message;
    $("device-notice").hidden = false;
  });
  // The fault tests' hook (a driver reset on demand), present only with ?test-hooks in the URL.
  if (new URLSearchParams(location.search).has("test-hooks")) {
    // Posted past the page's queue (and not queued by the worker): the device goes at once,
    // also while a command runs.
    window.loralabTest = {
      loseDevice: () => app.engine.worker.postMessage({ id: 0, cmd: "debug_lose_device", args: { allowed: true } }),
    };
  }
  app.engine.start();
  let info;
  try {
    info = await app.engine.call("init");
  } catch (err) {
    fatal(err);
    return;
  }
  $("version").textContent = info.version ?? "";
  showAdapter(info);
  setState("ready");
  $("run-selftest").disabled = false;
  showActivity();
  refreshCache(app);
  await loadStartModel(app);
  restoreLoras(app);
}

main();
