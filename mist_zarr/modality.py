"""Modality values (Hounsfield units for CT): the stored rescale slope and intercept, applied.

Stored samples are the source's stored values, bit-exact; the rescale that
turns them into physical values is kept as metadata: DICOM RescaleSlope
(0028,1053) and RescaleIntercept (0028,1052), in the series' common
attributes, per slice, or in the enhanced multi-frame functional groups
(Pixel Value Transformation Sequence (0028,9145), shared or per frame), and
NIfTI ``scl_slope`` / ``scl_inter`` (a slope of 0 or NaN means "unscaled", as
the NIfTI standard says). Images without one (PNG, arrays) have slope 1 and
intercept 0.

DICOM values are the display values ``stored * RescaleSlope + RescaleIntercept``
(PS3.3 C.11.1). Philips MR files also carry a private scale slope SS
(2005,xx0E of the creator "Philips MR Imaging DD 001"); asked for
``philips="precise"``, :func:`find_rescale` returns Philips' floating-point
values ``(stored * RS + RI) / (RS * SS)`` instead (dcm2niix's default for
NIfTI; Chenevert et al. 2014, PMC3998685).

The result dtype depends on the image's dtype only, so that every image of
a dataset comes back in the same dtype whatever its rescale:

* 8- and 16-bit integer (and bool) images -> ``float32``. Exact whenever the
  slope and intercept are integers and the results stay within +-2**24
  (CT: slope 1, intercept -1024); otherwise rounded once from float64.
* 32-bit integer and ``float64`` images -> ``float64``; ``float32`` -> ``float32``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["PHILIPS", "PHILIPS_SCALINGS", "Rescale", "find_rescale", "find_window",
           "rescaled_dtype"]

SLOPE, INTERCEPT = "00281053", "00281052"
SHARED_GROUPS, PIXEL_VALUE_TRANSFORMATION = "52009229", "00289145"
CENTRE, WIDTH, FRAME_VOI_LUT = "00281050", "00281051", "00289132"
PER_FRAME = "PerFrameFunctionalGroupsSequence"
PER_SLICE = "dicom_per_slice"
MANUFACTURER = "00080070"
PHILIPS_CREATOR, PHILIPS_GROUP, PHILIPS_SCALE_SLOPE = "Philips MR Imaging DD 001", "2005", 0x0E
#: what ``find_rescale(philips=...)`` accepts: Philips floating-point values, or DICOM display values
PHILIPS_SCALINGS = ("precise", "display")
PHILIPS = "philips precise"  # how a Philips precise Rescale's ``source`` begins


def rescaled_dtype(dtype: Any) -> np.dtype:
    """The dtype :meth:`Rescale.apply` returns for an image of ``dtype`` (see the module doc)."""
    dt = np.dtype(dtype)
    if dt.kind == "b" or (dt.kind in "iu" and dt.itemsize <= 2) or dt == np.float32:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


@dataclass(frozen=True)
class Rescale:
    """``value = stored * slope + intercept``; per slice when ``slope``/``intercept`` are
    arrays over the image's leading (non-plane) axes."""

    slope: float | np.ndarray
    intercept: float | np.ndarray
    source: str  # where the numbers came from, for attrs and messages

    @property
    def per_slice(self) -> bool:
        return np.ndim(self.slope) > 0 or np.ndim(self.intercept) > 0

    @property
    def varies(self) -> bool:
        """True when the slope or the intercept differs between slices."""
        return any(np.ndim(v) > 0 and np.unique(np.asarray(v)).size > 1
                   for v in (self.slope, self.intercept))

    @property
    def identity(self) -> bool:
        return bool(np.all(np.asarray(self.slope) == 1) and np.all(np.asarray(self.intercept) == 0))

    def uniform(self) -> Rescale:
        """The same rescale with per-slice values that do not vary collapsed to one value."""
        if not self.per_slice or self.varies:
            return self
        return Rescale(float(np.asarray(self.slope).flat[0]),
                       float(np.asarray(self.intercept).flat[0]), self.source)

    def apply(self, values: np.ndarray, leading: Sequence[slice | int] = ()) -> np.ndarray:
        """Rescaled ``values``; ``leading`` selects the slices of per-slice values
        (the region's indices along the axes before ``y``)."""
        out = np.dtype(rescaled_dtype(values.dtype))
        slope, intercept = (self._pick(v, leading, values.ndim)
                            for v in (self.slope, self.intercept))
        if np.all(slope == 1) and np.all(intercept == 0):
            return values.astype(out)
        work = np.float64 if out == np.float64 or not _exact32(slope, intercept) else np.float32
        result = values.astype(work) * np.asarray(slope, work) + np.asarray(intercept, work)
        return result.astype(out, copy=False)

    @staticmethod
    def _pick(v: float | np.ndarray, leading: Sequence[slice | int], ndim: int) -> Any:
        if np.ndim(v) == 0:
            return v
        v = np.asarray(v)[tuple(leading)] if leading else np.asarray(v)
        return v.reshape(v.shape + (1,) * (ndim - v.ndim))

    def to_json(self) -> dict[str, Any]:
        as_list = (lambda v: np.asarray(v).tolist())
        return {"slope": as_list(self.slope), "intercept": as_list(self.intercept),
                "source": self.source}


