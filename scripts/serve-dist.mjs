// A tiny static file server for dist/ (no dependencies). Used by scripts/serve.sh and the
// browser test.   node scripts/serve-dist.mjs [dir] [port] [host]
import { createServer } from "node:http";
import { readFile, stat } from "node:fs/promises";
import { extname, join, normalize, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";

const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".wasm": "application/wasm",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".json": "application/json",
  ".safetensors": "application/octet-stream",
};

/**
 * The Content-Security-Policy of the page's `<meta>` in `dir`/index.html, sent as a header on
 * every response: Workers follow only the header (the meta covers the page alone), and
 * `frame-ancestors` works only there. Null when the page has none.
 */
export async function pagePolicy(dir) {
  const html = await readFile(join(dir, "index.html"), "utf8").catch(() => "");
  const m = /<meta http-equiv="Content-Security-Policy" content="([^"]+)"/.exec(html);
  return m ? `${m[1]}; frame-ancestors 'none'` : null;
}

/** Serves `dir` on host:port (port 0 picks a free one); resolves to the listening server. */
export async function serve(dir, port = 8080, host = "127.0.0.1") {
  const root = resolve(dir);
  const csp = await pagePolicy(root);
  const server = createServer(async (req, res) => {
    try {
      const url = new URL(req.url, "http://x");
      let path = normalize(join(root, decodeURIComponent(url.pathname)));
      if (path !== root && !path.startsWith(root + sep)) {
        res.writeHead(403).end("forbidden");
        return;
      }
      if ((await stat(path).catch(() => null))?.isDirectory()) path = join(path, "index.html");
      const body = await readFile(path);
      res.writeHead(200, {
        "content-type": TYPES[extname(path)] ?? "application/octet-stream",
        "cache-control": "no-cache",
        // Cross-origin isolation, so SharedArrayBuffer and precise timers are available later.
        "cross-origin-opener-policy": "same-origin",
        "cross-origin-embedder-policy": "require-corp",
        ...(csp ? { "content-security-policy": csp } : {}),
      });
      res.end(req.method === "HEAD" ? undefined : body);
    } catch {
      res.writeHead(404, { "content-type": "text/plain" }).end("not found");
    }
  });
  return new Promise((ok, fail) => {
    server.once("error", fail);
    server.listen(port, host, () => ok(server));
  });
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const [dir = "dist", port = process.env.PORT ?? "8080", host = process.env.HOST ?? "127.0.0.1"] =
    process.argv.slice(2);
  const server = await serve(dir, Number(port), host);
  const a = server.address();
  console.log(`serving ${resolve(dir)} at http://${a.address}:${a.port}/  (Ctrl-C to stop)`);
}
