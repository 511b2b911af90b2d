"""NIfTI and 2-D image ingest through mist_zarr.convert: bit-exact, metadata kept, sniffed."""

from __future__ import annotations

import glob
import os
import shutil

import imagecodecs
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import mist_zarr
from mist_zarr.convert import convert, list_images
from mist_zarr.converters.base import ConversionError
from mist_zarr.converters.image import read_image_file
from mist_zarr.converters.nifti import read_nifti

from .conftest import DATA_DIR

SHARED_NIFTI = sorted(glob.glob(str(DATA_DIR / "nifti" / "*.nii.gz")))
NIBABEL_NIFTI = sorted(glob.glob(os.path.join(os.path.dirname(nib.__file__), "tests", "data",
                                              "*.nii*")))


def stored_voxels(img) -> np.ndarray:
    return np.asanyarray(img.dataobj.get_unscaled())


@pytest.mark.parametrize("path", SHARED_NIFTI + NIBABEL_NIFTI, ids=os.path.basename)
def test_nifti_converts_bit_exact_or_is_refused_with_reason(tmp_path, path):
    img = nib.load(path)
    try:
        source = read_nifti(path)
    except ConversionError as exc:
        assert os.path.basename(path) in str(exc)
        return
    report = convert(path, tmp_path / "ds")
    if not report.ok:
        (problem,) = report.failed
        assert img.get_data_dtype().kind == "f" and "losslessly" in problem.reason
        return
    (result,) = report.converted
    back = mist_zarr.read_image(tmp_path / "ds" / result.path)
    expected = stored_voxels(img)
    while expected.ndim < 3:
        expected = expected[..., None]
    np.testing.assert_array_equal(back, expected.T)
    assert back.dtype == expected.dtype.newbyteorder("=")
    _, info = mist_zarr.open_image(tmp_path / "ds" / result.path)
    np.testing.assert_array_equal(info.affine, img.affine)
    assert info.source_format == "nifti"
    meta = info.metadata["nifti"]
    assert meta["sform_code"] == int(img.header["sform_code"])
    assert meta["qform_code"] == int(img.header["qform_code"])
    assert meta["descrip"] == img.header["descrip"].tobytes().rstrip(b"\0").decode("latin-1")
    assert meta["units"]["space"] == img.header.get_xyzt_units()[0]
    assert source.spacing == tuple(float(z) for z in img.header.get_zooms()[: back.ndim])[::-1]


def test_nifti_scaling_is_kept_not_applied(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) * 7
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.6, 0.7, 1])), tmp_path / "s.nii")
    # nibabel resets scaling on save for integer data: patch the header in place
    raw = bytearray((tmp_path / "s.nii").read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw)))
    hdr.set_slope_inter(0.25, -10)
    hdr["descrip"] = b"scaled test"
    raw[:348] = hdr.binaryblock
    (tmp_path / "s.nii").write_bytes(bytes(raw))
    report = convert(tmp_path / "s.nii", tmp_path / "ds")
    assert report.ok
    _, info = mist_zarr.open_image(tmp_path / "ds" / "s")
    np.testing.assert_array_equal(mist_zarr.read_image(tmp_path / "ds" / "s"), data.T)
    assert info.metadata["nifti"]["scl_slope"] == 0.25 and info.metadata["nifti"]["scl_inter"] == -10
    assert info.metadata["nifti"]["descrip"] == "scaled test"


def test_fractional_float_nifti_is_refused_unless_quantised(tmp_path):
    data = np.random.default_rng(0).normal(size=(20, 30, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "f.nii.gz")
    report = convert(tmp_path / "f.nii.gz", tmp_path / "ds")
    assert not report.ok and "fractional" in report.failed[0].reason
    assert "f.nii.gz" in report.failed[0].source
    report = convert(tmp_path / "f.nii.gz", tmp_path / "ds", quantize="int16")
    assert report.ok
    _, info = mist_zarr.open_image(tmp_path / "ds" / "f")
    assert info.values.kind == "quantized" and info.values.max_error > 0


def write_png(path, a, mode=None):
    Image.fromarray(a, mode=mode).save(path)


@pytest.mark.parametrize("kind", ["L8", "L16", "LA", "RGB", "RGBA", "RGBA-opaque", "grey-RGB"])
def test_png_modes(tmp_path, kind):
    rng = np.random.default_rng(1)
    g8 = rng.integers(0, 256, (70, 90), dtype=np.uint8)
    a = {
        "L8": g8,
        "L16": rng.integers(0, 65536, (70, 90), dtype=np.uint16),
        "LA": np.stack([g8, rng.integers(0, 256, g8.shape, dtype=np.uint8)], -1),
        "RGB": rng.integers(0, 256, (70, 90, 3), dtype=np.uint8),
        "RGBA": rng.integers(0, 256, (70, 90, 4), dtype=np.uint8),
        "RGBA-opaque": np.concatenate([rng.integers(0, 256, (70, 90, 3), dtype=np.uint8),
                                       np.full((70, 90, 1), 255, np.uint8)], -1),
        "grey-RGB": np.stack([g8] * 3, -1),
    }[kind]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "img.png").write_bytes(imagecodecs.png_encode(a))
    report = convert(tmp_path / "in", tmp_path / "ds")
    assert report.ok, report.summary()
    back = mist_zarr.read_image(tmp_path / "ds" / "img")
    _, info = mist_zarr.open_image(tmp_path / "ds" / "img")
    restore = info.metadata["png"]["restore"]
    rebuilt = back
    if restore.get("grey_as_rgb"):
        rebuilt = np.stack([back] * 3, -1)
    if restore.get("grey_alpha_as_rgba"):
        rebuilt = back[..., [0, 3]]
    if restore.get("alpha") == "opaque":
        rebuilt = np.concatenate([rebuilt, np.full(rebuilt.shape[:2] + (1,), 255, a.dtype)], -1)
    np.testing.assert_array_equal(rebuilt, a)
    assert info.source_format == "png" and info.metadata["lossy_source"] is False


