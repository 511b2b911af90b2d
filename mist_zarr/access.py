"""Open any resolution level of a mist-zarr image as an xarray DataArray."""

from __future__ import annotations

import operator
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import zarr
from xarray.backends import BackendArray
from xarray.core import indexing
from xarray.core.indexes import PandasIndex

from .direct import OpenedImage, derived, open_direct
from .format import IMAGE, ImageInfo, slice_offsets
from .labels import LABELS, LabelInfo, is_label_group, open_labels
from .storage import open_source_store
from .modality import Rescale, find_rescale, rescaled_dtype
from .store import MultiscaleStore

__all__ = ["choose_level", "open", "open_dataset"]


def choose_level(info: ImageInfo, *, scale: int | None = None, size: int | None = None,
                 below: bool = False, clamp: bool = False, source: Any = None) -> int:
    """Level for ``scale`` (k: ``2**k`` times smaller) or ``size`` (in-plane pixels).

    With ``size`` the level is the smallest whose shorter in-plane edge is still
    >= ``size`` (1024 -> 256 for 224), or with ``below`` the largest whose
    shorter edge is <= ``size`` (1024 -> 128 for 224). A request no level
    meets (``size`` above level 0's edge; with ``below``, under the smallest
    level's) raises ValueError listing the edges, unless ``clamp``: then the
    nearest level (0, or the smallest). ``scale`` must be a whole-number level
    of the image. ``source``, if given, names the image in errors.
    """
    try:
        return _choose_level(info, scale, size, below, clamp)
    except ValueError as exc:
        if source is None:
            raise
        name = os.fspath(source) if isinstance(source, os.PathLike) else source
        raise ValueError(f"{name}: {exc}") from None


def _choose_level(info: ImageInfo, scale: Any, size: Any, below: bool, clamp: bool) -> int:
    if scale is not None and size is not None:
        raise ValueError("give scale or size, not both")
    if scale is not None:
        k = _whole(scale)
        if k is None or not 0 <= k <= info.levels:
            raise ValueError(f"scale must be a level of this image, one of "
                             f"{list(range(info.levels + 1))} (level k is 2**k times smaller "
                             f"in y and x), found {scale!r}")
        return k
    if size is None:
        return 0
    n = _whole(size)
    if n is None or n < 1:
        raise ValueError(f"size must be a positive whole number of pixels, found {size!r}")
    edges = level_edges(info)
    fit = [k for k, e in enumerate(edges) if (e <= n if below else e >= n)]
    if fit:
        return fit[0] if below else fit[-1]
    if clamp:
        return info.levels if below else 0
    which = (f"the smallest level's shorter edge is {edges[-1]} > {n}" if below else
             f"level 0's shorter edge is {edges[0]} < {n}")
    raise ValueError(f"no level has a shorter in-plane edge {'<=' if below else '>='} {n}: "
                     f"{which}; the levels' shorter edges are "
                     f"{', '.join(f's{k}: {e}' for k, e in enumerate(edges))}")


def level_edges(info: ImageInfo) -> list[int]:
    """Each level's shorter in-plane (y, x) edge, level 0 first."""
    return [min(info.level_shape(k)[info.dims.index(d)] for d in ("y", "x"))
            for k in range(info.levels + 1)]


