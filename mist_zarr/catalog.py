"""The dataset catalog: one row per mist-zarr image under a dataset root.

``catalog.parquet`` at the dataset root lists every image with its identity
(DICOM UIDs, patient, modality ...), its geometry and its stored bytes per
resolution level, so that a loader (or a person with pandas) can select
images without opening each one, and so that a dataset served over plain
HTTP, which cannot list directories, can still be enumerated.

Building the catalog walks the hierarchy (it needs a store that can list:
a local folder, ``s3://``, ``memory://`` ...) and reads, per image, its
``zarr.json`` and its prefix index: one small request each, run
concurrently. Pixels are never read.

The file is a cache, not a source of truth. It is *current* when it exists
and its schema version is this library's: nothing else is compared (a
staleness check would have to walk the dataset, which is what the file
saves). :func:`mist_zarr.convert` keeps it up to date with
:func:`update_catalog_table`; ``catalog(..., refresh=True)`` rebuilds it.

The files' schema and encoding (and ``failures.csv``'s) are
:mod:`mist_zarr.tables`; see ``docs/datasets.md`` for the schema.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr.api.asynchronous as za
from zarr.core.sync import sync
from zarr.storage import StorePath

from .format import ATTR, CHECKSUM, INDEX, ImageInfo
from .storage import (
    forget_listings,
    get_bytes,
    get_json_async,
    join_key,
    local_dir,
    replace_bytes,
    resolve,
)
from .tables import (
    CATALOG,
    CATALOG_VERSION,
    COLUMNS,
    FAILURE_COLUMNS,
    FAILURES,
    Table,
    arrange,
    decode_catalog,
    decode_failures,
    encode_catalog,
    encode_failures,
    encode_table,
    merge_failures,
)

# pandas is imported in the functions that return DataFrames (about 0.5 s):
# convert's catalog update and `mist-zarr ls` go through the Table functions
# (catalog_table, update_catalog_table, update_failures_table) and never load it.
if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CATALOG",
    "CATALOG_VERSION",
    "COLUMNS",
    "build_catalog",
    "FAILURES",
    "FAILURE_COLUMNS",
    "catalog",
    "catalog_table",
    "read_catalog",
    "read_failures",
    "read_failures_table",
    "update_failures",
    "update_failures_table",
    "update_catalog",
    "update_catalog_table",
    "write_catalog",
]

_CONCURRENCY = 32  # requests in flight while building

# DICOM attributes copied into the catalog (DICOM JSON model tags).
_DICOM = {
    "series_uid": "0020000E",  # SeriesInstanceUID
    "study_uid": "0020000D",  # StudyInstanceUID
    "patient_id": "00100020",  # PatientID
    "modality": "00080060",  # Modality
    "body_part": "00180015",  # BodyPartExamined
    "series_description": "0008103E",  # SeriesDescription
}

# -- one image -> one row ------------------------------------------------------
def _dicom_text(dicom: Mapping[str, Any], tag: str) -> str:
    element = dicom.get(tag) if isinstance(dicom, Mapping) else None
    values = element.get("Value") if isinstance(element, Mapping) else None
    if not values:
        return ""
    parts = []
    for v in values:
        if isinstance(v, Mapping):  # PN: {"Alphabetic": ...}
            v = v.get("Alphabetic") or next(iter(v.values()), "")
        parts.append(str(v))
    return "\\".join(parts)  # DICOM's value separator


def image_row(path: str, info: ImageInfo, index: np.ndarray | None,
              checksums_present: bool) -> dict[str, Any]:
    """The catalog row of one image (``index`` is None when not readable / incomplete)."""
    meta = info.metadata if isinstance(info.metadata, Mapping) else {}
    dicom = meta.get("dicom", {})
    row: dict[str, Any] = {"path": path}
    for column, tag in _DICOM.items():
        row[column] = _dicom_text(dicom, tag)
    if not row["series_uid"] and info.source_format == "dicom":
        row["series_uid"] = str(meta.get("series_uid") or "")
    if not row["modality"] and info.source_format == "dicom":
        row["modality"] = str(meta.get("modality") or "")
    if index is not None and index.size:
        per_level = [int(index[..., k].sum()) for k in range(index.shape[-1])]
        n_chunks = int((index[..., 0] > 0).sum())
    else:
        per_level, n_chunks = [], 0
    row.update({
        "source_format": info.source_format,
        "dims": list(info.dims),
        "shape": [int(s) for s in info.shape],
        "dtype": info.dtype.name,
        "spacing": [float(s) for s in info.spacing],
        "levels": int(info.levels),
        "bytes_per_level": per_level,
        "bytes": per_level[0] if per_level else 0,
        "n_chunks": n_chunks,
        "checksums_present": bool(checksums_present),
        "complete": bool(info.complete),
        "lossy_source": bool(meta.get("lossy_source", False)),
        "warnings": [str(w) for w in meta.get("warnings", []) or []],
    })
    return row


async def _image_row(store: Any, prefix: str, path: str,
                     doc: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Row for the image group at ``prefix/path``; None if there is no image there."""
    base = join_key(prefix, path)
    if doc is None:
        doc = await get_json_async(store, join_key(base, "zarr.json"), strict=False)
    attrs = (doc or {}).get("attributes", {}).get(ATTR) if isinstance(doc, dict) else None
    if not isinstance(attrs, dict):
        return None
    try:
        info = ImageInfo.from_json(attrs, where=path)
    except (ValueError, KeyError, TypeError):
        return None  # another format or version: not listed, as in list_images
    index = None
    if info.complete:
        try:
            array = await za.open_array(store=StorePath(store, join_key(base, INDEX)), mode="r",
                                        zarr_format=3)
            index = np.asarray(await array.getitem(...))
        except (FileNotFoundError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}: complete image whose prefix index cannot be read "
                             f"({type(exc).__name__}: {exc}); verify or convert it again"
                             ) from exc
    checksums = await store.exists(join_key(base, CHECKSUM, "zarr.json"))
    return image_row(path, info, index, checksums)


