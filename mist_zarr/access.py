"""Open any resolution level of a mist-zarr image as an xarray DataArray."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from .format import IMAGE, ImageInfo
from .store import MultiscaleStore

__all__ = ["choose_level", "open", "open_dataset"]


def choose_level(info: ImageInfo, *, scale: int | None = None, size: int | None = None,
                 below: bool = False) -> int:
    """Level for ``scale`` (k: ``2**k`` times smaller) or ``size`` (in-plane pixels).

    With ``size`` the level is the smallest whose shorter in-plane edge is still
    >= ``size`` (1024 -> 256 for 224), or with ``below`` the largest whose
    shorter edge is <= ``size`` (1024 -> 128 for 224).
    """
    if scale is not None and size is not None:
        raise ValueError("give scale or size, not both")
    if scale is not None:
        if not 0 <= scale <= info.levels:
            raise ValueError(f"scale must be in 0..{info.levels} for this image, found {scale}")
        return int(scale)
    if size is None:
        return 0
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, found {size}")
    edges = [min(info.level_shape(k)[info.dims.index(d)] for d in ("y", "x"))
             for k in range(info.levels + 1)]
    if below:
        fit = [k for k, e in enumerate(edges) if e <= size]
        return fit[0] if fit else info.levels
    fit = [k for k, e in enumerate(edges) if e >= size]
    return fit[-1] if fit else 0


def open_dataset(
    source: Any, *, scale: int | None = None, size: int | None = None, below: bool = False,
    chunks: Any = None, storage_options: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """The level as a Dataset (variable ``image`` plus mm coordinates); see :func:`open`."""
    image = open(source, scale=scale, size=size, below=below, chunks=chunks,
                 storage_options=storage_options)
    return image.to_dataset()


def open(
    source: Any, *, scale: int | None = None, size: int | None = None, below: bool = False,
    chunks: Any = None, storage_options: Mapping[str, Any] | None = None,
) -> xr.DataArray:
    """Open one level of the image at ``source`` (path, URL or store) lazily.

    Only that level's bytes are read. ``chunks`` as in :func:`xarray.open_zarr`
    (``None``: lazy without dask; ``{}`` or ``"auto"``: dask). Values come back
    in the dtype the image was written with; attrs hold the level's affine,
    spacing and the source metadata.
    """
    store = source if isinstance(source, MultiscaleStore) else MultiscaleStore(
        source, storage_options=storage_options)
    info = store.info
    k = choose_level(info, scale=scale, size=size, below=below)
    ds = xr.open_dataset(store, engine="zarr", group=f"s{k}", consolidated=False,
                         chunks=chunks, mask_and_scale=False, decode_times=False)
    image = ds[IMAGE]
    values = info.values
    if values.kind == "quantized":
        image = (image * values.scale + values.offset).astype(values.dtype)
    elif values.kind == "cast":
        target = np.dtype(values.dtype)
        if target == np.bool_:
            image = image > 0
        elif target.kind in "iu":
            # level 0 holds the written values exactly; reduced levels can
            # overshoot next to sharp edges and are clipped to the dtype's range
            bounds = np.iinfo(target)
            image = image.clip(bounds.min, bounds.max).astype(target)
        else:
            image = image.astype(target)
    image.attrs = {
        "level": k,
        "levels": info.levels,
        "spacing": list(info.level_spacing(k)),
        "affine": np.asarray(info.level_affine(k)),
        "source_format": info.source_format,
        "values": values.to_json(),
        "metadata": dict(info.metadata),
    }
    image.name = IMAGE
    return image

