"""``xr.open_dataset(..., engine="mist")`` accepts xarray's decoding options and honours them."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

import mist_zarr
from mist_zarr import MultiscaleStore


@pytest.fixture
def quantized(tmp_path):
    rng = np.random.default_rng(3)
    field = np.cumsum(rng.normal(size=(3, 96, 80)), axis=2).astype(np.float32)
    info = mist_zarr.write_image(tmp_path / "q.zarr", field, quantize="uint16")
    assert info.values.kind == "quantized"
    return tmp_path / "q.zarr", field, info


OPTIONS = [{"mask_and_scale": True}, {"decode_times": False}, {"decode_times": True},
           {"decode_coords": "all"}, {"decode_coords": False}, {"use_cftime": False},
           {"decode_timedelta": False}, {"concat_characters": True}, {"decode_cf": True}]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_decoding_options_are_accepted_and_decode_the_values(quantized, options):
    path, field, info = quantized
    ds = xr.open_dataset(path, engine="mist", scale=1, **options)
    expected = mist_zarr.open(path, scale=1)
    assert ds["image"].dtype == np.float32
    np.testing.assert_array_equal(ds["image"].values, expected.values)
    np.testing.assert_array_equal(ds["x"].values, expected["x"].values)


@pytest.mark.parametrize("options", [{"decode_cf": False}, {"mask_and_scale": False}])
def test_undecoded_reads_return_the_stored_samples(quantized, options):
    path, field, info = quantized
    ds = xr.open_dataset(path, engine="mist", scale=1, **options)
    stored = zarr.open_array(MultiscaleStore(path), path="s1/image", mode="r")[...]
    assert ds["image"].dtype == info.stored_dtype
    np.testing.assert_array_equal(ds["image"].values, stored)
    attrs = ds["image"].attrs
    assert attrs["level"] == 1 and attrs["scale_factor"] == info.values.scale
    decoded = ds["image"].values * attrs["scale_factor"] + attrs["add_offset"]
    np.testing.assert_allclose(decoded, mist_zarr.open(path, scale=1).values, rtol=1e-6)
    # the coordinates are physical, decoded or not
    np.testing.assert_allclose(ds["x"].values, np.arange(ds.sizes["x"]) * 2.0)


def test_decode_cf_false_on_an_integer_image_is_the_image(written):
    path, vol, info = written
    ds = xr.open_dataset(path, engine="mist", scale=0, decode_cf=False)
    np.testing.assert_array_equal(ds["image"].values, vol)
