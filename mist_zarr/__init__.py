"""mist-zarr: medical images stored once, losslessly, served at every resolution."""

from __future__ import annotations

import imagecodecs.zarr as _imagecodecs_zarr

# Stored chunks use the codec name "imagecodecs_htj2k"; zarr finds it only
# once registered. Registering is idempotent.
_imagecodecs_zarr.register_codecs(["htj2k"], verbose=False)

from .codestream import CodestreamError, parse_codestream, prefix_lengths  # noqa: E402
from .format import FORMAT_VERSION, ImageInfo, IncompleteImageError  # noqa: E402
from .reader import (  # noqa: E402
    ChecksumError,
    open_image,
    read_checksums,
    read_image,
    read_index,
    read_metadata,
)
from .values import LossyInputError, ValueMapping  # noqa: E402
from .writer import write_image  # noqa: E402
from .store import MultiscaleStore, PrefixError  # noqa: E402
from .convert import ConvertReport, convert, list_images  # noqa: E402
from .catalog import build_catalog, read_catalog, update_catalog, write_catalog  # noqa: E402
from .export import export  # noqa: E402
from .verify import verify  # noqa: E402

__version__ = "0.1.0"

# xarray (and pandas behind it) cost half a second to import; the reading
# API loads them on first use so that convert / verify / serve start fast.
_LAZY = {"open": "access", "open_dataset": "access", "choose_level": "access",
         "MistDataset": "dataset", "read_level": "batch", "refine": "progressive"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mist_zarr' has no attribute {name!r}")

__all__ = [
    "FORMAT_VERSION",
    "ChecksumError",
    "CodestreamError",
    "ConvertReport",
    "ImageInfo",
    "IncompleteImageError",
    "LossyInputError",
    "MistDataset",
    "MultiscaleStore",
    "PrefixError",
    "build_catalog",
    "choose_level",
    "convert",
    "export",
    "list_images",
    "open",
    "open_dataset",
    "ValueMapping",
    "__version__",
    "open_image",
    "parse_codestream",
    "prefix_lengths",
    "read_catalog",
    "read_checksums",
    "read_image",
    "read_index",
    "read_level",
    "read_metadata",
    "refine",
    "update_catalog",
    "verify",
    "write_catalog",
    "write_image",
]
