// Classroom demonstrations about the adapter's numbers rather than its images: the parameter
// counter, the spectrum of ΔW, and the SVD resize tool (with download).
import { el, bytes } from "./dom.js";
import { adapter, adapterChoices, addMade, demoModel, input, numbers, select } from "./classroom-core.js";

const int = (n) => Math.round(n).toLocaleString("en-US");
const ratio = (full, part) => {
  const r = full / part;
  return r >= 10 ? `${int(r)}×` : `${Number(r.toFixed(1))}×`;
};
const pct = (x) => `${(x * 100).toFixed(1)} %`;

// --- 1. parameter counter --------------------------------------------------------------------------

const METHODS = [
  ["full", "Full fine-tune (ΔW itself)"],
  ["lora", "LoRA: B·A"],
  ["loha", "LoHa: (B₁A₁) ⊙ (B₂A₂)"],
  ["lokr", "LoKr: C ⊗ (B·A)"],
  ["ia3", "IA³: one scale per output"],
];

/** `param_counts`' bytes for one method and dtype (per-method objects or plain numbers). */
const sizeOf = (counts, method, dtype) => {
  const b = counts.bytes?.[dtype];
  if (b && typeof b === "object") return b[method];
  const per = dtype === "f32" ? 4 : 2;
  return counts[method] * per;
};