async def _walk(store: Any, prefix: str) -> list[dict[str, Any]]:
    """Rows of every image under ``prefix``, found by listing groups (not image internals)."""
    limit = asyncio.Semaphore(_CONCURRENCY)
    rows: list[dict[str, Any]] = []

    async def visit(path: str) -> None:
        async with limit:
            names = [n async for n in store.list_dir(join_key(prefix, path))]
        if not path and "zarr.json" not in names:
            # a root that has a zarr.json (checked before) but does not list it:
            # the store cannot list (plain HTTP), so no image would be found
            raise NotImplementedError(f"listing the store found {len(names)} entries and no "
                                      "zarr.json")
        await asyncio.gather(*(child(join_key(path, n.rstrip("/"))) for n in names
                               if n and not n.startswith(".") and n != "zarr.json"))

    async def child(path: str) -> None:
        # An image's zarr.json (DICOM header and per-slice metadata) is read and
        # made into its row within one hold of ``limit``: released in between,
        # every child of a folder would read its document before the first row
        # is made and hold it waiting, i.e. memory growing with the number of
        # images (figures in docs/datasets.md, "Measured").
        async with limit:
            doc = await get_json_async(store, join_key(prefix, path, "zarr.json"), strict=False)
            if not isinstance(doc, dict) or doc.get("node_type") != "group":
                return  # a file (catalog.parquet ...), an array or a non-zarr folder
            image = ATTR in doc.get("attributes", {})
            if image:
                row = await _image_row(store, prefix, path, doc)
                if row is not None:
                    rows.append(row)
            del doc
        if not image:
            await visit(path)

    await visit("")
    return rows


def _frame(table: Table) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(table.rows, columns=table.columns)


