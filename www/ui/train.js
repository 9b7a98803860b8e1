// "Train a LoRA": the dataset (train-data.js), the settings, the consent checklist, Start /
// Pause / Resume / Cancel, the live figures, loss curve, samples and checkpoints
// (train-view.js), Export (kohya, also added as a LoRA card) and Hand-off (zip).
//
// The engine does one optimizer step per `train_step` command; this module sends the next one
// when the last returns, so other commands (a generation) can run between steps, and pausing
// takes effect after the step in progress. The run lives in the browser's storage: after a
// reload the panel offers to resume from the last checkpoint.
//
// #train[data-state]: idle, starting, running, pausing, paused, finished, cancelled, error.
import { $, el } from "./dom.js";
import { addLoras } from "./lora.js";
import {
  images, initTrainData, datasetFiles, showSaved, lockImages, stepsWarning,
} from "./train-data.js";
import { showStats, setLosses, addLoss, addSamples, setCheckpoints, addDownload, resetView, redrawLoss } from "./train-view.js";

/** Form fields: [id, settings key, kind]. */
const FIELDS = [
  ["train-name", "name", "text"],
  ["train-trigger", "trigger", "text"],
  ["train-class", "class", "text"],
  ["train-resolution", "resolution", "int"],
  ["train-rank", "rank", "int"],
  ["train-alpha", "alpha", "num"],
  ["train-lr", "lr", "num"],
  ["train-te-lr", "te_lr", "optnum"],
  ["train-trigger-lr", "trigger_lr", "optnum"],
  ["train-steps", "steps", "int"],
  ["train-batch", "batch", "int"],
  ["train-schedule", "schedule", "text"],
  ["train-warmup", "warmup", "int"],
  ["train-targets", "targets", "text"],
  ["train-save-every", "save_every", "int"],
  ["train-sample-every", "sample_every", "int"],
  ["train-seed", "seed", "int"],
  ["train-sample-prompt", "sample_prompt", "text"],
  ["train-sample-steps", "sample_steps", "int"],
];

const st = {
  state: "idle",
  /** The saved run (`train_saved`'s value) or null. */
  saved: null,
  /** Whether a run is open in the engine. */
  open: false,
  /** The first step after a pause measures speed anew. */
  resumed: false,
  last: null,
  settings: null,
  checkpoints: [],
  checkedSaved: false,
  app: null,
};

function setState(s) {
  st.state = s;
  $("train").dataset.state = s;
  update();
}

function status(text) {
  $("train-status").textContent = text;
}

function showError(message) {
  const p = $("train-error");
  p.textContent = message ?? "";
  p.hidden = !message;
}

/** The settings from the form (numbers checked by the engine too). */
function readSettings(app) {
  const s = {};
  for (const [id, k, kind] of FIELDS) {
    const v = $(id).value.trim();
    if (kind === "optnum" && v === "") {
      s[k] = null;
      continue;
    }
    s[k] = kind === "text" ? v : Number(v);
    if (kind !== "text" && (v === "" || !Number.isFinite(s[k]))) throw new Error(`${$(id).labels?.[0]?.textContent ?? k}: enter a number`);
  }
  if (!s.name) s.name = `${s.trigger}-${s.class}`.replace(/^-|-$/g, "") || "lora";
  s.sample_cfg = app.model?.guidance_scale ?? 7.5;
  s.sample_sampler = app.model?.sampler ?? "euler_a";
  s.weights = app.model?.weights ?? "f16";
  s.consent_images = $("train-consent-images").checked;
  s.consent_likeness = $("train-consent-likeness").checked;
  return s;
}

function fillSettings(s) {
  for (const [id, k, kind] of FIELDS) {
    if (kind === "optnum") $(id).value = s[k] == null ? "" : String(s[k]);
    else if (s[k] !== undefined && s[k] !== null) $(id).value = String(s[k]);
  }
}

const consented = () => $("train-consent-images").checked && $("train-consent-likeness").checked;

/** Whether the saved run would be lost by a new start (unfinished with checkpoints, or finished and never exported). */
function savedBlocks() {
  const s = st.saved;
  if (s && st.open && st.state === "finished" && !s.exports?.length) return "Export this run's LoRA, or discard the run, before starting another.";
  if (!s || st.open) return null;
  if (!s.finished && !s.cancelled && s.checkpoints.length) return "Resume or discard the saved run before starting another.";
  if (s.finished && !s.exports.length) return "The saved run finished but was never exported: resume it to export, or discard it.";
  return null;
}

