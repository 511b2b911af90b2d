"""The dataset root as convert opens it (created if missing, race-tolerant)."""

from __future__ import annotations

import time
from typing import Any

import zarr
from zarr.errors import ContainsGroupError

from ..storage import open_group

__all__ = ["open_root"]


def open_root(dest: Any, storage_options: dict[str, Any] | None) -> zarr.Group:
    """The dataset root, created if missing; two conversions may create it at once."""
    for attempt in range(5):
        try:
            return open_group(dest, mode="a", storage_options=storage_options)
        except ContainsGroupError:  # created by another process between look and create
            if attempt == 4:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")
