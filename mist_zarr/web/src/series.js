// One image (series) of the dataset, read from its PHYSICAL store as served:
// the group's zarr.json (the `mist` document), image/zarr.json (chunk key
// encoding) and the prefix index, read with zarrita. Pixels come from
// ProgressiveChunk, one per stored chunk, cached so that revisiting a slice
// costs no bytes.

import * as zarr from "zarrita";
import { ProgressiveChunk } from "./progressive.js";

const MAX_CACHED_BYTES = 512 * 1024 * 1024;

async function getJSON(url) {
  const resp = await fetch(url);
  if (!resp.ok) throw new Error(`${url}: ${resp.status} ${resp.statusText}`);
  return resp.json();
}

export class Series {
  static async open(path) {
    const base = new URL(path.split("/").map(encodeURIComponent).join("/") + "/", document.baseURI);
    const group = await getJSON(new URL("zarr.json", base));
    const mist = group.attributes?.mist;
    if (mist?.format !== "mist-zarr") throw new Error(`${path}: not a mist-zarr image (no attributes.mist)`);
    if (!mist.complete) throw new Error(`${path}: the image was not completely written`);
    const image = await getJSON(new URL("image/zarr.json", base));
    const store = new zarr.FetchStore(base.href.replace(/\/$/, ""));
    const indexArray = await zarr.open.v3(zarr.root(store).resolve("index"), { kind: "array" });
    const index = await zarr.get(indexArray);
    return new Series(path, base, mist, image, index);
  }

  constructor(path, base, mist, image, index) {
    this.path = path;
    this.base = base;
    this.mist = mist;
    this.dims = mist.dims;
    this.shape = mist.shape;
    this.chunks = mist.chunks;
    this.levels = mist.levels;
    this.iy = this.dims.indexOf("y");
    this.ix = this.dims.indexOf("x");
    this.ic = this.dims.indexOf("c");
    this.grid = this.shape.map((s, i) => Math.ceil(s / this.chunks[i]));
    // The axes a slider moves along: everything before y (z, t).
    this.sliceAxes = this.dims.map((d, i) => i).filter((i) => i < this.iy);
    const enc = image.chunk_key_encoding || { name: "default" };
    const sep = enc.configuration?.separator ?? (enc.name === "v2" ? "." : "/");
    this.chunkKey = (coords) => (enc.name === "v2" ? "" : "c" + sep) + coords.join(sep);
    this.index = index;
    this.cache = new Map();
    this.cachedBytes = 0;
  }

  /** Plane size at level k (level-k samples j sit on level-0 pixels j * 2**k). */
  levelSize(k) {
    return [Math.ceil(this.shape[this.iy] / 2 ** k), Math.ceil(this.shape[this.ix] / 2 ** k)];
  }

  /** Bytes level k needs, per level, for the chunk at coords: [p0, ..., pn], or null if absent. */
  prefixes(coords) {
    const { data, stride } = this.index;
    let at = 0;
    coords.forEach((c, i) => (at += c * stride[i]));
    const row = Array.from({ length: this.levels + 1 }, (_, k) => Number(data[at + k * stride[coords.length]]));
    return row.every((p) => p === 0) ? null : row;
  }

  /** The chunks holding the plane at pos (indices along sliceAxes), with their level-0 offsets. */
  tiles(pos) {
    const out = [];
    for (let ty = 0; ty < this.grid[this.iy]; ty++) {
      for (let tx = 0; tx < this.grid[this.ix]; tx++) {
        const coords = this.dims.map((d, i) => (i === this.iy ? ty : i === this.ix ? tx : i === this.ic ? 0 : pos[i]));
        const prefixes = this.prefixes(coords);
        out.push({ y0: ty * this.chunks[this.iy], x0: tx * this.chunks[this.ix], chunk: prefixes && this.chunk(coords, prefixes) });
      }
    }
    return out;
  }

  chunk(coords, prefixes) {
    const url = new URL("image/" + this.chunkKey(coords), this.base).href;
    let chunk = this.cache.get(url);
    if (chunk) {
      this.cache.delete(url); // re-inserted last: the Map's order is least recently used first
    } else {
      chunk = new ProgressiveChunk(url, prefixes);
      this.cachedBytes += prefixes[0];
      for (const [key, old] of this.cache) {
        if (this.cachedBytes <= MAX_CACHED_BYTES) break;
        this.cache.delete(key);
        this.cachedBytes -= old.prefixes[0];
      }
    }
    this.cache.set(url, chunk);
    return chunk;
  }

  /** The finest level every chunk of these tiles already holds, or null. */
  heldLevel(tiles) {
    for (let k = 0; k <= this.levels; k++) {
      if (tiles.every((t) => !t.chunk || t.chunk.holds(k))) return k;
    }
    return null;
  }

  /** Send the requests of every level down to `finest` (see ProgressiveChunk.request). */
  request(tiles, finest, signal, single = false) {
    for (const t of tiles) t.chunk?.request(finest, signal, single);
  }

  /** Fetch (only the missing bytes) and decode level k of the plane: {plane, bytes}. */
  async loadLevel(tiles, k, signal) {
    const sizes = await Promise.all(tiles.map((t) => (t.chunk ? t.chunk.fetchLevel(k, signal) : 0)));
    const bytes = sizes.reduce((a, b) => a + b, 0);
    const decoded = await Promise.all(tiles.map((t) => (t.chunk ? t.chunk.decode(k) : null)));
    const [h, w] = this.levelSize(k);
    const first = decoded.find((d) => d);
    if (tiles.length === 1 && first && first.width === w && first.height === h) return { plane: first, bytes };
    const components = first ? first.components : this.ic >= 0 ? this.shape[this.ic] : 1;
    const Type = first ? first.samples.constructor : Int32Array;
    const samples = new Type(w * h * components); // absent chunks stay 0, the fill value
    tiles.forEach((t, i) => {
      const d = decoded[i];
      if (!d) return;
      const y0 = t.y0 / 2 ** k;
      const x0 = t.x0 / 2 ** k;
      const rowLen = Math.min(d.width, w - x0) * components;
      for (let y = 0; y < Math.min(d.height, h - y0); y++) {
        const src = y * d.width * components;
        samples.set(d.samples.subarray(src, src + rowLen), ((y0 + y) * w + x0) * components);
      }
    });
    const atLimit = decoded.reduce((n, d) => n + (d ? d.atLimit : 0), 0);
    return { plane: { width: w, height: h, components, samples, atLimit }, bytes };
  }
}
