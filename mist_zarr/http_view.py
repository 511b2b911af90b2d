"""What ``mist-zarr serve`` answers beside the physical files: virtual OME-Zarr views
and dataset catalogs.

* ``<image>/ome/<key>``: the image's :class:`~mist_zarr.store.MultiscaleStore`
  as a plain Zarr v3 hierarchy. Metadata documents are the store's own; a
  chunk ``s{k}/image/c/...`` is exactly the indexed level-k prefix of the
  physical chunk file, read from that file (nothing is stored twice). ``ome``
  is therefore a reserved name inside an image group.
* ``<image>/ome-v2/<key>``: the same view in Zarr format 2 with OME-NGFF 0.4
  metadata (:mod:`mist_zarr.zarr2`), for readers that decode with numcodecs.
* ``<dataset>/catalog.json``: the images under a dataset root (a folder with
  ``catalog.parquet``, or a zarr group that is not an image) with the URL of
  each one's virtual view, for clients that cannot read parquet.

Requests are mapped to a :class:`Body` (size, validators, a blocking reader);
the server does the HTTP (ranges, conditional requests, counting).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from .catalog import CATALOG, catalog
from .codestream import is_boundary
from .format import ATTR, INDEX
from .store import MultiscaleStore
from .zarr2 import v2_documents, v3_source

__all__ = ["CATALOG_JSON", "VIEW", "VIEW_V2", "Body", "VirtualViews"]

VIEW = "ome"  # <image>/ome/ is the image's virtual multiscale view
VIEW_V2 = "ome-v2"  # ... and <image>/ome-v2/ the same in Zarr format 2
CATALOG_JSON = "catalog.json"
_MAX_IMAGES = 256  # open views kept; each holds one image's prefix index


@dataclass(frozen=True)
class Body:
    """A response body: its size, validators, type and a blocking ``read(offset, n)``."""

    size: int
    tag: str  # entity tag, without quotes
    mtime: int  # seconds, for Last-Modified
    content_type: str
    read: Callable[[int, int], bytes]


def bytes_body(data: bytes, mtime: int, content_type: str) -> Body:
    """A body held in memory; its tag is a digest of the bytes."""
    tag = hashlib.blake2b(data, digest_size=12).hexdigest()
    return Body(len(data), tag, mtime, content_type, lambda start, n: data[start:start + n])


def _content_type(name: str) -> str:
    return "application/json" if name.endswith(".json") else "application/octet-stream"


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_mtime_ns, st.st_size


class VirtualViews:
    """Answers the virtual paths under ``root``; ``resolve(root, url_path)`` maps a URL
    path to a real path inside root or raises 403 (the server's own rule)."""

    def __init__(self, root: Path, resolve: Callable[[Path, str], Path]) -> None:
        self._root = root
        self._resolve = resolve
        self._stores: OrderedDict[Path, tuple[tuple[int, int, int], Any]] = OrderedDict()
        self._kinds: OrderedDict[Path, tuple[tuple[int, int, int], bool]] = OrderedDict()
        self._kinds_lock = threading.Lock()
        self._docs: dict[int, dict[str, bytes]] = {}  # id(store) -> its zarr.json documents
        self._lock = asyncio.Lock()

    async def lookup(self, url_path: str) -> Body | None:
        """The body for a virtual path; None if url_path is not virtual. Raises 403/404/500."""
        parts = url_path.split("/")
        if any(p in (".", "..") for p in parts):
            return None  # refused by the physical resolver
        for i, part in enumerate(parts):
            if part in (VIEW, VIEW_V2) and await asyncio.to_thread(self._is_image, parts[:i]):
                return await self._view_body(parts[:i], "/".join(parts[i + 1:]), part == VIEW_V2)
        if parts[-1] == CATALOG_JSON:
            return await asyncio.to_thread(self._catalog_body, parts[:-1])
        return None

    # -- the virtual OME-Zarr view ------------------------------------------------
    def _real(self, parts: list[str]) -> Path:
        return self._resolve(self._root, "/".join(parts))

    def _is_image(self, parts: list[str]) -> bool:
        """Whether parts names a mist-zarr image group (answer cached per zarr.json version:
        an image's zarr.json carries its source header and can be large)."""
        path = self._real(parts) / "zarr.json"
        try:
            stamp = _stamp(path.stat())
        except OSError:
            return False
        cached = self._kinds.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            doc = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return False
        image = isinstance(doc, dict) and ATTR in (doc.get("attributes") or {})
        with self._kinds_lock:  # called from worker threads
            self._kinds[path] = (stamp, image)
            while len(self._kinds) > _MAX_IMAGES:
                self._kinds.popitem(last=False)
        return image

    async def _view_body(self, parts: list[str], key: str, v2: bool) -> Body:
        image = self._real(parts)
        store, mtime = await self._store(image)
        document = ""
        if v2:  # answered from the v3 key it is a rendering of
            if key == ".zmetadata" or key.endswith("/.zmetadata"):
                docs = await self._documents(store)
                return bytes_body(consolidate_v2(key, docs), mtime, "application/json")
            source = v3_source(key)
            if source is None:
                raise web.HTTPNotFound()
            key, document = source
        try:
            target = await store.locate(key)
        except (OSError, ValueError) as exc:  # incomplete image, damaged index ...
            raise web.HTTPInternalServerError(text=f"{'/'.join(parts)}: {exc}") from None
        if target is None:
            raise web.HTTPNotFound()
        if document:
            if not isinstance(target, bytes):
                raise web.HTTPNotFound()
            name = key[: -len("zarr.json")] + document
            target = v2_documents(key, target).get(name)
            if target is None:  # e.g. .zarray of a group
                raise web.HTTPNotFound()
            return bytes_body(target, mtime, "application/json")
        if isinstance(target, bytes):
            if key == "zarr.json" or key.endswith("/zarr.json"):
                target = consolidate(key, await self._documents(store))
            return bytes_body(target, mtime, _content_type(key))
        physical, level, length = target
        return await asyncio.to_thread(self._prefix_body, image, physical, level, length)

    async def _store(self, image: Path) -> tuple[Any, int]:
        """The image's MultiscaleStore, reloaded when its zarr.json changed."""

        st = await asyncio.to_thread(os.stat, image / "zarr.json")
        async with self._lock:
            cached = self._stores.get(image)
            if cached is not None and cached[0] == _stamp(st):
                self._stores.move_to_end(image)
                return cached[1], int(st.st_mtime)
            await asyncio.to_thread(self._check_confined, image)
            store = MultiscaleStore(image)
            self._stores[image] = (_stamp(st), store)
            while len(self._stores) > _MAX_IMAGES:
                self._stores.popitem(last=False)
            live = {id(entry[1]) for entry in self._stores.values()}
            self._docs = {i: d for i, d in self._docs.items() if i in live}
        return store, int(st.st_mtime)

    async def _documents(self, store: Any) -> dict[str, bytes]:
        """The store's zarr.json documents, collected once per loaded store."""
        docs = self._docs.get(id(store))
        if docs is None:
            docs = self._docs[id(store)] = await _documents(store)
        return docs

    def _check_confined(self, image: Path) -> None:
        """403 unless the files a view reads before any chunk (the group's zarr.json and
        the prefix index) are inside root: a symlink must not carry the view out of it."""
        paths = [image / "zarr.json", image / INDEX]
        for top, dirs, files in os.walk(image / INDEX):
            paths += [Path(top, n) for n in dirs + files]
        for p in paths:
            if not Path(os.path.realpath(p)).is_relative_to(self._root):
                raise web.HTTPForbidden()

    def _prefix_body(self, image: Path, physical: str, level: int, length: int) -> Body:
        """The first ``length`` bytes of a chunk file, checked to end on a tile-part boundary."""
        rel = image.relative_to(self._root).as_posix()
        path = self._resolve(self._root, f"{rel}/{physical}" if rel != "." else physical)
        try:
            with path.open("rb") as f:
                st = os.fstat(f.fileno())
                tail = os.pread(f.fileno(), 2, length)
        except OSError:
            raise web.HTTPInternalServerError(
                text=f"chunk {physical!r} of {rel!r} is indexed as present but cannot be read"
            ) from None
        if level == 0 and st.st_size != length or level > 0 and not is_boundary(tail):
            raise web.HTTPInternalServerError(text=(
                f"chunk {physical!r} of {rel!r}: the level-{level} prefix of {length} bytes "
                f"does not match the {st.st_size}-byte file (the index is stale or the chunk "
                "changed)"))

        def read(start: int, n: int) -> bytes:
            with path.open("rb") as f:
                return os.pread(f.fileno(), n, start)

        tag = f"{st.st_mtime_ns:x}-{st.st_size:x}-s{level}"
        return Body(length, tag, int(st.st_mtime), "application/octet-stream", read)

    # -- dataset catalogs -----------------------------------------------------------
    def _catalog_body(self, parts: list[str]) -> Body | None:
        """The catalog of the dataset root at parts as JSON; None if there is none there."""

        folder = self._real(parts)
        if (folder / CATALOG_JSON).exists() or not self._is_dataset(folder):
            return None  # a real file, or not a dataset root: the physical rule applies
        try:
            df = catalog(folder, write=False)
        except (OSError, ValueError) as exc:
            raise web.HTTPInternalServerError(text=f"{'/'.join(parts)}: {exc}") from None
        images = []
        for row in df.to_dict("records"):
            row = {k: _plain(v) for k, v in row.items()}
            row[VIEW] = f"{row['path']}/{VIEW}/"
            row[VIEW_V2] = f"{row['path']}/{VIEW_V2}/"
            images.append(row)
        doc = {"format": "mist-zarr-catalog", "version": 1, "images": images}
        stamp = folder / CATALOG if (folder / CATALOG).exists() else folder
        return bytes_body(json.dumps(doc).encode(), int(stamp.stat().st_mtime),
                          "application/json")

    def _is_dataset(self, folder: Path) -> bool:

        if (folder / CATALOG).is_file():
            return True
        try:
            doc = json.loads((folder / "zarr.json").read_bytes())
        except (OSError, ValueError):
            return False
        return doc.get("node_type") == "group" and ATTR not in (doc.get("attributes") or {})


async def _documents(store: Any) -> dict[str, bytes]:
    """Every ``zarr.json`` of a view, by key."""
    docs = {}
    async for key in store.list():
        if key == "zarr.json" or key.endswith("/zarr.json"):
            docs[key] = await store.locate(key)
    return docs


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def consolidate(key: str, docs: dict[str, bytes]) -> bytes:
    """The document at ``key``; a group's with zarr-python's inline consolidated metadata
    of every node below it, so that clients can find members where HTTP cannot list."""
    doc = json.loads(docs[key])
    if doc["node_type"] != "group":
        return docs[key]
    folder = key[: -len("zarr.json")]
    doc["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": {
        k[len(folder): -len("/zarr.json")]: json.loads(v)
        for k, v in sorted(docs.items()) if k.startswith(folder) and k != key}}
    return _json(doc)


def consolidate_v2(key: str, docs: dict[str, bytes]) -> bytes:
    """``.zmetadata`` (Zarr v2 consolidated metadata) of the group at ``key``'s folder."""
    folder = key[: -len(".zmetadata")]
    found: dict[str, Any] = {}
    for k, v in sorted(docs.items()):
        if k.startswith(folder):
            found.update({name[len(folder):]: json.loads(d)
                          for name, d in v2_documents(k, v).items()})
    if ".zgroup" not in found:
        raise web.HTTPNotFound()  # not a group
    return _json({"zarr_consolidated_format": 1, "metadata": found})


def _plain(value: Any) -> Any:
    """numpy scalars and arrays in a catalog row as JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
