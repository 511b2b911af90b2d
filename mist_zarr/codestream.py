"""Parse JPEG 2000 / HTJ2K codestream markers to find resolution prefixes.

A chunk written by mist-zarr is a single-tile codestream in RPCL order with
one tile-part per resolution (``tilepart="RESOLUTIONS"``) and a TLM marker.
Tile-part ``r`` then holds resolution ``r`` of every component, so the bytes
needed to decode at level ``k`` (``skipres=k``, i.e. ``2**k`` times smaller)
are the main header plus tile-parts ``0 .. n-k``.

The parser walks marker segments by their declared lengths (ISO/IEC 15444-1
Annex A) and never searches for marker bytes: ``0xFF90`` may occur inside
entropy-coded data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from .errors import CodestreamError

__all__ = [
    "Codestream",
    "CodestreamError",
    "CodingStyle",
    "EOC",
    "SOT",
    "is_boundary",
    "parse_codestream",
    "prefix_lengths",
    "read_coding_style",
]

SOC = 0xFF4F
SIZ = 0xFF51
CAP = 0xFF50
COD = 0xFF52
TLM = 0xFF55
SOT = 0xFF90
SOD = 0xFF93
EOC = 0xFFD9

PROGRESSION_ORDERS = ("LRCP", "RLCP", "RPCL", "PCRL", "CPRL")


@dataclass(frozen=True)
class Codestream:
    """Facts read from a codestream's markers.

    ``tile_parts`` holds ``(offset, length)`` of each tile-part in stream
    order, each starting at its SOT marker.
    """

    height: int
    width: int
    components: int
    bit_depth: int
    signed: bool
    levels: int
    progression: str
    reversible: bool
    block_size: tuple[int, int]
    htj2k: bool
    tile_parts: tuple[tuple[int, int], ...]
    tlm: tuple[int, ...] | None
    length: int

    @property
    def header_length(self) -> int:
        """Bytes before the first SOT marker."""
        return self.tile_parts[0][0] if self.tile_parts else self.length


def _u16(buf: memoryview, pos: int) -> int:
    if pos + 2 > len(buf):
        raise CodestreamError(f"codestream ends at byte {len(buf)} inside a marker at {pos}")
    return (buf[pos] << 8) | buf[pos + 1]


def _segment(buf: memoryview, pos: int, marker: int) -> memoryview:
    """Return the body of the marker segment starting at ``pos`` (after the marker)."""
    length = _u16(buf, pos + 2)
    if length < 2 or pos + 2 + length > len(buf):
        raise CodestreamError(
            f"marker 0x{marker:04X} at byte {pos} declares length {length}, "
            f"but the codestream has {len(buf)} bytes"
        )
    return buf[pos + 4 : pos + 2 + length]


def _parse_tlm(body: memoryview) -> list[int]:
    if len(body) < 2:
        raise CodestreamError("TLM marker segment is shorter than 2 bytes")
    stlm = body[1]
    st = (stlm >> 4) & 0x3
    sp = (stlm >> 6) & 0x1
    if st == 3:
        raise CodestreamError(f"TLM has reserved Stlm value 0x{stlm:02X}")
    ptlm = 4 if sp else 2
    step = st + ptlm
    data = body[2:]
    if len(data) % step:
        raise CodestreamError(f"TLM body of {len(data)} bytes is not a multiple of {step}")
    fmt = ">I" if sp else ">H"
    return [struct.unpack_from(fmt, data, i + st)[0] for i in range(0, len(data), step)]


def _main_header(
    buf: memoryview,
) -> tuple[int, memoryview | None, memoryview | None, bool, list[int] | None]:
    """Walk the main header: (offset of the first SOT, SIZ body, COD body, HTJ2K, TLM lengths or None)."""
    if len(buf) < 4 or _u16(buf, 0) != SOC:
        raise CodestreamError("not a JPEG 2000 codestream: no SOC marker (0xFF4F) at byte 0")
    pos = 2
    siz = cod = None
    htj2k = False
    tlm: list[int] | None = None
    while True:
        marker = _u16(buf, pos)
        if marker == SOT:
            return pos, siz, cod, htj2k, tlm
        if marker >> 8 != 0xFF or marker < 0xFF30:
            raise CodestreamError(f"expected a marker at byte {pos}, found 0x{marker:04X}")
        if 0xFF30 <= marker <= 0xFF3F:  # markers without a segment
            pos += 2
            continue
        body = _segment(buf, pos, marker)
        if marker == SIZ:
            siz = body
        elif marker == COD:
            cod = body
        elif marker == CAP:
            htj2k = True
        elif marker == TLM:
            tlm = (tlm or []) + _parse_tlm(body)
        pos += 4 + len(body)


@dataclass(frozen=True)
class CodingStyle:
    """The main header's COD marker segment: how the tiles are coded."""

    progression: str
    levels: int
    multiple_component_transform: bool
    transform: int  # 1: reversible 5/3 wavelet, 0: irreversible 9/7

    @property
    def reversible(self) -> bool:
        return self.transform == 1


