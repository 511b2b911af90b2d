"""Converting into object stores: ``s3://`` and ``gs://`` against real servers on 127.0.0.1.

S3 is moto's ``ThreadedMotoServer`` (the S3 HTTP API, started here on a free
port) reached through s3fs; GCS is ``gcp-storage-emulator`` (the GCS JSON API,
likewise) reached through gcsfs. The library gets ``storage_options`` exactly
as it would for AWS, MinIO or Google Cloud; nothing in the storage path is
mocked. "Writes nothing" is checked on the server's object versions: S3
buckets here have versioning on and GCS gives every object a generation, so
any PUT or DELETE, even of identical bytes, shows.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import mist_zarr
from mist_zarr.catalog import CATALOG, build_catalog
from mist_zarr.convert import DONE_DIR, convert, list_images

from .conftest import shared

KEY = SECRET = "testing"


class ObjectStore:
    """A local object-store server: its URL scheme, the ``storage_options`` the
    library is given, and a client of its own for inspecting buckets (keys
    relative to the bucket)."""

    scheme: str
    options: dict[str, str]

    def bucket(self) -> str: ...
    def keys(self, bucket: str, prefix: str = "") -> list[str]: ...
    def versions(self, bucket: str) -> dict[str, object]: ...
    def get(self, bucket: str, key: str) -> bytes: ...
    def put(self, bucket: str, key: str, body: bytes) -> None: ...
    def delete(self, bucket: str, key: str) -> None: ...
    def copy_key(self, bucket: str, key: str, dst_bucket: str, dst_key: str) -> None: ...

    def copy(self, src_bucket: str, prefix: str, dst_bucket: str, dst_prefix: str) -> None:
        for key in self.keys(src_bucket, prefix + "/"):
            self.copy_key(src_bucket, key, dst_bucket, dst_prefix + key[len(prefix):])

    def download(self, bucket: str, prefix: str, dest: Path) -> Path:
        for key in self.keys(bucket, prefix + "/"):
            path = dest / key[len(prefix) + 1:]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.get(bucket, key))
        return dest


class S3(ObjectStore):
    """moto's S3 server, inspected with boto3. Buckets have versioning on."""

    scheme = "s3"

    def __init__(self, endpoint: str):
        import boto3

        self.endpoint = endpoint
        self.options = {"endpoint_url": endpoint, "key": KEY, "secret": SECRET}
        self.client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY,
                                   aws_secret_access_key=SECRET, region_name="us-east-1")

    def bucket(self) -> str:
        name = f"mist-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        self.client.put_bucket_versioning(Bucket=name,
                                          VersioningConfiguration={"Status": "Enabled"})
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                      Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def versions(self, bucket: str) -> dict[str, tuple[str, ...]]:
        """Every key's version ids, delete markers included: changes on any write."""
        out: dict[str, list[str]] = {}
        for page in self.client.get_paginator("list_object_versions").paginate(Bucket=bucket):
            for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
                out.setdefault(v["Key"], []).append(v["VersionId"])
        return {k: tuple(sorted(v)) for k, v in out.items()}

    def get(self, bucket: str, key: str) -> bytes:
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def put(self, bucket: str, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=body)

    def delete(self, bucket: str, key: str) -> None:
        self.client.delete_object(Bucket=bucket, Key=key)

    def copy_key(self, bucket: str, key: str, dst_bucket: str, dst_key: str) -> None:
        self.client.copy_object(Bucket=dst_bucket, Key=dst_key,
                                CopySource={"Bucket": bucket, "Key": key})


