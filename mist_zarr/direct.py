"""Read any level of a stored image directly: one verified prefix read and one decode per chunk.

zarr's generic path has a fixed cost per open (array metadata parsing, two
thread hand-offs per chunk, xarray's decoding) and a cost per chunk that
exceed decoding a coarse level (figures: docs/results.md). This module reads
the same physical group (the same ``zarr.json``, the same prefix index, the
same chunk objects) through the same zarr store, and decodes each level-k
prefix with ``imagecodecs.htj2k_decode(prefix, skipres=k)`` straight into the
output array. As in :class:`mist_zarr.MultiscaleStore`, every level-k read
asks for the indexed prefix plus two bytes and checks that they begin a
tile-part or end the stream: a prefix of the wrong length would decode,
without error, into a wrong image. Level-0 chunks are checked against the
CRC32C written with them.

Stores with synchronous I/O (local files, memory) are read on a thread pool;
others (HTTP, object stores) with bounded concurrent requests on zarr's event
loop, decoding on the pool as the bytes arrive.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import imagecodecs
import numcodecs
import numpy as np
import zarr
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import StorePath

from .codestream import is_boundary
from .errors import ChecksumError, PrefixError
from .format import (
    ATTR,
    CHECKSUM,
    IMAGE,
    INDEX,
    SLICE_METADATA,
    ImageInfo,
    IncompleteImageError,
    chunk_crc,
    not_an_image,
)
from .prefix_cache import PrefixCache
from .storage import no_group, open_source_store, supports_sync_io
from .store import MultiscaleStore, source_identity

__all__ = ["ChecksumError", "OpenedImage", "open_direct"]

# Requests in flight per level read on remote stores.
CONCURRENCY = 16
_WHOLE = object()  # a cache miss of a whole chunk: read it all
_CHUNKS = f"{IMAGE}/c/"  # only chunk reads go through a prefix cache


def _remote(store: Store) -> bool:
    """Requests to ``store`` have latency: issue them concurrently."""
    return type(store).__name__ not in ("LocalStore", "MemoryStore")


# -- one thread pool per size, per process -----------------------------------------------
_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(size: int) -> ThreadPoolExecutor:
    """A persistent pool: starting threads on every read would cost more than a coarse level."""
    with _POOLS_LOCK:
        pool = _POOLS.get(size)
        if pool is None:
            pool = _POOLS[size] = ThreadPoolExecutor(size, thread_name_prefix="mist-decode")
        return pool


def _forget_pools() -> None:  # a forked child (DataLoader worker) has none of the threads
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


def default_threads() -> int:
    return min(32, os.cpu_count() or 1)


# -- what an open parses, kept per image write ----------------------------------------------
@dataclass
class _Parsed:
    """An image's parsed documents: its info, prefix index, checksums (once read) and the
    chunk plan of each whole level. Shared by every open of the same write."""

    info: ImageInfo
    index: np.ndarray
    size: int
    crcs: np.ndarray | None = None
    plans: dict[int, "_Plan"] = field(default_factory=dict)


# Keyed on (where the image is, SHA-256 of its zarr.json): every write records a fresh
# write id in zarr.json, so a rewritten image (or another image at the same path) never
# finds the entry of the old one. Each open still reads zarr.json to check this.
_PARSED: OrderedDict[tuple[Any, ...], _Parsed] = OrderedDict()
_PARSED_LOCK = threading.Lock()
_PARSED_MAX = 4096  # entries
_PARSED_BYTES = 64 << 20  # documents + index + checksum bytes held
_parsed_bytes = 0


def _parsed(key: tuple[Any, ...] | None) -> _Parsed | None:
    if key is None:
        return None
    with _PARSED_LOCK:
        entry = _PARSED.get(key)
        if entry is not None:
            _PARSED.move_to_end(key)
        return entry


def _keep_parsed(key: tuple[Any, ...], entry: _Parsed) -> None:
    global _parsed_bytes
    with _PARSED_LOCK:
        old = _PARSED.pop(key, None)
        _parsed_bytes += entry.size - (old.size if old is not None else 0)
        _PARSED[key] = entry
        while _PARSED and (len(_PARSED) > _PARSED_MAX or _parsed_bytes > _PARSED_BYTES):
            _parsed_bytes -= _PARSED.popitem(last=False)[1].size


def _forget_parsed() -> None:
    global _parsed_bytes, _PARSED_LOCK
    _PARSED.clear()
    _parsed_bytes = 0
    _PARSED_LOCK = threading.Lock()


def _after_fork() -> None:
    _forget_pools()
    # a forked child keeps the entries (they are still keyed on each image's zarr.json) but
    # not a lock another thread of the parent may have held
    global _PARSED_LOCK
    _PARSED_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


# -- reading the group's own documents ----------------------------------------------------
def _run(coro: Any) -> Any:

    return sync(coro)


class _Reader:
    """Whole objects and byte ranges of one store under a key prefix, sync or async."""

    def __init__(self, store: Store, prefix: str, cache: PrefixCache | None = None) -> None:
        self.store = store
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.sync = supports_sync_io(store)
        root = getattr(store, "root", None)
        # LocalStore: a plain pread costs a fifth of get_sync (no Buffer, pathlib, file object)
        self.root = os.fspath(root) if type(store).__name__ == "LocalStore" and root else None
        # a MultiscaleStore's prefix cache: a finer level fetches only the bytes beyond
        # the prefix already held (see mist_zarr.progressive)
        self.cache = cache

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
    def local(self) -> bool:
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
            buf = _run(self.store.get(self.prefix + key, self.proto,
                                      None if request is _WHOLE else request))
            return self._keep(key, head, buf)
        if self.root is not None:
            try:
                fd = os.open(os.path.join(self.root, self.prefix + key), os.O_RDONLY)
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
            buf = _run(self.store.get(self.prefix + key, self.proto, request))
        return None if buf is None else buf.to_bytes()

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
        if self.sync or self.root is not None or not _remote(self.store):
            return [self.get(k) for k in keys]

        async def all_of() -> list[bytes | None]:
            return list(await asyncio.gather(*(self.aget(k) for k in keys)))

        return _run(all_of())


def _small_array(reader: _Reader, name: str, doc: bytes | None) -> np.ndarray:
    """A one-chunk array of the image group (the index, the checksums), decoded by numcodecs.

    zarr's array machinery costs more than decoding these few hundred bytes; the
    writer stores them as one chunk with ``bytes`` (+ ``zstd``) codecs. Any
    other layout goes through zarr.
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


