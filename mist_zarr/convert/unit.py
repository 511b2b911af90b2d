"""Converting one unit (a file or a DICOM series): read it, write its images, mark it done.

:func:`read_unit` and :func:`write_unit` are the two halves of
:func:`run_unit`, so that the local runner can read the next unit while
this one is written. The completion marker, written last, lets a rerun with
``skip_existing`` skip a finished unit without reading its sources again.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.storage import StorePath

from ..converters.base import SourceImage
from ..converters.sources import Unit, label, read_unit_images
from ..errors import AlreadyConvertedError, ConversionError, SourceIssue
from ..format import ATTR, DONE_DIR, INDEX, ImageInfo
from ..localread import read_array
from ..writer import write_image
from ..labels import LabelInfo, is_label_group
from .labels import mark_labels, write_label_image
from .report import SeriesResult
from .scratch import local_root, write_and_rename
from .options import Options
from .split import Submit, part_ranges, splittable, write_split
from ..storage import get_json, set_json
from .root import open_root

__all__ = ["Options", "UnitRead", "read_unit", "run_unit", "write_unit"]


@dataclass
class UnitRead:
    """What :func:`read_unit` found: images to write, or the unit's results from an earlier
    run (its completion marker, with ``skip_existing``), or the issue that refused it."""

    images: list[SourceImage] = field(default_factory=list)
    finished: list[SeriesResult] | None = None
    issue: SourceIssue | None = None


def run_unit(unit: Unit, dest: Any, options: Options, submit: Submit | None = None
             ) -> tuple[list[SeriesResult], list[SourceIssue]]:
    """Convert one unit into the dataset ``dest`` (runs in-process or on a dask worker).

    Writes the unit's completion marker last, so an interrupted unit is
    redone by a rerun with ``skip_existing`` and a finished one is skipped
    without reading its sources again. ``submit``: see :func:`write_unit`.
    """
    return write_unit(unit, dest, options, read_unit(unit, dest, options), submit)


def _marker_key(root: zarr.Group, unit: Unit) -> str:
    marker = f"{DONE_DIR}/{hashlib.sha1(unit.key.encode()).hexdigest()}.json"
    return f"{root.store_path.path}/{marker}".strip("/")


def finished(root: zarr.Group, unit: Unit) -> list[SeriesResult] | None:
    """The unit's images if its marker says done and every one is still complete."""
    return _finished(root, unit, get_json(root.store_path.store, _marker_key(root, unit)))


def _finished(root: zarr.Group, unit: Unit, done: Any) -> list[SeriesResult] | None:
    """:func:`finished`, given the unit's marker document (None: no marker)."""
    if done is None:
        return None
    results = []
    for name in done["images"]:
        info = _existing(root, name)
        if info is None or not info.complete:
            return None
        results.append(SeriesResult(name, info.source_format, info.shape, info.dtype.name,
                                    0, 0, len(unit.files), status="existing"))
    return results


def read_unit(unit: Unit, dest: Any, options: Options) -> UnitRead:
    """The reading half of :func:`run_unit`."""
    root = open_root(dest, options.storage_options)
    if not options.overwrite:
        # before any source is read: a finished unit is kept or refused as it stands
        marker = get_json(root.store_path.store, _marker_key(root, unit))
        done = _finished(root, unit, marker)
        if done is not None:
            if options.skip_existing or marker.get("run") == options.run:
                return UnitRead(finished=done)  # same run: a retried task after a lost worker
            names = ", ".join(r.path for r in done)
            return UnitRead(issue=SourceIssue(label(unit), (
                f"already converted ({names}); pass overwrite (--overwrite) to replace it or "
                "skip_existing (--skip-existing) to keep it"), key=unit.key))
    try:
        return UnitRead(images=read_unit_images(unit, options.max_bytes, options.batch_bytes))
    except (ValueError, OSError) as exc:
        return UnitRead(issue=SourceIssue(label(unit), str(exc), key=unit.key))


def write_unit(unit: Unit, dest: Any, options: Options, read: UnitRead,
               submit: Submit | None = None) -> tuple[list[SeriesResult], list[SourceIssue]]:
    """The writing half of :func:`run_unit`, given what :func:`read_unit` returned.

    With ``submit`` an image larger than ``options.split_bytes`` is written in
    ``options.parts`` slice ranges submitted with it (:mod:`.split`)."""
    if read.issue is not None:
        return [], [read.issue]
    if read.finished is not None:
        return read.finished, []
    root = open_root(dest, options.storage_options)
    results, problems = [], []
    for image in read.images:
        image.metadata["source_key"] = unit.key
        try:
            mark_labels(image, options.labels, unit.files[0])
            results.append(_write_one(root, image.name, image, options, submit, unit.key))
        except (ValueError, TypeError, OSError) as exc:
            problems.append(SourceIssue(label(unit), f"{image.name}: {exc}", key=unit.key))
    if not problems:
        set_json(root.store_path.store, _marker_key(root, unit),
                   {"key": unit.key, "images": [r.path for r in results],
                    "files": len(unit.files), "run": options.run})
    return results, problems


