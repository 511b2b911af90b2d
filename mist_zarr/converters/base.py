"""What every converter hands to the writer."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConversionError
from ..format import ImageInfo

# Refuse a source whose header declares more decoded pixel bytes than this
# (before reading its pixels); every converter and convert use this one value.
DEFAULT_MAX_BYTES = 8 << 30

__all__ = ["DEFAULT_MAX_BYTES", "ConversionError", "ExportResult", "LazyPlanes", "SourceImage",
           "StoredImage", "missing_dependency", "safe_name"]


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
    # a label map (segmentation): stored by mist_zarr.labels, not as HTJ2K
    labels: bool = False
    segments: list[dict[str, Any]] = field(default_factory=list)

    def write_metadata(self) -> dict[str, Any]:
        """The ``metadata`` attribute the writer stores for this image."""
        meta = dict(self.metadata)
        meta["lossy_source"] = self.lossy_source
        if self.warnings:
            meta["warnings"] = list(self.warnings)
        return meta


class LazyPlanes:
    """Samples read on demand in batches along the first axis, so that memory stays bounded.

    ``read(start, stop)`` returns ``data[start:stop]``; ``batches`` lists the
    ``(start, stop)`` ranges the writer takes one at a time; ``value_range``
    is the (min, max) of all samples, known from an earlier pass (the writer
    needs it before the first chunk, to choose the storage type).
    ``numpy.asarray`` reads everything.
    """

    def __init__(self, shape: tuple[int, ...], dtype: Any, batches: list[tuple[int, int]],
                 read: Any, value_range: tuple[float, float]) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.batches = list(batches)
        self.read = read
        self.value_range = (float(value_range[0]), float(value_range[1]))
        starts = [0] + [stop for _, stop in self.batches[:-1]]
        if not self.batches or [a for a, _ in self.batches] != starts or \
                self.batches[-1][1] != self.shape[0] or any(b <= a for a, b in self.batches):
            raise ValueError(f"batches {self.batches} do not tile the first axis of {self.shape}")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def iter_batches(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, data[start:stop])`` for each batch, reading it then."""
        for start, stop in self.batches:
            block = self.read(start, stop)
            if block.shape != (stop - start,) + self.shape[1:] or block.dtype != self.dtype:
                raise ValueError(f"batch [{start}, {stop}) read as {block.dtype}{block.shape}, "
                                 f"expected {self.dtype}{(stop - start,) + self.shape[1:]}")
            # the storage type was chosen from value_range: a sample outside it
            # would be stored wrongly, so a source that changed is refused
            lo, hi = self.value_range
            if block.size and (block.min() < lo or block.max() > hi):
                raise ValueError(f"batch [{start}, {stop}) holds values in [{block.min()}, "
                                 f"{block.max()}], outside the range [{lo:g}, {hi:g}] read "
                                 "before: the source changed during conversion")
            yield start, block
            del block  # not held while the next batch is read

    def part(self, start: int, stop: int) -> "LazyPlanes":
        """Entries ``start:stop`` of the first axis, read in the same batches (cut at the ends).

        A reader with a ``part`` method of its own (a DICOM stack's) makes the
        part's reader, carrying only what those entries need (to be sent to
        another process); any other reader is called with shifted bounds.
        """
        if not 0 <= start < stop <= self.shape[0]:
            raise ValueError(f"part [{start}, {stop}) is outside the first axis of {self.shape}")
        batches = [(max(a, start) - start, min(b, stop) - start)
                   for a, b in self.batches if a < stop and b > start]
        read = self.read.part(start, stop) if hasattr(self.read, "part") else \
            _ShiftedRead(self.read, start)
        return LazyPlanes((stop - start,) + self.shape[1:], self.dtype, batches, read,
                          self.value_range)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        for start, block in self.iter_batches():
            out[start : start + len(block)] = block
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyPlanes(shape={self.shape}, dtype={self.dtype}, batches={len(self.batches)})"


@dataclass(frozen=True)
class _ShiftedRead:
    """``read`` of a part: the whole's reader with bounds shifted by ``start``."""

    read: Any
    start: int

    def __call__(self, start: int, stop: int) -> np.ndarray:
        return self.read(self.start + start, self.start + stop)


def missing_dependency(package: str, extra: str | None = None) -> ImportError:
    """An ImportError that says what to install."""
    hint = f"pip install {package}" if extra is None else f"pip install 'mist-zarr[{extra}]'"
    return ImportError(f"this conversion needs the {package!r} package: {hint}")


def safe_name(*parts: str, max_len: int = 64) -> str:
    """A file-system-safe path component made of ``parts``."""
    text = "-".join(p for p in (str(x).strip() for x in parts) if p)
    text = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._-")
    return text[:max_len] or "unnamed"


# -- export: what every exporter is given and returns --------------------------
@dataclass(frozen=True)
class StoredImage:
    """A stored image opened once for export, at the level being exported.

    ``source`` is what the caller named (for messages and file names),
    ``group`` the physical image group, ``values`` level ``level``'s samples
    in the dtype the image was written with.
    """

    source: Any
    group: Any  # zarr.Group
    info: ImageInfo
    level: int
    values: np.ndarray

    def full_metadata(self) -> dict[str, Any]:
        """The image's metadata with its per-slice tables (:func:`mist_zarr.reader.read_metadata`)."""
        # imported here: the reader brings zarr, which detection and the scan at the
        # start of ``convert`` (both import this module) do not need
        from ..reader import read_metadata

        return read_metadata(self.group)


@dataclass
class ExportResult:
    """Files written by :func:`mist_zarr.export`."""

    format: str
    level: int
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
