"""Read speed per level: mist-zarr against the raw codec and against what users pick today.

    python benchmarks/bench_read.py [--data ../shared/data] [--repeat 5] [--threads 2]
                                    [--copies 21] [--skip-http]

Every row of a table is measured in the same run, the contenders of one
level alternating A B C ... for ``--repeat`` rounds; the tables give medians
and the median of the per-round ratios to the raw codec. Inputs:

* CT: the shared series ``ct/CRLM-CT-1004`` converted with ``mist_zarr.convert``
  (41 x 512 x 512 int16, one chunk per slice);
* CXR: the 24 grayscale NIH chest PNGs, converted (1024 x 1024 uint8 each, one chunk);
* many images: the CXR images duplicated (hard links) ``--copies`` times
  (default 21: 504 images) under one dataset root with its catalog.

Rows, per level k (the same samples in every format):

* ``raw decode``: ``imagecodecs.htj2k_decode(prefix, skipres=k)`` of every
  chunk's level-k prefix, bytes already in memory, on ``--threads`` threads:
  the codec limit. ``raw read+decode`` also reads each prefix from its chunk
  file (``os.pread``).
* mist-zarr: ``mist_zarr.open(path, scale=k).values`` (open included),
  ``read_image`` (level 0), ``read_level(paths, scale=k)`` and, for many
  images, ``MistDataset`` under a ``torch.utils.data.DataLoader`` with 2
  workers (steady state: the second epoch of persistent workers) and
  ``mist_zarr.batch.to_dask(...).compute()``.
* what users do today: ``.nii.gz`` load (nibabel) + resize to the level's
  shape (scikit-image ``resize``, order 1, and ``torch.nn.functional.interpolate``,
  bilinear), ``.npy`` memmap + stride ``[..., ::2**k, ::2**k]``, zarr with its
  default zstd at full resolution + the same stride, and the level of an
  OME-Zarr pyramid written by ngff-zarr.

Over HTTP (``mist_zarr.serve.serve_in_thread`` on 127.0.0.1; the server runs
in this process and competes for the interpreter) the same files are read
by URL; ``.npy`` memmap has no HTTP form.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_levels import (
    DEFAULT_DATA,
    Dataset,
    load_ct,
    load_cxr,
    print_environment,
    table,
    write_ome,
)

import mist_zarr
from mist_zarr.batch import to_dask
from mist_zarr.direct import _pool
from mist_zarr.serve import serve_in_thread

Reader = Callable[[], Any]


# -- timing -------------------------------------------------------------------------------
def race(contenders: dict[str, Reader], repeat: int) -> dict[str, list[float]]:
    """Every contender once per round, in turn, ``repeat`` rounds after one warm-up round.

    Wall-clock seconds under each name, and this process's CPU seconds (all its threads,
    not child processes) under ``"cpu " + name``: on a shared machine the CPU ratio is
    the steadier measure of work done.
    """
    times: dict[str, list[float]] = {name: [] for name in contenders}
    times.update({f"cpu {name}": [] for name in contenders})
    for round_ in range(repeat + 1):
        for name, fn in contenders.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if round_:
                times[name].append(time.perf_counter() - t0)
                times[f"cpu {name}"].append(time.process_time() - c0)
    return times


def ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def ms(values: Sequence[float]) -> str:
    return f"{statistics.median(values) * 1e3:.1f}"


# -- the files each contender reads ---------------------------------------------------------
def mist_images(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("zarr.json")
                  if '"mist"' in p.read_text()[:4000] and (p.parent / "index").is_dir())


def prefixes(image: Path, k: int) -> tuple[list[bytes], list[tuple[str, int]]]:
    """Every chunk's level-k prefix (bytes) and (file, length), from the prefix index."""
    index = mist_zarr.read_index(image)
    data, where = [], []
    for coords in np.ndindex(*index.shape[:-1]):
        length = int(index[coords + (k,)])
        if length:
            path = os.path.join(image, "image", "c", *map(str, coords))
            where.append((path, length))
            with open(path, "rb") as f:
                data.append(f.read(length))
    return data, where


