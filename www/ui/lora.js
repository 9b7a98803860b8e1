// LoRA panel: each adapter file (picker or drop) becomes a card with what the engine read from
// it (format, algorithms, ranks, alphas, size, base model, trigger words, metadata) and its
// controls: strength (both parts), separate text-encoder / UNet strengths, enable, remove.
// Strength changes go to the engine as `lora_set` (a queued change always sends the newest
// values); with Live on they re-generate the newest image with the same seed.
import { $, el, bytes, debounce, show } from "./dom.js";
import { SKIP } from "./engine.js";
import { regenerateLive } from "./generate.js";
import { loadLoras, removeLora, saveLora, updateLora } from "./saved.js";

/** Adapters on the engine, by id: {id, name, te, unet, enabled, removed, queued, card}. */
export const adapters = new Map();

const MIN = -2;
const MAX = 2;
const STEP = 0.05;

const clamp = (v) => Math.min(MAX, Math.max(MIN, v));
const round = (v) => Math.round(v / STEP) * STEP;
const fmt = (v) => String(Number(v.toFixed(3)));

let live = () => {};

/**
 * Sends an adapter's current strengths to the engine. Repeated calls while one is queued merge
 * into it; `regenerate` re-generates when Live is on.
 */
export function sendStrengths(app, a, { regenerate = true } = {}) {
  updateLora(a.key, a);
  if (!a.queued) {
    a.queued = true;
    app.engine.call("lora_set", () => {
      a.queued = false;
      if (a.removed) return SKIP;
      return { id: a.id, te: a.te, unet: a.unet, enabled: a.enabled };
    }).catch((err) => {
      cardError(a.card, `Could not set the strength: ${err.message}`);
      if (app.isFatal(err)) app.fatal(err);
    });
  }
  if (regenerate && $("live").checked) live();
}

/** Sets strengths for a run without touching the cards (the X/Y grid); returns a restore function. */
export function override(app, values) {
  for (const [a, v] of values) {
    app.engine.call("lora_set", { id: a.id, te: v.te, unet: v.unet, enabled: v.enabled }).catch((err) => {
      if (app.isFatal(err)) app.fatal(err);
    });
  }
}

/** Puts every adapter back to its card's values (after the commands queued now). */
export function restoreAll(app) {
  for (const a of adapters.values()) {
    app.engine.call("lora_set", () => (a.removed ? SKIP : { id: a.id, te: a.te, unet: a.unet, enabled: a.enabled })).catch((err) => {
      cardError(a.card, `Could not restore the strength: ${err.message}`);
      if (app.isFatal(err)) app.fatal(err);
    });
  }
}

function cardError(card, message) {
  const p = card.querySelector(".card-error") ?? el("p", { class: "card-error error-text" });
  p.textContent = message;
  if (!p.isConnected) card.append(p);
}

/** A range slider and a number field bound together. */
function strengthControl(label, numberLabel, value, onchange) {
  const range = el("input", { type: "range", min: MIN, max: MAX, step: STEP, value, "aria-label": label });
  const number = el("input", { type: "number", min: MIN, max: MAX, step: STEP, value: fmt(value), "aria-label": numberLabel, class: "strength-number" });
  range.addEventListener("input", () => {
    const v = Number(range.value);
    number.value = fmt(v);
    onchange(v);
  });
  number.addEventListener("input", () => {
    if (number.value === "" || !Number.isFinite(Number(number.value))) return;
    const v = clamp(Number(number.value));
    range.value = String(v);
    onchange(v);
  });
  number.addEventListener("change", () => {
    const v = clamp(round(Number(number.value) || 0));
    number.value = fmt(v);
    range.value = String(v);
  });
  const set = (v) => {
    range.value = String(v);
    number.value = fmt(v);
  };
  return { node: el("div", { class: "strength" }, range, number), set };
}

function insertIntoPrompt(text) {
  const prompt = $("prompt");
  const current = prompt.value.trim();
  if (current.split(/\s*,\s*/).includes(text)) return;
  prompt.value = current ? `${current}, ${text}` : text;
  prompt.dispatchEvent(new Event("input", { bubbles: true }));
}

