"""A map-style dataset over a mist-zarr dataset root, for PyTorch / MONAI loaders.

``MistDataset`` has ``__len__`` and ``__getitem__`` and nothing else that a
``torch.utils.data.DataLoader`` or MONAI needs; it does not import torch.
Each item is read at the resolution level chosen for that image (``scale``
or ``size``), so only that level's bytes are read, locally or over HTTP.

Pickling keeps the dataset root, the options and the selected catalog rows;
every process opens its own stores lazily (a ``DataLoader`` with
``num_workers > 0`` pickles the dataset into each worker).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from .access import choose_level, level_edges
from .catalog import COLUMNS, catalog
from .direct import derived, open_direct
from .labels import find_label_maps, open_labels, read_label_level
from .layout import level_shape
from .modality import find_rescale
from .storage import join_location, location

if TYPE_CHECKING:
    import pandas as pd

    from .direct import OpenedImage
    from .modality import Rescale

__all__ = ["MistDataset"]

_META = ("modality", "series_uid", "study_uid", "patient_id", "body_part", "series_description",
         "source_format", "lossy_source")
_OPEN_IMAGES = 64  # per process; each holds one image's metadata and prefix index


class MistDataset:
    """Images of a mist-zarr dataset root, one item per image, at a chosen level.

    ``dataset`` is a local path or a URL (``http(s)://``, ``s3://`` ... with
    ``storage_options`` for fsspec). Images are listed from the dataset's
    catalog (:func:`mist_zarr.catalog.catalog`: ``catalog.parquet``, or a scan
    of a local / listable store). Incomplete images are left out.

    ``scale=k`` reads every image at level k (``2**k`` times smaller in the
    plane; every selected image must have at least k levels). ``size=n``
    chooses a level per image, as :func:`mist_zarr.open` does: the smallest
    whose shorter in-plane edge is still >= n, or with ``below`` the largest
    whose edge is <= n; an image no level fits (smaller than n, or with
    ``below`` larger at its smallest level) is read at its nearest level,
    with a warning when the dataset is made, rather than refused (a
    collection mixes sizes). Neither: level 0.

    ``filter`` selects images: a callable taking a catalog row (a pandas
    Series) and returning a bool, or a :meth:`pandas.DataFrame.query` string
    such as ``"modality == 'CT' and levels >= 2"``.

    An item is a dict: ``image`` (numpy array of the level, in the dtype the
    image was written with), ``affine`` (4x4 float64 level affine, index
    ``(x, y, z)`` -> RAS+ mm), ``spacing`` (float64 array following the
    image's dims), ``path``, ``level`` and ``meta`` (modality, series_uid,
    study_uid, patient_id, body_part, series_description, source_format,
    lossy_source, dims). ``transform`` is applied to that dict and its result
    returned.

    ``rescale=True`` returns modality values (Hounsfield units for CT:
    ``stored * slope + intercept``, dtype rules in :mod:`mist_zarr.modality`)
    and adds ``rescale`` (slope, intercept, source) to the item. Each item is
    read directly (:mod:`mist_zarr.direct`: one verified prefix read and one
    decode per chunk; level-0 chunks checked against their checksums) on
    ``threads`` decode threads: by default one per core in the process that
    made the dataset, one in loader workers (the workers are the parallelism).

    ``labels=True`` yields (image, mask) pairs: only images with a linked label
    map (:mod:`mist_zarr.labels`) are items, and each item adds ``mask`` (the
    label map at the image's level: same shape, same affine) and ``mask_path``;
    an image with several label maps gives one item per map.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        scale: int | None = None,
        size: int | None = None,
        below: bool = False,
        filter: str | Callable[[Any], bool] | None = None,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        rescale: bool = False,
        threads: int | None = None,
        labels: bool = False,
    ) -> None:

        if scale is not None and size is not None:
            raise ValueError("give scale or size, not both")
        if scale is not None and (isinstance(scale, bool) or not float(scale).is_integer()
                                  or scale < 0):
            raise ValueError(f"scale must be a level (a whole number >= 0), found {scale!r}")
        if size is not None and size < 1:
            raise ValueError(f"size must be a positive number of pixels, found {size}")
        self.root = location(dataset)
        self.scale = scale
        self.size = size
        self.below = below
        self.transform = transform
        self.rescale = rescale
        self.threads = threads
        self.storage_options = dict(storage_options or {})
        df = catalog(self.root, storage_options=self.storage_options)
        df = df[df["complete"].astype(bool)]
        if isinstance(filter, str):
            df = df.query(filter)
        elif filter is not None:
            keep = [bool(filter(row)) for _, row in df.iterrows()]
            df = df[np.asarray(keep, dtype=bool)] if keep else df
        if scale is not None:
            short = df[df["levels"] < scale]
            if len(short):
                raise ValueError(
                    f"scale={scale}: {len(short)} selected image(s) have fewer levels "
                    f"(e.g. {short['path'].iloc[0]!r} has {int(short['levels'].iloc[0])}); "
                    f"add the filter 'levels >= {scale}' or use size=")
        self._rows: list[dict[str, Any]] = df.reset_index(drop=True).to_dict("records")
        self.labels = labels
        if labels:

            masks = find_label_maps(self.root, self.storage_options)
            self._rows = [{**row, "mask_path": m} for row in self._rows
                          for m in masks.get(row["path"], [])]
        if size is not None:
            self._warn_unmet_size()
        self._images: OrderedDict[str, tuple[OpenedImage, Rescale | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._pid = self._maker = os.getpid()

    # -- what the loaders use --------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> Any:
        i = self._position(i)
        row = self._rows[i]
        image, factor = self._image(row["path"])
        info = image.info
        k = choose_level(info, scale=self.scale, size=self.size, below=self.below, clamp=True)
        threads = self.threads or (None if os.getpid() == self._maker else 1)
        values = image.read_values(k, threads=threads)
        affine, spacing = _geometry(image, k)
        item = {
            "image": values if factor is None else factor.apply(values),
            "affine": affine,
            "spacing": spacing,
            "path": row["path"],
            "level": k,
            "meta": {**{key: row.get(key, "") for key in _META}, "dims": "".join(info.dims)},
        }
        if factor is not None:
            item["rescale"] = factor.to_json()
        if self.labels:
            item["mask"], item["mask_path"] = self._mask(row["mask_path"], k), row["mask_path"]
        return self.transform(item) if self.transform is not None else item

    # -- pickling: the root, the options and the rows; stores are per process ----
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_images"] = OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __repr__(self) -> str:
        how = (f"scale={self.scale}" if self.scale is not None else
               f"size={self.size}{', below' if self.below else ''}" if self.size else "level 0")
        return f"MistDataset({self.root!r}, {len(self)} images, {how})"

    # -- without reading pixels ---------------------------------------------------
    @property
    def catalog(self) -> pd.DataFrame:
        """The selected catalog rows, in item order."""
        import pandas as pd


        columns = list(dict.fromkeys([*COLUMNS, *(c for r in self._rows[:1] for c in r)]))
        return pd.DataFrame(self._rows, columns=columns)

    def level(self, i: int) -> int:
        """The level item ``i`` is read at, from the catalog (no I/O)."""
        return choose_level(_catalog_info(self._rows[self._position(i)]), scale=self.scale,
                            size=self.size, below=self.below, clamp=True)

    def item_shape(self, i: int) -> tuple[int, ...]:
        """Shape of item ``i``'s image, from the catalog (no I/O): for bucketing by size."""
        row = self._rows[self._position(i)]
        return tuple(int(n) for n in level_shape(row["shape"], row["dims"], self.level(i)))

    # -- internals --------------------------------------------------------------
    def _warn_unmet_size(self) -> None:
        """Say which images no level fits ``size`` (they are read at the nearest level)."""
        unmet = [row["path"] for row in self._rows
                 if (level_edges(_catalog_info(row))[-1] > self.size if self.below
                     else level_edges(_catalog_info(row))[0] < self.size)]
        if unmet:
            warnings.warn(
                f"MistDataset size={self.size}{', below' if self.below else ''}: "
                f"{len(unmet)} image(s) have no level with a shorter edge "
                f"{'<=' if self.below else '>='} {self.size} and are read at their "
                f"{'smallest level' if self.below else 'level 0'} (e.g. {unmet[0]!r}); "
                f"item['level'] and item_shape(i) say which", UserWarning, stacklevel=3)

    def _position(self, i: int) -> int:
        n = len(self._rows)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        return i

    def _mask(self, path: str, k: int) -> np.ndarray:

        group, _ = open_labels(join_location(self.root, path))
        return read_label_level(group, k)

    def _image(self, path: str) -> tuple[OpenedImage, Rescale | None]:

        if self._pid != os.getpid():  # forked: the parent's images (and lock) are not ours
            self._images = OrderedDict()
            self._lock = threading.Lock()
            self._pid = os.getpid()
        with self._lock:
            entry = self._images.get(path)
            if entry is not None:
                self._images.move_to_end(path)
        where = join_location(self.root, path)
        if entry is not None and "://" in where:
            return entry  # remote: an open costs requests; the catalog's images are kept
        # locally an open is one small read that also notices a rewritten image (a new
        # write id): the kept entry is used only while it is still that image's write
        image = open_direct(where, storage_options=self.storage_options)
        if entry is not None and image._parsed is not None and image._parsed is entry[0]._parsed:
            return entry
        factor = None
        if self.rescale:
            info = image.info
            factor = find_rescale(info.metadata, info.shape[:info.dims.index("y")],
                                  image.slice_metadata)
        with self._lock:
            self._images[path] = (image, factor)
            while len(self._images) > _OPEN_IMAGES:
                self._images.popitem(last=False)
        return image, factor


def _geometry(image: OpenedImage, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Level ``k``'s affine and spacing (float64 arrays of the item's own), computed once
    per image write."""
    info = image.info
    affine, spacing = derived(
        image, ("geometry", k),
        lambda: (np.asarray(info.level_affine(k), np.float64),
                 np.asarray(info.level_spacing(k), np.float64)),
        lambda kept: kept[0].nbytes + kept[1].nbytes + 256)
    return affine.copy(), spacing.copy()


def _catalog_info(row: Mapping[str, Any]) -> Any:
    """What :func:`choose_level` needs of an image, from its catalog row (no I/O)."""
    return SimpleNamespace(dims=tuple(row["dims"]), levels=int(row["levels"]),
                           level_shape=lambda k: level_shape(row["shape"], row["dims"], k))
