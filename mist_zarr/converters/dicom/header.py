"""Header-only reads of one file: pixel data extent and size checks, non-image classification.

A file that cannot be part of a series raises the internal :class:`_Refused`
carrying a :class:`~mist_zarr.errors.SourceIssue` (kind "rejected" for files
that are not readable DICOM, "skipped" for DICOM objects without an image).
"""

from __future__ import annotations

import copy
import os
import struct
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

from ...errors import DicomError, SourceIssue, one_line
from .functional import FrameGroups, read_frame_groups, read_shared_group
from .jsonmodel import _JsonBuilder, header_signature
from .tags import _get, _int, _pydicom, _text
from .walk import read_elements, skip_sequence

_PIXEL_TAGS = {
    0x7FE00010: "PixelData",
    0x7FE00008: "FloatPixelData",
    0x7FE00009: "DoubleFloatPixelData",
}

_EXPLICIT_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}

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

_DEFLATED = "1.2.840.10008.1.2.1.99"


class _Refused(Exception):
    """Internal: a file is not read as part of a series; ``issue`` says why."""

    def __init__(self, path: str, reason: str, kind: str = "rejected") -> None:
        super().__init__(reason)
        self.issue = SourceIssue(path, reason, kind=kind)


@dataclass(frozen=True)
class _PixelLoc:
    """Where a pixel data element's value lies in its file."""

    vr: str | None
    start: int
    end: int
    undefined_length: bool


def _at_once(tag: int, vr: str | None, length: int) -> bool:
    return True


def _read_header(path: str) -> tuple[Any, int | None, _PixelLoc | None]:
    """Read a file's header (up to the pixel data) and check the pixel data is complete.

    Returns the header dataset, the pixel data tag (None if absent) and the
    location of its value (None if absent or deflated). Raises _Refused for
    non-DICOM, unreadable or truncated files. In explicit VR little endian
    files the top-level sequences stay raw elements, walked (see ``walk``);
    pydicom parses them if they are accessed.
    """
    _pydicom()
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_partial

    captured: dict[str, Any] = {}
    loc = None
    stopped: set[int] = set()  # sequences already stopped at

    def stop(tag: int, vr: str | None, length: int) -> bool:
        if int(tag) in _PIXEL_TAGS:
            captured.update(tag=int(tag), vr=vr, length=length)
            return True
        # explicit VR sequences at the top level: kept raw (walk.skip_sequence) where the
        # walk can, as read_elements keeps them, so that a file read by pydicom holds them
        # in the same form as the files of its series that were walked (a raw and a parsed
        # copy of one value have different signatures); the functional groups are then
        # read once per file by functional.read_frame_groups
        if vr == "SQ" and int(tag) not in stopped:
            stopped.add(int(tag))
            return True
        return False

    try:
        with open(path, "rb") as fp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # pydicom reads the preamble and file meta and stops at the dataset; an
            # explicit VR little endian dataset is read by walk.read_elements (the
            # same raw elements, without its per-element Python), anything else by pydicom
            ds = read_partial(fp, stop_when=_at_once, force=False)
            ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
            if not ts:
                raise _Refused(path, "File Meta Information has no TransferSyntaxUID")
            # (a command set, group 0000, is read before the dataset and merged after it
            # by pydicom: left to it)
            found = (read_elements(fp, ds, _PIXEL_TAGS)
                     if ds.original_encoding == (False, True) and str(ts) != _DEFLATED
                     and not ds._dict else False)
            if found is False:
                fp.seek(0)
                ds = read_partial(fp, stop_when=stop, force=False)
                if stopped and not captured:
                    ds = _read_rest(fp, ds, ts, stop, stopped)
            else:
                if found:
                    captured.update(tag=found[0], vr=found[1], length=found[2])
                ds.set_original_encoding(False, True, ds._character_set)
            if captured and str(ts) != _DEFLATED:
                loc = _check_pixel_extent(path, fp, ds, ts, captured)
    except _Refused:
        raise
    except InvalidDicomError:
        raise _Refused(
            path, "not a DICOM Part 10 file (no 'DICM' prefix / File Meta Information)"
        ) from None
    except IsADirectoryError:
        raise _Refused(path, "is a directory") from None
    except OSError as exc:
        raise _Refused(path, f"cannot read file ({one_line(exc)})") from None
    except Exception as exc:
        raise _Refused(path, f"unreadable DICOM header ({one_line(exc)})") from None
    return ds, captured.get("tag"), loc


def _read_rest(fp: Any, ds: Any, ts: Any, stop: Any, stopped: set[int]) -> Any:
    """Finish a header read that stopped at a top-level sequence: keep it raw and read
    on, to the next sequence, the pixel data or the end of the file."""
    from pydicom.filereader import read_dataset, read_partial

    if str(ts) == _DEFLATED or ts.is_implicit_VR or not ts.is_little_endian:
        # fp is not the stream pydicom read (deflated), or the walker does not apply
        # (big endian): read the header again, parsing the sequences as usual
        fp.seek(0)
        return read_partial(fp, stop_when=lambda t, vr, n: int(t) in _PIXEL_TAGS and stop(t, vr, n),
                            force=False)
    while True:
        skip_sequence(fp, ds)  # or, where it cannot, parsed by read_dataset below
        known = len(stopped)
        rest = read_dataset(fp, False, True, stop_when=stop, parent_encoding=ds._character_set)
        ds._dict.update(rest._dict)  # raw, as read_partial leaves them (not via __setitem__)
        if len(stopped) == known:  # at the pixel data or the end of the file
            return ds