/**
 * The card's fields from `lora_add`'s value: the protocol's flat card, or the engine's card with
 * the file summary nested under `summary` (parsed metadata with `trigger_words`, layer counts
 * per target).
 */
export function normaliseCard(c) {
  const s = c.summary ?? {};
  const meta = c.metadata ?? s.metadata ?? {};
  const targets = Array.isArray(s.targets) ? s.targets : [];
  const count = (t) => c.layers?.[t] ?? targets.find((x) => x.value === t || x.target === t)?.layers ?? 0;
  const mismatch = c.base_mismatch ?? s.base_mismatch ?? false;
  return {
    id: c.id,
    name: c.name ?? s.file ?? c.file,
    bytes: c.bytes ?? s.bytes,
    format: c.format ?? s.format,
    algorithms: c.algorithms ?? s.algorithms,
    ranks: c.ranks ?? s.ranks,
    alphas: c.alphas ?? s.alphas,
    dtypes: c.dtypes ?? s.dtypes,
    base: c.base ?? s.base,
    base_reason: c.base_reason ?? s.base_reason,
    base_mismatch: Boolean(mismatch),
    base_message: typeof mismatch === "string" ? mismatch : null,
    licence: c.licence ?? s.licence ?? null,
    trained_on: [meta.sd_model_name, meta.base_model_version].filter(Boolean),
    triggers: c.triggers ?? meta.trigger_words ?? [],
    embeddings: c.embeddings ?? s.embeddings ?? [],
    metadata: meta,
    layers: { text_encoder: count("text_encoder"), unet: count("unet") },
    warnings: [...(c.warnings ?? s.warnings ?? []), ...(Array.isArray(meta.problems) ? meta.problems : [])],
    te: c.te,
    unet: c.unet,
    enabled: c.enabled,
  };
}

/** The card's licence: name, what it allows, and whether it was inferred from the base model. */
function licenceCell(l) {
  if (!l) return el("dd", { class: "licence unknown" }, "unknown");
  return el("dd", { class: `licence${l.known?.length ? "" : " unknown"}`, title: l.source },
    el("span", { class: "licence-name" }, l.name),
    l.inferred ? " (inferred from the model it was trained on)" : null,
    el("span", { class: "licence-summary muted" }, ` · ${l.summary}`));
}

function metadataList(meta) {
  const empty = (v) => v === null || v === undefined || v === "" || (Array.isArray(v) && !v.length);
  const entries = Object.entries(meta ?? {}).filter(([k, v]) => !empty(v) && k !== "trigger_words" && k !== "problems");
  if (!entries.length) return null;
  const dl = el("dl", { class: "meta" });
  for (const [k, v] of entries) {
    const text = typeof v === "string" ? v : JSON.stringify(v);
    dl.append(el("dt", {}, k), el("dd", {}, text.length > 400 ? `${text.slice(0, 399)}…` : text));
  }
  return el("details", {}, el("summary", {}, `Metadata (${entries.length} keys)`), dl);
}

