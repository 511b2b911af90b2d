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


def test_bounded_loopback_load_with_hostile_requests(tmp_path):
    """400 requests from 16 clients, a third of them hostile: right answers, server stays up."""
    import http.client
    import random
    from concurrent.futures import ThreadPoolExecutor

    a = np.random.default_rng(13).integers(0, 4000, (4, 200, 200), dtype=np.uint16)
    mist_zarr.write_image(tmp_path / "a.zarr", a)
    chunk = (tmp_path / "a.zarr" / "image" / "c" / "1" / "0" / "0").read_bytes()
    (tmp_path.parent / "secret.txt").write_text("outside the root")

    def one(i):
        rnd = random.Random(i)
        kind = rnd.choice(["range", "full", "bad-range", "multi", "traversal", "huge"])
        path, headers = "/a.zarr/image/c/1/0/0", {}
        if kind == "range":
            start = rnd.randrange(len(chunk))
            headers["Range"] = f"bytes={start}-{start + rnd.randrange(5000)}"
        elif kind == "bad-range":
            headers["Range"] = rnd.choice(["bytes=x-1", "bytes=9-3", "bits=0-1", "bytes=--"])
        elif kind == "multi":
            headers["Range"] = "bytes=0-1,5-9,20-30"
        elif kind == "huge":
            headers["Range"] = f"bytes={10**15}-{10**16}"
        elif kind == "traversal":
            path = rnd.choice(["/../secret.txt", "/%2e%2e/secret.txt", "/a.zarr/../../secret.txt"])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        return kind, resp.status, body, headers.get("Range")

    with serve_in_thread(tmp_path) as server:
        port = int(server.url.rsplit(":", 1)[1])
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(400)))
        for kind, status, body, rng in results:
            assert b"outside the root" not in body
            if kind == "traversal":
                assert status in (403, 404)
            elif kind == "huge":
                assert status == 416
            elif kind == "range":
                start, end = (int(v) for v in rng[6:].split("-"))
                assert status == 206 and body == chunk[start : end + 1]
            else:  # full, malformed or multi-range: the whole object
                assert status == 200 and body == chunk
        np.testing.assert_array_equal(mist_zarr.open(f"{server.url}/a.zarr").values, a)
