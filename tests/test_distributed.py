"""Conversion on dask.distributed: same result as in-process, resumable after kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import mist_zarr
from mist_zarr.convert import DONE_DIR, convert


def make_tree(root: Path, n: int, shape=(160, 144, 24)) -> dict[str, np.ndarray]:
    """n NIfTI volumes with distinct content; returns name -> stored (z, y, x) samples."""
    expected = {}
    for i in range(n):
        rng = np.random.default_rng(i)
        data = rng.integers(-1000, 2000, shape, dtype=np.int16)
        sub = root / f"site{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0])), sub / f"vol{i:02d}.nii.gz")
        expected[f"site{i % 3}/vol{i:02d}"] = data.T
    return expected


def check(dest: Path, expected: dict[str, np.ndarray]) -> None:
    rows = mist_zarr.list_images(dest)
    assert sorted(r["path"] for r in rows) == sorted(expected)
    assert all(r["complete"] for r in rows)
    for name, data in expected.items():
        np.testing.assert_array_equal(mist_zarr.read_image(dest / name), data)
    assert mist_zarr.verify(dest, workers=1).ok


def test_local_cluster_gives_the_same_dataset(tmp_path):
    from mist_zarr.catalog import read_failures

    expected = make_tree(tmp_path / "src", 6)
    broken = tmp_path / "src" / "site1" / "broken.nii.gz"
    broken.write_bytes((tmp_path / "src" / "site0" / "vol00.nii.gz").read_bytes()[:5000])
    report = convert(tmp_path / "src", tmp_path / "ds", workers=2)
    assert len(report.converted) == 6 and [p.key for p in report.failed] == [str(broken)]
    failures = read_failures(tmp_path / "ds")  # the failure report next to the catalog
    assert failures["key"].tolist() == [str(broken)] and "broken.nii.gz" in failures["reason"][0]
    check(tmp_path / "ds", expected)
    again = convert(tmp_path / "src", tmp_path / "ds", workers=2, skip_existing=True)
    assert [r.status for r in again.converted] == ["existing"] * 6


def test_own_cluster_runs_workers_without_the_profiler(tmp_path, monkeypatch):
    # the worker's statistical profiler keeps a call tree per second of work:
    # worker memory would grow with the number of series converted
    import distributed

    seen = []

    class Recording(distributed.LocalCluster):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            with distributed.Client(self) as client:
                seen.extend(client.run(
                    lambda dask_worker: "profile" in dask_worker.periodic_callbacks).values())

    monkeypatch.setattr(distributed, "LocalCluster", Recording)
    expected = make_tree(tmp_path / "src", 2)
    report = convert(tmp_path / "src", tmp_path / "ds", workers=2)
    assert report.ok and len(report.converted) == 2
    assert seen == [False, False]
    check(tmp_path / "ds", expected)


def test_sigkill_midway_then_rerun_completes_everything_once(tmp_path):
    expected = make_tree(tmp_path / "src", 12)
    cmd = [sys.executable, "-m", "mist_zarr.cli", "convert", str(tmp_path / "src"),
           str(tmp_path / "ds"), "-q", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = tmp_path / "ds" / DONE_DIR
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if done.is_dir() and len(list(done.iterdir())) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(done.iterdir()))
    assert 3 <= finished < 12, "the kill should land midway"
    report = convert(tmp_path / "src", tmp_path / "ds", skip_existing=True)
    assert report.ok
    assert sum(r.status == "existing" for r in report.converted) >= finished
    check(tmp_path / "ds", expected)


def test_a_killed_worker_does_not_lose_or_duplicate_series(tmp_path):
    from distributed import LocalCluster

    expected = make_tree(tmp_path / "src", 10)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        pids = [w.process.pid for w in cluster.workers.values()]
        done = tmp_path / "ds" / DONE_DIR
        killed = []

        def kill_one_worker():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if done.is_dir() and len(list(done.iterdir())) >= 2:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_one_worker)
        killer.start()
        report = convert(tmp_path / "src", tmp_path / "ds", scheduler=cluster.scheduler_address)
        killer.join()
    assert killed, "the worker was not killed"
    assert report.ok, report.summary()
    assert not (tmp_path / "ds" / ".mist-tmp").exists()  # the killed worker's scratch is gone
    check(tmp_path / "ds", expected)


def test_remote_destination_via_fsspec_memory():
    pytest.importorskip("fsspec")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        expected = make_tree(Path(tmp), 2, shape=(70, 80, 5))
        dest = f"memory://mist-test-{os.getpid()}/ds"
        report = convert(tmp, dest)
        assert report.ok
        for name, data in expected.items():
            np.testing.assert_array_equal(mist_zarr.read_image(f"{dest}/{name}"), data)
        assert sorted(r["path"] for r in mist_zarr.list_images(dest)) == sorted(expected)


def test_progress_bar_counts_series_done_across_workers(tmp_path):
    make_tree(tmp_path / "src", 3, shape=(64, 64, 4))
    run = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "convert", str(tmp_path / "src"),
                          str(tmp_path / "ds"), "--workers", "2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    states = [s for s in run.stderr.replace("\r", "\n").splitlines() if s.startswith("convert:")]
    assert any("3/3" in s and "3 images, 0 failed" in s and "MB in ->" in s for s in states), states
    assert any("1/3" in s for s in states) and "series" in states[-1]


def test_one_series_with_workers_runs_here_without_a_cluster(tmp_path, monkeypatch):
    # a cluster costs seconds of start-up and one unit has nothing to share
    import distributed

    def refuse(*args, **kwargs):
        raise AssertionError("a cluster was started for a single series")

    monkeypatch.setattr(distributed, "LocalCluster", refuse)
    expected = make_tree(tmp_path / "src", 1)
    report = convert(tmp_path / "src", tmp_path / "ds", workers=2)
    assert report.ok and len(report.converted) == 1
    check(tmp_path / "ds", expected)
