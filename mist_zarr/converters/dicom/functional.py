"""Per-frame functional groups read once per file, from their encoded bytes.

An enhanced multi-frame header is mostly its PerFrameFunctionalGroupsSequence:
a few dozen elements per frame, most of them byte-identical from frame to
frame. pydicom parses every element of every frame into its own Dataset
(about 85 % of the header read of the shared Siemens XA30 files) and the
JSON model then converts each again. Here the sequence is kept as one raw
element when the header is read (:func:`skip_per_frame`), and split once
per file by a walker over element headers (:func:`_sequence`): each
distinct element value is converted by pydicom once (memoised on its bytes
in the series' :class:`~.jsonmodel._JsonBuilder`), and each frame gets its
JSON model and a typed view (:class:`_ItemView`) that answers ``get`` /
``in`` like the Dataset it stands for.

Only explicit VR little endian is walked; any other encoding, and anything
the walker does not model exactly as pydicom reads it (VR UN, undefined-length
values that are no sequence, a character set inside the groups, lengths
that disagree with delimiters), is left to pydicom's own parse.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from typing import Any

from .jsonmodel import _NON_METADATA_TAGS, _JsonBuilder

PER_FRAME_TAG = 0x52009230
_UNDEFINED = 0xFFFFFFFF
_HEAD = struct.Struct("<HH2sH")
_ITEM_HEAD = struct.Struct("<HHL")
_LENGTH32 = struct.Struct("<L")


class _Unsupported(Exception):
    """An encoding the walker leaves to pydicom."""


def _vr_table() -> dict[bytes, tuple[str, bool]]:
    """Encoded VR -> (VR, has a 4-byte length), for the VRs the walker reads (not UN)."""
    from pydicom.filereader import ENCODED_VR
    from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

    return {v: (v.decode(), v.decode() in EXPLICIT_VR_LENGTH_32)
            for v in ENCODED_VR if len(v) == 2 and v != b"UN"}


_VRS: dict[bytes, tuple[str, bool]] = {}

# A walked item is (start, stop, elements): the byte span of its value and
# {tag: node} in file order (a repeated tag keeps its first place and last
# value, as in pydicom's Dataset); a node is ("SQ", [items]) or (VR, start, stop).
_Item = tuple[int, int, dict[int, tuple[Any, ...]]]


def _sequence(buf: Any, pos: int, end: int | None) -> tuple[list[_Item], int]:
    """The items of a sequence value at ``pos``, to ``end`` (defined length) or through
    its delimiter; returns them and the position after the value."""
    items: list[_Item] = []
    unpack = _ITEM_HEAD.unpack_from
    while end is None or pos < end:
        group, element, length = unpack(buf, pos)
        pos += 8
        if group != 0xFFFE or element != 0xE000:
            if group == 0xFFFE and element == 0xE0DD and end is None:
                return items, pos
            raise _Unsupported(f"({group:04X},{element:04X}) where an item was expected")
        if length == _UNDEFINED:
            elements, after = _dataset(buf, pos, None)
            items.append((pos, after - 8, elements))
            pos = after
        else:
            elements, _ = _dataset(buf, pos, pos + length)
            items.append((pos, pos + length, elements))
            pos += length
    if pos != end:
        raise _Unsupported("items overrun their sequence's length")
    return items, pos


def _dataset(buf: Any, pos: int, end: int | None) -> tuple[dict[int, tuple[Any, ...]], int]:
    """The elements of an item value at ``pos``, to ``end`` or through its delimiter."""
    elements: dict[int, tuple[Any, ...]] = {}
    unpack, unpack32, vrs = _HEAD.unpack_from, _LENGTH32.unpack_from, _VRS
    while end is None or pos < end:
        group, element, vr, length = unpack(buf, pos)
        name = vrs.get(vr)
        # pydicom switches to implicit VR on an unknown VR, infers UN, and changes
        # the character set within the item: left to it
        if name is None or group == 0xFFFE or (group == 0x0008 and element == 0x0005):
            if group == 0xFFFE and element == 0xE00D and end is None:
                return elements, pos + 8
            raise _Unsupported(f"element ({group:04X},{element:04X}) VR {vr!r}")
        if name[1]:  # a 4-byte length
            length = unpack32(buf, pos + 8)[0]
            pos += 12
        else:
            pos += 8
        if name[0] == "SQ":
            items, pos = _sequence(buf, pos, None if length == _UNDEFINED else pos + length)
            elements[group << 16 | element] = ("SQ", items)
        elif length == _UNDEFINED:
            raise _Unsupported(f"undefined length {vr!r} element ({group:04X},{element:04X})")
        else:
            elements[group << 16 | element] = (name[0], pos, pos + length)
            pos += length
    if pos != end:
        raise _Unsupported("elements overrun their item's length")
    return elements, pos


def _walk(buf: Any, pos: int, end: int | None) -> tuple[list[_Item], int]:
    """:func:`_sequence`, raising _Unsupported for everything it does not model."""
    global _VRS
    if not _VRS:
        _VRS = _vr_table()
    try:
        return _sequence(buf, pos, end)
    except (struct.error, RecursionError) as exc:  # ran past the end of the data
        raise _Unsupported(str(exc)) from None


class _Walked(bytes):
    """A sequence value that carries the scan's walk of it (``items``, at offsets from
    ``base``), so that the read does not walk it again."""

    items: list[_Item]
    base: int


def skip_per_frame(fp: Any, ds: Any) -> bool:
    """Keep the PerFrameFunctionalGroupsSequence at ``fp`` as one raw element of ``ds``
    and leave ``fp`` after it; False (``fp`` unmoved) when pydicom must parse it.

    ``fp`` is positioned at the element's header, in an explicit VR little endian
    dataset whose other elements up to here are in ``ds``.
    """
    import mmap

    from pydicom.dataelem import RawDataElement
    from pydicom.tag import BaseTag

    start = fp.tell()
    try:
        buf = mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError, AttributeError):
        return False
    with buf:
        if start + 12 > len(buf):
            return False
        group, element, vr, _ = _HEAD.unpack_from(buf, start)
        if (group << 16 | element) != PER_FRAME_TAG or vr != b"SQ":
            return False
        length = _LENGTH32.unpack_from(buf, start + 8)[0]
        base = start + 12
        undefined = length == _UNDEFINED
        try:
            items, after = _walk(buf, base, None if undefined else base + length)
        except _Unsupported:
            return False
        value = _Walked(buf[base : after - 8 if undefined else after])
    value.items, value.base = items, base
    # pydicom parses a raw SQ value on first access (values.convert_SQ): every other
    # reader of the header still finds the sequence
    ds[PER_FRAME_TAG] = RawDataElement(
        BaseTag(PER_FRAME_TAG), "SQ", length, value, base, False, True, True, undefined
    )
    fp.seek(after)
    return True


@dataclass
class FrameGroups:
    """One file's per-frame functional groups: a typed view and the JSON model per frame."""

    items: list[Any]  # pydicom Datasets or _ItemViews: .get(keyword), `keyword in item`
    json: list[dict[str, Any]]


