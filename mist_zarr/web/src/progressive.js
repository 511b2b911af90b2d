// One stored chunk (an HTJ2K codestream), fetched and decoded level by level.
//
// The prefix index gives, per chunk, the bytes level k needs (p[n] < ... < p[0],
// p[0] the whole chunk). Level k is fetched as ONE Range request for the bytes
// beyond the previous level's, so refining a slice from the coarsest level to
// level 0 transfers each byte of the chunk exactly once. The requests of all
// levels are sent at once (each continuing the previous one's range) so that
// refining costs no extra round trips; each level is drawn when it is held. A prefix ends where
// the next resolution's tile-part starts (docs/format.md), so the two bytes
// after it are FF 90 (SOT): each request for level k > 0 reaches two bytes
// past p[k] and they are checked BEFORE level k is decoded, because a prefix
// that is too short decodes without error into a wrong image. The next
// request continues after them, so no byte is fetched twice.

import openjphFactory from "@cornerstonejs/codec-openjph";

// Captured at load: the bundle's own URL locates the WebAssembly beside it.
const BUNDLE_URL = document.currentScript ? document.currentScript.src : location.href;
let codecPromise = null;

/** The OpenJPH WebAssembly module, loaded once. */
export function loadCodec() {
  codecPromise ??= openjphFactory({
    locateFile: (name) => new URL(name, BUNDLE_URL).href,
  });
  return codecPromise;
}

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0").toUpperCase()).join(" ");

export class ProgressiveChunk {
  /**
   * @param {string} url chunk URL
   * @param {number[]} prefixes bytes needed per level, prefixes[k] for k = 0..n
   */
  constructor(url, prefixes) {
    this.url = url;
    this.prefixes = prefixes;
    this.levels = prefixes.length - 1;
    this.bytes = new Uint8Array(prefixes[0]);
    this.have = 0; // bytes held and checked, always target(k) of some level k
    this.etag = null;
    this.parts = new Map(); // level -> promise of its part's byte count, while in flight
    this.arrived = new Map(); // start -> stop of parts that arrived before the bytes before them
  }

  /** Bytes held once level k is fetched: its prefix and, for k > 0, the two checked after it. */
  target(k) {
    return k === 0 ? this.prefixes[0] : this.prefixes[k] + 2;
  }

  holds(k) {
    return this.have >= this.target(k);
  }

  /**
   * Ask for every level from the coarsest not held down to `finest` at once:
   * one Range request per level, each starting where the previous level's
   * ends, so the requests overlap in time but never in bytes. With `single`,
   * one request for everything up to `finest` (the benchmark's baseline).
   */
  request(finest, signal, single = false) {
    if (this.holds(finest)) return;
    if (single) {
      if (this.parts.size === 0) this._track(finest, this._fetch(finest, this.have, signal));
      return;
    }
    for (let k = this.levels; k >= finest; k--) {
      if (this.holds(k) || this.parts.has(k)) continue;
      this._track(k, this._fetch(k, k === this.levels ? 0 : this.target(k + 1), signal));
    }
  }

  _track(k, part) {
    this.parts.set(k, part);
    // An aborted part is asked again next time; a failed one stays, so that
    // every caller waiting for this level gets its error.
    part.catch((err) => err.name === "AbortError" && this.parts.get(k) === part && this.parts.delete(k));
  }

  /** Wait until level k is held and checked; returns the bytes that arrived for it. */
  async fetchLevel(k, signal) {
    if (![...this.parts.keys()].some((j) => j <= k)) this.request(k, signal);
    let bytes = 0;
    for (const j of [...this.parts.keys()].filter((j) => j >= k).sort((a, b) => b - a)) {
      const part = this.parts.get(j);
      const n = await part;
      if (this.parts.get(j) === part) {
        this.parts.delete(j); // counted once, by the first caller to see it complete
        bytes += n;
      }
    }
    if (!this.holds(k)) throw new Error(`${this.url}: level ${k} was not received`);
    return bytes;
  }

