"""Chunk layout, level count and codec configuration of a mist-zarr image."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "BLOCK_SIZE",
    "DEFAULT_ALPHA",
    "DEFAULT_TILE",
    "TILE_THRESHOLD",
    "codec_config",
    "default_dims",
    "encode_kwargs",
    "level_shape",
    "num_levels",
    "plane_axes",
    "resolutions_for",
    "tile_shape",
]

DEFAULT_ALPHA = 64
BLOCK_SIZE = (64, 64)
# Slices larger than this (either edge) are stored as tiles so that one chunk
# stays a few tens of MB at most and can be decoded by one thread.
TILE_THRESHOLD = 8192
DEFAULT_TILE = 4096

SPATIAL_DIMS = {2: ("y", "x"), 3: ("z", "y", "x"), 4: ("t", "z", "y", "x")}


def default_dims(ndim: int, *, colour: bool = False) -> tuple[str, ...]:
    """Dimension names for an array of ``ndim`` axes (the last is ``c`` if colour)."""
    spatial = ndim - 1 if colour else ndim
    if spatial not in SPATIAL_DIMS:
        raise ValueError(
            f"expected a 2-D, 3-D or 4-D image (plus a colour axis), found {ndim} axes"
        )
    return SPATIAL_DIMS[spatial] + (("c",) if colour else ())


def plane_axes(dims: Sequence[str]) -> tuple[int, int]:
    """Positions of the ``y`` and ``x`` axes: the plane each chunk codes."""
    try:
        return dims.index("y"), dims.index("x")
    except ValueError:
        raise ValueError(f"dims must contain 'y' and 'x', found {tuple(dims)}") from None


def num_levels(plane: Sequence[int], alpha: int = DEFAULT_ALPHA) -> int:
    """Decomposition levels ``n = ceil(log2(min(Y, X) / alpha))``, at least 0."""
    if alpha < 1:
        raise ValueError(f"alpha must be a positive number of pixels, found {alpha}")
    smallest = min(plane)
    if smallest <= alpha:
        return 0
    return math.ceil(math.log2(smallest / alpha))


def tile_shape(plane: Sequence[int], levels: int, tile: int | None = None) -> tuple[int, int]:
    """Chunk shape in the plane: the whole slice, or square tiles for large slices.

    A tile edge is a multiple of ``2**levels`` so that every level's tile grid
    aligns with the level-0 grid.
    """
    y, x = plane
    if tile is None:
        if max(y, x) <= TILE_THRESHOLD:
            return y, x
        tile = DEFAULT_TILE
    step = 1 << levels
    edge = max(step, -(-tile // step) * step)
    return (y if y <= edge else edge), (x if x <= edge else edge)


def level_shape(shape: Sequence[int], dims: Sequence[str], k: int) -> tuple[int, ...]:
    """Shape at level ``k``: ``ceil(N / 2**k)`` on ``y`` and ``x``, others unchanged."""
    iy, ix = plane_axes(dims)
    out = list(shape)
    for i in (iy, ix):
        out[i] = -(-out[i] // (1 << k))
    return tuple(out)


@functools.cache
def _resolutions_offset() -> int:
    """How the installed imagecodecs counts ``resolutions``: 0 when it means the
    number of decompositions (up to 2026.10), 1 when it means resolution levels,
    i.e. decompositions + 1 (2026.11 on). Found by encoding a tiny probe once."""
    # Imported here, not at the top: cli.py imports this module for its
    # defaults, and --help must not load the codec (docs/architecture.md).
    import imagecodecs
    import numpy as np

    from .codestream import prefix_lengths

    probe = imagecodecs.htj2k_encode(
        np.zeros((8, 8), np.uint8), reversible=True, resolutions=2, prog_order="RPCL",
        tilepart="RESOLUTIONS", tlm=True)
    decompositions = len(prefix_lengths(probe)) - 1
    if decompositions not in (1, 2):
        raise RuntimeError(f"imagecodecs {imagecodecs.__version__} coded resolutions=2 with "
                           f"{decompositions} decompositions; expected 1 or 2")
    return 2 - decompositions


def resolutions_for(levels: int) -> int:
    """The ``resolutions`` value that makes the installed imagecodecs code ``levels``
    wavelet decompositions (see :func:`_resolutions_offset`)."""
    return levels + _resolutions_offset()


def codec_config(levels: int, *, skipres: int | None = None) -> dict[str, Any]:
    """JSON configuration of the ``imagecodecs_htj2k`` codec for ``levels`` levels.

    Reversible 5/3 (lossless), RPCL, 64x64 code blocks, one tile-part per
    resolution and a TLM marker: the layout whose prefixes are resolutions.
    """
    cfg: dict[str, Any] = {
        "reversible": True,
        "resolutions": resolutions_for(levels),
        "prog_order": "RPCL",
        "block_size": list(BLOCK_SIZE),
        "tilepart": "RESOLUTIONS",
        "tlm": True,
    }
    if levels == 0:
        # imagecodecs 2026.10 mis-decodes 1-pixel-thick planes encoded with an
        # explicit ``resolutions`` (zeros come back as 2**(bits-1)); its default
        # (5 levels, clamped by OpenJPH) round-trips every shape. Level 0 is
        # the only level served either way.
        del cfg["resolutions"]
    if skipres:
        cfg["skipres"] = skipres
    return {"name": "imagecodecs_htj2k", "configuration": cfg}


def encode_kwargs(levels: int) -> dict[str, Any]:
    """Keyword arguments of ``imagecodecs.htj2k_encode`` equal to :func:`codec_config`."""
    cfg = dict(codec_config(levels)["configuration"])
    cfg["block_size"] = tuple(cfg["block_size"])
    return cfg
