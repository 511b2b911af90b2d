"""The dask.distributed runner: units as tasks, submitted in a window, on a cluster.

dask and distributed are imported when this runner starts, not with
mist_zarr: they take long to import and most conversions do not use them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..converters.sources import Unit, label
from ..errors import SourceIssue
from .local import Collect
from .split import estimated_bytes
from .unit import Options, run_unit

__all__ = ["CLUSTER_CONFIG", "run_distributed"]

# Dask config of the LocalCluster that ``convert(workers=N)`` starts. The worker's
# statistical profiler (on by default, for the dashboard, which this cluster does
# not serve) samples the running task's stack every 10 ms and keeps one call tree
# per second in ``Worker.profile_history`` and ``profile_keys_history``, up to
# ``distributed.admin.low-level-log-length`` (1000) of each: a worker's RSS then
# grows with the time it has been converting, i.e. with the number of series
# (about 0.2 MB per second of work, measured on MR series), for ~17 minutes.
# Without the profiler it stays flat.
CLUSTER_CONFIG = {"distributed.worker.profile.enabled": False}


def run_distributed(units: list[Unit], dest: Any, options: Options, workers: int | None,
                    scheduler: str | None, collect: Collect) -> None:
    """Units as tasks on dask.distributed; a lost worker's tasks are retried elsewhere.

    An existing cluster (``scheduler``) keeps its own worker configuration: set
    :data:`CLUSTER_CONFIG` there too for worker memory that does not grow with
    the length of the run.

    Tasks are submitted in a window of two per worker thread (see
    :func:`_window`), not all at once: the client (which also hosts our
    LocalCluster's scheduler) then holds a few task specs, futures and task
    states instead of one per unit, which cut the growth of its RSS during the
    run by about a third (800 MR series: +9 MB instead of +15 MB).
    """
    import dask
    from distributed import Client, LocalCluster

    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        # the nannies hand the config in force here to the worker processes
        with dask.config.set(CLUSTER_CONFIG):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None)
        client = Client(cluster)
    try:
        big = [u for u in units if u.kind == "dicom" and options.split_bytes is not None
               and estimated_bytes(u.files) > options.split_bytes]
        rest = [u for u in units if all(u is not b for b in big)]
        with ThreadPoolExecutor(1, thread_name_prefix="mist-split") as here:
            # a large series is read here and written in parts by the cluster's
            # workers, while they also convert the other units
            split = _split_on(client, options)
            started = [(u, here.submit(run_unit, u, dest, split[0], split[1])) for u in big]
            if rest:
                _submit_windowed(client, rest, dest, options, collect)
            for unit, future in started:
                try:
                    collect(unit, future.result())
                except Exception as exc:  # noqa: BLE001 - reported like a failed task
                    collect(unit, ([], [SourceIssue(label(unit), f"failed: {exc!r}",
                                                    key=unit.key)]))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _split_on(client: Any, options: Options) -> tuple[Options, Any]:
    """The options and ``submit`` for a series written in parts on the cluster: two parts
    per worker thread."""
    try:
        threads = sum(client.nthreads().values())
    except Exception:  # noqa: BLE001 - a scheduler that does not answer: two parts
        threads = 1
    return (dataclasses.replace(options, parts=max(2, 2 * threads)),
            functools.partial(client.submit, pure=False))


def _submit_windowed(client: Any, units: list[Unit], dest: Any, options: Options,
                     collect: Collect) -> None:
    from distributed import as_completed

    todo = iter(enumerate(units))
    futures: dict[Any, Unit] = {}
    running = as_completed()

    def submit(n: int) -> None:
        for i, unit in itertools.islice(todo, max(n, 0)):
            future = client.submit(run_unit, unit, dest, options, key=f"mist-unit-{i}",
                                   pure=False)
            futures[future] = unit
            running.add(future)

    window, checked = _window(client), time.monotonic()
    submit(window)
    for future in running:
        unit = futures.pop(future)  # drop our reference: the worker frees the result
        try:
            collect(unit, future.result())
        except Exception as exc:  # the task itself failed (e.g. worker killed too often)
            collect(unit, ([], [SourceIssue(label(unit), f"task failed: {exc!r}", key=unit.key)]))
        future.release()
        del future
        if time.monotonic() - checked > 5:  # a cluster that scales gets a wider window
            window, checked = _window(client), time.monotonic()
        submit(window - len(futures))


def _window(client: Any) -> int:
    """Tasks kept submitted: two per worker thread (one running, one queued), at least 4."""
    try:
        threads = sum(client.nthreads().values())
    except Exception:  # noqa: BLE001 - a scheduler that does not answer: keep a small window
        threads = 0
    return max(4, 2 * threads)
