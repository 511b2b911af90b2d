"""End to end: a real HTTP server on 127.0.0.1, a real CT, level 2 read over the network."""

from __future__ import annotations

import numpy as np
import zarr

import mist_zarr
from mist_zarr.serve import serve_in_thread


def test_level2_over_http_transfers_only_the_level2_prefixes(tmp_path, ct_volume):
    mist_zarr.write_image(tmp_path / "ct.zarr", ct_volume, spacing=(2.5, 0.78, 0.78))
    local = mist_zarr.open(tmp_path / "ct.zarr", scale=2).values
    index = zarr.open_array(tmp_path / "ct.zarr" / "index", mode="r")[...]
    with serve_in_thread(tmp_path) as server:
        url = f"{server.url}/ct.zarr"
        remote = mist_zarr.open(url, scale=2)
        assert remote.shape == (41, 128, 128)
        np.testing.assert_array_equal(remote.values, local)
        records = server.requests
        sent = server.bytes_sent
    metadata = sum((tmp_path / "ct.zarr" / p).stat().st_size
                   for p in ("zarr.json", "index/zarr.json", "index/c/0/0/0/0"))
    prefixes = int(index[..., 2].sum()) + 2 * int((index[..., 0] > 0).sum())
    assert sent == metadata + prefixes, records
    chunk_requests = [r for r in records if "/image/c/" in r.path]
    assert len(chunk_requests) == ct_volume.shape[0]
    assert all(r.status == 206 for r in chunk_requests)
    full = int(index[..., 0].sum())
    assert sent < 0.2 * full  # level 2 of 512x512 CT is ~10% of the stored bytes


def test_full_resolution_over_http_is_bit_exact(tmp_path):
    a = np.random.default_rng(11).integers(0, 65535, (2, 300, 200), dtype=np.uint16)
    mist_zarr.write_image(tmp_path / "a.zarr", a)
    with serve_in_thread(tmp_path) as server:
        np.testing.assert_array_equal(mist_zarr.open(f"{server.url}/a.zarr").values, a)
        attrs = zarr.open_group(f"{server.url}/a.zarr", mode="r").attrs["mist"]
        assert attrs["shape"] == [2, 300, 200] and attrs["complete"] is True
