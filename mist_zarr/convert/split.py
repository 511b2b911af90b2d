"""One large image written in parts (ranges of slices) by several worker processes.

The coordinator decides the image once (:func:`~mist_zarr.writer.plan_image`:
value mapping, levels, chunks, write id, documents), creates it incomplete
(:func:`~mist_zarr.writer.begin_image`) and hands each part to a worker
(:func:`~mist_zarr.writer.write_part`: the worker reads the part's samples
from its own files, encodes and stores its chunks and returns their index
and checksum rows). When every part is back it writes the index, the
checksums and, last, the completion mark (:func:`~mist_zarr.writer.finish_image`).
A failed or lost part fails the whole image with the series and slice range
named; the image then never reads as complete (a local image stays in its
scratch folder, which is removed; an object-store image keeps no complete flag).

Parts run on a dask cluster (``scheduler=``, or the cluster of a many-unit
run) or, for ``workers=N`` on a single large series, on :class:`PartPool`:
``N`` processes forked from a server that imported the writer and the DICOM
reader once (``forkserver``), started while the coordinator reads the
series. A dask ``LocalCluster`` costs seconds to start on a small machine,
which is most of what splitting one series saves.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ..errors import ConversionError, one_line
from ..format import ImageInfo
from ..writer import begin_image, finish_image, plan_image, write_part

__all__ = ["SPLIT_BYTES", "PartPool", "Submit", "estimated_bytes", "part_ranges", "splittable",
           "write_split"]

#: Images of more decoded bytes than this are written in parts when there are workers.
SPLIT_BYTES = 256 << 20

#: ``submit(fn, *args, **kwargs)`` -> a future with ``result()`` (an executor's or dask's).
Submit = Callable[..., Any]

# what a part's worker needs loaded: the writer, and the DICOM reader its samples come from
_PRELOAD = ["mist_zarr.writer", "mist_zarr.converters.dicom.pixels"]


def estimated_bytes(files: list[str]) -> int:
    """The source files' size: what a unit decodes to, roughly, before reading it."""
    total = 0
    for path in files:
        try:
            total += os.path.getsize(path)
        except OSError:
            pass
    return total


def splittable(data: Any, split_bytes: int | None) -> bool:
    """Samples read in parts by other processes (LazyPlanes with a leading axis), large enough."""
    if split_bytes is None or not hasattr(data, "part") or data.ndim < 3 or data.shape[0] < 2:
        return False
    return data.size * data.dtype.itemsize > split_bytes


def part_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges of near-equal length covering ``0:n``."""
    parts = max(1, min(parts, n))
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:])]


def write_split(dest: Any, data: Any, *, submit: Submit, parts: int, label: str,
                overwrite: bool = False, threads: int | None = None,
                **kwargs: Any) -> ImageInfo:
    """Write ``data`` at ``dest`` in ``parts`` slice ranges submitted with ``submit``.

    ``data`` is LazyPlanes (each part carries the reader of its own slices)
    or an array (each part carries its slices).

    ``kwargs`` are :func:`~mist_zarr.writer.plan_image`'s; ``threads`` is
    each part's encoder threads (default 1: one process per core).
    """
    threads = threads or 1
    plan = plan_image(data, name=label, **kwargs)
    begin_image(dest, plan, overwrite=overwrite)
    ranges = part_ranges(int(data.shape[0]), parts)
    futures = [submit(write_part, dest, data.part(a, b) if hasattr(data, "part") else data[a:b],
                      plan.info, a, threads=threads) for a, b in ranges]
    rows, failure = [], None
    for (a, b), future in zip(ranges, futures):
        try:
            rows.append(future.result())
        except Exception as exc:  # noqa: BLE001 - any part's failure fails the image, named
            failure = (a, b, exc)
            break
    if failure is not None:
        for future in futures:  # the queued parts are dropped, the running ones end before
            future.cancel()     # the caller removes what they wrote
        for future in futures:
            try:
                future.result()
            except (Exception, CancelledError):  # noqa: BLE001, S110 - the first one is reported
                pass
        a, b, exc = failure
        lost = " (its worker process died)" if isinstance(exc, BrokenProcessPool) else ""
        raise ConversionError(f"{label}: writing slices {a}-{b - 1} failed{lost}: "
                              f"{one_line(exc)}; the image was not completed") from exc
    return finish_image(dest, plan, rows)


class PartPool:
    """``workers`` local processes for parts, started on demand (or ahead with :meth:`start`).

    A pool whose process died (killed, out of memory) is replaced for the
    next image; the image it was writing has failed.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the workers on a thread, so that they are ready when the first part comes."""
        threading.Thread(target=lambda: [self.submit(os.getpid) for _ in range(self.workers)],
                         name="mist-part-pool", daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        try:
            return self._executor().submit(fn, *args, **kwargs)
        except BrokenProcessPool:
            self.close()
            return self._executor().submit(fn, *args, **kwargs)

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(_PRELOAD)
                self._pool = ProcessPoolExecutor(self.workers, mp_context=context)
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
