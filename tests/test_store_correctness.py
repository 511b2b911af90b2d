"""The store's caches never serve a stale or foreign image, and it follows zarr's Store rules."""

from __future__ import annotations

import asyncio
import json
import pickle
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import LocalStore

import mist_zarr
from mist_zarr import MultiscaleStore
from mist_zarr.format import ATTR, INDEX


def roundtrip(obj):
    return pickle.loads(pickle.dumps(obj))


# -- stale shared index -------------------------------------------------------

def test_an_image_rewritten_at_the_same_path_is_not_read_through_the_old_index(tmp_path):
    """The issue's scenario: a long-lived worker, an image rewritten larger."""
    path = tmp_path / "img.zarr"
    mist_zarr.write_image(path, np.full((4, 128, 128), 7, np.int16))
    assert roundtrip(MultiscaleStore(path)).info.shape == (4, 128, 128)  # worker loads it
    mist_zarr.write_image(path, np.full((8, 128, 128), 9, np.int16), overwrite=True)
    array = roundtrip(zarr.open_array(MultiscaleStore(path), path="s0/image", mode="r"))
    np.testing.assert_array_equal(array[6], np.full((128, 128), 9, np.int16))
    assert roundtrip(MultiscaleStore(path)).info.shape == (8, 128, 128)


