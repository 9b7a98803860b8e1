// Page glue: starts the engine's Worker, shows the adapter, runs the self-test on load and on the
// button. <html data-state> ends as "passed", "failed", "unavailable" or "error" (tests wait on it).

const $ = (id) => document.getElementById(id);
const setState = (s) => { document.documentElement.dataset.state = s; };

function showUnavailable(message) {
  setState("unavailable");
  $("unavailable-message").textContent = message;
  $("unavailable").hidden = false;
  $("status").textContent = "WebGPU unavailable: the self-test cannot run in this browser.";
  $("run").disabled = true;
  fillAdapter([["Status", "No WebGPU adapter"]]);
}

function showError(message) {
  setState("error");
  $("error-message").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "The engine stopped with an error.";
}

function fillAdapter(rows) {
  const dl = $("adapter-info");
  dl.replaceChildren();
  for (const [k, v] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    dl.append(dt, dd);
  }
}

const yesNo = (b) => (b ? "yes" : "no");
const bytes = (n) => (n >= 2 ** 30 ? `${(n / 2 ** 30).toFixed(1)} GiB` : n >= 2 ** 20 ? `${(n / 2 ** 20).toFixed(1)} MiB` : `${(n / 1024).toFixed(1)} KiB`);

function showAdapter({ engine, browser }) {
  const a = engine.adapter;
  const c = engine.caps;
  const b = browser ?? {};
  const name = a.name || [b.vendor, b.architecture, b.device].filter(Boolean).join(" ") || "(not reported by the browser)";
  fillAdapter([
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
    ["Adapter features", (b.features ?? engine.adapter_features).join(", ") || "none"],
  ]);
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function showReport(r) {
  const rows = r.cases.map((c) => {
    const tr = document.createElement("tr");
    if (!c.passed) tr.className = "failed";
    tr.append(
      cell(c.passed ? "pass" : "FAIL", c.passed ? "pass" : "fail"),
      cell(c.op),
      cell(c.case),
      cell(c.nmse === null || Number.isNaN(c.nmse) ? "–" : c.nmse.toExponential(2), "num"),
      cell(c.bound.toExponential(0), "num"),
      cell(c.ms.toFixed(1), "num"),
      cell(c.error ?? ""),
    );
    return tr;
  });
  $("results").tBodies[0].replaceChildren(...rows);
  const ok = r.cases.length - r.failed;
  $("status").textContent = `${r.passed ? "All" : "Only"} ${ok} of ${r.cases.length} cases passed in ${Math.round(r.total_ms)} ms (${r.families.join(", ")}).`;
  setState(r.passed ? "passed" : "failed");
}

// --- the Worker and its request/response protocol ---------------------------------------------
let worker = null;
let nextId = 1;
const pending = new Map();

function startWorker() {
  worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
  worker.onmessage = ({ data }) => {
    const p = pending.get(data.id);
    if (!p) return;
    pending.delete(data.id);
    if (data.ok) p.resolve(data.value);
    else p.reject(Object.assign(new Error(data.error.message), { name: data.error.name }));
  };
  worker.onerror = (e) => {
    e.preventDefault();
    const err = new Error(`the engine worker failed: ${e.message || "could not load worker.js or the wasm module"}`);
    for (const p of pending.values()) p.reject(err);
    pending.clear();
  };
}

function call(cmd) {
  return new Promise((resolve, reject) => {
    const id = nextId++;
    pending.set(id, { resolve, reject });
    worker.postMessage({ id, cmd });
  });
}

function handle(err) {
  if (err.name === "NoAdapterError") showUnavailable(err.message);
  else showError(err.message);
}

async function runSelfTest() {
  $("run").disabled = true;
  setState("running");
  $("status").textContent = "Running the self-test…";
  try {
    showReport(await call("self_test"));
  } catch (err) {
    handle(err);
  } finally {
    if (document.documentElement.dataset.state !== "unavailable") $("run").disabled = false;
  }
}

async function main() {
  if (!navigator.gpu) {
    showUnavailable("navigator.gpu is not defined: WebGPU is switched off or not supported in this browser.");
    return;
  }
  startWorker();
  call("version").then((v) => { $("version").textContent = v; }, () => {});
  try {
    showAdapter(await call("init"));
  } catch (err) {
    handle(err);
    return;
  }
  $("run").addEventListener("click", runSelfTest);
  await runSelfTest();
}

main();
