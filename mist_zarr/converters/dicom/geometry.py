"""Pure-numpy DICOM geometry: direction cosines, slice layout, affines, mosaics.

World coordinates in DICOM are patient LPS millimetres; the affines built here
are RAS+ (NIfTI/nibabel convention) and map the homogeneous voxel index
``(i, j, k, 1)`` with ``i`` = column (last array axis), ``j`` = row and
``k`` = slice to millimetres.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: Converts homogeneous LPS coordinates to RAS+ (flips the first two axes).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Positions closer than this along the slice normal are the same slice (mm).
SAME_POSITION_TOL_MM = 0.01

#: Patient-orientation letters as LPS unit vectors (PS3.3 C.7.6.1.1.1).
_ORIENTATION_LETTERS = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0),
    "F": (0.0, 0.0, -1.0),
}


def direction_cosines(iop: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return unit row, column and slice-normal vectors for ImageOrientationPatient.

    The row vector is the direction of increasing column index, the column
    vector that of increasing row index (PS3.3 C.7.6.2.1.1); the normal is
    their cross product. Raises ValueError unless the cosines are (nearly)
    unit length and orthogonal.
    """
    v = np.asarray(iop, dtype=np.float64)
    if v.shape != (6,) or not np.all(np.isfinite(v)):
        raise ValueError(f"ImageOrientationPatient must be 6 finite numbers, got {list(iop)}")
    row, col = v[:3], v[3:]
    nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if abs(nr - 1.0) > 0.01 or abs(nc - 1.0) > 0.01:
        raise ValueError(
            f"ImageOrientationPatient cosines are not unit vectors (|row|={nr:.4f}, |col|={nc:.4f})"
        )
    row, col = row / nr, col / nc
    dot = float(row @ col)
    if abs(dot) > 0.01:
        raise ValueError(
            f"ImageOrientationPatient row and column cosines are not orthogonal (dot={dot:.4f})"
        )
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def cosines_from_patient_orientation(
    po: Sequence[str] | None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Return LPS row/column unit vectors for PatientOrientation (e.g. ['L', 'F']), or None.

    Each value is one or more of the letters L R A P H F; a value made of
    several letters (e.g. 'LF') is the normalised sum. Returns None when the
    value is missing, malformed or the two directions are not orthogonal.
    """
    if po is None or isinstance(po, str) or len(po) != 2:
        return None
    vectors = []
    for value in po:
        text = str(value).strip().upper()
        if not text or any(ch not in _ORIENTATION_LETTERS for ch in text):
            return None
        vec = np.sum([_ORIENTATION_LETTERS[ch] for ch in text], axis=0)
        norm = float(np.linalg.norm(vec))
        if norm < 1e-6:
            return None
        vectors.append(vec / norm)
    row, col = vectors
    if abs(float(row @ col)) > 1e-6:
        return None
    return row, col


def affine_ras(
    row: np.ndarray,
    col: np.ndarray,
    pixel_spacing: tuple[float, float],
    slice_step: np.ndarray,
    origin: np.ndarray,
) -> np.ndarray:
    """Return the 4x4 RAS+ affine for (i=column, j=row, k=slice) voxel indices.

    ``pixel_spacing`` is DICOM PixelSpacing order: (between rows, between
    columns). ``slice_step`` is the LPS vector from one slice to the next and
    ``origin`` the LPS centre of the first voxel of the first slice.
    """
    row_spacing, col_spacing = pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(row, float) * col_spacing
    lps[:3, 1] = np.asarray(col, float) * row_spacing
    lps[:3, 2] = np.asarray(slice_step, float)
    lps[:3, 3] = np.asarray(origin, float)
    return LPS_TO_RAS @ lps


def cluster_positions(distances: np.ndarray, tol: float = SAME_POSITION_TOL_MM) -> list[np.ndarray]:
    """Group indices of ``distances`` whose values lie within ``tol`` of their neighbour.

    Returns index arrays ordered by ascending distance; indices within a
    group are in ascending (input) order.
    """
    d = np.asarray(distances, dtype=np.float64)
    order = np.argsort(d, kind="stable")
    groups: list[list[int]] = []
    last = -math.inf
    for idx in order:
        if groups and d[idx] - last <= tol:
            groups[-1].append(int(idx))
        else:
            groups.append([int(idx)])
        last = d[idx]
    return [np.asarray(sorted(g), dtype=np.intp) for g in groups]


@dataclass
class SliceLayout:
    """Where an ordered stack of slice origins lies relative to its slice normal."""

    step: np.ndarray
    spacing: float
    gaps: np.ndarray
    tilt_deg: float
    warnings: list[str] = field(default_factory=list)
    nonuniform: bool = False  # gaps differ beyond the tolerance: no one affine is exact


def analyse_slice_positions(
    positions: np.ndarray,
    normal: np.ndarray,
    pixel_spacing: tuple[float, float],
    nominal_thickness: float,
) -> SliceLayout:
    """Describe slice origins (N x 3 LPS, sorted ascending along ``normal``).

    Returns the mean slice step vector (first to last / (N-1); the normal
    times ``nominal_thickness`` when N == 1), the mean distance between slice
    planes, and warnings for non-uniform spacing, suspected missing slices
    and gantry tilt (slice step not parallel to the normal: the affine then
    carries the shear). Raises ValueError when the origins are not collinear
    or two slices share a position, because no single affine describes them.
    """
    p = np.asarray(positions, dtype=np.float64)
    n = np.asarray(normal, dtype=np.float64)
    if p.shape[0] == 1:
        return SliceLayout(
            step=n * nominal_thickness,
            spacing=float(nominal_thickness),
            gaps=np.zeros(0),
            tilt_deg=0.0,
        )
    d = p @ n
    gaps = np.diff(d)
    if np.any(gaps <= SAME_POSITION_TOL_MM):
        raise ValueError("two slices share a position along the slice normal")
    step = (p[-1] - p[0]) / (p.shape[0] - 1)
    along = float(step @ n)
    spacing = along
    # Collinearity: each origin must lie on the line p0 + s * step.
    expected = p[0] + np.outer((d - d[0]) / along, step)
    residual = float(np.max(np.linalg.norm(p - expected, axis=1)))
    line_tol = max(0.05, 0.02 * min(pixel_spacing))
    if residual > line_tol:
        raise ValueError(
            f"slice origins are not collinear (off the first-to-last line by up to {residual:.3f} mm); "
            "the slices do not form one regular volume"
        )
    warnings: list[str] = []
    cos_tilt = min(1.0, abs(along) / float(np.linalg.norm(step)))
    tilt = math.degrees(math.acos(cos_tilt))
    if tilt > 0.05:
        warnings.append(
            f"gantry tilt / sheared stack: slice positions advance {tilt:.3f} deg off the slice normal; "
            "the affine carries the shear (the voxel grid is not orthogonal) and no resampling was done"
        )
    median = float(np.median(gaps))
    deviation = float(np.max(np.abs(gaps - median)))
    if deviation > max(0.01, 0.001 * median):
        missing = int(sum(max(0, round(g / median) - 1) for g in gaps if g > 1.5 * median))
        text = (
            f"non-uniform slice spacing: gaps between {float(gaps.min()):.4f} and {float(gaps.max()):.4f} mm "
            f"(median {median:.4f} mm); the true positions are the z coordinate of open(), "
            f"the affine with the mean spacing {spacing:.4f} mm is nominal only, and NIfTI "
            "export is refused (NIfTI has one spacing)"
        )
        if missing:
            text += (f"; about {missing} slice(s) appear to be missing (or the spacing "
                     "changes along the stack)")
        warnings.append(text)
    return SliceLayout(step=step, spacing=spacing, gaps=gaps, tilt_deg=tilt, warnings=warnings,
                       nonuniform=deviation > max(0.01, 0.001 * median))


def mosaic_grid(n_images: int, rows: int, cols: int) -> tuple[int, int, int]:
    """Return (tiles per side, tile rows, tile columns) of a Siemens mosaic.

    Siemens tiles ``n_images`` slices row-major on a ceil(sqrt(n)) square
    grid. Raises ValueError if the frame does not divide into that grid.
    """
    if n_images < 1:
        raise ValueError(f"NumberOfImagesInMosaic must be positive, got {n_images}")
    side = math.ceil(math.sqrt(n_images))
    if rows % side or cols % side:
        raise ValueError(f"a {rows}x{cols} frame does not divide into a {side}x{side} mosaic")
    return side, rows // side, cols // side


def mosaic_origin(
    mosaic_position: np.ndarray,
    row: np.ndarray,
    col: np.ndarray,
    pixel_spacing: tuple[float, float],
    mosaic_shape: tuple[int, int],
    tile_shape: tuple[int, int],
) -> np.ndarray:
    """Return the LPS origin of the first tile given the mosaic's ImagePositionPatient.

    Siemens writes the position of a virtual image as large as the whole
    mosaic, centred on the true slice; shift by half the size difference.
    """
    row_spacing, col_spacing = pixel_spacing
    d_cols = (mosaic_shape[1] - tile_shape[1]) / 2.0
    d_rows = (mosaic_shape[0] - tile_shape[0]) / 2.0
    return (
        np.asarray(mosaic_position, float) + row * col_spacing * d_cols + col * row_spacing * d_rows
    )
