"""``mist-zarr convert``: a file or tree of DICOM / NIfTI / PNG / JPEG / TIFF into a dataset root.

A dataset root is a Zarr v3 group holding one mist-zarr image group per
series (DICOM) or file (NIfTI, 2-D images), under readable, stable paths.
A source that fails is reported with its reason and the others go on; an
image is complete only once its ``complete`` flag is written, so a rerun
with ``skip_existing`` redoes exactly the unfinished ones.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import StorePath

from .converters.base import DEFAULT_MAX_BYTES, ConversionError, SourceImage
from .format import ATTR, DONE_DIR, FORMAT_VERSION, TMP_DIR, ImageInfo
from .layout import DEFAULT_ALPHA
from .writer import write_image

__all__ = ["ConvertReport", "DEFAULT_MAX_BYTES", "Problem", "SeriesResult", "Unit", "convert",
           "iter_sources", "list_images", "plan", "read_unit", "run_unit", "write_unit"]

DEFAULT_BATCH_BYTES = 256 << 20  # larger DICOM stacks are read and written in slice batches
DATASET_ATTR = "mist_dataset"
# Dask config of the LocalCluster that ``convert(workers=N)`` starts. The worker's
# statistical profiler (on by default, for the dashboard, which this cluster does
# not serve) samples the running task's stack every 10 ms and keeps one call tree
# per second in ``Worker.profile_history`` and ``profile_keys_history``, up to
# ``distributed.admin.low-level-log-length`` (1000) of each: a worker's RSS then
# grows with the time it has been converting, i.e. with the number of series
# (about 0.2 MB per second of work, measured on MR series), for ~17 minutes.
# Without the profiler it stays flat.
CLUSTER_CONFIG = {"distributed.worker.profile.enabled": False}


@dataclass
class SeriesResult:
    """One image written (or found complete) under the dataset root."""

    path: str
    source_format: str
    shape: tuple[int, ...]
    dtype: str
    bytes_in: int
    bytes_out: int
    sources: int
    status: str = "converted"  # or "existing"
    warnings: list[str] = field(default_factory=list)


@dataclass
class Problem:
    """A file or series that was not converted, and why."""

    source: str
    reason: str
    kind: str = "failed"  # "failed" (counts as an error), "skipped" (not an image, by design)
    key: str = ""  # the source's identity (file path or unit key); default: ``source``

    def __post_init__(self) -> None:
        self.key = self.key or self.source


@dataclass
class ConvertReport:
    """What :func:`convert` did. ``ok`` is False when any source failed."""

    dest: str
    converted: list[SeriesResult] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[Problem]:
        return [p for p in self.problems if p.kind == "failed"]

    @property
    def skipped(self) -> list[Problem]:
        return [p for p in self.problems if p.kind == "skipped"]

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def bytes_in(self) -> int:
        return sum(s.bytes_in for s in self.converted if s.status == "converted")

    @property
    def bytes_out(self) -> int:
        return sum(s.bytes_out for s in self.converted if s.status == "converted")

    def to_json(self) -> dict[str, Any]:
        return {"dest": self.dest, "ok": self.ok, "seconds": self.seconds,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "converted": [asdict(s) for s in self.converted],
                "problems": [asdict(p) for p in self.problems]}

    def summary(self, max_skipped: int = 10) -> str:
        new = [s for s in self.converted if s.status == "converted"]
        lines = [
            f"{len(new)} image(s) converted, {len(self.converted) - len(new)} already complete, "
            f"{len(self.failed)} failed, {len(self.skipped)} file(s) skipped "
            f"in {self.seconds:.1f} s",
        ]
        if new:
            ratio = self.bytes_in / max(self.bytes_out, 1)
            lines.append(f"bytes in {self.bytes_in:,} -> out {self.bytes_out:,} "
                         f"(ratio {ratio:.2f})")
        for p in self.failed:
            lines.append(f"FAILED  {p.source}: {p.reason}")
        for p in self.skipped[:max_skipped]:
            lines.append(f"skipped {p.source}: {p.reason}")
        if len(self.skipped) > max_skipped:
            lines.append(f"... and {len(self.skipped) - max_skipped} more skipped file(s) "
                         "(all are listed in the JSON report)")
        return "\n".join(lines)


def _walk(src: Path, exclude: Path | None) -> list[Path]:
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such file or directory")
    files = []
    for root, dirs, names in os.walk(src):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (exclude is None or (here / d).resolve() != exclude))
        files.extend(here / n for n in sorted(names) if not n.startswith("."))
    return files


def _sniff(path: Path) -> str | None:
    from .converters.image import signature_format
    from .converters.nifti import is_nifti

    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return None
    # DICOM first: the 128-byte preamble may itself be a TIFF header
    # (dual-personality DICOM-TIFF files)
    if head[128:132] == b"DICM":
        return "dicom"
    fmt = signature_format(head[:8])
    if fmt:
        return fmt
    if is_nifti(path):
        return "nifti"
    # DICOM without a preamble (old ACR-NEMA style): let pydicom decide
    return "dicom?" if len(head) >= 8 and head[0] in (0x02, 0x08) and head[1] == 0x00 else None


def _hash8(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _unique(name: str, taken: set[str], key: str) -> str:
    candidate = name if name not in taken else f"{name}-{_hash8(key)}"
    taken.add(candidate)
    return candidate


def _read_file(path: Path, fmt: str, max_bytes: int) -> SourceImage:
    from .converters.image import read_image_file
    from .converters.nifti import read_nifti

    if fmt == "nifti":
        return read_nifti(path, max_bytes=max_bytes)
    return read_image_file(path, max_bytes=max_bytes)


def _existing(root: zarr.Group, path: str) -> ImageInfo | None:
    try:
        node = root[path]
    except KeyError:
        return None
    attrs = node.attrs.get(ATTR) if isinstance(node, zarr.Group) else None
    if attrs is None:
        raise ConversionError(f"{path}: exists in the dataset and is not a mist-zarr image")
    return ImageInfo.from_json(attrs, where=path)


@dataclass
class Unit:
    """One piece of conversion work: a non-DICOM file, or one DICOM series.

    ``key`` identifies the source (stable across runs); ``name`` is the image
    path under the dataset root for files (DICOM names come from the headers).
    """

    kind: str  # the sniffed format: "dicom", "nifti", "png", "jpeg" or "tiff"
    key: str
    files: list[str]
    name: str = ""
    ref: Any = None


def plan(
    src: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    exclude: Path | None = None,
) -> tuple[list[Unit], list[Problem]]:
    """Find the work under ``src``: one :class:`Unit` per file or DICOM series.

    Reads DICOM headers only. Files that are not images, and DICOM files that
    cannot be read, are returned as problems.
    """
    sources = [Path(src)] if isinstance(src, (str, os.PathLike)) else [Path(s) for s in src]
    units: list[Unit] = []
    problems: list[Problem] = []
    dicom_files: list[Path] = []
    taken: set[str] = set()
    for base in sources:
        for path in _walk(base, exclude):
            kind = _sniff(path)
            if kind is None:
                problems.append(Problem(str(path), "not a DICOM, NIfTI, PNG, JPEG or TIFF file",
                                        kind="skipped", key=str(path.resolve())))
            elif kind.startswith("dicom"):
                dicom_files.append(path)
            else:
                rel = path.relative_to(base) if base.is_dir() else Path(path.name)
                stem = _file_stem(rel)
                name = _unique(stem, taken, str(path.resolve()))
                units.append(Unit(kind, str(path.resolve()), [str(path)], name=name))
    if dicom_files:
        from .converters.dicom import scan_dicom

        scan = scan_dicom(dicom_files)
        problems += [Problem(i.source, i.reason, kind="failed", key=str(Path(i.source).resolve()))
                     for i in scan.rejected]
        problems += [Problem(i.source, i.reason, kind="skipped", key=str(Path(i.source).resolve()))
                     for i in scan.skipped]
        for ref in scan.series:
            units.append(Unit("dicom", ref.key or ref.uid, list(ref.files), ref=ref))
    return units, problems


def _file_stem(rel: Path) -> str:
    from .converters.base import safe_name

    name = rel.name
    for suffix in (".nii.gz", ".nii", ".png", ".jpeg", ".jpg", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = rel.stem
    parts = [safe_name(p) for p in rel.parent.parts] + [safe_name(name)]
    return "/".join(parts)


def _read_unit(unit: Unit, max_bytes: int, batch_bytes: int | None = None) -> list[SourceImage]:
    """Read a unit's images; raises ConversionError (or DicomError) naming it.

    With ``batch_bytes``, large DICOM stacks come back as LazyPlanes (read
    in slice batches while they are written)."""
    if unit.kind != "dicom":
        image = _read_file(Path(unit.files[0]), unit.kind, max_bytes)
        image.name = unit.name
        return [image]
    from .converters.dicom import read_dicom_series

    return [v.to_source_image()
            for v in read_dicom_series(unit.ref, max_bytes=max_bytes, batch_bytes=batch_bytes)]


def iter_sources(
    src: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    problems: list[Problem],
    max_bytes: int = DEFAULT_MAX_BYTES,
    exclude: Path | None = None,
) -> Iterator[SourceImage]:
    """Read every image under ``src`` lazily, named as :func:`convert` names them.

    Files that are not images, and sources that cannot be read, are appended
    to ``problems`` with the reason.
    """
    units, found = plan(src, exclude=exclude)
    problems += found
    for unit in units:
        try:
            yield from _read_unit(unit, max_bytes)
        except ValueError as exc:
            problems.append(Problem(_label(unit), str(exc), key=unit.key))


def _label(unit: Unit) -> str:
    files = unit.files
    return files[0] if len(files) == 1 else f"{unit.key} ({len(files)} files, e.g. {files[0]})"


@dataclass
class _Options:
    overwrite: bool
    skip_existing: bool
    alpha: int
    quantize: str | None
    max_bytes: int
    batch_bytes: int | None
    threads: int | None
    run: str
    storage_options: dict[str, Any] | None


def _marker_key(unit: Unit) -> str:
    return f"{DONE_DIR}/{hashlib.sha1(unit.key.encode()).hexdigest()}.json"


def run_unit(unit: Unit, dest: Any, options: _Options) -> tuple[list[SeriesResult], list[Problem]]:
    """Convert one unit into the dataset ``dest`` (runs in-process or on a dask worker).

    Writes the unit's completion marker last, so an interrupted unit is
    redone by a rerun with ``skip_existing`` and a finished one is skipped
    without reading its sources again.
    """
    return write_unit(unit, dest, options, read_unit(unit, dest, options))


def read_unit(unit: Unit, dest: Any, options: _Options) -> Any:
    """The reading half of :func:`run_unit`: the unit's images, or its finished results
    (completion marker found with ``skip_existing``), or the Problem that refused it."""
    root = _open_root(dest, options.storage_options)
    if options.skip_existing:
        done = _read_json(root.store_path.store,
                          f"{root.store_path.path}/{_marker_key(unit)}".strip("/"))
        if done is not None:
            results = []
            for name in done["images"]:
                info = _existing(root, name)
                if info is None or not info.complete:
                    break
                results.append(SeriesResult(name, info.source_format, info.shape, info.dtype.name,
                                            0, 0, len(unit.files), status="existing"))
            else:
                return results
    try:
        return _read_unit(unit, options.max_bytes, options.batch_bytes)
    except (ValueError, OSError) as exc:
        return Problem(_label(unit), str(exc), key=unit.key)


def write_unit(unit: Unit, dest: Any, options: _Options,
               read: Any) -> tuple[list[SeriesResult], list[Problem]]:
    """The writing half of :func:`run_unit`, given what :func:`read_unit` returned."""
    if isinstance(read, Problem):
        return [], [read]
    if read and isinstance(read[0], SeriesResult):
        return read, []
    root = _open_root(dest, options.storage_options)
    results, problems = [], []
    for image in read:
        image.metadata["source_key"] = unit.key
        try:
            results.append(_write_one(root, image.name, image, options))
        except (ValueError, TypeError, OSError) as exc:
            problems.append(Problem(_label(unit), f"{image.name}: {exc}", key=unit.key))
    if not problems:
        _write_json(root.store_path.store,
                    f"{root.store_path.path}/{_marker_key(unit)}".strip("/"),
                    {"key": unit.key, "images": [r.path for r in results],
                     "files": len(unit.files), "run": options.run})
    return results, problems


def _open_root(dest: Any, storage_options: dict[str, Any] | None) -> zarr.Group:
    """The dataset root, created if missing; two conversions may create it at once."""
    from zarr.errors import ContainsGroupError

    for attempt in range(5):
        try:
            return zarr.open_group(dest, mode="a", zarr_format=3, storage_options=storage_options)
        except ContainsGroupError:  # created by another process between look and create
            if attempt == 4:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def _read_json(store: Any, key: str) -> dict[str, Any] | None:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    buf = sync(store.get(key, default_buffer_prototype()))
    return None if buf is None else json.loads(buf.to_bytes())


def _write_json(store: Any, key: str, doc: dict[str, Any]) -> None:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(json.dumps(doc).encode())))


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
    """
    import uuid

    if overwrite and skip_existing:
        raise ValueError("choose overwrite or skip_existing, not both")
    t0 = time.perf_counter()
    exclude = Path(dest).resolve() if isinstance(dest, (str, os.PathLike)) and \
        "://" not in str(dest) else None
    dest = str(dest) if isinstance(dest, os.PathLike) else dest
    report = ConvertReport(dest=str(dest))
    root = _open_root(dest, storage_options)
    if DATASET_ATTR not in root.attrs:
        root.attrs[DATASET_ATTR] = {"format": "mist-zarr-dataset", "format_version": FORMAT_VERSION}
    local = _local_root(root)
    if local is not None:
        _clean_scratch(local)
    units, problems = plan(src, exclude=exclude)
    report.problems += problems
    options = _Options(overwrite, skip_existing, alpha, quantize, max_bytes, batch_bytes,
                       threads if not (workers or scheduler) else (threads or 1),
                       uuid.uuid4().hex, storage_options)

    from tqdm.auto import tqdm

    # one step per series (or non-DICOM file), whichever worker finished it
    bar = tqdm(total=len(units), unit="series", desc="convert", disable=not progress,
               leave=False)

    def collect(unit: Unit, outcome: tuple[list[SeriesResult], list[Problem]]) -> None:
        results, unit_problems = outcome
        report.converted += results
        report.problems += unit_problems
        bar.update(1)
        bar.set_postfix_str(f"{len(report.converted)} images, {len(report.failed)} failed, "
                            f"{report.bytes_in / 1e6:.0f} MB in -> {report.bytes_out / 1e6:.0f} MB out")

    if workers or scheduler:
        _run_distributed(units, dest, options, workers, scheduler, collect, report)
    else:
        # Read unit i+1 (pydicom, mostly Python) on a thread while unit i is
        # encoded (imagecodecs releases the GIL): the second core is used, and
        # at most two units' samples are in memory.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="mist-read") as reader:
            ahead = reader.submit(read_unit, units[0], dest, options) if units else None
            for i, unit in enumerate(units):
                read = ahead.result()
                ahead = reader.submit(read_unit, units[i + 1], dest, options) \
                    if i + 1 < len(units) else None
                collect(unit, write_unit(unit, dest, options, read))
    bar.close()
    if local is not None:  # scratch left by workers killed during this run
        _clean_scratch(local)
    _update_catalog(root, report)
    _update_failures(root, report, units, options.run)
    report.seconds = time.perf_counter() - t0
    return report


