"""MistDataset: a map-style dataset for PyTorch / MONAI loaders, locally, in worker
processes and over HTTP."""

from __future__ import annotations

import multiprocessing
import pickle
import subprocess
import sys

import numpy as np
import pytest

import mist_zarr
from mist_zarr.catalog import catalog
from mist_zarr.dataset import MistDataset
from mist_zarr.serve import serve_in_thread

from .conftest import shared
from .test_catalog import make_sources, quiet_list_images


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Generated NIfTI volumes (plus the real CT when present), converted, with a catalog."""
    src = make_sources(tmp_path_factory.mktemp("src"))
    root = tmp_path_factory.mktemp("served")
    dest = root / "dataset"
    report = mist_zarr.convert(src, dest)
    assert report.ok, report.summary()
    catalog(dest)  # writes catalog.parquet (convert will do this itself)
    return dest


def info_of(dest, path):
    return mist_zarr.open_image(dest / path)[1]


def same_item(a: dict, b: dict) -> None:
    assert a["path"] == b["path"] and a["level"] == b["level"] and a["meta"] == b["meta"]
    assert a["image"].dtype == b["image"].dtype
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["affine"], b["affine"])
    np.testing.assert_array_equal(a["spacing"], b["spacing"])


def stack_collate(items: list[dict]):
    """Collate equal-size items into one batch (what a training loop at one level uses)."""
    import torch

    return {
        "image": torch.stack([torch.from_numpy(i["image"].astype(np.float32)) for i in items]),
        "affine": torch.stack([torch.from_numpy(i["affine"]) for i in items]),
        "path": [i["path"] for i in items],
    }


def test_length_filters_and_catalog(dataset):
    everything = MistDataset(dataset)
    paths = sorted(r["path"] for r in quiet_list_images(dataset))
    assert len(everything) == len(paths)
    assert list(everything.catalog["path"]) == paths
    nifti = MistDataset(dataset, filter="source_format == 'nifti'")
    assert sorted(nifti.catalog["path"]) == ["phantom", "small/tiny", "wide"]
    big = MistDataset(dataset, filter=lambda row: row["levels"] >= 2 and row["dtype"] != "int16")
    assert list(big.catalog["path"]) == ["wide"]
    assert len(MistDataset(dataset, filter="modality == 'MR'")) == 0


def test_filter_by_modality_on_real_ct(dataset):
    shared("ct", "CRLM-CT-1004")
    ct = MistDataset(dataset, filter=lambda row: row["modality"] == "CT", size=224)
    assert len(ct) == 1
    item = ct[0]
    info = info_of(dataset, item["path"])
    assert item["level"] == 1 and item["image"].shape == (41, 256, 256)
    np.testing.assert_array_equal(item["affine"], info.level_affine(1))
    assert item["meta"]["modality"] == "CT" and item["meta"]["source_format"] == "dicom"
    assert item["meta"]["series_uid"].startswith("1.3.6.1.4.1.14519")
    np.testing.assert_array_equal(item["image"], mist_zarr.open(dataset / item["path"],
                                                                scale=1).values)


def test_items_at_a_scale(dataset):
    ds = MistDataset(dataset, scale=1, filter="levels >= 1")
    assert len(ds) >= 2
    for i in range(len(ds)):
        item = ds[i]
        info = info_of(dataset, item["path"])
        assert item["level"] == 1
        assert item["image"].shape == info.level_shape(1) == ds.item_shape(i)
        assert item["image"].dtype == info.dtype
        np.testing.assert_array_equal(item["affine"], info.level_affine(1))
        np.testing.assert_allclose(item["spacing"], info.level_spacing(1))
        np.testing.assert_array_equal(item["image"],
                                      mist_zarr.open(dataset / item["path"], scale=1).values)
    with pytest.raises(ValueError, match="fewer levels"):
        MistDataset(dataset, scale=1)  # small/tiny has only level 0


def test_level_per_item_for_a_size(dataset):
    # small/tiny (48 x 40) has no level >= 100: read at level 0, and the person is told
    with pytest.warns(UserWarning, match=r"1 image\(s\) have no level .* >= 100 .*small/tiny"):
        ds = MistDataset(dataset, size=100)
    seen = {}
    for i in range(len(ds)):
        item = ds[i]
        info = info_of(dataset, item["path"])
        k = mist_zarr.choose_level(info, size=100, clamp=True)
        assert item["level"] == k == ds.level(i)
        assert item["image"].shape == info.level_shape(k) == ds.item_shape(i)
        np.testing.assert_array_equal(item["affine"], info.level_affine(k))
        seen[item["path"]] = (k, item["image"].shape)
    assert seen["small/tiny"] == (0, (6, 48, 40))
    assert seen["wide"] == (1, (4, 130, 150))
    assert seen["phantom"] == (1, (3, 128, 128))
    below = MistDataset(dataset, size=100, below=True)
    assert below[below.catalog["path"].tolist().index("wide")]["image"].shape == (4, 65, 75)


def test_level0_items_are_bit_exact_and_transform_applies(dataset):
    ds = MistDataset(dataset, filter="source_format == 'nifti'",
                     transform=lambda item: {**item, "mean": float(item["image"].mean())})
    for i in range(len(ds)):
        item = ds[i]
        full = mist_zarr.read_image(dataset / item["path"])
        assert item["level"] == 0 and item["image"].dtype == full.dtype
        np.testing.assert_array_equal(item["image"], full)
        assert item["mean"] == pytest.approx(float(full.mean()))
    assert ds[-1]["path"] == ds[len(ds) - 1]["path"]
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert [item["path"] for item in ds] == list(ds.catalog["path"])  # iteration stops


def test_bad_arguments(dataset, tmp_path):
    with pytest.raises(ValueError, match="not both"):
        MistDataset(dataset, scale=1, size=64)
    with pytest.raises(ValueError, match="positive"):
        MistDataset(dataset, size=0)
    with pytest.raises(TypeError):
        MistDataset(object())
    with pytest.raises(FileNotFoundError):
        MistDataset(tmp_path / "nothing")


def test_pickle_round_trip_keeps_rows_not_stores(dataset):
    ds = MistDataset(dataset, size=64, filter="levels >= 1")
    first = [ds[i] for i in range(len(ds))]  # opens (and caches) stores
    blob = pickle.dumps(ds)
    assert b"MultiscaleStore" not in blob
    assert len(blob) < 4000 + 1000 * len(ds)  # root, options and rows only
    back = pickle.loads(blob)
    assert len(back) == len(ds) and back.root == ds.root
    for a, i in zip(first, range(len(back))):
        same_item(a, back[i])


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
def test_forked_worker_pool_after_reads_in_the_parent(dataset):
    """Linux DataLoader workers fork: stores opened in the parent are not reused."""
    ds = MistDataset(dataset, scale=1, filter="levels >= 1")
    expected = [ds[i] for i in range(len(ds))]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.map_async(ds.__getitem__, range(len(ds)), chunksize=1).get(timeout=120)
    for a, b in zip(expected, got):
        same_item(a, b)


def test_over_http_only_the_chosen_levels_travel(dataset):
    local = MistDataset(dataset, size=64)
    expected = [local[i] for i in range(len(local))]
    with serve_in_thread(dataset.parent) as server:
        remote = MistDataset(f"{server.url}/{dataset.name}", size=64)
        assert list(remote.catalog["path"]) == list(local.catalog["path"])
        server.reset_counters()
        for i, a in enumerate(expected):
            same_item(a, remote[i])
        sent = server.bytes_sent
    # exactly the chosen levels' prefixes travel (+ 2 boundary bytes per reduced chunk),
    # plus each image's zarr.json and prefix index, and the checksums of level-0 items
    full = int(local.catalog["bytes"].sum())
    wanted = 0
    for i, row in enumerate(local.catalog.to_dict("records")):
        k = local.level(i)
        image = dataset / row["path"]
        wanted += row["bytes_per_level"][k] + (2 * row["n_chunks"] if k else 0)
        arrays = ["index"] if k else ["index", "checksum"]
        wanted += sum(f.stat().st_size for f in [image / "zarr.json"] + [
            g for a in arrays for g in [image / a / "zarr.json", *(image / a / "c").rglob("*")]]
            if f.is_file())
    assert sent == wanted
    if local.catalog["levels"].max() >= 2:
        assert sent < 0.5 * full


def test_spawned_worker_pool_reads_local_and_http_items(dataset):
    """What DataLoader(num_workers=2) does: pickle the dataset into 2 fresh processes."""
    local = MistDataset(dataset, size=100)
    expected = [local[i] for i in range(len(local))]
    with serve_in_thread(dataset.parent) as server, \
            multiprocessing.get_context("spawn").Pool(2) as pool:
        remote = MistDataset(f"{server.url}/{dataset.name}", size=100)
        got_local = pool.map(local.__getitem__, range(len(local)), chunksize=1)
        got_remote = pool.map(remote.__getitem__, range(len(remote)), chunksize=1)
        assert any("/image/c/" in r.path for r in server.requests)  # the workers read over HTTP
    for a, b, c in zip(expected, got_local, got_remote, strict=True):
        same_item(a, b)
        same_item(a, c)


def test_torch_is_not_imported():
    code = ("import sys, mist_zarr, mist_zarr.catalog, mist_zarr.dataset; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_dataloader(dataset):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    ds = MistDataset(dataset, scale=1, filter="source_format == 'nifti' and levels >= 1")
    shapes = {ds.item_shape(i) for i in range(len(ds))}
    # equal-size batches: one image per batch unless shapes agree
    batch = 2 if len(shapes) == 1 else 1
    for workers, context in ((0, None), (2, "spawn")):
        loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=stack_collate,
                            multiprocessing_context=context)
        paths = []
        for out in loader:
            assert out["image"].dtype == torch.float32 and out["affine"].shape[1:] == (4, 4)
            for j, path in enumerate(out["path"]):
                i = len(paths)
                np.testing.assert_array_equal(out["image"][j].numpy(),
                                              ds[i]["image"].astype(np.float32))
                paths.append(path)
        assert paths == list(ds.catalog["path"])


def test_an_image_rewritten_under_a_live_dataset_is_read_anew(tmp_path):
    """A long-lived loader worker keeps opened images; after an image is converted again at
    the same path, its items come from the new write, not from the kept index/checksums."""
    import zarr

    root = tmp_path / "root"
    zarr.open_group(root, mode="w", zarr_format=3)
    for name in ("a.zarr", "b.zarr"):
        mist_zarr.write_image(root / name, np.full((3, 128, 128), 1, np.uint16))
    catalog(root)
    ds = MistDataset(root)
    first = ds[0]
    np.testing.assert_array_equal(first["image"], 1)
    mist_zarr.write_image(root / first["path"], np.full((3, 128, 128), 5, np.uint16),
                          overwrite=True)
    np.testing.assert_array_equal(ds[0]["image"], 5)
    np.testing.assert_array_equal(MistDataset(root, scale=1)[0]["image"],
                                  mist_zarr.open(root / first["path"], scale=1).values)
