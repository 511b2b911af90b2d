"""mist-zarr convert / ls on real DICOM trees, as a hospital or archive would run them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

import mist_zarr
from mist_zarr.convert import convert, list_images

from .conftest import shared


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Two CT series, a radiograph that is also a TIFF, and junk, mixed in one tree."""
    root = tmp_path_factory.mktemp("tree")
    shutil.copytree(shared("ct", "CRLM-CT-1004"), root / "a" / "ct1004")
    shutil.copytree(shared("ct", "TotalSegmentator-example-j2k"), root / "b" / "j2k")
    shutil.copy(shared("radiographs", "RG3_UNCR.dcm"), root / "b" / "RG3_UNCR.dcm")
    (root / "notes.txt").write_text("not an image")
    cut = (root / "a" / "ct1004" / "1-01.dcm").read_bytes()
    (root / "b" / "broken.dcm").write_bytes(cut[: len(cut) // 3])
    return root


@pytest.fixture(scope="module")
def converted(tree, tmp_path_factory):
    dest = tmp_path_factory.mktemp("out") / "dataset"
    return convert(tree, dest), dest


def test_every_series_converts_and_bad_files_are_reported(converted, tree):
    report, dest = converted
    assert sorted(r.source_format for r in report.converted) == ["dicom", "dicom", "dicom"]
    shapes = sorted(tuple(r.shape) for r in report.converted)
    assert shapes == [(20, 512, 512), (41, 512, 512), (1760, 1760)]
    failed = {p.source for p in report.failed}
    skipped = {p.source for p in report.skipped}
    assert str(tree / "notes.txt") in skipped
    assert any("broken.dcm" in s for s in failed | skipped)
    assert not report.ok  # a broken file is a failure: the exit code says so
    assert report.bytes_in > report.bytes_out > 0


def test_stored_pixels_are_the_dicom_stored_values(converted, tree):
    report, dest = converted
    ct = next(r for r in report.converted if r.shape == (41, 512, 512))
    files = sorted((tree / "a" / "ct1004").glob("*.dcm"))
    slices = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    stack = np.stack([d.pixel_array for d in slices])
    back = mist_zarr.read_image(dest / ct.path)
    # ascending slice-normal position; the normal of an axial (1,0,0 / 0,1,0) series is +z
    np.testing.assert_array_equal(back, stack)
    _, info = mist_zarr.open_image(dest / ct.path)
    dicom = info.metadata["dicom"]
    assert dicom["00080060"]["Value"] == ["CT"]  # Modality
    assert "7FE00010" not in dicom  # no pixel data in the metadata
    assert float(dicom["00281052"]["Value"][0]) == float(slices[0].RescaleIntercept)
    assert "dicom_per_slice" not in info.metadata  # kept out of zarr.json, which every open reads
    per_slice = mist_zarr.read_metadata(dest / ct.path)["dicom_per_slice"]
    assert per_slice["SOPInstanceUID"] == [[d.SOPInstanceUID] for d in slices] or \
        per_slice["SOPInstanceUID"] == [d.SOPInstanceUID for d in slices]
    # RAS affine: origin is the first slice's ImagePositionPatient with x and y negated
    ipp = np.array(slices[0].ImagePositionPatient, float)
    np.testing.assert_allclose(info.affine[:3, 3], ipp * [-1, -1, 1], atol=1e-4)


def test_dual_personality_dicom_tiff_is_read_as_dicom(converted):
    report, _ = converted
    cr = next(r for r in report.converted if r.shape == (1760, 1760))
    assert cr.source_format == "dicom" and cr.dtype == "uint16"


def test_names_are_readable_stable_and_unique(converted, tree, tmp_path):
    report, dest = converted
    names = [r.path for r in report.converted]
    assert len(set(names)) == len(names)
    assert all(n.count("/") == 2 for n in names)  # patient/study/series
    again = convert(tree, tmp_path / "again")
    assert sorted(r.path for r in again.converted) == sorted(names)


def test_rerun_refuses_skips_or_overwrites(converted, tree):
    report, dest = converted
    second = convert(tree / "a", dest)
    assert not second.ok and "already converted" in second.failed[0].reason
    skipped = convert(tree / "a", dest, skip_existing=True)
    assert skipped.ok and [r.status for r in skipped.converted] == ["existing"]
    redone = convert(tree / "a", dest, overwrite=True)
    assert redone.ok and [r.status for r in redone.converted] == ["converted"]


def test_cli_convert_and_ls(tree, tmp_path):
    dest = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "convert", str(tree / "a"),
                          str(dest), "-q", "--report", str(tmp_path / "r.json")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 image(s) converted" in run.stdout and "ratio" in run.stdout
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is True
    run = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "convert", str(tree), str(dest),
                          "-q", "--skip-existing"], capture_output=True, text=True)
    assert run.returncode == 1 and "FAILED" in run.stdout  # the broken file
    ls = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "ls", str(dest), "--json"],
                        capture_output=True, text=True)
    rows = json.loads(ls.stdout)
    # ls prints the catalog: its rows, every column, as mist_zarr.catalog returns them
    assert rows == json.loads(json.dumps(mist_zarr.catalog.catalog(dest).to_dict("records")))
    assert sorted(r["modality"] for r in rows) == ["CR", "CT", "CT"]
    assert [r["path"] for r in rows] == [r["path"] for r in list_images(dest)]
    assert all(len(r["bytes_per_level"]) == r["levels"] + 1 for r in rows)
    table = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "ls", str(dest)],
                           capture_output=True, text=True).stdout.splitlines()
    assert table[0].split()[:4] == ["path", "modality", "body_part", "shape"]
    for r in rows:
        line = next(t for t in table if t.startswith(r["path"] + " "))
        assert "x".join(map(str, r["shape"])) in line and f"{r['bytes']:,}" in line
    some = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "ls", str(dest), "--columns",
                           "path,series_uid"], capture_output=True, text=True).stdout.splitlines()
    assert some[0].split() == ["path", "series_uid"] and len(some) == len(rows) + 1
    fails = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "ls", str(dest), "--failures",
                            "--json"], capture_output=True, text=True)
    failed = [f for f in json.loads(fails.stdout) if f["kind"] == "failed"]
    assert [f["key"] for f in failed] == [str((tree / "b" / "broken.dcm").resolve())]
    bad = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "ls", str(dest), "--columns",
                          "path,nope"], capture_output=True, text=True)
    assert bad.returncode != 0 and "nope" in bad.stderr


