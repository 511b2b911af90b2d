"""DICOM export: level 0 without re-encoding, derived levels, and round trips through convert."""

from __future__ import annotations

import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest

import mist_zarr
from mist_zarr.converters.dicom.export import HTJ2K_RPCL
from mist_zarr.export import export

from .conftest import shared

SERIES = {
    "ct": ("ct", "CRLM-CT-1004"),
    "ct-no-uids": ("ct", "TotalSegmentator-example-j2k"),
    "mr-enhanced-t1": ("mr", "dcm_qa_xa30", "In", "5_anat-T1w_acq-tfl"),
    "mr-enhanced-asl-4d": ("mr", "dcm_qa_xa30", "In", "25_asl_2d_tra"),
    "mr-rgb-fa": ("mr", "dcm_qa_xa30", "In", "14_DWI_dir80_PA"),
    "mr-mosaic-4d": ("mr", "dcm_qa_nih", "In", "20180918Si", "mr_0003"),
    "mr-classic-4d": ("mr", "dcm_qa_nih", "In", "20180918GE", "mr_0004"),
    "cr": ("radiographs", "RG1_J2KR.dcm"),
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return tmp_path_factory.mktemp("stores")


def converted(stores, key):
    src = shared(*SERIES[key])
    dest = stores / key
    if not dest.exists():
        report = mist_zarr.convert(src, dest)
        assert report.ok and len(report.converted) == 1, report.summary()
    (row,) = mist_zarr.list_images(dest)
    return dest / row["path"]


def reconvert(folder, dest):
    report = mist_zarr.convert(folder, dest)
    assert report.ok and len(report.converted) == 1, report.summary()
    return dest / report.converted[0].path


@pytest.mark.parametrize("key", list(SERIES))
def test_dicom_store_dicom_store_is_bit_exact_at_level0(stores, tmp_path, key):
    store = converted(stores, key)
    result = export(store, tmp_path / "dcm", format="dicom")
    again = reconvert(tmp_path / "dcm", tmp_path / "ds")
    np.testing.assert_array_equal(mist_zarr.read_image(again), mist_zarr.read_image(store))
    _, a = mist_zarr.open_image(store)
    _, b = mist_zarr.open_image(again)
    assert a.dims == b.dims
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-3)
    assert len(result.files) == int(np.prod(a.shape[: a.dims.index("y")]))


def test_level0_frames_are_the_stored_chunks_and_decode_independently(stores, tmp_path):
    store = converted(stores, "ct")
    result = export(store, tmp_path / "dcm", format="dicom")
    stored = mist_zarr.read_image(store)
    original = {pydicom.dcmread(f).SOPInstanceUID for f in shared(*SERIES["ct"]).glob("*.dcm")}
    for z, path in enumerate(result.files):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == HTJ2K_RPCL
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        chunk = (store / "image" / "c" / str(z) / "0" / "0").read_bytes()
        assert frame[: len(chunk)] == chunk and frame[len(chunk):] in (b"", b"\0")  # even length
        # pydicom decodes through pylibjpeg-openjpeg: a decoder independent of OpenJPH
        np.testing.assert_array_equal(ds.pixel_array, stored[z])
    assert {pydicom.dcmread(f).SOPInstanceUID for f in result.files} == original


def test_uncompressed_export(stores, tmp_path):
    store = converted(stores, "ct")
    result = export(store, tmp_path / "dcm", format="dicom", uncompressed=True)
    ds = pydicom.dcmread(result.files[0])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    again = reconvert(tmp_path / "dcm", tmp_path / "ds")
    np.testing.assert_array_equal(mist_zarr.read_image(again), mist_zarr.read_image(store))