/** Enables the controls for the state. */
function update() {
  const s = st.state;
  const busy = ["starting", "running", "pausing", "paused"].includes(s);
  const engineUp = document.documentElement.dataset.state === "ready" && Boolean(st.app?.model);
  const block = savedBlocks();
  $("train-start").disabled = !engineUp || busy || !consented() || !images.length || Boolean(block);
  $("train-start-hint").textContent = busy ? "" : block
    ?? (!engineUp ? "Load a model to train on." : !consented() ? "Confirm both statements above to start."
      : !images.length ? "Add images to start." : "");
  $("train-pause").disabled = s !== "running";
  $("train-resume").disabled = s !== "paused";
  $("train-cancel").disabled = !["running", "pausing", "paused"].includes(s);
  const exportable = st.open && (st.last?.step ?? 0) > 0 && !["starting", "running", "pausing"].includes(s);
  $("train-export").disabled = !exportable;
  $("train-handoff").disabled = !(st.open && !["starting", "running", "pausing"].includes(s));
  lockImages(busy);
  for (const [id] of FIELDS) $(id).disabled = busy;
  for (const id of ["train-consent-images", "train-consent-likeness"]) $(id).disabled = busy;
  const saved = st.saved;
  const offer = saved && !st.open && !saved.cancelled && saved.files.length > 0 && !busy;
  $("train-saved").hidden = !(saved && !busy && (!st.open || s === "finished"));
  if (saved && !$("train-saved").hidden) $("train-saved-text").textContent = describeSaved(saved);
  $("train-resume-saved").hidden = !offer;
  $("train-resume-saved").disabled = !offer || !engineUp || $("model").dataset.state !== "loaded";
  const w = stepsWarning(Number($("train-steps").value), Number($("train-batch").value));
  $("train-steps-warning").textContent = w;
  $("train-steps-warning").hidden = !w;
}

function describeSaved(s) {
  if (st.open) return "This run is finished: export its LoRA below, or discard the run to free this browser's storage.";
  const started = new Date(s.started_at * 1000).toLocaleString();
  const what = `${s.settings.name}: ${s.files.filter((f) => !/\.(txt|caption)$/i.test(f.name)).length} images, started ${started}`;
  if (s.cancelled) return `A cancelled training run is saved (${what}); its checkpoints can still be downloaded.`;
  if (s.finished) return `A finished training run is saved (${what}, ${s.settings.steps} steps)${s.exports.length ? "" : "; it was never exported"}. Resume it to export it again.`;
  const last = s.checkpoints.at(-1);
  return last
    ? `An unfinished training run is saved (${what}): checkpoint at step ${last.step} of ${s.settings.steps}. Resume continues from there.`
    : `A training run that made no checkpoint yet is saved (${what}). Resume starts it again from the first step.`;
}

/** Shows the saved run (dataset, settings, losses, samples, checkpoints) and offers to resume it. */
async function showSavedRun(app) {
  let saved;
  try {
    saved = await app.engine.call("train_saved");
  } catch (err) {
    if (app.isFatal(err)) app.fatal(err);
    return;
  }
  if (!saved) {
    st.saved = null;
    update();
    return;
  }
  // The offer appears (st.saved, update) only once the whole run is on screen: the dataset
  // decodes asynchronously, and an offer above an empty curve would invite a click too early.
  resetView();
  fillSettings(saved.settings);
  $("train-consent-images").checked = Boolean(saved.consent?.images);
  $("train-consent-likeness").checked = Boolean(saved.consent?.likeness);
  setLosses(saved.losses);
  addSamples(saved.samples);
  st.checkpoints = saved.checkpoints;
  setCheckpoints(saved.checkpoints, saved.settings.name);
  for (const e of saved.exports) addDownload(e, e.name.endsWith(".zip") ? "Hand-off" : "LoRA");
  const last = saved.losses.at(-1);
  if (last) showStats({ step: last[0], steps: saved.settings.steps, loss: last[1], loss_avg: last[2], lr: last[3], finished: saved.finished });
  await showSaved(saved.files);
  st.saved = saved;
  status(saved.cancelled ? "The saved run was cancelled." : saved.finished ? "The saved run is finished."
    : `The saved run stopped; its last checkpoint is at step ${saved.checkpoints.at(-1)?.step ?? 0}.`);
  update();
}