def _whole(value: Any) -> int | None:
    """``value`` as an int if it is a whole number (not a bool), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        pass
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    return None


def open_dataset(
    source: Any, *, scale: int | None = None, size: int | None = None, below: bool = False,
    chunks: Any = None, storage_options: Mapping[str, Any] | None = None,
    rescale: bool = False,
) -> xr.Dataset:
    """The level as a Dataset (variable ``image`` plus mm coordinates); see :func:`open`."""
    image = open(source, scale=scale, size=size, below=below, chunks=chunks,
                 storage_options=storage_options, rescale=rescale)
    return image.to_dataset()


def open(
    source: Any, *, scale: int | None = None, size: int | None = None, below: bool = False,
    chunks: Any = None, storage_options: Mapping[str, Any] | None = None,
    rescale: bool = False, threads: int | None = None,
) -> xr.DataArray:
    """Open one level of the image at ``source`` (path, URL or store) lazily.

    Only that level's bytes are read, when values are asked for: ``.values``
    or a selection reads the chunks it covers, each one verified prefix read
    and one decode (:mod:`mist_zarr.direct`, on ``threads`` threads; level 0
    is checked against its checksums). ``chunks`` as in
    :func:`xarray.open_zarr` (``None``: lazy without dask; ``{}`` or
    ``"auto"``: dask, through zarr and :class:`MultiscaleStore`). Values come
    back in the dtype the image was written with, or with ``rescale`` as
    modality values (``stored * slope + intercept``, dtype rules in
    :mod:`mist_zarr.modality`). attrs hold the level's affine, spacing, the
    source metadata and, with ``rescale``, the slope and intercept applied.
    """
    if chunks is not None:
        labels = None if isinstance(source, MultiscaleStore) else _label_group(
            source, storage_options)
        if labels is not None:
            return _open_labels(*labels, scale, size, below, chunks)
        return _open_zarr(source, scale, size, below, chunks, storage_options, rescale)
    try:
        image = open_direct(source, storage_options=storage_options)
    except ValueError:
        labels = _label_group(source, storage_options)
        if labels is None:
            raise
        return _open_labels(*labels, scale, size, below)
    info = image.info
    k = choose_level(info, scale=scale, size=size, below=below, source=source)
    factor = _rescale(image) if rescale else None
    array = LevelArray(image, k, factor, threads)
    variable = xr.Variable(info.dims, indexing.LazilyIndexedArray(array))
    coords, indexes, attrs = _level_view(image, k)
    # fastpath: the coordinates are built complete here; xarray's checks would cost
    # four times the rest of the open
    out = xr.DataArray(variable, coords=coords, name=IMAGE, indexes=indexes, fastpath=True)
    out.attrs = attrs if factor is None else attrs | {"rescale": factor.to_json()}
    return out


def _level_view(image: OpenedImage, k: int) -> tuple[dict[str, xr.Variable],
                                                     dict[str, PandasIndex], dict[str, Any]]:
    """Coordinates, indexes and attrs of level ``k``, built once per image write.

    The open's own copies: coordinate variables shallow-copied (their own attrs; the
    index data is immutable), attrs' containers copied, so that changing one opened
    array never changes another.
    """
    coords, indexes, attrs = derived(
        image, ("level view", k),
        lambda: (*_coords(image.info, k), _attrs(image.info, k, None)),
        # the coordinate values, their pandas indexes, and the documents in attrs
        lambda view: 3 * sum(v.values.nbytes for v in view[0].values()) + 4096)
    attrs = {key: (value.copy() if isinstance(value, (dict, list, np.ndarray)) else value)
             for key, value in attrs.items()}
    return {d: v.copy(deep=False) for d, v in coords.items()}, dict(indexes), attrs


def _label_group(source: Any, storage_options: Mapping[str, Any] | None
                 ) -> tuple[Any, LabelInfo] | None:
    """The label group at ``source`` and its info, or None if it is not a label map."""
    try:
        group = zarr.open_group(open_source_store(source, storage_options), mode="r",
                                zarr_format=3)
    except (FileNotFoundError, ValueError, KeyError):
        return None
    return open_labels(group) if is_label_group(group.attrs) else None


def _open_labels(group: Any, labels: LabelInfo, scale: int | None, size: int | None,
                 below: bool, chunks: Any = None) -> xr.DataArray:
    """Level k of a label map: the same shape, coordinates and affine as its image's level k."""
    info = labels.geometry
    k = choose_level(info, scale=scale, size=size, below=below, source=group.store_path)
    array = group[f"s{k}/{LABELS}"]
    if tuple(array.shape) != info.level_shape(k):
        raise ValueError(f"{group.store_path}: label level {k} has shape {array.shape}, "
                         f"expected {info.level_shape(k)}")
    if chunks is None:
        variable = xr.Variable(info.dims, indexing.LazilyIndexedArray(_LabelArray(array)))
    else:  # dask: one task per stored chunk unless asked otherwise
        import dask.array as da

        variable = xr.Variable(info.dims, da.from_zarr(array, chunks=array.chunks if chunks in (
            {}, "auto") else chunks))
    coords, indexes = _coords(info, k)
    out = xr.DataArray(variable, coords=coords, name=LABELS, indexes=indexes, fastpath=True)
    out.attrs = _attrs(info, k, None) | {"labels": {"image": labels.image,
                                                    "segments": list(labels.segments)}}
    return out


class _LabelArray(BackendArray):
    """One label level for xarray's lazy indexing: a selection reads only its chunks."""

    def __init__(self, array: Any) -> None:
        self.array, self.shape, self.dtype = array, tuple(array.shape), array.dtype

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC,
                                                  lambda k: self.array[k])


def _rescale(image: OpenedImage) -> Rescale:
    info = image.info
    leading = info.shape[:info.dims.index("y")]
    return find_rescale(info.metadata, leading, image.slice_metadata)


