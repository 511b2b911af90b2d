"""Every public exception of mist-zarr, and the one record of a source that was not converted.

All exceptions derive from :class:`MistZarrError`, itself a ``ValueError``
(each was a ``ValueError`` before this module existed, so ``except
ValueError`` keeps working).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ChecksumError",
    "CodestreamError",
    "ConversionError",
    "DicomError",
    "ExportError",
    "IncompleteImageError",
    "LossyInputError",
    "MistZarrError",
    "PrefixError",
    "SourceIssue",
    "one_line",
]


class MistZarrError(ValueError):
    """Base class of the errors mist-zarr raises on purpose."""


class CodestreamError(MistZarrError):
    """A codestream is malformed or not in the layout mist-zarr requires."""


class LossyInputError(MistZarrError):
    """The input cannot be stored losslessly and no lossy option was chosen."""


class IncompleteImageError(MistZarrError):
    """The group exists but its write never finished (interrupted or failed)."""


class PrefixError(MistZarrError):
    """An indexed prefix does not end on a tile-part boundary, or its chunk is missing."""


class ChecksumError(MistZarrError):
    """Decoded samples differ from the checksum written with them: the chunk is
    damaged, or the image was replaced while it was being read."""


class ConversionError(MistZarrError):
    """A source cannot be converted; the message names it and says why."""


class AlreadyConvertedError(ConversionError):
    """The image is already completely in the dataset and was not asked to be replaced."""


class DicomError(ConversionError):
    """A DICOM file or series that cannot be read losslessly and unambiguously."""


class ExportError(MistZarrError):
    """The export is not allowed or not possible losslessly as asked."""


# The kinds of SourceIssue: "failed" counts as an error of the run; "rejected"
# is a file that is not readable as its format; "skipped" is not an image, by
# design (an SR, a text file, a duplicate instance); "damaged" is stored data
# that does not check out (verify).
ISSUE_KINDS = ("failed", "rejected", "skipped", "damaged")


@dataclass
class SourceIssue:
    """A source (file, series, image or chunk) that was refused, failed or skipped, and why.

    ``key`` locates it further or identifies it for bookkeeping (a unit key,
    a chunk key such as ``image/c/3/0/0``); it defaults to ``source``.
    """

    source: str
    reason: str
    kind: str = "failed"
    key: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ISSUE_KINDS:
            raise ValueError(f"SourceIssue kind must be one of {ISSUE_KINDS}, found {self.kind!r}")
        self.key = self.key or self.source


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, for reports."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
