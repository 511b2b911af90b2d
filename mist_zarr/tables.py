"""The dataset's two tables, ``catalog.parquet`` and ``failures.csv``, as plain records.

Their schema, and their bytes to and from a :class:`Table` of row dicts:
pyarrow for the catalog, the csv module for the failures, no pandas (about
0.5 s to import here; ``mist-zarr ls`` and the catalog update that ends every
``convert`` need none of it). :mod:`mist_zarr.catalog` builds rows and gives
its users DataFrames; the files are the same either way (pandas reads them
as before). ``local_catalog`` / ``local_failures`` read the files of a
dataset in a local folder without zarr, for ``ls``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .localread import local_path, read_bytes

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "CATALOG",
    "CATALOG_VERSION",
    "COLUMNS",
    "FAILURES",
    "FAILURE_COLUMNS",
    "Table",
    "arrange",
    "decode_catalog",
    "decode_failures",
    "dumps",
    "encode_catalog",
    "encode_failures",
    "local_catalog",
    "local_failures",
    "merge_failures",
]

CATALOG = "catalog.parquet"
FAILURES = "failures.csv"  # sources that were refused or failed, next to the catalog
CATALOG_VERSION = 2  # 2: the warnings column
META_KEY = b"mist_catalog"

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
_LIST_COLUMNS = {c for c, (t, _) in COLUMNS.items() if t.startswith("list")}

# failures.csv: one row per source (file or DICOM series) that was not converted
FAILURE_COLUMNS: dict[str, str] = {
    "key": "identity of the source: a file path, or the DICOM series key (UID + stack)",
    "source": "the source as a person reads it: file, or 'key (n files, e.g. first file)'",
    "kind": "failed (a refused or broken source: an error) or skipped (not an image)",
    "reason": "why, naming the file or series",
    "run": "id of the conversion run that first reported it (for this reason)",
    "time": "when that run ended (UTC, ISO 8601)",
}


@dataclass
class Table:
    """Rows (dicts of plain Python values) under named columns; ``types`` holds the stored
    pyarrow type of columns read from a file, so that a rewrite keeps users' columns."""

    columns: list[str]
    rows: list[dict[str, Any]]
    types: dict[str, Any] = field(default_factory=dict)

    def column(self, name: str) -> list[Any]:
        return [r.get(name) for r in self.rows]


def arrange(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None,
            types: Mapping[str, Any] | None = None) -> Table:
    """Catalog rows sorted by path, under ``columns`` (default: the schema's, then any other
    key of the rows, in order of appearance)."""
    rows = sorted((dict(r) for r in rows), key=lambda r: r["path"])
    if columns is None:
        columns = list(dict.fromkeys([*COLUMNS, *(c for r in rows for c in r)]))
    return Table(list(columns), rows, dict(types or {}))


# -- catalog.parquet -------------------------------------------------------------------
def _arrow_type(name: str) -> pa.DataType:
    import pyarrow as pa

    if name.startswith("list<"):
        return pa.list_(_arrow_type(name[5:-1]))
    return {"string": pa.string(), "int64": pa.int64(), "double": pa.float64(),
            "bool": pa.bool_()}[name]


def _array(name: str, values: Any, stored: Any) -> pa.Array:
    import pyarrow as pa

    if isinstance(values, pa.Array):
        return values
    if name in COLUMNS:
        if name in _LIST_COLUMNS:
            values = [None if v is None else list(v) for v in values]
        return pa.array(values, type=_arrow_type(COLUMNS[name][0]))
    # a user's column: its stored type when it was read from a file, else inferred
    # (NaN, as pandas writes missing floats, becomes null)
    try:
        return pa.array(values, type=stored, from_pandas=True)
    except (pa.ArrowException, TypeError, ValueError):
        return pa.array(values, from_pandas=True)


