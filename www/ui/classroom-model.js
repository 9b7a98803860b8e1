// Classroom demonstrations that change how an adapter meets the model: merging it into the
// weights (and proving the image does not change), per-block weights, and a training run's
// checkpoints over steps (overfitting).
import { el } from "./dom.js";
import { adapters as cards, override, restoreAll } from "./lora.js";
import {
  IMAGE_DEFAULTS, adapter, adapterChoices, addMade, bundled, demoModel, difference, input, numbers, pixels, select, showGrid,
} from "./classroom-core.js";
import { base, coalesce, fmt, imageControls, images } from "./classroom-images.js";

// --- 6. merge math -----------------------------------------------------------------------------------

/** ΔW of one layer as a heat map: blue negative, red positive, white zero (scaled to ±max). */
function heatMap({ rows, cols, values, max }, layer) {
  // Large layers arrive pooled (each cell the largest-magnitude value of its block).
  const scale = Math.max(1, Math.floor(256 / Math.max(rows, cols)));
  const canvas = el("canvas", { class: "classroom-heat", width: cols * scale, height: rows * scale, role: "img" });
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(cols, rows);
  const m = max > 0 ? max : 1;
  for (let i = 0; i < rows * cols; i++) {
    const t = Math.max(-1, Math.min(1, values[i] / m));
    const w = Math.round(255 * (1 - Math.abs(t)));
    img.data.set(t >= 0 ? [255, w, w, 255] : [w, w, 255, 255], i * 4);
  }
  const tmp = new OffscreenCanvas(cols, rows);
  tmp.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(tmp, 0, 0, cols * scale, rows * scale);
  canvas.setAttribute("aria-label", `Weight difference of ${layer}: ${rows} × ${cols} cells, largest |ΔW| ${max.toPrecision(3)}`);
  return canvas;
}

