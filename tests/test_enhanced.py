"""Enhanced multi-frame DICOM: functional groups read from their walked bytes.

Oracles: pydicom's own full parse of the same files (``dcmread`` and
``Dataset.to_json_dict`` with the converter's bulk-data settings) for the
JSON model and the per-frame positions, orientations, spacings and rescale
values, and pydicom's ``pixel_array`` for the samples (test_dicom compares
the same series with dcm2niix's reference NIfTI). The generated files hold the same
enhanced image in the encodings the walker reads (undefined and defined
lengths) and in those it leaves to pydicom (implicit VR, big endian,
deflated, a UN element): every one must read to the same volume.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from mist_zarr.converters.dicom import read_dicom_series, scan_dicom
from mist_zarr.converters.dicom.header import _load_file
from mist_zarr.converters.dicom.jsonmodel import BULK_DATA_THRESHOLD, _bulk_uri, _JsonBuilder
from mist_zarr.converters.dicom.walk import _Walked

from .conftest import shared

XA30 = ("mr", "dcm_qa_xa30", "In")
SERIES = ["5_anat-T1w_acq-tfl", "7_func-bold_task-fa_run-1", "14_DWI_dir80_PA", "25_asl_2d_tra"]
PER_FRAME, SHARED = 0x52009230, 0x52009229


def _pydicom_json(elem_or_ds) -> dict:
    return elem_or_ds.to_json_dict(bulk_data_threshold=BULK_DATA_THRESHOLD,
                                   bulk_data_element_handler=_bulk_uri)


@pytest.mark.parametrize("series", SERIES)
def test_functional_groups_json_is_pydicoms(series):
    """Per file: the groups were kept raw at the header read, and the JSON model built from
    their bytes equals pydicom's to_json_dict of what dcmread parses."""
    files = sorted(shared(*XA30, series).glob("*.dcm"))
    for path in files[:4]:
        info = _load_file(str(path), _JsonBuilder())
        for tag in (PER_FRAME, SHARED):
            assert isinstance(info.ds.get_item(tag).value, _Walked), (path, hex(tag))
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        expected = [_pydicom_json(item) for item in ds.PerFrameFunctionalGroupsSequence]
        assert len(expected) == int(ds.NumberOfFrames)
        assert info.frame_groups().json == expected
        assert info.json()["52009229"] == _pydicom_json(ds["SharedFunctionalGroupsSequence"])
        assert not info.builder.dropped


def _frame_values(ds: Dataset, k: int) -> dict:
    """What pydicom says of frame k: position, orientation, spacing, rescale."""
    item, shared_item = ds.PerFrameFunctionalGroupsSequence[k], ds.SharedFunctionalGroupsSequence[0]

    def find(sequence, keyword):
        for group in (item, shared_item):
            if sequence in group and keyword in group[sequence][0]:
                return group[sequence][0][keyword].value
        return None

    return {
        "ipp": [float(v) for v in find("PlanePositionSequence", "ImagePositionPatient")],
        "iop": [float(v) for v in find("PlaneOrientationSequence", "ImageOrientationPatient")],
        "spacing": [float(v) for v in find("PixelMeasuresSequence", "PixelSpacing")],
        "slope": float(find("PixelValueTransformationSequence", "RescaleSlope") or 1),
        "intercept": float(find("PixelValueTransformationSequence", "RescaleIntercept") or 0),
    }


def _json_rescale(items: list | None) -> tuple[float, float] | None:
    group = (items or [{}])[0].get("00289145")  # PixelValueTransformationSequence
    if group is None:
        return None
    values = group["Value"][0]
    return float(values["00281053"]["Value"][0]), float(values["00281052"]["Value"][0])


@pytest.mark.parametrize("series", ["5_anat-T1w_acq-tfl", "7_func-bold_task-fa_run-1",
                                    "25_asl_2d_tra"])