def _exact32(slope: Any, intercept: Any) -> bool:
    """float32 arithmetic is exact for 16-bit samples times an integral slope <= 128
    plus an integral intercept <= 2**15 (every result below 2**24)."""
    s, i = np.asarray(slope, np.float64), np.asarray(intercept, np.float64)
    return bool(np.all(s == np.round(s)) and np.all(i == np.round(i))
                and np.all(np.abs(s) <= 128) and np.all(np.abs(i) <= 1 << 15))


def find_rescale(metadata: Mapping[str, Any], leading_shape: Sequence[int],
                 per_slice: Callable[[], Mapping[str, Any]] | None = None, *,
                 philips: str = "display") -> Rescale:
    """The rescale recorded in an image's metadata (identity when there is none).

    ``leading_shape`` is the image's shape before ``y`` (slices); per-slice
    values must have one entry per slice. ``per_slice`` loads the bulky
    per-slice metadata (``dicom_per_slice``) when the common attributes have
    no rescale (or, for ``philips="precise"``, no Philips scale slope); it is
    only called then. ``philips``: ``"display"`` (DICOM display values, the
    default) or ``"precise"`` (Philips floating-point values where the private
    scale slope is present; display values elsewhere).
    """
    if philips not in PHILIPS_SCALINGS:
        raise ValueError(f"philips must be one of {PHILIPS_SCALINGS}, found {philips!r}")
    if per_slice is not None:  # loaded at most once, for the rescale and the Philips slope
        per_slice = functools.cache(per_slice)
    display = _display_rescale(metadata, leading_shape, per_slice)
    if philips == "display":
        return display
    scale = _philips_scale_slope(metadata, leading_shape, per_slice)
    if scale is None or not np.all(np.asarray(display.slope) != 0):
        return display
    rs, ri = np.asarray(display.slope, np.float64), np.asarray(display.intercept, np.float64)
    slope, intercept = 1.0 / scale + 0 * rs, ri / (rs * scale)
    as_value = (lambda v: float(v) if np.ndim(v) == 0 else v)
    return Rescale(as_value(slope), as_value(intercept),
                   f"{PHILIPS} (stored*RescaleSlope+RescaleIntercept)/"
                   "(RescaleSlope*ScaleSlope 2005,100E)" + (" per slice" if np.ndim(slope) else ""))


def _philips_scale_slope(metadata: Mapping[str, Any], leading_shape: Sequence[int],
                         per_slice: Callable[[], Mapping[str, Any]] | None
                         ) -> float | np.ndarray | None:
    """Philips' private scale slope SS: one value, one per slice, or None when absent
    (not a Philips file, no slope, or a slope of 0 / not finite on any slice)."""
    dicom = metadata.get("dicom")
    if not isinstance(dicom, Mapping) or "PHILIPS" not in str(
            (_item_values(dicom, MANUFACTURER) or [""])[0]).upper():
        return None
    found = _philips_in(dicom)
    if found is not None:
        return found if math.isfinite(found) and found != 0 else None
    bulky = per_slice() if per_slice is not None and metadata.get("slice_metadata") else {}
    table = bulky.get(PER_SLICE, {}) if isinstance(bulky, Mapping) else {}
    column = _philips_column(dicom, table)
    n = int(np.prod(leading_shape)) if leading_shape else 1
    if column is None or len(column) != n or any(v is None for v in column):
        return None  # not on every slice: display values, as for any other file
    values = np.asarray(column, np.float64).reshape(tuple(leading_shape))
    return values if np.all(np.isfinite(values)) and np.all(values != 0) else None


