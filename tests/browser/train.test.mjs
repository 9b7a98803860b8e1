// End-to-end test of "Train a LoRA" in the system Chromium on WebGPU (SwiftShader without a
// GPU), on the bundled demo model and heart dataset:
// - Start stays disabled until both consent statements are checked; a setting out of range and
//   a file that is no image stop the start with errors naming them (the list stays); other
//   files are skipped by name;
// - the dataset loads from its button (20 images with their captions) and the steps warning
//   shows for a short run;
// - a 6-step run (batch 1, checkpoint every 2 steps, samples every 3) draws the loss curve as it
//   goes and makes samples with and without the trigger word; Pause holds the step count and
//   Resume continues;
// - a reload in the middle (after the checkpoint at step 4, while step 6 runs) offers to resume
//   from that checkpoint, shows the run's losses, samples and checkpoints again, and the resumed
//   run's step 5 has exactly the loss it had before the reload;
// - the finished run exports a kohya .safetensors (kohya keys, ss_* metadata: rank, 20 images,
//   steps, dates, the dataset's SHA-256 recomputed here, base model and licence, no caption
//   text outside the tag counts) that becomes a LoRA card, and a hand-off zip with the images,
//   captions and a kohya config;
// - the console stays clean and no request leaves the page's origin.
// Screenshots go to tests/browser/artifacts/.
//
//   node --test train.test.mjs        (4–7 minutes on SwiftShader, most of it compiling
//                                      the training kernels, once before and once after the reload)
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { artifacts, describe, launch, openApp, repo, screenshot, serveApp, waitAttr, modelLoaded as waitModel } from "./harness.mjs";
import { readPng } from "./png.mjs";

const TIMEOUT_MS = Number(process.env.APP_TIMEOUT_MS ?? 600_000);
const STEPS = 6;
const NAME = "heart-sks";
const heart = join(repo, "www/datasets/heart");
const sha256 = (bytes) => createHash("sha256").update(bytes).digest("hex");

let app;
let browser;
let session;
const t0 = Date.now();
const log = (what) => console.log(`# ${((Date.now() - t0) / 1000).toFixed(0)} s: ${what}`);

before(async () => {
  app = await serveApp();
  browser = await launch({ webgpu: true });
  session = await openApp(browser, app.origin);
});

after(async () => {
  await browser?.close();
  app?.server.close();
});

const panel = () => session.page.getByRole("region", { name: "Train a LoRA" });
const button = (name) => panel().getByRole("button", { name, exact: true });
const field = (name) => panel().getByRole("spinbutton", { name, exact: true });
const consent = {
  images: () => panel().getByRole("checkbox", { name: "The images are mine or licensed for this use" }),
  likeness: () => panel().getByRole("checkbox", { name: "People shown have consented to a likeness model" }),
};

const modelLoaded = (page) => waitModel(page, "the demo model", TIMEOUT_MS);

/** The panel's state, status, error and figures, for messages. */
async function trainState(page) {
  return page.evaluate(() => {
    const t = (id) => document.getElementById(id)?.innerText.trim() ?? "";
    return `train=${document.getElementById("train").dataset.state}; status="${t("train-status")}"; error="${t("train-error")}"; ` +
      `figures="${t("train-stats").replace(/\n/g, " ")}"`;
  });
}

/** The loss curve's last point [step, loss, smoothed, lr], or null. */
async function lastPoint(page) {
  const v = await page.getAttribute("#train-loss", "data-last");
  return v ? JSON.parse(v) : null;
}

/** Waits until the curve shows step `step` (or the run stops); returns the point. */
async function stepShown(page, step) {
  await page.waitForFunction(
    (s) => {
      const state = document.getElementById("train").dataset.state;
      const last = document.getElementById("train-loss").dataset.last;
      return ["error", "cancelled"].includes(state) || (last && JSON.parse(last)[0] >= s);
    },
    step,
    { timeout: TIMEOUT_MS, polling: 200 },
  );
  const p = await lastPoint(page);
  assert.ok(p && p[0] >= step, `step ${step} never came: ${await trainState(page)}`);
  return p;
}

/** Clicks a link or button that downloads; returns {name, bytes}. */
async function download(locator) {
  const [file] = await Promise.all([session.page.waitForEvent("download", { timeout: TIMEOUT_MS }), locator.click()]);
  const name = file.suggestedFilename();
  const path = join(artifacts, `train-${name}`);
  await file.saveAs(path);
  return { name, bytes: readFileSync(path) };
}

