"""Core benchmark: lossless ratio and speed of the mist-zarr layout, and library overhead.

Prints figures; it is not a test. On one real CT series, in one process:

1. Codecs side by side on the same volume: the mist-zarr chunk layout (raw
   ``imagecodecs.htj2k_encode`` per slice with the layout's parameters),
   zarr v3's default compressor on a real zarr array, blosc-zstd with
   bitshuffle, gzip of the whole volume as a ``.nii.gz`` holds it, and JPEG-LS
   per slice: stored bytes, lossless ratio, encode and decode MB/s, and a
   bit-exact round-trip check for each.
2. Overhead of the library over raw imagecodecs on the same slices and the
   same thread count: ``write_image`` vs an ``htj2k_encode`` loop,
   ``read_image`` vs an ``htj2k_decode`` loop, and a level-k read through
   ``mist_zarr.open`` vs decoding the level-k prefixes directly. The library
   runs on a local directory and on an in-memory store (the difference is the
   file system's cost). The two sides run alternately (A B A B ...) so that
   machine noise drifts equally; the target is library / raw <= 1.10.
3. The share of each chunk's bytes that each resolution level needs.

Times are medians over ``--repeat`` runs (``time.perf_counter``); MB/s are
computed on raw (uncompressed) bytes, 1 MB = 1e6 bytes.

    python benchmarks/bench_core.py [--data DIR] [--series ct/CRLM-CT-1004] [--repeat 5]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import itertools
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagecodecs
import numcodecs
import numcodecs.blosc
import numpy as np
import pydicom
import zarr
import zarr.core.sync
from zarr.storage import LocalStore, MemoryStore

import mist_zarr
from mist_zarr.layout import encode_kwargs, num_levels

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SERIES = "ct/CRLM-CT-1004"
TARGET = 1.10  # library time / raw codec time
MB = 1e6


# -- input ----------------------------------------------------------------------------


def default_data_dir() -> Path:
    return Path(os.environ.get("MIST_DATA") or REPO.parent / "shared" / "data")


def load_series(directory: Path) -> np.ndarray:
    """Stored pixel values of a single-frame DICOM series, slices sorted by z position."""
    datasets = [pydicom.dcmread(p) for p in sorted(directory.iterdir()) if p.is_file()]
    if not datasets:
        sys.exit(f"no DICOM files in {directory}")
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    # pixel_array holds stored values: RescaleSlope/Intercept are not applied.
    return np.stack([ds.pixel_array for ds in datasets])


# -- timing and threads -------------------------------------------------------------


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Seconds that ``fn(*args)`` takes, and its result."""
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def per_slice(fn: Callable[[Any], Any], items: Sequence[Any], threads: int) -> list[Any]:
    """``fn`` over ``items`` on ``threads`` threads (in the calling thread if 1)."""
    if threads == 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(fn, items))


def default_threads() -> int:
    """The thread count ``mist_zarr.write_image`` uses when not told."""
    return min(32, os.cpu_count() or 1)


@contextlib.contextmanager
def zarr_threads(n: int | None) -> Iterator[None]:
    """Run zarr's chunk I/O and codec calls on ``n`` threads (None: zarr's defaults).

    zarr's synchronous API runs coroutines on one event loop, and stores and
    codecs hand their blocking work to that loop's default executor. Swapping
    the executor is the only way to change the thread count within one process
    (``threading.max_workers`` is read once, when zarr first creates it). The
    fused codec pipeline has its own pool, sized by ``codec_pipeline.max_workers``.
    """
    loop = zarr.core.sync._get_loop()
    pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="bench-zarr")
    loop.set_default_executor(pool)
    try:
        with zarr.config.set({"codec_pipeline.max_workers": n}):
            yield
    finally:
        loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="bench-zarr"))
        pool.shutdown()


# -- 1. codecs side by side -------------------------------------------------------------


@dataclass
class Codec:
    """A lossless coding of the whole volume: ``encode(volume) -> payload`` and back."""

    name: str
    encode: Callable[[np.ndarray], Any]
    decode: Callable[[Any], np.ndarray]
    size: Callable[[Any], int]


def _total_length(parts: Sequence[bytes]) -> int:
    return sum(len(p) for p in parts)


