"""The virtual view in Zarr format 2, for readers that decode chunks with numcodecs.

Every ``zarr.json`` of the view becomes ``.zgroup`` or ``.zarray`` plus
``.zattrs``; the HTJ2K codec becomes the compressor ``imagecodecs_htj2k``
(imagecodecs' numcodecs codec, same configuration, ``skipres=k``); chunk
keys use ``/`` without the ``c/`` of Zarr v3; array dimensions go to
``_ARRAY_DIMENSIONS`` (xarray's convention); and OME-NGFF 0.5's ``ome``
attribute becomes NGFF 0.4's ``multiscales``. Chunks are the same bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["V2_DOCUMENTS", "v2_chunk_key", "v2_documents", "v3_source"]

V2_DOCUMENTS = (".zgroup", ".zarray", ".zattrs")
_V2_CHUNK = re.compile(r"^(.*?)((?:/\d+)+)$")


def _json(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def v2_documents(key: str, doc: bytes) -> dict[str, bytes]:
    """The v2 documents equal to the v3 ``zarr.json`` at ``key`` (``""`` or ``F/zarr.json``)."""
    folder = key[: -len("zarr.json")]
    meta = json.loads(doc)
    attrs = dict(meta.get("attributes") or {})
    if meta["node_type"] == "group":
        if "ome" in attrs:  # NGFF 0.5 -> 0.4: same multiscales, versioned per entry
            ome = attrs.pop("ome")
            attrs["multiscales"] = [{**m, "version": "0.4"} for m in ome["multiscales"]]
        return {folder + ".zgroup": _json({"zarr_format": 2}), folder + ".zattrs": _json(attrs)}
    attrs["_ARRAY_DIMENSIONS"] = meta["dimension_names"]
    return {folder + ".zarray": _json(_v2_array(meta)), folder + ".zattrs": _json(attrs)}


def _v2_array(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A v2 ``.zarray`` equal to a v3 array document of the virtual view."""
    codecs = doc["codecs"]
    if len(codecs) != 1:
        raise ValueError(f"expected one array-to-bytes codec, found {codecs}")
    codec = codecs[0]
    if codec["name"] == "bytes":
        compressor = None  # the view's coordinates: raw little-endian
    else:  # imagecodecs' v3 and numcodecs codecs share name and configuration
        compressor = {"id": codec["name"], **codec["configuration"]}
    dtype = np.dtype(doc["data_type"])
    return {
        "zarr_format": 2,
        "shape": doc["shape"],
        "chunks": doc["chunk_grid"]["configuration"]["chunk_shape"],
        "dtype": dtype.newbyteorder("<").str if dtype.itemsize > 1 else dtype.str,
        "compressor": compressor,
        # null, not 0: xarray reads a v2 fill value as _FillValue and would turn every
        # sample equal to it (0 HU is water) into NaN; absent chunks still read as 0
        "fill_value": None,
        "filters": None,
        "order": "C",
        "dimension_separator": "/",
    }


def v2_chunk_key(key: str) -> str:
    """``F/c/0/1/2`` (v3, default encoding) -> ``F/0/1/2`` (v2, ``/`` separator)."""
    array, sep, coords = key.partition("/c/")
    if not sep:
        raise ValueError(f"not a Zarr v3 chunk key: {key!r}")
    return f"{array}/{coords}"


def v3_source(key: str) -> tuple[str, str] | None:
    """Which v3 key answers the v2 ``key``: ``(F/zarr.json, document name)`` for
    ``.zgroup`` / ``.zarray`` / ``.zattrs``, ``(F/c/..., "")`` for a chunk, else None."""
    folder, _, name = key.rpartition("/")
    if name in V2_DOCUMENTS:
        return (f"{folder}/zarr.json" if folder else "zarr.json"), name
    m = _V2_CHUNK.match(key)
    if m and m.group(1):
        return f"{m.group(1)}/c{m.group(2)}", ""
    return None
