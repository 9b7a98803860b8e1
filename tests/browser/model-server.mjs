// A static file server for a model folder on 127.0.0.1, behaving like a model host towards the
// web app: CORS for any origin, single byte-range requests (206), HEAD, and a log of every
// request so tests can see what the app fetched.
import { createServer } from "node:http";
import { open, stat } from "node:fs/promises";
import { join, normalize, resolve, sep } from "node:path";

const CORS = {
  "access-control-allow-origin": "*",
  "access-control-expose-headers": "content-length, content-range, accept-ranges, etag",
  "cross-origin-resource-policy": "cross-origin",
};

/** Serves `dir`; resolves to {server, url, requests: [{method, path, range, status}]}. */
export async function serveModel(dir) {
  const root = resolve(dir);
  const requests = [];
  const server = createServer(async (req, res) => {
    const entry = { method: req.method, path: req.url, range: req.headers.range ?? null, status: 0 };
    requests.push(entry);
    const reply = (status, headers = {}, body = undefined) => {
      entry.status = status;
      res.writeHead(status, { ...CORS, ...headers });
      res.end(body);
    };
    try {
      if (req.method === "OPTIONS") {
        reply(204, {
          "access-control-allow-methods": "GET, HEAD, OPTIONS",
          "access-control-allow-headers": req.headers["access-control-request-headers"] ?? "range",
          "access-control-max-age": "600",
        });
        return;
      }
      const path = normalize(join(root, decodeURIComponent(new URL(req.url, "http://x").pathname)));
      if (path !== root && !path.startsWith(root + sep)) return reply(403, {}, "forbidden");
      const info = await stat(path).catch(() => null);
      if (!info?.isFile()) return reply(404, { "content-type": "text/plain" }, "not found");
      const size = info.size;
      let start = 0;
      let end = size - 1;
      let status = 200;
      const range = /^bytes=(\d*)-(\d*)$/.exec(req.headers.range ?? "");
      if (req.headers.range && !range) return reply(416, { "content-range": `bytes */${size}` });
      if (range) {
        if (range[1] === "") {
          start = Math.max(0, size - Number(range[2]));
        } else {
          start = Number(range[1]);
          end = range[2] === "" ? size - 1 : Math.min(Number(range[2]), size - 1);
        }
        if (start > end || start >= size) return reply(416, { "content-range": `bytes */${size}` });
        status = 206;
      }
      const headers = {
        "content-type": path.endsWith(".json") ? "application/json" : path.endsWith(".txt") ? "text/plain" : "application/octet-stream",
        "content-length": String(end - start + 1),
        "accept-ranges": "bytes",
        ...(status === 206 ? { "content-range": `bytes ${start}-${end}/${size}` } : {}),
      };
      if (req.method === "HEAD") return reply(status, headers);
      const fh = await open(path);
      try {
        const body = Buffer.alloc(end - start + 1);
        await fh.read(body, 0, body.length, start);
        reply(status, headers, body);
      } finally {
        await fh.close();
      }
    } catch (err) {
      reply(500, { "content-type": "text/plain" }, String(err));
    }
  });
  await new Promise((ok, fail) => {
    server.once("error", fail);
    server.listen(0, "127.0.0.1", ok);
  });
  return { server, url: `http://127.0.0.1:${server.address().port}/`, requests };
}
