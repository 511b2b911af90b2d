"""MultiscaleStore: every level as a virtual Zarr array, read through exact prefixes."""

from __future__ import annotations

import pickle
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import imagecodecs
import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.storage import LocalStore

import mist_zarr
from mist_zarr import MultiscaleStore, PrefixError
from mist_zarr.format import INDEX
from mist_zarr.layout import encode_kwargs


class RecordingStore(LocalStore):
    """A real LocalStore that records each read (key, byte range)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads: list[tuple[str, object]] = []
        self._rec_lock = threading.Lock()

    async def get(self, key, prototype, byte_range=None):
        with self._rec_lock:
            self.reads.append((key, byte_range))
        return await super().get(key, prototype, byte_range)


def expected_level(vol, levels, k):
    return np.stack([imagecodecs.htj2k_decode(imagecodecs.htj2k_encode(p, **encode_kwargs(levels)),
                                              skipres=k) if p.any() else
                     np.zeros([-(-s // 2**k) for s in p.shape], p.dtype) for p in vol])


def test_every_level_equals_decoding_the_full_chunk_at_that_level(written):
    path, vol, info = written
    store = MultiscaleStore(path)
    assert info.levels == 3
    for k in range(info.levels + 1):
        arr = zarr.open_array(store, path=f"s{k}/image", mode="r")
        assert arr.shape == info.level_shape(k) == (6,) + tuple(-(-s // 2**k) for s in vol.shape[1:])
        assert arr.chunks == (1,) + arr.shape[1:]
        np.testing.assert_array_equal(arr[...], expected_level(vol, info.levels, k))


def test_level_chunk_read_is_one_ranged_request_for_the_indexed_prefix(written):
    path, vol, info = written
    physical = RecordingStore(path, read_only=True)
    store = MultiscaleStore(physical)
    index = zarr.open_array(path / INDEX, mode="r")[...]
    zarr.open_array(store, path="s2/image", mode="r")[...]
    chunk_reads = [(k, r) for k, r in physical.reads if k.startswith("image/c/")]
    present = [z for z in range(vol.shape[0]) if index[z, 0, 0, 0]]
    assert sorted(k for k, _ in chunk_reads) == sorted(f"image/c/{z}/0/0" for z in present)
    for key, rng in chunk_reads:
        z = int(key.split("/")[2])
        assert (rng.start, rng.end) == (0, int(index[z, 0, 0, 2]) + 2)
    # the index is read once, and nothing else of the physical store
    others = {k for k, _ in physical.reads if not k.startswith("image/c/")}
    assert others == {"zarr.json", "index/zarr.json", "index/c/0/0/0/0"}
    assert sum(1 for k, _ in physical.reads if k == "index/c/0/0/0/0") == 1


def test_level0_passes_through_and_absent_chunks_read_as_none(written):
    path, vol, info = written
    physical = RecordingStore(path, read_only=True)
    store = MultiscaleStore(physical)
    np.testing.assert_array_equal(zarr.open_array(store, path="s0/image", mode="r")[...], vol)
    assert all(r is None for k, r in physical.reads if k.startswith("image/c/"))
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    proto = default_buffer_prototype()
    assert sync(store.get("s1/image/c/3/0/0", proto)) is None
    assert sync(store.get("s1/image/c/99/0/0", proto)) is None
    assert sync(store.get("s9/image/c/0/0/0", proto)) is None
    assert not sync(store.exists("s1/image/c/3/0/0"))
    assert sync(store.exists("s1/image/c/2/0/0"))


def test_wrong_index_raises_naming_the_chunk(written):
    path, vol, info = written
    index = zarr.open_array(path / INDEX, mode="r+")
    bad = index[...]
    bad[2, 0, 0, 1] -= 1  # one byte short of the level-1 prefix
    index[...] = bad
    store = MultiscaleStore(path)
    arr = zarr.open_array(store, path="s1/image", mode="r")
    np.testing.assert_array_equal(arr[1], expected_level(vol[1:2], info.levels, 1)[0])
    with pytest.raises(PrefixError, match=r"s1/image/c/2/0/0.*tile-part boundary"):
        arr[2]


def test_missing_physical_chunk_is_an_error_not_a_blank(written):
    path, vol, info = written
    (path / "image" / "c" / "4" / "0" / "0").unlink()
    arr = zarr.open_array(MultiscaleStore(path), path="s2/image", mode="r")
    with pytest.raises(PrefixError, match="s2/image/c/4/0/0.*missing"):
        arr[4]


def test_listing_and_read_only(written):
    path, vol, info = written
    store = MultiscaleStore(path)
    group = zarr.open_group(store, mode="r")
    assert sorted(group.group_keys()) == [f"s{k}" for k in range(info.levels + 1)]
    assert sorted(group["s1"].array_keys()) == ["image", "x", "y", "z"]
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    with pytest.raises(ValueError, match="read-only"):
        sync(store.set("zarr.json", default_buffer_prototype().buffer.from_bytes(b"{}")))
    keys = sync(_collect(store.list_prefix("s1/image/c/")))
    assert len(keys) == vol.shape[0] - 1


async def _collect(it):
    return [k async for k in it]


def test_store_pickles_and_compares_equal(written):
    path, _, _ = written
    store = MultiscaleStore(path)
    _ = store.info
    clone = pickle.loads(pickle.dumps(store))
    assert clone == store and clone is not store
    assert clone.info.shape == store.info.shape
    assert MultiscaleStore(path) != MultiscaleStore(path.parent)


def test_concurrent_first_reads_load_the_index_once(written):
    path, vol, info = written
    physical = RecordingStore(path, read_only=True)
    store = MultiscaleStore(physical)
    arr = zarr.open_array(MultiscaleStore(path), path="s1/image", mode="r")
    ref = arr[...]

    def read(z):
        return zarr.open_array(store, path="s1/image", mode="r")[z]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(read, range(vol.shape[0])))
    np.testing.assert_array_equal(np.stack(got), ref)
    assert sum(1 for k, _ in physical.reads if k == "index/c/0/0/0/0") == 1


def test_ome_ngff_metadata_validates(written):
    from ome_zarr_models.v05 import Image

    path, vol, info = written
    image = Image.from_zarr(zarr.open_group(MultiscaleStore(path), mode="r"))
    ms = image.ome_attributes.multiscales[0]
    assert [a.name for a in ms.axes] == ["z", "y", "x"]
    assert all(a.unit == "millimeter" for a in ms.axes)
    for k, ds in enumerate(ms.datasets):
        scale, translation = ds.coordinateTransformations
        assert ds.path == f"s{k}/image"
        assert list(scale.scale) == [3.0, 0.8 * 2**k, 0.8 * 2**k]
        assert list(translation.translation) == [0.0, 0.0, 0.0]


def test_xarray_opens_each_level_with_mm_coordinates(written):
    path, vol, info = written
    for k in range(info.levels + 1):
        ds = xr.open_zarr(MultiscaleStore(path), group=f"s{k}", consolidated=False)
        assert ds["image"].dims == ("z", "y", "x")
        np.testing.assert_allclose(ds["x"].values, np.arange(ds.sizes["x"]) * 0.8 * 2**k)
        np.testing.assert_allclose(ds["z"].values, np.arange(6) * 3.0)
        assert ds["x"].attrs["units"] == "mm"


def test_geometry_phantom_features_keep_their_world_positions(tmp_path):
    """Level-k sample j lies on level-0 pixel j * 2**k: blobs stay at their world positions."""
    shape = (512, 640)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    centres = [(100, 200), (301, 97), (420, 555), (256, 320)]  # (row, col) in level-0 pixels
    image = np.full(shape, 100.0)
    for cy, cx in centres:
        image += 2000 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 9.0**2))
    image = np.rint(image).astype(np.uint16)
    affine = np.array([[-0.6, 0, 0, 180.0], [0, -0.6, 0, 140.0], [0, 0, 1.5, -40.0], [0, 0, 0, 1]])
    info = mist_zarr.write_image(tmp_path / "g.zarr", image, spacing=(0.6, 0.6), affine=affine)
    assert info.levels == 3
    for k in range(info.levels + 1):
        level = mist_zarr.open(tmp_path / "g.zarr", scale=k)
        a = level.values.astype(np.float64) - 100
        A = level.attrs["affine"]
        np.testing.assert_allclose(A[:3, 3], affine[:3, 3])  # origin unchanged
        for cy, cx in centres:
            r = 24 // 2**k
            jy, jx = round(cy / 2**k), round(cx / 2**k)
            win = a[max(jy - r, 0) : jy + r + 1, max(jx - r, 0) : jx + r + 1].clip(min=0)
            gy, gx = np.mgrid[max(jy - r, 0) : jy + r + 1, max(jx - r, 0) : jx + r + 1]
            my, mx = (win * gy).sum() / win.sum(), (win * gx).sum() / win.sum()
            world = A @ [mx, my, 0, 1]
            truth = affine @ [cx, cy, 0, 1]
            # an averaging pyramid would be off by (2**k - 1) / 2 level-0 pixels
            assert np.abs(world[:3] - truth[:3]).max() < 0.1 * 0.6, (k, (cy, cx), world, truth)
            assert abs(float(level["x"][0]) - 0.0) < 1e-12
            np.testing.assert_allclose(float(level["x"][1]), 0.6 * 2**k)


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_store_over_fsspec_urls(tmp_path, phantom, scheme):
    url = f"file://{tmp_path}/u.zarr" if scheme == "file" else f"memory://mist-{id(tmp_path)}/u.zarr"
    mist_zarr.write_image(url, phantom)
    store = MultiscaleStore(url)
    np.testing.assert_array_equal(zarr.open_array(store, path="s0/image", mode="r")[...], phantom)
    assert mist_zarr.open(url, scale=2).shape == (6, 75, 65)
    assert pickle.loads(pickle.dumps(store)) == store


def test_store_over_an_obstore_object_store(tmp_path, phantom):
    obstore = pytest.importorskip("obstore")
    from zarr.storage import ObjectStore

    mist_zarr.write_image(ObjectStore(obstore.store.LocalStore(str(tmp_path))), phantom)
    store = MultiscaleStore(ObjectStore(obstore.store.LocalStore(str(tmp_path)), read_only=True))
    np.testing.assert_array_equal(mist_zarr.open(store).values, phantom)
    np.testing.assert_array_equal(mist_zarr.open(store, scale=1).values,
                                  mist_zarr.open(tmp_path, scale=1).values)
    assert pickle.loads(pickle.dumps(store)) == store


def test_equal_stores_hash_equal(written):
    path, _, _ = written
    a, b = MultiscaleStore(path), MultiscaleStore(f"file://{path}")
    assert a == b and hash(a) == hash(b)
    assert mist_zarr.read_index(path).shape == mist_zarr.read_index(zarr.open_group(path)).shape


def test_zarr_fused_pipeline_uses_the_same_key_map(written):
    """zarr's fused pipeline reads through get_sync: it must remap and check like get."""
    path, vol, info = written
    expected = mist_zarr.open(path, scale=2).values
    with zarr.config.set({"codec_pipeline.path": "zarr.core.codec_pipeline.FusedCodecPipeline"}):
        store = MultiscaleStore(path)
        assert store._supports_sync_io
        np.testing.assert_array_equal(zarr.open_array(store, path="s2/image", mode="r")[...],
                                      expected)
        # a damaged copy (the original's index is cached by this process)
        damaged = path.parent / "damaged.zarr"
        shutil.copytree(path, damaged)
        index = zarr.open_array(damaged / INDEX, mode="r+")
        bad = index[...]
        bad[5, 0, 0, 2] += 1
        index[...] = bad
        arr = zarr.open_array(MultiscaleStore(damaged), path="s2/image", mode="r")
        with pytest.raises(PrefixError, match="s2/image/c/5/0/0"):
            arr[...]
