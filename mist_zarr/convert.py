"""``mist-zarr convert``: a file or tree of DICOM / NIfTI / PNG / JPEG / TIFF into a dataset root.

A dataset root is a Zarr v3 group holding one mist-zarr image group per
series (DICOM) or file (NIfTI, 2-D images), under readable, stable paths.
A source that fails is reported with its reason and the others go on; an
image is complete only once its ``complete`` flag is written, so a rerun
with ``skip_existing`` redoes exactly the unfinished ones.
"""

from __future__ import annotations

import hashlib
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

from .converters.base import ConversionError, SourceImage
from .format import ATTR, FORMAT_VERSION, ImageInfo
from .writer import write_image

__all__ = ["ConvertReport", "DEFAULT_MAX_BYTES", "Problem", "SeriesResult", "convert",
           "list_images"]

DEFAULT_MAX_BYTES = 8 << 30  # refuse images whose header declares more than 8 GiB
DATASET_ATTR = "mist_dataset"
TMP_DIR = ".mist-tmp"  # images being written; renamed into place when complete


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
    from .converters.image import image_format
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
    if is_nifti(path):
        return "nifti"
    fmt = image_format(path)
    if fmt:
        return fmt
    # DICOM without a preamble (old ACR-NEMA style): let pydicom decide
    return "dicom?" if len(head) >= 8 and head[0] in (0x02, 0x08) and head[1] == 0x00 else None


