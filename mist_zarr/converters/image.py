"""2-D image ingest: PNG, JPEG and TIFF (multi-page TIFF as a stack)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .base import ConversionError, SourceImage, missing_dependency, safe_name

__all__ = ["FORMATS", "SUFFIXES", "image_format", "read", "read_image_file", "signature_format",
           "sniff"]

FORMATS = ("png", "jpeg", "tiff")
SUFFIXES = (".png", ".jpeg", ".jpg", ".tiff", ".tif")

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),
    (b"MM\x00+", "tiff"),
)


def image_format(path: str | Path) -> str | None:
    """``"png"``, ``"jpeg"`` or ``"tiff"`` from the file's first bytes, else None."""
    try:
        with open(path, "rb") as f:
            return signature_format(f.read(8))
    except OSError:
        return None


def signature_format(head: bytes) -> str | None:
    """``"png"``, ``"jpeg"`` or ``"tiff"`` from a file's first 8 bytes, else None."""
    for magic, fmt in _SIGNATURES:
        if head.startswith(magic):
            return fmt
    return None


def sniff(head: bytes) -> str | None:
    """The registry's detector: :func:`signature_format` of the file's first bytes."""
    return signature_format(head[:8])


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "numerator") and hasattr(value, "denominator"):
        return float(value)
    return str(value)


def _reduce_channels(a: np.ndarray, notes: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """Drop channels that carry no information, recording how to restore them.

    An alpha that is fully opaque and colour channels that are all equal are
    reversible reductions: export can rebuild the original mode exactly.
    """
    restore: dict[str, Any] = {}
    if a.ndim == 3 and a.shape[-1] in (2, 4):
        alpha = a[..., -1]
        if (alpha == np.iinfo(a.dtype).max).all():
            a = a[..., :-1]
            restore["alpha"] = "opaque"
            notes.append("alpha channel is fully opaque: dropped (recorded, restored on export)")
    if a.ndim == 3 and a.shape[-1] == 3 and (a[..., 1] == a[..., 0]).all() and (
            a[..., 2] == a[..., 0]).all():
        a = a[..., 0]
        restore["grey_as_rgb"] = True
        notes.append("R = G = B everywhere: stored as one grey channel (restored on export)")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] == 2:
        # grey + alpha: HTJ2K decodes 2 components planar; store as RGBA losslessly
        a = np.concatenate([a[..., :1]] * 3 + [a[..., 1:]], axis=-1)
        restore["grey_alpha_as_rgba"] = True
        notes.append("grey + alpha stored as RGBA with equal colour channels (restored on export)")
    return a, restore


def read_image_file(path: str | Path, *, max_bytes: int | None = None) -> SourceImage:
    """Read a PNG, JPEG or TIFF file as stored samples plus its text/EXIF metadata."""
    path = Path(path)
    fmt = image_format(path)
    if fmt is None:
        raise ConversionError(f"{path}: not a PNG, JPEG or TIFF file (unknown signature)")
    try:
        import imagecodecs
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - core dependencies
        raise missing_dependency("Pillow") from exc
    meta: dict[str, Any] = {}
    notes: list[str] = []
    try:
        if fmt == "tiff":
            data, meta = _read_tiff(path, max_bytes)
        else:
            with Image.open(path) as im:
                _check_size(path, im.size[1], im.size[0], len(im.getbands()), 2, max_bytes)
                meta["mode"] = im.mode
                meta["info"] = {k: _jsonable(v) for k, v in im.info.items()
                                if k not in ("icc_profile", "exif")}
                exif = im.getexif()
                if exif:
                    from PIL.ExifTags import TAGS

                    meta["exif"] = {TAGS.get(k, str(k)): _jsonable(v) for k, v in exif.items()}
            raw = path.read_bytes()
            data = imagecodecs.png_decode(raw) if fmt == "png" else imagecodecs.jpeg_decode(raw)
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(f"{path}: cannot decode {fmt.upper()} data: {exc}") from exc
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    stack = fmt == "tiff" and data.ndim >= 3 and meta.get("pages", 1) > 1
    if stack:
        planes = [_reduce_channels(p, []) for p in data]
        if len({p[0].shape for p in planes}) != 1 or len({str(p[1]) for p in planes}) != 1:
            raise ConversionError(f"{path}: TIFF pages differ in channels; convert pages separately")
        _, restore = _reduce_channels(data[0], notes)
        data = np.stack([p[0] for p in planes])
    else:
        data, restore = _reduce_channels(data, notes)
    colour = data.ndim == (4 if stack else 3)
    dims = (("z",) if stack else ()) + ("y", "x") + (("c",) if colour else ())
    meta["restore"] = restore
    spacing = tuple(1.0 for _ in dims)
    return SourceImage(
        data=np.ascontiguousarray(data), dims=dims, spacing=spacing,
        affine=np.eye(4), source_format=fmt, name=safe_name(path.stem),
        metadata={fmt: meta}, warnings=notes, source_files=[str(path)],
        lossy_source=fmt == "jpeg" or bool(meta.get("lossy")),
    )


read = read_image_file  # the registry's name for a single-file reader


def _check_size(path, rows, cols, channels, itemsize, max_bytes, pages=1):
    nbytes = rows * cols * channels * itemsize * pages
    if max_bytes is not None and nbytes > max_bytes:
        raise ConversionError(
            f"{path}: header declares {pages} x {rows} x {cols} x {channels} samples "
            f"({nbytes:,} bytes), above the limit of {max_bytes:,} bytes"
        )


def _read_tiff(path: Path, max_bytes: int | None) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        import tifffile
    except ImportError as exc:
        raise missing_dependency("tifffile") from exc
    with tifffile.TiffFile(path) as tif:
        pages = tif.pages
        first = pages.first
        _check_size(path, first.imagelength, first.imagewidth, first.samplesperpixel,
                    first.dtype.itemsize if first.dtype is not None else 8, max_bytes, len(pages))
        shapes = {(p.shape, p.dtype) for p in pages}
        if len(shapes) != 1:
            raise ConversionError(f"{path}: TIFF pages differ in shape or dtype: {sorted(map(str, shapes))}")
        data = tif.asarray(key=range(len(pages))) if len(pages) > 1 else first.asarray()
        lossy = any(p.compression.name in ("JPEG", "OJPEG", "WEBP", "JPEGXL", "LERC")
                    for p in pages)
        tags = {t.name: _jsonable(t.value) for t in first.tags.values()
                if t.name not in ("StripOffsets", "StripByteCounts", "TileOffsets",
                                  "TileByteCounts", "JPEGTables")}
    return data, {"pages": len(pages), "tags": tags, "lossy": lossy,
                  "photometric": tags.get("PhotometricInterpretation")}
