"""Read mist-zarr image groups at full resolution, and their index."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from .direct import image_info, open_direct
from .errors import ChecksumError
from .format import ATTR, CHECKSUM, INDEX, SLICE_METADATA, ImageInfo
from .storage import open_group

__all__ = ["ChecksumError", "open_image", "read_checksums", "read_image", "read_index",
           "read_metadata"]


def open_image(
    source: Any, *, allow_incomplete: bool = False, storage_options: Mapping[str, Any] | None = None
) -> tuple[zarr.Group, ImageInfo]:
    """Open a mist-zarr image group read-only; return the group and its :class:`ImageInfo`.

    Raises :class:`IncompleteImageError` if the write that made it never
    finished, unless ``allow_incomplete``.
    """
    group = open_group(source, storage_options=storage_options)
    attrs = dict(group.attrs)
    return group, image_info(attrs.get(ATTR), str(source), allow_incomplete, attrs)


def member(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of an image group; FileNotFoundError naming it when absent
    (a damaged group, or one removed or replaced since it was opened)."""
    try:
        return group[name]
    except KeyError:
        where = group.store_path
        raise FileNotFoundError(
            f"{where}: the image group has no {name!r} array (the image was removed or "
            "replaced while it was being opened, or the group is damaged)"
        ) from None


def read_image(source: Any, *, threads: int | None = None, verify: bool = True,
               **kwargs: Any) -> np.ndarray:
    """Full-resolution samples in the caller's original dtype, bit-exact.

    With ``verify`` (the default) every chunk is checked against the CRC32C
    recorded at write time, so a damaged chunk, or a read that straddles a
    replacement of the image, raises :class:`ChecksumError` instead of
    returning wrong samples. ``kwargs``: ``allow_incomplete``, ``storage_options``.
    Chunks are decoded straight into the result on ``threads`` threads
    (default: one per core); see :mod:`mist_zarr.direct`.
    """
    image = open_direct(source, **kwargs)
    return image.read_values(0, threads=threads, verify=verify)


def read_metadata(source: Any) -> dict[str, Any]:
    """The image's full source metadata: ``zarr.json``'s plus the per-slice part
    stored in the ``slice_metadata`` array (source: group, path, URL or store)."""

    group = _group(source)
    metadata = dict(group.attrs[ATTR].get("metadata", {}))
    if metadata.get(SLICE_METADATA):
        metadata.update(json.loads(group[SLICE_METADATA][...].tobytes()))
    return metadata


def _group(source: Any) -> zarr.Group:
    return source if isinstance(source, zarr.Group) else open_image(source)[0]


def read_index(source: Any) -> np.ndarray:
    """Prefix index of an image (group, path, URL or store): bytes per chunk (leading
    axes) per level (last axis); a row of zeros marks a chunk that was not written."""
    return member(_group(source), INDEX)[...]


def read_checksums(source: Any) -> np.ndarray:
    """CRC32C of each chunk's stored samples (little-endian, C order, padded chunk)."""
    return member(_group(source), CHECKSUM)[...]