class GCS(ObjectStore):
    """gcp-storage-emulator, inspected through a gcsfs client of its own (uncached)."""

    scheme = "gs"

    def __init__(self, endpoint: str):
        from gcsfs.core import GCSFileSystem

        self.endpoint = endpoint
        self.options = {"endpoint_url": endpoint, "token": "anon", "project": "mist-test"}
        self.fs = GCSFileSystem(**self.options, skip_instance_cache=True)

    def bucket(self) -> str:
        name = f"mist-{uuid.uuid4().hex[:12]}"
        self.fs.mkdir(name)
        return name

    def _find(self, bucket: str, prefix: str = "") -> dict[str, dict]:
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(f"{bucket}/{prefix}".rstrip("/"), detail=True)
        except FileNotFoundError:
            return {}
        return {k[len(bucket) + 1:]: v for k, v in found.items()}

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        return sorted(self._find(bucket, prefix))

    def versions(self, bucket: str) -> dict[str, str]:
        """Every key's generation: a new one on any write."""
        return {k: v["generation"] for k, v in self._find(bucket).items()}

    def get(self, bucket: str, key: str) -> bytes:
        return self.fs.cat_file(f"{bucket}/{key}")

    def put(self, bucket: str, key: str, body: bytes) -> None:
        self.fs.pipe_file(f"{bucket}/{key}", body)

    def delete(self, bucket: str, key: str) -> None:
        self.fs.rm_file(f"{bucket}/{key}")

    def copy_key(self, bucket: str, key: str, dst_bucket: str, dst_key: str) -> None:
        self.fs.copy(f"{bucket}/{key}", f"{dst_bucket}/{dst_key}")


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("s3fs")
    pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")  # moto[server]: needs flask
    werkzeug = logging.getLogger("werkzeug")  # one log line per request otherwise
    level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3(f"http://{host}:{port}")
    finally:
        server.stop()
        werkzeug.setLevel(level)


@pytest.fixture(scope="module")
def gcs():
    # gcsfs >= 2026.10 maps gs:// to ExtendedGcsFileSystem (unless the variable
    # GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT is false when it is imported), which
    # first asks the endpoint, over gRPC with TLS, whether the bucket is
    # hierarchical or zonal; the emulator speaks neither, so each bucket costs a
    # 60 s timeout before gcsfs falls back to its plain JSON-API class. That
    # class, which every ordinary bucket ends up using anyway, is used directly.
    pytest.importorskip("gcsfs")
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    import fsspec
    from gcsfs.core import GCSFileSystem

    previous = {p: fsspec.get_filesystem_class(p) for p in ("gs", "gcs")}
    for p in previous:
        fsspec.register_implementation(p, GCSFileSystem, clobber=True)
    quiet = logging.getLogger("gcp_storage_emulator")  # logs every 404 it answers
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    server = emulator.create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    try:
        port = server._api._httpd.server_address[1]
        yield GCS(f"http://127.0.0.1:{port}")
    finally:
        server.stop()
        quiet.setLevel(level)
        for p, cls in previous.items():
            fsspec.register_implementation(p, cls, clobber=True)


@pytest.fixture(scope="module", params=["s3", "gs"])
def store(request):
    """Each object store in turn (S3, then GCS)."""
    return request.getfixturevalue({"s3": "s3", "gs": "gcs"}[request.param])


def make_sources(root: Path) -> dict[str, np.ndarray]:
    """NIfTI volumes (odd sizes, several levels) and a 16-bit PNG; name -> stored samples."""
    from PIL import Image

    expected = {}
    volumes = {"site0/vol00": ((300, 260, 4), np.int16), "site0/vol01": ((71, 83, 5), np.int16),
               "site1/vol02": ((130, 97, 3), np.uint16)}
    for i, (name, (shape, dtype)) in enumerate(volumes.items()):
        rng = np.random.default_rng(i)
        info = np.iinfo(dtype)
        data = rng.integers(max(info.min, -1000), min(info.max, 3000), shape, dtype=dtype)
        path = root / f"{name}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0])), path)
        expected[name] = data.T
    xray = np.random.default_rng(9).integers(0, 4096, (190, 170), dtype=np.uint16)
    (root / "xr").mkdir()
    Image.fromarray(xray).save(root / "xr" / "chest.png")
    expected["xr/chest"] = xray
    return expected


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return root, make_sources(root)


@pytest.fixture(scope="module")
def converted(store, sources):
    """The sources converted once into ``<scheme>://<bucket>/ds``; tests must not change it."""
    src, _ = sources
    bucket = store.bucket()
    report = convert(src, f"{store.scheme}://{bucket}/ds", storage_options=store.options)
    return bucket, report


