"""Evaluation suite: storage, per-level transfer, image quality and throughput on real data.

One command reproduces the shape of the MIST papers' results (the storage
table, Table 1 / B.1; the per-level tables, B.2-B.9; the per-level figure,
D.1) on the shared data set, and compares mist-zarr with the usual
alternatives on the same samples. It writes ``report.md``, ``results.json``
(every number of the report) and three PNG plots into ``--out``. Run from the
repository root::

    python benchmarks/evaluate.py [--data DIR] [--out docs/results] [--quick]

Datasets, each converted with ``mist_zarr.convert(src, dest)`` into a
temporary dataset root (a dataset whose sources are absent is skipped and
named in the report): ``ct/`` (DICOM CT series), ``mr/dcm_qa_xa30/In``
(Siemens XA30 enhanced multi-frame MR), ``nifti/`` (NIfTI files),
``radiographs/nih-cxr14-png/`` (PNG chest radiographs) and
``radiographs/*.dcm`` (DICOM radiographs).

Method (also written into the report):

* **Original as distributed**: the sum of the sizes of the source files that
  ``convert`` turned into images (DICOM files, ``.nii.gz``, PNG); files it
  skipped as non-images (licence texts) are not counted.
* **This store**: every file of each image group (the HTJ2K chunks, whose
  total is checked equal to ``sum(read_index(image)[..., 0])``, plus the
  ``zarr.json`` documents, the prefix index and the checksums) and the
  dataset root's ``zarr.json``.
* **Bytes to read level k**: counted where they leave storage, by a wrapper
  around zarr's ``LocalStore`` (``CountingStore`` of
  ``benchmarks/bench_levels.py``) during a cold
  ``mist_zarr.open(store, scale=k).values``: the metadata documents, the
  prefix index and, per chunk, the indexed prefix plus the 2 bytes the store
  checks for the next marker. The prefix sum ``sum(index[..., k])`` is
  reported beside it. "The dataset at level k" reads every image at level
  ``min(k, its levels)``: an image with fewer levels is read at its coarsest.
* **Quality of level k** (over the images that have level k): per 2-D slice
  (every plane of the leading axes; a colour plane is one multichannel
  slice), the full-resolution samples (``mist_zarr.read_image``, which checks
  the CRC32C checksums written from the source) and the level-k samples
  (``mist_zarr.open(path, scale=k).values``) are converted to float64 and
  rescaled to 0-1 with the minimum and maximum of the whole full-resolution
  image; level-k samples are not clipped. The reference for k >= 1 is
  ``skimage.transform.resize(full_slice, level_shape, order=1,
  mode="reflect", anti_aliasing=False, preserve_range=True)``: bilinear
  interpolation without pre-filtering, as the papers' bilinear
  downsampling. Its output pixel j samples the input at 2^k j + (2^k - 1) / 2,
  while the level-k wavelet sample j sits on input pixel 2^k j (format.md),
  so the two grids differ by (1 - 2^-k) / 2 level-k pixels; the scores
  include that offset. For k = 0 the reference is the full-resolution slice
  itself. Metrics: ``skimage.metrics.structural_similarity(ref, level,
  data_range=1)`` with its defaults (7x7 uniform window, K1 = 0.01,
  K2 = 0.03; ``channel_axis=-1`` for colour),
  ``peak_signal_noise_ratio(ref, level, data_range=1)`` and MAD, the mean
  absolute difference in 0-1 units. Tables give mean and population SD over
  slices; an infinite PSNR (identical slices) is left out of the PSNR mean and
  counted. "Samples outside full-res range" is the share of level-k samples
  below the full-resolution minimum or above its maximum.
* **Lossless check, independent of mist-zarr's readers**: the source files
  are decoded again (pydicom ``pixel_array``; nibabel
  ``dataobj.get_unscaled()``, transposed to (t, z, y, x);
  ``imagecodecs.png_decode``) and the multiset of SHA-1 digests of their 2-D
  frames (as int64) is compared with that of the stored slices.
* **Peers, on the same samples** (what ``read_image`` returns), each checked
  to round-trip: zarr v3 with its default codec, and with Blosc zstd level 5
  + bitshuffle, chunked one slice per chunk like this store;
  ``dcm2niix -z y`` (DICOM datasets only; the ``.nii.gz`` files, not the JSON
  sidecars); PNG per 2-D slice with ``imagecodecs.png_encode`` at its default
  level (signed 16-bit samples as their unsigned two's-complement view;
  32-bit samples only when their values fit 16 bits); an OME-Zarr pyramid by
  ngff-zarr with its defaults (``to_multiscales`` with y and x halved per
  level as many times as this store has levels, other axes kept;
  ``to_ngff_zarr``). Stored bytes are sums of file sizes. A single-resolution
  peer is read whole at every level; an OME-Zarr level is counted like ours
  (cold open of the root group, then that level's array).
* **Throughput**: wall time of ``convert`` (one run; reading and decoding the
  sources included) against ``imagecodecs.htj2k_encode`` of the same chunks
  with ``mist_zarr.layout.encode_kwargs(levels)``; ``read_image`` against
  ``htj2k_decode`` of the stored chunks; ``open(path, scale=k).values``
  against ``htj2k_decode(prefix, skipres=k)`` of the indexed prefixes. The
  raw side codes in-memory bytes on a pool of ``os.cpu_count()`` threads; the
  library runs at its defaults on the local directory. Library and raw runs
  alternate; times are medians of ``--repeat`` runs; MB/s are MB (10^6 bytes)
  of decoded samples per second. The raw level-k decodes are checked equal to
  the library's arrays.

Needs the ``bench`` extra (matplotlib, scikit-image). ngff-zarr and dcm2niix
are used when installed; otherwise their columns read "n/a", with a note.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import zarr
from bench_levels import CountingStore, Tally  # the per-level benchmark, in this folder
from zarr.storage import LocalStore

import mist_zarr
from mist_zarr.layout import encode_kwargs

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("MIST_DATA", REPO.parent / "shared" / "data"))
DEFAULT_OUT = REPO / "docs" / "results"
PACKAGES = ("mist-zarr", "zarr", "imagecodecs", "numcodecs", "numpy", "xarray", "pydicom",
            "pylibjpeg-openjpeg", "nibabel", "pillow", "scikit-image", "scipy", "matplotlib",
            "ngff-zarr", "itkwasm-downsample", "dcm2niix")
MB = 1e6
POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)  # the raw imagecodecs side


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- datasets -------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    key: str
    title: str
    kind: str  # "dicom", "nifti" or "png": how the lossless check re-reads the sources
    where: str  # the sources, relative to the data directory
    sources: Callable[[Path], list[Path]]


SPECS = (
    Spec("ct", "CT, DICOM series", "dicom", "ct/", lambda d: [d / "ct"]),
    Spec("mr", "MR, enhanced multi-frame DICOM", "dicom", "mr/dcm_qa_xa30/In/",
         lambda d: [d / "mr" / "dcm_qa_xa30" / "In"]),
    Spec("nifti", "NIfTI volumes", "nifti", "nifti/", lambda d: [d / "nifti"]),
    Spec("cxr", "Chest radiographs, PNG", "png", "radiographs/nih-cxr14-png/",
         lambda d: [d / "radiographs" / "nih-cxr14-png"]),
    Spec("rg", "Radiographs, DICOM", "dicom", "radiographs/*.dcm",
         lambda d: sorted((d / "radiographs").glob("*.dcm"))),
)


def present(paths: list[Path]) -> list[Path]:
    return [p for p in paths if p.is_file() or (p.is_dir() and any(p.iterdir()))]


def files_under(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        out.extend([p] if p.is_file() else sorted(
            q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")))
    return out


# -- results --------------------------------------------------------------------------

@dataclass
class LevelQuality:
    ssim: list[float] = field(default_factory=list)
    psnr: list[float] = field(default_factory=list)
    mad: list[float] = field(default_factory=list)
    outside: int = 0  # samples outside the full-resolution image's [min, max]
    samples: int = 0
    notes: set[str] = field(default_factory=set)

    def add(self, other: LevelQuality) -> None:
        self.ssim += other.ssim
        self.psnr += other.psnr
        self.mad += other.mad
        self.outside += other.outside
        self.samples += other.samples
        self.notes |= other.notes

    def summary(self) -> dict[str, Any]:
        finite = [v for v in self.psnr if np.isfinite(v)]
        return {"slices": len(self.ssim),
                "ssim": statistics.fmean(self.ssim) if self.ssim else None,
                "psnr_finite_mean": statistics.fmean(finite) if finite else None,
                "psnr_infinite": len(self.psnr) - len(finite),
                "mad": statistics.fmean(self.mad) if self.mad else None,
                "outside": self.outside, "samples": self.samples}


@dataclass
class ImageResult:
    path: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    levels: int
    original: int  # bytes of its source files
    sample_bytes: int  # decoded samples
    chunk_bytes: int  # the HTJ2K chunk files == sum(index[..., 0])
    meta_bytes: int  # every other file of the image group
    prefix: list[int]  # sum(index[..., k]) per level
    read: list[int] = field(default_factory=list)  # bytes of a cold open(scale=k).values
    requests: list[int] = field(default_factory=list)
    planes: list[tuple[int, int]] = field(default_factory=list)  # (y, x) per level
    quality: list[LevelQuality] = field(default_factory=list)
    gallery: list[np.ndarray] = field(default_factory=list)  # the middle slice per level
    digests: Counter = field(default_factory=Counter)  # SHA-1 of each stored 2-D slice
    raw_encoded: int = 0  # bytes htj2k_encode gives for the same chunks
    t_raw_encode: float = 0.0
    t_read: float = 0.0
    t_raw_decode: float = 0.0
    t_open: list[float] = field(default_factory=list)
    t_raw_level: list[float] = field(default_factory=list)
    peers: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetResult:
    spec: Spec
    images: list[ImageResult]
    convert_seconds: float
    original: int
    root_meta: int  # the dataset root's zarr.json
    problems: list[str]
    warnings: list[str]
    lossless: dict[str, Any]
    dcm2niix: dict[str, Any]
    seconds: float = 0.0  # the whole evaluation of this dataset

    @property
    def levels(self) -> int:
        return max(i.levels for i in self.images)

    @property
    def stored(self) -> int:
        return self.root_meta + sum(i.chunk_bytes + i.meta_bytes for i in self.images)

    @property
    def sample_bytes(self) -> int:
        return sum(i.sample_bytes for i in self.images)

    def at_level(self, k: int) -> list[tuple[ImageResult, int]]:
        """Every image and the level it is read at for "the dataset at level k"."""
        return [(i, min(k, i.levels)) for i in self.images]

    def with_level(self, k: int) -> list[ImageResult]:
        return [i for i in self.images if i.levels >= k]

    def read_bytes(self, k: int) -> int:
        return sum(i.read[j] for i, j in self.at_level(k))

    def prefix_bytes(self, k: int) -> int:
        return sum(i.prefix[j] for i, j in self.at_level(k))

    def ome_read(self, k: int) -> int | None:
        if any("ome_read" not in i.peers for i in self.images):
            return None
        return sum(i.peers["ome_read"][j] for i, j in self.at_level(k))

    def peer(self, name: str) -> int | None:
        """Stored bytes of a peer for the whole dataset (None: not applicable)."""
        if name == "nii":
            return self.dcm2niix.get("bytes")
        values = [i.peers.get(name) for i in self.images]
        return None if any(v is None for v in values) else sum(values)

    def quality(self, k: int) -> LevelQuality:
        q = LevelQuality()
        for i in self.with_level(k):
            q.add(i.quality[k])
        return q


# -- measuring one image ------------------------------------------------------------

def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def planes_of(a: np.ndarray, colour: bool) -> np.ndarray:
    """The array as a stack of 2-D slices (multichannel slices for colour)."""
    tail = 3 if colour else 2
    return a.reshape((-1,) + a.shape[a.ndim - tail:])


def counted_read(root: Path, read: Callable[[Any], np.ndarray]) -> tuple[np.ndarray, int, int]:
    """``read(store)`` through a byte-counting store over ``root``: result, bytes, requests."""
    tally = Tally()
    result = read(CountingStore(LocalStore(root, read_only=True), tally))
    return result, tally.bytes, tally.requests


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired(a: Callable[[], Any], b: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """Median wall times of ``a`` and ``b``, run alternately ``repeat`` times each."""
    ta, tb = [], []
    for _ in range(repeat):
        ta.append(timed(a))
        tb.append(timed(b))
    return statistics.median(ta), statistics.median(tb)


def digest(frame: np.ndarray) -> str:
    a = np.ascontiguousarray(frame).astype(np.int64)
    return hashlib.sha1(repr(a.shape).encode() + a.tobytes()).hexdigest()


def slice_quality(full01: np.ndarray, level01: np.ndarray, k: int, colour: bool,
                  picks: np.ndarray, q: LevelQuality) -> None:
    """SSIM, PSNR and MAD of the picked slices of level k against their reference."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    from skimage.transform import resize

    refs, tests = planes_of(full01, colour), planes_of(level01, colour)
    for i in picks:
        test = tests[i]
        ref = refs[i] if k == 0 else resize(refs[i], test.shape, order=1, mode="reflect",
                                            anti_aliasing=False, preserve_range=True)
        side = min(test.shape[:2])
        win = min(7, side if side % 2 else side - 1)
        if win < 3:
            q.notes.add(f"slices of {side} px are too small for SSIM: left out")
            continue
        if win < 7:
            q.notes.add(f"SSIM window {win} for slices of {side} px")
        q.ssim.append(float(structural_similarity(
            ref, test, data_range=1.0, win_size=win, channel_axis=-1 if colour else None)))
        with warnings.catch_warnings(), np.errstate(divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # MSE 0 -> PSNR inf
            q.psnr.append(float(peak_signal_noise_ratio(ref, test, data_range=1.0)))
        q.mad.append(float(np.mean(np.abs(ref - test))))


def written_chunks(path: Path) -> tuple[zarr.Array, list[tuple[tuple[int, ...], bytes]]]:
    """The image array and (chunk coordinates, stored codestream) of each written chunk."""
    arr = zarr.open_array(LocalStore(path / "image", read_only=True), mode="r")
    chunks = []
    for coords in np.ndindex(*arr.cdata_shape):
        f = path / "image" / arr.metadata.encode_chunk_key(coords)
        if f.exists():
            chunks.append((coords, f.read_bytes()))
    return arr, chunks


def chunk_samples(a: np.ndarray, coords: tuple[int, ...], chunk: Sequence[int], iy: int,
                  ix: int, colour: bool) -> np.ndarray:
    """One chunk's samples as the codec sees them: a plane (plus c), padded with the
    fill value 0 to the chunk shape as zarr pads edge chunks."""
    block = a[tuple(slice(c * n, (c + 1) * n) for c, n in zip(coords, chunk))]
    if block.shape != tuple(chunk):
        block = np.pad(block, [(0, n - s) for n, s in zip(chunk, block.shape)])
    plane = (chunk[iy], chunk[ix]) + ((chunk[-1],) if colour else ())
    return np.ascontiguousarray(block.reshape(plane))


def level_selection(coords: tuple[int, ...], chunk: Sequence[int], shape: Sequence[int],
                    iy: int, ix: int, k: int) -> tuple[slice, ...]:
    """Where chunk ``coords`` lands in the level-k array (y and x divided by 2**k)."""
    sel = []
    for ax, (c, n) in enumerate(zip(coords, chunk)):
        n = -(-n // (1 << k)) if ax in (iy, ix) else n
        sel.append(slice(c * n, min((c + 1) * n, shape[ax])))
    return tuple(sel)


@dataclass
class Image:
    """An image group under evaluation and what every measurement needs of it."""

    path: Path
    info: Any
    full: np.ndarray  # read_image: bit-exact, checksums verified
    index: np.ndarray
    array: zarr.Array
    chunks: list[tuple[tuple[int, ...], bytes]]

    @classmethod
    def open(cls, path: Path) -> Image:
        _, info = mist_zarr.open_image(path)
        array, chunks = written_chunks(path)
        return cls(path, info, mist_zarr.read_image(path), mist_zarr.read_index(path), array,
                   chunks)

    @property
    def colour(self) -> bool:
        return self.info.dims[-1] == "c"

    @property
    def plane_axes(self) -> tuple[int, int]:
        return self.info.dims.index("y"), self.info.dims.index("x")


def measure_image(path: Path, rel: str, original: int, args: argparse.Namespace,
                  scratch: Path, gallery: bool) -> ImageResult:
    im = Image.open(path)
    chunk_bytes = sum(len(b) for _, b in im.chunks)
    if chunk_bytes != int(im.index[..., 0].sum()):
        raise AssertionError(f"{rel}: chunk files hold {chunk_bytes} B, the index says "
                             f"{int(im.index[..., 0].sum())} B")
    res = ImageResult(
        path=rel, dims=tuple(im.info.dims), shape=tuple(im.full.shape), dtype=str(im.full.dtype),
        levels=im.info.levels, original=original, sample_bytes=im.full.nbytes,
        chunk_bytes=chunk_bytes, meta_bytes=dir_bytes(path) - chunk_bytes,
        prefix=[int(im.index[..., k].sum()) for k in range(im.info.levels + 1)],
        digests=Counter(digest(p) for p in planes_of(im.full, im.colour)))
    measure_levels(im, res, args, gallery)
    measure_speed(im, res, args)
    res.peers = measure_peers(im, scratch, args)
    return res


def measure_levels(im: Image, res: ImageResult, args: argparse.Namespace, gallery: bool) -> None:
    """Bytes read, quality and (for the figure) the middle slice of every level."""
    full, colour = im.full, im.colour
    iy, ix = im.plane_axes
    lo, hi = float(full.min()), float(full.max())
    full01 = (full.astype(np.float64) - lo) / (hi - lo) if hi > lo else None
    n = planes_of(full, colour).shape[0]
    picks = np.arange(n) if args.max_slices is None else np.unique(
        np.linspace(0, n - 1, min(n, args.max_slices)).round().astype(int))
    for k in range(im.info.levels + 1):
        values, nbytes, requests = counted_read(
            im.path, lambda store, k=k: mist_zarr.open(store, scale=k).values)
        if k == 0 and not np.array_equal(values, full):
            raise AssertionError(f"{res.path}: open(scale=0) differs from read_image")
        res.read.append(nbytes)
        res.requests.append(requests)
        res.planes.append((values.shape[iy], values.shape[ix]))
        q = LevelQuality(outside=int(np.count_nonzero((values < lo) | (values > hi))),
                         samples=values.size)
        if full01 is None:
            q.notes.add("constant image: no quality metrics")
        else:
            slice_quality(full01, (values.astype(np.float64) - lo) / (hi - lo), k, colour,
                          picks, q)
        res.quality.append(q)
        if gallery:
            res.gallery.append(planes_of(values, colour)[n // 2].copy())


def measure_speed(im: Image, res: ImageResult, args: argparse.Namespace) -> None:
    """Library against raw imagecodecs on the same chunks."""
    info, chunks = im.info, im.chunks
    iy, ix = im.plane_axes
    if info.values.kind != "quantized":  # stored samples are exactly values.encode(full)
        stored, kw = info.values.encode(im.full), encode_kwargs(info.levels)
        samples = [chunk_samples(stored, c, im.array.chunks, iy, ix, im.colour)
                   for c, _ in chunks]

        def encode_all() -> list[bytes]:
            return list(POOL.map(lambda s: imagecodecs.htj2k_encode(s, **kw), samples))

        res.raw_encoded = sum(len(e) for e in encode_all())
        res.t_raw_encode = statistics.median(timed(encode_all) for _ in range(args.repeat))
    streams = [b for _, b in chunks]
    res.t_read, res.t_raw_decode = paired(
        lambda: mist_zarr.read_image(im.path),
        lambda: list(POOL.map(imagecodecs.htj2k_decode, streams)), args.repeat)
    for k in range(info.levels + 1):
        prefixes = [b[:int(im.index[c + (k,)])] for c, b in chunks]

        def decode_all(k: int = k, prefixes: list[bytes] = prefixes) -> list[np.ndarray]:
            return list(POOL.map(lambda p: imagecodecs.htj2k_decode(p, skipres=k), prefixes))

        raw = np.zeros(info.level_shape(k), info.stored_dtype)
        for (coords, _), decoded in zip(chunks, decode_all()):
            sel = level_selection(coords, im.array.chunks, raw.shape, iy, ix, k)
            target = raw[sel]
            raw[sel] = decoded[:target.shape[iy], :target.shape[ix]].reshape(target.shape)
        if not np.array_equal(info.values.decode(raw),
                              mist_zarr.open(str(im.path), scale=k).values):
            raise AssertionError(f"{res.path}: htj2k_decode(skipres={k}) of the prefixes "
                                 f"differs from open(scale={k})")
        t_ours, t_raw = paired(lambda k=k: mist_zarr.open(str(im.path), scale=k).values,
                               decode_all, args.repeat)
        res.t_open.append(t_ours)
        res.t_raw_level.append(t_raw)


# -- peers ------------------------------------------------------------------------------

def measure_peers(im: Image, scratch: Path, args: argparse.Namespace) -> dict[str, Any]:
    full, info = im.full, im.info
    peers: dict[str, Any] = {}
    blosc = [zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")]
    for name, compressors in (("zarr_zstd", "auto"), ("zarr_blosc", blosc)):
        where = scratch / f"{name}.zarr"
        a = zarr.create_array(LocalStore(where), shape=full.shape, chunks=im.array.chunks,
                              dtype=full.dtype, compressors=compressors, fill_value=0,
                              dimension_names=tuple(info.dims))
        a[...] = full
        if not np.array_equal(a[...], full):
            raise AssertionError(f"{name} does not round-trip")
        peers[name] = dir_bytes(where)
        peers[name + "_codecs"] = json.loads((where / "zarr.json").read_text())["codecs"]
        shutil.rmtree(where)
    peers["png"], peers["png_note"] = png_bytes(full, im.colour)
    if args.ome:
        peers.update(ome_zarr(full, info, scratch / "ome.zarr"))
    return peers


def png_bytes(full: np.ndarray, colour: bool) -> tuple[int | None, str]:
    """Bytes of one PNG per 2-D slice (None when PNG cannot hold the samples)."""
    a, note = full, ""
    if a.dtype in (np.int8, np.int16):
        a = a.view(np.dtype(a.dtype.str.replace("i", "u")))
        note = "PNG: signed samples stored as their unsigned two's-complement view"
    elif a.dtype.kind in "iu" and a.dtype.itemsize == 4:
        lo, hi = int(a.min()), int(a.max())
        if 0 <= lo and hi <= 0xFFFF:
            a, note = a.astype(np.uint16), "PNG: 32-bit samples within 0..65535 stored as uint16"
        elif -0x8000 <= lo and hi <= 0x7FFF:
            a = a.astype(np.int16).view(np.uint16)
            note = "PNG: 32-bit samples within the int16 range stored as two's-complement uint16"
        else:
            return None, "PNG: 32-bit samples that do not fit 16 bits: not applicable"
    elif a.dtype.kind != "u" or a.dtype.itemsize > 2:
        return None, f"PNG: no sample type for {a.dtype}: not applicable"
    planes = planes_of(a, colour)
    encoded = list(POOL.map(lambda p: imagecodecs.png_encode(np.ascontiguousarray(p)), planes))
    for p, e in zip(planes, encoded):
        if not np.array_equal(imagecodecs.png_decode(e), p):
            raise AssertionError("PNG does not round-trip")
    return sum(len(e) for e in encoded), note


def ome_zarr(full: np.ndarray, info: Any, where: Path) -> dict[str, Any]:
    """An OME-Zarr pyramid by ngff-zarr's defaults: stored bytes, bytes read per level."""
    import ngff_zarr as nz

    dims = tuple(info.dims)
    spatial = [d for d in dims if d in ("z", "y", "x")]
    spacing = dict(zip(dims, info.spacing))
    factors = [{d: (1 << k if d in ("y", "x") else 1) for d in spatial}
               for k in range(1, info.levels + 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = nz.to_ngff_image(full, dims=dims, scale={d: spacing[d] for d in spatial},
                                 axes_units={d: "millimeter" for d in spatial})
        multiscales = nz.to_multiscales(image, scale_factors=factors)
        nz.to_ngff_zarr(where, multiscales)
    paths = [d.path for d in multiscales.metadata.datasets]
    read = []
    for k, p in enumerate(paths):
        values, nbytes, _ = counted_read(
            where, lambda store, p=p: zarr.open_group(store=store, mode="r", zarr_format=3)[p][...])
        if k == 0:  # ngff-zarr may move c first: compare in its axis order
            order = [dims.index(d) for d in multiscales.images[0].dims]
            if not np.array_equal(values, np.transpose(full, order)):
                raise AssertionError("OME-Zarr level 0 does not round-trip")
        read.append(nbytes)
    array = json.loads((where / paths[0] / "zarr.json").read_text())
    recipe = {
        "method": multiscales.method.value,
        "chunks": array["chunk_grid"]["configuration"]["chunk_shape"],
        "codecs": array["codecs"],
        "version": json.loads((where / "zarr.json").read_text())["attributes"]["ome"]["version"],
    }
    stored = dir_bytes(where)
    shutil.rmtree(where)
    return {"ome": stored, "ome_read": read, "ome_recipe": recipe}


def dcm2niix_peer(sources: list[Path], work: Path) -> dict[str, Any]:
    """Sizes of the .nii.gz files ``dcm2niix -z y`` writes for the sources."""
    try:
        import dcm2niix
    except ImportError:
        return {"bytes": None, "note": "dcm2niix not installed"}
    out = work / "out"
    out.mkdir(parents=True)
    folders = [p for p in sources if p.is_dir()]
    loose = [p for p in sources if p.is_file()]
    if loose:  # dcm2niix converts folders: link the single files into one
        inputs = work / "in"
        inputs.mkdir()
        for p in loose:
            (inputs / p.name).symlink_to(p.resolve())
        folders.append(inputs)
    for folder in folders:
        run = subprocess.run([dcm2niix.bin, "-z", "y", "-o", str(out), str(folder)],
                             capture_output=True, text=True, check=False)
        if run.returncode != 0:
            return {"bytes": None, "note": f"dcm2niix exited with {run.returncode}"}
    images = sorted(out.glob("*.nii.gz"))
    return {"bytes": sum(p.stat().st_size for p in images), "files": len(images),
            "sidecars": sum(p.stat().st_size for p in out.glob("*.json")), "note": ""}


# -- lossless check against independently decoded sources ---------------------------

def source_frames(kind: str, files: list[Path]) -> tuple[Counter, list[str]]:
    """SHA-1 digests of every 2-D frame of the source files, decoded without mist-zarr."""
    frames: Counter = Counter()
    notes: list[str] = []
    if kind == "dicom":
        import pydicom

        for f in files:
            ds = pydicom.dcmread(f)
            if "PixelData" not in ds:
                continue
            a = ds.pixel_array
            many = int(ds.get("NumberOfFrames", 1) or 1) > 1
            frames.update(digest(frame) for frame in (a if many else a[None]))
    elif kind == "nifti":
        import nibabel as nib

        for f in files:
            a = np.asarray(nib.load(f).dataobj.get_unscaled()).T  # (x, y, z, t) -> (t, z, y, x)
            frames.update(digest(frame) for frame in a.reshape((-1,) + a.shape[-2:]))
    else:
        grey = 0
        for f in files:
            a = imagecodecs.png_decode(f.read_bytes())
            if a.ndim == 3 and a.shape[2] in (2, 4) and np.all(a[..., -1] == np.iinfo(a.dtype).max):
                a = a[..., :-1]  # opaque alpha
            if a.ndim == 3 and all(np.array_equal(a[..., 0], a[..., c]) for c in range(a.shape[2])):
                grey += a.shape[2] > 1
                a = a[..., 0]
            frames[digest(a)] += 1
        if grey:
            notes.append(f"{grey} PNG(s) with equal colour channels and opaque alpha compared on "
                         "one channel (the converter stores them as grey and records it)")
    return frames, notes


# -- one dataset ------------------------------------------------------------------------

def run_dataset(spec: Spec, sources: list[Path], work: Path,
                args: argparse.Namespace) -> DatasetResult:
    dest = work / spec.key
    log(f"[{spec.key}] convert {spec.where}")
    t0 = time.perf_counter()
    report = mist_zarr.convert(sources if len(sources) > 1 else sources[0], dest)
    convert_seconds = time.perf_counter() - t0
    problems = [f"{Path(p.source).name}: {p.reason} ({p.kind})" for p in report.problems]
    not_images = {Path(p.source).resolve() for p in report.problems}
    files = [f for f in files_under(sources) if f.resolve() not in not_images]
    bytes_in = {s.path: s.bytes_in for s in report.converted}
    rows = mist_zarr.list_images(dest)
    if not rows:
        raise SystemExit(f"{spec.key}: nothing was converted: {problems}")
    # the figure shows the middle slice of the image with the most levels (first by path)
    pick = max(rows, key=lambda r: r["levels"])["path"]
    scratch = work / "peers"
    scratch.mkdir(exist_ok=True)
    images = []
    for row in rows:
        log(f"[{spec.key}]   {row['path']} {row['shape']} {row['dtype']} levels {row['levels']}")
        images.append(measure_image(dest / row["path"], row["path"], bytes_in[row["path"]],
                                    args, scratch, gallery=row["path"] == pick))

    log(f"[{spec.key}] lossless check against the sources")
    expected, notes = source_frames(spec.kind, files)
    stored = sum((i.digests for i in images), Counter())
    lossless = {"source_frames": sum(expected.values()), "stored_slices": sum(stored.values()),
                "identical": expected == stored, "missing": sum((expected - stored).values()),
                "extra": sum((stored - expected).values()), "notes": notes}

    nii: dict[str, Any] = {"bytes": None, "note": "not a DICOM dataset"}
    if spec.kind == "dicom":
        log(f"[{spec.key}] dcm2niix -z y")
        nii = dcm2niix_peer(sources, work / f"{spec.key}-dcm2niix")
    original = sum(f.stat().st_size for f in files)
    if original != sum(i.original for i in images):
        problems.append(f"source files total {original} B, the converter counted "
                        f"{sum(i.original for i in images)} B")
    return DatasetResult(spec, images, convert_seconds, original,
                         (dest / "zarr.json").stat().st_size, problems,
                         sorted({w for s in report.converted for w in s.warnings}), lossless, nii)


# -- formatting ---------------------------------------------------------------------------

def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def pct(part: float | None, whole: float | None) -> str:
    if part is None or not whole:
        return "n/a"
    v = 100 * part / whole
    return f"{v:.1f} %" if abs(v) >= 1 else f"{v:.2f} %"


def mean_sd(values: Sequence[float], digits: int) -> str:
    if not values:
        return "n/a"
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def psnr_cell(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    finite = [v for v in values if np.isfinite(v)]
    inf = len(values) - len(finite)
    if not finite:
        return f"∞ (all {inf})"
    return mean_sd(finite, 2) + (f" ({inf} ∞ left out)" if inf else "")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table; ``align`` has one letter per column, l or r (default: l r r …)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def plane_text(planes: Iterable[tuple[int, int]]) -> str:
    unique = sorted(set(planes), key=lambda p: (-p[0] * p[1], p))
    if len(unique) <= 2:
        return ", ".join(f"{y}x{x}" for y, x in unique)
    return f"{len(unique)} sizes, {unique[-1][0]}x{unique[-1][1]} to {unique[0][0]}x{unique[0][1]}"


def machine() -> dict[str, str]:
    from _machine import cpu_model, memory_gib

    cpu, mem = cpu_model(), memory_gib()
    try:
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": f"{mem:.1f} GiB",
            "platform": platform.platform(), "python": platform.python_version(), "load": load}


def versions() -> list[str]:
    from _machine import package_versions

    out = package_versions(PACKAGES)
    out.append(imagecodecs.htj2k_version())
    try:
        import dcm2niix

        words = subprocess.run([dcm2niix.bin, "-v"], capture_output=True, text=True,
                               check=False).stdout.split()
        out.append(f"dcm2niix binary {words[-1]}" if words else "dcm2niix binary (unknown)")
    except (ImportError, OSError):
        pass
    return out


def data_text(path: Path) -> str:
    """The data directory relative to the repository, when it is nearby (no local paths)."""
    rel = os.path.relpath(path.resolve(), REPO)
    return rel if rel.count("..") <= 2 else path.name


def git_state() -> str:
    try:
        run = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10,
                             check=False)
        return run.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# -- the report ----------------------------------------------------------------------------

PEERS = (("zarr_zstd", "zarr + default codec"), ("zarr_blosc", "zarr + Blosc zstd bitshuffle"),
         ("nii", ".nii.gz (dcm2niix -z y)"), ("png", "PNG per slice"),
         ("ome", "OME-Zarr (ngff-zarr), all levels"))


def report_header(args: argparse.Namespace, command: str, seconds: float,
                  skipped: list[str]) -> list[str]:
    m = machine()
    quick = (f" (`--quick`: {args.repeat} timed run, at most {args.max_slices} slices per "
             "image for the quality metrics)") if args.quick else ""
    out = [
        "# mist-zarr evaluation report\n",
        ("Written by `benchmarks/evaluate.py`; every number below was measured in this run. "
         "MB = 10^6 bytes, kB = 10^3 bytes. The method is at the end.\n"),
        f"* command, from the repository root: `{command}`",
        (f"* date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; repository at "
         f"`{git_state()}`; run time {seconds:.0f} s{quick}"),
        (f"* machine: {m['cpu']}, {m['cores']} cores, {m['memory']} RAM, {m['platform']}, "
         f"Python {m['python']}; load average at the end of the run {m['load']}"),
        f"* libraries: {', '.join(versions())}",
        f"* data directory: `{data_text(args.data)}`; timed runs per measurement: {args.repeat}\n",
    ]
    if skipped:
        out.append("Datasets not evaluated: " + "; ".join(skipped) + ".\n")
    return out


def report_datasets(results: list[DatasetResult]) -> list[str]:
    rows = []
    for ds in results:
        shapes = sorted({"x".join(map(str, i.shape)) + " " + i.dtype for i in ds.images})
        rows.append([ds.spec.key, ds.spec.title, f"`{ds.spec.where}`", len(ds.images),
                     "; ".join(shapes) if len(shapes) <= 3 else
                     f"{len(shapes)} shapes, e.g. {shapes[0]}",
                     ", ".join(str(n) for n in sorted({i.levels for i in ds.images})),
                     f"{ds.seconds:.0f}"])
    out = ["## Datasets\n",
           md_table(["dataset", "what", "sources", "images", "shapes (array order), dtype",
                     "levels", "evaluation s"], rows, "lllrllr"), ""]
    out += [f"* {ds.spec.key}: {p}" for ds in results for p in ds.problems]
    out += [f"* {ds.spec.key}, converter warning: {n}" for ds in results for n in ds.warnings]
    out.append("")
    out.append("## Lossless check\n")
    out.append("The source files decoded again without mist-zarr (pydicom, nibabel, imagecodecs) "
               "and compared with the stored slices as multisets of SHA-1 digests of 2-D frames.\n")
    rows = []
    for ds in results:
        lo = ds.lossless
        rows.append([ds.spec.key, lo["source_frames"], lo["stored_slices"],
                     "yes" if lo["identical"] else
                     f"NO ({lo['missing']} missing, {lo['extra']} extra)",
                     "; ".join(lo["notes"]) or "-"])
    out += [md_table(["dataset", "source frames", "stored slices", "bit-identical", "notes"],
                     rows, "lrrll"), ""]
    return out


def report_storage(results: list[DatasetResult], args: argparse.Namespace,
                   plots: dict[str, str]) -> list[str]:
    rows = []
    for ds in results:
        chunks = sum(i.chunk_bytes for i in ds.images)
        rows.append([ds.spec.key, fmt_bytes(ds.original), fmt_bytes(chunks),
                     fmt_bytes(ds.stored - chunks), fmt_bytes(ds.stored),
                     pct(ds.original - ds.stored, ds.original), f"{ds.original / ds.stored:.2f}"])
    original, stored = sum(ds.original for ds in results), sum(ds.stored for ds in results)
    rows.append(["**total**", f"**{fmt_bytes(original)}**", "", "", f"**{fmt_bytes(stored)}**",
                 f"**{pct(original - stored, original)}**", f"**{original / stored:.2f}**"])
    out = ["## Storage (Table 1 / B.1 shape)\n",
           md_table(["dataset", "original as distributed", "this store: HTJ2K chunks",
                     "metadata (zarr.json, index, checksums)", "this store: total", "saved",
                     "original / store"], rows), "",
           "Peers on the same samples (stored bytes, all levels):\n"]
    rows = [[ds.spec.key, fmt_bytes(ds.sample_bytes), fmt_bytes(ds.stored)]
            + [fmt_bytes(ds.peer(name)) for name, _ in PEERS] for ds in results]
    out += [md_table(["dataset", "raw samples", "this store"] + [t for _, t in PEERS], rows), ""]

    notes = sorted({i.peers["png_note"] for ds in results for i in ds.images
                    if i.peers["png_note"]})
    for ds in results:
        nii = ds.dcm2niix
        if nii.get("bytes") is not None:
            notes.append(f"{ds.spec.key}: dcm2niix wrote {nii['files']} .nii.gz file(s) (and "
                         f"{fmt_bytes(nii['sidecars'])} of JSON sidecars, not counted)")
        elif ds.spec.kind == "dicom":
            notes.append(f"{ds.spec.key}: .nii.gz n/a: {nii['note']}")
    notes.append(".nii.gz (dcm2niix) only for the DICOM datasets")
    notes.append("the peers hold the samples only; this store's metadata also holds the source "
                 "header (DICOM JSON model without pixel data, NIfTI header, PNG text) in each "
                 "image's zarr.json, which every open reads")
    if not args.ome:
        notes.append("OME-Zarr: ngff-zarr not installed")
    first = results[0].images[0].peers
    notes.append(f"zarr default codecs: `{json.dumps(first['zarr_zstd_codecs'])}`")
    notes.append(f"Blosc codecs: `{json.dumps(first['zarr_blosc_codecs'])}`")
    if "ome_recipe" in first:
        r = first["ome_recipe"]
        notes.append(f"OME-Zarr {r['version']} by ngff-zarr: `to_multiscales` default method "
                     f"`{r['method']}`, chunks {r['chunks']} (first image), codecs "
                     f"`{json.dumps(r['codecs'])}`; its reduced levels have floor(N / 2^k) "
                     "samples where this store has ceil(N / 2^k)")
    same = all(i.raw_encoded == i.chunk_bytes for ds in results for i in ds.images)
    notes.append("`htj2k_encode(chunk, **encode_kwargs(levels))` gives "
                 + ("the stored number of bytes for every image" if same else
                    "a different number of bytes than stored for some images (results.json)"))
    out += [f"* {n}" for n in notes] + [""]
    if "storage" in plots:
        out.append(f"![bytes to read each level, this store and the peers]({plots['storage']})\n")
    return out


def report_levels(results: list[DatasetResult]) -> list[str]:
    out = ["## Bytes to read each level\n",
           ("The dataset at level k: every image at level min(k, its levels). `prefix bytes`: "
            "sum(index[..., k]); `bytes read`: counted bytes of a cold "
            "`mist_zarr.open(store, scale=k).values` (metadata, index and prefixes); the "
            "percentages use `bytes read`. A single-resolution peer reads all its bytes at every "
            "level.\n")]
    for ds in results:
        rows = []
        for k in range(ds.levels + 1):
            at = ds.with_level(k)
            extra = len(ds.images) - len(at)
            rows.append([
                f"s{k}", plane_text(i.planes[k] for i in at),
                f"{len(at)}" + (f" (+{extra} at coarsest)" if extra else ""),
                fmt_bytes(ds.prefix_bytes(k)), fmt_bytes(ds.read_bytes(k)),
                pct(ds.read_bytes(k), ds.original), pct(ds.read_bytes(k), ds.read_bytes(0)),
                fmt_bytes(ds.ome_read(k)),
                *(fmt_bytes(ds.peer(n)) for n in ("zarr_zstd", "zarr_blosc", "nii", "png"))])
        out += [f"### {ds.spec.key}: {ds.spec.title}\n",
                md_table(["level", "plane", "images", "prefix bytes", "bytes read",
                          "% of original", "% of level 0", "OME-Zarr read", "zarr+zstd",
                          "zarr+blosc", ".nii.gz", "PNG"], rows, "llr" + "r" * 9), ""]
    return out


def report_quality(results: list[DatasetResult], plots: dict[str, str]) -> list[str]:
    out = ["## Image quality of each level (Tables B.2-B.9 shape)\n",
           ("Level-k slice against bilinear downsampling of the full-resolution slice "
            "(`skimage.transform.resize`, order=1, anti_aliasing=False), values scaled to 0-1 by "
            "the full-resolution image's minimum and maximum; mean ± SD over the slices of the "
            "images that have level k. Level 0 is compared with the full-resolution slice.\n")]
    for ds in results:
        rows = []
        for k in range(ds.levels + 1):
            q = ds.quality(k)
            rows.append([f"s{k}", plane_text(i.planes[k] for i in ds.with_level(k)),
                         len(ds.with_level(k)), len(q.ssim), mean_sd(q.ssim, 4),
                         psnr_cell(q.psnr), mean_sd(q.mad, 5), pct(q.outside, q.samples)])
        out += [f"### {ds.spec.key}: {ds.spec.title}\n",
                md_table(["level", "plane", "images", "slices", "SSIM", "PSNR (dB)", "MAD (0-1)",
                          "samples outside full-res range"], rows, "llrrrrrr")]
        notes = sorted({n for k in range(ds.levels + 1) for n in ds.quality(k).notes})
        out += [""] + [f"* {n}" for n in notes] + ([""] if notes else [])
    if "quality" in plots:
        out.append(f"![SSIM and PSNR per level]({plots['quality']})\n")
    if "gallery" in plots:
        out.append("One slice per dataset at every level (Figure D.1 shape): the middle slice of "
                   "the dataset's image with the most levels (first by path); every level drawn "
                   "at the same display size with nearest-neighbour pixels; display window from "
                   "the 0.5th to the 99.5th percentile of the full-resolution slice.\n")
        out.append(f"![one slice per dataset at every level]({plots['gallery']})\n")
    return out


def report_speed(results: list[DatasetResult]) -> list[str]:
    rows = []
    for ds in results:
        mb = ds.sample_bytes / MB
        enc = sum(i.t_raw_encode for i in ds.images)
        rd = sum(i.t_read for i in ds.images)
        dec = sum(i.t_raw_decode for i in ds.images)
        rows.append([ds.spec.key, f"{mb:.1f}", f"{ds.convert_seconds:.2f}",
                     f"{mb / ds.convert_seconds:.1f}",
                     f"{mb / enc:.0f}" if enc else "n/a",
                     f"{ds.convert_seconds / enc:.1f}" if enc else "n/a",
                     f"{mb / rd:.0f}", f"{mb / dec:.0f}", f"{rd / dec:.2f}"])
    out = ["## Throughput\n",
           (f"Library against raw imagecodecs on the same chunks (in-memory bytes, "
            f"{os.cpu_count()} threads); ratio = library time / raw time. `convert` is one run "
            "and includes reading and decoding the sources; the raw side only encodes.\n"),
           md_table(["dataset", "samples MB", "convert s", "convert MB/s", "htj2k_encode MB/s",
                     "convert / encode", "read_image MB/s", "htj2k_decode MB/s",
                     "read_image / decode"], rows), "",
           ("Level reads: `open(path, scale=k).values` against `htj2k_decode(prefix, skipres=k)`, "
            "summed over the images that have level k:\n")]
    rows = []
    for ds in results:
        for k in range(ds.levels + 1):
            at = ds.with_level(k)
            ours, raw = sum(i.t_open[k] for i in at), sum(i.t_raw_level[k] for i in at)
            rows.append([ds.spec.key, f"s{k}", len(at), f"{ours * 1e3:.1f}", f"{raw * 1e3:.1f}",
                         f"{ours / raw:.1f}"])
    out += [md_table(["dataset", "level", "images", "open(scale=k).values ms", "raw decode ms",
                      "ratio"], rows), ""]
    return out


def report_images(results: list[DatasetResult]) -> list[str]:
    rows = []
    for ds in results:
        for i in ds.images:
            stored = i.chunk_bytes + i.meta_bytes
            rows.append([ds.spec.key, f"`{i.path}`", "x".join(map(str, i.shape)), i.dtype,
                         i.levels, fmt_bytes(i.original), fmt_bytes(i.chunk_bytes),
                         fmt_bytes(i.meta_bytes), pct(i.original - stored, i.original),
                         " / ".join(pct(b, i.read[0]) for b in i.read[1:]) or "-"])
    out = ["## Per image\n", "<details><summary>storage and bytes read per image</summary>\n",
           md_table(["dataset", "image", "shape", "dtype", "levels", "original", "HTJ2K chunks",
                     "metadata", "saved", "read s1 / s2 / … as % of s0"], rows, "llllrrrrrl"),
           "\n</details>\n"]
    rows = []
    for ds in results:
        for i in ds.images:
            qs = [q.summary() for q in i.quality[1:]]
            rows.append([
                ds.spec.key, f"`{i.path}`", i.dtype,
                " / ".join("n/a" if q["ssim"] is None else f"{q['ssim']:.4f}" for q in qs) or "-",
                " / ".join("n/a" if q["psnr_finite_mean"] is None else
                           f"{q['psnr_finite_mean']:.2f}" for q in qs) or "-",
                " / ".join(pct(q["outside"], q["samples"]) for q in qs) or "-"])
    out += ["<details><summary>quality per image, levels s1 / s2 / …</summary>\n",
            md_table(["dataset", "image", "dtype", "SSIM", "PSNR (dB)",
                      "samples outside full-res range"], rows, "lllrrr"),
            "\n</details>\n"]
    return out


def write_report(results: list[DatasetResult], skipped: list[str], args: argparse.Namespace,
                 command: str, seconds: float, plots: dict[str, str]) -> str:
    method = __doc__.split("Method (also written into the report):", 1)[1]
    method = method.split("Needs the ``bench`` extra")[0].strip().replace("``", "`")
    return "\n".join([
        *report_header(args, command, seconds, skipped),
        *report_datasets(results),
        *report_storage(results, args, plots),
        *report_levels(results),
        *report_quality(results, plots),
        *report_speed(results),
        *report_images(results),
        "## Method\n", method, "",
    ])


# -- plots --------------------------------------------------------------------------------

def make_plots(results: list[DatasetResult], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def save(fig: Any, name: str) -> str:
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        return name

    files = {}
    # bytes to read the dataset at each level: this store and OME-Zarr by level, the
    # single-resolution peers as horizontal lines
    cols = min(len(results), 3)
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    legend: dict[str, Any] = {}
    for ax, ds in zip(axes.flat, results):
        ks = list(range(ds.levels + 1))
        ax.plot(ks, [ds.read_bytes(k) / MB for k in ks], "o-", color="C0", lw=2,
                label="this store (bytes read)")
        if ds.ome_read(0) is not None:
            ax.plot(ks, [ds.ome_read(k) / MB for k in ks], "s--", color="C1",
                    label="OME-Zarr (bytes read)")
        for label, value, colour, style in (
                ("original as distributed", ds.original, "k", ":"),
                ("zarr + zstd", ds.peer("zarr_zstd"), "C2", "-."),
                ("zarr + blosc", ds.peer("zarr_blosc"), "C3", "-."),
                (".nii.gz (dcm2niix)", ds.peer("nii"), "C4", "--"),
                ("PNG per slice", ds.peer("png"), "C5", "--")):
            if value:
                ax.axhline(value / MB, color=colour, ls=style, lw=1, label=label)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(ks)
        ax.set_xticklabels([f"s{k}\n{max(max(i.planes[min(k, i.levels)]) for i in ds.images)} px"
                            for k in ks], fontsize=8)
        ax.set_title(f"{ds.spec.key}: {ds.spec.title}", fontsize=9)
        ax.set_ylabel("MB read for the dataset", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.08 if rows > 1 else 0.14, 1, 1))
    files["storage"] = save(fig, "bytes_per_level.png")

    # SSIM and PSNR per level
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for c, ds in enumerate(results):
        ks = list(range(1, ds.levels + 1))
        summaries = [ds.quality(k).summary() for k in ks]
        a1.plot(ks, [s["ssim"] if s["ssim"] is not None else np.nan for s in summaries], "o-",
                color=f"C{c}", label=ds.spec.key)
        a2.plot(ks, [s["psnr_finite_mean"] if s["psnr_finite_mean"] is not None else np.nan
                     for s in summaries], "o-", color=f"C{c}", label=ds.spec.key)
    for ax, name in ((a1, "SSIM"), (a2, "PSNR (dB)")):
        ax.set_xlabel("level k (level 0: SSIM 1, PSNR ∞)")
        ax.set_ylabel(f"{name} vs bilinear downsampling", fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    files["quality"] = save(fig, "quality_per_level.png")

    # Figure D.1 shape: rows = datasets, columns = levels, same display size per cell
    shown = [(ds, next(i for i in ds.images if i.gallery)) for ds in results
             if any(i.gallery for i in ds.images)]
    cols = max(image.levels for _, image in shown) + 1
    fig, axes = plt.subplots(len(shown), cols, figsize=(1.55 * cols, 1.7 * len(shown)),
                             squeeze=False)
    for r, (ds, image) in enumerate(shown):
        lo, hi = np.percentile(image.gallery[0].astype(np.float64), [0.5, 99.5])
        for k in range(cols):
            ax = axes[r, k]
            ax.set_xticks([])
            ax.set_yticks([])
            if k > image.levels:
                ax.axis("off")
                continue
            a = np.clip((image.gallery[k].astype(np.float64) - lo) / (hi - lo or 1), 0, 1)
            ax.imshow(a, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"s{k} {a.shape[0]}x{a.shape[1]}", fontsize=7)
            if k == 0:
                ax.set_ylabel(ds.spec.key, fontsize=8)
    fig.tight_layout(pad=0.3)
    files["gallery"] = save(fig, "levels_gallery.png")
    return files


# -- main -----------------------------------------------------------------------------------

def results_json(results: list[DatasetResult]) -> dict[str, Any]:
    return {ds.spec.key: {
        "title": ds.spec.title, "sources": ds.spec.where, "original": ds.original,
        "stored": ds.stored, "samples": ds.sample_bytes, "seconds": ds.seconds,
        "convert_seconds": ds.convert_seconds, "lossless": ds.lossless, "problems": ds.problems,
        "peers": {name: ds.peer(name) for name, _ in PEERS}, "dcm2niix": ds.dcm2niix,
        "levels": [{"level": k, "images": len(ds.with_level(k)), "prefix": ds.prefix_bytes(k),
                    "read": ds.read_bytes(k), "ome_read": ds.ome_read(k),
                    **ds.quality(k).summary()} for k in range(ds.levels + 1)],
        "images": [{
            "path": i.path, "shape": i.shape, "dtype": i.dtype, "levels": i.levels,
            "original": i.original, "chunks": i.chunk_bytes, "metadata": i.meta_bytes,
            "prefix": i.prefix, "read": i.read, "requests": i.requests,
            "raw_encoded": i.raw_encoded, "quality": [q.summary() for q in i.quality],
            "seconds": {"read_image": i.t_read, "raw_decode": i.t_raw_decode,
                        "raw_encode": i.t_raw_encode, "open_level": i.t_open,
                        "raw_level": i.t_raw_level},
            "peers": {k: v for k, v in i.peers.items() if not k.endswith(("_codecs", "_recipe"))},
        } for i in ds.images],
    } for ds in results}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="shared data directory (default: ../shared/data or $MIST_DATA)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="where report.md, results.json and the plots go "
                             "(default: docs/results)")
    parser.add_argument("--datasets", default=",".join(s.key for s in SPECS),
                        help="comma-separated subset of: " + ", ".join(s.key for s in SPECS))
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--max-slices", type=int, default=None,
                        help="quality metrics on at most N evenly spaced slices per image")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: --repeat 1 and --max-slices 4")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the converted datasets here (default: a temporary directory)")
    given = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(given)
    if args.quick:
        args.repeat, args.max_slices = 1, args.max_slices or 4
    if args.repeat < 1 or (args.max_slices is not None and args.max_slices < 1):
        parser.error("--repeat and --max-slices must be at least 1")
    if not args.data.is_dir():
        raise SystemExit(f"data directory not found: {args.data} (set MIST_DATA or --data)")
    wanted = [k.strip() for k in args.datasets.split(",") if k.strip()]
    unknown = set(wanted) - {s.key for s in SPECS}
    if unknown:
        parser.error(f"unknown dataset(s): {', '.join(sorted(unknown))}")
    try:
        import ngff_zarr  # noqa: F401
        args.ome = True
    except ImportError:
        args.ome = False

    if args.work is not None and args.work.exists() and any(args.work.iterdir()):
        parser.error(f"--work {args.work} is not empty")
    t_start = time.perf_counter()
    command = shlex.join(["python", "benchmarks/evaluate.py", *given])
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="mist-evaluate-"))
    work.mkdir(parents=True, exist_ok=True)
    results, skipped = [], []
    try:
        for spec in SPECS:
            if spec.key not in wanted:
                continue
            sources = present(spec.sources(args.data))
            if not sources:
                skipped.append(f"{spec.key} (no sources at `{spec.where}`)")
                log(f"[{spec.key}] skipped: no sources at {spec.where}")
                continue
            t0 = time.perf_counter()
            results.append(run_dataset(spec, sources, work, args))
            results[-1].seconds = time.perf_counter() - t0
            log(f"[{spec.key}] done in {results[-1].seconds:.0f} s")
        if not results:
            raise SystemExit(f"no dataset found under {args.data}")
        log("plots and report")
        plots = make_plots(results, args.out)
        seconds = time.perf_counter() - t_start
        (args.out / "report.md").write_text(
            write_report(results, skipped, args, command, seconds, plots) + "\n")
        (args.out / "results.json").write_text(json.dumps(
            {"command": command, "seconds": seconds, "datasets": results_json(results)},
            indent=1, default=_json_default) + "\n")
        log(f"wrote {args.out / 'report.md'} in {seconds:.0f} s")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


if __name__ == "__main__":
    main()
