"""The dataset catalog: rows from real converted datasets, parquet round trips, updates."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import zarr

import mist_zarr
from mist_zarr.catalog import (
    CATALOG,
    COLUMNS,
    FAILURE_COLUMNS,
    build_catalog,
    catalog,
    read_catalog,
    update_catalog,
    write_catalog,
)
from mist_zarr.phantom import ct_phantom
from mist_zarr.serve import serve_in_thread

from .conftest import DATA_DIR, shared

CT_SERIES = DATA_DIR / "ct" / "CRLM-CT-1004"


def save_nifti(path: Path, data_zyx: np.ndarray, spacing_xyz=(0.8, 0.9, 2.5)) -> None:
    """Save a (z, y, x) array as NIfTI (nibabel's (x, y, z) order) with a scaling affine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing_xyz, 1.0])
    affine[:3, 3] = [-10.0, 20.0, 5.0]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data_zyx.transpose(2, 1, 0)), affine), path)


def make_sources(root: Path, *, with_ct: bool = True) -> Path:
    """Three generated NIfTI volumes of different sizes/dtypes, plus the real CT if present."""
    rng = np.random.default_rng(3)
    save_nifti(root / "small" / "tiny.nii.gz",
               rng.integers(-500, 500, (6, 48, 40)).astype(np.int16))
    save_nifti(root / "wide.nii.gz", rng.integers(0, 4000, (4, 260, 300)).astype(np.uint16),
               spacing_xyz=(0.5, 0.6, 3.0))
    save_nifti(root / "phantom.nii.gz", ct_phantom((3, 256, 256)))
    if with_ct and CT_SERIES.is_dir():
        shutil.copytree(CT_SERIES, root / "dicom" / "ct1004")
    return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A dataset converted by mist_zarr.convert (catalog not yet written by the test)."""
    src = make_sources(tmp_path_factory.mktemp("src"))
    dest = tmp_path_factory.mktemp("out") / "dataset"
    report = mist_zarr.convert(src, dest)
    assert report.ok, report.summary()
    return dest, report


def quiet_list_images(dest):
    with warnings.catch_warnings():  # catalog.parquet is not a zarr node
        warnings.simplefilter("ignore")
        return mist_zarr.list_images(dest)


def as_lists(df: pd.DataFrame) -> list[dict]:
    """Rows with numpy arrays (pandas.read_parquet's list columns) as Python lists."""
    return [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()}
            for r in df.to_dict("records")]


def test_catalog_rows_match_list_images_and_the_index(converted):
    dest, report = converted
    df = build_catalog(dest)
    assert list(df.columns) == list(COLUMNS)
    assert sorted(df["path"]) == sorted(r.path for r in report.converted)
    listed = {r["path"]: r for r in quiet_list_images(dest)}
    assert list(df["path"]) == sorted(listed)
    for row in df.to_dict("records"):
        ref = listed[row["path"]]
        for key in ("modality", "shape", "dtype", "spacing", "source_format", "levels", "bytes",
                    "complete"):
            assert row[key] == ref[key], (row["path"], key)
        _, info = mist_zarr.open_image(dest / row["path"])
        index = mist_zarr.read_index(dest / row["path"])
        assert row["dims"] == list(info.dims)
        assert row["bytes_per_level"] == [int(index[..., k].sum())
                                          for k in range(info.levels + 1)]
        assert row["bytes"] == row["bytes_per_level"][0] > row["bytes_per_level"][-1] or \
            info.levels == 0
        assert row["n_chunks"] == int((index[..., 0] > 0).sum()) > 0
        assert row["checksums_present"] is True and row["complete"] is True
        assert row["lossy_source"] is False
    by_path = df.set_index("path")
    assert by_path.loc["wide", "shape"] == [4, 260, 300]
    assert by_path.loc["wide", "dtype"] == "uint16"
    assert by_path.loc["wide", "spacing"] == pytest.approx([3.0, 0.6, 0.5])
    assert by_path.loc["wide", "levels"] == 3
    assert by_path.loc["small/tiny", "levels"] == 0
    nifti = df[df["source_format"] == "nifti"]
    assert len(nifti) == 3
    for column in ("series_uid", "study_uid", "patient_id", "modality", "body_part",
                   "series_description"):
        assert (nifti[column] == "").all()


