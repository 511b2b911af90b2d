"""The functional groups of enhanced multi-frame files, read once per file from their bytes.

An enhanced header is mostly its PerFrameFunctionalGroupsSequence: a few
dozen elements per frame, most of them byte-identical from frame to frame,
beside one SharedFunctionalGroupsSequence item. Both are kept raw when the
header is read (``walk.skip_sequence``) and are read here from their walked
bytes: each distinct value is converted by pydicom once per series (memoised
in the series' :class:`~.jsonmodel._JsonBuilder`), and each frame gets its
JSON model and a typed view (:class:`_ItemView`) that answers ``get`` and
``in`` as the Dataset it stands for would. Where the walker does not apply
(another transfer syntax, an encoding it leaves to pydicom) the Datasets that
pydicom parses are used as before.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from .jsonmodel import Encoded, _JsonBuilder
from .tags import _get
from .walk import _Item, walked_items

SHARED_TAG = 0x52009229
PER_FRAME_TAG = 0x52009230
FUNCTIONAL_GROUP_TAGS = frozenset({SHARED_TAG, PER_FRAME_TAG})


@dataclass
class FrameGroups:
    """One file's per-frame functional groups: a typed view and the JSON model per frame."""

    items: list[Any]  # pydicom Datasets or _ItemViews: .get(keyword), `keyword in item`
    json: list[dict[str, Any]]


def read_frame_groups(ds: Any, builder: _JsonBuilder, charset: str) -> FrameGroups:
    """The PerFrameFunctionalGroupsSequence of ``ds``, from its raw element when it is one."""
    raw = ds.get_item(PER_FRAME_TAG)
    walked = walked_items(raw)
    if walked is None:
        sequence = ds.PerFrameFunctionalGroupsSequence
        return FrameGroups(list(sequence), [builder.dataset(item, charset) for item in sequence])
    items, base = walked
    src = Encoded(raw.value, base, charset, _encodings(ds))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # every frame item differs from the others: no memo lookup for them
        frames = [builder.elements_json(item[2], src) for item in items]
    return FrameGroups([_ItemView(builder, src, item) for item in items], frames)


def read_shared_group(ds: Any, charset: str, builder: _JsonBuilder) -> Any:
    """The (first) item of SharedFunctionalGroupsSequence as a view or Dataset, or None."""
    raw = ds.get_item(SHARED_TAG)
    walked = walked_items(raw)
    if walked is None:
        seq = _get(ds, "SharedFunctionalGroupsSequence")
        return seq[0] if seq else None
    items, base = walked
    return _ItemView(builder, Encoded(raw.value, base, charset, _encodings(ds)), items[0]) \
        if items else None


def _encodings(ds: Any) -> Any:
    """The character encodings pydicom decodes ``ds``'s nested text with."""
    return ds.original_character_set or ds._character_set


class _ItemView:
    """A walked item read as the pydicom Dataset it encodes: ``get(keyword)`` gives the
    element's value (a list of views for a sequence), ``keyword in view`` its presence."""

    __slots__ = ("_builder", "_elements", "_src")

    def __init__(self, builder: _JsonBuilder, src: Encoded, item: _Item) -> None:
        self._builder = builder
        self._src = src
        self._elements = item[2]

    def __contains__(self, keyword: str) -> bool:
        return _tag(keyword) in self._elements

    def get(self, keyword: str, default: Any = None) -> Any:
        tag = _tag(keyword)
        node = self._elements.get(tag)  # type: ignore[arg-type]
        if node is None:
            return default
        if node[0] == "SQ":
            return [_ItemView(self._builder, self._src, item) for item in node[1]]
        vr, start, stop = node
        src = self._src
        sig = (src.charset, (tag, vr, src.bytes(start, stop)))
        return self._builder.data_element(sig, src.encodings).value


_TAGS: dict[str, int | None] = {}


def _tag(keyword: str) -> int | None:
    if keyword not in _TAGS:
        from pydicom.datadict import tag_for_keyword

        _TAGS[keyword] = tag_for_keyword(keyword)
    return _TAGS[keyword]
