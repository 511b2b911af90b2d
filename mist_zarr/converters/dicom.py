"""Read DICOM files into in-memory volumes (the reader half of ``mist-zarr convert``).

Two steps:

* :func:`scan_dicom` walks files and folders, reads headers only and groups
  image objects by SeriesInstanceUID (files sharing a UID but not a
  SeriesNumber are kept apart; files without a UID are grouped by folder and
  series attributes). Files that are not DICOM, unreadable or truncated are
  listed in ``ScanResult.rejected``; DICOM objects without an image (SR, SEG,
  RTSTRUCT, RTPLAN, PR, KO, DICOMDIR ...) and duplicate instances in
  ``ScanResult.skipped``. Nothing is raised for a bad file.
* :func:`read_dicom_series` turns one series into one or more
  :class:`DicomVolume` (a series splits into several stacks when its images
  differ in orientation, matrix, pixel format, echo, image type or
  enhanced-MF StackID, or when acquisitions form separate volumes).
  Inconsistent geometry is refused with :class:`DicomError`, never guessed.
* :func:`dicom_sources` is the hook ``mist_zarr.convert`` calls: it yields
  :class:`~mist_zarr.converters.base.SourceImage` objects and reports every
  rejected file and refused series.

Decisions (the reasons are in the principles of ``design.md``):

* Pixels are the *stored* values exactly as ``Dataset.pixel_array`` returns
  them in pydicom 3 (no rescale, signedness from PixelRepresentation,
  BitsStored masking / sign extension by pydicom), in native byte order.
  MONOCHROME1 is kept as stored and recorded. Colour becomes RGB with a
  trailing ``c`` axis: YBR_FULL / YBR_FULL_422 are converted by pydicom
  (``convert_color_space``, the ``pixel_array`` default), JPEG 2000 YBR_RCT /
  YBR_ICT are reversed by the decoder, PALETTE COLOR indices are mapped with
  ``apply_color_lut``; each conversion is recorded in ``DicomVolume.notes``.
* Slices are ordered by their position projected on the slice normal (the
  cross product of the ImageOrientationPatient cosines), never by
  InstanceNumber. Several images at every position make a 4-D ``(t, z, y, x)``
  volume; at one position they are ordered by TemporalPositionIdentifier /
  TemporalPositionIndex, AcquisitionNumber, TriggerTime,
  DimensionIndexValues and finally InstanceNumber. Unequal image counts per
  position, non-collinear origins or differing in-plane origins are refused.
  Non-uniform spacing, missing slices and gantry tilt are warnings; tilt is
  kept as a shear in the affine (no resampling, unlike dcm2niix), and every
  slice position is kept in ``per_slice["position_lps"]``.
* Siemens mosaics (ImageType contains MOSAIC) are de-mosaicked with the CSA
  image header (NumberOfImagesInMosaic, SliceNormalVector; parsed by
  ``nibabel.nicom.csareader``). When that is impossible the mosaic frame is
  returned as a 2-D image with an explicit warning, never as a wrong stack.
* Multi-frame objects without per-frame positions (cine, NM, SC ...) get a
  ``t`` axis when frames are temporal (FrameTime / FrameTimeVector /
  TemporalPositionIndex) and a neutral ``frame`` axis otherwise.
* ``affine`` is RAS+ (NIfTI convention): it maps ``(i, j, k, 1)`` with
  ``i`` = column (last spatial array axis), ``j`` = row, ``k`` = slice
  (the spatial array axes reversed) to millimetres. 2-D images use ``k = 0``
  with the slice normal times a nominal thickness. Without
  ImagePositionPatient / ImageOrientationPatient (e.g. CR) the geometry is
  nominal (PatientOrientation letters when usable, origin 0) and a warning
  says so. Compared with dcm2niix (the test oracle) the voxels and the
  geometry agree after reorientation to the closest RAS+; dcm2niix differs
  in storage order (it flips rows), it resamples gantry-tilted CT where this
  reader keeps the shear, and a mosaic that cannot be de-mosaicked here
  stays 2-D where dcm2niix may still try.
* ``metadata`` is the DICOM JSON model (PS3.18 F.2) of the attributes common
  to all slices of the volume; attributes that vary between slices are in
  ``per_slice`` (values are the JSON model ``Value`` arrays, or the
  ``InlineBinary`` / ``BulkDataURI`` string for binary VRs; VRs are in
  ``per_slice_vr``). Binary values over 1024 bytes are replaced by a
  ``BulkDataURI`` of the form ``urn:x-mist-zarr:omitted:<bytes>:sha1-<hex16>``.
  Pixel data is never in the metadata.
* Lossy sources are flagged (``lossy_source``): LossyImageCompression "01",
  JPEG baseline/extended, JPEG-LS near-lossless, MPEG/HEVC, JPEG XL, and
  JPEG 2000 / HTJ2K codestreams that use the irreversible 9/7 wavelet (or that
  cannot be inspected in a "may be lossy" transfer syntax).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import struct
import unicodedata
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from . import _dicom_geometry as geom
from .base import LazyPlanes
from ..errors import DicomError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DicomError",
    "DicomVolume",
    "FileIssue",
    "ScanResult",
    "SeriesRef",
    "dicom_sources",
    "iter_dicom_volumes",
    "read_dicom_series",
    "scan_dicom",
    "suggest_name",
]

PathLike = Union[str, "os.PathLike[str]"]

# The converter registry's entries (mist_zarr.converters.detect).
FORMAT = "dicom"
SUFFIXES = (".dcm", ".dicom")


def sniff(head: bytes) -> str | None:
    """``"dicom"`` for a Part 10 preamble; ``"dicom?"`` (tentative: pydicom decides) for
    what may be an old ACR-NEMA file without one; else None."""
    if head[128:132] == b"DICM":  # checked before TIFF: a preamble may be a TIFF header
        return FORMAT
    return "dicom?" if len(head) >= 8 and head[0] in (0x02, 0x08) and head[1] == 0x00 else None


#: Default ceiling on the decoded size of one series (bytes).
DEFAULT_MAX_BYTES = 4 * 1024**3

#: Binary values longer than this are summarised in the JSON metadata (bytes).
BULK_DATA_THRESHOLD = 1024

_INSTALL_HINT = (
    "reading DICOM needs pydicom>=3 and the pylibjpeg decoders: "
    "pip install 'pydicom>=3' pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
)

_PIXEL_TAGS = {
    0x7FE00010: "PixelData",
    0x7FE00008: "FloatPixelData",
    0x7FE00009: "DoubleFloatPixelData",
}
_NON_METADATA_TAGS = {"7FE00010", "7FE00008", "7FE00009", "7FE00001", "7FE00002", "FFFCFFFC"}
_PER_FRAME_TAG = "52009230"
_EXPLICIT_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_INT_DTYPES = {np.dtype(t) for t in ("int8", "uint8", "int16", "uint16", "int32", "uint32")}

# SOP classes that never carry an image volume (matched as a UID or UID prefix).
_NON_IMAGE_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registration, fiducials, SEG, surface SEG, tractography ...
    "1.2.840.10008.5.1.4.1.1.88",  # structured reports, including key object selection
    "1.2.840.10008.5.1.4.1.1.11",  # presentation states
    "1.2.840.10008.5.1.4.1.1.9",  # waveforms
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated PDF / CDA / STL / OBJ / MTL
    "1.2.840.10008.5.1.4.1.1.67",  # real world value mapping
    "1.2.840.10008.5.1.4.38",  # hanging protocols
    "1.2.840.10008.5.1.4.39",  # colour palettes
    "1.2.840.10008.1.3.10",  # media storage directory (DICOMDIR)
)
_RT_PREFIX = "1.2.840.10008.5.1.4.1.1.481"
_RT_IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.481.1",
    "1.2.840.10008.5.1.4.1.1.481.2",
}  # RT Image, RT Dose
_NON_IMAGE_MODALITIES = {
    "SEG",
    "SR",
    "RTSTRUCT",
    "RTPLAN",
    "RTRECORD",
    "PR",
    "KO",
    "REG",
    "FID",
    "RWV",
    "DOC",
    "PLAN",
}

_LOSSY_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    *(
        f"1.2.840.10008.1.2.4.{n}" for n in (52, 53, 54, 55, 56, 59, 60, 61, 62, 63, 64)
    ),  # retired lossy JPEG
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    *(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)),  # MPEG-2 / MPEG-4 / HEVC
    *(f"1.2.840.10008.1.2.4.{n}.1" for n in range(100, 107)),  # fragmentable video
    "1.2.840.10008.1.2.4.111",  # JPEG XL recompressed JPEG
    "1.2.840.10008.1.2.4.112",  # JPEG XL (may be lossy; codestream not inspected)
}
_MAYBE_LOSSY_J2K = {
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 multi-component
    "1.2.840.10008.1.2.4.203",  # HTJ2K
}
_DEFLATED = "1.2.840.10008.1.2.1.99"


@dataclass(frozen=True)
class FileIssue:
    """A file that was not read as part of a series, and why."""

    path: str
    reason: str


@dataclass
class SeriesRef:
    """One DICOM series found by :func:`scan_dicom`: its files and a summary.

    ``key`` is the grouping identity: the SeriesInstanceUID, or for files
    without one a ``no-series-uid:<hash>`` of their folder and series
    attributes (``warnings`` then says so).
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


