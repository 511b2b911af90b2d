"""Whole objects and byte ranges of one image group, and the decode thread pools.

What :mod:`mist_zarr.direct` reads through: a :class:`Reader` over any zarr
store under a key prefix (sync, async, or plain ``os.pread`` for a local
folder), the one-chunk small arrays of the group (prefix index, checksums)
decoded with numcodecs, and one persistent thread pool per size.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numcodecs
import numpy as np
import zarr
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .format import IMAGE
from .prefix_cache import PrefixCache
from .storage import supports_sync_io
from .store import source_identity

__all__ = ["Reader", "default_threads", "pool", "read_small_array", "remote", "run", "scratch"]

_WHOLE = object()  # a cache miss of a whole chunk: read it all
_CHUNKS = f"{IMAGE}/c/"  # only chunk reads go through a prefix cache


def remote(store: Store) -> bool:
    """Requests to ``store`` have latency: issue them concurrently."""
    return type(store).__name__ not in ("LocalStore", "MemoryStore")


def run(coro: Any) -> Any:
    """Run ``coro`` on zarr's event loop and wait for it."""
    return sync(coro)


# -- one thread pool per size, per process -----------------------------------------------
_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def pool(size: int) -> ThreadPoolExecutor:
    """A persistent pool: starting threads on every read would cost more than a coarse level."""
    with _POOLS_LOCK:
        found = _POOLS.get(size)
        if found is None:
            found = _POOLS[size] = ThreadPoolExecutor(size, thread_name_prefix="mist-decode")
        return found


def _forget_pools() -> None:  # a forked child (DataLoader worker) has none of the threads
    global _POOLS_LOCK, _THREADS
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()
    _THREADS = None


os.register_at_fork(after_in_child=_forget_pools)
_THREADS: int | None = None


def default_threads() -> int:
    """One decode thread per core (at most 32)."""
    global _THREADS
    if _THREADS is None:  # os.cpu_count() reads sysfs: it costs as much as a small decode
        _THREADS = min(32, os.cpu_count() or 1)
    return _THREADS


# -- reusable buffers, one set per thread -----------------------------------------------------
# Fresh buffers of a coarse level's size cost page faults that add a quarter to its decode;
# a thread's reads and intermediate decodes reuse its own. Larger ones are allocated as usual.
SCRATCH_MAX = 4 << 20  # bytes per buffer
_LOCAL = threading.local()


def scratch(name: str, nbytes: int) -> bytearray | None:
    """This thread's reusable buffer ``name`` of at least ``nbytes`` (None: too large to keep).

    The caller must be done with it before the thread asks for ``name`` again.
    """
    if nbytes > SCRATCH_MAX:
        return None
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None:
        buffers = _LOCAL.buffers = {}
    buf = buffers.get(name)
    if buf is None or len(buf) < nbytes:
        buf = buffers[name] = bytearray(max(nbytes, 64 << 10))
    return buf


