"""Read mist-zarr image groups at full resolution, and their index."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from .format import ATTR, CHECKSUM, IMAGE, INDEX, ImageInfo, IncompleteImageError

__all__ = ["open_image", "read_checksums", "read_image", "read_index"]


def open_image(
    source: Any, *, allow_incomplete: bool = False, storage_options: Mapping[str, Any] | None = None
) -> tuple[zarr.Group, ImageInfo]:
    """Open a mist-zarr image group read-only; return the group and its :class:`ImageInfo`.

    Raises :class:`IncompleteImageError` if the write that made it never
    finished, unless ``allow_incomplete``.
    """
    group = zarr.open_group(
        source, mode="r", zarr_format=3,
        storage_options=dict(storage_options) if storage_options else None,
    )
    where = str(source)
    attrs = group.attrs.get(ATTR)
    if attrs is None:
        raise ValueError(f"{where}: not a mist-zarr image: the group has no {ATTR!r} attribute")
    info = ImageInfo.from_json(attrs, where=where)
    if not info.complete and not allow_incomplete:
        raise IncompleteImageError(
            f"{where}: the image was not completely written (interrupted or failed write); "
            "convert it again"
        )
    return group, info


def read_image(source: Any, **kwargs: Any) -> np.ndarray:
    """Full-resolution samples in the caller's original dtype, bit-exact."""
    group, info = open_image(source, **kwargs)
    stored = group[IMAGE][...]
    return info.values.decode(stored)


def _group(source: Any) -> zarr.Group:
    return source if isinstance(source, zarr.Group) else open_image(source)[0]


def read_index(source: Any) -> np.ndarray:
    """Prefix index of an image (group, path, URL or store): bytes per chunk (leading
    axes) per level (last axis); a row of zeros marks a chunk that was not written."""
    return _group(source)[INDEX][...]


def read_checksums(source: Any) -> np.ndarray:
    """CRC32C of each chunk's stored samples (little-endian, C order, padded chunk)."""
    return _group(source)[CHECKSUM][...]
