"""RT Dose grids: a multi-frame file whose frame k lies at IPP + GridFrameOffsetVector[k] along the normal."""

from __future__ import annotations

import numpy as np

from .. import geometry as geom
from ..tags import _floats
from .classic import _expand_unpositioned
from .record import _ClassicAttrs, _Frame


def _grid_offsets(a: _ClassicAttrs) -> tuple[float, ...] | None:
    n = a.info.n_frames
    return _floats(a.info.ds, "GridFrameOffsetVector", n) if n > 1 else None


def _expand_dose_grid(a: _ClassicAttrs) -> list[_Frame]:
    offsets = _grid_offsets(a)
    normal = None
    if offsets and a.iop and a.ipp:
        try:
            normal = geom.direction_cosines(a.iop)[2]
        except ValueError:
            normal = None
    if normal is None:
        return _expand_unpositioned(a)
    rel = np.asarray(offsets) - (offsets[0] if offsets[0] != 0 else 0.0)
    base = np.asarray(a.ipp)
    return [
        _Frame(
            a.fi,
            k,
            tuple(a.group + [("geometry", True)]),
            a.temporal + (k,),
            a.check,
            position=base + rel[k] * normal,
            **a.common(),
        )
        for k in range(a.info.n_frames)
    ]