def _hash8(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _file_sources(files: list[Path], src: Path, max_bytes: int,
                  problems: list[Problem]) -> Iterator[SourceImage]:
    from .converters.image import read_image_file
    from .converters.nifti import read_nifti

    for path in files:
        fmt = _sniff(path)
        try:
            image = read_nifti(path, max_bytes=max_bytes) if fmt == "nifti" else \
                read_image_file(path, max_bytes=max_bytes)
        except ConversionError as exc:
            problems.append(Problem(str(path), str(exc)))
            continue
        rel = path.relative_to(src) if src.is_dir() else Path(path.name)
        stem = str(rel.parent / image.name) if str(rel.parent) != "." else image.name
        image.name = stem
        yield image


def _dicom_sources(files: list[Path], max_bytes: int,
                   problems: list[Problem]) -> Iterator[SourceImage]:
    from .converters import dicom

    yield from dicom.dicom_sources(files, max_bytes=max_bytes, problems=problems)


def _unique(name: str, taken: set[str], key: str) -> str:
    candidate = name
    if candidate in taken:
        candidate = f"{name}-{_hash8(key)}"
    taken.add(candidate)
    return candidate


def _existing(root: zarr.Group, path: str) -> ImageInfo | None:
    try:
        node = root[path]
    except KeyError:
        return None
    attrs = node.attrs.get(ATTR) if isinstance(node, zarr.Group) else None
    if attrs is None:
        raise ConversionError(f"{path}: exists in the dataset and is not a mist-zarr image")
    return ImageInfo.from_json(attrs, where=path)


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
    sources = [Path(src)] if isinstance(src, (str, os.PathLike)) else [Path(s) for s in src]
    files: list[tuple[Path, Path]] = []
    dicom_files: list[Path] = []
    for base in sources:
        for path in _walk(base, exclude):
            kind = _sniff(path)
            if kind is None:
                problems.append(Problem(str(path), "not a DICOM, NIfTI, PNG, JPEG or TIFF file",
                                        kind="skipped"))
            elif kind.startswith("dicom"):
                dicom_files.append(path)
            else:
                files.append((base, path))
    taken: set[str] = set()

    def named(images: Iterable[SourceImage]) -> Iterator[SourceImage]:
        for image in images:
            image.name = _unique(image.name, taken, "|".join(image.source_files))
            yield image

    for base in sources:
        yield from named(_file_sources([p for b, p in files if b == base], base, max_bytes,
                                       problems))
    if dicom_files:
        yield from named(_dicom_sources(dicom_files, max_bytes, problems))


def convert(
    src: str | os.PathLike | Iterable[str | os.PathLike],
    dest: Any,
    *,
    overwrite: bool = False,
    skip_existing: bool = False,
    alpha: int = 64,
    quantize: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    threads: int | None = None,
    progress: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> ConvertReport:
    """Convert a file, folder or tree (or a list of them) into the dataset root ``dest``.

    Returns a :class:`ConvertReport`; never raises for a bad source file or
    series (it is reported), only for unusable arguments or an unwritable
    ``dest``.
    """
    if overwrite and skip_existing:
        raise ValueError("choose overwrite or skip_existing, not both")
    t0 = time.perf_counter()
    sources = [Path(src)] if isinstance(src, (str, os.PathLike)) else [Path(s) for s in src]
    exclude = Path(dest).resolve() if isinstance(dest, (str, os.PathLike)) and \
        "://" not in str(dest) else None
    report = ConvertReport(dest=str(dest))
    root = zarr.open_group(dest, mode="a", zarr_format=3, storage_options=storage_options)
    if DATASET_ATTR not in root.attrs:
        root.attrs[DATASET_ATTR] = {"format": "mist-zarr-dataset", "format_version": FORMAT_VERSION}

    from tqdm.auto import tqdm

    problems = report.problems
    sources_iter = iter_sources(sources, problems=problems, max_bytes=max_bytes, exclude=exclude)
    bar = tqdm(unit="file", desc="convert", disable=not progress, leave=False)
    for image in sources_iter:
        name = image.name
        try:
            result = _write_one(root, name, image, overwrite=overwrite,
                                skip_existing=skip_existing, alpha=alpha, quantize=quantize,
                                threads=threads)
            report.converted.append(result)
        except (ValueError, TypeError, OSError) as exc:
            report.problems.append(Problem(", ".join(image.source_files[:3]) +
                                           (" …" if len(image.source_files) > 3 else ""),
                                           f"{name}: {exc}"))
        bar.update(len(image.source_files))
    bar.close()
    report.seconds = time.perf_counter() - t0
    return report


def _write_one(root: zarr.Group, name: str, image: SourceImage, *, overwrite: bool,
               skip_existing: bool, alpha: int, quantize: str | None,
               threads: int | None) -> SeriesResult:
    bytes_in = sum(os.path.getsize(f) for f in image.source_files if os.path.exists(f))
    existing = _existing(root, name)
    if existing is not None and existing.complete and skip_existing:
        return SeriesResult(name, existing.source_format, existing.shape, existing.dtype.name,
                            bytes_in, 0, len(image.source_files), status="existing")
    if existing is not None and existing.complete and not overwrite:
        raise ConversionError("already converted; pass overwrite (--overwrite) to replace it "
                              "or skip_existing (--skip-existing) to keep it")
    parent = name.rsplit("/", 1)[0] if "/" in name else ""
    if parent:
        root.require_group(parent)
    kwargs = dict(dims=image.dims, spacing=image.spacing, affine=image.affine,
                  source_format=image.source_format, metadata=image.write_metadata(),
                  alpha=alpha, quantize=quantize, threads=threads)
    local = _local_root(root)
    if local is not None:
        info = _write_and_rename(local, name, image.data, kwargs, replace=overwrite)
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


def _local_root(root: zarr.Group) -> Path | None:
    from zarr.storage import LocalStore

    store = root.store_path.store
    if isinstance(store, LocalStore):
        return Path(store.root) / root.store_path.path
    return None


def _write_and_rename(root: Path, name: str, data: Any, kwargs: dict[str, Any],
                      *, replace: bool) -> ImageInfo:
    """Write into a private folder of the dataset, then rename it into place.

    Readers see the previous complete image or the new complete one, never a
    partial one; of two concurrent writers of the same image, the second
    finds it in place and, unless ``replace``, reports it as already there.
    """
    import shutil
    import uuid

    scratch = root / TMP_DIR / uuid.uuid4().hex
    scratch.parent.mkdir(parents=True, exist_ok=True)
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
            retired = root / TMP_DIR / f"old-{uuid.uuid4().hex}"
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
    root = zarr.open_group(dest, mode="r", zarr_format=3, storage_options=storage_options)
    rows = []
    for path, node in root.members(max_depth=None):
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


def format_table(rows: list[dict[str, Any]]) -> str:
    """A human-readable table of :func:`list_images` rows."""
    width = max([len(r["path"]) for r in rows] + [4])
    out = [f"{'path':<{width}}  {'mod':<4} {'shape':<18} {'dtype':<7} {'spacing':<20} "
           f"{'source':<6} {'bytes':>12}"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        spacing = ",".join(f"{s:.3g}" for s in r["spacing"])
        flag = "" if r["complete"] else "  INCOMPLETE"
        out.append(f"{r['path']:<{width}}  {r['modality']:<4} {shape:<18} {r['dtype']:<7} "
                   f"{spacing:<20} {r['source_format']:<6} {r['bytes']:>12,}{flag}")
    return "\n".join(out)


def _json_default(o: Any) -> Any:  # pragma: no cover - used by the CLI
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(type(o))


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=_json_default)

