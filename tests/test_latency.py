"""Remote level reads issue their chunk requests concurrently, and boundedly.

The loopback server holds every request for a fixed delay, standing in for
network latency. A level of N chunks then takes about
ceil(N / concurrency) x delay (loopback bandwidth makes the bytes term
negligible), not N x delay as one request after another would.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import zarr

import mist_zarr
from mist_zarr import MultiscaleStore
from mist_zarr.phantom import ct_phantom
from mist_zarr.serve import serve_in_thread

DELAY = 0.05
CONCURRENCY = 8


@pytest.fixture(scope="module")
def volume_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("latency")
    vol = ct_phantom((40, 256, 256))
    mist_zarr.write_image(root / "v.zarr", vol, spacing=(2.0, 1.0, 1.0))
    return root, vol


def timed_reads(url: str, read) -> float:
    """Seconds to read the level once the store is open."""
    store = MultiscaleStore(url)
    store.info  # noqa: B018 -- opening (zarr.json, index) is not the level read
    start = time.perf_counter()
    read(store)
    return time.perf_counter() - start


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("api", ["zarr", "mist_zarr.open"])
def test_a_level_read_waits_about_chunks_over_concurrency_delays(volume_dir, k, api):
    root, vol = volume_dir
    expected = mist_zarr.open(root / "v.zarr", scale=k).values

    def read(store):
        if api == "zarr":
            got = zarr.open_array(store, path=f"s{k}/image", mode="r")[...]
        else:
            got = mist_zarr.open(store, scale=k).values
        np.testing.assert_array_equal(got, expected)

    with zarr.config.set({"async.concurrency": CONCURRENCY}), \
            serve_in_thread(root, delay=DELAY) as server:
        elapsed = timed_reads(f"{server.url}/v.zarr", read)
        chunks = [r for r in server.requests if "/image/c/" in r.path]
    n = len(chunks)
    assert n == vol.shape[0]
    serial = n * DELAY
    bound = math.ceil(n / CONCURRENCY) * DELAY
    print(f"level {k} via {api}: {n} chunks, {elapsed:.3f} s; one at a time would take "
          f"{serial:.2f} s, {CONCURRENCY} at a time {bound:.2f} s")
    assert elapsed < 0.5 * serial  # concurrent ...
    assert elapsed >= 0.9 * bound  # ... and bounded


def test_the_delay_is_per_request(volume_dir):
    root, _ = volume_dir
    import urllib.request

    with serve_in_thread(root, delay=DELAY) as server:
        start = time.perf_counter()
        for _ in range(3):
            urllib.request.urlopen(f"{server.url}/v.zarr/zarr.json").read()
        elapsed = time.perf_counter() - start
    assert 3 * DELAY <= elapsed < 3 * DELAY + 2


def test_serve_has_a_hidden_delay_flag():
    from mist_zarr.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve", ".", "--delay-ms", "20"]).delay_ms == 20
    assert parser.parse_args(["serve", "."]).delay_ms == 0
    serve = parser._subparsers._group_actions[0].choices["serve"]
    assert "--delay-ms" not in serve.format_help()
