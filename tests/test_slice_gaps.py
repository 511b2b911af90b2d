"""Slices that are not evenly spaced keep their true positions (issue 15, defect 5).

Built from the shared CT series CRLM-CT-1004 (41 slices, 5 mm apart): one copy
with a slice removed (a gap of 10 mm), one with variable spacing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest

import mist_zarr
from mist_zarr.errors import ExportError

from .conftest import shared

SERIES = ("ct", "CRLM-CT-1004")


def _positions(files) -> np.ndarray:
    """z of each file's ImagePositionPatient, ascending (this series is axial)."""
    return np.sort([float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
                    for f in files])


def _gap_series(dest):
    files = sorted(shared(*SERIES).glob("*.dcm"))
    by_z = sorted(files, key=lambda f: float(pydicom.dcmread(
        f, stop_before_pixels=True).ImagePositionPatient[2]))
    dest.mkdir()
    for f in by_z[:20] + by_z[21:]:  # the 21st slice (in z) is missing
        shutil.copy(f, dest / f.name)
    return sorted(dest.glob("*.dcm"))


def _variable_series(dest):
    dest.mkdir()
    files = sorted(shared(*SERIES).glob("*.dcm"))
    datasets = sorted((pydicom.dcmread(f) for f in files),
                      key=lambda ds: float(ds.ImagePositionPatient[2]))
    z = float(datasets[0].ImagePositionPatient[2])
    for i, ds in enumerate(datasets[:12]):
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, round(z, 3)]
        ds.save_as(dest / f"{i:02d}.dcm")
        z += 2.5 if i < 6 else 5.0  # 2.5 mm apart, then 5 mm
    return sorted(dest.glob("*.dcm"))


@pytest.fixture(params=["gap", "variable"], scope="module")
def case(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    files = (_gap_series if request.param == "gap" else _variable_series)(root / "src")
    run = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "convert", str(root / "src"),
                          str(root / "ds"), "-q"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    [row] = mist_zarr.list_images(root / "ds")
    return request.param, files, root / "ds" / row["path"], run.stdout, root


def test_the_warning_is_printed(case):
    kind, _, image, printed, _ = case
    lines = [line for line in printed.splitlines() if "non-uniform slice spacing" in line]
    assert lines and lines[0].startswith("warning ")
    assert ("1 slice(s) appear to be missing" in lines[0]) == (kind == "gap")


def test_open_gives_the_true_positions_and_claims_no_affine(case):
    _, files, image, _, _ = case
    truth = _positions(files)
    for k in (0, 1):
        level = mist_zarr.open(image, scale=k)
        np.testing.assert_allclose(level.z.values, truth - truth[0], atol=1e-3)
        assert level.attrs["affine"] is None
        nominal = np.asarray(level.attrs["nominal_affine"])
        assert nominal.shape == (4, 4)  # the mean spacing, said to be nominal only


def test_nifti_export_is_refused_with_the_reason(case):
    _, _, image, _, root = case
    with pytest.raises(ExportError, match="not evenly spaced.*gaps 2.5 to 5 mm|not evenly "
                                          "spaced.*gaps 5 to 10 mm"):
        mist_zarr.export(image, root / "out.nii.gz", format="nifti")
    assert not (root / "out.nii.gz").exists()


def test_dicom_export_keeps_every_slice_position(case):
    _, files, image, _, root = case
    result = mist_zarr.export(image, root / "dicom-out", format="dicom")
    np.testing.assert_allclose(_positions(result.files), _positions(files), atol=1e-3)


def test_info_ls_and_the_catalog_show_the_warning(case):
    from mist_zarr.catalog import catalog

    _, _, image, _, root = case

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mist_zarr.cli", *args],
                              capture_output=True, text=True, check=True).stdout

    [notes] = catalog(root / "ds", refresh=True)["warnings"]
    assert any("non-uniform slice spacing" in n for n in notes)
    info = cli("info", str(image))
    assert f"warnings      : {len(notes)}" in info and all(f"    - {n}" in info for n in notes)
    assert cli("ls", str(root / "ds"), "--warnings").splitlines() == [
        f"{image.relative_to(root / 'ds').as_posix()}: {n}" for n in notes]


def test_an_evenly_spaced_series_keeps_its_affine(tmp_path):
    report = mist_zarr.convert(shared(*SERIES), tmp_path / "ds", progress=False)
    level = mist_zarr.open(tmp_path / "ds" / report.converted[0].path, scale=1)
    assert level.attrs["affine"] is not None and "nominal_affine" not in level.attrs
    np.testing.assert_allclose(np.diff(level.z.values), 5.0)
