"""Which sample values can be stored losslessly, and how.

HTJ2K codes 8/16/32-bit integers. Everything else is mapped onto one of
those only when the mapping is exact (bool, integral floats, 64-bit integers
whose values fit 32 bits) or when the user asks for quantisation, which is
recorded with its measured error.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from .errors import LossyInputError

__all__ = ["LossyInputError", "ValueMapping", "choose_mapping", "storage_dtype_for"]

try:  # numpy's clip ufunc: np.clip's Python wrapper costs more than clipping a small level
    from numpy._core.umath import clip as _clip
except ImportError:  # pragma: no cover - a numpy that moved it
    _clip = np.clip

STORABLE = tuple(np.dtype(t) for t in ("uint8", "int8", "uint16", "int16", "uint32", "int32"))


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
        """Stored integers -> caller's values (exact unless ``kind == "quantized"``).

        Level 0 holds exactly the written values. Reduced levels may overshoot
        the caller's range at sharp edges; they are clipped to it, as JPEG 2000
        decoders clip reconstructed samples to the nominal range.
        """
        if self.kind == "quantized":
            return (a * self.scale + self.offset).astype(self.dtype)
        target = np.dtype(self.dtype)
        if target.kind in "iu" and np.dtype(a.dtype).kind in "iu" and not np.can_cast(
                a.dtype, target, "safe"):  # (a safe cast cannot leave the range)
            lo, hi = _bounds(np.dtype(a.dtype), target)
            # one pass: clipped values fit the target, so the unsafe cast is exact
            return _clip(a, lo, hi, out=np.empty(a.shape, target), casting="unsafe")
        elif target == np.bool_:
            return a > 0
        return a.astype(target, copy=False)


@functools.lru_cache(maxsize=64)
def _bounds(source: np.dtype, target: np.dtype) -> tuple[np.generic, np.generic]:
    """``target``'s range as scalars of a type that holds both dtypes' values (the clip
    ufunc, unlike np.clip, does not widen Python integers that overflow its input type)."""
    wide, info = np.promote_types(source, target), np.iinfo(target)
    return wide.type(info.min), wide.type(info.max)


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


SIGNED = tuple(np.dtype(t) for t in ("int8", "int16", "int32"))


def storage_dtype_for(lo: float, hi: float, *, headroom: bool) -> np.dtype | None:
    """Signed integer dtype for samples in ``[lo, hi]``, leaving room for the wavelet.

    Reduced resolutions are low-pass samples that overshoot the input range
    next to sharp edges, and imagecodecs casts them to the stored dtype
    without clipping: in an unsigned type an undershoot below 0 comes back as
    a large positive value. Signed storage with half the range of headroom on
    both sides keeps every level's samples exact; it also codes better than
    unsigned (no DC level shift: 16-bit MR 30 % smaller). Without
    ``headroom`` (a single resolution) the tightest type is used.
    """
    margin = (hi - lo) / 2 if headroom else 0
    for dt in SIGNED if headroom else STORABLE:
        info = np.iinfo(dt)
        if info.min <= lo - margin and hi + margin <= info.max:
            return dt
    return None


def choose_mapping(a: Any, *, quantize: str | np.dtype | None = None, levels: int = 0,
                   name: str = "input", value_range: tuple[float, float] | None = None
                   ) -> ValueMapping:
    """Pick the lossless (or explicitly quantised) storage for array ``a``.

    With ``levels`` > 0 integer samples are stored in a signed type with
    headroom for the reduced resolutions (see :func:`storage_dtype_for`),
    read back in their own dtype. Raises :class:`LossyInputError` explaining
    why when no exact mapping exists and ``quantize`` was not given.
    ``value_range`` is the known (min, max) of integer samples; it saves a
    pass over lazy data (it must be exact: values outside it may not fit).
    """
    dt = np.dtype(a.dtype)
    if dt.kind not in "iufb":
        raise TypeError(f"{name}: cannot store dtype {dt}; expected integer, bool or float samples")
    if dt in STORABLE and quantize is None and not levels:
        return ValueMapping(dt.name, dt.name)
    if a.size == 0:
        raise ValueError(f"{name}: cannot store an empty array of shape {tuple(a.shape)}")
    original = "bool" if dt == np.bool_ else dt.name
    if dt == np.bool_:
        lo, hi, finite, integral, negzero = 0.0, 1.0, True, True, False
    elif dt.kind in "iu":  # only the range matters for integers
        if value_range is not None:
            lo, hi = (float(v) for v in value_range)
        elif hasattr(a, "dask"):
            import dask

            lo, hi = (float(v) for v in dask.compute(a.min(), a.max()))
        else:
            lo, hi = float(np.min(a)), float(np.max(a))
        finite, integral, negzero = True, True, False
    else:
        lo, hi, finite, integral, negzero = _stats(a)
    if quantize is not None:
        return _quantize(a, dt, np.dtype(quantize), lo, hi, finite, name)
    if dt.kind in "iub":
        target = storage_dtype_for(lo, hi, headroom=bool(levels))
        if target is None:
            target = storage_dtype_for(lo, hi, headroom=False)  # no room left: exact level 0
        if target is None:
            raise LossyInputError(
                f"{name}: {dt} values span [{lo:.0f}, {hi:.0f}], beyond the 32-bit integers "
                "HTJ2K can code; pass quantize='int32' (or another integer dtype) to store "
                "them with a recorded rounding error"
            )
        kind = "identity" if target == dt else "cast"
        return ValueMapping(original, target.name, kind)
    reasons = []
    if not finite:
        reasons.append("NaN or infinite values")
    elif not integral:
        reasons.append("fractional values")
    if negzero:
        reasons.append("negative zeros (-0.0 would come back as +0.0)")
    target = None if reasons else (storage_dtype_for(lo, hi, headroom=bool(levels))
                                   or storage_dtype_for(lo, hi, headroom=False))
    if target is None and not reasons:
        reasons.append(f"integral values in [{lo:g}, {hi:g}], beyond 32-bit integers")
    if reasons:
        raise LossyInputError(
            f"{name}: {dt} data cannot be stored losslessly: it has {' and '.join(reasons)}. "
            "HTJ2K codes integers only. To store it anyway, pass quantize='uint16' "
            "(or another integer dtype): values are scaled into that range and the scale, "
            "offset and measured maximum error are recorded in the metadata."
        )
    return ValueMapping(original, target.name, "cast")


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