# -- an opened image ----------------------------------------------------------------------
@dataclass
class OpenedImage:
    """An image opened for direct reads: where it is, its :class:`ImageInfo` and prefix index.

    Opening reads ``zarr.json`` and the prefix index (three objects; over HTTP
    three requests in two round trips). The checksums are read on the
    first verified level-0 read.
    """

    where: str
    info: ImageInfo
    index: np.ndarray
    reader: _Reader = field(repr=False)
    _crcs: np.ndarray | None = field(default=None, repr=False)
    _parsed: _Parsed | None = field(default=None, repr=False)

    def checksums(self) -> np.ndarray:
        if self._crcs is None and self._parsed is not None:
            self._crcs = self._parsed.crcs
        if self._crcs is None:
            self._crcs = _small_array(self.reader, CHECKSUM,
                                      self.reader.get(f"{CHECKSUM}/zarr.json"))
            if self._crcs.shape != self.info.grid:
                raise ValueError(f"{self.where}: checksum array has shape {self._crcs.shape}, "
                                 f"expected {self.info.grid}")
            if self._parsed is not None:
                self._crcs.flags.writeable = False
                self._parsed.crcs = self._crcs
        return self._crcs

    def require_image_array(self) -> None:
        """FileNotFoundError when the group has no image array (a chunk was found missing:
        say why, rather than report a damaged chunk)."""
        if self.reader.get(f"{IMAGE}/zarr.json") is None:
            raise FileNotFoundError(
                f"{self.where}: the image group has no {IMAGE!r} array (the image was removed "
                "or replaced while it was being read, or the group is damaged)")

    def slice_metadata(self) -> dict[str, Any]:
        """The per-slice part of the source metadata (``slice_metadata`` array; {} if none)."""
        if not self.info.metadata.get(SLICE_METADATA):
            return {}
        blob = _small_array(self.reader, SLICE_METADATA,
                            self.reader.get(f"{SLICE_METADATA}/zarr.json"))
        return json.loads(blob.tobytes())

    def read(self, k: int = 0, *, region: Sequence[slice] | None = None,
             threads: int | None = None, verify: bool = True) -> np.ndarray:
        """Stored samples of level ``k`` (all of it, or the chunks covering ``region``).

        ``region`` is one slice per axis in level-k coordinates; the result is
        exactly that region. With ``verify`` level-0 chunks are checked
        against their CRC32C (reduced levels have no checksum; their prefix
        boundaries are always checked).
        """
        return _LevelRead(self, k, region, verify).run(threads)


