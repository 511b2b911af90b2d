"""DICOM RT Structure Sets (RTSTRUCT): contours rasterised onto the referenced image's grid.

Boundary rule: a pixel belongs to a contour when its centre lies inside the
closed polygon (``skimage.draw.polygon``); several contours of one ROI on
one slice combine by the even-odd rule (a contour inside another is a hole),
as in rt-utils and plastimatch. A contour must lie on a slice of the image
(within 1 % of the slice spacing) and inside its extent (half a pixel of
tolerance); otherwise the structure set is refused with the reason: moving a
contour onto the grid would silently change the mask. ROIs that never
overlap become one label map whose values are the ROI numbers; overlapping
ROIs are kept one channel each (axis ``segment``), as for DICOM SEG.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import ConversionError
from ..base import missing_dependency
from .seg import sop_class

__all__ = ["RTSTRUCT_SOP_CLASS", "is_rtstruct", "rasterise", "read_rtstruct"]

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
SLICE_TOLERANCE = 0.01  # of the slice spacing
EDGE_TOLERANCE = 0.5  # pixels beyond the outermost centres


def is_rtstruct(path: str) -> bool:
    """True if the DICOM file at ``path`` is an RT Structure Set (header only)."""
    return sop_class(path) == RTSTRUCT_SOP_CLASS


def read_rtstruct(path: str) -> tuple[str, list[dict[str, Any]]]:
    """(FrameOfReferenceUID, ROIs) of the structure set: each ROI ``value`` (ROI number),
    ``name`` and ``contours`` (arrays of LPS mm points)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
        frame = str(ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID)
        rois = []
        for item in ds.ROIContourSequence:
            number = int(item.ReferencedROINumber)
            contours = [np.asarray(c.ContourData, float).reshape(-1, 3)
                        for c in item.get("ContourSequence", [])]
            rois.append({"value": number, "name": names.get(number, str(number)),
                         "contours": contours})
    except Exception as exc:
        raise ConversionError(f"{path}: not a readable RT Structure Set: {exc}") from exc
    return frame, rois


def rasterise(rois: list[dict[str, Any]], affine: np.ndarray, shape: tuple[int, int, int], *,
              where: str) -> tuple[np.ndarray, tuple[str, ...], list[str]]:
    """The ROIs on the grid of an image with RAS ``affine`` (index x, y, z) and ``shape``
    (z, y, x): data, dims and notes. Raises ConversionError for off-grid contours."""
    try:
        from skimage.draw import polygon
    except ImportError as exc:
        raise missing_dependency("scikit-image") from exc
    to_index = np.linalg.inv(np.asarray(affine, float))
    nz, ny, nx = shape
    masks = np.zeros((len(rois),) + tuple(shape), bool)
    for r, roi in enumerate(rois):
        for points in roi["contours"]:
            ras = np.c_[points * [-1, -1, 1], np.ones(len(points))]
            x, y, z = (to_index @ ras.T)[:3]
            k = np.rint(z)
            if np.abs(z - k).max() > SLICE_TOLERANCE or len(np.unique(k)) != 1:
                raise ConversionError(
                    f"{where}: ROI {roi['name']!r}: a contour lies between the image's slices "
                    f"(slice index {z.min():.3f}..{z.max():.3f}); refused")
            if k[0] < 0 or k[0] >= nz or x.min() < -EDGE_TOLERANCE or \
                    x.max() > nx - 1 + EDGE_TOLERANCE or y.min() < -EDGE_TOLERANCE or \
                    y.max() > ny - 1 + EDGE_TOLERANCE:
                raise ConversionError(
                    f"{where}: ROI {roi['name']!r}: a contour lies outside the image (index x "
                    f"{x.min():.1f}..{x.max():.1f} of {nx}, y {y.min():.1f}..{y.max():.1f} of "
                    f"{ny}, slice {int(k[0])} of {nz}); refused")
            rr, cc = polygon(y, x, shape=(ny, nx))
            plane = np.zeros((ny, nx), bool)
            plane[rr, cc] = True
            masks[r, int(k[0])] ^= plane  # even-odd: an inner contour is a hole
    numbers = [int(roi["value"]) for roi in rois]
    dtype = np.uint8 if max(numbers, default=0) < 256 else np.uint16
    if not (masks.sum(axis=0) > 1).any():
        data = np.zeros(tuple(shape), dtype)
        for m, n in zip(masks, numbers):
            data[m] = n
        return data, ("z", "y", "x"), []
    data = np.stack([np.where(m, n, 0).astype(dtype) for m, n in zip(masks, numbers)])
    return data, ("segment", "z", "y", "x"), [
        f"ROIs overlap: kept as {len(numbers)} channels (axis 'segment', one per ROI number)"]
