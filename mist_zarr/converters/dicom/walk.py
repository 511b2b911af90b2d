"""Explicit VR little endian sequences walked over their element headers, not parsed.

pydicom reads every element of a sequence into its own Dataset when the
header is read: most of the header read of an enhanced multi-frame file,
whose functional-group sequences hold a few dozen elements per frame. The
walker here only finds where each item and element lies, so that the
sequence can be kept as one raw element (:func:`skip_sequence`) and each
distinct value in it converted by pydicom once, when it is needed (see
``jsonmodel`` and ``functional``). The scan's walk travels with the value
(:class:`_Walked`): the read does not walk it again.

It models exactly what pydicom's reader does with well-formed explicit VR
little endian data; for anything else (an unknown VR, where pydicom switches
to implicit VR; VR UN, whose VR pydicom infers from context; undefined-length
values that are no sequence; a character set inside the sequence; lengths
that disagree with delimiters; data that ends early) it raises
:class:`_Unsupported` and the sequence is left to pydicom.

:func:`read_elements` reads a whole explicit VR little endian dataset the same
way: the raw elements pydicom's reader would make (every sequence kept walked
and raw, as :func:`skip_sequence` keeps one), in a fraction of its time.
"""

from __future__ import annotations

import struct
from typing import Any

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
            if group == 0xFFFE and element == 0xE00D and end is None \
                    and not buf[pos + 4 : pos + 8].strip(b"\0"):
                return elements, pos + 8  # (pydicom reads a non-zero length as a VR: left to it)
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


class _Short(_Unsupported):
    """The data walked ends before the sequence does."""


def _vrs() -> dict[bytes, tuple[str, bool]]:
    """The VR table, made on first use (pydicom is imported only then)."""
    global _VRS
    if not _VRS:
        _VRS = _vr_table()
    return _VRS


def _walk(buf: Any, pos: int, end: int | None) -> tuple[list[_Item], int]:
    """:func:`_sequence`, raising _Unsupported for everything it does not model."""
    _vrs()
    try:
        items, after = _sequence(buf, pos, end)
    except struct.error as exc:
        raise _Short(str(exc)) from None
    except RecursionError as exc:
        raise _Unsupported(str(exc)) from None
    if after > len(buf):
        raise _Short("the sequence's values run past the end of the data")
    return items, after


class _Walked(bytes):
    """A sequence value that carries the scan's walk of it (``items``, at offsets from
    ``base``), so that the read does not walk it again."""

    items: list[_Item]
    base: int


_FIRST_READ = 1 << 18  # bytes; grown x4 while the sequence runs past them


def skip_sequence(fp: Any, ds: Any) -> bool:
    """Keep the sequence element at ``fp`` as one raw element of ``ds`` (its value a
    :class:`_Walked`) and leave ``fp`` after it; False (``fp`` unmoved) when pydicom
    must parse it.

    ``fp`` is a file positioned at the element's header, in an explicit VR little
    endian dataset whose elements up to here are in ``ds``.
    """
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import BaseTag

    start = fp.tell()
    want = _FIRST_READ
    while True:
        buf = fp.read(want)  # walked in memory: struct reads from bytes are the fastest
        fp.seek(start)
        if len(buf) < 12:
            return False
        group, element, vr, _ = _HEAD.unpack_from(buf, 0)
        if vr != b"SQ":
            return False
        length = _LENGTH32.unpack_from(buf, 8)[0]
        undefined = length == _UNDEFINED
        try:
            items, after = _walk(buf, 12, None if undefined else 12 + length)
            break
        except _Short:
            if len(buf) < want:  # the file ends inside the sequence: pydicom says how
                return False
            want *= 4
        except _Unsupported:
            return False
    value = _Walked(buf[12 : after - 8 if undefined else after])
    value.items, value.base = items, 12
    tag = BaseTag(group << 16 | element)
    # pydicom parses a raw SQ value on first access (values.convert_SQ): every other
    # reader of the header still finds the sequence. Put in the element dict as pydicom's
    # reader and read_elements do: Dataset.__setitem__ would convert PixelRepresentation
    # for the sequence's items, which a walked header keeps raw
    ds._dict[tag] = RawDataElement(tag, "SQ", length, value, start + 12, False, True)
    fp.seek(start + after)
    return True


