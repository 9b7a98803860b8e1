#!/usr/bin/env node
// loralab vs onnxruntime-web in the same headless Chromium page, one command:
//
//   node tools/bench/browser.mjs [--models demo,mid] [--runs 5] [--warmup 2] [--no-f16]
//                                [--no-t2i] [--scaling] [--no-build] [--no-export] [--out FILE]
//
// --scaling adds loralab alone on the demo UNet at 8x8, 16x16 and 32x32 latents (fixed
// per-step cost against compute); --models "" skips the side-by-side models.
//
// 1. exports the UNets to ONNX if missing (tools/bench/export_onnx.py, in the fixtures venv:
//    $LORALAB_VENV or ~/.cache/loralab/fixtures-venv) into ~/.cache/loralab/bench-onnx/;
// 2. installs onnxruntime-web into tools/bench/node_modules if missing (npm ci);
// 3. builds the web app with `trunk build --release --dist ~/.cache/loralab/bench-onnx/dist`
//    (the repository's dist/ is left alone);
// 4. serves tools/bench/web/ with the app build, onnxruntime-web and the models next to it
//    (scripts/serve-dist.mjs, the tests' server) and opens it in the system Chromium
//    (tests/browser/harness.mjs' launch: headless, --enable-unsafe-webgpu);
// 5. prints the page's JSON report and writes it to docs/bench/<UTC date>-swiftshader-onnx.json
//    (or --out).
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { cpus, homedir, totalmem } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { launch } from "../../tests/browser/harness.mjs";
import { serve } from "../../scripts/serve-dist.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../..");
const cache = process.env.LORALAB_BENCH_DIR ?? join(homedir(), ".cache/loralab/bench-onnx");
const venv = process.env.LORALAB_VENV ?? join(homedir(), ".cache/loralab/fixtures-venv");

function parseArgs(argv) {
  const o = { models: ["demo", "mid"], runs: 5, warmup: 2, f16: true, t2i: true, scaling: false, build: true, export: true, out: null };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === "--models") o.models = next().split(",").map((s) => s.trim()).filter(Boolean);
    else if (a === "--runs") o.runs = Number(next());
    else if (a === "--warmup") o.warmup = Number(next());
    else if (a === "--no-f16") o.f16 = false;
    else if (a === "--no-t2i") o.t2i = false;
    else if (a === "--scaling") o.scaling = true;
    else if (a === "--no-build") o.build = false;
    else if (a === "--no-export") o.export = false;
    else if (a === "--out") o.out = next();
    else if (a === "-h" || a === "--help") {
      console.log("usage: node tools/bench/browser.mjs [--models demo,mid] [--runs N] [--warmup N] [--no-f16] [--no-t2i] [--scaling] [--no-build] [--no-export] [--out FILE]");
      process.exit(0);
    } else throw new Error(`unknown argument ${a} (see --help)`);
  }
  if (!(o.runs >= 1 && o.warmup >= 0)) throw new Error("--runs must be ≥ 1 and --warmup ≥ 0");
  if (o.models.length === 0 && !o.scaling && !o.t2i) throw new Error("nothing to run");
  for (const m of o.models) if (!["demo", "mid"].includes(m)) throw new Error(`unknown model ${m}: expected demo or mid`);
  return o;
}

const log = (m) => console.error(`# ${m}`);

function run(cmd, args, opts = {}) {
  log(`${cmd} ${args.join(" ")}`);
  execFileSync(cmd, args, { stdio: ["ignore", process.stderr, process.stderr], ...opts });
}

