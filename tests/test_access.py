"""mist_zarr.open, the xarray backend and dask (incl. a real LocalCluster)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

import mist_zarr
from mist_zarr import MultiscaleStore


@pytest.fixture(scope="module")
def cxr_like(tmp_path_factory):
    a = np.random.default_rng(8).integers(0, 4096, (1024, 1024), dtype=np.uint16)
    path = tmp_path_factory.mktemp("cxr") / "cxr.zarr"
    mist_zarr.write_image(path, a, spacing=(0.14, 0.14))
    return path, a


@pytest.mark.parametrize("size,below,edge", [(224, False, 256), (224, True, 128), (256, False, 256),
                                             (1000, False, 1024), (1024, False, 1024),
                                             (64, True, 64), (5000, True, 1024),
                                             (10, False, 64), (64, False, 64), (224.0, False, 256)])
def test_size_picks_the_closest_level(cxr_like, size, below, edge):
    path, _ = cxr_like
    image = mist_zarr.open(path, size=size, below=below)
    assert image.shape == (edge, edge)


@pytest.mark.parametrize("size,below", [(1025, False), (100000, False), (63, True), (10, True)])
def test_a_size_no_level_meets_is_refused_naming_the_levels(cxr_like, size, below):
    path, _ = cxr_like
    edges = "s0: 1024, s1: 512, s2: 256, s3: 128, s4: 64"
    with pytest.raises(ValueError, match=f"edge {'<=' if below else '>='} {size}.*{edges}"):
        mist_zarr.open(path, size=size, below=below)
    with pytest.raises(ValueError, match=edges):
        mist_zarr.open(path, size=size, below=below, chunks={})
    with pytest.raises(ValueError, match=edges):
        mist_zarr.read_level([path], size=size, below=below)
    info = mist_zarr.open_image(path)[1]
    assert mist_zarr.choose_level(info, size=size, below=below, clamp=True) == (4 if below else 0)


@pytest.mark.parametrize("scale", [1.5, 0.5, -1, 5, True, "2", 2 ** 40])
def test_a_scale_that_is_no_level_is_refused_naming_the_levels(cxr_like, scale):
    path, _ = cxr_like
    with pytest.raises(ValueError, match=r"one of \[0, 1, 2, 3, 4\].*found"):
        mist_zarr.open(path, scale=scale)


@pytest.mark.parametrize("scale", [2, 2.0, np.int64(2)])
def test_whole_number_scales_are_levels(cxr_like, scale):
    path, _ = cxr_like
    assert mist_zarr.open(path, scale=scale).shape == (256, 256)


@pytest.mark.parametrize("size", [0, -3, 224.5, True])
def test_a_size_that_is_no_pixel_count_is_refused(cxr_like, size):
    path, _ = cxr_like
    with pytest.raises(ValueError, match="positive whole number of pixels"):
        mist_zarr.open(path, size=size)


def test_open_returns_lazy_dataarray_with_geometry(cxr_like):
    path, a = cxr_like
    image = mist_zarr.open(path, scale=2)
    assert image.dims == ("y", "x") and image.shape == (256, 256)
    assert image.attrs["level"] == 2 and image.attrs["levels"] == 4
    assert image.attrs["spacing"] == [0.56, 0.56]
    np.testing.assert_allclose(image.attrs["affine"][:2, :2], np.diag([0.56, 0.56]))
    np.testing.assert_allclose(image["x"].values[:3], [0, 0.56, 1.12])
    lazy = mist_zarr.open(path, scale=2, chunks={})
    assert isinstance(lazy.data, da.Array)
    np.testing.assert_array_equal(lazy.values, image.values)
    np.testing.assert_array_equal(mist_zarr.open(path).values, a)
    with pytest.raises(ValueError, match=r"scale must be a level of this image, one of \[0, 1"):
        mist_zarr.open(path, scale=5)
    with pytest.raises(ValueError, match="not both"):
        mist_zarr.open(path, scale=1, size=100)


def test_float_and_quantized_levels_come_back_in_the_written_dtype(tmp_path):
    f = np.random.default_rng(9).integers(-100, 100, (130, 140)).astype(np.float32)
    mist_zarr.write_image(tmp_path / "f.zarr", f)
    assert mist_zarr.open(tmp_path / "f.zarr").values.tobytes() == f.tobytes()
    assert mist_zarr.open(tmp_path / "f.zarr", scale=1).dtype == np.float32
    q = np.random.default_rng(9).normal(size=(130, 140))
    info = mist_zarr.write_image(tmp_path / "q.zarr", q, quantize="int16")
    back = mist_zarr.open(tmp_path / "q.zarr").values
    assert back.dtype == np.float64 and np.abs(back - q).max() <= info.values.max_error + 1e-12
    # the virtual level carries CF attributes, so plain xarray decodes it too
    ds = xr.open_zarr(MultiscaleStore(tmp_path / "q.zarr"), group="s0", consolidated=False)
    assert np.abs(ds["image"].values - q).max() <= info.values.max_error * 1.001


def test_xarray_backend_entry_point(cxr_like):
    path, _ = cxr_like
    ds = xr.open_dataset(path, engine="mist", scale=3)
    assert ds["image"].shape == (128, 128)
    ds = xr.open_dataset(str(path), engine="mist", size=224, chunks={})
    assert ds["image"].shape == (256, 256) and isinstance(ds["image"].data, da.Array)
    np.testing.assert_array_equal(ds["image"].values, mist_zarr.open(path, scale=2).values)


def test_dask_from_zarr_on_a_virtual_level_under_a_process_cluster(tmp_path, phantom):
    from distributed import Client, LocalCluster

    mist_zarr.write_image(tmp_path / "v.zarr", phantom)
    store = MultiscaleStore(tmp_path / "v.zarr")
    arr = da.from_zarr(zarr.open_array(store, path="s2/image", mode="r"))
    expected = mist_zarr.open(tmp_path / "v.zarr", scale=2).values
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        total, per_slice = client.compute([arr.astype(np.int64).sum(),
                                           arr.max(axis=(1, 2))], sync=True)
    assert total == expected.astype(np.int64).sum()
    np.testing.assert_array_equal(per_slice, expected.max(axis=(1, 2)))


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16"])
def test_reduced_levels_never_wrap_around_at_sharp_edges(tmp_path, dtype):
    """Low-pass samples overshoot next to edges; they must clip, not wrap to the far end."""
    info = np.iinfo(dtype)
    lo, hi = (0, info.max * 4 // 5) if info.min == 0 else (-1000, 3000)
    a = np.full((3, 256, 256), lo, dtype)
    a[:, :, 128:] = hi
    a[1, 100:140, 60:70] = hi  # a thin bright bar: overshoot on both sides
    written = mist_zarr.write_image(tmp_path / "e.zarr", a)
    assert written.stored_dtype.kind == "i"  # signed, with headroom for the levels
    import imagecodecs

    from mist_zarr.layout import encode_kwargs

    # the reference: the same samples coded as int32 by imagecodecs, nothing can wrap there
    coded = [imagecodecs.htj2k_encode(p.astype(np.int32), **encode_kwargs(written.levels))
             for p in a]
    for k in range(1, written.levels + 1):
        level = mist_zarr.open(tmp_path / "e.zarr", scale=k).values
        truth = np.stack([imagecodecs.htj2k_decode(c, skipres=k) for c in coded])
        assert level.dtype == a.dtype
        assert truth.min() < lo  # there is an undershoot to get wrong
        np.testing.assert_array_equal(level, np.clip(truth, info.min, info.max))
        raw = zarr.open_array(MultiscaleStore(tmp_path / "e.zarr"), path=f"s{k}/image",
                              mode="r")[...]
        np.testing.assert_array_equal(raw, truth)  # the virtual array keeps the true values