@dataclass
class ScanResult:
    """Series found by :func:`scan_dicom`, plus rejected and skipped files."""

    series: list[SeriesRef]
    rejected: list[FileIssue]
    skipped: list[FileIssue]


@dataclass
class DicomVolume:
    """One geometrically consistent image stack read from a DICOM series.

    ``data`` has axes ``dims`` (a subset of ``t, z, y, x`` / ``frame, y, x``
    plus a trailing ``c`` for RGB); ``spacing`` has one entry per non-``c``
    axis (mm for z/y/x, seconds for t, 1.0 per index for ``frame``);
    ``affine`` is the RAS+ 4x4 for (i=x, j=y, k=z) voxel indices. The slice
    lists in ``per_slice`` follow the stored slice order, i.e. ``data``
    flattened over its leading (t, z / frame) axes, t outermost; besides
    DICOM keywords (or ``GGGGEEEE`` tags for private attributes) they hold
    ``source_file_index`` (into ``source_files``), ``frame_index``,
    ``mosaic_tile_index`` for mosaics and ``position_lps`` (the slice origin
    used for the geometry). Nested JSON dicts may be shared between the
    volumes of one read: copy before mutating.
    """

    data: np.ndarray | LazyPlanes
    dims: tuple[str, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    metadata: dict[str, Any]
    per_slice: dict[str, list[Any]]
    per_slice_vr: dict[str, str]
    warnings: list[str]
    notes: list[str]
    source_files: list[str]
    lossy_source: bool
    photometric: str
    source_photometric: str
    transfer_syntaxes: list[str]
    series_uid: str
    stack_key: str
    modality: str
    name: str

    @property
    def axis_units(self) -> tuple[str, ...]:
        """Units of ``spacing``, one per non-``c`` axis."""
        units = {"t": "s", "z": "mm", "y": "mm", "x": "mm", "frame": ""}
        return tuple(units[d] for d in self.dims if d != "c")

    def to_source_image(self) -> Any:
        """Return this volume as the writer's ``SourceImage`` (DICOM JSON under ``metadata["dicom"]``)."""
        from .base import SourceImage

        spacing = self.spacing + ((1.0,) if "c" in self.dims else ())
        metadata = {
            "dicom": self.metadata,
            "dicom_per_slice": self.per_slice,
            "dicom_per_slice_vr": self.per_slice_vr,
            "series_uid": self.series_uid,
            "stack_key": self.stack_key,
            "modality": self.modality,
            "photometric": self.photometric,
            "source_photometric": self.source_photometric,
            "transfer_syntaxes": self.transfer_syntaxes,
            "notes": self.notes,
        }
        return SourceImage(
            data=self.data,
            dims=self.dims,
            spacing=spacing,
            affine=self.affine,
            source_format="dicom",
            name=self.name,
            metadata=metadata,
            warnings=list(self.warnings),
            source_files=list(self.source_files),
            lossy_source=self.lossy_source,
        )


# --------------------------------------------------------------------------- pydicom access


def _pydicom() -> Any:
    """Import pydicom lazily, with an install hint when it is missing or too old."""
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from exc
    if int(pydicom.__version__.split(".")[0]) < 3:  # pragma: no cover
        raise ImportError(f"pydicom {pydicom.__version__} is too old; {_INSTALL_HINT}")
    return pydicom


class _Rejected(Exception):
    """Internal: a file is rejected ('rejected') or skipped ('skipped') with a reason."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True)
class _PixelLoc:
    """Where a pixel data element's value lies in its file."""

    vr: str | None
    start: int
    end: int
    undefined_length: bool


def _read_header(path: str) -> tuple[Any, int | None, _PixelLoc | None]:
    """Read a file's header (up to the pixel data) and check the pixel data is complete.

    Returns the header dataset, the pixel data tag (None if absent) and the
    location of its value (None if absent or deflated). Raises _Rejected for
    non-DICOM, unreadable or truncated files.
    """
    _pydicom()
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_partial

    captured: dict[str, Any] = {}
    loc = None

    def stop(tag: int, vr: str | None, length: int) -> bool:
        if int(tag) in _PIXEL_TAGS:
            captured.update(tag=int(tag), vr=vr, length=length)
            return True
        return False

    try:
        with open(path, "rb") as fp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_partial(fp, stop_when=stop, force=False)
            ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
            if not ts:
                raise _Rejected("rejected", "File Meta Information has no TransferSyntaxUID")
            if captured and str(ts) != _DEFLATED:
                loc = _check_pixel_extent(fp, ds, ts, captured)
    except _Rejected:
        raise
    except InvalidDicomError:
        raise _Rejected(
            "rejected", "not a DICOM Part 10 file (no 'DICM' prefix / File Meta Information)"
        ) from None
    except IsADirectoryError:
        raise _Rejected("rejected", "is a directory") from None
    except OSError as exc:
        raise _Rejected("rejected", f"cannot read file ({_one_line(exc)})") from None
    except Exception as exc:
        raise _Rejected("rejected", f"unreadable DICOM header ({_one_line(exc)})") from None
    return ds, captured.get("tag"), loc


def _check_pixel_extent(fp: Any, ds: Any, ts: Any, captured: dict[str, Any]) -> _PixelLoc:
    """Return where the pixel data value lies; raise _Rejected if it runs past the end of the file."""
    start = fp.tell()  # pydicom rewinds to the start of the pixel data element
    size = os.fstat(fp.fileno()).st_size
    vr, length, name = captured["vr"], captured["length"], _PIXEL_TAGS[captured["tag"]]
    header = 12 if (not ts.is_implicit_VR and vr in _EXPLICIT_LONG_VRS) else 8
    value_start = start + header
    if length != 0xFFFFFFFF:
        available = size - value_start
        if available < length:
            raise _Rejected(
                "rejected",
                f"truncated: {name} declares {length} bytes but the file holds {max(available, 0)}",
            )
        expected = _expected_native_bytes(ds)
        if (
            captured["tag"] == 0x7FE00010
            and not ts.is_encapsulated
            and expected is not None
            and length < expected
        ):
            raise _Rejected(
                "rejected",
                f"pixel data too short: {length} bytes for an image of {expected} bytes "
                "(Rows x Columns x frames x samples x BitsAllocated)",
            )
        return _PixelLoc(vr, value_start, value_start + length, False)
    fp.seek(value_start)
    pos, items = value_start, 0
    while True:
        head = fp.read(8)
        if len(head) < 8:
            raise _Rejected(
                "rejected",
                f"truncated: encapsulated {name} ends after {items} item(s) without its delimiter",
            )
        group, elem, item_len = struct.unpack("<HHL", head)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return _PixelLoc(vr, value_start, pos, True)
        if (group, elem) != (0xFFFE, 0xE000) or item_len == 0xFFFFFFFF:
            raise _Rejected(
                "rejected",
                f"malformed encapsulated {name}: unexpected item ({group:04X},{elem:04X}) at byte {pos}",
            )
        pos += 8 + item_len
        if pos > size:
            raise _Rejected(
                "rejected",
                f"truncated: encapsulated {name} item {items} needs {item_len} bytes, file ends {pos - size} bytes short",
            )
        fp.seek(pos)
        items += 1


def _expected_native_bytes(ds: Any) -> int | None:
    """Return the size of native (uncompressed) pixel data implied by the header, or None."""
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        if samples == 3 and str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
            samples = 2  # chroma sub-sampled horizontally: Y Y Cb Cr per two pixels
        bits = int(ds.Rows) * int(ds.Columns) * frames * samples * int(ds.BitsAllocated)
    except Exception:
        return None
    return (bits + 7) // 8


def _non_image_reason(ds: Any, pixel_tag: int | None) -> tuple[str, str] | None:
    """Return (kind, reason) when a DICOM object holds no image to read, else None."""
    from pydicom.uid import UID

    sop = _text(ds, "SOPClassUID") or _text(
        getattr(ds, "file_meta", None), "MediaStorageSOPClassUID"
    )
    name = UID(sop).name if sop else "unknown SOP class"
    if any(sop == p or sop.startswith(p + ".") for p in _NON_IMAGE_SOP_CLASSES) or (
        sop.startswith(_RT_PREFIX + ".") and sop not in _RT_IMAGE_CLASSES
    ):
        return "skipped", f"non-image object: {name}"
    modality = _text(ds, "Modality").upper()
    if modality in _NON_IMAGE_MODALITIES:
        return "skipped", f"non-image object: Modality {modality} ({name})"
    if pixel_tag is None:
        if "Rows" in ds or "Columns" in ds:
            return (
                "rejected",
                f"image attributes present but no pixel data element (truncated file?) ({name})",
            )
        return "skipped", f"no pixel data ({name})"
    return None


# --------------------------------------------------------------------------- scanning


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


def _scan(paths: Iterable[PathLike] | PathLike) -> tuple[ScanResult, set[str]]:
    groups: dict[tuple[str, str], SeriesRef] = {}
    seen: dict[str, str] = {}
    rejected: list[FileIssue] = []
    skipped: list[FileIssue] = []
    explicit: set[str] = set()
    numbers: dict[str, set[str]] = {}
    for path, named in _iter_files(paths):
        if named:
            explicit.add(path)
        try:
            ds, pixel_tag, _ = _read_header(path)
            issue = _non_image_reason(ds, pixel_tag)
            if issue:
                raise _Rejected(*issue)
        except _Rejected as r:
            (rejected if r.kind == "rejected" else skipped).append(FileIssue(path, r.reason))
            continue
        sop_uid = _text(ds, "SOPInstanceUID")
        if sop_uid and sop_uid in seen:
            skipped.append(
                FileIssue(
                    path, f"duplicate SOPInstanceUID {sop_uid} (same instance as {seen[sop_uid]})"
                )
            )
            continue
        if sop_uid:
            seen[sop_uid] = path
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


def scan_dicom(paths: Iterable[PathLike] | PathLike) -> ScanResult:
    """Scan files and folders (recursively), reading headers only, and group images by series.

    Non-DICOM, unreadable and truncated files go to ``rejected``; DICOM
    objects without an image and duplicate SOPInstanceUIDs to ``skipped``;
    each with a reason. Nothing is raised for a bad file.
    """
    return _scan(paths)[0]


# --------------------------------------------------------------------------- value helpers


def _get(container: Any, keyword: str) -> Any:
    try:
        return container.get(keyword) if container is not None else None
    except Exception:
        return None


def _text(container: Any, keyword: str) -> str:
    value = _get(container, keyword)
    if value is None:
        return ""
    if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _float(container: Any, keyword: str) -> float | None:
    value = _get(container, keyword)
    try:
        out = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return out if out is not None and math.isfinite(out) else None


def _int(container: Any, keyword: str) -> int | None:
    value = _float(container, keyword)
    return int(value) if value is not None and value == int(value) else None


def _floats(container: Any, keyword: str, n: int) -> tuple[float, ...] | None:
    value = _get(container, keyword)
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _strings(container: Any, keyword: str) -> tuple[str, ...]:
    value = _get(container, keyword)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value.strip().upper(),)
    try:
        return tuple(str(v).strip().upper() for v in value)
    except TypeError:
        return (str(value).strip().upper(),)


