"""The DICOM JSON model (PS3.18 F.2) of headers, with bulk data summarised by a URI."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from typing import Any

from .tags import _text
from .walk import _Item, walked_items

#: Binary values longer than this are summarised in the JSON metadata (bytes).
BULK_DATA_THRESHOLD = 1024

_NON_METADATA_TAGS = {"7FE00010", "7FE00008", "7FE00009", "7FE00001", "7FE00002", "FFFCFFFC"}

_PER_FRAME_TAG = "52009230"


def _bulk_uri(elem: Any) -> str:
    value = elem.value
    data = (
        bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else str(value).encode()
    )
    return f"urn:x-mist-zarr:omitted:{len(data)}:sha1-{hashlib.sha1(data).hexdigest()[:16]}"


def _is_metadata_tag(tag: str) -> bool:
    """False for pixel data, trailing padding, per-frame groups and (retired) group lengths."""
    return tag not in _NON_METADATA_TAGS and tag != _PER_FRAME_TAG and not tag.endswith("0000")


def _element_signature(elem: Any) -> Any:
    """Return a hashable fingerprint of a (raw or parsed) element, cheap for unparsed values."""
    from pydicom.dataelem import RawDataElement

    if elem is None:
        return None
    if isinstance(elem, RawDataElement):
        return (int(elem.tag), elem.VR, elem.value)
    if elem.VR == "SQ":
        return (
            int(elem.tag),
            "SQ",
            tuple(
                tuple(_element_signature(item.get_item(t)) for t in item.keys())  # noqa: SIM118 (a Dataset iterates elements)
                for item in elem.value
            ),
        )
    return (int(elem.tag), elem.VR, repr(elem.value))


def header_signature(ds: Any) -> dict[str, Any]:
    """The fingerprint (:func:`_element_signature`) of each metadata element of a header,
    keyed by its tag in hex, in the dataset's order: what the files of a series are
    compared by. Read before any attribute is parsed, so every file is in the same state."""
    from pydicom.dataelem import RawDataElement

    out = {}
    for tag, elem in ds._dict.items():  # as read, without get_item's tag lookup per element
        key = f"{tag:08X}"
        if not _is_metadata_tag(key):
            continue
        if elem.__class__ is RawDataElement:
            if elem.value is not None:
                out[key] = (int(tag), elem.VR, elem.value)
                continue
            # what get_item does with a value of None (deferred or empty): converts it,
            # and with it, for a private element, its creator (as the files' other reads do)
            elem = ds.get_item(tag)
        out[key] = _element_signature(elem)
    return out


class _JsonBuilder:
    """DICOM JSON model conversion that converts each distinct element value only once.

    Enhanced multi-frame headers repeat the same functional-group items for
    hundreds of frames; memoising on (character set, tag, VR, raw bytes)
    makes their per-frame JSON cheap. Sequences kept raw when the header was
    read (``walk``) are converted from their walked bytes, each distinct item
    and value once. Elements that cannot be converted are left out and their
    tags collected in ``dropped``.
    """

    def __init__(self) -> None:
        self._memo: dict[Any, dict[str, Any]] = {}
        self._items: dict[Any, dict[str, Any]] = {}  # (charset, walked item bytes) -> JSON
        self._elements: dict[Any, Any] = {}  # (charset, (tag, VR, bytes)) -> pydicom DataElement
        self.dropped: set[str] = set()

    def dataset(self, ds: Any, charset: str) -> dict[str, Any]:
        """Return the JSON model of ``ds`` (all elements but pixel data and trailing padding)."""
        out: dict[str, Any] = {}
        for tag in ds.keys():  # noqa: SIM118 (a Dataset iterates elements)
            key = f"{int(tag):08X}"
            if key in _NON_METADATA_TAGS:
                continue
            value = self.element(ds, key, charset)
            if value is not None:
                out[key] = value
        return out

    def element(self, ds: Any, key: str, charset: str) -> dict[str, Any] | None:
        """Return the JSON model of element ``key`` of ``ds``, or None when absent or invalid."""
        tag = int(key, 16)
        raw = ds.get_item(tag)
        if raw is None:
            return None
        sig = _memo_key(charset, raw)
        hit = self._memo.get(sig) if sig is not None else None
        if hit is not None:
            return hit
        walked = walked_items(raw)
        if walked is not None:  # a sequence kept raw when the header was read
            src = Encoded(raw.value, walked[1], charset, ds.original_character_set or ds._character_set)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = {"vr": "SQ", "Value": [self.item_json(item, src) for item in walked[0]]}
            self._memo[sig] = out
            return out
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                elem = ds[tag]
                if elem.VR == "SQ":
                    # an item with its own character set is decoded with it: its elements'
                    # memo keys must say so (a top-level element with the same bytes is not)
                    out = {
                        "vr": "SQ",
                        "Value": [self.dataset(item, _text(item, "SpecificCharacterSet") or charset)
                                  for item in elem.value],
                    }
                else:
                    out = elem.to_json_dict(
                        bulk_data_element_handler=_bulk_uri, bulk_data_threshold=BULK_DATA_THRESHOLD
                    )
                json.dumps(out)
        except Exception:
            self.dropped.add(key)
            return None
        if sig is not None:
            self._memo[sig] = out
        return out

    def item_json(self, item: _Item, src: Encoded) -> dict[str, Any]:
        """The JSON model of a walked item: what :meth:`dataset` gives for the Dataset
        pydicom reads from the same bytes (memoised on them). The caller silences
        pydicom's warnings (:meth:`element` does it per element)."""
        key = (src.charset, src.bytes(item[0], item[1]))
        hit = self._items.get(key)
        if hit is None:
            hit = self._items[key] = self.elements_json(item[2], src)
        return hit

    def elements_json(self, elements: dict[int, tuple[Any, ...]], src: Encoded) -> dict[str, Any]:
        """The JSON model of a walked item's elements (:meth:`item_json` without the memo)."""
        out: dict[str, Any] = {}
        memo, buf, base, charset = self._memo, src.buf, src.base, src.charset
        for tag, node in elements.items():
            key = _KEYS.get(tag) or _KEYS.setdefault(tag, f"{tag:08X}")
            if key in _NON_METADATA_TAGS:
                continue
            if node[0] == "SQ":
                out[key] = {"vr": "SQ", "Value": [self.item_json(i, src) for i in node[1]]}
                continue
            vr, start, stop = node
            sig = (charset, (tag, vr, buf[start - base : stop - base]))
            value = memo.get(sig) or self._leaf_json(sig, src.encodings)
            if value is not None:
                out[key] = value
        return out

    def _leaf_json(self, sig: Any, encodings: Any) -> dict[str, Any] | None:
        try:
            out = self.data_element(sig, encodings).to_json_dict(
                bulk_data_element_handler=_bulk_uri, bulk_data_threshold=BULK_DATA_THRESHOLD
            )
            if not _plain(out):
                json.dumps(out)  # raises for what the JSON metadata cannot hold
        except Exception:  # noqa: BLE001 - any bad value: left out, named in dropped
            self.dropped.add(f"{sig[1][0]:08X}")
            return None
        self._memo[sig] = out
        return out

    def data_element(self, sig: Any, encodings: Any) -> Any:
        """pydicom's DataElement for the explicit VR little endian element (no sequence)
        ``sig`` = (charset, (tag, VR, encoded value)), converted once per distinct value
        (raises as pydicom does)."""
        elem = self._elements.get(sig)
        if elem is None:
            from pydicom.dataelem import RawDataElement, convert_raw_data_element
            from pydicom.tag import BaseTag

            tag, vr, value = sig[1]
            raw = RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True)
            elem = self._elements[sig] = convert_raw_data_element(raw, encoding=encodings)
        return elem


