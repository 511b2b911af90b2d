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
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from .codestream import is_boundary
from .format import ATTR, IMAGE, INDEX, ImageInfo, IncompleteImageError
from .layout import codec_config

__all__ = ["MultiscaleStore", "PrefixError", "forget_listings", "open_source_store"]

_CHUNK_KEY = re.compile(r"^s(\d+)/" + IMAGE + r"/c((?:/\d+)+)$")
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


class PrefixError(ValueError):
    """An indexed prefix does not end on a tile-part boundary, or its chunk is missing."""


def open_source_store(source: Any, storage_options: Mapping[str, Any] | None = None) -> Store:
    """A read-only zarr store for a path, ``file://`` / fsspec URL or existing store."""
    if isinstance(source, Store):
        return source if source.read_only else source.with_read_only(True)
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "://" not in source):
        from zarr.storage import LocalStore

        return LocalStore(os.fspath(source), read_only=True)
    if isinstance(source, str):
        if source.startswith("file://"):
            from zarr.storage import LocalStore

            return LocalStore(source.removeprefix("file://"), read_only=True)
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(
            source, storage_options=dict(storage_options or {}), read_only=True
        )
    raise TypeError(f"expected a path, URL or zarr Store, found {type(source).__name__}")


def forget_listings(store: Any) -> None:
    """Drop the directory listings cached by the fsspec filesystem behind ``store``.

    fsspec shares one filesystem instance per (options, thread) within a
    process, and s3fs, gcsfs ... keep every listing they made for its
    lifetime: a dataset listed once would go on hiding the images other
    processes (workers, another convert) wrote to it since. Call before
    listing a dataset to enumerate it.
    """
    fs = getattr(store, "fs", None)
    for target in (fs, getattr(fs, "sync_fs", None)):  # sync_fs: AsyncFileSystemWrapper
        invalidate = getattr(target, "invalidate_cache", None)
        if invalidate is not None:
            invalidate()


