// GPU faults and work kept across reloads, in the system Chromium on WebGPU (SwiftShader):
// - the device is lost while an image is being made (GPUDevice.destroy() through the ?test-hooks
//   page hook, as a driver reset would): that image fails saying so, the page says so, the engine
//   opens a new device and loads the model again from the browser's cache (its server is stopped
//   by then) with the adapter at its strength; the form keeps what was typed and the next image
//   is made with the adapter;
// - an image size whose activations exceed the adapter's largest buffer is refused with what to
//   do, and the next image works;
// - after a reload the model comes back from the cache, the gallery and the adapter card (with
//   its strength) from the Origin Private File System; "Clear saved images" and the card's
//   Remove delete them there.
//
//   node --test faults.test.mjs
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, launch, openApp, repo, screenshot, serveApp, waitAttr, modelLoaded as waitModel } from "./harness.mjs";
import { serveModel } from "./model-server.mjs";
import { readPng } from "./png.mjs";

const TIMEOUT_MS = Number(process.env.APP_TIMEOUT_MS ?? 300_000);
const fixtures = join(repo, "tests/fixtures");

let app;
let browser;
let session;

before(async () => {
  app = await serveApp();
  browser = await launch({ webgpu: true });
  session = await openApp(browser, app.origin);
  await session.page.goto(`${app.origin}/?test-hooks`);
});

after(async () => {
  await browser?.close();
  app?.server.close();
});

const modelLoaded = (page, what) => waitModel(page, what, TIMEOUT_MS);

/** Clicks Generate and waits until the output panel is done or failed; returns its state. */
async function generate(page) {
  const n = await page.locator("#gallery > li").count();
  await page.getByRole("button", { name: "Generate", exact: true }).click({ timeout: 60_000 }).catch(async (e) => {
    await screenshot(page, "faults-click-failed");
    throw new Error(`${e.message}\n${await describe(page)}`);
  });
  await page.waitForFunction(
    (n) => {
      const out = document.getElementById("output").dataset.state;
      return out === "error" || (out === "done" && document.querySelectorAll("#gallery > li").length > n);
    },
    n,
    { timeout: TIMEOUT_MS, polling: 100 },
  );
  return page.getAttribute("#output", "data-state");
}

/** The `parameters` text of the newest gallery image (through its download link). */
async function newestParameters(page) {
  const [file] = await Promise.all([
    page.waitForEvent("download"),
    page.locator("#gallery > li").first().getByRole("link", { name: "Download PNG" }).click(),
  ]);
  return readPng(readFileSync(await file.path())).text.parameters;
}

/** Names under the Origin Private File System folder `path` ([] when it does not exist). */
function opfsNames(page, path) {
  return page.evaluate(async (path) => {
    // An entry (or the folder) removed or replaced while it is read fails the listing: look the
    // folder up again and read it again.
    for (let attempt = 0; ; attempt++) {
      let d = await navigator.storage.getDirectory();
      try {
        for (const p of path.split("/")) d = await d.getDirectoryHandle(p);
      } catch {
        return [];
      }
      try {
        const names = [];
        for await (const [name] of d.entries()) {
          if (!name.endsWith(".crswap")) names.push(name); // a write in progress
        }
        return names.sort();
      } catch (e) {
        if (attempt === 5) throw e;
        await new Promise((ok) => setTimeout(ok, 100));
      }
    }
  }, path);
}

const form = (page) => page.evaluate(() => ({
  prompt: document.getElementById("prompt").value,
  negative: document.getElementById("negative").value,
  seed: document.getElementById("seed").value,
  steps: document.getElementById("steps").value,
  cfg: document.getElementById("cfg").value,
}));