def _update_failures(root: zarr.Group, report: ConvertReport, units: list[Unit], run: str) -> None:
    """Record this run's refused/failed sources in failures.csv next to the catalog."""
    from datetime import UTC, datetime

    from .catalog import FAILURES, update_failures

    now = datetime.now(UTC).isoformat(timespec="seconds")
    seen = {u.key for u in units} | {str(Path(f).resolve()) for u in units for f in u.files}
    rows = [{**asdict(p), "run": run, "time": now} for p in report.problems]
    try:
        update_failures(root, rows, seen)
    except (OSError, ValueError, ImportError) as exc:
        report.problems.append(Problem(f"{report.dest}/{FAILURES}",
                                       f"failure report not written: {exc}"))


def _update_catalog(root: zarr.Group, report: ConvertReport) -> None:
    """Keep the dataset's catalog.parquet in step with the images just written."""
    from .catalog import CATALOG, update_catalog

    try:
        update_catalog(root, [r.path for r in report.converted if r.status == "converted"])
    except (OSError, ValueError, ImportError) as exc:
        report.problems.append(Problem(f"{report.dest}/{CATALOG}", f"catalog not updated: {exc}"))


def _run_distributed(units, dest, options, workers, scheduler, collect, report) -> None:
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
    from distributed import Client, LocalCluster, as_completed

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
                collect(unit, ([], [Problem(_label(unit), f"task failed: {exc!r}", key=unit.key)]))
            future.release()
            del future
            if time.monotonic() - checked > 5:  # a cluster that scales gets a wider window
                window, checked = _window(client), time.monotonic()
            submit(window - len(futures))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _window(client) -> int:
    """Tasks kept submitted: two per worker thread (one running, one queued), at least 4."""
    try:
        threads = sum(client.nthreads().values())
    except Exception:  # noqa: BLE001 - a scheduler that does not answer: keep a small window
        threads = 0
    return max(4, 2 * threads)