def htj2k_codec(levels: int, threads: int) -> Codec:
    kwargs = encode_kwargs(levels)
    return Codec(
        f"mist-zarr layout: HTJ2K {levels} levels, per slice",
        lambda v: per_slice(lambda s: imagecodecs.htj2k_encode(s, **kwargs), v, threads),
        lambda parts: np.stack(per_slice(imagecodecs.htj2k_decode, parts, threads)),
        _total_length,
    )


def zarr_default_codec(workdir: Path) -> Codec:
    """A real zarr v3 array on disk with zarr's default codecs, one slice per chunk."""
    runs = itertools.count()

    def encode(volume: np.ndarray) -> Path:
        path = workdir / f"zarr-default-{next(runs)}"
        array = zarr.create_array(
            store=path, shape=volume.shape, chunks=(1,) + volume.shape[1:], dtype=volume.dtype,
            fill_value=0,
        )
        array[...] = volume
        return path

    def decode(path: Path) -> np.ndarray:
        return zarr.open_array(path, mode="r")[...]

    def size(path: Path) -> int:
        return sum(p.stat().st_size for p in (path / "c").rglob("*") if p.is_file())

    # Name what zarr actually chose rather than what we believe its default is.
    probe = zarr.create_array(store={}, shape=(1, 8, 8), chunks=(1, 8, 8), dtype="int16")
    chosen = ", ".join(
        f"{c['name']} {c.get('configuration', {})}" for c in (x.to_dict() for x in probe.compressors)
    )
    return Codec(f"zarr v3 default: {chosen}", encode, decode, size)


def blosc_codec(threads: int) -> Codec:
    blosc = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)
    plane: dict[str, Any] = {}

    def encode(volume: np.ndarray) -> list[bytes]:
        plane["shape"], plane["dtype"] = volume.shape[1:], volume.dtype
        return per_slice(blosc.encode, volume, threads)  # typesize = itemsize (2)

    def decode(parts: list[bytes]) -> np.ndarray:
        planes = per_slice(blosc.decode, parts, threads)
        return np.stack([np.frombuffer(p, plane["dtype"]).reshape(plane["shape"]) for p in planes])

    return Codec("blosc zstd clevel 5 bitshuffle (numcodecs), per slice", encode, decode,
                 _total_length)


def gzip_codec(level: int, why: str) -> Codec:
    """gzip of the whole volume's bytes, as a .nii.gz stores it (the 352-byte header aside)."""
    volume_of: dict[str, Any] = {}

    def encode(volume: np.ndarray) -> bytes:
        volume_of["shape"], volume_of["dtype"] = volume.shape, volume.dtype
        return gzip.compress(volume.tobytes(), compresslevel=level, mtime=0)

    def decode(blob: bytes) -> np.ndarray:
        return np.frombuffer(gzip.decompress(blob), volume_of["dtype"]).reshape(volume_of["shape"])

    return Codec(f"gzip -{level} whole volume ({why})", encode, decode, len)


def jpegls_codec(threads: int) -> Codec:
    # CharLS codes unsigned samples. Signed DICOM pixels are JPEG-LS coded as
    # their two's-complement bit pattern (BitsStored = 16 here): the uint16 view.
    def encode(volume: np.ndarray) -> list[bytes]:
        unsigned = volume.view(volume.dtype.str.replace("i", "u"))
        return per_slice(imagecodecs.jpegls_encode, unsigned, threads)

    def decode(parts: list[bytes]) -> np.ndarray:
        return np.stack(per_slice(imagecodecs.jpegls_decode, parts, threads)).view(np.int16)

    return Codec("JPEG-LS lossless (CharLS), per slice", encode, decode, _total_length)


def nibabel_compresslevel() -> int:
    """The gzip level ``nibabel.save`` writes .nii.gz files with."""
    from nibabel.openers import ImageOpener

    return ImageOpener.default_compresslevel


