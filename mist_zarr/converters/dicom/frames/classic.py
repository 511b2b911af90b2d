"""Classic (not enhanced) images: one positioned frame, or a file's frames as a stack of its own."""

from __future__ import annotations

import numpy as np

from ..tags import _get, _multi, _tag_keyword, _text
from .record import _ClassicAttrs, _Frame


def _expand_single(a: _ClassicAttrs) -> list[_Frame]:
    """One frame with ImagePositionPatient and ImageOrientationPatient: a slice of a stack."""
    if not (a.info.n_frames == 1 and a.iop and a.ipp):
        return _expand_unpositioned(a)
    return [
        _Frame(
            a.fi,
            0,
            tuple(a.group + [("geometry", True)]),
            a.temporal + (0,),
            a.check,
            position=np.array(a.ipp),
            **a.common(),
        )
    ]


def _expand_unpositioned(a: _ClassicAttrs) -> list[_Frame]:
    """No per-frame positions: the file is a stack of its own (2-D, cine or generic frames)."""
    info, ds = a.info, a.info.ds
    increments = {_tag_keyword(t) for t in _multi(_get(ds, "FrameIncrementPointer"))}
    is_time = bool(increments & {"FrameTime", "FrameTimeVector"}) or (
        info.n_frames > 1 and "CineRate" in ds
    )
    own = tuple(
        a.group + [("geometry", False), ("instance", _text(ds, "SOPInstanceUID") or info.path)]
    )
    return [
        _Frame(a.fi, k, own, (k,), (None, None), position=None, temporal_axis=is_time, **a.common())
        for k in range(info.n_frames)
    ]
