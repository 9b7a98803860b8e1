// A small PNG reader for the browser tests: 8-bit greyscale / RGB / grey+alpha / RGBA,
// non-interlaced (what the engine writes), with the text chunks (tEXt, zTXt, iTXt; iTXt also
// with its flags, as XMP packets need them), the chunk order, and every chunk's CRC checked.
import { crc32, inflateSync } from "node:zlib";

const SIGNATURE = Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]);
const CHANNELS = { 0: 1, 2: 3, 4: 2, 6: 4 };

/**
 * Decodes `bytes`: {width, height, channels, pixels (Uint8Array, row-major), text: {key: value},
 * itxt: {key: {compressed, language, translated, text}}, chunks: [type, …]}.
 */
export function readPng(bytes) {
  const buf = Buffer.from(bytes);
  if (!buf.subarray(0, 8).equals(SIGNATURE)) throw new Error("not a PNG (bad signature)");
  let pos = 8;
  let header = null;
  const idat = [];
  const text = {};
  const itxt = {};
  const chunks = [];
  while (pos + 12 <= buf.length) {
    const len = buf.readUInt32BE(pos);
    const type = buf.toString("latin1", pos + 4, pos + 8);
    const data = buf.subarray(pos + 8, pos + 8 + len);
    if (pos + 12 + len > buf.length) throw new Error(`chunk ${type} runs past the end`);
    if (crc32(buf.subarray(pos + 4, pos + 8 + len)) !== buf.readUInt32BE(pos + 8 + len)) throw new Error(`chunk ${type}: bad CRC`);
    chunks.push(type);
    pos += 12 + len;
    if (type === "IHDR") {
      header = {
        width: data.readUInt32BE(0), height: data.readUInt32BE(4), depth: data[8], color: data[9], interlace: data[12],
      };
    } else if (type === "IDAT") {
      idat.push(data);
    } else if (type === "tEXt") {
      const z = data.indexOf(0);
      text[data.toString("latin1", 0, z)] = data.toString("latin1", z + 1);
    } else if (type === "zTXt") {
      const z = data.indexOf(0);
      text[data.toString("latin1", 0, z)] = inflateSync(data.subarray(z + 2)).toString("latin1");
    } else if (type === "iTXt") {
      // keyword \0 compression flag, method, language tag \0 translated keyword \0 text
      const z = data.indexOf(0);
      const compressed = data[z + 1] === 1;
      const langEnd = data.indexOf(0, z + 3);
      const transEnd = data.indexOf(0, langEnd + 1);
      const body = data.subarray(transEnd + 1);
      const keyword = data.toString("latin1", 0, z);
      text[keyword] = (compressed ? inflateSync(body) : body).toString("utf8");
      itxt[keyword] = {
        compressed,
        language: data.toString("latin1", z + 3, langEnd),
        translated: data.toString("utf8", langEnd + 1, transEnd),
        text: text[keyword],
      };
    } else if (type === "IEND") {
      break;
    }
  }
  if (!header) throw new Error("PNG without IHDR");
  const channels = CHANNELS[header.color];
  if (header.depth !== 8 || !channels || header.interlace !== 0) {
    throw new Error(`unsupported PNG: depth ${header.depth}, colour type ${header.color}, interlace ${header.interlace}`);
  }
  const { width, height } = header;
  const raw = inflateSync(Buffer.concat(idat));
  const stride = width * channels;
  if (raw.length !== height * (stride + 1)) throw new Error(`PNG data is ${raw.length} bytes, expected ${height * (stride + 1)}`);
  const pixels = new Uint8Array(height * stride);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)];
    const line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    const out = pixels.subarray(y * stride, (y + 1) * stride);
    const prev = y > 0 ? pixels.subarray((y - 1) * stride, y * stride) : new Uint8Array(stride);
    for (let i = 0; i < stride; i++) {
      const a = i >= channels ? out[i - channels] : 0;
      const b = prev[i];
      const c = i >= channels ? prev[i - channels] : 0;
      let v;
      switch (filter) {
        case 0: v = 0; break;
        case 1: v = a; break;
        case 2: v = b; break;
        case 3: v = (a + b) >> 1; break;
        case 4: {
          const p = a + b - c;
          const pa = Math.abs(p - a);
          const pb = Math.abs(p - b);
          const pc = Math.abs(p - c);
          v = pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
          break;
        }
        default: throw new Error(`PNG row ${y}: unknown filter ${filter}`);
      }
      out[i] = (line[i] + v) & 255;
    }
  }
  return { width, height, channels, pixels, text, itxt, chunks };
}

/** How two decoded images differ: {equal, maxDiff, meanDiff}. */
export function comparePixels(a, b) {
  if (a.width !== b.width || a.height !== b.height || a.channels !== b.channels) {
    return { equal: false, maxDiff: Infinity, meanDiff: Infinity };
  }
  let max = 0;
  let sum = 0;
  for (let i = 0; i < a.pixels.length; i++) {
    const d = Math.abs(a.pixels[i] - b.pixels[i]);
    if (d > max) max = d;
    sum += d;
  }
  return { equal: max === 0, maxDiff: max, meanDiff: sum / a.pixels.length };
}