def walked_items(raw: Any) -> tuple[list[_Item], int] | None:
    """The walked items of a raw explicit VR little endian sequence element and the offset
    their positions count from, or None when pydicom must parse it."""
    value = getattr(raw, "value", None)
    if (not isinstance(value, bytes) or getattr(raw, "VR", None) != "SQ"
            or raw.is_implicit_VR or not raw.is_little_endian):
        return None
    if isinstance(value, _Walked):
        return value.items, value.base
    try:
        return _walk(value, 0, len(value))[0], 0
    except _Unsupported:
        return None


_FIRST_TOP = 1 << 16  # bytes of a dataset read at first; grown x4 while its elements run past


def _top_level(buf: bytes, complete: bool, stop_tags: Any
               ) -> tuple[list[tuple[int, str, int, int, int, Any]], int, tuple[int, str, int] | None]:
    """The elements of the dataset in ``buf`` as (tag, VR, length, value start, value stop,
    walked items or None), the position reached and, when stopped at an element of
    ``stop_tags``, its (tag, VR, length). ``complete``: ``buf`` runs to the end of the file."""
    out: list[tuple[int, str, int, int, int, Any]] = []
    unpack, unpack32, vrs, size = _HEAD.unpack_from, _LENGTH32.unpack_from, _vrs(), len(buf)
    pos, sequences = 0, False
    while True:
        if size - pos < 12:
            if complete and size - pos < 8:  # pydicom's reader ends here too
                return out, pos, None
            if not complete:
                raise _Short("element header")
        group, element, vr, length = unpack(buf, pos)
        name = vrs.get(vr)
        if name is None or group == 0xFFFE:
            raise _Unsupported(f"element ({group:04X},{element:04X}) VR {vr!r}")
        head = 8
        if name[1]:
            length = unpack32(buf, pos + 8)[0]
            head = 12
        tag = group << 16 | element
        if tag in stop_tags:
            return out, pos, (tag, name[0], length)
        if tag == 0x00080005 and sequences:
            # out of order: pydicom decodes a sequence read before it with the character
            # set in effect then, the walked one is decoded with the final one
            raise _Unsupported("(0008,0005) after a sequence")
        start = pos + head
        if name[0] == "SQ" and length:
            sequences = True
            undefined = length == _UNDEFINED
            items, after = _walk(buf, start, None if undefined else start + length)
            out.append((tag, "SQ", length, start, after - 8 if undefined else after, items))
            pos = after
            continue
        if length == _UNDEFINED:
            raise _Unsupported(f"undefined length {vr!r} element ({group:04X},{element:04X})")
        if start + length > size:
            raise _Short("element value")
        out.append((tag, name[0], length, start, start + length, None))
        pos = start + length


def read_elements(fp: Any, ds: Any, stop_tags: Any) -> tuple[int, str, int] | None | bool:
    """Read the explicit VR little endian dataset at ``fp`` into ``ds`` as the raw elements
    pydicom's reader makes, every sequence kept raw and walked (as by :func:`skip_sequence`).

    Reads to the end of the file, returning None, or to the first element whose tag is in
    ``stop_tags``, returning its (tag, VR, length) with ``fp`` at its header. False, with
    ``fp`` and ``ds`` unchanged, when pydicom must read the dataset (see the module
    docstring; also VR UN, item tags at the top level and data that ends early).
    """
    from pydicom.dataelem import RawDataElement, empty_value_for_VR
    from pydicom.tag import BaseTag

    start = fp.tell()
    want = _FIRST_TOP
    while True:
        buf = fp.read(want)
        complete = len(buf) < want
        try:
            found, pos, stopped = _top_level(buf, complete, stop_tags)
            break
        except _Short:
            fp.seek(start)
            if complete:  # the file ends inside an element: pydicom says how
                return False
            want *= 4
        except (_Unsupported, struct.error):
            fp.seek(start)
            return False
    elements = ds._dict
    new = tuple.__new__  # RawDataElement's own __new__ costs as much as the walk
    for tag, vr, length, begin, end, items in found:
        if items is not None:
            value: Any = _Walked(buf[begin:end])
            value.items, value.base = items, begin
        else:
            value = buf[begin:end] if length else empty_value_for_VR(vr, raw=True)
        key = BaseTag(tag)
        elements[key] = new(RawDataElement,
                            (key, vr, length, value, start + begin, False, True, True, False))
    fp.seek(start + pos)
    return stopped
