"""NIfTI-1 / NIfTI-2 ingest through nibabel."""

from __future__ import annotations

import base64
import functools
import gzip
import io
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError
from ..format import slice_offsets
from ..modality import PHILIPS, PHILIPS_SCALINGS, Rescale, find_rescale, rescaled_dtype
from .base import (
    ConversionError,
    ExportResult,
    SourceImage,
    StoredImage,
    missing_dependency,
    safe_name,
)

__all__ = ["FORMAT", "GZIP", "SUFFIXES", "export", "is_nifti", "read", "read_nifti", "sniff"]

FORMAT = "nifti"
SUFFIXES = (".nii.gz", ".nii")
GZIP = True  # .nii.gz: the registry offers sniff() the decompressed head too
_MAGICS = {b"n+1\x00", b"ni1\x00", b"n+2\x00", b"ni2\x00"}


def sniff(head: bytes) -> str | None:
    """``"nifti"`` if ``head`` (the first 544 bytes of content) carries a NIfTI-1/2 magic."""
    return FORMAT if head[344:348] in _MAGICS or head[4:8] in _MAGICS else None


def is_nifti(path: str | Path) -> bool:
    """True if the file's content (gzip or not) carries a NIfTI-1/2 magic."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            block = f.read(544)
    except (OSError, EOFError):
        return False
    return sniff(block) is not None


def _load(nib: Any, path: Path) -> Any:
    """Load by content: nibabel picks formats by extension, sniffing does not."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    fileobj = gzip.open(path, "rb") if gz else open(path, "rb")  # noqa: SIM115 - held by proxy
    block = fileobj.read(348)
    fileobj.seek(0)
    if block[344:348] in (b"n+1\x00", b"ni1\x00"):
        cls = nib.Nifti1Image
    elif block[4:8] in (b"n+2\x00", b"ni2\x00"):
        cls = nib.Nifti2Image
    else:
        fileobj.close()
        raise ConversionError(f"{path}: no NIfTI-1/2 magic in the header")
    if block[344:348] == b"ni1\x00" or block[4:8] == b"ni2\x00":
        fileobj.close()
        return nib.load(path)  # header/image pairs (.hdr/.img) need nibabel's file naming
    holder = nib.FileHolder(filename=str(path), fileobj=fileobj)
    return cls.from_file_map({"header": holder, "image": holder}, mmap=False)


def _file_header(nib: Any, img: Any, path: Path) -> Any:
    """The header exactly as in the file (nibabel moves scl_* into the data proxy on load)."""

    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
        raw = f.read(img.header.sizeof_hdr)
    return type(img.header).from_fileobj(io.BytesIO(raw), check=False)