def _existing(root: zarr.Group, path: str) -> ImageInfo | None:
    try:
        node = root[path]
    except KeyError:
        return None
    attrs = node.attrs.get(ATTR) if isinstance(node, zarr.Group) else None
    if attrs is None:
        raise ConversionError(f"{path}: exists in the dataset and is not a mist-zarr image")
    return ImageInfo.from_json(attrs, where=path)


def _write_one(root: zarr.Group, name: str, image: SourceImage, options: Options,
               submit: Submit | None = None, source: str = "") -> SeriesResult:
    if image.labels:
        return _write_labels(root, name, image, options)
    bytes_in = sum(os.path.getsize(f) for f in image.source_files if os.path.exists(f))
    existing = _existing(root, name)
    if existing is not None and existing.complete:
        same_run = existing.metadata.get("convert_run") == options.run
        if options.skip_existing or same_run:  # same_run: a retried task after a lost worker
            return SeriesResult(name, existing.source_format, existing.shape,
                                existing.dtype.name, bytes_in, 0, len(image.source_files),
                                status="existing")
        if not options.overwrite:
            raise AlreadyConvertedError("already converted; pass overwrite (--overwrite) to "
                                        "replace it or skip_existing (--skip-existing) to keep it")
    parent = name.rsplit("/", 1)[0] if "/" in name else ""
    if parent:
        _require_group(root, parent)
    metadata = image.write_metadata()
    metadata["convert_run"] = options.run
    kwargs = dict(dims=image.dims, spacing=image.spacing, affine=image.affine,
                  source_format=image.source_format, metadata=metadata,
                  alpha=options.alpha, quantize=options.quantize, threads=options.threads)
    write, parts = write_image, 1
    if submit is not None and splittable(image.data, options.split_bytes):
        parts = len(part_ranges(image.data.shape[0], options.parts))
        write = functools.partial(write_split, submit=submit, parts=parts,
                                  label=f"series {source or name}")
    local = local_root(root)
    if local is not None:
        info = write_and_rename(local, name, image.data, kwargs, replace=options.overwrite,
                                write=write)
    else:
        # object stores have no rename: the image's "complete" flag, written
        # last, is what makes it visible to readers
        info = write(
            StorePath(root.store_path.store, f"{root.store_path.path}/{name}".strip("/")),
            image.data, overwrite=True, **kwargs)
    out = int(_stored_index(root, local, name)[..., 0].sum())
    return SeriesResult(name, image.source_format, info.shape, info.dtype.name, bytes_in, out,
                        len(image.source_files), warnings=list(image.warnings), parts=parts)


def _stored_index(root: zarr.Group, local: Any, name: str) -> np.ndarray:
    """The prefix index just written (for the report's bytes out): read from its files
    without zarr in a local dataset (an open through zarr costs milliseconds per image)."""
    index = read_array(local / name / INDEX) if local is not None else None
    if index is None:
        index = zarr.open_array(root.store_path.store, mode="r",
                                path=f"{root.store_path.path}/{name}/{INDEX}".strip("/"))[...]
    return index


def _write_labels(root: zarr.Group, name: str, image: SourceImage,
                  options: Options) -> SeriesResult:
    try:
        node = root[name]
    except KeyError:
        node = None
    if node is not None and not options.overwrite:
        if options.skip_existing and is_label_group(node.attrs):
            info = LabelInfo.from_json(node.attrs[ATTR], where=name).geometry
            if info.complete:
                return SeriesResult(name, info.source_format, info.shape, info.dtype.name, 0, 0,
                                    len(image.source_files), status="existing")
        raise AlreadyConvertedError("already converted; pass overwrite (--overwrite) to replace "
                                    "it or skip_existing (--skip-existing) to keep it")
    parent = name.rsplit("/", 1)[0] if "/" in name else ""
    if parent:
        _require_group(root, parent)
    metadata = image.write_metadata() | {"convert_run": options.run}
    return write_label_image(root, name, image, metadata, overwrite=node is not None)


def _require_group(root: zarr.Group, path: str) -> None:
    """Create the groups along ``path``; safe when other workers create them at once."""
    for attempt in range(3):
        try:
            root.require_group(path)
            return
        except Exception:  # another process created a node on the path in between
            try:
                if isinstance(root[path], zarr.Group):
                    return
            except KeyError:
                if attempt == 2:
                    raise
            else:
                raise ConversionError(f"{path}: exists in the dataset and is not a group")