_KEYS: dict[int, str] = {}  # tag -> "GGGGEEEE"
_SCALARS = (str, int, float, type(None))


def _plain(element: dict[str, Any]) -> bool:
    """True when json.dumps surely accepts ``element`` (a leaf's JSON model): its values
    are strings, numbers or nulls (the common case, checked faster than by dumping)."""
    value = element.get("Value", ())
    return type(value) is list and all(isinstance(v, _SCALARS) for v in value)


@dataclass(frozen=True)
class Encoded:
    """Where the bytes of walked items are (positions count from ``base``) and how
    their text is decoded (``encodings``: pydicom's, from ``charset``)."""

    buf: bytes
    base: int
    charset: str
    encodings: Any

    def bytes(self, start: int, stop: int) -> bytes:
        return self.buf[start - self.base : stop - self.base]


def _memo_key(charset: str, raw: Any) -> Any:
    """Key under which an element's JSON can be shared, or None when it depends on its dataset.

    Implicit-VR private elements take their VR from the private creator, and
    ambiguous VRs ('US or SS', 'OB or OW') from other attributes: not shared.
    """
    from pydicom.datadict import dictionary_VR

    vr = getattr(raw, "VR", None)
    tag = int(raw.tag)
    if vr is None or " or " in str(vr):
        if (tag >> 16) % 2 == 1:
            return None
        try:
            if " or " in dictionary_VR(tag):
                return None
        except KeyError:
            return None
    return (charset, _element_signature(raw))


def _json_value(element: dict[str, Any] | None) -> Any:
    if not element:
        return None
    for key in ("Value", "InlineBinary", "BulkDataURI"):
        if key in element:
            return element[key]
    return None
