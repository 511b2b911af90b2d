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
:func:`update_catalog`; ``catalog(..., refresh=True)`` rebuilds it.

See ``docs/datasets.md`` for the schema.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
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

# pandas and pyarrow are imported in the functions that use them: together they
# add ~1.3 s to `import mist_zarr` (measured with `python -X importtime`), which
# convert, verify and serve would pay without ever touching a catalog.
if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

__all__ = [
    "CATALOG",
    "CATALOG_VERSION",
    "COLUMNS",
    "build_catalog",
    "FAILURES",
    "FAILURE_COLUMNS",
    "catalog",
    "read_catalog",
    "read_failures",
    "update_failures",
    "update_catalog",
    "write_catalog",
]

CATALOG = "catalog.parquet"
FAILURES = "failures.csv"  # sources that were refused or failed, next to the catalog
CATALOG_VERSION = 2  # 2: the warnings column
_META_KEY = b"mist_catalog"
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

# column -> (pyarrow type name, meaning); the order is the column order
COLUMNS: dict[str, tuple[str, str]] = {
    "path": ("string", "image group path under the dataset root ('/' separated)"),
    "series_uid": ("string", "DICOM SeriesInstanceUID (0020000E); '' if not DICOM"),
    "study_uid": ("string", "DICOM StudyInstanceUID (0020000D)"),
    "patient_id": ("string", "DICOM PatientID (00100020)"),
    "modality": ("string", "DICOM Modality (00080060), e.g. CT, MR, CR"),
    "body_part": ("string", "DICOM BodyPartExamined (00180015)"),
    "series_description": ("string", "DICOM SeriesDescription (0008103E)"),
    "source_format": ("string", "dicom, nifti, png, jpeg, tiff or array"),
    "dims": ("list<string>", "dimension names in array order, e.g. [z, y, x]"),
    "shape": ("list<int64>", "level-0 shape, following dims"),
    "dtype": ("string", "dtype the samples are read back in (numpy name)"),
    "spacing": ("list<double>", "level-0 spacing following dims (mm; s for t; 1 for c)"),
    "levels": ("int64", "number of reduced levels n: levels 0..n can be read"),
    "bytes_per_level": ("list<int64>",
                        "stored bytes read for level k = sum of index[..., k], k = 0..n"),
    "bytes": ("int64", "stored bytes of level 0 (the whole image)"),
    "n_chunks": ("int64", "chunks stored (chunks entirely 0 are not stored)"),
    "checksums_present": ("bool", "the image has its CRC32C checksum array"),
    "complete": ("bool", "the write finished; incomplete images cannot be read"),
    "lossy_source": ("bool", "the source itself was lossy-compressed (DICOM flag)"),
    "warnings": ("list<string>", "what the conversion warned about this image (printed by "
                                 "convert, shown by info and ls --warnings)"),
}
_LIST_COLUMNS = [c for c, (t, _) in COLUMNS.items() if t.startswith("list")]


def _arrow_type(name: str) -> pa.DataType:
    import pyarrow as pa

    if name.startswith("list<"):
        return pa.list_(_arrow_type(name[5:-1]))
    return {"string": pa.string(), "int64": pa.int64(), "double": pa.float64(),
            "bool": pa.bool_()}[name]


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


def _frame(rows: Iterable[Mapping[str, Any]], columns: list[str] | None = None
           ) -> pd.DataFrame:
    import pandas as pd

    rows = sorted(rows, key=lambda r: r["path"])
    if columns is None:
        columns = list(dict.fromkeys([*COLUMNS, *(c for r in rows for c in r)]))
    return pd.DataFrame(rows, columns=columns)


# -- public API -------------------------------------------------------------------
def build_catalog(dataset: Any, *, storage_options: Mapping[str, Any] | None = None
                  ) -> pd.DataFrame:
    """Scan the dataset root and return its catalog (one row per image, sorted by path).

    ``dataset`` is a path, URL (fsspec: ``s3://`` ``memory://`` ...), zarr store
    or group. The store must support listing: a dataset served over plain
    HTTP cannot be scanned; read its ``catalog.parquet`` with :func:`catalog`.
    Incomplete images are listed with ``complete`` False and no bytes.
    """
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
    return _frame(rows)


def _table(df: pd.DataFrame) -> pa.Table:
    import pyarrow as pa

    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"catalog frame lacks the columns {missing}")
    arrays, fields = [], []
    for name in df.columns:
        values = df[name].tolist()
        if name in COLUMNS:
            typ = _arrow_type(COLUMNS[name][0])
            if name in _LIST_COLUMNS:
                values = [None if v is None else list(v) for v in values]
            array = pa.array(values, type=typ)
        else:  # a user's column: pandas' missing values (NaN, None, NA) become nulls
            array = pa.Array.from_pandas(df[name])
        arrays.append(array)
        fields.append(pa.field(name, array.type))
    meta = {_META_KEY: json.dumps({
        "version": CATALOG_VERSION, "images": len(df),
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
    }).encode()}
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=meta))


