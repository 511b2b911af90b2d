""":func:`list_images`: the mist-zarr images of a dataset root, one summary row each."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import zarr

from ..format import ATTR, ImageInfo
from ..storage import forget_listings, open_group

__all__ = ["list_images"]


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
    return sorted(rows, key=lambda r: r["path"])
