""":func:`convert`: plan the units, run them locally or on dask, keep the catalog in step."""

from __future__ import annotations

import fnmatch
import os
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import zarr

from ..catalog import CATALOG, FAILURES, update_catalog_table, update_failures_table
from ..converters.base import DEFAULT_MAX_BYTES
from ..converters.dicom import forget_headers
from ..converters.sources import Unit, plan
from ..errors import ConversionError, SourceIssue
from ..format import DATASET_ATTR, FORMAT_VERSION
from ..layout import DEFAULT_ALPHA
from .distributed import run_distributed
from .labels import _MASK_NAME
from .local import run_local
from .report import ConvertReport, SeriesResult, issue_json
from .scratch import clean_scratch, local_root
from .split import SPLIT_BYTES, PartPool, estimated_bytes
from .root import open_root
from .unit import Options, finished

__all__ = ["DATASET_ATTR", "DEFAULT_BATCH_BYTES", "convert"]

DEFAULT_BATCH_BYTES = 256 << 20  # larger DICOM stacks are read and written in slice batches


def convert(
    src: str | os.PathLike | Iterable[str | os.PathLike],
    dest: Any,
    *,
    overwrite: bool = False,
    skip_existing: bool = False,
    alpha: int = DEFAULT_ALPHA,
    quantize: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    batch_bytes: int | None = DEFAULT_BATCH_BYTES,
    threads: int | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: bool = False,
    storage_options: dict[str, Any] | None = None,
    labels: bool | str | None = None,
    split_bytes: int | None = SPLIT_BYTES,
) -> ConvertReport:
    """Convert a file, folder or tree (or a list of them) into the dataset root ``dest``.

    ``dest`` is a path or URL (``file://``, ``s3://``, ``memory://`` ... via
    fsspec). With ``workers`` the series are converted in parallel on a
    dask.distributed ``LocalCluster`` of that many single-threaded worker
    processes; ``scheduler`` uses an existing cluster instead. Returns a
    :class:`ConvertReport`; never raises for a bad source file or series (it
    is reported), only for unusable arguments or an unwritable ``dest``.

    Memory per image is bounded by ``batch_bytes``: a DICOM stack of
    single-frame files that decodes to more is read and written in batches
    of slices of at most that size (decoding each file twice); ``None``
    reads every image whole. Files holding many frames are read whole.

    Label maps (NIfTI intent label; with ``labels=True`` every non-DICOM
    integer source, with a glob such as ``"*seg*"`` the files it matches) are
    stored with true labels at every level, beside the image on their grid
    (:mod:`mist_zarr.labels`); images are converted first so that masks find them.

    With ``workers`` (or ``scheduler``) a DICOM series that decodes to more
    than ``split_bytes`` is written in slice ranges by several workers into
    the same image (:mod:`mist_zarr.convert.split`); ``None`` never splits.
    A single such series with ``workers`` and a local ``dest`` runs on a
    pool of local processes instead of a dask cluster (which starts slower).
    """
    if overwrite and skip_existing:
        raise ValueError("choose overwrite or skip_existing, not both")
    t0 = time.perf_counter()
    exclude = Path(dest).resolve() if isinstance(dest, (str, os.PathLike)) and \
        "://" not in str(dest) else None
    dest = str(dest) if isinstance(dest, os.PathLike) else dest
    report = ConvertReport(dest=str(dest))
    # the sources first: a missing source or one with nothing to convert creates no dataset
    units, problems = plan(src, exclude=exclude)
    if not units and all(p.kind == "skipped" for p in problems):
        raise ConversionError(_nothing_to_convert(src, problems))
    root = open_root(dest, storage_options)
    if DATASET_ATTR not in root.attrs:
        root.attrs[DATASET_ATTR] = {"format": "mist-zarr-dataset", "format_version": FORMAT_VERSION}
    local = local_root(root)
    if local is not None:
        clean_scratch(local)
    # images before masks: a mask is aligned to, and linked with, an image already stored
    units.sort(key=lambda u: (u.kind != "dicom", _maybe_labels(u, labels)))
    report.problems += problems
    pool = None
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
    options = Options(overwrite, skip_existing, alpha, quantize, max_bytes, batch_bytes,
                      threads if not (workers or scheduler) else (threads or 1),
                      uuid.uuid4().hex, storage_options, labels, split_bytes, parts)
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
    report.seconds = time.perf_counter() - t0
    return report


def _nothing_to_convert(src: Any, skipped: list[SourceIssue]) -> str:
    names = [os.fspath(s) for s in ([src] if isinstance(src, (str, os.PathLike)) else src)]
    found = (f"{len(skipped)} file(s) skipped, none an image: "
             + "; ".join(f"{p.source}: {p.reason}" for p in skipped[:3])
             + ("; ..." if len(skipped) > 3 else "")) if skipped else "no files"
    return (f"nothing to convert in {', '.join(names)}: no DICOM, NIfTI, PNG, JPEG or TIFF "
            f"image found ({found}); no dataset was created")


def _maybe_labels(unit: Unit, labels: bool | str | None) -> bool:
    name = os.path.basename(unit.files[0])
    if isinstance(labels, str):
        return fnmatch.fnmatch(name, labels)
    return bool(_MASK_NAME.search(name))


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