# -- reading the group's own documents ----------------------------------------------------
class Reader:
    """Whole objects and byte ranges of one store under a key prefix, sync or async.

    ``Reader.local(folder)`` reads a local folder with ``os.pread`` and makes
    its zarr ``LocalStore`` only if something asks for it (an open of a small
    image costs less than constructing one).
    """

    def __init__(self, store: Store | None, prefix: str, cache: PrefixCache | None = None,
                 *, root: str | None = None) -> None:
        self._store = store
        self.prefix = f"{prefix.strip('/')}/" if prefix and prefix.strip("/") else ""
        if root is None and type(store).__name__ == "LocalStore" and store.root:
            root = os.fspath(store.root)
        # a local folder: a plain pread costs a fifth of get_sync (no Buffer, pathlib, file)
        self.root = root
        self.sync = True if store is None else supports_sync_io(store)
        # a MultiscaleStore's prefix cache: a finer level fetches only the bytes beyond
        # the prefix already held (see mist_zarr.progressive)
        self.cache = cache

    @classmethod
    def local(cls, folder: str) -> Reader:
        return cls(None, "", root=folder)

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = LocalStore(self.root, read_only=True)
        return self._store

    @property
    def proto(self) -> Any:
        return default_buffer_prototype()

    def identity(self) -> tuple[Any, ...] | None:
        """Where the image is, as a cache key (None: unknown kind of store, no caching)."""
        if self.root is not None:  # cheaper than source_identity's realpath, as exact a key
            return ("local", os.path.abspath(self.root), self.prefix)
        ident = source_identity(self.store)
        return None if ident is None else (*ident, self.prefix)

    @property
    def is_local(self) -> bool:
        """Reads are cheap synchronous calls (threads decode; no request concurrency needed)."""
        return self.root is not None and self.cache is None

    def _cached_request(self, key: str, length: int | None) -> tuple[bytes, ByteRequest | None]:
        """What the cache holds of ``key`` and the range still to read (None: nothing)."""
        head = self.cache.get(self.prefix + key) if self.cache is not None else b""
        if length is not None:
            return head, (RangeByteRequest(len(head), length) if len(head) < length else None)
        return head, OffsetByteRequest(len(head)) if head else _WHOLE

    def _keep(self, key: str, head: bytes, buf: Any) -> bytes | None:
        if buf is None and not head:
            return None
        data = head + (buf.to_bytes() if buf is not None else b"")
        self.cache.put(self.prefix + key, data)
        return data

    def get(self, key: str, length: int | None = None) -> bytes | None:
        """Object ``key`` (its first ``length`` bytes when given), or None if absent."""
        if self.cache is not None and key.startswith(_CHUNKS):
            head, request = self._cached_request(key, length)
            if request is None:
                return head[:length]
            buf = run(self.store.get(self.prefix + key, self.proto,
                                     None if request is _WHOLE else request))
            return self._keep(key, head, buf)
        if self.root is not None:
            try:
                fd = os.open(f"{self.root}/{self.prefix}{key}", os.O_RDONLY)
            except (FileNotFoundError, NotADirectoryError):
                return None
            try:
                return os.pread(fd, os.fstat(fd).st_size if length is None else length, 0)
            finally:
                os.close(fd)
        request = None if length is None else RangeByteRequest(0, length)
        if self.sync:
            buf = self.store.get_sync(self.prefix + key, prototype=self.proto,
                                      byte_range=request)
        else:
            buf = run(self.store.get(self.prefix + key, self.proto, request))
        return None if buf is None else buf.to_bytes()

    def get_prefix(self, key: str, length: int) -> bytes | memoryview | None:
        """The first ``length`` bytes of ``key`` (fewer if it is shorter), or None if absent;
        from a local folder into this thread's read buffer (valid until its next call)."""
        buf = scratch("read", length) if self.root is not None and self.cache is None else None
        if buf is None:
            return self.get(key, length)
        try:
            fd = os.open(f"{self.root}/{self.prefix}{key}", os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            view = memoryview(buf)[:length]
            return view[:os.preadv(fd, [view], 0)]
        finally:
            os.close(fd)

    async def aget(self, key: str, length: int | None = None) -> bytes | None:
        if self.cache is not None and key.startswith(_CHUNKS):
            head, request = self._cached_request(key, length)
            if request is None:
                return head[:length]
            buf = await self.store.get(self.prefix + key, self.proto,
                                       None if request is _WHOLE else request)
            return self._keep(key, head, buf)
        request = None if length is None else RangeByteRequest(0, length)
        buf = await self.store.get(self.prefix + key, self.proto, request)
        return None if buf is None else buf.to_bytes()

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if self.sync or self.root is not None or not remote(self.store):
            return [self.get(k) for k in keys]

        async def all_of() -> list[bytes | None]:
            return list(await asyncio.gather(*(self.aget(k) for k in keys)))

        return run(all_of())


def read_small_array(reader: Reader, name: str, doc: bytes | None) -> np.ndarray:
    """A one-chunk array of the image group (the index, the checksums), decoded by numcodecs.

    zarr's array machinery costs more than decoding these few hundred bytes; the
    writer stores them as one chunk with ``bytes`` (+ ``zstd``) codecs. Any
    other layout goes through zarr. ``doc`` is the array's ``zarr.json``.
    """

    where = f"{reader.prefix}{name}"
    if doc is None:
        raise FileNotFoundError(f"{where}: the image group has no {name!r} array (the image "
                                "was removed or replaced while it was being opened)")
    meta = json.loads(doc)
    shape = tuple(meta["shape"])
    codecs = meta.get("codecs", [])
    grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
    encoding = meta.get("chunk_key_encoding", {})
    simple = (
        tuple(grid or ()) == shape and codecs and codecs[0].get("name") == "bytes"
        and all(c.get("name") in ("zstd", "gzip") for c in codecs[1:])
        and encoding.get("name") == "default"
        and encoding.get("configuration", {}).get("separator", "/") == "/"
        and isinstance(meta.get("fill_value"), int)
    )
    if not simple:

        return zarr.open_array(store=reader.store, path=reader.prefix + name, mode="r",
                               zarr_format=3)[...]
    endian = codecs[0].get("configuration", {}).get("endian", "little")
    dtype = np.dtype(meta["data_type"]).newbyteorder("<" if endian == "little" else ">")
    raw = reader.get(f"{name}/c/" + "/".join("0" * len(shape)) if shape else f"{name}/c")
    if raw is None:
        return np.full(shape, meta["fill_value"], dtype.newbyteorder("="))
    for codec in reversed(codecs[1:]):
        raw = numcodecs.get_codec({"id": codec["name"], **codec.get("configuration", {})}
                                  ).decode(raw)
    data = np.frombuffer(raw, dtype)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{where}: chunk holds {data.size} values, expected shape {shape}")
    return data.reshape(shape).astype(dtype.newbyteorder("="), copy=False)
