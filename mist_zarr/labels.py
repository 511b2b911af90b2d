"""Label maps (segmentations): their level rule, codec, orientation, writing and reading.

A wavelet low-pass of a label map is not a label map (it mixes organ 3 and
organ 5 into organ 4), so a label map is not stored as HTJ2K. Each level is
its own Zarr array of true labels: level ``k`` sample ``j`` is the level-0
label at pixel ``j * 2**k`` on ``y`` and ``x`` (``a[..., ::2**k, ::2**k]``),
the same even-sample grid as the HTJ2K image levels, whose low-pass sample
``j`` sits on pixel ``j * 2**k``. Image level ``k`` and mask level ``k``
therefore align voxel for voxel, provided the mask is stored in its
image's array orientation (:func:`align_to`). Layout and codec:
``docs/format.md`` ("Label maps").
"""

from __future__ import annotations

import colorsys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import StorePath

from .errors import ConversionError, IncompleteImageError
from .format import ATTR, FORMAT_VERSION, ImageInfo, default_affine
from .layout import DEFAULT_ALPHA, num_levels, plane_axes
from .ngff import ome_multiscales
from .storage import open_source_store
from .values import ValueMapping

__all__ = ["LABELS", "LABELS_FORMAT", "LabelInfo", "align_to", "false_colour", "is_label_group",
           "label_level",
           "open_labels", "read_label_level", "write_labels"]

LABELS_FORMAT = "mist-zarr-labels"  # attributes.mist.format of a label group
LABELS = "labels"  # the array in each level group sK/
# zstd level 19: the smallest of the codecs compared on the shared masks that
# still writes fast (benchmarks/bench_labels.py; figures in docs/results.md).
ZSTD_LEVEL = 19
CHUNK_BYTES = 4 << 20  # a chunk is a slab of whole planes of at most this many raw bytes
LABEL_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32")
# two affines describe the same grid when they differ by less than this (mm)
AFFINE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class LabelInfo:
    """A stored label map: its geometry (as an :class:`ImageInfo`) and its label document.

    ``image`` is the dataset path of the image it belongs to (None: stored
    in its own geometry); ``segments`` one record per label value (``value``,
    ``name`` and whatever the source said about it).
    """

    geometry: ImageInfo
    image: str | None = None
    segments: tuple[dict[str, Any], ...] = ()
    rule: str = "even-sample"

    def to_json(self) -> dict[str, Any]:
        doc = self.geometry.to_json()
        doc["format"] = LABELS_FORMAT
        doc[LABELS] = {"image": self.image, "segments": list(self.segments), "rule": self.rule,
                       "array": LABELS, "codec": {"name": "zstd", "level": ZSTD_LEVEL}}
        return doc

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, where: str = "labels") -> "LabelInfo":
        if data.get("format") != LABELS_FORMAT:
            raise ValueError(f"{where}: not a mist-zarr label map: expected attribute "
                             f"{ATTR}.format == {LABELS_FORMAT!r}, found {data.get('format')!r}")
        geometry = ImageInfo.from_json({**data, "format": "mist-zarr"}, where=where)
        doc = data.get(LABELS, {})
        return cls(geometry, doc.get("image"), tuple(doc.get("segments", ())),
                   doc.get("rule", "even-sample"))


def is_label_group(attrs: Mapping[str, Any]) -> bool:
    """True if a group's attributes make it a mist-zarr label map."""
    doc = attrs.get(ATTR)
    return isinstance(doc, Mapping) and doc.get("format") == LABELS_FORMAT


def label_level(data: np.ndarray, dims: Sequence[str], k: int) -> np.ndarray:
    """Level ``k`` of a label map: the level-0 label at pixel ``j * 2**k`` on ``y`` and ``x``."""
    iy, ix = plane_axes(dims)
    step = [slice(None)] * data.ndim
    step[iy] = step[ix] = slice(None, None, 1 << k)
    return data[tuple(step)]


def _spatial_axes(dims: Sequence[str]) -> list[int]:
    """Array axes of ``x``, ``y``, ``z`` (affine index order), those present."""
    return [dims.index(d) for d in ("x", "y", "z") if d in dims]


