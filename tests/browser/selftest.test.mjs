// Browser test of the engine foundation: the system Chromium opens dist/ over http://127.0.0.1,
// the engine opens WebGPU in its Worker (SwiftShader on a machine without a GPU), and the kernel
// self-test of the Device panel passes every case with a clean console.
// Negative control: without --enable-unsafe-webgpu the page must explain that WebGPU is
// unavailable. A missing adapter in the positive run FAILS the test; it never skips.
//
//   npm test                      (uses dist/; builds it with `trunk build --release` if absent)
//   CHROMIUM=/path/to/chrome npm test
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { describe, launch, openApp, screenshot, serveApp, waitAttr } from "./harness.mjs";

const TIMEOUT_MS = Number(process.env.SELFTEST_TIMEOUT_MS ?? 180_000);
const STARTED = ["ready", "unavailable", "error"];
const FINISHED = ["passed", "failed", "error"];

let app;
before(async () => { app = await serveApp(); });
after(() => app?.server.close());

/** Result cells of the results table, one array of cell texts per body row. */
async function resultRows(page) {
  const table = page.getByRole("table", { name: "Self-test results" });
  await table.waitFor({ state: "attached" });
  const rows = table.locator("tbody").getByRole("row");
  return rows.evaluateAll((trs) => trs.map((tr) => [...tr.cells].map((td) => td.innerText.trim())));
}

test("self-test passes on WebGPU with adapter info and a clean console", { timeout: TIMEOUT_MS * 3 }, async () => {
  const browser = await launch({ webgpu: true });
  try {
    const { page, problems } = await openApp(browser, app.origin);
    const state = await waitAttr(page, "html", "data-state", STARTED, TIMEOUT_MS);
    assert.equal(state, "ready", `the engine did not start: ${await describe(page)}`);

    // Device panel: the backend is the browser's WebGPU and the adapter is named.
    const device = page.getByRole("region", { name: "Device" });
    const info = await device.getByRole("definition").first().evaluate((dd) => dd.parentElement.innerText);
    assert.match(info, /Backend\s+BrowserWebGpu/, info);
    assert.match(info, /shader-f16\s+(yes|no)/, info);
    const name = await device.getByRole("definition").first().innerText();
    assert.ok(name && !/not reported|Opening/.test(name), `adapter name missing: ${info}`);

    const run = device.getByRole("button", { name: "Run self-test" });
    await run.click();
    const result = await waitAttr(page, "#device", "data-selftest", FINISHED, TIMEOUT_MS);
    const status = await device.getByRole("status").innerText();
    assert.equal(result, "passed", `self-test did not pass: ${status}; ${await describe(page)}`);
    assert.equal(await page.getByRole("alert").filter({ visible: true }).count(), 0, "an alert is shown");

    const rows = await resultRows(page);
    assert.ok(rows.length >= 10, `only ${rows.length} result rows`);
    const failed = rows.filter((r) => r[0] !== "pass");
    assert.deepEqual(failed, [], "failed cases");
    const ops = new Set(rows.map((r) => r[1].split(".")[0]));
    assert.ok(ops.has("elementwise"), `families: ${[...ops]}`);
    console.log(`# ${rows.length} cases passed; families: ${[...ops].join(", ")}; adapter: ${name}`);
    console.log(`# ${status}`);
    await device.scrollIntoViewIfNeeded();
    await screenshot(page, "selftest-passed");

    // The button runs it again.
    assert.ok(await run.isEnabled(), "Run self-test is disabled after a run");
    await run.click();
    assert.equal(await waitAttr(page, "#device", "data-selftest", FINISHED, TIMEOUT_MS), "passed", `second run: ${await describe(page)}`);
    assert.match(await device.getByRole("status").innerText(), /^All (\d+) of \1 cases passed/);

    assert.deepEqual(problems, [], "console errors, page errors or failed requests");
  } finally {
    await browser.close();
  }
});

test("without --enable-unsafe-webgpu the page explains that WebGPU is unavailable", { timeout: TIMEOUT_MS }, async () => {
  const browser = await launch({ webgpu: false });
  try {
    const { page, problems } = await openApp(browser, app.origin);
    const state = await waitAttr(page, "html", "data-state", STARTED, TIMEOUT_MS);
    assert.equal(state, "unavailable", `expected the WebGPU-unavailable explanation: ${await describe(page)}`);
    const alert = page.getByRole("alert").filter({ has: page.getByRole("heading", { name: "WebGPU unavailable" }) });
    assert.ok(await alert.isVisible(), "the WebGPU unavailable notice is not visible");
    const text = await alert.innerText();
    assert.match(text, /--enable-unsafe-webgpu/);
    assert.match(text, /chrome:\/\/flags\/#enable-unsafe-webgpu/);
    assert.ok(await page.getByRole("button", { name: "Run self-test" }).isDisabled(), "run button enabled");
    assert.ok(await page.getByRole("button", { name: "Generate" }).isDisabled(), "Generate enabled without WebGPU");
    assert.equal((await resultRows(page)).length, 0, "results shown without WebGPU");
    await screenshot(page, "webgpu-unavailable");
    // No uncaught errors or failed requests (Chrome's own adapter warnings are not errors).
    assert.deepEqual(problems.filter((p) => !p.includes("console.error")), []);
  } finally {
    await browser.close();
  }
});
