"""The physical mist-zarr image group: names, attributes and their model.

See ``docs/format.md`` for the specification this module implements.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import google_crc32c
import numpy as np

from .layout import DEFAULT_ALPHA, level_shape, plane_axes
from .values import ValueMapping
from .errors import IncompleteImageError

__all__ = [
    "ATTR",
    "CHECKSUM",
    "FORMAT_VERSION",
    "IMAGE",
    "INDEX",
    "SLICE_METADATA",
    "SOURCE_FORMATS",
    "TMP_DIR",
    "DONE_DIR",
    "DATASET_ATTR",
    "EXPORTS",
    "ImageInfo",
    "allowed_exports",
    "chunk_crc",
    "IncompleteImageError",
    "default_affine",
    "not_an_image",
]

FORMAT_VERSION = 1
# Bookkeeping folders at a dataset root (not zarr nodes; readers and verify skip them):
TMP_DIR = ".mist-tmp"  # images being written; renamed into place when complete
DONE_DIR = ".mist-done"  # one marker per converted source unit, written last
DATASET_ATTR = "mist_dataset"  # the group attribute that marks a dataset root (written by convert)

ATTR = "mist"


def not_an_image(where: str, attributes: Mapping[str, Any]) -> ValueError:
    """The error for a zarr group at ``where`` without ``mist`` attributes: says what it is
    instead when it is a dataset root."""
    if DATASET_ATTR in attributes:
        return ValueError(f"{where}: is a mist-zarr dataset root, not an image: list its images "
                          f"with `mist-zarr ls {where}` and open one by its path below the root")
    return ValueError(f"{where}: not a mist-zarr image: the group has no {ATTR!r} attribute")


IMAGE = "image"
INDEX = "index"
CHECKSUM = "checksum"
# Per-slice source metadata (per-frame DICOM attributes) can be megabytes; it
# lives zstd-compressed in this uint8 array rather than in zarr.json, which
# every open reads. ``metadata[SLICE_METADATA]`` names the keys moved there.
SLICE_METADATA = "slice_metadata"
BULKY_METADATA = ("dicom_per_slice", "dicom_per_slice_vr")
SOURCE_FORMATS = ("dicom", "nifti", "png", "jpeg", "tiff", "array")
# The format hierarchy: source format -> the formats its images may be exported to
# (only down DICOM -> NIfTI -> PNG/JPEG; mist_zarr.export enforces it)
EXPORTS: dict[str, tuple[str, ...]] = {
    "dicom": ("dicom", "nifti", "png", "jpeg"),
    "nifti": ("nifti", "png", "jpeg"),
    "array": ("nifti", "png", "jpeg"),
    "png": ("png", "jpeg"),
    "jpeg": ("png", "jpeg"),
    "tiff": ("png", "jpeg"),
}
UNITS = {"z": "millimeter", "y": "millimeter", "x": "millimeter", "t": "second", "c": None}


def allowed_exports(source_format: str) -> tuple[str, ...]:
    """Formats an image from ``source_format`` may be exported to."""
    return EXPORTS.get(source_format, ())


def chunk_crc(samples: np.ndarray) -> int:
    """CRC32C of a chunk's stored samples: little-endian, C order, the whole (padded) chunk."""
    le = np.ascontiguousarray(samples).astype(samples.dtype.newbyteorder("<"), copy=False)
    return google_crc32c.value(le)


def default_affine(dims: Sequence[str], spacing: Sequence[float]) -> np.ndarray:
    """Scaling affine for ``spacing``: index ``(x, y, z)`` -> mm, origin 0."""
    sp = dict(zip(dims, spacing))
    return np.diag([sp.get("x", 1.0), sp.get("y", 1.0), sp.get("z", 1.0), 1.0])


