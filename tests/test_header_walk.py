"""The header read's own walk of explicit VR little endian datasets is pydicom's read.

``walk.read_elements`` reads the top-level elements of an explicit VR little
endian dataset itself (pydicom reads the preamble and file meta). Oracle: the
same ``_read_header`` with that walk switched off, i.e. pydicom's
``read_partial`` for the whole header, over every DICOM file of the shared
data set and of pydicom's test corpus (odd and broken files included): the
same elements (raw ones byte for byte, sequences as the same JSON model), the
same pixel data tag and location, and the same refusals. Then the same over
files hypothesis generates: every VR the walk reads, empty values, sequences
two deep in both length forms, a private element, character sets.
"""

from __future__ import annotations

import contextlib
import struct
import tempfile
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mist_zarr.converters.dicom import header
from mist_zarr.converters.dicom.jsonmodel import (
    BULK_DATA_THRESHOLD,
    _bulk_uri,
    _element_signature,
    _is_metadata_tag,
    header_signature,
)
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


@contextlib.contextmanager
def _walks():
    """A list that records, per header read, whether the walk read it (True) or left it
    to pydicom (False)."""
    calls: list[bool] = []
    saved = header.read_elements

    def counted(fp, ds, tags):
        result = saved(fp, ds, tags)
        calls.append(result is not False)
        return result

    header.read_elements = counted
    try:
        yield calls
    finally:
        header.read_elements = saved


def _json(ds, key) -> dict | str:
    """The JSON model of an element, or what stops pydicom making it (both reads must agree)."""
    try:
        return ds[key].to_json_dict(BULK_DATA_THRESHOLD, _bulk_uri)
    except Exception as exc:  # noqa: BLE001 (odd files of the corpus: the same failure on both sides)
        return f"{type(exc).__name__}: {exc}"


def _pydicom_read(path: str):
    """pydicom's own read of the header, to the pixel data (every sequence as it reads it)."""
    from pydicom.filereader import read_partial

    with open(path, "rb") as fp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_partial(fp, stop_when=lambda t, vr, n: int(t) in header._PIXEL_TAGS)


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
    # files of one series read by either path must fingerprint alike (or a shared value
    # would count as varying from slice to slice)
    assert [_element_signature(e) for e in ds._dict.values()] == \
        [_element_signature(e) for e in ref._dict.values()], path
    # the series read's fingerprint of a header is pydicom's get_item per tag (fresh reads:
    # get_item converts empty values, and a private one's creator with it)
    for walk in (True, False):
        read, fresh = _read(path, walk)[0], _read(path, walk)[0]
        by_get_item = {f"{int(t):08X}": _element_signature(read.get_item(t))
                       for t in read.keys() if _is_metadata_tag(f"{int(t):08X}")}  # noqa: SIM118
        assert list(header_signature(fresh).items()) == list(by_get_item.items()), path
        # and leaves the header as get_item leaves it (what the series read parses next)
        assert [type(e) for e in fresh._dict.values()] == \
            [type(e) for e in read._dict.values()], path
    if str(ds.file_meta.TransferSyntaxUID) != header._DEFLATED:
        # the elements against pydicom's read itself (the fallback keeps sequences raw too)
        ref = _pydicom_read(path)
        assert list(ds.keys()) == list(ref.keys()), path
    for key in ref.keys():  # noqa: SIM118
        got, want = ds._dict[key], ref._dict[key]  # as read (get_item converts some raw ones)
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
    with _walks() as calls:
        ds, tag, loc = header._read_header(str(ct[0]))
    assert calls == [True]
    assert tag == 0x7FE00010 and loc is not None
    sequences = [e for e in ds._dict.values() if e.VR == "SQ"]
    assert sequences and all(isinstance(e.value, _Walked) for e in sequences)
    parsed = [e for e in _pydicom_read(str(ct[0]))._dict.values() if e.VR == "SQ"]
    assert parsed and all(not isinstance(e, RawDataElement) for e in parsed)  # pydicom parses them


# -- generated datasets: every VR the walk reads, sequences nested in both length forms --

_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"),
                max_size=12).map(str.strip)