/** The absolute difference of two images, amplified ×`gain`, as a PNG blob of the same size. */
async function differenceImage(a, b, width, height, gain) {
  const [x, y] = await Promise.all([pixels(a), pixels(b)]);
  const c = new OffscreenCanvas(width, height);
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(width, height);
  for (let i = 0; i < img.data.length; i += 4) {
    for (let k = 0; k < 3; k++) img.data[i + k] = Math.min(255, Math.abs(x[i + k] - y[i + k]) * gain);
    img.data[i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  return c.convertToBlob({ type: "image/png" });
}

const merge = {
  id: "merge",
  title: "Merge math",
  intro: "Merging writes W + strength·(α/r)·B·A into the model's weights once, so the adapter costs nothing "
    + "at run time. It is the same arithmetic as applying the adapter on the fly, so the merged model draws the "
    + "same image. The heat map shows what the merge added to one layer's weights.",
  defaults: { adapter: "rank16", s: "1", layer: "", ...IMAGE_DEFAULTS },
  async mount(ctx) {
    const { app, params, controls, results } = ctx;
    const grid = el("div");
    const verdict = el("p", { class: "classroom-headline" });
    const heat = el("div", { class: "classroom-heat-wrap" });
    results.replaceChildren(grid, verdict, heat);
    let layers = [];
    const layerSelect = el("div");
    const drawHeat = async (a, s) => {
      if (!layers.length) {
        layers = await app.engine.call("lora_layers", { id: a.id });
        if (!layers.some((l) => l.name === params.layer)) ctx.set({ layer: layers[0]?.name ?? "" });
        layerSelect.replaceChildren(select("Heat-map layer", layers.map((l) => [l.name, `${l.name} (${l.shape.join(" × ")})`]), params.layer,
          (v) => { ctx.set({ layer: v }); ctx.busy(() => drawHeat(a, s)); }));
      }
      const map = await app.engine.call("lora_delta_map", { id: a.id, layer: params.layer, strength: s });
      if (!ctx.live()) return;
      const size = map.full_rows ? `${map.full_rows} × ${map.full_cols}` : `${map.rows} × ${map.cols}`;
      heat.replaceChildren(el("h4", {}, `ΔW of ${params.layer} (${size}) at strength ${fmt(s)}`), heatMap(map, params.layer),
        el("p", { class: "hint" }, `What the merge added to each weight of this layer: red up, blue down, full colour = ${map.max.toPrecision(3)}.`));
    };
    const run = coalesce(ctx, async () => {
      const s = numbers(params.s, "strength", { min: -4, max: 4, count: 1 })[0];
      await demoModel(app, grid);
      const a = await adapter(app, params.adapter);
      const b = base(params);
      const [unmerged] = await images(ctx, [{ ...b, adapters: [[a, s]] }], "the adapter applied on the fly");
      // Merge only this adapter: the cards and the other classroom adapters are off for the merge.
      ctx.status("Merging the adapter into the model's weights…");
      const e = app.engine;
      override(app, new Map([...cards.values()].map((c) => [c, { te: c.te, unet: c.unet, enabled: false }])));
      const queued = [
        e.call("lora_set", { id: a.id, te: s, unet: s, enabled: true }),
        e.call("merge_export", { weights: "keep" }),
        e.call("lora_set", { id: a.id, te: 0, unet: 0, enabled: false }),
      ];
      restoreAll(app);
      const [, files] = await Promise.all(queued);
      const merged = Object.fromEntries(files.map((f) => [f.name, f.file]));
      const weights = app.model.weights;
      let merging;
      try {
        ctx.status("Loading the merged weights…");
        await e.call("load_model", { source: "demo", replace: merged, weights });
        [merging] = await images(ctx, [{ ...b, adapters: [], model: `merged ${params.adapter} ${s}` }], "the merged model, no adapter");
      } finally {
        ctx.status("Loading the demo model again…");
        await e.call("load_model", { source: "demo", weights });
      }
      const d = await difference(unmerged.blob, merging.blob);
      const gain = d.max > 0 ? Math.max(1, Math.floor(255 / d.max)) : 1;
      const diff = { blob: await differenceImage(unmerged.blob, merging.blob, unmerged.width, unmerged.height, gain), width: unmerged.width, height: unmerged.height };
      if (!ctx.live()) return;
      await showGrid(app, grid, {
        cells: [unmerged, merging, diff].map((r, i) => ({ row: 0, col: i, ...r })),
        rows: [`${params.adapter} ${fmt(s)}`], cols: ["adapter on the fly", "merged weights", `|difference| ×${gain}`],
        corner: ["→", "↓"], title: "Merge comparison", file: `merge-${params.adapter}.png`,
      });
      verdict.dataset.max = String(d.max);
      verdict.replaceChildren(`Largest pixel difference: `, el("strong", {}, `max |Δ| = ${d.max}`), ` of 255 (mean ${d.mean.toFixed(3)}). `,
        d.max <= 2 ? "The images are the same up to rounding: the merged weights are stored as "
          + `${weights}, so W + ΔW is rounded once more than on the fly.` : "The images differ more than rounding explains.");
      await drawHeat(a, s);
      ctx.status("Merged, compared and restored the demo model.");
    });
    const choices = await adapterChoices();
    controls.replaceChildren(
      select("Adapter", choices, params.adapter, (v) => { ctx.set({ adapter: v }); layers = []; run(); }),
      input("Strength", params.s, (v) => { ctx.set({ s: v }); run(); }, { inputmode: "decimal" }),
      layerSelect,
      ...imageControls(ctx, run),
    );
    await run();
  },
};

// --- 7. per-block weights ----------------------------------------------------------------------------

const BLOCKS = [["in", "Input blocks (down)"], ["mid", "Middle block"], ["out", "Output blocks (up)"]];

const blocks = {
  id: "blocks",
  title: "Per-block weights",
  intro: "The UNet first shrinks the picture (input blocks), thinks about it at the smallest size (middle block) "
    + "and grows it back (output blocks). Giving the adapter a separate strength in each part shows where it "
    + "does its work: often the output blocks shape the look, the input blocks the layout.",
  defaults: { adapter: "rank16", s: "1", w: "1,0,1", ...IMAGE_DEFAULTS },
  async mount(ctx) {
    const { app, params, controls, results } = ctx;
    const grid = el("div");
    results.replaceChildren(grid);
    const weights = () => {
      const w = numbers(params.w, "block weight", { min: -2, max: 2, count: 3 });
      if (w.length !== 3) throw new Error("Give three block weights: input, middle, output.");
      return w;
    };
    const run = coalesce(ctx, async () => {
      const s = numbers(params.s, "strength", { min: -4, max: 4, count: 1 })[0];
      const w = weights();
      await demoModel(app, grid);
      const a = await adapter(app, params.adapter);
      const b = base(params);
      const out = await images(ctx, [
        { ...b, adapters: [] },
        { ...b, adapters: [[a, s]] },
        { ...b, adapters: [[a, s]], blocks: [[a, w]] },
      ], "block weights");
      if (!ctx.live()) return;
      await showGrid(app, grid, {
        cells: out.map((r, i) => ({ row: 0, col: i, ...r })), rows: [`${params.adapter} ${fmt(s)}`],
        cols: ["no adapter", "all blocks 1", `in ${fmt(w[0])} · mid ${fmt(w[1])} · out ${fmt(w[2])}`],
        corner: ["→", "↓"], title: "Block weights", file: `blocks-${params.adapter}.png`,
      });
    });
    const sliders = BLOCKS.map(([key, label], i) => {
      const value = () => { try { return weights()[i]; } catch { return 1; } };
      const range = el("input", { type: "range", min: 0, max: 1.5, step: 0.05, value: value(), "aria-label": `${label} weight` });
      const shown = el("output", {}, fmt(value()));
      range.addEventListener("input", () => { shown.textContent = fmt(range.value); });
      range.addEventListener("change", () => {
        const w = weights();
        w[i] = Number(range.value);
        ctx.set({ w: w.map(fmt).join(",") });
        run();
      });
      return { node: el("label", { class: "field" }, label, el("span", { class: "inline" }, range, shown)), range, shown };
    });
    const preset = (text, w) => el("button", { type: "button", class: "small secondary", onclick: () => {
      ctx.set({ w: w.join(",") });
      sliders.forEach((sl, i) => { sl.range.value = String(w[i]); sl.shown.textContent = fmt(w[i]); });
      run();
    } }, text);
    const choices = await adapterChoices();
    controls.replaceChildren(
      select("Adapter", choices, params.adapter, (v) => { ctx.set({ adapter: v }); run(); }),
      input("Strength", params.s, (v) => { ctx.set({ s: v }); run(); }, { inputmode: "decimal" }),
      ...sliders.map((sl) => sl.node),
      el("div", { class: "buttons" }, preset("Input only", [1, 0, 0]), preset("Middle only", [0, 1, 0]), preset("Output only", [0, 0, 1]), preset("All", [1, 1, 1])),
      ...imageControls(ctx, run),
    );
    await run();
  },
};

// --- 8. overfitting ----------------------------------------------------------------------------------

/**
 * The checkpoints to lay out: the training panel's saved run when it finished on the demo model
 * and kept two or more checkpoints (`from=run`, or `auto`), else the bundled rank-4 heart run.
 * [{key, steps, strength, file?}] by step; `strength` makes up for a checkpoint's missing alpha
 * (its tensors apply at scale 1, the run's is α/r).
 */
async function checkpoints(app, from) {
  if (from !== "bundled") {
    const run = await app.engine.call("train_saved").catch(() => null);
    const usable = run?.finished && run.model?.name === "demo" && (run.checkpoints?.length ?? 0) >= 2;
    if (usable) {
      const scale = Number(run.settings.alpha) / Number(run.settings.rank);
      return {
        from: "run",
        trigger: run.settings.trigger,
        list: run.checkpoints.map((c) => ({ key: `run ${run.started_at} ${c.step}`, steps: c.step, strength: scale, file: c.file, rank: Number(run.settings.rank) })),
      };
    }
    if (from === "run") throw new Error("this browser has no finished training run on the demo model with two or more checkpoints (train one in the studio's training panel)");
  }
  const all = (await bundled()).filter((b) => b.role === "checkpoint" || b.key === "rank4");
  return { from: "bundled", trigger: "sks", list: all.map((b) => ({ key: b.key, steps: b.steps, strength: 1 })) };
}

const overfit = {
  id: "overfit",
  title: "Overfitting",
  intro: "Training saves the adapter every few steps. Early on it has not learned the heart yet; later it draws "
    + "hearts when the trigger word sks is in the prompt. Trained too long, it starts drawing hearts (or breaking "
    + "the picture) even without the trigger word: it has overfitted, and an earlier checkpoint is the better one.",
  defaults: { from: "auto", at: "", ...IMAGE_DEFAULTS, prompt: "a yellow sks shape on a purple background" },
  async mount(ctx) {
    const { app, params, controls, results } = ctx;
    const grid = el("div");
    const note = el("p", { class: "hint" });
    results.replaceChildren(grid, note);
    const run = coalesce(ctx, async () => {
      await demoModel(app, grid);
      const source = await checkpoints(app, params.from);
      const all = source.list.sort((x, y) => x.steps - y.steps);
      const steps = params.at ? numbers(params.at, "step", { min: 0, max: 1e7, count: 6 }) : all.map((c) => c.steps);
      const chosen = steps.map((n) => all.find((c) => c.steps === n) ?? (() => {
        throw new Error(`no checkpoint at step ${n} (there are: ${all.map((c) => c.steps).join(", ")})`);
      })());
      const ids = await Promise.all(chosen.map((c) => (c.file
        ? addMade(app, c.key, c.file, `${c.key}.safetensors`, { rank: c.rank, alpha: null })
        : adapter(app, c.key))));
      const b = base(params);
      const escaped = source.trigger.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
      const word = new RegExp(`\\b${escaped}\\s*`, "g");
      const without = b.prompt.replace(word, "").replace(/\s+/g, " ").trim();
      const jobs = [b.prompt, without].flatMap((prompt) => ids.map((a, i) => ({ ...b, prompt, adapters: [[a, chosen[i].strength]] })));
      const out = await images(ctx, jobs, "checkpoints × prompts");
      if (!ctx.live()) return;
      await showGrid(app, grid, {
        cells: out.map((r, i) => ({ row: Math.floor(i / ids.length), col: i % ids.length, ...r })),
        rows: [`with ${source.trigger}`, `without ${source.trigger}`], cols: chosen.map((c) => `step ${c.steps}`),
        corner: ["training step →", "prompt ↓"], title: "Checkpoints over steps", file: "overfitting.png",
      });
      note.textContent = source.from === "run"
        ? "Checkpoints of the training run saved in this browser (the training panel keeps the last five)."
        : "Checkpoints of the bundled rank-4 heart run (www/adapters/README.md).";
    });
    controls.replaceChildren(
      select("Checkpoints from", [["auto", "my training run if finished, else the bundled run"], ["run", "my training run"], ["bundled", "the bundled run"]],
        params.from, (v) => { ctx.set({ from: v }); run(); }),
      input("Steps to show (empty: all)", params.at, (v) => { ctx.set({ at: v }); run(); }, { inputmode: "numeric" }),
      ...imageControls(ctx, run),
    );
    await run();
  },
};

export const modelDemos = [merge, blocks, overfit];
