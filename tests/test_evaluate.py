"""benchmarks/evaluate.py --quick on a small generated data directory (no shared data needed)."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "evaluate.py"

pytest.importorskip("matplotlib", reason="the evaluation needs the bench extra (matplotlib)")
pytest.importorskip("skimage", reason="the evaluation needs the bench extra (scikit-image)")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-slice CT phantom as NIfTI and two 8-bit PNG radiographs, laid out as the
    shared data set is (nifti/, radiographs/nih-cxr14-png/); no DICOM, no MR."""
    import imagecodecs
    import nibabel as nib

    from mist_zarr.phantom import ct_phantom

    root = tmp_path_factory.mktemp("data")
    (root / "nifti").mkdir()
    volume = ct_phantom((4, 256, 256))  # (z, y, x) int16
    nib.save(nib.Nifti1Image(volume.T.copy(), np.diag([0.8, 0.8, 2.5, 1.0])),
             root / "nifti" / "phantom.nii.gz")
    pngs = root / "radiographs" / "nih-cxr14-png"
    pngs.mkdir(parents=True)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:256, 0:256]
    for i in range(2):
        image = 40 + 150 * np.exp(-((yy - 128) ** 2 + (xx - 100 - 40 * i) ** 2) / 4000.0)
        image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
        (pngs / f"{i:08d}_000.png").write_bytes(imagecodecs.png_encode(image))
    return root


def run(data: Path, out: Path, *extra: str,
        hide: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the script; modules named in ``hide`` fail to import (peer packages absent)."""
    env = None
    if hide:
        stubs = out.parent / f"{out.name}-stubs"
        stubs.mkdir()
        for name in hide:
            (stubs / f"{name}.py").write_text(f"raise ImportError('{name} hidden by the test')\n")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(stubs)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--data", str(data),
                           "--out", str(out), *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env, check=False)


def table_rows(report: str, heading: str) -> list[list[str]]:
    """Cells of the first Markdown table after ``heading``, without header and separator."""
    rows: list[list[str]] = []
    for line in report.split(heading, 1)[1].splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    assert rows, f"no table after {heading!r}"
    return rows[2:]


@pytest.fixture(scope="module")
def evaluated(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("results")
    done = run(data_dir, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_report_has_the_tables(evaluated: Path) -> None:
    report = (evaluated / "report.md").read_text()
    for heading in ("## Datasets", "## Lossless check", "## Storage (Table 1 / B.1 shape)",
                    "## Bytes to read each level", "## Image quality of each level",
                    "## Throughput", "## Method"):
        assert heading in report
    # the absent datasets are named, not silently dropped
    assert re.search(r"Datasets not evaluated: .*ct .*mr .*rg", report)
    storage = table_rows(report, "## Storage (Table 1 / B.1 shape)")
    assert [r[0] for r in storage] == ["nifti", "cxr", "**total**"]
    lossless = table_rows(report, "## Lossless check")
    assert [(r[0], r[3]) for r in lossless] == [("nifti", "yes"), ("cxr", "yes")]
    assert "AMD" in report or "cores" in report  # the machine is stated
    assert "python benchmarks/evaluate.py --quick" in report


def test_level0_is_lossless_and_levels_are_smaller(evaluated: Path) -> None:
    report = (evaluated / "report.md").read_text()
    results = json.loads((evaluated / "results.json").read_text())["datasets"]
    for key, title in (("nifti", "NIfTI volumes"), ("cxr", "Chest radiographs, PNG")):
        quality = table_rows(report.split("## Image quality of each level", 1)[1],
                             f"### {key}: {title}")
        level0 = quality[0]
        assert level0[0] == "s0"
        assert level0[4] == "1.0000 ± 0.0000"  # SSIM
        assert level0[5].startswith("∞ (all ")  # PSNR infinite for every slice
        assert level0[6] == "0.00000 ± 0.00000"  # MAD
        levels = results[key]["levels"]
        assert len(levels) == 3  # 256 px planes: levels 0, 1, 2
        assert levels[0]["ssim"] == 1.0 and levels[0]["psnr_finite_mean"] is None
        assert levels[0]["psnr_infinite"] == levels[0]["slices"] > 0
        for lower, higher in itertools.pairwise(levels):
            assert higher["read"] < lower["read"]
            assert higher["prefix"] < lower["prefix"]
            assert 0 < higher["ssim"] < 1
        data = table_rows(report.split("## Bytes to read each level", 1)[1],
                          f"### {key}: {title}")
        assert [r[0] for r in data] == ["s0", "s1", "s2"]
        assert data[0][6] == "100.0 %"  # % of level 0


def test_plots_are_written(evaluated: Path) -> None:
    report = (evaluated / "report.md").read_text()
    for name in ("bytes_per_level.png", "quality_per_level.png", "levels_gallery.png"):
        png = evaluated / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 300_000
        assert f"]({name})" in report


def test_without_peer_packages(data_dir: Path, tmp_path: Path) -> None:
    """ngff-zarr and dcm2niix absent: those peers become n/a with a note."""
    out = tmp_path / "out"
    done = run(data_dir, out, "--datasets", "cxr", hide=("ngff_zarr", "dcm2niix"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "OME-Zarr: ngff-zarr not installed" in report
    peers = table_rows(report, "Peers on the same samples")
    assert all(row[-1] == "n/a" for row in peers)  # the OME-Zarr column
