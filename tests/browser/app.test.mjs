// End-to-end test of the web app in the system Chromium on WebGPU (SwiftShader without a GPU):
// the bundled demo model loads on open and draws what the prompt asks for, with per-step
// progress; the model panel shows the demo model's licence; the downloaded PNG carries its
// parameters and an XMP record (AI-generated, software, model files with SHA-256), and dropping it
// back restores the parameters; a model
// folder opens from the file picker; a LoRA file becomes a card whose
// strength changes the image (strength 0 = no adapter, pixel for pixel), Live re-generates and the
// X/Y grid renders; a broken adapter file leaves the rest working; a model loads from a URL served
// on 127.0.0.1 and, after a reload with that server stopped, from the browser's cache; the
// Responsible use page opens from the footer. No request
// may leave the app's origin except to the model server, and the console stays clean.
// Screenshots of each state go to tests/browser/artifacts/.
//
//   npm test          (or: node --test app.test.mjs)
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { artifacts, describe, launch, openApp, repo, screenshot, serveApp, waitAttr, modelLoaded as waitModel } from "./harness.mjs";
import { serveModel } from "./model-server.mjs";
import { comparePixels, readPng } from "./png.mjs";

const TIMEOUT_MS = Number(process.env.APP_TIMEOUT_MS ?? 300_000);
const STEPS = 4;
/** Steps for the demo model's drawing: its recommended number. */
const DRAW_STEPS = 20;
const fixtures = join(repo, "tests/fixtures");
const XMP = "XML:com.adobe.xmp";
const sha256 = (path) => createHash("sha256").update(readFileSync(path)).digest("hex");

/** The XMP packet of a decoded PNG, checked to sit in an uncompressed iTXt chunk before the image data. */
function xmpOf(png, what) {
  const chunk = png.itxt[XMP];
  assert.ok(chunk, `${what}: no ${XMP} iTXt chunk (chunks ${png.chunks.join(", ")})`);
  assert.equal(chunk.compressed, false, `${what}: the XMP chunk is compressed`);
  assert.ok(png.chunks.indexOf("iTXt") < png.chunks.indexOf("IDAT"), `${what}: XMP after the image data`);
  const x = chunk.text;
  assert.match(x, /<Iptc4xmpExt:DigitalSourceType>http:\/\/cv\.iptc\.org\/newscodes\/digitalsourcetype\/trainedAlgorithmicMedia<\/Iptc4xmpExt:DigitalSourceType>/, what);
  assert.match(x, /xmlns:Iptc4xmpExt="http:\/\/iptc\.org\/std\/Iptc4xmpExt\/2008-02-29\/"/, what);
  assert.match(x, /<xmp:CreatorTool>loralab \d+\.\d+\.\d+<\/xmp:CreatorTool>/, what);
  return x;
}

let app;
let browser;
let session; // {context, page, problems, requests, allowed}

before(async () => {
  app = await serveApp();
  browser = await launch({ webgpu: true });
  session = await openApp(browser, app.origin);
});

after(async () => {
  await browser?.close();
  app?.server.close();
});

const $ = {
  prompt: () => session.page.getByRole("textbox", { name: "Prompt", exact: true }),
  negative: () => session.page.getByRole("textbox", { name: "Negative prompt" }),
  seed: () => session.page.getByRole("spinbutton", { name: "Seed", exact: true }),
  steps: () => session.page.getByRole("spinbutton", { name: "Steps", exact: true }),
  generate: () => session.page.getByRole("button", { name: "Generate", exact: true }),
  gallery: () => session.page.getByRole("list", { name: "Gallery" }),
  newest: () => session.page.getByRole("img", { name: /^Generated image/ }).first(),
};

/** Waits for the engine, then for the model panel to finish loading; asserts it loaded. */
const modelLoaded = (page, what) => waitModel(page, what, TIMEOUT_MS);

