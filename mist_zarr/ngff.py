"""Zarr v3 group and array ``zarr.json`` documents (the writer's and the virtual view's)
and the OME-NGFF 0.5 ``multiscales`` attribute (used by the store and by label maps)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .format import IMAGE, ImageInfo

__all__ = ["BYTES_LE", "SMALL_CODECS", "array_doc", "chunk_key", "group_doc", "json_bytes",
           "ome_multiscales"]

_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


def json_bytes(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def group_doc(attributes: Mapping[str, Any],
               members: Mapping[str, bytes] | None = None) -> bytes:
    doc: dict[str, Any] = {"zarr_format": 3, "node_type": "group", "attributes": dict(attributes)}
    if members is not None:
        # zarr-python's inline consolidated metadata (not in the v3 spec; readers that do
        # not know it ignore it): xarray's default open reads it instead of warning
        doc["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": {
            name: json.loads(member) for name, member in members.items()}}
    return json_bytes(doc)


def array_doc(shape, chunks, dtype, codecs, dims, fill_value=0, attributes=None) -> bytes:
    return json_bytes({
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": str(dtype),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill_value,
        "codecs": codecs,
        "attributes": dict(attributes or {}),
        "dimension_names": list(dims),
        "storage_transformers": [],
    })


def chunk_key(coords: tuple[int, ...]) -> str:
    """The key of a chunk under its array, in the default "/" encoding (``c/0/1/2``)."""
    return "/".join(("c", *(str(int(c)) for c in coords)))




BYTES_LE = [{"name": "bytes", "configuration": {"endian": "little"}}]
# the index and checksum arrays: one chunk each, little-endian bytes + zstd level 0
SMALL_CODECS = [*BYTES_LE, {"name": "zstd", "configuration": {"level": 0, "checksum": False}}]


def ome_multiscales(info: ImageInfo, name: str = "image") -> dict[str, Any] | None:
    """OME-NGFF 0.5 ``ome`` attribute for the virtual levels, or None when the axes do not
    fit NGFF: colour (NGFF puts channels before space; mist-zarr keeps ``c`` last) and
    axes without an NGFF type (a DICOM multi-frame ``frame`` axis)."""
    if any(d == "c" or d not in _AXIS_TYPES for d in info.dims):
        return None
    axes = []
    for d in info.dims:
        axis = {"name": d, "type": _AXIS_TYPES[d]}
        unit = {"space": "millimeter", "time": "second"}.get(axis["type"])
        if unit:
            axis["unit"] = unit
        axes.append(axis)
    datasets = [
        {
            "path": f"s{k}/{IMAGE}",
            "coordinateTransformations": [
                {"type": "scale", "scale": list(info.level_spacing(k))},
                {"type": "translation", "translation": [0.0] * len(info.dims)},
            ],
        }
        for k in range(info.levels + 1)
    ]
    return {"version": "0.5", "multiscales": [{"name": name, "axes": axes, "datasets": datasets}]}