def _fg(item: Any, shared: Any, sequence: str, keyword: str) -> Any:
    """Return ``keyword`` from a functional group, per-frame first, then shared."""
    for group in (item, shared):
        seq = _get(group, sequence)
        if seq:
            inner = seq[0]
            if keyword in inner:
                return inner
    return None


def _key(value: Any) -> tuple[int, Any]:
    """Sort key that puts missing values last."""
    return (1, 0) if value is None or value == () else (0, value)


def _pixel_spacing(container: Any) -> tuple[tuple[float, float] | None, str | None]:
    """Return (row, column) spacing and a note when it is not PixelSpacing."""
    for keyword, note in (
        ("PixelSpacing", None),
        (
            "ImagerPixelSpacing",
            "spacing from ImagerPixelSpacing (detector plane, not corrected for magnification)",
        ),
        ("NominalScannedPixelSpacing", "spacing from NominalScannedPixelSpacing (scanned film)"),
    ):
        value = _floats(container, keyword, 2)
        if value and value[0] > 0 and value[1] > 0:
            return value, note
    return None, None


# --------------------------------------------------------------------------- per-file information


@dataclass
class _FileInfo:
    path: str
    ds: Any
    ts: Any
    rows: int
    cols: int
    spp: int
    bits_allocated: int
    pixel_representation: int
    photometric: str
    n_frames: int
    enhanced: bool
    signature: dict[
        str, Any
    ]  # tag -> element fingerprint, to find attributes that vary between files
    pixel_loc: _PixelLoc | None
    builder: _JsonBuilder
    warnings: list[str] = field(default_factory=list)
    mosaic: tuple[int, int, int] | None = None  # (tiles per side, tile rows, tile columns)

    @property
    def charset(self) -> str:
        return _text(self.ds, "SpecificCharacterSet")

    def json(self) -> dict[str, Any]:
        """Return the DICOM JSON model of the header (no pixel data, group lengths or per-frame groups)."""
        return {
            t: v
            for t in self.signature
            if (v := self.builder.element(self.ds, t, self.charset)) is not None
        }

    def element_json(self, tag: str) -> dict[str, Any] | None:
        """Return the DICOM JSON model of one top-level element, or None if absent or invalid."""
        return self.builder.element(self.ds, tag, self.charset)

    def perframe(self, index: int) -> dict[str, Any] | None:
        """Return the JSON model of one item of PerFrameFunctionalGroupsSequence."""
        items = _get(self.ds, "PerFrameFunctionalGroupsSequence") or []
        return self.builder.dataset(items[index], self.charset) if index < len(items) else None


@dataclass
class _Frame:
    file: int
    index: int
    group: tuple[tuple[str, Any], ...]
    temporal: tuple[Any, ...]
    check: tuple[Any, Any]  # (temporal position, acquisition number) used to validate 4-D volumes
    position: np.ndarray | None = None
    iop: tuple[float, ...] | None = None
    pixel_spacing: tuple[float, float] | None = None
    spacing_note: str | None = None
    thickness: float | None = None
    tile: int | None = None
    temporal_axis: bool = False


def _bulk_uri(elem: Any) -> str:
    value = elem.value
    data = (
        bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else str(value).encode()
    )
    return f"urn:x-mist-zarr:omitted:{len(data)}:sha1-{hashlib.sha1(data).hexdigest()[:16]}"


def _is_metadata_tag(tag: str) -> bool:
    """False for pixel data, trailing padding, per-frame groups and (retired) group lengths."""
    return tag not in _NON_METADATA_TAGS and tag != _PER_FRAME_TAG and not tag.endswith("0000")


def _element_signature(elem: Any) -> Any:
    """Return a hashable fingerprint of a (raw or parsed) element, cheap for unparsed values."""
    from pydicom.dataelem import RawDataElement

    if elem is None:
        return None
    if isinstance(elem, RawDataElement):
        return (int(elem.tag), elem.VR, elem.value)
    if elem.VR == "SQ":
        return (
            int(elem.tag),
            "SQ",
            tuple(
                tuple(_element_signature(item.get_item(t)) for t in item.keys())  # noqa: SIM118 (a Dataset iterates elements)
                for item in elem.value
            ),
        )
    return (int(elem.tag), elem.VR, repr(elem.value))


class _JsonBuilder:
    """DICOM JSON model conversion that converts each distinct element value only once.

    Enhanced multi-frame headers repeat the same functional-group items for
    hundreds of frames; memoising on (character set, tag, VR, raw bytes)
    makes their per-frame JSON cheap. Elements that cannot be converted are
    left out and their tags collected in ``dropped``.
    """

    def __init__(self) -> None:
        self._memo: dict[Any, dict[str, Any]] = {}
        self.dropped: set[str] = set()

    def dataset(self, ds: Any, charset: str) -> dict[str, Any]:
        """Return the JSON model of ``ds`` (all elements but pixel data and trailing padding)."""
        out: dict[str, Any] = {}
        for tag in ds.keys():  # noqa: SIM118 (a Dataset iterates elements)
            key = f"{int(tag):08X}"
            if key in _NON_METADATA_TAGS:
                continue
            value = self.element(ds, key, charset)
            if value is not None:
                out[key] = value
        return out

    def element(self, ds: Any, key: str, charset: str) -> dict[str, Any] | None:
        """Return the JSON model of element ``key`` of ``ds``, or None when absent or invalid."""
        tag = int(key, 16)
        raw = ds.get_item(tag)
        if raw is None:
            return None
        sig = _memo_key(charset, raw)
        hit = self._memo.get(sig) if sig is not None else None
        if hit is not None:
            return hit
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                elem = ds[tag]
                if elem.VR == "SQ":
                    out = {
                        "vr": "SQ",
                        "Value": [self.dataset(item, charset) for item in elem.value],
                    }
                else:
                    out = elem.to_json_dict(
                        bulk_data_element_handler=_bulk_uri, bulk_data_threshold=BULK_DATA_THRESHOLD
                    )
                json.dumps(out)
        except Exception:
            self.dropped.add(key)
            return None
        if sig is not None:
            self._memo[sig] = out
        return out


def _memo_key(charset: str, raw: Any) -> Any:
    """Key under which an element's JSON can be shared, or None when it depends on its dataset.

    Implicit-VR private elements take their VR from the private creator, and
    ambiguous VRs ('US or SS', 'OB or OW') from other attributes: not shared.
    """
    from pydicom.datadict import dictionary_VR

    vr = getattr(raw, "VR", None)
    tag = int(raw.tag)
    if vr is None or " or " in str(vr):
        if (tag >> 16) % 2 == 1:
            return None
        try:
            if " or " in dictionary_VR(tag):
                return None
        except KeyError:
            return None
    return (charset, _element_signature(raw))