def open_direct(source: Any, *, storage_options: Mapping[str, Any] | None = None,
                allow_incomplete: bool = False) -> OpenedImage:
    """Open the mist-zarr image at ``source`` (path, URL, zarr store, group or
    :class:`MultiscaleStore`) for direct reads."""
    reader, where = _locate(source, storage_options)
    if reader.local:  # a hit needs only zarr.json; a miss reads the index docs next
        docs = [reader.get("zarr.json"), None]
    else:  # one round trip for both documents
        docs = reader.get_many(["zarr.json", f"{INDEX}/zarr.json"])
    if docs[0] is None:
        raise no_group(source, where)
    ident = reader.identity()
    key = None if ident is None else (*ident, hashlib.sha256(docs[0]).digest())
    hit = _parsed(key)
    if hit is not None:
        return OpenedImage(where, hit.info, hit.index, reader, _parsed=hit)
    try:
        group_attrs = json.loads(docs[0]).get("attributes", {})
    except ValueError as exc:
        raise ValueError(f"{where}: zarr.json is not valid JSON: {exc}") from None
    info = image_info(group_attrs.get(ATTR), where, allow_incomplete, group_attrs)
    if reader.local:
        docs[1] = reader.get(f"{INDEX}/zarr.json")
    if info.complete or docs[1] is not None:
        index = _small_array(reader, INDEX, docs[1])
    else:  # an incomplete image may not have its index yet: level 0 only
        index = np.zeros(info.grid + (info.levels + 1,), np.uint64)
    expected = info.grid + (info.levels + 1,)
    if index.shape != expected:
        raise ValueError(f"{where}: prefix index has shape {index.shape}, expected {expected}")
    entry = None
    if key is not None and info.complete and info.write_id:  # only a finished, identified write
        index.flags.writeable = False  # shared by every open of this write
        entry = _Parsed(info, index, len(docs[0]) + 2 * index.nbytes)
        _keep_parsed(key, entry)
    return OpenedImage(where, info, index, reader, _parsed=entry)


def image_info(attrs: Mapping[str, Any] | None, where: str, allow_incomplete: bool,
               group_attrs: Mapping[str, Any] | None = None) -> ImageInfo:
    """The :class:`ImageInfo` of a group's ``mist`` attribute; errors for a group that is
    not a mist-zarr image (saying what it is, from all its ``group_attrs``), or (unless
    ``allow_incomplete``) not completely written."""
    if attrs is None:
        raise not_an_image(where, group_attrs or {})
    info = ImageInfo.from_json(attrs, where=where)
    if not info.complete and not allow_incomplete:
        raise IncompleteImageError(
            f"{where}: the image was not completely written (interrupted or failed write); "
            "convert it again")
    return info


