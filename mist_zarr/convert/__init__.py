"""``mist-zarr convert``: a file or tree of DICOM / NIfTI / PNG / JPEG / TIFF into a dataset root.

A dataset root is a Zarr v3 group holding one mist-zarr image group per
series (DICOM) or file (NIfTI, 2-D images), under readable, stable paths.
A source that fails is reported with its reason and the others go on; an
image is complete only once its ``complete`` flag is written, so a rerun
with ``skip_existing`` redoes exactly the unfinished ones.

Modules: planning is :mod:`mist_zarr.converters.sources` (walk, detect,
units, names; ``verify`` reads sources through it too); :mod:`.unit` reads
and writes one unit and its completion marker; :mod:`.local` (read-ahead
thread) and :mod:`.distributed` (windowed dask submission) run the units;
:mod:`.scratch` makes local writes atomic; :mod:`.root` opens the
root and its JSON documents; :mod:`.report` is what a run returns;
:mod:`.run` holds :func:`convert` and its planning, :mod:`.execute` the rest of a
run (imported after the scan); :mod:`.options` its settings and defaults; :mod:`.listing` holds
:func:`list_images`.

Imports kept lazy on purpose, for the start-up time of ``import mist_zarr``
and of the CLI: zarr, the writer and the runners (after the scan, so that
``convert`` starts at once; the names they provide here load on first use),
dask/distributed (only with ``workers``/``scheduler``),
tqdm (only for a progress bar) and pyarrow (inside the catalog's
:mod:`~mist_zarr.tables`; a run never loads pandas).
"""

from __future__ import annotations

from ..converters.base import DEFAULT_MAX_BYTES
from ..converters.sources import Unit, iter_sources, plan
from ..format import DONE_DIR, TMP_DIR
from .options import Options
from .report import ConvertReport, Problem, SeriesResult, dumps
from .run import DATASET_ATTR, DEFAULT_BATCH_BYTES, convert

__all__ = ["CLUSTER_CONFIG", "DATASET_ATTR", "DEFAULT_BATCH_BYTES", "DEFAULT_MAX_BYTES", "DONE_DIR",
           "TMP_DIR", "ConvertReport", "Options", "Problem", "SeriesResult", "Unit", "UnitRead",
           "convert", "dumps", "iter_sources", "list_images", "plan", "read_unit", "run_unit",
           "write_unit"]

# loaded when first asked for: they bring zarr and the writer, which the scan at the start
# of ``convert`` does not need (see the module docstring)
_LAZY = {"CLUSTER_CONFIG": ".distributed", "list_images": ".listing", "UnitRead": ".unit", "read_unit": ".unit", "run_unit": ".unit", "write_unit": ".unit"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