test("device loss: the model and adapter come back from the cache; too large a size is refused; work survives a reload", { timeout: TIMEOUT_MS * 4 }, async () => {
  const { page } = session;
  const t0 = Date.now();
  const log = (m) => console.log(`# ${((Date.now() - t0) / 1000).toFixed(0)} s: ${m}`);
  await modelLoaded(page, "the demo model");

  // The tiny test model from a second origin (cached in the browser), and an adapter made for it.
  const host = await serveModel(join(fixtures, "models/tiny-sd15-a"));
  session.allowed.add(new URL(host.url).origin);
  try {
    await page.getByRole("textbox", { name: "Model URL" }).fill(host.url);
    await page.getByRole("button", { name: "Load from URL" }).click();
    await modelLoaded(page, `the model at ${host.url}`);
  } finally {
    host.server.closeAllConnections?.();
    await new Promise((ok) => host.server.close(ok));
  }
  const served = host.requests.length;
  await page.getByLabel("Add LoRA").setInputFiles(join(fixtures, "lora/kohya.safetensors"));
  const card = page.locator('#lora-cards > li[data-file="kohya.safetensors"]');
  await card.waitFor({ timeout: TIMEOUT_MS });
  await page.waitForFunction(() => document.querySelector("#lora-cards > li")?.dataset.state !== "loading", null, { timeout: TIMEOUT_MS });
  assert.equal(await card.getAttribute("data-state"), "ready", await card.innerText());
  const name = (await card.getByRole("heading").innerText()).trim();
  await card.getByRole("spinbutton", { name: `Strength value: ${name}` }).fill("0.5");
  await page.getByRole("textbox", { name: "Prompt", exact: true }).fill("a lighthouse after a driver reset");
  await page.getByRole("textbox", { name: "Negative prompt" }).fill("blurry");
  await page.getByRole("spinbutton", { name: "Seed", exact: true }).fill("1234");
  await page.getByRole("spinbutton", { name: "Steps", exact: true }).fill("2");
  const typed = await form(page);
  log("model from a URL, adapter at 0.5, form filled");

  // The device is lost while an image is being made: that image fails with what happened, and
  // the engine reloads the model (from the cache: its server is stopped).
  await page.getByRole("button", { name: "Generate", exact: true }).click();
  await waitAttr(page, "#output", "data-state", ["running"], TIMEOUT_MS);
  await page.waitForTimeout(3000);
  await page.evaluate(() => window.loralabTest.loseDevice());
  assert.equal(await waitAttr(page, "#output", "data-state", ["done", "error"], TIMEOUT_MS), "error", await describe(page));
  assert.equal(await page.locator("#gen-error").innerText(),
    "Generation failed: the GPU was reset while this ran; the model is being reloaded, try again when it is back");
  const device = await waitAttr(page, "html", "data-device", ["recovered", "failed"], TIMEOUT_MS);
  assert.equal(device, "recovered", await describe(page));
  const notice = page.locator("#device-notice");
  assert.equal(await notice.innerText(), "The GPU was reset; the model was reloaded with 1 adapter.");
  assert.equal(await page.getAttribute("html", "data-state"), "ready");
  assert.equal(await page.locator("#error").isHidden(), true, "the page-wide error is shown");
  assert.equal(host.requests.length, served, "the model was fetched again instead of read from the cache");
  assert.deepEqual(await form(page), typed, "the form changed");
  assert.equal(await card.getByRole("spinbutton", { name: `Strength value: ${name}` }).inputValue(), "0.5");
  log("device lost during a generation and recovered");
  await screenshot(page, "faults-1-recovered");

  // The next image works, made with the adapter at 0.5.
  assert.equal(await generate(page), "done", await describe(page));
  const parameters = await newestParameters(page);
  assert.match(parameters, new RegExp(`<lora:${name}:0\\.5>`), parameters);
  assert.match(parameters, /Seed: 1234, Size: 64x64, Model: /, parameters);
  log("generated after the recovery");

  // A size whose activations exceed the adapter's largest buffer: refused with what to do.
  await page.evaluate(() => {
    for (const id of ["width", "height"]) {
      const f = document.getElementById(id);
      f.removeAttribute("max");
      f.value = "32768";
    }
  });
  assert.equal(await generate(page), "error", await describe(page));
  const message = await page.locator("#gen-error").innerText();
  assert.match(message, /a 32768x32768 image \(the UNet's activation \[2, 16, 4096, 4096\]\) needs \d+ bytes but this GPU allows at most \d+ bytes per buffer; use a smaller image/, message);
  assert.equal(await page.getAttribute("html", "data-state"), "ready");
  await page.getByRole("spinbutton", { name: "Width" }).fill("64");
  await page.getByRole("spinbutton", { name: "Height" }).fill("64");
  assert.equal(await generate(page), "done", await describe(page));
  log("an oversized image refused, the next one made");
  await screenshot(page, "faults-2-oversized");

  // A reload: the model from the cache, the gallery and the adapter at its strength from OPFS.
  const images = await page.locator("#gallery > li").count();
  assert.equal(images, 2);
  await page.reload();
  await modelLoaded(page, "the last model after the reload");
  assert.match(await page.locator("#model-current").innerText(), /127\.0\.0\.1/);
  assert.equal(host.requests.length, served, "the stopped server was asked again");
  await page.waitForFunction(() => document.querySelector("#lora-cards > li")?.dataset.state === "ready", null, { timeout: TIMEOUT_MS });
  assert.equal(await card.getByRole("spinbutton", { name: `Strength value: ${name}` }).inputValue(), "0.5");
  assert.equal(await page.locator("#gallery > li").count(), images, "the gallery did not come back");
  assert.match(await page.locator("#gallery > li").first().innerText(), /seed 1234 · 64×64 · 2 steps/);
  log("model, gallery and adapter back after a reload");
  await screenshot(page, "faults-3-reloaded");

  // Clearing deletes them from the browser's storage.
  assert.equal((await opfsNames(page, "session/gallery")).length, 2 * images);
  await page.getByRole("button", { name: "Clear saved images" }).click();
  await page.waitForFunction(() => !document.querySelector("#gallery > li"), null, { timeout: TIMEOUT_MS });
  assert.deepEqual(await opfsNames(page, "session/gallery"), []);
  assert.equal((await opfsNames(page, "session/loras")).length, 2);
  await card.getByRole("button", { name: `Remove ${name}` }).click();
  await card.waitFor({ state: "detached", timeout: TIMEOUT_MS });
  for (let i = 0; (await opfsNames(page, "session/loras")).length && i < 50; i++) await page.waitForTimeout(200);
  assert.deepEqual(await opfsNames(page, "session/loras"), [], "the removed adapter is still saved");
  assert.deepEqual(session.problems, [], session.problems.join("\n"));
  log("cleared");
});
