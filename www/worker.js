// The engine's Web Worker: loads the wasm module and answers {id, cmd, args} messages with
// {id, ok: true, value} or {id, ok: false, error: {name, message}}; long commands send events
// {id, event: "progress" | "step", ...} first. Commands run one at a time, in arrival order.
// The protocol is described in docs/web.md.
import load, {
  init, self_test, version, load_model, generate, lora_add, lora_set, lora_remove,
  embedding_add, parameters_read, png_annotate, gpu_memory, merge_outputs, merge_write,
  device_lost, device_destroy, recover,
} from "./loralab-web.js";
import { trainCommands } from "./train-worker.js";
import { classroom } from "./loralab-web.js";

const loaded = load();

function noAdapter(message) {
  const e = new Error(message);
  e.name = "NoAdapterError";
  return e;
}

function userError(message) {
  const e = new Error(message);
  e.name = "LoralabError";
  return e;
}

// What the browser says about its adapter (the engine's summary has only the description).
async function browserAdapter() {
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) return null;
  const i = adapter.info ?? {};
  return {
    vendor: i.vendor ?? "",
    architecture: i.architecture ?? "",
    device: i.device ?? "",
    description: i.description ?? "",
    isFallbackAdapter: Boolean(i.isFallbackAdapter ?? adapter.isFallbackAdapter),
    features: [...adapter.features].sort(),
  };
}

// ---------------------------------------------------------------------------------------------
// Model files: a diffusers folder fetched from a base URL (the bundled demo model, or a
// Hugging Face repository), optionally cached in the Origin Private File System.

// The files of a diffusers folder that loralab reads; [path, required]. Weight files are tried
// in order (the first one present is used).
const CONFIG_FILES = [
  ["model_index.json", true],
  ["scheduler/scheduler_config.json", true],
  ["text_encoder/config.json", true],
  ["unet/config.json", true],
  ["vae/config.json", true],
  ["tokenizer/vocab.json", false],
  ["tokenizer/merges.txt", false],
  ["tokenizer/tokenizer_config.json", false],
  ["tokenizer/special_tokens_map.json", false],
];
const WEIGHT_FILES = {
  text_encoder: ["text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors"],
  unet: ["unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"],
  vae: ["vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"],
};

// "https://huggingface.co/org/name" (or …/tree/main) → the base of its raw files, and the model
// card to read the licence from (Hugging Face repositories always have README.md; other hosts
// may have none, and asking would only log a 404).
function modelBase(url) {
  const u = new URL(url, self.location.href);
  if (/\.safetensors$/i.test(u.pathname)) return { single: u.href };
  const hf = u.hostname === "huggingface.co" && u.pathname.match(/^\/([^/]+\/[^/]+)(?:\/tree\/([^/]+))?\/?$/);
  if (hf) return { base: `https://huggingface.co/${hf[1]}/resolve/${hf[2] ?? "main"}/`, cards: ["README.md"] };
  return { base: u.href.endsWith("/") ? u.href : `${u.href}/`, cards: [] };
}

// A short name for a model URL: "org/name" on Hugging Face, else the last path segment.
function displayName(url) {
  const u = new URL(url, self.location.href);
  const parts = u.pathname.split("/").filter(Boolean);
  if (u.hostname === "huggingface.co" && parts.length >= 2) return `${parts[0]}/${parts[1]}`;
  return (parts.at(-1) ?? u.hostname).replace(/\.safetensors$/i, "");
}

