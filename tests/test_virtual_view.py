"""The virtual OME-Zarr view that ``mist-zarr serve`` adds beside each image, read by
generic Zarr / OME-Zarr clients that do not have mist-zarr (see tests/clients/)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
import zarr
from zarr.core.sync import sync

import mist_zarr
from mist_zarr.http_view import _documents, consolidate, consolidate_v2
from mist_zarr.serve import serve_in_thread
from mist_zarr.zarr2 import v2_documents, v3_source

from .test_serve import fetch


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory, ct_volume) -> Path:
    """A served root holding the real CT (41 x 512 x 512 int16) at patient/ct.zarr."""
    root = tmp_path_factory.mktemp("served")
    info = mist_zarr.write_image(root / "patient" / "ct.zarr", ct_volume,
                                 spacing=(2.5, 0.78, 0.78))
    assert info.values.kind == "identity"  # the view's samples are the caller's samples
    return root


def expected_body(image: Path, view: str, key: str, index: np.ndarray) -> tuple[str, int]:
    """What the server must have sent for key of the view, worked out without it:
    ("chunk", prefix length) or ("metadata", document length)."""
    store = mist_zarr.MultiscaleStore(image)
    docs = sync(_documents(store))
    if key.endswith(".zmetadata"):
        return "metadata", len(consolidate_v2(key, docs))
    document = ""
    if view == "ome-v2":
        key, document = v3_source(key)
    target = sync(store.locate(key))
    if isinstance(target, tuple):
        _, level, length = target
        coords = tuple(int(c) for c in key.split("/c/")[1].split("/"))
        assert length == index[coords + (level,)]
        return "chunk", length
    if document:
        target = v2_documents(key, target)[key[: -len("zarr.json")] + document]
    elif key.endswith("zarr.json"):
        target = consolidate(key, docs)
    return "metadata", len(target)


@pytest.mark.parametrize("client, view", [("zarr", "ome"), ("ome-zarr", "ome"),
                                          ("ngff-zarr", "ome-v2")])
def test_generic_clients_read_every_level_sending_only_prefixes(
        ct_root, clean_python, tmp_path, client, view):
    image = ct_root / "patient" / "ct.zarr"
    info = mist_zarr.open_image(image)[1]
    index = mist_zarr.read_index(image)
    with serve_in_thread(ct_root) as server:
        clean_python("read_ome.py", client, f"{server.url}/patient/ct.zarr/{view}/", tmp_path)
        records, sent = server.requests, server.bytes_sent
    for k in range(info.levels + 1):
        got = np.load(tmp_path / f"{k}.npy")
        np.testing.assert_array_equal(got, mist_zarr.open(image, scale=k).values)
    assert not (tmp_path / f"{info.levels + 1}.npy").exists()
    # every body sent is a level prefix or a metadata document, each chunk once
    prefix = f"/patient/ct.zarr/{view}/"
    counted = {"chunk": 0, "metadata": 0}
    chunks = []
    for r in records:
        assert r.path.startswith(prefix), r
        if r.status == 404:
            continue  # clients probe for documents of the other Zarr format
        assert r.status == 200, r
        kind, length = expected_body(image, view, r.path[len(prefix):], index)
        assert r.body_len == length, r
        counted[kind] += length
        chunks += [r.path] if kind == "chunk" else []
    assert counted["chunk"] == sum(int(index[..., k].sum()) for k in range(info.levels + 1))
    assert len(chunks) == len(set(chunks)) == (info.levels + 1) * info.shape[0]
    assert sent == counted["chunk"] + counted["metadata"]


@pytest.mark.parametrize("view", ["ome", "ome-v2"])
def test_xarray_opens_each_level_with_coordinates_over_http(tmp_path, view):
    """HTTP cannot list: groups carry consolidated metadata so that xarray finds the
    arrays; and a sample equal to the fill value (0) stays a sample, not NaN."""
    import imagecodecs.numcodecs
    import xarray as xr

    imagecodecs.numcodecs.register_codecs()
    a = np.random.default_rng(5).integers(-3000, 3000, (2, 256, 200), dtype=np.int16)
    a[0] = 0  # absent chunk
    a[1, :64] = 0
    mist_zarr.write_image(tmp_path / "img.zarr", a, spacing=(3.0, 0.5, 0.5))
    with serve_in_thread(tmp_path) as server:
        for k in range(3):
            ds = xr.open_zarr(f"{server.url}/img.zarr/{view}/", group=f"s{k}")
            expected = mist_zarr.open(tmp_path / "img.zarr", scale=k)
            assert ds["image"].dtype == expected.dtype
            np.testing.assert_array_equal(ds["image"].values, expected.values)
            np.testing.assert_allclose(ds["x"].values, np.arange(ds.sizes["x"]) * 0.5 * 2**k)


def test_virtual_chunks_are_the_indexed_prefix_with_ranges_and_validators(tmp_path):
    volume = np.random.default_rng(3).integers(-900, 1500, (3, 256, 192), dtype=np.int16)
    volume[1] = 0  # all fill value: not stored, so absent at every level
    mist_zarr.write_image(tmp_path / "img.zarr", volume)
    index = mist_zarr.read_index(tmp_path / "img.zarr")
    stored = (tmp_path / "img.zarr" / "image" / "c" / "2" / "0" / "0").read_bytes()
    with serve_in_thread(tmp_path) as server:
        for k in range(index.shape[-1]):
            n = int(index[2, 0, 0, k])
            path = f"/img.zarr/ome/s{k}/image/c/2/0/0"
            status, headers, body = fetch(server.url, path)
            assert status == 200 and body == stored[:n]
            assert headers["Content-Type"] == "application/octet-stream"
            assert headers["Access-Control-Allow-Origin"] == "*"
            etag = headers["ETag"]
            status, headers, body = fetch(server.url, path, headers={"Range": "bytes=5-20"})
            assert status == 206 and body == stored[5:21]
            assert headers["Content-Range"] == f"bytes 5-20/{n}"
            status, headers, body = fetch(server.url, path, headers={"Range": f"bytes=-{n + 9}"})
            assert status == 206 and body == stored[:n]  # a suffix is cut at the prefix
            status, headers, _ = fetch(server.url, path, headers={"Range": f"bytes={n}-"})
            assert status == 416 and headers["Content-Range"] == f"bytes */{n}"
            assert fetch(server.url, path, headers={"If-None-Match": etag})[0] == 304
            status, headers, body = fetch(server.url, path, "HEAD")
            assert status == 200 and int(headers["Content-Length"]) == n and body == b""
            assert fetch(server.url, f"/img.zarr/ome/s{k}/image/c/1/0/0")[0] == 404
        tags = {fetch(server.url, f"/img.zarr/ome/s{k}/image/c/2/0/0")[1]["ETag"]
                for k in range(index.shape[-1])}
        assert len(tags) == index.shape[-1]  # one entity per level
        levels = index.shape[-1]
        for path in (f"/img.zarr/ome/s{levels}/image/c/0/0/0", "/img.zarr/ome/s0/image/c/3/0/0",
                     "/img.zarr/ome/s0/image/c/0/0", "/img.zarr/ome/s0/nothing",
                     "/img.zarr/ome/index/zarr.json", "/img.zarr/ome/", "/img.zarr/ome-v2/zarr.json"):
            assert fetch(server.url, path)[0] == 404, path
        status, headers, body = fetch(server.url, "/img.zarr/ome/s1/image/zarr.json")
        assert status == 200 and headers["Content-Type"] == "application/json"
        doc = json.loads(body)
        assert doc["codecs"][0]["configuration"]["skipres"] == 1
        assert doc["shape"] == [3, 128, 96]
        for method in ("PUT", "POST", "DELETE"):
            assert fetch(server.url, "/img.zarr/ome/zarr.json", method)[0] == 405


def test_the_view_follows_a_replaced_image(tmp_path):
    a = np.full((2, 128, 128), 7, np.int16)
    mist_zarr.write_image(tmp_path / "img.zarr", a)
    with serve_in_thread(tmp_path) as server:
        url = f"{server.url}/img.zarr/ome/"
        assert zarr.open_array(url + "s1/image", mode="r")[0, 0, 0] == 7
        mist_zarr.write_image(tmp_path / "img.zarr", np.full((3, 256, 256), 9, np.int16),
                              overwrite=True)
        fresh = zarr.open_array(url + "s1/image", mode="r")
        assert fresh.shape == (3, 128, 128) and (fresh[...] == 9).all()


def test_the_virtual_view_does_not_leave_the_root(tmp_path):
    secret = np.full((1, 128, 128), 1234, np.int16)
    mist_zarr.write_image(tmp_path / "outside.zarr", secret)
    root = tmp_path / "root"
    mist_zarr.write_image(root / "img.zarr", np.full((1, 128, 128), 5, np.int16))
    (root / "linked.zarr").symlink_to(tmp_path / "outside.zarr")
    # an image inside root whose chunk, or whose index, is a symlink to outside
    for name, link in (("chunk.zarr", "image/c/0/0/0"), ("index.zarr", "index")):
        mist_zarr.write_image(root / name, np.full((1, 128, 128), 5, np.int16))
        target = root / name / link
        if target.is_dir():
            import shutil
            shutil.rmtree(target)
        else:
            target.unlink()
        target.symlink_to(tmp_path / "outside.zarr" / link)
    secret_bytes = (tmp_path / "outside.zarr" / "image" / "c" / "0" / "0" / "0").read_bytes()
    with serve_in_thread(root) as server:
        for path in ("/linked.zarr/ome/zarr.json", "/linked.zarr/ome/s1/image/c/0/0/0",
                     "/chunk.zarr/ome/s0/image/c/0/0/0", "/chunk.zarr/ome/s1/image/c/0/0/0",
                     "/index.zarr/ome/zarr.json", "/index.zarr/ome/s1/image/c/0/0/0",
                     "/img.zarr/ome/../../outside.zarr/ome/zarr.json",
                     "/img.zarr/%2e%2e/linked.zarr/ome/zarr.json",
                     "/img.zarr/ome/s0/image/c/../../../../outside.zarr/image/c/0/0/0"):
            status, _, body = fetch(server.url, path)
            assert status == 403, path
            assert secret_bytes[:64] not in body
        assert fetch(server.url, "/img.zarr/ome/s0/image/c/0/0/0")[0] == 200


def test_dataset_roots_list_their_images_as_json(tmp_path, data_dir):
    dataset = tmp_path / "dataset"
    report = mist_zarr.convert([data_dir / "nifti" / "example_mr_sm.nii.gz",
                                data_dir / "nifti" / "example_ct.nii.gz"], dataset)
    assert report.ok
    expected = mist_zarr.catalog.catalog(dataset)
    with serve_in_thread(tmp_path) as server:
        reply = requests.get(f"{server.url}/dataset/catalog.json", timeout=30)
        assert reply.status_code == 200 and reply.headers["Access-Control-Allow-Origin"] == "*"
        doc = reply.json()
        assert doc["format"] == "mist-zarr-catalog"
        assert [i["path"] for i in doc["images"]] == list(expected["path"])
        for item, (_, row) in zip(doc["images"], expected.iterrows()):
            assert item["shape"] == list(row["shape"]) and item["levels"] == row["levels"]
            group = zarr.open_group(f"{server.url}/dataset/{item['ome']}", mode="r")
            k = item["levels"]
            assert group[f"s{k}/image"].shape == tuple(
                mist_zarr.open(dataset / item["path"], scale=k).shape)
        # not a dataset root: no catalog
        assert requests.get(f"{server.url}/catalog.json", timeout=30).status_code == 404
        first = expected["path"].iloc[0]
        assert requests.get(f"{server.url}/dataset/{first}/catalog.json",
                            timeout=30).status_code == 404


def test_bounded_load_on_the_virtual_view_with_hostile_requests(tmp_path):
    """300 requests from 16 clients on an image served as the root itself: virtual chunks
    at every level (ranges, v2 keys), documents, absent keys and escapes, all right."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    a = np.random.default_rng(17).integers(-2000, 2000, (4, 256, 256), dtype=np.int16)
    image = tmp_path / "img.zarr"
    mist_zarr.write_image(image, a)
    (tmp_path / "secret.txt").write_text("outside the root")
    index = mist_zarr.read_index(image)
    levels = index.shape[-1]
    chunks = [(image / "image" / "c" / str(z) / "0" / "0").read_bytes() for z in range(4)]

    def one(i):
        rnd = random.Random(i)
        kind = rnd.choice(["chunk", "range", "v2", "document", "absent", "escape"])
        z, k = rnd.randrange(4), rnd.randrange(levels)
        n = int(index[z, 0, 0, k])
        path, headers, expected = f"/ome/s{k}/image/c/{z}/0/0", {}, (200, chunks[z][:n])
        if kind == "range":
            start = rnd.randrange(n)
            end = start + rnd.randrange(3000)
            headers["Range"] = f"bytes={start}-{end}"
            expected = (206, chunks[z][start:min(end + 1, n)])
        elif kind == "v2":
            path = f"/ome-v2/s{k}/image/{z}/0/0"
        elif kind == "document":
            path, expected = f"/ome/s{k}/image/zarr.json", (200, None)
        elif kind == "absent":
            path, expected = rnd.choice([f"/ome/s{levels}/image/c/0/0/0", "/ome/s0/image/c/4/0/0",
                                         "/ome-v2/s0/image/.zgroup", "/ome/s0/image/c"]), (404, None)
        elif kind == "escape":
            path = rnd.choice(["/ome/../../secret.txt", "/ome/%2e%2e/%2e%2e/secret.txt",
                               "/ome/s0/image/c/../../../../secret.txt"])
            expected = (403, None)
        status, _, body = fetch(server.url, path, headers=headers)
        return kind, path, expected, status, body

    with serve_in_thread(image) as server:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(300)))
        for kind, path, (status, body), got_status, got_body in results:
            assert b"outside the root" not in got_body
            assert got_status == status, (kind, path, got_status)
            if body is not None:
                assert got_body == body, (kind, path)
            elif kind == "document":
                assert json.loads(got_body)["node_type"] == "array"
        np.testing.assert_array_equal(
            zarr.open_array(f"{server.url}/ome/s0/image", mode="r")[...], a)
