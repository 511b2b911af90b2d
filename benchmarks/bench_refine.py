"""Progressive refinement and latency over loopback HTTP, on the shared CT.

Two tables, every row measured in one run:

* **bytes**: reading levels 3, 2, 1, 0 in turn, of one slice and of the whole
  volume, with the store's prefix cache (``mist_zarr.refine``) and without it
  (one ``mist_zarr.open(url, scale=k)`` per level). Counted at the server
  (image chunk responses only; the metadata and index are the same for both).
* **latency**: a level read (store already open) from a server that holds
  every request for ``--delay-ms``, against the two models
  chunks x delay (one request at a time) and ceil(chunks / concurrency) x delay.
  Medians of ``--repeat`` runs.

Run from the repository root::

    python benchmarks/bench_refine.py [--data DIR] [--delay-ms 20] [--repeat 3]

Uses the shared data set (``../shared/data`` or ``$MIST_DATA``); without it, a
synthetic CT phantom of the same shape.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

import mist_zarr
from mist_zarr.serve import serve_in_thread


def load_ct(data: Path) -> tuple[np.ndarray, str]:
    files = sorted((data / "ct" / "CRLM-CT-1004").rglob("*.dcm"))
    if not files:
        from mist_zarr.phantom import ct_phantom

        return ct_phantom((41, 512, 512)), "synthetic phantom 41x512x512 (shared CT not found)"
    import pydicom

    slices = sorted((pydicom.dcmread(f) for f in files),
                    key=lambda d: float(d.ImagePositionPatient[2]))
    return np.stack([d.pixel_array for d in slices]), "shared CT CRLM-CT-1004 41x512x512"


def chunk_bytes(server) -> int:
    return sum(r.body_len for r in server.requests if "/image/c/" in r.path)


def bytes_table(url: str, server, levels: int, isel: dict) -> list[tuple[str, int, int]]:
    rows = []
    server.reset_counters()
    refined = []
    for image in mist_zarr.refine(url, isel=isel):
        refined.append(chunk_bytes(server))
        server.reset_counters()
    for k, with_cache in zip(range(levels, -1, -1), refined):
        server.reset_counters()
        mist_zarr.open(url, scale=k).isel(isel).load()
        rows.append((f"level {k}", with_cache, chunk_bytes(server)))
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    return rows


def latency_rows(root: Path, delay: float, repeat: int) -> list[str]:
    concurrency = zarr.config.get("async.concurrency")
    out = []
    with serve_in_thread(root, delay=delay) as server:
        url = f"{server.url}/ct.zarr"
        for k in (0, 2):
            times = []
            for _ in range(repeat):
                store = mist_zarr.MultiscaleStore(url)
                store.info  # noqa: B018 -- open first: the level read is timed
                server.reset_counters()
                start = time.perf_counter()
                mist_zarr.open(store, scale=k).values
                times.append(time.perf_counter() - start)
            n = sum(1 for r in server.requests if "/image/c/" in r.path)
            med = statistics.median(times)
            serial, bound = n * delay, math.ceil(n / concurrency) * delay
            out.append(f"| s{k} | {n} | {med:.3f} | {serial:.2f} | {bound:.2f} | "
                       f"{med / serial:.2f} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(
        "MIST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")))
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    vol, what = load_ct(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        info = mist_zarr.write_image(root / "ct.zarr", vol, spacing=(2.5, 0.78, 0.78))
        print(f"{what}; {info.levels} levels; zarr async.concurrency "
              f"{zarr.config.get('async.concurrency')}\n")
        with serve_in_thread(root) as server:
            url = f"{server.url}/ct.zarr"
            for label, isel in (("one slice (z=20)", {"z": 20}), ("whole volume", {})):
                print(f"Image chunk bytes over HTTP, {label}: levels coarse to fine")
                print("| read | refine (prefix cache) | open per level | ratio |")
                print("|---|---:|---:|---:|")
                for name, cached, plain in bytes_table(url, server, info.levels, isel):
                    print(f"| {name} | {cached:,} | {plain:,} | {cached / plain:.3f} |")
                print()
        print(f"Level read with {args.delay_ms:g} ms per request (store open; median of "
              f"{args.repeat})")
        print("| level | chunks | seconds | chunks x delay | ceil(chunks/concurrency) x delay "
              "| measured / serial |")
        print("|---|---:|---:|---:|---:|---:|")
        print("\n".join(latency_rows(root, args.delay_ms / 1000, args.repeat)))


if __name__ == "__main__":
    main()
