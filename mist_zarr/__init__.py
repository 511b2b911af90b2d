"""mist-zarr: medical images stored once, losslessly, served at every resolution."""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# Every public name is loaded on first use (PEP 562): the package's
# dependencies (zarr and numpy alone take about 0.5 s to import here, pandas,
# xarray, dask and pydicom 0.5-1.4 s each) stay unloaded until a verb needs
# them, so ``mist-zarr --help`` starts in a fraction of that. This table and
# cli.py's verb handlers are the places that defer imports for start-up
# (docs/architecture.md, "Imports").
_LAZY = {
    "CodestreamError": "errors", "parse_codestream": "codestream", "prefix_lengths": "codestream",
    "FORMAT_VERSION": "format", "ImageInfo": "format", "IncompleteImageError": "errors",
    "ChecksumError": "errors", "open_image": "reader", "read_checksums": "reader",
    "read_image": "reader", "read_index": "reader", "read_metadata": "reader",
    "LossyInputError": "errors", "ValueMapping": "values", "write_image": "writer",
    "MultiscaleStore": "store", "PrefixError": "errors",
    "ConvertReport": "convert", "convert": "convert", "list_images": "convert",
    "build_catalog": "catalog", "read_catalog": "catalog", "update_catalog": "catalog",
    "write_catalog": "catalog", "export": "export", "verify": "verify",
    "open": "access", "open_dataset": "access", "choose_level": "access",
    "MistDataset": "dataset", "read_level": "batch", "refine": "progressive",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mist_zarr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps ``mist_zarr.convert`` / ``.export`` / ``.verify`` the functions.

    Importing a submodule sets it as an attribute of its package; three
    submodules share their name with the function they export, and loading
    them lazily would otherwise let the module replace the function.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and name in _LAZY and _LAZY[name] == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


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