_ELEMENTS = {  # tag: (VR, values)
    0x00080008: ("CS", st.lists(st.sampled_from(["ORIGINAL", "PRIMARY", "AXIAL"]), max_size=3)),
    0x00080060: ("CS", st.sampled_from(["CT", "MR", ""])),
    0x00081030: ("LO", _TEXT),
    0x00100010: ("PN", _TEXT),
    0x00104000: ("LT", _TEXT),
    0x00180050: ("DS", st.floats(-1e3, 1e3, allow_nan=False).map(lambda v: f"{v:.4g}")),
    0x00200013: ("IS", st.integers(-1000, 1000)),
    0x00200032: ("DS", st.lists(st.integers(-500, 500), min_size=3, max_size=3)),
    0x00280030: ("DS", st.lists(st.integers(1, 9), min_size=2, max_size=2)),
    0x00281050: ("DS", st.integers(-2000, 2000)),
    0x00189087: ("FD", st.floats(0, 1e4, allow_nan=False)),
    0x00189082: ("FD", st.floats(-1, 1, allow_nan=False)),
    0x00186020: ("SL", st.integers(-2**31, 2**31 - 1)),
    0x00186024: ("US", st.integers(0, 65535)),
    0x00181310: ("US", st.lists(st.integers(0, 65535), min_size=4, max_size=4)),
    0x00189219: ("SS", st.integers(-32768, 32767)),
    0x00209165: ("AT", st.sampled_from([0x00200032, 0x00100010])),
    0x00189094: ("UT", _TEXT),
    0x00420011: ("OB", st.binary(max_size=40)),
    0x00660023: ("OW", st.binary(max_size=20).map(lambda b: b + b"\0" * (len(b) % 2))),
    0x00660016: ("OF", st.binary(max_size=16).map(lambda b: b[: len(b) // 4 * 4])),
    0x00091010: ("LO", _TEXT),  # a private element (its creator is added below)
}


@st.composite
def _datasets(draw, depth: int = 0) -> Dataset:
    ds = Dataset()
    for tag in draw(st.lists(st.sampled_from(sorted(_ELEMENTS)), max_size=8, unique=True)):
        vr, values = _ELEMENTS[tag]
        ds.add_new(tag, vr, draw(values))
    if 0x00091010 in ds:
        ds.add_new(0x00090010, "LO", "ACME 1.0")
    if depth < 2 and draw(st.booleans()):
        items = draw(st.lists(_datasets(depth + 1), max_size=3))
        ds.ReferencedImageSequence = Sequence(items)
        ds["ReferencedImageSequence"].is_undefined_length = draw(st.booleans())
        for item in items:
            item.is_undefined_length_sequence_item = draw(st.booleans())
    return ds


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ds=_datasets(), charset=st.sampled_from([None, "ISO_IR 100", "ISO_IR 192"]),
       pixels=st.booleans())
def test_walked_header_is_pydicoms_on_generated_files(ds, charset, pixels):
    """Random explicit VR little endian files (every VR the walk reads, sequences two
    deep with defined and undefined lengths, empty values, a private element, a character
    set, with and without pixel data): the walk and pydicom read the same header."""
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
    if charset:
        ds.SpecificCharacterSet = charset
    if pixels:
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 2, 2, 16, 16, 15
        ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = bytes(8)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/generated.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        _compare(path)
        walked = _read(path, True)
        assert not isinstance(walked, str)
        if ds.get("ReferencedImageSequence"):  # the walk read it, kept raw (a 0-length one
            # stays pydicom's empty value)
            assert isinstance(walked[0].get_item(0x00081140).value, _Walked)


# -- hand-built files: what pydicom reads differently from a plain walk ----------------

_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_UNDEFINED = 0xFFFFFFFF


def _el(tag: int, vr: str, value: bytes = b"", length: int | None = None) -> bytes:
    n = len(value) if length is None else length
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, n) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), n) + value


def _undefined_sequence(tag: int, body: bytes, delimiter_length: int = 0) -> bytes:
    """One undefined-length item holding ``body``, in an undefined-length sequence."""
    item = (struct.pack("<HHL", 0xFFFE, 0xE000, _UNDEFINED) + body
            + struct.pack("<HHL", 0xFFFE, 0xE00D, delimiter_length))
    return _el(tag, "SQ", item + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0), _UNDEFINED)


def _part10(path: Path, body: bytes) -> str:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.3.4.5"
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + buf.getvalue() + body)
    return str(path)


