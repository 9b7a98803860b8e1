// The Classroom in the system Chromium on WebGPU (SwiftShader without a GPU): every
// demonstration opens from its shared URL (the first one as a fresh page load, the others as a
// link followed in the open page) and shows results the engine computed: the parameter counter's
// textbook 8,192 and 128× and new numbers for a new rank; images that differ where the inputs
// differ and agree where the arithmetic says they must (α/r·strength equal → the same image;
// merged weights → the unmerged image up to rounding); spectra, resized files and heat maps.
// Each grid is read back from its downloaded PNG (one PNG with labels and the XMP record).
// Screenshots go to tests/browser/artifacts/classroom-*.png. Images are 64×64 with 2 steps.
//
//   node --test classroom.test.mjs
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { artifacts, describe, launch, openApp, screenshot, serveApp, waitAttr } from "./harness.mjs";
import { readPng } from "./png.mjs";

const TIMEOUT_MS = Number(process.env.CLASSROOM_TIMEOUT_MS ?? 300_000);
const STEPS = 2;

let app;
let browser;
let session;

before(async () => {
  app = await serveApp();
  browser = await launch({ webgpu: true });
  session = await openApp(browser, app.origin, { path: "/#classroom/params?layer=textbook&rank=4" });
});

after(async () => {
  await browser?.close();
  app?.server.close();
});

const demo = () => session.page.locator("#classroom-demo");

/** Follows a shared link in the open page (as clicking it would) and waits for the demonstration. */
async function open(hash) {
  const { page } = session;
  await page.evaluate((h) => { location.hash = h; }, hash);
  return finished(hash.split("?")[0].replace("#classroom/", ""));
}

/** Waits until the demonstration `id` is shown and has finished computing; asserts it succeeded. */
async function finished(id) {
  const { page } = session;
  await page.waitForFunction(
    (d) => document.getElementById("classroom-demo")?.dataset.demo === d
      && ["done", "error"].includes(document.getElementById("classroom").dataset.state),
    id, { timeout: TIMEOUT_MS, polling: 100 },
  );
  const state = await page.getAttribute("#classroom", "data-state");
  const status = await page.locator("#classroom-demo .classroom-status").innerText();
  assert.equal(state, "done", `${id}: ${status} (${await describe(page)})`);
}

/** Waits for the section to run again after an input changed, then to finish. */
async function rerun(id, change) {
  const { page } = session;
  await page.evaluate(() => { document.getElementById("classroom").dataset.state = "changed"; });
  await change();
  await page.waitForFunction(() => document.getElementById("classroom").dataset.state !== "changed", null, { timeout: TIMEOUT_MS });
  return finished(id);
}

/**
 * Downloads the grid under `scope` and returns its cells as decoded pixels, using the canvas's
 * geometry: {png, cells: [[{r,g,b array}]…] by row, geometry}.
 */
async function grid(scope, linkName) {
  const { page } = session;
  const canvas = scope.locator("canvas.classroom-grid");
  const geo = await canvas.evaluate((c) => Object.fromEntries(Object.entries(c.dataset).map(([k, v]) => [k, Number(v)])));
  const [file] = await Promise.all([page.waitForEvent("download"), scope.getByRole("link", { name: linkName }).click()]);
  const path = join(artifacts, file.suggestedFilename());
  await file.saveAs(path);
  const png = readPng(readFileSync(path));
  assert.ok(png.itxt["XML:com.adobe.xmp"]?.text.includes("trainedAlgorithmicMedia"), `${path}: no XMP record`);
  assert.equal(png.width, geo.left + geo.cols * geo.cellWidth, "the PNG holds the labels and every column");
  assert.equal(png.height, geo.top + geo.rows * geo.cellHeight, "the PNG holds the labels and every row");
  const cells = [];
  for (let r = 0; r < geo.rows; r++) {
    const row = [];
    for (let c = 0; c < geo.cols; c++) {
      const px = [];
      for (let y = 0; y < geo.cellHeight; y++) {
        for (let x = 0; x < geo.cellWidth; x++) {
          const i = ((geo.top + r * geo.cellHeight + y) * png.width + geo.left + c * geo.cellWidth + x) * png.channels;
          px.push(png.pixels[i], png.pixels[i + 1], png.pixels[i + 2]);
        }
      }
      row.push(px);
    }
    cells.push(row);
  }
  return { png, cells, geo };
}

/** Mean absolute difference of two cells (0–255). */
function diff(a, b) {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += Math.abs(a[i] - b[i]);
  return s / a.length;
}

/** Asserts the image cells are real drawings (not one flat colour). */
function drawn(cell, what) {
  const min = Math.min(...cell);
  const max = Math.max(...cell);
  assert.ok(max - min > 30, `${what}: a flat image (${min}–${max})`);
}