def test_a_rewrite_of_the_same_shape_gets_its_own_index(tmp_path, phantom):
    """Same shape and dtype, so zarr.json differs only in the write id; the prefix
    lengths differ, and the old index would cut every level-k chunk wrongly."""
    path = tmp_path / "img.zarr"
    mist_zarr.write_image(path, phantom)
    before = roundtrip(MultiscaleStore(path))
    np.testing.assert_array_equal(mist_zarr.open(before, scale=1).values,
                                  mist_zarr.open(path, scale=1).values)
    other = np.ascontiguousarray(phantom[::-1] // 2)
    mist_zarr.write_image(path, other, overwrite=True)
    after = roundtrip(MultiscaleStore(path))
    np.testing.assert_array_equal(mist_zarr.open(after, scale=0).values, other)
    expected = mist_zarr.open(MultiscaleStore(LocalStore(path, read_only=True)), scale=1).values
    np.testing.assert_array_equal(mist_zarr.open(after, scale=1).values, expected)


def test_images_without_a_write_id_still_read_and_are_not_shared(tmp_path):
    """Images written before the write id existed: correct, but each store loads its index."""
    path = tmp_path / "old.zarr"

    def write_old(data):
        mist_zarr.write_image(path, data, overwrite=True)
        doc = json.loads((path / "zarr.json").read_text())
        del doc["attributes"][ATTR]["write_id"]
        (path / "zarr.json").write_text(json.dumps(doc))

    write_old(np.full((2, 128, 128), 3, np.int16))
    assert roundtrip(MultiscaleStore(path)).info.write_id is None
    np.testing.assert_array_equal(mist_zarr.open(roundtrip(MultiscaleStore(path))).values, 3)
    write_old(np.full((5, 128, 128), 4, np.int16))
    store = roundtrip(MultiscaleStore(path))
    assert store.info.shape == (5, 128, 128)
    np.testing.assert_array_equal(mist_zarr.open(store).values, 4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_s3_endpoints():
    """Two moto S3 servers in their own processes (moto's state is per process),
    each with a bucket of the same name."""
    pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    servers, endpoints = [], []
    try:
        for _ in range(2):
            port = _free_port()
            servers.append(subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            endpoints.append(f"http://127.0.0.1:{port}")
        for endpoint in endpoints:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(endpoint, timeout=2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                         aws_access_key_id="test", aws_secret_access_key="test"
                         ).create_bucket(Bucket="scans")
        yield endpoints
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)


def test_s3_stores_on_different_endpoints_do_not_share_an_index(two_s3_endpoints):
    from obstore.store import S3Store
    from zarr.storage import ObjectStore

    def s3(endpoint, read_only):
        return ObjectStore(S3Store("scans", prefix="ct/img.zarr", endpoint=endpoint,
                                   client_options={"allow_http": True}, region="us-east-1",
                                   access_key_id="test", secret_access_key="test"),
                           read_only=read_only)

    for z, endpoint in zip((2, 3), two_s3_endpoints):
        mist_zarr.write_image(s3(endpoint, False), np.full((z, 128, 128), z, np.int16))
    for z, endpoint in zip((2, 3), two_s3_endpoints):
        store = roundtrip(MultiscaleStore(s3(endpoint, True)))
        assert store.info.shape == (z, 128, 128)
        np.testing.assert_array_equal(mist_zarr.open(store, scale=1).values, z)


# -- cancellation ---------------------------------------------------------------

async def test_cancelling_one_read_does_not_cancel_the_others_waiting_on_the_index(written):
    path, vol, info = written
    started, gate = asyncio.Event(), asyncio.Event()

    class SlowIndex(LocalStore):
        """A real local store whose index reads wait for the test."""

        async def get(self, key, prototype, byte_range=None):
            if key.startswith(INDEX + "/"):
                started.set()
                await gate.wait()
            return await super().get(key, prototype, byte_range)

    store = MultiscaleStore(SlowIndex(path, read_only=True))
    proto = default_buffer_prototype()
    first = asyncio.create_task(store.get("s1/image/c/0/0/0", proto))
    await asyncio.wait_for(started.wait(), 10)  # first is loading the index
    second = asyncio.create_task(store.get("s1/image/c/1/0/0", proto))
    await asyncio.sleep(0.01)  # second waits on that load
    first.cancel()
    await asyncio.sleep(0.01)
    gate.set()
    got = await asyncio.wait_for(second, 10)
    expected = (path / "image/c/1/0/0").read_bytes()[: int(store.index[1, 0, 0, 1])]
    assert got.to_bytes() == expected
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (await store.get("s1/image/c/0/0/0", proto)) is not None


# -- zarr's Store rules -------------------------------------------------------------

async def test_store_open_read_only_and_the_read_only_errors(written):
    path = written[0]
    store = await MultiscaleStore.open(path, read_only=True)
    assert store._is_open and store.read_only
    buf = default_buffer_prototype().buffer.from_bytes(b"{}")
    message = "store was opened in read-only mode and does not support writing"
    for write in (store.set("zarr.json", buf), store.delete("zarr.json")):
        with pytest.raises(ValueError, match=message):
            await write
    with pytest.raises(ValueError, match=message):
        store.set_sync("zarr.json", buf)
    with pytest.raises(ValueError, match=message):
        store.delete_sync("zarr.json")
    with pytest.raises(NotImplementedError, match="with_read_only is not implemented for"):
        store.with_read_only(False)
    again = store.with_read_only(True)
    assert again == store and again.read_only and not again._is_open
    with pytest.raises(ValueError, match="read-only"):
        MultiscaleStore(path, read_only=False)


@pytest.mark.parametrize("key", [
    "s01/image/c/1/0/0", "s1/image/c/01/0/0", "s1/image/c/00/0/0", "s1/image/c/0/00/0",
    "s1/image/c/\u0661/0/0",  # ARABIC-INDIC DIGIT ONE
    "s\u0661/image/c/1/0/0", "s1/image/c/1/0/0/", "s1/image/c/+1/0/0", "s1/image/c/1/0/0 ",
    "s1/image/c//1/0/0", "s01/zarr.json", "s1/image/c/1/0", "s1/image/c/1/0/0/0",
])
async def test_keys_that_list_never_returns_are_absent(written, key):
    path, vol, info = written
    store = MultiscaleStore(path)
    listed = [k async for k in store.list()]
    assert key not in listed and "s1/image/c/1/0/0" in listed
    assert await store.get(key, default_buffer_prototype()) is None
    assert store.get_sync(key) is None
    assert not await store.exists(key)
    with pytest.raises(FileNotFoundError):
        await store.getsize(key)


def test_every_listed_chunk_key_reads(written):
    path, vol, info = written
    store = MultiscaleStore(path)
    from zarr.core.sync import _collect_aiterator, sync

    keys = sync(_collect_aiterator(store.list_prefix("s2/image/c/")))
    assert len(keys) == vol.shape[0] - 1
    for key in keys:
        assert store.get_sync(key) is not None
