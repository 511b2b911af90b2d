"""Coverage-guided fuzzing of the codestream parser with atheris (libFuzzer).

    python tests/fuzz/atheris_codestream.py -runs=20000 CORPUS_DIR

Seeds are real chunks (the golden files); the only exception allowed to
escape is CodestreamError. libFuzzer exits non-zero on anything else.
"""

import sys
import types
from pathlib import Path

import atheris

# Import the parser module on its own: instrumenting the whole package (zarr,
# xarray, numpy ...) would cost minutes before the first run. A bare package
# object stands in for mist_zarr so that codestream's relative import of
# errors works without running the package's __init__.
_package = types.ModuleType("mist_zarr")
_package.__path__ = [str(Path(__file__).resolve().parents[2] / "mist_zarr")]
sys.modules["mist_zarr"] = _package
with atheris.instrument_imports(include=["mist_zarr.codestream", "mist_zarr.errors"]):
    from mist_zarr.codestream import (
        CodestreamError,
        is_boundary,
        parse_codestream,
        prefix_lengths,
    )


def test_one_input(data: bytes) -> None:
    try:
        cs = parse_codestream(data)
    except CodestreamError:
        return
    assert all(0 <= off and off + n <= cs.length for off, n in cs.tile_parts)
    try:
        lengths = prefix_lengths(cs)
    except CodestreamError:
        return
    assert lengths[0] == len(data) and all(0 < n <= len(data) for n in lengths)
    for n in lengths[1:]:
        assert is_boundary(data[n : n + 2])


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
