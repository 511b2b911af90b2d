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

__all__ = ["SEG_SOP_CLASS", "is_seg", "read_seg", "seg_on_instances", "sop_class", "write_seg"]

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


# SegmentedPropertyCategory/Type when the source named none: SNOMED CT "Tissue",
# the generic code DICOM's examples and dcmqi use for an unnamed structure.
_TISSUE = ("85756007", "SCT", "Tissue")


def _code(record: dict[str, Any] | None, hd: Any) -> Any:
    code = (record or {}).get("property") or {}
    value, scheme, meaning = (code.get("code"), code.get("scheme"), code.get("meaning"))
    if not (value and scheme and meaning):
        value, scheme, meaning = _TISSUE
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def write_seg(labels: np.ndarray, dims: tuple[str, ...], segments: list[dict[str, Any]],
              source_images: list[Any], out: str, *, series_description: str) -> list[str]:
    """Write ``labels`` (``(z, y, x)`` label values, or ``(segment, z, y, x)`` one channel
    per segment) as a binary DICOM SEG referencing ``source_images`` (one dataset per
    ``z``, in ``z`` order). Returns notes for the export result.

    DICOM numbers segments 1, 2, 3 ...; label values are renumbered in ascending
    order, and each segment's label says which value it was.
    """
    hd = _highdicom()
    if dims == ("segment", "z", "y", "x"):
        channels = labels.max(axis=(1, 2, 3))  # each channel holds one value (or none)
        values = [int(v) for v in channels]
        masks = np.moveaxis(labels != 0, 0, -1)  # (z, y, x, segment)
    elif dims == ("z", "y", "x"):
        values = [int(v) for v in np.unique(labels) if v != 0]
        masks = np.stack([labels == v for v in values], axis=-1) if values else None
    else:
        raise ConversionError(f"{out}: a DICOM SEG holds (z, y, x) label maps, found dims {dims}")
    if not values:
        raise ConversionError(f"{out}: the label map is empty at this level: no segment to write")
    if len(source_images) != masks.shape[0]:
        raise ConversionError(f"{out}: {masks.shape[0]} mask slices but {len(source_images)} "
                              "image slices to reference")
    by_value = {int(r.get("value", -1)): r for r in segments}
    descriptions = []
    for number, value in enumerate(values, start=1):
        record = by_value.get(value)
        name = str((record or {}).get("name") or f"label {value}")
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64],
            segmented_property_category=_code(record, hd),
            segmented_property_type=_code(record, hd),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            tracking_id=f"mist-zarr label value {value}", tracking_uid=hd.UID()))
    try:
        seg = hd.seg.Segmentation(
            source_images=source_images, pixel_array=masks.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="mist-zarr",
            manufacturer_model_name="mist-zarr", software_versions="mist-zarr",
            device_serial_number="0", series_description=series_description[:64],
            omit_empty_frames=True)
    except Exception as exc:
        raise ConversionError(f"{out}: highdicom could not build the SEG: {exc}") from exc
    seg.save_as(out)
    renumbered = [f"{v}->{n}" for n, v in enumerate(values, start=1) if v != n]
    notes = [f"{len(values)} segment(s), binary SEG over the {len(source_images)} image slices"]
    if renumbered:
        notes.append("label values renumbered to DICOM segment numbers (value->number): "
                     + ", ".join(renumbered) + "; each segment's TrackingID keeps its value")
    return notes