def _load_file(path: str, builder: _JsonBuilder) -> _FileInfo:
    """Read one file's header into a _FileInfo; raises DicomError naming the file."""
    try:
        ds, pixel_tag, loc = _read_header(path)
    except _Rejected as r:
        raise DicomError(f"{path}: {r.reason}") from None
    # fingerprint before any attribute is parsed, so that every file is compared in the same state
    tags = [f"{int(t):08X}" for t in ds.keys()]  # noqa: SIM118 (a Dataset iterates elements)
    signature = {
        t: _element_signature(ds.get_item(int(t, 16))) for t in tags if _is_metadata_tag(t)
    }
    if pixel_tag is None:
        raise DicomError(f"{path}: no pixel data")
    if pixel_tag != 0x7FE00010:
        raise DicomError(
            f"{path}: {_PIXEL_TAGS[pixel_tag]} (floating point) cannot be stored losslessly as integers; refused"
        )
    values: dict[str, int] = {}
    for keyword in ("Rows", "Columns", "BitsAllocated", "PixelRepresentation"):
        raw = _get(ds, keyword)
        try:
            values[keyword] = int(raw)
        except (TypeError, ValueError):
            raise DicomError(f"{path}: missing or invalid {keyword} ({raw!r})") from None
    raw_frames = _get(ds, "NumberOfFrames")
    try:
        n_frames = int(raw_frames) if raw_frames not in (None, "") else 1
    except (TypeError, ValueError):
        raise DicomError(f"{path}: invalid NumberOfFrames {str(raw_frames)!r}") from None
    spp = _int(ds, "SamplesPerPixel") or 1
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if values["Rows"] < 1 or values["Columns"] < 1 or n_frames < 1:
        raise DicomError(
            f"{path}: empty image ({values['Rows']} x {values['Columns']}, {n_frames} frame(s))"
        )
    if values["BitsAllocated"] not in (1, 8, 16, 32):
        raise DicomError(
            f"{path}: BitsAllocated {values['BitsAllocated']} is not 1, 8, 16 or 32; refused"
        )
    if spp not in (1, 3):
        raise DicomError(f"{path}: SamplesPerPixel {spp} ({photometric}) is not supported; refused")
    return _FileInfo(
        path=path,
        ds=ds,
        ts=ds.file_meta.TransferSyntaxUID,
        rows=values["Rows"],
        cols=values["Columns"],
        spp=spp,
        bits_allocated=values["BitsAllocated"],
        pixel_representation=values["PixelRepresentation"],
        photometric=photometric,
        n_frames=n_frames,
        enhanced="PerFrameFunctionalGroupsSequence" in ds,
        signature=signature,
        pixel_loc=loc,
        builder=builder,
    )


def _base_group(info: _FileInfo, rows: int, cols: int) -> list[tuple[str, Any]]:
    return [
        ("matrix", (rows, cols)),
        ("samples", info.spp),
        ("bits", info.bits_allocated),
        ("signed", info.pixel_representation),
        ("photometric", info.photometric),
        ("enhanced", info.enhanced),
    ]


def _expand_frames(fi: int, info: _FileInfo) -> list[_Frame]:
    """Turn one file into frame records (one per frame, or per mosaic tile)."""
    if info.enhanced:
        return _expand_enhanced(fi, info)
    ds = info.ds
    iop = _floats(ds, "ImageOrientationPatient", 6)
    ipp = _floats(ds, "ImagePositionPatient", 3)
    spacing, spacing_note = _pixel_spacing(ds)
    thickness = _float(ds, "SliceThickness")
    between = _float(ds, "SpacingBetweenSlices")
    image_type = _strings(ds, "ImageType")
    tp = _int(ds, "TemporalPositionIdentifier")
    acq = _int(ds, "AcquisitionNumber")
    temporal = (
        _key(tp),
        _key(acq),
        _key(_float(ds, "TriggerTime")),
        _key(()),
        _key(_int(ds, "InstanceNumber")),
        fi,
    )
    group = _base_group(info, info.rows, info.cols) + [
        ("type", image_type),
        ("echo", (_int(ds, "EchoNumbers"), _round(_float(ds, "EchoTime"), 3))),
    ]
    common = {
        "iop": iop,
        "pixel_spacing": spacing,
        "spacing_note": spacing_note,
        "thickness": thickness or between,
    }

    if "MOSAIC" in image_type and info.n_frames == 1:
        tiles = _mosaic_frames(
            fi, info, iop, ipp, spacing, thickness, between, group, temporal, (tp, acq)
        )
        if tiles:
            return tiles
    if info.n_frames == 1 and iop and ipp:
        return [
            _Frame(
                fi,
                0,
                tuple(group + [("geometry", True)]),
                temporal + (0,),
                (tp, acq),
                position=np.array(ipp),
                **common,
            )
        ]
    offsets = _floats(ds, "GridFrameOffsetVector", info.n_frames) if info.n_frames > 1 else None
    if offsets and iop and ipp:  # RT Dose: frame k lies at IPP + offset_k along the normal
        try:
            normal = geom.direction_cosines(iop)[2]
        except ValueError:
            normal = None
        if normal is not None:
            rel = np.asarray(offsets) - (offsets[0] if offsets[0] != 0 else 0.0)
            base = np.asarray(ipp)
            return [
                _Frame(
                    fi,
                    k,
                    tuple(group + [("geometry", True)]),
                    temporal + (k,),
                    (tp, acq),
                    position=base + rel[k] * normal,
                    **common,
                )
                for k in range(info.n_frames)
            ]
    # No per-frame positions: the file is a stack of its own (2-D, cine or generic frames).
    increments = {_tag_keyword(t) for t in _multi(_get(ds, "FrameIncrementPointer"))}
    is_time = bool(increments & {"FrameTime", "FrameTimeVector"}) or (
        info.n_frames > 1 and "CineRate" in ds
    )
    own = tuple(
        group + [("geometry", False), ("instance", _text(ds, "SOPInstanceUID") or info.path)]
    )
    return [
        _Frame(fi, k, own, (k,), (None, None), position=None, temporal_axis=is_time, **common)
        for k in range(info.n_frames)
    ]


