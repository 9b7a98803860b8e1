// The side-by-side benchmark page: the same UNet (same weights, same inputs, f32) run by
// onnxruntime-web's WebGPU execution provider (in this page) and by loralab's wasm engine (in
// bench-worker.js), alternating runs after a warm-up, plus the web app's whole text-to-image
// time for the demo model through its own Worker protocol (app/worker.js).
//
// A step is, for both engines: the inputs uploaded from JavaScript arrays, one UNet forward
// pass, and the prediction read back into a JavaScript array (onnxruntime-web's outputs live on
// the CPU by default, so `session.run` resolves after the GPU result has been downloaded).
//
// Site layout (tools/bench/browser.mjs assembles it): ./ (this folder), app/ (the web app's
// trunk build: loralab-web.js, worker.js, models/demo), ort/ (onnxruntime-web's dist/),
// models/<name>/ (tools/bench/export_onnx.py's output: meta.json, unet.onnx, unet/).
import * as ort from "./ort/ort.webgpu.min.mjs";

ort.env.wasm.wasmPaths = new URL("./ort/", location.href).href;
ort.env.logLevel = "warning";

const $ = (id) => document.getElementById(id);
const status = (text) => { $("status").textContent = text; console.log(`[bench] ${text}`); };

/** Seeded standard normal values (mulberry32 + Box–Muller). */
function normal(n, seed) {
  let a = seed >>> 0;
  const u = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const r = Math.sqrt(-2 * Math.log(u() + 1e-12));
    const th = 2 * Math.PI * u();
    out[i] = r * Math.cos(th);
    if (i + 1 < n) out[i + 1] = r * Math.sin(th);
  }
  return out;
}

function stats(ms) {
  const s = [...ms].sort((x, y) => x - y);
  const mid = s.length >> 1;
  const median = s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
  const r = (x) => Math.round(x * 100) / 100;
  return { median_ms: r(median), min_ms: r(s[0]), max_ms: r(s[s.length - 1]), runs: s.length, samples_ms: ms.map(r) };
}

/** Normalised mean squared error of `got` against `want`. */
function nmse(got, want) {
  let num = 0;
  let den = 0;
  for (let i = 0; i < want.length; i++) {
    const d = got[i] - want[i];
    num += d * d;
    den += want[i] * want[i];
  }
  return num / Math.max(den, 1e-30);
}

/** A module Worker answering {id, cmd, args} with {id, ok, value | error}; events go to `onEvent`. */
class Rpc {
  constructor(url) {
    this.worker = new Worker(url, { type: "module" });
    this.next = 1;
    this.waiting = new Map();
    this.worker.onmessage = ({ data }) => {
      const w = this.waiting.get(data.id);
      if (!w) return;
      if (data.event) return w.onEvent?.(data);
      this.waiting.delete(data.id);
      if (data.ok) w.resolve(data.value);
      else w.reject(Object.assign(new Error(data.error?.message ?? "worker error"), { name: data.error?.name }));
    };
    this.worker.onerror = (e) => {
      for (const w of this.waiting.values()) w.reject(new Error(`worker failed: ${e.message}`));
      this.waiting.clear();
    };
  }

  call(cmd, args, onEvent = null) {
    const id = this.next++;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject, onEvent });
      this.worker.postMessage({ id, cmd, args });
    });
  }

  close() {
    this.worker.terminate();
  }
}

async function adapterInfo() {
  const adapter = await navigator.gpu?.requestAdapter();
  if (!adapter) throw new Error("no WebGPU adapter (start Chromium with --enable-unsafe-webgpu)");
  const i = adapter.info ?? {};
  const l = adapter.limits;
  return {
    vendor: i.vendor, architecture: i.architecture, device: i.device, description: i.description,
    is_fallback_adapter: i.isFallbackAdapter ?? adapter.isFallbackAdapter ?? null,
    features: [...adapter.features].sort(),
    limits: {
      maxComputeInvocationsPerWorkgroup: l.maxComputeInvocationsPerWorkgroup,
      maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize,
      maxStorageBufferBindingSize: l.maxStorageBufferBindingSize,
      maxStorageBuffersPerShaderStage: l.maxStorageBuffersPerShaderStage,
    },
  };
}

function f16Bits(f32) {
  return new Uint16Array(new Float16Array(f32).buffer);
}

