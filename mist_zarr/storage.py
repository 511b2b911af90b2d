"""Where a dataset or image lives: path / URL / store -> zarr Store, and small documents in it.

The one place that turns what a user passes (a local path, a ``file://`` or
fsspec URL such as ``s3://`` / ``http://`` / ``memory://``, a zarr
:class:`~zarr.abc.store.Store`, a :class:`~zarr.storage.StorePath` or a
:class:`zarr.Group`) into a zarr Store plus the key prefix of the node, and
that reads and writes whole documents (JSON, bytes) there synchronously. It
also hides the two store details the rest of the package needs: dropping
fsspec's cached listings, and zarr's private "has a synchronous fast path"
check.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zarr
import zarr.registry
from zarr.abc.store import Store, _store_supports_sync_io
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.errors import GroupNotFoundError
from zarr.storage import FsspecStore, LocalStore, StorePath

# Stored chunks use the codec name "imagecodecs_htj2k": zarr finds it through the
# ``zarr.codecs`` entry point this package declares (pyproject.toml), when it first
# opens such an array. Registered here only where that entry point is missing (a
# checkout on PYTHONPATH, an install older than the entry point): importing
# imagecodecs.zarr builds every imagecodecs codec class, a cost most processes that
# come here never need (docs/architecture.md, "Imports"). zarr collects the entry
# points into this registry when it is imported, without loading them.
if "imagecodecs_htj2k" not in getattr(zarr.registry, "_codec_registries", ()):
    import imagecodecs.zarr

    imagecodecs.zarr.register_codecs(["htj2k"], verbose=False)

__all__ = [
    "forget_listings",
    "get_bytes",
    "get_json",
    "get_json_async",
    "join_key",
    "join_location",
    "local_dir",
    "location",
    "no_group",
    "open_group",
    "open_source_store",
    "replace_bytes",
    "resolve",
    "set_bytes",
    "set_json",
    "supports_sync_io",
]


def _is_path(source: Any) -> bool:
    return isinstance(source, os.PathLike) or (isinstance(source, str) and "://" not in source)


def open_source_store(source: Any, storage_options: Mapping[str, Any] | None = None, *,
                      read_only: bool = True) -> Store:
    """A zarr store for a path, ``file://`` / fsspec URL or existing store.

    ``read_only`` (the default) gives a read-only store, also for a writable
    Store passed in; otherwise a Store passed in is returned as it is.
    """
    if isinstance(source, Store):
        if read_only and not source.read_only:
            return source.with_read_only(True)
        return source
    if _is_path(source):
        return LocalStore(os.fspath(source), read_only=read_only)
    if isinstance(source, str):
        if source.startswith("file://"):
            return LocalStore(source.removeprefix("file://"), read_only=read_only)
        return FsspecStore.from_url(source, storage_options=dict(storage_options or {}),
                                    read_only=read_only)
    raise TypeError(f"expected a path, URL or zarr Store, found {type(source).__name__}")


def resolve(source: Any, storage_options: Mapping[str, Any] | None = None, *,
            read_only: bool = True) -> tuple[Store, str]:
    """``(store, prefix)`` of a node: a zarr Store and the node's key prefix in it.

    ``source`` is anything :func:`open_source_store` takes (prefix ``""``), a
    :class:`~zarr.storage.StorePath` or a zarr Group (their own store and path,
    used as they are).
    """
    if isinstance(source, StorePath):
        return source.store, source.path
    if hasattr(source, "store_path"):  # a zarr.Group or Array
        return source.store_path.store, source.store_path.path
    return open_source_store(source, storage_options, read_only=read_only), ""


def open_group(source: Any, *, mode: str = "r",
               storage_options: Mapping[str, Any] | None = None, **kwargs: Any) -> zarr.Group:
    """``zarr.open_group`` on the node :func:`resolve` finds for ``source`` (Zarr v3).

    ``mode`` is zarr's; every mode but ``"r"`` opens the store writable.
    """
    store, prefix = resolve(source, storage_options, read_only=mode == "r")
    try:
        return zarr.open_group(StorePath(store, prefix), mode=mode, zarr_format=3, **kwargs)
    except GroupNotFoundError:
        raise no_group(source, str(source)) from None


def no_group(source: Any, where: str) -> FileNotFoundError:
    """The error for ``source`` holding no zarr group: a local path that does not exist,
    or a folder or file of sources that must be converted first."""
    if _is_path(source):
        path = os.fspath(source)
        if not os.path.exists(path):
            return FileNotFoundError(f"{where}: does not exist")
        return FileNotFoundError(
            f"{where}: not a zarr group (no zarr.json), so neither a mist-zarr image nor a "
            f"dataset root; if it holds source files (DICOM, NIfTI, PNG, ...), convert them "
            f"first: mist-zarr convert {where} DATASET")
    return FileNotFoundError(f"{where}: no zarr.json: not a zarr group")


def location(source: Any) -> str:
    """A path or URL as one canonical string (absolute path; URL without trailing '/')."""
    if _is_path(source):
        return os.path.abspath(os.fspath(source))
    if isinstance(source, str):
        return source.rstrip("/")
    raise TypeError(f"expected a dataset root path or URL, found {type(source).__name__}")


def join_location(root: str, path: str) -> str:
    """``root`` (from :func:`location`) joined with a '/'-separated ``path`` below it."""
    if "://" in root:
        return f"{root}/{path}" if path else root
    return os.path.join(root, *path.split("/")) if path else root


def join_key(prefix: str, *parts: str) -> str:
    """Store key of ``parts`` under ``prefix`` (empty parts and stray slashes dropped)."""
    return "/".join(p.strip("/") for p in (prefix, *parts) if p.strip("/"))


def local_dir(store: Any, prefix: str = "") -> Path | None:
    """The folder of ``prefix`` when ``store`` is a local one, else None."""
    if isinstance(store, LocalStore):
        return Path(store.root) / prefix
    return None


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


def supports_sync_io(store: Store) -> bool:
    """True when zarr may read/write ``store`` through its synchronous fast path."""
    # zarr keeps this check private; it is used only here, so that a change in
    # zarr breaks one place
    return bool(_store_supports_sync_io(store))


# -- whole documents -----------------------------------------------------------
def get_bytes(store: Store, key: str) -> bytes | None:
    """The value at ``key``, or None when absent."""
    buf = sync(store.get(key, default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def set_bytes(store: Store, key: str, data: bytes) -> None:
    """Write ``data`` at ``key`` (one ``set``)."""
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def replace_bytes(store: Store, key: str, data: bytes) -> None:
    """Replace the value at ``key`` whole: readers see the old or the new value, never a part.

    On a local disk the file is written under a temporary name in the same
    folder and renamed over the old one; on an object store one ``set``
    (PUT) replaces the object whole.
    """
    folder = local_dir(store)
    if folder is None:
        set_bytes(store, key, data)
        return
    target = folder / key
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


async def get_json_async(store: Store, key: str, *, strict: bool = True) -> Any:
    """The JSON document at ``key``, or None when absent (or, unless ``strict``, not JSON)."""
    buf = await store.get(key, default_buffer_prototype())
    if buf is None:
        return None
    try:
        return json.loads(buf.to_bytes())
    except ValueError as exc:
        if not strict:
            return None
        raise ValueError(f"{key}: expected a JSON document, found unreadable bytes ({exc})"
                         ) from exc


def get_json(store: Store, key: str, *, strict: bool = True) -> Any:
    """Synchronous :func:`get_json_async`."""
    return sync(get_json_async(store, key, strict=strict))


def set_json(store: Store, key: str, doc: Any) -> None:
    """Write ``doc`` as JSON at ``key``."""
    set_bytes(store, key, json.dumps(doc).encode())