def test_volumes_follow_pydicoms_per_frame_values(series):
    """Every stored slice: its position, the affine's orientation and spacing, the
    per-frame rescale in the slice metadata and its samples are pydicom's for that frame."""
    folder = shared(*XA30, series)
    (vol,) = read_dicom_series(scan_dicom(folder).series[0])
    datasets = [pydicom.dcmread(p) for p in vol.source_files]
    planes = vol.data.reshape((-1,) + vol.data.shape[-2:])
    per_slice = vol.per_slice
    for s, (fi, k) in enumerate(zip(per_slice["source_file_index"], per_slice["frame_index"])):
        ds = datasets[fi]
        want = _frame_values(ds, k)
        np.testing.assert_allclose(per_slice["position_lps"][s], want["ipp"], atol=1e-6)
        np.testing.assert_array_equal(planes[s], ds.pixel_array[k])
        rescale = _json_rescale(per_slice["PerFrameFunctionalGroupsSequence"][s])
        shared_rescale = _json_rescale([vol.metadata["52009229"]["Value"][0]])
        assert (rescale or shared_rescale) == (want["slope"], want["intercept"])
    lps = np.diag([-1.0, -1.0, 1.0])
    row, col = np.array(want["iop"][:3]), np.array(want["iop"][3:])
    dy, dx = want["spacing"]
    np.testing.assert_allclose(vol.affine[:3, 0], lps @ row * dx, atol=1e-5)
    np.testing.assert_allclose(vol.affine[:3, 1], lps @ col * dy, atol=1e-5)


# -- generated files: the same image in every encoding ---------------------------------


