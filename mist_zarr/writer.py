"""Write an image as a mist-zarr group: HTJ2K chunks plus the prefix index.

:func:`write_image` writes one image in one call. The same steps are public
for an image written in parts (slice ranges, possibly by different
processes): :func:`plan_image` decides everything once (value mapping,
levels, chunks, write id, documents), :func:`begin_image` creates the
incomplete group, :func:`write_part` writes the chunks of a range of leading
indices and returns its index and checksum rows, :func:`finish_image` writes
the index, checksums and slice metadata and, last, the completion mark.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import imagecodecs
import numcodecs
import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .codestream import CodestreamError, prefix_lengths
from .format import (
    ATTR,
    BULKY_METADATA,
    CHECKSUM,
    IMAGE,
    INDEX,
    SLICE_METADATA,
    SOURCE_FORMATS,
    ImageInfo,
    chunk_crc,
    default_affine,
)
from .layout import (
    DEFAULT_ALPHA,
    codec_config,
    default_dims,
    encode_kwargs,
    num_levels,
    plane_axes,
    tile_shape,
)
from .ngff import SMALL_CODECS, array_doc, chunk_key, group_doc
from .storage import get_json, join_key, open_group, resolve, supports_sync_io
from .values import choose_mapping

__all__ = ["ImagePlan", "PartRows", "begin_image", "finish_image", "plan_image", "write_image",
           "write_part"]

StoreLike = Any  # str | os.PathLike | zarr.abc.store.Store | zarr.storage.StorePath


def _validate(data: Any, dims: Sequence[str] | None) -> tuple[str, ...]:
    if dims is None:
        return default_dims(data.ndim)
    dims = tuple(dims)
    if len(dims) != data.ndim:
        raise ValueError(f"dims {dims} name {len(dims)} axes, but the data has {data.ndim}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"dims must be unique, found {dims}")
    iy, ix = plane_axes(dims)
    colour = "c" in dims
    if colour and dims[-1] != "c":
        raise ValueError(f"the colour axis 'c' must be last, found dims {dims}")
    if colour and data.shape[-1] not in (3, 4):
        raise ValueError(
            f"the colour axis must hold 3 (RGB) or 4 (RGBA) samples, found {data.shape[-1]}; "
            "store other channel counts as separate images or along 't'"
        )
    plane_end = len(dims) - 1 if colour else len(dims)
    if (iy, ix) != (plane_end - 2, plane_end - 1):
        raise ValueError(f"'y' and 'x' must be the last two non-colour axes, found dims {dims}")
    return dims


def _blocks(data: Any, n_lead: int) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """Yield ``(leading offset, block)`` with whole planes, one block in memory at a time."""
    if hasattr(data, "iter_batches"):  # LazyPlanes: batches along the first axis
        for start, block in data.iter_batches():
            yield (start,) + (0,) * (n_lead - 1), block
            del block  # one batch in memory: drop it before the next is read
    elif hasattr(data, "dask"):
        whole = {i: -1 for i in range(n_lead, data.ndim)}
        data = data.rechunk(whole)
        starts = [np.cumsum((0,) + c[:-1]) for c in data.chunks[:n_lead]]
        for idx in np.ndindex(*data.numblocks[:n_lead]):
            offset = tuple(int(starts[a][i]) for a, i in enumerate(idx))
            yield offset, np.asarray(data.blocks[idx + (0,) * (data.ndim - n_lead)].compute())
    else:
        yield (0,) * n_lead, np.asarray(data)


@dataclass
class _Nodes:
    """The image group being written: its store and key prefix."""

    group: zarr.Group | None  # None in a part: parts only write chunks
    store: Any
    prefix: str
    direct: bool  # the store has zarr's synchronous surface (local, memory)

    def key(self, name: str, coords: tuple[int, ...]) -> str:
        return join_key(self.prefix, name, chunk_key(coords))

    def put(self, key: str, data: bytes) -> None:
        buf = _PROTOTYPE.buffer.from_bytes(data)
        # Local and memory stores are written from the calling thread: a hop
        # through zarr's event loop per chunk would cost more than the write.
        if self.direct:
            self.store.set_sync(key, buf)
        else:
            sync(self.store.set(key, buf))

    def put_small(self, name: str, values: np.ndarray) -> None:
        """A one-chunk array's only chunk, encoded as its document says (bytes, zstd)."""
        self.put(self.key(name, (0,) * values.ndim), _SMALL_COMPRESSOR.encode(
            np.ascontiguousarray(values, values.dtype.newbyteorder("<")).tobytes()))

    def finish(self, info: ImageInfo) -> None:
        """Write the group document last: it carries the completion mark."""
        self.put(join_key(self.prefix, "zarr.json"), group_doc({ATTR: info.to_json()}))


