// The training panel's dataset: images (picked, dropped, or a bundled concept dataset) with
// their captions — from `.txt` / `.caption` files beside them (same name) or typed into the
// caption field of each image. Nothing is read here but the caption texts; the engine reads
// the images once when training starts.
import { $, el, bytes, ext } from "./dom.js";

const IMAGE_EXT = new Set(["png", "jpg", "jpeg", "jpe", "jfif", "webp"]);
const CAPTION_EXT = new Set(["txt", "caption"]);

/** The concept datasets that ship with the page (www/datasets/<name>/000.png + 000.txt …). */
export const BUNDLED = {
  heart: { count: 20, trigger: "sks", class: "shape", prompt: "a red sks shape on a blue background" },
  striped: { count: 20, trigger: "sks", class: "shape", prompt: "one sks striped red circle on a blue background" },
};

/** Images in the panel: [{name, file, caption, url, li}] in the order they were added. */
export const images = [];
/** Caption texts whose image has not been added yet, by key (folder/stem). */
const pendingCaptions = new Map();

const key = (name) => name.replace(/\.[^./\\]+$/, "").toLowerCase();
const stemOf = (name) => name.split(/[/\\]/).pop().replace(/\.[^.]+$/, "");
const folderOf = (name) => name.split(/[/\\]/).slice(0, -1).pop() ?? "";

/** kohya's `N_words` folder → N repeats (1 outside such a folder). */
export function repeatsOf(name) {
  const m = /^(\d+)_/.exec(folderOf(name));
  return m ? Math.max(0, Number(m[1])) : 1;
}

/** Images per epoch (each image times its folder's repeats), as kohya counts them. */
export const trainImages = () => images.reduce((n, im) => n + repeatsOf(im.name), 0);

/** The caption an image without one trains with: its kohya folder's words, else "trigger class". */
function defaultCaption(name) {
  const m = /^\d+_(.+)$/.exec(folderOf(name));
  if (m) return m[1].trim();
  return `${$("train-trigger").value.trim()} ${$("train-class").value.trim()}`.trim();
}

let onChange = () => {};

function render() {
  const list = $("train-images");
  const n = images.length;
  const captioned = images.filter((im) => im.caption.trim()).length;
  $("train-data-status").textContent = n
    ? `${n} ${n === 1 ? "image" : "images"} (${captioned} with captions), ${bytes(images.reduce((s, im) => s + im.file.size, 0))}` +
      (pendingCaptions.size ? ` · ${pendingCaptions.size} caption ${pendingCaptions.size === 1 ? "file" : "files"} without an image` : "")
    : "No images yet.";
  for (const im of images) {
    if (!im.li.isConnected) list.append(im.li);
    im.textarea.placeholder = defaultCaption(im.name);
  }
  onChange();
}

function itemFor(name, file) {
  const url = URL.createObjectURL(file);
  const textarea = el("textarea", { rows: 2, "aria-label": `Caption: ${name}`, class: "caption" });
  const im = { name, file, caption: "", url, textarea, li: null };
  textarea.addEventListener("input", () => {
    im.caption = textarea.value;
    render();
  });
  const remove = el("button", { type: "button", class: "small secondary", "aria-label": `Remove ${name}` }, "Remove");
  remove.addEventListener("click", () => {
    const i = images.indexOf(im);
    if (i >= 0) images.splice(i, 1);
    URL.revokeObjectURL(im.url);
    im.li.remove();
    render();
  });
  im.li = el("li", { class: "train-image", dataset: { name } },
    el("img", { src: url, alt: "", width: 64, height: 64 }),
    el("div", { class: "train-image-text" },
      el("span", { class: "train-image-name" }, name,
        el("span", { class: "muted" }, ` · ${bytes(file.size)}${repeatsOf(name) !== 1 ? ` · ${repeatsOf(name)} repeats` : ""}`)),
      textarea),
    remove);
  return im;
}

function setCaption(im, text) {
  im.caption = text;
  im.textarea.value = text;
}

/**
 * Adds files ([{file, path}]): images become items (an image already listed under the same
 * name is replaced), caption files fill their image's caption. Returns what was skipped.
 */
export async function addFiles(entries) {
  const skipped = [];
  const captions = [];
  for (const { file, path } of entries) {
    const name = path || file.webkitRelativePath || file.name;
    const x = ext(name);
    if (IMAGE_EXT.has(x) || /^image\/(png|jpeg|webp)$/.test(file.type)) {
      const old = images.findIndex((im) => im.name === name);
      const im = itemFor(name, file);
      if (old >= 0) {
        setCaption(im, images[old].caption);
        images[old].li.replaceWith(im.li);
        URL.revokeObjectURL(images[old].url);
        images[old] = im;
      } else {
        images.push(im);
      }
      const pending = pendingCaptions.get(key(name));
      if (pending !== undefined) {
        setCaption(im, pending);
        pendingCaptions.delete(key(name));
      }
    } else if (CAPTION_EXT.has(x)) {
      captions.push([name, file]);
    } else if (!name.split(/[/\\]/).pop().startsWith(".")) {
      skipped.push(name);
    }
  }
  for (const [name, file] of captions) {
    let text;
    try {
      text = (await file.text()).replace(/^\uFEFF/, "").split(/\r?\n/)[0].trim();
    } catch (err) {
      skipped.push(`${name} (${err.message})`);
      continue;
    }
    const im = images.find((i) => key(i.name) === key(name));
    if (im) setCaption(im, text);
    else pendingCaptions.set(key(name), text);
  }
  render();
  return skipped;
}