def _philips_column(dicom: Mapping[str, Any], table: Mapping[str, Any]) -> list[Any] | None:
    """Per-slice Philips scale slopes: a varying private attribute, or one per enhanced frame."""
    tag = _philips_tag(dicom)
    if tag is not None and tag in table:
        return [_first(v, 0.0) if v not in (None, []) else None for v in table[tag]]
    frames = table.get(PER_FRAME)
    if frames:
        return [_philips_in((f or [{}])[0]) for f in frames]
    return None


def _philips_tag(ds: Mapping[str, Any]) -> str | None:
    """The tag ``2005xx0E`` of the scale slope in the Philips creator's block of ``ds``."""
    for tag, element in ds.items():
        if (len(tag) == 8 and tag.startswith(PHILIPS_GROUP + "00") and 0x10 <= int(tag[4:], 16) <= 0xFF
                and isinstance(element, Mapping)
                and [str(v).strip() for v in element.get("Value") or []] == [PHILIPS_CREATOR]):
            return f"{PHILIPS_GROUP}{int(tag[4:], 16):02X}{PHILIPS_SCALE_SLOPE:02X}"
    return None


def _philips_in(ds: Mapping[str, Any], depth: int = 2) -> float | None:
    """The Philips scale slope in a DICOM JSON dataset or, ``depth`` levels down, its sequences."""
    tag = _philips_tag(ds)
    if tag is not None and tag in ds:
        values = _item_values(ds, tag)
        return float(values[0]) if values and values[0] is not None else None
    if depth:
        for element in ds.values():
            if isinstance(element, Mapping) and element.get("vr") == "SQ":
                for item in element.get("Value") or []:
                    if isinstance(item, Mapping) and (v := _philips_in(item, depth - 1)) is not None:
                        return v
    return None


def _item_values(ds: Mapping[str, Any], tag: str) -> list[Any]:
    element = ds.get(tag)
    return list(element.get("Value") or []) if isinstance(element, Mapping) else []


def _display_rescale(metadata: Mapping[str, Any], leading_shape: Sequence[int],
                     per_slice: Callable[[], Mapping[str, Any]] | None) -> Rescale:
    """DICOM display values ``stored * RescaleSlope + RescaleIntercept`` (see find_rescale)."""
    nifti = metadata.get("nifti")
    if isinstance(nifti, Mapping):
        slope, inter = nifti.get("scl_slope"), nifti.get("scl_inter")
        if slope is None or not math.isfinite(float(slope)) or float(slope) == 0:
            return Rescale(1.0, 0.0, "none")
        inter = 0.0 if inter is None or not math.isfinite(float(inter)) else float(inter)
        return Rescale(float(slope), inter, "nifti scl_slope/scl_inter")
    dicom = metadata.get("dicom")
    if not isinstance(dicom, Mapping):
        return Rescale(1.0, 0.0, "none")
    shared = _item(dicom, SHARED_GROUPS, PIXEL_VALUE_TRANSFORMATION)
    common = {tag: _value(dicom, tag) if tag in dicom else _value(shared, tag)
              for tag in (SLOPE, INTERCEPT)}
    if all(v is not None for v in common.values()):
        return Rescale(common[SLOPE], common[INTERCEPT], "dicom RescaleSlope/RescaleIntercept")
    # one of them (or both) varies between slices: it is in the per-slice metadata
    bulky = per_slice() if per_slice is not None and metadata.get("slice_metadata") else {}
    table = bulky.get(PER_SLICE, {}) if isinstance(bulky, Mapping) else {}
    n = int(np.prod(leading_shape)) if leading_shape else 1
    frames = [_item((f or [{}])[0], PIXEL_VALUE_TRANSFORMATION) for f in table.get(PER_FRAME, [])]
    columns = {}
    for tag, keyword, default in ((SLOPE, "RescaleSlope", 1.0), (INTERCEPT, "RescaleIntercept", 0.0)):
        if common[tag] is not None:
            columns[tag] = [common[tag]] * n
        elif keyword in table:
            columns[tag] = [_first(v, default) for v in table[keyword]]
        elif frames:
            columns[tag] = [_value(f, tag, default) for f in frames]
        else:
            columns[tag] = [default] * n
    if all(common[t] is None for t in columns) and not (
            {"RescaleSlope", "RescaleIntercept"} & set(table) or frames):
        return Rescale(1.0, 0.0, "none")
    for values in columns.values():
        if len(values) != n:
            raise ValueError(f"per-slice rescale has {len(values)} entries for {n} slices "
                             f"(shape {tuple(leading_shape)}): the metadata does not match the "
                             "image")
    shape = tuple(leading_shape)
    return Rescale(np.array(columns[SLOPE], np.float64).reshape(shape),
                   np.array(columns[INTERCEPT], np.float64).reshape(shape),
                   "dicom RescaleSlope/RescaleIntercept per slice")


