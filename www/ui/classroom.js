// The Classroom: demonstrations of what LoRA is, each computed live on the demo model and the
// bundled demo adapters (www/adapters/). Every demonstration's state is in the URL
// (`#classroom/alpha?adapter=rank16&alpha=8&s=0.5,1`), so a shared link opens exactly that view;
// the page shows either the studio (#app) or the classroom (html[data-view]).
//
// The demonstrations: classroom-weights.js (numbers), classroom-images.js (α, rank, stacking) and
// classroom-model.js (merging, block weights, overfitting); what they share: classroom-core.js.
import { $, el } from "./dom.js";
import { demoHash, forgetAll, hasAdapters } from "./classroom-core.js";
import { weightDemos } from "./classroom-weights.js";
import { imageDemos } from "./classroom-images.js";
import { modelDemos } from "./classroom-model.js";

/** The demonstrations, in the order of the menu (the order, the resize tool last). */
const ORDER = ["params", "alpha", "rank", "spectrum", "stack", "merge", "blocks", "overfit", "resize"];
const DEMOS = [...weightDemos, ...imageDemos, ...modelDemos].sort((a, b) => ORDER.indexOf(a.id) - ORDER.indexOf(b.id));

function parseHash(hash) {
  const m = /^#classroom(?:\/([a-z-]+))?\/?(?:\?(.*))?$/.exec(hash);
  if (!m) return null;
  return { demo: m[1] ?? "", params: Object.fromEntries(new URLSearchParams(m[2] ?? "")) };
}

// --- the page ------------------------------------------------------------------------------------

let current = null; // {demo, params, token}

function setView(view) {
  document.documentElement.dataset.view = view;
  $("app").hidden = view === "classroom";
  $("classroom").hidden = view !== "classroom";
  for (const a of document.querySelectorAll("#views a")) {
    if (a.dataset.view === view) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

/**
 * Shows demonstration `id` with `params` (missing ones from its defaults). A demonstration is
 * `{id, title, intro, defaults, mount(ctx)}`; `ctx` gives it the app, its parameters, a place
 * for controls and one for results, `set(params)` to record new parameters in the URL, a
 * status line and `busy(promise)` to mark the section running/done/error.
 */
function show(app, id, params) {
  const demo = DEMOS.find((d) => d.id === id) ?? DEMOS[0];
  const token = {};
  current = { demo, params: { ...demo.defaults, ...params }, token };
  for (const b of document.querySelectorAll("#classroom-menu a")) {
    if (b.dataset.demo === demo.id) b.setAttribute("aria-current", "true");
    else b.removeAttribute("aria-current");
  }
  const status = el("p", { class: "muted classroom-status", role: "status", "aria-live": "polite" });
  const controls = el("form", { class: "classroom-controls", novalidate: true, onsubmit: (e) => e.preventDefault() });
  const results = el("div", { class: "classroom-results" });
  const progress = el("progress", { max: 1, value: 0, "aria-label": `${demo.title} progress`, hidden: true });
  $("classroom-demo").replaceChildren(
    el("h3", { id: "classroom-demo-title" }, demo.title),
    el("p", { class: "classroom-intro" }, demo.intro),
    controls, progress, status, results,
  );
  $("classroom-demo").dataset.demo = demo.id;
  const section = $("classroom");
  const ctx = {
    app,
    params: current.params,
    controls,
    results,
    live: () => current?.token === token,
    set(p) {
      Object.assign(current.params, p);
      history.replaceState(null, "", demoHash(demo.id, current.params));
    },
    status(text) { status.textContent = text; },
    progress(done, total) {
      progress.hidden = !total;
      progress.max = total || 1;
      progress.value = done;
    },
    /** Runs `fn` with the section marked running; errors go to the status line. */
    async busy(fn) {
      section.dataset.state = "running";
      try {
        await fn();
        if (current?.token === token) section.dataset.state = "done";
      } catch (err) {
        if (current?.token !== token) return;
        section.dataset.state = "error";
        status.textContent = `Stopped: ${err.message}`;
        status.classList.add("error-text");
      } finally {
        progress.hidden = true;
      }
    },
  };
  section.dataset.state = "idle";
  if (!location.hash.startsWith(`#classroom/${demo.id}`)) history.replaceState(null, "", demoHash(demo.id, current.params));
  engineStarted().then((ok) => {
    if (!ctx.live()) return;
    if (ok) demo.mount(ctx);
    else ctx.status("The engine is not running in this browser (see the notice above): the demonstrations need WebGPU.");
  });
}

/** Resolves once the engine has started (true) or could not start (false). */
function engineStarted() {
  const state = () => document.documentElement.dataset.state;
  return new Promise((ok) => {
    const check = () => {
      if (state() === "loading") setTimeout(check, 100);
      else ok(state() === "ready");
    };
    check();
  });
}

function route(app) {
  const r = parseHash(location.hash);
  if (!r) {
    setView("studio");
    current = null;
    return;
  }
  setView("classroom");
  show(app, r.demo, r.params);
  $("classroom").scrollIntoView?.({ block: "start" });
}

export function initClassroom(app) {
  const menu = $("classroom-menu");
  menu.replaceChildren(...DEMOS.map((d, i) => el("li", {},
    el("a", { href: `#classroom/${d.id}`, dataset: { demo: d.id } }, `${i + 1}. ${d.title}`))));
  window.addEventListener("hashchange", () => route(app));
  const previous = app.onModel;
  app.onModel = (m) => {
    previous?.(m);
    if (hasAdapters()) forgetAll(app);
  };
  route(app);
}