def decode_all(chunks: list[bytes], k: int, threads: int) -> list[np.ndarray]:
    def part(items: list[bytes]) -> list[np.ndarray]:
        return [imagecodecs.htj2k_decode(b, skipres=k or None) for b in items]

    if threads == 1:
        return part(chunks)
    return list(_pool(threads).map(part, [chunks[i::threads] for i in range(threads)]))


def read_decode_all(where: list[tuple[str, int]], k: int, threads: int) -> list[np.ndarray]:
    def part(items: list[tuple[str, int]]) -> list[np.ndarray]:
        out = []
        for path, length in items:
            fd = os.open(path, os.O_RDONLY)
            try:
                out.append(imagecodecs.htj2k_decode(os.pread(fd, length, 0), skipres=k or None))
            finally:
                os.close(fd)
        return out

    if threads == 1:
        return part(where)
    return list(_pool(threads).map(part, [where[i::threads] for i in range(threads)]))


def write_peers(ds: Dataset, out: Path, levels: int) -> dict[str, Path]:
    """The same samples as .nii.gz, .npy, zarr + zstd and an ngff-zarr pyramid."""
    import nibabel as nib
    import zarr

    paths = {"nii": out / f"{ds.name}.nii.gz", "npy": out / f"{ds.name}.npy",
             "zarr": out / f"{ds.name}.zstd.zarr"}
    nib.save(nib.Nifti1Image(ds.volume.T.copy(), np.diag([*ds.spacing[::-1], 1.0])), paths["nii"])
    np.save(paths["npy"], ds.volume)
    z = zarr.create_array(paths["zarr"], shape=ds.volume.shape, dtype=ds.volume.dtype,
                          chunks=(1, *ds.volume.shape[1:]), overwrite=True)
    z[...] = ds.volume
    write_ome(ds, out, levels)
    paths["ome"] = out / f"{ds.name}.ome.zarr"
    return paths


def nii_resize(source: Any, shape: tuple[int, ...], how: str) -> np.ndarray:
    import nibabel as nib

    if isinstance(source, str):  # a URL: fetch, then decompress in memory as nibabel does
        import gzip

        import fsspec

        with fsspec.open(source, "rb") as f:
            img = nib.Nifti1Image.from_bytes(gzip.decompress(f.read()))
    else:
        img = nib.load(source)
    volume = np.asanyarray(img.dataobj).T  # (z, y, x)
    if how == "skimage":
        from skimage.transform import resize

        return resize(volume, shape, order=1, anti_aliasing=False, preserve_range=True)
    import torch

    t = torch.from_numpy(volume.astype(np.float32))[:, None]
    return torch.nn.functional.interpolate(t, size=shape[1:], mode="bilinear",
                                           align_corners=False)[:, 0].numpy()


def zarr_decimate(source: Any, k: int) -> np.ndarray:
    import zarr

    return np.ascontiguousarray(zarr.open_array(source, mode="r")[...][..., ::1 << k, ::1 << k])


def ome_level(source: Any, k: int) -> np.ndarray:
    import zarr

    return zarr.open_group(source, mode="r", zarr_format=3)[f"scale{k}/image"][...]