def _locate(source: Any, storage_options: Mapping[str, Any] | None) -> tuple[_Reader, str]:

    if isinstance(source, MultiscaleStore):
        return _Reader(source.physical, "", source.prefix_cache), repr(source)
    if isinstance(source, zarr.Group):
        source = source.store_path
    if isinstance(source, StorePath):
        return _Reader(source.store, source.path), str(source)
    return _Reader(open_source_store(source, storage_options), ""), str(source)


# -- one level read -----------------------------------------------------------------------
def _span(c: int, n: int, region: slice) -> tuple[slice, slice, bool]:
    """Chunk ``c`` of edge ``n`` along one axis against ``region``: source slice in the
    chunk, destination slice in the output, and whether the chunk lies wholly inside."""
    lo = c * n
    src = slice(max(region.start - lo, 0), min(region.stop - lo, n))
    dst = slice(lo + src.start - region.start, lo + src.stop - region.start)
    return src, dst, src.stop - src.start == n


@dataclass
class _Plan:
    """Which chunks a read of one level (or region) touches, what to fetch of each and where
    its samples go: computed once per whole level of an image write."""

    out_shape: tuple[int, ...]
    coords: list[tuple[int, ...]]
    requests: list[tuple[str | None, int | None]]  # key (None: not written), bytes (None: all)
    places: list[tuple[tuple[slice, ...], tuple[slice, ...], bool]]  # src, dst, whole chunk
    plane: tuple[int, ...] | None  # the codestream's (y, x[, c]) when the axes before y are 1


