// Work kept across reloads in this browser's Origin Private File System (the page's own storage;
// nothing here leaves the machine), until the user clears it:
//   session/gallery/<key>.png + <key>.json   generated images ({seed, width, height, ms, params})
//   session/loras/<key>.safetensors + <key>.json   adapter files as dropped ({name, te, unet, enabled})
//   session/model.json   the last model loaded from a URL ({url, weights}; its files are in the
//                        engine's model cache), loaded again on the next visit
// Keys start with the time they were saved, so names sort oldest first. Storage failures (no
// OPFS, quota) never stop the app: the work just is not kept, and `onError` hears why.

const ROOT = "session";
const GALLERY = "gallery";
const LORAS = "loras";

/** Called with a message when something could not be saved, read or deleted. */
export let onError = () => {};
export function setErrorHandler(f) {
  onError = f;
}

let counter = 0;
const newKey = () => `${String(Date.now()).padStart(14, "0")}-${String(counter++).padStart(4, "0")}`;

async function dir(name, create = true) {
  if (!navigator.storage?.getDirectory) return null;
  const root = await navigator.storage.getDirectory();
  const session = await root.getDirectoryHandle(ROOT, { create });
  return session.getDirectoryHandle(name, { create });
}

async function write(d, name, data) {
  const fh = await d.getFileHandle(name, { create: true });
  const w = await fh.createWritable();
  try {
    await w.write(data);
  } finally {
    await w.close();
  }
}

async function readJson(d, name) {
  return JSON.parse(await (await (await d.getFileHandle(name)).getFile()).text());
}

/** Keys of `d`'s `<key>.json` entries, oldest first. */
async function keys(d) {
  const out = [];
  for await (const [name, h] of d.entries()) {
    if (h.kind === "file" && name.endsWith(".json")) out.push(name.slice(0, -5));
  }
  return out.sort();
}

async function removeEntries(d, key, ext) {
  for (const name of [`${key}.json`, `${key}.${ext}`]) {
    await d.removeEntry(name).catch((e) => {
      if (e?.name !== "NotFoundError") throw e;
    });
  }
}

const guard = (what, f) => async (...args) => {
  try {
    return await f(...args);
  } catch (err) {
    onError(`${what}: ${err?.message ?? err}`);
    return null;
  }
};

// --- gallery ----------------------------------------------------------------------------------

/** Saves a generated image (`result`: blob, seed, width, height, ms, params); resolves to its key. */
export const saveImage = guard("Could not keep the image in this browser", async (result, keep) => {
  const d = await dir(GALLERY);
  if (!d) return null;
  const key = newKey();
  const { seed, width, height, ms, params } = result;
  await write(d, `${key}.png`, result.blob);
  await write(d, `${key}.json`, JSON.stringify({ seed, width, height, ms, params }));
  // Only the newest `keep` images stay (the gallery shows no more).
  const all = await keys(d);
  for (const old of all.slice(0, Math.max(0, all.length - keep))) await removeEntries(d, old, "png");
  return key;
});

/** The saved images, oldest first: [{key, blob, seed, width, height, ms, params}]. */
export const loadImages = guard("Could not read the saved images", async () => {
  const d = await dir(GALLERY);
  if (!d) return [];
  const out = [];
  for (const key of await keys(d)) {
    try {
      const meta = await readJson(d, `${key}.json`);
      const blob = await (await d.getFileHandle(`${key}.png`)).getFile();
      out.push({ key, blob: new Blob([blob], { type: "image/png" }), ...meta });
    } catch {
      // A half-written pair (the page closed mid-write): dropped.
      await removeEntries(d, key, "png").catch(() => {});
    }
  }
  return out;
});

/** Deletes every saved image. */
export const clearImages = guard("Could not delete the saved images", async () => {
  const root = navigator.storage?.getDirectory ? await navigator.storage.getDirectory() : null;
  const session = root && (await root.getDirectoryHandle(ROOT, { create: true }));
  await session?.removeEntry(GALLERY, { recursive: true }).catch((e) => {
    if (e?.name !== "NotFoundError") throw e;
  });
  return true;
});

// --- adapters ---------------------------------------------------------------------------------

/** Keeps an adapter's file and strengths (`a`: {name, te, unet, enabled}); resolves to its key. */
export const saveLora = guard("Could not keep the adapter in this browser", async (file, a) => {
  const d = await dir(LORAS);
  if (!d) return null;
  const key = newKey();
  await write(d, `${key}.safetensors`, file);
  await write(d, `${key}.json`, JSON.stringify({ name: file.name, te: a.te, unet: a.unet, enabled: a.enabled }));
  return key;
});

const pending = new Map();

/** Records an adapter's strengths (writes merge: the newest values land within 300 ms). */
export function updateLora(key, a) {
  if (!key) return;
  clearTimeout(pending.get(key));
  pending.set(key, setTimeout(guard("Could not keep the adapter's strength", async () => {
    pending.delete(key);
    const d = await dir(LORAS);
    const meta = await readJson(d, `${key}.json`);
    await write(d, `${key}.json`, JSON.stringify({ ...meta, te: a.te, unet: a.unet, enabled: a.enabled }));
  }), 300));
}

/** Forgets an adapter (file and strengths). */
export const removeLora = guard("Could not delete the saved adapter", async (key) => {
  if (!key) return null;
  clearTimeout(pending.get(key));
  pending.delete(key);
  const d = await dir(LORAS);
  if (d) await removeEntries(d, key, "safetensors");
  return true;
});

/** The saved adapters, in the order they were added: [{key, file, te, unet, enabled}]. */
export const loadLoras = guard("Could not read the saved adapters", async () => {
  const d = await dir(LORAS);
  if (!d) return [];
  const out = [];
  for (const key of await keys(d)) {
    try {
      const meta = await readJson(d, `${key}.json`);
      const stored = await (await d.getFileHandle(`${key}.safetensors`)).getFile();
      const file = new File([stored], meta.name, { type: stored.type });
      out.push({ key, file, te: Number(meta.te ?? 1), unet: Number(meta.unet ?? 1), enabled: meta.enabled !== false });
    } catch {
      await removeEntries(d, key, "safetensors").catch(() => {});
    }
  }
  return out;
});

// --- the model ---------------------------------------------------------------------------------

/** Remembers the model loaded from `url` (null: forget it, e.g. the demo model or files loaded). */
export const saveLastModel = guard("Could not remember the model", async (url, weights) => {
  if (!navigator.storage?.getDirectory) return null;
  const session = await (await navigator.storage.getDirectory()).getDirectoryHandle(ROOT, { create: true });
  if (url) {
    await write(session, "model.json", JSON.stringify({ url, weights }));
  } else {
    await session.removeEntry("model.json").catch((e) => {
      if (e?.name !== "NotFoundError") throw e;
    });
  }
  return true;
});

/** The last model loaded from a URL ({url, weights}) or null. */
export async function lastModel() {
  try {
    const session = await (await navigator.storage.getDirectory()).getDirectoryHandle(ROOT);
    return await readJson(session, "model.json");
  } catch {
    return null;
  }
}