_PROTOTYPE = default_buffer_prototype()
_GROUP_BYTES = 256 << 10  # chunks smaller than this are encoded and stored in groups
_SMALL_COMPRESSOR = numcodecs.Zstd(level=0, checksum=False)  # as ngff.SMALL_CODECS says


def _create_nodes(dest: StoreLike, info: ImageInfo, index: np.ndarray, checksum: np.ndarray, *,
                  overwrite: bool, storage_options: Mapping[str, Any] | None) -> _Nodes:
    """The image group (not yet complete) and the documents of its image, index and checksums.

    zarr creates the group (its overwrite and exists-already rules); the three
    array documents, which zarr would write one event-loop round trip each,
    are built here (ngff, the builder the virtual view uses) and written directly;
    zarr reads them as its own (tests/test_write.py).
    """
    group = open_group(dest, mode="w" if overwrite else "w-",
                       storage_options=storage_options, attributes={ATTR: info.to_json()})
    chunk_dims = tuple(f"{d}_chunk" for d in info.dims)
    documents = {
        IMAGE: array_doc(info.shape, info.chunks, info.values.stored_dtype,
                         [codec_config(info.levels)], info.dims),
        INDEX: array_doc(index.shape, index.shape, index.dtype, SMALL_CODECS,
                         chunk_dims + ("level",)),
        CHECKSUM: array_doc(checksum.shape, checksum.shape, checksum.dtype, SMALL_CODECS,
                            chunk_dims),
    }
    store, prefix = group.store_path.store, group.store_path.path
    nodes = _Nodes(group, store, prefix, supports_sync_io(store))
    for name, doc in documents.items():
        nodes.put(join_key(prefix, name, "zarr.json"), doc)
    return nodes


@dataclass(frozen=True)
class ImagePlan:
    """An image decided before any chunk is written: its description and the bulky
    metadata stored apart (as ``slice_metadata``). Every part of the image uses it."""

    info: ImageInfo
    bulky: dict[str, Any]


@dataclass(frozen=True)
class PartRows:
    """What :func:`write_part` wrote: index and checksum rows of leading indices
    ``start:stop`` (the first axis of the chunk grid)."""

    start: int
    stop: int
    index: np.ndarray
    checksum: np.ndarray


def plan_image(
    data: Any,
    *,
    dims: Sequence[str] | None = None,
    spacing: Sequence[float] | None = None,
    affine: Any = None,
    source_format: str = "array",
    metadata: Mapping[str, Any] | None = None,
    alpha: int = DEFAULT_ALPHA,
    levels: int | None = None,
    tile: int | None = None,
    quantize: str | np.dtype | None = None,
    name: str = "input",
) -> ImagePlan:
    """Check the request and decide the image (arguments as :func:`write_image`'s); the
    bulky metadata is set apart for the ``slice_metadata`` array."""
    if not hasattr(data, "ndim"):
        data = np.asarray(data)
    dims = _validate(data, dims)
    if source_format not in SOURCE_FORMATS:
        raise ValueError(f"source_format must be one of {SOURCE_FORMATS}, found {source_format!r}")
    iy, ix = plane_axes(dims)
    shape = tuple(int(s) for s in data.shape)
    if 0 in shape:
        raise ValueError(f"cannot store an empty image of shape {shape}")
    plane = (shape[iy], shape[ix])
    n = num_levels(plane, alpha) if levels is None else int(levels)
    chunk_plane = tile_shape(plane, n, tile)
    if n < 0 or (1 << n) > min(chunk_plane):
        raise ValueError(
            f"{n} decomposition levels need chunks of at least {1 << n} px, "
            f"but the chunk plane is {chunk_plane}"
        )
    chunks = (1,) * iy + chunk_plane + tuple(shape[ix + 1 :])
    mapping = choose_mapping(data, quantize=quantize, levels=n, name=name,
                             value_range=getattr(data, "value_range", None))
    if spacing is None:
        spacing = (1.0,) * len(dims)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != len(dims):
        raise ValueError(f"spacing has {len(spacing)} values for dims {dims}")
    affine = default_affine(dims, spacing) if affine is None else np.asarray(affine, float)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, found shape {affine.shape}")
    metadata = dict(metadata or {})
    bulky = {k: metadata.pop(k) for k in BULKY_METADATA if k in metadata}
    if bulky:
        metadata[SLICE_METADATA] = sorted(bulky)
    info = ImageInfo(
        dims=dims, shape=shape, chunks=chunks, levels=n, alpha=alpha, spacing=spacing,
        affine=affine, values=mapping, source_format=source_format, metadata=metadata,
        write_id=uuid.uuid4().hex,
    )
    return ImagePlan(info, bulky)


