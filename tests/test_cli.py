"""The mist-zarr command line, run as a user would."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

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


HEAVY = ("zarr", "numpy", "imagecodecs", "pandas", "pyarrow", "dask", "xarray", "pydicom",
         "nibabel", "highdicom", "torch")

_LOADED = """
import sys
{body}
print("LOADED:" + ",".join(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("body", [
    "import mist_zarr",
    "from mist_zarr.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    "from mist_zarr.cli import main\ntry:\n    main(['convert', '--help'])\nexcept SystemExit:\n    pass",
], ids=["import", "help", "convert-help"])
def test_start_up_loads_no_heavy_dependency(body):
    out = subprocess.run([sys.executable, "-c", _LOADED.format(body=body, heavy=HEAVY)],
                         capture_output=True, text=True, check=True).stdout
    loaded = out.rsplit("LOADED:", 1)[1].strip()
    assert loaded == "", f"loaded at start-up: {loaded}"


def test_lazy_names_are_the_functions_even_after_their_modules_load():
    import mist_zarr.convert  # noqa: F401 - the submodule, loaded first on purpose
    import mist_zarr.export  # noqa: F401
    import mist_zarr.verify  # noqa: F401

    for name in ("convert", "export", "verify"):
        assert callable(getattr(mist_zarr, name)) and not isinstance(getattr(mist_zarr, name),
                                                                    type(mist_zarr))
    assert set(mist_zarr.__all__) <= set(dir(mist_zarr))
    for name in mist_zarr.__all__:
        assert getattr(mist_zarr, name) is not None