def test_dicom_columns_come_from_the_dicom_json_model(converted):
    import pydicom

    files = sorted(shared("ct", "CRLM-CT-1004").glob("*.dcm"))
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    dest, _ = converted
    row = build_catalog(dest).query("source_format == 'dicom'").iloc[0]
    assert row["series_uid"] == ds.SeriesInstanceUID
    assert row["study_uid"] == ds.StudyInstanceUID
    assert row["patient_id"] == ds.PatientID
    assert row["modality"] == "CT"
    assert row["series_description"] == ds.SeriesDescription
    assert row["body_part"] == str(ds.get("BodyPartExamined", ""))
    assert row["shape"] == [41, 512, 512] and row["levels"] == 3
    assert row["n_chunks"] == 41


def test_parquet_round_trip(converted, tmp_path):
    src, _ = converted
    dest = tmp_path / "dataset"
    shutil.copytree(src, dest)
    built = build_catalog(dest)
    write_catalog(dest, built)
    assert (dest / CATALOG).is_file()
    assert not [p for p in dest.iterdir() if p.name.endswith(".tmp")]
    # plain pandas reads the same rows (list columns come back as arrays)
    assert as_lists(pd.read_parquet(dest / CATALOG)) == as_lists(built)
    # read_catalog / catalog give back exactly the built frame
    stored = read_catalog(dest)
    pd.testing.assert_frame_equal(stored, built)
    pd.testing.assert_frame_equal(catalog(dest), built)
    import pyarrow.parquet as pq

    schema = pq.read_schema(dest / CATALOG)
    assert str(schema.field("shape").type) == "list<element: int64>"
    assert str(schema.field("spacing").type) == "list<element: double>"
    assert str(schema.field("bytes_per_level").type) == "list<element: int64>"
    assert str(schema.field("complete").type) == "bool"
    assert json.loads(schema.metadata[b"mist_catalog"])["images"] == len(built)


def test_stored_catalog_is_used_until_refreshed(converted, tmp_path):
    src, _ = converted
    dest = tmp_path / "dataset"
    shutil.copytree(src, dest)
    labelled = build_catalog(dest).assign(label=lambda d: range(len(d)))
    write_catalog(dest, labelled)
    assert catalog(dest)["label"].tolist() == list(range(len(labelled)))  # read, not rebuilt
    fresh = catalog(dest, refresh=True)
    assert "label" not in fresh.columns
    assert "label" not in read_catalog(dest).columns  # the rebuilt one was written back


def test_catalog_is_built_and_written_when_missing(converted, tmp_path):
    src, _ = converted
    dest = tmp_path / "dataset"
    shutil.copytree(src, dest)
    (dest / CATALOG).unlink(missing_ok=True)
    df = catalog(dest)
    assert (dest / CATALOG).is_file()
    pd.testing.assert_frame_equal(read_catalog(dest), df)
    assert catalog(tmp_path / "dataset", write=False) is not None


def test_empty_dataset_round_trips_with_types(tmp_path):
    zarr.open_group(tmp_path / "empty", mode="w", zarr_format=3)
    df = build_catalog(tmp_path / "empty")
    assert len(df) == 0 and list(df.columns) == list(COLUMNS)
    write_catalog(tmp_path / "empty", df)
    back = read_catalog(tmp_path / "empty")
    assert len(back) == 0 and list(back.columns) == list(COLUMNS)
    import pyarrow.parquet as pq

    assert str(pq.read_schema(tmp_path / "empty" / CATALOG).field("levels").type) == "int64"