/** One model, both engines, alternating (ABBA order) after `warmup` rounds. */
async function benchModel(name, { warmup, runs, timestep, f16, lora }) {
  const base = `models/${name}/`;
  const meta = await (await fetch(`${base}meta.json`)).json();
  const shape = meta.sample;
  const ctxShape = meta.encoder_hidden_states;
  const sample = normal(shape.reduce((a, b) => a * b), 1);
  const context = normal(ctxShape.reduce((a, b) => a * b), 2);
  const result = {
    model: name, parameters: meta.parameters, block_out_channels: meta.block_out_channels,
    sample: shape, encoder_hidden_states: ctxShape, timestep, warmup, runs, precision: "f32",
  };

  status(`${name}: loading loralab (f32)`);
  const loaded = await lora.call("load", { base, weights: "f32" });
  result.loralab_load = loaded;
  status(`${name}: creating the onnxruntime-web session (webgpu, f32)`);
  const t0 = performance.now();
  const session = await ort.InferenceSession.create(`${base}${meta.onnx.f32}`, {
    executionProviders: ["webgpu"],
    graphOptimizationLevel: "all",
  });
  result.ort_session_ms = Math.round(performance.now() - t0);

  let ortOut = null;
  let loraOut = null;
  const ortStep = async (feedsOf) => {
    const t = performance.now();
    const r = await session.run(feedsOf());
    const out = r.out_sample.data;
    const ms = performance.now() - t;
    return { ms, out };
  };
  const f32Feeds = () => ({
    sample: new ort.Tensor("float32", sample, shape),
    timestep: new ort.Tensor("float32", Float32Array.of(timestep, timestep), [2]),
    encoder_hidden_states: new ort.Tensor("float32", context, ctxShape),
  });
  const loraStep = async () => {
    const r = await lora.call("step", { sample, shape, timestep, context, tokens: ctxShape[1] });
    return r;
  };
  const ms = { ort: [], loralab: [] };
  for (let i = 0; i < warmup + runs; i++) {
    const timed = i >= warmup;
    status(`${name}: ${timed ? `run ${i - warmup + 1}/${runs}` : `warm-up ${i + 1}/${warmup}`}`);
    const order = i % 2 === 0 ? ["ort", "loralab"] : ["loralab", "ort"];
    for (const engine of order) {
      const r = engine === "ort" ? await ortStep(f32Feeds) : await loraStep();
      if (engine === "ort") ortOut = r.out;
      else loraOut = r.out;
      if (timed) ms[engine].push(r.ms);
    }
  }
  result.loralab = stats(ms.loralab);
  result.onnxruntime_web = stats(ms.ort);
  result.ratio = Math.round((result.loralab.median_ms / result.onnxruntime_web.median_ms) * 1000) / 1000;
  result.goal_ratio = 0.7;
  result.goal_met = result.ratio <= 0.7;
  let sq = 0;
  for (const v of ortOut) sq += v * v;
  result.output = {
    nmse_loralab_vs_ort: nmse(loraOut, ortOut),
    ort_rms: Math.sqrt(sq / ortOut.length),
    finite: loraOut.every(Number.isFinite) && ortOut.every(Number.isFinite),
  };
  await session.release();

  if (f16 && meta.onnx.f16) {
    status(`${name}: onnxruntime-web f16`);
    try {
      const s16 = await ort.InferenceSession.create(`${base}${meta.onnx.f16}`, { executionProviders: ["webgpu"] });
      const feeds = () => ({
        sample: new ort.Tensor("float16", f16Bits(sample), shape),
        timestep: new ort.Tensor("float16", f16Bits(Float32Array.of(timestep, timestep)), [2]),
        encoder_hidden_states: new ort.Tensor("float16", f16Bits(context), ctxShape),
      });
      const t16 = [];
      for (let i = 0; i < warmup + runs; i++) {
        const t = performance.now();
        await s16.run(feeds());
        if (i >= warmup) t16.push(performance.now() - t);
      }
      result.onnxruntime_web_f16 = stats(t16);
      await s16.release();
    } catch (e) {
      result.onnxruntime_web_f16 = { error: String(e?.message ?? e).slice(0, 600) };
    }
  }
  await lora.call("free");
  return result;
}

