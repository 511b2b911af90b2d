"""Label maps: storage against the mask's .nii.gz and NIfTI-zstd, and (image, mask) pair reads.

For the shared TotalSegmentator CT (DICOM) and its label map
(``nifti/example_seg_dicom.nii.gz``), converted together with
``convert(labels="*seg*")``, this prints

* the bytes of every label level stored by mist-zarr (zstd 19, the level rule
  of :mod:`mist_zarr.labels`), and of the candidate codecs measured on the
  same levels (zstd 9/19/22, blosc-zstd with bit and byte shuffle), against
  the ``.nii.gz`` and the raw ``.nii`` compressed with zstd (levels 3, 19);
* the bytes read from storage and the median wall time of reading the
  (image, mask) pair at level 2 and at level 0, alternating, plus the
  relative error of per-label volumes (mm^3) at level 2 against level 0,
  computed again with dask (``mist_zarr.open(mask, scale=k, chunks={})``,
  ``da.bincount``) with the mask bytes it read.

Run from the repository root::

    python benchmarks/bench_labels.py [--data DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

import mist_zarr
from mist_zarr.labels import label_level


def _stored(path: Path, under: str = "") -> int:
    """Bytes of the chunk files under ``path`` (metadata documents excluded)."""
    total = 0
    for root, _, files in os.walk(path / under):
        total += sum(os.path.getsize(Path(root) / f) for f in files if f != "zarr.json")
    return total


def codec_table(levels: list[np.ndarray]) -> list[tuple[str, int]]:
    from mist_zarr.labels import _chunks

    cands = {
        "zstd 9": [ZstdCodec(level=9)], "zstd 19 (chosen)": [ZstdCodec(level=19)],
        "zstd 22": [ZstdCodec(level=22)],
        "blosc-zstd 9 bitshuffle": [BloscCodec(cname="zstd", clevel=9, shuffle="bitshuffle")],
        "blosc-zstd 9 byteshuffle": [BloscCodec(cname="zstd", clevel=9, shuffle="shuffle")],
    }
    out = []
    for name, comp in cands.items():
        total = 0
        for level in levels:
            store = zarr.storage.MemoryStore()
            a = zarr.create_array(store, shape=level.shape, dtype=level.dtype, fill_value=0,
                                  chunks=_chunks(level.shape, "zyx", level.itemsize),
                                  compressors=comp)
            a[...] = level
            total += sum(len(v.to_bytes()) for k, v in store._store_dict.items()
                         if k.startswith("c/"))
        out.append((name, total))
    return out


class Counting(zarr.storage.LocalStore):
    """A local store that counts the bytes it hands out."""

    read = 0

    async def get(self, key, prototype, byte_range=None):
        buf = await super().get(key, prototype, byte_range)
        if buf is not None:
            Counting.read += len(buf)
        return buf

    def get_sync(self, key, *, prototype=None, byte_range=None):
        buf = super().get_sync(key, prototype=prototype, byte_range=byte_range)
        if buf is not None:
            Counting.read += len(buf)
        return buf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("MIST_DATA", "../shared/data"))
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    data = Path(args.data)
    nii_gz = data / "nifti" / "example_seg_dicom.nii.gz"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        shutil.copytree(data / "ct" / "TotalSegmentator-example-j2k", src / "ct")
        shutil.copy(nii_gz, src / nii_gz.name)
        report = mist_zarr.convert(src, tmp / "ds", labels="*seg*")
        rows = {r["path"]: r for r in mist_zarr.list_images(tmp / "ds")}
        mask = next(p for p, r in rows.items() if r.get("kind") == "labels")
        image = rows[mask]["image"]
        assert report.ok, report.problems
        raw = gzip.decompress(nii_gz.read_bytes())
        stored = mist_zarr.open(tmp / "ds" / mask).values
        levels = [label_level(stored, "zyx", k) for k in range(rows[mask]["levels"] + 1)]
        print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
        print("\n| storage of the TotalSegmentator mask (uint8 512x512x20) | bytes | vs .nii.gz |")
        print("|---|---:|---:|")
        gz = nii_gz.stat().st_size
        for name, size in [(".nii.gz (source)", gz),
                           (".nii + zstd 3", len(numcodecs.Zstd(3).encode(raw))),
                           (".nii + zstd 19", len(numcodecs.Zstd(19).encode(raw))),
                           ("mist-zarr labels, all 4 levels", _stored(tmp / "ds" / mask)),
                           ("mist-zarr labels, level 0 only", _stored(tmp / "ds" / mask, "s0"))]:
            print(f"| {name} | {size:,} | {size / gz:.2f} |")
        print("\n| codec on the same 4 levels | bytes |\n|---|---:|")
        for name, size in codec_table(levels):
            print(f"| {name} | {size:,} |")
        pair_times: dict[int, list[float]] = {0: [], 2: []}
        pair_bytes: dict[int, int] = {}
        volumes: dict[int, dict[int, float]] = {}
        for _ in range(args.repeat):
            for k in (2, 0):  # alternating
                Counting.read = 0
                t = time.perf_counter()
                ct = mist_zarr.open(Counting(tmp / "ds" / image, read_only=True), scale=k)
                m = mist_zarr.open(Counting(tmp / "ds" / mask, read_only=True), scale=k)
                pair = (ct.values, m.values)
                pair_times[k].append(time.perf_counter() - t)
                pair_bytes[k] = Counting.read
                voxel = float(np.prod(m.attrs["spacing"]))
                ids, counts = np.unique(pair[1], return_counts=True)
                volumes[k] = {int(i): c * voxel for i, c in zip(ids, counts) if i}
        print("\n| (CT, mask) pair | bytes read | median s | vs level 0 |\n|---|---:|---:|---:|")
        for k in (0, 2):
            print(f"| level {k} | {pair_bytes[k]:,} | {statistics.median(pair_times[k]):.4f} | "
                  f"{statistics.median(pair_times[k]) / statistics.median(pair_times[0]):.2f}x "
                  f"time, {pair_bytes[k] / pair_bytes[0]:.3f}x bytes |")
        # the dask example: per-label volumes (mm^3) from a lazily opened level, bytes counted
        import dask.array as da

        dask_volumes, dask_bytes = {}, {}
        for k in (2, 0):
            Counting.read = 0
            m = mist_zarr.open(Counting(tmp / "ds" / mask, read_only=True), scale=k, chunks={})
            voxel = float(np.prod(m.attrs["spacing"]))
            counts = da.bincount(m.data.ravel().astype(np.int64)).compute()
            dask_volumes[k] = {int(i): c * voxel for i, c in enumerate(counts) if i and c}
            dask_bytes[k] = Counting.read
        assert dask_volumes == volumes, "dask and numpy volumes differ"
        print(f"\ndask: per-label volumes read {dask_bytes[2]:,} mask bytes at level 2, "
              f"{dask_bytes[0]:,} at level 0 ({dask_bytes[2] / dask_bytes[0]:.3f}x)")
        for i in sorted(volumes[0], key=volumes[0].get, reverse=True)[:3]:
            print(f"  label {i}: {volumes[0][i]:,.0f} mm^3 at level 0, "
                  f"{volumes[2].get(i, 0):,.0f} at level 2")
        errs = [abs(volumes[2].get(i, 0.0) - v) / v for i, v in volumes[0].items()]
        print(f"\nper-label volume at level 2 vs level 0: median relative error "
              f"{statistics.median(errs):.3%}, max {max(errs):.3%} over {len(errs)} labels")


if __name__ == "__main__":
    main()
