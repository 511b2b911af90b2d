"""The settings of a :func:`~mist_zarr.convert.convert` run, their defaults and naming rules,
shared by its planning and its writing halves (nothing heavy: the planner loads this first)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_BATCH_BYTES", "MASK_NAME", "SPLIT_BYTES", "Options"]

#: Larger DICOM stacks are read and written in slice batches of at most this many decoded bytes.
DEFAULT_BATCH_BYTES = 256 << 20
#: Images of more decoded bytes than this are written in parts when there are workers.
SPLIT_BYTES = 256 << 20
#: File names that suggest a label map (converted after the images, checked for few values).
MASK_NAME = re.compile(r"(^|[^a-z])(seg|segmentation|label|labels|mask|masks)([^a-z]|$)", re.I)


@dataclass
class Options:
    """The settings of one conversion run, as every unit (and dask worker) sees them."""

    overwrite: bool
    skip_existing: bool
    alpha: int
    quantize: str | None
    max_bytes: int
    batch_bytes: int | None
    threads: int | None
    run: str
    storage_options: dict[str, Any] | None
    labels: bool | str | None = None  # mark sources as label maps: all, or a file-name glob
    split_bytes: int | None = SPLIT_BYTES  # larger images are written in parts, given workers
    parts: int = 1  # parts per split image (a few per worker)
