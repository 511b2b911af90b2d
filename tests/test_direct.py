"""Direct level reads (mist_zarr.direct): the same samples as zarr over the virtual store,
verified prefixes and checksums, a bounded number of requests, batches and modality values."""

from __future__ import annotations

import multiprocessing
import shutil

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mist_zarr
from mist_zarr import ChecksumError, MultiscaleStore, PrefixError
from mist_zarr.batch import to_dask
from mist_zarr.direct import open_direct
from mist_zarr.serve import serve_in_thread

from .conftest import shared


def virtual(path, k):
    """Level k as zarr reads it through the virtual store (the reference)."""
    return zarr.open_array(MultiscaleStore(path), path=f"s{k}/image", mode="r")[...]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A real CT, a tiled image with partial edge tiles, a colour image and a 4-D series."""
    from mist_zarr.phantom import ct_phantom

    root = tmp_path_factory.mktemp("direct")
    rng = np.random.default_rng(5)
    out = {}
    out["tiled"] = root / "tiled.zarr"
    mist_zarr.write_image(out["tiled"], rng.integers(0, 4000, (300, 460), dtype=np.uint16),
                          tile=128)
    out["rgb"] = root / "rgb.zarr"
    mist_zarr.write_image(out["rgb"], rng.integers(0, 255, (130, 150, 3), dtype=np.uint8),
                          dims=("y", "x", "c"), alpha=32)
    out["4d"] = root / "4d.zarr"
    mist_zarr.write_image(out["4d"], np.stack([ct_phantom((3, 140, 130))] * 2),
                          dims=("t", "z", "y", "x"), alpha=32)
    return out


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    src = shared("ct", "CRLM-CT-1004")
    dest = tmp_path_factory.mktemp("ct") / "dataset"
    report = mist_zarr.convert(src, dest)
    assert report.ok, report.summary()
    return dest / report.converted[0].path


@pytest.mark.parametrize("name", ["tiled", "rgb", "4d"])
def test_every_level_equals_zarr_over_the_virtual_store(images, name):
    path = images[name]
    image = open_direct(path)
    for k in range(image.info.levels + 1):
        expected = virtual(path, k)
        np.testing.assert_array_equal(image.read(k), expected)
        np.testing.assert_array_equal(image.read(k, threads=1), expected)
        decoded = image.info.values.decode(expected)
        np.testing.assert_array_equal(mist_zarr.open(path, scale=k).values, decoded)


def test_real_ct_every_level_and_full_resolution(ct, ct_volume):
    for k in range(open_direct(ct).info.levels + 1):
        np.testing.assert_array_equal(mist_zarr.open(ct, scale=k).values, virtual(ct, k))
    np.testing.assert_array_equal(mist_zarr.read_image(ct), ct_volume)
    np.testing.assert_array_equal(mist_zarr.open(ct).values, ct_volume)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_selections_read_the_same_samples(images, data):
    name = data.draw(st.sampled_from(["tiled", "rgb", "4d"]))
    path = images[name]
    k = data.draw(st.integers(0, open_direct(path).info.levels))
    lazy = mist_zarr.open(path, scale=k)
    full = lazy.values
    key = []
    for n in full.shape:
        if data.draw(st.booleans()):
            key.append(data.draw(st.integers(-n, n - 1)))
        else:
            # bounds within [-n, n]: xarray's own lazy indexing (numpy-backed too) gets a
            # negative step from a start below -n wrong
            a, b = sorted(data.draw(st.lists(st.integers(-n, n + 2), min_size=2, max_size=2)))
            key.append(slice(a, b, data.draw(st.sampled_from([None, 1, 2, 3, -1]))))
    np.testing.assert_array_equal(lazy[tuple(key)].values, full[tuple(key)])


def test_a_wrong_prefix_length_is_refused_not_decoded(tmp_path, phantom):
    mist_zarr.write_image(tmp_path / "p.zarr", phantom)
    index = zarr.open_array(tmp_path / "p.zarr" / "index", mode="r+")
    good = index[...]
    bad = good.copy()
    bad[2, 0, 0, 1] -= 7  # 7 bytes short: would decode, without error, into a wrong image
    index[...] = bad
    with pytest.raises(PrefixError, match=r"level-1 chunk \(2, 0, 0\).*tile-part boundary"):
        mist_zarr.open(tmp_path / "p.zarr", scale=1).values
    index[...] = good
    chunk = tmp_path / "p.zarr" / "image" / "c" / "2" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[: int(good[2, 0, 0, 1]) - 5])  # truncated chunk
    with pytest.raises(PrefixError, match="tile-part boundary"):
        mist_zarr.read_level([tmp_path / "p.zarr"], scale=1)
    chunk.unlink()
    with pytest.raises(PrefixError, match="indexed as present but .* is missing"):
        mist_zarr.open(tmp_path / "p.zarr", scale=2).values


def test_a_swapped_chunk_fails_its_checksum(tmp_path, phantom):
    mist_zarr.write_image(tmp_path / "p.zarr", phantom)
    c = tmp_path / "p.zarr" / "image" / "c"
    shutil.copy(c / "1" / "0" / "0", c / "3" / "0" / "0")  # decodes fine, wrong slice
    with pytest.raises(ChecksumError, match=r"chunk \(3, 0, 0\)"):
        mist_zarr.read_image(tmp_path / "p.zarr")
    with pytest.raises(ChecksumError, match=r"chunk \(3, 0, 0\)"):
        mist_zarr.open(tmp_path / "p.zarr").values
    unchecked = mist_zarr.read_image(tmp_path / "p.zarr", verify=False)
    np.testing.assert_array_equal(unchecked[3], phantom[1])


def test_open_over_http_costs_metadata_and_index_and_a_selection_only_its_chunks(images):
    path = images["4d"]
    with serve_in_thread(path.parent) as server:
        url = f"{server.url}/{path.name}"
        server.reset_counters()
        lazy = mist_zarr.open(url, scale=1)
        opened = sorted(r.path.removeprefix(f"/{path.name}/") for r in server.requests)
        assert opened == ["index/c/0/0/0/0/0", "index/zarr.json", "zarr.json"]
        server.reset_counters()
        part = lazy[1, 0:2].values
        chunks = [r for r in server.requests if "/image/c/" in r.path]
        assert sorted(r.path.split("/image/c/")[1] for r in chunks) == ["1/0/0/0", "1/1/0/0"]
        assert all(r.status == 206 for r in chunks)
        np.testing.assert_array_equal(part, mist_zarr.open(path, scale=1).values[1, 0:2])
        np.testing.assert_array_equal(mist_zarr.read_image(url), mist_zarr.read_image(path))


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
def test_reads_in_a_forked_child_after_reads_in_the_parent(images):
    """The decode pool is per process: a fork (DataLoader workers) must not wait on
    threads that only exist in the parent."""
    path = images["tiled"]
    expected = open_direct(path).read(1, threads=2)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_read_in_child, (str(path),)).get(timeout=120)
    np.testing.assert_array_equal(got, expected)


def _read_in_child(path):
    return open_direct(path).read(1, threads=2)


def test_read_level_and_to_dask_match_open(images, tmp_path):
    rng = np.random.default_rng(3)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"i{i}.zarr")
        mist_zarr.write_image(paths[-1], rng.integers(0, 255, (256, 256), dtype=np.uint8))
    expected = [mist_zarr.open(p, scale=2).values for p in paths]
    for threads in (1, 2, None):
        got = mist_zarr.read_level(paths, scale=2, threads=threads)
        assert [g.dtype for g in got] == [np.uint8] * 5
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)
    stacked = to_dask(paths, scale=2, per_block=2)
    assert stacked.shape == (5, 64, 64) and stacked.chunks[0] == (2, 2, 1)
    np.testing.assert_array_equal(stacked.compute(), np.stack(expected))
    with pytest.raises(ValueError, match=r"tiled.zarr: level has shape \(75, 115\)"):
        to_dask([paths[0], images["tiled"]], scale=2).compute()
    assert mist_zarr.read_level([], scale=1) == []


def test_rescale_gives_hounsfield_units_for_the_real_ct(ct):
    metadata = mist_zarr.open_image(ct)[1].metadata["dicom"]
    slope = metadata["00281053"]["Value"][0]
    intercept = metadata["00281052"]["Value"][0]
    assert (slope, intercept) == (1, -1024)
    stored = mist_zarr.open(ct, scale=2).values
    hu = mist_zarr.open(ct, scale=2, rescale=True)
    assert hu.dtype == np.float32 and hu.attrs["rescale"]["intercept"] == -1024
    np.testing.assert_array_equal(hu.values, stored.astype(np.float32) * slope + intercept)
    full = mist_zarr.open(ct, rescale=True)
    assert -200 < float(np.median(full[20, 200:300, 200:300])) < 200  # soft tissue, in HU
    lazy = mist_zarr.open(ct, scale=2, rescale=True, chunks={})
    np.testing.assert_array_equal(lazy.values, hu.values)
    np.testing.assert_array_equal(mist_zarr.read_level([ct], scale=2, rescale=True)[0],
                                  hu.values)


@pytest.mark.parametrize("slope,inter,expect", [(2.0, -5.0, (2.0, -5.0)), (0.5, 10.25, None),
                                                (None, None, (1.0, 0.0))])
def test_rescale_follows_the_nifti_scl_fields(tmp_path, slope, inter, expect):
    import nibabel as nib

    a = np.random.default_rng(2).integers(-300, 900, (70, 80, 3), dtype=np.int16)
    img = nib.Nifti1Image(a, np.diag([0.8, 0.8, 2.0, 1.0]))
    img.header.set_slope_inter(slope, inter)
    nib.save(img, tmp_path / "v.nii.gz")
    report = mist_zarr.convert(tmp_path / "v.nii.gz", tmp_path / "out")
    path = tmp_path / "out" / report.converted[0].path
    stored = mist_zarr.open(path).values
    values = mist_zarr.open(path, rescale=True).values
    assert values.dtype == np.float32
    s, i = expect if expect is not None else (slope, inter)
    np.testing.assert_allclose(values, (stored.astype(np.float64) * s + i).astype(np.float32))
    if expect == (2.0, -5.0):  # integral: exact
        np.testing.assert_array_equal(values, stored.astype(np.float32) * 2 - 5)


def test_rescale_that_varies_per_slice(tmp_path):
    """A series whose RescaleIntercept differs between slices: each slice gets its own."""
    import pydicom

    files = sorted(shared("ct", "CRLM-CT-1004").rglob("*.dcm"))[:4]
    src = tmp_path / "src"
    src.mkdir()
    intercepts = {}
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.RescaleIntercept = -1024 - 10 * i
        intercepts[float(ds.ImagePositionPatient[2])] = -1024 - 10 * i
        ds.save_as(src / f.name)
    report = mist_zarr.convert(src, tmp_path / "out")
    assert report.ok, report.summary()
    path = tmp_path / "out" / report.converted[0].path
    info = mist_zarr.open_image(path)[1]
    per_slice = mist_zarr.read_metadata(path)["dicom_per_slice"]["RescaleIntercept"]
    assert len({v[0] for v in per_slice}) == 4 and "00281052" not in info.metadata["dicom"]
    stored = mist_zarr.open(path, scale=1).values
    values = mist_zarr.open(path, scale=1, rescale=True)
    expected = [float(v[0]) for v in per_slice]
    np.testing.assert_array_equal(values.attrs["rescale"]["intercept"], expected)
    np.testing.assert_array_equal(
        values.values, stored.astype(np.float32) + np.float32(expected)[:, None, None])
    np.testing.assert_array_equal(values[1:3, 5].values, values.values[1:3, 5])
    assert sorted(expected) == sorted(intercepts.values())


def test_rescale_of_images_without_one_keeps_the_values(images):
    values = mist_zarr.open(images["rgb"], scale=1, rescale=True)
    assert values.dtype == np.float32 and values.attrs["rescale"]["source"] == "none"
    np.testing.assert_array_equal(values.values,
                                  mist_zarr.open(images["rgb"], scale=1).values.astype(np.float32))


def test_loader_items_in_modality_values(ct):
    ds = mist_zarr.MistDataset(ct.parents[2], scale=2, rescale=True)
    item = ds[0]
    assert item["image"].dtype == np.float32 and item["rescale"]["intercept"] == -1024
    np.testing.assert_array_equal(item["image"], mist_zarr.open(ct, scale=2, rescale=True).values)


def test_an_image_rewritten_at_the_same_path_is_read_anew(tmp_path):
    """Opens share what they parse (info, index, checksums, chunk plans) per image write:
    the key is zarr.json's digest, and every write records a fresh write id there."""
    p = tmp_path / "p.zarr"
    mist_zarr.write_image(p, np.full((4, 128, 128), 7, np.uint16))
    first = open_direct(p)
    assert open_direct(p)._parsed is first._parsed  # the second open reuses the first's parse
    np.testing.assert_array_equal(first.read(0), 7)
    assert mist_zarr.read_level([p], scale=1)[0].shape == (4, 64, 64)
    mist_zarr.write_image(p, np.full((8, 128, 128), 9, np.uint16), overwrite=True)
    again = open_direct(p)
    assert again.info.write_id != first.info.write_id and again._parsed is not first._parsed
    np.testing.assert_array_equal(again.read(0), np.full((8, 128, 128), 9))
    np.testing.assert_array_equal(mist_zarr.read_level([p], scale=1)[0], virtual(p, 1))
    assert mist_zarr.open(p, scale=1).shape == (8, 64, 64)