def _clean_scratch(root: Path) -> None:
    """Remove scratch folders of writers on this host whose process is gone (killed,
    crashed). Folders are named ``host-pid-uuid``: other hosts' writers (a cluster
    on a shared file system) are not judged by this host's process table."""
    import shutil
    import socket

    scratch = root / TMP_DIR
    if not scratch.is_dir():
        return
    host = socket.gethostname()
    for entry in scratch.iterdir():
        parts = entry.name.removesuffix("-old").rsplit("-", 2)  # -old: a replaced image
        if len(parts) == 3 and parts[1] != "old":
            where, pid = parts[0], parts[1]
        else:  # written before host names were recorded: pid-uuid or pid-old-uuid
            where, pid = host, parts[0]
        if where == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
    try:  # leave no empty scratch folder behind
        scratch.rmdir()
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_one(root: zarr.Group, name: str, image: SourceImage, options: _Options) -> SeriesResult:
    bytes_in = sum(os.path.getsize(f) for f in image.source_files if os.path.exists(f))
    existing = _existing(root, name)
    if existing is not None and existing.complete:
        same_run = existing.metadata.get("convert_run") == options.run
        if options.skip_existing or same_run:  # same_run: a retried task after a lost worker
            return SeriesResult(name, existing.source_format, existing.shape,
                                existing.dtype.name, bytes_in, 0, len(image.source_files),
                                status="existing")
        if not options.overwrite:
            raise ConversionError("already converted; pass overwrite (--overwrite) to replace "
                                  "it or skip_existing (--skip-existing) to keep it")
    parent = name.rsplit("/", 1)[0] if "/" in name else ""
    if parent:
        _require_group(root, parent)
    metadata = image.write_metadata()
    metadata["convert_run"] = options.run
    kwargs = dict(dims=image.dims, spacing=image.spacing, affine=image.affine,
                  source_format=image.source_format, metadata=metadata,
                  alpha=options.alpha, quantize=options.quantize, threads=options.threads)
    local = _local_root(root)
    if local is not None:
        info = _write_and_rename(local, name, image.data, kwargs, replace=options.overwrite)
    else:
        # object stores have no rename: the image's "complete" flag, written
        # last, is what makes it visible to readers
        info = write_image(
            StorePath(root.store_path.store, f"{root.store_path.path}/{name}".strip("/")),
            image.data, overwrite=True, **kwargs)
    out = int(zarr.open_array(root.store_path.store, path=f"{root.store_path.path}/{name}/index"
                              .strip("/"), mode="r")[..., 0].sum())
    return SeriesResult(name, image.source_format, info.shape, info.dtype.name, bytes_in, out,
                        len(image.source_files), warnings=list(image.warnings))


