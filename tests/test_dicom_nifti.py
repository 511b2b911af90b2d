"""NIfTI export of DICOM agrees with dcm2niix: voxels, affine and scaling (issue 15).

Each case is converted with ``mist_zarr.convert``, exported with
``mist_zarr.export(format="nifti")`` and compared with what the installed
dcm2niix writes from the same files (default options, or ``-p n`` for
DICOM display scaling): stored voxels equal after reorientation to the
closest RAS+, affines within 1e-3 mm, ``get_fdata()`` within 1e-3 relative.
The corpus: every series of the shared data, pydicom's volumetric files, and
Philips / enhanced multi-frame files built here (the shared data has none).

Where dcm2niix is wrong the expected values come from the DICOM attributes
themselves (a rescale that varies between slices: dcm2niix writes one slope
for enhanced files, and applies a Philips slope twice for classic ones).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import mist_zarr
from mist_zarr.errors import ExportError
from mist_zarr.export import export
from mist_zarr.format import slice_offsets

from .conftest import DATA_DIR

MR, ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"
PHILIPS = "Philips MR Imaging DD 001"


def _dcm2niix() -> str:
    dcm2niix = pytest.importorskip("dcm2niix", reason="dcm2niix (test extra) is not installed")
    return str(dcm2niix.bin)


# --------------------------------------------------------------------------- generated sources
def _item(**attrs) -> Dataset:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def _mr(sop_class: str, manufacturer: str, rows: int = 24, cols: int = 20) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.Manufacturer, ds.PatientID, ds.PatientName = "MR", manufacturer, "p1", "Test"
    ds.StudyDate, ds.SeriesTime, ds.SeriesNumber, ds.SeriesDescription = "20260101", "1200", 3, "t1"
    ds.EchoTime, ds.RepetitionTime = 10, 500
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, \
        "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def _philips_slope(ds: Dataset, ss: float) -> None:
    """The private ScaleSlope (2005,100E), as Philips writes it."""
    ds.private_block(0x2005, PHILIPS, create=True).add_new(0x0E, "FL", ss)


def write_classic(folder: Path, slopes=(2.5,), intercept=-10.0, philips: float | None = 0.0125,
                  n: int = 4) -> Path:
    """``n`` single-frame MR files (oblique, 3 mm apart); RescaleSlope slopes[k % len]."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    row, col = np.array([0.96, 0.28, 0.0]), np.array([0.0, 0.0, -1.0])
    normal = np.cross(row, col)
    for k in range(n):
        ds = _mr(MR, "Philips Medical Systems" if philips else "SIEMENS")
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.InstanceNumber = n - k  # not the slice order
        ds.ImageOrientationPatient = [*row, *col]
        ds.ImagePositionPatient = [float(v) for v in np.array([-10.0, -12.0, 30.0]) + 3 * k * normal]
        ds.PixelSpacing, ds.SliceThickness = [0.9, 0.8], 3.0
        ds.RescaleSlope, ds.RescaleIntercept = slopes[k % len(slopes)], intercept
        if philips:
            _philips_slope(ds, philips)
        ds.PixelData = rng.integers(0, 4000, (ds.Rows, ds.Columns), dtype=np.uint16).tobytes()
        pydicom.dcmwrite(folder / f"{k:03d}.dcm", ds, enforce_file_format=True)
    return folder


def _philips_frame_item(ss: float) -> Dataset:
    """What a Philips enhanced file nests in each per-frame item: a private sequence
    (2005,140F, creator DD 005) whose item holds the scale slope (creator DD 001)."""
    inner = Dataset()
    _philips_slope(inner, ss)
    item = Dataset()
    item.private_block(0x2005, "Philips MR Imaging DD 005", create=True).add_new(
        0x0F, "SQ", Sequence([inner]))
    return item