  async _fetch(k, start, signal) {
    const stop = this.target(k);
    const headers = { Range: `bytes=${start}-${stop - 1}` };
    // If the file changed since a part was fetched, the server sends it whole
    // (200) instead of a range, and that is reported below.
    if (this.etag) headers["If-Range"] = this.etag;
    const resp = await fetch(this.url, { headers, cache: "no-store", signal });
    if (resp.status !== 206) {
      const why = resp.status === 200 && this.etag ? " (the file changed while being viewed?)" : "";
      throw new Error(`${this.url}: expected 206 for bytes ${start}-${stop - 1}, got ${resp.status}${why}`);
    }
    const range = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(resp.headers.get("Content-Range") || "");
    if (!range || +range[1] !== start || +range[2] !== stop - 1 || +range[3] !== this.prefixes[0]) {
      throw new Error(
        `${this.url}: asked for bytes ${start}-${stop - 1} of ${this.prefixes[0]}, ` +
          `got Content-Range ${resp.headers.get("Content-Range")} (index and chunk disagree)`,
      );
    }
    const etag = resp.headers.get("ETag");
    this.etag ??= etag;
    if (etag !== this.etag) throw new Error(`${this.url}: the file changed while being viewed (ETag ${this.etag}, now ${etag})`);
    const part = new Uint8Array(await resp.arrayBuffer());
    if (part.length !== stop - start) {
      throw new Error(`${this.url}: expected ${stop - start} bytes, received ${part.length}`);
    }
    this.bytes.set(part, start);
    this._check(start, stop);
    // Parts may arrive in any order; the held prefix grows only contiguously.
    if (this.have === start) {
      this.have = stop;
      while (this.arrived.has(this.have)) this.have = this.arrived.get(this.have);
    } else {
      this.arrived.set(start, stop);
    }
    return part.length;
  }

  /** Check the markers that bytes [start, stop) contain: SOC, SOT after each level's prefix, EOC. */
  _check(start, stop) {
    const at = (i) => hex(this.bytes.subarray(i, i + 2));
    const expect = (what, found, want) => {
      if (found !== want) {
        throw new Error(`${this.url}: ${what}: expected ${want}, found ${found}; the prefix index does not match this chunk`);
      }
    };
    if (start === 0) expect("codestream start", at(0), "FF 4F");
    for (let k = this.levels; k >= 1; k--) {
      const p = this.prefixes[k];
      if (p >= start && p + 2 <= stop) expect(`bytes after the level-${k} prefix (${p} bytes)`, at(p), "FF 90");
    }
    if (stop === this.prefixes[0]) expect("codestream end", at(stop - 2), "FF D9");
  }

  /** Decode the held prefix at level k: {width, height, components, samples}. */
  async decode(k) {
    if (!this.holds(k)) throw new Error(`${this.url}: level ${k} not fetched`);
    const codec = await loadCodec();
    const decoder = new codec.HTJ2KDecoder();
    try {
      decoder.getEncodedBuffer(this.prefixes[k]).set(this.bytes.subarray(0, this.prefixes[k]));
      decoder.readHeader();
      decoder.decodeSubResolution(k, 0);
      const info = decoder.getFrameInfo();
      const size = decoder.calculateSizeAtDecompositionLevel(k);
      // getDecodedBuffer is a view into WebAssembly memory: copy it out.
      const raw = decoder.getDecodedBuffer().slice();
      const samples = typed(raw.buffer, info, size);
      return { width: size.width, height: size.height, components: info.componentCount, samples, atLimit: samples.atLimit || 0 };
    } finally {
      decoder.delete();
    }
  }
}

function typed(buffer, info, size) {
  const bits = info.bitsPerSample;
  if (bits <= 8) return info.isSigned ? new Int8Array(buffer) : new Uint8Array(buffer);
  if (bits <= 16) return info.isSigned ? new Int16Array(buffer) : new Uint16Array(buffer);
  // OpenJPH's WebAssembly build writes at most 16 bits per sample: wider
  // samples come back saturated to 16 bits, each row in the first half of a
  // 32-bit-wide row. Samples at the limits are counted so that the page can
  // say the image may be clipped there, rather than show a wrong one silently.
  const Type = info.isSigned ? Int16Array : Uint16Array;
  const [lo, hi] = info.isSigned ? [-32768, 32767] : [0, 65535];
  const row = size.width * info.componentCount;
  const wide = new Type(buffer);
  const samples = new Type(row * size.height);
  for (let y = 0; y < size.height; y++) samples.set(wide.subarray(2 * y * row, 2 * y * row + row), y * row);
  samples.atLimit = samples.reduce((n, v) => n + (v === lo || v === hi), 0);
  return samples;
}