function cacheName(url) {
  return url.replace(/^[a-z]+:\/\//i, "").replace(/[^A-Za-z0-9._-]+/g, "_").slice(0, 120);
}

async function opfsDir(path, create) {
  let dir = await navigator.storage.getDirectory();
  for (const part of path.split("/").filter(Boolean)) {
    dir = await dir.getDirectoryHandle(part, { create });
  }
  return dir;
}

// Streams `response` into OPFS file `dir/path`, counting bytes; returns the File.
async function saveToOpfs(dir, path, response, onBytes) {
  const parts = path.split("/");
  let d = dir;
  for (const p of parts.slice(0, -1)) d = await d.getDirectoryHandle(p, { create: true });
  const fh = await d.getFileHandle(parts.at(-1), { create: true });
  const writable = await fh.createWritable();
  const counter = new TransformStream({
    transform(chunk, ctl) {
      onBytes(chunk.byteLength);
      ctl.enqueue(chunk);
    },
  });
  await response.body.pipeThrough(counter).pipeTo(writable);
  return fh.getFile();
}

async function fetchOk(url) {
  let r;
  try {
    r = await fetch(url);
  } catch (e) {
    throw userError(`${url}: the download failed (${e.message}); check the address and your connection`);
  }
  return r;
}

// Fetches a diffusers folder below `base` into {path: Blob}, with the model card files `cards`
// (their front matter names the licence). With `cacheDir`, files are streamed into the Origin
// Private File System (and read from there); otherwise kept as Blobs.
async function fetchFolder(base, progress, cacheDir, cards = []) {
  const files = {};
  const wanted = [
    ...CONFIG_FILES.map(([p, req]) => [[p], req]),
    ...cards.map((p) => [[p], false]),
    ...Object.values(WEIGHT_FILES).map((alts) => [alts, true]),
  ];
  let done = 0;
  for (const [alternatives, required] of wanted) {
    let got = false;
    for (const path of alternatives) {
      const r = await fetchOk(base + path);
      if (r.status === 404) continue;
      if (!r.ok) throw userError(`${base}${path}: the server answered ${r.status} ${r.statusText}`);
      const total = Number(r.headers.get("content-length")) || 0;
      let seen = 0;
      const onBytes = (n) => {
        seen += n;
        progress({ phase: "download", label: path, done: seen, total });
      };
      if (cacheDir) {
        files[path] = await saveToOpfs(cacheDir, path, r, onBytes);
      } else {
        files[path] = await r.blob();
        onBytes(files[path].size);
      }
      got = true;
      break;
    }
    if (!got && required) {
      throw userError(`${base}${alternatives[0]}: not found; a diffusers model folder needs model_index.json, scheduler/, text_encoder/, tokenizer/, unet/ and vae/`);
    }
    progress({ phase: "download", label: "files", done: ++done, total: wanted.length });
  }
  return files;
}

// Files of a cached model (OPFS models/<name>/…) as {path: File}.
async function readCached(dir, prefix = "") {
  const files = {};
  for await (const [name, h] of dir.entries()) {
    if (name === "source.json") continue;
    if (h.kind === "directory") Object.assign(files, await readCached(h, `${prefix}${name}/`));
    else files[`${prefix}${name}`] = await h.getFile();
  }
  return files;
}

async function loadFromUrl(url, weights, progress) {
  const name = cacheName(url);
  const models = await opfsDir("models", true);
  // A complete cached copy is used as it is (works offline).
  try {
    const dir = await models.getDirectoryHandle(name);
    const src = await (await (await dir.getFileHandle("source.json")).getFile()).text();
    if (JSON.parse(src).complete) {
      progress({ phase: "cache", label: name, done: 1, total: 1 });
      return load_model(await readCached(dir), displayName(url), "cache", weights);
    }
  } catch {
    // not cached yet
  }
  const dir = await models.getDirectoryHandle(name, { create: true });
  const where = modelBase(url);
  let files;
  if (where.single) {
    const r = await fetchOk(where.single);
    if (!r.ok) throw userError(`${where.single}: the server answered ${r.status} ${r.statusText}`);
    const total = Number(r.headers.get("content-length")) || 0;
    let seen = 0;
    const file = await saveToOpfs(dir, where.single.split("/").pop(), r, (n) => {
      seen += n;
      progress({ phase: "download", label: "checkpoint", done: seen, total });
    });
    files = { [file.name]: file };
  } else {
    files = await fetchFolder(where.base, progress, dir, where.cards);
  }
  const src = await (await dir.getFileHandle("source.json", { create: true })).createWritable();
  await src.write(JSON.stringify({ url, complete: true, saved: new Date().toISOString() }));
  await src.close();
  return load_model(files, displayName(url), "url", weights);
}

async function dirSize(dir) {
  let n = 0;
  for await (const [, h] of dir.entries()) {
    n += h.kind === "directory" ? await dirSize(h) : (await h.getFile()).size;
  }
  return n;
}

// The bundled demo model (www/models/demo), relative to the page; `replace` ({path: Blob}) swaps
// some of its files (the classroom loads the demo with merged weights this way).
async function loadDemo(weights, progress, replace = {}) {
  const base = "models/demo/";
  const probe = await fetchOk(new URL(`${base}model_index.json`, self.location.href).href);
  if (!probe.ok) throw userError("the bundled demo model is missing from this build (models/demo/)");
  const files = await fetchFolder(new URL(base, self.location.href).href, progress, null, ["MODEL_CARD.md"]);
  return load_model({ ...files, ...replace }, "demo", "demo", weights);
}

// Picked or dropped files by their path inside the folder (`paths[i]` from the page for
// dropped folders, whose files carry no webkitRelativePath).
function fileMap(list, paths) {
  const files = {};
  list.forEach((f, i) => {
    files[paths?.[i] || f.webkitRelativePath || f.name] = f;
  });
  return files;
}

// ---------------------------------------------------------------------------------------------

let current = 0; // id of the command running now (events carry it)

const commands = {
  async init() {
    const engine = await init();
    return { engine, browser: await browserAdapter(), version: version() };
  },
  self_test,
  version,
  async load_model({ source, files, paths, url, weights = "f16", replace }) {
    const id = current;
    const progress = (p) => self.postMessage({ id, event: "progress", ...p });
    if (source === "demo") return loadDemo(weights, progress, replace);
    if (source === "files") {
      const map = fileMap(files ?? [], paths);
      const name = Object.keys(map).length === 1 ? Object.keys(map)[0] : (Object.keys(map)[0] ?? "model").split("/")[0];
      return load_model(map, name, "files", weights);
    }
    if (source === "url") return loadFromUrl(url, weights, progress);
    throw userError(`unknown model source "${source}"`);
  },
  async cache_list() {
    const models = await opfsDir("models", true);
    const out = [];
    for await (const [name, h] of models.entries()) {
      if (h.kind !== "directory") continue;
      let url = "";
      try {
        url = JSON.parse(await (await (await h.getFileHandle("source.json")).getFile()).text()).url;
      } catch {
        url = "";
      }
      out.push({ name, url, bytes: await dirSize(h) });
    }
    return out;
  },
  async cache_remove({ name }) {
    const models = await opfsDir("models", true);
    await models.removeEntry(name, { recursive: true });
    return null;
  },
  async generate(params) {
    const id = current;
    let png = null;
    const value = await generate(
      params,
      (ev, rgba) => {
        self.postMessage(
          { id, event: "step", step: ev.step, steps: ev.steps, elapsed_ms: ev.elapsed_ms,
            preview: { width: ev.preview_width, height: ev.preview_height, rgba } },
          [rgba.buffer],
        );
      },
      (bytes) => { png = bytes; },
    );
    return { ...value, png };
  },
  async lora_add({ file }) {
    const card = await lora_add(file, file.name);
    const s = card.summary;
    const count = (list) => list.map((v) => v.value);
    const targets = Object.fromEntries(s.targets.map((t) => [t.value, t.layers]));
    return {
      id: card.id,
      name: card.name,
      file: file.name,
      bytes: s.bytes,
      format: s.format,
      algorithms: s.algorithms,
      ranks: count(s.ranks),
      alphas: count(s.alphas),
      dtypes: s.dtypes,
      base: s.base,
      base_reason: s.base_reason,
      base_mismatch: card.base_mismatch,
      licence: s.licence,
      triggers: s.metadata.trigger_words ?? [],
      embeddings: s.embeddings ?? [],
      metadata: s.metadata,
      layers: { text_encoder: targets.text_encoder ?? 0, unet: targets.unet ?? 0 },
      warnings: s.warnings,
      te: card.te,
      unet: card.unet,
      enabled: card.enabled,
    };
  },
  async lora_set({ id, te, unet, enabled = true }) {
    await lora_set(id, te, unet, enabled);
    return null;
  },
  async lora_remove({ id }) {
    await lora_remove(id);
    return null;
  },
  embedding_add: ({ file }) => embedding_add(file, file.name),
  // The enabled adapters merged into the loaded model's files, written into the Origin Private
  // File System: [{component, name, file: File, tensors, merged, bytes}].
  async merge_export({ weights = "f16" }) {
    const dir = await opfsDir("exports", true);
    const out = [];
    for (const o of merge_outputs()) {
      const fh = await dir.getFileHandle(o.name.replaceAll("/", "_"), { create: true });
      const handle = await fh.createSyncAccessHandle();
      let written;
      try {
        written = merge_write(o.component, handle, o.name, weights);
      } finally {
        handle.close();
      }
      out.push({ component: o.component, name: o.name, file: await fh.getFile(), ...written });
    }
    return out;
  },
  parameters_read: ({ file }) => parameters_read(file, file.name),
  // A canvas-drawn PNG (the X/Y grid) with the XMP packet every engine-made PNG carries.
  png_annotate: ({ file, name, description = "" }) => ({ png: png_annotate(file, name ?? "image.png", description) }),
  async device() {
    const engine = await init();
    const u = await gpu_memory();
    return {
      ...engine,
      browser: await browserAdapter(),
      memory: {
        weights: u.weights_bytes,
        adapters: u.adapter_bytes,
        activations: u.activation_peak_bytes,
        peak: u.peak_live_bytes,
        live: u.live_bytes,
        cached: u.free_bytes,
      },
      usage: u,
    };
  },
};

// Destroys the GPU device as a driver reset would; only when the page was opened for the fault
// tests (its URL has ?test-hooks), never from the app's controls.
commands.debug_lose_device = ({ allowed }) => {
  if (allowed !== true) throw userError("debug_lose_device is a test hook");
  device_destroy();
  return null;
};

// Training a LoRA (train-worker.js): train_saved, train_start, train_resume, train_step, …
Object.assign(commands, trainCommands({ opfsDir, currentId: () => current, userError }));

// The classroom's engine commands (web/src/classroom.rs; docs/web.md).
for (const name of ["lora_layers", "lora_spectrum", "lora_resize", "param_counts", "set_block_weights", "lora_delta_map"]) {
  commands[name] = (args) => classroom(name, args);
}

const TRANSFER = (value) => (value?.png instanceof Uint8Array ? [value.png.buffer] : []);

let queue = Promise.resolve();

// Device loss (a driver reset, the browser reclaiming the GPU): once the engine's device is
// open, `device_lost()` resolves when it is lost. The page hears {notice: "device_lost"} at
// once; then, after the command running now, `recover()` opens a new device and loads the model,
// its adapters and embeddings again from the files they came from, and the page hears
// {notice: "device_recovered", value} (or {notice: "device_failed", error}).
let watching = false;
function watchDevice() {
  if (watching) return;
  watching = true;
  device_lost().then((reason) => {
    self.postMessage({ notice: "device_lost", reason });
    queue = queue.then(async () => {
      try {
        const value = await recover();
        watching = false;
        self.postMessage({ notice: "device_recovered", value });
        watchDevice();
      } catch (err) {
        watching = false;
        self.postMessage({ notice: "device_failed", error: { name: err?.name ?? "Error", message: String(err?.message ?? err) } });
      }
    });
  }, () => {
    watching = false;
  });
}

self.onmessage = (event) => {
  const { id, cmd, args } = event.data;
  if (cmd === "debug_lose_device") {
    // Not queued: a driver reset comes whenever it comes, also in the middle of a command.
    loaded.then(() => commands.debug_lose_device(args ?? {})).then(
      (value) => self.postMessage({ id, ok: true, value }),
      (err) => self.postMessage({ id, ok: false, error: { name: err?.name ?? "Error", message: String(err?.message ?? err) } }),
    );
    return;
  }
  queue = queue.then(async () => {
    current = id;
    try {
      await loaded;
      if (cmd !== "version" && !navigator.gpu) {
        throw noAdapter("navigator.gpu is not defined: this browser has WebGPU switched off or does not support it (in a Worker)");
      }
      const run = commands[cmd];
      if (!run) throw new Error(`unknown worker command "${cmd}"`);
      const value = await run(args ?? {});
      if (cmd === "init") watchDevice();
      self.postMessage({ id, ok: true, value }, TRANSFER(value));
    } catch (err) {
      const lost = err?.name === "DeviceLostError";
      self.postMessage({
        id,
        ok: false,
        error: {
          name: err?.name ?? "Error",
          // The engine reloads the model on a new device next (watchDevice): say so.
          message: lost ? "the GPU was reset while this ran; the model is being reloaded, try again when it is back" : String(err?.message ?? err),
        },
      });
    }
  });
};