def bench_codecs(volume: np.ndarray, codecs: list[Codec], repeat: int) -> list[dict[str, Any]]:
    rows = []
    for codec in codecs:  # warm up, and check the round trip
        payload = codec.encode(volume)
        decoded = codec.decode(payload)
        rows.append({"codec": codec, "bytes": codec.size(payload), "enc": [], "dec": [],
                     "exact": decoded.dtype == volume.dtype and np.array_equal(decoded, volume)})
    for _ in range(repeat):  # codecs interleaved, so that drift spreads over all of them
        for row in rows:
            codec = row["codec"]
            t_enc, payload = timed(codec.encode, volume)
            t_dec, decoded = timed(codec.decode, payload)
            row["enc"].append(t_enc)
            row["dec"].append(t_dec)
            row["exact"] &= bool(np.array_equal(decoded, volume))
    return rows


def print_codecs(rows: list[dict[str, Any]], raw: int) -> None:
    print(f"{'codec':<58} {'stored MB':>9} {'ratio':>6} {'enc MB/s':>9} {'dec MB/s':>9}  exact")
    print(f"{'raw int16':<58} {raw / MB:>9.2f} {1:>6.2f}")
    for r in rows:
        enc = raw / MB / statistics.median(r["enc"])
        dec = raw / MB / statistics.median(r["dec"])
        print(f"{r['codec'].name:<58} {r['bytes'] / MB:>9.2f} {raw / r['bytes']:>6.2f} "
              f"{enc:>9.0f} {dec:>9.0f}  {'yes' if r['exact'] else 'NO'}")


# -- 2. library overhead over raw imagecodecs ------------------------------------------


@dataclass
class Pair:
    """One operation done by the library (A) and by raw imagecodecs (B)."""

    name: str
    store: str  # where the library reads or writes: "dir" or "memory"
    threads: str
    nbytes: int  # raw bytes the operation produces or consumes
    library: Callable[[], Any]
    raw: Callable[[], Any]
    check: Callable[[Any, Any], bool]  # (library result, raw result) -> correct?
    prepare: Callable[[], None] = lambda: None  # before each library run, not timed


def alternate(pair: Pair, repeat: int) -> dict[str, Any]:
    """One checked warm-up of each side, then A B A B ... ``repeat`` times."""
    pair.prepare()
    exact = pair.check(pair.library(), pair.raw())
    t_lib, t_raw = [], []
    for _ in range(repeat):
        pair.prepare()
        t_lib.append(timed(pair.library)[0])
        t_raw.append(timed(pair.raw)[0])
    return {
        "pair": pair, "exact": exact,
        "lib": statistics.median(t_lib), "raw": statistics.median(t_raw),
        "pairwise": statistics.median(a / b for a, b in zip(t_lib, t_raw)),
    }


class WriteTarget:
    """Where ``write_image`` writes: a fresh, empty store for each call."""

    runs = itertools.count()  # shared, so that directory names never repeat

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind, self.workdir = kind, workdir
        self.store: zarr.abc.store.Store | None = None

    def renew(self) -> None:
        """Make an empty store for the next write (before timing).

        Earlier writes stay until the work folder is removed at the end: deleting
        the last write's files just before the next makes ext4 search its inode
        tables for the new ones (recently deleted inodes), a cost of the
        benchmark's churn that a conversion into a dataset does not pay.
        """
        if self.kind == "memory":
            self.store = MemoryStore()
        else:
            self.store = LocalStore(self.workdir / f"write-{next(self.runs)}")


def chunk_bytes(store: zarr.abc.store.Store, depth: int) -> list[bytes]:
    """The stored image chunks of a one-slice-per-chunk (z, y, x) image, in z order."""
    return [store.get_sync(f"image/c/{z}/0/0").to_bytes() for z in range(depth)]