def _json(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _group_doc(attributes: Mapping[str, Any]) -> bytes:
    return _json({"zarr_format": 3, "node_type": "group", "attributes": dict(attributes)})


def _array_doc(shape, chunks, dtype, codecs, dims, fill_value=0, attributes=None) -> bytes:
    return _json({
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": str(dtype),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill_value,
        "codecs": codecs,
        "attributes": dict(attributes or {}),
        "dimension_names": list(dims),
    })


_BYTES_LE = [{"name": "bytes", "configuration": {"endian": "little"}}]


def ome_multiscales(info: ImageInfo, name: str = "image") -> dict[str, Any] | None:
    """OME-NGFF 0.5 ``ome`` attribute for the virtual levels, or None when the axes do not
    fit NGFF: colour (NGFF puts channels before space; mist-zarr keeps ``c`` last) and
    axes without an NGFF type (a DICOM multi-frame ``frame`` axis)."""
    if any(d == "c" or d not in _AXIS_TYPES for d in info.dims):
        return None
    axes = []
    for d in info.dims:
        axis = {"name": d, "type": _AXIS_TYPES[d]}
        unit = {"space": "millimeter", "time": "second"}.get(axis["type"])
        if unit:
            axis["unit"] = unit
        axes.append(axis)
    datasets = [
        {
            "path": f"s{k}/{IMAGE}",
            "coordinateTransformations": [
                {"type": "scale", "scale": list(info.level_spacing(k))},
                {"type": "translation", "translation": [0.0] * len(info.dims)},
            ],
        }
        for k in range(info.levels + 1)
    ]
    return {"version": "0.5", "multiscales": [{"name": name, "axes": axes, "datasets": datasets}]}


_SHARED: "OrderedDict[tuple[str, str], _State]" = OrderedDict()
_SHARED_LOCK = threading.Lock()
_SHARED_MAX = 256


@dataclass(frozen=True)
class _State:
    info: ImageInfo
    index: np.ndarray
    meta: dict[str, bytes]
    chunk_keys: tuple[str, ...]


class MultiscaleStore(Store):
    """Read-only store serving levels ``s0 .. sN`` of the mist-zarr image at ``source``.

    ``source`` is a local path, a ``file://`` or fsspec URL (``http(s)://``,
    ``s3://`` ...) or a zarr :class:`~zarr.abc.store.Store` rooted at the
    image group. Level-0 chunks pass through unchanged; a level-k chunk is
    one ranged read of its indexed prefix (plus two bytes checked for a
    tile-part boundary). Missing chunks read as ``None``.
    """

    supports_writes = False
    supports_deletes = False
    supports_partial_writes = False
    supports_listing = True

    def __init__(
        self, source: Any, *, storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(read_only=True)
        self._source = source
        self._storage_options = dict(storage_options or {})
        self._physical = open_source_store(source, self._storage_options)
        self._state: _State | None = None
        self._lock = threading.Lock()
        self._loading: dict[int, asyncio.Future] = {}

    # -- identity and pickling (dask.distributed ships the store to workers) --
    def __getstate__(self) -> dict[str, Any]:
        return {"source": self._source, "storage_options": self._storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["source"], storage_options=state["storage_options"])
        # Copies of one store unpickled in the same process (every dask task
        # carries one) share the index they load, instead of one load per task.
        self._shared_key = (repr(state["source"]), json.dumps(state["storage_options"],
                                                              sort_keys=True, default=str))
        with _SHARED_LOCK:
            self._state = _SHARED.get(self._shared_key)

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

    def with_read_only(self, read_only: bool = False) -> "MultiscaleStore":
        if not read_only:
            raise ValueError("MultiscaleStore is read-only")
        return MultiscaleStore(self._source, storage_options=self._storage_options)

    # -- loading the index once -------------------------------------------
    async def state(self) -> _State:
        """The image's metadata and prefix index, read once per store."""
        if self._state is not None:
            return self._state
        loop = asyncio.get_running_loop()
        with self._lock:
            fut = self._loading.get(id(loop))
            owner = fut is None
            if owner:
                fut = loop.create_future()
                self._loading[id(loop)] = fut
        if not owner:
            return await fut
        try:
            state = await self._load()
        except BaseException as exc:
            with self._lock:
                self._loading.pop(id(loop), None)
            fut.set_exception(exc)
            fut.exception()  # mark retrieved when nobody else waits
            raise
        self._state = state
        key = getattr(self, "_shared_key", None)
        if key is not None:
            with _SHARED_LOCK:
                _SHARED[key] = state
                while len(_SHARED) > _SHARED_MAX:
                    _SHARED.popitem(last=False)
        fut.set_result(state)
        return state

    @property
    def info(self) -> ImageInfo:
        """The image's :class:`ImageInfo` (loads the index on first use)."""
        from zarr.core.sync import sync

        return sync(self.state()).info

    @property
    def index(self) -> np.ndarray:
        from zarr.core.sync import sync

        return sync(self.state()).index

    async def _load(self) -> _State:
        import zarr.api.asynchronous as za
        from zarr.storage import StorePath

        proto = default_buffer_prototype()
        raw = await self._physical.get("zarr.json", proto)
        if raw is None:
            raise FileNotFoundError(f"{self._source}: no zarr.json: not a zarr group")
        doc = json.loads(raw.to_bytes())
        attrs = doc.get("attributes", {}).get(ATTR)
        if attrs is None:
            raise ValueError(f"{self._source}: not a mist-zarr image (no {ATTR!r} attribute)")
        info = ImageInfo.from_json(attrs, where=str(self._source))
        if not info.complete:
            raise IncompleteImageError(
                f"{self._source}: the image was not completely written; convert it again"
            )
        index_array = await za.open_array(
            store=StorePath(self._physical, INDEX), mode="r", zarr_format=3)
        index = np.asarray(await index_array.getitem(...))
        expected = info.grid + (info.levels + 1,)
        if index.shape != expected:
            raise ValueError(
                f"{self._source}: prefix index has shape {index.shape}, expected {expected}"
            )
        return _State(info, index, self._metadata(info, doc), self._chunk_keys(info, index))

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
        meta["zarr.json"] = _group_doc(root_attrs)
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
            meta[f"s{k}/zarr.json"] = _group_doc({ATTR: level_attrs})
            shape = info.level_shape(k)
            meta[f"s{k}/{IMAGE}/zarr.json"] = _array_doc(
                shape, info.level_chunks(k), info.stored_dtype,
                [codec_config(info.levels, skipres=k)], info.dims, attributes=image_attrs,
            )
            for axis, d in enumerate(info.dims):
                if d == "c":
                    continue
                n = shape[axis]
                coords = np.arange(n, dtype="<f8") * info.level_spacing(k)[axis]
                unit = "mm" if d in "zyx" else "s"
                meta[f"s{k}/{d}/zarr.json"] = _array_doc(
                    (n,), (n,), "float64", _BYTES_LE, (d,), fill_value=0.0,
                    attributes={"units": unit, "long_name": f"{d} position from the first sample"},
                )
                meta[f"s{k}/{d}/c/0"] = coords.tobytes()
        return meta

    # -- the key map ----------------------------------------------------------
    def resolve(self, state: _State, key: str) -> tuple[str, int, int] | None:
        """Virtual chunk key -> ``(physical key, level, prefix length)``; None if absent.

        Raises KeyError for keys that are not chunk keys of the image.
        """
        m = _CHUNK_KEY.match(key)
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
              ) -> tuple[str, ByteRequest | None, int, int] | bytes | None:
        """Metadata bytes, None (absent), or (physical key, range to read, level, prefix)."""
        if key in state.meta:
            return state.meta[key]
        try:
            target = self.resolve(state, key)
        except KeyError:
            return None
        if target is None:
            return None
        physical, k, length = target
        if k == 0:
            return physical, byte_range, 0, length
        return physical, RangeByteRequest(0, length + 2), k, length

    @staticmethod
    def _finish(key: str, physical: str, k: int, length: int, buf: Buffer | None,
                byte_range: ByteRequest | None) -> Buffer:
        if buf is None:
            raise PrefixError(f"chunk {key!r}: indexed as present but {physical!r} is missing")
        if k == 0:
            return buf
        data = buf.as_numpy_array()
        if len(data) != length + 2 or not is_boundary(data[length:].tobytes()):
            found = data[length:].tobytes().hex() or "end of data"
            raise PrefixError(
                f"chunk {key!r}: the level-{k} prefix of {length} bytes in {physical!r} does not "
                f"end on a tile-part boundary (expected marker ff90 or ffd9 after it, found "
                f"{found} in {len(data)} bytes); the prefix index is wrong or the chunk changed"
            )
        return _slice(buf[:length], byte_range)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        plan = self._plan(await self.state(), key, byte_range)
        if plan is None:
            return None
        if isinstance(plan, bytes):
            return _slice(prototype.buffer.from_bytes(plan), byte_range)
        physical, request, k, length = plan
        buf = await self._physical.get(physical, prototype, request)
        return self._finish(key, physical, k, length, buf, byte_range)

    # -- zarr's synchronous fast path, offered when the physical store has one --
    @property
    def _supports_sync_io(self) -> bool:
        from zarr.abc.store import _store_supports_sync_io

        return _store_supports_sync_io(self._physical)

    def get_sync(self, key: str, *, prototype: BufferPrototype | None = None,
                 byte_range: ByteRequest | None = None) -> Buffer | None:
        prototype = prototype or default_buffer_prototype()
        state = self._state
        if state is None:
            from zarr.core.sync import sync

            state = sync(self.state())
        plan = self._plan(state, key, byte_range)
        if plan is None:
            return None
        if isinstance(plan, bytes):
            return _slice(prototype.buffer.from_bytes(plan), byte_range)
        physical, request, k, length = plan
        buf = self._physical.get_sync(physical, prototype=prototype, byte_range=request)
        return self._finish(key, physical, k, length, buf, byte_range)

    def set_sync(self, key: str, value: Buffer) -> None:
        raise PermissionError("MultiscaleStore is read-only")

    def delete_sync(self, key: str) -> None:
        raise PermissionError("MultiscaleStore is read-only")

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    async def exists(self, key: str) -> bool:
        state = await self.state()
        if key in state.meta:
            return True
        try:
            return self.resolve(state, key) is not None
        except KeyError:
            return False

    async def set(self, key: str, value: Buffer) -> None:
        raise PermissionError("MultiscaleStore is read-only")

    async def delete(self, key: str) -> None:
        raise PermissionError("MultiscaleStore is read-only")

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
    raise TypeError(f"unexpected byte range {byte_range!r}")