def write_catalog(dataset: Any, df: pd.DataFrame | None = None, *,
                  storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Write ``df`` (default: :func:`build_catalog`) as ``catalog.parquet`` at the root.

    Atomic: on a local disk the file is written under a temporary name in the
    same folder and renamed over the old one; on an object store it is one
    ``set`` (PUT), which replaces the object whole. Columns beyond the schema
    are kept, with types inferred by pyarrow. Returns the frame written.
    """
    import pyarrow.parquet as pq

    if df is None:
        df = build_catalog(dataset, storage_options=storage_options)
    table = _table(df)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    _put(dataset, storage_options, CATALOG, sink.getvalue())
    return df


def _put(dataset: Any, storage_options: Mapping[str, Any] | None, name: str, data: bytes) -> None:
    """Replace the file ``name`` at the dataset root whole (rename locally, one PUT remotely)."""
    store, prefix = resolve(dataset, storage_options, read_only=False)
    replace_bytes(store, join_key(prefix, name), data)


def _get(dataset: Any, storage_options: Mapping[str, Any] | None, name: str) -> bytes | None:
    store, prefix = resolve(dataset, storage_options)
    return get_bytes(store, join_key(prefix, name))


def read_catalog(dataset: Any, *, storage_options: Mapping[str, Any] | None = None
                 ) -> pd.DataFrame | None:
    """The stored ``catalog.parquet`` as a frame, or None when absent or of another version.

    List columns come back as Python lists, so the frame equals the one
    :func:`build_catalog` returns for the same dataset.
    """
    import pyarrow.parquet as pq

    data = _get(dataset, storage_options, CATALOG)
    if data is None:
        return None
    table = pq.read_table(io.BytesIO(data))
    meta = json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
    if meta.get("version") != CATALOG_VERSION:
        return None
    import pandas as pd

    return pd.DataFrame(table.to_pylist(), columns=table.column_names)


def catalog(dataset: Any, *, refresh: bool = False, write: bool | None = None,
            storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The dataset's catalog: ``catalog.parquet`` if present, else built by scanning.

    The stored file is used whenever it exists and has this library's schema
    version; it is not compared with the images (see the module docstring).
    ``refresh`` rebuilds it. A built catalog is written back when ``write``
    is true, or by default (``None``) when the dataset is a local folder
    that can be written (errors writing it are ignored).
    """
    if not refresh:
        df = read_catalog(dataset, storage_options=storage_options)
        if df is not None:
            return df
    df = build_catalog(dataset, storage_options=storage_options)
    store, prefix = resolve(dataset, storage_options)
    local = local_dir(store, prefix)
    if write or (write is None and local is not None and os.access(local, os.W_OK)):
        try:
            write_catalog(dataset, df, storage_options=storage_options)
        except OSError:
            if write:
                raise
    return df


def update_catalog(dataset: Any, paths: Iterable[str], *,
                   storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Replace (or add) the rows of the images at ``paths`` and write the catalog.

    Only those images are read. A path with no image any more loses its row.
    When the dataset has no (current) catalog yet it is built whole, since
    rows for only some images would look like a complete list. Concurrent
    updates of one dataset are last-writer-wins: the file is never torn, but
    a row may be missing until the next update or ``catalog(refresh=True)``.
    """
    paths = list(dict.fromkeys(str(p).strip("/") for p in paths))
    old = read_catalog(dataset, storage_options=storage_options)
    if old is not None and not paths:
        return old
    if old is None:
        return write_catalog(dataset, build_catalog(dataset, storage_options=storage_options),
                             storage_options=storage_options)
    store, prefix = resolve(dataset, storage_options)

    async def rows() -> list[dict[str, Any] | None]:
        limit = asyncio.Semaphore(_CONCURRENCY)

        async def one(path: str) -> dict[str, Any] | None:
            async with limit:
                return await _image_row(store, prefix, path)

        return await asyncio.gather(*(one(p) for p in paths))

    new = {r["path"]: r for r in sync(rows()) if r is not None}
    kept = [r for r in old.to_dict("records") if r["path"] not in set(paths)]
    # columns a user added to the stored catalog stay (empty in the new rows)
    columns = list(dict.fromkeys([*COLUMNS, *old.columns]))
    merged = kept + [{**{c: None for c in columns}, **r} for r in new.values()]
    return write_catalog(dataset, _frame(merged, columns), storage_options=storage_options)


# failures.csv: one row per source (file or DICOM series) that was not converted
FAILURE_COLUMNS: dict[str, str] = {
    "key": "identity of the source: a file path, or the DICOM series key (UID + stack)",
    "source": "the source as a person reads it: file, or 'key (n files, e.g. first file)'",
    "kind": "failed (a refused or broken source: an error) or skipped (not an image)",
    "reason": "why, naming the file or series",
    "run": "id of the conversion run that first reported it (for this reason)",
    "time": "when that run ended (UTC, ISO 8601)",
}


def read_failures(dataset: Any, *, storage_options: Mapping[str, Any] | None = None
                  ) -> pd.DataFrame:
    """The dataset's ``failures.csv`` as a frame (no rows when there is none)."""
    return _failures_frame(_get(dataset, storage_options, FAILURES))


def _failures_frame(data: bytes | None) -> pd.DataFrame:
    import pandas as pd

    if data is None:
        return pd.DataFrame({c: pd.Series(dtype=str) for c in FAILURE_COLUMNS})
    return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)


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
    import pandas as pd

    before = _get(dataset, storage_options, FAILURES)
    old = _failures_frame(before)
    rows = [{c: str(r.get(c, "")) for c in FAILURE_COLUMNS} for r in rows]
    # a source refused again for the same reason keeps the run that first reported it
    same = ["key", "source", "kind", "reason"]
    first = {tuple(r[c] for c in same): r for r in old.to_dict("records")}
    rows = [first.get(tuple(r[c] for c in same), r) for r in rows]
    drop = set(seen) | {r["key"] for r in rows}
    kept = old[~old["key"].isin(drop)] if len(old) else old
    df = pd.concat([kept, pd.DataFrame(rows, columns=list(FAILURE_COLUMNS))], ignore_index=True)
    df = df.sort_values(["kind", "key"], kind="stable", ignore_index=True)
    data = df.to_csv(index=False).encode()
    if data != before:  # an unchanged report is not rewritten (a rerun writes nothing)
        _put(dataset, storage_options, FAILURES, data)
    return df