/** A safetensors file's header: {tensors: {name: {dtype, shape}}, metadata}. */
function safetensorsHeader(bytes) {
  const n = Number(bytes.readBigUInt64LE(0));
  assert.ok(n > 0 && 8 + n <= bytes.length, "safetensors header length out of range");
  const json = JSON.parse(bytes.subarray(8, 8 + n).toString("utf8"));
  const metadata = json.__metadata__ ?? {};
  delete json.__metadata__;
  return { tensors: json, metadata };
}

/** The entry names of a zip (local file headers). */
function zipNames(bytes) {
  const names = [];
  let pos = 0;
  while (pos + 30 <= bytes.length && bytes.readUInt32LE(pos) === 0x04034b50) {
    const compressed = bytes.readUInt32LE(pos + 18);
    const nameLen = bytes.readUInt16LE(pos + 26);
    const extraLen = bytes.readUInt16LE(pos + 28);
    names.push(bytes.toString("utf8", pos + 30, pos + 30 + nameLen));
    pos += 30 + nameLen + extraLen + compressed;
  }
  return names;
}

test("train a LoRA on the heart dataset: consent, progress, samples, pause, reload and resume, export", { timeout: 6 * TIMEOUT_MS }, async () => {
  const { page } = session;
  await modelLoaded(page);
  log("demo model loaded");

  // Consent: Start stays disabled until both statements are checked.
  await panel().getByLabel("Add images").setInputFiles([
    { name: "broken.png", mimeType: "image/png", buffer: Buffer.from("this is not a PNG") },
    { name: "good.png", mimeType: "image/png", buffer: readFileSync(join(heart, "001.png")) },
    { name: "notes.pdf", mimeType: "application/pdf", buffer: Buffer.from("%PDF-1.4") },
  ]);
  await page.waitForFunction(() => document.querySelectorAll("#train-images > li").length === 2);
  assert.match(await page.locator("#train-skipped").innerText(), /Skipped .*notes\.pdf/);
  assert.equal(await button("Start training").isDisabled(), true, "Start must wait for consent");
  await consent.images().check();
  assert.equal(await button("Start training").isDisabled(), true, "Start must wait for both statements");
  await consent.likeness().check();
  assert.equal(await button("Start training").isDisabled(), false, `Start stays disabled: ${await trainState(page)}`);
  // A setting the engine refuses, then a file that is no image, stop the start with an error
  // naming them; the list stays.
  await field("Training steps").fill("10");
  await button("Start training").click();
  await waitAttr(page, "#train", "data-state", ["error", "running"], TIMEOUT_MS);
  assert.match(await page.locator("#train-error").innerText(), /training setting `warmup_steps`: 50 is more than the 10 steps/);
  await field("Training steps").fill("100");
  await button("Start training").click();
  await page.waitForFunction(() => /broken/.test(document.getElementById("train-error").textContent), null, { timeout: TIMEOUT_MS });
  assert.match(await page.locator("#train-error").innerText(), /^Could not start training: broken\.png: is not a PNG, JPEG or WebP image/);
  assert.equal(await page.locator("#train-images > li").count(), 2, "the images stay after a failed start");
  assert.equal(await session.page.getByRole("region", { name: "Saved training run" }).isVisible(), false);
  await button("Clear images").click();
  log("a broken image is refused by name");

  // The dataset from its button: 20 images, each with its caption from the .txt beside it.
  await button("Load heart dataset").click();
  await page.waitForFunction(() => document.querySelectorAll("#train-images > li").length === 20, null, { timeout: 60_000 });
  const caption = await panel().getByRole("textbox", { name: "Caption: heart/000.png" }).inputValue();
  assert.equal(caption, readFileSync(join(heart, "000.txt"), "utf8").trim());
  assert.equal(await panel().getByRole("textbox", { name: "Trigger word" }).inputValue(), "sks");
  assert.equal(await panel().getByRole("textbox", { name: "Class" }).inputValue(), "shape");

  await field("Rank").fill("4");
  await field("Alpha").fill("4");
  await field("Learning rate").fill("0.001");
  await field("Trigger word learning rate").fill("0.01");
  await field("Training steps").fill(String(STEPS));
  await field("Batch size").fill("1");
  await panel().getByRole("combobox", { name: "Schedule" }).selectOption("constant");
  await field("Warmup steps").fill("0");
  await field("Save every (steps)").fill("2");
  await field("Sample every (steps)").fill("3");
  await field("Sample steps").fill("2");
  await field("Training seed").fill("5");
  // 6 steps × 1 image on 20 images is far below 100–200 views per image.
  assert.match(await panel().getByRole("note").innerText(), /seen about 0\.3 times.*learn little/);

  assert.equal(await button("Start training").isDisabled(), false, `Start stays disabled: ${await trainState(page)}`);
  await button("Start training").click();
  await stepShown(page, 1);
  log("step 1 (the training kernels compiled)");
  const curveAt1 = await page.locator("#train-loss").screenshot();
  const p2 = await stepShown(page, 2);
  assert.ok(Number.isFinite(p2[1]) && p2[1] > 0 && Number.isFinite(p2[2]), `loss ${p2}`);
  assert.notDeepEqual(await page.locator("#train-loss").screenshot(), curveAt1, "the loss curve must change with each step");
  const figures = await panel().getByRole("definition").allInnerTexts();
  assert.match(figures.join(" | "), /2 of 6 \| \d\.\d{4} \(last \d\.\d{4}\) \| 1\.00e-3 \| [\d.]+ (it\/s|s\/it) \| /);
  await panel().getByRole("link", { name: "Download checkpoint at step 2" }).waitFor({ timeout: TIMEOUT_MS });
  log("step 2 with its checkpoint");

  // Pause holds the run after the step in progress; Resume continues it.
  await button("Pause training").click();
  await waitAttr(page, "#train", "data-state", ["paused", "error", "finished"], TIMEOUT_MS);
  assert.equal(await page.getAttribute("#train", "data-state"), "paused", await trainState(page));
  const held = (await lastPoint(page))[0];
  await page.waitForTimeout(3000);
  assert.equal((await lastPoint(page))[0], held, "a paused run must not step");
  assert.equal(await button("Resume training").isDisabled(), false);
  await button("Resume training").click();
  await stepShown(page, held + 1);
  log(`resumed after a pause at step ${held}`);

  // Samples at step 3: the prompt with the trigger word and without it.
  await page.waitForFunction(() => document.querySelectorAll("#train-samples img").length >= 2, null, { timeout: TIMEOUT_MS, polling: 200 });
  const alts = await page.locator("#train-samples img").evaluateAll((imgs) => imgs.map((i) => i.alt));
  assert.deepEqual(alts, ["Sample at step 3: a red sks shape on a blue background", "Sample at step 3: a red shape on a blue background"]);
  const sample = await download(panel().getByRole("link", { name: "Download", exact: true }).first());
  const png = readPng(sample.bytes);
  assert.equal(png.width, 64);
  assert.match(png.text.parameters, /^a red sks shape on a blue background\n/);
  log("samples at step 3");

  // A reload while step 6 runs: the checkpoint at step 4 is offered and the run continues from it.
  await panel().getByRole("link", { name: "Download checkpoint at step 4" }).waitFor({ timeout: TIMEOUT_MS });
  const before5 = await stepShown(page, 5);
  assert.equal(before5[0], 5);
  await screenshot(page, "train-before-reload");
  await page.reload();
  await modelLoaded(page);
  const offer = session.page.getByRole("region", { name: "Saved training run" });
  await offer.waitFor({ timeout: 60_000 });
  assert.match(await offer.innerText(), /unfinished training run.*checkpoint at step 4 of 6/s);
  assert.equal((await lastPoint(page))[0], 4, "the curve shows the steps up to the checkpoint");
  assert.equal(await page.locator("#train-samples img").count(), 2, "the samples come back after a reload");
  assert.equal(await page.locator("#train-images > li").count(), 20, "the dataset comes back after a reload");
  assert.equal(await button("Start training").isDisabled(), true, "a new run must not replace the unfinished one");
  await screenshot(page, "train-resume-offer");
  await offer.getByRole("button", { name: "Resume from checkpoint" }).click();
  const after5 = await stepShown(page, 5);
  assert.deepEqual(after5, before5, "the resumed run's step 5 must equal the uninterrupted one's");
  log("resumed from the checkpoint at step 4 after a reload; step 5 repeats exactly");

  const state = await waitAttr(page, "#train", "data-state", ["finished", "error", "paused"], TIMEOUT_MS);
  assert.equal(state, "finished", await trainState(page));
  assert.equal(await page.locator("#train-samples img").count(), 4, "samples at step 3 and at the end");
  assert.deepEqual(
    await page.locator("#train-checkpoints a").allInnerTexts(),
    ["Download checkpoint at step 2", "Download checkpoint at step 4", "Download checkpoint at step 6"],
  );
  log("finished");

  // Export: a kohya file, downloaded and added as a LoRA card.
  const exported = await download(button("Export (kohya)"));
  assert.equal(exported.name, `${NAME}.safetensors`);
  const { tensors, metadata: m } = safetensorsHeader(exported.bytes);
  // The learned trigger word, bundled as A1111 does.
  const emb = tensors["bundle_emb.sks.string_to_param.*"];
  assert.ok(emb && emb.dtype === "F16" && emb.shape.join("x") === "1x32", JSON.stringify(emb));
  const keys = Object.keys(tensors).filter((k) => !k.startsWith("bundle_emb."));
  assert.ok(keys.length > 0 && keys.every((k) => /^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$/.test(k)), keys.join(", "));
  const down = keys.filter((k) => k.endsWith(".lora_down.weight"));
  assert.ok(down.length > 0 && down.every((k) => keys.includes(k.replace("lora_down", "lora_up")) && keys.includes(k.replace(".lora_down.weight", ".alpha"))));
  assert.ok(down.every((k) => tensors[k].shape[0] === 4 && tensors[k].dtype === "F16"));
  assert.ok(keys.some((k) => k.includes("attn2_to_k")), "cross-attention layers are trained");
  assert.equal(m.ss_network_module, "networks.lora");
  assert.equal(m.ss_network_dim, "4");
  assert.equal(m.ss_network_alpha, "4.0");
  assert.equal(m.ss_num_train_images, "20");
  assert.equal(m.ss_steps, String(STEPS));
  assert.equal(m.ss_max_train_steps, String(STEPS));
  assert.equal(m.ss_learning_rate, "0.001");
  assert.equal(m.ss_seed, "5");
  assert.equal(m.ss_output_name, NAME);
  assert.equal(m.ss_sd_model_name, "demo");
  assert.equal(m["modelspec.license"], "MIT OR Apache-2.0");
  assert.equal(m["modelspec.trigger_phrase"], "sks");
  const started = Number(m.ss_training_started_at);
  const finished = Number(m.ss_training_finished_at);
  assert.ok(started > 1.7e9 && finished >= started && finished <= Date.now() / 1000 + 1, `dates ${started} ${finished}`);
  assert.match(m["modelspec.date"], /^\d{4}-\d\d-\d\dT/);
  // The dataset's hash: SHA-256 of the sha256sum listing of its files, in name order.
  const listing = Array.from({ length: 20 }, (_, i) => String(i).padStart(3, "0"))
    .flatMap((n) => ["png", "txt"].map((x) => [`heart/${n}.${x}`, sha256(readFileSync(join(heart, `${n}.${x}`)))]))
    .sort(([a], [b]) => (a < b ? -1 : 1))
    .map(([name, h]) => `${h}  ${name}\n`).join("");
  assert.match(m.ss_training_comment, new RegExp(`dataset: 20 images, 20 caption files, SHA-256 ${sha256(listing)}; base model demo`));
  assert.match(m.ss_training_comment, /consent confirmed/);
  // No captions outside kohya's tag counts, no image data.
  const captions = Array.from({ length: 20 }, (_, i) => readFileSync(join(heart, `${String(i).padStart(3, "0")}.txt`), "utf8").trim());
  for (const [k, v] of Object.entries(m)) {
    if (k === "ss_tag_frequency") continue;
    assert.ok(!captions.some((c) => v.includes(c)), `${k} holds a caption`);
  }
  assert.ok(JSON.parse(m.ss_tag_frequency)["1_sks shape"], m.ss_tag_frequency);
  const card = page.locator(`#lora-cards > li[data-file="${NAME}.safetensors"]`);
  await waitAttr(page, `#lora-cards > li[data-file="${NAME}.safetensors"]`, "data-state", ["ready", "error"], TIMEOUT_MS);
  assert.equal(await card.getAttribute("data-state"), "ready", await card.innerText());
  assert.match(await card.locator(".rank").innerText(), /^4\b/);
  assert.match(await card.locator(".embeddings").innerText(), /^sks \(1 vector\)/);
  log("exported and added as a LoRA card");

  // Hand-off: the images with their captions and a kohya configuration.
  const zip = await download(button("Hand-off (zip)"));
  assert.equal(zip.name, `${NAME}_kohya.zip`);
  const names = zipNames(zip.bytes);
  assert.ok(names.includes(`${NAME}_kohya/config.toml`), names.join(", "));
  assert.ok(names.includes(`${NAME}_kohya/img/1_sks shape/000.png`), names.join(", "));
  assert.ok(names.includes(`${NAME}_kohya/img/1_sks shape/000.txt`), names.join(", "));
  assert.equal(names.filter((n) => n.endsWith(".png")).length, 20);
  await screenshot(page, "train-finished");
  log("hand-off zip");

  assert.deepEqual(session.problems, [], "console errors, failed requests or requests to other origins");
});
