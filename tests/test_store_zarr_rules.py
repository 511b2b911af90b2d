"""zarr's own store test suite, adapted to the keys a MultiscaleStore serves.

zarr's ``StoreTests`` writes arbitrary keys and reads them back. The virtual
store is read-only and serves a fixed key set: metadata documents, level-0
chunks (the physical chunk files) and level-k chunks (their indexed
prefixes). The tests that write are kept as "writing raises zarr's read-only
error"; the tests that read run over served keys, with the expected bytes
taken from the physical chunk files and the prefix index, not from the store.
"""

from __future__ import annotations

import asyncio
import pickle

import numpy as np
import pytest
import zarr
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.core.sync import _collect_aiterator, sync
from zarr.storage._utils import _normalize_byte_range_index
from zarr.testing.store import StoreTests
from zarr.testing.utils import assert_bytes_equal

from mist_zarr import MultiscaleStore
from mist_zarr.format import INDEX

READ_ONLY = "store was opened in read-only mode and does not support writing"
RANGES = [None, RangeByteRequest(1, 4), OffsetByteRequest(1), SuffixByteRequest(1),
          RangeByteRequest(10, 20), RangeByteRequest(0, 10**9)]


def chunk_keys(levels: int) -> list[str]:
    """Level-0, a middle level and the coarsest level of present chunks."""
    return ["s0/image/c/1/0/0", "s2/image/c/4/0/0", f"s{levels}/image/c/0/0/0"]


def served(path, key: str) -> bytes:
    """A chunk key's bytes from the physical file, cut where the index says."""
    level, _, _, *coords = key.split("/")
    raw = (path / "image" / "c").joinpath(*coords).read_bytes()
    index = zarr.open_array(path / INDEX, mode="r")[...]
    prefix = int(index[tuple(int(c) for c in coords) + (int(level[1:]),)])
    assert prefix <= len(raw)
    return raw[:prefix]


