"""Source units: walk files and folders, detect each file's format, name and read the images.

A :class:`Unit` is one piece of conversion work: a single-file source
(NIfTI, PNG, JPEG, TIFF) or one DICOM series. :func:`plan` finds the units
under a source, :func:`read_unit_images` reads one, and :func:`iter_sources`
reads them all, named as ``mist-zarr convert`` names them (``verify`` compares
a dataset with its sources through it).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SourceIssue
from . import detect, read_file, suffixes
from .base import DEFAULT_MAX_BYTES, SourceImage, safe_name
from .dicom import SeriesRef, read_dicom_series, scan_dicom
from .dicom.rtstruct import RTSTRUCT_SOP_CLASS
from .dicom.seg import SEG_SOP_CLASS, sop_class

__all__ = ["Unit", "iter_sources", "label", "plan", "read_unit_images"]

SourceArg = str | os.PathLike | Iterable[str | os.PathLike]


@dataclass
class Unit:
    """One piece of conversion work: a non-DICOM file, or one DICOM series.

    ``key`` identifies the source (stable across runs); ``name`` is the image
    path under the dataset root for files (DICOM names come from the headers).
    """

    kind: str  # the detected format: "dicom", "nifti", "png", "jpeg" or "tiff"
    key: str
    files: list[str]
    name: str = ""
    ref: SeriesRef | None = None  # DICOM: the series found by scan_dicom


def walk(src: Path, exclude: Path | None) -> list[Path]:
    """The files under ``src`` (itself if a file), sorted, hidden ones and ``exclude`` left out."""
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


def _unique(name: str, taken: set[str], key: str) -> str:
    candidate = name if name not in taken else f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    taken.add(candidate)
    return candidate


def _file_stem(rel: Path) -> str:
    """The image path of a single-file source: its relative path without the format suffix."""
    name = rel.name
    for suffix in suffixes():
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = rel.stem
    return "/".join([safe_name(p) for p in rel.parent.parts] + [safe_name(name)])


def plan(src: SourceArg, *, exclude: Path | None = None,
         on_scan: Callable[[str, int, int], None] | None = None,
         ) -> tuple[list[Unit], list[SourceIssue]]:
    """Find the work under ``src``: one :class:`Unit` per file or DICOM series.

    Reads DICOM headers only. Files that are not images, and DICOM files that
    cannot be read, are returned as issues. ``on_scan(step, done, total)``
    reports progress: step ``"detect"`` over all files, then ``"scan"`` over
    the DICOM files' headers.
    """
    sources = [Path(src)] if isinstance(src, (str, os.PathLike)) else [Path(s) for s in src]
    units: list[Unit] = []
    issues: list[SourceIssue] = []
    dicom_files: list[Path] = []
    bases: dict[Path, Path] = {}
    taken: set[str] = set()
    found = [(base, path) for base in sources for path in walk(base, exclude)]
    step = _Step("detect", len(found), on_scan)
    for base, path in found:
        kind = detect(path)
        if kind is None:
            issues.append(SourceIssue(str(path), "not a DICOM, NIfTI, PNG, JPEG or TIFF file",
                                      kind="skipped", key=str(path.resolve())))
        elif kind.startswith("dicom"):
            dicom_files.append(path)
            bases[path] = base
        else:
            rel = path.relative_to(base) if base.is_dir() else Path(path.name)
            name = _unique(_file_stem(rel), taken, str(path.resolve()))
            units.append(Unit(kind, str(path.resolve()), [str(path)], name=name))
        step.advance()
    if dicom_files:
        step = _Step("scan", len(dicom_files), on_scan)
        scan = scan_dicom(dicom_files, on_file=step.advance)
        issues += [SourceIssue(i.source, i.reason, kind="failed", key=str(Path(i.source).resolve()))
                   for i in scan.rejected]
        label_classes = {SEG_SOP_CLASS: "seg", RTSTRUCT_SOP_CLASS: "rtstruct"}
        kinds = {i.source: label_classes[c] for i in scan.skipped
                 if (c := sop_class(i.source)) in label_classes}
        segs = set(kinds)
        issues += [SourceIssue(i.source, i.reason, kind="skipped", key=str(Path(i.source).resolve()))
                   for i in scan.skipped if i.source not in segs]
        for source in sorted(segs):  # a DICOM SEG is a label map, stored beside its image
            path = Path(source)
            base = bases.get(path, path.parent)
            rel = path.relative_to(base) if base.is_dir() else Path(path.name)
            units.append(Unit(kinds[source], str(path.resolve()), [source],
                              name=_unique(_file_stem(rel), taken, str(path.resolve()))))
        units += [Unit("dicom", ref.key or ref.uid, list(ref.files), ref=ref) for ref in scan.series]
    return units, issues


class _Step:
    """Progress of one step of :func:`plan`: ``advance()`` after each of ``total`` items."""

    def __init__(self, name: str, total: int, on_scan: Callable[[str, int, int], None] | None):
        self.name, self.total, self.done, self.on_scan = name, total, 0, on_scan
        self._report()

    def advance(self) -> None:
        self.done += 1
        self._report()

    def _report(self) -> None:
        if self.on_scan is not None:
            self.on_scan(self.name, self.done, self.total)


def read_unit_images(unit: Unit, max_bytes: int,
                     batch_bytes: int | None = None) -> list[SourceImage]:
    """Read a unit's images; raises ConversionError (or DicomError) naming it.

    With ``batch_bytes``, large DICOM stacks come back as LazyPlanes (read
    in slice batches while they are written)."""
    if unit.kind in ("seg", "rtstruct"):  # laid onto its image at write time (convert.labels)
        return [SourceImage(data=None, dims=("z", "y", "x"), spacing=(1.0, 1.0, 1.0),
                            affine=np.eye(4), source_format="dicom", name=unit.name,
                            source_files=list(unit.files), labels=True,
                            metadata={f"{unit.kind}_file": unit.files[0]})]
    if unit.kind != "dicom":
        image = read_file(Path(unit.files[0]), unit.kind, max_bytes=max_bytes)
        image.name = unit.name
        return [image]
    return [v.to_source_image()
            for v in read_dicom_series(unit.ref, max_bytes=max_bytes, batch_bytes=batch_bytes)]


def label(unit: Unit) -> str:
    """How a unit is named in a report: its file, or its key and an example file."""
    files = unit.files
    return files[0] if len(files) == 1 else f"{unit.key} ({len(files)} files, e.g. {files[0]})"


def iter_sources(
    src: SourceArg,
    *,
    problems: list[SourceIssue],
    max_bytes: int = DEFAULT_MAX_BYTES,
    exclude: Path | None = None,
) -> Iterator[SourceImage]:
    """Read every image under ``src`` lazily, named as ``mist-zarr convert`` names them.

    Files that are not images, and sources that cannot be read, are appended
    to ``problems`` with the reason.
    """
    units, found = plan(src, exclude=exclude)
    problems += found
    for unit in units:
        try:
            yield from read_unit_images(unit, max_bytes)
        except ValueError as exc:
            problems.append(SourceIssue(label(unit), str(exc), key=unit.key))