/** Removes every image. */
export function clearImages() {
  for (const im of images) URL.revokeObjectURL(im.url);
  images.length = 0;
  pendingCaptions.clear();
  $("train-images").replaceChildren();
  render();
}

/** Fetches a bundled dataset into the list (as `<name>/000.png` …) and sets its trigger, class and sample prompt. */
export async function loadBundled(name) {
  const d = BUNDLED[name];
  const entries = [];
  for (let i = 0; i < d.count; i++) {
    for (const x of ["png", "txt"]) {
      const file = `${String(i).padStart(3, "0")}.${x}`;
      const r = await fetch(new URL(`datasets/${name}/${file}`, document.baseURI));
      if (!r.ok) throw new Error(`datasets/${name}/${file}: the server answered ${r.status}; this build lacks the bundled datasets`);
      const blob = await r.blob();
      entries.push({ file: new File([blob], file, { type: x === "png" ? "image/png" : "text/plain" }), path: `${name}/${file}` });
    }
  }
  $("train-trigger").value = d.trigger;
  $("train-class").value = d.class;
  $("train-sample-prompt").value = d.prompt;
  $("train-name").value = `${name}-${d.trigger}`;
  return addFiles(entries);
}

/**
 * The files the engine trains on: each image, and for each image with a caption a `.txt`
 * beside it holding that caption (typed or read from its caption file).
 */
export function datasetFiles() {
  const out = [];
  for (const im of images) {
    out.push({ name: im.name, file: im.file });
    if (im.caption.trim()) {
      const dir = im.name.split(/[/\\]/).slice(0, -1).join("/");
      const name = `${dir ? `${dir}/` : ""}${stemOf(im.name)}.txt`;
      out.push({ name, file: new File([`${im.caption.trim()}\n`], name.split("/").pop(), { type: "text/plain" }) });
    }
  }
  return out;
}

/**
 * Shows the dataset of a saved run (files as the engine stored them: [{name, file}]; caption
 * files become the images' captions). The list cannot be edited while that run is open.
 */
export async function showSaved(files) {
  clearImages();
  await addFiles(files.map((f) => ({ file: f.file, path: f.name })));
}

/** Enables or disables editing the list. */
export function lockImages(locked) {
  for (const c of $("train-data").querySelectorAll("button, input, textarea")) c.disabled = locked;
}

/**
 * A warning when each image would be seen far fewer or far more times than the usual 100–200
 * (the same bounds as the engine's: below 50 or above 400), or "".
 */
export function stepsWarning(steps, batch) {
  const n = trainImages();
  if (!n || !(steps > 0) || !(batch > 0)) return "";
  const per = (steps * batch) / n;
  const about = (target) => Math.ceil((target * n) / batch);
  const seen = `Each image would be seen about ${per.toFixed(per < 10 ? 1 : 0)} times (${steps} steps × ${batch} per step / ${n} images); 100–200 is usual`;
  if (per < 50) return `${seen}, i.e. about ${about(100)}–${about(200)} steps: the LoRA may learn little.`;
  if (per > 400) return `${seen}, i.e. about ${about(100)}–${about(200)} steps: the LoRA may overfit (copy the training images).`;
  return "";
}

/** Wires the picker, the drop zone and the bundled-dataset buttons; `changed` runs after every change. */
export function initTrainData(changed, report) {
  onChange = changed;
  $("train-input").addEventListener("change", async (e) => {
    const files = [...e.target.files];
    e.target.value = "";
    report(await addFiles(files.map((file) => ({ file, path: file.webkitRelativePath || file.name }))));
  });
  $("train-clear").addEventListener("click", clearImages);
  for (const name of Object.keys(BUNDLED)) {
    $(`train-load-${name}`).addEventListener("click", async (e) => {
      const b = e.currentTarget;
      b.disabled = true;
      try {
        report(await loadBundled(name));
      } catch (err) {
        report([], err.message);
      } finally {
        b.disabled = false;
      }
    });
  }
  for (const id of ["train-trigger", "train-class"]) $(id).addEventListener("input", render);
  // Drops on the panel are training data (PNGs too: they are not generation parameters here).
  const zone = $("train-data");
  const isFiles = (e) => [...(e.dataTransfer?.types ?? [])].includes("Files");
  // The page's drop handler (app.js) resets the drag outline and leaves these files alone.
  zone.addEventListener("drop", async (e) => {
    if (!isFiles(e)) return;
    e.preventDefault();
    if ($("train-input").disabled) return;
    report(await addFiles(await droppedEntries(e.dataTransfer)));
  });
  render();
}

/** The files of a drop with their paths inside dropped folders ([{file, path}]). */
async function droppedEntries(dt) {
  const entries = [...dt.items].map((i) => i.webkitGetAsEntry?.()).filter(Boolean);
  if (!entries.length) return [...dt.files].map((file) => ({ file, path: file.name }));
  const out = [];
  const walk = async (entry, prefix) => {
    if (entry.isFile) {
      out.push({ file: await new Promise((ok, fail) => entry.file(ok, fail)), path: prefix + entry.name });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((ok, fail) => reader.readEntries(ok, fail));
        if (!batch.length) break;
        for (const child of batch) await walk(child, `${prefix}${entry.name}/`);
      }
    }
  };
  for (const entry of entries) await walk(entry, "");
  return out;
}