def have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -- one volume, level by level ---------------------------------------------------------------
def bench_volume(ds: Dataset, work: Path, url: str | None, args: argparse.Namespace) -> list:
    """Rows for one image (the CT volume): every contender at every level."""
    T = args.threads
    image = mist_images(work / "mist")[0]
    info = mist_zarr.open_image(image)[1]
    peers = write_peers(ds, work, info.levels)
    rel = image.relative_to(work)
    rows = []
    for k in range(info.levels + 1):
        chunks, where = prefixes(image, k)
        shape = info.level_shape(k)
        c: dict[str, Reader] = {
            "raw decode": lambda: decode_all(chunks, k, T),
            "raw read+decode": lambda: read_decode_all(where, k, T),
            "mist open(scale=k).values": lambda: mist_zarr.open(image, scale=k, threads=T).values,
            "mist read_level([path])": lambda: mist_zarr.read_level([image], scale=k, threads=T),
        }
        if k == 0:
            c["mist read_image"] = lambda: mist_zarr.read_image(image, threads=T)
        c[".nii.gz + skimage resize"] = lambda: nii_resize(peers["nii"], shape, "skimage")
        if have("torch"):
            c[".nii.gz + torch interpolate"] = lambda: nii_resize(peers["nii"], shape, "torch")
        c[".npy memmap + stride"] = lambda: np.array(  # a copy: reads even at s0
            np.load(peers["npy"], mmap_mode="r")[..., ::1 << k, ::1 << k])
        c["zarr zstd full + stride"] = lambda: zarr_decimate(peers["zarr"], k)
        c["OME-Zarr level (ngff-zarr)"] = lambda: ome_level(peers["ome"], k)
        if url:
            c["HTTP mist open(scale=k).values"] = lambda: mist_zarr.open(
                f"{url}/{rel.as_posix()}", scale=k, threads=T).values
            if k == 0:
                c["HTTP mist read_image"] = lambda: mist_zarr.read_image(
                    f"{url}/{rel.as_posix()}", threads=T)
            c["HTTP .nii.gz + skimage resize"] = lambda: nii_resize(
                f"{url}/{peers['nii'].name}", shape, "skimage")
            c["HTTP zarr zstd full + stride"] = lambda: zarr_decimate(
                f"{url}/{peers['zarr'].name}", k)
            c["HTTP OME-Zarr level"] = lambda: ome_level(f"{url}/{peers['ome'].name}", k)
        expected = np.stack(decode_all(chunks, k, 1)).reshape(shape)
        np.testing.assert_array_equal(c["mist open(scale=k).values"](), expected)
        if url:
            np.testing.assert_array_equal(c["HTTP mist open(scale=k).values"](), expected)
        times = race(c, args.repeat)
        for name in c:
            rows.append([f"s{k}", name, ms(times[name]), f"{ratio(times, name, 'raw decode'):.2f}",
                         f"{ratio(times, name, 'raw read+decode'):.2f}",
                         f"{ratio(times, 'cpu ' + name, 'cpu raw decode'):.2f}"])
    return rows


# -- many 2-D images ----------------------------------------------------------------------------
def bench_images(work: Path, url: str | None, args: argparse.Namespace, what: str,
                 levels: Sequence[int]) -> list:
    """Rows for a set of images (each one open + read), as a loop and as a batch."""
    T = args.threads
    images = mist_images(work / what)
    rows = []
    for k in levels:
        chunks = []
        where: list[tuple[str, int]] = []
        for image in images:
            c_, w_ = prefixes(image, k)
            chunks += c_
            where += w_
        n = len(images)
        out_mb = sum(a.nbytes for a in decode_all(chunks[:n], k, 1)) / 1e6 * len(chunks) / n
        c: dict[str, Reader] = {
            "raw decode": lambda: decode_all(chunks, k, T),
            "raw read+decode": lambda: read_decode_all(where, k, T),
            "mist open(scale=k).values, each": lambda: [
                mist_zarr.open(p, scale=k, threads=T).values for p in images],
            "mist read_level(paths)": lambda: mist_zarr.read_level(images, scale=k, threads=T),
            "mist to_dask(paths).compute()": lambda: _dask_compute(images, k, T),
        }
        if what == "many" and have("torch"):
            loader = _loader(work / what, k, args)
            c["mist MistDataset + DataLoader(2 workers)"] = lambda: sum(1 for _ in loader)
        if url:
            rel = [p.relative_to(work).as_posix() for p in images]
            c["HTTP mist read_level(urls)"] = lambda: mist_zarr.read_level(
                [f"{url}/{r}" for r in rel], scale=k)
        times = race(c, args.repeat)
        for name in c:
            s = statistics.median(times[name])
            rows.append([f"s{k}", name, f"{s * 1e3:.1f}", f"{n / s:.0f}", f"{out_mb / s:.0f}",
                         f"{ratio(times, 'raw decode', name):.2f}",
                         f"{ratio(times, 'raw read+decode', name):.2f}",
                         # the loader's work is in its worker processes: no CPU figure
                         "" if "DataLoader" in name else
                         f"{ratio(times, 'cpu raw decode', 'cpu ' + name):.2f}"])
    return rows