const headline = () => demo().locator(".classroom-headline").first();

test("the parameter counter opens from its link with the textbook numbers and recounts for a new rank", async () => {
  const { page } = session;
  await finished("params");
  assert.equal(await page.getAttribute("html", "data-view"), "classroom");
  assert.equal(await page.locator("#app").isHidden(), true, "the studio is hidden in the classroom");
  const text = await headline().innerText();
  assert.match(text, /8,192/, text);
  assert.match(text, /1,048,576/, text);
  assert.match(text, /128× fewer/, text);
  const table = demo().getByRole("table", { name: "Trained values and file size per method" });
  assert.match(await table.innerText(), /LoHa[\s\S]*16,384/, "LoHa trains two rank-4 pairs");
  await screenshot(page, "classroom-params");
  await rerun("params", () => demo().getByRole("spinbutton", { name: "Rank" }).fill("8").then(() => demo().getByRole("spinbutton", { name: "Rank" }).press("Enter")));
  const after = await headline().innerText();
  assert.match(after, /16,384/, after);
  assert.match(after, /64× fewer/, after);
  assert.match(page.url(), /#classroom\/params\?layer=textbook&rank=8$/, "the URL holds the new rank");
  await rerun("params", () => demo().getByRole("combobox", { name: "Layer" }).selectOption("unet"));
  const unet = await headline().innerText();
  assert.match(unet, /every UNet layer at rank 8/, unet);
  assert.doesNotMatch(unet, /16,384/, "the whole UNet counts more than one layer");
});

test("α / r: equal α/r·strength gives the same image, others differ; the curve and the grid PNG", async () => {
  const { page } = session;
  await open(`#classroom/alpha?adapter=rank16&alpha=8,16&s=0.5,1&steps=${STEPS}`);
  const plot = demo().getByRole("img", { name: /Effective scale/ });
  assert.match(await plot.getAttribute("aria-label"), /α 8 gives 0\.5 per unit of strength; α 16 gives 1/);
  const { cells } = await grid(demo(), /Download alpha × strength grid PNG/);
  drawn(cells[0][0], "α 8, s 0.5");
  // α 8 at strength 1 and α 16 at strength 0.5 both scale ΔW by 0.5.
  assert.equal(diff(cells[0][1], cells[1][0]), 0, "α 8 × s 1 and α 16 × s 0.5 must be the same image");
  assert.ok(diff(cells[0][0], cells[1][1]) > 1, `α 8 × s 0.5 and α 16 × s 1 must differ (${diff(cells[0][0], cells[1][1])})`);
  await screenshot(page, "classroom-alpha");
});

test("rank: the four trained ranks and SVD-reduced versions side by side", async () => {
  const { page } = session;
  await open(`#classroom/rank?s=1&from=rank64&to=1&steps=${STEPS}`);
  const trained = await grid(demo().locator("div").filter({ has: page.getByRole("img", { name: /^Trained ranks/ }) }).last(), /Download trained ranks PNG/);
  assert.equal(trained.cells[0].length, 5, "no adapter + ranks 1, 4, 16, 64");
  for (let c = 1; c < 5; c++) assert.ok(diff(trained.cells[0][0], trained.cells[0][c]) > 0.5, `rank column ${c} equals the image without adapter`);
  const reduced = await grid(demo().locator("div").filter({ has: page.getByRole("img", { name: /^SVD-reduced ranks/ }) }).last(), /Download svd-reduced ranks PNG/);
  assert.equal(reduced.cells[0].length, 2, "the original and rank 1");
  assert.ok(diff(reduced.cells[0][0], reduced.cells[0][1]) > 0, "rank 1 of a rank-64 adapter cannot draw exactly the same");
  await screenshot(page, "classroom-rank");
});

test("ΔW spectrum: singular values and the energy of the top k", async () => {
  const { page } = session;
  await open("#classroom/spectrum?adapter=rank16&k=4");
  const e4 = Number(await headline().getAttribute("data-energy"));
  const values = (await demo().getByRole("img", { name: /^Singular values/ }).getAttribute("aria-label")).split(": ")[1].split(", ").map(Number);
  assert.ok(values.length >= 16, `${values.length} singular values`);
  assert.ok(values.slice(16).every((v) => v <= values[0] * 1e-4), "ΔW of a rank-16 adapter has at most 16 non-zero singular values");
  for (let i = 1; i < values.length; i++) assert.ok(values[i] <= values[i - 1], "singular values are sorted");
  const energy4 = values.slice(0, 4).reduce((s, v) => s + v * v, 0) / values.reduce((s, v) => s + v * v, 0);
  assert.ok(Math.abs(energy4 - e4) < 0.01, `top-4 energy ${e4} vs Σσ² of the shown values ${energy4}`);
  await screenshot(page, "classroom-spectrum");
  await rerun("spectrum", () => demo().getByRole("spinbutton", { name: "Top k" }).fill("1").then(() => demo().getByRole("spinbutton", { name: "Top k" }).press("Enter")));
  const e1 = Number(await headline().getAttribute("data-energy"));
  assert.ok(e1 < e4 && e1 > 0, `top-1 energy ${e1} must be below top-4 ${e4}`);
  assert.match(page.url(), /k=1/);
});

test("stacking: a strength × strength grid with the conflict zone marked", async () => {
  const { page } = session;
  await open(`#classroom/stack?a=rank4&b=striped&sa=1&sb=0,1&steps=${STEPS}`);
  const { cells } = await grid(demo(), /Download stacking grid PNG/);
  drawn(cells[0][0], "A alone");
  assert.ok(diff(cells[0][1], cells[0][0]) > 0.5, "adding B changes A's image");
  assert.match(await demo().innerText(), /1 cell is in the conflict zone/);
  await screenshot(page, "classroom-stack");
});

test("merge math: the merged model draws the unmerged image; the ΔW heat map", async () => {
  const { page } = session;
  await open(`#classroom/merge?adapter=rank16&s=1&steps=${STEPS}`);
  const max = Number(await headline().getAttribute("data-max"));
  assert.ok(max <= 2, `merged and unmerged differ by ${max} of 255`);
  const { cells } = await grid(demo(), /Download merge comparison PNG/);
  drawn(cells[0][0], "unmerged");
  assert.ok(diff(cells[0][0], cells[0][1]) < 0.5, "the two images are the same up to rounding");
  await demo().getByRole("img", { name: /^Weight difference of / }).waitFor();
  assert.equal(await page.getAttribute("#model", "data-state"), "loaded", "the demo model is back");
  await screenshot(page, "classroom-merge");
});

test("per-block weights: the output blocks alone differ from all blocks, and a preset re-draws", async () => {
  const { page } = session;
  await open(`#classroom/blocks?adapter=rank16&s=1&w=0,0,1&steps=${STEPS}`);
  const first = await grid(demo(), /Download block weights PNG/);
  const [none, all, out] = first.cells[0];
  assert.ok(diff(none, all) > 0.5, "the adapter changes the image");
  assert.ok(diff(out, all) > 0 && diff(out, none) > 0, "output blocks alone are neither all nor nothing");
  await rerun("blocks", () => demo().getByRole("button", { name: "Input only" }).click());
  assert.match(page.url(), /w=1,0,0/);
  const second = await grid(demo(), /Download block weights PNG/);
  assert.ok(diff(second.cells[0][2], out) > 0, "input blocks only draw another image than output blocks only");
  await screenshot(page, "classroom-blocks");
});

test("overfitting: checkpoints over steps with and without the trigger word", async () => {
  const { page } = session;
  await open(`#classroom/overfit?from=bundled&at=25,800&steps=${STEPS}`);
  const { cells } = await grid(demo(), /Download checkpoints over steps PNG/);
  assert.equal(cells.length, 2, "with and without the trigger");
  drawn(cells[0][1], "step 800 with the trigger");
  assert.ok(diff(cells[0][0], cells[0][1]) > 0.5, "step 25 and step 800 draw differently (with the trigger)");
  assert.ok(diff(cells[1][0], cells[1][1]) > 0.5, "step 25 and step 800 draw differently (without the trigger)");
  await screenshot(page, "classroom-overfit");
});

test("resize tool: a smaller file with the kept energy per layer, downloadable", async () => {
  const { page } = session;
  await open("#classroom/resize?adapter=rank16&mode=rank&rank=4");
  const h = headline();
  const [size, before] = [Number(await h.getAttribute("data-bytes")), Number(await h.getAttribute("data-before"))];
  assert.ok(size > 0 && size < before, `resized ${size} bytes, original ${before}`);
  const rows = await demo().getByRole("table", { name: "Resized layers" }).locator("tbody tr").allInnerTexts();
  assert.ok(rows.length > 10, "every layer is listed");
  for (const r of rows) assert.match(r, /\t16\t4\t/, r);
  const [file] = await Promise.all([page.waitForEvent("download"), demo().getByRole("link", { name: /^Download .*\.safetensors$/ }).click()]);
  const path = join(artifacts, file.suggestedFilename());
  await file.saveAs(path);
  const bytes = readFileSync(path);
  assert.equal(bytes.length, size);
  const headerLen = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + headerLen).toString("utf8"));
  const down = Object.entries(header).find(([k]) => k.endsWith("lora_down.weight"));
  assert.ok(down, "a kohya LoRA file");
  assert.equal(down[1].shape[0], 4, "rank 4");
  await screenshot(page, "classroom-resize");
  assert.deepEqual(session.problems, [], "console errors or failed requests");
});