def test_update_after_a_second_convert(tmp_path):
    first = make_sources(tmp_path / "first", with_ct=False)
    dest = tmp_path / "dataset"
    assert mist_zarr.convert(first, dest).ok
    write_catalog(dest, build_catalog(dest).assign(label="x"))  # a user-added column
    before = read_catalog(dest)

    second = tmp_path / "second"
    save_nifti(second / "extra.nii.gz", np.arange(2 * 130 * 150, dtype=np.int32)
               .reshape(2, 130, 150))
    save_nifti(second / "wide.nii.gz", np.ones((5, 70, 90), np.uint8))  # replaces "wide"
    report = mist_zarr.convert(second, dest, overwrite=True)
    assert report.ok, report.summary()
    paths = [r.path for r in report.converted]
    assert sorted(paths) == ["extra", "wide"]
    updated = update_catalog(dest, paths)

    rebuilt = build_catalog(dest)
    assert list(updated["path"]) == list(rebuilt["path"])
    pd.testing.assert_frame_equal(updated[list(COLUMNS)], rebuilt)
    pd.testing.assert_frame_equal(read_catalog(dest), updated)
    row = updated.set_index("path").loc["wide"]
    assert row["shape"] == [5, 70, 90] and row["dtype"] == "uint8"
    # the user's column survives for the untouched rows and is empty for the new ones
    labels = updated.set_index("path")["label"]
    assert labels["phantom"] == "x" and labels["small/tiny"] == "x"
    assert pd.isna(labels["extra"]) and pd.isna(labels["wide"])
    assert len(updated) == len(before) + 1

    # an image that is gone loses its row
    shutil.rmtree(dest / "extra")
    assert "extra" not in update_catalog(dest, ["extra"])["path"].tolist()


def test_update_through_the_root_group_convert_holds(converted, tmp_path):
    """convert calls update_catalog with its open root group (local or object store)."""
    src, _ = converted
    dest = tmp_path / "dataset"
    shutil.copytree(src, dest)
    write_catalog(dest)
    root = zarr.open_group(dest, mode="a", zarr_format=3)
    stamp = (dest / CATALOG).stat().st_mtime_ns
    pd.testing.assert_frame_equal(update_catalog(root, []), read_catalog(dest))
    assert (dest / CATALOG).stat().st_mtime_ns == stamp  # nothing to do: not rewritten
    pd.testing.assert_frame_equal(update_catalog(root, ["wide", "phantom"]), build_catalog(dest))


def test_update_without_a_catalog_builds_it_whole(converted, tmp_path):
    src, _ = converted
    dest = tmp_path / "dataset"
    shutil.copytree(src, dest)
    (dest / CATALOG).unlink(missing_ok=True)
    df = update_catalog(dest, ["wide"])
    pd.testing.assert_frame_equal(df, build_catalog(dest))


def test_incomplete_image_is_listed_as_incomplete(converted, tmp_path):
    src, _ = converted
    dest = tmp_path / "dataset"
    shutil.copytree(src, dest)
    doc_path = dest / "wide" / "zarr.json"
    doc = json.loads(doc_path.read_text())
    doc["attributes"]["mist"]["complete"] = False
    doc_path.write_text(json.dumps(doc))
    row = build_catalog(dest).set_index("path").loc["wide"]
    assert not row["complete"]
    assert row["bytes"] == 0 and row["bytes_per_level"] == [] and row["n_chunks"] == 0


def test_non_local_store_catalog(converted):
    """An fsspec (memory://) dataset: scanned by listing, written with the store's set."""
    import fsspec

    src, _ = converted
    fs = fsspec.filesystem("memory")
    url = "memory://catalog-test/dataset"
    fs.put(str(src), "/catalog-test/dataset", recursive=True)
    try:
        fs.rm("/catalog-test/dataset/" + CATALOG)
    except FileNotFoundError:
        pass
    try:
        df = build_catalog(url)
        pd.testing.assert_frame_equal(df, build_catalog(src))
        write_catalog(url, df)
        assert fs.exists("/catalog-test/dataset/" + CATALOG)
        pd.testing.assert_frame_equal(read_catalog(url), df)
        pd.testing.assert_frame_equal(update_catalog(url, ["wide"]), df)
    finally:
        fs.rm("/catalog-test", recursive=True)