def write_enhanced(folder: Path, slopes=(2.5,), intercept=-10.0, where: str = "shared",
                   philips: float | None = None, n: int = 4) -> Path:
    """One Enhanced MR file of ``n`` frames with the rescale only in the functional groups
    (Pixel Value Transformation, shared or per frame); with ``where="per-frame"`` a
    Philips scale slope is in each frame's private sequence, else at the top level."""
    folder.mkdir(parents=True)
    ds = _mr(ENHANCED_MR, "Philips Medical Systems" if philips else "SIEMENS")
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
        generate_uid(), generate_uid(), generate_uid())
    ds.InstanceNumber, ds.NumberOfFrames = 1, n
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.AcquisitionDateTime, ds.ContentDate, ds.ContentTime = "20260101120000", "20260101", "1200"

    def transformation(slope):
        return Sequence([_item(RescaleSlope=slope, RescaleIntercept=intercept, RescaleType="US")])

    shared = _item(
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=[0.9, 0.8], SliceThickness=3.0)]),
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]))
    if where == "shared":
        shared.PixelValueTransformationSequence = transformation(slopes[0])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    org = generate_uid()
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=org)])
    ds.DimensionIndexSequence = Sequence([_item(
        DimensionOrganizationUID=org, DimensionIndexPointer=0x00209057,
        FunctionalGroupPointer=0x00209111)])
    frames = []
    for k in range(n):
        item = _item(
            PlanePositionSequence=Sequence([_item(ImagePositionPatient=[-10.0, -12.0, 3.0 * k])]),
            FrameContentSequence=Sequence([_item(InStackPositionNumber=k + 1, StackID="1",
                                                 DimensionIndexValues=[k + 1])]))
        if where == "per-frame":
            item.PixelValueTransformationSequence = transformation(slopes[k % len(slopes)])
            if philips:
                item.update(_philips_frame_item(philips))
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    if philips and where != "per-frame":
        _philips_slope(ds, philips)
    rng = np.random.default_rng(2)
    ds.PixelData = rng.integers(0, 4000, (n, ds.Rows, ds.Columns), dtype=np.uint16).tobytes()
    pydicom.dcmwrite(folder / "enhanced.dcm", ds, enforce_file_format=True)
    return folder


GENERATED = {
    "philips-classic": lambda d: write_classic(d),
    "philips-enhanced": lambda d: write_enhanced(d, philips=0.02),
    "philips-enhanced-per-frame": lambda d: write_enhanced(d, where="per-frame", philips=0.04),
    "enhanced-shared-rescale": lambda d: write_enhanced(d, where="shared"),
    "enhanced-per-frame-rescale": lambda d: write_enhanced(d, where="per-frame"),
    "classic-no-philips": lambda d: write_classic(d, philips=None),
}


# --------------------------------------------------------------------------- the corpus
def _shared_series() -> list[tuple[str, list[str]]]:
    from mist_zarr.converters.dicom import scan_dicom

    folders = sorted((DATA_DIR / "mr").glob("*/In")) + sorted(
        p for p in (DATA_DIR / "ct").glob("*") if p.is_dir())
    cases = []
    for folder in folders:
        for ref in scan_dicom(folder).series:
            label = re.sub(r"[^A-Za-z0-9]+", "_", f"{ref.series_number}-{ref.description}")
            cases.append((f"{folder.relative_to(DATA_DIR)}-{label}", ref.files))
    return cases


def _pydicom_series() -> list[tuple[str, list[str]]]:
    series = {"CT2": "dicomdirtests/77654033/CT2/*", "CT5N": "dicomdirtests/98892001/CT5N/*"}
    cases = [(name, sorted(get_testdata_files(pattern))) for name, pattern in series.items()]
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
                 "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        cases.append((name, [get_testdata_file(name)]))
    return cases


def _cases() -> list:
    params = [pytest.param(("generated", name), id=name) for name in GENERATED]
    params += [pytest.param(("files", files), id=f"pydicom-{name}")
               for name, files in _pydicom_series()]
    if DATA_DIR.is_dir():
        params += [pytest.param(("files", files), id=name) for name, files in _shared_series()]
    return params


def _sources(case, tmp_path: Path) -> Path:
    kind, what = case
    if kind == "generated":
        return GENERATED[what](tmp_path / "src")
    src = tmp_path / "src"
    src.mkdir()
    for i, f in enumerate(what):  # the series alone, as dcm2niix sees it
        (src / f"{i:05d}.dcm").symlink_to(Path(f).resolve())
    return src


# --------------------------------------------------------------------------- comparing
def _convert(src: Path, dest: Path) -> Path:
    report = mist_zarr.convert(src, dest)
    assert report.ok and len(report.converted) == 1, report.summary()
    return dest / report.converted[0].path


def _run_dcm2niix(src: Path, out: Path, *options: str) -> tuple[nib.Nifti1Image, int | None]:
    """dcm2niix's NIfTI and its sidecar's UsePhilipsFloatNotDisplayScaling (None: absent)."""
    out.mkdir()
    subprocess.run([_dcm2niix(), "-z", "n", "-f", "ref", *options, "-o", str(out), str(src)],
                   check=True, capture_output=True)
    # dcm2niix adds resampled copies for uneven slices (_Eq) and gantry tilt (_Tilt);
    # mist-zarr never resamples, so its export is compared with the copy as acquired
    niis = [p for p in sorted(out.glob("*.nii")) if not {"Eq", "Tilt"} & set(p.stem.split("_"))]
    assert len(niis) == 1, f"dcm2niix wrote {niis}"
    # read by pattern: dcm2niix copies header strings into the JSON unescaped
    found = re.search(r'"UsePhilipsFloatNotDisplayScaling":\s*(\d)',
                      niis[0].with_suffix(".json").read_text(errors="replace"))
    return nib.load(niis[0]), None if found is None else int(found.group(1))


