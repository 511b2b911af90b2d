// The mist-zarr viewer: the dataset catalog, then one series with a slice
// slider, zoom and window/level, shown coarsest level first and refined level
// by level (see progressive.js for what each refinement transfers).
//
// State for people and tests: window.mistViewer, and data-* attributes on the
// canvas (data-path, data-pos, data-level, data-center, data-width).

import { Series } from "./series.js";
import { loadCodec } from "./progressive.js";
import { presets, render, valueModel } from "./display.js";

const params = new URLSearchParams(location.search);
// ?progressive=0 fetches level 0 at once: the baseline of the benchmark.
const PROGRESSIVE = params.get("progressive") !== "0";
// ?finest=k stops refining at level k (saves bytes; the tests compare each level).
const FINEST = Math.max(0, parseInt(params.get("finest") || "0", 10) || 0);

const state = (window.mistViewer = {
  progressive: PROGRESSIVE,
  finest: FINEST,
  firstImageMs: null, // since navigation start, the first image of any level
  log: [], // one record per drawn level: {path, pos, level, bytes, ms since the slice was asked for, t since navigation}
  errors: [],
  bytes: 0,
});

const $ = (tag, attrs = {}, ...children) => {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  el.append(...children.filter((c) => c !== null && c !== undefined));
  return el;
};
const app = () => document.getElementById("app");

function showError(err) {
  console.error(err);
  state.errors.push(String(err.message || err));
  app().append($("p", { class: "error" }, String(err.message || err)));
}

const kB = (n) => (n < 1024 * 1024 ? `${(n / 1024).toFixed(1)} kB` : `${(n / 1024 / 1024).toFixed(2)} MB`);

// ---------------------------------------------------------------- catalog

async function showCatalog() {
  document.getElementById("title").textContent = "catalog";
  app().replaceChildren($("p", { class: "status" }, "loading the catalog ..."));
  // the server's dataset catalog (mist_zarr.http_view), the one generic clients read
  const resp = await fetch("catalog.json");
  if (!resp.ok) throw new Error(`catalog: ${resp.status} ${await resp.text()}`);
  const rows = (await resp.json()).images;
  const head = ["Patient", "Study", "Series", "Modality", "Shape", "Type", "Levels", "Stored"];
  const body = rows.map((r) => {
    const parts = r.path.split("/");
    const dicom = r.source_format === "dicom" && parts.length >= 3;
    const series = r.series_description || parts[parts.length - 1];
    return $(
      "tr",
      { "data-path": r.path, class: r.complete ? "" : "incomplete" },
      $("td", {}, r.patient_id || (dicom ? parts[0] : "")),
      $("td", {}, dicom ? parts[parts.length - 2] : ""),
      $("td", {}, r.complete ? $("a", { href: "#/series/" + r.path, title: r.path }, series) : `${series} (incomplete)`),
      $("td", {}, r.modality || r.source_format),
      $("td", {}, r.shape.join(" x ")),
      $("td", {}, r.dtype),
      $("td", {}, String(r.levels)),
      $("td", { class: "num" }, kB(r.bytes)),
    );
  });
  app().replaceChildren(
    rows.length
      ? $("table", { class: "catalog" }, $("thead", {}, $("tr", {}, ...head.map((h) => $("th", {}, h)))), $("tbody", {}, ...body))
      : $("p", {}, "No images under this root."),
  );
}

// ---------------------------------------------------------------- series

class SeriesView {
  constructor(series) {
    this.series = series;
    this.model = valueModel(series.mist);
    this.pos = series.dims.map((d, i) => (series.sliceAxes.includes(i) ? Math.floor(series.shape[i] / 2) : 0));
    this.zoom = "fit";
    this.plane = null;
    this.level = null;
    this.window = null;
    this.abort = null;
    this.canvas = $("canvas", { id: "view", "data-path": series.path });
    this.status = $("span", { class: "status" });
    this.warning = $("p", { class: "warning", id: "warning" });
    this.presetSelect = $("select", { id: "preset", onchange: () => this.choosePreset() });
    this.centerInput = $("input", { id: "center", type: "number", step: "any", onchange: () => this.readWindow() });
    this.widthInput = $("input", { id: "width", type: "number", step: "any", min: "1", onchange: () => this.readWindow() });
    this.viewport = $("div", { class: "viewport" }, this.canvas);
    this.dragWindow();
  }