def _value(ds: Mapping[str, Any], tag: str, default: float | None = None) -> float | None:
    """First value of a numeric attribute of a DICOM JSON dataset (``default`` if absent)."""
    if tag not in ds:
        return default
    fallback = default if default is not None else (1.0 if tag == SLOPE else 0.0)
    return _first((ds.get(tag) or {}).get("Value"), fallback)


def _first(value: Any, default: float) -> float:
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None or value == "" else float(value)


def _item(ds: Mapping[str, Any], *tags: str) -> Mapping[str, Any]:
    """The first item down a chain of sequence tags (empty when any is missing)."""
    for tag in tags:
        items = (ds.get(tag) or {}).get("Value") or [{}]
        ds = items[0] if isinstance(items[0], Mapping) else {}
    return ds


def find_window(metadata: Mapping[str, Any], leading_shape: Sequence[int],
                per_slice: Callable[[], Mapping[str, Any]] | None = None
                ) -> tuple[np.ndarray, np.ndarray] | None:
    """The DICOM VOI window (WindowCenter, WindowWidth) of every slice, in modality values,
    as two arrays of ``leading_shape``; None when the image has none.

    Looked up as :func:`find_rescale` looks up the rescale: the common attributes,
    the enhanced shared functional groups (FrameVOILUTSequence 0028,9132), then
    the per-slice metadata (a varying attribute, or each frame's functional
    groups; ``per_slice`` loads it). Where several windows are given, the first
    (the one a viewer opens with).
    """
    dicom = metadata.get("dicom")
    if not isinstance(dicom, Mapping):
        return None
    shape = tuple(leading_shape)
    n = int(np.prod(shape)) if shape else 1
    shared = _item(dicom, SHARED_GROUPS, FRAME_VOI_LUT)
    for ds in (dicom, shared):
        centre, width = _value(ds, CENTRE, math.nan), _value(ds, WIDTH, math.nan)
        if CENTRE in ds and WIDTH in ds and math.isfinite(centre) and math.isfinite(width):
            return np.full(shape, centre), np.full(shape, width)
    bulky = per_slice() if per_slice is not None and metadata.get("slice_metadata") else {}
    table = bulky.get(PER_SLICE, {}) if isinstance(bulky, Mapping) else {}
    if "WindowCenter" in table and "WindowWidth" in table:
        columns = [[_first(v, math.nan) for v in table[k]] for k in ("WindowCenter", "WindowWidth")]
    elif table.get(PER_FRAME):
        frames = [_item((f or [{}])[0], FRAME_VOI_LUT) for f in table[PER_FRAME]]
        columns = [[_value(f, tag, math.nan) for f in frames] for tag in (CENTRE, WIDTH)]
    else:
        return None
    centre, width = (np.asarray(c, np.float64) for c in columns)
    if centre.size != n or width.size != n or not (np.all(np.isfinite(centre))
                                                     and np.all(np.isfinite(width))):
        return None  # not on every slice: no window rather than a wrong one
    return centre.reshape(shape), width.reshape(shape)