def _canonical(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ornt = io_orientation(affine)
    return apply_orientation(arr, ornt), affine @ inv_ornt_aff(ornt, arr.shape[:3])


def _assert_agree(ours: nib.Nifti1Image, ref: nib.Nifti1Image) -> None:
    """Voxels equal, affines within 1e-3 mm and values within 1e-3 relative, all in RAS+."""
    def canonical(img, arr):
        arr = np.asanyarray(arr)
        if arr.dtype.names:  # RGB24: a trailing colour axis
            arr = np.stack([arr[n] for n in arr.dtype.names], axis=-1)
        return _canonical(arr, img.affine)

    (a, a_aff), (b, b_aff) = (canonical(img, img.dataobj.get_unscaled()) for img in (ours, ref))
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(a_aff, b_aff, atol=1e-3)
    if not ours.get_data_dtype().names:  # RGB has no scaling
        (fa, _), (fb, _) = (_canonical(img.get_fdata(), img.affine) for img in (ours, ref))
        np.testing.assert_allclose(fa, fb, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("case", _cases())
def test_nifti_export_agrees_with_dcm2niix(case, tmp_path: Path) -> None:
    src = _sources(case, tmp_path)
    store = _convert(src, tmp_path / "ds")
    offsets = slice_offsets(mist_zarr.open_image(store)[1])
    if offsets is not None:
        # the one deliberate difference: slices not evenly spaced have no NIfTI geometry,
        # so the export is refused (dcm2niix writes the stack with its first gap)
        with pytest.raises(ExportError, match="not evenly spaced"):
            export(store, tmp_path / "ours.nii", format="nifti")
        z = mist_zarr.open(store).z.values  # the true, uneven positions (against the DICOM
        assert len(set(np.round(np.diff(z), 3))) > 1  # files: tests/test_slice_gaps.py)
        return
    result = export(store, tmp_path / "ours.nii", format="nifti")
    ref, philips = _run_dcm2niix(src, tmp_path / "ref")
    _assert_agree(nib.load(result.files[0]), ref)
    # the scaling used is recorded, as in dcm2niix's sidecar
    assert any(n.startswith("scaling") for n in result.notes), result.notes
    ours = [n for n in result.notes if n.startswith("UsePhilipsFloatNotDisplayScaling")]
    assert len(ours) == (philips is not None), (ours, philips)
    if philips is not None:
        assert ours[0].startswith(f"UsePhilipsFloatNotDisplayScaling: {philips}")


@pytest.mark.parametrize("name", ["philips-classic", "philips-enhanced",
                                  "philips-enhanced-per-frame"])
def test_display_scaling_is_an_option_and_agrees_with_dcm2niix_p_n(name, tmp_path: Path) -> None:
    src = GENERATED[name](tmp_path / "src")
    store = _convert(src, tmp_path / "ds")
    precise = nib.load(export(store, tmp_path / "precise.nii", format="nifti").files[0])
    display = export(store, tmp_path / "display.nii", format="nifti", philips_scaling="display")
    ours = nib.load(display.files[0])
    ref, philips = _run_dcm2niix(src, tmp_path / "ref", "-p", "n")
    assert philips == 0
    assert "UsePhilipsFloatNotDisplayScaling: 0 (Philips private scale slope 2005,100E " \
        "ignored: DICOM display values)" in display.notes
    _assert_agree(ours, ref)
    # display = precise * RS * SS: the two conventions differ by exactly that factor
    ds = pydicom.dcmread(next(src.iterdir()))
    groups = [ds] + [g[0] for g in (ds.get("SharedFunctionalGroupsSequence"),
                                    ds.get("PerFrameFunctionalGroupsSequence")) if g]
    rs = next(float(g.PixelValueTransformationSequence[0].RescaleSlope if
                    "PixelValueTransformationSequence" in g else g.RescaleSlope)
              for g in groups if "PixelValueTransformationSequence" in g or "RescaleSlope" in g)
    ss = next(float(e.value) for g in groups for e in g.iterall() if e.tag == 0x2005100E)
    factor = rs * ss
    np.testing.assert_allclose(ours.get_fdata(), precise.get_fdata() * factor, rtol=1e-5)


def _cli_export(store: Path, out: Path, *options: str) -> None:
    subprocess.run(["mist-zarr", "export", str(store), str(out), "--format", "nifti", *options],
                   check=True, capture_output=True)


def test_cli_flag_selects_display_scaling(tmp_path: Path) -> None:
    store = _convert(write_classic(tmp_path / "src"), tmp_path / "ds")
    _cli_export(store, tmp_path / "precise.nii")
    _cli_export(store, tmp_path / "display.nii", "--philips-scaling", "display")
    precise, display = (nib.load(tmp_path / f"{n}.nii") for n in ("precise", "display"))
    assert (float(display.dataobj.slope), float(display.dataobj.inter)) == (2.5, -10.0)
    np.testing.assert_allclose([precise.dataobj.slope, precise.dataobj.inter],
                               [1 / 0.0125, -10 / (2.5 * 0.0125)], rtol=1e-6)
    assert b"philips precise" in precise.header["descrip"].tobytes()


def _expected_values(src: Path, philips: bool) -> list[np.ndarray]:
    """Each slice's physical values straight from the DICOM attributes, in position order."""
    slices = []
    for path in sorted(src.iterdir()):
        ds = pydicom.dcmread(path)
        frames = ds.pixel_array.reshape((-1, ds.Rows, ds.Columns)).astype(np.float64)
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        for k, frame in enumerate(frames):
            where = per_frame[k].PixelValueTransformationSequence[0] if per_frame else ds
            rs, ri = float(where.RescaleSlope), float(where.RescaleIntercept)
            value = frame * rs + ri
            if philips:
                value = value / (rs * float(ds[0x2005, 0x100E].value))
            position = (per_frame[k].PlanePositionSequence[0] if per_frame else ds)
            slices.append((float(np.dot(position.ImagePositionPatient, np.cross(
                *np.reshape(ds.get("ImageOrientationPatient") or ds.SharedFunctionalGroupsSequence[0]
                            .PlaneOrientationSequence[0].ImageOrientationPatient, (2, 3))))), value))
    return [v for _, v in sorted(slices, key=lambda s: s[0])]


@pytest.mark.parametrize("build, philips", [
    (lambda d: write_enhanced(d, slopes=(1.0, 2.0, 4.0, 0.5), where="per-frame"), False),
    (lambda d: write_classic(d, slopes=(2.5, 5.0)), True),
    (lambda d: write_classic(d, slopes=(2.5, 5.0)), False),
], ids=["enhanced-per-frame", "philips-classic-precise", "philips-classic-display"])
def test_rescale_varying_between_slices_is_exact_per_slice(build, philips, tmp_path: Path) -> None:
    """dcm2niix writes one slope for the enhanced file (and applies the Philips slope twice
    to the classic one); the export writes every slice's own values and says so."""
    src = build(tmp_path / "src")
    store = _convert(src, tmp_path / "ds")
    result = export(store, tmp_path / "ours.nii", format="nifti",
                    philips_scaling="precise" if philips else "display")
    assert any(n.startswith("scaling varies between slices") for n in result.notes), result.notes
    img = nib.load(result.files[0])
    assert img.get_data_dtype() == np.float32 and img.dataobj.slope in (1.0, None)
    values = img.get_fdata()  # (x, y, z), slices along z in position order
    expected = _expected_values(src, philips)
    assert values.shape[2] == len(expected)
    for z, want in enumerate(expected):
        np.testing.assert_allclose(values[:, :, z].T, want, rtol=1e-6)


def test_enhanced_4d_export_records_the_volume_order(tmp_path: Path) -> None:
    store = _convert(DATA_DIR / "mr" / "dcm_qa_xa30" / "In" / "25_asl_2d_tra", tmp_path / "ds") \
        if (DATA_DIR / "mr" / "dcm_qa_xa30" / "In" / "25_asl_2d_tra").is_dir() else \
        pytest.skip("shared data dcm_qa_xa30 is not available")
    result = export(store, tmp_path / "asl.nii", format="nifti")
    assert nib.load(result.files[0]).ndim == 4
    assert any(n.startswith("4-D volume order") for n in result.notes), result.notes


def _metadata(ds: Dataset) -> dict:
    return {"dicom": ds.to_json_dict()}


@pytest.mark.parametrize("block, manufacturer, precise", [
    (0x10, "Philips Medical Systems", True),
    (0x11, "Philips", True),  # another private block: found through its creator
    (0x10, "SIEMENS", False),  # the tag without Philips as manufacturer: display values
])
def test_philips_scale_slope_is_found_by_its_private_creator(block, manufacturer, precise):
    from mist_zarr.modality import find_rescale

    ds = _item(Manufacturer=manufacturer, RescaleSlope=2.0, RescaleIntercept=-4.0)
    if block != 0x10:
        ds.add_new((0x2005, 0x0010), "LO", "another creator")  # block 10 is taken
    ds.add_new((0x2005, block), "LO", PHILIPS)
    ds.add_new((0x2005, (block << 8) | 0x0E), "FL", 0.5)
    rescale = find_rescale(_metadata(ds), (3,), philips="precise")
    expected = (1 / 0.5, -4.0 / (2.0 * 0.5)) if precise else (2.0, -4.0)
    assert (rescale.slope, rescale.intercept) == expected
    display = find_rescale(_metadata(ds), (3,))  # the default: DICOM display values
    assert (display.slope, display.intercept) == (2.0, -4.0)