def _empty_rows(info: ImageInfo) -> tuple[np.ndarray, np.ndarray]:
    grid = info.grid
    return np.zeros(grid + (info.levels + 1,), np.uint64), np.zeros(grid, np.uint32)


def begin_image(dest: StoreLike, plan: ImagePlan, *, overwrite: bool = False,
                storage_options: Mapping[str, Any] | None = None) -> None:
    """Create the image group at ``dest``, not yet complete, with its arrays' documents."""
    index, checksum = _empty_rows(plan.info)
    _create_nodes(dest, plan.info, index, checksum, overwrite=overwrite,
                  storage_options=storage_options)


def _open_part(dest: StoreLike, info: ImageInfo,
               storage_options: Mapping[str, Any] | None) -> _Nodes:
    """The group :func:`begin_image` created for this very write (checked by write id)."""
    store, prefix = resolve(dest, storage_options, read_only=False)
    attrs = (get_json(store, join_key(prefix, "zarr.json")) or {}).get("attributes", {})
    found = attrs.get(ATTR, {})
    if found.get("write_id") != info.write_id or found.get("complete"):
        state = "complete" if found.get("complete") else f"write id {found.get('write_id')!r}"
        raise ValueError(f"{dest}: not the image being written (write id "
                         f"{info.write_id!r}; found {state if found else 'no mist-zarr image'})")
    return _Nodes(None, store, prefix, supports_sync_io(store))


class _Shifted:
    """A part's samples, presented to ``_blocks`` at its offset along the first axis."""

    def __init__(self, data: Any, start: int) -> None:
        self.data, self.start = data, start

    def iter_batches(self) -> Iterator[tuple[int, np.ndarray]]:
        for offset, block in _blocks(self.data, 1):
            yield self.start + offset[0], block
            del block


def write_part(dest: StoreLike, data: Any, info: ImageInfo, start: int, *,
               threads: int | None = None, write_empty_chunks: bool = False,
               storage_options: Mapping[str, Any] | None = None) -> PartRows:
    """Write the chunks of leading indices ``start:start + len(data)`` into the image
    :func:`begin_image` created at ``dest``; return their index and checksum rows.

    ``data`` holds those entries of the first axis only (numpy, dask or
    LazyPlanes). Rewriting a part writes the same chunks again.
    """
    if not hasattr(data, "ndim"):
        data = np.asarray(data)
    stop = start + int(data.shape[0])
    if tuple(data.shape[1:]) != info.shape[1:] or not 0 <= start < stop <= info.shape[0]:
        raise ValueError(f"{dest}: part [{start}, {stop}) of shape "
                         f"{tuple(data.shape)} does not fit the image's {info.shape}")
    if np.dtype(data.dtype) != info.dtype:
        raise ValueError(f"{dest}: part [{start}, {stop}) is {data.dtype}, "
                         f"the image holds {info.dtype}")
    if plane_axes(info.dims)[0] == 0:
        raise ValueError(f"{dest}: a 2-D image has no leading axis to split")
    index, checksum = _empty_rows(info)
    _write_chunks(lambda: _open_part(dest, info, storage_options), _Shifted(data, start), info,
                  index, checksum, threads, write_empty_chunks)
    return PartRows(start, stop, index[start:stop].copy(), checksum[start:stop].copy())


