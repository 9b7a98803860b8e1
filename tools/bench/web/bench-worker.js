// loralab's side of the benchmark page: a module Worker (the engine reads files with
// FileReaderSync, which only Workers have) that loads a UNet from its diffusers folder and times
// one step: upload the inputs, the forward pass, read the prediction back.
// Messages: {id, cmd: "init" | "load" | "step" | "free", args} → {id, ok, value | error}.
import load, { init, bench_unet_load, bench_unet_step, bench_unet_free } from "./app/loralab-web.js";

const loaded = load();

const commands = {
  init: () => init(),
  async load({ base, weights }) {
    const config = await (await fetch(`${base}unet/config.json`)).text();
    const blob = await (await fetch(`${base}unet/diffusion_pytorch_model.safetensors`)).blob();
    return bench_unet_load(config, blob, weights);
  },
  async step({ sample, shape, timestep, context, tokens }) {
    const t0 = performance.now();
    const out = await bench_unet_step(sample, shape, timestep, context, tokens);
    const ms = performance.now() - t0;
    return { ms, out };
  },
  free: () => bench_unet_free(),
};

self.onmessage = async ({ data: { id, cmd, args } }) => {
  try {
    await loaded;
    const value = await commands[cmd](args ?? {});
    self.postMessage({ id, ok: true, value }, value?.out ? [value.out.buffer] : []);
  } catch (e) {
    self.postMessage({ id, ok: false, error: { name: e?.name ?? "Error", message: e?.message ?? String(e) } });
  }
};
