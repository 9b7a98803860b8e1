// The malformed-file corpus (tests/fixtures/malformed/, listed in its manifest.json) in the web
// app: broken adapters given to the LoRA input become error cards with the engine's message;
// broken model folders give a model-panel error and keep the model that was loaded; broken PNGs
// dropped for their parameters give an error naming the file; broken training images stop the
// start of training with their message. Afterwards a generation still works and the console
// stays clean.
//
//   node --test malformed.test.mjs
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, launch, openApp, repo, screenshot, serveApp, waitAttr, modelLoaded as waitModel } from "./harness.mjs";

const TIMEOUT_MS = Number(process.env.APP_TIMEOUT_MS ?? 300_000);
const dir = join(repo, "tests/fixtures/malformed");
const cases = JSON.parse(readFileSync(join(dir, "manifest.json"), "utf8")).cases;
const byFile = Object.fromEntries(cases.map((c) => [c.file, c]));

// Adapters dropped on the page get the CLI's messages, a pickle renamed to .safetensors too.
const LORAS = [
  "lora_pickle_renamed.safetensors",
  "empty.safetensors", "truncated_header.safetensors", "header_longer_than_file.safetensors",
  "header_length_u64_max.safetensors", "invalid_json.safetensors", "header_not_utf8.safetensors",
  "offsets_past_end.safetensors", "offsets_overlap.safetensors", "dtype_shape_mismatch.safetensors",
  "unknown_dtype.safetensors", "shape_overflow.safetensors", "lora_nan.safetensors", "lora_inf.safetensors",
  "lora_rank_mismatch.safetensors", "lora_no_keys.safetensors", "lora_is_a_model.safetensors",
  "lora_pickle.ckpt",
];
const MODELS = ["model_zero_channels", "model_heads_not_dividing", "model_huge_channels", "model_index_sdxl"];
const PNGS = cases.filter((c) => c.use === "png").map((c) => c.file);
const IMAGES = ["img_20000x20000.jpg", "img_animated.webp", "img_animated.gif", "img_not_an_image.png"];

let app;
let browser;
let session;

before(async () => {
  app = await serveApp();
  browser = await launch({ webgpu: true });
  session = await openApp(browser, app.origin);
});

after(async () => {
  await browser?.close();
  app?.server.close();
});

function includesAll(text, c) {
  for (const m of c.message) assert.ok(text.includes(m), `${c.file}: "${text}" lacks "${m}"`);
}

const modelLoaded = (page) => waitModel(page, "the demo model", TIMEOUT_MS);

test("broken adapters become error cards with the engine's message", { timeout: TIMEOUT_MS }, async () => {
  const { page } = session;
  await modelLoaded(page);
  await page.getByLabel("Add LoRA").setInputFiles(LORAS.map((f) => join(dir, f)));
  await page.waitForFunction(
    (n) => {
      const cards = [...document.querySelectorAll("#lora-cards > li")];
      return cards.length === n && cards.every((c) => c.dataset.state !== "loading");
    },
    LORAS.length,
    { timeout: TIMEOUT_MS, polling: 200 },
  );
  for (const f of LORAS) {
    const card = page.locator(`#lora-cards > li[data-file="${f}"]`);
    assert.equal(await card.getAttribute("data-state"), "error", `${f}: ${await card.innerText()}`);
    includesAll(await card.locator(".card-error").innerText(), byFile[f]);
  }
  await screenshot(page, "malformed-01-lora-cards");
  for (const f of LORAS) {
    await page.getByRole("button", { name: `Dismiss ${f}` }).click();
  }
  await page.waitForFunction(() => document.querySelectorAll("#lora-cards > li").length === 0, null, { timeout: 30_000 });
});

test("broken PNGs dropped for their parameters: an error naming the file", { timeout: TIMEOUT_MS }, async () => {
  const { page } = session;
  for (const f of PNGS) {
    await page.evaluate(() => {
      document.getElementById("gen-error").hidden = true;
    });
    await page.evaluate(({ b64, name }) => {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const dt = new DataTransfer();
      dt.items.add(new File([bytes], name, { type: "image/png" }));
      const target = document.getElementById("output");
      for (const type of ["dragenter", "dragover", "drop"]) {
        target.dispatchEvent(new DragEvent(type, { bubbles: true, cancelable: true, dataTransfer: dt }));
      }
    }, { b64: readFileSync(join(dir, f)).toString("base64"), name: f });
    await page.waitForFunction(() => document.getElementById("gen-error").hidden === false, null, { timeout: 60_000 });
    includesAll(await page.locator("#gen-error").innerText(), byFile[f]);
  }
  await screenshot(page, "malformed-03-png-error");
});

