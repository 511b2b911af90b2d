"""Tests for mist_zarr.converters.dicom (the DICOM reader half of ``mist-zarr convert``).

Oracles: pydicom's ``pixel_array`` for stored values, dcm2niix for geometry
and voxel order (reference NIfTI in ``mr/*/Ref`` or generated here into
tmp_path), and the DICOM headers themselves for slice positions.

Where this reader and dcm2niix differ by design the comparison is made in a
canonical (closest RAS+) orientation: dcm2niix stores rows flipped (LAS) and
may reorder slices; that is a storage choice, not a geometric difference.
dcm2niix also resamples gantry-tilted CT (this reader keeps the shear in the
affine); none of the shared series is tilted, so all of them are compared.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")
from hypothesis import given, settings
from hypothesis import strategies as st
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.pixels import apply_color_lut
from pydicom.uid import generate_uid

from mist_zarr.converters import dicom as dcm
from mist_zarr.converters.dicom import geometry as geom
from mist_zarr.converters.dicom import (
    DicomError,
    DicomVolume,
    SeriesRef,
    read_dicom_series,
    scan_dicom,
    suggest_name,
)
from mist_zarr.errors import SourceIssue

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# --------------------------------------------------------------------------- helpers


def _data_root(config: pytest.Config) -> Path:
    """The shared data folder: --mist-data (if the option exists), $MIST_DATA, or ../shared/data."""
    try:
        option = config.getoption("--mist-data")
    except ValueError:
        option = None
    return Path(option or os.environ.get("MIST_DATA", DEFAULT_DATA))


@pytest.fixture
def data(request: pytest.FixtureRequest) -> Path:
    root = _data_root(request.config)
    if not root.is_dir():
        pytest.skip(f"shared development data not found at {root} (set MIST_DATA)")
    return root


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data {path} is not available")
    return path


def _dcm2niix() -> str | None:
    try:
        import dcm2niix

        return str(dcm2niix.bin)
    except Exception:
        return shutil.which("dcm2niix")


def _nifti_order(vol: DicomVolume) -> np.ndarray:
    """Return vol.data as (x, y, z[, t][, c]) for comparison with NIfTI."""
    a, dims = vol.data, list(vol.dims)
    if "z" not in dims:
        a = np.expand_dims(a, dims.index("y"))
        dims.insert(dims.index("y"), "z")
    order = ["x", "y", "z"] + [d for d in ("t", "frame", "c") if d in dims]
    return np.transpose(a, [dims.index(d) for d in order])


def _canonical(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient the first three axes to the closest RAS+ (as nibabel.as_closest_canonical)."""
    ornt = io_orientation(affine)
    return apply_orientation(arr, ornt), affine @ inv_ornt_aff(ornt, arr.shape[:3])


def _load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj.get_unscaled())
    if arr.dtype.names:  # RGB24 -> trailing colour axis
        arr = np.stack([arr[n] for n in arr.dtype.names], axis=-1)
    return arr, img.affine


