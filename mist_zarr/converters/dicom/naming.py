"""Portable, stable names for series: PatientID/Study/Series-hash."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

from .tags import _text

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")

_WINDOWS_RESERVED = {
    "CON",
    "PRN",
    "AUX",
    "NUL",
    *(f"COM{i}" for i in range(1, 10)),
    *(f"LPT{i}" for i in range(1, 10)),
}


def _sanitise(value: Any, fallback: str, max_len: int = 48) -> str:
    """Return ``value`` as a portable file-name component (ASCII, no separators)."""
    text = unicodedata.normalize("NFKD", str(value or "")).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"_{2,}", "_", _UNSAFE.sub("_", text.strip())).strip("._-+")
    text = text[:max_len].rstrip("._-+")
    if not text:
        text = fallback
    if text.split(".")[0].upper() in _WINDOWS_RESERVED:
        text = "_" + text
    return text


def suggest_name(ds: Any, series_uid: str, stack_key: str = "") -> str:
    """Return ``<PatientID>/<StudyDate>-<StudyDescription>/<SeriesNumber>-<SeriesDescription>-<hash8>``.

    Components are sanitised for file systems; the hash is the first 8 hex
    digits of SHA-256 over the series UID (plus ``|stack_key`` when given),
    so names are stable and distinct per series and stack.
    """
    patient = _sanitise(_text(ds, "PatientID"), "unknown-patient")
    date = _sanitise(_text(ds, "StudyDate"), "nodate")
    study_desc = _sanitise(_text(ds, "StudyDescription"), "")
    number = _sanitise(_text(ds, "SeriesNumber"), "")
    desc = _sanitise(
        _text(ds, "SeriesDescription") or _text(ds, "ProtocolName") or _text(ds, "Modality"), ""
    )
    digest = hashlib.sha256(
        (series_uid + (f"|{stack_key}" if stack_key else "")).encode()
    ).hexdigest()[:8]
    study = "-".join(p for p in (date, study_desc) if p)
    series = "-".join(p for p in (number, desc, digest) if p)
    return f"{patient}/{study}/{series}"