def test_catalog_over_http_is_read_and_cannot_be_built(converted, tmp_path):
    src, _ = converted
    dest = tmp_path / "dataset"
    shutil.copytree(src, dest)
    local = catalog(dest)  # writes catalog.parquet, which the server then serves
    with serve_in_thread(tmp_path) as server:
        url = f"{server.url}/dataset"
        pd.testing.assert_frame_equal(catalog(url), local)
        with pytest.raises(ValueError, match="cannot list"):
            build_catalog(url)
        (dest / CATALOG).unlink()
        with pytest.raises(ValueError, match=f"serve {CATALOG}"):
            catalog(url)


def test_the_documented_entry_points(converted):
    """``mist_zarr.catalog`` is the module (no longer callable: the module-class hack
    is gone); its ``catalog`` function and ``read_failures`` are the documented API."""
    import mist_zarr

    dest = converted[0] if isinstance(converted, tuple) else converted
    df = mist_zarr.catalog.catalog(dest)
    assert list(df.path) == sorted(r["path"] for r in mist_zarr.list_images(dest))
    assert list(mist_zarr.catalog.read_failures(dest).columns) == list(FAILURE_COLUMNS)


def test_failures_csv_is_what_pandas_writes_and_reads():
    """failures.csv is written with the csv module: the bytes pandas' to_csv wrote, read
    back as read_csv(dtype=str) read them (quotes, commas, newlines, empty values)."""
    import io

    from mist_zarr.catalog import _failures_frame
    from mist_zarr.tables import Table, decode_failures, encode_failures

    rows = [{"key": "/a, b.dcm", "source": 'he said "no"', "kind": "failed",
             "reason": "line one\nline two", "run": "", "time": " 2026-12-07T10:00:00+00:00"},
            {"key": "k2", "source": "", "kind": "skipped", "reason": "not an image",
             "run": "r", "time": "t"}]
    frame = pd.DataFrame(rows, columns=list(FAILURE_COLUMNS))
    data = encode_failures(Table(list(FAILURE_COLUMNS), rows))
    assert data == frame.to_csv(index=False).encode()
    read = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(_failures_frame(decode_failures(data)), read)
    assert decode_failures(data).rows == rows
    empty = pd.DataFrame({c: pd.Series(dtype=str) for c in FAILURE_COLUMNS})
    pd.testing.assert_frame_equal(_failures_frame(decode_failures(None)), empty)


def test_the_catalog_convert_writes_is_the_one_pandas_wrote(converted, tmp_path):
    """convert writes catalog.parquet without pandas (arrow's JSON reader builds the
    columns): the same schema and rows as write_catalog of build_catalog's frame."""
    import pyarrow.parquet as pq

    src, _ = converted
    dest = tmp_path / "dataset"
    shutil.copytree(src, dest)
    (dest / CATALOG).unlink(missing_ok=True)
    mist_zarr.convert(make_sources(tmp_path / "more", with_ct=False) / "wide.nii.gz", dest,
                      overwrite=True)  # a run: no catalog yet, so it builds it whole
    by_convert = pq.read_table(dest / CATALOG)
    write_catalog(dest, build_catalog(dest))
    by_pandas = pq.read_table(dest / CATALOG)
    assert by_convert.schema.remove_metadata() == by_pandas.schema.remove_metadata()
    assert by_convert.equals(by_pandas.replace_schema_metadata(by_convert.schema.metadata))
    assert as_lists(pd.read_parquet(dest / CATALOG)) == as_lists(build_catalog(dest))