def _require_group(root: zarr.Group, path: str) -> None:
    """Create the groups along ``path``; safe when other workers create them at once."""
    for attempt in range(3):
        try:
            root.require_group(path)
            return
        except Exception:  # another process created a node on the path in between
            try:
                if isinstance(root[path], zarr.Group):
                    return
            except KeyError:
                if attempt == 2:
                    raise
            else:
                raise ConversionError(f"{path}: exists in the dataset and is not a group")


def _local_root(root: zarr.Group) -> Path | None:
    from zarr.storage import LocalStore

    store = root.store_path.store
    if isinstance(store, LocalStore):
        return Path(store.root) / root.store_path.path
    return None


def _make_scratch(root: Path) -> Path:
    """Create a private folder under ``root/.mist-tmp`` for one image being written.

    Other writers remove ``.mist-tmp`` whenever they leave it empty, so it
    can vanish between creating it and creating the folder inside: retry.
    """
    import socket
    import uuid

    scratch = root / TMP_DIR / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
    deadline = time.monotonic() + 30  # each retry means another writer made progress
    while True:
        try:
            os.makedirs(scratch)
            return scratch
        except FileNotFoundError:  # .mist-tmp removed in between
            if time.monotonic() > deadline:
                raise
        except FileExistsError:
            if (root / TMP_DIR).is_dir() or time.monotonic() > deadline:
                raise  # (is_dir False: removed after os.makedirs saw it; retry)