def _expected_frames(path: str) -> np.ndarray:
    """Return pydicom's pixel_array for a file as (frames, rows, cols[, 3]), palette applied."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. excess padding: the reader reports these itself
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if int(ds.get("NumberOfFrames") or 1) == 1:
        arr = arr[None]
    return arr


def _assert_slices_match_sources(vol: DicomVolume) -> None:
    """Every stored slice equals the frame (or mosaic tile) of its source file, bit for bit."""
    cache: dict[int, np.ndarray] = {}
    frame_shape = vol.data.shape[len(vol.data.shape) - (3 if "c" in vol.dims else 2) :]
    slices = vol.data.reshape((-1,) + frame_shape)
    tiles = vol.per_slice.get("mosaic_tile_index")
    for i, (fi, frame) in enumerate(
        zip(vol.per_slice["source_file_index"], vol.per_slice["frame_index"])
    ):
        if fi not in cache:
            cache[fi] = _expected_frames(vol.source_files[fi])
        src = cache[fi][frame]
        if tiles is not None:
            rows, cols = frame_shape[:2]
            side = src.shape[1] // cols
            r, c = divmod(tiles[i], side)
            src = src[r * rows : (r + 1) * rows, c * cols : (c + 1) * cols]
        assert slices.dtype.newbyteorder("=") == src.dtype.newbyteorder("="), (
            slices.dtype,
            src.dtype,
        )
        assert np.array_equal(slices[i], src), (
            f"slice {i} differs from {vol.source_files[fi]} frame {frame}"
        )


def _assert_affine_hits_positions(vol: DicomVolume, tol: float = 0.01) -> None:
    """The affine maps voxel (0, 0, k) to the recorded origin of slice k (first time point)."""
    pos = vol.per_slice.get("position_lps")
    assert pos is not None
    nz = vol.data.shape[vol.dims.index("z")] if "z" in vol.dims else 1
    for k in range(nz):
        world = vol.affine @ np.array([0.0, 0.0, k, 1.0])
        expected = LPS_TO_RAS @ np.array([*pos[k], 1.0])
        assert np.allclose(world, expected, atol=tol), (k, world, expected)


def _copy(src: str, dst: Path, **changes) -> Path:
    """Copy a DICOM file, optionally changing attributes (keyword=value; None deletes)."""
    ds = pydicom.dcmread(src)
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def _ct5n() -> list[str]:
    """A small 5-slice CT series that ships with pydicom (16 x 16, 2.5 mm apart)."""
    files = sorted(
        f for f in get_testdata_files("dicomdirtests/98892001/CT5N/*") if os.path.isfile(f)
    )
    assert len(files) == 5
    return files


# --------------------------------------------------------------------------- shared data vs dcm2niix


@dataclass
class RefCase:
    name: str
    series: SeriesRef
    ref_nii: Path | None  # None: generate with dcm2niix


@functools.lru_cache(maxsize=2)
def _reference_cases(root: Path) -> list:
    if not root.is_dir():
        skip = pytest.mark.skip(
            reason=f"shared development data not found at {root} (set MIST_DATA)"
        )
        return [pytest.param(None, marks=skip, id="no-shared-data")]
    cases = []
    for dataset in sorted((root / "mr").glob("*")):
        refs = {}
        for sidecar in sorted((dataset / "Ref").glob("*.json")):
            meta = json.loads(sidecar.read_text())
            refs[(meta.get("SeriesNumber"), meta.get("SeriesDescription"))] = sidecar.with_suffix(
                ".nii"
            )
        for ref in scan_dicom(dataset / "In").series:
            # A series with no Ref NIfTI (or only its JSON) gets one from dcm2niix in the test.
            nii = refs.get((ref.series_number, ref.description))
            label = nii.stem if nii else f"series{ref.series_number}"
            cases.append(
                pytest.param(
                    RefCase(dataset.name, ref, nii if nii and nii.exists() else None),
                    id=f"{dataset.name}-{label}",
                )
            )
    for folder in sorted(p for p in (root / "ct").glob("*") if p.is_dir()):
        for ref in scan_dicom(folder).series:
            cases.append(pytest.param(RefCase(folder.name, ref, None), id=f"ct-{folder.name}"))
    return cases


def _run_dcm2niix(files: list[str], tmp_path: Path) -> Path:
    exe = _dcm2niix()
    if exe is None:
        pytest.skip("dcm2niix binary not available (pip install dcm2niix)")
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    for i, f in enumerate(files):
        (src / f"{i:05d}.dcm").symlink_to(Path(f).resolve())
    subprocess.run(
        [exe, "-z", "n", "-b", "n", "-f", "%s_%p", "-o", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    outputs = sorted(out.glob("*.nii"))
    assert len(outputs) == 1, f"dcm2niix wrote {outputs}"
    return outputs[0]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``case`` with each MR series (Ref NIfTI or regenerated) and each CT series."""
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", _reference_cases(_data_root(metafunc.config)))


