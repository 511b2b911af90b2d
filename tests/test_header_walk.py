"""The header read's own walk of explicit VR little endian datasets is pydicom's read.

``walk.read_elements`` reads the top-level elements of an explicit VR little
endian dataset itself (pydicom reads the preamble and file meta). Oracle: the
same ``_read_header`` with that walk switched off, i.e. pydicom's
``read_partial`` for the whole header, over every DICOM file of the shared
data set and of pydicom's test corpus (odd and broken files included): the
same elements (raw ones byte for byte, sequences as the same JSON model), the
same pixel data tag and location, and the same refusals.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement

from mist_zarr.converters.dicom import header
from mist_zarr.converters.dicom.jsonmodel import BULK_DATA_THRESHOLD, _bulk_uri
from mist_zarr.converters.dicom.walk import _Walked

from .conftest import DATA_DIR

_NOT_DICOM = (".nii", ".nii.gz", ".png", ".json", ".md", ".txt", ".bval", ".bvec", ".csv")


def _corpus() -> list[str]:
    # pydicom's bundled files (get_testdata_files would also try to download others)
    bundled = Path(get_testdata_file("CT_small.dcm")).parent
    files = sorted(str(p) for p in bundled.rglob("*") if p.is_file() and p.suffix != ".py")
    if DATA_DIR.is_dir():
        files += sorted(str(p) for p in DATA_DIR.rglob("*")
                        if p.is_file() and not p.name.endswith(_NOT_DICOM)
                        and not p.name.startswith("LICENSE"))
    return files


CORPUS = _corpus()


def _read(path: str, walk: bool):
    """``_read_header``'s result, or the refusal's reason."""
    saved = header.read_elements
    if not walk:
        header.read_elements = lambda fp, ds, tags: False  # the pydicom path
    try:
        return header._read_header(path)
    except header._Refused as refused:
        return refused.issue.reason
    finally:
        header.read_elements = saved


def _json(ds, key) -> dict | str:
    """The JSON model of an element, or what stops pydicom making it (both reads must agree)."""
    try:
        return ds[key].to_json_dict(BULK_DATA_THRESHOLD, _bulk_uri)
    except Exception as exc:  # noqa: BLE001 (odd files of the corpus: the same failure on both sides)
        return f"{type(exc).__name__}: {exc}"


def _compare(path: str) -> None:
    """Assert the walked and pydicom's header reads of ``path`` agree."""
    walked, expected = _read(path, True), _read(path, False)
    if isinstance(expected, str) or isinstance(walked, str):
        assert walked == expected, path
        return
    (ds, tag, loc), (ref, ref_tag, ref_loc) = walked, expected
    assert (tag, loc) == (ref_tag, ref_loc), path
    assert list(ds.keys()) == list(ref.keys()), path
    assert ds.original_encoding == ref.original_encoding, path
    assert ds.original_character_set == ref.original_character_set, path
    for key in ref.keys():  # noqa: SIM118
        got, want = ds.get_item(key), ref.get_item(key)
        if isinstance(got, RawDataElement) and isinstance(want, RawDataElement) \
                and got.VR != "SQ" and want.VR != "SQ":
            assert tuple(got) == tuple(want), (path, key)
        else:
            assert _json(ds, key) == _json(ref, key), (path, key)


@pytest.mark.parametrize("path", CORPUS, ids=[Path(p).name for p in CORPUS])
def test_walked_header_is_pydicoms(path):
    _compare(path)


def test_the_walk_reads_the_explicit_vr_files():
    """The comparison above is not vacuous: the walk reads the shared CT's headers, keeping
    its sequences raw (pydicom parses undefined-length ones), and most of the corpus."""
    ct = sorted((DATA_DIR / "ct" / "CRLM-CT-1004").rglob("*.dcm"))
    if not ct:
        pytest.skip(f"shared CT not found under {DATA_DIR}")
    calls = []
    saved = header.read_elements

    def counted(fp, ds, tags):
        result = saved(fp, ds, tags)
        calls.append(result is not False)
        return result

    header.read_elements = counted
    try:
        ds, tag, loc = header._read_header(str(ct[0]))
    finally:
        header.read_elements = saved
    assert calls == [True]
    assert tag == 0x7FE00010 and loc is not None
    sequences = [e for e in ds._dict.values() if e.VR == "SQ"]
    assert sequences and all(isinstance(e.value, _Walked) for e in sequences)
    ref = _read(str(ct[0]), False)[0]
    assert any(not isinstance(e, RawDataElement) for e in ref._dict.values())  # parsed there