def test_failure_report_lists_refused_sources_and_follows_reruns(tmp_path):
    """failures.csv next to the catalog: every refused file with its reason; a source
    that converts on a rerun leaves it; sources of other runs stay."""
    import nibabel as nib

    from mist_zarr.catalog import FAILURE_COLUMNS, read_failures

    src, other = tmp_path / "src", tmp_path / "other"
    src.mkdir(), other.mkdir()
    volume = np.arange(64 * 64 * 4, dtype=np.int16).reshape(64, 64, 4)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), src / "good.nii")
    (src / "cut.nii").write_bytes((src / "good.nii").read_bytes()[:2000])
    (src / "readme.txt").write_text("not an image")
    nib.save(nib.Nifti1Image(volume, np.eye(4)), other / "fine.nii")
    (other / "empty.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    dest = tmp_path / "ds"

    report = convert(src, dest)
    assert not report.ok and len(report.converted) == 1
    df = read_failures(dest)
    assert list(df.columns) == list(FAILURE_COLUMNS)
    by_key = {k: r for k, r in zip(df["key"], df.to_dict("records"))}
    cut = by_key[str((src / "cut.nii").resolve())]
    assert cut["kind"] == "failed" and "cut.nii" in cut["reason"] and cut["run"]
    assert by_key[str((src / "readme.txt").resolve())]["kind"] == "skipped"
    assert len(df) == 2

    convert(other, dest)  # another folder: its failure is added, the earlier ones stay
    assert sorted(Path(k).name for k in read_failures(dest)["key"]) == [
        "cut.nii", "empty.png", "readme.txt"]
    stamp, text = (dest / "failures.csv").stat().st_mtime_ns, (dest / "failures.csv").read_text()
    rerun = convert(other, dest, skip_existing=True)  # the same refusal again
    assert [p.key for p in rerun.failed] == [str((other / "empty.png").resolve())]
    # it keeps the run that first reported it, and the file is not rewritten
    assert (dest / "failures.csv").read_text() == text
    assert (dest / "failures.csv").stat().st_mtime_ns == stamp

    shutil.copy(src / "good.nii", src / "cut.nii")  # the source is repaired
    again = convert(src, dest, skip_existing=True)
    assert again.ok
    assert sorted(Path(k).name for k in read_failures(dest)["key"]) == ["empty.png", "readme.txt"]
    assert (dest / "catalog.parquet").exists() and (dest / "failures.csv").exists()


def test_a_clean_run_writes_an_empty_failure_report(tmp_path):
    import nibabel as nib

    from mist_zarr.catalog import read_failures

    (tmp_path / "src").mkdir()
    nib.save(nib.Nifti1Image(np.ones((32, 32, 2), np.uint8), np.eye(4)), tmp_path / "src" / "a.nii")
    assert convert(tmp_path / "src", tmp_path / "ds").ok
    assert (tmp_path / "ds" / "failures.csv").read_text().startswith("key,source,kind,reason")
    assert read_failures(tmp_path / "ds").empty


def test_file_url_destination(tmp_path):
    import nibabel as nib

    volume = np.arange(64 * 64 * 3, dtype=np.int16).reshape(64, 64, 3)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "a.nii.gz")
    url = f"file://{tmp_path}/ds"
    assert convert(tmp_path / "a.nii.gz", url).ok
    np.testing.assert_array_equal(mist_zarr.read_image(tmp_path / "ds" / "a"), volume.T)
    assert mist_zarr.catalog.catalog(url)["path"].tolist() == ["a"]
    again = convert(tmp_path / "a.nii.gz", url, skip_existing=True)
    assert [r.status for r in again.converted] == ["existing"]
    assert (tmp_path / "ds" / "failures.csv").exists()