const counter = {
  id: "params",
  title: "Parameter counter",
  intro: "A layer's weight is a d × k matrix. Fine-tuning it fully means training all d·k numbers; LoRA "
    + "trains two thin matrices instead, B (d × r) and A (r × k), so only r·(d + k) numbers. "
    + "Pick a layer and a rank and compare, with the file size each method needs.",
  defaults: { layer: "textbook", rank: "4" },
  async mount(ctx) {
    const { app, params, controls, results } = ctx;
    const TARGETS = {
      unet: "every UNet layer", attn: "the UNet's attention layers", "attn+ff": "attention and feed-forward layers",
      "attn+ff+conv": "attention, feed-forward and convolution layers",
    };
    const layerOptions = [["textbook", "Textbook example: 1024 × 1024"], ...Object.entries(TARGETS).map(([k, v]) => [k, `The demo model: ${v}`]), ["custom", "Custom d × k"]];
    let layers = [];
    const draw = () => ctx.busy(async () => {
      const rank = numbers(params.rank, "rank", { min: 1, max: 4096, count: 1 })[0];
      let args;
      let shapeText;
      if (params.layer === "textbook") {
        args = { shape: [1024, 1024], rank };
        shapeText = "1024 × 1024";
      } else if (params.layer === "custom") {
        const d = numbers(params.d ?? "320", "d", { min: 1, max: 1e6, count: 1 })[0];
        const k = numbers(params.k ?? "768", "k", { min: 1, max: 1e6, count: 1 })[0];
        args = { shape: [d, k], rank };
        shapeText = `${d} × ${k}`;
      } else if (TARGETS[params.layer]) {
        args = { target: params.layer, rank };
        shapeText = TARGETS[params.layer];
      } else {
        const l = layers.find((x) => x.name === params.layer);
        if (!l) throw new Error(`the demo model has no layer "${params.layer}"`);
        args = { shape: l.shape, rank };
        shapeText = l.shape.join(" × ");
      }
      if (args.target) await demoModel(app, results);
      const c = await app.engine.call("param_counts", args);
      if (!ctx.live()) return;
      const d = args.shape?.[0];
      const k = args.shape ? args.shape.slice(1).reduce((x, y) => x * y, 1) : null;
      const formula = args.shape
        ? `d × k = ${int(d)} × ${int(k)} = ${int(c.full)} values; LoRA: r·(d + k) = ${rank} × (${int(d)} + ${int(k)}) = ${int(c.lora)}`
        : `${int(c.layers)} layers: ${int(c.full)} values in their full weights; LoRA at rank ${rank}: ${int(c.lora)}`;
      const rows = METHODS.map(([m, name]) => el("tr", { dataset: { method: m } },
        el("th", { scope: "row" }, name),
        el("td", { class: "num" }, int(c[m])),
        el("td", { class: "num" }, m === "full" ? "1×" : `${ratio(c.full, c[m])} fewer`),
        el("td", { class: "num" }, bytes(sizeOf(c, m, "f32"))),
        el("td", { class: "num" }, bytes(sizeOf(c, m, "f16")))));
      results.replaceChildren(
        el("p", { class: "classroom-headline", dataset: { lora: c.lora, full: c.full } },
          `${shapeText} at rank ${rank}: LoRA trains `, el("strong", {}, int(c.lora)), " values instead of ",
          el("strong", {}, int(c.full)), " — ", el("strong", { class: "ratio" }, `${ratio(c.full, c.lora)} fewer`), "."),
        el("p", { class: "hint" }, formula),
        el("table", { class: "classroom-table", "aria-label": "Trained values and file size per method" },
          el("thead", {}, el("tr", {}, ...["Method", "Trained values", "vs full", "File size (f32)", "File size (f16)"].map((h) => el("th", { scope: "col" }, h)))),
          el("tbody", {}, ...rows)),
        el("p", { class: "hint" }, "LoHa multiplies two rank-r products element-wise (twice LoRA's values, but the "
          + "product can reach rank r²); LoKr builds ΔW as a Kronecker product of a small matrix and a low-rank one; "
          + "IA³ only learns one scale per output channel."));
      ctx.status(`Counted by the engine for ${shapeText}.`);
    });
    const rerender = () => {
      controls.replaceChildren(...[
        select("Layer", [...layerOptions, ...layers.map((l) => [l.name, `${l.name} (${l.shape.join(" × ")}, ${l.block})`])], params.layer, (v) => {
          ctx.set({ layer: v });
          rerender();
          draw();
        }),
        params.layer === "custom" ? input("d (rows)", params.d ?? "320", (v) => { ctx.set({ d: v }); draw(); }, { inputmode: "numeric" }) : null,
        params.layer === "custom" ? input("k (columns)", params.k ?? "768", (v) => { ctx.set({ k: v }); draw(); }, { inputmode: "numeric" }) : null,
        input("Rank", params.rank, (v) => { ctx.set({ rank: v }); draw(); }, { type: "number", min: 1, max: 4096, step: 1 }),
      ].filter(Boolean));
    };
    // The demo model's layers, from a bundled adapter that trains every attention layer.
    const listLayers = async () => {
      const a = await adapter(app, "rank4");
      layers = await app.engine.call("lora_layers", { id: a.id });
      if (ctx.live()) rerender();
    };
    rerender();
    if (params.layer !== "textbook" && params.layer !== "custom" && !TARGETS[params.layer]) {
      // A link to one of the demo model's layers: list them first.
      await demoModel(app, results);
      await ctx.busy(listLayers);
      if (ctx.live()) await draw();
      return;
    }
    await draw();
    if (app.model?.source === "demo") {
      try {
        await listLayers();
      } catch (err) {
        if (ctx.live()) ctx.status(`The demo model's layers could not be listed: ${err.message}`);
      }
    }
  },
};

// --- 4. ΔW spectrum ----------------------------------------------------------------------------------

