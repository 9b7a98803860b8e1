// Device panel: the adapter the engine opened (from `init`), features, limits and GPU memory in
// use (`device`), and the kernel self-test (`self_test`) with its results table.
import { $, el, bytes, fillList, show } from "./dom.js";
import { SKIP } from "./engine.js";

const yesNo = (b) => (b ? "yes" : "no");

/** Fills the adapter list from `init`'s value `{engine, browser}`. */
export function showAdapter({ engine, browser }) {
  const a = engine.adapter;
  const c = engine.caps;
  const b = browser ?? {};
  const name = a.name || [b.vendor, b.architecture, b.device].filter(Boolean).join(" ") || "(not reported by the browser)";
  fillList($("adapter-info"), [
    ["Adapter", name],
    ["Vendor / architecture", [b.vendor, b.architecture].filter(Boolean).join(" / ") || "(not reported)"],
    ["Backend", a.backend],
    ["Device type", `${a.device_type}${b.isFallbackAdapter ? " (fallback adapter: software rendering)" : ""}`],
    ["shader-f16", yesNo(c.shader_f16)],
    ["subgroups", c.subgroups ? `yes (size ${c.subgroup_min_size}–${c.subgroup_max_size})` : "no"],
    ["timestamp-query", yesNo(c.timestamp_query)],
    ["Max buffer / binding", `${bytes(c.max_buffer_size)} / ${bytes(c.max_storage_buffer_binding_size)}`],
    ["Storage buffers per stage", String(c.max_storage_buffers_per_stage)],
    ["Workgroup storage", bytes(c.max_workgroup_storage)],
    ["Invocations per workgroup", String(c.max_invocations_per_workgroup)],
    ["Adapter features", (b.features ?? engine.adapter_features ?? []).join(", ") || "none"],
  ]);
}

let refreshQueued = false;

/** Asks the engine for `device` once the commands queued now have run (repeated asks merge). */
export function refreshDevice(app) {
  if (refreshQueued || app.engine.dead) return;
  refreshQueued = true;
  app.engine.call("device", () => {
    refreshQueued = false;
    return app.model ? undefined : SKIP;
  }).then((d) => {
    if (d !== SKIP) showDevice(d);
  }, (err) => {
    if (app.isFatal(err)) app.fatal(err);
    else fillList($("memory-info"), [["Error", err.message]]);
  });
}

/** Memory rows: the protocol's split (weights, adapters, activations, peak) or the device totals. */
function memoryRows(d) {
  const m = d.memory ?? {};
  if (typeof m.weights === "number") {
    const rows = [["Model weights", bytes(m.weights)], ["Adapters", bytes(m.adapters)], ["Activations", bytes(m.activations)]];
    if (typeof m.peak === "number") rows.push(["Peak", bytes(m.peak)]);
    return rows;
  }
  const u = d.usage ?? m;
  const rows = [];
  if (typeof u.live_bytes === "number") rows.push(["In use", bytes(u.live_bytes)]);
  if (typeof u.peak_live_bytes === "number") rows.push(["Peak", bytes(u.peak_live_bytes)]);
  if (typeof u.free_bytes === "number") rows.push(["Free", bytes(u.free_bytes)]);
  if (typeof u.adapters === "number") rows.push(["Adapters loaded", String(u.adapters)]);
  return rows.length ? rows : [["Status", "not reported"]];
}

function showDevice(d) {
  fillList($("memory-info"), memoryRows(d));
  const limits = Object.entries(d.limits ?? d.caps ?? {});
  const features = d.features ?? d.browser?.features ?? d.adapter_features ?? [];
  const has = (f) => features.some((x) => String(x).toLowerCase().replace(/_/g, "-") === f);
  fillList($("limits-info"), [
    ["Adapter", show(d.adapter?.name ?? d.adapter)],
    ["shader-f16", yesNo(has("shader-f16"))],
    ["subgroups", yesNo(has("subgroups"))],
    ["Features", features.join(", ") || "none"],
    ...limits.map(([k, v]) => [k, typeof v === "number" && /size|bytes/i.test(k) ? `${bytes(v)} (${v})` : show(v)]),
  ]);
}

function cell(text, cls) {
  return el("td", { class: cls }, text);
}

function showReport(r) {
  const rows = r.cases.map((c) => el("tr", { class: c.passed ? null : "failed" },
    cell(c.passed ? "pass" : "FAIL", c.passed ? "pass" : "fail"),
    cell(c.op),
    cell(c.case),
    cell(c.nmse === null || Number.isNaN(c.nmse) ? "–" : c.nmse.toExponential(2), "num"),
    cell(c.bound.toExponential(0), "num"),
    cell(c.ms.toFixed(1), "num"),
    cell(c.error ?? ""),
  ));
  $("results").tBodies[0].replaceChildren(...rows);
  const ok = r.cases.length - r.failed;
  $("selftest-status").textContent =
    `${r.passed ? "All" : "Only"} ${ok} of ${r.cases.length} cases passed in ${Math.round(r.total_ms)} ms (${r.families.join(", ")}).`;
  return r.passed ? "passed" : "failed";
}

async function runSelfTest(app) {
  const panel = $("device");
  const button = $("run-selftest");
  button.disabled = true;
  panel.dataset.selftest = "running";
  $("selftest-status").textContent = app.engine.current ? "Waiting for the engine, then running the self-test…" : "Running the self-test…";
  try {
    panel.dataset.selftest = showReport(await app.engine.call("self_test"));
  } catch (err) {
    panel.dataset.selftest = "error";
    $("selftest-status").textContent = `The self-test stopped: ${err.message}`;
    if (app.isFatal(err)) app.fatal(err);
  } finally {
    button.disabled = document.documentElement.dataset.state !== "ready";
  }
}

export function initDevice(app) {
  $("run-selftest").addEventListener("click", () => runSelfTest(app));
}