def test_convert_into_the_store_reads_back_bit_exact_at_every_level(store, sources,
                                                                    converted, tmp_path):
    _, expected = sources
    bucket, report = converted
    url = f"{store.scheme}://{bucket}/ds"
    assert report.ok, report.summary()
    assert not report.problems
    assert sorted(r.path for r in report.converted) == sorted(expected)
    assert {r.status for r in report.converted} == {"converted"}

    keys = store.keys(bucket)
    assert f"ds/{CATALOG}" in keys and "ds/zarr.json" in keys
    assert sum(k.startswith(f"ds/{DONE_DIR}/") for k in keys) == len(expected)
    assert not [k for k in keys if ".mist-tmp" in k]  # no rename-based scratch in a bucket

    # the whole dataset as files, read through the local path for comparison
    local = store.download(bucket, "ds", tmp_path / "copy")
    for name, data in expected.items():
        back = mist_zarr.read_image(f"{url}/{name}", storage_options=store.options)
        assert back.dtype == data.dtype
        np.testing.assert_array_equal(back, data)
        _, info = mist_zarr.open_image(f"{url}/{name}", storage_options=store.options)
        assert info.complete
        for k in range(info.levels + 1):
            there = mist_zarr.open(f"{url}/{name}", scale=k, storage_options=store.options)
            here = mist_zarr.open(local / name, scale=k)
            assert there.shape == info.level_shape(k)
            assert there.dtype == here.dtype
            np.testing.assert_array_equal(there.values, here.values)
        np.testing.assert_array_equal(
            mist_zarr.open(f"{url}/{name}", scale=0, storage_options=store.options).values, data)
    assert max(mist_zarr.open_image(f"{url}/{n}", storage_options=store.options)[1].levels
               for n in expected) >= 2

    rows = list_images(url, storage_options=store.options)
    assert [r["path"] for r in rows] == sorted(expected)
    assert all(r["complete"] for r in rows)
    stored = mist_zarr.catalog.catalog(url, storage_options=store.options)  # its catalog.parquet
    assert list(stored.path) == sorted(expected)
    assert stored.complete.all() and (stored.bytes > 0).all()
    scanned = build_catalog(url, storage_options=store.options)
    pd.testing.assert_frame_equal(stored, scanned)
    pd.testing.assert_frame_equal(scanned, build_catalog(local))
    assert mist_zarr.verify(local, workers=1).ok


def test_rerun_with_skip_existing_writes_nothing(store, sources, converted):
    src, expected = sources
    bucket, _ = converted
    before = store.versions(bucket)
    again = convert(src, f"{store.scheme}://{bucket}/ds", skip_existing=True,
                    storage_options=store.options)
    assert again.ok, again.summary()
    assert sorted(r.path for r in again.converted) == sorted(expected)
    assert [r.status for r in again.converted] == ["existing"] * len(expected)
    assert again.bytes_out == 0
    assert store.versions(bucket) == before  # not one PUT or DELETE


def _marker(store: ObjectStore, bucket: str, name: str) -> str:
    for key in store.keys(bucket, f"ds/{DONE_DIR}/"):
        if json.loads(store.get(bucket, key))["images"] == [name]:
            return key
    raise AssertionError(f"no completion marker lists {name}")