/** Bar plot of singular values with the cumulative energy as a line; top k highlighted. */
function spectrumPlot(singular, energy, k) {
  const canvas = el("canvas", { class: "classroom-plot", width: 640, height: 240, role: "img" });
  const ctx = canvas.getContext("2d");
  const W = canvas.width;
  const H = canvas.height;
  const pad = { l: 48, r: 48, t: 14, b: 30 };
  const n = singular.length;
  const max = Math.max(...singular, 1e-30);
  const bw = (W - pad.l - pad.r) / Math.max(1, n);
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, W, H);
  ctx.font = "12px system-ui, sans-serif";
  singular.forEach((s, i) => {
    const h = (s / max) * (H - pad.t - pad.b);
    ctx.fillStyle = i < k ? "#1f4d7a" : "#9fb3c8";
    ctx.fillRect(pad.l + i * bw + bw * 0.1, H - pad.b - h, Math.max(1, bw * 0.8), h);
  });
  ctx.strokeStyle = "#c0392b";
  ctx.lineWidth = 2;
  ctx.beginPath();
  energy.forEach((e, i) => {
    const x = pad.l + (i + 0.5) * bw;
    const y = H - pad.b - e * (H - pad.t - pad.b);
    if (i) ctx.lineTo(x, y);
    else ctx.moveTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = "#111111";
  ctx.textAlign = "right";
  ctx.fillText(max.toPrecision(3), pad.l - 4, pad.t + 6);
  ctx.fillText("0", pad.l - 4, H - pad.b);
  ctx.textAlign = "left";
  ctx.fillStyle = "#c0392b";
  ctx.fillText("100 %", W - pad.r + 4, pad.t + 6);
  ctx.fillText("0 %", W - pad.r + 4, H - pad.b);
  ctx.fillStyle = "#111111";
  ctx.textAlign = "center";
  ctx.fillText(`singular values σ₁ … σ${n} (bars) and energy of the top k (line)`, W / 2, H - 8);
  canvas.setAttribute("aria-label", `Singular values: ${singular.map((s) => s.toPrecision(3)).join(", ")}`);
  return canvas;
}

const spectrum = {
  id: "spectrum",
  title: "ΔW spectrum",
  intro: "Any matrix can be split into directions ordered by how much they matter: the singular values. "
    + "For a trained adapter only a few are large, so a few directions carry almost all of the change "
    + "(the energy, Σσ²). That is why a low rank is enough.",
  defaults: { adapter: "rank64", layer: "", k: "4" },
  async mount(ctx) {
    const { app, params, controls, results } = ctx;
    await demoModel(app, results);
    if (!ctx.live()) return;
    const choices = await adapterChoices();
    let layers = [];
    const draw = () => ctx.busy(async () => {
      const a = await adapter(app, params.adapter);
      if (!layers.length) {
        layers = await app.engine.call("lora_layers", { id: a.id });
        if (!layers.some((l) => l.name === params.layer)) ctx.set({ layer: layers[0]?.name ?? "" });
        build();
      }
      const k = numbers(params.k, "k", { min: 1, max: 4096, count: 1 })[0];
      const s = await app.engine.call("lora_spectrum", { id: a.id, layer: params.layer });
      if (!ctx.live()) return;
      const kk = Math.min(k, s.singular.length);
      const captured = s.energy[kk - 1] ?? 1;
      results.replaceChildren(
        el("p", { class: "classroom-headline", dataset: { energy: captured, k: kk } },
          `The top ${kk} of ${s.singular.length} directions hold `, el("strong", {}, pct(captured)), " of this layer's change."),
        spectrumPlot(s.singular, s.energy, kk),
        el("p", { class: "hint" }, `Layer ${params.layer}, trained at rank ${s.rank}. Singular values: `,
          s.singular.slice(0, 12).map((x) => x.toPrecision(3)).join(", "), s.singular.length > 12 ? ", …" : ""),
      );
      ctx.status(`Computed by the engine (SVD of ΔW = B·A·α/r).`);
    });
    const build = () => controls.replaceChildren(
      select("Adapter", choices, params.adapter, (v) => {
        ctx.set({ adapter: v });
        layers = [];
        draw();
      }),
      select("Layer", layers.map((l) => [l.name, `${l.name} (${l.shape.join(" × ")})`]), params.layer, (v) => { ctx.set({ layer: v }); draw(); }),
      input("Top k", params.k, (v) => { ctx.set({ k: v }); draw(); }, { type: "number", min: 1, max: 4096, step: 1 }),
    );
    build();
    await draw();
  },
};

// --- tool: LoRA resize -------------------------------------------------------------------------------

const resize = {
  id: "resize",
  title: "LoRA resize (tool)",
  intro: "Makes an adapter smaller by keeping only its strongest directions (the largest singular values "
    + "of each layer's ΔW), like kohya's resize script: to a fixed rank, or per layer to the smallest rank "
    + "that keeps a chosen share of the energy. Download the result and use it like any LoRA.",
  defaults: { adapter: "rank64", mode: "rank", rank: "8", energy: "0.9" },
  async mount(ctx) {
    const { app, params, controls, results } = ctx;
    await demoModel(app, results);
    if (!ctx.live()) return;
    const choices = await adapterChoices();
    const run = () => ctx.busy(async () => {
      const a = await adapter(app, params.adapter);
      const args = params.mode === "energy"
        ? { id: a.id, energy: numbers(params.energy, "energy", { min: 0.01, max: 1, count: 1 })[0] }
        : { id: a.id, rank: numbers(params.rank, "rank", { min: 1, max: 4096, count: 1 })[0] };
      ctx.status("Resizing…");
      const r = await app.engine.call("lora_resize", args);
      if (!ctx.live()) return;
      const blob = new Blob([r.bytes], { type: "application/octet-stream" });
      const meanEnergy = r.layers.reduce((s, l) => s + l.energy, 0) / Math.max(1, r.layers.length);
      const ranks = [...new Set(r.layers.map((l) => l.new_rank))].sort((x, y) => x - y);
      results.replaceChildren(
        el("p", { class: "classroom-headline", dataset: { bytes: blob.size, before: a.bytes } },
          `${a.name}: ${bytes(a.bytes)} → `, el("strong", {}, bytes(blob.size)), `; new rank ${ranks.join(", ")}; `,
          `on average ${pct(meanEnergy)} of the energy kept.`),
        el("div", { class: "buttons" }, el("a", { class: "button-link", href: URL.createObjectURL(blob), download: r.name }, `Download ${r.name}`)),
        el("table", { class: "classroom-table", "aria-label": "Resized layers" },
          el("thead", {}, el("tr", {}, ...["Layer", "Rank", "New rank", "Energy kept", "Relative error"].map((h) => el("th", { scope: "col" }, h)))),
          el("tbody", {}, ...r.layers.map((l) => el("tr", {},
            el("td", {}, l.module ?? l.name), el("td", { class: "num" }, l.old_rank ?? "full"), el("td", { class: "num" }, l.new_rank),
            el("td", { class: "num" }, pct(l.energy)), el("td", { class: "num" }, Number(l.relative_error ?? l.error).toPrecision(3)))))),
      );
      ctx.status("Resized by the engine (truncated SVD of each layer's ΔW).");
      // The resized adapter can be used in the rank and spectrum demonstrations of this page too.
      await addMade(app, `${params.adapter}@${args.rank ?? `e${args.energy}`}`, r.bytes, r.name, { rank: ranks.at(-1), alpha: null });
    });
    controls.replaceChildren(
      select("Adapter", choices, params.adapter, (v) => ctx.set({ adapter: v })),
      select("Reduce to", [["rank", "a fixed rank"], ["energy", "a share of the energy"]], params.mode, (v) => ctx.set({ mode: v })),
      input("New rank", params.rank, (v) => ctx.set({ rank: v }), { type: "number", min: 1, max: 4096, step: 1 }),
      input("Energy to keep (0–1)", params.energy, (v) => ctx.set({ energy: v }), { inputmode: "decimal" }),
      el("div", { class: "buttons" }, el("button", { type: "button", onclick: run }, "Resize")),
    );
    await run();
  },
};

export const weightDemos = [counter, spectrum, resize];
