"""Preview, then refine: an image level by level, each finer level at the cost of its new bytes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import xarray as xr

from .access import open as open_level
from .store import MultiscaleStore

__all__ = ["DEFAULT_CACHE_BYTES", "refine"]

DEFAULT_CACHE_BYTES = 256 << 20


def refine(
    source: Any, *, isel: Mapping[str, Any] | None = None, coarsest: int | None = None,
    finest: int = 0, storage_options: Mapping[str, Any] | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> Iterator[xr.DataArray]:
    """Yield the image at ``coarsest`` (default: the coarsest level), then each finer
    level down to ``finest``, each loaded into memory.

    A chunk's level-k bytes are a prefix of its level k-1 bytes, so each step
    fetches only the bytes beyond the prefixes already read (kept in the
    store's prefix cache, at most ``cache_bytes``; chunks evicted from it are
    read again whole). ``isel`` picks part of the image on axes the levels do
    not reduce (``{"z": 20}`` for one slice of a volume); the in-plane axes
    ``y``/``x`` differ in size between levels, so selecting on them is refused.
    ``source`` is a path, URL or store, as for :func:`mist_zarr.open`.
    """
    isel = dict(isel or {})
    plane = {"y", "x"} & set(isel)
    if plane:
        raise ValueError(f"isel on the in-plane axes {sorted(plane)} is not supported: their "
                         "size changes with the level; select a region of each yielded level")
    if isinstance(source, MultiscaleStore) and source.prefix_cache is not None:
        store = source
    else:
        if isinstance(source, MultiscaleStore):  # the same image, with a prefix cache
            storage_options = storage_options or source.storage_options
            source = source.source
        store = MultiscaleStore(source, storage_options=storage_options, cache_bytes=cache_bytes)
    levels = store.info.levels
    start = levels if coarsest is None else coarsest
    if not 0 <= finest <= start <= levels:
        raise ValueError(f"expected 0 <= finest <= coarsest <= {levels} for this image, found "
                         f"finest={finest}, coarsest={start}")
    for k in range(start, finest - 1, -1):
        yield open_level(store, scale=k).isel(isel).load()
