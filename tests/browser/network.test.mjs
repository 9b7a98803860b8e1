// No stray network traffic and no code from strings, in the system Chromium on WebGPU:
// - every request of a full session (open with the demo model, a model from a URL on a second
//   local origin, an adapter, an image) goes to the page's own origin or below the URL the user
//   typed, and nothing else;
// - the Content-Security-Policy is in the page and, as a header, on every response (the Workers
//   follow only the header); it blocks a fetch to any other origin from the page and from the
//   engine's Worker, strings run as code in both (reported as `script-src eval` violations), and
//   inline scripts;
// - no `eval`, `new Function`, string timers, `innerHTML` or inline handlers in www/.
//
//   node --test network.test.mjs
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { join, relative } from "node:path";
import { describe, launch, openApp, repo, serveApp, waitAttr, modelLoaded as waitModel } from "./harness.mjs";
import { serveModel } from "./model-server.mjs";

const TIMEOUT_MS = Number(process.env.APP_TIMEOUT_MS ?? 300_000);
const fixtures = join(repo, "tests/fixtures");
/** An origin no policy allows (plain HTTP, not this machine); `.invalid` never resolves. */
const ELSEWHERE = "http://elsewhere.invalid";

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

const modelLoaded = (page, what) => waitModel(page, what, TIMEOUT_MS);

/**
 * What a context (page or Worker) may do: fetch from another origin, run a string as code. Code
 * that DevTools evaluates (as `evaluate` does) is exempt from the eval rule, so the string runs
 * from a timer, as page code would; the policy's violation reports are collected too.
 */
function probe(where) {
  return where.evaluate(async (elsewhere) => {
    const g = globalThis;
    const violations = [];
    const record = (e) => violations.push(`${e.effectiveDirective} ${e.blockedURI}`);
    g.addEventListener("securitypolicyviolation", record);
    const out = {};
    try {
      await fetch(`${elsewhere}/model_index.json`);
      out.fetch = "allowed";
    } catch (e) {
      out.fetch = e.name;
    }
    g.stringRan = false;
    try {
      setTimeout("globalThis.stringRan = true", 0); // the string form runs code from text
    } catch (e) {
      out.timerError = e.name;
    }
    try {
      new Function("return 1"); // eslint-disable-line no-new-func
    } catch (e) {
      out.functionError = e.name;
    }
    await new Promise((ok) => setTimeout(ok, 300));
    out.stringRan = g.stringRan;
    g.removeEventListener("securitypolicyviolation", record);
    out.connect = violations.some((v) => v.startsWith(`connect-src ${elsewhere}`));
    out.eval = violations.filter((v) => v === "script-src eval").length;
    return out;
  }, ELSEWHERE);
}