function prepare(o) {
  if (o.export) {
    const python = join(venv, "bin/python");
    if (!existsSync(python)) {
      throw new Error(`no Python environment at ${venv}: create it as tools/fixtures/README.md says, then ` +
        `pip install -r tools/bench/requirements.txt (or set LORALAB_VENV)`);
    }
    run(python, [join(here, "export_onnx.py"), "--out", cache, "--models", [...new Set([...o.models, ...(o.scaling ? ["demo"] : [])])].join(","), ...(o.f16 ? ["--f16"] : [])], { cwd: repo });
  }
  const needed = [...new Set([...o.models, ...(o.scaling ? ["demo"] : [])])];
  for (const m of needed) {
    if (!existsSync(join(cache, m, "meta.json"))) throw new Error(`${join(cache, m)} has no meta.json: run without --no-export`);
  }
  if (!existsSync(join(here, "node_modules/onnxruntime-web/dist/ort.webgpu.min.mjs"))) {
    run("npm", ["ci", "--no-audit", "--no-fund"], { cwd: here });
  }
  const dist = join(cache, "dist");
  if (o.build || !existsSync(join(dist, "loralab-web.js"))) {
    run("trunk", ["build", "--release", "--dist", dist], { cwd: repo });
  }
  // The site: the page's files, the app build, onnxruntime-web and the exported models.
  const site = join(cache, "site");
  rmSync(site, { recursive: true, force: true });
  mkdirSync(join(site, "models"), { recursive: true });
  for (const f of ["index.html", "bench.js", "bench-worker.js"]) symlinkSync(join(here, "web", f), join(site, f));
  symlinkSync(dist, join(site, "app"));
  symlinkSync(join(here, "node_modules/onnxruntime-web/dist"), join(site, "ort"));
  for (const m of needed) symlinkSync(join(cache, m), join(site, "models", m));
  return site;
}

async function main() {
  const o = parseArgs(process.argv.slice(2));
  const site = prepare(o);
  const server = await serve(site, 0);
  const origin = `http://127.0.0.1:${server.address().port}`;
  const browser = await launch({ webgpu: true });
  const messages = [];
  try {
    const page = await (await browser.newContext()).newPage();
    const keep = (where) => (m) => {
      if (m.type() === "error" || m.type() === "warning") messages.push(`${where} ${m.type()}: ${m.text()}`.slice(0, 400));
      if (m.text().startsWith("[bench]")) log(m.text().slice(8));
    };
    page.on("console", keep("page"));
    page.on("worker", (w) => w.on("console", keep("worker")));
    page.on("pageerror", (e) => messages.push(`uncaught: ${e.message}`));
    await page.goto(`${origin}/`);
    await page.waitForFunction(() => typeof window.runBench === "function", null, { timeout: 60_000 });
    const t0 = Date.now();
    const report = await page.evaluate((opts) => window.runBench(opts), {
      models: o.models, runs: o.runs, warmup: o.warmup, f16: o.f16,
      scaling: o.scaling ? { sizes: [8, 16, 32], runs: 3, warmup: 1 } : null,
      t2i: o.t2i ? { weights: ["f32", "f16"], runs: 3, warmup: 1, steps: 20, cfg: 5 } : null,
    });
    const now = new Date();
    const full = {
      date: now.toISOString(),
      command: `node tools/bench/browser.mjs ${process.argv.slice(2).join(" ")}`.trim(),
      browser: `Chromium ${browser.version()} (headless, --enable-unsafe-webgpu)`,
      machine: { cpus: cpus().length, cpu_model: cpus()[0]?.model ?? null, memory_gb: Math.round(totalmem() / 1e9) },
      wall_s: Math.round((Date.now() - t0) / 1000),
      ...report,
      // onnxruntime-web's own warnings (e.g. nodes it placed on the CPU) and any page errors.
      console: messages.filter((m) => !/Failed to load resource: the server responded with a status of 404/.test(m)),
    };
    const text = JSON.stringify(full, null, 2);
    console.log(text);
    const out = o.out ?? join(repo, "docs/bench", `${now.toISOString().slice(0, 10)}-swiftshader-onnx.json`);
    mkdirSync(dirname(out), { recursive: true });
    writeFileSync(out, text + "\n");
    log(`report written to ${out}`);
    for (const m of full.models) {
      log(`${m.model}: loralab ${m.loralab.median_ms} ms, onnxruntime-web ${m.onnxruntime_web.median_ms} ms, ratio ${m.ratio} (goal ≤ 0.7)`);
    }
  } finally {
    await browser.close();
    server.close();
  }
}

main().catch((e) => {
  console.error(`error: ${e.message}`);
  process.exit(1);
});