def _expand_enhanced(fi: int, info: _FileInfo) -> list[_Frame]:
    ds = info.ds
    shared_seq = _get(ds, "SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    perframe = ds.PerFrameFunctionalGroupsSequence
    if len(perframe) != info.n_frames:
        raise DicomError(
            f"{info.path}: PerFrameFunctionalGroupsSequence has {len(perframe)} items for {info.n_frames} frames"
        )
    acq = _int(ds, "AcquisitionNumber")
    instance = _int(ds, "InstanceNumber")
    frames = []
    tpis = []
    for k, item in enumerate(perframe):
        pos_item = _fg(item, shared, "PlanePositionSequence", "ImagePositionPatient")
        ori_item = _fg(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        meas = _fg(item, shared, "PixelMeasuresSequence", "PixelSpacing")
        ipp = _floats(pos_item, "ImagePositionPatient", 3)
        iop = _floats(ori_item, "ImageOrientationPatient", 6) or _floats(
            ds, "ImageOrientationPatient", 6
        )
        spacing, note = _pixel_spacing(meas)
        if spacing is None:
            spacing, note = _pixel_spacing(ds)
        thick_item = _fg(item, shared, "PixelMeasuresSequence", "SliceThickness")
        between_item = _fg(item, shared, "PixelMeasuresSequence", "SpacingBetweenSlices")
        thickness = _float(thick_item, "SliceThickness") or _float(
            between_item, "SpacingBetweenSlices"
        )
        content_seq = _get(item, "FrameContentSequence")
        content = content_seq[0] if content_seq else None
        tpi = _int(content, "TemporalPositionIndex")
        tpis.append(tpi)
        div = tuple(int(v) for v in _multi(_get(content, "DimensionIndexValues")))
        frame_type = _frame_type(item) or _frame_type(shared) or _strings(ds, "ImageType")
        echo_item = _fg(item, shared, "MREchoSequence", "EffectiveEchoTime")
        group = _base_group(info, info.rows, info.cols) + [
            ("type", frame_type),
            ("echo", _round(_float(echo_item, "EffectiveEchoTime"), 3)),
            ("stack", _text(content, "StackID")),
        ]
        temporal = (_key(tpi), _key(acq), _key(None), _key(div), _key(instance), fi, k)
        if ipp and iop:
            frames.append(
                _Frame(
                    fi,
                    k,
                    tuple(group + [("geometry", True)]),
                    temporal,
                    (tpi, acq),
                    position=np.array(ipp),
                    iop=iop,
                    pixel_spacing=spacing,
                    spacing_note=note,
                    thickness=thickness,
                )
            )
        else:
            frames.append(
                _Frame(
                    fi,
                    k,
                    tuple(
                        group
                        + [
                            ("geometry", False),
                            ("instance", _text(ds, "SOPInstanceUID") or info.path),
                        ]
                    ),
                    (k,),
                    (None, None),
                    iop=iop or _floats(ds, "ImageOrientationPatient", 6),
                    pixel_spacing=spacing,
                    spacing_note=note,
                    thickness=thickness,
                )
            )
    is_time = len({t for t in tpis if t is not None}) > 1 or "FrameTime" in ds
    for f in frames:
        f.temporal_axis = is_time
    return frames


def _frame_type(item: Any) -> tuple[str, ...]:
    if item is None:
        return ()
    for elem in item:
        if elem.VR == "SQ" and elem.keyword.endswith("FrameTypeSequence") and elem.value:
            return _strings(elem.value[0], "FrameType")
    return ()


def _mosaic_frames(
    fi: int,
    info: _FileInfo,
    iop: tuple[float, ...] | None,
    ipp: tuple[float, ...] | None,
    spacing: tuple[float, float] | None,
    thickness: float | None,
    between: float | None,
    group: list[tuple[str, Any]],
    temporal: tuple[Any, ...],
    check: tuple[Any, Any],
) -> list[_Frame] | None:
    """De-mosaic a Siemens mosaic into tile frames, or record why not and return None."""
    reason = None
    n_images = normal_csa = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from nibabel.nicom import csareader
        csa = csareader.get_csa_header(info.ds, "image")
        if csa is None:
            reason = "no Siemens CSA image header"
        else:
            n_images = csareader.get_n_mosaic(csa)
            normal_csa = csareader.get_slice_normal(csa)
    except ImportError:
        reason = "nibabel (needed to parse the CSA header) is not installed"
    except Exception as exc:
        reason = f"CSA header unreadable ({_one_line(exc)})"
    if reason is None and not n_images:
        reason = "CSA header has no NumberOfImagesInMosaic"
    if reason is None and not (iop and ipp and spacing):
        reason = "ImageOrientationPatient, ImagePositionPatient or PixelSpacing missing"
    if reason is None:
        try:
            side, tile_rows, tile_cols = geom.mosaic_grid(int(n_images), info.rows, info.cols)
            row, col, normal = geom.direction_cosines(iop)
        except ValueError as exc:
            reason = str(exc)
    if reason is None and normal_csa is not None:
        normal_csa = np.asarray(normal_csa, float)
        norm = float(np.linalg.norm(normal_csa))
        if norm < 0.5 or abs(float(normal_csa @ normal)) / norm < 0.99:
            reason = "CSA SliceNormalVector is not perpendicular to the image plane"
        else:
            normal = normal_csa / norm
    step = between or thickness
    if reason is None and not step:
        reason = "neither SpacingBetweenSlices nor SliceThickness is set"
    if reason is not None:
        info.warnings.append(
            f"Siemens mosaic not de-mosaicked ({reason}); the mosaic frame is kept as one 2-D image, "
            "which is NOT a slice stack"
        )
        return None
    if not between:
        info.warnings.append(
            "mosaic slice spacing taken from SliceThickness (SpacingBetweenSlices missing)"
        )
    info.mosaic = (side, tile_rows, tile_cols)
    origin = geom.mosaic_origin(
        np.asarray(ipp), row, col, spacing, (info.rows, info.cols), (tile_rows, tile_cols)
    )
    grp = [g for g in group if g[0] != "matrix"] + [
        ("matrix", (tile_rows, tile_cols)),
        ("mosaic", True),
        ("geometry", True),
    ]
    return [
        _Frame(
            fi,
            0,
            tuple(grp),
            temporal + (k,),
            check,
            position=origin + k * step * normal,
            iop=iop,
            pixel_spacing=spacing,
            thickness=step,
            tile=k,
        )
        for k in range(int(n_images))
    ]


def _multi(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def _tag_keyword(tag: Any) -> str:
    from pydicom.datadict import keyword_for_tag

    try:
        return keyword_for_tag(int(tag)) or ""
    except Exception:
        return ""


def _round(value: float | None, ndigits: int) -> float | None:
    return None if value is None else round(value, ndigits)


# --------------------------------------------------------------------------- grouping and planning


@dataclass
class _Plan:
    frames: list[_Frame]
    lead: tuple[int, ...]
    dims: tuple[str, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    positions: np.ndarray | None
    stack_key: str
    warnings: list[str]
    notes: list[str]


def _group_frames(frames: list[_Frame]) -> list[list[_Frame]]:
    """Split frames into stacks by their group key and orientation (tolerance 1e-3)."""
    stacks: dict[tuple[Any, ...], list[_Frame]] = {}
    orientations: dict[tuple[Any, ...], list[np.ndarray]] = {}
    for f in frames:
        reps = orientations.setdefault(f.group, [])
        ori = np.asarray(f.iop) if f.iop else None
        idx = -1
        for i, rep in enumerate(reps):
            if (
                ori is not None
                and rep.shape == ori.shape
                and float(np.max(np.abs(rep - ori))) < 1e-3
            ):
                idx = i
                break
        if idx < 0 and ori is not None:
            reps.append(ori)
            idx = len(reps) - 1
        spacing = tuple(round(v, 4) for v in f.pixel_spacing) if f.pixel_spacing else None
        stacks.setdefault((f.group, idx, spacing), []).append(f)
    return list(stacks.values())


def _stack_key(frames: list[_Frame], extra: str = "") -> str:
    f = frames[0]
    parts = [f"{k}={_fmt(v)}" for k, v in f.group]
    if f.iop:
        parts.append("orientation=" + ",".join(f"{v:.3f}" for v in f.iop))
    if f.pixel_spacing:
        parts.append("spacing=" + ",".join(f"{v:.4f}" for v in f.pixel_spacing))
    if extra:
        parts.append(extra)
    return "|".join(parts)


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return "\\".join(_fmt(v) for v in value)
    return "" if value is None else str(value)


def _in_plane_spacing(frame: _Frame) -> tuple[tuple[float, float], list[str], list[str]]:
    """(row, column) spacing of a stack, with the warning or note it needs."""
    if frame.pixel_spacing is None:
        return (1.0, 1.0), ["no pixel spacing in the header; 1.0 mm assumed"], []
    return frame.pixel_spacing, [], [frame.spacing_note] if frame.spacing_note else []


def _plan_stack(
    frames: list[_Frame], files: list[_FileInfo], label: str, split_acq: bool = True
) -> list[_Plan]:
    if frames[0].position is not None:
        return _plan_spatial(frames, files, label, split_acq)
    return [_plan_frames(frames, files, label)]


def _plan_spatial(
    frames: list[_Frame], files: list[_FileInfo], label: str, split_acq: bool, extra: str = ""
) -> list[_Plan]:
    key = _stack_key(frames, extra)
    try:
        row, col, normal = geom.direction_cosines(frames[0].iop)
    except ValueError as exc:
        raise DicomError(f"{label}: {exc}") from None
    spacing, warnings_, notes = _in_plane_spacing(frames[0])
    positions = np.array([f.position for f in frames])
    clusters = geom.cluster_positions(positions @ normal)
    counts = [len(c) for c in clusters]
    if len(set(counts)) > 1:
        acquisitions = sorted({f.check[1] for f in frames}, key=_key)
        if split_acq and len(acquisitions) > 1:
            plans = []
            for acq in acquisitions:
                part = [f for f in frames if f.check[1] == acq]
                plans.extend(_plan_spatial(part, files, label, False, extra=f"acquisition={acq}"))
            return plans
        histogram = {c: counts.count(c) for c in sorted(set(counts))}
        desc = ", ".join(f"{n} position(s) with {c} image(s)" for c, n in histogram.items())
        raise DicomError(
            f"{label}: unequal numbers of images per slice position ({desc}); "
            "slices or volumes are missing or duplicated, refusing to guess the volume"
        )
    n_t, n_z = counts[0], len(clusters)
    clusters = [sorted(c, key=lambda i: frames[i].temporal) for c in clusters]
    for c in clusters:
        keys = [frames[i].temporal[:5] for i in c]
        if len(set(keys)) < len(keys):
            where = np.round(positions[c[0]], 3).tolist()
            raise DicomError(
                f"{label}: {len(c)} images at slice position {where} share their temporal identifiers "
                "(TemporalPosition, AcquisitionNumber, TriggerTime, DimensionIndexValues, InstanceNumber); "
                "cannot order them in time"
            )
    for c in clusters:
        spread = float(np.max(np.linalg.norm(positions[c] - positions[c[0]], axis=1)))
        if spread > 0.05:
            raise DicomError(
                f"{label}: images at the same slice position have origins up to {spread:.3f} mm apart in-plane; "
                "inconsistent geometry"
            )
    if n_t > 1:
        notes.append(_check_time_order(frames, clusters, label))
    reps = positions[[c[0] for c in clusters]]
    nominal = frames[0].thickness or 1.0
    try:
        layout = geom.analyse_slice_positions(reps, normal, spacing, nominal)
    except ValueError as exc:
        raise DicomError(f"{label}: {exc}") from None
    warnings_ += layout.warnings
    if n_z == 1 and not frames[0].thickness:
        notes.append(
            "single slice without SliceThickness: the affine uses a nominal 1 mm thickness"
        )
    ordered = [frames[c[t]] for t in range(n_t) for c in clusters]
    lead = tuple(n for n in (n_t, n_z) if n > 1)
    dims = tuple(d for d, n in (("t", n_t), ("z", n_z)) if n > 1) + ("y", "x")
    spatial = {"z": layout.spacing, "y": spacing[0], "x": spacing[1]}
    step_t, note_t = _time_step(files[frames[0].file].ds) if n_t > 1 else (0.0, None)
    if note_t:
        notes.append(note_t)
    values = tuple(step_t if d == "t" else spatial[d] for d in dims)
    affine = geom.affine_ras(row, col, spacing, layout.step, reps[0])
    return [
        _Plan(
            ordered,
            lead,
            dims,
            values,
            affine,
            np.array([f.position for f in ordered]),
            key,
            warnings_,
            [n for n in notes if n],
        )
    ]


def _check_time_order(frames: list[_Frame], clusters: list[list[int]], label: str) -> str:
    """Validate that the t-th image at every position belongs to the same volume."""
    for slot, name in ((0, "TemporalPositionIdentifier/Index"), (1, "AcquisitionNumber")):
        per_position = [[frames[i].check[slot] for i in c] for c in clusters]
        usable = all(None not in vals and len(set(vals)) == len(vals) for vals in per_position)
        if not usable:
            continue
        first = per_position[0]
        for vals, c in zip(per_position, clusters):
            if vals != first:
                where = frames[c[0]].position
                raise DicomError(
                    f"{label}: the images at slice position {np.round(where, 3).tolist()} have {name} {vals}, "
                    f"other positions {first}; the 4-D series is incomplete or inconsistent"
                )
        return f"time order from {name}"
    return "time order from TriggerTime / DimensionIndexValues / InstanceNumber (no per-volume identifier)"


def _time_step(ds: Any) -> tuple[float, str | None]:
    tr = _float(ds, "RepetitionTime")
    if tr is None:
        shared = _get(ds, "SharedFunctionalGroupsSequence")
        item = _fg(
            shared[0] if shared else None,
            None,
            "MRTimingAndRelatedParametersSequence",
            "RepetitionTime",
        )
        tr = _float(item, "RepetitionTime")
    if tr:
        return tr / 1000.0, "t spacing is RepetitionTime"
    frame_time = _float(ds, "FrameTime")
    if frame_time:
        return frame_time / 1000.0, "t spacing is FrameTime"
    return 1.0, "t spacing unknown; 1.0 s recorded"


def _plan_frames(frames: list[_Frame], files: list[_FileInfo], label: str) -> _Plan:
    """Plan a single file's frames that have no per-frame position."""
    info = files[frames[0].file]
    ds = info.ds
    frames = sorted(frames, key=lambda f: f.index)
    spacing, warnings_, notes = _in_plane_spacing(frames[0])
    ipp = _floats(ds, "ImagePositionPatient", 3)
    row = col = normal = None
    if frames[0].iop:
        try:
            row, col, normal = geom.direction_cosines(frames[0].iop)
        except ValueError as exc:
            warnings_.append(f"ImageOrientationPatient ignored: {exc}")
    if row is None:
        po = _strings(ds, "PatientOrientation")
        cosines = geom.cosines_from_patient_orientation(po)
        if cosines:
            row, col = cosines
            warnings_.append(
                f"no ImageOrientationPatient: nominal orientation from PatientOrientation {'/'.join(po)}"
                + ("" if ipp else ", origin 0")
            )
        else:
            row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
            warnings_.append(
                "no patient geometry: identity orientation"
                + ("" if ipp else " and origin 0")
                + " (nominal affine)"
            )
        normal = np.cross(row, col)
    elif not ipp:
        warnings_.append("no ImagePositionPatient: origin 0 (nominal affine)")
    thickness = frames[0].thickness or 1.0
    affine = geom.affine_ras(
        row, col, spacing, normal * thickness, np.asarray(ipp or (0.0, 0.0, 0.0))
    )
    n = len(frames)
    if n == 1:
        lead: tuple[int, ...] = ()
        dims: tuple[str, ...] = ("y", "x")
        values: tuple[float, ...] = spacing
    else:
        axis = "t" if frames[0].temporal_axis else "frame"
        lead, dims = (n,), (axis, "y", "x")
        if axis == "t":
            step, note = _time_step(ds)
            notes.append(note or "")
        else:
            step = 1.0
            increments = [
                _tag_keyword(t) or str(t) for t in _multi(_get(ds, "FrameIncrementPointer"))
            ]
            notes.append(
                "frames kept in file order on a 'frame' axis"
                + (f" (FrameIncrementPointer: {', '.join(increments)})" if increments else "")
                + "; they are not known to be slices or time points"
            )
        values = (step,) + spacing
    return _Plan(
        frames,
        lead,
        dims,
        values,
        affine,
        None,
        _stack_key(frames),
        warnings_,
        [n for n in notes if n],
    )


# --------------------------------------------------------------------------- pixels


def _output_itemsize(info: _FileInfo) -> tuple[int, int]:
    """Return (bytes per sample, samples) of the decoded output of one pixel."""
    if info.photometric == "PALETTE COLOR":
        desc = _floats(info.ds, "RedPaletteColorLookupTableDescriptor", 3)
        return (2 if desc and desc[2] > 8 else 1), 3
    return max(1, info.bits_allocated // 8), info.spp


def _decode_file(info: _FileInfo) -> tuple[np.ndarray, str, list[str], list[str], str | None]:
    """Decode all frames of a file exactly as ``pixel_array`` does, as (frames, rows, cols[, 3]).

    Returns the array, its photometric interpretation, notes, pydicom
    warnings and a lossy-source reason (or None).
    """
    _pydicom()
    from pydicom.pixels import apply_color_lut

    path = info.path
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        ds = _with_pixel_data(info)
        ts = ds.file_meta.TransferSyntaxUID
        try:
            arr, props = _decode_dataset(ds, ts, path)
            lossy = _lossy_reason(ds, ts)
        finally:
            if info.pixel_loc is not None:
                del ds[0x7FE00010]  # keep only the header in memory
    caught = sorted({" ".join(str(r.message).split()) for r in records})
    notes: list[str] = []
    out_pi = str(props.get("photometric_interpretation", info.photometric)).upper()
    expected = (info.n_frames, info.rows, info.cols) + ((info.spp,) if info.spp > 1 else ())
    if info.n_frames == 1 and arr.shape == expected[1:]:
        arr = arr[None]
    if arr.shape != expected:
        raise DicomError(f"{path}: decoded pixel array has shape {arr.shape}, expected {expected}")
    if out_pi == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as exc:
            raise DicomError(
                f"{path}: cannot apply the palette colour LUT ({_one_line(exc)})"
            ) from None
        notes.append(
            "PALETTE COLOR indices mapped to RGB with the palette LUT (pydicom apply_color_lut)"
        )
        out_pi = "RGB"
    elif info.spp == 3 and out_pi == "RGB" and info.photometric != "RGB":
        notes.append(
            f"{info.photometric} decoded to RGB by pydicom (colour-space conversion as in pixel_array)"
        )
    if arr.ndim == 4 and out_pi != "RGB":
        raise DicomError(
            f"{path}: colour pixels in {out_pi} cannot be converted to RGB by pydicom; refused"
        )
    if arr.ndim == 3 and out_pi not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(
            f"{path}: single-sample photometric interpretation {out_pi!r} is not supported; refused"
        )
    if out_pi == "MONOCHROME1":
        notes.append("MONOCHROME1 kept as stored (minimum value displays white)")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype not in _INT_DTYPES:
        raise DicomError(
            f"{path}: decoded dtype {arr.dtype} is not an 8/16/32-bit integer type; refused"
        )
    return arr, out_pi, notes, caught, lossy


def _decode_dataset(ds: Any, ts: Any, path: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode with pydicom's own pipeline, with the options ``Dataset.pixel_array`` uses."""
    from pydicom.pixels import as_pixel_options, get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise DicomError(
            f"{path}: pydicom cannot decode the transfer syntax {ts.name} ({ts})"
        ) from None
    try:
        return decoder.as_array(ds, validate=True, raw=False, **as_pixel_options(ds))
    except MemoryError:
        raise
    except Exception as exc:
        hint = ""
        if "missing dependencies" in str(exc):
            hint = "; pydicom needs a decoder plugin (pylibjpeg-libjpeg, pylibjpeg-openjpeg or pyjpegls)"
        raise DicomError(
            f"{path}: cannot decode the pixel data ({ts.name}): {_one_line(exc)}{hint}"
        ) from None


def _with_pixel_data(info: _FileInfo) -> Any:
    """Return the file's dataset with its pixel data loaded (the header is not parsed again)."""
    pydicom = _pydicom()
    from pydicom.dataelem import DataElement

    loc = info.pixel_loc
    try:
        if loc is None:  # deflated: the whole dataset is one zlib stream
            return pydicom.dcmread(info.path, force=False)
        with open(info.path, "rb") as fp:
            fp.seek(loc.start)
            value = fp.read(loc.end - loc.start)
    except Exception as exc:
        raise DicomError(f"{info.path}: cannot re-read the file ({_one_line(exc)})") from None
    if len(value) != loc.end - loc.start:
        raise DicomError(f"{info.path}: file changed since it was scanned (pixel data truncated)")
    vr = loc.vr or ("OB" if loc.undefined_length or info.bits_allocated <= 8 else "OW")
    ds = info.ds
    ds[0x7FE00010] = DataElement(0x7FE00010, vr, value, is_undefined_length=loc.undefined_length)
    return ds


def _lossy_reason(ds: Any, ts: Any) -> str | None:
    """Return why a file's pixels are (possibly) lossy, or None when they are lossless."""
    if _text(ds, "LossyImageCompression") == "01":
        method = _text(ds, "LossyImageCompressionMethod")
        return "LossyImageCompression is 01" + (f" ({method})" if method else "")
    uid = str(ts)
    if uid in _LOSSY_TRANSFER_SYNTAXES:
        return f"lossy transfer syntax {ts.name}"
    if uid in _MAYBE_LOSSY_J2K:
        irreversible = _j2k_irreversible(ds)
        if irreversible is None:
            return f"{ts.name}: codestream wavelet could not be inspected, treated as lossy"
        if irreversible:
            return f"{ts.name} with the irreversible 9/7 wavelet"
    return None


def _j2k_irreversible(ds: Any) -> bool | None:
    """Return True if the first JPEG 2000 codestream uses the irreversible 9/7 wavelet.

    False for the reversible 5/3 wavelet, None when the codestream cannot be read.
    """
    try:
        from pydicom.encaps import generate_fragments

        data = bytes(ds.PixelData[:8])
        group, elem, bot_len = struct.unpack("<HHL", data)
        if (group, elem) != (0xFFFE, 0xE000):
            return None
        fragment = next(generate_fragments(ds.PixelData[8 + bot_len :]))
    except Exception:
        return None
    start = fragment.find(b"\xff\x4f\xff\x51")
    if start < 0:
        return None
    pos = start + 2
    while pos + 4 <= len(fragment):
        marker = fragment[pos : pos + 2]
        if marker[0] != 0xFF or marker in (b"\xff\x90", b"\xff\x93"):
            return None
        if marker == b"\xff\x52":  # COD: Lcod, Scod, SGcod(4), levels, cb w, cb h, style, transform
            t = pos + 13
            return fragment[t] == 0 if t < len(fragment) else None
        pos += 2 + int.from_bytes(fragment[pos + 2 : pos + 4], "big")
    return None


# --------------------------------------------------------------------------- naming


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_WINDOWS_RESERVED = {
    "CON",
    "PRN",
    "AUX",
    "NUL",
    *(f"COM{i}" for i in range(1, 10)),
    *(f"LPT{i}" for i in range(1, 10)),
}


def _sanitise(value: Any, fallback: str, max_len: int = 48) -> str:
    """Return ``value`` as a portable file-name component (ASCII, no separators)."""
    text = unicodedata.normalize("NFKD", str(value or "")).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"_{2,}", "_", _UNSAFE.sub("_", text.strip())).strip("._-+")
    text = text[:max_len].rstrip("._-+")
    if not text:
        text = fallback
    if text.split(".")[0].upper() in _WINDOWS_RESERVED:
        text = "_" + text
    return text


def suggest_name(ds: Any, series_uid: str, stack_key: str = "") -> str:
    """Return ``<PatientID>/<StudyDate>-<StudyDescription>/<SeriesNumber>-<SeriesDescription>-<hash8>``.

    Components are sanitised for file systems; the hash is the first 8 hex
    digits of SHA-256 over the series UID (plus ``|stack_key`` when given),
    so names are stable and distinct per series and stack.
    """
    patient = _sanitise(_text(ds, "PatientID"), "unknown-patient")
    date = _sanitise(_text(ds, "StudyDate"), "nodate")
    study_desc = _sanitise(_text(ds, "StudyDescription"), "")
    number = _sanitise(_text(ds, "SeriesNumber"), "")
    desc = _sanitise(
        _text(ds, "SeriesDescription") or _text(ds, "ProtocolName") or _text(ds, "Modality"), ""
    )
    digest = hashlib.sha256(
        (series_uid + (f"|{stack_key}" if stack_key else "")).encode()
    ).hexdigest()[:8]
    study = "-".join(p for p in (date, study_desc) if p)
    series = "-".join(p for p in (number, desc, digest) if p)
    return f"{patient}/{study}/{series}"


# --------------------------------------------------------------------------- reading


def _resolve(
    ref_or_files: SeriesRef | PathLike | Iterable[PathLike],
) -> tuple[SeriesRef, list[str]]:
    """Return the series to read and warnings for files ignored while resolving it."""
    if isinstance(ref_or_files, SeriesRef):
        return ref_or_files, []
    scan, explicit = _scan(ref_or_files)
    issues = scan.rejected + scan.skipped
    named = [i for i in issues if i.path in explicit]
    if named:
        raise DicomError("; ".join(f"{i.path}: {i.reason}" for i in named))
    if not scan.series:
        detail = "; ".join(f"{i.path}: {i.reason}" for i in issues[:5])
        raise DicomError("no DICOM image series found" + (f" ({detail})" if detail else ""))
    if len(scan.series) > 1:
        uids = ", ".join(s.uid or s.key for s in scan.series)
        raise DicomError(
            f"the files hold {len(scan.series)} series ({uids}); scan_dicom() them and read each SeriesRef"
        )
    ignored = [f"ignored {i.path}: {i.reason}" for i in issues]
    return scan.series[0], ignored


def _series_label(ref: SeriesRef) -> str:
    desc = f" ({ref.description})" if ref.description else ""
    if ref.uid:
        return f"series {ref.uid}{desc}"
    where = str(Path(ref.files[0]).parent) if ref.files else "?"
    return f"series without SeriesInstanceUID in {where}{desc}"


def read_dicom_series(
    ref_or_files: SeriesRef | PathLike | Iterable[PathLike],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    batch_bytes: int | None = None,
) -> list[DicomVolume]:
    """Read one series (a SeriesRef, or files / folders holding exactly one series) into volumes.

    Returns one DicomVolume per geometrically consistent stack. Raises
    DicomError naming the file or series and the reason when a file is bad,
    the geometry is inconsistent, the pixels cannot be decoded losslessly,
    or the decoded size would exceed ``max_bytes`` (checked before decoding).

    With ``batch_bytes``, a stack of single-frame files that decodes to more
    than that is returned lazily, as :class:`~mist_zarr.converters.base.LazyPlanes`
    read in batches of at most ``batch_bytes``: every file is decoded once
    here (for its value range, photometric interpretation and lossy flags,
    which the metadata needs) and once more when its batch is written, so
    memory stays bounded by a batch, at the cost of a second decode.
    """
    ref, ignored = _resolve(ref_or_files)
    label = _series_label(ref)
    try:
        return _read_series(ref, label, max_bytes, ignored, batch_bytes)
    except (DicomError, MemoryError, ImportError):
        raise
    except Exception as exc:
        raise DicomError(f"{label}: unexpected error while reading ({_one_line(exc)})") from exc


def iter_dicom_volumes(
    paths: ScanResult | PathLike | Iterable[PathLike], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> Iterator[tuple[SeriesRef, list[DicomVolume] | DicomError]]:
    """Yield (series, volumes or the DicomError that refused it) for every series found."""
    scan = paths if isinstance(paths, ScanResult) else scan_dicom(paths)
    for ref in scan.series:
        try:
            yield ref, read_dicom_series(ref, max_bytes=max_bytes)
        except DicomError as exc:
            yield ref, exc


def dicom_sources(
    files: Iterable[PathLike] | PathLike,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    problems: list[Any] | None = None,
) -> Iterator[Any]:
    """Yield a ``SourceImage`` per volume of every series in ``files`` (the ``mist-zarr convert`` hook).

    Rejected files and refused series are appended to ``problems`` as
    ``mist_zarr.convert.Problem`` (kind "failed"); DICOM objects without an
    image and duplicates with kind "skipped".
    """
    from ..convert import Problem

    scan = scan_dicom(files)
    sink: list[Any] = problems if problems is not None else []
    sink += [Problem(i.path, i.reason, kind="failed") for i in scan.rejected]
    sink += [Problem(i.path, i.reason, kind="skipped") for i in scan.skipped]
    for ref, result in iter_dicom_volumes(scan, max_bytes=max_bytes):
        if isinstance(result, DicomError):
            sink.append(Problem(ref.uid or ref.key, str(result), kind="failed"))
            continue
        for volume in result:
            yield volume.to_source_image()


def _read_series(
    ref: SeriesRef, label: str, max_bytes: int, ignored: list[str], batch_bytes: int | None = None
) -> list[DicomVolume]:
    if not ref.files:
        raise DicomError(f"{label}: no files")
    builder = _JsonBuilder()
    files = [_load_file(p, builder) for p in ref.files]
    frames: list[_Frame] = []
    for fi, info in enumerate(files):
        frames.extend(_expand_frames(fi, info))
    plans: list[_Plan] = []
    for stack in _group_frames(frames):
        plans.extend(_plan_stack(stack, files, label))
    plans.sort(key=lambda p: (p.frames[0].file, p.frames[0].index, p.stack_key))

    sizes = []
    for plan in plans:
        info = files[plan.frames[0].file]
        itemsize, samples = _output_itemsize(info)
        rows, cols = (
            (info.mosaic[1], info.mosaic[2])
            if plan.frames[0].tile is not None
            else (info.rows, info.cols)
        )
        sizes.append(len(plan.frames) * rows * cols * samples * itemsize)
    total = sum(sizes)
    if total > max_bytes:
        raise DicomError(
            f"{label}: decoding needs {total} bytes ({len(plans)} stack(s), {sum(len(p.frames) for p in plans)} "
            f"slices) which exceeds max_bytes={max_bytes}; refused before decoding"
        )

    lazy = {pi for pi, plan in enumerate(plans)
            if batch_bytes is not None and sizes[pi] > batch_bytes and _batchable(plan, files)}
    outputs: list[np.ndarray | LazyPlanes | None] = [None] * len(plans)
    out_pi: list[set[str]] = [set() for _ in plans]
    extra_notes: list[list[str]] = [[] for _ in plans]
    extra_warn: list[list[str]] = [[] for _ in plans]
    lossy: list[list[str]] = [[] for _ in plans]
    targets: dict[int, list[tuple[int, int, _Frame]]] = {}
    for pi, plan in enumerate(plans):
        for slot, f in enumerate(plan.frames):
            targets.setdefault(f.file, []).append((pi, slot, f))
    # lazy stacks: plane shape, dtype and value range, from the first decode
    survey: dict[int, tuple[tuple[int, ...], np.dtype, float, float]] = {}
    for fi in sorted(targets):
        info = files[fi]
        arr, pi_out, notes, caught, lossy_reason = _decode_file(info)
        for pi in {t[0] for t in targets[fi]}:
            out_pi[pi].add(pi_out)
            extra_notes[pi] += notes
            extra_warn[pi] += [f"pydicom: {w}" for w in caught]
            if lossy_reason:
                lossy[pi].append(lossy_reason)
        for pi, slot, f in targets[fi]:
            src = arr[f.index]
            if pi in lazy:  # survey only: the pixels are decoded again when written
                shape, dtype, lo, hi = survey.get(pi, (src.shape, src.dtype, np.inf, -np.inf))
                if (shape, dtype) != (src.shape, src.dtype):
                    raise DicomError(
                        f"{info.path}: decoded {src.dtype}{src.shape} differs from "
                        f"{dtype}{shape} of the other images of {label}"
                    )
                survey[pi] = (shape, dtype, min(lo, float(src.min())), max(hi, float(src.max())))
                continue
            if f.tile is not None:
                side, tr, tc = info.mosaic  # type: ignore[misc]
                r0, c0 = (f.tile // side) * tr, (f.tile % side) * tc
                src = src[r0 : r0 + tr, c0 : c0 + tc]
            out = outputs[pi]
            if out is None:
                out = outputs[pi] = np.empty((len(plans[pi].frames),) + src.shape, dtype=src.dtype)
            elif out.shape[1:] != src.shape or out.dtype != src.dtype:
                raise DicomError(
                    f"{info.path}: decoded {src.dtype}{src.shape} differs from {out.dtype}{out.shape[1:]} "
                    f"of the other images of {label}"
                )
            out[slot] = src
        del arr
    for pi in lazy:
        plane_shape, dtype, lo, hi = survey[pi]
        frames, lead = plans[pi].frames, plans[pi].lead
        # batches of whole entries of the first axis (slices, or volumes of a time series)
        inner = int(np.prod(lead[1:], dtype=np.int64))
        step = max(1, batch_bytes // max(1, inner * int(np.prod(plane_shape)) * dtype.itemsize))
        batches = [(a, min(a + step, lead[0])) for a in range(0, lead[0], step)]
        reader = functools.partial(_read_frames, [files[f.file] for f in frames],
                                   [f.index for f in frames], lead[1:], label)
        outputs[pi] = LazyPlanes(lead + plane_shape, dtype, batches, reader, (lo, hi))

    split = len(plans) > 1
    volumes = []
    for pi, plan in enumerate(plans):
        if len(out_pi[pi]) != 1:
            raise DicomError(
                f"{label}: images decode to different photometric interpretations {sorted(out_pi[pi])}"
            )
        data = outputs[pi]
        assert data is not None
        # (slices, rows, cols[, 3]) as decoded; lazy stacks carry their leading axes
        colour = data.ndim - (len(plan.lead) if pi in lazy else 1) == 3
        if pi not in lazy:  # lazy stacks have their leading axes already
            data = data.reshape(plan.lead + data.shape[1:])
        dims = plan.dims + (("c",) if colour else ())
        volumes.append(
            _assemble(
                plan,
                files,
                data,
                dims,
                ref,
                label,
                split,
                out_pi[pi].pop(),
                _unique(extra_notes[pi]),
                _unique(extra_warn[pi]) + ignored,
                _unique(lossy[pi]),
            )
        )
    return volumes


def _batchable(plan: _Plan, files: list[_FileInfo]) -> bool:
    """A stack that can be read in batches of slices: one frame per file, no mosaic."""
    return (all(f.tile is None for f in plan.frames)
            and all(files[f.file].n_frames == 1 for f in plan.frames)
            and len({f.file for f in plan.frames}) == len(plan.frames))


def _read_frames(infos: list[_FileInfo], frames: list[int], inner: tuple[int, ...], label: str,
                 start: int, stop: int) -> np.ndarray:
    """Decode entries ``start:stop`` of the first axis of a lazy stack (see
    :func:`read_dicom_series`); ``inner`` is the shape of the other leading axes."""
    n = int(np.prod(inner, dtype=np.int64))
    first, last = start * n, stop * n
    block = None  # filled in place: a list of planes plus np.stack would hold the batch twice
    for k, (info, index) in enumerate(zip(infos[first:last], frames[first:last])):
        try:
            plane = _decode_file(info)[0][index]
        except DicomError as exc:
            raise DicomError(f"{label}: {exc} (while writing slices {first}-{last - 1})") from None
        if block is None:
            block = np.empty((last - first,) + plane.shape, plane.dtype)
        elif plane.shape != block.shape[1:] or plane.dtype != block.dtype:
            raise DicomError(f"{info.path}: decoded {plane.dtype}{plane.shape} differs from "
                             f"{block.dtype}{block.shape[1:]} read before: the file changed "
                             f"(while writing slices {first}-{last - 1} of {label})")
        block[k] = plane
        del plane
    assert block is not None
    return block.reshape((stop - start, *inner) + block.shape[1:])


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def _assemble(
    plan: _Plan,
    files: list[_FileInfo],
    data: np.ndarray,
    dims: tuple[str, ...],
    ref: SeriesRef,
    label: str,
    split: bool,
    photometric: str,
    notes: list[str],
    warn: list[str],
    lossy: list[str],
) -> DicomVolume:
    order = list(dict.fromkeys(f.file for f in plan.frames))
    local = {fi: i for i, fi in enumerate(order)}
    base = files[plan.frames[0].file]
    per_slice: dict[str, list[Any]] = {
        "source_file_index": [local[f.file] for f in plan.frames],
        "frame_index": [f.index for f in plan.frames],
    }
    per_slice_vr: dict[str, str] = {}
    if any(f.tile is not None for f in plan.frames):
        per_slice["mosaic_tile_index"] = [f.tile for f in plan.frames]
    if plan.positions is not None:
        per_slice["position_lps"] = [[float(v) for v in p] for p in plan.positions]
    all_tags = sorted(set().union(*(files[fi].signature.keys() for fi in order)))
    varying = [t for t in all_tags if len({files[fi].signature.get(t) for fi in order}) > 1]
    for tag in varying:
        values = {fi: files[fi].element_json(tag) for fi in order}
        name = _keyword(tag)
        per_slice_vr[name] = next((v["vr"] for v in values.values() if v and "vr" in v), "UN")
        per_slice[name] = [_json_value(values[f.file]) for f in plan.frames]
    if base.enhanced:
        per_slice["PerFrameFunctionalGroupsSequence"] = [
            [item] if (item := files[f.file].perframe(f.index)) is not None else None
            for f in plan.frames
        ]
        per_slice_vr["PerFrameFunctionalGroupsSequence"] = "SQ"
    metadata = {t: e for t, e in base.json().items() if t not in varying}
    if base.builder.dropped:
        dropped = ", ".join(sorted(base.builder.dropped))
        warn = warn + [f"attributes with invalid values left out of the JSON metadata: {dropped}"]
    if base.mosaic is not None and plan.frames[0].tile is not None:
        side, tr, tc = base.mosaic
        n = max(f.tile or 0 for f in plan.frames) + 1
        mosaic_note = (
            f"Siemens mosaic de-mosaicked: {n} slices of {tr}x{tc} from a {side}x{side} grid "
            f"({base.rows}x{base.cols}); Rows/Columns in metadata describe the mosaic"
        )
        notes = [mosaic_note, *notes]
    for fi in order:
        warn = warn + files[fi].warnings
    key = plan.stack_key
    ts_names = _unique([str(files[fi].ts) for fi in order])
    return DicomVolume(
        data=data,
        dims=dims,
        spacing=tuple(float(v) for v in plan.spacing),
        affine=plan.affine,
        metadata=metadata,
        per_slice=per_slice,
        per_slice_vr=per_slice_vr,
        warnings=_unique(ref.warnings + plan.warnings + warn),
        notes=_unique(plan.notes + notes + [f"lossy source: {r}" for r in lossy]),
        source_files=[files[fi].path for fi in order],
        lossy_source=bool(lossy),
        photometric=photometric,
        source_photometric=base.photometric,
        transfer_syntaxes=ts_names,
        series_uid=ref.uid,
        stack_key=key,
        modality=_text(base.ds, "Modality"),
        name=suggest_name(base.ds, ref.uid or ref.key or base.path, key if split else ""),
    )


def _keyword(tag: str) -> str:
    from pydicom.datadict import keyword_for_tag

    try:
        return keyword_for_tag(int(tag, 16)) or tag
    except Exception:
        return tag


def _json_value(element: dict[str, Any] | None) -> Any:
    if not element:
        return None
    for key in ("Value", "InlineBinary", "BulkDataURI"):
        if key in element:
            return element[key]
    return None