def test_shared_series_match_dcm2niix(case: RefCase, tmp_path: Path) -> None:
    ref_nii = case.ref_nii or _run_dcm2niix(case.series.files, tmp_path)
    volumes = read_dicom_series(case.series)
    assert len(volumes) == 1, [v.stack_key for v in volumes]
    vol = volumes[0]
    mine, mine_aff = _canonical(_nifti_order(vol), vol.affine)
    theirs, their_aff = _canonical(*_load_nifti(ref_nii))
    assert mine.shape == theirs.shape
    assert np.array_equal(mine.astype(np.int64), theirs.astype(np.int64)), (
        "voxels differ from dcm2niix"
    )
    np.testing.assert_allclose(mine_aff, their_aff, atol=1e-3)
    # The volume also agrees with its own headers, slice by slice.
    _assert_affine_hits_positions(vol)
    assert not vol.lossy_source
    assert len(vol.spacing) == len([d for d in vol.dims if d != "c"])
    zooms = np.linalg.norm(vol.affine[:3, :3], axis=0)
    spatial = dict(zip([d for d in vol.dims if d != "c"], vol.spacing))
    np.testing.assert_allclose(zooms[:2], [spatial["x"], spatial["y"]], rtol=1e-6)
    if "z" in spatial:
        np.testing.assert_allclose(zooms[2], spatial["z"], rtol=1e-4)


def test_shared_volumes_are_bit_exact_and_serialisable(data: Path) -> None:
    for folder in [
        _need(data / "mr" / "dcm_qa_nih" / "In" / "20180918Si"),
        _need(data / "mr" / "dcm_qa_xa30" / "In" / "25_asl_2d_tra"),
        _need(data / "ct" / "CRLM-CT-1004"),
    ]:
        for ref in scan_dicom(folder).series:
            for vol in read_dicom_series(ref):
                _assert_slices_match_sources(vol)
                n = int(np.prod(vol.data.shape[: len(vol.dims) - (3 if "c" in vol.dims else 2)]))
                assert all(len(v) == n for v in vol.per_slice.values())
                assert set(vol.per_slice_vr) <= set(vol.per_slice)
                json.dumps(vol.metadata)
                json.dumps(vol.per_slice)
                assert not {"7FE00010", "7FE00008", "7FE00009"} & set(vol.metadata)
                assert not any(tag.endswith("0000") for tag in vol.metadata)
                names = {pydicom.datadict.keyword_for_tag(int(t, 16)) or t for t in vol.metadata}
                overlap = names & set(vol.per_slice)
                assert not overlap, overlap


def test_ct_keeps_stored_values_and_rescale_metadata(data: Path) -> None:
    folder = _need(data / "ct" / "CRLM-CT-1004")
    (vol,) = read_dicom_series(folder)
    assert vol.dims == ("z", "y", "x") and vol.data.dtype == np.int16
    # RescaleIntercept is kept as metadata, not applied to the stored values.
    assert vol.metadata["00281052"]["Value"] == [-1024]
    _assert_slices_match_sources(vol)
    iop = pydicom.dcmread(vol.source_files[0], stop_before_pixels=True).ImageOrientationPatient
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    along = np.asarray(vol.per_slice["position_lps"]) @ normal
    assert np.all(np.diff(along) > 0), "slices must be sorted along the slice normal"
    assert not vol.warnings


def test_every_ref_nifti_with_input_is_used(data: Path) -> None:
    """Each Ref NIfTI whose input series is present is compared by the dcm2niix test."""
    used = {c.values[0].ref_nii for c in _reference_cases(data) if c.values[0].ref_nii}
    assert used
    for dataset in (data / "mr").glob("*"):
        present = {(r.series_number, r.description) for r in scan_dicom(dataset / "In").series}
        for sidecar in (dataset / "Ref").glob("*.json"):
            meta = json.loads(sidecar.read_text())
            nii = sidecar.with_suffix(".nii")
            if (meta["SeriesNumber"], meta["SeriesDescription"]) in present and nii.exists():
                assert nii in used, nii