def _header_json(header: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in header.keys():
        value = np.asarray(header[key])
        if value.dtype.kind == "S":
            out[key] = value.tobytes().rstrip(b"\x00").decode("latin-1")
        elif value.dtype.kind == "f":
            out[key] = [None if not np.isfinite(v) else float(v) for v in value.ravel()] \
                if value.ndim else (None if not np.isfinite(value) else float(value))
        else:
            out[key] = value.tolist()
    return out


def read_nifti(path: str | Path, *, max_bytes: int | None = None) -> SourceImage:
    """Read a NIfTI file's *stored* voxels (``scl_*`` kept as metadata, not applied).

    The array ``(x, y, z[, t])`` becomes ``([t,] z, y, x)``; the file's best
    affine (sform, else qform) is the image affine, unchanged. Raises
    :class:`ConversionError` naming the file for anything unreadable or invalid.
    """
    try:
        return _read_nifti(path, max_bytes)
    except ConversionError:
        raise
    except Exception as exc:  # nibabel raises many types for invalid header fields
        raise ConversionError(f"{path}: invalid NIfTI header or data: "
                              f"{type(exc).__name__}: {exc}") from exc


read = read_nifti  # the registry's name for a single-file reader


def _nifti_metadata(nib: Any, img: Any, header: Any, rgb: bool) -> tuple[dict[str, Any], str]:
    """The ``nifti`` record kept with the image (everything export needs to write it back)."""
    dtype = header.get_data_dtype()
    space_unit, time_unit = header.get_xyzt_units()
    slope, inter = header.get_slope_inter()
    if slope is None:  # unscaled in the header; nibabel reports 1/0 in the proxy
        slope, inter = None, None
    sform, sform_code = header.get_sform(coded=True)
    qform, qform_code = header.get_qform(coded=True)
    metadata = {
        "nifti": {
            "version": 2 if isinstance(img, nib.Nifti2Image) else 1,
            "header": _header_json(header),
            "header_bytes": base64.b64encode(header.binaryblock).decode("ascii"),
            "extensions": [
                {"code": int(e.get_code()),
                 "content": base64.b64encode(e.get_content() if isinstance(e.get_content(), bytes)
                                             else e._mangle(e.get_content())).decode("ascii")}
                for e in img.header.extensions
            ],
            "scl_slope": slope, "scl_inter": inter,
            "sform": None if sform is None else sform.tolist(), "sform_code": int(sform_code),
            "qform": None if qform is None else qform.tolist(), "qform_code": int(qform_code),
            "units": {"space": space_unit, "time": time_unit},
            "intent": list(header.get_intent()),
            "descrip": header["descrip"].tobytes().rstrip(b"\x00").decode("latin-1"),
            "dtype": dtype.name if not rgb else dtype.descr,
        }
    }
    return metadata, space_unit


def _read_nifti(path: str | Path, max_bytes: int | None) -> SourceImage:
    try:
        import nibabel as nib
    except ImportError as exc:  # pragma: no cover - nibabel is a core dependency
        raise missing_dependency("nibabel") from exc
    path = Path(path)
    try:
        img = _load(nib, path)
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(f"{path}: not a readable NIfTI file: {exc}") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ConversionError(f"{path}: expected NIfTI-1/2, found {type(img).__name__}")
    try:
        header = _file_header(nib, img, path)
    except Exception:  # a header nibabel parsed once parses again; keep nibabel's copy if not
        header = img.header
    shape = tuple(int(s) for s in img.shape)
    dtype = header.get_data_dtype()
    if len(shape) > 4 or len(shape) < 2:
        raise ConversionError(f"{path}: expected 2 to 4 dimensions, found shape {shape}")
    rgb = dtype.fields is not None
    if rgb and (set(dtype.names) - {"R", "G", "B", "A"} or
                any(dtype.fields[n][0] != np.uint8 for n in dtype.names)):
        raise ConversionError(f"{path}: structured NIfTI data type {dtype} is not supported")
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if max_bytes is not None and nbytes > max_bytes:
        raise ConversionError(
            f"{path}: header declares {shape} {dtype} = {nbytes:,} bytes, above the limit "
            f"of {max_bytes:,} bytes"
        )
    try:
        raw = np.asanyarray(img.dataobj.get_unscaled())
    except Exception as exc:
        raise ConversionError(f"{path}: voxel data unreadable (truncated?): {exc}") from exc
    while raw.ndim < 3:
        raw = raw[..., np.newaxis]
    data = np.ascontiguousarray(raw.T)  # (x, y, z[, t]) -> ([t,] z, y, x)
    zooms = [float(z) for z in header.get_zooms()] + [1.0] * 4
    dims = ("z", "y", "x") if data.ndim == 3 else ("t", "z", "y", "x")
    spacing = (zooms[2], zooms[1], zooms[0]) if data.ndim == 3 else (
        zooms[3], zooms[2], zooms[1], zooms[0])
    if rgb:  # RGB24 / RGBA32: a trailing colour axis
        data = np.ascontiguousarray(
            data.view(np.uint8).reshape(data.shape + (len(dtype.names),)))
        dims, spacing = dims + ("c",), spacing + (1.0,)
    metadata, space_unit = _nifti_metadata(nib, img, header, rgb)
    warnings = []
    if space_unit not in ("mm", "unknown"):
        warnings.append(f"spatial unit is {space_unit!r}; spacing and affine are kept as stored")
    name = path.name.removesuffix(".gz").removesuffix(".nii")
    labels = header.get_intent()[0] == "label"
    if labels and dtype.kind not in "iub":
        raise ConversionError(f"{path}: intent NIFTI_INTENT_LABEL with {dtype} voxels: a label "
                              "map holds integers")
    return SourceImage(labels=labels,
        data=data, dims=dims, spacing=spacing, affine=np.asarray(img.affine, float),
        source_format="nifti", name=safe_name(name), metadata=metadata, warnings=warnings,
        source_files=[str(path)],
    )


# -- export ------------------------------------------------------------------------
def export(image: StoredImage, out: Path, *, intent: str | None = None,
           philips_scaling: str = "precise") -> ExportResult:
    """Write the level as one NIfTI file (``.nii.gz`` unless ``out`` ends in ``.nii``).

    A NIfTI-sourced image gets its own header back (pixdim and s/qform scaled
    at reduced levels); any other image a NIfTI-1 header with its affine.
    A DICOM-sourced image's rescale becomes ``scl_slope`` / ``scl_inter`` as
    dcm2niix writes it: ``philips_scaling="precise"`` (dcm2niix's default)
    gives Philips MR files with the private scale slope their floating-point
    values, ``"display"`` (dcm2niix ``-p n``) the DICOM display values. A
    rescale that varies between slices cannot be one ``scl_*`` pair: those
    voxels are written as float32 rescaled values, and a note says so.
    """
    import nibabel as nib

    if philips_scaling not in PHILIPS_SCALINGS:
        raise ExportError(f"philips_scaling must be one of {', '.join(PHILIPS_SCALINGS)}, "
                          f"found {philips_scaling!r}")
    info, k, data = image.info, image.level, image.values
    offsets = slice_offsets(info)
    if offsets is not None:
        gaps = np.diff(offsets)
        raise ExportError(
            f"{image.source}: its {len(offsets)} slices are not evenly spaced (gaps "
            f"{gaps.min():.4g} to {gaps.max():.4g} mm); a NIfTI volume has one slice spacing, "
            "so the slices after an uneven gap would sit at wrong positions. (dcm2niix writes "
            "such a stack as acquired, with a warning, plus an interpolated equidistant copy, "
            "'_Eq_'; neither is the acquired geometry.) Export to DICOM, which keeps every "
            "slice's position, or read it with mist_zarr.open, whose z coordinate holds them")
    notes: list[str] = []
    meta = info.metadata.get("nifti") if isinstance(info.metadata, dict) else None
    rescale = None if meta else _dicom_scaling(image, philips_scaling, notes)
    precise = rescale is not None and PHILIPS in rescale.source
    if rescale is not None and rescale.varies:
        data = rescale.apply(data)  # float32 / float64 modality values, slice by slice
        rescale = None
    if "c" in info.dims:  # NIfTI RGB24 / RGBA32: one structured voxel per colour sample
        if data.dtype != np.uint8:
            raise ExportError(f"{image.source}: NIfTI colour voxels are 8-bit; this image is "
                              f"{data.dtype}")
        order = tuple(range(data.ndim - 2, -1, -1)) + (data.ndim - 1,)
        rgb = np.dtype([(name, "u1") for name in "RGBA"[: data.shape[-1]]])
        spatial = np.ascontiguousarray(data.transpose(order)).view(rgb)[..., 0]
    else:
        spatial = data.T  # ([t,] z, y, x) -> (x, y, z[, t])
    if spatial.ndim == 2:
        spatial = spatial[:, :, np.newaxis]
    if meta:
        img = _with_source_header(nib, spatial, info, k, meta, notes)
    else:
        affine = info.level_affine(k)
        img = nib.Nifti1Image(spatial, affine)
        img.header.set_sform(affine, 1)  # scanner-based anatomical coordinates
        img.header.set_qform(affine, 1)
        img.header.set_xyzt_units("mm", "sec")
        scaled = "; philips precise scaling" if precise else ""
        img.header["descrip"] = (f"mist-zarr level {k} of {info.source_format}"
                                 f"{scaled}")[:79].encode()
        if rescale is not None:
            img.header.set_slope_inter(float(rescale.slope), float(rescale.intercept))
    if intent is not None:  # a label map: NIFTI_INTENT_LABEL
        img.header.set_intent(intent)
    name = out if out.suffix in (".nii", ".gz") else out.with_name(out.name + ".nii.gz")
    name.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, name)
    return ExportResult("nifti", k, [str(name)], notes)


