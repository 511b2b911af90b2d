"""A bounded, thread-safe cache of chunk prefixes already read.

Each entry is the first ``n`` bytes of a physical chunk as the store read
them (a level-k prefix plus the two boundary bytes after it, or the whole
chunk). A finer level of the same chunk then needs only the bytes from
``n`` on: that is progressive refinement at the cost of the new bytes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

__all__ = ["PrefixCache"]


class PrefixCache:
    """Least-recently-used map of physical chunk key -> its first bytes, at most
    ``max_bytes`` in total (an entry larger than that is not kept)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive number of bytes, found {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return self._size

    def get(self, key: str) -> bytes:
        """The bytes held for ``key`` (empty when none)."""
        with self._lock:
            head = self._entries.get(key)
            if head is None:
                return b""
            self._entries.move_to_end(key)
            return head

    def put(self, key: str, head: bytes) -> None:
        """Keep ``head`` for ``key`` unless a longer prefix is already held."""
        if len(head) > self.max_bytes:
            return
        with self._lock:
            old = self._entries.get(key)
            if old is not None:
                if len(old) >= len(head):
                    return
                self._size -= len(old)
            self._entries[key] = head
            self._entries.move_to_end(key)
            self._size += len(head)
            while self._size > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._size -= len(dropped)