def test_the_parse_cache_is_bounded(tmp_path, monkeypatch):
    import mist_zarr.direct as direct

    monkeypatch.setattr(direct, "_PARSED_MAX", 2)
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.zarr")
        mist_zarr.write_image(paths[-1], np.full((2, 128, 128), i, np.uint8))
    for i, values in enumerate(mist_zarr.read_level(paths, scale=1, threads=2)):
        np.testing.assert_array_equal(values, i)
        assert len(direct._PARSED) <= 2
    monkeypatch.setattr(direct, "_PARSED_BYTES", 0)  # nothing fits: nothing is kept
    direct._forget_parsed()  # (paths[0] may still be held: the threads finish in any order)
    open_direct(paths[0])
    assert not direct._PARSED


@given(st.lists(st.integers(-40000 // 2, 40000 // 2), min_size=1, max_size=50),
       st.sampled_from(["uint8", "int8", "uint16"]))
def test_decoding_to_a_narrower_dtype_clips_into_its_range(samples, dtype):
    """Reduced levels overshoot at sharp edges; decoding clips (never wraps) to the range."""
    from mist_zarr.values import ValueMapping

    stored = np.array(samples, np.int32)
    got = ValueMapping(dtype=dtype, stored_dtype="int32", kind="cast").decode(stored)
    info = np.iinfo(dtype)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, np.clip(stored, info.min, info.max).astype(dtype))


def test_level_values_are_never_the_readers_reused_buffers(tmp_path):
    """Stored samples that are only an intermediate (here int16 for uint8 values) are read
    into a per-thread buffer; what callers get must be their own array all the same."""
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.zarr")
        mist_zarr.write_image(paths[-1], np.full((256, 256), 10 * (i + 1), np.uint8))
    first = open_direct(paths[0])
    assert first.info.stored_dtype != first.info.dtype  # the case that uses the buffer
    kept = [first.read_values(k) for k in range(first.info.levels + 1)]
    arrays = mist_zarr.read_level(paths, scale=2, threads=1) + [
        mist_zarr.open(p, scale=2).values for p in paths]
    for p in paths:  # every later read in this thread reuses the buffers
        mist_zarr.read_level([p], scale=2, threads=1)
    for values in kept:
        assert values.flags.writeable and values.flags.owndata
        np.testing.assert_array_equal(values, 10)
    for i, values in enumerate(arrays):
        np.testing.assert_array_equal(values, 10 * (i % 3 + 1))


def test_opened_levels_do_not_share_attrs_or_coordinates(ct):
    """open() builds each level's coordinates and attrs once per image write; every
    opened array still gets its own."""
    a, b = mist_zarr.open(ct, scale=2), mist_zarr.open(ct, scale=2)
    a.attrs["spacing"].append(99.0)
    a.attrs["affine"][0, 0] = 1234.0
    a.attrs["metadata"]["added"] = True
    a.coords["y"].attrs["units"] = "cm"
    assert b.attrs["spacing"] == list(open_direct(ct).info.level_spacing(2))
    assert b.attrs["affine"][0, 0] != 1234.0 and "added" not in b.attrs["metadata"]
    assert b.coords["y"].attrs["units"] == "mm"
    np.testing.assert_array_equal(a.coords["x"].values, b.coords["x"].values)
    c = mist_zarr.open(ct, scale=2)
    assert c.coords["y"].attrs["units"] == "mm" and "added" not in c.attrs["metadata"]


def test_a_file_url_and_a_path_read_the_same_image(images):
    path = images["tiled"]
    np.testing.assert_array_equal(mist_zarr.read_level([f"file://{path}"], scale=1)[0],
                                  mist_zarr.read_level([path], scale=1)[0])


def test_to_dask_names_its_graph_by_its_inputs(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.zarr")
        mist_zarr.write_image(paths[-1], np.full((256, 256), i, np.uint8))
    assert to_dask(paths, scale=1).name == to_dask(paths, scale=1).name
    assert to_dask(paths, scale=1).name != to_dask(paths[::-1], scale=1).name
    assert to_dask(paths, scale=1).name != to_dask(paths, scale=2).name
    np.testing.assert_array_equal(to_dask(paths[::-1], scale=1, per_block=2).compute()[:, 0, 0],
                                  [2, 1, 0])


def test_what_opens_derive_is_counted_in_the_parse_cache_bound(tmp_path):
    """open() keeps each level's coordinates with the parsed write: they count toward the
    cache's byte bound, so that the bound holds for many images opened at many levels."""
    import mist_zarr.direct as direct

    p = tmp_path / "p.zarr"
    mist_zarr.write_image(p, np.full((3, 512, 512), 5, np.int16))
    entry = open_direct(p)._parsed
    size, held = entry.size, direct._parsed_bytes
    coords = mist_zarr.open(p, scale=1).coords
    grown = entry.size - size
    assert grown >= sum(coords[d].values.nbytes for d in ("z", "y", "x"))
    assert direct._parsed_bytes - held == grown
    mist_zarr.open(p, scale=1)  # made once per write
    assert entry.size - size == grown
