"""Export a stored image back *down* the format hierarchy, at any level.

DICOM -> DICOM, NIfTI, PNG, JPEG; NIfTI -> NIfTI, PNG, JPEG; PNG / JPEG / TIFF
-> PNG, JPEG; array -> NIfTI, PNG, JPEG. Going up (for example NIfTI ->
DICOM) would need invented patient, study and acquisition attributes, so it
is refused rather than fabricated.

This module only checks the request and dispatches: each format's exporter
lives with that format in :mod:`mist_zarr.converters`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .converters import image as image_format
from .converters import nifti
from .converters.base import ExportResult, StoredImage
from .converters.dicom.export import export_dicom
from .converters.dicom.seg import write_seg
from .errors import ConversionError, ExportError, MistZarrError
from .format import ATTR, EXPORTS, allowed_exports, not_an_image
from .labels import LabelInfo, false_colour, is_label_group, open_labels, read_label_level
from .reader import open_image
from .storage import get_json, join_location, location, no_group, open_source_store
from .store import MultiscaleStore

__all__ = ["EXPORTS", "ExportError", "ExportResult", "allowed_exports", "export"]


# export format -> (exporter, the options of :func:`export` it takes)
_EXPORTERS: dict[str, tuple[Callable[..., ExportResult], tuple[str, ...]]] = {
    "dicom": (export_dicom, ("uncompressed",)),
    "nifti": (nifti.export, ("philips_scaling",)),
    "png": (image_format.export, ("format", "window", "bits")),
    "jpeg": (image_format.export, ("format", "window", "bits")),
}


def linked_image(source: Any, labels: LabelInfo) -> str:
    """Where the image a label map belongs to is: the label document names it by its
    dataset path, so it is looked for under each folder above the label map and
    accepted only if its grid is the label map's."""
    if not labels.image:
        raise ExportError(f"{source}: the label map is stored in its own geometry, linked to no "
                          "image")
    here = location(source)
    parts = here.split("/")
    for i in range(len(parts) - 1, 0, -1):
        candidate = join_location("/".join(parts[:i]) or "/", labels.image)
        try:
            _, info = open_image(candidate)
        except (MistZarrError, OSError, ValueError):
            continue
        geometry = labels.geometry
        spatial = [d for d in geometry.dims if d != "segment"]
        if (tuple(info.dims) == tuple(spatial)
                and tuple(info.shape) == tuple(s for d, s in zip(geometry.dims, geometry.shape)
                                               if d != "segment")
                and np.allclose(info.affine, geometry.affine, atol=1e-3)):
            return candidate
    raise ExportError(f"{source}: its image {labels.image!r} was not found on the same grid in "
                      f"any folder above {here}")


def _export_seg(source: Any, labels: LabelInfo, k: int, values: np.ndarray,
                out: Path) -> ExportResult:
    """The label map at level ``k`` as a DICOM SEG over its image's DICOM series at that level.

    ``out`` is a folder: ``image/`` the referenced series (the image exported to
    DICOM at level ``k``: at level 0 its original instances) and ``seg.dcm``.
    """
    import pydicom

    image = linked_image(source, labels)
    _, info = open_image(image)
    if info.source_format != "dicom":
        raise ExportError(f"{source}: a DICOM SEG references DICOM instances, but its image "
                          f"{image} came from {info.source_format}")
    out.mkdir(parents=True, exist_ok=True)
    series = export(image, out / "image", format="dicom", scale=k)
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(series.files)]
    seg_file = out / "seg.dcm"
    try:
        notes = write_seg(values, tuple(labels.geometry.dims), list(labels.segments), datasets,
                          str(seg_file), series_description=f"{Path(str(source)).name} s{k}")
    except ConversionError as exc:
        raise ExportError(str(exc)) from exc
    return ExportResult(format="dicom", level=k, files=[str(seg_file)] + list(series.files),
                        notes=notes + [f"image/: the referenced series, {image} at level {k}"]
                        + list(series.notes))