def _rows(dataset: Any, storage_options: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The row of every image under the dataset root (see :func:`build_catalog`)."""
    store, prefix = resolve(dataset, storage_options)
    if sync(get_json_async(store, join_key(prefix, "zarr.json"), strict=False)) is None:
        raise FileNotFoundError(f"{dataset}: no zarr.json: not a dataset root or image group")
    forget_listings(store)  # list what is in the store now, not what this process saw before
    try:
        rows = sync(_walk(store, prefix))
    except (NotImplementedError, FileNotFoundError) as exc:
        raise ValueError(f"{dataset}: cannot list the dataset to build its catalog ({exc}); "
                         f"build it where the files are and serve {CATALOG} with them") from exc
    if not rows:  # the root may itself be an image group
        row = sync(_image_row(store, prefix, ""))
        if row is not None:
            rows = [row]
    return rows


# -- public API -------------------------------------------------------------------
def build_catalog(dataset: Any, *, storage_options: Mapping[str, Any] | None = None
                  ) -> pd.DataFrame:
    """Scan the dataset root and return its catalog (one row per image, sorted by path).

    ``dataset`` is a path, URL (fsspec: ``s3://`` ``memory://`` ...), zarr store
    or group. The store must support listing: a dataset served over plain
    HTTP cannot be scanned; read its ``catalog.parquet`` with :func:`catalog`.
    Incomplete images are listed with ``complete`` False and no bytes.
    """
    return _frame(arrange(_rows(dataset, storage_options)))


def write_catalog(dataset: Any, df: pd.DataFrame | None = None, *,
                  storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Write ``df`` (default: :func:`build_catalog`) as ``catalog.parquet`` at the root.

    Atomic: on a local disk the file is written under a temporary name in the same
    folder and renamed over the old one; on an object store it is one
    ``set`` (PUT), which replaces the object whole. Columns beyond the schema
    are kept, with types inferred by pyarrow. Returns the frame written.
    """
    import pyarrow as pa

    if df is None:
        df = build_catalog(dataset, storage_options=storage_options)
    # a user's column goes through pyarrow's pandas conversion (NaN, None, NA -> null)
    columns = {name: df[name].tolist() if name in COLUMNS else pa.Array.from_pandas(df[name])
               for name in df.columns}
    _put(dataset, storage_options, CATALOG, encode_catalog(columns))
    return df


def _put(dataset: Any, storage_options: Mapping[str, Any] | None, name: str, data: bytes) -> None:
    """Replace the file ``name`` at the dataset root whole (rename locally, one PUT remotely)."""
    store, prefix = resolve(dataset, storage_options, read_only=False)
    replace_bytes(store, join_key(prefix, name), data)


def _get(dataset: Any, storage_options: Mapping[str, Any] | None, name: str) -> bytes | None:
    store, prefix = resolve(dataset, storage_options)
    return get_bytes(store, join_key(prefix, name))


def _stored(dataset: Any, storage_options: Mapping[str, Any] | None) -> Table | None:
    data = _get(dataset, storage_options, CATALOG)
    return None if data is None else decode_catalog(data)


def read_catalog(dataset: Any, *, storage_options: Mapping[str, Any] | None = None
                 ) -> pd.DataFrame | None:
    """The stored ``catalog.parquet`` as a frame, or None when absent or of another version.

    List columns come back as Python lists, so the frame equals the one
    :func:`build_catalog` returns for the same dataset.
    """
    table = _stored(dataset, storage_options)
    return None if table is None else _frame(table)


def catalog_table(dataset: Any, *, refresh: bool = False, write: bool | None = None,
                  storage_options: Mapping[str, Any] | None = None) -> Table:
    """:func:`catalog` as a :class:`~mist_zarr.tables.Table` of row dicts (no pandas)."""
    if not refresh:
        table = _stored(dataset, storage_options)
        if table is not None:
            return table
    table = arrange(_rows(dataset, storage_options))
    store, prefix = resolve(dataset, storage_options)
    local = local_dir(store, prefix)
    if write or (write is None and local is not None and os.access(local, os.W_OK)):
        try:
            _put(dataset, storage_options, CATALOG, encode_table(table))
        except OSError:
            if write:
                raise
    return table


def catalog(dataset: Any, *, refresh: bool = False, write: bool | None = None,
            storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The dataset's catalog: ``catalog.parquet`` if present, else built by scanning.

    The stored file is used whenever it exists and has this library's schema
    version; it is not compared with the images (see the module docstring).
    ``refresh`` rebuilds it. A built catalog is written back when ``write``
    is true, or by default (``None``) when the dataset is a local folder
    that can be written (errors writing it are ignored).
    """
    return _frame(catalog_table(dataset, refresh=refresh, write=write,
                                storage_options=storage_options))


def update_catalog_table(dataset: Any, paths: Iterable[str], *,
                         storage_options: Mapping[str, Any] | None = None) -> Table:
    """:func:`update_catalog` without pandas: returns the table written."""
    paths = list(dict.fromkeys(str(p).strip("/") for p in paths))
    old = _stored(dataset, storage_options)
    if old is not None and not paths:
        return old
    if old is None:
        table = arrange(_rows(dataset, storage_options))
    else:
        store, prefix = resolve(dataset, storage_options)

        async def rows() -> list[dict[str, Any] | None]:
            limit = asyncio.Semaphore(_CONCURRENCY)

            async def one(path: str) -> dict[str, Any] | None:
                async with limit:
                    return await _image_row(store, prefix, path)

            return await asyncio.gather(*(one(p) for p in paths))

        new = {r["path"]: r for r in sync(rows()) if r is not None}
        replaced = set(paths)
        kept = [r for r in old.rows if r["path"] not in replaced]
        # columns a user added to the stored catalog stay (empty in the new rows)
        columns = list(dict.fromkeys([*COLUMNS, *old.columns]))
        merged = kept + [{**{c: None for c in columns}, **r} for r in new.values()]
        table = arrange(merged, columns, old.types)
    _put(dataset, storage_options, CATALOG, encode_table(table))
    return table


def update_catalog(dataset: Any, paths: Iterable[str], *,
                   storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Replace (or add) the rows of the images at ``paths`` and write the catalog.

    Only those images are read. A path with no image any more loses its row.
    When the dataset has no (current) catalog yet it is built whole, since
    rows for only some images would look like a complete list. Concurrent
    updates of one dataset are last-writer-wins: the file is never torn, but
    a row may be missing until the next update or ``catalog(refresh=True)``.
    """
    return _frame(update_catalog_table(dataset, paths, storage_options=storage_options))


def read_failures(dataset: Any, *, storage_options: Mapping[str, Any] | None = None
                  ) -> pd.DataFrame:
    """The dataset's ``failures.csv`` as a frame (no rows when there is none)."""
    return _failures_frame(read_failures_table(dataset, storage_options=storage_options))


def read_failures_table(dataset: Any, *, storage_options: Mapping[str, Any] | None = None
                        ) -> Table:
    """:func:`read_failures` as a :class:`~mist_zarr.tables.Table` (no pandas)."""
    return decode_failures(_get(dataset, storage_options, FAILURES))


def _failures_frame(table: Table) -> pd.DataFrame:
    import pandas as pd

    # string columns, as read_csv(dtype=str) gives them, also with no rows
    return pd.DataFrame({c: pd.Series(table.column(c), dtype=str) for c in table.columns})


def update_failures_table(dataset: Any, rows: Iterable[Mapping[str, Any]], seen: Iterable[str],
                          *, storage_options: Mapping[str, Any] | None = None) -> Table:
    """:func:`update_failures` without pandas: returns the table."""
    before = _get(dataset, storage_options, FAILURES)
    table = merge_failures(decode_failures(before), rows, seen)
    data = encode_failures(table)
    if data != before:  # an unchanged report is not rewritten (a rerun writes nothing)
        _put(dataset, storage_options, FAILURES, data)
    return table


def update_failures(dataset: Any, rows: Iterable[Mapping[str, Any]], seen: Iterable[str], *,
                    storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Record a run's refused/failed sources in ``failures.csv`` and return the whole table.

    ``seen`` holds the keys of every source the run looked at (converted or
    not): their earlier rows are dropped, so a source that now converts
    leaves the table, while sources of earlier runs over other folders stay.
    A source refused again for the same reason keeps its first ``run`` and
    ``time``. The file is replaced whole (see :func:`write_catalog`) when its
    content changes, and exists even when empty: its header alone says the
    runs found nothing to report.
    """
    return _failures_frame(update_failures_table(dataset, rows, seen,
                                                 storage_options=storage_options))
