"""write_image: bit-exact storage of every dtype and shape, real images, the index."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import dask.array as da
import imagecodecs
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mist_zarr
from mist_zarr.codestream import is_boundary
from mist_zarr.format import CHECKSUM, INDEX
from mist_zarr.layout import num_levels, resolutions_for

from .conftest import shared

INT_DTYPES = ["uint8", "int8", "uint16", "int16", "uint32", "int32"]


def roundtrip(tmp_path, a, **kw):
    info = mist_zarr.write_image(tmp_path / "img.zarr", a, **kw)
    back = mist_zarr.read_image(tmp_path / "img.zarr")
    assert back.dtype == a.dtype and back.shape == a.shape
    np.testing.assert_array_equal(back, a)
    return info


@pytest.mark.parametrize("dtype", INT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (1, 9), (9, 1), (65, 64), (511, 513)])
def test_integer_dtypes_and_odd_shapes_roundtrip(tmp_path, dtype, shape):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(sum(shape))
    a = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    a.flat[0], a.flat[-1] = info.min, info.max
    if a.size > 2:
        a.flat[1] = 0
    got = roundtrip(tmp_path, a)
    assert got.levels == num_levels(shape)


def test_all_zero_and_constant_images(tmp_path):
    roundtrip(tmp_path, np.zeros((70, 80), np.uint16))
    (tmp_path / "img.zarr").rename(tmp_path / "zero.zarr")
    roundtrip(tmp_path, np.full((70, 80), -5, np.int32))


def test_volume_with_empty_slices_marks_them_absent(tmp_path, phantom):
    vol = phantom.copy()
    vol[2] = 0
    info = roundtrip(tmp_path, vol)
    group, _ = mist_zarr.open_image(tmp_path / "img.zarr")
    index = mist_zarr.read_index(group)
    assert index.shape == info.grid + (info.levels + 1,)
    assert (index[2] == 0).all() and (index[[0, 1, 3]] > 0).all()
    stored = sorted(p.relative_to(tmp_path / "img.zarr" / "image" / "c").parts[0]
                    for p in (tmp_path / "img.zarr" / "image" / "c").rglob("*") if p.is_file())
    assert sorted(stored, key=int) == [str(z) for z in range(vol.shape[0]) if z != 2]


def test_4d_and_colour(tmp_path):
    rng = np.random.default_rng(3)
    a4 = rng.integers(0, 4000, (2, 3, 70, 90), dtype=np.uint16)
    info = roundtrip(tmp_path, a4)
    assert info.dims == ("t", "z", "y", "x")
    rgb = rng.integers(0, 255, (200, 150, 3), dtype=np.uint8)
    info = mist_zarr.write_image(tmp_path / "rgb.zarr", rgb, dims=("y", "x", "c"))
    np.testing.assert_array_equal(mist_zarr.read_image(tmp_path / "rgb.zarr"), rgb)
    assert info.chunks == (200, 150, 3) and info.levels == 2
    with pytest.raises(ValueError, match="colour axis must hold 3"):
        mist_zarr.write_image(tmp_path / "ga.zarr", rgb[..., :2], dims=("y", "x", "c"))


def test_tiles_for_large_planes(tmp_path):
    rng = np.random.default_rng(4)
    a = rng.integers(0, 1000, (700, 1000), dtype=np.uint16)
    info = roundtrip(tmp_path, a, tile=256, alpha=64)
    assert info.levels == 4 and info.chunks == (256, 256) and info.grid == (3, 4)
    # every tile edge is a multiple of 2**levels, so levels stay aligned
    assert info.chunks[0] % 2**info.levels == 0


def test_dask_input_is_written_block_by_block(tmp_path, phantom):
    lazy = da.from_array(phantom, chunks=(2, 100, 100))
    info = mist_zarr.write_image(tmp_path / "img.zarr", lazy, threads=2)
    np.testing.assert_array_equal(mist_zarr.read_image(tmp_path / "img.zarr"), phantom)
    assert info.chunks == (1,) + phantom.shape[1:]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_integral_floats_come_back_bit_identical(tmp_path, dtype):
    a = np.random.default_rng(5).integers(-1024, 3000, (3, 80, 90)).astype(dtype)
    info = roundtrip(tmp_path, a)
    assert info.values.kind == "cast" and info.stored_dtype == np.int16
    assert mist_zarr.read_image(tmp_path / "img.zarr").tobytes() == a.tobytes()


def test_bool_and_int64_are_narrowed_exactly(tmp_path):
    mask = np.random.default_rng(6).random((40, 50)) > 0.5
    info = roundtrip(tmp_path, mask)
    assert info.stored_dtype == np.uint8
    (tmp_path / "img.zarr").rename(tmp_path / "mask.zarr")
    big = np.array([[0, 70000], [3, 4]], np.int64)
    assert roundtrip(tmp_path, big).stored_dtype == np.uint32


@pytest.mark.parametrize("bad,reason", [
    (np.array([[0.5, 1.0]]), "fractional"),
    (np.array([[np.nan, 1.0]]), "NaN"),
    (np.array([[np.inf, 1.0]]), "NaN or infinite"),
    (np.array([[-0.0, 1.0]]), "negative zeros"),
    (np.array([[2.0**40, 1.0]]), "beyond 32-bit"),
])
def test_lossy_floats_are_refused_with_reason_and_opt_in(tmp_path, bad, reason):
    with pytest.raises(mist_zarr.LossyInputError, match=reason) as err:
        mist_zarr.write_image(tmp_path / "f.zarr", bad)
    assert "quantize=" in str(err.value)
    assert not (tmp_path / "f.zarr").exists()


def test_quantisation_is_explicit_and_recorded(tmp_path):
    a = np.random.default_rng(7).normal(0, 1, (60, 70)).astype(np.float32)
    info = mist_zarr.write_image(tmp_path / "q.zarr", a, quantize="uint16")
    back = mist_zarr.read_image(tmp_path / "q.zarr")
    assert back.dtype == np.float32
    err = float(np.abs(back.astype(np.float64) - a).max())
    assert info.values.kind == "quantized"
    assert err <= info.values.max_error * (1 + 1e-6) + 1e-7
    assert 0 < info.values.max_error <= info.values.scale / 2 * 1.01
    attrs = zarr.open_group(tmp_path / "q.zarr", mode="r").attrs["mist"]["values"]
    assert attrs["kind"] == "quantized" and attrs["max_error"] == info.values.max_error


def test_existing_store_is_not_overwritten_unless_asked(tmp_path):
    a = np.ones((8, 8), np.uint8)
    mist_zarr.write_image(tmp_path / "a.zarr", a)
    with pytest.raises(Exception, match="exist|contains"):
        mist_zarr.write_image(tmp_path / "a.zarr", a)
    mist_zarr.write_image(tmp_path / "a.zarr", a * 2, overwrite=True)
    np.testing.assert_array_equal(mist_zarr.read_image(tmp_path / "a.zarr"), a * 2)


@pytest.mark.parametrize("shape, dims", [((3, 40, 56), None), ((2, 3, 32, 32), None),
                                         ((24, 20, 3), ("y", "x", "c"))])
def test_documents_written_directly_are_what_zarr_writes(tmp_path, shape, dims):
    """The writer builds the array documents itself; zarr must read them as its own."""
    from zarr.core.buffer import default_buffer_prototype

    data = np.arange(np.prod(shape)).reshape(shape).astype(np.uint16)
    info = mist_zarr.write_image(tmp_path / "img", data, dims=dims)
    group = zarr.open_group(tmp_path / "img", mode="r")
    docs = {"zarr.json": group.metadata}
    docs.update({f"{name}/zarr.json": group[name].metadata for name in ("image", INDEX, CHECKSUM)})
    for key, metadata in docs.items():
        stored = json.loads((tmp_path / "img" / key).read_text())
        rewritten = json.loads(metadata.to_buffer_dict(default_buffer_prototype())[
            "zarr.json"].to_bytes())
        assert stored == rewritten, key
    np.testing.assert_array_equal(group["image"][...], data)  # zarr's own codec pipeline
    index = group[INDEX][...]
    assert index.shape == info.grid + (info.levels + 1,) and (index[..., 0] > 0).all()
    assert (group[CHECKSUM][...] > 0).all()
    np.testing.assert_array_equal(index, mist_zarr.read_index(group))


def test_interrupted_write_never_looks_complete(tmp_path, monkeypatch, phantom):
    import mist_zarr.writer as writer

    real = writer.prefix_lengths
    calls = {"n": 0}

    def failing(data):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated interruption")
        return real(data)

    monkeypatch.setattr(writer, "prefix_lengths", failing)
    with pytest.raises(KeyboardInterrupt):
        mist_zarr.write_image(tmp_path / "cut.zarr", phantom, threads=1)
    with pytest.raises(mist_zarr.IncompleteImageError, match="not completely written"):
        mist_zarr.read_image(tmp_path / "cut.zarr")
    with pytest.raises(mist_zarr.IncompleteImageError):
        mist_zarr.open(tmp_path / "cut.zarr")


class _DiskFullStore(zarr.storage.MemoryStore):
    """A memory store whose write of one chunk fails, as a full disk would."""

    def set_sync(self, key, value):
        if key.endswith("image/c/5/0/0"):
            raise OSError(28, "No space left on device")
        super().set_sync(key, value)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [None, (40, 64, 64)], ids=["large chunks", "small chunks"])
def test_a_failed_chunk_write_fails_the_image_and_names_the_chunk(threads, shape, phantom):
    """Large chunks go to the pools one by one, small ones in groups: either way."""
    store = _DiskFullStore()
    data = phantom if shape is None else phantom[:1, :64, :64].repeat(shape[0], axis=0)
    with pytest.raises(OSError, match="No space left") as failed:
        mist_zarr.write_image(store, data, threads=threads)
    assert any("chunk (5, 0, 0)" in note for note in failed.value.__notes__)
    with pytest.raises(mist_zarr.IncompleteImageError):
        mist_zarr.read_image(store)


def test_index_matches_codestreams_and_checksums_match_samples(tmp_path, phantom):
    import google_crc32c

    info = mist_zarr.write_image(tmp_path / "img.zarr", phantom)
    group = zarr.open_group(tmp_path / "img.zarr", mode="r")
    index, crcs = group[INDEX][...], group[CHECKSUM][...]
    for z in range(phantom.shape[0]):
        raw = (tmp_path / "img.zarr" / "image" / "c" / str(z) / "0" / "0").read_bytes()
        assert index[z, 0, 0, 0] == len(raw)
        for k in range(1, info.levels + 1):
            n = int(index[z, 0, 0, k])
            assert is_boundary(raw[n : n + 2])
            np.testing.assert_array_equal(imagecodecs.htj2k_decode(raw[:n], skipres=k),
                                          imagecodecs.htj2k_decode(raw, skipres=k))
        assert crcs[z, 0, 0] == google_crc32c.value(phantom[z].astype("<i2").tobytes())


def test_metadata_documents_geometry_and_provenance(tmp_path):
    affine = np.array([[-0.7, 0, 0, 120.0], [0, -0.7, 0, 95.5], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
    mist_zarr.write_image(tmp_path / "g.zarr", np.ones((4, 100, 100), np.int16),
                          spacing=(2.5, 0.7, 0.7), affine=affine, source_format="nifti",
                          metadata={"descrip": "x"})
    doc = json.loads((tmp_path / "g.zarr" / "zarr.json").read_text())["attributes"]["mist"]
    assert doc["format"] == "mist-zarr" and doc["format_version"] == mist_zarr.FORMAT_VERSION
    assert doc["complete"] is True and doc["source_format"] == "nifti"
    assert doc["dims"] == ["z", "y", "x"] and doc["spacing"] == [2.5, 0.7, 0.7]
    assert np.allclose(doc["affine"], affine) and doc["metadata"] == {"descrip": "x"}
    array = json.loads((tmp_path / "g.zarr" / "image" / "zarr.json").read_text())
    assert array["dimension_names"] == ["z", "y", "x"]
    codec = array["codecs"][0]
    assert codec["name"] == "imagecodecs_htj2k"
    assert codec["configuration"] | {} == {
        "reversible": True, "resolutions": resolutions_for(1), "prog_order": "RPCL",
        "block_size": [64, 64],
        "tilepart": "RESOLUTIONS", "tlm": True}


def test_level0_reads_with_only_zarr_and_imagecodecs(tmp_path, phantom):
    """A reader that never imports mist_zarr (checked) gets the samples back."""
    mist_zarr.write_image(tmp_path / "img.zarr", phantom)
    np.save(tmp_path / "expected.npy", phantom)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np, zarr, imagecodecs.zarr
        imagecodecs.zarr.register_codecs()
        a = zarr.open_array({str(tmp_path / "img.zarr")!r}, path="image", mode="r")[...]
        assert "mist_zarr" not in sys.modules, "mist_zarr was imported"
        np.testing.assert_array_equal(a, np.load({str(tmp_path / "expected.npy")!r}))
        print("ok", a.shape, a.dtype)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"ok {phantom.shape} int16"


def _dicom_pixels(path):
    import pydicom

    return pydicom.dcmread(path).pixel_array


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG3_UNCR.dcm"])
def test_real_radiographs_roundtrip(tmp_path, name):
    a = _dicom_pixels(shared("radiographs", name))
    info = roundtrip(tmp_path, a)
    assert info.levels == num_levels(a.shape) >= 4


def test_real_ct_series_roundtrips(tmp_path, ct_volume):
    info = roundtrip(tmp_path, ct_volume, spacing=(2.5, 0.7, 0.7))
    assert info.levels == 3


def test_real_mr_roundtrips(tmp_path):
    files = sorted(shared("mr", "dcm_qa_xa30", "In").rglob("*"))
    mr = next(f for f in files if f.is_file() and "T1" in str(f))
    roundtrip(tmp_path, _dicom_pixels(mr))


def test_real_chest_pngs_roundtrip(tmp_path):
    from PIL import Image

    pngs = sorted(shared("radiographs", "nih-cxr14-png").glob("*.png"))[:4]
    for i, png in enumerate(pngs):
        a = np.asarray(Image.open(png))
        dims = ("y", "x", "c") if a.ndim == 3 else None
        if a.ndim == 3 and a.shape[-1] not in (3, 4):
            continue
        mist_zarr.write_image(tmp_path / f"{i}.zarr", a, dims=dims, source_format="png")
        np.testing.assert_array_equal(mist_zarr.read_image(tmp_path / f"{i}.zarr"), a)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hnp.arrays(dtype=st.sampled_from([np.uint8, np.int16, np.uint16, np.int32]),
                  shape=hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=40)))
def test_any_integer_array_roundtrips(tmp_path_factory, a):
    path = tmp_path_factory.mktemp("h") / "img.zarr"
    mist_zarr.write_image(path, a)
    np.testing.assert_array_equal(mist_zarr.read_image(path), a)


def test_direct_read_equals_zarr_read(tmp_path):
    """read_image's direct path and zarr's own pipeline give the same samples."""
    rng = np.random.default_rng(12)
    cases = {
        "tiles": (rng.integers(0, 4000, (2, 300, 700), dtype=np.uint16), {"tile": 256}),
        "rgb": (rng.integers(0, 255, (3, 90, 70, 3), dtype=np.uint8), {"dims": ("z", "y", "x", "c")}),
        "holes": (np.pad(rng.integers(-5, 5, (2, 80, 80), dtype=np.int16), ((1, 1), (0, 0), (0, 0))), {}),
    }
    for name, (a, kw) in cases.items():
        mist_zarr.write_image(tmp_path / name, a, **kw)
        zarr_read = zarr.open_array(tmp_path / name / "image", mode="r")[...]
        np.testing.assert_array_equal(zarr_read, a)
        np.testing.assert_array_equal(mist_zarr.read_image(tmp_path / name, threads=3), a)


@pytest.mark.parametrize("missing", ["index", "checksum", "image"])
def test_a_group_without_one_of_its_arrays_names_it(tmp_path, missing):
    import shutil

    mist_zarr.write_image(tmp_path / "img", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    shutil.rmtree(tmp_path / "img" / missing)
    read = mist_zarr.read_index if missing == "index" else mist_zarr.read_image
    with pytest.raises(FileNotFoundError, match=f"no '{missing}' array"):
        read(tmp_path / "img")


_WITHOUT_OUR_ENTRY_POINTS = """
import importlib.metadata as metadata
_all = metadata.entry_points
def _others(**kw):  # as if mist-zarr's metadata had no entry points (a checkout on PYTHONPATH)
    return metadata.EntryPoints([e for e in _all(**kw) if not (e.dist and e.dist.name == "mist-zarr")])
