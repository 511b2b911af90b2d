"""One image written in parts (slice ranges) by several workers: the same bytes as one writer,
completion marked last, a failed or killed part fails the image (issue 16)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr

import mist_zarr
from mist_zarr.convert import Options, convert, plan, read_unit, write_unit
from mist_zarr.convert.split import PartPool, part_ranges, write_split
from mist_zarr.errors import IncompleteImageError
from mist_zarr.layout import DEFAULT_ALPHA
from mist_zarr.phantom import ct_phantom
from mist_zarr.storage import get_json
from mist_zarr.writer import begin_image, finish_image, plan_image, write_image, write_part

REPO = Path(__file__).resolve().parents[1]
SPLIT = 16 << 20  # a small threshold, so that a few hundred slices are split


def image_files(image: Path) -> dict[str, bytes]:
    """Every file of an image group but its group document (which holds the write id)."""
    return {str(p.relative_to(image)): p.read_bytes() for p in sorted(image.rglob("*"))
            if p.is_file() and p.relative_to(image) != Path("zarr.json")}


def only_image(root: Path) -> Path:
    (row,) = mist_zarr.list_images(root)
    return root / row["path"]


def assert_same_image(a: Path, b: Path) -> None:
    files_a, files_b = image_files(a), image_files(b)
    assert sorted(files_a) == sorted(files_b)
    assert any(k.startswith("image/c/") for k in files_a)
    different = [k for k in files_a if files_a[k] != files_b[k]]
    assert not different, f"{len(different)} files differ, e.g. {different[:3]}"
    for name in ("index", "checksum"):  # the same bytes decode to the same rows
        np.testing.assert_array_equal(zarr.open_array(a / name, mode="r")[...],
                                      zarr.open_array(b / name, mode="r")[...])
    info_a, info_b = (json.loads((p / "zarr.json").read_text())["attributes"]["mist"]
                      for p in (a, b))
    for doc in (info_a, info_b):
        doc.pop("write_id")
        doc["metadata"].pop("convert_run", None)
    assert info_a == info_b and info_a["complete"]


def test_parts_in_any_order_make_the_bytes_of_one_write(tmp_path):
    volume = ct_phantom((9, 300, 260))
    volume[4] = 0  # an all-fill slice: its chunk is absent in both
    kwargs = dict(spacing=(2.0, 0.7, 0.7), metadata={"per_slice": {"n": list(range(9))}})
    write_image(tmp_path / "one", volume, **kwargs)
    plan = plan_image(volume, **kwargs)
    begin_image(tmp_path / "parts", plan)
    with pytest.raises(IncompleteImageError):
        mist_zarr.read_image(tmp_path / "parts")
    rows = [write_part(tmp_path / "parts", volume[a:b], plan.info, a) for a, b in [(5, 9), (0, 3),
                                                                                  (3, 5)]]
    with pytest.raises(IncompleteImageError):  # every chunk is there, the mark is not
        mist_zarr.read_image(tmp_path / "parts")
    info = finish_image(tmp_path / "parts", plan, rows)
    assert info.complete
    assert_same_image(tmp_path / "one", tmp_path / "parts")
    np.testing.assert_array_equal(mist_zarr.read_image(tmp_path / "parts"), volume)


def test_parts_must_cover_the_image_and_belong_to_it(tmp_path):
    volume = ct_phantom((6, 128, 128))
    plan = plan_image(volume)
    begin_image(tmp_path / "img", plan)
    rows = [write_part(tmp_path / "img", volume[a:b], plan.info, a) for a, b in [(0, 2), (4, 6)]]
    with pytest.raises(ValueError, match=r"leading indices \[2, 4\) unwritten"):
        finish_image(tmp_path / "img", plan, rows)
    other = plan_image(volume)  # another write of the same image: another write id
    with pytest.raises(ValueError, match="not the image being written"):
        write_part(tmp_path / "img", volume[2:4], other.info, 2)
    with pytest.raises(ValueError, match=r"part \[5, 7\)"):
        write_part(tmp_path / "img", volume[4:6], plan.info, 5)
    with pytest.raises(IncompleteImageError):
        mist_zarr.read_image(tmp_path / "img")


def test_in_place_parts_mark_an_object_store_image_complete_last():
    # an object store has no rename: the image is written in place, its flag last
    store = zarr.storage.MemoryStore()
    volume = ct_phantom((7, 256, 256))
    dest = zarr.storage.StorePath(store, "ds/img")
    seen = []

    def submit(fn, *args, **kwargs):
        seen.append(get_json(store, "ds/img/zarr.json")["attributes"]["mist"]["complete"])
        return pool.submit(fn, *args, **kwargs)

    with ThreadPoolExecutor(2) as pool:
        info = write_split(dest, volume, submit=submit, parts=3, label="series X",
                           spacing=(1.0, 0.5, 0.5))
    assert seen == [False, False, False] and info.complete
    np.testing.assert_array_equal(mist_zarr.read_image(dest), volume)


def test_part_ranges_cover_the_axis():
    assert part_ranges(10, 4) == [(0, 2), (2, 5), (5, 8), (8, 10)]
    assert part_ranges(3, 8) == [(0, 1), (1, 2), (2, 3)]


def test_a_1000_slice_series_split_over_workers_equals_one_writer(tmp_path, long_ct_series):
    src = long_ct_series(1000)
    one = convert(src, tmp_path / "one")
    split = convert(src, tmp_path / "split", workers=2)
    assert one.ok and split.ok, split.summary()
    assert [r.parts for r in one.converted] == [1]
    assert [r.parts for r in split.converted] == [4]  # two per worker
    assert split.converted[0].shape == (1000, 512, 512)
    assert_same_image(only_image(tmp_path / "one"), only_image(tmp_path / "split"))
    assert not (tmp_path / "split" / ".mist-tmp").exists()


def test_a_failed_part_fails_the_image_naming_series_and_slices(tmp_path, long_ct_series):
    src = long_ct_series(164)
    units, _ = plan(src)
    options = Options(overwrite=False, skip_existing=False, alpha=DEFAULT_ALPHA, quantize=None,
                      max_bytes=8 << 30, batch_bytes=SPLIT, threads=None, run="run",
                      storage_options=None, split_bytes=SPLIT, parts=4)
    read = read_unit(units[0], tmp_path / "ds", options)
    # the file of slice 100 changes after the series was read: its part cannot read it
    (src / "IM00100.dcm").rename(tmp_path / "IM00100.dcm")
    try:
        (src / "IM00100.dcm").write_bytes(b"not DICOM any more")
        pool = PartPool(2)
        try:
            results, problems = write_unit(units[0], tmp_path / "ds", options, read, pool.submit)
        finally:
            pool.close()
    finally:
        (tmp_path / "IM00100.dcm").replace(src / "IM00100.dcm")
    assert not results
    (problem,) = problems
    assert units[0].key in problem.reason and "writing slices 82-122 failed" in problem.reason
    assert "IM00100.dcm" in problem.reason
    assert mist_zarr.list_images(tmp_path / "ds") == []
    assert not (tmp_path / "ds" / ".mist-tmp").exists()  # the scratch image is removed


def part_workers(pid: int) -> list[psutil.Process]:
    """The part workers the conversion ``pid`` started (its ``python -c`` children)."""
    try:
        return [c for c in psutil.Process(pid).children()
                if "mist_zarr.convert.split" in " ".join(c.cmdline())]
    except psutil.NoSuchProcess:
        return []


def test_killing_a_worker_mid_series_leaves_no_complete_image(tmp_path, long_ct_series):
    src = long_ct_series(328)
    script = ("import json\nfrom mist_zarr.convert import convert\n"  # (unguarded, as users write)
              f"r = convert({str(src)!r}, {str(tmp_path / 'ds')!r}, workers=2, "
              f"split_bytes={SPLIT}, batch_bytes={SPLIT})\n"
              "print(json.dumps([p.reason for p in r.failed]))\n")
    (tmp_path / "run.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py")], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    scratch, killed = tmp_path / "ds" / ".mist-tmp", None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and killed is None:
        chunks = [p for p in scratch.rglob("image/c/*")] if scratch.is_dir() else []
        workers = part_workers(proc.pid)
        if chunks and workers:  # parts are being written
            killed = workers[0].pid
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.005)
    out, _ = proc.communicate(timeout=120)
    assert killed is not None, "no worker was killed: the series finished first"
    (reason,) = json.loads(out)
    assert "failed: WorkerDied: its worker process died (killed by SIGKILL)" in reason
    assert "the image was not completed" in reason
    assert mist_zarr.list_images(tmp_path / "ds") == []  # nothing reads as an image
    again = convert(src, tmp_path / "ds", workers=2, split_bytes=SPLIT, batch_bytes=SPLIT)
    assert again.ok and again.converted[0].parts == 4
    convert(src, tmp_path / "one")
    assert_same_image(only_image(tmp_path / "one"), only_image(tmp_path / "ds"))


def test_an_existing_cluster_writes_the_parts(tmp_path, long_ct_series):
    from distributed import LocalCluster

    src = long_ct_series(164)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        report = convert(src, tmp_path / "ds", scheduler=cluster.scheduler_address,
                         split_bytes=SPLIT)
    assert report.ok, report.summary()
    assert report.converted[0].parts == 4  # two per worker thread
    convert(src, tmp_path / "one")
    assert_same_image(only_image(tmp_path / "one"), only_image(tmp_path / "ds"))
