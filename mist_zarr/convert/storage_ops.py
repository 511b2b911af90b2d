"""The dataset root and its JSON documents (completion markers), as convert opens them.

Kept in one module so that they can be replaced by the shared storage layer
in one place.
"""

from __future__ import annotations

import json
import time
from typing import Any

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.errors import ContainsGroupError

__all__ = ["open_root", "read_json", "write_json"]


def open_root(dest: Any, storage_options: dict[str, Any] | None) -> zarr.Group:
    """The dataset root, created if missing; two conversions may create it at once."""
    for attempt in range(5):
        try:
            return zarr.open_group(dest, mode="a", zarr_format=3, storage_options=storage_options)
        except ContainsGroupError:  # created by another process between look and create
            if attempt == 4:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def read_json(store: Any, key: str) -> dict[str, Any] | None:
    """The JSON document at ``key`` in ``store``, or None if there is none."""
    buf = sync(store.get(key, default_buffer_prototype()))
    return None if buf is None else json.loads(buf.to_bytes())


def write_json(store: Any, key: str, doc: dict[str, Any]) -> None:
    """Write ``doc`` as JSON at ``key`` in ``store``."""
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(json.dumps(doc).encode())))
