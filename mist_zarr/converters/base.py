"""What every converter hands to the writer."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ConversionError", "SourceImage", "missing_dependency", "safe_name"]


class ConversionError(ValueError):
    """A source cannot be converted; the message names it and says why."""


@dataclass
class SourceImage:
    """An image read from a source file or series, ready for :func:`mist_zarr.write_image`.

    ``data`` holds the *stored* values (no rescale applied) in ``dims`` order;
    ``affine`` maps ``(x, y, z)`` indices to RAS+ mm (see ``docs/format.md``).
    """

    data: Any
    dims: tuple[str, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    source_format: str
    name: str
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    source_files: list[str] = field(default_factory=list)
    lossy_source: bool = False

    def write_metadata(self) -> dict[str, Any]:
        """The ``metadata`` attribute the writer stores for this image."""
        meta = dict(self.metadata)
        meta["lossy_source"] = self.lossy_source
        if self.warnings:
            meta["warnings"] = list(self.warnings)
        return meta


def missing_dependency(package: str, extra: str | None = None) -> ImportError:
    """An ImportError that says what to install."""
    hint = f"pip install {package}" if extra is None else f"pip install 'mist-zarr[{extra}]'"
    return ImportError(f"this conversion needs the {package!r} package: {hint}")


def safe_name(*parts: str, max_len: int = 64) -> str:
    """A file-system-safe path component made of ``parts``."""
    text = "-".join(p for p in (str(x).strip() for x in parts) if p)
    text = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._-")
    return text[:max_len] or "unnamed"
