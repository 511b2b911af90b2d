"""The defaults and naming rules of :func:`~mist_zarr.convert.convert`, shared by its planning
and its writing halves (this module imports nothing heavy: the planner loads it first)."""

from __future__ import annotations

import re

__all__ = ["DEFAULT_BATCH_BYTES", "MASK_NAME", "SPLIT_BYTES"]

#: Larger DICOM stacks are read and written in slice batches of at most this many decoded bytes.
DEFAULT_BATCH_BYTES = 256 << 20
#: Images of more decoded bytes than this are written in parts when there are workers.
SPLIT_BYTES = 256 << 20
#: File names that suggest a label map (converted after the images, checked for few values).
MASK_NAME = re.compile(r"(^|[^a-z])(seg|segmentation|label|labels|mask|masks)([^a-z]|$)", re.I)
