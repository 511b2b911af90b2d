"""The marker parser behind the prefix index, checked against the decoder itself."""

from __future__ import annotations

import imagecodecs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mist_zarr.codestream import CodestreamError, is_boundary, parse_codestream, prefix_lengths
from mist_zarr.layout import encode_kwargs, num_levels, resolutions_for


def encode(a: np.ndarray, levels: int) -> bytes:
    return imagecodecs.htj2k_encode(a, **encode_kwargs(levels))


@pytest.mark.parametrize("shape,levels", [((512, 512), 3), ((511, 513), 3), ((64, 64), 1),
                                          ((100, 300), 1), ((3, 5), 1), ((2, 9), 1)])
def test_parse_reports_siz_cod_and_one_tile_part_per_resolution(shape, levels):
    a = np.random.default_rng(1).integers(0, 4096, shape).astype(np.uint16)
    cs = parse_codestream(encode(a, levels))
    assert (cs.height, cs.width) == shape
    assert cs.components == 1 and cs.levels == levels and cs.progression == "RPCL"
    assert cs.reversible and cs.htj2k and cs.block_size == (64, 64)
    assert len(cs.tile_parts) == levels + 1
    assert cs.tlm == tuple(n for _, n in cs.tile_parts)


def test_prefix_of_each_level_decodes_like_the_full_stream(ct_volume):
    plane = ct_volume[20]
    n = num_levels(plane.shape)
    data = encode(plane, n)
    lengths = prefix_lengths(data)
    assert len(lengths) == n + 1 and lengths[0] == len(data)
    assert list(lengths) == sorted(lengths, reverse=True)
    for k in range(n + 1):
        full = imagecodecs.htj2k_decode(data, skipres=k)
        part = imagecodecs.htj2k_decode(data[: lengths[k]], skipres=k)
        np.testing.assert_array_equal(part, full)
        assert part.shape == tuple(-(-s // 2**k) for s in plane.shape)
        assert is_boundary(data[lengths[k] : lengths[k] + 2])
        # one byte short: the two bytes after it are not a marker, so a reader can tell
        assert not is_boundary(data[lengths[k] - 1 : lengths[k] + 1])


def test_rgb_stream_has_three_components():
    rgb = np.random.default_rng(2).integers(0, 255, (130, 140, 3)).astype(np.uint8)
    cs = parse_codestream(encode(rgb, 1))
    assert cs.components == 3 and cs.bit_depth == 8 and not cs.signed
    assert len(prefix_lengths(cs)) == 2


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "uint32"])
def test_bit_depth_and_sign(dtype):
    info = np.iinfo(dtype)
    a = np.array([[info.min, info.max], [0, 1]], dtype)
    cs = parse_codestream(encode(a, 1))
    assert cs.bit_depth == info.bits and cs.signed == (info.min < 0)


def test_truncated_and_foreign_streams_are_refused():
    data = encode(np.arange(128 * 128, dtype=np.uint16).reshape(128, 128), 1)
    with pytest.raises(CodestreamError, match="SOC"):
        parse_codestream(b"\x89PNG\r\n\x1a\n" + data)
    for cut in (1, 3, 50, len(data) // 2, len(data) - 1):
        with pytest.raises(CodestreamError):
            parse_codestream(data[:cut])


def test_layout_other_than_rpcl_by_resolution_is_refused():
    a = np.zeros((128, 128), np.uint8)
    lrcp = imagecodecs.htj2k_encode(a, reversible=True, resolutions=resolutions_for(1),
                                     prog_order="LRCP",
                                     tilepart=imagecodecs.HTJ2K.TILEPART.RESOLUTIONS, tlm=True)
    with pytest.raises(CodestreamError, match="RPCL"):
        prefix_lengths(lrcp)
    one_part = imagecodecs.htj2k_encode(a, reversible=True, resolutions=resolutions_for(1),
                                        prog_order="RPCL")
    with pytest.raises(CodestreamError, match="tile-parts"):
        prefix_lengths(one_part)


def test_tlm_that_disagrees_with_sot_is_detected():
    data = bytearray(encode(np.ones((128, 128), np.uint8), 1))
    cs = parse_codestream(bytes(data))
    # the TLM segment sits just before the first SOT; bump its last Ptlm value
    data[cs.header_length - 1] ^= 0x01
    with pytest.raises(CodestreamError, match="TLM"):
        parse_codestream(bytes(data))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_streams_parse_or_raise_codestream_error(data):
    """Any byte flips or cuts: the parser answers or raises its own error, nothing else."""
    base = bytearray(encode(np.arange(96 * 80, dtype=np.uint16).reshape(96, 80) % 1000, 1))
    header = parse_codestream(bytes(base)).header_length
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, header + 40))
        base[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(base)))
    try:
        cs = parse_codestream(bytes(base[:cut]))
    except CodestreamError:
        return
    assert all(off + n <= cs.length for off, n in cs.tile_parts)


@pytest.mark.parametrize("levels", [1, 2, 3, 5])
def test_resolutions_follow_the_installed_imagecodecs(levels):
    """imagecodecs changed what ``resolutions`` counts (decompositions up to 2026.10,
    resolution levels from 2026.11): the configuration must give ``levels`` either way."""
    a = np.zeros((256, 256), np.uint8)
    assert len(prefix_lengths(encode(a, levels))) == levels + 1
    cs = parse_codestream(encode(a, levels))
    assert cs.levels == levels
