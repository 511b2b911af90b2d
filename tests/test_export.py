"""Export down the format hierarchy: NIfTI, PNG and JPEG at any level; going up is refused."""

from __future__ import annotations

import glob
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import mist_zarr
from mist_zarr.convert import convert
from mist_zarr.export import ExportError, export

from .conftest import DATA_DIR, shared

SHARED_NIFTI = sorted(glob.glob(str(DATA_DIR / "nifti" / "*.nii.gz")))


@pytest.fixture(scope="module")
def nifti_dataset(tmp_path_factory):
    if not SHARED_NIFTI:
        pytest.skip("shared NIfTI files not available")
    dest = tmp_path_factory.mktemp("nifti") / "ds"
    assert convert(SHARED_NIFTI, dest).ok
    return dest


@pytest.mark.parametrize("path", SHARED_NIFTI, ids=lambda p: p.rsplit("/", 1)[-1])
def test_nifti_level0_export_equals_the_original(nifti_dataset, tmp_path, path):
    name = path.rsplit("/", 1)[-1].removesuffix(".nii.gz")
    result = export(nifti_dataset / name, tmp_path / name, format="nifti")
    a, b = nib.load(path), nib.load(result.files[0])
    np.testing.assert_array_equal(np.asanyarray(b.dataobj), np.asanyarray(a.dataobj))
    np.testing.assert_array_equal(b.affine, a.affine)
    assert b.get_data_dtype() == a.get_data_dtype()
    assert b.header.get_xyzt_units() == a.header.get_xyzt_units()
    assert b.header["descrip"] == a.header["descrip"]
    assert (b.dataobj.slope, b.dataobj.inter) == (a.dataobj.slope, a.dataobj.inter)


@pytest.mark.parametrize("k", [1, 2])
def test_nifti_reduced_levels_sit_on_the_even_sample_grid(nifti_dataset, tmp_path, k):
    path = next(p for p in SHARED_NIFTI if p.endswith("Seg3D_MR.nii.gz"))
    result = export(nifti_dataset / "Seg3D_MR", tmp_path / f"l{k}.nii", format="nifti", scale=k)
    a, b = nib.load(path), nib.load(result.files[0])
    assert b.shape == tuple(-(-s // 2**k) for s in a.shape[:2]) + a.shape[2:]
    expected = a.affine @ np.diag([2**k, 2**k, 1, 1])
    np.testing.assert_allclose(b.affine, expected, atol=1e-4)
    np.testing.assert_allclose(b.header.get_zooms()[:2], np.array(a.header.get_zooms()[:2]) * 2**k)
    level = mist_zarr.open(nifti_dataset / "Seg3D_MR", scale=k).values
    np.testing.assert_array_equal(np.asanyarray(b.dataobj.get_unscaled()), level.T)


def test_png_export_is_lossless_at_native_depth_with_text_chunks(tmp_path):
    ct = np.random.default_rng(1).integers(-1024, 3000, (3, 130, 150), dtype=np.int16)
    mist_zarr.write_image(tmp_path / "ct.zarr", ct, spacing=(2.0, 0.5, 0.5))
    result = export(tmp_path / "ct.zarr", tmp_path / "png", format="png")
    assert [f.rsplit("/", 1)[-1] for f in result.files] == ["ct_z0.png", "ct_z1.png", "ct_z2.png"]
    for z, f in enumerate(result.files):
        im = Image.open(f)
        assert int(im.info["mist_offset"]) == -32768
        back = np.asarray(im).astype(np.int32) + int(im.info["mist_offset"])
        np.testing.assert_array_equal(back, ct[z])
        assert json.loads(im.info["mist_spacing_mm"]) == [2.0, 0.5, 0.5]
    result = export(tmp_path / "ct.zarr", tmp_path / "png2", format="png", scale=1, bits=8,
                    window=(40, 400))
    im = np.asarray(Image.open(result.files[0]))
    assert im.dtype == np.uint8 and im.shape == (65, 75)
    level = mist_zarr.open(tmp_path / "ct.zarr", scale=1).values[0].astype(float)
    expected = np.clip(np.rint((level - (40 - 200)) / 400 * 255), 0, 255)
    np.testing.assert_array_equal(im, expected)


def test_png_sourced_image_exports_its_original_mode(tmp_path):
    grey = (np.arange(256 * 320).reshape(256, 320) % 251).astype(np.uint8)
    rgba = np.concatenate([np.stack([grey] * 3, -1), np.full((256, 320, 1), 255, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "x.png")
    assert convert(tmp_path / "x.png", tmp_path / "ds").ok
    result = export(tmp_path / "ds" / "x", tmp_path / "out", format="png")
    np.testing.assert_array_equal(np.asarray(Image.open(result.files[0])), rgba)
    jpg = export(tmp_path / "ds" / "x", tmp_path / "jpg", format="jpeg", size=100)
    picture = Image.open(jpg.files[0])
    # grey RGB with opaque alpha is stored as one grey channel: the JPEG is grey
    assert picture.size == (160, 128) and jpg.level == 1 and picture.mode == "L"
    level = mist_zarr.open(tmp_path / "ds" / "x", scale=1).values.astype(int)
    assert np.abs(np.asarray(picture).astype(int) - level).mean() < 3  # quality 90


def test_jpeg_export_of_rgba_drops_alpha_and_says_so(tmp_path):
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (96, 128, 4), dtype=np.uint8)
    rgba[..., :3] = np.linspace(0, 255, 128, dtype=np.uint8)[None, :, None]  # smooth colour
    Image.fromarray(rgba).save(tmp_path / "c.png")
    assert convert(tmp_path / "c.png", tmp_path / "ds").ok
    jpg = export(tmp_path / "ds" / "c", tmp_path / "jpg", format="jpeg")
    picture = Image.open(jpg.files[0])
    assert picture.mode == "RGB" and "alpha channel dropped (JPEG has none)" in jpg.notes
    assert np.abs(np.asarray(picture).astype(int) - rgba[..., :3].astype(int)).mean() < 3


@pytest.mark.parametrize("source,target", [("nifti", "dicom"), ("png", "nifti"),
                                           ("png", "dicom"), ("array", "dicom")])
def test_exports_never_go_up_the_hierarchy(tmp_path, source, target):
    mist_zarr.write_image(tmp_path / "a.zarr", np.ones((70, 70), np.uint8), source_format=source)
    with pytest.raises(ExportError, match="format hierarchy"):
        export(tmp_path / "a.zarr", tmp_path / "out", format=target)
    assert not (tmp_path / "out").exists()


def test_png_refuses_samples_beyond_16_bits(tmp_path):
    mist_zarr.write_image(tmp_path / "a.zarr", np.array([[0, 70000]] * 2, np.int32))
    with pytest.raises(ExportError, match="16-bit PNG"):
        export(tmp_path / "a.zarr", tmp_path / "out", format="png")


def test_cli_export_and_info(nifti_dataset, tmp_path):
    out = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "export",
                          str(nifti_dataset / "example_ct"), str(tmp_path / "ct.nii.gz"),
                          "--format", "nifti", "--scale", "1"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert nib.load(tmp_path / "ct.nii.gz").shape == (61, 51, 112)
    out = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "info",
                          str(nifti_dataset / "example_ct")], capture_output=True, text=True)
    assert "exports to    : nifti, png, jpeg" in out.stdout
    out = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "export",
                          str(nifti_dataset / "example_ct"), str(tmp_path / "d"), "--format",
                          "dicom"], capture_output=True, text=True)
    assert out.returncode == 2 and "format hierarchy" in out.stderr