function fillCard(app, card, value, key) {
  const info = normaliseCard(value);
  const a = {
    id: info.id, name: info.name, te: Number(info.te ?? 1), unet: Number(info.unet ?? 1),
    enabled: info.enabled !== false, removed: false, queued: false, card, key,
  };
  adapters.set(a.id, a);
  card.dataset.id = String(a.id);
  const titleId = `lora-${a.id}-title`;
  card.setAttribute("aria-labelledby", titleId);

  const main = strengthControl(`Strength: ${a.name}`, `Strength value: ${a.name}`, a.unet, (v) => {
    a.te = v;
    a.unet = v;
    te.set(v);
    unet.set(v);
    sendStrengths(app, a);
  });
  const te = strengthControl(`Text encoder strength: ${a.name}`, `Text encoder strength value: ${a.name}`, a.te, (v) => {
    a.te = v;
    sendStrengths(app, a);
  });
  const unet = strengthControl(`UNet strength: ${a.name}`, `UNet strength value: ${a.name}`, a.unet, (v) => {
    a.unet = v;
    main.set(v);
    sendStrengths(app, a);
  });
  const enabled = el("input", { type: "checkbox", checked: a.enabled, "aria-label": `Enabled: ${a.name}` });
  enabled.addEventListener("change", () => {
    a.enabled = enabled.checked;
    card.classList.toggle("off", !a.enabled);
    sendStrengths(app, a);
  });
  const remove = el("button", { type: "button", class: "small danger", "aria-label": `Remove ${a.name}` }, "Remove");
  remove.addEventListener("click", async () => {
    remove.disabled = true;
    try {
      await app.engine.call("lora_remove", { id: a.id });
      a.removed = true;
      adapters.delete(a.id);
      card.remove();
      removeLora(a.key);
      app.onAdapters?.();
      app.refreshDevice();
      if ($("live").checked) live();
    } catch (err) {
      remove.disabled = false;
      cardError(card, `Could not remove: ${err.message}`);
      if (app.isFatal(err)) app.fatal(err);
    }
  });

  const layers = info.layers ?? {};
  const embeddings = info.embeddings ?? [];
  const triggers = [...new Set([...embeddings.map((e) => e.token), ...(info.triggers ?? [])].filter(Boolean))];
  card.replaceChildren(...[
    el("div", { class: "card-head" },
      el("h3", { id: titleId }, a.name),
      el("label", { class: "check" }, enabled, " Enabled"),
      remove),
    el("dl", { class: "facts" },
      el("dt", {}, "Format"), el("dd", { class: "format" }, `${show(info.format)} · ${show(info.algorithms)}`),
      el("dt", {}, "Rank"), el("dd", { class: "rank" }, show(info.ranks)),
      el("dt", {}, "Alpha"), el("dd", { class: "alpha" }, show(info.alphas)),
      el("dt", {}, "Size"), el("dd", {}, `${bytes(info.bytes)}${info.dtypes ? ` · ${show(info.dtypes)}` : ""}`),
      el("dt", {}, "Layers"), el("dd", {}, `text encoder ${show(layers.text_encoder ?? 0)} · UNet ${show(layers.unet ?? 0)}`),
      el("dt", {}, "Base model"), el("dd", { class: "base" }, show(info.base), info.base_reason ? el("span", { class: "muted" }, ` (${info.base_reason})`) : null),
      info.trained_on.length ? [el("dt", {}, "Trained on"), el("dd", { class: "trained-on" }, info.trained_on.join(" · "))] : null,
      embeddings.length
        ? [el("dt", {}, "Embeddings"), el("dd", { class: "embeddings" },
          embeddings.map((e) => `${e.token} (${e.vectors} ${e.vectors === 1 ? "vector" : "vectors"})`).join(" · "),
          el("span", { class: "muted" }, " bundled: the word works in prompts while the adapter is loaded"))]
        : null,
      el("dt", {}, "Licence"), licenceCell(info.licence)),
    info.base_mismatch
      ? el("p", { class: "warning", role: "note" }, info.base_message
        ? `Base model: ${info.base_message}.`
        : `Made for ${show(info.base)}, which does not match the loaded model${app.model ? ` (${app.model.name})` : ""}: expect weak or broken results.`)
      : null,
    ...(info.warnings ?? []).map((w) => el("p", { class: "warning" }, w)),
    triggers.length
      ? el("div", { class: "triggers" }, el("span", { class: "muted" }, "Trigger words:"),
        ...triggers.map((t) => el("button", { type: "button", class: "chip", "aria-label": `Insert trigger words: ${t}`, onclick: () => insertIntoPrompt(t) }, t)))
      : null,
    el("div", { class: "field" }, el("span", { class: "label" }, "Strength"), main.node),
    el("details", { class: "split" }, el("summary", {}, "Text encoder / UNet strengths"),
      el("div", { class: "field" }, el("span", { class: "label" }, "Text encoder"), te.node),
      el("div", { class: "field" }, el("span", { class: "label" }, "UNet"), unet.node)),
    metadataList(info.metadata),
  ].filter(Boolean));
  card.classList.toggle("off", !a.enabled);
  card.dataset.state = "ready";
  return a;
}

