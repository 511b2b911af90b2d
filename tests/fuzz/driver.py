"""Mutation fuzzing of the source readers, run in a child process by tests/test_fuzz.py.

    python tests/fuzz/driver.py KIND SEED CASES SEEDFILE...

KIND is dicom, nifti or image. Each case mutates one seed file (byte flips in
the header region, overwritten runs, truncation) and reads it through the
converter's public entry point. Only the project's documented outcomes are
allowed: a SourceImage, or a reported Problem. Anything else is printed as
"UNEXPECTED <case> <error>"; a crash of the interpreter is caught by the
parent, which sees the last "CASE <n>" line.
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np


def mutate(data: bytes, rng: np.random.Generator, header: int) -> bytes:
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 6))):
        op = rng.integers(0, 4)
        pos = int(rng.integers(0, min(header, len(buf))))
        if op == 0:
            buf[pos] = int(rng.integers(0, 256))
        elif op == 1:
            buf[pos] ^= 1 << int(rng.integers(0, 8))
        elif op == 2:
            run = int(rng.integers(1, 9))
            buf[pos:pos + run] = bytes([int(rng.integers(0, 256))]) * run
        else:
            buf[pos:pos + 4] = (int(rng.integers(0, 2**32))).to_bytes(4, "little")
    if rng.random() < 0.25:
        buf = buf[: int(rng.integers(1, len(buf)))]
    return bytes(buf)


def read(kind: str, path: Path) -> str:
    from mist_zarr.convert import Problem
    from mist_zarr.converters.base import ConversionError

    if kind == "dicom":
        from mist_zarr.converters.dicom import dicom_sources

        problems: list[Problem] = []
        images = list(dicom_sources([str(path)], max_bytes=256 << 20, problems=problems))
        for image in images:
            np.asarray(image.data)
        return "image" if images else "problem"
    try:
        if kind == "nifti":
            from mist_zarr.converters.nifti import read_nifti

            image = read_nifti(path, max_bytes=256 << 20)
        else:
            from mist_zarr.converters.image import read_image_file

            image = read_image_file(path, max_bytes=256 << 20)
    except ConversionError:
        return "problem"
    np.asarray(image.data)
    return "image"


def main() -> int:
    kind, seed, cases, *seeds = sys.argv[1:]
    warnings.simplefilter("ignore")
    rng = np.random.default_rng(int(seed))
    corpus = [Path(s).read_bytes() for s in seeds]
    header = {"dicom": 4096, "nifti": 352, "image": 512}[kind]
    outcomes: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        for case in range(int(cases)):
            print(f"CASE {case}", flush=True)
            data = mutate(corpus[case % len(corpus)], rng, header)
            path = Path(tmp) / f"case{case % 7}"
            path.write_bytes(data)
            try:
                outcomes[read(kind, path)] += 1
            except MemoryError:
                outcomes["UNEXPECTED"] += 1
                print(f"UNEXPECTED {case} MemoryError (a size limit was not enforced)")
            except Exception as exc:  # noqa: BLE001 - the point is to find these
                outcomes["UNEXPECTED"] += 1
                last = traceback.extract_tb(exc.__traceback__)[-1]
                print(f"UNEXPECTED {case} {type(exc).__name__}: {str(exc)[:200]} "
                      f"at {last.filename}:{last.lineno}")
    print("RESULT " + json.dumps(dict(outcomes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
