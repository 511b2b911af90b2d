"""The converter registry: each format module's sniff(), and detect() asking them in order."""

from __future__ import annotations

import glob
import gzip
import os
from pathlib import Path

import imagecodecs
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from mist_zarr import converters
from mist_zarr.converters import detect, read_file, sniff_head, suffixes
from mist_zarr.converters.base import ConversionError
from mist_zarr.converters.nifti import read_nifti

NIBABEL_NIFTI = sorted(glob.glob(os.path.join(os.path.dirname(nib.__file__), "tests", "data",
                                              "*.nii*")))
# pydicom's bundled files (get_testdata_files would also try to download others)
PART10 = sorted(f for f in glob.glob(os.path.join(os.path.dirname(get_testdata_file("CT_small.dcm")),
                                                  "**", "*.dcm"), recursive=True)
                if Path(f).read_bytes()[128:132] == b"DICM")


def test_every_format_module_declares_its_entries():
    for module in converters.FORMAT_MODULES:
        names = getattr(module, "FORMATS", None) or (module.FORMAT,)
        assert names and all(isinstance(n, str) for n in names)
        assert module.SUFFIXES and all(s.startswith(".") for s in module.SUFFIXES)
        assert module.sniff(b"") is None  # an empty file is no format


@pytest.mark.parametrize("path", PART10, ids=os.path.basename)
def test_part10_dicom_is_detected(path):
    assert detect(path) == "dicom"


@pytest.mark.parametrize("name", ["rtstruct.dcm", "ExplVR_LitEndNoMeta.dcm"])
def test_dicom_without_preamble_is_tentative_and_pydicom_reads_it(name):
    path = get_testdata_file(name)
    assert detect(path) == "dicom?"
    assert pydicom.dcmread(path, force=True).Modality


def test_gzip_content_is_offered_only_to_formats_that_read_gzip(tmp_path):
    # pydicom's zipMR.gz is a gzip-compressed DICOM: convert never read those
    assert detect(get_testdata_file("zipMR.gz")) is None
    png = imagecodecs.png_encode(np.eye(8, dtype=np.uint8))
    (tmp_path / "a.png.gz").write_bytes(gzip.compress(png))
    assert detect(tmp_path / "a.png.gz") is None
    (tmp_path / "a.png").write_bytes(png)
    assert detect(tmp_path / "a.png") == "png"


@pytest.mark.parametrize("path", NIBABEL_NIFTI, ids=os.path.basename)
def test_nifti_is_detected_compressed_or_not(path):
    assert detect(path) == "nifti"
    if not path.endswith(".gz"):
        with open(path, "rb") as f:  # the same header, gzip-compressed
            raw = f.read()
        assert sniff_head(gzip.compress(raw)[: converters.HEAD_BYTES],
                          raw[: converters.HEAD_BYTES]) == "nifti"


def test_dicom_preamble_wins_over_a_tiff_header():
    head = b"II*\x00" + bytes(124) + b"DICM" + bytes(16)
    assert sniff_head(head) == "dicom"
    assert sniff_head(b"II*\x00" + bytes(140)) == "tiff"


def test_unreadable_and_unknown_files_are_not_detected(tmp_path):
    assert detect(tmp_path / "missing") is None
    assert detect(tmp_path) is None  # a folder
    (tmp_path / "notes.txt").write_text("hello")
    assert detect(tmp_path / "notes.txt") is None


def test_read_file_dispatches_to_the_format_module(tmp_path):
    path = next(p for p in NIBABEL_NIFTI if p.endswith(".nii.gz"))
    got, want = read_file(path, "nifti"), read_nifti(path)
    np.testing.assert_array_equal(np.asarray(got.data), np.asarray(want.data))
    with pytest.raises(ConversionError, match="no single-file reader.*dicom"):
        read_file(path, "dicom")


def test_suffixes_put_longer_endings_first():
    found = suffixes()
    assert found.index(".nii.gz") < found.index(".nii")
    assert {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm"} <= set(found)
