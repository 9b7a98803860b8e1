// Training a LoRA in the engine Worker (the commands train_* of docs/web.md). The engine
// (web/src/train.rs) holds the run in memory and does one optimizer step per `train_step`, so
// other commands run between steps. This module keeps the run in the Origin Private File System
// so that nothing is lost when the page closes:
//
//   training/run-<start time>/run.json    settings, dataset file names, consent, base model,
//                                         losses up to the last checkpoint, checkpoints, samples
//   …/data/0000 …                         the dataset's files as given (read by the engine once)
//   …/checkpoints/step-000010.safetensors
//   …/samples/step-000010-0.png
//   …/exports/<time>/<name>.safetensors, <name>_kohya.zip
//
// One run is kept: a new run's files are copied first, then the older run's folder goes (the
// page may be showing files of the older run). Files are never overwritten while a File of them
// may be in use (a LoRA card reads its export's File again when the model changes).
//
// After a reload `train_saved` describes the run and `train_resume` continues it from its last
// checkpoint on the same data and settings (the engine checks both), bit for bit as if it had
// not stopped.
import {
  train_start, train_step, train_samples, train_save_state, train_export, train_handoff,
  train_handoff_name, train_cancel,
} from "./loralab-web.js";

const ROOT = "training";
/** Checkpoints kept (older ones are deleted as new ones are written). */
const KEEP_CHECKPOINTS = 5;
const FORMAT = 1;

const pad = (n, w = 6) => String(n).padStart(w, "0");

/**
 * The training commands. `opfsDir(path, create)` opens an OPFS folder, `currentId()` is the id
 * of the command running now (its events carry it), `userError(message)` makes an error the
 * page shows as it is.
 */