def overhead_pairs(volume: np.ndarray, images: dict[str, Any], level: int, threads: int,
                   label: str, workdir: Path) -> list[Pair]:
    """Write, full read and level-``level`` read, library vs raw, on ``threads`` threads.

    ``images`` holds the volume already written by the library, by store kind.
    """
    kwargs = encode_kwargs(num_levels(volume.shape[1:]))
    depth = len(volume)
    codestreams = [imagecodecs.htj2k_encode(s, **kwargs) for s in volume]
    index = mist_zarr.read_index(mist_zarr.open_image(images["dir"])[0])  # (z, 1, 1, level)
    prefixes = [cs[: int(index[z, 0, 0, level])] for z, cs in enumerate(codestreams)]

    def raw_encode() -> list[bytes]:
        return per_slice(lambda s: imagecodecs.htj2k_encode(s, **kwargs), volume, threads)

    def raw_decode() -> np.ndarray:
        return np.stack(per_slice(imagecodecs.htj2k_decode, codestreams, threads))

    def raw_level() -> np.ndarray:
        return np.stack(per_slice(lambda p: imagecodecs.htj2k_decode(p, skipres=level),
                                  prefixes, threads))

    def write_pair(kind: str) -> Pair:
        target = WriteTarget(kind, workdir)

        def same_as_raw(info: mist_zarr.ImageInfo, raw: list[bytes]) -> bool:
            # The library's chunks must be the very codestreams raw imagecodecs writes.
            return info.complete and chunk_bytes(target.store, depth) == raw

        return Pair("write_image vs htj2k_encode", kind, label, volume.nbytes,
                    lambda: mist_zarr.write_image(target.store, volume, threads=threads),
                    raw_encode, same_as_raw, prepare=target.renew)

    def read_pair(kind: str, image: Any) -> Pair:
        return Pair("read_image vs htj2k_decode", kind, label, volume.nbytes,
                    lambda: mist_zarr.read_image(image), raw_decode,
                    lambda a, b: np.array_equal(a, volume) and np.array_equal(b, volume))

    def same_level(a: np.ndarray, b: np.ndarray) -> bool:
        return a.dtype == b.dtype and np.array_equal(a, b)

    def level_pair(kind: str, image: Any) -> Pair:
        return Pair(f"open(scale={level}).values vs skipres={level}", kind, label,
                    raw_level().nbytes, lambda: mist_zarr.open(image, scale=level).values,
                    raw_level, same_level)

    def level_chunks_pair(kind: str, image: Any) -> Pair:
        # The same read without opening: the level's chunk reads through zarr and
        # the multiscale store, whose index is already loaded.
        array = zarr.open_array(mist_zarr.MultiscaleStore(image), path=f"s{level}/image", mode="r")
        return Pair(f"  s{level} chunks only (store open)", kind, label, raw_level().nbytes,
                    lambda: array[...], raw_level, same_level)

    return [pair for kind, image in images.items()
            for pair in (write_pair(kind), read_pair(kind, image), level_pair(kind, image),
                         level_chunks_pair(kind, image))]


def print_overhead(rows: list[dict[str, Any]]) -> None:
    print(f"{'operation':<40} {'store':>6} {'threads':>11} {'lib ms':>7} {'raw ms':>7} "
          f"{'lib MB/s':>8} {'raw MB/s':>8} {'ratio':>6} {'pairwise':>8} {f'<={TARGET:.2f}':>6}  exact")
    for r in rows:
        p = r["pair"]
        print(f"{p.name:<40} {p.store:>6} {p.threads:>11} {r['lib'] * 1e3:>7.1f} "
              f"{r['raw'] * 1e3:>7.1f} {p.nbytes / MB / r['lib']:>8.0f} "
              f"{p.nbytes / MB / r['raw']:>8.0f} {r['lib'] / r['raw']:>6.2f} "
              f"{r['pairwise']:>8.2f} {'yes' if r['pairwise'] <= TARGET else 'NO':>6}  "
              f"{'yes' if r['exact'] else 'NO'}")


# -- 3. level prefixes ---------------------------------------------------------------


def print_prefixes(image: Path) -> None:
    group, info = mist_zarr.open_image(image)
    index = mist_zarr.read_index(group).astype(np.float64)
    total = index[..., 0].sum()
    for k in range(info.levels + 1):
        y, x = info.level_shape(k)[-2:]
        print(f"  level {k} ({y:>3} x {x:>3} px): {index[..., k].sum() / MB:6.3f} MB "
              f"= {index[..., k].sum() / total:6.1%}")


# -- main ----------------------------------------------------------------------------


