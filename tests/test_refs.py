"""``mist-zarr refs``: every level as an fsspec reference file (kerchunk JSON), read from a
static server by clients without mist-zarr, and decoded by imagecodecs' numcodecs codec."""

from __future__ import annotations

import json
import subprocess
import sys

import imagecodecs
import imagecodecs.numcodecs
import numcodecs
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mist_zarr
from mist_zarr.refs import level_refs, write_refs
from mist_zarr.serve import serve_in_thread


@pytest.fixture(scope="module")
def ct_image(tmp_path_factory, ct_volume):
    root = tmp_path_factory.mktemp("static")
    mist_zarr.write_image(root / "ct.zarr", ct_volume, spacing=(2.5, 0.78, 0.78))
    return root / "ct.zarr"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mist_zarr.cli", *args],
                          check=False, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_reference_files_on_a_static_server_read_every_level_by_prefix(
        ct_image, clean_python, tmp_path, zarr_format):
    info = mist_zarr.open_image(ct_image)[1]
    index = mist_zarr.read_index(ct_image)
    root = ct_image.parent
    refs = root / f"refs-v{zarr_format}"
    # the project's server here only serves files: the references point at the physical chunks
    with serve_in_thread(root) as server:
        done = cli("refs", str(ct_image), str(refs), "--all", "--url", f"{server.url}/ct.zarr",
                   "--zarr-format", str(zarr_format))
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in refs.iterdir()) == [f"s{k}.json"
                                                        for k in range(info.levels + 1)]
        for k in range(info.levels + 1):
            server.reset_counters()
            out = tmp_path / f"s{k}"
            out.mkdir()
            clean_python("read_refs.py", f"{server.url}/{refs.name}/s{k}.json", zarr_format, out)
            records, sent = server.requests, server.bytes_sent
            np.testing.assert_array_equal(np.load(out / "image.npy"),
                                          mist_zarr.open(ct_image, scale=k).values)
            np.testing.assert_allclose(np.load(out / "y.npy"),
                                       np.arange(info.level_shape(k)[1]) * 0.78 * 2**k)
            chunks = [r for r in records if "/image/c/" in r.path]
            assert len(chunks) == info.shape[0]
            for r in chunks:
                z = int(r.path.split("/")[-3])
                assert r.status == 206 and r.body_len == index[z, 0, 0, k], r
            refs_bytes = (refs / f"s{k}.json").stat().st_size
            assert sent == int(index[..., k].sum()) + refs_bytes, records


def test_refs_of_one_level_to_a_file_and_a_missing_level(ct_image, tmp_path):
    info = mist_zarr.open_image(ct_image)[1]
    done = cli("refs", str(ct_image), str(tmp_path / "two.json"), "--level", "2")
    assert done.returncode == 0, done.stderr
    doc = json.loads((tmp_path / "two.json").read_text())
    assert doc["version"] == 1
    assert json.loads(doc["refs"]["image/zarr.json"])["shape"] == list(info.level_shape(2))
    url, offset, length = doc["refs"]["image/c/5/0/0"]
    assert url == (ct_image / "image" / "c" / "5" / "0" / "0").resolve().as_uri()
    assert (offset, length) == (0, mist_zarr.read_index(ct_image)[5, 0, 0, 2])
    done = cli("refs", str(ct_image), str(tmp_path / "x.json"), "--level", str(info.levels + 1))
    assert done.returncode == 2
    assert f"level {info.levels + 1} does not exist" in done.stderr
    assert not (tmp_path / "x.json").exists()


def check_numcodecs_decodes(image, chunk: tuple[int, ...]) -> None:
    """Each level's v2 ``.zarray`` compressor, through numcodecs.get_codec, decodes the
    stored chunk's indexed prefix to that level's samples (level 0: the stored chunk)."""
    imagecodecs.numcodecs.register_codecs()
    info = mist_zarr.open_image(image)[1]
    stored = (image / "image" / "c").joinpath(*map(str, chunk)).read_bytes()
    full = mist_zarr.read_image(image)
    for k in range(info.levels + 1):
        refs = level_refs(image, k, zarr_format=2)["refs"]
        config = json.loads(refs["image/.zarray"])["compressor"]
        assert config["id"] == "imagecodecs_htj2k" and config.get("skipres", 0) == k
        codec = numcodecs.get_codec(config)
        _, offset, length = refs["image/" + "/".join(map(str, chunk))]
        assert offset == 0
        decoded = codec.decode(stored[:length])
        np.testing.assert_array_equal(decoded, imagecodecs.htj2k_decode(stored[:length],
                                                                         skipres=k))
        level = np.asarray(mist_zarr.open(image, scale=k).values)
        plane = level[chunk[:-2]] if k else full[chunk[:-2]]
        np.testing.assert_array_equal(decoded, plane)


def test_numcodecs_codec_decodes_a_real_ct_chunk_at_every_level(ct_image):
    check_numcodecs_decodes(ct_image, (20, 0, 0))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(y=st.integers(64, 300), x=st.integers(64, 300), slices=st.integers(1, 3),
       dtype=st.sampled_from(["int8", "int16", "int32"]), seed=st.integers(0, 2**32 - 1))
def test_numcodecs_codec_decodes_generated_chunks_at_every_level(tmp_path_factory, y, x, slices,
                                                                 dtype, seed):
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -3000), min(info.max, 3000)
    a = np.random.default_rng(seed).integers(lo // 2, hi // 2, (slices, y, x), dtype=dtype)
    image = tmp_path_factory.mktemp("gen") / "a.zarr"
    mist_zarr.write_image(image, a)
    check_numcodecs_decodes(image, (slices - 1, 0, 0))


def test_kerchunk_and_virtualizarr_accept_the_files(ct_image, tmp_path):
    import zarr

    kerchunk_utils = pytest.importorskip("kerchunk.utils")
    imagecodecs.numcodecs.register_codecs()
    written = {f: write_refs(ct_image, tmp_path / f"v{f}", levels=[1], zarr_format=f)[0]
               for f in (2, 3)}
    level1 = mist_zarr.open(ct_image, scale=1).values
    for zarr_format, path in written.items():
        store = kerchunk_utils.refs_as_store(json.loads(path.read_text()))
        group = zarr.open_group(store, mode="r", zarr_format=zarr_format)
        np.testing.assert_array_equal(group["image"][...], level1)
    virtualizarr = pytest.importorskip("virtualizarr")
    from obspec_utils.registry import ObjectStoreRegistry
    from obstore.store import LocalStore
    from virtualizarr.parsers import KerchunkJSONParser

    vds = virtualizarr.open_virtual_dataset(
        written[3].as_uri(), registry=ObjectStoreRegistry({"file://": LocalStore()}),
        parser=KerchunkJSONParser(), loadable_variables=["image", "z", "y", "x"])
    np.testing.assert_array_equal(vds["image"].values, level1)
    assert float(vds["y"][1]) == pytest.approx(0.78 * 2)
