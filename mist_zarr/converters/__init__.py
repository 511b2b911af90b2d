"""Format converters for mist-zarr: DICOM, NIfTI and 2D image ingest and export.

This package is also the registry of source formats. Each format module owns

* ``FORMAT`` (or ``FORMATS``, a tuple): the format name(s) it detects;
* ``SUFFIXES``: the file name endings it uses (stripped from image names);
* ``sniff(head: bytes) -> str | None``: the format from a file's first
  :data:`HEAD_BYTES` bytes, else None. An answer ending in ``"?"`` is
  tentative: it is returned only if no other format claims the file;
* ``read(path, *, max_bytes) -> SourceImage`` for single-file formats;
* ``GZIP = True`` if it reads gzip-compressed files itself (``.nii.gz``).

:func:`detect` asks the modules in :data:`FORMAT_MODULES` order: DICOM first,
since a DICOM preamble may itself be a TIFF header (dual-personality files),
and the tentative ACR-NEMA answer ``"dicom?"`` last. ``sniff`` sees bytes,
never the file. For a gzip file the registry decompresses the head and
offers that, instead of the raw bytes, to the formats with ``GZIP``.
"""

from __future__ import annotations

import gzip
import os
import zlib
from types import ModuleType

from . import dicom, image, nifti
from .base import DEFAULT_MAX_BYTES, ConversionError, SourceImage

__all__ = ["FORMAT_MODULES", "HEAD_BYTES", "detect", "read_file", "sniff_head", "suffixes"]

#: Bytes read for detection: DICOM's magic ends at 132, a NIfTI-1 header at 348.
HEAD_BYTES = 544
#: The registered format modules, in detection order.
FORMAT_MODULES: tuple[ModuleType, ...] = (dicom, image, nifti)
_GZIP_MAGIC = b"\x1f\x8b"


def _formats(module: ModuleType) -> tuple[str, ...]:
    return tuple(getattr(module, "FORMATS", None) or (module.FORMAT,))


def _head(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    """The raw head and, for a gzip file, the decompressed one (None if unreadable)."""
    with open(path, "rb") as f:
        raw = f.read(HEAD_BYTES)
    if not raw.startswith(_GZIP_MAGIC):
        return raw, None
    try:
        with gzip.open(path, "rb") as f:
            return raw, f.read(HEAD_BYTES)
    except (OSError, EOFError, zlib.error):
        return raw, None


def sniff_head(raw: bytes, unzipped: bytes | None = None) -> str | None:
    """The format of a file whose first bytes are ``raw`` (``unzipped``: a gzip file's
    decompressed first bytes), asking each registered module in order."""
    tentative = None
    for module in FORMAT_MODULES:
        head = unzipped if raw.startswith(_GZIP_MAGIC) and getattr(module, "GZIP", False) \
            else raw
        found = module.sniff(head) if head is not None else None
        if found and found.endswith("?"):
            tentative = tentative or found
        elif found:
            return found
    return tentative


def detect(path: str | os.PathLike) -> str | None:
    """The source format of the file at ``path`` from its content, or None if it is
    none of the registered formats (or cannot be read)."""
    try:
        raw, unzipped = _head(path)
    except OSError:
        return None
    return sniff_head(raw, unzipped)


def read_file(path: str | os.PathLike, fmt: str, *,
              max_bytes: int | None = DEFAULT_MAX_BYTES) -> SourceImage:
    """Read a single-file source of format ``fmt`` (as :func:`detect` named it)."""
    for module in FORMAT_MODULES:
        if fmt in _formats(module) and hasattr(module, "read"):
            return module.read(path, max_bytes=max_bytes)
    raise ConversionError(f"{path}: no single-file reader for format {fmt!r}")


def suffixes() -> tuple[str, ...]:
    """Every registered file name ending, longest first (``.nii.gz`` before ``.nii``)."""
    return tuple(sorted({s for m in FORMAT_MODULES for s in m.SUFFIXES}, key=len, reverse=True))
