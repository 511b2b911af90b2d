"""Siemens mosaics: one frame holding a grid of slices, de-mosaicked with the CSA image header.

When that is impossible the mosaic frame is kept as a classic 2-D image and
the file's warnings say so: never a wrong stack.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ....errors import one_line
from .. import geometry as geom
from .classic import _expand_single
from .record import _ClassicAttrs, _Frame


class _NotDemosaicked(Exception):
    """Internal: why a mosaic cannot be de-mosaicked."""


@dataclass
class _MosaicLayout:
    n_images: int
    side: int
    tile_rows: int
    tile_cols: int
    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    step: float


def _expand_mosaic(a: _ClassicAttrs) -> list[_Frame]:
    """De-mosaic into tile frames, or warn and fall back to the classic single frame."""
    info = a.info
    try:
        m = _mosaic_layout(a)
    except _NotDemosaicked as exc:
        info.warnings.append(
            f"Siemens mosaic not de-mosaicked ({exc}); the mosaic frame is kept as one 2-D image, "
            "which is NOT a slice stack"
        )
        return _expand_single(a)
    if not a.between:
        info.warnings.append(
            "mosaic slice spacing taken from SliceThickness (SpacingBetweenSlices missing)"
        )
    info.mosaic = (m.side, m.tile_rows, m.tile_cols)
    origin = geom.mosaic_origin(
        np.asarray(a.ipp), m.row, m.col, a.spacing, (info.rows, info.cols), (m.tile_rows, m.tile_cols)
    )
    grp = [g for g in a.group if g[0] != "matrix"] + [
        ("matrix", (m.tile_rows, m.tile_cols)),
        ("mosaic", True),
        ("geometry", True),
    ]
    return [
        _Frame(
            a.fi,
            0,
            tuple(grp),
            a.temporal + (k,),
            a.check,
            position=origin + k * m.step * m.normal,
            iop=a.iop,
            pixel_spacing=a.spacing,
            thickness=m.step,
            tile=k,
        )
        for k in range(m.n_images)
    ]


def _read_csa(ds: Any) -> tuple[Any, Any]:
    """Return (NumberOfImagesInMosaic, SliceNormalVector) from the CSA image header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from nibabel.nicom import csareader
        csa = csareader.get_csa_header(ds, "image")
        if csa is None:
            raise _NotDemosaicked("no Siemens CSA image header")
        return csareader.get_n_mosaic(csa), csareader.get_slice_normal(csa)
    except _NotDemosaicked:
        raise
    except ImportError:
        raise _NotDemosaicked("nibabel (needed to parse the CSA header) is not installed") from None
    except Exception as exc:
        raise _NotDemosaicked(f"CSA header unreadable ({one_line(exc)})") from None


def _mosaic_layout(a: _ClassicAttrs) -> _MosaicLayout:
    """The tile grid and slice geometry of a mosaic; raises _NotDemosaicked with the reason."""
    n_images, normal_csa = _read_csa(a.info.ds)
    if not n_images:
        raise _NotDemosaicked("CSA header has no NumberOfImagesInMosaic")
    if not (a.iop and a.ipp and a.spacing):
        raise _NotDemosaicked("ImageOrientationPatient, ImagePositionPatient or PixelSpacing missing")
    try:
        side, tile_rows, tile_cols = geom.mosaic_grid(int(n_images), a.info.rows, a.info.cols)
        row, col, normal = geom.direction_cosines(a.iop)
    except ValueError as exc:
        raise _NotDemosaicked(str(exc)) from None
    if normal_csa is not None:
        normal_csa = np.asarray(normal_csa, float)
        norm = float(np.linalg.norm(normal_csa))
        if norm < 0.5 or abs(float(normal_csa @ normal)) / norm < 0.99:
            raise _NotDemosaicked("CSA SliceNormalVector is not perpendicular to the image plane")
        normal = normal_csa / norm
    step = a.between or a.thickness
    if not step:
        raise _NotDemosaicked("neither SpacingBetweenSlices nor SliceThickness is set")
    return _MosaicLayout(int(n_images), side, tile_rows, tile_cols, row, col, normal, step)