test("broken training images stop the start with their message", { timeout: TIMEOUT_MS }, async () => {
  const { page } = session;
  const panel = () => page.getByRole("region", { name: "Train a LoRA" });
  const button = (name) => panel().getByRole("button", { name, exact: true });
  for (const f of IMAGES) {
    await panel().getByLabel("Add images").setInputFiles(join(dir, f));
    const c = byFile[f];
    // A GIF is refused by its name when it is added, the others when training starts.
    if (f.endsWith(".gif")) {
      await page.waitForFunction(
        (name) => document.getElementById("train-skipped")?.innerText.includes(name) ||
          document.getElementById("train-error")?.innerText.includes(name) ||
          document.querySelectorAll("#train-images > li").length === 1,
        f,
        { timeout: 30_000 },
      );
      if (await page.locator("#train-images > li").count() === 0) {
        assert.match(await page.locator("#train-skipped").innerText(), /img_animated\.gif/);
        continue;
      }
    } else {
      await page.waitForFunction(() => document.querySelectorAll("#train-images > li").length === 1, null, { timeout: 30_000 });
    }
    for (const name of ["The images are mine or licensed for this use", "People shown have consented to a likeness model"]) {
      const box = panel().getByRole("checkbox", { name });
      if (!(await box.isChecked())) await box.check();
    }
    assert.equal(await button("Start training").isDisabled(), false, `${f}: Start stays disabled`);
    await button("Start training").click();
    await page.waitForFunction(
      (name) => document.getElementById("train-error").textContent.includes(name),
      f,
      { timeout: 120_000 },
    ).catch(async (e) => {
      throw new Error(`${f}: no error naming it: ${await page.locator("#train").innerText()}\n${e}`);
    });
    includesAll(await page.locator("#train-error").innerText(), c);
    await button("Clear images").click();
    await page.waitForFunction(() => document.querySelectorAll("#train-images > li").length === 0, null, { timeout: 30_000 });
  }
  await screenshot(page, "malformed-04-training-error");
});

test("broken model folders: a model-panel error, the loaded model stays", { timeout: TIMEOUT_MS }, async () => {
  const { page } = session;
  for (const f of MODELS) {
    await page.getByLabel("Open model folder").setInputFiles(join(dir, f));
    await page.waitForFunction(
      () => document.getElementById("model").dataset.state !== "loading",
      null,
      { timeout: TIMEOUT_MS, polling: 100 },
    );
    assert.equal(await page.getAttribute("#model", "data-state"), "error", `${f}: ${await describe(page)}`);
    includesAll(await page.locator("#model-error").innerText(), byFile[f]);
    assert.match(await page.locator("#model-current").innerText(), /the last model that loaded/);
  }
  await screenshot(page, "malformed-02-model-error");
});

test("after all that, a generation still works and the console is clean", { timeout: TIMEOUT_MS }, async () => {
  const { page } = session;
  await page.getByRole("spinbutton", { name: "Steps", exact: true }).fill("2");
  await page.getByRole("spinbutton", { name: "Width", exact: true }).fill("64");
  await page.getByRole("spinbutton", { name: "Height", exact: true }).fill("64");
  const before = await page.evaluate(() => document.querySelectorAll("#gallery > li").length);
  await page.getByRole("button", { name: "Generate", exact: true }).click();
  await page.waitForFunction(
    (n) => {
      const out = document.getElementById("output").dataset.state;
      return out === "error" || (out === "done" && document.querySelectorAll("#gallery > li").length > n);
    },
    before,
    { timeout: TIMEOUT_MS, polling: 100 },
  );
  assert.equal(await page.getAttribute("#output", "data-state"), "done", `generation failed: ${await describe(page)}`);
  await screenshot(page, "malformed-05-generated");
  assert.deepEqual(session.problems, [], "console errors, page errors, failed requests or other origins");
});