def align_to(data: np.ndarray, affine: np.ndarray, dims: Sequence[str], target: ImageInfo,
             *, where: str = "labels") -> np.ndarray:
    """``data`` (with ``affine``) flipped into ``target``'s array orientation.

    Raises :class:`ConversionError` naming ``where`` when the mask is not on
    the target's grid: different shape, spacing, axes or origin. Only flips
    are undone (a y-flipped NIfTI mask beside a DICOM CT); a mask on another
    grid would need resampling, which would change labels.
    """
    affine = np.asarray(affine, float)
    axes = _spatial_axes(dims)
    spatial_shape = [data.shape[a] for a in axes]
    target_shape = [target.shape[target.dims.index(d)] for d in ("x", "y", "z") if d in dims]
    out = data
    flipped = affine.copy()
    for i, axis in enumerate(axes):  # i: column of the affine (index x, y, z)
        same = np.allclose(flipped[:3, i], target.affine[:3, i], atol=AFFINE_TOLERANCE)
        opposite = np.allclose(flipped[:3, i], -target.affine[:3, i], atol=AFFINE_TOLERANCE)
        if opposite and not same:
            n = spatial_shape[i]
            flipped[:3, 3] = flipped[:3, 3] + flipped[:3, i] * (n - 1)
            flipped[:3, i] = -flipped[:3, i]
            out = np.flip(out, axis)
    if spatial_shape != target_shape or not np.allclose(flipped, target.affine,
                                                         atol=AFFINE_TOLERANCE):
        raise ConversionError(
            f"{where}: not on its image's grid: expected shape (x, y, z) {target_shape} and "
            f"affine {np.round(target.affine, 4).tolist()}, found {spatial_shape} and "
            f"{np.round(affine, 4).tolist()} (only flips are undone; resampling would "
            "change labels)")
    return np.ascontiguousarray(out)


def same_grid(affine: np.ndarray, shape: Sequence[int], dims: Sequence[str],
              target: ImageInfo) -> bool:
    """True if a mask of ``shape``/``affine`` lies on ``target``'s grid (up to flips)."""
    try:
        align_to(np.empty(tuple(shape), np.uint8), affine, dims, target)
    except (ConversionError, ValueError):
        return False
    return True


def _check_labels(data: np.ndarray, where: str) -> np.ndarray:
    data = np.asarray(data)
    if data.dtype == bool:
        return data.astype(np.uint8)
    if data.dtype.name not in LABEL_DTYPES:
        if data.dtype.kind in "iu" and data.size and np.iinfo(np.int32).min <= data.min() \
                and data.max() <= np.iinfo(np.uint32).max:
            return data.astype(np.int32 if data.min() < 0 else np.uint32)
        raise ConversionError(f"{where}: a label map holds integers; found {data.dtype} "
                              "(a fractional segmentation is not a label map)")
    return data


