"""The writing half of :func:`~mist_zarr.convert.convert`: open the root, run the planned units
locally or on dask, keep the catalog and the failure table in step."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import zarr

from ..catalog import CATALOG, FAILURES, update_catalog_table, update_failures_table
from ..converters.dicom import forget_headers
from ..converters.sources import Unit
from ..errors import SourceIssue
from ..format import DATASET_ATTR, FORMAT_VERSION
from .distributed import run_distributed
from .local import run_local
from .report import ConvertReport, SeriesResult, issue_json
from .root import open_root
from .scratch import clean_scratch, local_root
from .split import PartPool, estimated_bytes
from .options import Options
from .unit import finished

__all__ = ["execute"]


def execute(units: list[Unit], dest: Any, report: ConvertReport, options: Options,
            workers: int | None, scheduler: str | None, progress: bool) -> None:
    """Convert the planned ``units`` into the dataset root ``dest``, adding to ``report``
    (the arguments are :func:`~mist_zarr.convert.convert`'s; ``options`` as it was called,
    adjusted here to the runner)."""
    root = open_root(dest, options.storage_options)
    if DATASET_ATTR not in root.attrs:
        root.attrs[DATASET_ATTR] = {"format": "mist-zarr-dataset", "format_version": FORMAT_VERSION}
    local = local_root(root)
    if local is not None:
        clean_scratch(local)
    pool, split_bytes, batch_bytes = None, options.split_bytes, options.batch_bytes
    parts = 2 * (workers or 1)  # a few parts per worker: a slow one delays the image less
    if workers and not scheduler and len(units) <= 1:
        # A local cluster takes seconds to start (each process imports the whole
        # stack); a single unit runs here on all threads, a large series in parts
        # on a pool of local processes started now, while the series is read.
        if workers > 1 and local is not None and split_bytes is not None and any(
                u.kind == "dicom" and estimated_bytes(u.files) > split_bytes for u in units):
            pool = PartPool(workers)
            pool.start()
        workers = None
    if (pool is not None or workers or scheduler) and split_bytes is not None:
        # a series to split must be read lazily, so that each worker reads its own slices
        batch_bytes = split_bytes if batch_bytes is None else min(batch_bytes, split_bytes)
    threads = options.threads if not (workers or scheduler) else (options.threads or 1)
    options = dataclasses.replace(options, batch_bytes=batch_bytes, threads=threads, parts=parts)
    try:
        _run(units, dest, options, workers, scheduler, report, progress, pool)
    finally:
        forget_headers()  # the scan's headers not read by now will not be
        if pool is not None:
            pool.close()
    if local is not None:  # scratch left by workers killed during this run
        clean_scratch(local)
    _update_catalog(root, report)
    _update_failures(root, report, units, options.run)


def _run(units: list[Unit], dest: Any, options: Options, workers: int | None,
         scheduler: str | None, report: ConvertReport, progress: bool,
         pool: PartPool | None = None) -> None:
    """Run the units on the chosen runner, adding their outcomes to ``report``."""
    bar = None
    if progress:  # tqdm only for a bar (20-30 ms to import, a monitor thread)
        from tqdm.auto import tqdm

        # one step per series (or non-DICOM file), whichever worker finished it
        bar = tqdm(total=len(units), unit="series", desc="convert", leave=False)

    def collect(unit: Unit, outcome: tuple[list[SeriesResult], list[SourceIssue]]) -> None:
        results, unit_problems = outcome
        report.converted += results
        report.problems += unit_problems
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{len(report.converted)} images, {len(report.failed)} failed, "
                                f"{report.bytes_in / 1e6:.0f} MB in -> "
                                f"{report.bytes_out / 1e6:.0f} MB out")

    if workers or scheduler:
        run_distributed(units, dest, options, workers, scheduler, collect)
    else:
        run_local(units, dest, options, collect, pool.submit if pool is not None else None)
    if bar is not None:
        bar.close()


def _update_failures(root: zarr.Group, report: ConvertReport, units: list[Unit], run: str) -> None:
    """Record this run's refused/failed sources in failures.csv next to the catalog.

    The table lists sources that are not (completely) in the dataset: a unit
    whose completion marker and images are there (a rerun refused to replace
    it, or a replacement failed and left it as it was) is this run's error,
    printed in its report, not a failed source of the dataset.
    """
    now = datetime.now(UTC).isoformat(timespec="seconds")
    seen = {u.key for u in units} | {str(Path(f).resolve()) for u in units for f in u.files}
    failed = {p.key for p in report.failed}
    stored = {u.key for u in units if u.key in failed and finished(root, u) is not None}
    rows = [{**issue_json(p), "run": run, "time": now} for p in report.problems
            if p.key not in stored]
    try:
        update_failures_table(root, rows, seen)
    except (OSError, ValueError, ImportError) as exc:
        report.problems.append(SourceIssue(f"{report.dest}/{FAILURES}",
                                           f"failure report not written: {exc}"))


def _update_catalog(root: zarr.Group, report: ConvertReport) -> None:
    """Keep the dataset's catalog.parquet in step with the images just written."""
    try:
        update_catalog_table(root, [r.path for r in report.converted if r.status == "converted"])
    except (OSError, ValueError, ImportError) as exc:
        report.problems.append(SourceIssue(f"{report.dest}/{CATALOG}",
                                           f"catalog not updated: {exc}"))