def read_frame_groups(ds: Any, builder: _JsonBuilder, charset: str) -> FrameGroups:
    """The per-frame functional groups of ``ds``, from its raw element when it is one."""
    raw = ds.get_item(PER_FRAME_TAG)
    value = getattr(raw, "value", None)
    if isinstance(value, bytes) and raw.VR == "SQ" and not raw.is_implicit_VR and raw.is_little_endian:
        walked: tuple[list[_Item], int] | None
        if isinstance(value, _Walked):
            walked = value.items, value.base
        else:
            try:
                walked = _walk(value, 0, len(value))[0], 0
            except _Unsupported:
                walked = None
        if walked is not None:
            items, base = walked
            encodings = ds.original_character_set or ds._character_set
            reader = _Reader(value, base, builder, charset, encodings)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # frame items differ from each other: no memo lookup for them
                frames = [reader.elements_json(i[2]) for i in items]
            return FrameGroups([_ItemView(reader, i[2]) for i in items], frames)
    sequence = ds.PerFrameFunctionalGroupsSequence
    return FrameGroups(list(sequence), [builder.dataset(item, charset) for item in sequence])


class _Reader:
    """Conversions of one file's walked per-frame groups, each distinct value once."""

    def __init__(self, buf: bytes, base: int, builder: _JsonBuilder, charset: str,
                 encodings: Any) -> None:
        self.buf = buf
        self.base = base
        self.builder = builder
        self.charset = charset
        self.encodings = encodings

    def item_json(self, item: _Item) -> dict[str, Any]:
        """The JSON model of a walked item, as ``_JsonBuilder.dataset`` gives it for the Dataset."""
        base = self.base
        key = (self.charset, self.buf[item[0] - base : item[1] - base])
        memo = self.builder.items
        hit = memo.get(key)
        if hit is None:
            hit = memo[key] = self.elements_json(item[2])
        return hit

    def elements_json(self, elements: dict[int, tuple[Any, ...]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        buf, base, raw = self.buf, self.base, self.builder.raw
        for tag, node in elements.items():
            key = _KEYS.get(tag) or _KEYS.setdefault(tag, f"{tag:08X}")
            if key in _NON_METADATA_TAGS:
                continue
            if node[0] == "SQ":
                out[key] = {"vr": "SQ", "Value": [self.item_json(i) for i in node[1]]}
            else:
                vr, start, stop = node
                value = raw(tag, vr, buf[start - base : stop - base], self.charset, self.encodings)
                if value is not None:
                    out[key] = value
        return out

    def value(self, tag: int, vr: str, start: int, stop: int) -> Any:
        """The value pydicom gives the element (raises as pydicom does)."""
        data = self.buf[start - self.base : stop - self.base]
        return self.builder.data_element(tag, vr, data, self.charset, self.encodings).value


_KEYS: dict[int, str] = {}


class _ItemView:
    """A walked item read like the pydicom Dataset it encodes: ``get(keyword)`` gives the
    element's value (a list of views for a sequence), ``keyword in view`` its presence."""

    __slots__ = ("_reader", "_elements")

    def __init__(self, reader: _Reader, elements: dict[int, tuple[Any, ...]]) -> None:
        self._reader = reader
        self._elements = elements

    def __contains__(self, keyword: str) -> bool:
        return _tag(keyword) in self._elements

    def get(self, keyword: str, default: Any = None) -> Any:
        tag = _tag(keyword)
        node = self._elements.get(tag)  # type: ignore[arg-type]
        if node is None:
            return default
        if node[0] == "SQ":
            return [_ItemView(self._reader, item[2]) for item in node[1]]
        return self._reader.value(tag, *node)  # type: ignore[arg-type]


_TAGS: dict[str, int | None] = {}


def _tag(keyword: str) -> int | None:
    if keyword not in _TAGS:
        from pydicom.datadict import tag_for_keyword

        _TAGS[keyword] = tag_for_keyword(keyword)
    return _TAGS[keyword]