@pytest.mark.parametrize("series", [("mr", "dcm_qa_nih"), ("mr", "dcm_qa_xa30"),
                                    ("ct", "CRLM-CT-1004")])
def test_headers_kept_from_the_scan_change_nothing(series, tmp_path, monkeypatch):
    """The read takes the scan's header snapshots; the images must be what a fresh parse gives."""
    import json

    from mist_zarr.converters.dicom import header

    calls = {"n": 0}
    real = header._read_header

    def counting(path):
        calls["n"] += 1
        return real(path)

    monkeypatch.setattr(header, "_read_header", counting)
    kept = convert(shared(*series), tmp_path / "kept", progress=False)
    parsed_kept = calls["n"]
    monkeypatch.setattr(header, "KEPT_HEADER_BUDGET", 0)
    calls["n"] = 0
    fresh = convert(shared(*series), tmp_path / "fresh", progress=False)
    assert kept.ok == fresh.ok and len(kept.converted) == len(fresh.converted) > 0
    # (the scan has its own reference to _read_header: only the read's parses are counted)
    assert parsed_kept == 0 and calls["n"] >= len(kept.converted)
    assert not header._kept  # nothing left behind after the conversion

    def documents(root):
        out = {}
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and not rel.startswith((".mist", "catalog", "failures")):
                data = p.read_bytes()
                if p.name == "zarr.json":
                    doc = json.loads(data)
                    mist = doc.get("attributes", {}).get("mist", {})
                    mist.pop("write_id", None)  # ids of the write and the run differ, by design
                    mist.get("metadata", {}).pop("convert_run", None)
                    data = json.dumps(doc, sort_keys=True).encode()
                out[rel] = data
        return out

    a, b = documents(tmp_path / "kept"), documents(tmp_path / "fresh")
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_rerun_without_flags_refuses_before_reading_the_sources(tmp_path, phantom):
    """A finished unit is refused from its completion marker: its sources are not read
    again (here they could not be: the file's compressed samples are cut short)."""
    import nibabel as nib

    src = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(phantom.astype(np.int16).T, np.eye(4)), src)
    assert convert(src, tmp_path / "ds").ok
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])  # the header still reads; the samples do not
    again = convert(src, tmp_path / "ds")
    assert [p.reason for p in again.failed] == \
        ["already converted (a); pass overwrite (--overwrite) to replace it or skip_existing "
         "(--skip-existing) to keep it"]
    assert convert(src, tmp_path / "ds", skip_existing=True).ok
    replaced = convert(src, tmp_path / "ds", overwrite=True)  # now it is read, and fails
    assert not replaced.ok and "already converted" not in replaced.failed[0].reason