@pytest.mark.parametrize("marker", ["deleted", "kept"])
def test_an_incomplete_image_in_the_bucket_is_redone(store, sources, converted, marker):
    """A write cut short: the image is not flagged complete, some chunks are
    missing or wrong, a stray chunk is there. With or without its completion
    marker, the rerun rewrites that image alone, and only it."""
    src, expected = sources
    bucket = store.bucket()
    store.copy(converted[0], "ds", bucket, "ds")
    url = f"{store.scheme}://{bucket}/ds"
    name = "site0/vol00"
    key = _marker(store, bucket, name)
    if marker == "deleted":
        store.delete(bucket, key)
    doc = json.loads(store.get(bucket, f"ds/{name}/zarr.json"))
    doc["attributes"]["mist"]["complete"] = False
    store.put(bucket, f"ds/{name}/zarr.json", json.dumps(doc).encode())
    store.delete(bucket, f"ds/{name}/image/c/1/0/0")
    store.put(bucket, f"ds/{name}/image/c/2/0/0", b"not a codestream")
    store.put(bucket, f"ds/{name}/image/c/9/0/0", b"left by an older write")

    with pytest.raises(mist_zarr.IncompleteImageError):
        mist_zarr.read_image(f"{url}/{name}", storage_options=store.options)
    rows = {r["path"]: r["complete"] for r in list_images(url, storage_options=store.options)}
    assert rows == {n: n != name for n in expected}
    scanned = mist_zarr.catalog.catalog(url, refresh=True, storage_options=store.options)
    assert dict(zip(scanned.path, scanned.complete)) == rows

    before = store.versions(bucket)
    again = convert(src, url, skip_existing=True, storage_options=store.options)
    assert again.ok, again.summary()
    assert {r.path: r.status for r in again.converted} == {
        n: "converted" if n == name else "existing" for n in expected}
    after = store.versions(bucket)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed <= {k for k in changed if k.startswith(f"ds/{name}/")} | {key, f"ds/{CATALOG}"}
    assert key in changed and f"ds/{name}/zarr.json" in changed
    assert f"ds/{name}/image/c/9/0/0" not in store.keys(bucket)  # the old image was removed

    for n, data in expected.items():
        np.testing.assert_array_equal(
            mist_zarr.read_image(f"{url}/{n}", storage_options=store.options), data)
    stored = mist_zarr.catalog.catalog(url, storage_options=store.options)
    assert list(stored.path) == sorted(expected) and stored.complete.all()


def test_listing_sees_images_another_writer_added(store, converted):
    """fsspec shares one filesystem per process and s3fs, gcsfs cache listings:
    a dataset listed once must still show images written since by others."""
    bucket = store.bucket()
    store.copy(converted[0], "ds", bucket, "ds")
    url = f"{store.scheme}://{bucket}/ds"
    first = [r["path"] for r in list_images(url, storage_options=store.options)]
    assert list(build_catalog(url, storage_options=store.options).path) == first
    # another writer (here: plain S3 copies) adds an image in a new folder and one
    # in an existing folder
    store.copy(bucket, "ds/site0/vol01", bucket, "ds/later/vol01")
    store.copy(bucket, "ds/site0/vol01", bucket, "ds/site0/again")
    store.put(bucket, "ds/later/zarr.json", store.get(bucket, "ds/site0/zarr.json"))
    now = sorted(first + ["later/vol01", "site0/again"])
    assert [r["path"] for r in list_images(url, storage_options=store.options)] == now
    assert list(build_catalog(url, storage_options=store.options).path) == now
    assert list(mist_zarr.catalog.catalog(url, refresh=True, storage_options=store.options).path) == now


