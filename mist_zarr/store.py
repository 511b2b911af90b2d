"""Every resolution level of a mist-zarr image as a virtual, read-only Zarr store.

The store is a key map. Metadata (the OME-NGFF root group, one group per
level, array and coordinate documents) is generated once from the physical
group's attributes and its prefix index. A level-k chunk key such as
``s2/image/c/7/0/0`` maps to the physical key ``image/c/7/0/0`` and the byte
range ``[0, prefix + 2)``: one request returns the indexed prefix plus the
two bytes after it, which must begin a tile-part (SOT) or end the stream
(EOC). A prefix that ends anywhere else would decode, without error, into a
wrong image, so the store raises instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr.api.asynchronous as za
from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
)
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.config import config
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, ObjectStore, StorePath

from .codestream import is_boundary
from .errors import PrefixError
from .format import ATTR, IMAGE, INDEX, ImageInfo, IncompleteImageError, not_an_image
from .layout import codec_config
from .ngff import BYTES_LE, array_doc, group_doc, ome_multiscales
from .prefix_cache import PrefixCache
from .storage import forget_listings, no_group, open_source_store, supports_sync_io

__all__ = ["MultiscaleStore", "PrefixError", "forget_listings", "open_source_store",
           "source_identity"]

# canonical decimal numbers only (no leading zeros, ASCII digits): exactly the
# keys ``list`` returns, so that no other spelling reaches a chunk
_NUMBER = "(?:0|[1-9][0-9]*)"
_CHUNK_KEY = re.compile(f"s({_NUMBER})/{IMAGE}/c((?:/{_NUMBER})+)")
_RANGE_TYPES = (RangeByteRequest, OffsetByteRequest, SuffixByteRequest)


# Index and metadata shared by every store of the same image in this process
# (dask ships one pickled store per task; loaders open one per sample). The key
# is the physical store's full identity plus a digest of the image's zarr.json,
# which carries a write id unique to each write: a store re-reads zarr.json
# when it loads, so an image rewritten at the same path gets a new entry.
_SHARED: OrderedDict[tuple[Any, ...], _State] = OrderedDict()
_SHARED_LOCK = threading.Lock()
_SHARED_MAX = 256
_OBSTORE_FIELDS = {"S3Store": ("prefix", "config", "client_options"),
                   "GCSStore": ("prefix", "config", "client_options"),
                   "AzureStore": ("prefix", "config", "client_options"),
                   "HTTPStore": ("url", "client_options"),
                   "LocalStore": ("prefix",)}


@dataclass(frozen=True)
class _State:
    info: ImageInfo
    index: np.ndarray
    meta: dict[str, bytes]
    chunk_keys: tuple[str, ...]


@dataclass(frozen=True)
class _Fetch:
    """One chunk read: fetch ``request`` of ``physical`` (unless ``needed`` is false)
    and append it to ``head``, the bytes the prefix cache already holds."""

    key: str
    physical: str
    level: int
    length: int
    head: bytes
    request: ByteRequest | None
    needed: bool = True


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def source_identity(store: Store) -> tuple[Any, ...] | None:
    """What makes two physical stores read the same bytes, or None when unknown.

    Covers the endpoint and options, not just the bucket and prefix (obstore's
    ``S3Store`` repr names only the bucket). Stores of unknown kinds (in-memory
    ones, wrappers) have no identity: their index is never shared.
    """

    kind = type(store)
    if isinstance(store, LocalStore):
        return (kind, os.path.realpath(store.root))
    if isinstance(store, FsspecStore):
        fs = getattr(store.fs, "sync_fs", store.fs)  # AsyncFileSystemWrapper
        return (kind, type(fs), _canonical(fs.protocol), _canonical(fs.storage_options), store.path)
    if isinstance(store, ObjectStore):
        fields = _OBSTORE_FIELDS.get(type(store.store).__name__)
        if fields is None:
            return None
        try:
            values = tuple(_canonical(getattr(store.store, f, None)) for f in fields)
        except BaseException as exc:  # obstore panics on some configs (allow_http=True)
            if type(exc).__name__ != "PanicException":
                raise
            return None
        return (kind, type(store.store)) + values
    return None


class MultiscaleStore(Store):
    """Read-only store serving levels ``s0 .. sN`` of the mist-zarr image at ``source``.

    ``source`` is a local path, a ``file://`` or fsspec URL (``http(s)://``,
    ``s3://`` ...) or a zarr :class:`~zarr.abc.store.Store` rooted at the
    image group. Level-0 chunks pass through unchanged; a level-k chunk is
    one ranged read of its indexed prefix (plus two bytes checked for a
    tile-part boundary). Missing chunks read as ``None``.

    With ``cache_bytes`` the store keeps up to that many bytes of the chunk
    prefixes it has read, so reading a finer level of a chunk after a coarser
    one fetches only the bytes beyond the prefix already held.
    """

    supports_writes = False
    supports_deletes = False
    supports_partial_writes = False
    supports_listing = True

    def __init__(
        self, source: Any, *, storage_options: Mapping[str, Any] | None = None,
        read_only: bool = True, cache_bytes: int = 0,
    ) -> None:
        if not read_only:
            raise ValueError("MultiscaleStore is read-only: read_only=False is not supported")
        super().__init__(read_only=True)
        self._source = source
        self._storage_options = dict(storage_options or {})
        self._physical = open_source_store(source, self._storage_options)
        self._identity = source_identity(self._physical)
        self._cache_bytes = int(cache_bytes)
        self._prefixes = PrefixCache(self._cache_bytes) if cache_bytes else None
        self._state: _State | None = None
        self._lock = threading.Lock()
        self._loading: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}

    # -- identity and pickling (dask.distributed ships the store to workers) --
    def __getstate__(self) -> dict[str, Any]:
        return {"source": self._source, "storage_options": self._storage_options,
                "cache_bytes": self._cache_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["source"], storage_options=state["storage_options"],
                      cache_bytes=state.get("cache_bytes", 0))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, MultiscaleStore)
            and self._physical == other._physical
            and self._storage_options == other._storage_options
        )

    def __hash__(self) -> int:
        # equal stores may be built from different sources (path vs file:// URL),
        # so hash only what equality cannot disagree with
        return hash((type(self), type(self._physical).__name__))

    def __repr__(self) -> str:
        return f"MultiscaleStore({self._source!r})"

    def with_read_only(self, read_only: bool = False) -> MultiscaleStore:
        if not read_only:
            return super().with_read_only(read_only)  # NotImplementedError, as zarr asks
        return MultiscaleStore(self._source, storage_options=self._storage_options,
                               cache_bytes=self._cache_bytes)

    @property
    def source(self) -> Any:
        """The path, URL or store this store reads."""
        return self._source

    @property
    def storage_options(self) -> dict[str, Any]:
        """The fsspec options the source was opened with."""
        return dict(self._storage_options)

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The prefixes held for progressive refinement (None unless ``cache_bytes``)."""
        return self._prefixes

    # -- loading the index once -------------------------------------------
    async def state(self) -> _State:
        """The image's metadata and prefix index, read once per store.

        Concurrent callers share one load, which runs as its own task: a
        caller that is cancelled stops waiting without cancelling the load
        the others are waiting for.
        """
        if self._state is not None:
            return self._state
        loop = asyncio.get_running_loop()
        with self._lock:
            task = self._loading.get(loop)
            if task is None:
                task = loop.create_task(self._load())
                self._loading[loop] = task
                task.add_done_callback(self._loaded)
        return await asyncio.shield(task)

    def _loaded(self, task: asyncio.Task) -> None:
        with self._lock:
            if self._loading.get(task.get_loop()) is task:
                del self._loading[task.get_loop()]  # a failed load is retried by the next read
        if not task.cancelled() and task.exception() is None:  # (marks the error retrieved)
            self._state = task.result()

    @property
    def info(self) -> ImageInfo:
        """The image's :class:`ImageInfo` (loads the index on first use)."""

        return sync(self.state()).info

    @property
    def physical(self) -> Store:
        """The read-only zarr store of the physical image group this store serves."""
        return self._physical

    @property
    def index(self) -> np.ndarray:

        return sync(self.state()).index

    async def _load(self) -> _State:

        proto = default_buffer_prototype()
        raw = await self._physical.get("zarr.json", proto)
        if raw is None:
            raise no_group(self._source, str(self._source))
        raw = raw.to_bytes()
        doc = json.loads(raw)
        attrs = doc.get("attributes", {}).get(ATTR)
        if attrs is None:
            raise not_an_image(str(self._source), doc.get("attributes", {}))
        info = ImageInfo.from_json(attrs, where=str(self._source))
        if not info.complete:
            raise IncompleteImageError(
                f"{self._source}: the image was not completely written; convert it again"
            )
        shared_key = None
        if info.write_id and self._identity is not None:
            shared_key = (self._identity, hashlib.sha256(raw).digest())
            with _SHARED_LOCK:
                state = _SHARED.get(shared_key)
                if state is not None:
                    _SHARED.move_to_end(shared_key)
                    return state
        index_array = await za.open_array(
            store=StorePath(self._physical, INDEX), mode="r", zarr_format=3)
        index = np.asarray(await index_array.getitem(...))
        expected = info.grid + (info.levels + 1,)
        if index.shape != expected:
            raise ValueError(
                f"{self._source}: prefix index has shape {index.shape}, expected {expected}"
            )
        state = _State(info, index, self._metadata(info, doc), self._chunk_keys(info, index))
        if shared_key is not None:
            with _SHARED_LOCK:
                _SHARED[shared_key] = state
                while len(_SHARED) > _SHARED_MAX:
                    _SHARED.popitem(last=False)
        return state

    @staticmethod
    def _chunk_keys(info: ImageInfo, index: np.ndarray) -> tuple[str, ...]:
        present = np.argwhere(index[..., 0] > 0)
        return tuple("/".join(map(str, c)) for c in present)

    def _metadata(self, info: ImageInfo, root_doc: Mapping[str, Any]) -> dict[str, bytes]:
        meta: dict[str, bytes] = {}
        root_attrs: dict[str, Any] = {ATTR: root_doc["attributes"][ATTR]}
        ome = ome_multiscales(info)
        if ome is not None:
            root_attrs["ome"] = ome
        image_attrs = {}
        if info.values.kind == "quantized":
            # CF attributes: xarray decodes them to the caller's values.
            image_attrs = {"scale_factor": info.values.scale, "add_offset": info.values.offset}
        for k in range(info.levels + 1):
            level_attrs = {
                "level": k,
                "spacing": list(info.level_spacing(k)),
                "affine": info.level_affine(k).tolist(),
            }
            shape = info.level_shape(k)
            meta[f"s{k}/{IMAGE}/zarr.json"] = array_doc(
                shape, info.level_chunks(k), info.stored_dtype,
                [codec_config(info.levels, skipres=k)], info.dims, attributes=image_attrs,
            )
            for axis, d in enumerate(info.dims):
                if d == "c":
                    continue
                n = shape[axis]
                coords = np.arange(n, dtype="<f8") * info.level_spacing(k)[axis]
                unit = "mm" if d in "zyx" else "s"
                meta[f"s{k}/{d}/zarr.json"] = array_doc(
                    (n,), (n,), "float64", BYTES_LE, (d,), fill_value=0.0,
                    attributes={"units": unit, "long_name": f"{d} position from the first sample"},
                )
                meta[f"s{k}/{d}/c/0"] = coords.tobytes()
            meta[f"s{k}/zarr.json"] = group_doc({ATTR: level_attrs})
        meta["zarr.json"] = group_doc(root_attrs, {
            key[: -len("/zarr.json")]: doc for key, doc in meta.items()
            if key.endswith("/zarr.json")})
        return meta

    # -- the key map ----------------------------------------------------------
    def resolve(self, state: _State, key: str) -> tuple[str, int, int] | None:
        """Virtual chunk key -> ``(physical key, level, prefix length)``; None if absent.

        Raises KeyError for keys that are not chunk keys of the image. Only the
        keys ``list`` returns are chunk keys: ``s01/...`` or ``c/00`` spell a
        chunk differently and are not.
        """
        m = _CHUNK_KEY.fullmatch(key)
        if m is None:
            raise KeyError(key)
        k = int(m.group(1))
        coords = tuple(int(c) for c in m.group(2)[1:].split("/"))
        if k > state.info.levels or len(coords) != len(state.info.grid) or any(
            c >= g for c, g in zip(coords, state.info.grid)
        ):
            raise KeyError(key)
        length = int(state.index[coords + (k,)])
        if length == 0:
            return None
        return f"{IMAGE}/c{m.group(2)}", k, length

    async def locate(self, key: str) -> bytes | tuple[str, int, int] | None:
        """What virtual ``key`` is, without reading a chunk: a metadata document's bytes,
        ``(physical key, level, prefix length)`` for a stored chunk, or None (an absent
        chunk, or not a key of the view). For servers and reference files that hand out
        the physical bytes themselves."""
        state = await self.state()
        if key in state.meta:
            return state.meta[key]
        try:
            return self.resolve(state, key)
        except KeyError:
            return None

    def _plan(self, state: _State, key: str, byte_range: ByteRequest | None
              ) -> _Fetch | bytes | None:
        """Metadata or cached bytes, None (absent), or the chunk read to make."""
        if byte_range is not None and not isinstance(byte_range, _RANGE_TYPES):
            raise ValueError(f"Unexpected byte_range, got {byte_range!r}")  # zarr's wording
        if key in state.meta:
            return state.meta[key]
        try:
            target = self.resolve(state, key)
        except KeyError:
            return None
        if target is None:
            return None
        physical, k, length = target
        if self._prefixes is None:
            if k == 0:
                return _Fetch(key, physical, 0, length, b"", byte_range)
            return _Fetch(key, physical, k, length, b"", RangeByteRequest(0, length + 2))
        # level 0 needs the whole chunk, level k its prefix and the two bytes after it
        need = length + 2 if k else length
        head = self._prefixes.get(physical)
        if len(head) >= need:
            return _Fetch(key, physical, k, length, head[:need], None, needed=False)
        if k:
            request = RangeByteRequest(len(head), need)
        else:
            request = OffsetByteRequest(len(head)) if head else None
        return _Fetch(key, physical, k, length, head, request)

    def _finish(self, fetch: _Fetch, buf: Buffer | None, prototype: BufferPrototype,
                byte_range: ByteRequest | None) -> Buffer:
        if fetch.needed and buf is None:
            raise PrefixError(f"chunk {fetch.key!r}: indexed as present but "
                              f"{fetch.physical!r} is missing")
        if self._prefixes is None:
            if fetch.level == 0:
                return buf
            data = buf.as_numpy_array()
            self._check(fetch, len(data), data[fetch.length : fetch.length + 2].tobytes())
            return _slice(buf[: fetch.length], byte_range)
        data = fetch.head + (buf.to_bytes() if buf is not None else b"")
        self._check(fetch, len(data), data[fetch.length : fetch.length + 2])
        self._prefixes.put(fetch.physical, data)
        return _slice(prototype.buffer.from_bytes(data[: fetch.length]), byte_range)

    @staticmethod
    def _check(fetch: _Fetch, size: int, tail: bytes) -> None:
        """Raise unless the bytes read end where the index says (see module docstring)."""
        if fetch.level == 0:
            if size != fetch.length:
                raise PrefixError(
                    f"chunk {fetch.key!r}: {fetch.physical!r} holds {size} bytes, the index "
                    f"says {fetch.length}; the prefix index is wrong or the chunk changed")
            return
        if size != fetch.length + 2 or not is_boundary(tail):
            found = tail.hex() or "end of data"
            raise PrefixError(
                f"chunk {fetch.key!r}: the level-{fetch.level} prefix of {fetch.length} bytes "
                f"in {fetch.physical!r} does not end on a tile-part boundary (expected marker "
                f"ff90 or ffd9 after it, found {found} in {size} bytes); the prefix index is "
                "wrong or the chunk changed"
            )

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        plan = self._plan(await self.state(), key, byte_range)
        if not isinstance(plan, _Fetch):
            return None if plan is None else _slice(prototype.buffer.from_bytes(plan), byte_range)
        buf = None
        if plan.needed:
            buf = await self._physical.get(plan.physical, prototype, plan.request)
        return self._finish(plan, buf, prototype, byte_range)

    # -- zarr's synchronous fast path, offered when the physical store has one --
    @property
    def _supports_sync_io(self) -> bool:
        return supports_sync_io(self._physical)

    def get_sync(self, key: str, *, prototype: BufferPrototype | None = None,
                 byte_range: ByteRequest | None = None) -> Buffer | None:
        prototype = prototype or default_buffer_prototype()
        state = self._state
        if state is None:

            state = sync(self.state())
        plan = self._plan(state, key, byte_range)
        if not isinstance(plan, _Fetch):
            return None if plan is None else _slice(prototype.buffer.from_bytes(plan), byte_range)
        buf = None
        if plan.needed:
            buf = self._physical.get_sync(plan.physical, prototype=prototype,
                                          byte_range=plan.request)
        return self._finish(plan, buf, prototype, byte_range)

    def set_sync(self, key: str, value: Buffer) -> None:
        self._check_writable()

    def delete_sync(self, key: str) -> None:
        self._check_writable()

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        # bounded like zarr's own chunk reads: a remote store gets at most
        # ``async.concurrency`` requests in flight

        slots = asyncio.Semaphore(config.get("async.concurrency") or 10)

        async def one(key: str, byte_range: ByteRequest | None) -> Buffer | None:
            async with slots:
                return await self.get(key, prototype, byte_range)

        return list(await asyncio.gather(*(one(k, r) for k, r in key_ranges)))

    async def exists(self, key: str) -> bool:
        state = await self.state()
        if key in state.meta:
            return True
        try:
            return self.resolve(state, key) is not None
        except KeyError:
            return False

    async def getsize(self, key: str) -> int:
        """Size of ``key``'s value, from the index (no chunk is read)."""
        state = await self.state()
        if key in state.meta:
            return len(state.meta[key])
        try:
            target = self.resolve(state, key)
        except KeyError:
            target = None
        if target is None:
            raise FileNotFoundError(key)
        return target[2]

    async def set(self, key: str, value: Buffer) -> None:
        self._check_writable()

    async def delete(self, key: str) -> None:
        self._check_writable()

    async def list(self) -> AsyncIterator[str]:
        state = await self.state()
        for key in state.meta:
            yield key
        for k in range(state.info.levels + 1):
            for c in state.chunk_keys:
                yield f"s{k}/{IMAGE}/c/{c}"

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        async for key in self.list():
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        prefix = prefix.rstrip("/")
        seen = set()
        async for key in self.list_prefix(f"{prefix}/" if prefix else ""):
            child = key[len(prefix) + 1 if prefix else 0 :].split("/", 1)[0]
            if child not in seen:
                seen.add(child)
                yield child


def _slice(buf: Buffer, byte_range: ByteRequest | None) -> Buffer:
    if byte_range is None:
        return buf
    n = len(buf)
    if isinstance(byte_range, RangeByteRequest):
        return buf[byte_range.start : min(byte_range.end, n)]
    if isinstance(byte_range, OffsetByteRequest):
        return buf[byte_range.offset :]
    if isinstance(byte_range, SuffixByteRequest):
        return buf[max(0, n - byte_range.suffix) :]
    raise ValueError(f"Unexpected byte_range, got {byte_range!r}")