def encode_catalog(columns: Mapping[str, Any], types: Mapping[str, Any] | None = None) -> bytes:
    """``catalog.parquet``'s bytes for ``columns`` (name -> values, or a pyarrow Array),
    with the schema's types for its columns and the version in the file's metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"catalog frame lacks the columns {missing}")
    built = _json_columns(columns)
    arrays = [built[name] if name in built else _array(name, values, (types or {}).get(name))
              for name, values in columns.items()]
    fields = [pa.field(name, array.type) for name, array in zip(columns, arrays)]
    meta = {META_KEY: json.dumps({
        "version": CATALOG_VERSION, "images": len(arrays[0]),
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
    }).encode()}
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=meta))
    sink = pa.BufferOutputStream()  # not io.BytesIO: see decode_catalog
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _json_columns(columns: Mapping[str, Any]) -> dict[str, Any]:
    """The schema's columns among ``columns`` made by arrow's JSON reader with the schema's
    types; {} when there are no rows or a value is no JSON (the caller uses ``pa.array``).

    Why: ``pa.array`` of Python values imports pandas (pyarrow's pandas shim tries on
    first use), about 0.5 s that every ``convert`` would pay to write a few rows.
    """
    import pyarrow as pa
    import pyarrow.json as pj

    names = [c for c, v in columns.items() if c in COLUMNS and not isinstance(v, pa.Array)]
    rows = list(zip(*(columns[c] for c in names)))
    if not rows:
        return {}
    try:
        lines = "\n".join(json.dumps(dict(zip(names, row)), default=_json_default,
                                     allow_nan=False) for row in rows)
        table = pj.read_json(
            pa.BufferReader(lines.encode()), read_options=pj.ReadOptions(use_threads=False),
            parse_options=pj.ParseOptions(
                explicit_schema=pa.schema([(c, _arrow_type(COLUMNS[c][0])) for c in names]),
                unexpected_field_behavior="error"))
    except (pa.ArrowException, TypeError, ValueError):
        return {}
    return {c: table.column(c) for c in names}


def encode_table(table: Table) -> bytes:
    """:func:`encode_catalog` of a :class:`Table`."""
    return encode_catalog({c: table.column(c) for c in table.columns}, table.types)


def decode_catalog(data: bytes) -> Table | None:
    """The rows of ``catalog.parquet``'s bytes (list columns as lists), or None when the
    file has another schema version."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # ParquetFile, not read_table: read_table loads pyarrow.dataset, which imports
    # pandas. An arrow buffer, not a Python file object (io.BytesIO): without pandas
    # loaded, a read through one aborted the interpreter at exit in 1 run in 5 to 10
    # here ("terminate called without an active exception", rc 134; pyarrow 26;
    # apache/arrow#34314, #50482); never through a buffer.
    table = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    if meta.get("version") != CATALOG_VERSION:
        return None
    return Table(table.column_names, table.to_pylist(),
                 {f.name: f.type for f in table.schema})


# -- failures.csv ----------------------------------------------------------------------
def decode_failures(data: bytes | None) -> Table:
    """The rows of ``failures.csv``'s bytes, every value a string (no rows when None)."""
    if data is None:
        return Table(list(FAILURE_COLUMNS), [])
    reader = csv.reader(io.StringIO(data.decode(), newline=""))
    header = next(reader, [])
    return Table(header, [dict(zip(header, values)) for values in reader if values])


def encode_failures(table: Table) -> bytes:
    """``failures.csv``'s bytes: a header line, then one line per row (missing values
    empty), quoted where needed; the bytes pandas' ``to_csv(index=False)`` writes."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(table.columns)
    writer.writerows([r.get(c, "") for c in table.columns] for r in table.rows)
    return out.getvalue().encode()


def merge_failures(old: Table, rows: Iterable[Mapping[str, Any]], seen: Iterable[str]) -> Table:
    """``old`` with a run's failure ``rows``: the earlier rows of every ``seen`` key
    dropped, a source refused again for the same reason keeping its first ``run`` and
    ``time``; sorted by kind, then key."""
    rows = [{c: str(r.get(c, "")) for c in FAILURE_COLUMNS} for r in rows]
    same = ["key", "source", "kind", "reason"]
    first = {tuple(r.get(c, "") for c in same): r for r in old.rows}
    rows = [first.get(tuple(r[c] for c in same), r) for r in rows]
    drop = set(seen) | {r["key"] for r in rows}
    merged = [r for r in old.rows if r.get("key", "") not in drop] + rows
    merged.sort(key=lambda r: (r.get("kind", ""), r.get("key", "")))
    return Table(list(dict.fromkeys([*old.columns, *FAILURE_COLUMNS])), merged)


# -- a dataset in a local folder ---------------------------------------------------------
def local_catalog(dataset: Any) -> Table | None:
    """The stored catalog of a dataset in a local folder, read without zarr; None when
    ``dataset`` is no local path or has no ``catalog.parquet`` of this version."""
    folder = local_path(dataset)
    data = None if folder is None else read_bytes(folder / CATALOG)
    return None if data is None else decode_catalog(data)


def local_failures(dataset: Any) -> Table | None:
    """``failures.csv`` of a dataset in a local folder (no rows when there is none);
    None when ``dataset`` is no local path."""
    folder = local_path(dataset)
    return None if folder is None else decode_failures(read_bytes(folder / FAILURES))


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy scalars and arrays, without importing numpy
        return o.tolist()
    raise TypeError(type(o))


def dumps(obj: Any) -> str:
    """``obj`` as indented JSON, numpy scalars and arrays included (the CLI's ``--json``)."""
    return json.dumps(obj, indent=1, default=_json_default)
