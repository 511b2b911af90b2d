"""Stacks: group frames into geometrically consistent stacks, order them and plan their axes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import DicomError
from . import geometry as geom
from .frames.record import _Frame
from .header import _FileInfo
from .tags import _fg, _float, _floats, _get, _key, _multi, _strings, _tag_keyword


@dataclass
class _Plan:
    frames: list[_Frame]
    lead: tuple[int, ...]
    dims: tuple[str, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    positions: np.ndarray | None
    stack_key: str
    warnings: list[str]
    notes: list[str]
    # slice distances from the first slice along the normal (mm), when not uniform
    slice_offsets: list[float] | None = None


def _group_frames(frames: list[_Frame]) -> list[list[_Frame]]:
    """Split frames into stacks by their group key and orientation (tolerance 1e-3)."""
    stacks: dict[tuple[Any, ...], list[_Frame]] = {}
    orientations: dict[tuple[Any, ...], list[np.ndarray]] = {}
    for f in frames:
        reps = orientations.setdefault(f.group, [])
        ori = np.asarray(f.iop) if f.iop else None
        idx = -1
        for i, rep in enumerate(reps):
            if (
                ori is not None
                and rep.shape == ori.shape
                and float(np.max(np.abs(rep - ori))) < 1e-3
            ):
                idx = i
                break
        if idx < 0 and ori is not None:
            reps.append(ori)
            idx = len(reps) - 1
        spacing = tuple(round(v, 4) for v in f.pixel_spacing) if f.pixel_spacing else None
        stacks.setdefault((f.group, idx, spacing), []).append(f)
    return list(stacks.values())


def _stack_key(frames: list[_Frame], extra: str = "") -> str:
    f = frames[0]
    parts = [f"{k}={_fmt(v)}" for k, v in f.group]
    if f.iop:
        parts.append("orientation=" + ",".join(f"{v:.3f}" for v in f.iop))
    if f.pixel_spacing:
        parts.append("spacing=" + ",".join(f"{v:.4f}" for v in f.pixel_spacing))
    if extra:
        parts.append(extra)
    return "|".join(parts)


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return "\\".join(_fmt(v) for v in value)
    return "" if value is None else str(value)


def _in_plane_spacing(frame: _Frame) -> tuple[tuple[float, float], list[str], list[str]]:
    """(row, column) spacing of a stack, with the warning or note it needs."""
    if frame.pixel_spacing is None:
        return (1.0, 1.0), ["no pixel spacing in the header; 1.0 mm assumed"], []
    return frame.pixel_spacing, [], [frame.spacing_note] if frame.spacing_note else []


def _plan_stack(
    frames: list[_Frame], files: list[_FileInfo], label: str, split_acq: bool = True
) -> list[_Plan]:
    if frames[0].position is not None:
        return _plan_spatial(frames, files, label, split_acq)
    return [_plan_frames(frames, files, label)]


def _plan_spatial(
    frames: list[_Frame], files: list[_FileInfo], label: str, split_acq: bool, extra: str = ""
) -> list[_Plan]:
    key = _stack_key(frames, extra)
    try:
        row, col, normal = geom.direction_cosines(frames[0].iop)
    except ValueError as exc:
        raise DicomError(f"{label}: {exc}") from None
    spacing, warnings_, notes = _in_plane_spacing(frames[0])
    positions = np.array([f.position for f in frames])
    clusters = geom.cluster_positions(positions @ normal)
    counts = [len(c) for c in clusters]
    if len(set(counts)) > 1:
        acquisitions = sorted({f.check[1] for f in frames}, key=_key)
        if split_acq and len(acquisitions) > 1:
            plans = []
            for acq in acquisitions:
                part = [f for f in frames if f.check[1] == acq]
                plans.extend(_plan_spatial(part, files, label, False, extra=f"acquisition={acq}"))
            return plans
        histogram = {c: counts.count(c) for c in sorted(set(counts))}
        desc = ", ".join(f"{n} position(s) with {c} image(s)" for c, n in histogram.items())
        raise DicomError(
            f"{label}: unequal numbers of images per slice position ({desc}); "
            "slices or volumes are missing or duplicated, refusing to guess the volume"
        )
    n_t, n_z = counts[0], len(clusters)
    clusters = [sorted(c, key=lambda i: frames[i].temporal) for c in clusters]
    for c in clusters:
        keys = [frames[i].temporal[:5] for i in c]
        if len(set(keys)) < len(keys):
            where = np.round(positions[c[0]], 3).tolist()
            raise DicomError(
                f"{label}: {len(c)} images at slice position {where} share their temporal identifiers "
                "(TemporalPosition, AcquisitionNumber, TriggerTime, DimensionIndexValues, InstanceNumber); "
                "cannot order them in time"
            )
    for c in clusters:
        spread = float(np.max(np.linalg.norm(positions[c] - positions[c[0]], axis=1)))
        if spread > 0.05:
            raise DicomError(
                f"{label}: images at the same slice position have origins up to {spread:.3f} mm apart in-plane; "
                "inconsistent geometry"
            )
    if n_t > 1:
        notes.append(_check_time_order(frames, clusters, label))
    reps = positions[[c[0] for c in clusters]]
    nominal = frames[0].thickness or 1.0
    try:
        layout = geom.analyse_slice_positions(reps, normal, spacing, nominal)
    except ValueError as exc:
        raise DicomError(f"{label}: {exc}") from None
    warnings_ += layout.warnings
    if n_z == 1 and not frames[0].thickness:
        notes.append(
            "single slice without SliceThickness: the affine uses a nominal 1 mm thickness"
        )
    ordered = [frames[c[t]] for t in range(n_t) for c in clusters]
    lead = tuple(n for n in (n_t, n_z) if n > 1)
    dims = tuple(d for d, n in (("t", n_t), ("z", n_z)) if n > 1) + ("y", "x")
    spatial = {"z": layout.spacing, "y": spacing[0], "x": spacing[1]}
    step_t, note_t = _time_step(files[frames[0].file]) if n_t > 1 else (0.0, None)
    if note_t:
        notes.append(note_t)
    values = tuple(step_t if d == "t" else spatial[d] for d in dims)
    affine = geom.affine_ras(row, col, spacing, layout.step, reps[0])
    return [
        _Plan(
            ordered,
            lead,
            dims,
            values,
            affine,
            np.array([f.position for f in ordered]),
            key,
            warnings_,
            [n for n in notes if n],
            _offsets(layout) if layout.nonuniform else None,
        )
    ]


def _offsets(layout: geom.SliceLayout) -> list[float]:
    return [0.0] + [float(v) for v in np.cumsum(layout.gaps)]


def _check_time_order(frames: list[_Frame], clusters: list[list[int]], label: str) -> str:
    """Validate that the t-th image at every position belongs to the same volume."""
    for slot, name in ((0, "TemporalPositionIdentifier/Index"), (1, "AcquisitionNumber")):
        per_position = [[frames[i].check[slot] for i in c] for c in clusters]
        usable = all(None not in vals and len(set(vals)) == len(vals) for vals in per_position)
        if not usable:
            continue
        first = per_position[0]
        for vals, c in zip(per_position, clusters):
            if vals != first:
                where = frames[c[0]].position
                raise DicomError(
                    f"{label}: the images at slice position {np.round(where, 3).tolist()} have {name} {vals}, "
                    f"other positions {first}; the 4-D series is incomplete or inconsistent"
                )
        return f"time order from {name}"
    return "time order from TriggerTime / DimensionIndexValues / InstanceNumber (no per-volume identifier)"


def _time_step(info: _FileInfo) -> tuple[float, str | None]:
    ds = info.ds
    tr = _float(ds, "RepetitionTime")
    if tr is None:
        item = _fg(info.shared_group(), None, "MRTimingAndRelatedParametersSequence",
                   "RepetitionTime")
        tr = _float(item, "RepetitionTime")
    if tr:
        return tr / 1000.0, "t spacing is RepetitionTime"
    frame_time = _float(ds, "FrameTime")
    if frame_time:
        return frame_time / 1000.0, "t spacing is FrameTime"
    return 1.0, "t spacing unknown; 1.0 s recorded"


def _plan_frames(frames: list[_Frame], files: list[_FileInfo], label: str) -> _Plan:
    """Plan a single file's frames that have no per-frame position."""
    info = files[frames[0].file]
    ds = info.ds
    frames = sorted(frames, key=lambda f: f.index)
    spacing, warnings_, notes = _in_plane_spacing(frames[0])
    ipp = _floats(ds, "ImagePositionPatient", 3)
    row = col = normal = None
    if frames[0].iop:
        try:
            row, col, normal = geom.direction_cosines(frames[0].iop)
        except ValueError as exc:
            warnings_.append(f"ImageOrientationPatient ignored: {exc}")
    if row is None:
        po = _strings(ds, "PatientOrientation")
        cosines = geom.cosines_from_patient_orientation(po)
        if cosines:
            row, col = cosines
            warnings_.append(
                f"no ImageOrientationPatient: nominal orientation from PatientOrientation {'/'.join(po)}"
                + ("" if ipp else ", origin 0")
            )
        else:
            row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
            warnings_.append(
                "no patient geometry: identity orientation"
                + ("" if ipp else " and origin 0")
                + " (nominal affine)"
            )
        normal = np.cross(row, col)
    elif not ipp:
        warnings_.append("no ImagePositionPatient: origin 0 (nominal affine)")
    thickness = frames[0].thickness or 1.0
    affine = geom.affine_ras(
        row, col, spacing, normal * thickness, np.asarray(ipp or (0.0, 0.0, 0.0))
    )
    n = len(frames)
    if n == 1:
        lead: tuple[int, ...] = ()
        dims: tuple[str, ...] = ("y", "x")
        values: tuple[float, ...] = spacing
    else:
        axis = "t" if frames[0].temporal_axis else "frame"
        lead, dims = (n,), (axis, "y", "x")
        if axis == "t":
            step, note = _time_step(info)
            notes.append(note or "")
        else:
            step = 1.0
            increments = [
                _tag_keyword(t) or str(t) for t in _multi(_get(ds, "FrameIncrementPointer"))
            ]
            notes.append(
                "frames kept in file order on a 'frame' axis"
                + (f" (FrameIncrementPointer: {', '.join(increments)})" if increments else "")
                + "; they are not known to be slices or time points"
            )
        values = (step,) + spacing
    return _Plan(
        frames,
        lead,
        dims,
        values,
        affine,
        None,
        _stack_key(frames),
        warnings_,
        [n for n in notes if n],
    )