  build() {
    const s = this.series;
    const sliders = s.sliceAxes.map((i) => {
      const label = $("span", {}, "");
      const setLabel = () => (label.textContent = `${s.dims[i]} ${this.pos[i] + 1} / ${s.shape[i]}`);
      setLabel();
      return $(
        "label",
        { class: "slider" },
        $("input", {
          type: "range", min: "0", max: String(s.shape[i] - 1), value: String(this.pos[i]), id: `slider-${s.dims[i]}`,
          oninput: (e) => { this.pos[i] = +e.target.value; setLabel(); this.refine(); },
        }),
        label,
      );
    });
    const zoom = $("select", { id: "zoom", onchange: (e) => { this.zoom = e.target.value; this.layout(); } },
      ...["fit", "0.25", "0.5", "1", "2", "4"].map((z) => $("option", { value: z }, z === "fit" ? "fit" : `${z * 100} %`)));
    const m = s.mist;
    const info = $("p", { class: "info" },
      `${this.model.modality || m.source_format} · ${m.shape.join(" x ")} ${m.values.dtype} · spacing ${m.spacing.map((x) => +x.toFixed(3)).join(" x ")} · ` +
      `levels 0-${m.levels}: ${Array.from({ length: m.levels + 1 }, (_, k) => s.levelSize(k).join("x")).join(", ")}`);
    app().replaceChildren(
      $("div", { class: "toolbar" },
        $("a", { href: "#" }, "< catalog"), ...sliders,
        $("label", {}, "zoom ", zoom),
        $("label", {}, "window ", this.presetSelect),
        $("label", {}, `center${this.model.unit ? " (HU)" : ""} `, this.centerInput),
        $("label", {}, "width ", this.widthInput),
        this.status),
      info, this.warning, this.viewport);
    document.getElementById("title").textContent = s.path;
    window.addEventListener("resize", () => this.layout());
  }

  /** Show the slice at this.pos: the finest level held first, then each finer level. */
  async refine() {
    this.abort?.abort();
    const ctrl = (this.abort = new AbortController());
    const s = this.series;
    const tiles = s.tiles(this.pos);
    const held = s.heldLevel(tiles);
    const finest = Math.min(FINEST, s.levels);
    const start = Math.max(held ?? (PROGRESSIVE ? s.levels : 0), finest);
    const t0 = performance.now();
    const pos = this.pos.filter((_, i) => s.sliceAxes.includes(i));
    try {
      s.request(tiles, finest, ctrl.signal, !PROGRESSIVE);
      for (let k = start; k >= finest; k--) {
        const { plane, bytes } = await s.loadLevel(tiles, k, ctrl.signal);
        if (ctrl.signal.aborted) return;
        // The percentile window comes from the coarsest level in every mode
        // (held once any level is: its bytes are a prefix of the others').
        if (!this.window) this.initWindow(k === s.levels ? plane : (await s.loadLevel(tiles, s.levels, ctrl.signal)).plane);
        this.draw(plane, k);
        state.bytes += bytes;
        state.log.push({ path: s.path, pos, level: k, bytes, ms: performance.now() - t0, t: performance.now() });
        state.firstImageMs ??= performance.now();
      }
    } catch (err) {
      if (err.name !== "AbortError" && !ctrl.signal.aborted) showError(err);
    }
  }

  draw(plane, k) {
    this.plane = plane;
    this.level = k;
    this.paint();
  }

