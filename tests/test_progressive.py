"""Progressive refinement: a finer level after a coarser one costs only the new bytes."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.storage import LocalStore

import mist_zarr
from mist_zarr import ChecksumError, MultiscaleStore, PrefixError
from mist_zarr.format import INDEX
from mist_zarr.prefix_cache import PrefixCache
from mist_zarr.serve import serve_in_thread


def chunk_bytes(server) -> list[int]:
    """Body bytes of each chunk request the server answered, in order."""
    return [r.body_len for r in server.requests if "/image/c/" in r.path]


def test_refining_one_chunk_over_http_fetches_each_byte_once(written):
    path, vol, info = written
    index = zarr.open_array(path / INDEX, mode="r")[...]
    p = [int(n) for n in index[2, 0, 0]]  # prefix of chunk 2 per level; p[0] is the chunk
    with serve_in_thread(path.parent) as server:
        store = MultiscaleStore(f"{server.url}/{path.name}", cache_bytes=1 << 20)
        plain = MultiscaleStore(f"{server.url}/{path.name}")
        assert store.info.levels == 3
        server.reset_counters()
        for k in range(3, -1, -1):
            got = zarr.open_array(store, path=f"s{k}/image", mode="r")[2]
            np.testing.assert_array_equal(
                got, zarr.open_array(plain, path=f"s{k}/image", mode="r")[2])
        cached = chunk_bytes(server)[0::2]  # every other request was the plain store's
        uncached = chunk_bytes(server)[1::2]
    # coarsest: its prefix and the 2 boundary bytes; then exactly the new bytes
    assert cached == [p[3] + 2, p[2] - p[3], p[1] - p[2], p[0] - p[1] - 2]
    assert sum(cached) == p[0]
    assert uncached == [p[3] + 2, p[2] + 2, p[1] + 2, p[0]]


def test_refine_yields_every_level_coarse_to_fine_at_the_cost_of_the_finest(written):
    path, vol, info = written
    index = zarr.open_array(path / INDEX, mode="r")[...]
    with serve_in_thread(path.parent) as server:
        url = f"{server.url}/{path.name}"
        levels = []
        for image in mist_zarr.refine(url, isel={"z": 4}):
            levels.append(image)
            assert image.attrs["level"] == 3 - len(levels) + 1
            np.testing.assert_array_equal(image.values,
                                          mist_zarr.open(path, scale=image.attrs["level"])[4])
        fetched = chunk_bytes(server)
    assert [a.shape for a in levels] == [info.level_shape(k)[1:] for k in (3, 2, 1, 0)]
    np.testing.assert_array_equal(levels[-1].values, vol[4])
    assert sum(fetched) == int(index[4, 0, 0, 0])  # the chunk, once
    assert len(fetched) == 4


def test_refine_of_a_whole_volume_fetches_every_chunk_once(written):
    path, vol, info = written
    index = zarr.open_array(path / INDEX, mode="r")[...]
    with serve_in_thread(path.parent) as server:
        shapes = [a.shape for a in mist_zarr.refine(f"{server.url}/{path.name}", coarsest=2)]
        fetched = chunk_bytes(server)
    assert shapes == [info.level_shape(k) for k in (2, 1, 0)]
    assert sum(fetched) == int(index[..., 0].sum())


def test_refine_arguments_are_checked(written):
    path = written[0]
    with pytest.raises(ValueError, match="in-plane axes"):
        next(mist_zarr.refine(path, isel={"x": 3}))
    with pytest.raises(ValueError, match="finest=2, coarsest=1"):
        next(mist_zarr.refine(path, coarsest=1, finest=2))


def test_refinement_still_verifies_each_prefix(written):
    path, vol, info = written
    damaged = path.parent / "damaged.zarr"
    shutil.copytree(path, damaged)
    index = zarr.open_array(damaged / INDEX, mode="r+")
    bad = index[...]
    bad[1, 0, 0, 1] -= 1  # level 1 of chunk 1 one byte short
    index[...] = bad
    steps = mist_zarr.refine(damaged, isel={"z": 1})
    assert next(steps).attrs["level"] == 3
    assert next(steps).attrs["level"] == 2
    with pytest.raises(PrefixError, match=r"level-1 chunk \(1, 0, 0\).*tile-part boundary"):
        next(steps)
    # a chunk shorter than its index says fails at level 0 too
    data = (damaged / "image/c/2/0/0").read_bytes()
    (damaged / "image/c/2/0/0").write_bytes(data[:-5])
    # (the direct read path checks level 0 against its checksum)
    with pytest.raises(ChecksumError, match=r"chunk \(2, 0, 0\): decoded samples do not match"):
        list(mist_zarr.refine(damaged, isel={"z": 2}, coarsest=1))


class CountingStore(LocalStore):
    """A real local store that counts the bytes it returns."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fetched: dict[str, int] = {}
        self._count_lock = threading.Lock()

    def _count(self, key, buf):
        if buf is not None and key.startswith("image/c/"):
            with self._count_lock:
                self.fetched[key] = self.fetched.get(key, 0) + len(buf)
        return buf

    async def get(self, key, prototype, byte_range=None):
        return self._count(key, await super().get(key, prototype, byte_range))

    def get_sync(self, key, *, prototype=None, byte_range=None):
        return self._count(key, super().get_sync(key, prototype=prototype, byte_range=byte_range))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reads=st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0, 2, 5])), max_size=12))
def test_any_order_of_reads_returns_what_an_uncached_store_returns(written, reads):
    path, vol, info = written
    physical = CountingStore(path, read_only=True)
    store = MultiscaleStore(physical, cache_bytes=1 << 20)
    plain = MultiscaleStore(path)
    index = store.index
    for k, z in reads:
        key = f"s{k}/image/c/{z}/0/0"
        assert store.get_sync(key).to_bytes() == plain.get_sync(key).to_bytes()
    need: dict[str, int] = {}
    for k, z in reads:  # a chunk's bytes are fetched once, up to the finest level read
        n = int(index[z, 0, 0, k]) + (2 if k else 0)
        need[f"image/c/{z}/0/0"] = max(need.get(f"image/c/{z}/0/0", 0), n)
    assert physical.fetched == need


def test_the_prefix_cache_is_bounded(written):
    path, vol, info = written
    index = zarr.open_array(path / INDEX, mode="r")[...]
    budget = int(index[0, 0, 0, 0]) + 10  # room for about one whole chunk
    store = MultiscaleStore(path, cache_bytes=budget)
    expected = mist_zarr.open(path).values
    for image in mist_zarr.refine(store):
        assert store.prefix_cache.nbytes <= budget
    np.testing.assert_array_equal(image.values, expected)
    assert store.prefix_cache.nbytes <= budget


def test_prefix_cache_keeps_the_longest_prefix_and_evicts_the_oldest():
    cache = PrefixCache(10)
    cache.put("a", b"1234")
    cache.put("a", b"12")  # shorter: the longer prefix is kept
    assert cache.get("a") == b"1234"
    cache.put("b", b"567890")
    assert cache.nbytes == 10
    cache.get("a")  # a is now the most recent
    cache.put("c", b"xy")
    assert cache.get("b") == b"" and cache.get("a") == b"1234" and cache.nbytes == 6
    cache.put("d", b"x" * 11)  # larger than the whole budget: not kept
    assert cache.get("d") == b""
    with pytest.raises(ValueError, match="positive"):
        PrefixCache(0)
