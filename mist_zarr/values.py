"""Which sample values can be stored losslessly, and how.

HTJ2K codes 8/16/32-bit integers. Everything else is mapped onto one of
those only when the mapping is exact (bool, integral floats, 64-bit integers
whose values fit 32 bits) or when the user asks for quantisation, which is
recorded with its measured error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["LossyInputError", "ValueMapping", "choose_mapping", "integer_dtype_for"]

STORABLE = tuple(np.dtype(t) for t in ("uint8", "int8", "uint16", "int16", "uint32", "int32"))


class LossyInputError(ValueError):
    """The input cannot be stored losslessly and no lossy option was chosen."""


@dataclass(frozen=True)
class ValueMapping:
    """How stored integers map back to the caller's values.

    ``kind`` is ``"identity"`` (stored as given), ``"cast"`` (bool, integral
    floats or narrowed 64-bit integers: an exact cast back to ``dtype``) or
    ``"quantized"`` (``value = stored * scale + offset``, with ``max_error``
    the largest absolute difference measured at write time).
    """

    dtype: str
    stored_dtype: str
    kind: str = "identity"
    scale: float | None = None
    offset: float | None = None
    max_error: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ValueMapping":
        return cls(**data)

    def encode(self, a: np.ndarray) -> np.ndarray:
        """Caller's values -> stored integers."""
        stored = np.dtype(self.stored_dtype)
        if self.kind == "quantized":
            q = np.rint((np.asarray(a, np.float64) - self.offset) / self.scale)
            info = np.iinfo(stored)
            return np.clip(q, info.min, info.max).astype(stored)
        return np.asarray(a).astype(stored, copy=False)

    def decode(self, a: np.ndarray) -> np.ndarray:
        """Stored integers -> caller's values (exact unless ``kind == "quantized"``)."""
        if self.kind == "quantized":
            return (a * self.scale + self.offset).astype(self.dtype)
        return a.astype(self.dtype, copy=False)


def integer_dtype_for(lo: float, hi: float) -> np.dtype | None:
    """Smallest HTJ2K-codable integer dtype holding ``[lo, hi]``, unsigned first."""
    for dt in STORABLE:
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return dt
    return None


def _stats(a: Any) -> tuple[float, float, bool, bool, bool]:
    """min, max, all finite, all integral, any negative zero (dask-aware)."""
    if hasattr(a, "dask"):
        import dask
        import dask.array as da

        lo, hi, finite, integral, negzero = dask.compute(
            da.nanmin(a), da.nanmax(a), da.isfinite(a).all(),
            (a == da.trunc(a)).all(), (da.signbit(a) & (a == 0)).any(),
        )
    else:
        a = np.asarray(a)
        with np.errstate(invalid="ignore"):
            finite = bool(np.isfinite(a).all())
            lo, hi = (np.nanmin(a), np.nanmax(a)) if a.size and not np.isnan(a).all() else (0, 0)
            integral = bool((a == np.trunc(a)).all())
            negzero = bool((np.signbit(a) & (a == 0)).any())
    return float(lo), float(hi), bool(finite), bool(integral), bool(negzero)


def choose_mapping(a: Any, *, quantize: str | np.dtype | None = None, name: str = "input") -> ValueMapping:
    """Pick the lossless (or explicitly quantised) storage for array ``a``.

    Raises :class:`LossyInputError` explaining why when no exact mapping
    exists and ``quantize`` was not given.
    """
    dt = np.dtype(a.dtype)
    if dt in STORABLE and quantize is None:
        return ValueMapping(dt.name, dt.name)
    if dt == np.bool_:
        return ValueMapping("bool", "uint8", "cast")
    if dt.kind not in "iuf":
        raise TypeError(f"{name}: cannot store dtype {dt}; expected integer, bool or float samples")
    if a.size == 0:
        raise ValueError(f"{name}: cannot store an empty array of shape {tuple(a.shape)}")
    lo, hi, finite, integral, negzero = _stats(a)
    if quantize is not None:
        return _quantize(a, dt, np.dtype(quantize), lo, hi, finite, name)
    if dt.kind in "iu":
        target = integer_dtype_for(lo, hi)
        if target is None:
            raise LossyInputError(
                f"{name}: {dt} values span [{lo:.0f}, {hi:.0f}], beyond the 32-bit integers "
                "HTJ2K can code; pass quantize='int32' (or another integer dtype) to store "
                "them with a recorded rounding error"
            )
        return ValueMapping(dt.name, target.name, "cast")
    reasons = []
    if not finite:
        reasons.append("NaN or infinite values")
    elif not integral:
        reasons.append("fractional values")
    if negzero:
        reasons.append("negative zeros (-0.0 would come back as +0.0)")
    target = integer_dtype_for(lo, hi) if not reasons else None
    if target is None and not reasons:
        reasons.append(f"integral values in [{lo:g}, {hi:g}], beyond 32-bit integers")
    if reasons:
        raise LossyInputError(
            f"{name}: {dt} data cannot be stored losslessly: it has {' and '.join(reasons)}. "
            "HTJ2K codes integers only. To store it anyway, pass quantize='uint16' "
            "(or another integer dtype): values are scaled into that range and the scale, "
            "offset and measured maximum error are recorded in the metadata."
        )
    return ValueMapping(dt.name, target.name, "cast")


def _quantize(a, dt, target, lo, hi, finite, name) -> ValueMapping:
    if target not in STORABLE:
        raise ValueError(
            f"{name}: quantize must be one of {[t.name for t in STORABLE]}, found {target}"
        )
    if not finite:
        raise LossyInputError(f"{name}: cannot quantise data with NaN or infinite values")
    info = np.iinfo(target)
    span = hi - lo
    scale = span / (float(info.max) - float(info.min)) if span > 0 else 1.0
    offset = lo - float(info.min) * scale
    probe = ValueMapping(dt.name, target.name, "quantized", scale, offset)
    if hasattr(a, "dask"):
        import dask.array as da

        err = da.map_blocks(
            lambda b: np.abs(probe.decode(probe.encode(b)).astype(np.float64) - b).max(keepdims=True)
            .reshape((1,) * b.ndim), a, dtype=np.float64, chunks=(1,) * a.ndim,
        ).max().compute()
    else:
        err = np.abs(probe.decode(probe.encode(a)).astype(np.float64) - a).max()
    return ValueMapping(dt.name, target.name, "quantized", scale, offset, float(err))