  initWindow(plane) {
    const list = presets(this.model, plane.samples);
    this.presetSelect.replaceChildren(...list.map(([label, c, w], i) =>
      $("option", { value: String(i) }, `${label} (${+c.toFixed(1)} / ${+w.toFixed(1)})`)));
    this.presetList = list;
    // CT: the stored DICOM window or the soft-tissue preset; else the percentiles.
    const preferred = this.model.rescaled ? 0 : list.length - 1;
    this.presetSelect.value = String(preferred);
    this.setWindow(list[preferred][1], list[preferred][2]);
  }

  choosePreset() {
    const [, c, w] = this.presetList[+this.presetSelect.value];
    this.setWindow(c, w);
    this.paint();
  }

  readWindow() {
    const c = +this.centerInput.value;
    const w = +this.widthInput.value;
    if (Number.isFinite(c) && Number.isFinite(w) && w > 0) {
      this.setWindow(c, w);
      this.paint();
    }
  }

  setWindow(center, width) {
    this.window = [center, Math.max(width, 1e-6)];
    this.centerInput.value = String(+center.toFixed(3));
    this.widthInput.value = String(+width.toFixed(3));
  }

  /** Drag on the image: right/left changes the width, up/down the center. */
  dragWindow() {
    let last = null;
    this.canvas.addEventListener("pointerdown", (e) => { last = [e.clientX, e.clientY]; this.canvas.setPointerCapture(e.pointerId); });
    this.canvas.addEventListener("pointerup", () => (last = null));
    this.canvas.addEventListener("pointermove", (e) => {
      if (!last || !this.window) return;
      const step = Math.max(this.window[1] / 256, 1e-3);
      const [c, w] = this.window;
      this.setWindow(c - (e.clientY - last[1]) * step, Math.max(w + (e.clientX - last[0]) * step, step));
      last = [e.clientX, e.clientY];
      this.paint();
    });
  }

  paint() {
    if (!this.plane) return;
    const { canvas, plane } = this;
    const [center, width] = this.window;
    if (canvas.width !== plane.width || canvas.height !== plane.height) {
      canvas.width = plane.width;
      canvas.height = plane.height;
    }
    canvas.getContext("2d").putImageData(render(this.model, plane, center, width), 0, 0);
    const s = this.series;
    Object.assign(canvas.dataset, {
      pos: this.pos.filter((_, i) => s.sliceAxes.includes(i)).join(","),
      level: String(this.level),
      center: String(center),
      width: String(width),
    });
    const [h0, w0] = s.levelSize(0);
    this.status.textContent = `level ${this.level} of ${s.levels} (${plane.width} x ${plane.height} of ${w0} x ${h0})`;
    this.warning.textContent = plane.atLimit
      ? `${plane.atLimit} samples of this level are at the 16-bit limit of the browser's HTJ2K decoder ` +
        "(OpenJPH WebAssembly): they may be clipped there; mist_zarr.open reads them exactly."
      : "";
    this.layout();
  }

  /** CSS size: the level-0 plane times the zoom, so refinement keeps the image in place. */
  layout() {
    const [h0, w0] = this.series.levelSize(0);
    let z = +this.zoom;
    if (this.zoom === "fit") {
      const box = this.viewport.getBoundingClientRect();
      z = Math.min((window.innerWidth - 32) / w0, (window.innerHeight - box.top - 16) / h0);
    }
    this.canvas.style.width = `${Math.round(w0 * z)}px`;
    this.canvas.style.height = `${Math.round(h0 * z)}px`;
  }
}

// ---------------------------------------------------------------- routing

async function route() {
  state.view?.abort?.abort();
  const hash = decodeURIComponent(location.hash.slice(1));
  try {
    if (hash.startsWith("/series/")) {
      const path = hash.slice("/series/".length);
      app().replaceChildren($("p", { class: "status" }, `opening ${path} ...`));
      const [series] = await Promise.all([Series.open(path), loadCodec()]);
      const view = (state.view = new SeriesView(series));
      view.build();
      await view.refine();
    } else {
      state.view = null;
      await showCatalog();
    }
  } catch (err) {
    showError(err);
  }
}

window.addEventListener("hashchange", route);
route();