/** Sets the form for a reproducible image. */
async function setForm({ prompt, seed, steps = STEPS }) {
  await $.prompt().fill(prompt);
  await $.seed().fill(String(seed));
  await $.steps().fill(String(steps));
  assert.equal(await session.page.getByRole("checkbox", { name: "Random seed" }).isChecked(), false, "typing a seed must lock it");
}

/** Runs `start` (which starts one generation) and waits for its image at the top of the gallery. */
async function generated(start, { live = false } = {}) {
  const { page } = session;
  const before = await page.evaluate(() => ({
    n: document.querySelectorAll("#gallery > li").length,
    src: document.querySelector("#gallery img")?.src ?? null,
  }));
  await start();
  await page.waitForFunction(
    ([b, live]) => {
      const top = document.querySelector("#gallery > li");
      const out = document.getElementById("output").dataset.state;
      if (out === "error") return true;
      if (!top || out === "running") return false;
      return live ? top.dataset.live === "1" && top.querySelector("img").src !== b.src
        : document.querySelectorAll("#gallery > li").length > b.n;
    },
    [before, live],
    { timeout: TIMEOUT_MS, polling: 100 },
  );
  assert.equal(await page.getAttribute("#output", "data-state"), "done", `generation failed: ${await describe(page)}`);
  return download(page.locator("#gallery > li").first(), "Download PNG");
}

/** Clicks a download link inside `scope`; returns {name, bytes, png}. */
async function download(scope, linkName) {
  const [file] = await Promise.all([
    session.page.waitForEvent("download"),
    scope.getByRole("link", { name: linkName }).click(),
  ]);
  const name = file.suggestedFilename();
  const path = join(artifacts, name);
  await file.saveAs(path);
  const bytes = readFileSync(path);
  return { name, bytes, png: readPng(bytes) };
}

/** The RGB pixels of a rectangle of a decoded image, as a decoded image. */
function crop(img, x0, y0, w, h) {
  const pixels = new Uint8Array(w * h * 3);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const s = ((y0 + y) * img.width + x0 + x) * img.channels;
      pixels.set(img.pixels.subarray(s, s + 3), (y * w + x) * 3);
    }
  }
  return { width: w, height: h, channels: 3, pixels };
}

const rgb = (img) => crop(img, 0, 0, img.width, img.height);

/** The demo data's palette (tools/demo/README.md). */
const PALETTE = {
  red: [220, 40, 40], green: [40, 170, 60], blue: [40, 80, 220], yellow: [240, 215, 40],
  purple: [140, 60, 200], orange: [245, 135, 30], white: [245, 245, 245], black: [20, 20, 20],
};

function nearest([r, g, b]) {
  let best = null;
  let bestD = Infinity;
  for (const [name, [pr, pg, pb]] of Object.entries(PALETTE)) {
    const d = (r - pr) ** 2 + (g - pg) ** 2 + (b - pb) ** 2;
    if (d < bestD) [best, bestD] = [name, d];
  }
  return best;
}

/** The palette colour of most border pixels, and each colour's share of all pixels. */
function paletteShares(img) {
  const counts = {};
  const border = {};
  for (let y = 0; y < img.height; y++) {
    for (let x = 0; x < img.width; x++) {
      const i = (y * img.width + x) * 3;
      const c = nearest(img.pixels.subarray(i, i + 3));
      counts[c] = (counts[c] ?? 0) + 1;
      if (x === 0 || y === 0 || x === img.width - 1 || y === img.height - 1) border[c] = (border[c] ?? 0) + 1;
    }
  }
  const n = img.width * img.height;
  const shares = Object.fromEntries(Object.entries(counts).map(([c, k]) => [c, k / n]));
  return { border: Object.entries(border).sort((a, b) => b[1] - a[1])[0][0], shares };
}

function assertClean(what) {
  assert.deepEqual(session.problems, [], `${what}: console errors, page errors, failed requests or other origins`);
}