export function trainCommands({ opfsDir, currentId, userError }) {
  /** run.json of the run open in the engine (null when none is), and its folder. */
  let open = null;
  let openDir = null;
  /** Whether the open run has done every step. */
  let finished = false;

  /** The run folders, oldest first. */
  async function runNames() {
    const root = await opfsDir(ROOT, true);
    const names = [];
    for await (const [name, h] of root.entries()) if (h.kind === "directory" && /^run-\d+$/.test(name)) names.push(name);
    return names.sort((a, b) => Number(a.slice(4)) - Number(b.slice(4)));
  }

  /** The saved run's folder (the newest), or null. */
  async function runDir() {
    const name = (await runNames()).at(-1);
    return name ? (await opfsDir(ROOT, true)).getDirectoryHandle(name) : null;
  }

  /** Removes every run folder but `keep`. */
  async function removeRuns(keep = null) {
    const root = await opfsDir(ROOT, true);
    for (const name of await runNames()) {
      if (name !== keep) await root.removeEntry(name, { recursive: true }).catch(() => {});
    }
  }

  async function fileAt(dir, path) {
    let d = dir;
    const parts = path.split("/");
    for (const p of parts.slice(0, -1)) d = await d.getDirectoryHandle(p);
    return (await d.getFileHandle(parts.at(-1))).getFile();
  }

  async function writeFile(dir, path, data) {
    let d = dir;
    const parts = path.split("/");
    for (const p of parts.slice(0, -1)) d = await d.getDirectoryHandle(p, { create: true });
    const fh = await d.getFileHandle(parts.at(-1), { create: true });
    const w = await fh.createWritable();
    try {
      await w.write(data);
    } finally {
      await w.close();
    }
    return fh.getFile();
  }

  async function removeFile(dir, path) {
    let d = dir;
    const parts = path.split("/");
    try {
      for (const p of parts.slice(0, -1)) d = await d.getDirectoryHandle(p);
      await d.removeEntry(parts.at(-1));
    } catch {
      // already gone
    }
  }

  async function readJson(dir) {
    try {
      return JSON.parse(await (await fileAt(dir, "run.json")).text());
    } catch {
      return null;
    }
  }

  const saveJson = async (dir, run) => writeFile(dir, "run.json", JSON.stringify(run));

  /** The saved run with its files as File objects, or null. */
  async function describe(dir, run) {
    const files = async (list) => {
      const out = [];
      for (const e of list) {
        try {
          out.push({ ...e, file: await fileAt(dir, e.path) });
        } catch {
          // a file the browser dropped from storage: left out
        }
      }
      return out;
    };
    return {
      ...run,
      files: await files(run.files),
      checkpoints: await files(run.checkpoints),
      samples: await files(run.samples),
      exports: await files(run.exports ?? []),
      open: open !== null,
    };
  }

  /** Starts the engine's run from `run` (data in `dir`), from `checkpoint` when given. */
  async function startEngine(dir, run, checkpoint) {
    const id = currentId();
    const pairs = [];
    for (const f of run.files) pairs.push([f.name, await fileAt(dir, f.path)]);
    const ckpt = checkpoint ? await fileAt(dir, checkpoint.path) : null;
    const value = await train_start(
      pairs, run.settings, ckpt, checkpoint?.path ?? "", run.started_at, checkpoint ? run.model?.sha256 : null,
      (done, total, label) => self.postMessage({ id, event: "progress", phase: "read", done, total, label }),
    );
    open = run;
    openDir = dir;
    finished = value.step >= value.steps;
    return value;
  }

  /** Frees a finished run that is still open (a new one replaces it). */
  async function closeFinished() {
    if (open && !finished) throw userError("a training run is open: cancel it before starting another");
    if (open) {
      await train_cancel();
      open = null;
      openDir = null;
    }
  }

  /** One step of the open run, its samples and checkpoint when due (see `train_step`). */
  async function oneStep(resumed) {
    const dir = openDir;
    const r = await train_step(resumed);
    const run = open;
    run.losses.push([r.step, r.loss, r.loss_avg, r.lr]);
    const s = run.settings;
    const due = (every) => r.finished || (Number(every) > 0 && r.step % Number(every) === 0);
    r.samples = [];
    if (s.sample_prompt?.trim() && due(s.sample_every)) {
      const images = train_samples();
      for (const [k, im] of (await images).entries()) {
        const path = `samples/step-${pad(im.step)}-${k}.png`;
        const file = await writeFile(dir, path, im.png);
        const entry = { step: im.step, prompt: im.prompt, path };
        run.samples.push(entry);
        r.samples.push({ ...entry, file });
      }
    }
    r.checkpoint = null;
    if (due(s.save_every)) {
      const bytes = await train_save_state();
      const path = `checkpoints/step-${pad(r.step)}.safetensors`;
      const file = await writeFile(dir, path, bytes);
      run.checkpoints.push({ step: r.step, path, bytes: file.size });
      while (run.checkpoints.length > KEEP_CHECKPOINTS) await removeFile(dir, run.checkpoints.shift().path);
      run.step = r.step;
      r.checkpoint = { step: r.step, path, file, bytes: file.size };
    }
    if (r.finished) {
      finished = true;
      run.finished = true;
      run.finished_at = Date.now() / 1000;
    }
    if (r.checkpoint || r.finished) await saveJson(dir, run);
    return r;
  }

  return {
    /** The run saved in this browser, or null. */
    async train_saved() {
      const dir = await runDir();
      if (!dir) return null;
      const run = await readJson(dir);
      if (!run || run.format !== FORMAT) return null;
      return describe(dir, run);
    },

    /** Starts a new run: `{files: [{name, file}], settings}` (docs/web.md). */
    async train_start({ files = [], settings = {} }) {
      if (!settings.consent_images || !settings.consent_likeness) {
        throw userError("confirm both consent questions before training: the images are yours or licensed for this use, and people shown have consented to a likeness model");
      }
      if (!files.length) throw userError("add training images first");
      await closeFinished();
      const root = await opfsDir(ROOT, true);
      const old = await runDir();
      if (old) {
        const saved = await readJson(old);
        if (saved && !saved.finished && !saved.cancelled && saved.checkpoints?.length) {
          throw userError(`an unfinished run (${saved.settings?.name}, step ${saved.step} of ${saved.settings?.steps}) is saved: resume or discard it first`);
        }
        if (saved?.finished && !saved.exports?.length) {
          throw userError(`the finished run ${saved.settings?.name} was never exported: export it (resume it first after a reload) or discard it`);
        }
      }
      const started = Date.now();
      const dirName = `run-${started}`;
      const dir = await root.getDirectoryHandle(dirName, { create: true });
      const id = currentId();
      const run = {
        format: FORMAT,
        settings,
        files: [],
        started_at: started / 1000,
        finished_at: null,
        consent: { images: true, likeness: true, at: new Date().toISOString() },
        model: null,
        dataset_sha256: null,
        step: 0,
        losses: [],
        checkpoints: [],
        samples: [],
        exports: [],
        finished: false,
        cancelled: false,
      };
      try {
        for (const [i, { name, file }] of files.entries()) {
          self.postMessage({ id, event: "progress", phase: "copy", done: i, total: files.length, label: name });
          const path = `data/${pad(i, 4)}`;
          await writeFile(dir, path, file);
          run.files.push({ name, path, bytes: file.size });
        }
        await saveJson(dir, run);
        const value = await startEngine(dir, run, null);
        run.model = value.model;
        run.dataset_sha256 = value.dataset_sha256;
        await saveJson(dir, run);
        await removeRuns(dirName);
        return { ...value, run: await describe(dir, run) };
      } catch (err) {
        // Nothing trained yet: the page still has the files.
        open = null;
        await root.removeEntry(dirName, { recursive: true }).catch(() => {});
        throw err;
      }
    },

    /** Continues the saved run from its last checkpoint (from the start if it has none). */
    async train_resume() {
      await closeFinished();
      const dir = await runDir();
      const run = dir && (await readJson(dir));
      if (!run) throw userError("no saved training run to resume");
      const checkpoint = run.checkpoints.at(-1) ?? null;
      run.losses = run.losses.filter(([step]) => step <= (checkpoint?.step ?? 0));
      run.samples = run.samples.filter((s) => s.step <= (checkpoint?.step ?? 0));
      run.cancelled = false;
      const value = await startEngine(dir, run, checkpoint);
      run.model ??= value.model;
      run.step = value.step;
      await saveJson(dir, run);
      return { ...value, run: await describe(dir, run) };
    },

    /**
     * Up to `n` steps (1 by default; fewer when the run finishes): `{n, resumed}` (`resumed`: the
     * first step after a pause). Samples and a checkpoint follow when their step comes
     * (settings.sample_every / save_every) and after the last step. Returns the last step's
     * figures with every sample made, the last checkpoint written and each step's loss point.
     */
    async train_step({ n = 1, resumed = false }) {
      if (!open) throw userError("no training run is open");
      const count = Math.max(1, Math.min(10_000, Math.floor(Number(n)) || 1));
      let last = null;
      const samples = [];
      const losses = [];
      let checkpoint = null;
      for (let i = 0; i < count; i++) {
        const r = await oneStep(resumed && i === 0);
        samples.push(...r.samples);
        losses.push([r.step, r.loss, r.loss_avg, r.lr]);
        checkpoint = r.checkpoint ?? checkpoint;
        last = r;
        if (r.finished) break;
      }
      return { ...last, samples, checkpoint, losses };
    },

    /** Ends the open run; its saved files stay (marked cancelled) until a new run or discard. */
    async train_cancel() {
      await train_cancel();
      const run = open;
      const dir = openDir;
      open = null;
      openDir = null;
      finished = false;
      if (dir && run) {
        run.cancelled = !run.finished;
        await saveJson(dir, run);
      }
      return null;
    },

    /** Deletes the saved run (and ends it when open). */
    async train_discard() {
      if (open) await train_cancel();
      open = null;
      openDir = null;
      finished = false;
      await removeRuns();
      return null;
    },

    /** The kohya LoRA file of the open run: `{name, file, bytes}` (also kept in the run's folder). */
    async train_export() {
      if (!open) throw userError("no training run is open: resume the saved run to export it");
      const dir = openDir;
      const out = await train_export(open.finished_at ?? Date.now() / 1000);
      const path = `exports/${Date.now()}/${out.name}`;
      const file = await writeFile(dir, path, out.bytes);
      open.exports = [...(open.exports ?? []).filter((e) => e.path !== path), { name: out.name, path, bytes: file.size }];
      await saveJson(dir, open);
      return { name: out.name, file, bytes: file.size };
    },

    /** The kohya hand-off zip of the open run: `{name, file, bytes}`. */
    async train_handoff() {
      if (!open) throw userError("no training run is open: resume the saved run to make its hand-off zip");
      const dir = openDir;
      const name = train_handoff_name();
      const stamp = String(Date.now());
      const exports = await (await dir.getDirectoryHandle("exports", { create: true })).getDirectoryHandle(stamp, { create: true });
      const fh = await exports.getFileHandle(name, { create: true });
      const handle = await fh.createSyncAccessHandle();
      let bytes;
      try {
        bytes = train_handoff(handle, Date.now() / 1000);
      } finally {
        handle.close();
      }
      const path = `exports/${stamp}/${name}`;
      open.exports = [...(open.exports ?? []).filter((e) => e.path !== path), { name, path, bytes }];
      await saveJson(dir, open);
      return { name, file: await fh.getFile(), bytes };
    },
  };
}