function started(app, value, settings) {
  st.open = true;
  st.settings = settings;
  st.saved = value.run;
  const warnings = [...(value.warnings ?? []), ...(value.steps_warning ? [`Steps: ${value.steps_warning}.`] : [])];
  $("train-warnings").replaceChildren(...warnings.map((w) => el("li", { class: "warning" }, w)));
  $("train-info").textContent = `${value.images} images (${value.num_train_images} per epoch), ${value.caption_files} caption files · dataset SHA-256 ${value.dataset_sha256.slice(0, 12)}… · base model ${value.model.name}`;
  st.last = value.step > 0 ? { step: value.step, steps: value.steps } : null;
}

async function start(app) {
  showError("");
  let settings;
  try {
    settings = readSettings(app);
  } catch (err) {
    showError(err.message);
    return;
  }
  if (!app.model) {
    showError("Load a model first: training adapts the loaded model.");
    return;
  }
  resetView();
  setState("starting");
  status("Copying the images into this browser's storage…");
  try {
    const value = await app.engine.call("train_start", { files: datasetFiles(), settings }, { onEvent: (e) => progress(e) });
    started(app, value, settings);
    setCheckpoints([], settings.name);
    st.checkpoints = [];
    status(`Training: ${value.images} images, ${value.steps} steps.`);
    setState("running");
    loop(app);
  } catch (err) {
    st.open = false;
    setState("error");
    showError(`Could not start training: ${err.message}`);
    status("Not started.");
    if (app.isFatal(err)) app.fatal(err);
  }
}

function progress(e) {
  if (e.event !== "progress") return;
  const what = e.phase === "copy" ? "Copying into this browser's storage" : "Reading";
  status(e.total ? `${what}: ${Math.min(e.done, e.total)} of ${e.total} files${e.label ? ` (${e.label})` : ""}…` : `${what}…`);
  if (e.phase === "read" && e.done >= e.total) status("Encoding the images and captions, loading the model for training…");
}

async function resumeSaved(app) {
  showError("");
  const saved = st.saved;
  if (!saved) return;
  const settings = saved.settings;
  setState("starting");
  status("Reading the saved run…");
  try {
    const value = await app.engine.call("train_resume", {}, { onEvent: (e) => progress(e) });
    started(app, value, settings);
    resetView();
    setLosses(value.run.losses);
    addSamples(value.run.samples);
    st.checkpoints = value.run.checkpoints;
    setCheckpoints(st.checkpoints, settings.name);
    for (const e of value.run.exports) addDownload(e, e.name.endsWith(".zip") ? "Hand-off" : "LoRA");
    const last = value.run.losses.at(-1);
    if (last) showStats({ step: last[0], steps: value.steps, loss: last[1], loss_avg: last[2], lr: last[3] });
    if (value.step >= value.steps) {
      status(`Finished: ${value.steps} steps. Export the LoRA below.`);
      setState("finished");
      return;
    }
    status(`Resumed from the checkpoint at step ${value.step} of ${value.steps}.`);
    st.resumed = true;
    setState("running");
    loop(app);
  } catch (err) {
    setState(st.open ? "paused" : "error");
    showError(`Could not resume: ${err.message}`);
    if (app.isFatal(err)) app.fatal(err);
  }
}

/** Sends steps while the state is "running". */
async function loop(app) {
  while (st.state === "running") {
    let r;
    try {
      r = await app.engine.call("train_step", { n: 1, resumed: st.resumed });
    } catch (err) {
      if (st.state === "cancelled") return;
      setState("paused");
      showError(`Training stopped at step ${st.last?.step ?? 0}: ${err.message}. The last checkpoint is kept; Resume tries again.`);
      if (app.isFatal(err)) app.fatal(err);
      return;
    }
    st.resumed = false;
    st.last = r;
    showStats(r);
    for (const [step, loss, avg, lr] of r.losses ?? []) addLoss({ step, loss, loss_avg: avg, lr });
    if (r.samples?.length) addSamples(r.samples);
    if (r.checkpoint) {
      st.checkpoints = [...st.checkpoints.filter((c) => c.step !== r.checkpoint.step), r.checkpoint].slice(-5);
      setCheckpoints(st.checkpoints, st.settings.name);
      if (st.saved) st.saved.checkpoints = st.checkpoints;
    }
    if (st.state === "cancelled") return;
    if (r.finished) {
      status(`Finished: ${r.steps} steps. Export the LoRA below.`);
      if (st.saved) st.saved.finished = true;
      setState("finished");
      return;
    }
    if (st.state === "pausing") {
      status(`Paused at step ${r.step} of ${r.steps}.`);
      setState("paused");
      return;
    }
    if (st.state === "running") status(`Training: step ${r.step} of ${r.steps}, about ${r.eta} left.`);
  }
}