def print_machine() -> None:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        models = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = models[0] if models else cpu
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    print(f"command : {shlex.join(sys.orig_argv)}")
    print(f"machine : {platform.platform()}, {cpu}, {os.cpu_count()} cores "
          f"({usable} usable),{load}")
    print(f"python  : {platform.python_version()}  numpy {np.__version__}  zarr {zarr.__version__}"
          f"  numcodecs {numcodecs.__version__}  mist_zarr {mist_zarr.__version__}")
    print(f"codecs  : imagecodecs {imagecodecs.__version__} ({imagecodecs.htj2k_version()}, "
          f"{imagecodecs.jpegls_version()}, {imagecodecs.zstd_version()}), "
          f"blosc {numcodecs.blosc.VERSION_STRING}, zlib {zlib.ZLIB_RUNTIME_VERSION}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=default_data_dir(),
                        help="shared data directory (default: $MIST_DATA or ../shared/data)")
    parser.add_argument("--series", default=DEFAULT_SERIES,
                        help=f"DICOM series directory under --data (default: {DEFAULT_SERIES})")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per figure (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for the codec table and the first overhead rows; the "
                             "overhead table adds the library's default count")
    parser.add_argument("--level", type=int, default=2, help="level of the low-resolution read")
    parser.add_argument("--tmp", type=Path, default=None,
                        help="parent of the scratch directory (default: the system's)")
    parser.add_argument("--fused", action="store_true",
                        help="use zarr's FusedCodecPipeline (opt-in in zarr 3.4) instead of "
                             "its default BatchedCodecPipeline")
    args = parser.parse_args(argv)
    if args.fused:
        zarr.config.set({"codec_pipeline.path": "zarr.core.codec_pipeline.FusedCodecPipeline"})

    series = args.data / args.series
    if not series.is_dir():
        sys.exit(f"series not found: {series} (give --data or set $MIST_DATA)")
    started = time.perf_counter()
    volume = load_series(series)
    levels = num_levels(volume.shape[1:])
    level = min(args.level, levels)
    numcodecs.blosc.set_nthreads(1)  # parallelism, if any, is per slice as for the others

    print_machine()
    print(f"series  : {series}  {volume.shape} {volume.dtype}, {volume.nbytes / MB:.2f} MB raw, "
          f"values {volume.min()}..{volume.max()}")
    print(f"zarr    : codec pipeline {zarr.config.get('codec_pipeline.path').rsplit('.', 1)[1]}")
    print(f"timing  : median of {args.repeat} runs; MB/s on raw bytes (1 MB = 1e6 B)")

    with tempfile.TemporaryDirectory(prefix="mist-bench-", dir=args.tmp) as tmp:
        workdir = Path(tmp)
        print(f"\n1. Lossless codecs on the same volume, {args.threads} thread(s)")
        codecs = [
            htj2k_codec(levels, args.threads),
            zarr_default_codec(workdir),
            blosc_codec(args.threads),
            gzip_codec(nibabel_compresslevel(), "nibabel.save default"),
            gzip_codec(6, "gzip CLI and dcm2niix -z y default"),
            jpegls_codec(args.threads),
        ]
        with zarr_threads(args.threads):
            print_codecs(bench_codecs(volume, codecs, args.repeat), volume.nbytes)

        images = {"dir": workdir / "image", "memory": MemoryStore()}
        for image in images.values():
            mist_zarr.write_image(image, volume)
        print(f"\n2. Library vs raw imagecodecs on the same slices, A B A B ... "
              f"(target ratio <= {TARGET:.2f})")
        print("   lib: the whole call (zarr metadata, chunk I/O, CRC, prefix index) on a local "
              "directory or an in-memory store")
        print("   raw: imagecodecs calls on in-memory slices / codestreams / level prefixes")
        # (threads for write_image and raw codec loops, label, threads for zarr's executor)
        runs = [(args.threads, str(args.threads), args.threads)]
        if default_threads() != args.threads:
            runs.append((default_threads(), f"default ({default_threads()})", None))
        rows = []
        for threads, label, zarr_n in runs:
            with zarr_threads(zarr_n):
                for pair in overhead_pairs(volume, images, level, threads, label, workdir):
                    rows.append(alternate(pair, args.repeat))
        print_overhead(rows)
        print("   ratio = median lib / median raw; pairwise = median of the per-pair ratios")

        print("\n3. Level prefixes: bytes of level k / level-0 bytes, from the prefix index")
        print_prefixes(images["dir"])
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
