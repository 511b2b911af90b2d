"""Walk files and folders, read headers only and group image objects into series."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ...errors import SourceIssue
from .header import _non_image_reason, _read_header, _Refused, keep_header, raw_copy
from .tags import _int, _text

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class SeriesRef:
    """One DICOM series found by :func:`scan_dicom`: its files and a summary.

    ``key`` is the grouping identity: the SeriesInstanceUID, or for files
    without one a ``no-series-uid:<hash>`` of their folder and series
    attributes (``warnings`` then says so). ``copies`` maps a file of
    ``files`` to the other files holding the same SOPInstanceUID, in scan
    order: reading falls back to them when that file fails to decode.
    """

    uid: str
    files: list[str]
    modality: str = ""
    description: str = ""
    series_number: int | None = None
    patient_id: str = ""
    study_uid: str = ""
    study_date: str = ""
    study_description: str = ""
    sop_classes: list[str] = field(default_factory=list)
    n_frames: int = 0
    key: str = ""
    warnings: list[str] = field(default_factory=list)
    copies: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class ScanResult:
    """Series found by :func:`scan_dicom`, plus rejected and skipped files."""

    series: list[SeriesRef]
    rejected: list[SourceIssue]  # kind "rejected": not DICOM, unreadable or truncated
    skipped: list[SourceIssue]  # kind "skipped": no image, or another copy of an instance


def _iter_files(paths: Iterable[PathLike] | PathLike) -> Iterator[tuple[str, bool]]:
    """Yield (file path, named explicitly) for files and the files under folders (sorted)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for item in paths:
        p = Path(item)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    yield str(Path(root) / name), False
        else:
            yield str(p), True


def _scan(paths: Iterable[PathLike] | PathLike,
          on_file: Callable[[], None] | None = None) -> tuple[ScanResult, set[str]]:
    groups: dict[tuple[str, str], SeriesRef] = {}
    seen: dict[str, tuple[str, SeriesRef]] = {}  # SOPInstanceUID -> first file, its series
    rejected: list[SourceIssue] = []
    skipped: list[SourceIssue] = []
    explicit: set[str] = set()
    numbers: dict[str, set[str]] = {}
    for path, named in _reported(_iter_files(paths), on_file):
        if named:
            explicit.add(path)
        try:
            header = _read_header(path)
            raw = raw_copy(header)  # before the checks below parse any element
            ds, pixel_tag, _ = header
            refusal = _non_image_reason(ds, pixel_tag)
            if refusal:
                kind, reason = refusal
                raise _Refused(path, reason, kind)
        except _Refused as r:
            (rejected if r.issue.kind == "rejected" else skipped).append(r.issue)
            continue
        sop_uid = _text(ds, "SOPInstanceUID")
        if sop_uid and sop_uid in seen:
            first, owner = seen[sop_uid]
            owner.copies.setdefault(first, []).append(path)
            skipped.append(
                SourceIssue(
                    path,
                    f"duplicate SOPInstanceUID {sop_uid} (same instance as {first}; read "
                    "instead if that copy fails to decode, compared with it otherwise)",
                    kind="skipped",
                )
            )
            continue
        uid = _text(ds, "SeriesInstanceUID")
        base = uid or _fallback_series_key(path, ds)
        number = _text(ds, "SeriesNumber")
        numbers.setdefault(base, set()).add(number)
        ref = groups.get((base, number))
        if ref is None:
            ref = groups[(base, number)] = SeriesRef(
                uid=uid,
                files=[],
                key=base,
                warnings=[]
                if uid
                else [f"no SeriesInstanceUID: files grouped by {_FALLBACK_DESC}"],
                modality=_text(ds, "Modality"),
                description=_text(ds, "SeriesDescription"),
                series_number=_int(ds, "SeriesNumber"),
                patient_id=_text(ds, "PatientID"),
                study_uid=_text(ds, "StudyInstanceUID"),
                study_date=_text(ds, "StudyDate"),
                study_description=_text(ds, "StudyDescription"),
            )
        ref.files.append(path)
        if sop_uid:
            seen[sop_uid] = (path, ref)
        keep_header(path, raw)  # for the read of this series: one parse per header
        sop_class = _text(ds, "SOPClassUID")
        if sop_class and sop_class not in ref.sop_classes:
            ref.sop_classes.append(sop_class)
        ref.n_frames += _int(ds, "NumberOfFrames") or 1
    for (base, number), ref in groups.items():
        if len(numbers[base]) > 1:  # one UID, several SeriesNumbers: edited copies, keep them apart
            ref.warnings.append(
                f"{base} is shared by files with SeriesNumbers {', '.join(sorted(numbers[base]))}; split by SeriesNumber"
            )
            ref.key = f"{base}#{number}"
    return ScanResult(series=list(groups.values()), rejected=rejected, skipped=skipped), explicit


_FALLBACK_DESC = "folder, FrameOfReferenceUID, StudyDate, SeriesDate/Time, SeriesNumber, SeriesDescription and Modality"


def _fallback_series_key(path: str, ds: Any) -> str:
    """Return a grouping key for files whose SeriesInstanceUID is empty (e.g. over-anonymised)."""
    parts = [str(Path(path).parent)] + [
        _text(ds, k)
        for k in (
            "FrameOfReferenceUID",
            "StudyDate",
            "SeriesDate",
            "SeriesTime",
            "SeriesNumber",
            "SeriesDescription",
            "Modality",
        )
    ]
    return "no-series-uid:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _reported(items: Iterator[Any], on_item: Callable[[], None] | None) -> Iterator[Any]:
    """``items``, calling ``on_item()`` as each one is done with (when the next is asked for)."""
    for item in items:
        yield item
        if on_item is not None:
            on_item()


def scan_dicom(paths: Iterable[PathLike] | PathLike,
               on_file: Callable[[], None] | None = None) -> ScanResult:
    """Scan files and folders (recursively), reading headers only, and group images by series.

    Non-DICOM, unreadable and truncated files go to ``rejected``; DICOM
    objects without an image and further copies of a SOPInstanceUID to
    ``skipped``, each with a reason (a series keeps its copies in
    ``SeriesRef.copies``). Nothing is raised for a bad file. ``on_file()`` is
    called as each file is done with (for progress).
    """
    return _scan(paths, on_file)[0]
