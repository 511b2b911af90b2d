"""An image group or dataset file in a local folder, read straight from its files without zarr.

``import zarr`` costs about 0.5 s here (docs/architecture.md, "Imports"),
while ``mist-zarr info`` and ``ls`` of a local folder need a few small
files: a group's ``zarr.json``, the prefix index (one small zstd chunk) and
``catalog.parquet``. This module reads those with the json module, numpy and
``imagecodecs.zstd_decode``. Each function returns None where this simple
reading does not apply (not a local path, a missing file, an array layout it
does not read, a group that is no complete image): the caller then takes the
zarr path, which reads the same values or raises the error that names the
problem.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .format import ATTR, INDEX, ImageInfo

__all__ = ["local_path", "read_array", "read_bytes", "read_json", "read_local_image"]

# what read_array reads: the writer's small arrays (index, checksums)
_CODECS = ("bytes", "zstd")


def local_path(source: Any) -> Path | None:
    """The folder of a local path or ``file://`` URL (as :func:`storage.open_source_store`
    reads them); None for any other URL, store or group."""
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "://" not in source):
        return Path(source)
    if isinstance(source, str) and source.startswith("file://"):
        return Path(source.removeprefix("file://"))
    return None


def read_bytes(path: Path) -> bytes | None:
    """The file's content, or None when there is no such file."""
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def read_json(path: Path) -> Any:
    """The JSON document in the file, or None when absent or not JSON."""
    data = read_bytes(path)
    try:
        return None if data is None else json.loads(data)
    except ValueError:
        return None


def read_array(folder: Path) -> np.ndarray | None:
    """The Zarr v3 integer array in ``folder`` when it has the layout the writer gives its
    small arrays (a regular chunk grid, default chunk keys, codecs ``bytes`` and
    optionally ``zstd``); None for any other layout. Chunks not stored read as the fill
    value, as in zarr; a chunk that decodes to the wrong size is a ValueError naming it."""
    meta = read_json(folder / "zarr.json")
    layout = _layout(meta)
    if layout is None:
        return None
    shape, chunks, dtype, separator, zstd = layout
    import imagecodecs  # here: `ls` reads no array and need not load it
    out = np.full(shape, meta["fill_value"], dtype.newbyteorder("="))
    grid = [-(-s // c) for s, c in zip(shape, chunks)]
    for where in np.ndindex(*grid):
        key = separator.join(["c", *map(str, where)])
        data = read_bytes(folder / key)
        if data is None:
            continue
        if zstd:
            data = imagecodecs.zstd_decode(data)
        block = np.frombuffer(data, dtype)
        if block.size != math.prod(chunks):
            raise ValueError(f"{folder / key}: the chunk holds {block.size} values, the "
                             f"array's chunks {math.prod(chunks)} ({chunks}): damaged array")
        region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(where, chunks, shape))
        inside = tuple(slice(0, r.stop - r.start) for r in region)
        out[region] = block.reshape(chunks)[inside]
    return out


def _layout(meta: Any) -> tuple[list[int], list[int], np.dtype, str, bool] | None:
    """``(shape, chunk shape, dtype, key separator, zstd)`` of an array document that
    :func:`read_array` reads; None for any other."""
    try:
        if meta["zarr_format"] != 3 or meta["node_type"] != "array":
            return None
        if meta["chunk_grid"]["name"] != "regular" or meta.get("storage_transformers"):
            return None
        keys = meta["chunk_key_encoding"]
        if keys["name"] != "default":
            return None
        separator = keys.get("configuration", {}).get("separator", "/")
        codecs = meta["codecs"]
        names = [c["name"] for c in codecs]
        if names not in (["bytes"], list(_CODECS)):
            return None
        dtype = np.dtype(meta["data_type"])
        if dtype.kind not in "iu" or not isinstance(meta["fill_value"], int):
            return None
        endian = codecs[0].get("configuration", {}).get("endian", "little")
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
        chunks = list(meta["chunk_grid"]["configuration"]["chunk_shape"])
        return list(meta["shape"]), chunks, dtype, separator, "zstd" in names
    except (KeyError, TypeError, ValueError):
        return None


def read_local_image(source: Any) -> tuple[ImageInfo, np.ndarray] | None:
    """``(info, prefix index)`` of a complete image group in a local folder; None when
    ``source`` is no local folder or holds anything else (no group, a dataset root, an
    incomplete image, an index layout :func:`read_array` does not read)."""
    folder = local_path(source)
    if folder is None:
        return None
    doc = read_json(folder / "zarr.json")
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        return None
    attrs = (doc.get("attributes") or {}).get(ATTR)
    if not isinstance(attrs, dict):
        return None
    try:
        info = ImageInfo.from_json(attrs, where=str(source))
    except (KeyError, TypeError, ValueError):
        return None
    if not info.complete:
        return None
    index = read_array(folder / INDEX)
    return None if index is None else (info, index)
