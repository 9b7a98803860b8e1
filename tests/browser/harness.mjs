// What the browser tests share: dist/ (built with trunk if absent) served on 127.0.0.1, the system
// Chromium launched headless (never a downloaded browser), and a page that records everything a
// clean run must not have: console errors (page and worker), uncaught errors, failed requests,
// HTTP errors and requests to origins other than the allowed ones.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { serve } from "../../scripts/serve-dist.mjs";

export const repo = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
export const dist = process.env.LORALAB_DIST ?? join(repo, "dist");
export const artifacts = join(repo, "tests/browser/artifacts");
const executablePath = process.env.CHROMIUM ?? "/usr/lib/chromium/chromium";

// The launch that works headless on a machine without a GPU (../shared notes, README).
const BASE_ARGS = [
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
  "--disable-quic",
  "--disable-dev-shm-usage",
  ...(process.getuid?.() === 0 ? ["--no-sandbox"] : []),
];

/** Serves dist/ (building it first if it has no index.html); resolves to {server, origin}. */
export async function serveApp() {
  if (!existsSync(join(dist, "index.html"))) {
    console.log(`# ${dist} has no index.html: running trunk build --release`);
    execFileSync("trunk", ["build", "--release"], { cwd: repo, stdio: "inherit" });
  }
  assert.ok(existsSync(executablePath), `no Chromium at ${executablePath} (apt-get install chromium, or set CHROMIUM)`);
  const server = await serve(dist, 0);
  return { server, origin: `http://127.0.0.1:${server.address().port}` };
}

export function launch({ webgpu }) {
  return chromium.launch({
    executablePath,
    headless: true,
    args: [...BASE_ARGS, ...(webgpu ? ["--enable-unsafe-webgpu"] : [])],
  });
}

/**
 * Opens `origin` in a new context of `browser`. `problems` collects what a clean run must not
 * have; `allowed` is the set of origins requests may go to (more can be added later);
 * `requests` lists every request URL. `path` is the page's path and fragment (`/#classroom/…`).
 */
export async function openApp(browser, origin, { viewport = { width: 1280, height: 800 }, path = "/" } = {}) {
  const context = await browser.newContext({ viewport, acceptDownloads: true });
  const page = await context.newPage();
  const problems = [];
  const requests = [];
  const allowed = new Set([origin]);
  const watch = (target, where) => {
    target.on("console", (m) => {
      if (m.type() === "error") problems.push(`${where} console.error: ${m.text()}`);
    });
  };
  watch(page, "page");
  page.on("pageerror", (e) => problems.push(`uncaught: ${e.message}`));
  page.on("worker", (w) => watch(w, "worker"));
  context.on("request", (r) => {
    const url = r.url();
    requests.push(url);
    if (/^(blob|data):/.test(url)) return;
    const o = new URL(url).origin;
    if (!allowed.has(o)) problems.push(`request to another origin: ${url}`);
  });
  context.on("requestfailed", (r) => {
    // The browser's own icon fetch is cancelled when a reload replaces the page; not the app's.
    if (new URL(r.url()).pathname === "/favicon.svg" && r.failure()?.errorText === "net::ERR_ABORTED") return;
    problems.push(`request failed: ${r.url()} ${r.failure()?.errorText}`);
  });
  context.on("response", (r) => {
    if (r.status() >= 400) problems.push(`HTTP ${r.status()}: ${r.url()}`);
  });
  await page.goto(`${origin}${path}`);
  return { context, page, problems, requests, allowed };
}

/** Waits until `selector`'s attribute is one of `values`; returns it. */
export async function waitAttr(page, selector, attr, values, timeout) {
  await page.waitForFunction(
    ([s, a, v]) => v.includes(document.querySelector(s)?.getAttribute(a)),
    [selector, attr, values],
    { timeout, polling: 100 },
  );
  return page.getAttribute(selector, attr);
}

/** A page summary for assertion messages. */
export async function describe(page) {
  return page.evaluate(() => {
    const text = (id) => document.getElementById(id)?.innerText.trim() ?? "";
    const shown = (id) => (document.getElementById(id)?.hidden === false ? text(id) : "");
    return `state=${document.documentElement.dataset.state}; engine="${text("engine-status")}"; ` +
      `model=${document.getElementById("model")?.dataset.state} "${text("model-current")}" ${shown("model-error")}; ` +
      `output=${document.getElementById("output")?.dataset.state} "${text("gen-status")}" ${shown("gen-error")}; ` +
      `unavailable="${shown("unavailable-message")}"; error="${shown("error-message")}"`;
  });
}

/** Waits until the engine has started and the model panel has loaded `what` (asserts both). */
export async function modelLoaded(page, what, timeout) {
  const state = await waitAttr(page, "html", "data-state", ["ready", "unavailable", "error"], timeout);
  assert.equal(state, "ready", `the engine did not start: ${await describe(page)}`);
  const model = await waitAttr(page, "#model", "data-state", ["loaded", "error"], timeout);
  assert.equal(model, "loaded", `${what} did not load: ${await describe(page)}`);
}

/** Saves a full-page screenshot under tests/browser/artifacts/. */
export async function screenshot(page, name) {
  mkdirSync(artifacts, { recursive: true });
  await page.screenshot({ path: join(artifacts, `${name}.png`), fullPage: true });
}
