// Small DOM and formatting helpers shared by the page's modules.

export const $ = (id) => document.getElementById(id);

/**
 * Creates an element: `el("button", { type: "button", class: "x", onclick }, "text", child)`.
 * Attributes named `on…` become listeners, `class` sets className, `dataset` and `style` take
 * objects (style through the CSSOM, which the Content-Security-Policy allows); `false`/`null`
 * attributes are left out.
 */
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === false || v === null || v === undefined) continue;
    if (k.startsWith("on") && typeof v === "function") e.addEventListener(k.slice(2), v);
    else if (k === "class") e.className = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k === "style") Object.assign(e.style, v);
    else if (k in e && typeof v !== "string") e[k] = v;
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

/** A byte count as KiB / MiB / GiB. */
export function bytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return "–";
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(2)} GiB`;
  if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(1)} MiB`;
  if (n >= 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${n} B`;
}

/** Milliseconds as "850 ms", "12.3 s" or "2 min 05 s". */
export function duration(ms) {
  if (!Number.isFinite(ms) || ms < 0) return "–";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return `${m} min ${String(Math.round(s - m * 60)).padStart(2, "0")} s`;
}

/**
 * A value from the engine as text: strings and numbers as they are, `{value, layers}` counts
 * as "value (n layers)", arrays joined with ", ", other objects as compact JSON.
 */
export function show(v) {
  if (v === null || v === undefined || v === "") return "–";
  if (Array.isArray(v)) return v.length ? v.map(show).join(", ") : "–";
  if (typeof v === "object") {
    if ("value" in v && "layers" in v) return `${v.value} (${v.layers} ${v.layers === 1 ? "layer" : "layers"})`;
    if ("name" in v && Object.keys(v).length <= 2) return show(v.name);
    return JSON.stringify(v);
  }
  return String(v);
}

/** Fills a <dl> with [term, description] rows (descriptions may be nodes). */
export function fillList(dl, rows) {
  dl.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v instanceof Node ? v : show(v))]));
}

/** The file extension, lower case, without the dot. */
export const ext = (name) => (/\.([^./]+)$/.exec(name)?.[1] ?? "").toLowerCase();

/** Runs `fn` `ms` after the last call. */
export function debounce(fn, ms) {
  let t = 0;
  return (...args) => {
    clearTimeout(t);
    t = setTimeout(() => fn(...args), ms);
  };
}

/** A random 32-bit seed. */
export function randomSeed() {
  return crypto.getRandomValues(new Uint32Array(1))[0];
}
