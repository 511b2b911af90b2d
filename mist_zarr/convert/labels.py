"""Converting label maps: recognise them, find their image in the dataset, store them beside it.

A source is a label map when its format says so (NIfTI intent
``NIFTI_INTENT_LABEL``) or the user says so (``labels=True`` for every
non-DICOM integer source of the run, or a glob of file names). A name that
suggests a mask (``seg``, ``label``, ``mask``) with few distinct integer
values only earns a warning. The image is found by geometry: a complete
image of the dataset with the same shape and affine up to axis flips, one in
the mask's own folder first. The mask is flipped into that image's array
orientation, so that their levels share one grid (``docs/format.md``).
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import replace
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import zarr
from zarr.storage import StorePath

from ..converters.base import SourceImage
from ..converters.dicom.rtstruct import rasterise, read_rtstruct
from ..converters.dicom.seg import (
    read_seg,
    referenced_series,
    seg_on_instances,
    seg_own_geometry,
    segment_records,
)
from ..errors import ConversionError
from ..format import slice_offsets
from ..labels import align_to, same_grid, write_labels
from ..reader import read_metadata
from .options import MASK_NAME
from .listing import image_infos
from .report import SeriesResult

__all__ = ["mark_labels", "write_label_image"]

SUGGEST_MAX_VALUES = 256  # a suggestion needs at most this many distinct values


def mark_labels(image: SourceImage, option: bool | str | None, path: str) -> None:
    """Mark ``image`` as a label map if ``option`` asks for it; else maybe warn that it looks
    like one."""
    data = image.data
    integer = np.dtype(getattr(data, "dtype", np.float64)).kind in "iub"
    asked = option is True or (isinstance(option, str) and fnmatch.fnmatch(
        os.path.basename(path), option))
    if asked and image.source_format != "dicom":
        if not integer:
            raise ConversionError(f"{path}: marked as labels but holds {data.dtype} values: a "
                                  "label map holds integers")
        image.labels = True
        return
    if image.labels or not integer or not MASK_NAME.search(os.path.basename(path)):
        return
    values = np.unique(np.asarray(data))
    if len(values) <= SUGGEST_MAX_VALUES:
        image.warnings.append(
            f"looks like a label map ({len(values)} distinct integer values, named like a "
            "mask) but is stored as an image, whose reduced levels mix labels; convert it "
            "with labels=True (--labels) to store true labels at every level")


def _find_image(root: zarr.Group, name: str, image: SourceImage) -> tuple[str, Any] | None:
    """The dataset image on the mask's grid, preferring one in the mask's own folder."""
    shape = np.asarray(image.data).shape if not hasattr(image.data, "shape") else image.data.shape
    folder = str(PurePosixPath(name).parent)
    # (an image whose slices are not evenly spaced has no affine a mask's could equal)
    found = [(path, info) for path, info in image_infos(root)
             if info.complete and tuple(info.dims) == tuple(image.dims)
             and slice_offsets(info) is None
             and same_grid(image.affine, shape, image.dims, info)]
    found.sort(key=lambda pi: (not pi[0].startswith(folder + "/") if folder != "." else 0, pi[0]))
    return found[0] if found else None


def _seg_image(root: zarr.Group, image: SourceImage) -> tuple[str, Any] | None:
    """Lay a DICOM SEG onto its referenced series, if stored; else onto its own frames.

    Fills ``image`` (data, dims, geometry, segments, warnings) and returns the linked
    image's (path, info), or None.
    """

    path = image.metadata.pop("seg_file")
    seg = read_seg(path)
    image.segments = segment_records(seg)
    series = referenced_series(seg)
    image.metadata["seg"] = {"referenced_series": series,
                             "frame_of_reference": str(seg.get("FrameOfReferenceUID", "")),
                             "series_uid": str(seg.SeriesInstanceUID)}
    for target, info in image_infos(root):
        if not info.complete or not series or info.metadata.get("series_uid") != series:
            continue
        meta = read_metadata(root[target])
        uids = [u[0] if isinstance(u, list) else u
                for u in meta.get("dicom_per_slice", {}).get("SOPInstanceUID", [])]
        data, dims, notes = seg_on_instances(seg, uids, where=path)
        if dims[0] == "segment" and info.dims[0] != "segment":
            info = _with_segments(info, data.shape[0])
        image.data, image.dims, image.affine = data, dims, info.affine
        image.spacing = info.spacing if dims == info.dims else (1.0,) + tuple(info.spacing)
        image.warnings += notes
        return target, info
    data, dims, affine, spacing, notes = seg_own_geometry(seg, where=path)
    image.data, image.dims, image.affine, image.spacing = data, dims, affine, spacing
    image.warnings += notes + [f"referenced series {series} is not in the dataset: stored in "
                               "the SEG's own geometry, not linked to an image"]
    return None


def _rtstruct_image(root: zarr.Group, image: SourceImage) -> tuple[str, Any]:
    """Rasterise an RTSTRUCT onto the dataset image of its frame of reference (refused when
    there is none: contours have no grid of their own)."""

    path = image.metadata.pop("rtstruct_file")
    frame, rois = read_rtstruct(path)
    image.segments = [{"value": r["value"], "name": r["name"]} for r in rois]
    image.metadata["rtstruct"] = {"frame_of_reference": frame}
    for target, info in image_infos(root):
        dicom = info.metadata.get("dicom", {}) if isinstance(info.metadata, dict) else {}
        uid = (dicom.get("00200052", {}).get("Value") or [""])[0]
        if not info.complete or not frame or uid != frame or tuple(info.dims) != ("z", "y", "x"):
            continue
        if slice_offsets(info) is not None:
            raise ConversionError(
                f"{path}: the slices of its image {target} are not evenly spaced; contours are "
                "placed on slices through one affine, which that image does not have: refused")
        data, dims, notes = rasterise(rois, info.affine, info.shape, where=path)
        image.data, image.dims, image.affine = data, dims, info.affine
        image.spacing = info.spacing if dims == info.dims else (1.0,) + tuple(info.spacing)
        image.warnings += notes
        return target, info
    raise ConversionError(f"{path}: no image of the dataset has the structure set's frame of "
                          f"reference {frame}: contours cannot be rasterised without a grid "
                          "(convert the referenced series with it)")


def _with_segments(info: Any, n: int) -> Any:

    return replace(info, dims=("segment",) + tuple(info.dims), shape=(n,) + tuple(info.shape),
                   spacing=(1.0,) + tuple(info.spacing))


def write_label_image(root: zarr.Group, name: str, image: SourceImage, metadata: dict[str, Any],
                      overwrite: bool) -> SeriesResult:
    """Store the label map ``image`` at ``name``, aligned with and linked to its image."""
    if "seg_file" in image.metadata or "rtstruct_file" in image.metadata:
        kind = "seg" if "seg_file" in image.metadata else "rtstruct"
        # a SEG is placed by the instances it references, an RTSTRUCT by its frame of reference
        linked = _seg_image(root, image) if kind == "seg" else _rtstruct_image(root, image)
        metadata = metadata | {kind: image.metadata[kind]}
        metadata.pop(f"{kind}_file", None)
        data = np.asarray(image.data)
        target = linked[0] if linked else None
        levels = linked[1].levels if linked else None
        if linked and slice_offsets(linked[1]) is not None:  # the image's true slice positions
            metadata = metadata | {"slice_offsets_mm": slice_offsets(linked[1])}
        return _store(root, name, image, data, image.affine, image.spacing, levels, target,
                      metadata, overwrite)
    data = np.asarray(image.data)
    linked = _find_image(root, name, image)
    affine, spacing, levels, target = image.affine, image.spacing, None, None
    if linked is not None:
        target, info = linked
        data = align_to(data, image.affine, image.dims, info, where=name)
        affine, spacing, levels = info.affine, info.spacing, info.levels
    else:
        image.warnings.append("no image of the dataset lies on this label map's grid: stored "
                              "in its own geometry, not linked to an image")
    return _store(root, name, image, data, affine, spacing, levels, target, metadata, overwrite)


def _store(root: zarr.Group, name: str, image: SourceImage, data: np.ndarray, affine: Any,
           spacing: Any, levels: int | None, target: str | None, metadata: dict[str, Any],
           overwrite: bool) -> SeriesResult:
    dest = StorePath(root.store_path.store, f"{root.store_path.path}/{name}".strip("/"))
    stored = write_labels(dest, data, dims=image.dims, spacing=spacing, affine=affine,
                          image=target, levels=levels, segments=image.segments,
                          source_format=image.source_format,
                          metadata=metadata | {"warnings": list(image.warnings)} if image.warnings
                          else metadata, overwrite=overwrite)
    group = zarr.open_group(dest, mode="r")
    out = sum(_stored_bytes(group[f"s{k}/labels"]) for k in range(stored.geometry.levels + 1))
    bytes_in = sum(os.path.getsize(f) for f in image.source_files if os.path.exists(f))
    return SeriesResult(name, image.source_format, stored.geometry.shape, data.dtype.name,
                        bytes_in, out, len(image.source_files), warnings=list(image.warnings))


def _stored_bytes(array: Any) -> int:
    return int(array.nbytes_stored())