def test_rgb_nifti_roundtrips(tmp_path):
    rgb = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    data = np.random.default_rng(5).integers(0, 256, (20, 24, 3, 3), dtype=np.uint8)
    voxels = np.ascontiguousarray(data).view(rgb)[..., 0]
    nib.save(nib.Nifti1Image(voxels, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "rgb.nii")
    report = convert(tmp_path / "rgb.nii", tmp_path / "ds")
    assert report.ok, report.summary()
    _, info = mist_zarr.open_image(tmp_path / "ds" / "rgb")
    assert info.dims == ("z", "y", "x", "c")
    np.testing.assert_array_equal(mist_zarr.read_image(tmp_path / "ds" / "rgb")[..., 1],
                                  voxels["G"].T)
    result = export(tmp_path / "ds" / "rgb", tmp_path / "back.nii", format="nifti")
    back = nib.load(result.files[0])
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), voxels)
    np.testing.assert_array_equal(back.affine, nib.load(tmp_path / "rgb.nii").affine)


def test_8bit_pictures_of_an_enhanced_mr_use_each_frames_own_window(tmp_path):
    """Enhanced files keep their VOI window (and rescale) in the per-frame functional
    groups, not at the top: each picture is windowed with its own frame's values."""
    import pydicom

    from mist_zarr.reader import read_metadata

    series = shared("mr", "dcm_qa_xa30", "In", "5_anat-T1w_acq-tfl")
    report = convert(series, tmp_path / "ds")
    assert report.ok
    image = tmp_path / "ds" / report.converted[0].path
    result = export(image, tmp_path / "png", format="png", bits=8, scale=1)
    assert "8-bit rendering: DICOM window" in result.notes[0]
    (source,) = sorted(series.iterdir())
    frames = pydicom.dcmread(source, stop_before_pixels=True).PerFrameFunctionalGroupsSequence
    stored = mist_zarr.open(image, scale=1).values
    order = read_metadata(mist_zarr.open_image(image)[0])["dicom_per_slice"]["frame_index"]
    assert len({float(f.FrameVOILUTSequence[0].WindowWidth) for f in frames}) > 1
    for z in (0, len(order) // 2, len(order) - 1):
        frame = frames[order[z]]
        voi, pixel = frame.FrameVOILUTSequence[0], frame.PixelValueTransformationSequence[0]
        values = stored[z].astype(float) * float(pixel.RescaleSlope) + float(pixel.RescaleIntercept)
        lo = float(voi.WindowCenter) - float(voi.WindowWidth) / 2
        expected = np.clip(np.rint((values - lo) / float(voi.WindowWidth) * 255), 0, 255)
        np.testing.assert_array_equal(np.asarray(Image.open(result.files[z])), expected)