/** The web app's whole text-to-image time (demo model) through its Worker protocol. */
async function textToImage({ weights, runs, warmup, steps, cfg }) {
  const app = new Rpc("app/worker.js");
  try {
    await app.call("init");
    const out = { model: "demo", weights, steps, cfg, warmup, runs };
    const t0 = performance.now();
    const info = await app.call("load_model", { source: "demo", weights });
    out.load_ms = Math.round(performance.now() - t0);
    out.image = [info.default_width, info.default_height];
    out.sampler = info.sampler;
    const total = [];
    const perStep = [];
    for (let i = 0; i < warmup + runs; i++) {
      status(`text-to-image (${weights}): ${i < warmup ? "warm-up" : `run ${i - warmup + 1}/${runs}`}`);
      const stepAt = [];
      const t = performance.now();
      const r = await app.call("generate", { prompt: "a red apple on a table", negative: "", seed: 42 + i, steps, cfg },
        (ev) => { if (ev.event === "step") stepAt.push(ev.elapsed_ms); });
      const ms = performance.now() - t;
      if (!r.png?.length) throw new Error("generate returned no PNG");
      if (i >= warmup) {
        total.push(ms);
        for (let k = 1; k < stepAt.length; k++) perStep.push(stepAt[k] - stepAt[k - 1]);
      }
    }
    out.total = stats(total);
    // Step to step, as the app reports them (UNet batch 2 + sampler + preview).
    out.step = { ...stats(perStep), samples_ms: undefined };
    return out;
  } finally {
    app.close();
  }
}

/**
 * loralab alone (no other engine in the page): the demo UNet's step at growing latent sizes.
 * The demo model's arithmetic is tiny (0.11 GFLOP at 8x8), so the 8x8 step is almost all
 * fixed per-dispatch cost; the growth with the latent area is the kernels' compute.
 */
async function loralabScaling(lora, { sizes, runs, warmup, timestep }) {
  const meta = await (await fetch("models/demo/meta.json")).json();
  await lora.call("load", { base: "models/demo/", weights: "f32" });
  const out = [];
  for (const hw of sizes) {
    const shape = [2, meta.sample[1], hw, hw];
    const ctxShape = meta.encoder_hidden_states;
    const sample = normal(shape.reduce((a, b) => a * b), 1);
    const context = normal(ctxShape.reduce((a, b) => a * b), 2);
    const ms = [];
    for (let i = 0; i < warmup + runs; i++) {
      status(`loralab alone, demo at ${hw}x${hw}: ${i < warmup ? "warm-up" : `run ${i - warmup + 1}/${runs}`}`);
      const r = await lora.call("step", { sample, shape, timestep, context, tokens: ctxShape[1] });
      if (i >= warmup) ms.push(r.ms);
    }
    out.push({ model: "demo", sample: shape, ...stats(ms) });
  }
  await lora.call("free");
  return out;
}

window.runBench = async (opts = {}) => {
  const o = {
    models: ["demo", "mid"], warmup: 2, runs: 5, timestep: 981, f16: true,
    t2i: { weights: ["f32", "f16"], runs: 3, warmup: 1, steps: 20, cfg: 5 }, ...opts,
  };
  const report = {
    kind: "loralab vs onnxruntime-web, UNet step, same page",
    user_agent: navigator.userAgent,
    cross_origin_isolated: self.crossOriginIsolated,
    adapter: await adapterInfo(),
    onnxruntime_web: { version: ort.env.versions?.web ?? ort.env.versions?.common ?? null, execution_provider: "webgpu" },
    ratio_definition: "loralab median step time / onnxruntime-web median step time (lower is better for loralab)",
    models: [],
  };
  const lora = new Rpc("bench-worker.js");
  try {
    report.loralab = await lora.call("init");
    for (const m of o.models) report.models.push(await benchModel(m, { ...o, lora }));
    if (o.scaling) report.loralab_scaling = await loralabScaling(lora, { ...o, ...o.scaling });
  } finally {
    lora.close();
  }
  if (o.t2i) {
    report.text_to_image = [];
    for (const weights of o.t2i.weights) report.text_to_image.push(await textToImage({ ...o.t2i, weights }));
  }
  status("done");
  $("report").textContent = JSON.stringify(report, null, 2);
  return report;
};

status("ready");
