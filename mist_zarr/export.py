"""Export a stored image back *down* the format hierarchy, at any level.

DICOM -> DICOM, NIfTI, PNG, JPEG; NIfTI -> NIfTI, PNG, JPEG; PNG / JPEG / TIFF
-> PNG, JPEG; array -> NIfTI, PNG, JPEG. Going up (for example NIfTI ->
DICOM) would need invented patient, study and acquisition attributes, so it
is refused rather than fabricated.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .format import ImageInfo
from .reader import open_image
from .errors import ExportError

__all__ = ["EXPORTS", "ExportError", "ExportResult", "allowed_exports", "export"]

EXPORTS: dict[str, tuple[str, ...]] = {
    "dicom": ("dicom", "nifti", "png", "jpeg"),
    "nifti": ("nifti", "png", "jpeg"),
    "array": ("nifti", "png", "jpeg"),
    "png": ("png", "jpeg"),
    "jpeg": ("png", "jpeg"),
    "tiff": ("png", "jpeg"),
}


@dataclass
class ExportResult:
    """Files written by :func:`export`."""

    format: str
    level: int
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def allowed_exports(source_format: str) -> tuple[str, ...]:
    """Formats an image from ``source_format`` may be exported to."""
    return EXPORTS.get(source_format, ())


def export(
    store: Any, out: str | os.PathLike, *, format: str, scale: int | None = None,
    size: int | None = None, window: Sequence[float] | None = None, bits: int | None = None,
    uncompressed: bool = False,
) -> ExportResult:
    """Write the image at ``store`` (at level ``scale`` or the level for ``size``) to ``out``.

    ``format``: ``dicom`` (a folder of files), ``nifti`` (one ``.nii.gz`` file
    unless ``out`` ends in ``.nii``), ``png`` or ``jpeg`` (a folder, one file
    per slice). PNG keeps the native bit depth losslessly by default; give
    ``bits=8`` (with the DICOM window, or ``window=(centre, width)``) for
    8-bit pictures. JPEG is always 8-bit and lossy (previews).
    """
    from .access import choose_level

    group, info = open_image(store)
    fmt = format.lower()
    if fmt not in ("dicom", "nifti", "png", "jpeg"):
        raise ExportError(f"unknown export format {format!r}; expected dicom, nifti, png or jpeg")
    allowed = allowed_exports(info.source_format)
    if fmt not in allowed:
        raise ExportError(
            f"{store}: a {info.source_format}-sourced image cannot be exported to {fmt}: exports "
            f"only go down the format hierarchy DICOM -> NIfTI -> PNG/JPEG (allowed here: "
            f"{', '.join(allowed)}); making {fmt} from {info.source_format} would invent "
            "metadata the source never had"
        )
    k = choose_level(info, scale=scale, size=size)
    out = Path(out)
    if fmt == "nifti":
        return _export_nifti(store, info, k, out)
    if fmt == "dicom":
        from .converters.dicom import export_dicom

        return export_dicom(store, info, k, out, uncompressed=uncompressed)
    return _export_pictures(store, info, k, out, fmt, window=window, bits=bits)


def _export_nifti(store: Any, info: ImageInfo, k: int, out: Path) -> ExportResult:
    import nibabel as nib

    from .access import open as open_level

    data = open_level(store, scale=k).values
    if "c" in info.dims:  # NIfTI RGB24 / RGBA32: one structured voxel per colour sample
        if data.dtype != np.uint8:
            raise ExportError(f"{store}: NIfTI colour voxels are 8-bit; this image is {data.dtype}")
        order = tuple(range(data.ndim - 2, -1, -1)) + (data.ndim - 1,)
        rgb = np.dtype([(name, "u1") for name in "RGBA"[: data.shape[-1]]])
        spatial = np.ascontiguousarray(data.transpose(order)).view(rgb)[..., 0]
    else:
        spatial = data.T  # ([t,] z, y, x) -> (x, y, z[, t])
    if spatial.ndim == 2:
        spatial = spatial[:, :, np.newaxis]
    affine = info.level_affine(k)
    meta = info.metadata.get("nifti") if isinstance(info.metadata, dict) else None
    notes: list[str] = []
    if meta:
        cls = nib.Nifti2Image if meta.get("version") == 2 else nib.Nifti1Image
        header = cls.header_class.from_fileobj(io.BytesIO(base64.b64decode(meta["header_bytes"])),
                                               check=False)
        header.set_data_shape(spatial.shape)
        header.set_data_dtype(spatial.dtype)
        if k:
            zooms = list(header.get_zooms())
            zooms[0], zooms[1] = zooms[0] * 2**k, zooms[1] * 2**k
            header.set_zooms(zooms)
            if meta["sform_code"]:
                header.set_sform(affine, meta["sform_code"])
            if meta["qform_code"]:
                header.set_qform(affine, meta["qform_code"])
            notes.append(f"level {k}: pixdim and sform/qform scaled by {2**k} in x and y, "
                         "origin unchanged")
        for ext in meta.get("extensions", []):
            header.extensions.append(
                nib.nifti1.Nifti1Extension(ext["code"], base64.b64decode(ext["content"])))
        img = cls(spatial, None, header=header)
        # nibabel clears scl_* on construction; the stored integers keep the file's scaling
        img.header.set_slope_inter(meta.get("scl_slope"), meta.get("scl_inter"))
        img.header.set_sform(*header.get_sform(coded=True))
        img.header.set_qform(*header.get_qform(coded=True))
    else:
        img = nib.Nifti1Image(spatial, affine)
        img.header.set_sform(affine, 1)  # scanner-based anatomical coordinates
        img.header.set_qform(affine, 1)
        img.header.set_xyzt_units("mm", "sec")
        img.header["descrip"] = f"mist-zarr level {k} of {info.source_format}"[:79].encode()
        rescale = _dicom_rescale(info)
        if rescale is not None:
            img.header.set_slope_inter(*rescale)
    name = out if out.suffix in (".nii", ".gz") else out.with_name(out.name + ".nii.gz")
    name.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, name)
    return ExportResult("nifti", k, [str(name)], notes)


def _dicom_pair(info: ImageInfo, first: str, second: str) -> tuple[Any, Any]:
    """First values of two DICOM JSON attributes of the series (None when absent)."""
    ds = info.metadata.get("dicom") if isinstance(info.metadata, dict) else None
    if not isinstance(ds, dict):
        return None, None
    return tuple((ds.get(tag, {}).get("Value") or [None])[0] for tag in (first, second))


def _dicom_rescale(info: ImageInfo) -> tuple[float, float] | None:
    slope, inter = _dicom_pair(info, "00281053", "00281052")  # RescaleSlope, RescaleIntercept
    if slope is None and inter is None:
        return None
    return float(slope if slope is not None else 1.0), float(inter if inter is not None else 0.0)


def _dicom_window(info: ImageInfo) -> tuple[float, float] | None:
    centre, width = _dicom_pair(info, "00281050", "00281051")  # WindowCenter, WindowWidth
    return (float(centre), float(width)) if centre is not None and width is not None else None


def _to_8bit(plane: np.ndarray, info: ImageInfo, window: Sequence[float] | None) -> np.ndarray:
    values = plane.astype(np.float64)
    rescale = _dicom_rescale(info)
    if rescale is not None:
        values = values * rescale[0] + rescale[1]
    win = tuple(window) if window is not None else _dicom_window(info)
    if win is None:
        lo, hi = float(values.min()), float(values.max())
    else:
        lo, hi = win[0] - win[1] / 2, win[0] + win[1] / 2
    scaled = (values - lo) / max(hi - lo, 1e-12) * 255.0
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    mono1 = isinstance(info.metadata, dict) and info.metadata.get("photometric") == "MONOCHROME1"
    return 255 - out if mono1 else out


def _restore_mode(plane: np.ndarray, info: ImageInfo) -> np.ndarray:
    meta = info.metadata.get(info.source_format, {}) if isinstance(info.metadata, dict) else {}
    restore = meta.get("restore", {}) if isinstance(meta, dict) else {}
    if restore.get("grey_as_rgb"):
        plane = np.stack([plane] * 3, -1)
    if restore.get("grey_alpha_as_rgba"):
        plane = plane[..., [0, 3]]
    if restore.get("alpha") == "opaque":
        alpha = np.full(plane.shape[:2] + (1,), np.iinfo(plane.dtype).max, plane.dtype)
        plane = np.concatenate([plane if plane.ndim == 3 else plane[..., None], alpha], -1)
    return plane


def _export_pictures(store: Any, info: ImageInfo, k: int, out: Path, fmt: str, *,
                     window: Sequence[float] | None, bits: int | None) -> ExportResult:
    from PIL import Image, PngImagePlugin

    from .access import open as open_level

    level = open_level(store, scale=k)
    data = level.values
    colour = "c" in info.dims
    lead = data.shape[: data.ndim - (3 if colour else 2)]
    out.mkdir(parents=True, exist_ok=True)
    eight = fmt == "jpeg" or bits == 8
    notes: list[str] = []
    offset = 0
    if not eight:
        lo, hi = (int(data.min()), int(data.max())) if data.dtype.kind in "iub" else (0, -1)
        if data.dtype.kind == "b":
            data = data.astype(np.uint8)
        elif data.dtype.kind == "f" or not (0 <= lo and hi <= 65535 or -32768 <= lo and hi <= 32767):
            raise ExportError(
                f"{store}: {data.dtype} samples in [{lo}, {hi}] do not fit a 16-bit PNG "
                "losslessly; export 8-bit pictures (bits=8 / --bits 8, with a window) or NIfTI"
            )
        elif lo < 0:
            offset = 32768  # PNG has no signed samples
            notes.append("signed samples written with +32768 (text chunk mist_offset = -32768)")
        if data.dtype.itemsize > 2 or (data.dtype.kind == "i" and not offset):
            data = data.astype(np.uint16 if hi > 255 or data.dtype.itemsize > 1 else np.uint8)
    elif fmt == "png" or fmt == "jpeg":
        notes.append("8-bit rendering: " + ("window " + str(tuple(window)) if window is not None
                                             else "DICOM window" if _dicom_window(info)
                                             else "min-max of each slice"))
    text = {
        "mist_source_format": info.source_format,
        "mist_level": str(k),
        "mist_spacing_mm": json.dumps(list(info.level_spacing(k))),
        "mist_affine": json.dumps(np.asarray(info.level_affine(k)).tolist()),
    }
    if offset:
        text["mist_offset"] = str(-offset)
    files = []
    width = [len(str(max(n - 1, 0))) for n in lead]
    base = Path(str(store).rstrip("/")).name.removesuffix(".zarr") or "image"
    for idx in np.ndindex(*lead) if lead else [()]:
        plane = data[idx]
        suffix = "".join(f"_{d}{i:0{w}d}" for d, i, w in zip(info.dims, idx, width))
        path = out / f"{base}{suffix}.{'png' if fmt == 'png' else 'jpg'}"
        if eight:
            pic = _to_8bit(plane, info, window) if plane.dtype != np.uint8 or window else plane
        else:
            pic = (plane.astype(np.int32) + offset).astype(np.uint16) if offset else plane
            pic = _restore_mode(pic, info)
        if fmt == "png":
            if eight or pic.dtype == np.uint8 or pic.ndim == 3:
                info_chunk = PngImagePlugin.PngInfo()
                for key, value in text.items():
                    info_chunk.add_text(key, value)
                Image.fromarray(pic).save(path, pnginfo=info_chunk)
            else:
                _save_png16(path, pic, text)
        else:
            if pic.ndim == 3 and pic.shape[-1] == 4:  # JPEG has no alpha channel
                pic = pic[..., :3]
                if "alpha channel dropped (JPEG has none)" not in notes:
                    notes.append("alpha channel dropped (JPEG has none)")
            Image.fromarray(np.ascontiguousarray(pic)).save(path, quality=90)
        files.append(str(path))
    return ExportResult(fmt, k, files, notes)


def _save_png16(path: Path, pic: np.ndarray, text: dict[str, str]) -> None:
    """16-bit greyscale PNG with text chunks (Pillow writes 16-bit grey via mode I;16)."""
    from PIL import Image, PngImagePlugin

    info_chunk = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info_chunk.add_text(key, value)
    Image.fromarray(np.ascontiguousarray(pic.astype("<u2"))).save(path, pnginfo=info_chunk)
