""":func:`list_images`: the mist-zarr images of a dataset root, one summary row each."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import zarr

from ..format import ATTR, ImageInfo
from ..labels import LABELS, LabelInfo, is_label_group
from ..storage import forget_listings, open_group

__all__ = ["list_images"]


def _members(root: zarr.Group) -> list[tuple[str, Any]]:
    with warnings.catch_warnings():
        # the dataset's own bookkeeping folders (.mist-done, .mist-tmp) are not zarr nodes
        warnings.filterwarnings("ignore", message=r"Object at (\.mist-|catalog\.parquet|failures\.csv)")
        return [(p, n) for p, n in root.members(max_depth=None) if isinstance(n, zarr.Group)]


def image_infos(root: zarr.Group) -> list[tuple[str, ImageInfo]]:
    """(path, info) of every mist-zarr image (not label map) under ``root``, sorted by path."""
    out = []
    for path, node in _members(root):
        try:
            out.append((path, ImageInfo.from_json(node.attrs[ATTR], where=path)))
        except (KeyError, ValueError):
            continue
    return sorted(out, key=lambda pi: pi[0])


def _label_row(path: str, node: zarr.Group) -> dict[str, Any] | None:
    try:
        labels = LabelInfo.from_json(node.attrs[ATTR], where=path)
    except (KeyError, ValueError):
        return None
    info = labels.geometry
    stored = sum(int(node[f"s{k}/{LABELS}"].nbytes_stored()) for k in range(info.levels + 1)) \
        if info.complete else 0
    return {"path": path, "modality": "labels", "shape": list(info.shape),
            "dtype": info.dtype.name, "spacing": list(info.spacing),
            "source_format": info.source_format, "levels": info.levels, "bytes": stored,
            "complete": info.complete, "kind": "labels", "image": labels.image,
            "labels": [int(s["value"]) for s in labels.segments]}


def list_images(dest: Any, *, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per mist-zarr image under the dataset root ``dest`` (sorted by path)."""
    root = open_group(dest, storage_options=storage_options)
    forget_listings(root.store_path.store)  # see what other processes wrote since a listing
    rows = []
    with warnings.catch_warnings():
        # the dataset's own bookkeeping folders (.mist-done, .mist-tmp) are not zarr nodes
        warnings.filterwarnings("ignore", message=r"Object at (\.mist-|catalog\.parquet|failures\.csv)")
        members = list(root.members(max_depth=None))
    for path, node in members:
        if not isinstance(node, zarr.Group) or ATTR not in node.attrs:
            continue
        if is_label_group(node.attrs):
            row = _label_row(path, node)
            if row is not None:
                rows.append(row)
            continue
        try:
            info = ImageInfo.from_json(node.attrs[ATTR], where=path)
        except ValueError:
            continue
        index = node["index"][...] if info.complete else np.zeros((1,), np.uint64)
        meta = info.metadata
        dicom = meta.get("dicom", {}) if isinstance(meta, dict) else {}
        modality = (dicom.get("00080060", {}).get("Value") or [""])[0] if isinstance(
            dicom, dict) else ""
        rows.append({
            "path": path, "modality": modality, "shape": list(info.shape),
            "dtype": info.dtype.name, "spacing": list(info.spacing),
            "source_format": info.source_format, "levels": info.levels,
            "bytes": int(index[..., 0].sum()) if info.complete else 0,
            "complete": info.complete,
        })
    by_path = {r["path"]: r for r in rows}
    for row in rows:  # the link both ways: an image lists the label maps stored for it
        if row.get("kind") == "labels" and row["image"] in by_path:
            by_path[row["image"]].setdefault("label_maps", []).append(row["path"])
    return sorted(rows, key=lambda r: r["path"])