def finish_image(dest: StoreLike, plan: ImagePlan, parts: Sequence[PartRows], *,
                 storage_options: Mapping[str, Any] | None = None) -> ImageInfo:
    """Write the index and checksums assembled from ``parts`` (which must cover the first
    axis exactly once), the slice metadata, and last the group document marked complete."""
    info = plan.info
    index, checksum = _empty_rows(info)
    covered = 0
    for part in sorted(parts, key=lambda p: p.start):
        if part.start != covered:
            raise ValueError(f"{dest}: parts leave leading indices "
                             f"[{covered}, {part.start}) unwritten or write them twice")
        index[part.start : part.stop] = part.index
        checksum[part.start : part.stop] = part.checksum
        covered = part.stop
    if covered != info.shape[0]:
        raise ValueError(f"{dest}: parts end at {covered} of {info.shape[0]}")
    group = open_group(dest, mode="r+", storage_options=storage_options)
    store, prefix = group.store_path.store, group.store_path.path
    return _finish(_Nodes(group, store, prefix, supports_sync_io(store)), plan, index, checksum)


def _finish(nodes: _Nodes, plan: ImagePlan, index: np.ndarray,
            checksum: np.ndarray) -> ImageInfo:
    nodes.put_small(INDEX, index)
    nodes.put_small(CHECKSUM, checksum)
    if plan.bulky:
        assert nodes.group is not None
        blob = np.frombuffer(json.dumps(plan.bulky, separators=(",", ":")).encode(), np.uint8)
        nodes.group.create_array(SLICE_METADATA, data=blob, chunks=blob.shape,
                                 dimension_names=("json_byte",))
    info = plan.info.completed()
    nodes.finish(info)
    return info


