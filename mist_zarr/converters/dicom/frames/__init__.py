"""Turn one file into frame records: one expander per flavour, chosen once per file.

The way nibabel's ``dicomwrappers`` picks ``Wrapper`` / ``MultiframeWrapper``
/ ``MosaicWrapper``: enhanced multi-frame, Siemens mosaic, a positioned
classic single frame, an RT Dose grid, or frames without positions. An
expander that finds its flavour unusable (a mosaic without a CSA header, a
dose grid without a valid orientation) falls back to the classic one and
says so in the file's warnings where that matters.
"""

from __future__ import annotations

from collections.abc import Callable

from ..header import _FileInfo
from .classic import _expand_single, _expand_unpositioned
from .enhanced import _expand_enhanced
from .mosaic import _expand_mosaic
from .record import _ClassicAttrs, _Frame, _read_classic
from .rtdose import _expand_dose_grid, _grid_offsets


def _expand_frames(fi: int, info: _FileInfo) -> list[_Frame]:
    """Turn file ``fi`` into frame records (one per frame, or per mosaic tile)."""
    if info.enhanced:
        return _expand_enhanced(fi, info)
    attrs = _read_classic(fi, info)
    return _choose_classic(attrs)(attrs)


def _choose_classic(a: _ClassicAttrs) -> Callable[[_ClassicAttrs], list[_Frame]]:
    if a.info.n_frames == 1:
        if "MOSAIC" in a.image_type:
            return _expand_mosaic
        return _expand_single
    if _grid_offsets(a):
        return _expand_dose_grid
    return _expand_unpositioned
