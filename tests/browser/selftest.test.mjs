// Browser test of the web app: the system Chromium (never a downloaded one) opens dist/ over
// http://127.0.0.1, the kernel self-test runs in the engine's Worker on WebGPU (SwiftShader on a
// machine without a GPU), and every case must pass with a clean console.
// Negative control: without --enable-unsafe-webgpu the page must explain that WebGPU is
// unavailable. A missing adapter in the positive run FAILS the test; it never skips.
//
//   npm test                      (uses dist/; builds it with `trunk build --release` if absent)
//   CHROMIUM=/path/to/chrome npm test
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { serve } from "../../scripts/serve-dist.mjs";

const repo = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const dist = process.env.LORALAB_DIST ?? join(repo, "dist");
const executablePath = process.env.CHROMIUM ?? "/usr/lib/chromium/chromium";
const FINISHED = ["passed", "failed", "unavailable", "error"];
const TIMEOUT_MS = Number(process.env.SELFTEST_TIMEOUT_MS ?? 180_000);

// The launch that works headless on a machine without a GPU (see docs in README).
const BASE_ARGS = [
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
  "--disable-quic",
  "--disable-dev-shm-usage",
  ...(process.getuid?.() === 0 ? ["--no-sandbox"] : []),
];

let server;
let origin;

before(async () => {
  if (!existsSync(join(dist, "index.html"))) {
    console.log(`# ${dist} has no index.html: running trunk build --release`);
    execFileSync("trunk", ["build", "--release"], { cwd: repo, stdio: "inherit" });
  }
  assert.ok(existsSync(executablePath), `no Chromium at ${executablePath} (apt-get install chromium, or set CHROMIUM)`);
  server = await serve(dist, 0);
  origin = `http://127.0.0.1:${server.address().port}`;
});

after(() => server?.close());

/** Opens the app in a fresh browser; collects console errors, page errors and failed requests. */
async function openApp({ webgpu }) {
  const browser = await chromium.launch({
    executablePath,
    headless: true,
    args: [...BASE_ARGS, ...(webgpu ? ["--enable-unsafe-webgpu"] : [])],
  });
  const page = await browser.newPage();
  const problems = [];
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console.error: ${m.text()}`);
  });
  page.on("pageerror", (e) => problems.push(`uncaught: ${e.message}`));
  page.on("requestfailed", (r) => problems.push(`request failed: ${r.url()} ${r.failure()?.errorText}`));
  page.on("response", (r) => {
    if (r.status() >= 400) problems.push(`HTTP ${r.status()}: ${r.url()}`);
  });
  page.on("worker", (w) => {
    w.on?.("console", (m) => {
      if (m.type() === "error") problems.push(`worker console.error: ${m.text()}`);
    });
  });
  await page.goto(`${origin}/`);
  return { browser, page, problems };
}

/** Waits until <html data-state> is one of FINISHED and returns it. */
async function finishedState(page) {
  await page.waitForFunction(
    (done) => done.includes(document.documentElement.dataset.state),
    FINISHED,
    { timeout: TIMEOUT_MS },
  );
  return page.evaluate(() => document.documentElement.dataset.state);
}

/** A page summary for assertion messages. */
async function describe(page) {
  return page.evaluate(() => {
    const text = (id) => document.getElementById(id)?.innerText.trim() ?? "";
    return `state=${document.documentElement.dataset.state}; status="${text("status")}"; ` +
      `unavailable="${document.getElementById("unavailable").hidden ? "" : text("unavailable-message")}"; ` +
      `error="${text("error-message")}"`;
  });
}

/** Result cells of the results table, one array of cell texts per body row. */
async function resultRows(page) {
  const table = page.getByRole("table", { name: "Self-test results" });
  await table.waitFor();
  const rows = table.locator("tbody").getByRole("row");
  return rows.evaluateAll((trs) => trs.map((tr) => [...tr.cells].map((td) => td.innerText.trim())));
}

test("self-test passes on WebGPU with adapter info and a clean console", { timeout: TIMEOUT_MS * 3 }, async () => {
  const { browser, page, problems } = await openApp({ webgpu: true });
  try {
    const state = await finishedState(page);
    assert.equal(state, "passed", `self-test did not pass: ${await describe(page)}`);
    assert.equal(await page.getByRole("alert").filter({ visible: true }).count(), 0, "an alert is shown");

    // Adapter panel: the backend is the browser's WebGPU and the adapter is named.
    const adapter = page.getByRole("region", { name: "Adapter" });
    const info = await adapter.innerText();
    assert.match(info, /Backend\s+BrowserWebGpu/, info);
    assert.match(info, /shader-f16\s+(yes|no)/, info);
    const name = await adapter.getByRole("definition").first().innerText();
    assert.ok(name && !/not reported|Opening/.test(name), `adapter name missing: ${info}`);

    const rows = await resultRows(page);
    assert.ok(rows.length >= 10, `only ${rows.length} result rows`);
    const failed = rows.filter((r) => r[0] !== "pass");
    assert.deepEqual(failed, [], "failed cases");
    const ops = new Set(rows.map((r) => r[1].split(".")[0]));
    assert.ok(ops.has("elementwise"), `families: ${[...ops]}`);
    console.log(`# ${rows.length} cases passed; families: ${[...ops].join(", ")}; adapter: ${name}`);
    console.log(`# ${await page.getByRole("status").innerText()}`);

    // The button runs it again.
    const run = page.getByRole("button", { name: "Run self-test" });
    assert.ok(await run.isEnabled(), "Run self-test is disabled after a run");
    await run.click();
    assert.equal(await finishedState(page), "passed", `second run: ${await describe(page)}`);
    assert.match(await page.getByRole("status").innerText(), /^All (\d+) of \1 cases passed/);

    assert.deepEqual(problems, [], "console errors, page errors or failed requests");
  } finally {
    await browser.close();
  }
});

test("without --enable-unsafe-webgpu the page explains that WebGPU is unavailable", { timeout: TIMEOUT_MS }, async () => {
  const { browser, page, problems } = await openApp({ webgpu: false });
  try {
    const state = await finishedState(page);
    assert.equal(state, "unavailable", `expected the WebGPU-unavailable explanation: ${await describe(page)}`);
    const alert = page.getByRole("alert").filter({ has: page.getByRole("heading", { name: "WebGPU unavailable" }) });
    assert.ok(await alert.isVisible(), "the WebGPU unavailable notice is not visible");
    const text = await alert.innerText();
    assert.match(text, /--enable-unsafe-webgpu/);
    assert.match(text, /chrome:\/\/flags\/#enable-unsafe-webgpu/);
    assert.ok(await page.getByRole("button", { name: "Run self-test" }).isDisabled(), "run button enabled");
    assert.equal((await resultRows(page)).length, 0, "results shown without WebGPU");
    // No uncaught errors or failed requests (Chrome's own adapter warnings are not errors).
    assert.deepEqual(problems.filter((p) => !p.startsWith("console.error")), []);
  } finally {
    await browser.close();
  }
});
