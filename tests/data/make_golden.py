"""Regenerate the golden chunks (run once; the committed files are the reference).

    python tests/data/make_golden.py

Each ``NAME.j2k`` is a chunk exactly as mist-zarr stores it, ``NAME.json`` its
codec configuration, prefix lengths and the SHA-256 of every level's decoded
samples, ``NAME.npy`` the level-0 samples.
"""

import hashlib
import json
from pathlib import Path

import imagecodecs
import numpy as np

from mist_zarr.codestream import prefix_lengths
from mist_zarr.layout import codec_config, encode_kwargs, num_levels

HERE = Path(__file__).parent / "golden"


def ct_crop() -> np.ndarray:
    import pydicom

    path = Path(__file__).parents[2].parent / "shared/data/ct/CRLM-CT-1004/1-20.dcm"
    return np.ascontiguousarray(pydicom.dcmread(path).pixel_array[180:436, 128:384])


def main() -> None:
    rng = np.random.default_rng(20261122)
    samples = {
        "ct_int16_256": ct_crop(),
        "rgb_uint8_96x80": rng.integers(0, 256, (96, 80, 3), dtype=np.uint8),
        "uint16_33x47": rng.integers(0, 65536, (33, 47), dtype=np.uint16),
        "int32_130x200": rng.integers(-(2**31), 2**31, (130, 200), dtype=np.int64).astype(np.int32),
    }
    for name, a in samples.items():
        n = num_levels(a.shape[:2])
        data = imagecodecs.htj2k_encode(a, **encode_kwargs(n))
        lengths = list(prefix_lengths(data)[: n + 1])
        hashes = [hashlib.sha256(imagecodecs.htj2k_decode(data, skipres=k).tobytes()).hexdigest()
                  for k in range(n + 1)]
        (HERE / f"{name}.j2k").write_bytes(data)
        np.save(HERE / f"{name}.npy", a)
        doc = {"codec": codec_config(n), "levels": n, "shape": list(a.shape), "dtype": a.dtype.name,
               "prefix_lengths": lengths, "level_sha256": hashes,
               "imagecodecs": imagecodecs.__version__}
        (HERE / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
        print(name, a.shape, n, lengths)


if __name__ == "__main__":
    main()