test("the default model loads on open; Ctrl+Enter generates with progress through every step", { timeout: TIMEOUT_MS * 3 }, async () => {
  const { page } = session;
  await modelLoaded(page, "the default model");
  // The demo model's licence, from its card's front matter, with what it allows.
  const licence = page.getByRole("region", { name: "Model" }).getByText(/^Licence: MIT or Apache-2\.0/);
  assert.ok(await licence.isVisible(), `no licence line: ${await page.locator("#model").innerText()}`);
  assert.match(await licence.innerText(), /commercial included.*MODEL_CARD\.md front matter\)$/);
  const csp = await page.getAttribute('meta[http-equiv="Content-Security-Policy"]', "content");
  assert.match(csp, /default-src 'self'/);
  assert.match(csp, /connect-src 'self' https: http:\/\/127\.0\.0\.1:\* http:\/\/localhost:\*/);
  await screenshot(page, "01-ready");

  // The model's recommended settings fill the form.
  assert.equal(await $.steps().inputValue(), String(DRAW_STEPS));
  assert.equal(await session.page.getByRole("spinbutton", { name: "CFG scale" }).inputValue(), "5");
  await setForm({ prompt: "a red circle on a blue background", seed: 1234, steps: DRAW_STEPS });
  await page.evaluate(() => {
    const bar = document.getElementById("gen-progress");
    window.progressSeen = [];
    new MutationObserver(() => window.progressSeen.push([bar.value, bar.max]))
      .observe(bar, { attributes: true, attributeFilter: ["value"] });
  });
  const result = await generated(async () => {
    await $.prompt().focus();
    await page.keyboard.press("Control+Enter");
  });

  const seen = await page.evaluate(() => window.progressSeen);
  const values = seen.map(([v]) => v).filter((v, i, all) => v > 0 && v !== all[i - 1]);
  assert.deepEqual(values, Array.from({ length: DRAW_STEPS }, (_, i) => i + 1), `progress values ${JSON.stringify(seen)}`);
  assert.ok(seen.every(([, max]) => max === DRAW_STEPS), `progress max ${JSON.stringify(seen)}`);
  assert.match(await page.locator("#gen-status").innerText(), /done/);

  const img = $.newest();
  assert.ok(await img.isVisible(), "no generated image");
  assert.match(await img.getAttribute("alt"), /^Generated image: seed 1234\b/);
  assert.ok(await img.evaluate((i) => i.complete && i.naturalWidth > 0), "the image did not decode");
  assert.equal(result.png.width % 8, 0);
  assert.equal(result.png.height % 8, 0);
  assert.match(result.name, /^1234-a-red-circle-on-a-blue-background\.png$/);
  // The demo model draws the prompt: a blue border (the background), a red shape.
  const colours = paletteShares(rgb(result.png));
  assert.equal(colours.border, "blue", `border colour ${colours.border}; shares ${JSON.stringify(colours.shares)}`);
  assert.ok((colours.shares.red ?? 0) >= 0.03, `red covers too little of the image: ${JSON.stringify(colours.shares)}`);
  // The preview canvas shows the image.
  const preview = await page.evaluate(() => {
    const c = document.getElementById("preview");
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let sum = 0;
    for (let i = 0; i < d.length; i += 4) sum += d[i] + d[i + 1] + d[i + 2];
    return { w: c.width, h: c.height, sum };
  });
  assert.deepEqual([preview.w, preview.h], [result.png.width, result.png.height]);
  assert.ok(preview.sum > 0, "the preview canvas is empty");
  await screenshot(page, "02-generated");
  assertClean("generate");
});

