"""Per-level read cost: mist-zarr levels vs. full resolution + downsampling vs. OME-Zarr.

For the shared CT series and chest radiographs this writes

* a mist-zarr image (``mist_zarr.write_image``): one lossless HTJ2K copy whose
  level-k chunks are byte-range prefixes of the level-0 chunks, and
* an OME-Zarr 0.5 pyramid of the same samples written by ngff-zarr with its
  defaults (codec, chunks, downsampling method), halving y and x per level as
  mist-zarr does and leaving z alone,

then reads every level k of each, from the local disk and from a loopback HTTP
server (``mist_zarr.serve.serve_in_thread``), and reports the bytes moved and
the median wall time. The third contender, "full + downsample", reads level 0
of the mist-zarr image and reduces it by a 2**k x 2**k block mean: what a user
without a pyramid does.

Bytes are counted where they leave storage: a counting wrapper around the
local zarr store, and the server's body-byte counter over HTTP. Every count
includes the metadata a cold open reads (zarr.json documents and, for
mist-zarr, the prefix index). The OME-Zarr reader opens the pyramid's root
group, as OME-Zarr readers do, so it pays for the multiscales metadata too.

Times cover opening and reading (decoding included). Local reads hit a warm
page cache, so they measure decoding and zarr's per-chunk work more than the
disk. The HTTP server runs in a thread of this process and competes with the
reader for the interpreter, so HTTP times include the serving cost; they are
for comparing contenders, not a network model.

Run from the repository root::

    python benchmarks/bench_levels.py [--data DIR] [--repeat N] [--out DIR]

Needs the bench extra (``pip install -e ".[bench]"``: ngff-zarr) and the shared
data set (``../shared/data`` or ``$MIST_DATA``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, LocalStore, WrapperStore

import mist_zarr
from mist_zarr.serve import ServerHandle, serve_in_thread

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("MIST_DATA", REPO.parent / "shared" / "data"))
CT_SERIES = Path("ct", "CRLM-CT-1004")
CXR_DIR = Path("radiographs", "nih-cxr14-png")
PACKAGES = ("mist-zarr", "zarr", "imagecodecs", "numcodecs", "numpy", "xarray", "fsspec",
            "aiohttp", "ngff-zarr", "itkwasm-downsample", "pydicom", "pillow")


# -- input data ---------------------------------------------------------------

@dataclass(frozen=True)
class Dataset:
    name: str
    volume: np.ndarray  # (z, y, x) stored values
    spacing: tuple[float, float, float]  # mm, or 1.0 where there is none
    note: str


def load_ct(data: Path) -> Dataset:
    """The CT series as stored values (no rescale), slices sorted by z position."""
    import pydicom

    files = sorted((data / CT_SERIES).rglob("*.dcm"))
    if not files:
        raise SystemExit(f"no DICOM files in {data / CT_SERIES}")
    slices = sorted((pydicom.dcmread(f) for f in files),
                    key=lambda d: float(d.ImagePositionPatient[2]))
    volume = np.stack([d.pixel_array for d in slices])
    z = [float(d.ImagePositionPatient[2]) for d in slices]
    dz = float(np.median(np.diff(z))) if len(z) > 1 else float(slices[0].SliceThickness)
    dy, dx = (float(s) for s in slices[0].PixelSpacing)  # row spacing, column spacing
    return Dataset("ct", volume, (dz, dy, dx), f"{CT_SERIES.as_posix()}, {len(files)} DICOM files")


def load_cxr(data: Path) -> Dataset:
    """The 8-bit grayscale chest PNGs stacked along z (colour ones are skipped)."""
    from PIL import Image

    planes, skipped = [], []
    for path in sorted((data / CXR_DIR).glob("*.png")):
        with Image.open(path) as im:
            if im.mode != "L":
                skipped.append(f"{path.name} ({im.mode})")
                continue
            planes.append(np.asarray(im))
    if not planes:
        raise SystemExit(f"no 8-bit grayscale PNGs in {data / CXR_DIR}")
    note = f"{CXR_DIR.as_posix()}, {len(planes)} grayscale PNGs"
    if skipped:
        note += f"; skipped {', '.join(skipped)}"
    return Dataset("cxr", np.stack(planes), (1.0, 1.0, 1.0), note)


# -- counting bytes read from a local store -----------------------------------

class Tally:
    """Bytes and read calls, shared by every copy of a CountingStore."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.requests = 0

    def add(self, buf: Buffer | None) -> Buffer | None:
        with self._lock:
            self.requests += 1
            self.bytes += 0 if buf is None else len(buf)
        return buf

    def reset(self) -> None:
        with self._lock:
            self.bytes = self.requests = 0