@dataclass(frozen=True)
class ImageInfo:
    """Everything a reader needs about a stored image, from one ``zarr.json``.

    ``spacing`` follows ``dims`` (array order; ``c`` has spacing 1).
    ``affine`` maps the homogeneous index ``(x, y, z, 1)`` -- the spatial
    axes in *reverse* array order, as in NIfTI -- to RAS+ millimetres.
    """

    dims: tuple[str, ...]
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    levels: int
    spacing: tuple[float, ...]
    affine: np.ndarray
    values: ValueMapping
    source_format: str = "array"
    alpha: int = DEFAULT_ALPHA
    complete: bool = False
    metadata: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # Unique per write (absent in images written before it was introduced):
    # readers that cache an image's index key the cache on it, so an image
    # rewritten at the same path is never read through the old index.
    write_id: str | None = None

    @property
    def dtype(self) -> np.dtype:
        """The caller's dtype (what :func:`mist_zarr.read_image` returns)."""
        return np.dtype(self.values.dtype)

    @property
    def stored_dtype(self) -> np.dtype:
        return np.dtype(self.values.stored_dtype)

    @property
    def grid(self) -> tuple[int, ...]:
        """Number of chunks along each axis."""
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunks))

    def level_shape(self, k: int) -> tuple[int, ...]:
        return level_shape(self.shape, self.dims, k)

    def level_chunks(self, k: int) -> tuple[int, ...]:
        return level_shape(self.chunks, self.dims, k)

    def level_spacing(self, k: int) -> tuple[float, ...]:
        """Spacing at level ``k``: ``y`` and ``x`` times ``2**k``."""
        iy, ix = plane_axes(self.dims)
        return tuple(s * (1 << k) if i in (iy, ix) else s for i, s in enumerate(self.spacing))

    def level_affine(self, k: int) -> np.ndarray:
        """Affine of level ``k``: level-k sample ``j`` sits on level-0 pixel ``j * 2**k``.

        The reversible 5/3 wavelet keeps the even samples' grid, so the
        origin does not move (no half-pixel shift, unlike averaging pyramids).
        """
        return self.affine @ np.diag([1 << k, 1 << k, 1, 1])

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "mist-zarr",
            "format_version": self.format_version,
            "complete": self.complete,
            "dims": list(self.dims),
            "shape": list(self.shape),
            "chunks": list(self.chunks),
            "levels": self.levels,
            "alpha": self.alpha,
            "spacing": [float(s) for s in self.spacing],
            "units": [UNITS.get(d) for d in self.dims],
            "affine": np.asarray(self.affine, dtype=float).tolist(),
            "affine_convention": "index (x, y, z) = reversed spatial array axes -> RAS+ mm",
            "values": self.values.to_json(),
            "source_format": self.source_format,
            "metadata": dict(self.metadata),
        } | ({"write_id": self.write_id} if self.write_id else {})

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, where: str = "image") -> "ImageInfo":
        if data.get("format") != "mist-zarr":
            raise ValueError(
                f"{where}: not a mist-zarr image: expected attribute {ATTR}.format == "
                f"'mist-zarr', found {data.get('format')!r}"
            )
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{where}: mist-zarr format version {version} is not supported "
                f"(this library reads version {FORMAT_VERSION}); upgrade mist-zarr"
            )
        return cls(
            dims=tuple(data["dims"]),
            shape=tuple(data["shape"]),
            chunks=tuple(data["chunks"]),
            levels=int(data["levels"]),
            alpha=int(data.get("alpha", DEFAULT_ALPHA)),
            spacing=tuple(float(s) for s in data["spacing"]),
            affine=np.array(data["affine"], dtype=float),
            values=ValueMapping.from_json(data["values"]),
            source_format=data.get("source_format", "array"),
            complete=bool(data.get("complete", False)),
            metadata=data.get("metadata", {}),
            format_version=version,
            write_id=data.get("write_id"),
        )

    def completed(self) -> "ImageInfo":
        return replace(self, complete=True)


def slice_offsets(info: ImageInfo) -> list[float] | None:
    """The slices' distances from the first (mm) when they are not evenly spaced, else None
    (DICOM series with gaps or varying spacing record them as ``slice_offsets_mm``)."""
    meta = info.metadata if isinstance(info.metadata, dict) else {}
    offsets = meta.get("slice_offsets_mm")
    if offsets is None or "z" not in info.dims:
        return None
    if len(offsets) != info.shape[info.dims.index("z")]:
        raise ValueError(f"slice_offsets_mm holds {len(offsets)} positions for "
                         f"{info.shape[info.dims.index('z')]} slices")
    return [float(v) for v in offsets]
