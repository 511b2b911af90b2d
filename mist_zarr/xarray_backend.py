"""``xr.open_dataset(path, engine="mist", scale=2)``."""

from __future__ import annotations

from typing import Any

from xarray.backends import BackendEntrypoint


class MistBackendEntrypoint(BackendEntrypoint):
    """Open one resolution level of a mist-zarr image (``scale`` or ``size``)."""

    description = "Open a resolution level of a mist-zarr (HTJ2K Zarr v3) image"
    url = "https://github.com/mist-zarr/mist-zarr"
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "scale", "size", "below",
                               "storage_options")

    def open_dataset(self, filename_or_obj: Any, *, drop_variables: Any = None,
                     scale: int | None = None, size: int | None = None, below: bool = False,
                     storage_options: dict | None = None) -> Any:
        from .access import open_dataset

        ds = open_dataset(filename_or_obj, scale=scale, size=size, below=below,
                          storage_options=storage_options)
        return ds.drop_vars(drop_variables or [], errors="ignore")

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        return False