class CountingStore(WrapperStore):
    """A store wrapper that counts every byte read, whichever read path zarr takes.

    ``WrapperStore`` forwards ``get_sync``, ``get_partial_values``,
    ``get_ranges`` and ``_get_many`` straight to the wrapped store, so all of
    them are overridden: the single reads count, and the batched ones use
    ``Store``'s generic implementations, which call the single reads.
    """

    def __init__(self, store: Store, tally: Tally) -> None:
        super().__init__(store)
        self.tally = tally

    def _with_store(self, store: Store) -> CountingStore:
        return type(self)(store, self.tally)

    async def get(self, key: str, prototype: BufferPrototype,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        return self.tally.add(await self._store.get(key, prototype, byte_range))

    def get_sync(self, key: str, *, prototype: BufferPrototype | None = None,
                 byte_range: ByteRequest | None = None) -> Buffer | None:
        return self.tally.add(super().get_sync(key, prototype=prototype, byte_range=byte_range))

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    get_ranges = Store.get_ranges
    get_ranges_sync = Store.get_ranges_sync
    _get_many = Store._get_many


# -- where a store is read from -----------------------------------------------

class Local:
    """Stores under a directory, read through a CountingStore."""

    label = "local"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tally = Tally()

    def source(self, name: str) -> Store:
        return CountingStore(LocalStore(self.root / name, read_only=True), self.tally)

    def reset(self) -> None:
        self.tally.reset()

    def counts(self) -> tuple[int, int]:
        return self.tally.bytes, self.tally.requests


class Http:
    """The same directory served over loopback HTTP; bytes counted by the server."""

    label = "HTTP"

    def __init__(self, server: ServerHandle) -> None:
        self.server = server

    def source(self, name: str) -> str:
        return f"{self.server.url}/{name}"

    def reset(self) -> None:
        self.server.reset_counters()

    def counts(self) -> tuple[int, int]:
        return self.server.bytes_sent, len(self.server.requests)


# -- the three ways to get level k --------------------------------------------

def block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Reduce y and x by ``f``: mean of f x f blocks (edges replicated), rounded to a's dtype.

    Separable strided sums (rows, then columns) rather than a reshaped
    ``mean``: the same result, several times faster in numpy, so that the
    baseline is not slowed by a naive implementation.
    """
    if f == 1:
        return a
    pad = [(0, 0)] * (a.ndim - 2) + [(0, -a.shape[-2] % f), (0, -a.shape[-1] % f)]
    if any(p for _, p in pad):
        a = np.pad(a, pad, mode="edge")
    # float32 sums of f*f samples are exact while f*f*2**bits is at most 2**24.
    acc = np.float32 if f * f << (8 * a.itemsize) <= 1 << 24 else np.float64
    rows = np.zeros(a.shape[:-2] + (a.shape[-2] // f, a.shape[-1]), acc)
    for i in range(f):
        rows += a[..., i::f, :]
    out = np.zeros(rows.shape[:-1] + (a.shape[-1] // f,), acc)
    for j in range(f):
        out += rows[..., j::f]
    return np.rint(out / (f * f)).astype(a.dtype)


def read_ours(source: Any, k: int) -> np.ndarray:
    return mist_zarr.open(source, scale=k).values


def read_full_downsampled(source: Any, k: int) -> np.ndarray:
    return block_mean(mist_zarr.open(source, scale=0).values, 1 << k)


def read_ome(source: Any, k: int) -> np.ndarray:
    """Open the pyramid's root group, as OME-Zarr readers do, then read one scale.

    The root zarr.json holds the multiscales metadata and (ngff-zarr writes
    it) consolidated metadata, so the scale's array needs no request of its own.
    """
    if isinstance(source, str):
        source = FsspecStore.from_url(source, read_only=True)
    group = zarr.open_group(store=source, mode="r", zarr_format=3)
    return group[f"scale{k}/image"][...]


Reader = Callable[[Any, int], np.ndarray]


@dataclass(frozen=True)
class Cost:
    bytes: int
    requests: int
    seconds: float  # median over the timed runs


def measure(channel: Local | Http, reader: Reader, store: str, k: int,
            repeat: int) -> tuple[Cost, np.ndarray]:
    """One counted run (cold open, warm cache), then ``repeat`` timed runs."""
    channel.reset()
    result = reader(channel.source(store), k)
    nbytes, requests = channel.counts()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        reader(channel.source(store), k)
        times.append(time.perf_counter() - t0)
    return Cost(nbytes, requests, statistics.median(times)), result


# -- writing the two stores ---------------------------------------------------

def dir_bytes(path: Path, keep: Callable[[Path], bool] = lambda p: True) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and keep(p))


def is_meta(p: Path) -> bool:
    return p.name == "zarr.json"


@dataclass(frozen=True)
class OursStorage:
    chunks: int  # image chunks: the one stored copy, level 0
    index: int
    checksum: int
    metadata: int  # zarr.json documents
    levels: int
    seconds: float

    @property
    def overhead(self) -> int:
        return self.index + self.checksum + self.metadata


def write_ours(ds: Dataset, out: Path) -> OursStorage:
    path = out / f"{ds.name}.zarr"
    t0 = time.perf_counter()
    info = mist_zarr.write_image(path, ds.volume, spacing=ds.spacing, overwrite=True)
    seconds = time.perf_counter() - t0
    return OursStorage(
        chunks=dir_bytes(path / "image", lambda p: not is_meta(p)),
        index=dir_bytes(path / "index", lambda p: not is_meta(p)),
        checksum=dir_bytes(path / "checksum", lambda p: not is_meta(p)),
        metadata=dir_bytes(path, is_meta),
        levels=info.levels,
        seconds=seconds,
    )


@dataclass(frozen=True)
class OmeStorage:
    per_level: list[int]  # chunk bytes of scale0 .. scaleN
    metadata: int
    recipe: str  # the calls and the parameters that were used
    seconds: float


def write_ome(ds: Dataset, out: Path, levels: int) -> OmeStorage:
    """An OME-Zarr pyramid by ngff-zarr: its defaults, y and x halved per level, z kept."""
    import ngff_zarr as nz

    path = out / f"{ds.name}.ome.zarr"
    dims = ("z", "y", "x")
    factors = [{"z": 1, "y": 1 << k, "x": 1 << k} for k in range(1, levels + 1)]
    t0 = time.perf_counter()
    image = nz.to_ngff_image(ds.volume, dims=dims, scale=dict(zip(dims, ds.spacing)),
                             axes_units={d: "millimeter" for d in dims})
    multiscales = nz.to_multiscales(image, scale_factors=factors)
    nz.to_ngff_zarr(path, multiscales)
    seconds = time.perf_counter() - t0

    array = json.loads((path / "scale0" / "image" / "zarr.json").read_text())
    chunks = array["chunk_grid"]["configuration"]["chunk_shape"]
    codecs = ", ".join(
        c["name"] + "(" + ", ".join(f"{k}={v}" for k, v in c.get("configuration", {}).items()) + ")"
        for c in array["codecs"]
    )
    version_ = json.loads((path / "zarr.json").read_text())["attributes"]["ome"]["version"]
    recipe = (
        f"to_multiscales(image, scale_factors={factors}) with its default method "
        f"({multiscales.method.value}) and chunks {tuple(chunks)}; to_ngff_zarr(path, "
        f"multiscales) with its default OME-Zarr version {version_} and codecs {codecs}"
    )
    per_level = [dir_bytes(path / f"scale{k}" / "image", lambda p: not is_meta(p))
                 for k in range(levels + 1)]
    return OmeStorage(per_level, dir_bytes(path, is_meta), recipe, seconds)


# -- output -------------------------------------------------------------------

def fmt_bytes(n: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def pct(part: float, whole: float) -> str:
    value = 100 * part / whole
    return f"{value:.1f} %" if value >= 1 else f"{value:.2f} %"


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a plain-text table: first column left-aligned, the others right-aligned."""
    cells = [list(header)] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths)))

    print(f"\n{title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))


def print_environment() -> None:
    import imagecodecs

    from _machine import cpu_model, memory_gib, package_versions

    mem, cpu = memory_gib(), cpu_model()
    print("mist-zarr level benchmark")
    print(f"command:  {shlex.join(sys.orig_argv)}")
    print(f"machine:  {platform.platform()}, {cpu}, {os.cpu_count()} CPUs, {mem:.1f} GiB RAM")
    print(f"python:   {platform.python_version()} ({sys.executable})")
    versions = package_versions(PACKAGES)
    versions.append(imagecodecs.htj2k_version())
    print("packages: " + ", ".join(versions))


# contender -> (reader, suffix of the store it reads)
CONTENDERS: dict[str, tuple[Reader, str]] = {
    "ours": (read_ours, ".zarr"),
    "full": (read_full_downsampled, ".zarr"),
    "ome": (read_ome, ".ome.zarr"),
}
Costs = dict[tuple[str, str, int], Cost]  # (contender, channel label, level) -> cost


def measure_levels(ds: Dataset, levels: int, channels: Sequence[Local | Http],
                   repeat: int) -> tuple[Costs, list[tuple[int, ...]]]:
    """Read every level every way; check the results agree before trusting the numbers."""
    costs: Costs = {}
    shapes = []
    for k in range(levels + 1):
        results = {}
        for what, (reader, suffix) in CONTENDERS.items():
            for channel in channels:
                costs[what, channel.label, k], results[what, channel.label] = measure(
                    channel, reader, ds.name + suffix, k, repeat)
        if k == 0 and not np.array_equal(results["ours", "local"], ds.volume):
            raise AssertionError(f"{ds.name}: level 0 is not the source, bit for bit")
        for (what, where), result in results.items():
            if not np.array_equal(result, results[what, "local"]):
                raise AssertionError(f"{ds.name}: {what} level {k} differs, {where} vs local")
        level_shapes = {r.shape for r in results.values()}
        if len(level_shapes) != 1:
            raise AssertionError(f"{ds.name}: level {k} shapes disagree: {level_shapes}")
        shapes.append(level_shapes.pop())
    return costs, shapes


def print_reads(name: str, costs: Costs, shapes: list[tuple[int, ...]], repeat: int) -> None:
    levels = range(len(shapes))

    def moved(what: str, k: int) -> list[Any]:
        c, c0 = costs[what, "HTTP", k], costs[what, "HTTP", 0]
        return [fmt_bytes(c.bytes), pct(c.bytes, c0.bytes), c.requests]

    table(
        f"{name}: bytes moved to read each level (cold open; HTTP body bytes the server sent)",
        ["level", "shape", "ours", "% of L0", "reqs", "full+down", "OME-Zarr", "% of L0", "reqs"],
        [[f"s{k}", "x".join(map(str, shapes[k])), *moved("ours", k),
          fmt_bytes(costs["full", "HTTP", k].bytes), *moved("ome", k)] for k in levels],
    )
    mismatched = [f"{what} s{k}: local {fmt_bytes(costs[what, 'local', k].bytes)}"
                  for what in CONTENDERS for k in levels
                  if costs[what, "local", k].bytes != costs[what, "HTTP", k].bytes]
    print("local bytes read = HTTP bytes sent in every row" if not mismatched
          else "local bytes read differ from HTTP: " + "; ".join(mismatched))
    table(
        f"{name}: time to open and read each level, median of {repeat} (ms)",
        ["level", "ours local", "ours HTTP", "full+down local", "full+down HTTP",
         "OME local", "OME HTTP"],
        [[f"s{k}"] + [fmt_ms(costs[what, where, k].seconds)
                      for what in CONTENDERS for where in ("local", "HTTP")]
         for k in levels],
    )


def print_storage(ds: Dataset, ours: OursStorage, ome: OmeStorage,
                  shapes: list[tuple[int, ...]]) -> None:
    raw = ds.volume.nbytes
    ours_total = ours.chunks + ours.overhead
    ome_total = sum(ome.per_level) + ome.metadata
    ome_overhead = ome_total - ome.per_level[0]
    table(
        f"{ds.name}: storage (one copy for ours; every level stored for OME-Zarr)",
        ["store", "level 0", "levels >= 1", "index", "checksum", "metadata", "total",
         "overhead vs level 0", "raw / total", "write s"],
        [["raw samples", fmt_bytes(raw), "-", "-", "-", "-", fmt_bytes(raw), "-", "1.00", "-"],
         ["mist-zarr (HTJ2K)", fmt_bytes(ours.chunks), "0", fmt_bytes(ours.index),
          fmt_bytes(ours.checksum), fmt_bytes(ours.metadata), fmt_bytes(ours_total),
          f"{fmt_bytes(ours.overhead)} ({pct(ours.overhead, ours.chunks)})",
          f"{raw / ours_total:.2f}", f"{ours.seconds:.2f}"],
         ["OME-Zarr (ngff-zarr)", fmt_bytes(ome.per_level[0]), fmt_bytes(sum(ome.per_level[1:])),
          "-", "-", fmt_bytes(ome.metadata), fmt_bytes(ome_total),
          f"{fmt_bytes(ome_overhead)} ({pct(ome_overhead, ome.per_level[0])})",
          f"{raw / ome_total:.2f}", f"{ome.seconds:.2f}"]],
    )
    table(
        f"{ds.name}: OME-Zarr stored bytes per level",
        ["level", "shape", "stored", "% of its level 0"],
        [[f"scale{k}", "x".join(map(str, shapes[k])), fmt_bytes(b), pct(b, ome.per_level[0])]
         for k, b in enumerate(ome.per_level)],
    )


def run_dataset(ds: Dataset, out: Path, channels: Sequence[Local | Http], repeat: int) -> None:
    print(f"\n=== {ds.name}: {ds.volume.shape} {ds.volume.dtype}, spacing {ds.spacing} mm "
          f"({ds.note})")
    ours = write_ours(ds, out)
    ome = write_ome(ds, out, ours.levels)
    print(f"OME-Zarr: ngff-zarr {ome.recipe}")
    costs, shapes = measure_levels(ds, ours.levels, channels, repeat)
    print_reads(ds.name, costs, shapes, repeat)
    print_storage(ds, ours, ome, shapes)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="shared data directory (default: ../shared/data or $MIST_DATA)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the stores (default: a temporary directory, removed)")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        raise SystemExit(f"shared data not found at {args.data} (set MIST_DATA or --data)")
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")

    print_environment()
    out = args.out or Path(tempfile.mkdtemp(prefix="mist-bench-levels-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        with serve_in_thread(out) as server:
            print(f"server:   {server.url} serving {out}")
            for load in (load_ct, load_cxr):
                run_dataset(load(args.data), out, (Local(out), Http(server)), args.repeat)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