def export(
    store: Any, out: str | os.PathLike, *, format: str, scale: int | None = None,
    size: int | None = None, window: Sequence[float] | None = None, bits: int | None = None,
    uncompressed: bool = False, colour: bool = False, philips_scaling: str = "precise",
) -> ExportResult:
    """Write the image at ``store`` (at level ``scale`` or the level for ``size``) to ``out``.

    ``format``: ``dicom`` (a folder of files), ``nifti`` (one ``.nii.gz`` file
    unless ``out`` ends in ``.nii``), ``png`` or ``jpeg`` (a folder, one file
    per slice). PNG keeps the native bit depth losslessly by default; give
    ``bits=8`` (with the DICOM window, or ``window=(centre, width)``) for
    8-bit pictures. JPEG is always 8-bit and lossy (previews).

    A label map exports to ``nifti`` (labels exact, intent label, the affine of
    its image's level), ``png`` (index images, exact; with ``colour`` RGB
    false colour, one fixed colour per label value) or, when its image came
    from DICOM, ``dicom``: a folder with ``seg.dcm``, a binary DICOM SEG
    (highdicom) over ``image/``, the image's series at the same level.

    NIfTI from DICOM carries the rescale as ``scl_slope``/``scl_inter`` the way
    dcm2niix writes it: ``philips_scaling="precise"`` (the default, as
    dcm2niix) gives Philips MR files with the private scale slope (2005,100E)
    their floating-point values ``(stored * RS + RI) / (RS * SS)``;
    ``"display"`` the DICOM display values ``stored * RS + RI`` (dcm2niix
    ``-p n``). The result's ``notes`` say which was used.
    """
    # xarray (behind access) costs ~0.5 s to import; `import mist_zarr` must not pay it
    from .access import choose_level
    from .access import open as open_level

    fmt = format.lower()
    if fmt not in _EXPORTERS:
        raise ExportError(f"unknown export format {format!r}; expected dicom, nifti, png or jpeg")
    # the image is opened once: its store, group and levels are shared by every step
    physical = open_source_store(store)
    doc = get_json(physical, "zarr.json")
    if doc is None:
        raise no_group(store, str(store))
    attrs = doc.get("attributes", {})
    if is_label_group(attrs):
        return _export_labels(store, physical, Path(out), fmt, scale, size, colour)
    if ATTR not in attrs:
        raise not_an_image(str(store), attrs)
    group, info = open_image(physical)
    allowed = allowed_exports(info.source_format)
    if fmt not in allowed:
        raise ExportError(
            f"{store}: a {info.source_format}-sourced image cannot be exported to {fmt}: exports "
            f"only go down the format hierarchy DICOM -> NIfTI -> PNG/JPEG (allowed here: "
            f"{', '.join(allowed)}); making {fmt} from {info.source_format} would invent "
            "metadata the source never had"
        )
    k = choose_level(info, scale=scale, size=size, source=store)
    values = open_level(MultiscaleStore(physical), scale=k).values
    exporter, takes = _EXPORTERS[fmt]
    options = {"format": fmt, "window": window, "bits": bits, "uncompressed": uncompressed,
               "philips_scaling": philips_scaling}
    return exporter(StoredImage(store, group, info, k, values), Path(out),
                    **{name: options[name] for name in takes})


def _export_labels(source: Any, physical: Any, out: Path, fmt: str, scale: int | None,
                   size: int | None, colour: bool) -> ExportResult:
    from .access import choose_level

    group, labels = open_labels(physical)
    if fmt not in ("nifti", "png", "dicom"):
        raise ExportError(f"{source}: a label map exports to dicom (SEG), nifti or png, "
                          f"not {fmt}")
    info = labels.geometry
    k = choose_level(info, scale=scale, size=size, source=source)
    values = read_label_level(group, k)
    if fmt == "dicom":
        return _export_seg(source, labels, k, values, out)
    # no source header: the stored mask is in its image's orientation, so the affine is its own
    plain = replace(info, metadata={})
    if fmt == "nifti":
        if "segment" in info.dims:  # one channel per segment: the NIfTI 4th axis
            values = np.moveaxis(values, 0, -1)
            plain = replace(plain, dims=("z", "y", "x"), shape=values.shape[:3],
                            spacing=info.spacing[1:])
            values = np.ascontiguousarray(np.moveaxis(values, -1, 0))
            plain = replace(plain, dims=("t", "z", "y", "x"), shape=values.shape,
                            spacing=(1.0,) + tuple(info.spacing[1:]))
        return nifti.export(StoredImage(source, group, plain, k, values), out, intent="label")
    if colour:
        values = false_colour(values)
        plain = replace(plain, dims=tuple(info.dims) + ("c",), shape=values.shape)
    return image_format.export(StoredImage(source, group, plain, k, values), out, format="png")