def _write_and_rename(root: Path, name: str, data: Any, kwargs: dict[str, Any],
                      *, replace: bool) -> ImageInfo:
    """Write into a private folder of the dataset, then rename it into place.

    Readers see the previous complete image or the new complete one, never a
    partial one; of two concurrent writers of the same image, the second
    finds it in place and, unless ``replace``, reports it as already there.
    """
    import shutil

    scratch = _make_scratch(root)
    target = root / name
    try:
        info = write_image(scratch, data, **kwargs)
        try:
            os.rename(scratch, target)
        except OSError:  # the target exists (a complete image, or an older partial one)
            if not target.exists():
                raise
            existing = ImageInfo.from_json(
                json.loads((target / "zarr.json").read_text())["attributes"][ATTR], where=name
            ) if (target / "zarr.json").exists() else None
            if existing is not None and existing.complete and not replace:
                raise ConversionError("already converted (by a concurrent conversion); pass "
                                      "overwrite to replace it") from None
            retired = scratch.with_name(f"{scratch.name}-old")
            os.rename(target, retired)
            os.rename(scratch, target)
            shutil.rmtree(retired, ignore_errors=True)
        return info
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
        try:  # leave no empty scratch folder behind (zarr would warn about it)
            scratch.parent.rmdir()
        except OSError:
            pass


