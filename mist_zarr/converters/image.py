"""2-D image ingest: PNG, JPEG and TIFF (multi-page TIFF as a stack)."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError
from ..format import ImageInfo
from ..modality import Rescale, find_rescale, find_window
from .base import (
    ConversionError,
    ExportResult,
    SourceImage,
    StoredImage,
    missing_dependency,
    safe_name,
)

__all__ = ["FORMATS", "SUFFIXES", "export", "image_format", "read", "read_image_file", "signature_format",
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


# -- export: one picture per plane -----------------------------------------------
def export(image: StoredImage, out: Path, *, format: str, window: Sequence[float] | None = None,
           bits: int | None = None) -> ExportResult:
    """Write the level as PNG or JPEG pictures under ``out``, one per plane.

    PNG keeps the samples losslessly (up to 16 bits; signed samples offset by
    +32768 and recorded) unless ``bits=8``; JPEG is 8-bit (window or min-max).
    """
    from PIL import Image, PngImagePlugin

    info, k, data, fmt = image.info, image.level, image.values, format
    colour = "c" in info.dims
    lead = data.shape[: data.ndim - (3 if colour else 2)]
    out.mkdir(parents=True, exist_ok=True)
    eight = fmt == "jpeg" or bits == 8
    notes: list[str] = []
    offset = 0
    if not eight:
        data, offset = _sixteen_bit(data, image.source, notes)
    else:
        rendering = _Rendering.of(image, lead, window)
        notes.append("8-bit rendering: " + rendering.how)
    text = {
        "mist_source_format": info.source_format,
        "mist_level": str(k),
        "mist_spacing_mm": json.dumps(list(info.level_spacing(k))),
        "mist_affine": json.dumps(np.asarray(info.level_affine(k)).tolist()),
    }
    if offset:
        text["mist_offset"] = str(-offset)
    files = []
    width = [len(str(max(n - 1, 0))) for n in lead]
    base = Path(str(image.source).rstrip("/")).name.removesuffix(".zarr") or "image"
    for idx in np.ndindex(*lead) if lead else [()]:
        plane = data[idx]
        suffix = "".join(f"_{d}{i:0{w}d}" for d, i, w in zip(info.dims, idx, width))
        path = out / f"{base}{suffix}.{'png' if fmt == 'png' else 'jpg'}"
        if eight:
            pic = rendering.picture(plane, idx) if plane.dtype != np.uint8 or window else plane
        else:
            pic = (plane.astype(np.int32) + offset).astype(np.uint16) if offset else plane
            pic = _restore_mode(pic, info)
        if fmt == "png":
            info_chunk = PngImagePlugin.PngInfo()
            for key, value in text.items():
                info_chunk.add_text(key, value)
            if not (eight or pic.dtype == np.uint8 or pic.ndim == 3):
                pic = np.ascontiguousarray(pic.astype("<u2"))  # Pillow writes 16-bit grey as I;16
            Image.fromarray(pic).save(path, pnginfo=info_chunk)
        else:
            if pic.ndim == 3 and pic.shape[-1] == 4:  # JPEG has no alpha channel
                pic = pic[..., :3]
                if "alpha channel dropped (JPEG has none)" not in notes:
                    notes.append("alpha channel dropped (JPEG has none)")
            Image.fromarray(np.ascontiguousarray(pic)).save(path, quality=90)
        files.append(str(path))
    return ExportResult(fmt, k, files, notes)


def _sixteen_bit(data: np.ndarray, source: Any, notes: list[str]) -> tuple[np.ndarray, int]:
    """Samples as PNG can hold them losslessly, and the offset added to signed ones."""
    lo, hi = (int(data.min()), int(data.max())) if data.dtype.kind in "iub" else (0, -1)
    offset = 0
    if data.dtype.kind == "b":
        return data.astype(np.uint8), 0
    if data.dtype.kind == "f" or not (0 <= lo and hi <= 65535 or -32768 <= lo and hi <= 32767):
        raise ExportError(
            f"{source}: {data.dtype} samples in [{lo}, {hi}] do not fit a 16-bit PNG "
            "losslessly; export 8-bit pictures (bits=8 / --bits 8, with a window) or NIfTI"
        )
    if lo < 0:
        offset = 32768  # PNG has no signed samples
        notes.append("signed samples written with +32768 (text chunk mist_offset = -32768)")
    if data.dtype.itemsize > 2 or (data.dtype.kind == "i" and not offset):
        data = data.astype(np.uint16 if hi > 255 or data.dtype.itemsize > 1 else np.uint8)
    return data, offset


class _Rendering:
    """How planes become 8-bit pictures: DICOM modality values (the rescale, per slice
    where it varies), then a window (the caller's, the DICOM VOI window of each
    slice, or each slice's min-max)."""

    def __init__(self, rescale: Rescale | None, window: tuple[np.ndarray, np.ndarray] | None,
                 how: str, mono1: bool) -> None:
        self.rescale, self.window, self.how, self.mono1 = rescale, window, how, mono1

    @classmethod
    def of(cls, image: StoredImage, lead: tuple[int, ...],
           window: Sequence[float] | None) -> _Rendering:
        info = image.info
        metadata = info.metadata if isinstance(info.metadata, dict) else {}
        mono1 = metadata.get("photometric") == "MONOCHROME1"
        rescale, found = None, None
        if isinstance(metadata.get("dicom"), dict):
            # enhanced files keep the rescale and the window in their functional groups,
            # classic series with varying values per slice: both read as find_rescale does
            per_slice = functools.cache(image.full_metadata)
            rescale = find_rescale(metadata, lead, per_slice)
            rescale = None if rescale.identity else rescale
            found = find_window(metadata, lead, per_slice) if window is None else None
        if window is not None:
            centre, width = (float(v) for v in window)
            chosen, how = (np.full(lead, centre), np.full(lead, width)), f"window {tuple(window)}"
        else:
            chosen, how = found, "DICOM window" if found is not None else "min-max of each slice"
        if rescale is not None:
            how += f", on modality values ({rescale.source})"
        return cls(rescale, chosen, how, mono1)

    def picture(self, plane: np.ndarray, idx: tuple[int, ...]) -> np.ndarray:
        values = plane.astype(np.float64)
        if self.rescale is not None:  # in float64 (Rescale.apply may round to float32)
            slope, intercept = (float(np.asarray(v)[idx]) if np.ndim(v) else float(v)
                                for v in (self.rescale.slope, self.rescale.intercept))
            values = values * slope + intercept
        if self.window is None:
            lo, hi = float(values.min()), float(values.max())
        else:
            centre, width = (float(w[idx]) for w in self.window)
            lo, hi = centre - width / 2, centre + width / 2
        scaled = (values - lo) / max(hi - lo, 1e-12) * 255.0
        out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return 255 - out if self.mono1 else out


def _restore_mode(plane: np.ndarray, info: ImageInfo) -> np.ndarray:
    """Undo the channel reductions recorded at ingest (see :func:`_reduce_channels`)."""
    meta = info.metadata.get(info.source_format, {}) if isinstance(info.metadata, dict) else {}
    restore = meta.get("restore", {}) if isinstance(meta, dict) else {}
    if restore.get("grey_as_rgb"):
        plane = np.stack([plane] * 3, -1)
    if restore.get("grey_alpha_as_rgba"):
        plane = plane[..., [0, 3]]
    if restore.get("alpha") == "opaque":
        alpha = np.full(plane.shape[:2] + (1,), np.iinfo(plane.dtype).max, plane.dtype)
        plane = np.concatenate([plane if plane.ndim == 3 else plane[..., None], alpha], -1)
    return plane
