"""The frame record every expander produces, and the attributes the classic expanders share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..header import _FileInfo
from ..tags import _float, _floats, _int, _key, _pixel_spacing, _round, _strings


@dataclass
class _Frame:
    file: int
    index: int
    group: tuple[tuple[str, Any], ...]
    temporal: tuple[Any, ...]
    check: tuple[Any, Any]  # (temporal position, acquisition number) used to validate 4-D volumes
    position: np.ndarray | None = None
    iop: tuple[float, ...] | None = None
    pixel_spacing: tuple[float, float] | None = None
    spacing_note: str | None = None
    thickness: float | None = None
    tile: int | None = None
    temporal_axis: bool = False


def _base_group(info: _FileInfo, rows: int, cols: int) -> list[tuple[str, Any]]:
    return [
        ("matrix", (rows, cols)),
        ("samples", info.spp),
        ("bits", info.bits_allocated),
        ("signed", info.pixel_representation),
        ("photometric", info.photometric),
        ("enhanced", info.enhanced),
    ]


@dataclass
class _ClassicAttrs:
    """What every classic (not enhanced) expander reads from one file's header."""

    fi: int
    info: _FileInfo
    iop: tuple[float, ...] | None
    ipp: tuple[float, ...] | None
    spacing: tuple[float, float] | None
    spacing_note: str | None
    thickness: float | None
    between: float | None
    image_type: tuple[str, ...]
    check: tuple[Any, Any]  # (TemporalPositionIdentifier, AcquisitionNumber)
    temporal: tuple[Any, ...]
    group: list[tuple[str, Any]]

    def common(self) -> dict[str, Any]:
        """The _Frame fields every frame of the file shares."""
        return {
            "iop": self.iop,
            "pixel_spacing": self.spacing,
            "spacing_note": self.spacing_note,
            "thickness": self.thickness or self.between,
        }


def _read_classic(fi: int, info: _FileInfo) -> _ClassicAttrs:
    ds = info.ds
    spacing, spacing_note = _pixel_spacing(ds)
    image_type = _strings(ds, "ImageType")
    tp = _int(ds, "TemporalPositionIdentifier")
    acq = _int(ds, "AcquisitionNumber")
    temporal = (
        _key(tp),
        _key(acq),
        _key(_float(ds, "TriggerTime")),
        _key(()),
        _key(_int(ds, "InstanceNumber")),
        fi,
    )
    group = _base_group(info, info.rows, info.cols) + [
        ("type", image_type),
        ("echo", (_int(ds, "EchoNumbers"), _round(_float(ds, "EchoTime"), 3))),
    ]
    return _ClassicAttrs(
        fi=fi,
        info=info,
        iop=_floats(ds, "ImageOrientationPatient", 6),
        ipp=_floats(ds, "ImagePositionPatient", 3),
        spacing=spacing,
        spacing_note=spacing_note,
        thickness=_float(ds, "SliceThickness"),
        between=_float(ds, "SpacingBetweenSlices"),
        image_type=image_type,
        check=(tp, acq),
        temporal=temporal,
        group=group,
    )
