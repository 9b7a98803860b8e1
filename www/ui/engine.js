// The engine's Worker and its message protocol: the page sends {id, cmd, args}; the worker may
// send events ({id, event, …}) and then answers once with {id, ok, value} or {id, ok: false,
// error: {name, message}}. One command runs at a time: calls wait in a queue, and a call's
// arguments may be a function evaluated when it starts, so a queued call always sends the
// newest state (slider moves that pile up while the engine is busy become one message).

/** Returned by an argument function to drop its call (the promise resolves to `SKIP`). */
export const SKIP = Symbol("skip");

export class EngineError extends Error {
  constructor(name, message) {
    super(message);
    this.name = name;
  }
}

export class Engine {
  constructor(url) {
    this.url = url;
    this.worker = null;
    this.queue = [];
    this.running = null;
    this.nextId = 1;
    this.dead = null;
    /** Called whenever the running command or the queue changes. */
    this.onchange = () => {};
    /** Called once if the worker itself fails (script or wasm failed to load, crash). */
    this.onfatal = () => {};
    /** Called with messages the worker sends on its own ({notice, …}: device loss and recovery). */
    this.onnotice = () => {};
  }

  start() {
    this.worker = new Worker(this.url, { type: "module" });
    this.worker.onmessage = ({ data }) => this.#receive(data);
    this.worker.onerror = (e) => {
      e.preventDefault();
      this.#fail(new EngineError("WorkerError",
        `the engine worker failed: ${e.message || "could not load worker.js or the wasm module"}`));
    };
    this.worker.onmessageerror = () => {
      this.#fail(new EngineError("WorkerError", "a message from the engine worker could not be read"));
    };
  }

  /**
   * Queues `cmd`. `args` is an object or a function returning one (or `SKIP`) when the command
   * starts; `onEvent` receives the command's progress/step events.
   */
  call(cmd, args = undefined, { onEvent = null } = {}) {
    if (this.dead) return Promise.reject(this.dead);
    return new Promise((resolve, reject) => {
      this.queue.push({ cmd, args, onEvent, resolve, reject });
      this.#pump();
      this.onchange();
    });
  }

  /** The command running now, or null. */
  get current() {
    return this.running?.cmd ?? null;
  }

  /** Commands waiting behind the running one. */
  get waiting() {
    return this.queue.length;
  }

  #pump() {
    while (!this.running && this.queue.length && !this.dead) {
      const job = this.queue.shift();
      let args;
      try {
        args = typeof job.args === "function" ? job.args() : job.args;
      } catch (err) {
        job.reject(err);
        continue;
      }
      if (args === SKIP) {
        job.resolve(SKIP);
        continue;
      }
      job.id = this.nextId++;
      this.running = job;
      try {
        this.worker.postMessage({ id: job.id, cmd: job.cmd, args });
      } catch (err) {
        this.running = null;
        job.reject(new EngineError("LoralabError", `could not send "${job.cmd}" to the engine: ${err.message}`));
      }
    }
  }

  #receive(data) {
    if (data?.notice) {
      this.onnotice(data);
      return;
    }
    const job = this.running;
    if (!job || data?.id !== job.id) return;
    if (data.event) {
      try {
        job.onEvent?.(data);
      } catch (err) {
        // A drawing failure must not stop the command; report it once on the page.
        queueMicrotask(() => { throw err; });
      }
      return;
    }
    this.running = null;
    if (data.ok) job.resolve(data.value);
    else job.reject(new EngineError(data.error?.name ?? "Error", data.error?.message ?? "unknown engine error"));
    this.#pump();
    this.onchange();
  }

  #fail(err) {
    if (this.dead) return;
    this.dead = err;
    const jobs = [this.running, ...this.queue].filter(Boolean);
    this.running = null;
    this.queue = [];
    for (const j of jobs) j.reject(err);
    this.onchange();
    this.onfatal(err);
  }
}