test("the downloaded PNG carries its parameters and dropping it restores them", { timeout: TIMEOUT_MS }, async () => {
  const { page } = session;
  const file = await download(page.locator("#gallery > li").first(), "Download PNG");
  const params = file.png.text.parameters;
  assert.ok(params, `no parameters chunk in ${file.name}: ${JSON.stringify(Object.keys(file.png.text))}`);
  assert.match(params, /^a red circle on a blue background/);
  assert.match(params, new RegExp(`Steps: ${DRAW_STEPS}\\b`));
  assert.match(params, /CFG scale: 5\b/);
  assert.match(params, /Seed: 1234\b/);
  // The XMP record: AI-generated, the software, the demo model's files with their hashes.
  const xmp = xmpOf(file.png, file.name);
  assert.match(xmp, /<Iptc4xmpExt:AISystemUsed>demo<\/Iptc4xmpExt:AISystemUsed>/);
  assert.match(xmp, /<loralab:licence>MIT OR Apache-2\.0<\/loralab:licence>/);
  for (const f of ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"]) {
    const digest = sha256(join(repo, "www/models/demo", f));
    assert.ok(xmp.includes(`<loralab:path>${f}</loralab:path>`) && xmp.includes(`<loralab:sha256>${digest}</loralab:sha256>`), `${f} ${digest} in ${xmp}`);
  }
  assert.doesNotMatch(xmp, /loralab:adapters/, "no adapter was used");

  await $.prompt().fill("something else");
  await $.seed().fill("99");
  await $.steps().fill("30");
  await page.evaluate(({ b64, name }) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const dt = new DataTransfer();
    dt.items.add(new File([bytes], name, { type: "image/png" }));
    const target = document.getElementById("output");
    for (const type of ["dragenter", "dragover", "drop"]) {
      target.dispatchEvent(new DragEvent(type, { bubbles: true, cancelable: true, dataTransfer: dt }));
    }
  }, { b64: file.bytes.toString("base64"), name: file.name });
  await page.waitForFunction(() => document.getElementById("seed").value === "1234", null, { timeout: TIMEOUT_MS });
  assert.equal(await $.prompt().inputValue(), "a red circle on a blue background");
  assert.equal(await $.steps().inputValue(), String(DRAW_STEPS));
  assert.match(await page.locator("#gen-status").innerText(), /Restored the parameters/);
  await screenshot(page, "03-parameters-restored");
  assertClean("parameters");
});