def test_killed_cli_convert_into_s3_resumes(s3, tmp_path):
    """SIGKILL a ``mist-zarr convert`` writing to S3 (endpoint and keys from the
    environment, as a user's CLI run gets them); the rerun finishes the rest."""
    expected = {}
    for i in range(8):
        data = np.random.default_rng(100 + i).integers(-1000, 2000, (160, 144, 12),
                                                       dtype=np.int16)
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"v{i}.nii.gz")
        expected[f"v{i}"] = data.T
    bucket = s3.bucket()
    url = f"s3://{bucket}/ds"
    env = {**os.environ, "AWS_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    env.pop("AWS_PROFILE", None)
    proc = subprocess.Popen([sys.executable, "-m", "mist_zarr.cli", "convert", str(tmp_path),
                             url, "-q", "--threads", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(s3.keys(bucket, f"ds/{DONE_DIR}/")) >= 3:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    markers = s3.keys(bucket, f"ds/{DONE_DIR}/")
    assert 3 <= len(markers) < len(expected), "the kill should land midway"
    done = [json.loads(s3.get(bucket, k))["images"][0] for k in markers]
    complete = {r["path"]: r["complete"] for r in list_images(url, storage_options=s3.options)}
    assert all(complete[n] for n in done)  # the marker is written after the image

    before = s3.versions(bucket)
    again = convert(tmp_path, url, skip_existing=True, storage_options=s3.options)
    assert again.ok, again.summary()
    status = {r.path: r.status for r in again.converted}
    assert sorted(status) == sorted(expected)
    assert all(status[n] == "existing" for n in done)
    after = s3.versions(bucket)
    for n in done:  # finished images are not touched
        assert {k: v for k, v in after.items() if k.startswith(f"ds/{n}/")} == \
            {k: v for k, v in before.items() if k.startswith(f"ds/{n}/")}
    for name, data in expected.items():
        np.testing.assert_array_equal(
            mist_zarr.read_image(f"{url}/{name}", storage_options=s3.options), data)
    assert list(mist_zarr.catalog.catalog(url, storage_options=s3.options).path) == sorted(expected)


def test_distributed_convert_into_s3(s3, tmp_path):
    """Two worker processes write into the bucket, into a folder this process
    listed before; it then lists and reads everything they wrote."""
    expected = {}
    for group, count in (("a", 1), ("b", 4)):
        for i in range(count):
            data = np.random.default_rng(200 + 10 * (group == "b") + i).integers(
                0, 4000, (120, 110, 6), dtype=np.uint16)
            path = tmp_path / group / "scans" / f"{group}{i}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, np.eye(4)), path)
            expected[f"scans/{group}{i}"] = data.T
    bucket = s3.bucket()
    url = f"s3://{bucket}/ds"
    assert convert(tmp_path / "a", url, storage_options=s3.options).ok
    assert [r["path"] for r in list_images(url, storage_options=s3.options)] == ["scans/a0"]
    report = convert(tmp_path / "b", url, workers=2, storage_options=s3.options)
    assert report.ok, report.summary()
    assert sorted(r.path for r in report.converted) == [f"scans/b{i}" for i in range(4)]
    assert [r["path"] for r in list_images(url, storage_options=s3.options)] == sorted(expected)
    assert list(mist_zarr.catalog.catalog(url, storage_options=s3.options).path) == sorted(expected)
    assert list(mist_zarr.catalog.catalog(url, refresh=True, storage_options=s3.options).path) == \
        sorted(expected)
    for name, data in expected.items():
        np.testing.assert_array_equal(
            mist_zarr.read_image(f"{url}/{name}", storage_options=s3.options), data)
    again = convert(tmp_path / "b", url, workers=2, skip_existing=True,
                    storage_options=s3.options)
    assert [r.status for r in again.converted] == ["existing"] * 4


def test_real_dicom_series_into_s3(s3, ct_volume):
    import pydicom

    series = shared("ct", "CRLM-CT-1004")
    bucket = s3.bucket()
    url = f"s3://{bucket}/ds"
    report = convert(series, url, storage_options=s3.options)
    assert report.ok, report.summary()
    [result] = report.converted
    assert result.source_format == "dicom" and tuple(result.shape) == ct_volume.shape
    image = f"{url}/{result.path}"
    np.testing.assert_array_equal(mist_zarr.read_image(image, storage_options=s3.options),
                                  ct_volume)
    group, info = mist_zarr.open_image(image, storage_options=s3.options)
    uids = sorted(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
                  for f in series.glob("*.dcm"))
    per_slice = mist_zarr.read_metadata(group)["dicom_per_slice"]["SOPInstanceUID"]
    assert sorted(u[0] if isinstance(u, list) else u for u in per_slice) == uids
    small = mist_zarr.open(image, scale=2, storage_options=s3.options)
    assert small.shape == info.level_shape(2)
    df = mist_zarr.catalog.catalog(url, storage_options=s3.options)
    assert list(df.path) == [result.path] and list(df.modality) == ["CT"]
    assert df.series_uid[0] == info.metadata["dicom"]["0020000E"]["Value"][0]
