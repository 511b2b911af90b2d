"""Typed access to DICOM attributes: missing or malformed values read as None / "" / (), never raise.

pydicom is imported lazily (:func:`_pydicom`) throughout this package: it
is not needed to import ``mist_zarr`` or to read stored images, and
importing it costs the CLI start-up time when no DICOM is converted.
"""

from __future__ import annotations

import math
from typing import Any

_INSTALL_HINT = (
    "reading DICOM needs pydicom>=3 and the pylibjpeg decoders: "
    "pip install 'pydicom>=3' pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
)


def _pydicom() -> Any:
    """Import pydicom lazily, with an install hint when it is missing or too old."""
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from exc
    if int(pydicom.__version__.split(".")[0]) < 3:  # pragma: no cover
        raise ImportError(f"pydicom {pydicom.__version__} is too old; {_INSTALL_HINT}")
    return pydicom


def _get(container: Any, keyword: str) -> Any:
    try:
        return container.get(keyword) if container is not None else None
    except Exception:
        return None


def _text(container: Any, keyword: str) -> str:
    value = _get(container, keyword)
    if value is None:
        return ""
    if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _float(container: Any, keyword: str) -> float | None:
    value = _get(container, keyword)
    try:
        out = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return out if out is not None and math.isfinite(out) else None


def _int(container: Any, keyword: str) -> int | None:
    value = _float(container, keyword)
    return int(value) if value is not None and value == int(value) else None


def _floats(container: Any, keyword: str, n: int) -> tuple[float, ...] | None:
    value = _get(container, keyword)
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _strings(container: Any, keyword: str) -> tuple[str, ...]:
    value = _get(container, keyword)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value.strip().upper(),)
    try:
        return tuple(str(v).strip().upper() for v in value)
    except TypeError:
        return (str(value).strip().upper(),)


def _fg(item: Any, shared: Any, sequence: str, keyword: str) -> Any:
    """Return ``keyword`` from a functional group, per-frame first, then shared."""
    for group in (item, shared):
        seq = _get(group, sequence)
        if seq:
            inner = seq[0]
            if keyword in inner:
                return inner
    return None


def _key(value: Any) -> tuple[int, Any]:
    """Sort key that puts missing values last."""
    return (1, 0) if value is None or value == () else (0, value)


def _pixel_spacing(container: Any) -> tuple[tuple[float, float] | None, str | None]:
    """Return (row, column) spacing and a note when it is not PixelSpacing."""
    for keyword, note in (
        ("PixelSpacing", None),
        (
            "ImagerPixelSpacing",
            "spacing from ImagerPixelSpacing (detector plane, not corrected for magnification)",
        ),
        ("NominalScannedPixelSpacing", "spacing from NominalScannedPixelSpacing (scanned film)"),
    ):
        value = _floats(container, keyword, 2)
        if value and value[0] > 0 and value[1] > 0:
            return value, note
    return None, None


def _multi(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def _tag_keyword(tag: Any) -> str:
    from pydicom.datadict import keyword_for_tag

    try:
        return keyword_for_tag(int(tag)) or ""
    except Exception:
        return ""


def _keyword(tag: str) -> str:
    from pydicom.datadict import keyword_for_tag

    try:
        return keyword_for_tag(int(tag, 16)) or tag
    except Exception:
        return tag


def _round(value: float | None, ndigits: int) -> float | None:
    return None if value is None else round(value, ndigits)