def write_image(
    dest: StoreLike,
    data: Any,
    *,
    dims: Sequence[str] | None = None,
    spacing: Sequence[float] | None = None,
    affine: Any = None,
    source_format: str = "array",
    metadata: Mapping[str, Any] | None = None,
    alpha: int = DEFAULT_ALPHA,
    levels: int | None = None,
    tile: int | None = None,
    quantize: str | np.dtype | None = None,
    threads: int | None = None,
    write_empty_chunks: bool = False,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> ImageInfo:
    """Store ``data`` (numpy or dask) losslessly as a mist-zarr image group at ``dest``.

    ``dims`` names the axes (default ``(y, x)``, ``(z, y, x)`` or
    ``(t, z, y, x)``; a trailing ``c`` of 3 or 4 holds colour). ``spacing``
    follows ``dims`` in mm; ``affine`` maps ``(x, y, z)`` indices to RAS+ mm
    (default: scaling by spacing). ``levels`` defaults to
    ``ceil(log2(min(Y, X) / alpha))``. ``tile`` sets a square chunk edge in the
    plane (default: whole slices up to 8192 px). Chunks are encoded on
    ``threads`` threads. Dask arrays and :class:`~mist_zarr.converters.base.LazyPlanes`
    are written one block (batch of whole planes) at a time, so memory is
    bounded by a block. The group is marked complete only after every chunk,
    the index and the checksums are written, so an interrupted write never
    reads as a finished image.
    """
    if not hasattr(data, "ndim"):
        data = np.asarray(data)
    plan = plan_image(data, dims=dims, spacing=spacing, affine=affine,
                      source_format=source_format, metadata=metadata, alpha=alpha,
                      levels=levels, tile=tile, quantize=quantize, name=str(dest))
    info = plan.info
    index, checksum = _empty_rows(info)

    def create() -> _Nodes:
        return _create_nodes(dest, info, index, checksum, overwrite=overwrite,
                             storage_options=storage_options)

    nodes = _write_chunks(create, data, info, index, checksum, threads, write_empty_chunks)
    return _finish(nodes, plan, index, checksum)


def _write_chunks(create, data, info: ImageInfo, index, checksum, threads, write_empty) -> _Nodes:
    """Encode every chunk on ``threads`` encoder threads and store it from a store stage.

    The encoders only map, pad and encode. The checksum, the codestream's
    prefix lengths and the store write of each chunk run on a separate store
    stage (one thread for local and memory stores, a few for remote ones),
    overlapped with the next encodes; at most two groups of chunks (one
    chunk, or small chunks up to ``_GROUP_BYTES``) per encoder wait there, so
    memory stays bounded. Encoding starts before ``create`` makes
    the zarr group and array documents (that round trip costs as much as
    encoding a few slices).
    """
    # One function on purpose (~100 lines): ``encode`` and ``store`` are
    # closures over the pools, the creation event, the lock and the failure
    # list, which the submitting loop owns; split apart they would pass all of
    # it around.
    created = threading.Event()
    target: dict[str, Any] = {}
    kwargs = encode_kwargs(info.levels)
    iy, ix = plane_axes(info.dims)
    ty, tx = info.chunks[iy], info.chunks[ix]
    tail = info.shape[ix + 1 :]  # colour
    mapping = info.values
    lock = threading.Lock()
    failures: list[BaseException] = []
    workers = threads or min(32, os.cpu_count() or 1)
    waiting = threading.BoundedSemaphore(2 * workers)  # groups handed to the store stage

    def fail(exc: BaseException, where: str) -> None:
        exc.add_note(f"while writing {where}")
        with lock:
            failures.append(exc)

    def store(coords: tuple[int, ...], tile: np.ndarray, encoded: bytes | None) -> None:
        crc, row = chunk_crc(tile), ()
        if encoded is not None:
            row = prefix_lengths(encoded)
            if len(row) < info.levels + 1 or (info.levels and len(row) != info.levels + 1):
                raise CodestreamError(f"encoder wrote {len(row) - 1} levels, "
                                      f"expected {info.levels}")
            row = row[: info.levels + 1]
            nodes = target["nodes"]
            nodes.put(nodes.key(IMAGE, coords), encoded)
        with lock:
            checksum[coords] = crc
            if row:
                index[coords] = row

    def store_group(done: list[tuple[tuple[int, ...], np.ndarray, bytes | None]]) -> None:
        try:
            for coords, tile, encoded in done:
                try:
                    store(coords, tile, encoded)
                except BaseException as exc:  # reported after the pools drain
                    fail(exc, f"chunk {coords}")
                    return
        finally:
            waiting.release()

    def encode_group(group: list[tuple[tuple[int, ...], np.ndarray]]) -> Future | None:
        done = []
        for coords, plane in group:
            try:
                tile = np.ascontiguousarray(mapping.encode(plane))
                if tile.shape[:2] != (ty, tx):  # edge tile: zarr stores full chunks
                    padded = np.zeros((ty, tx) + tail, tile.dtype)
                    padded[: tile.shape[0], : tile.shape[1]] = tile
                    tile = padded
                encoded = imagecodecs.htj2k_encode(tile, **kwargs) \
                    if write_empty or tile.any() else None
            except BaseException as exc:
                fail(exc, f"chunk {coords}")
                return None
            done.append((coords, tile, encoded))
        try:
            waiting.acquire()
            created.wait()
            if "store" not in target:
                waiting.release()
                raise RuntimeError("the image group was not created")
            return target["store"].submit(store_group, done)
        except BaseException as exc:
            fail(exc, f"chunk {group[0][0]}")
            return None

    # small chunks go to the pools in groups: a task per chunk (two pool hops,
    # a semaphore) costs about as much as encoding a 128 px chunk
    per_group = max(1, _GROUP_BYTES // max(1, ty * tx * max(1, math.prod(tail))
                                          * np.dtype(info.values.stored_dtype).itemsize))
    n_lead = iy
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mist-encode") as pool, \
            contextlib.ExitStack() as stack:
        # (not enumerate(): its reused result tuple would keep the previous
        # block alive while the next one is read)
        for offset, block in _blocks(data, n_lead):
            futures, group = [], []
            for lead in np.ndindex(*block.shape[:n_lead]):
                planes = block[lead]
                for cy in range(-(-planes.shape[0] // ty)):
                    for cx in range(-(-planes.shape[1] // tx)):
                        part = planes[cy * ty : (cy + 1) * ty, cx * tx : (cx + 1) * tx]
                        coords = tuple(o + i for o, i in zip(offset, lead)) + (cy, cx) + (0,) * len(tail)
                        group.append((coords, part))
                        if len(group) == per_group:
                            futures.append(pool.submit(encode_group, group))
                            group = []
            if group:
                futures.append(pool.submit(encode_group, group))
            if not created.is_set():  # the first block: make the group meanwhile
                try:
                    target["nodes"] = nodes = create()
                    # local and memory writes are cheap syscalls: one thread; a
                    # remote store's requests wait on the network: several
                    target["store"] = stack.enter_context(ThreadPoolExecutor(
                        1 if nodes.direct else max(4, workers), thread_name_prefix="mist-store"))
                finally:
                    created.set()  # on failure the waiting encoders raise and drain
            stored = [f.result() for f in futures]
            for f in stored:
                if f is not None:
                    f.result()
            if failures:
                raise failures[0]
            del block, planes, part, futures, stored, group  # before the next block
    return target["nodes"]