def _dask_compute(images: list[Path], k: int, threads: int) -> np.ndarray:

    return to_dask(images, scale=k, per_block=16).compute(scheduler="threads",
                                                           num_workers=threads)


def _loader(root: Path, k: int, args: argparse.Namespace) -> Any:
    from torch.utils.data import DataLoader

    ds = mist_zarr.MistDataset(root, scale=k)
    loader = DataLoader(ds, batch_size=32, num_workers=2, persistent_workers=True,
                        collate_fn=lambda items: np.stack([i["image"] for i in items]))
    sum(1 for _ in loader)  # first epoch: start the workers (not timed)
    return loader


def build(data: Path, work: Path, copies: int) -> tuple[Dataset, Dataset]:
    ct, cxr = load_ct(data), load_cxr(data)
    report = mist_zarr.convert(data / "ct" / "CRLM-CT-1004", work / "mist")
    assert report.ok, report.summary()
    png = work / "png"
    png.mkdir()
    for p in sorted((data / "radiographs" / "nih-cxr14-png").glob("*.png")):
        from PIL import Image

        with Image.open(p) as im:
            if im.mode == "L":
                shutil.copy(p, png / p.name)
    report = mist_zarr.convert(png, work / "cxr")
    assert report.ok, report.summary()
    import zarr

    from mist_zarr.catalog import catalog

    many = work / "many"
    zarr.open_group(many, mode="w", zarr_format=3)
    for i in range(copies):
        zarr.open_group(many / f"copy{i:03d}", mode="w", zarr_format=3)
        for image in mist_images(work / "cxr"):
            shutil.copytree(image, many / f"copy{i:03d}" / image.name, copy_function=os.link)

    catalog(many)
    return ct, cxr


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--copies", type=int, default=21)
    parser.add_argument("--skip-http", action="store_true")
    args = parser.parse_args(argv)
    print_environment()
    print(f"threads: {args.threads}; medians of {args.repeat} interleaved rounds; "
          "ratio = contender / raw (time); the machine is shared, times are noisy")
    with tempfile.TemporaryDirectory(prefix="mist-bench-read-") as tmp:
        work = Path(tmp)
        ct, _ = build(args.data, work, args.copies)
        server = None if args.skip_http else serve_in_thread(work)
        url = None if server is None else server.__enter__().url
        try:
            head = ["level", "reader", "ms", "/ raw decode", "/ raw read+decode",
                    "cpu / raw decode"]
            table(f"CT {ct.volume.shape} {ct.volume.dtype}: one volume, open + read",
                  head, bench_volume(ct, work, url, args))
            head = ["level", "reader", "ms", "images/s", "MB/s out", "x raw decode",
                    "x raw read+decode", "cpu: x raw decode"]
            table("CXR: 24 images 1024x1024 uint8, each opened and read", head,
                  bench_images(work, url, args, "cxr", range(5)))
            n = len(mist_images(work / "many"))
            table(f"many images: {n} CXR copies (throughput relative to raw: >= 0.8 wanted)",
                  head, bench_images(work, url, args, "many", (2, 3)))
        finally:
            if server is not None:
                server.__exit__(None, None, None)


if __name__ == "__main__":
    main()