def read_coding_style(data: bytes | bytearray | memoryview) -> CodingStyle:
    """Read COD from the main header only (tile data may be absent, e.g. a first fragment).

    Raises :class:`CodestreamError` when the header is malformed or has no COD.
    """
    buf = memoryview(data).cast("B")
    _pos, _siz, cod, _htj2k, _tlm = _main_header(buf)
    if cod is None or len(cod) < 10:
        raise CodestreamError("main header lacks a complete COD marker segment")
    order = cod[1]
    progression = PROGRESSION_ORDERS[order] if order < len(PROGRESSION_ORDERS) else f"unknown ({order})"
    return CodingStyle(progression, cod[5], cod[4] == 1, cod[9])


def parse_codestream(data: bytes | bytearray | memoryview) -> Codestream:
    """Parse the main header and tile-part chain of a codestream.

    Raises :class:`CodestreamError` naming the offset and the problem when
    the stream is truncated or inconsistent (for example TLM and SOT lengths
    that disagree).
    """
    buf = memoryview(data).cast("B")
    pos, siz, cod, htj2k, tlm = _main_header(buf)
    if siz is None or cod is None:
        raise CodestreamError("main header lacks a SIZ or COD marker segment")
    if len(siz) < 36:
        raise CodestreamError("SIZ marker segment is too short")
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", siz, 2)
    csiz = struct.unpack_from(">H", siz, 34)[0]
    if len(siz) < 36 + 3 * csiz or csiz == 0:
        raise CodestreamError(f"SIZ declares {csiz} components but is {len(siz)} bytes long")
    ssiz = siz[36]
    if len(cod) < 10:
        raise CodestreamError("COD marker segment is too short")
    order = cod[1]
    if order >= len(PROGRESSION_ORDERS):
        raise CodestreamError(f"COD has unknown progression order {order}")
    levels = cod[5]
    xcb, ycb = cod[6] + 2, cod[7] + 2
    reversible = cod[9] == 1

    tile_parts: list[tuple[int, int]] = []
    while pos < len(buf):
        marker = _u16(buf, pos)
        if marker == EOC:
            break
        if marker != SOT:
            raise CodestreamError(
                f"expected SOT (0xFF90) or EOC (0xFFD9) at byte {pos}, found 0x{marker:04X}"
            )
        if pos + 12 > len(buf):
            raise CodestreamError(f"SOT marker at byte {pos} is truncated")
        _lsot, _isot, psot, _tpsot, _tnsot = struct.unpack_from(">HHIBB", buf, pos + 2)
        if psot == 0:  # last tile-part runs to EOC
            psot = len(buf) - pos - (2 if _u16(buf, len(buf) - 2) == EOC else 0)
        if psot < 14 or pos + psot > len(buf):
            raise CodestreamError(
                f"tile-part at byte {pos} declares {psot} bytes; the codestream has {len(buf)}"
            )
        tile_parts.append((pos, psot))
        pos += psot
    if pos >= len(buf) and (len(buf) < 2 or _u16(buf, len(buf) - 2) != EOC):
        raise CodestreamError(f"codestream of {len(buf)} bytes has no EOC marker: truncated")
    if tlm is not None and tlm != [n for _, n in tile_parts]:
        raise CodestreamError(
            f"TLM tile-part lengths {tlm} disagree with SOT lengths {[n for _, n in tile_parts]}"
        )
    return Codestream(
        height=ysiz - yosiz,
        width=xsiz - xosiz,
        components=csiz,
        bit_depth=(ssiz & 0x7F) + 1,
        signed=bool(ssiz & 0x80),
        levels=levels,
        progression=PROGRESSION_ORDERS[order],
        reversible=reversible,
        block_size=(1 << ycb, 1 << xcb),
        htj2k=htj2k,
        tile_parts=tuple(tile_parts),
        tlm=tuple(tlm) if tlm is not None else None,
        length=len(buf),
    )


def prefix_lengths(data: bytes | bytearray | memoryview | Codestream) -> tuple[int, ...]:
    """Bytes needed to decode at each level ``k = 0 .. n`` (``skipres=k``).

    Element 0 is the whole codestream. Requires one tile, RPCL order and one
    tile-part per resolution; anything else raises :class:`CodestreamError`
    because its prefixes would not be resolution-complete.
    """
    cs = data if isinstance(data, Codestream) else parse_codestream(data)
    n = cs.levels
    if cs.progression != "RPCL":
        raise CodestreamError(f"expected RPCL progression, found {cs.progression}")
    if len(cs.tile_parts) != n + 1:
        raise CodestreamError(
            f"expected {n + 1} tile-parts (one per resolution of {n} decomposition levels), "
            f"found {len(cs.tile_parts)}"
        )
    ends = [off + length for off, length in cs.tile_parts]
    # Level k needs resolutions 0..n-k, i.e. tile-parts 0..n-k.
    return (cs.length,) + tuple(ends[n - k] for k in range(1, n + 1))


def is_boundary(tail: bytes | memoryview) -> bool:
    """True if ``tail`` (the two bytes after a prefix, or empty at end of stream)
    starts a tile-part (SOT) or ends the stream (EOC)."""
    if len(tail) == 0:
        return True
    if len(tail) < 2:
        return False
    marker = (tail[0] << 8) | tail[1]
    return marker in (SOT, EOC)
