// The engine's Web Worker: loads the wasm module and answers {id, cmd} messages with
// {id, ok: true, value} or {id, ok: false, error: {name, message}}.
// Commands: "init" (adapter, caps, features), "self_test" (the kernel self-test report) and
// "version".
import load, { init, self_test, version } from "./loralab-web.js";

const loaded = load();

function noAdapter(message) {
  const e = new Error(message);
  e.name = "NoAdapterError";
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

const commands = {
  async init() {
    const engine = await init();
    return { engine, browser: await browserAdapter(), version: version() };
  },
  self_test,
  version,
};

self.onmessage = async (event) => {
  const { id, cmd } = event.data;
  try {
    await loaded;
    if (cmd !== "version" && !navigator.gpu) {
      throw noAdapter("navigator.gpu is not defined: this browser has WebGPU switched off or does not support it (in a Worker)");
    }
    const run = commands[cmd];
    if (!run) throw new Error(`unknown worker command "${cmd}"`);
    self.postMessage({ id, ok: true, value: await run() });
  } catch (err) {
    self.postMessage({
      id,
      ok: false,
      error: { name: err?.name ?? "Error", message: String(err?.message ?? err) },
    });
  }
};
