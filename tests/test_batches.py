"""Large DICOM stacks are read and written in slice batches: same image, bounded memory."""

from __future__ import annotations

import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
import zarr

import mist_zarr
from mist_zarr.converters.base import LazyPlanes
from mist_zarr.converters.dicom import DicomError, read_dicom_series, scan_dicom
from mist_zarr.convert import convert

from .conftest import shared

SERIES = [
    ("ct", "CRLM-CT-1004"),  # native little endian, 41 slices
    ("ct", "TotalSegmentator-example-j2k"),  # JPEG 2000 lossless, 20 slices
    ("mr", "dcm_qa_nih", "In", "20180918GE", "mr_0004"),  # GE EPI time series: (t, z, y, x)
]


def only_series(path: Path):
    scan = scan_dicom(sorted(p for p in path.rglob("*") if p.is_file()))
    assert len(scan.series) == 1, scan.series
    return scan.series[0]


@pytest.mark.parametrize("parts", SERIES, ids=lambda p: p[-1])
def test_batched_read_equals_the_whole_read(parts):
    ref = only_series(shared(*parts))
    [whole] = read_dicom_series(ref)
    entry_bytes = whole.data[0].nbytes  # a slice, or a volume of a time series
    [lazy] = read_dicom_series(ref, batch_bytes=3 * entry_bytes)
    assert isinstance(lazy.data, LazyPlanes)
    assert lazy.data.batches[0] == (0, 3) and len(lazy.data.batches) == -(-len(whole.data) // 3)
    assert lazy.data.shape == whole.data.shape and lazy.data.dtype == whole.data.dtype
    assert lazy.data.value_range == (whole.data.min(), whole.data.max())
    np.testing.assert_array_equal(np.asarray(lazy.data), whole.data)
    # everything else the metadata records comes from the first pass, unchanged
    for field in ("dims", "spacing", "metadata", "per_slice", "warnings", "notes",
                  "source_files", "lossy_source", "photometric", "name"):
        assert getattr(lazy, field) == getattr(whole, field), field
    np.testing.assert_array_equal(lazy.affine, whole.affine)
    # below the threshold the stack is read whole
    [small] = read_dicom_series(ref, batch_bytes=whole.data.nbytes)
    assert isinstance(small.data, np.ndarray)


@pytest.mark.parametrize("parts", SERIES, ids=lambda p: p[-1])
def test_batched_convert_writes_the_same_chunks(parts, tmp_path):
    src = shared(*parts)
    whole = convert(src, tmp_path / "whole", batch_bytes=None)
    batched = convert(src, tmp_path / "batched", batch_bytes=4 << 20)
    assert whole.ok and batched.ok
    [a], [b] = whole.converted, batched.converted
    assert a.path == b.path and a.shape == b.shape and a.bytes_out == b.bytes_out
    ga, gb = zarr.open_group(tmp_path / "whole" / a.path), zarr.open_group(tmp_path / "batched" / b.path)
    np.testing.assert_array_equal(ga["index"][...], gb["index"][...])
    np.testing.assert_array_equal(ga["checksum"][...], gb["checksum"][...])
    assert dict(ga.attrs)["mist"]["values"] == dict(gb.attrs)["mist"]["values"]
    np.testing.assert_array_equal(mist_zarr.read_image(tmp_path / "batched" / b.path),
                                  mist_zarr.read_image(tmp_path / "whole" / a.path))
    assert mist_zarr.verify(tmp_path / "batched", workers=1, source=src).ok


def test_a_source_changed_between_the_passes_is_refused_and_not_completed(tmp_path):
    src = tmp_path / "ct"
    shutil.copytree(shared("ct", "CRLM-CT-1004"), src)
    ref = only_series(src)
    [lazy] = read_dicom_series(ref, batch_bytes=8 << 20)
    assert isinstance(lazy.data, LazyPlanes) and len(lazy.data.batches) > 1
    # after the survey pass, one file of the last batch gets a value beyond the range
    victim = lazy.source_files[-1]
    ds = pydicom.dcmread(victim)
    pixels = ds.pixel_array.copy()
    pixels[0, 0] = lazy.data.value_range[1] + 1
    ds.PixelData = pixels.tobytes()
    ds.save_as(victim)
    with pytest.raises(ValueError, match="source changed"):
        mist_zarr.write_image(tmp_path / "out", lazy.data, dims=lazy.dims)
    with pytest.raises(ValueError, match="not complete|incomplete"):
        mist_zarr.read_image(tmp_path / "out")


def test_lazy_planes_are_written_one_batch_at_a_time(tmp_path):
    """Traced memory while writing a 32 MiB volume in 1 MiB batches stays near one batch."""
    shape, step = (128, 256, 512), 4  # int16: 256 KiB per plane, 1 MiB per batch
    rng = np.random.default_rng(0)
    noise = rng.integers(-200, 200, shape[1:], dtype=np.int16)
    calls = []

    def read(start: int, stop: int) -> np.ndarray:
        calls.append((start, stop))
        z = np.arange(start, stop, dtype=np.int16)[:, None, None]
        return noise[None] + z

    batches = [(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]
    lazy = LazyPlanes(shape, np.int16, batches, read, (-200, 199 + shape[0] - 1))
    tracemalloc.start()
    try:
        info = mist_zarr.write_image(tmp_path / "img", lazy, threads=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert calls == batches  # each batch read once, in order
    volume_bytes = int(np.prod(shape)) * 2
    assert peak < volume_bytes / 4, f"peak traced {peak / 2**20:.1f} MiB for a 32 MiB volume"
    back = mist_zarr.read_image(tmp_path / "img")
    np.testing.assert_array_equal(back, np.asarray(lazy))
    assert info.values.kind == "identity"


@pytest.mark.parametrize("batches", [[], [(0, 2)], [(0, 2), (3, 4)], [(0, 2), (2, 2), (2, 4)]])
def test_lazy_planes_refuse_batches_that_do_not_tile(batches):
    with pytest.raises(ValueError, match="do not tile"):
        LazyPlanes((4, 8, 8), np.uint8, batches, lambda a, b: None, (0, 1))


def test_a_batch_of_the_wrong_shape_is_refused(tmp_path):
    lazy = LazyPlanes((4, 64, 64), np.uint8, [(0, 2), (2, 4)],
                      lambda a, b: np.zeros((b - a, 64, 63), np.uint8), (0, 0))
    with pytest.raises(ValueError, match=r"batch \[0, 2\) read as uint8\(2, 64, 63\)"):
        mist_zarr.write_image(tmp_path / "img", lazy)


def test_dicom_errors_in_the_second_pass_name_the_slices(tmp_path):
    src = tmp_path / "ct"
    shutil.copytree(shared("ct", "CRLM-CT-1004"), src)
    [lazy] = read_dicom_series(only_series(src), batch_bytes=4 << 20)
    victim = Path(lazy.source_files[20])
    victim.write_bytes(victim.read_bytes()[:-1000])  # truncated after the survey
    with pytest.raises(DicomError, match=r"while writing slices \d+-\d+"):
        np.asarray(lazy.data)


def test_convert_of_a_series_in_batches_holds_a_fraction_of_it(tmp_path):
    """Python-traced memory (numpy arrays included) of a whole vs a batched convert."""
    src = shared("ct", "CRLM-CT-1004")  # 41 x 512 x 512 int16: 20.5 MiB decoded
    peaks = {}
    for name, batch in (("whole", None), ("batched", 2 << 20)):
        tracemalloc.start()
        try:
            assert convert(src, tmp_path / name, batch_bytes=batch, threads=2).ok
            peaks[name] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    volume = 41 * 512 * 512 * 2
    assert peaks["whole"] > volume  # the whole read holds the volume
    assert peaks["batched"] < volume / 2, peaks