def _item(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def _enhanced(n: int = 5, un_element: bool = False) -> Dataset:
    """An Enhanced MR dataset of n 12 x 10 frames, positions and rescale per frame."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        generate_uid(), generate_uid(), generate_uid())
    ds.Modality, ds.SpecificCharacterSet, ds.PatientName = "MR", "ISO_IR 100", "Müller^Jürgen"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 12, 10, n
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.SharedFunctionalGroupsSequence = Sequence([_item(
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=[0.9, 0.8], SliceThickness=2.5)]),
        PlaneOrientationSequence=Sequence([_item(
            ImageOrientationPatient=[1, 0, 0, 0, 0.8, -0.6])]))])
    frames = []
    for k in range(n):
        content = _item(StackID="1", InStackPositionNumber=k + 1, DimensionIndexValues=[1, k + 1],
                        FrameAcquisitionDateTime=f"2026010112000{k}.5")
        item = _item(
            PlanePositionSequence=Sequence([_item(ImagePositionPatient=[-5.5, 7.25, 2.5 * k])]),
            FrameContentSequence=Sequence([content]),
            PixelValueTransformationSequence=Sequence([_item(
                RescaleSlope=f"{1 + k / 4:g}", RescaleIntercept="-10", RescaleType="US")]))
        item.private_block(0x0021, "ACME 1", create=True).add_new(0x10, "LO", f"frame {k}")
        if un_element:  # pydicom looks up an UN element's VR from its context: not walked
            content.private_block(0x0029, "ACME 2", create=True).add_new(
                0x01, "UN", bytes([k, 1, 2, 3]))
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    pixels = np.arange(n * 12 * 10, dtype=np.uint16).reshape(n, 12, 10) * 7 % 4096
    ds.PixelData = pixels.tobytes()
    return ds


def _defined_lengths(ds: Dataset) -> None:
    """Write every sequence and item of ``ds`` with explicit lengths."""
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = False
            for item in elem.value:
                item.is_undefined_length_sequence_item = False


def _write(folder: Path, ds: Dataset, syntax) -> Path:
    folder.mkdir()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    if syntax == ExplicitVRBigEndian:
        ds.PixelData = np.frombuffer(ds.PixelData, "<u2").astype(">u2").tobytes()
    pydicom.dcmwrite(folder / "enhanced.dcm", ds, enforce_file_format=True)
    return folder


ENCODINGS = {  # name: (transfer syntax, defined lengths, walked by mist-zarr)
    "explicit-le": (ExplicitVRLittleEndian, False, True),
    "explicit-le-defined-lengths": (ExplicitVRLittleEndian, True, True),
    "implicit-le": (ImplicitVRLittleEndian, False, False),
    "explicit-be": (ExplicitVRBigEndian, False, False),
    "deflated": (DeflatedExplicitVRLittleEndian, False, False),
}


@pytest.fixture(scope="module")
def reference_volume(tmp_path_factory):
    folder = _write(tmp_path_factory.mktemp("ref") / "explicit", _enhanced(), ExplicitVRLittleEndian)
    (vol,) = read_dicom_series(scan_dicom(folder).series[0])
    return vol


@pytest.mark.parametrize("name", ENCODINGS)
def test_every_encoding_reads_to_the_same_volume(tmp_path, name, reference_volume):
    syntax, defined, walked = ENCODINGS[name]
    ds = _enhanced()
    if defined:
        _defined_lengths(ds)
    folder = _write(tmp_path / name, ds, syntax)
    path = next(folder.glob("*.dcm"))
    info = _load_file(str(path), _JsonBuilder())
    assert isinstance(info.ds.get_item(PER_FRAME).value, _Walked) == walked
    expected = [_pydicom_json(item) for item in
                pydicom.dcmread(path, stop_before_pixels=True).PerFrameFunctionalGroupsSequence]
    assert info.frame_groups().json == expected
    (vol,) = read_dicom_series(scan_dicom(folder).series[0])
    ref = reference_volume
    np.testing.assert_array_equal(vol.data, ref.data)
    np.testing.assert_allclose(vol.affine, ref.affine)
    assert vol.dims == ref.dims
    for key in ("position_lps", "frame_index"):
        assert vol.per_slice[key] == ref.per_slice[key], key
    # implicit VR does not record the VR of an unknown private element (pydicom reads it
    # as UN): the standard elements compare
    groups, ref_groups = (_standard(v.per_slice["PerFrameFunctionalGroupsSequence"])
                          for v in (vol, ref))
    assert json.dumps(groups) == json.dumps(ref_groups)
    assert vol.metadata["52009229"] == ref.metadata["52009229"]
    assert vol.metadata["00100010"] == ref.metadata["00100010"]  # decoded with ISO_IR 100


def _standard(model):
    """A JSON model without private elements (odd groups)."""
    if isinstance(model, list):
        return [_standard(v) for v in model]
    if isinstance(model, dict):
        return {k: _standard(v) for k, v in model.items() if not (len(k) == 8 and int(k[3], 16) % 2)}
    return model


def test_an_element_the_walker_leaves_to_pydicom(tmp_path):
    """A UN element in the per-frame groups: read by pydicom (which infers its VR), the same
    JSON model as dcmread's, the frames in order."""
    folder = _write(tmp_path / "un", _enhanced(un_element=True), ExplicitVRLittleEndian)
    path = next(folder.glob("*.dcm"))
    info = _load_file(str(path), _JsonBuilder())
    assert not isinstance(info.ds.get_item(PER_FRAME).value, _Walked)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert info.frame_groups().json == [_pydicom_json(i) for i in ds.PerFrameFunctionalGroupsSequence]
    (vol,) = read_dicom_series(scan_dicom(folder).series[0])
    assert [p[2] for p in vol.per_slice["position_lps"]] == [2.5 * k for k in range(5)]


def test_truncated_inside_the_functional_groups_is_refused(tmp_path):
    """A file cut inside PerFrameFunctionalGroupsSequence is rejected by the scan, named."""
    src = min(shared(*XA30, "7_func-bold_task-fa_run-1").glob("*.dcm"))
    raw = pydicom.dcmread(src, stop_before_pixels=True)
    cut = raw["PerFrameFunctionalGroupsSequence"].file_tell + 10_000
    (tmp_path / "cut.dcm").write_bytes(src.read_bytes()[:cut])
    scan = scan_dicom(tmp_path)
    assert not scan.series
    (issue,) = scan.rejected
    assert issue.source.endswith("cut.dcm") and issue.reason
