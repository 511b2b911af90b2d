"""Enhanced multi-frame images: per-frame functional groups, each frame positioned on its own."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ....errors import DicomError
from ..header import _FileInfo
from ..tags import (
    _fg,
    _float,
    _floats,
    _get,
    _int,
    _key,
    _multi,
    _pixel_spacing,
    _round,
    _strings,
    _text,
)
from .record import _base_group, _Frame


def _expand_enhanced(fi: int, info: _FileInfo) -> list[_Frame]:
    ds = info.ds
    shared = info.shared_group()
    perframe = info.frame_groups().items
    if len(perframe) != info.n_frames:
        raise DicomError(
            f"{info.path}: PerFrameFunctionalGroupsSequence has {len(perframe)} items for {info.n_frames} frames"
        )
    acq = _int(ds, "AcquisitionNumber")
    instance = _int(ds, "InstanceNumber")
    # what every frame falls back to, read once per file
    file_iop = _floats(ds, "ImageOrientationPatient", 6)
    file_spacing = _pixel_spacing(ds)
    file_type = _frame_type(shared) or _strings(ds, "ImageType")
    base = _base_group(info, info.rows, info.cols)
    frames = []
    tpis = []
    for k, item in enumerate(perframe):
        pos_item = _fg(item, shared, "PlanePositionSequence", "ImagePositionPatient")
        ori_item = _fg(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        meas = _fg(item, shared, "PixelMeasuresSequence", "PixelSpacing")
        ipp = _floats(pos_item, "ImagePositionPatient", 3)
        iop = _floats(ori_item, "ImageOrientationPatient", 6) or file_iop
        spacing, note = _pixel_spacing(meas)
        if spacing is None:
            spacing, note = file_spacing
        thick_item = _fg(item, shared, "PixelMeasuresSequence", "SliceThickness")
        between_item = _fg(item, shared, "PixelMeasuresSequence", "SpacingBetweenSlices")
        thickness = _float(thick_item, "SliceThickness") or _float(
            between_item, "SpacingBetweenSlices"
        )
        content_seq = _get(item, "FrameContentSequence")
        content = content_seq[0] if content_seq else None
        tpi = _int(content, "TemporalPositionIndex")
        tpis.append(tpi)
        div = tuple(int(v) for v in _multi(_get(content, "DimensionIndexValues")))
        frame_type = _frame_type(item) or file_type
        echo_item = _fg(item, shared, "MREchoSequence", "EffectiveEchoTime")
        group = base + [
            ("type", frame_type),
            ("echo", _round(_float(echo_item, "EffectiveEchoTime"), 3)),
            ("stack", _text(content, "StackID")),
        ]
        temporal = (_key(tpi), _key(acq), _key(None), _key(div), _key(instance), fi, k)
        if ipp and iop:
            frames.append(
                _Frame(
                    fi,
                    k,
                    tuple(group + [("geometry", True)]),
                    temporal,
                    (tpi, acq),
                    position=np.array(ipp),
                    iop=iop,
                    pixel_spacing=spacing,
                    spacing_note=note,
                    thickness=thickness,
                )
            )
        else:
            frames.append(
                _Frame(
                    fi,
                    k,
                    tuple(
                        group
                        + [
                            ("geometry", False),
                            ("instance", _text(ds, "SOPInstanceUID") or info.path),
                        ]
                    ),
                    (k,),
                    (None, None),
                    iop=iop,
                    pixel_spacing=spacing,
                    spacing_note=note,
                    thickness=thickness,
                )
            )
    is_time = len({t for t in tpis if t is not None}) > 1 or "FrameTime" in ds
    for f in frames:
        f.temporal_axis = is_time
    return frames


def _frame_type(item: Any) -> tuple[str, ...]:
    """FrameType of the first (in tag order) non-empty ...FrameTypeSequence of a functional group."""
    if item is None:
        return ()
    for keyword in _frame_type_sequences():
        seq = _get(item, keyword)
        if seq:
            return _strings(seq[0], "FrameType")
    return ()


@functools.cache
def _frame_type_sequences() -> tuple[str, ...]:
    """Keywords of the dictionary's ...FrameTypeSequence attributes (MR, CT, PET ...), in tag order."""
    from pydicom.datadict import DicomDictionary

    return tuple(entry[4] for _, entry in sorted(DicomDictionary.items())
                 if entry[0] == "SQ" and entry[4].endswith("FrameTypeSequence"))