def _dicom_scaling(image: StoredImage, philips: str, notes: list[str]) -> Rescale | None:
    """The rescale a DICOM-sourced image's NIfTI carries (None: none), with notes saying which."""
    info = image.info
    if not isinstance(info.metadata, dict) or not isinstance(info.metadata.get("dicom"), dict):
        return None
    leading = tuple(info.shape[: info.dims.index("y")])
    per_slice = functools.cache(image.full_metadata)
    precise = find_rescale(info.metadata, leading, per_slice, philips="precise").uniform()
    rescale = precise if philips == "precise" else find_rescale(
        info.metadata, leading, per_slice, philips="display").uniform()
    # geometry the affine cannot tell (uneven slices, tilt) must reach whoever reads the NIfTI
    notes += [f"source: {w}" for w in info.metadata.get("warnings", []) if "slice" in w]
    if _enhanced_4d(info):
        notes.append("4-D volume order: as the enhanced file's dimension index orders frames "
                     "(TemporalPositionIndex, then DimensionIndexValues, the first index varying "
                     "slowest); dcm2niix orders volumes by its own rules, which may differ")
    if rescale.source == "none":
        notes.append("scaling: none (the DICOM source has no rescale)")
        return None
    if rescale.varies:
        notes.append(f"scaling varies between slices ({rescale.source}): one scl_slope/scl_inter "
                     "cannot hold it, so the voxels are the rescaled values in "
                     f"{rescaled_dtype(image.values.dtype)} with scl_slope 1 (the stored "
                     "integers and the per-slice rescale stay in the store)")
    else:
        notes.append(f"scaling: {rescale.source}: scl_slope {float(rescale.slope):.9g}, "
                     f"scl_inter {float(rescale.intercept):.9g}")
    if PHILIPS in precise.source:  # dcm2niix's sidecar key, for a file with the private slope
        used = int(rescale is precise)
        notes.append(f"UsePhilipsFloatNotDisplayScaling: {used} (Philips private scale slope "
                     f"2005,100E {'applied' if used else 'ignored: DICOM display values'})")
    return rescale


def _enhanced_4d(info: Any) -> bool:
    dicom = info.metadata.get("dicom", {})
    return "t" in info.dims and "52009229" in dicom  # SharedFunctionalGroupsSequence


def _with_source_header(nib: Any, spatial: np.ndarray, info: Any, k: int, meta: dict[str, Any],
                        notes: list[str]) -> Any:
    """The image with the source file's own header, scaled to level ``k``."""
    affine = info.level_affine(k)
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
    return img