def test_reduced_level_is_a_derived_series_on_the_same_grid(stores, tmp_path):
    store = converted(stores, "ct")
    first = export(store, tmp_path / "a", format="dicom", scale=2)
    second = export(store, tmp_path / "b", format="dicom", scale=2)
    original = sorted((pydicom.dcmread(f) for f in shared(*SERIES["ct"]).glob("*.dcm")),
                      key=lambda d: float(d.ImagePositionPatient[2]))
    level = mist_zarr.open(store, scale=2).values
    for z, (fa, fb) in enumerate(zip(first.files, second.files)):
        a, b, o = pydicom.dcmread(fa), pydicom.dcmread(fb), original[z]
        assert (a.Rows, a.Columns) == (128, 128)
        np.testing.assert_allclose([float(v) for v in a.PixelSpacing],
                                   [float(v) * 4 for v in o.PixelSpacing], rtol=1e-6)
        np.testing.assert_allclose([float(v) for v in a.ImagePositionPatient],
                                   [float(v) for v in o.ImagePositionPatient], atol=1e-4)
        assert a.SOPInstanceUID == b.SOPInstanceUID != o.SOPInstanceUID
        assert a.SeriesInstanceUID == b.SeriesInstanceUID != o.SeriesInstanceUID
        assert a.StudyInstanceUID == o.StudyInstanceUID
        assert list(a.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "level 2" in a.DerivationDescription
        np.testing.assert_array_equal(a.pixel_array, level[z])
    again = reconvert(tmp_path / "a", tmp_path / "ds")
    np.testing.assert_array_equal(mist_zarr.read_image(again), level)
    _, info = mist_zarr.open_image(store)
    _, derived = mist_zarr.open_image(again)
    np.testing.assert_allclose(derived.affine, info.level_affine(2), atol=1e-3)


def test_nifti_export_of_a_dicom_series_agrees_with_dcm2niix(stores, tmp_path):
    try:
        import dcm2niix

        binary = str(dcm2niix.bin)
    except (ImportError, AttributeError):
        binary = shutil.which("dcm2niix")
    if binary is None:
        pytest.skip("dcm2niix is not installed")
    store = converted(stores, "ct")
    ours = nib.load(export(store, tmp_path / "ours", format="nifti").files[0])
    (tmp_path / "ref").mkdir()
    subprocess.run([binary, "-z", "n", "-f", "ref", "-o", str(tmp_path / "ref"),
                    str(shared(*SERIES["ct"]))], check=True, capture_output=True)
    ref = nib.load(tmp_path / "ref" / "ref.nii")
    assert (ours.dataobj.slope, ours.dataobj.inter) == (ref.dataobj.slope, ref.dataobj.inter)
    a, b = (nib.as_closest_canonical(nib.Nifti1Image(np.asanyarray(img.dataobj.get_unscaled()),
                                                     img.affine)) for img in (ours, ref))
    np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-3)



def _rgb_secondary_capture(path, rows, cols):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "OT", "rgb"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 3
    ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    pixels = np.random.default_rng(12).integers(0, 256, (rows, cols, 3), dtype=np.uint8)
    ds.PixelData = pixels.tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return pixels


@pytest.mark.parametrize("rows, cols", [(72, 72), (200, 300)])  # 1 and 2 wavelet levels
def test_colour_frames_coded_with_the_rct_are_labelled_ybr_rct(tmp_path, rows, cols):
    # PS3.5 8.2.4: a JPEG 2000 frame that applies the reversible colour transform is YBR_RCT
    (tmp_path / "src").mkdir()
    pixels = _rgb_secondary_capture(tmp_path / "src" / "rgb.dcm", rows, cols)
    store = reconvert(tmp_path / "src", tmp_path / "ds")
    (path,) = export(store, tmp_path / "dcm", format="dicom").files
    ds = pydicom.dcmread(path)
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    style = mist_zarr.codestream.read_coding_style(frame)
    assert style.levels == (1 if rows == 72 else 2)
    assert ds.PhotometricInterpretation == ("YBR_RCT" if style.multiple_component_transform else "RGB")
    np.testing.assert_array_equal(ds.pixel_array, pixels)
