"""DICOM Segmentation (SEG) objects as label maps, read through highdicom.

A SEG is laid onto its referenced image's slices by SOPInstanceUID
(``get_pixels_by_source_instance``), in the stored image's slice order, so
it needs no geometry of its own. Segments that never overlap become one label
map whose values are the segment numbers; overlapping segments are kept, one
channel per segment (dims ``segment, z, y, x``, each channel holding 0 or its
segment number). A fractional SEG is refused: its values are probabilities or
occupancies, not labels, and thresholding them would be a choice the source
never made.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import ConversionError
from ..base import missing_dependency

__all__ = ["SEG_SOP_CLASS", "is_seg", "sop_class", "read_seg", "seg_on_instances"]

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def sop_class(path: str) -> str:
    """The SOPClassUID of the DICOM file at ``path`` ("" if unreadable; header only)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:
        return ""
    return str(ds.get("SOPClassUID", ""))


def is_seg(path: str) -> bool:
    """True if the DICOM file at ``path`` is a Segmentation object (header only)."""
    return sop_class(path) == SEG_SOP_CLASS


def _highdicom() -> Any:
    try:
        import highdicom
    except ImportError as exc:
        raise missing_dependency("highdicom") from exc
    return highdicom


def read_seg(path: str) -> Any:
    """The SEG at ``path`` as a ``highdicom.seg.Segmentation``; refuses fractional SEGs."""
    hd = _highdicom()
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:
        raise ConversionError(f"{path}: not a readable DICOM SEG: {exc}") from exc
    if seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL:
        raise ConversionError(
            f"{path}: fractional SEG (values are {seg.SegmentationFractionalType.lower()} in "
            "[0, 1], not labels): refused; a label map would need a threshold the source "
            "does not give")
    return seg


def referenced_series(seg: Any) -> str | None:
    refs = getattr(seg, "ReferencedSeriesSequence", None) or []
    return str(refs[0].SeriesInstanceUID) if refs else None


def segment_records(seg: Any) -> list[dict[str, Any]]:
    out = []
    for item in seg.SegmentSequence:
        record = {"value": int(item.SegmentNumber), "name": str(item.SegmentLabel)}
        for key in ("SegmentDescription", "SegmentAlgorithmType"):
            if key in item:
                record[key] = str(item.get(key))
        category = item.get("SegmentedPropertyTypeCodeSequence")
        if category:
            record["property"] = {"code": str(category[0].CodeValue),
                                  "scheme": str(category[0].CodingSchemeDesignator),
                                  "meaning": str(category[0].CodeMeaning)}
        out.append(record)
    return out


def seg_on_instances(seg: Any, sop_uids: list[str], *, where: str
                     ) -> tuple[np.ndarray, tuple[str, ...], list[str]]:
    """The SEG on the slices ``sop_uids`` (the image's order): data, dims and notes."""
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    missing = referenced - set(sop_uids)
    if missing:
        raise ConversionError(f"{where}: the SEG refers to {len(missing)} instance(s) that are "
                              f"not slices of its image (e.g. {sorted(missing)[0]})")
    try:
        per_segment = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(sop_uids), combine_segments=False,
            assert_missing_frames_are_empty=True)
    except Exception as exc:
        raise ConversionError(f"{where}: SEG frames could not be laid onto the image: "
                              f"{exc}") from exc
    numbers = [int(n) for n in seg.segment_numbers]
    masks = np.asarray(per_segment).astype(bool)  # (slices, rows, cols, segments)
    overlap = bool((masks.sum(axis=-1) > 1).any())
    dtype = np.uint8 if max(numbers) < 256 else np.uint16
    if not overlap:
        data = np.zeros(masks.shape[:3], dtype)
        for i, n in enumerate(numbers):
            data[masks[..., i]] = n
        return data, ("z", "y", "x"), []
    data = np.stack([np.where(masks[..., i], n, 0).astype(dtype)
                     for i, n in enumerate(numbers)])
    return data, ("segment", "z", "y", "x"), [
        f"segments overlap: kept as {len(numbers)} channels (axis 'segment', one per segment "
        "number) instead of one label map"]


def seg_own_geometry(seg: Any, *, where: str
                     ) -> tuple[np.ndarray, tuple[str, ...], np.ndarray, tuple[float, ...], list[str]]:
    """The SEG as a volume of its own frames (its referenced image absent): data, dims,
    RAS affine of index ``(x, y, z)``, spacing and notes."""
    try:
        volume = seg.get_volume(combine_segments=False)
    except Exception as exc:
        raise ConversionError(f"{where}: SEG frames do not form a regular volume: {exc}") from exc
    lps = np.asarray(volume.affine, float)  # (slice, row, column) index -> LPS mm
    swap = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps @ swap
    spacing = tuple(float(np.linalg.norm(lps[:3, i])) for i in range(3))
    masks = np.asarray(volume.array).astype(bool)
    numbers = [int(n) for n in seg.segment_numbers]
    dtype = np.uint8 if max(numbers) < 256 else np.uint16
    if not (masks.sum(axis=-1) > 1).any():
        data = np.zeros(masks.shape[:3], dtype)
        for i, n in enumerate(numbers):
            data[masks[..., i]] = n
        return data, ("z", "y", "x"), affine, spacing, []
    data = np.stack([np.where(masks[..., i], n, 0).astype(dtype) for i, n in enumerate(numbers)])
    return data, ("segment", "z", "y", "x"), affine, (1.0,) + spacing, [
        f"segments overlap: kept as {len(numbers)} channels (axis 'segment')"]
