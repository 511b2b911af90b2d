"""Golden chunks written by an earlier version decode the same forever."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from imagecodecs.zarr import Htj2k

from mist_zarr.codestream import prefix_lengths

GOLDEN = Path(__file__).parent / "data" / "golden"
NAMES = sorted(p.stem for p in GOLDEN.glob("*.j2k"))


def test_golden_files_are_present():
    assert len(NAMES) >= 4


@pytest.mark.parametrize("name", NAMES)
def test_golden_chunk_decodes_at_every_level(name):
    doc = json.loads((GOLDEN / f"{name}.json").read_text())
    data = (GOLDEN / f"{name}.j2k").read_bytes()
    expected = np.load(GOLDEN / f"{name}.npy")
    codec = Htj2k.from_dict(doc["codec"])
    assert codec.to_dict()["configuration"] == {
        k: tuple(v) if isinstance(v, list) else v for k, v in doc["codec"]["configuration"].items()}
    assert list(prefix_lengths(data)[: doc["levels"] + 1]) == doc["prefix_lengths"]
    full = imagecodecs.htj2k_decode(data)
    np.testing.assert_array_equal(full, expected)
    assert list(expected.shape) == doc["shape"] and expected.dtype.name == doc["dtype"]
    for k, (n, digest) in enumerate(zip(doc["prefix_lengths"], doc["level_sha256"])):
        level = imagecodecs.htj2k_decode(data[:n], skipres=k)
        assert hashlib.sha256(level.tobytes()).hexdigest() == digest
        assert level.shape[:2] == tuple(-(-s // 2**k) for s in expected.shape[:2])
