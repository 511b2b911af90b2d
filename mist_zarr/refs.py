"""Reference files: each resolution level of an image as a virtual Zarr for static hosting.

A reference file is fsspec's ``reference://`` JSON (the kerchunk format,
version 1): metadata documents inline, each chunk a reference
``[url, 0, prefix_length]`` into the physical chunk file. A client with
fsspec, zarr and imagecodecs reads level k from any static server (or object
store) that answers Range requests, transferring only the level-k prefixes;
no mist-zarr on either side.

The content is :class:`~mist_zarr.store.MultiscaleStore`'s level ``s{k}``
group, re-rooted: Zarr v3 as the store serves it, or translated to Zarr v2
(``.zarray`` with imagecodecs' numcodecs codec ``imagecodecs_htj2k`` as the
compressor, ``skipres=k``; ``_ARRAY_DIMENSIONS`` for xarray). See
``docs/format.md``.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from zarr.core.sync import sync

from .store import MultiscaleStore
from .zarr2 import v2_chunk_key, v2_documents

__all__ = ["level_refs", "write_refs"]

def _inline(key: str, data: bytes) -> str:
    """A kerchunk inline value: JSON documents as text, chunks base64."""
    if key.endswith(".json"):
        return data.decode("utf-8")
    return "base64:" + base64.b64encode(data).decode()


def _default_url(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)) and "://" not in os.fspath(source):
        return Path(source).resolve().as_uri()
    if isinstance(source, str):
        return source.rstrip("/")
    raise TypeError(f"give url= for a source of type {type(source).__name__}")


def level_refs(source: Any, level: int, *, url: str | None = None, zarr_format: int = 3,
               storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The reference document of level ``level`` of the image at ``source``.

    ``url`` is where clients will find the image group (its chunk files are
    ``{url}/image/c/...``); by default the source's own location (a
    ``file://`` URL for a local path). Raises ValueError for a level the image
    does not have.
    """

    store = MultiscaleStore(source, storage_options=storage_options)
    return _level_refs(store, level, (url or _default_url(source)).rstrip("/"), zarr_format)


def _level_refs(store: Any, level: int, base: str, zarr_format: int) -> dict[str, Any]:

    if zarr_format not in (2, 3):
        raise ValueError(f"zarr_format must be 2 or 3, found {zarr_format}")
    levels = store.info.levels
    if not 0 <= level <= levels:
        raise ValueError(f"{store}: level {level} does not exist: the image has levels "
                         f"0..{levels}")

    async def collect() -> dict[str, Any]:
        prefix = f"s{level}/"
        found: dict[str, Any] = {}
        async for key in store.list_prefix(prefix):
            target = await store.locate(key)
            if isinstance(target, bytes):
                found[key[len(prefix):]] = target
            elif target is not None:
                physical, _, length = target
                found[key[len(prefix):]] = [f"{base}/{physical}", 0, length]
        return found

    found = sync(collect())
    refs = _v3_refs(found) if zarr_format == 3 else _v2_refs(found)
    return {"version": 1, "refs": dict(sorted(refs.items()))}


def _v3_refs(found: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, list) else _inline(k, v) for k, v in found.items()}


def _v2_refs(found: Mapping[str, Any]) -> dict[str, Any]:
    """The level's v3 documents and chunks under their Zarr v2 keys."""

    refs: dict[str, Any] = {}
    for key, value in found.items():
        if key == "zarr.json" or key.endswith("/zarr.json"):
            refs.update({k: d.decode() for k, d in v2_documents(key, value).items()})
        else:
            refs[v2_chunk_key(key)] = value if isinstance(value, list) else _inline(key, value)
    return refs


def write_refs(source: Any, out: str | os.PathLike[str], *, levels: Iterable[int] | None = None,
               url: str | None = None, zarr_format: int = 3,
               storage_options: Mapping[str, Any] | None = None) -> list[Path]:
    """Write reference files; return their paths.

    With ``levels`` None (every level), ``out`` is a folder that receives
    ``s{k}.json`` per level; with levels given, likewise, unless it is one
    level and ``out`` ends in ``.json``, which is then that file.
    """

    out = Path(out)
    store = MultiscaleStore(source, storage_options=storage_options)
    base = (url or _default_url(source)).rstrip("/")
    levels = list(range(store.info.levels + 1) if levels is None else levels)
    if len(levels) == 1 and out.suffix == ".json":
        targets = {levels[0]: out}
    else:
        targets = {k: out / f"s{k}.json" for k in levels}
    written = []
    for k, path in targets.items():
        doc = _level_refs(store, k, base, zarr_format)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        written.append(path)
    return written