def test_mosaic_without_csa_header_stays_2d(data: Path, tmp_path: Path) -> None:
    src = _need(data / "mr" / "dcm_qa_ts" / "In" / "1.dcm")
    ds = pydicom.dcmread(src)
    for tag in [t for t in ds.keys() if t.group == 0x0029]:  # noqa: SIM118
        del ds[tag]
    ds.save_as(tmp_path / "mosaic.dcm")
    (vol,) = read_dicom_series(tmp_path / "mosaic.dcm")
    assert vol.dims == ("y", "x") and vol.data.shape == (ds.Rows, ds.Columns)
    assert any("mosaic" in w and "NOT a slice stack" in w for w in vol.warnings)
    _assert_slices_match_sources(vol)


# --------------------------------------------------------------------------- radiographs


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG3_UNCR.dcm"])
def test_radiographs_are_2d_monochrome1(data: Path, name: str) -> None:
    path = _need(data / "radiographs" / name)
    (vol,) = read_dicom_series(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert vol.dims == ("y", "x") and vol.data.shape == (ds.Rows, ds.Columns)
    assert vol.photometric == vol.source_photometric == "MONOCHROME1"
    assert any("MONOCHROME1" in n for n in vol.notes)
    assert vol.modality == "CR" and not vol.lossy_source
    assert any("nominal" in w for w in vol.warnings)  # no patient geometry in a CR header
    _assert_slices_match_sources(vol)


def test_cr_spacing_from_imager_pixel_spacing() -> None:
    (path,) = [f for f in get_testdata_files("dicomdirtests/77654033/CR1/*") if os.path.isfile(f)]
    (vol,) = read_dicom_series(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert "PixelSpacing" not in ds
    assert vol.spacing == tuple(float(v) for v in ds.ImagerPixelSpacing)
    assert any("ImagerPixelSpacing" in n for n in vol.notes)
    assert vol.photometric == "MONOCHROME1"


# --------------------------------------------------------------------------- pydicom corpus


def _corpus() -> list[str]:
    return sorted(f for f in get_testdata_files() if os.path.isfile(f))


_KNOWN_REFUSALS = re.compile(
    r"not a DICOM|truncated|too short|non-image|no pixel data|cannot decode"
    r"|invalid|missing|TransferSyntaxUID|refused"
)


@pytest.mark.parametrize(
    "path",
    _corpus(),
    ids=lambda p: os.path.relpath(p, os.path.dirname(get_testdata_file("CT_small.dcm"))),
)
def test_pydicom_corpus_reads_exactly_or_refuses(path: str) -> None:
    try:
        volumes = read_dicom_series(path)
    except DicomError as exc:
        message = str(exc)
        assert message.startswith(path + ": "), message
        assert _KNOWN_REFUSALS.search(message), message
        assert "unexpected error" not in message
        return
    frames = _expected_frames(path)
    covered = []
    for vol in volumes:
        _assert_slices_match_sources(vol)
        covered += vol.per_slice["frame_index"]
        assert vol.data.dtype.isnative
        assert ("c" in vol.dims) == (vol.photometric == "RGB")
        if vol.photometric == "RGB":
            assert vol.dims[-1] == "c" and vol.data.shape[-1] == 3
        json.dumps(vol.metadata)
        json.dumps(vol.per_slice)
    assert sorted(covered) == list(range(frames.shape[0])), "every frame is read exactly once"


def test_corpus_scan_accounts_for_every_file() -> None:
    root = os.path.dirname(get_testdata_file("CT_small.dcm"))
    walked = [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs]
    result = scan_dicom(root)
    seen = [f for s in result.series for f in s.files] + [
        i.source for i in result.rejected + result.skipped
    ]
    assert sorted(seen) == sorted(walked)
    assert all(i.reason for i in result.rejected + result.skipped)
    skipped = {os.path.basename(i.source): i.reason for i in result.skipped}
    assert "non-image" in skipped["liver_1frame.dcm"]  # SEG
    assert "non-image" in skipped["rtplan.dcm"] and "non-image" in skipped["reportsi.dcm"]
    rejected = {os.path.basename(i.source): i.reason for i in result.rejected}
    assert rejected["MR_truncated.dcm"].startswith("truncated")


def test_lossy_flag_from_the_jpeg2000_wavelet(tmp_path: Path) -> None:
    """JPEG 2000 (.91) may be lossless or lossy; the codestream's wavelet decides when no flag says so."""
    irreversible = _copy(
        get_testdata_file("JPEG2000.dcm"), tmp_path / "a.dcm", LossyImageCompression=None
    )
    reversible = _copy(
        get_testdata_file("693_J2KI.dcm"), tmp_path / "b.dcm", LossyImageCompression=None
    )
    (vol,) = read_dicom_series(irreversible)
    assert vol.lossy_source and any("9/7" in n for n in vol.notes)
    (vol,) = read_dicom_series(reversible)
    assert not vol.lossy_source
    (vol,) = read_dicom_series(get_testdata_file("SC_rgb_jpeg_lossy_gdcm.dcm"))
    assert vol.lossy_source and vol.photometric == "RGB"


def test_colour_conversions_are_recorded() -> None:
    (vol,) = read_dicom_series(get_testdata_file("SC_ybr_full_422_uncompressed.dcm"))
    assert vol.source_photometric == "YBR_FULL_422" and vol.photometric == "RGB"
    assert any("YBR_FULL_422" in n and "RGB" in n for n in vol.notes)
    (vol,) = read_dicom_series(get_testdata_file("examples_palette.dcm"))
    assert vol.source_photometric == "PALETTE COLOR" and vol.dims == ("y", "x", "c")
    assert any("apply_color_lut" in n for n in vol.notes)


def test_rtdose_grid_frame_offsets_make_a_volume() -> None:
    path = get_testdata_file("rtdose.dcm")
    (vol,) = read_dicom_series(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    offsets = [float(v) for v in ds.GridFrameOffsetVector]
    assert vol.dims == ("z", "y", "x") and vol.data.dtype == np.uint32
    np.testing.assert_allclose(vol.spacing[0], abs(offsets[1] - offsets[0]))
    _assert_affine_hits_positions(vol)
    _assert_slices_match_sources(vol)


# --------------------------------------------------------------------------- bad input and geometry


def test_tree_with_bad_files_reads_the_good_series(tmp_path: Path) -> None:
    good = _ct5n()
    for f in good:
        _copy(f, tmp_path / "study" / "series" / os.path.basename(f))
    # An interrupted copy of one more slice of the same series (new instance UID).
    extra = _copy(
        good[0], tmp_path / "study" / "series" / "partial.dcm", SOPInstanceUID=generate_uid()
    )
    extra.write_bytes(extra.read_bytes()[:-100])
    (tmp_path / "study" / "notes.txt").write_text("not an image\n")
    shutil.copy(get_testdata_file("reportsi.dcm"), tmp_path / "study" / "report.dcm")

    result = scan_dicom(tmp_path)
    assert len(result.series) == 1 and len(result.series[0].files) == 5
    rejected = {Path(i.source).name: i.reason for i in result.rejected}
    skipped = {Path(i.source).name: i.reason for i in result.skipped}
    assert rejected.keys() == {"partial.dcm", "notes.txt"} and skipped.keys() == {"report.dcm"}
    assert "truncated" in rejected["partial.dcm"] and "not a DICOM" in rejected["notes.txt"]
    assert "non-image" in skipped["report.dcm"]

    (vol,) = read_dicom_series(result.series[0])
    assert vol.dims == ("z", "y", "x") and vol.data.shape == (5, 16, 16)
    _assert_slices_match_sources(vol)
    _assert_affine_hits_positions(vol)

    # Reading the folder directly works too and says which files it ignored.
    (vol2,) = read_dicom_series(tmp_path)
    assert np.array_equal(vol2.data, vol.data)
    assert any("partial.dcm" in w for w in vol2.warnings)
    # A bad file named explicitly is an error naming it.
    with pytest.raises(DicomError, match="partial.dcm: truncated"):
        read_dicom_series([*result.series[0].files, str(extra)])


def _broken_copy(src: str, dst: Path) -> Path:
    """A copy of ``src`` (same SOPInstanceUID) whose header reads but whose JPEG 2000
    pixel data does not decode: what the scan cannot tell from a good copy."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(60))])
    ds["PixelData"].VR = "OB"
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def test_a_broken_copy_of_an_instance_falls_back_to_the_good_one(tmp_path: Path) -> None:
    good = _ct5n()
    folder = tmp_path / "series"
    for f in good:
        _copy(f, folder / f"b_{os.path.basename(f)}")
    broken = _broken_copy(good[2], folder / "a_broken.dcm")  # sorts first: scanned first
    with pytest.raises(DicomError):
        read_dicom_series([str(broken)])  # it is broken indeed

    result = scan_dicom(folder)
    (ref,) = result.series
    assert len(ref.files) == 5 and str(broken) in ref.files
    (copy,) = ref.copies[str(broken)]
    assert Path(copy).name == f"b_{os.path.basename(good[2])}"
    assert [Path(i.source).name for i in result.skipped] == [Path(copy).name]
    (vol,) = read_dicom_series(ref)
    assert vol.data.shape == (5, 16, 16) and copy in vol.source_files
    assert str(broken) not in vol.source_files
    _assert_slices_match_sources(vol)
    assert any("a_broken.dcm" in w and "failed" in w for w in vol.warnings), vol.warnings
    # the same through the convert hook: one image, nothing failed
    problems: list[SourceIssue] = []
    (image,) = dcm.dicom_sources(folder, problems=problems)
    assert np.array_equal(image.data, vol.data)
    assert [p.kind for p in problems] == ["skipped"]


def test_copies_of_an_instance_with_different_pixels_are_a_conflict(tmp_path: Path) -> None:
    good = _ct5n()
    folder = tmp_path / "series"
    for f in good:
        _copy(f, folder / os.path.basename(f))
    ds = pydicom.dcmread(good[1])
    other = ds.pixel_array.copy()
    other[3, 4] += 1
    ds.PixelData = other.tobytes()
    ds.save_as(folder / "edited.dcm", enforce_file_format=True)
    identical = _copy(good[3], folder / "zz_identical.dcm")  # a faithful copy is fine

    (ref,) = scan_dicom(folder).series
    assert sum(len(c) for c in ref.copies.values()) == 2 and str(identical) not in ref.files
    with pytest.raises(DicomError, match="conflict: .* share SOPInstanceUID .* pixel data differ"):
        read_dicom_series(ref)
    problems: list[SourceIssue] = []
    assert list(dcm.dicom_sources(folder, problems=problems)) == []
    (failed,) = [p for p in problems if p.kind == "failed"]
    assert "conflict" in failed.reason and "edited.dcm" in failed.reason
    # without the edited copy the identical one is no conflict
    (folder / "edited.dcm").unlink()
    (vol,) = read_dicom_series(scan_dicom(folder).series[0])
    _assert_slices_match_sources(vol)


def _stack(
    tmp_path: Path, positions_mm: list[float], shift=lambda k: (0.0, 0.0), **per_file
) -> list[Path]:
    """Write copies of one CT slice at the given positions along z (x/y offsets from ``shift``)."""
    src = _ct5n()[0]
    ipp0 = [float(v) for v in pydicom.dcmread(src, stop_before_pixels=True).ImagePositionPatient]
    uid = generate_uid()
    out = []
    for k, z in enumerate(positions_mm):
        dx, dy = shift(k)
        extra = {key: (value(k) if callable(value) else value) for key, value in per_file.items()}
        out.append(
            _copy(
                src,
                tmp_path / f"{k:03d}.dcm",
                SeriesInstanceUID=uid,
                SOPInstanceUID=generate_uid(),
                ImagePositionPatient=[ipp0[0] + dx, ipp0[1] + dy, z],
                InstanceNumber=k + 1,
                **extra,
            )
        )
    return out


def test_missing_slice_is_a_warning_with_positions_kept(tmp_path: Path) -> None:
    files = _stack(tmp_path, [0.0, 2.5, 5.0, 10.0, 12.5])
    (vol,) = read_dicom_series(files)
    assert any("non-uniform" in w and "missing" in w for w in vol.warnings)
    assert [p[2] for p in vol.per_slice["position_lps"]] == [0.0, 2.5, 5.0, 10.0, 12.5]


def test_gantry_tilt_is_kept_as_shear(tmp_path: Path) -> None:
    files = _stack(tmp_path, [2.5 * k for k in range(5)], shift=lambda k: (0.0, 0.6 * k))
    (vol,) = read_dicom_series(files)
    assert any("tilt" in w for w in vol.warnings)
    _assert_affine_hits_positions(vol, tol=1e-6)
    # z spacing is the distance between slice planes, not the length of the sheared step.
    np.testing.assert_allclose(vol.spacing[0], 2.5)


def test_non_collinear_slices_are_refused(tmp_path: Path) -> None:
    files = _stack(
        tmp_path, [2.5 * k for k in range(5)], shift=lambda k: (4.0 if k == 2 else 0.0, 0.0)
    )
    with pytest.raises(DicomError, match="not collinear"):
        read_dicom_series(files)


def test_duplicate_position_without_time_identifier_is_refused(tmp_path: Path) -> None:
    files = _stack(tmp_path, [0.0, 2.5, 5.0, 5.0, 7.5])
    with pytest.raises(DicomError, match="unequal numbers of images per slice position"):
        read_dicom_series(files)


def test_4d_from_repeated_positions_and_incomplete_4d(tmp_path: Path) -> None:
    z = [0.0, 2.5, 5.0]
    files = _stack(tmp_path / "a", z + z, TemporalPositionIdentifier=lambda k: k // 3 + 1)
    (vol,) = read_dicom_series(files)
    assert vol.dims == ("t", "z", "y", "x") and vol.data.shape[:2] == (2, 3)
    assert vol.per_slice["TemporalPositionIdentifier"] == [[1], [1], [1], [2], [2], [2]]
    with pytest.raises(DicomError, match="unequal numbers"):
        read_dicom_series(files[:-1])
    # Temporal identifiers that disagree between positions are refused, not guessed.
    bad = _stack(tmp_path / "b", z + z, TemporalPositionIdentifier=lambda k: [1, 1, 1, 2, 2, 3][k])
    with pytest.raises(DicomError, match="incomplete or inconsistent"):
        read_dicom_series(bad)


def test_separate_acquisitions_become_separate_volumes(tmp_path: Path) -> None:
    files = _stack(
        tmp_path, [0.0, 2.5, 5.0, 0.0, 2.5], AcquisitionNumber=lambda k: 1 if k < 3 else 2
    )
    volumes = read_dicom_series(files)
    assert [v.data.shape[0] for v in volumes] == [3, 2]
    assert len({v.name for v in volumes}) == 2
    assert all("acquisition=" in v.stack_key for v in volumes)


def test_split_stacks_get_distinct_stable_names() -> None:
    root = os.path.join(os.path.dirname(get_testdata_file("CT_small.dcm")), "dicomdirtests")
    angio = [r for r in scan_dicom(root).series if r.description.startswith("ANGIO")]
    assert len(angio) == 1 and len(angio[0].files) > 1
    names = [v.name for v in read_dicom_series(angio[0])]
    # Projections at different angles: one 2-D image per orientation, each named apart.
    assert len(set(names)) == len(names) == len(angio[0].files)
    assert names == [v.name for v in read_dicom_series(angio[0])]
    for name in names:
        assert re.fullmatch(
            r"[A-Za-z0-9._+-]+/[A-Za-z0-9._+-]+/[A-Za-z0-9._+-]+-[0-9a-f]{8}", name
        ), name


def test_max_bytes_is_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("pixel data decoded despite the size limit")

    monkeypatch.setattr(dcm.series, "_decode_file", fail)
    with pytest.raises(DicomError, match="exceeds max_bytes=1000"):
        read_dicom_series(_ct5n(), max_bytes=1000)


def test_dicom_sources_hook_for_convert(tmp_path: Path) -> None:
    for f in _ct5n():
        _copy(f, tmp_path / "ct" / os.path.basename(f))
    shutil.copy(get_testdata_file("reportsi.dcm"), tmp_path / "report.dcm")
    shutil.copy(get_testdata_file("MR_truncated.dcm"), tmp_path / "truncated.dcm")
    _copy(get_testdata_file("rtdose.dcm"), tmp_path / "dose.dcm")
    problems: list = []
    images = list(dcm.dicom_sources([tmp_path], max_bytes=10**6, problems=problems))
    assert sorted(img.dims for img in images) == [("z", "y", "x"), ("z", "y", "x")]
    for img in images:
        assert img.source_format == "dicom" and len(img.spacing) == len(img.dims)
        assert img.metadata["dicom"]["00080060"]["Value"][0] in ("CT", "RTDOSE")
        json.dumps(img.metadata)
    kinds = {Path(p.source).name: p.kind for p in problems}
    assert kinds == {"report.dcm": "skipped", "truncated.dcm": "failed"}
    assert all(isinstance(p, SourceIssue) and p.reason for p in problems)


def test_non_dicom_file_is_a_dicom_error(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"\0" * 200)
    with pytest.raises(DicomError, match=re.escape(str(path))):
        read_dicom_series(path)
    assert issubclass(DicomError, ValueError)


# --------------------------------------------------------------------------- geometry properties

unit = st.floats(-1.0, 1.0, allow_nan=False)


@st.composite
def rotations(draw) -> np.ndarray:
    q = np.array([draw(unit) for _ in range(4)])
    if np.linalg.norm(q) < 0.1:
        q = np.array([1.0, 0.0, 0.0, 0.0])
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


@settings(max_examples=60, deadline=None)
@given(
    rot=rotations(),
    spacing=st.tuples(st.floats(0.1, 5.0), st.floats(0.1, 5.0)),
    step=st.floats(0.2, 10.0),
    origin=st.tuples(*[st.floats(-500, 500)] * 3),
    n=st.integers(1, 12),
    shear=st.floats(-0.3, 0.3),
)
def test_affine_maps_voxels_to_dicom_positions(rot, spacing, step, origin, n, shear) -> None:
    row, col = rot[:, 0], rot[:, 1]
    r, c, normal = geom.direction_cosines([*row, *col])
    offset = step * (normal + shear * row)  # sheared (tilted) stacks too
    positions = np.array(origin) + np.outer(np.arange(n), offset)
    order = np.random.default_rng(n).permutation(n)
    clusters = geom.cluster_positions(positions[order] @ normal)
    assert [order[c[0]] for c in clusters] == list(range(n))
    layout = geom.analyse_slice_positions(positions, normal, spacing, step)
    affine = geom.affine_ras(r, c, spacing, layout.step, positions[0])
    for k in range(n):
        for i, j in ((0, 0), (3, 7)):
            lps = positions[k] + i * spacing[1] * row + j * spacing[0] * col
            np.testing.assert_allclose(affine @ [i, j, k, 1], LPS_TO_RAS @ [*lps, 1], atol=1e-6)
    if n > 1:
        np.testing.assert_allclose(layout.spacing, step, rtol=1e-9)
        np.testing.assert_allclose(layout.tilt_deg, math.degrees(math.atan(abs(shear))), atol=1e-5)
        tilt_warned = any("tilt" in w for w in layout.warnings)
        assert tilt_warned if abs(shear) > 0.01 else True
        assert not tilt_warned if abs(shear) < 1e-4 else True
        assert not any("non-uniform" in w for w in layout.warnings)


@settings(max_examples=100, deadline=None)
@given(st.text(), st.text(), st.text())
def test_names_are_portable_and_distinct(patient, description, uid) -> None:
    ds = pydicom.Dataset()
    ds.PatientID, ds.SeriesDescription, ds.StudyDate = patient, description, "20240101"
    name = suggest_name(ds, uid)
    parts = name.split("/")
    assert len(parts) == 3 and all(re.fullmatch(r"[A-Za-z0-9._+-]+", p) for p in parts)
    assert all(not p.startswith(".") and len(p) <= 64 for p in parts)
    assert name == suggest_name(ds, uid)
    assert suggest_name(ds, uid + "x") != name and suggest_name(ds, uid, "stack") != name