test("a LoRA card shows the file; strength 1 changes the image, strength 0 gives the base image", { timeout: TIMEOUT_MS * 8 }, async () => {
  const { page } = session;
  const manifest = JSON.parse(readFileSync(join(fixtures, "lora/manifest.json"), "utf8"));
  const modules = Object.values(manifest.cases.kohya.modules);
  // The adapter fixtures are made for the tiny test model: open its folder from the picker.
  await page.getByLabel("Open model folder").setInputFiles(join(fixtures, "models/tiny-sd15-a"));
  await modelLoaded(page, "the tiny test model's folder");
  assert.match(await page.locator("#model").innerText(), /tiny-sd15-a/);
  await setForm({ prompt: "a small house", seed: 777 });
  const base = rgb((await generated(() => $.generate().click())).png);

  // A broken file next to the real one: its card shows the engine's message, the rest works.
  await page.getByLabel("Add LoRA").setInputFiles([
    { name: "broken.safetensors", mimeType: "application/octet-stream", buffer: Buffer.from("this is not a safetensors file") },
    { name: "kohya.safetensors", mimeType: "application/octet-stream", buffer: readFileSync(join(fixtures, "lora/kohya.safetensors")) },
  ]);
  await page.waitForFunction(() => {
    const cards = [...document.querySelectorAll("#lora-cards > li")];
    return cards.length === 2 && cards.every((c) => c.dataset.state !== "loading");
  }, null, { timeout: TIMEOUT_MS });
  const broken = page.locator('#lora-cards > li[data-file="broken.safetensors"]');
  assert.equal(await broken.getAttribute("data-state"), "error");
  assert.match(await broken.locator(".card-error").innerText(), /broken\.safetensors/);

  const card = page.locator('#lora-cards > li[data-file="kohya.safetensors"]');
  assert.equal(await card.getAttribute("data-state"), "ready", `kohya card: ${await card.innerText()}`);
  const name = (await card.getByRole("heading").innerText()).trim();
  assert.match(name, /kohya/);
  assert.match(await card.locator("dd.format").innerText(), /kohya/i);
  const rankText = await card.locator("dd.rank").innerText();
  for (const r of new Set(modules.map((m) => m.rank))) assert.match(rankText, new RegExp(`\\b${r}\\b`), `rank ${r} in "${rankText}"`);
  const alphaText = await card.locator("dd.alpha").innerText();
  for (const a of new Set(modules.map((m) => m.alpha))) assert.match(alphaText, new RegExp(`\\b${a}\\b`), `alpha ${a} in "${alphaText}"`);
  // No licence in the file: the card shows the base model's, inferred, and what it was trained on.
  const cardLicence = card.locator("dd.licence");
  assert.match(await cardLicence.innerText(), /^CreativeML Open RAIL-M \(inferred from the model it was trained on\) · Use, change/);
  assert.match(await cardLicence.getAttribute("title"), /ss_base_model_version sd_v1/);
  assert.match(await card.locator("dd.trained-on").innerText(), /tiny-sd15-a · sd_v1/);
  assert.equal(await card.locator(".warning").count(), 0, `an SD1 adapter on an SD1-like model: ${await card.innerText()}`);
  const slider = page.getByRole("slider", { name: `Strength: ${name}` });
  assert.equal(Number(await slider.inputValue()), 1);
  await screenshot(page, "04-lora-cards");

  const withLora = await generated(() => $.generate().click());
  const one = rgb(withLora.png);
  const adapterSha = sha256(join(fixtures, "lora/kohya.safetensors"));
  const used = xmpOf(withLora.png, withLora.name);
  assert.match(used, /<loralab:adapters>/);
  assert.ok(used.includes(`<loralab:sha256>${adapterSha}</loralab:sha256>`), `the adapter's hash in ${used}`);
  assert.match(used, /<loralab:unetStrength>1<\/loralab:unetStrength>/);
  const change = comparePixels(one, base);
  assert.ok(!change.equal, "the adapter at strength 1 did not change the image");
  console.log(`# strength 1 vs none: max |Δ| ${change.maxDiff}, mean |Δ| ${change.meanDiff.toFixed(2)}`);

  await slider.fill("0");
  assert.equal(await page.getByRole("spinbutton", { name: `Strength value: ${name}` }).inputValue(), "0");
  const zero = rgb((await generated(() => $.generate().click())).png);
  const same = comparePixels(zero, base);
  assert.ok(same.equal, `strength 0 differs from the image without the adapter (max |Δ| ${same.maxDiff})`);

  // Live: moving the slider re-generates the newest image with the same seed.
  await page.getByRole("checkbox", { name: "Live" }).check();
  const live = rgb((await generated(() => slider.fill("1"), { live: true })).png);
  assert.ok(comparePixels(live, one).equal, "Live at strength 1 differs from Generate at strength 1");
  assert.match(await $.newest().getAttribute("alt"), /seed 777\b/);
  await page.getByRole("checkbox", { name: "Live" }).uncheck();
  await screenshot(page, "05-lora-live");

  // X/Y grid: strengths 0 and 1 for seed 777, one PNG whose cells are the images above.
  const grid = page.getByRole("region", { name: "X/Y grid" });
  await grid.getByRole("textbox", { name: "Strengths (columns)" }).fill("0, 1");
  await grid.getByRole("combobox", { name: "Rows" }).selectOption("seeds");
  await grid.getByRole("textbox", { name: "Seeds (rows)" }).fill("777");
  await grid.getByRole("button", { name: "Render grid" }).click();
  const gridState = await waitAttr(page, "#grid", "data-state", ["done", "error"], TIMEOUT_MS);
  assert.equal(gridState, "done", await grid.innerText());
  const sheet = (await download(grid, "Download grid PNG")).png;
  const gridXmp = xmpOf(sheet, "the grid PNG");
  assert.match(gridXmp, /X\/Y grid: strengths 0, 1/);
  assert.ok(gridXmp.includes(`<loralab:sha256>${adapterSha}</loralab:sha256>`), `the adapter's hash in ${gridXmp}`);
  const { width: w, height: h } = base;
  assert.ok(sheet.width >= 2 * w && sheet.height >= h, `grid ${sheet.width}×${sheet.height} for ${w}×${h} cells`);
  const left = sheet.width - 2 * w;
  const top = sheet.height - h;
  assert.ok(comparePixels(crop(sheet, left, top, w, h), base).equal, "grid cell at strength 0 differs from the base image");
  assert.ok(comparePixels(crop(sheet, left + w, top, w, h), one).equal, "grid cell at strength 1 differs from strength 1");
  assert.equal(Number(await slider.inputValue()), 1, "the grid changed the card's strength");
  await grid.scrollIntoViewIfNeeded();
  await screenshot(page, "06-grid");

  // Merge and download: the adapter fused into the model's UNet and text-encoder files.
  const downloads = [];
  const onDownload = (d) => downloads.push(d);
  page.on("download", onDownload);
  await page.getByRole("button", { name: "Merge and download" }).click();
  await page.waitForFunction(() => document.querySelectorAll("#merge-files a").length === 2, null, { timeout: TIMEOUT_MS });
  await page.waitForFunction(() => !document.getElementById("merge").disabled, null, { timeout: TIMEOUT_MS });
  const deadline = Date.now() + 10_000;
  while (downloads.length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  assert.equal(downloads.length, 2, `downloads: ${downloads.map((d) => d.suggestedFilename())}; ${await page.locator("#merge-status").innerText()}`);
  for (const d of downloads) {
    const path = join(artifacts, d.suggestedFilename());
    await d.saveAs(path);
    const bytes = readFileSync(path);
    const n = Number(bytes.readBigUInt64LE(0));
    const header = JSON.parse(bytes.subarray(8, 8 + n).toString("utf8"));
    const merged = JSON.parse(header.__metadata__?.loralab_merged_loras ?? "[]");
    assert.ok(merged.some((m) => /kohya/.test(m.name ?? m.file ?? "")), `${d.suggestedFilename()}: metadata ${JSON.stringify(header.__metadata__)}`);
    assert.ok(Object.keys(header).length > 10, `${d.suggestedFilename()}: ${Object.keys(header).length} entries`);
    assert.equal(bytes.length, 8 + n + Math.max(...Object.values(header).filter((t) => t.data_offsets).map((t) => t.data_offsets[1])));
  }
  page.off("download", onDownload);
  await screenshot(page, "06b-merged");

  // Removing the adapter gives the base image again; the broken card is dismissed.
  await card.getByRole("button", { name: `Remove ${name}` }).click();
  await card.waitFor({ state: "detached", timeout: TIMEOUT_MS });
  await broken.getByRole("button", { name: "Dismiss broken.safetensors" }).click();
  const removed = rgb((await generated(() => $.generate().click())).png);
  assert.ok(comparePixels(removed, base).equal, "the image after removing the adapter differs from the base image");
  assertClean("LoRA");
});

test("a model loads from a URL on 127.0.0.1 and, after a reload with that server stopped, from the cache", { timeout: TIMEOUT_MS * 6 }, async () => {
  const { page } = session;
  const host = await serveModel(join(fixtures, "models/tiny-sd15-a"));
  session.allowed.add(new URL(host.url).origin);
  let fromUrl;
  try {
    await page.getByRole("textbox", { name: "Model URL" }).fill(host.url);
    await page.getByRole("button", { name: "Load from URL" }).click();
    await modelLoaded(page, `the model at ${host.url}`);
    const fetched = host.requests.filter((r) => r.status < 300).map((r) => r.path);
    assert.ok(fetched.some((p) => p.includes("model_index.json")), `requests: ${JSON.stringify(host.requests)}`);
    assert.ok(fetched.some((p) => p.includes("unet/diffusion_pytorch_model.safetensors")), `requests: ${JSON.stringify(host.requests)}`);
    // The request log sees the Worker's fetches (so the other-origin check covers the engine).
    assert.ok(session.requests.some((u) => u.startsWith(host.url)), "the request log has no request to the model server");
    const cached = page.locator("#cache-list li.cached");
    await cached.first().waitFor({ timeout: TIMEOUT_MS });
    assert.equal(await cached.count(), 1, await page.locator("#cache-list").innerText());
    await setForm({ prompt: "a tiny boat", seed: 4321 });
    fromUrl = rgb((await generated(() => $.generate().click())).png);
    await screenshot(page, "07-model-from-url");
  } finally {
    host.server.closeAllConnections?.();
    await new Promise((ok) => host.server.close(ok));
  }
  const served = host.requests.length;

  await page.reload();
  await modelLoaded(page, "the default model after the reload");
  const entry = page.locator("#cache-list li.cached");
  await entry.first().waitFor({ timeout: TIMEOUT_MS });
  const cachedName = await entry.first().getAttribute("data-name");
  await entry.first().getByRole("button", { name: `Load ${cachedName}` }).click();
  await modelLoaded(page, "the cached model");
  assert.equal(host.requests.length, served, "the stopped server was asked again");
  await setForm({ prompt: "a tiny boat", seed: 4321 });
  const fromCache = rgb((await generated(() => $.generate().click())).png);
  assert.ok(comparePixels(fromCache, fromUrl).equal, "the cached model gives another image than the downloaded one");
  await screenshot(page, "08-model-from-cache");

  // Remove it from the cache.
  await entry.first().getByRole("button", { name: `Remove ${cachedName}` }).click();
  await page.waitForFunction(() => !document.querySelector("#cache-list li.cached"), null, { timeout: TIMEOUT_MS });
  assertClean("model from URL");
});

test("the Responsible use page opens from the footer", { timeout: TIMEOUT_MS }, async () => {
  const { page } = session;
  const section = page.getByRole("region", { name: "Responsible use" });
  assert.equal(await section.isVisible(), false, "the page shows before it is asked for");
  await page.getByRole("contentinfo").getByRole("link", { name: "Responsible use" }).click();
  await section.waitFor({ state: "visible", timeout: 10_000 });
  for (const heading of ["Licences", "Every image says it was made by AI", "Privacy", "People"]) {
    assert.ok(await section.getByRole("heading", { name: heading }).isVisible(), `heading ${heading}`);
  }
  assert.match(await section.innerText(), /trainedAlgorithmicMedia/);
  assert.match(await section.innerText(), /consent/);
  await screenshot(page, "09a-responsible-use");
  await section.getByRole("link", { name: "Back to the app" }).click();
  await section.waitFor({ state: "hidden", timeout: 10_000 });
  assertClean("responsible use");
});

test("the layout fits a laptop (1280×800) and a tablet (820×1180)", { timeout: TIMEOUT_MS }, async () => {
  const { page } = session;
  for (const [width, height, name] of [[1280, 800, "09-laptop"], [820, 1180, "10-tablet"]]) {
    await page.setViewportSize({ width, height });
    await page.evaluate(() => window.scrollTo(0, 0));
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `${width}×${height}: the page is ${overflow}px wider than the window`);
    // The prompt and the Generate button are on the first screen.
    for (const control of [$.prompt(), $.generate()]) {
      const box = await control.boundingBox();
      assert.ok(box && box.y + box.height <= height, `${width}×${height}: a main control is below the first screen`);
    }
    await page.screenshot({ path: join(artifacts, `${name}.png`) });
  }
  assertClean("layout");
});