class TestMultiscaleStoreWithZarrsSuite(StoreTests[MultiscaleStore, cpu.Buffer]):
    store_cls = MultiscaleStore
    buffer_cls = cpu.Buffer

    @pytest.fixture
    def store_kwargs(self, written):
        return {"source": written[0]}

    @pytest.fixture
    def keys(self, written):
        return chunk_keys(written[2].levels)

    async def set(self, store, key, value):
        raise AssertionError(f"the virtual store is read-only: no test may write {key!r}")

    async def get(self, store, key):
        # (on a thread: zarr's synchronous API cannot run inside zarr's event loop)
        return self.buffer_cls.from_bytes(await asyncio.to_thread(served, store.source, key))

    def test_store_repr(self, store):
        assert repr(store) == f"MultiscaleStore({store.source!r})"

    def test_store_supports_writes(self, store):
        assert not store.supports_writes and not store.supports_deletes

    def test_store_supports_listing(self, store):
        assert store.supports_listing

    def test_store_read_only(self, store):
        assert store.read_only
        with pytest.raises(AttributeError):
            store.read_only = False

    @pytest.mark.parametrize("read_only", [True, False])
    async def test_store_open_read_only(self, open_kwargs, read_only):
        open_kwargs["read_only"] = read_only
        if not read_only:
            with pytest.raises(ValueError, match="read-only"):
                await self.store_cls.open(**open_kwargs)
            return
        store = await self.store_cls.open(**open_kwargs)
        assert store._is_open and store.read_only

    async def test_serializable_store(self, store, keys):
        clone = pickle.loads(pickle.dumps(store))
        assert clone == store and clone.read_only == store.read_only
        for key in keys:
            got = await clone.get(key, prototype=default_buffer_prototype())
            assert_bytes_equal(got, await self.get(store, key))

    @pytest.mark.parametrize("byte_range", RANGES)
    async def test_get(self, store, keys, byte_range):
        for key in keys:
            whole = await self.get(store, key)
            start, stop = _normalize_byte_range_index(whole, byte_range=byte_range)
            got = await store.get(key, prototype=default_buffer_prototype(), byte_range=byte_range)
            assert_bytes_equal(got, whole[start:stop])

    async def test_get_not_open(self, store_not_open, keys):
        assert not store_not_open._is_open
        got = await store_not_open.get(keys[1], prototype=default_buffer_prototype())
        assert_bytes_equal(got, await self.get(store_not_open, keys[1]))

    async def test_get_raises(self, store, keys):
        for key in keys + ["zarr.json"]:
            with pytest.raises((ValueError, TypeError), match=r"Unexpected byte_range, got.*"):
                await store.get(key, prototype=default_buffer_prototype(), byte_range=(0, 2))

    async def test_get_many(self, store, keys):
        proto = default_buffer_prototype()
        got = await _collect_aiterator(store._get_many((k, proto, None) for k in keys))
        expected = [(k, (await self.get(store, k)).to_bytes()) for k in keys]
        assert sorted((k, b.to_bytes()) for k, b in got) == sorted(expected)

    async def test_getsize(self, store, keys):
        for key in keys:
            assert await store.getsize(key) == len(await self.get(store, key))
        doc = await store.get("s1/image/zarr.json", prototype=default_buffer_prototype())
        assert await store.getsize("s1/image/zarr.json") == len(doc)

    async def test_getsize_prefix(self, store, written):
        path, _, info = written
        index = zarr.open_array(path / INDEX, mode="r")[...]
        doc = await store.get("s1/image/zarr.json", prototype=default_buffer_prototype())
        assert await store.getsize_prefix("s1/image") == len(doc) + int(index[..., 1].sum())

    @pytest.mark.parametrize("key", ["zarr.json", "s0/image/c/1/0/0", "foo"])
    async def test_set(self, store, key):
        with pytest.raises(ValueError, match=READ_ONLY):
            await store.set(key, self.buffer_cls.from_bytes(b"\x01"))

    async def test_set_not_open(self, store_not_open):
        with pytest.raises(ValueError, match=READ_ONLY):
            await store_not_open.set("c/0", self.buffer_cls.from_bytes(b"\x01"))

    async def test_set_many(self, store):
        with pytest.raises(ValueError, match=READ_ONLY):
            await store._set_many([("zarr.json", self.buffer_cls.from_bytes(b"{}"))])

    async def test_set_if_not_exists(self, store):
        with pytest.raises(ValueError, match=READ_ONLY):
            await store.set_if_not_exists("k", self.buffer_cls.from_bytes(b"0"))

    @pytest.mark.parametrize("ranges", [
        [], [("zarr.json", RangeByteRequest(0, 2))],
        [("s0/image/c/1/0/0", RangeByteRequest(0, 2)), ("s1/image/zarr.json", None)],
        [("s0/image/c/0/0/0", RangeByteRequest(0, 2)), ("s1/image/c/1/0/0", SuffixByteRequest(2)),
         ("s2/image/c/2/0/0", OffsetByteRequest(2))],
    ])
    async def test_get_partial_values(self, store, ranges):
        proto = default_buffer_prototype()
        got = await store.get_partial_values(proto, (kr for kr in ranges))
        assert len(got) == len(ranges)
        for buf, (key, byte_range) in zip(got, ranges):
            whole = await store.get(key, proto)
            start, stop = _normalize_byte_range_index(whole, byte_range=byte_range)
            assert_bytes_equal(buf, whole[start:stop])
            if "/c/" in key:
                assert_bytes_equal(whole, await self.get(store, key))

    async def test_exists(self, store, keys):
        for key in keys + ["zarr.json", "s1/zarr.json", "s1/image/zarr.json", "s1/x/c/0"]:
            assert await store.exists(key)
        for key in ["foo", "s1/image/c/3/0/0", "s1/image/c/99/0/0", "s9/zarr.json"]:
            assert not await store.exists(key)

    async def test_is_empty(self, store):
        assert not await store.is_empty("")
        assert not await store.is_empty("s0")
        assert not await store.is_empty("s0/")
        assert await store.is_empty("s")  # a key prefix, not a directory
        assert await store.is_empty("spam/")

    async def test_clear(self, store):
        with pytest.raises((NotImplementedError, ValueError)):
            await store.clear()
        assert not await store.is_empty("")

    def expected_keys(self, written) -> list[str]:
        path, _, info = written
        index = zarr.open_array(path / INDEX, mode="r")[...]
        meta = ["zarr.json"]
        for k in range(info.levels + 1):
            meta += [f"s{k}/zarr.json", f"s{k}/image/zarr.json"]
            meta += [f"s{k}/{d}/{n}" for d in "zyx" for n in ("zarr.json", "c/0")]
        chunks = [f"s{k}/image/c/{z}/0/0" for k in range(info.levels + 1)
                  for z in range(index.shape[0]) if index[z, 0, 0, k]]
        return sorted(meta + chunks)

    async def test_list(self, store, written):
        assert sorted(await _collect_aiterator(store.list())) == self.expected_keys(written)

    async def test_list_prefix(self, store, written):
        expected = self.expected_keys(written)
        for prefix in ("", "s1/", "s1/image/", "s1/image/c/", "s2/x/"):
            got = sorted(await _collect_aiterator(store.list_prefix(prefix)))
            assert got == [k for k in expected if k.startswith(prefix)]

    async def test_list_empty_path(self, store, written):
        assert sorted(await _collect_aiterator(store.list_prefix(""))) == self.expected_keys(written)

    async def test_list_dir(self, store, written):
        levels = written[2].levels
        assert sorted(await _collect_aiterator(store.list_dir(""))) == sorted(
            ["zarr.json"] + [f"s{k}" for k in range(levels + 1)])
        for root in ("s1", "s1/"):
            got = sorted(await _collect_aiterator(store.list_dir(root)))
            assert got == ["image", "x", "y", "z", "zarr.json"]
        assert sorted(await _collect_aiterator(store.list_dir("s1/image/c"))) == ["0", "1", "2",
                                                                                  "4", "5"]

    def test_get_sync(self, store, keys):
        for key in keys:
            assert_bytes_equal(store.get_sync(key), sync(self.get(store, key)))

    def test_set_sync(self, store):
        with pytest.raises(ValueError, match=READ_ONLY):
            store.set_sync("sync_set", self.buffer_cls.from_bytes(b"\x01"))

    @pytest.mark.parametrize("direction", ["async_then_sync", "sync_then_async"])
    async def test_sync_async_set_get_parity(self, store, keys, direction):
        proto = default_buffer_prototype()
        for key in keys + ["zarr.json", "s1/image/c/3/0/0", "nonexistent"]:
            if direction == "async_then_sync":
                got_async = await store.get(key, proto)
                got_sync = store.get_sync(key)
            else:
                got_sync = store.get_sync(key)
                got_async = await store.get(key, proto)
            assert (got_sync is None) == (got_async is None)
            if got_sync is not None:
                assert_bytes_equal(got_sync, got_async)

    @pytest.mark.parametrize("byte_range", RANGES)
    async def test_get_sync_byte_range_parity(self, store, keys, byte_range):
        for key in keys + ["s1/image/zarr.json"]:
            got_async = await store.get(key, default_buffer_prototype(), byte_range=byte_range)
            assert_bytes_equal(store.get_sync(key, byte_range=byte_range), got_async)


def test_virtual_levels_read_the_same_through_the_suite_keys(written):
    """The keys the suite reads are the ones zarr reads for the arrays."""
    path, vol, info = written
    store = MultiscaleStore(path)
    level0 = zarr.open_array(store, path="s0/image", mode="r")
    np.testing.assert_array_equal(level0[...], vol)
    assert set(chunk_keys(info.levels)) <= set(sync(_collect_aiterator(store.list())))
