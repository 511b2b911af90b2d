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
loop, decoding on the pool as the bytes arrive (the reading itself:
:mod:`mist_zarr.reads`). At a coarse level the fixed costs are of the size
of the decode, so a local read reuses each thread's buffers for the prefix
bytes and, when the stored samples are only an intermediate (uint8 values
stored as int16), for the decoded samples: callers always get arrays of
their own.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import imagecodecs
import numpy as np
import zarr
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
from .reads import Reader, default_threads, pool, read_small_array, remote, run, scratch
from .storage import no_group, open_source_store
from .store import MultiscaleStore
from .values import ValueMapping

__all__ = ["ChecksumError", "OpenedImage", "default_threads", "derived", "open_direct"]

_pool = pool  # the name batch and the benchmarks know

# Requests in flight per level read on remote stores.
CONCURRENCY = 16


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
    # what readers above derive from this write once (see derived())
    derived: dict[Any, Any] = field(default_factory=dict)
    key: tuple[Any, ...] | None = None  # its key in _PARSED


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


def derived(image: OpenedImage, name: Any, make: Callable[[], Any],
            nbytes: Callable[[Any], int]) -> Any:
    """``make()``, made once per image write and kept with what its opens share (counted,
    by ``nbytes``, in the bound of that cache). Callers must not change what it returns."""
    global _parsed_bytes
    entry = image._parsed
    if entry is None:  # an image write that is not shared (incomplete, no write id)
        return make()
    value = entry.derived.get(name)
    if value is None:
        value = make()
        with _PARSED_LOCK:
            if name not in entry.derived:
                entry.derived[name] = value
                size = nbytes(value)
                entry.size += size
                if entry.key is not None and _PARSED.get(entry.key) is entry:
                    _parsed_bytes += size  # still held (an evicted entry is no longer counted)
            value = entry.derived[name]
    return value


def _forget_parsed() -> None:
    global _parsed_bytes, _PARSED_LOCK
    _PARSED.clear()
    _parsed_bytes = 0
    _PARSED_LOCK = threading.Lock()


