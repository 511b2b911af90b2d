"""Read one level of many images at once: a list of arrays, or one dask array.

Each image is opened and read directly (:mod:`mist_zarr.direct`: its
``zarr.json``, its prefix index, one verified prefix read and one decode per
chunk), and images are read side by side on a thread pool: small images
have one chunk each, so the parallelism has to come from reading several
images at once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .access import choose_level
from .direct import _pool, default_threads, open_direct
from .modality import find_rescale, rescaled_dtype

__all__ = ["read_level", "to_dask"]

# images in flight when reading over the network (latency, not CPU, is the limit)
REMOTE_IMAGES = 16


def read_level(
    paths: Sequence[Any], *, scale: int | None = None, size: int | None = None,
    below: bool = False, rescale: bool = False, threads: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[np.ndarray]:
    """Level ``scale`` (or the level chosen for ``size``, as :func:`mist_zarr.open` does) of
    every image in ``paths`` (paths, URLs or stores), in order.

    Values come back in each image's own dtype, or with ``rescale`` as
    modality values (see :mod:`mist_zarr.modality`). Level-0 chunks are
    checked against their checksums. ``threads``: images read at once
    (default: one per core locally, 16 over the network).
    """
    paths = list(paths)
    if not paths:
        return []
    options = {"scale": scale, "size": size, "below": below, "rescale": rescale,
               "storage_options": storage_options}
    if len(paths) == 1:
        return [_read_one(paths[0], threads=threads, **options)]
    remote = any(isinstance(p, str) and "://" in p and not p.startswith("file://")
                 for p in paths)
    n = max(1, min(threads or (REMOTE_IMAGES if remote else default_threads()), len(paths)))
    if n == 1:
        return [_read_one(p, threads=1, **options) for p in paths]
    # a few tasks of many images: a hand-off per image costs as much as decoding a small level
    per_task = max(1, min(64, len(paths) // (4 * n)))
    groups = [paths[i:i + per_task] for i in range(0, len(paths), per_task)]
    parts = _pool(n).map(lambda group: [_read_one(p, threads=1, **options) for p in group],
                         groups)
    return [values for part in parts for values in part]


def _read_one(source: Any, *, scale: int | None, size: int | None, below: bool, rescale: bool,
              storage_options: Mapping[str, Any] | None, threads: int | None) -> np.ndarray:
    image = open_direct(source, storage_options=storage_options)
    info = image.info
    k = choose_level(info, scale=scale, size=size, below=below, source=source)
    values = image.read_values(k, threads=threads)
    if rescale:
        factor = find_rescale(info.metadata, info.shape[:info.dims.index("y")],
                              image.slice_metadata)
        values = factor.apply(values)
    return values


def to_dask(
    paths: Sequence[Any], *, scale: int | None = None, size: int | None = None,
    below: bool = False, rescale: bool = False, per_block: int = 16,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """One dask array ``(len(paths), *shape)`` of level ``scale`` of images of one shape.

    The first image gives the shape and dtype (it is opened now); each block
    of ``per_block`` images is one task (:func:`read_level` on one thread),
    which raises ValueError naming the image if its level differs in shape
    or dtype.
    """
    import dask.array as da
    from dask.base import tokenize

    paths = list(paths)
    if not paths:
        raise ValueError("to_dask needs at least one image")
    first = open_direct(paths[0], storage_options=storage_options)
    k = choose_level(first.info, scale=scale, size=size, below=below, source=paths[0])
    shape = first.info.level_shape(k)
    dtype = rescaled_dtype(first.info.dtype) if rescale else first.info.dtype
    options = {"scale": scale, "size": size, "below": below, "rescale": rescale,
               "storage_options": storage_options}
    groups = [paths[i:i + per_block] for i in range(0, len(paths), per_block)]
    # the graph written out, one task per block, named once for all (from_delayed and
    # concatenate, with a token per block, cost a tenth of reading a coarse level)
    name = "mist-read-level-" + tokenize([os.fspath(p) if isinstance(p, os.PathLike) else p
                                          for p in paths], k, str(dtype), options)
    zeros = (0,) * len(shape)
    graph = {(name, i, *zeros): (_block, group, shape, dtype, options)
             for i, group in enumerate(groups)}
    chunks = (tuple(len(g) for g in groups), *((n,) for n in shape))
    return da.Array(graph, name, chunks=chunks, dtype=dtype)


def _block(paths: list[Any], shape: tuple[int, ...], dtype: np.dtype,
           options: dict[str, Any]) -> np.ndarray:
    out = np.empty((len(paths), *shape), dtype)
    for i, path in enumerate(paths):
        values = _read_one(path, threads=1, **options)
        if values.shape != tuple(shape) or values.dtype != dtype:
            raise ValueError(
                f"{os.fspath(path) if isinstance(path, os.PathLike) else path}: level has shape "
                f"{values.shape} and dtype {values.dtype}; expected {tuple(shape)} {dtype} "
                "like the first image (to_dask stacks images of one shape)")
        out[i] = values
    return out