async function cancel(app) {
  const was = st.state;
  setState("cancelled");
  try {
    await app.engine.call("train_cancel");
    st.open = false;
    if (st.saved) st.saved.cancelled = true;
    status(`Cancelled at step ${st.last?.step ?? 0}. The checkpoints stay below until the next run.`);
  } catch (err) {
    setState(was);
    showError(`Could not cancel: ${err.message}`);
    if (app.isFatal(err)) app.fatal(err);
  }
  update();
}

async function discard(app) {
  try {
    await app.engine.call("train_discard");
    st.saved = null;
    st.open = false;
    resetView();
    status("Not started.");
    setState("idle");
  } catch (err) {
    showError(`Could not discard the run: ${err.message}`);
    if (app.isFatal(err)) app.fatal(err);
  }
}

async function exportLora(app) {
  const b = $("train-export");
  b.disabled = true;
  $("train-export-status").textContent = "Writing the LoRA file…";
  try {
    const out = await app.engine.call("train_export");
    if (st.saved) st.saved.exports = [...(st.saved.exports ?? []), out];
    addDownload(out, "LoRA").click();
    $("train-export-status").textContent = `Exported ${out.name} (kohya format) and added it to the LoRA panel.`;
    await addLoras(app, [out.file]);
  } catch (err) {
    $("train-export-status").textContent = `Export failed: ${err.message}`;
    if (app.isFatal(err)) app.fatal(err);
  }
  update();
}

async function handoff(app) {
  const b = $("train-handoff");
  b.disabled = true;
  $("train-export-status").textContent = "Writing the hand-off zip…";
  try {
    const out = await app.engine.call("train_handoff");
    addDownload(out, "Hand-off").click();
    $("train-export-status").textContent = `Wrote ${out.name}: the images with their captions and a kohya train_network.py configuration for these settings.`;
  } catch (err) {
    $("train-export-status").textContent = `Hand-off failed: ${err.message}`;
    if (app.isFatal(err)) app.fatal(err);
  }
  update();
}

function reportAdded(skipped, error) {
  showError(error ? `Could not load the dataset: ${error}` : "");
  $("train-skipped").textContent = skipped?.length
    ? `Skipped (not PNG, JPEG, WebP or a .txt caption): ${skipped.join(", ")}`
    : "";
  update();
}

export function initTrain(app) {
  st.app = app;
  initTrainData(update, reportAdded);
  $("train-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (!$("train-start").disabled) start(app);
  });
  $("train-form").addEventListener("input", update);
  $("train-pause").addEventListener("click", () => {
    if (st.state !== "running") return;
    status("Pausing after this step…");
    setState("pausing");
  });
  $("train-resume").addEventListener("click", () => {
    if (st.state !== "paused") return;
    st.resumed = true;
    status(`Training: step ${st.last?.step ?? 0} of ${st.last?.steps ?? "?"}.`);
    setState("running");
    loop(app);
  });
  $("train-cancel").addEventListener("click", () => cancel(app));
  $("train-resume-saved").addEventListener("click", () => resumeSaved(app));
  $("train-discard").addEventListener("click", () => discard(app));
  $("train-export").addEventListener("click", () => exportLora(app));
  $("train-handoff").addEventListener("click", () => handoff(app));
  new ResizeObserver(() => redrawLoss()).observe($("train-loss"));
  showStats(null);
  // The resolution follows the loaded model; the saved run shows once a model is there.
  const previous = app.onModel;
  app.onModel = (m) => {
    previous?.(m);
    if (!["running", "pausing", "paused", "starting"].includes(st.state) && !st.open) {
      const side = Math.min(m.default_width || 512, m.default_height || 512);
      $("train-resolution").value = String(Math.max(8, Math.round(side / 8) * 8));
      $("train-sample-steps").value = String(m.steps ?? 20);
    }
    if (!st.checkedSaved) {
      st.checkedSaved = true;
      showSavedRun(app);
    }
    update();
  };
  update();
}