def list_images(dest: Any, *, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per mist-zarr image under the dataset root ``dest`` (sorted by path)."""
    import warnings

    from .store import forget_listings

    root = zarr.open_group(dest, mode="r", zarr_format=3, storage_options=storage_options)
    forget_listings(root.store_path.store)  # see what other processes wrote since a listing
    rows = []
    with warnings.catch_warnings():
        # the dataset's own bookkeeping folders (.mist-done, .mist-tmp) are not zarr nodes
        warnings.filterwarnings("ignore", message=r"Object at (\.mist-|catalog\.parquet|failures\.csv)")
        members = list(root.members(max_depth=None))
    for path, node in members:
        if not isinstance(node, zarr.Group) or ATTR not in node.attrs:
            continue
        try:
            info = ImageInfo.from_json(node.attrs[ATTR], where=path)
        except ValueError:
            continue
        index = node["index"][...] if info.complete else np.zeros((1,), np.uint64)
        meta = info.metadata
        dicom = meta.get("dicom", {}) if isinstance(meta, dict) else {}
        modality = (dicom.get("00080060", {}).get("Value") or [""])[0] if isinstance(
            dicom, dict) else ""
        rows.append({
            "path": path, "modality": modality, "shape": list(info.shape),
            "dtype": info.dtype.name, "spacing": list(info.spacing),
            "source_format": info.source_format, "levels": info.levels,
            "bytes": int(index[..., 0].sum()) if info.complete else 0,
            "complete": info.complete,
        })
    return sorted(rows, key=lambda r: r["path"])


def _json_default(o: Any) -> Any:  # pragma: no cover - used by the CLI
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=_json_default)

