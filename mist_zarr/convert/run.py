""":func:`convert`: plan the units (a scan that needs no zarr), then hand them to
:mod:`.execute`, which writes them."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..converters.base import DEFAULT_MAX_BYTES
from ..converters.sources import Unit, plan
from ..errors import ConversionError, SourceIssue
from ..format import DATASET_ATTR
from ..layout import DEFAULT_ALPHA
from .options import DEFAULT_BATCH_BYTES, MASK_NAME, SPLIT_BYTES, Options
from .report import ConvertReport

__all__ = ["DATASET_ATTR", "DEFAULT_BATCH_BYTES", "convert"]


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
    with _scan_bar(progress) as on_scan:
        units, problems = plan(src, exclude=exclude, on_scan=on_scan)
    if not units and all(p.kind == "skipped" for p in problems):
        raise ConversionError(_nothing_to_convert(src, problems))
    # images before masks: a mask is aligned to, and linked with, an image already stored
    units.sort(key=lambda u: (u.kind != "dicom", _maybe_labels(u, labels)))
    report.problems += problems
    # zarr, the writer and the runners load only now: the scan needs none of them, and
    # a large tree's scan shows its progress at once
    from .execute import execute

    options = Options(overwrite, skip_existing, alpha, quantize, max_bytes, batch_bytes, threads,
                      uuid.uuid4().hex, storage_options, labels, split_bytes)
    execute(units, dest, report, options, workers, scheduler, progress)
    report.seconds = time.perf_counter() - t0
    return report


@contextlib.contextmanager
def _scan_bar(progress: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """``on_scan(step, done, total)`` for :func:`plan`, drawing a bar per step, or None."""
    if not progress:
        yield None
        return
    from tqdm.auto import tqdm  # only for a bar (its import costs, and it starts a thread)

    bar, shown = None, None

    def on_scan(step: str, done: int, total: int) -> None:
        # (the step is kept here: a bar disabled by TQDM_DISABLE has no ``desc``)
        nonlocal bar, shown
        if bar is None:
            bar = tqdm(total=total, unit="file", desc=step, leave=False)
        elif shown != step:
            bar.reset(total=total)
            bar.set_description_str(step)
        shown = step
        if done > bar.n:
            bar.update(done - bar.n)

    try:
        yield on_scan
    finally:
        if bar is not None:
            bar.close()


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
    return bool(MASK_NAME.search(name))