def test_shared_chest_pngs(tmp_path):
    pngs = sorted((DATA_DIR / "radiographs" / "nih-cxr14-png").glob("*.png"))
    if not pngs:
        pytest.skip("shared CXR PNGs not available")
    report = convert(pngs[0].parent, tmp_path / "ds")
    assert report.ok and len(report.converted) == len(pngs)
    for png, row in zip(pngs, list_images(tmp_path / "ds")):
        a = np.asarray(Image.open(png))
        back = mist_zarr.read_image(tmp_path / "ds" / row["path"])
        if a.ndim == 3:  # the RGBA one: grey stored once, opaque alpha dropped, both recorded
            assert (a[..., 3] == 255).all()
            a = a[..., 0]
        np.testing.assert_array_equal(back, a)
        assert row["shape"] == [1024, 1024] and row["source_format"] == "png"


def test_jpeg_is_flagged_lossy_source(tmp_path):
    a = np.random.default_rng(2).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    (tmp_path / "x.jpg").write_bytes(imagecodecs.jpeg8_encode(a, level=90))
    report = convert(tmp_path / "x.jpg", tmp_path / "ds")
    assert report.ok
    _, info = mist_zarr.open_image(tmp_path / "ds" / "x")
    assert info.metadata["lossy_source"] is True and info.source_format == "jpeg"
    np.testing.assert_array_equal(mist_zarr.read_image(tmp_path / "ds" / "x"),
                                  imagecodecs.jpeg8_decode((tmp_path / "x.jpg").read_bytes()))


def test_multipage_tiff_becomes_a_stack(tmp_path):
    import tifffile

    a = np.random.default_rng(3).integers(0, 4096, (5, 60, 70), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", a, compression="zlib", description="five pages")
    report = convert(tmp_path / "stack.tif", tmp_path / "ds")
    assert report.ok
    _, info = mist_zarr.open_image(tmp_path / "ds" / "stack")
    assert info.dims == ("z", "y", "x") and info.metadata["tiff"]["pages"] == 5
    np.testing.assert_array_equal(mist_zarr.read_image(tmp_path / "ds" / "stack"), a)


def test_format_is_sniffed_from_content_not_extension(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(SHARED_NIFTI[0] if SHARED_NIFTI else NIBABEL_NIFTI[1], src / "volume.dat")
    (src / "image.bin").write_bytes(imagecodecs.png_encode(np.eye(40, dtype=np.uint8) * 200))
    (src / "notes.nii.gz").write_text("not really a NIfTI")
    report = convert(src, tmp_path / "ds")
    formats = sorted(r.source_format for r in report.converted)
    assert formats == ["nifti", "png"]
    assert [p.source for p in report.skipped] == [str(src / "notes.nii.gz")]


def test_absurd_header_sizes_are_refused_before_reading(tmp_path):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 30000, 3000))
    hdr.set_data_dtype(np.int16)
    with open(tmp_path / "huge.nii", "wb") as f:
        f.write(hdr.binaryblock + b"\0" * 4 + b"\0" * 100)
    report = convert(tmp_path / "huge.nii", tmp_path / "ds", max_bytes=1 << 30)
    assert not report.ok and "above the limit" in report.failed[0].reason


def test_png_reader_refuses_a_truncated_file(tmp_path):
    data = imagecodecs.png_encode(np.zeros((50, 50), np.uint8))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="cut.png"):
        read_image_file(tmp_path / "cut.png")
