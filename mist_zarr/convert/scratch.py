"""Atomic image writes on a local file system: a private scratch folder, then a rename.

Scratch folders live under the dataset's ``.mist-tmp`` and are named
``host-pid-uuid``; a writer's folder whose process is gone (killed, crashed)
is removed by the next conversion on that host.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zarr
from zarr.storage import LocalStore

from ..errors import ConversionError
from ..format import ATTR, TMP_DIR, ImageInfo
from ..writer import write_image

__all__ = ["clean_scratch", "local_root", "make_scratch", "write_and_rename"]


def local_root(root: zarr.Group) -> Path | None:
    """The dataset root's folder if it is on the local file system, else None."""
    store = root.store_path.store
    if isinstance(store, LocalStore):
        return Path(store.root) / root.store_path.path
    return None


def clean_scratch(root: Path) -> None:
    """Remove scratch folders of writers on this host whose process is gone (killed,
    crashed). Folders are named ``host-pid-uuid``: other hosts' writers (a cluster
    on a shared file system) are not judged by this host's process table."""
    scratch = root / TMP_DIR
    if not scratch.is_dir():
        return
    host = socket.gethostname()
    for entry in scratch.iterdir():
        parts = entry.name.removesuffix("-old").rsplit("-", 2)  # -old: a replaced image
        if len(parts) == 3 and parts[1] != "old":
            where, pid = parts[0], parts[1]
        else:  # written before host names were recorded: pid-uuid or pid-old-uuid
            where, pid = host, parts[0]
        if where == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
    try:  # leave no empty scratch folder behind
        scratch.rmdir()
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_scratch(root: Path) -> Path:
    """Create a private folder under ``root/.mist-tmp`` for one image being written.

    Other writers remove ``.mist-tmp`` whenever they leave it empty, so it
    can vanish between creating it and creating the folder inside: retry.
    """
    scratch = root / TMP_DIR / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
    deadline = time.monotonic() + 30  # each retry means another writer made progress
    while True:
        try:
            os.makedirs(scratch)
            return scratch
        except FileNotFoundError:  # .mist-tmp removed in between
            if time.monotonic() > deadline:
                raise
        except FileExistsError:
            if (root / TMP_DIR).is_dir() or time.monotonic() > deadline:
                raise  # (is_dir False: removed after os.makedirs saw it; retry)


def write_and_rename(root: Path, name: str, data: Any, kwargs: dict[str, Any],
                     *, replace: bool, write: Callable[..., ImageInfo] = write_image) -> ImageInfo:
    """Write into a private folder of the dataset, then rename it into place.

    Readers see the previous complete image or the new complete one, never a
    partial one; of two concurrent writers of the same image, the second
    finds it in place and, unless ``replace``, reports it as already there.
    ``write`` is :func:`~mist_zarr.writer.write_image` or one taking its arguments
    (the split writer).
    """
    scratch = make_scratch(root)
    target = root / name
    try:
        info = write(scratch, data, **kwargs)
        try:
            os.rename(scratch, target)
        except OSError:  # the target exists (a complete image, or an older partial one)
            if not target.exists():
                raise
            existing = ImageInfo.from_json(
                json.loads((target / "zarr.json").read_text())["attributes"][ATTR], where=name
            ) if (target / "zarr.json").exists() else None
            if existing is not None and existing.complete and not replace:
                raise ConversionError("already converted (by a concurrent conversion); pass "
                                      "overwrite to replace it") from None
            retired = scratch.with_name(f"{scratch.name}-old")
            os.rename(target, retired)
            os.rename(scratch, target)
            shutil.rmtree(retired, ignore_errors=True)
        return info
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
        try:  # leave no empty scratch folder behind (zarr would warn about it)
            scratch.parent.rmdir()
        except OSError:
            pass