# -- headers kept from the scan for the read ------------------------------------------
# The scan parses every header; converting a series needs the same headers
# again. Each scanned header is kept as an unparsed snapshot (the read
# fingerprints elements before any is parsed, so it must see them raw),
# keyed on the file's size and mtime, until the read takes it: a converted
# file's header is parsed once. Kept while their estimated size fits the
# budget (a parsed header costs about 3x its bytes on disk); files past it
# are read again.
KEPT_HEADER_BUDGET = 256 << 20
_HEADER_COST = 3
_kept: dict[str, tuple[tuple[int, int], tuple[Any, int | None, _PixelLoc | None], int]] = {}
_kept_bytes = 0
_kept_lock = threading.Lock()


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def raw_copy(result: tuple[Any, int | None, _PixelLoc | None]
             ) -> tuple[Any, int | None, _PixelLoc | None]:
    """A copy of a :func:`_read_header` result whose elements stay unparsed when the
    original's are parsed (the raw elements are immutable and shared)."""
    ds, tag, loc = result
    snapshot = copy.copy(ds)
    object.__setattr__(snapshot, "_dict", dict(ds._dict))
    return snapshot, tag, loc


def keep_header(path: str, raw: tuple[Any, int | None, _PixelLoc | None]) -> None:
    """Keep ``raw`` (from :func:`raw_copy`) for :func:`load_header`, within the budget."""
    global _kept_bytes
    loc = raw[2]
    if loc is None:  # deflated: the read decompresses the whole file anyway
        return
    cost = _HEADER_COST * loc.start
    with _kept_lock:
        if path in _kept or _kept_bytes + cost > KEPT_HEADER_BUDGET:
            return
        try:
            _kept[path] = (_stamp(path), raw, cost)
        except OSError:
            return
        _kept_bytes += cost


def load_header(path: str) -> tuple[Any, int | None, _PixelLoc | None]:
    """The header the scan kept for ``path`` if the file is unchanged, else read anew."""
    global _kept_bytes
    with _kept_lock:
        entry = _kept.pop(path, None)
        if entry is not None:
            _kept_bytes -= entry[2]
    if entry is not None:
        try:
            if _stamp(path) == entry[0]:
                return entry[1]
        except OSError:
            pass
    return _read_header(path)


def forget_headers() -> None:
    """Drop every kept header (at the end of a conversion: what was not read by now
    will not be)."""
    global _kept_bytes
    with _kept_lock:
        _kept.clear()
        _kept_bytes = 0


def _check_pixel_extent(path: str, fp: Any, ds: Any, ts: Any, captured: dict[str, Any]) -> _PixelLoc:
    """Return where the pixel data value lies; raise _Refused if it runs past the end of the file."""
    start = fp.tell()  # pydicom rewinds to the start of the pixel data element
    size = os.fstat(fp.fileno()).st_size
    vr, length, name = captured["vr"], captured["length"], _PIXEL_TAGS[captured["tag"]]
    header = 12 if (not ts.is_implicit_VR and vr in _EXPLICIT_LONG_VRS) else 8
    value_start = start + header
    if length != 0xFFFFFFFF:
        available = size - value_start
        if available < length:
            raise _Refused(
                path,
                f"truncated: {name} declares {length} bytes but the file holds {max(available, 0)}",
            )
        expected = _expected_native_bytes(ds)
        if (
            captured["tag"] == 0x7FE00010
            and not ts.is_encapsulated
            and expected is not None
            and length < expected
        ):
            raise _Refused(
                path,
                f"pixel data too short: {length} bytes for an image of {expected} bytes "
                "(Rows x Columns x frames x samples x BitsAllocated)",
            )
        return _PixelLoc(vr, value_start, value_start + length, False)
    fp.seek(value_start)
    pos, items = value_start, 0
    while True:
        head = fp.read(8)
        if len(head) < 8:
            raise _Refused(
                path,
                f"truncated: encapsulated {name} ends after {items} item(s) without its delimiter",
            )
        group, elem, item_len = struct.unpack("<HHL", head)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return _PixelLoc(vr, value_start, pos, True)
        if (group, elem) != (0xFFFE, 0xE000) or item_len == 0xFFFFFFFF:
            raise _Refused(
                path,
                f"malformed encapsulated {name}: unexpected item ({group:04X},{elem:04X}) at byte {pos}",
            )
        pos += 8 + item_len
        if pos > size:
            raise _Refused(
                path,
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
    _groups: FrameGroups | None = field(default=None, repr=False)
    _shared: Any = field(default=False, repr=False)  # False: not read yet

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

    def frame_groups(self) -> FrameGroups:
        """The per-frame functional groups (enhanced files), read once."""
        if self._groups is None:
            self._groups = read_frame_groups(self.ds, self.builder, self.charset)
        return self._groups

    def shared_group(self) -> Any:
        """The SharedFunctionalGroupsSequence item (a view or Dataset), or None."""
        if self._shared is False:
            self._shared = read_shared_group(self.ds, self.charset, self.builder)
        return self._shared

    def perframe(self, index: int) -> dict[str, Any] | None:
        """Return the JSON model of one item of PerFrameFunctionalGroupsSequence."""
        if not self.enhanced:
            return None
        items = self.frame_groups().json
        return items[index] if index < len(items) else None


def _load_file(path: str, builder: _JsonBuilder) -> _FileInfo:
    """Read one file's header into a _FileInfo; raises DicomError naming the file."""
    try:
        ds, pixel_tag, loc = load_header(path)
    except _Refused as r:
        raise DicomError(f"{path}: {r.issue.reason}") from None
    signature = header_signature(ds)  # before any attribute is parsed
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
