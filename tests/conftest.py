"""Shared fixtures: the shared real-data directory and small generated images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MIST_DATA", REPO.parent / "shared" / "data"))
TESTS = Path(__file__).resolve().parent
TEST_DATA = TESTS / "data"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--mist-data", default=str(DATA_DIR),
                     help="directory of the shared real images (default: ../shared/data or $MIST_DATA)")


@pytest.fixture(scope="session")
def data_dir(request: pytest.FixtureRequest) -> Path:
    path = Path(request.config.getoption("--mist-data"))
    if not path.is_dir():
        pytest.skip(f"shared real data not found at {path} (set MIST_DATA or --mist-data)")
    return path


def shared(*parts: str) -> Path:
    """Path in the shared data set, or a skip naming what is missing."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} is not available")
    return path


@pytest.fixture(scope="session")
def ct_volume() -> np.ndarray:
    """The real CT series CRLM-CT-1004 (41 x 512 x 512 int16, stored values)."""
    import pydicom

    files = sorted(shared("ct", "CRLM-CT-1004").rglob("*.dcm"))
    if not files:
        pytest.skip("no DICOM files in ct/CRLM-CT-1004")
    slices = [pydicom.dcmread(f) for f in files]
    slices.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    return np.stack([d.pixel_array for d in slices])


@pytest.fixture(scope="session")
def long_ct_series(tmp_path_factory: pytest.TempPathFactory):
    """``make(slices)``: a folder holding one DICOM series of ``slices`` slices, the shared
    CT's slices repeated with new SOPInstanceUIDs and positions continuing the spacing
    (built by the conversion benchmark's own ``build_long``; one folder per size)."""
    import importlib.util
    import sys

    data = shared("ct", "CRLM-CT-1004").parents[1]
    spec = importlib.util.spec_from_file_location("_mist_bench_convert",
                                                  REPO / "benchmarks" / "bench_convert.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # (its dataclasses look their module up)
    spec.loader.exec_module(bench)
    made: dict[int, Path] = {}

    def make(slices: int) -> Path:
        if slices not in made:
            made[slices] = tmp_path_factory.mktemp("long-ct") / f"series-{slices}"
            bench.build_long(data, slices, made[slices])
        return made[slices]

    return make


@pytest.fixture(scope="session")
def phantom() -> np.ndarray:
    from mist_zarr.phantom import ct_phantom

    return ct_phantom((6, 300, 260))


@pytest.fixture
def written(tmp_path, phantom):
    """A small image written to ``tmp_path/img.zarr`` (6 x 300 x 260, 3 levels) whose
    slice 3 is all fill value, so its chunk is absent: (path, volume, info)."""
    import mist_zarr

    vol = phantom.copy()
    vol[3] = 0
    info = mist_zarr.write_image(tmp_path / "img.zarr", vol, spacing=(3.0, 0.8, 0.8))
    return tmp_path / "img.zarr", vol, info


@pytest.fixture(scope="session")
def clean_python(tmp_path_factory: pytest.TempPathFactory):
    """Run a client script as a user without mist-zarr would: ``python -I -S script.py``
    with sys.path = the standard library plus a copy (symlinks) of site-packages
    that leaves out mist-zarr and every ``.pth`` file (the editable install's hook).
    The scripts in tests/clients/ assert that mist_zarr cannot be imported."""
    import site
    import subprocess
    import sys

    farm = tmp_path_factory.mktemp("site-without-mist-zarr")
    for directory in site.getsitepackages():
        for entry in Path(directory).iterdir():
            name = entry.name.lower()
            if (name.startswith(("mist_zarr", "mist-zarr", "__editable__"))
                    or name.endswith(".pth") or (farm / entry.name).exists()):
                continue
            (farm / entry.name).symlink_to(entry)

    def run(script: str, *args: str, timeout: float = 300) -> str:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", str(TESTS / "clients" / script), *map(str, args)],
            check=False, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "MIST_CLIENT_SITE": str(farm)})
        assert proc.returncode == 0, f"{script} {args} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    return run
