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
a thread of the coordinator and ``N - 1`` plain ``python -c`` processes
that import the writer while the coordinator reads the series. A dask ``LocalCluster`` costs seconds to start
on a small machine, which is most of what splitting one series saves.
"""

from __future__ import annotations

import importlib
import os
import pickle
import queue
import sys
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any

from ..children import answer_channel, start_child, stop_child
from ..errors import ConversionError, one_line
from ..format import ImageInfo
from ..writer import begin_image, finish_image, plan_image, write_part
from .options import SPLIT_BYTES

__all__ = ["SPLIT_BYTES", "PartPool", "Submit", "WorkerDied", "estimated_bytes", "part_ranges",
           "splittable", "write_split"]

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
        raise ConversionError(f"{label}: writing slices {a}-{b - 1} failed: {one_line(exc)}; "
                              "the image was not completed") from exc
    return finish_image(dest, plan, rows)


class WorkerDied(RuntimeError):
    """A part's worker process ended (killed, crashed) before it answered."""


class PartPool:
    """``workers`` lanes for parts, started on demand (or ahead with :meth:`start`): a
    thread of this process (idle while its parts are written) and ``workers - 1``
    worker processes.

    Each process is a ``python -c`` child (as :func:`mist_zarr.verify` uses),
    not a :mod:`multiprocessing` one, so the caller's script is never re-run
    and needs no ``if __name__ == "__main__"`` guard. A part whose process
    dies fails with :class:`WorkerDied`; the next part gets a new process.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the processes now (they import the writer while this one reads)."""
        with self._lock:
            while len(self._threads) < self.workers:
                # lane 0 runs here: one process fewer to start (~1 s of CPU each)
                thread = threading.Thread(target=self._serve, args=(len(self._threads) > 0,),
                                          name="mist-part", daemon=True)
                thread.start()
                self._threads.append(thread)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` in one of the lanes (all of it must pickle)."""
        self.start()
        future: Future = Future()
        self._tasks.put((future, fn, args, kwargs))
        return future

    def close(self) -> None:
        """Stop the processes once the parts submitted so far are done."""
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._tasks.put(None)
        for thread in threads:
            thread.join()

    def _serve(self, process: bool) -> None:
        """One lane: run the parts here, or start a process and hand it the parts one by one."""
        worker: _Worker | None = None
        failed: BaseException | None = None
        try:
            worker = _Worker() if process else None
        except OSError as exc:
            failed = WorkerDied(f"cannot start a worker: {exc}")
        while (item := self._tasks.get()) is not None:
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                if not process:
                    future.set_result(fn(*args, **kwargs))
                    continue
                if worker is None:
                    if failed is not None:
                        raise failed
                    worker = _Worker()
                future.set_result(worker.run(fn, args, kwargs))
            except WorkerDied as exc:
                future.set_exception(exc)
                worker = None  # (gone) the next part starts another
            except BaseException as exc:  # noqa: BLE001 - the part's own error, for its caller
                future.set_exception(exc)
        if worker is not None:
            worker.close()


class _Worker:
    """One ``python -c`` child (:mod:`mist_zarr.children`) running pickled calls sent on
    its stdin, one at a time."""

    def __init__(self) -> None:
        self.child = start_child("mist_zarr.convert.split", "_serve", text=False)
        self.proc = self.child.proc
        self.ready = False

    def run(self, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        try:
            if not self.ready:  # the child says so once it has imported the writer
                self.ready = pickle.load(self.proc.stdout) == _READY
            pickle.dump((fn, args, kwargs), self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()
            ok, value = pickle.load(self.proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            raise WorkerDied(f"its worker process died ({self.close()})") from exc
        if not ok:
            raise value
        return value

    def close(self) -> str:
        """Stop the child; return how it ended (exit status and the end of its stderr)."""
        return stop_child(self.child)


_READY = "mist-zarr part worker ready"


def _serve() -> None:
    """The child's loop (run by :class:`_Worker`): call, answer ``(ok, result or error)``."""
    answers = answer_channel("wb")
    for module in _PRELOAD:
        importlib.import_module(module)
    pickle.dump(_READY, answers)
    answers.flush()
    requests = sys.stdin.buffer
    while True:
        try:
            fn, args, kwargs = pickle.load(requests)
        except EOFError:
            return
        try:
            answer = pickle.dumps((True, fn(*args, **kwargs)), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - sent to the parent, which raises it
            try:
                answer = pickle.dumps((False, exc))
            except Exception:  # noqa: BLE001 - an error that does not pickle: its text
                answer = pickle.dumps((False, RuntimeError(f"{type(exc).__name__}: {exc}")))
        answers.write(answer)
        answers.flush()
