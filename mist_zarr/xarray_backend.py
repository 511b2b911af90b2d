"""``xr.open_dataset(path, engine="mist", scale=2)``."""

from __future__ import annotations

from typing import Any

from xarray.backends import BackendEntrypoint

_CF_OPTIONS = ("mask_and_scale", "decode_times", "decode_timedelta", "concat_characters",
               "use_cftime", "decode_coords")


class MistBackendEntrypoint(BackendEntrypoint):
    """Open one resolution level of a mist-zarr image (``scale`` or ``size``).

    xarray's decoding options are accepted. The image holds no times, so only
    ``mask_and_scale`` changes the result: ``False`` (also what
    ``decode_cf=False`` means) returns the stored samples undecoded, with a
    quantized image's ``scale_factor`` / ``add_offset`` in its attributes.
    """

    description = "Open a resolution level of a mist-zarr (HTJ2K Zarr v3) image"
    url = "https://github.com/mist-zarr/mist-zarr"
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "scale", "size", "below",
                               "storage_options", *_CF_OPTIONS)

    def open_dataset(self, filename_or_obj: Any, *, drop_variables: Any = None,
                     scale: int | None = None, size: int | None = None, below: bool = False,
                     storage_options: dict | None = None, mask_and_scale: bool | None = None,
                     decode_times: Any = None, decode_timedelta: Any = None,
                     concat_characters: bool | None = None, use_cftime: bool | None = None,
                     decode_coords: Any = None) -> Any:
        from .access import open_dataset
        from .store import MultiscaleStore

        store = filename_or_obj if isinstance(filename_or_obj, MultiscaleStore) else (
            MultiscaleStore(filename_or_obj, storage_options=storage_options))
        ds = open_dataset(store, scale=scale, size=size, below=below)
        if mask_and_scale is False and store.info.values.kind != "identity":
            ds = self._undecoded(store, ds, decode_times=decode_times,
                                 decode_timedelta=decode_timedelta,
                                 concat_characters=concat_characters, use_cftime=use_cftime,
                                 decode_coords=decode_coords)
        return ds.drop_vars(drop_variables or [], errors="ignore")

    @staticmethod
    def _undecoded(store: Any, decoded: Any, **options: Any) -> Any:
        """The same level's stored samples, as xarray's zarr engine reads them undecoded."""
        import xarray as xr

        from .format import IMAGE

        options = {k: v for k, v in options.items() if v is not None}
        level = decoded[IMAGE].attrs["level"]
        raw = xr.open_dataset(store, engine="zarr", group=f"s{level}", consolidated=False,
                              chunks=None, mask_and_scale=False, **options)
        raw[IMAGE].attrs = {**decoded[IMAGE].attrs, **raw[IMAGE].attrs}
        return raw

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        return False