/**
 * Reads adapter files into the engine, one card each; a failure stays on its card. Each added
 * file is kept in this browser (saved.js) with its strengths; `saved` ([{key, te, unet,
 * enabled}], one per file) restores kept ones.
 */
export async function addLoras(app, files, saved = null) {
  const list = $("lora-cards");
  await Promise.all(files.map(async (file, i) => {
    const kept = saved?.[i];
    const card = el("li", { class: "card", dataset: { state: "loading", file: file.name } },
      el("h3", {}, file.name), el("p", { class: "muted" }, `Reading ${bytes(file.size)}…`));
    list.append(card);
    try {
      const info = await app.engine.call("lora_add", { file });
      const strengths = kept ? { te: kept.te, unet: kept.unet, enabled: kept.enabled } : {};
      const a = fillCard(app, card, { ...info, ...strengths }, kept?.key);
      if (kept) {
        if (kept.te !== 1 || kept.unet !== 1 || !kept.enabled) sendStrengths(app, a, { regenerate: false });
      } else {
        a.key = await saveLora(file, a);
      }
      app.onAdapters?.();
      app.refreshDevice();
    } catch (err) {
      card.dataset.state = "error";
      card.replaceChildren(
        el("div", { class: "card-head" }, el("h3", {}, file.name),
          el("button", { type: "button", class: "small", "aria-label": `Dismiss ${file.name}`, onclick: () => {
            card.remove();
            removeLora(kept?.key);
          } }, "Dismiss")),
        el("p", { class: "card-error error-text" }, err.message));
      if (app.isFatal(err)) app.fatal(err);
    }
  }));
}

/** Adds the adapters kept in this browser again, with their strengths. */
export async function restoreLoras(app) {
  const kept = (await loadLoras()) ?? [];
  if (kept.length) await addLoras(app, kept.map((k) => k.file), kept);
}

async function addEmbeddings(app, files) {
  const list = $("embeddings");
  for (const file of files) {
    try {
      const e = await app.engine.call("embedding_add", { file });
      list.append(el("li", { class: "embedding" },
        el("button", { type: "button", class: "chip", "aria-label": `Insert embedding: ${e.token}`, onclick: () => insertIntoPrompt(e.token) }, e.token),
        el("span", { class: "muted" }, ` ${e.vectors} ${e.vectors === 1 ? "vector" : "vectors"} · ${file.name}`)));
    } catch (err) {
      list.append(el("li", { class: "error-text" }, `${file.name}: ${err.message}`));
      if (app.isFatal(err)) app.fatal(err);
    }
  }
}

// Merge and download: the engine writes the merged files into the browser's private storage;
// each becomes a download link (and is clicked once).
async function mergeDownload(app) {
  const status = $("merge-status");
  const list = $("merge-files");
  const button = $("merge");
  button.disabled = true;
  status.textContent = "Merging the enabled adapters into the model…";
  try {
    const files = await app.engine.call("merge_export", { weights: "f16" });
    list.replaceChildren();
    for (const f of files) {
      const name = f.name.replaceAll("/", "_");
      const a = el("a", { href: URL.createObjectURL(f.file), download: name }, `Download ${f.name}`);
      list.append(el("li", {}, a, el("span", { class: "muted" }, ` ${(f.bytes / 2 ** 20).toFixed(1)} MiB · ${f.merged} of ${f.tensors} tensors changed`)));
      a.click();
    }
    status.textContent = files.length > 1
      ? "Merged: put these files into a copy of the model folder (the VAE is unchanged)."
      : "Merged.";
  } catch (err) {
    status.textContent = `Merge failed: ${err.message}`;
    if (app.isFatal(err)) app.fatal(err);
  } finally {
    button.disabled = false;
  }
}

export function initLoras(app) {
  $("merge").addEventListener("click", () => mergeDownload(app));
  live = debounce(() => regenerateLive(app), 250);
  $("lora-input").addEventListener("change", (e) => {
    const files = [...e.target.files];
    e.target.value = "";
    if (files.length) addLoras(app, files);
  });
  $("embedding-input").addEventListener("change", (e) => {
    const files = [...e.target.files];
    e.target.value = "";
    if (files.length) addEmbeddings(app, files);
  });
}