def _after_fork() -> None:
    # a forked child keeps the entries (they are still keyed on each image's zarr.json) but
    # not a lock another thread of the parent may have held
    global _PARSED_LOCK
    _PARSED_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


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
    reader: Reader = field(repr=False)
    _crcs: np.ndarray | None = field(default=None, repr=False)
    _parsed: _Parsed | None = field(default=None, repr=False)

    def checksums(self) -> np.ndarray:
        if self._crcs is None and self._parsed is not None:
            self._crcs = self._parsed.crcs
        if self._crcs is None:
            self._crcs = read_small_array(self.reader, CHECKSUM,
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
        blob = read_small_array(self.reader, SLICE_METADATA,
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
        if region is not None and _whole_level(region, self.info.level_shape(k)):
            region = None  # the cached plan of the whole level
        return _LevelRead(self, k, region, verify).run(threads)

    def read_values(self, k: int = 0, *, region: Sequence[slice] | None = None,
                    threads: int | None = None, verify: bool = True) -> np.ndarray:
        """:meth:`read`, decoded to the caller's values (:meth:`ValueMapping.decode`)."""
        values = self.info.values
        if region is not None and _whole_level(region, self.info.level_shape(k)):
            region = None
        if _stored_are_values(values):
            return _LevelRead(self, k, region, verify).run(threads)
        # the stored samples are an intermediate: read them into this thread's buffer
        plan = self._parsed.plans.get(k) if self._parsed is not None and region is None else None
        stored = None
        if plan is not None and len(plan.requests) == 1 and plan.longest and plan.direct[0]:
            stored = self._one_chunk(plan, k)  # a small image's one chunk
        if stored is None:
            stored = _LevelRead(self, k, region, verify, reuse=True).run(threads)
        result = values.decode(stored)
        return result.copy() if np.may_share_memory(result, stored) else result

    def _one_chunk(self, plan: _Plan, k: int) -> np.ndarray | None:
        """The one chunk of a reduced level of a local image, decoded into this thread's
        buffer: what :class:`_LevelRead` does for it without its bookkeeping, which costs
        a quarter of such a decode. None for anything unusual (not local, missing, wrong
        boundary, undecodable): the general read then raises the right error."""
        reader, (key, length) = self.reader, plan.requests[0]
        buf = scratch("read", length) if reader.is_local else None
        count = math.prod(plan.out_shape)
        dtype = self.info.stored_dtype
        samples = scratch("samples", count * dtype.itemsize)
        if buf is None or samples is None:
            return None
        try:
            fd = os.open(f"{reader.root}/{reader.prefix}{key}", os.O_RDONLY)
        except OSError:
            return None
        try:
            view = memoryview(buf)[:length]
            data = view[:os.preadv(fd, [view], 0)]
        finally:
            os.close(fd)
        if len(data) != length or not is_boundary(data[length - 2:]):
            return None
        out = np.frombuffer(samples, dtype, count).reshape(plan.out_shape)
        try:
            imagecodecs.htj2k_decode(data[:length - 2], skipres=k, out=out.reshape(plan.plane))
        except Exception:  # noqa: BLE001 - reported by the general read
            return None
        return out


@functools.lru_cache(maxsize=256)
def _stored_are_values(values: ValueMapping) -> bool:
    """The stored samples are already the caller's values (no decoding step)."""
    return values.kind != "quantized" and np.dtype(values.dtype) == np.dtype(values.stored_dtype)


def _whole_level(region: Sequence[slice], shape: Sequence[int]) -> bool:
    return len(region) == len(shape) and all(
        s.step in (None, 1) and s.start in (None, 0) and (s.stop is None or s.stop >= n)
        for s, n in zip(region, shape))


def open_direct(source: Any, *, storage_options: Mapping[str, Any] | None = None,
                allow_incomplete: bool = False) -> OpenedImage:
    """Open the mist-zarr image at ``source`` (path, URL, zarr store, group or
    :class:`MultiscaleStore`) for direct reads."""
    reader, where = _locate(source, storage_options)
    if reader.is_local:  # a hit needs only zarr.json; a miss reads the index docs next
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
    if reader.is_local:
        docs[1] = reader.get(f"{INDEX}/zarr.json")
    if info.complete or docs[1] is not None:
        index = read_small_array(reader, INDEX, docs[1])
    else:  # an incomplete image may not have its index yet: level 0 only
        index = np.zeros(info.grid + (info.levels + 1,), np.uint64)
    expected = info.grid + (info.levels + 1,)
    if index.shape != expected:
        raise ValueError(f"{where}: prefix index has shape {index.shape}, expected {expected}")
    entry = None
    if key is not None and info.complete and info.write_id:  # only a finished, identified write
        index.flags.writeable = False  # shared by every open of this write
        entry = _Parsed(info, index, len(docs[0]) + 2 * index.nbytes, key=key)
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


def _locate(source: Any, storage_options: Mapping[str, Any] | None) -> tuple[Reader, str]:

    if type(source) is str and ("://" not in source or source.startswith("file://")):
        return Reader.local(source.removeprefix("file://")), source  # the common cases first
    if isinstance(source, os.PathLike):
        return Reader.local(os.fspath(source)), str(source)
    if isinstance(source, MultiscaleStore):
        return Reader(source.physical, "", source.prefix_cache), repr(source)
    if isinstance(source, zarr.Group):
        source = source.store_path
    if isinstance(source, StorePath):
        return Reader(source.store, source.path), str(source)
    if isinstance(source, str) and ("://" not in source or source.startswith("file://")):
        return Reader.local(source.removeprefix("file://")), str(source)  # a str subclass
    return Reader(open_source_store(source, storage_options), ""), str(source)


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
    chunks: tuple[int, ...]  # the level's chunk shape
    # per chunk: it decodes straight into its (C-contiguous) place in the output
    direct: list[bool] = field(default_factory=list)
    longest: int = 0  # the longest request, in bytes (0: whole chunks)


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
    out_shape = tuple(s.stop - s.start for s in region)
    plane = chunks[iy:] if all(c == 1 for c in chunks[:iy]) else None
    direct = [plane is not None and whole and _contiguous(dst, out_shape)
              for _, dst, whole in places]
    return _Plan(out_shape=out_shape, coords=coords, requests=requests, places=places,
                 plane=plane, chunks=chunks, direct=direct,
                 longest=max((n or 0 for _, n in requests), default=0))


def _contiguous(block: Sequence[slice], shape: Sequence[int]) -> bool:
    """Whether ``block`` of a C-order array of ``shape`` is one contiguous run."""
    partial = False  # an axis after this one (going left) is not spanned whole
    for s, n in zip(reversed(block), reversed(shape)):
        extent = s.stop - s.start
        if partial and extent != 1:
            return False
        partial = partial or extent != n
    return True


class _LevelRead:
    """The chunks of one level (or of a region of it) read, verified and decoded into ``out``."""

    def __init__(self, image: OpenedImage, k: int, region: Sequence[slice] | None,
                 verify: bool, reuse: bool = False) -> None:
        info = image.info
        if not 0 <= k <= info.levels:
            raise ValueError(f"{image.where}: level must be in 0..{info.levels}, found {k}")
        if k and not info.complete:
            raise IncompleteImageError(f"{image.where}: reduced levels of an incompletely "
                                       "written image have no prefix index")
        self.image, self.k, self.info = image, k, info
        shared = image._parsed
        plan = shared.plans.get(k) if shared is not None and region is None else None
        if plan is None:
            plan = _plan(image, k, region)
            if shared is not None and region is None:
                shared.plans[k] = plan
        self.plan, self.chunks = plan, plan.chunks
        dtype = info.stored_dtype
        count = math.prod(plan.out_shape)
        buf = scratch("samples", count * dtype.itemsize) if reuse else None
        self.out = (np.empty(plan.out_shape, dtype) if buf is None else
                    np.frombuffer(buf, dtype, count).reshape(plan.out_shape))
        self.crcs = image.checksums() if verify and k == 0 else None

    def run(self, threads: int | None) -> np.ndarray:
        todo = range(len(self.plan.coords))
        if not todo or not self.out.size:
            return self.out
        reader = self.image.reader
        if reader.is_local or (reader.sync and reader.cache is None and not remote(reader.store)):
            n = max(1, min(threads or default_threads(), len(todo)))
            if n == 1:
                self._all(todo)
            else:  # one task per thread: per-chunk hand-offs cost as much as a coarse decode
                list(_pool(n).map(self._all, [todo[i::n] for i in range(n)]))
        else:
            run(self._fetch_all(todo, max(1, threads or default_threads())))
        return self.out

    def _all(self, todo: Iterable[int]) -> None:
        reader, plan = self.image.reader, self.plan
        buf = scratch("read", plan.longest) if reader.is_local and plan.longest else None
        if buf is None or self.crcs is not None:
            for i in todo:
                self._place(i, self._fetch(i))
            return
        # a local folder at a reduced level: the steps of _fetch, _checked and _place inlined,
        # since their calls cost as much as decoding a small chunk
        base, view, k, out = f"{reader.root}/{reader.prefix}", memoryview(buf), self.k, self.out
        for i in todo:
            key, length = plan.requests[i]
            if key is None or not plan.direct[i]:
                self._place(i, self._fetch(i))
                continue
            try:
                fd = os.open(base + key, os.O_RDONLY)
            except (FileNotFoundError, NotADirectoryError):
                self._checked(plan.coords[i], key, length, None)  # raises
            try:
                data = view[:os.preadv(fd, [view[:length]], 0)]
            finally:
                os.close(fd)
            if len(data) != length or not is_boundary(data[length - 2:]):
                self._checked(plan.coords[i], key, length, bytes(data))  # raises
            try:
                imagecodecs.htj2k_decode(data[:length - 2], skipres=k,
                                         out=out[plan.places[i][1]].reshape(plan.plane))
            except Exception as exc:
                raise self._undecodable(plan.coords[i], exc) from exc

    def _undecodable(self, coords: tuple[int, ...], exc: Exception) -> ValueError:
        return ValueError(f"{self.image.where}: level-{self.k} chunk {coords} does not decode "
                          f"to {self.chunks} {self.info.stored_dtype}: {exc}")

    async def _fetch_all(self, todo: Iterable[int], threads: int) -> None:
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(CONCURRENCY)
        workers = pool(threads)

        async def one(i: int) -> None:
            key, length = self.plan.requests[i]
            if key is None:
                data = None
            else:
                async with gate:
                    data = await self.image.reader.aget(key, length)
            await loop.run_in_executor(workers, self._place, i,
                                       self._checked(self.plan.coords[i], key, length, data))

        await asyncio.gather(*(one(i) for i in todo))

    def _fetch(self, i: int) -> bytes | memoryview | None:
        key, length = self.plan.requests[i]
        reader = self.image.reader
        data = (None if key is None else reader.get(key) if length is None else
                reader.get_prefix(key, length))
        return self._checked(self.plan.coords[i], key, length, data)

    def _checked(self, coords: tuple[int, ...], key: str | None, length: int | None,
                 data: bytes | None) -> bytes | memoryview | None:
        """The prefix to decode, once its boundary is checked (see the module docstring)."""
        if key is None or length is None:
            return data
        if data is None:
            self.image.require_image_array()
            raise PrefixError(f"{self.image.where}: level-{self.k} chunk {coords}: indexed as "
                              f"present but {key!r} is missing")
        prefix = length - 2
        if len(data) != length or not is_boundary(data[prefix:]):
            found = data[prefix:].hex() or "end of data"
            raise PrefixError(
                f"{self.image.where}: level-{self.k} chunk {coords}: the prefix of {prefix} bytes in {key!r} does not end on a tile-part "
                f"boundary (expected marker ff90 or ffd9 after it, found {found} in "
                f"{len(data)} bytes); the prefix index is wrong or the chunk changed")
        return memoryview(data)[:prefix]

    def _place(self, i: int, data: bytes | memoryview | None) -> None:
        """Decode chunk ``i`` of the plan into its place in ``out`` (checksum first at level 0)."""
        coords = self.plan.coords[i]
        src, dst, _ = self.plan.places[i]
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
            if self.plan.direct[i]:
                imagecodecs.htj2k_decode(data, skipres=self.k or None, out=target.reshape(plane))
                decoded = target
            else:
                decoded = imagecodecs.htj2k_decode(data, skipres=self.k or None
                                                   ).reshape(self.chunks)
        except Exception as exc:
            raise self._undecodable(coords, exc) from exc
        if self.crcs is not None and chunk_crc(decoded) != int(self.crcs[coords]):
            raise ChecksumError(
                f"{self.image.where}: chunk {coords}: decoded samples do not match the checksum "
                "written with them (the chunk is damaged, or the image was replaced during "
                "this read)")
        if decoded is not target:
            target[...] = decoded[src]