_SOP = _el(0x00080016, "UI", b"1.2.840.10008.5.1.4.1.1.2\0") + _el(0x00080018, "UI", b"1.2.3.4\0")
_PIXELS = _el(0x7FE00010, "OW", bytes(8))
_NAME = _undefined_sequence(0x00081140, _el(0x00100010, "PN", "Müller".encode()))
HAND_BUILT = {
    # a character set after a sequence (out of order, or a second one): pydicom decodes
    # the sequence with the character set in effect when it read it
    "charset-after-sequence": _SOP + _NAME + _el(0x00080005, "CS", b"ISO_IR 192") + _PIXELS,
    "charset-twice": (_el(0x00080005, "CS", b"ISO_IR 100") + _NAME
                      + _el(0x00080005, "CS", b"ISO_IR 192") + _SOP + _PIXELS),
    # an item delimiter whose length field spells a VR with a 4-byte length ("OB")
    "item-delimiter-with-length": (_SOP + _undefined_sequence(
        0x00081140, _el(0x00100010, "PN", b"AB"), delimiter_length=0x424F) + _PIXELS),
    # a command set (group 0000) before the dataset: pydicom merges it after the dataset
    "command-set": _el(0x00000002, "UI", b"1.2\0") + _SOP + _PIXELS,
    "command-set-repeated": (_el(0x00000002, "UI", b"1.2\0") + _SOP
                             + _el(0x00000002, "UI", b"9.9\0") + _PIXELS),
    # and what the walk does read: both sequence length forms, empty values, no pixels
    "plain": _el(0x00080005, "CS", b"ISO_IR 192") + _SOP + _NAME + _el(0x00100020, "LO") + _PIXELS,
    "no-pixel-data": _SOP + _NAME + _el(0x00081030, "LO", b"ABDOMEN "),
}


@pytest.mark.parametrize("name", HAND_BUILT)
def test_walked_header_is_pydicoms_on_hand_built_files(tmp_path, name):
    path = _part10(tmp_path / f"{name}.dcm", HAND_BUILT[name])
    _compare(path)
    walked, expected = _read(path, True), _read(path, False)
    if not isinstance(expected, str):
        assert list(walked[0]._dict) == list(expected[0]._dict)  # order, as pydicom has it


def _tiny_image(ds: Dataset) -> None:
    """Make ``ds`` a 2 x 2 uint16 image in an explicit VR little endian file."""
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(8)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def test_a_series_read_partly_by_pydicom_shares_its_sequences(tmp_path):
    """Two slices with the same undefined-length sequence, one also holding a private VR UN
    element (so pydicom reads its header, not the walk): the sequence is kept in one form
    in both, so it is shared metadata, not a per-slice value."""
    from mist_zarr.converters.dicom import read_dicom_series, scan_dicom

    study, series = generate_uid(), generate_uid()
    for k in range(2):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.9"
        ds.ReferencedImageSequence = Sequence([ref])
        ds["ReferencedImageSequence"].is_undefined_length = True
        if k == 1:
            ds.add_new(0x00290010, "LO", "ACME 1.0")
            ds.add_new(0x00291010, "UN", b"abcd")
        ds.InstanceNumber, ds.ImagePositionPatient = k + 1, [0, 0, k]
        ds.ImageOrientationPatient, ds.PixelSpacing = [1, 0, 0, 0, 1, 0], [1, 1]
        _tiny_image(ds)
        pydicom.dcmwrite(tmp_path / f"{k}.dcm", ds, enforce_file_format=True)
    with _walks() as calls:
        (vol,) = read_dicom_series(scan_dicom(tmp_path).series[0])
    assert sorted(calls) == [False, True]  # one walked, one read by pydicom
    assert "00081140" in vol.metadata
    assert "00081140" not in vol.per_slice


def test_an_item_with_its_own_character_set_does_not_decode_the_dataset(tmp_path):
    """The same PN bytes at the top level (ISO_IR 100) and in a sequence item with its own
    character set (ISO_IR 192): each JSON value is pydicom's decoding in its own context
    (the JSON memo once handed the item's decoding to the top-level element)."""
    from mist_zarr.converters.dicom.header import _load_file
    from mist_zarr.converters.dicom.jsonmodel import _JsonBuilder

    name = "Müller".encode()  # ISO_IR 100 reads these bytes as 'MÃ¼ller'
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
    item = Dataset()
    item.SpecificCharacterSet = "ISO_IR 192"
    item.add_new(0x00100010, "PN", name)
    ds.ReferencedImageSequence = Sequence([item])  # (0008,1140): converted before (0010,0010)
    ds.add_new(0x00100010, "PN", name)
    _tiny_image(ds)
    path = tmp_path / "charsets.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    model = _load_file(str(path), _JsonBuilder()).json()
    ref = pydicom.dcmread(path)
    assert model["00100010"] == ref["PatientName"].to_json_dict(BULK_DATA_THRESHOLD, _bulk_uri)
    assert model["00081140"]["Value"][0]["00100010"] == \
        ref.ReferencedImageSequence[0]["PatientName"].to_json_dict(BULK_DATA_THRESHOLD, _bulk_uri)
    assert model["00100010"]["Value"][0]["Alphabetic"] == "MÃ¼ller"