def _coords(info: ImageInfo, k: int) -> tuple[dict[str, xr.Variable], dict[str, PandasIndex]]:
    """mm (or s) positions from the first sample along every axis but ``c``, indexed."""
    shape, spacing = info.level_shape(k), info.level_spacing(k)
    offsets = slice_offsets(info)
    coords, indexes = {}, {}
    for axis, d in enumerate(info.dims):
        if d == "c":
            continue
        values = np.arange(shape[axis], dtype="<f8") * spacing[axis]
        attrs = {"units": "mm" if d in "zyx" else "s",
                 "long_name": f"{d} position from the first sample"}
        if d == "z" and offsets is not None:  # levels keep every slice: the same at every k
            values = np.asarray(offsets, "<f8")
            attrs["long_name"] = ("z position from the first slice: the slices' true "
                                  "positions, not uniformly spaced")
        indexes[d] = PandasIndex(pd.Index(values), d)
        coords.update(indexes[d].create_variables({d: xr.Variable((d,), values, attrs)}))
    return coords, indexes


def _attrs(info: ImageInfo, k: int, factor: Rescale | None) -> dict[str, Any]:
    affine = np.asarray(info.level_affine(k))
    uniform = slice_offsets(info) is None
    attrs = {
        "level": k,
        "levels": info.levels,
        "spacing": list(info.level_spacing(k)),
        # no affine maps indices to positions when the slices are not evenly spaced
        "affine": affine if uniform else None,
        "source_format": info.source_format,
        "values": info.values.to_json(),
        "metadata": dict(info.metadata),
    }
    if not uniform:
        attrs["nominal_affine"] = affine  # the mean slice spacing: right only on average
    if factor is not None:
        attrs["rescale"] = factor.to_json()
    return attrs


class LevelArray(BackendArray):
    """One level of an opened image for xarray's lazy indexing: a selection reads only
    the chunks it covers, decodes the stored values and applies the rescale, if any."""

    def __init__(self, image: OpenedImage, k: int, factor: Rescale | None,
                 threads: int | None) -> None:
        self.image, self.k, self.factor, self.threads = image, k, factor, threads
        self.shape = image.info.level_shape(k)
        dtype = image.info.dtype
        self.dtype = rescaled_dtype(dtype) if factor is not None else dtype

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        if isinstance(key, indexing.BasicIndexer):  # ints and slices: read them as they are
            return self._read(key.tuple)
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC,
                                                  self._read)

    def _read(self, key: tuple[Any, ...]) -> np.ndarray:
        region, squeeze = [], []
        for axis, (sel, n) in enumerate(zip(key, self.shape)):
            if isinstance(sel, slice):
                start, stop, step = sel.indices(n)
                # a strided selection reads the whole axis, then steps through it
                region.append(slice(start, max(start, stop)) if step == 1 else slice(0, n))
                squeeze.append(slice(None) if step == 1 else sel)
            else:
                i = int(sel) + (n if int(sel) < 0 else 0)
                region.append(slice(i, i + 1))
                squeeze.append(0)
        info = self.image.info
        values = self.image.read_values(self.k, region=region, threads=self.threads)
        if self.factor is not None:
            values = self.factor.apply(values, region[:info.dims.index("y")])
        return values[tuple(squeeze)]


def _open_zarr(source: Any, scale: int | None, size: int | None, below: bool, chunks: Any,
               storage_options: Mapping[str, Any] | None, rescale: bool) -> xr.DataArray:
    """The level through zarr and xarray over a :class:`MultiscaleStore` (dask chunks)."""
    store = source if isinstance(source, MultiscaleStore) else MultiscaleStore(
        source, storage_options=storage_options)
    info = store.info
    k = choose_level(info, scale=scale, size=size, below=below, source=source)
    ds = xr.open_dataset(store, engine="zarr", group=f"s{k}", consolidated=False,
                         chunks=chunks, mask_and_scale=False, decode_times=False)
    image = ds[IMAGE].copy(data=ds[IMAGE].data.map_blocks(info.values.decode,
                                                         dtype=info.dtype))
    factor = None
    if rescale:
        factor = _rescale(open_direct(store))
        iy = info.dims.index("y")
        image = image.copy(data=image.data.map_blocks(
            _apply_blockwise, factor, iy, dtype=rescaled_dtype(info.dtype)))
    image.attrs = _attrs(info, k, factor)
    image.name = IMAGE
    return image


def _apply_blockwise(block: np.ndarray, factor: Rescale, iy: int,
                     block_info: dict | None = None) -> np.ndarray:
    if block_info is None or not factor.per_slice:
        return factor.apply(block)
    where = block_info[0]["array-location"][:iy]
    return factor.apply(block, [slice(a, b) for a, b in where])
