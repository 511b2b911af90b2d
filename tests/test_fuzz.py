"""Mutated real files through every reader: documented outcomes only, no crash.

Each batch runs in a child process (tests/fuzz/driver.py): a C decoder that
crashes on a mutated file takes down the child, not the test run, and the
case that did it is reported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom.data
import pytest

from .conftest import DATA_DIR

DRIVER = Path(__file__).parent / "fuzz" / "driver.py"
CASES = 1000


def run_driver(kind: str, seed: int, seeds: list[str], tmp_path) -> dict[str, int]:
    proc = subprocess.run([sys.executable, str(DRIVER), kind, str(seed), str(CASES), *seeds],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    lines = proc.stdout.splitlines()
    last_case = next((line for line in reversed(lines) if line.startswith("CASE")), "no case")
    assert proc.returncode == 0, f"{kind} fuzzing crashed the interpreter at {last_case} " \
                                 f"(seed {seed}): {proc.stderr[-2000:]}"
    unexpected = [line for line in lines if line.startswith("UNEXPECTED")]
    assert not unexpected, "\n".join(unexpected[:10])
    result = json.loads(next(line for line in lines if line.startswith("RESULT"))[7:])
    assert sum(result.values()) == CASES
    return result


def dicom_seeds() -> list[str]:
    names = ["CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
             "JPEG2000.dcm", "SC_rgb.dcm", "emri_small.dcm", "JPEG-LL.dcm", "US1_YBR_FULL_422.dcm"]
    # only files shipped with pydicom: get_testdata_file() would try to download others
    local = {Path(f).name: f for f in pydicom.data.get_testdata_files()}
    return [local[n] for n in names if n in local]


@pytest.mark.parametrize("seed", [1, 2])
def test_mutated_dicom(tmp_path, seed):
    result = run_driver("dicom", seed, dicom_seeds(), tmp_path)
    assert result.get("problem", 0) > 0 and result.get("image", 0) > 0


def test_mutated_nifti_headers(tmp_path):
    import nibabel as nib

    seeds = []
    for i, (shape, dtype) in enumerate([((20, 24, 6), np.int16), ((16, 16, 4, 3), np.uint8),
                                        ((30, 20, 5), np.float32)]):
        data = (np.arange(np.prod(shape)) % 97).reshape(shape).astype(dtype)
        nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 3.0, 1.0])), tmp_path / f"s{i}.nii")
        seeds.append(str(tmp_path / f"s{i}.nii"))
    result = run_driver("nifti", 3, seeds, tmp_path)
    assert result.get("problem", 0) > 0 and result.get("image", 0) > 0


def test_mutated_pngs_and_tiffs(tmp_path):
    import imagecodecs
    import tifffile

    rng = np.random.default_rng(4)
    (tmp_path / "a.png").write_bytes(imagecodecs.png_encode(rng.integers(0, 255, (40, 50), np.uint8)))
    (tmp_path / "b.png").write_bytes(imagecodecs.png_encode(rng.integers(0, 65535, (30, 20, 3), np.uint16)))
    tifffile.imwrite(tmp_path / "c.tif", rng.integers(0, 4000, (3, 30, 40), np.uint16),
                     photometric="minisblack")
    seeds = [str(tmp_path / n) for n in ("a.png", "b.png", "c.tif")]
    pngs = sorted((DATA_DIR / "radiographs" / "nih-cxr14-png").glob("*.png"))[:1]
    result = run_driver("image", 5, seeds + [str(p) for p in pngs], tmp_path)
    assert result.get("problem", 0) > 0


def test_atheris_coverage_guided_codestream_parser(tmp_path):
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    import imagecodecs

    from mist_zarr.layout import encode_kwargs

    rng = np.random.default_rng(6)
    for i, (shape, levels) in enumerate([((16, 16), 1), ((40, 24), 2), ((9, 70), 1)]):
        a = rng.integers(0, 4000, shape, dtype=np.uint16)
        (corpus / f"seed{i}.j2k").write_bytes(imagecodecs.htj2k_encode(a, **encode_kwargs(levels)))
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "fuzz" /
                                               "atheris_codestream.py"),
                           "-runs=100000", "-max_len=4096", "-seed=7", str(corpus)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done 100000 runs" in proc.stderr