metadata.entry_points = _others
"""


@pytest.mark.parametrize("entry_point", [True, False], ids=["installed", "missing"])
def test_the_store_layer_registers_the_codec_only_without_the_entry_point(tmp_path, phantom,
                                                                          entry_point):
    """Importing mist-zarr's storage layer does not build imagecodecs' zarr codecs where
    the entry point provides the codec (50-90 ms), and registers it where it is missing."""
    mist_zarr.write_image(tmp_path / "img.zarr", phantom)
    np.save(tmp_path / "expected.npy", phantom)
    script = tmp_path / "read.py"
    script.write_text(("" if entry_point else _WITHOUT_OUR_ENTRY_POINTS) + textwrap.dedent(f"""
        import sys
        import numpy as np
        import zarr
        import mist_zarr.storage
        loaded = "imagecodecs.zarr" in sys.modules
        samples = zarr.open_array({str(tmp_path / "img.zarr")!r}, path="image", mode="r")[...]
        assert np.array_equal(samples, np.load({str(tmp_path / "expected.npy")!r}))
        print(loaded)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(not entry_point)


@pytest.mark.parametrize("preamble", ["", "import mist_zarr"], ids=["zarr-alone", "after-import"])
def test_plain_zarr_reads_level_0_without_registering_the_codec(tmp_path, phantom, preamble):
    """mist-zarr's zarr.codecs entry point names imagecodecs' codec: zarr finds it itself."""
    mist_zarr.write_image(tmp_path / "img.zarr", phantom)
    np.save(tmp_path / "expected.npy", phantom)
    script = tmp_path / "read.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        import numpy as np
        import zarr
        {preamble}
        samples = zarr.open_array({str(tmp_path / "img.zarr")!r}, path="image", mode="r")[...]
        assert np.array_equal(samples, np.load({str(tmp_path / "expected.npy")!r}))
        print("mist_zarr.writer" in sys.modules)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"  # nothing of mist-zarr's reading path was needed
