"""The in-memory result of reading a DICOM series: one volume per stack."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..base import LazyPlanes, SourceImage


@dataclass
class DicomVolume:
    """One geometrically consistent image stack read from a DICOM series.

    ``data`` has axes ``dims`` (a subset of ``t, z, y, x`` / ``frame, y, x``
    plus a trailing ``c`` for RGB); ``spacing`` has one entry per non-``c``
    axis (mm for z/y/x, seconds for t, 1.0 per index for ``frame``);
    ``affine`` is the RAS+ 4x4 for (i=x, j=y, k=z) voxel indices. The slice
    lists in ``per_slice`` follow the stored slice order, i.e. ``data``
    flattened over its leading (t, z / frame) axes, t outermost; besides
    DICOM keywords (or ``GGGGEEEE`` tags for private attributes) they hold
    ``source_file_index`` (into ``source_files``), ``frame_index``,
    ``mosaic_tile_index`` for mosaics and ``position_lps`` (the slice origin
    used for the geometry). Nested JSON dicts may be shared between the
    volumes of one read: copy before mutating.
    """

    data: np.ndarray | LazyPlanes
    dims: tuple[str, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    metadata: dict[str, Any]
    per_slice: dict[str, list[Any]]
    per_slice_vr: dict[str, str]
    warnings: list[str]
    notes: list[str]
    source_files: list[str]
    lossy_source: bool
    photometric: str
    source_photometric: str
    transfer_syntaxes: list[str]
    series_uid: str
    stack_key: str
    modality: str
    name: str
    slice_offsets: list[float] | None = None  # see _Plan.slice_offsets

    @property
    def axis_units(self) -> tuple[str, ...]:
        """Units of ``spacing``, one per non-``c`` axis."""
        units = {"t": "s", "z": "mm", "y": "mm", "x": "mm", "frame": ""}
        return tuple(units[d] for d in self.dims if d != "c")

    def to_source_image(self) -> SourceImage:
        """Return this volume as the writer's ``SourceImage`` (DICOM JSON under ``metadata["dicom"]``)."""
        spacing = self.spacing + ((1.0,) if "c" in self.dims else ())
        metadata = {
            "dicom": self.metadata,
            "dicom_per_slice": self.per_slice,
            "dicom_per_slice_vr": self.per_slice_vr,
            "series_uid": self.series_uid,
            "stack_key": self.stack_key,
            "modality": self.modality,
            "photometric": self.photometric,
            "source_photometric": self.source_photometric,
            "transfer_syntaxes": self.transfer_syntaxes,
            "notes": self.notes,
        }
        if self.slice_offsets is not None:
            metadata["slice_offsets_mm"] = list(self.slice_offsets)
        return SourceImage(
            data=self.data,
            dims=self.dims,
            spacing=spacing,
            affine=self.affine,
            source_format="dicom",
            name=self.name,
            metadata=metadata,
            warnings=list(self.warnings),
            source_files=list(self.source_files),
            lossy_source=self.lossy_source,
        )
