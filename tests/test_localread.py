"""Reading a local image group's documents and small arrays without zarr (start-up of
info and ls): the same values as zarr, and None where the simple reading does not apply."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec

import mist_zarr
from mist_zarr.localread import local_path, read_array, read_local_image


@pytest.mark.parametrize("shape, chunks, dtype, codecs, separator", [
    ((41, 1, 1, 4), (41, 1, 1, 4), "uint64", [BytesCodec(), ZstdCodec()], "/"),  # an index
    ((7, 5, 3), (3, 2, 3), "int32", [BytesCodec(), ZstdCodec(level=3, checksum=True)], "/"),
    ((7, 5), (4, 4), ">u2", [BytesCodec(endian="big")], "."),
    ((9,), (4,), "int8", [BytesCodec()], "/"),
])
def test_arrays_read_as_zarr_reads_them(tmp_path, shape, chunks, dtype, codecs, separator):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 100, shape).astype(dtype)
    if data.shape != chunks:  # a chunk all fill value is not stored: it reads as fill
        data[tuple(slice(0, c) for c in chunks)] = 0
    array = zarr.create_array(tmp_path / "a", shape=shape, chunks=chunks, dtype=dtype,
                              serializer=codecs[0], compressors=codecs[1:], fill_value=0,
                              chunk_key_encoding={"name": "default", "separator": separator})
    array[...] = data
    got = read_array(tmp_path / "a")
    if data.shape != chunks:
        assert not (tmp_path / "a" / separator.join(["c"] + ["0"] * len(shape))).exists()
    assert got is not None and got.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(got, zarr.open_array(tmp_path / "a", mode="r")[...])


def test_other_layouts_are_left_to_zarr(tmp_path):
    zarr.create_array(tmp_path / "blosc", shape=(4,), chunks=(2,), dtype="uint32",
                      compressors=[BloscCodec()])[...] = 1
    zarr.create_array(tmp_path / "sharded", shape=(4,), chunks=(1,), shards=(2,),
                      dtype="uint32")[...] = 1
    zarr.create_array(tmp_path / "float", shape=(4,), chunks=(2,), dtype="float32",
                      compressors=[ZstdCodec()])[...] = 1
    for name in ("blosc", "sharded", "float", "missing"):
        assert read_array(tmp_path / name) is None, name


def test_a_damaged_chunk_is_an_error_naming_it(tmp_path):
    zarr.create_array(tmp_path / "a", shape=(4, 3), chunks=(2, 3), dtype="uint64",
                      compressors=[ZstdCodec()])[...] = 7
    import imagecodecs

    (tmp_path / "a" / "c" / "1" / "0").write_bytes(imagecodecs.zstd_encode(b"\0" * 40))
    with pytest.raises(ValueError, match=r"c/1/0: the chunk holds 5 values.*6"):
        read_array(tmp_path / "a")


def test_an_image_reads_as_open_image_reads_it(written):
    written, _, _ = written  # slice 3 is all fill value: its chunk is absent, index row 0
    _, info = mist_zarr.open_image(written)
    for source in (written, str(written), f"file://{written}"):
        got_info, index = read_local_image(source)
        assert got_info.to_json() == info.to_json()
        np.testing.assert_array_equal(index, mist_zarr.read_index(written))


def test_anything_but_a_complete_local_image_is_left_to_zarr(tmp_path, written):
    written, _, _ = written
    zarr.open_group(tmp_path / "root", mode="w", zarr_format=3).attrs["mist_dataset"] = {}
    mist_zarr.write_image(tmp_path / "open.zarr", np.ones((4, 64, 64), np.int16))
    group = zarr.open_group(tmp_path / "open.zarr", mode="a", zarr_format=3)
    group.attrs["mist"] = {**group.attrs["mist"], "complete": False}
    for source in (tmp_path / "missing", tmp_path / "root", tmp_path / "open.zarr",
                   f"http://127.0.0.1:1/{written.name}", written / "index"):
        assert read_local_image(source) is None, source
    assert local_path("s3://bucket/x") is None and local_path("file:///a/b").as_posix() == "/a/b"
