"""The mist-zarr command line, run as a user would."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np

import mist_zarr


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mist_zarr.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_demo_writes_and_prints_every_level(tmp_path):
    out = run("demo", "--out", str(tmp_path / "p.zarr"), "--slices", "3", "--size", "256")
    assert out.returncode == 0, out.stderr
    rows = re.findall(r"^\s+s(\d)\s+(\d+)x(\d+)x(\d+)\s.*?([\d,]+)\s+[\d.]+%$", out.stdout, re.M)
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    assert [int(r[2]) for r in rows] == [256, 128, 64]
    index = mist_zarr.read_index(mist_zarr.open_image(tmp_path / "p.zarr")[0])
    assert [int(r[4].replace(",", "")) for r in rows] == [int(index[..., k].sum()) for k in range(3)]
    assert "bit-exact" in out.stdout


def test_info_describes_a_store(tmp_path):
    mist_zarr.write_image(tmp_path / "a.zarr", np.ones((300, 200), np.uint16), spacing=(0.2, 0.3))
    out = run("info", str(tmp_path / "a.zarr"))
    assert out.returncode == 0, out.stderr
    assert "('y', 'x') (300, 200)" in out.stdout and "uint16" in out.stdout
    assert re.search(r"s2\s+75x50", out.stdout)


def test_errors_name_the_input_and_exit_nonzero(tmp_path):
    out = run("info", str(tmp_path / "missing.zarr"))
    assert out.returncode == 2 and "missing.zarr" in out.stderr and "Traceback" not in out.stderr