def _plan(image: OpenedImage, k: int, region: Sequence[slice] | None) -> _Plan:
    info = image.info
    shape, chunks = info.level_shape(k), info.level_chunks(k)
    if region is None:
        region = tuple(slice(0, n) for n in shape)
    region = tuple(slice(*s.indices(n)[:2]) for s, n in zip(region, shape))
    first = [s.start // c for s, c in zip(region, chunks)]
    last = [max(s.start, s.stop - 1) // c + 1 if s.stop > s.start else s.start // c
            for s, c in zip(region, chunks)]
    axes = [{c: _span(c, n, s) for c in range(a, b)}
            for a, b, n, s in zip(first, last, chunks, region)]
    coords = [tuple(a + c for a, c in zip(first, rel))
              for rel in np.ndindex(*(b - a for a, b in zip(first, last)))]
    requests: list[tuple[str | None, int | None]] = []
    for c in coords:
        key = f"{IMAGE}/c/" + "/".join(map(str, c))
        if k == 0:
            requests.append((key, None))  # level 0 may be read before the index is written
        else:
            length = int(image.index[c + (k,)])
            requests.append((key, length + 2) if length else (None, None))
    places = []
    for c in coords:
        src, dst, whole = zip(*(t[i] for t, i in zip(axes, c)))
        places.append((src, dst, all(whole)))
    iy = info.dims.index("y")
    return _Plan(
        out_shape=tuple(s.stop - s.start for s in region), coords=coords, requests=requests,
        places=places, plane=chunks[iy:] if all(c == 1 for c in chunks[:iy]) else None)


class _LevelRead:
    """The chunks of one level (or of a region of it) read, verified and decoded into ``out``."""

    def __init__(self, image: OpenedImage, k: int, region: Sequence[slice] | None,
                 verify: bool) -> None:
        info = image.info
        if not 0 <= k <= info.levels:
            raise ValueError(f"{image.where}: level must be in 0..{info.levels}, found {k}")
        if k and not info.complete:
            raise IncompleteImageError(f"{image.where}: reduced levels of an incompletely "
                                       "written image have no prefix index")
        self.image, self.k, self.info = image, k, info
        self.chunks = info.level_chunks(k)
        shared = image._parsed
        plan = shared.plans.get(k) if shared is not None and region is None else None
        if plan is None:
            plan = _plan(image, k, region)
            if shared is not None and region is None:
                shared.plans[k] = plan
        self.plan = plan
        self.out = np.empty(plan.out_shape, info.stored_dtype)
        self.crcs = image.checksums() if verify and k == 0 else None

    def run(self, threads: int | None) -> np.ndarray:
        todo = range(len(self.plan.coords))
        if not todo or not self.out.size:
            return self.out
        reader = self.image.reader
        if reader.local or (reader.sync and reader.cache is None and not _remote(reader.store)):
            n = max(1, min(threads or default_threads(), len(todo)))
            if n == 1:
                self._all(todo)
            else:  # one task per thread: per-chunk hand-offs cost as much as a coarse decode
                list(_pool(n).map(self._all, [todo[i::n] for i in range(n)]))
        else:
            _run(self._fetch_all(todo, max(1, threads or default_threads())))
        return self.out

    def _all(self, todo: Iterable[int]) -> None:
        for i in todo:
            self._place(i, self._fetch(i))

    async def _fetch_all(self, todo: Iterable[int], threads: int) -> None:
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(CONCURRENCY)
        pool = _pool(threads)

        async def one(i: int) -> None:
            key, length = self.plan.requests[i]
            if key is None:
                data = None
            else:
                async with gate:
                    data = await self.image.reader.aget(key, length)
            await loop.run_in_executor(pool, self._place, i,
                                       self._checked(self.plan.coords[i], key, length, data))

        await asyncio.gather(*(one(i) for i in todo))

    def _fetch(self, i: int) -> bytes | memoryview | None:
        key, length = self.plan.requests[i]
        data = None if key is None else self.image.reader.get(key, length)
        return self._checked(self.plan.coords[i], key, length, data)

    def _checked(self, coords: tuple[int, ...], key: str | None, length: int | None,
                 data: bytes | None) -> bytes | memoryview | None:
        """The prefix to decode, once its boundary is checked (see the module docstring)."""
        if key is None or length is None:
            return data
        where = f"{self.image.where}: level-{self.k} chunk {coords}"
        if data is None:
            self.image.require_image_array()
            raise PrefixError(f"{where}: indexed as present but {key!r} is missing")
        prefix = length - 2
        if len(data) != length or not is_boundary(data[prefix:]):
            found = data[prefix:].hex() or "end of data"
            raise PrefixError(
                f"{where}: the prefix of {prefix} bytes in {key!r} does not end on a tile-part "
                f"boundary (expected marker ff90 or ffd9 after it, found {found} in "
                f"{len(data)} bytes); the prefix index is wrong or the chunk changed")
        return memoryview(data)[:prefix]

    def _place(self, i: int, data: bytes | memoryview | None) -> None:
        """Decode chunk ``i`` of the plan into its place in ``out`` (checksum first at level 0)."""
        coords = self.plan.coords[i]
        src, dst, whole = self.plan.places[i]
        target = self.out[dst]
        if data is None:  # not written: fill value 0
            zero = np.zeros(self.info.chunks, self.info.stored_dtype)
            if self.crcs is not None and chunk_crc(zero) != int(self.crcs[coords]):
                self.image.require_image_array()
                raise ChecksumError(f"{self.image.where}: chunk {coords} is missing, but its "
                                    "checksum says it held samples other than 0")
            target[...] = 0
            return
        plane = self.plan.plane
        try:
            if plane is not None and whole and target.flags.c_contiguous:
                imagecodecs.htj2k_decode(data, skipres=self.k or None, out=target.reshape(plane))
                decoded = target
            else:
                decoded = imagecodecs.htj2k_decode(data, skipres=self.k or None
                                                   ).reshape(self.chunks)
        except Exception as exc:
            raise ValueError(f"{self.image.where}: level-{self.k} chunk {coords} does not decode "
                             f"to {self.chunks} {self.info.stored_dtype}: {exc}") from exc
        if self.crcs is not None and chunk_crc(decoded) != int(self.crcs[coords]):
            raise ChecksumError(
                f"{self.image.where}: chunk {coords}: decoded samples do not match the checksum "
                "written with them (the chunk is damaged, or the image was replaced during "
                "this read)")
        if decoded is not target:
            target[...] = decoded[src]