test("a full session contacts only the page's origin and the model URL typed; the CSP forbids the rest", { timeout: TIMEOUT_MS * 3 }, async () => {
  const { page, requests } = session;
  await modelLoaded(page, "the demo model");

  // A model from a URL on a second origin, an adapter, an image.
  const host = await serveModel(join(fixtures, "models/tiny-sd15-a"));
  const typed = `${host.url}`;
  session.allowed.add(new URL(typed).origin);
  try {
    await page.getByRole("textbox", { name: "Model URL" }).fill(typed);
    await page.getByRole("button", { name: "Load from URL" }).click();
    await modelLoaded(page, `the model at ${typed}`);
    await page.getByLabel("Add LoRA").setInputFiles(join(fixtures, "lora/kohya.safetensors"));
    await page.waitForFunction(() => ["ready", "error"].includes(document.querySelector("#lora-cards > li")?.dataset.state), null, { timeout: TIMEOUT_MS });
    assert.equal(await page.getAttribute("#lora-cards > li", "data-state"), "ready", await page.locator("#lora-cards").innerText());
    await page.getByRole("spinbutton", { name: "Steps", exact: true }).fill("2");
    await page.getByRole("button", { name: "Generate", exact: true }).click();
    const out = await waitAttr(page, "#output", "data-state", ["done", "error"], TIMEOUT_MS);
    assert.equal(out, "done", await describe(page));
  } finally {
    host.server.closeAllConnections?.();
    await new Promise((ok) => host.server.close(ok));
  }

  // Every request: the page's origin, or below the URL typed.
  const outside = requests.filter((u) => !/^(blob|data):/.test(u) && new URL(u).origin !== app.origin && !u.startsWith(typed));
  assert.deepEqual(outside, [], `requests elsewhere:\n${outside.join("\n")}`);
  assert.ok(requests.some((u) => u.startsWith(typed)), "the model URL was never contacted");
  assert.ok(host.requests.every((r) => r.path.startsWith("/")), JSON.stringify(host.requests));
  assert.deepEqual(session.problems, [], session.problems.join("\n"));

  // The policy: in the page, and as a header on the page and the Worker's script.
  const meta = await page.getAttribute('meta[http-equiv="Content-Security-Policy"]', "content");
  const directives = Object.fromEntries(meta.split(";").map((d) => d.trim().split(/\s+/)).map(([k, ...v]) => [k, v]));
  assert.deepEqual(directives["default-src"], ["'self'"]);
  assert.deepEqual(directives["script-src"], ["'self'", "'wasm-unsafe-eval'"]);
  assert.deepEqual(directives["worker-src"], ["'self'"]);
  assert.deepEqual(directives["object-src"], ["'none'"]);
  assert.ok(!meta.includes("'unsafe-eval'") && !meta.includes("'unsafe-inline'"), meta);
  for (const path of ["/", "/worker.js", "/loralab-web.js"]) {
    const header = (await fetch(`${app.origin}${path}`)).headers.get("content-security-policy");
    assert.equal(header, `${meta}; frame-ancestors 'none'`, path);
  }

  // It blocks the rest: other origins and strings run as code, in the page and in the Worker.
  const before = requests.length;
  for (const [what, where] of [["page", page], ["worker", page.workers().find((w) => w.url().endsWith("/worker.js"))]]) {
    assert.ok(where, `no engine worker among ${page.workers().map((w) => w.url())}`);
    const r = await probe(where);
    assert.equal(r.fetch, "TypeError", `${what}: ${JSON.stringify(r)}`);
    assert.equal(r.connect, true, `${what}: no connect-src violation reported: ${JSON.stringify(r)}`);
    assert.equal(r.stringRan, false, `${what}: a string timer ran: ${JSON.stringify(r)}`);
    assert.ok(r.eval >= 1, `${what}: no script-src eval violation reported: ${JSON.stringify(r)}`);
  }
  assert.deepEqual(requests.slice(before), [], "blocked requests went out");
  // An injected inline script does not run.
  const ran = await page.evaluate(async () => {
    const s = document.createElement("script");
    s.textContent = "window.injected = true";
    document.head.append(s);
    await new Promise((ok) => setTimeout(ok, 100));
    return window.injected === true;
  });
  assert.equal(ran, false, "an inline script ran");
  // The blocked attempts are the only console errors.
  const rest = session.problems.filter((p) => !/Content Security Policy|Refused to|elsewhere\.invalid/.test(p));
  assert.deepEqual(rest, [], rest.join("\n"));
});

/** Files under `dir` ending in `.js`/`.mjs`/`.html`, skipping the model and dataset folders. */
function sources(dir) {
  const out = [];
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) {
      if (!["models", "datasets", "adapters"].includes(name)) out.push(...sources(path));
    } else if (/\.(m?js|html)$/.test(name)) {
      out.push(path);
    }
  }
  return out;
}

test("www/ has no eval, new Function, string timers, innerHTML or inline handlers", () => {
  const pattern = /\beval\s*\(|\bnew\s+Function\b|\bFunction\s*\(|\bset(?:Timeout|Interval)\s*\(\s*["'`]|\.innerHTML\s*=|\bon[a-z]+\s*=\s*["']/;
  const files = sources(join(repo, "www"));
  assert.ok(files.length > 10, `only ${files.length} files under www/`);
  const hits = [];
  for (const f of files) {
    readFileSync(f, "utf8").split("\n").forEach((line, i) => {
      if (pattern.test(line)) hits.push(`${relative(repo, f)}:${i + 1}: ${line.trim()}`);
    });
  }
  assert.deepEqual(hits, [], hits.join("\n"));
});