def _chunks(shape: Sequence[int], dims: Sequence[str], itemsize: int) -> tuple[int, ...]:
    """Whole planes, stacked along the axis before ``y`` up to :data:`CHUNK_BYTES`."""
    iy, ix = plane_axes(dims)
    chunks = [1] * len(shape)
    chunks[iy], chunks[ix] = shape[iy], shape[ix]
    if iy > 0:
        plane = shape[iy] * shape[ix] * itemsize
        chunks[iy - 1] = max(1, min(shape[iy - 1], CHUNK_BYTES // max(plane, 1)))
    return tuple(chunks)


def write_labels(
    dest: Any, data: np.ndarray, *, dims: Sequence[str], spacing: Sequence[float],
    affine: np.ndarray | None = None, image: str | None = None, levels: int | None = None,
    segments: Sequence[Mapping[str, Any]] = (), source_format: str = "array",
    metadata: Mapping[str, Any] | None = None, overwrite: bool = False,
    alpha: int = DEFAULT_ALPHA,
) -> LabelInfo:
    """Write the label map ``data`` (in ``dims`` order) with every level as its own array.

    ``levels`` defaults to the number an image of this plane would get, so
    that a mask written beside its image has the same levels; ``image`` is the
    image's dataset path (recorded as the link). Returns the stored
    :class:`LabelInfo`.
    """
    where = str(dest)
    data = _check_labels(data, where)
    dims = tuple(dims)
    iy, ix = plane_axes(dims)
    if levels is None:
        levels = num_levels((data.shape[iy], data.shape[ix]), alpha)
    if isinstance(dest, zarr.Group):
        dest = dest.store_path
    elif not isinstance(dest, StorePath):
        dest = open_source_store(dest, read_only=False)
    group = zarr.open_group(dest, mode="w" if overwrite else "w-", zarr_format=3)

    geometry = ImageInfo(
        dims=dims, shape=tuple(int(s) for s in data.shape),
        chunks=_chunks(data.shape, dims, data.dtype.itemsize), levels=int(levels),
        spacing=tuple(float(s) for s in spacing),
        affine=np.asarray(affine if affine is not None else default_affine(dims, spacing), float),
        values=ValueMapping(data.dtype.name, data.dtype.name), source_format=source_format,
        alpha=alpha, metadata=dict(metadata or {}), format_version=FORMAT_VERSION)
    values, present = np.unique(data, return_counts=True)
    known = {int(s["value"]): dict(s) for s in segments}
    records = tuple(known.get(int(v), {"value": int(v)}) | {"voxels": int(n)}
                    for v, n in zip(values, present) if v != 0 or int(v) in known)
    info = LabelInfo(geometry, image, records)
    group.attrs[ATTR] = info.to_json()  # complete: false until every level is written
    for k in range(levels + 1):
        level = label_level(data, dims, k)
        array = group.create_array(
            f"s{k}/{LABELS}", shape=level.shape, dtype=level.dtype,
            chunks=_chunks(level.shape, dims, level.dtype.itemsize), fill_value=0,
            compressors=[ZstdCodec(level=ZSTD_LEVEL, checksum=False)],
            dimension_names=dims, overwrite=True)
        array.attrs.update({"level": k})
        array[...] = level
        group[f"s{k}"].attrs.update({"level": k, "spacing": list(geometry.level_spacing(k)),
                                     "affine": geometry.level_affine(k).tolist()})
    info = replace(info, geometry=geometry.completed())
    attrs = {ATTR: info.to_json()}
    ome = ome_multiscales(geometry, name=LABELS)
    if ome is not None:
        for entry, k in zip(ome["multiscales"][0]["datasets"], range(levels + 1)):
            entry["path"] = f"s{k}/{LABELS}"
        ome["image-label"] = {"version": "0.5", "source": {"image": image}} if image else \
            {"version": "0.5"}
        attrs["ome"] = ome
    group.attrs.update(attrs)
    return info


def false_colour(values: np.ndarray) -> np.ndarray:
    """RGB uint8 of a label level (trailing axis of 3): 0 black, each label its own colour.

    The colour of label ``v`` depends on ``v`` only (a golden-angle hue walk), so
    a label has the same colour in every slice, level and mask.
    """

    values = np.asarray(values)
    found, inverse = np.unique(values, return_inverse=True)
    palette = np.array([(0.0, 0.0, 0.0) if v == 0 else
                        colorsys.hsv_to_rgb((int(v) * 0.618033988749895) % 1.0, 0.75, 1.0)
                        for v in found]).reshape(-1, 3)
    return np.rint(palette[inverse.reshape(values.shape)] * 255).astype(np.uint8)


def open_labels(source: Any) -> tuple[zarr.Group, LabelInfo]:
    """The label group at ``source`` (path, URL, store or group) and its :class:`LabelInfo`."""
    group = source if isinstance(source, zarr.Group) else zarr.open_group(
        open_source_store(source), mode="r", zarr_format=3)
    info = LabelInfo.from_json(group.attrs.get(ATTR, {}), where=str(source))
    if not info.geometry.complete:
        raise IncompleteImageError(f"{source}: label map is incomplete (interrupted write?)")
    return group, info


def find_label_maps(root: Any, storage_options: Mapping[str, Any] | None = None
                    ) -> dict[str, list[str]]:
    """``{image path: [label map paths]}`` for the linked label maps under a dataset root
    (walks the groups: a local or listable store)."""

    group = zarr.open_group(open_source_store(root, storage_options), mode="r", zarr_format=3)
    out: dict[str, list[str]] = {}
    with warnings.catch_warnings():  # bookkeeping folders (.mist-done ...) are not zarr nodes
        warnings.simplefilter("ignore")
        members = list(group.members(max_depth=None))
    for path, node in members:
        if isinstance(node, zarr.Group) and is_label_group(node.attrs):
            image = node.attrs[ATTR].get(LABELS, {}).get("image")
            if image:
                out.setdefault(image, []).append(path)
    return {k: sorted(v) for k, v in out.items()}


def read_label_level(group: zarr.Group, k: int, region: Sequence[slice] | None = None
                     ) -> np.ndarray:
    """Level ``k`` of a label group (or ``region`` of it): one array, only that level's chunks."""
    array = group[f"s{k}/{LABELS}"]
    return array[tuple(region)] if region is not None else array[...]


@dataclass
class LabelSource:
    """A label map read from a source, ready for :func:`write_labels` (see ``convert``)."""

    data: np.ndarray
    dims: tuple[str, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    segments: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
