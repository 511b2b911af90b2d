"""Write a DICOM-sourced image back as a DICOM series, at any level.

Level 0 keeps the identity of every instance (a lossless change of transfer
syntax does not need new UIDs) and, by default, its HTJ2K chunks become the
encapsulated frames *without re-encoding*: each chunk is a single-tile,
reversible, RPCL codestream with TLM and one tile-part per resolution, which
is what "HTJ2K with RPCL Options Image Compression (Lossless Only)"
(1.2.840.10008.1.2.4.202) asks for. Reduced levels are new, derived images:
deterministic UIDs derived from the originals, Rows/Columns/PixelSpacing
scaled, ImagePositionPatient unchanged (the 5/3 wavelet keeps the even-sample
grid), ImageType DERIVED and a DerivationDescription.

Every file is written as one classic single-frame image per slice. Enhanced
multi-frame sources become the classic storage class of their modality,
mosaics become their de-mosaicked slices; both are recorded in the
DerivationDescription.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np

from ...codestream import parse_codestream, read_coding_style
from ...errors import ExportError
from ...format import IMAGE, ImageInfo
from ...layout import encode_kwargs, num_levels
from ...storage import get_bytes
from ..base import ExportResult, StoredImage, missing_dependency

__all__ = ["HTJ2K_LOSSLESS", "HTJ2K_RPCL", "export_dicom", "htj2k_transfer_syntax"]

HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
_OMITTED = "urn:x-mist-zarr:omitted"
_NOT_DICOM = {"source_file_index", "frame_index", "mosaic_tile_index", "position_lps"}
# Enhanced / multi-frame storage classes -> classic single-frame equivalents
_CLASSIC = {
    "1.2.840.10008.5.1.4.1.1.4.1": "1.2.840.10008.5.1.4.1.1.4",  # Enhanced MR -> MR
    "1.2.840.10008.5.1.4.1.1.4.3": "1.2.840.10008.5.1.4.1.1.4",  # Enhanced MR colour -> MR
    "1.2.840.10008.5.1.4.1.1.2.1": "1.2.840.10008.5.1.4.1.1.2",  # Enhanced CT -> CT
    "1.2.840.10008.5.1.4.1.1.128.1": "1.2.840.10008.5.1.4.1.1.128",  # Enhanced PET -> PET
    "1.2.840.10008.5.1.4.1.1.4.4": "1.2.840.10008.5.1.4.1.1.4",  # Legacy converted MR
    "1.2.840.10008.5.1.4.1.1.2.2": "1.2.840.10008.5.1.4.1.1.2",  # Legacy converted CT
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_SOP_BY_MODALITY = {
    "CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "MG": "1.2.840.10008.5.1.4.1.1.1.2", "PT": "1.2.840.10008.5.1.4.1.1.128",
    "NM": "1.2.840.10008.5.1.4.1.1.20", "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "XA": "1.2.840.10008.5.1.4.1.1.12.1",
}
_MULTIFRAME_ONLY = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
                    "NumberOfFrames", "DimensionIndexSequence", "DimensionOrganizationSequence",
                    "FrameIncrementPointer", "FrameTime", "FrameTimeVector")


def htj2k_transfer_syntax(codestream: bytes) -> str:
    """The most specific HTJ2K lossless transfer syntax a codestream satisfies."""
    cs = parse_codestream(codestream)
    if not (cs.htj2k and cs.reversible):
        raise ValueError("not a reversible HTJ2K codestream")
    by_resolution = len(cs.tile_parts) == cs.levels + 1
    if cs.progression == "RPCL" and cs.tlm is not None and by_resolution:
        return HTJ2K_RPCL
    return HTJ2K_LOSSLESS


def _strip_omitted(doc: dict[str, Any]) -> dict[str, Any]:
    """Drop elements whose bulk data was summarised away (their bytes are gone)."""
    out = {}
    for tag, elem in doc.items():
        if str(elem.get("BulkDataURI", "")).startswith(_OMITTED):
            continue
        if elem.get("vr") == "SQ" and "Value" in elem:
            elem = dict(elem, Value=[_strip_omitted(item) for item in elem["Value"]])
        out[tag] = elem
    return out


def _tag(key: str) -> str:
    from pydicom.datadict import tag_for_keyword

    if len(key) == 8 and all(c in "0123456789ABCDEFabcdef" for c in key):
        return key.upper()
    tag = tag_for_keyword(key)
    if tag is None:
        raise KeyError(key)
    return f"{tag:08X}"


def _derived_uid(original: str, salt: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[original, "mist-zarr", salt])


@dataclass
class _Level:
    """What every exported slice of one level needs: the stored image, its layout and identity."""

    store: Any
    info: ImageInfo
    k: int
    uncompressed: bool
    image: Any  # the stored zarr array (its level-0 chunks are reused)
    slices: np.ndarray  # (n, rows, cols[, c]) values of level k
    lead: tuple[int, ...]  # the leading (non-plane) axes
    positions: list[Any] | None
    affine_lps: np.ndarray
    series_uid: str
    split_instances: bool  # one source instance holds several slices
    sop_class: str
    image_type: list[str]

    @property
    def derived(self) -> bool:
        return self.k > 0

    @property
    def colour(self) -> bool:
        return "c" in self.info.dims

    @property
    def whole_plane(self) -> bool:
        return all(g == 1 for g in self.info.grid[len(self.lead):])

    @property
    def passthrough_layout(self) -> bool:
        """Level 0, one chunk per slice: the stored chunks can be the frames as they are."""
        physical = int(np.prod(self.info.grid[: len(self.lead)])) if self.lead else 1
        return not self.derived and self.whole_plane and self.slices.shape[0] == physical


def export_dicom(stored: StoredImage, out: Path, *, uncompressed: bool = False) -> ExportResult:
    """Write the level of the DICOM-sourced image ``stored`` as a series under ``out``."""
    try:
        import pydicom
        from pydicom.dataset import Dataset
    except ImportError as exc:  # pragma: no cover - core dependency
        raise missing_dependency("pydicom") from exc
    store, info, k = stored.source, stored.info, stored.level
    meta = info.metadata
    if "dicom" not in meta:
        raise ExportError(f"{store}: no DICOM metadata stored with this image")
    full = stored.full_metadata()
    per_slice: dict[str, list[Any]] = full.get("dicom_per_slice", {})
    per_vr: dict[str, str] = full.get("dicom_per_slice_vr", {})
    notes: list[str] = []
    base = Dataset.from_json(_strip_omitted(meta["dicom"]))
    level = _open_level(stored, base, per_slice, notes, uncompressed)
    out.mkdir(parents=True, exist_ok=True)
    new_series_uid = (_derived_uid(level.series_uid, f"level-{k}") if level.derived
                      else level.series_uid)
    files = []
    for i in range(level.slices.shape[0]):
        ds = _slice_dataset(base, per_slice, per_vr, i)
        _set_geometry(ds, info, k, i, level.lead, level.positions, level.affine_lps)
        _set_identity(ds, level, i, new_series_uid)
        _set_pixel_data(ds, level, i, meta)
        path = out / _file_name(i, level.lead, info.dims)
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        files.append(str(path))
    if level.positions is None and level.derived:
        notes.append("no patient geometry in the source: positions were not invented")
    return ExportResult("dicom", k, files, notes)


def _open_level(stored: StoredImage, base: Any, per_slice: dict[str, list[Any]],
                notes: list[str], uncompressed: bool) -> _Level:
    """Take the opened level and turn the series attributes in ``base`` into classic single-frame ones."""
    store, info, k, values = stored.source, stored.info, stored.level, stored.values
    plane_nd = 3 if "c" in info.dims else 2
    lead = values.shape[: values.ndim - plane_nd]
    slices = values.reshape((-1,) + values.shape[values.ndim - plane_nd:])
    sop_class = str(base.get("SOPClassUID", ""))
    if sop_class in _CLASSIC:
        notes.append(f"enhanced/multi-frame {sop_class} written as classic {_CLASSIC[sop_class]} "
                     "single-frame images")
    for keyword in _MULTIFRAME_ONLY:
        if keyword in base:
            del base[keyword]
    image_type = [str(v) for v in base.get("ImageType", [])]
    if "MOSAIC" in image_type:
        image_type = [v for v in image_type if v != "MOSAIC"]
        notes.append("Siemens mosaic written as its de-mosaicked slices")
    series_uid = str(base.get("SeriesInstanceUID", "")) or _derived_uid(
        str(base.get("StudyInstanceUID", "")) + str(base.get("SeriesNumber", "")) +
        str(per_slice.get("SOPInstanceUID", [""])[0]), "series")
    # one source instance may hold many slices (multi-frame, mosaic): each
    # exported slice then needs its own instance UID and number
    sop_column = [str(v[0] if isinstance(v, list) and v else v or "")
                  for v in per_slice.get("SOPInstanceUID", [])]
    if not sop_class:
        sop_class = _SOP_BY_MODALITY.get(str(base.get("Modality", "")), _SECONDARY_CAPTURE)
        base.SOPClassUID = sop_class
        notes.append(f"no SOPClassUID in the source: {sop_class} from the modality")
    return _Level(
        store=store, info=info, k=k, uncompressed=uncompressed, image=stored.group[IMAGE],
        slices=slices, lead=lead, positions=per_slice.get("position_lps"),
        affine_lps=np.diag([-1.0, -1.0, 1.0, 1.0]) @ info.level_affine(k),
        series_uid=series_uid, split_instances=len(set(sop_column)) < slices.shape[0],
        sop_class=sop_class, image_type=image_type,
    )


def _slice_dataset(base: Any, per_slice: dict[str, list[Any]], per_vr: dict[str, str], i: int) -> Any:
    """The series attributes with slice ``i``'s own values of the attributes that vary."""
    from pydicom.dataset import Dataset

    ds = copy.deepcopy(base)
    for key, column in per_slice.items():
        if key in _NOT_DICOM or i >= len(column) or column[i] is None:
            continue
        try:
            tag = _tag(key)
        except KeyError:
            continue
        value = column[i]
        elem = {"vr": per_vr.get(key, "UN")}
        if isinstance(value, str) and elem["vr"] in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
            if value.startswith(_OMITTED):
                continue
            elem["InlineBinary"] = value
        else:
            elem["Value"] = value if isinstance(value, list) else [value]
        ds.update(Dataset.from_json({tag: elem}))
    return ds


def _set_identity(ds: Any, level: _Level, i: int, new_series_uid: str) -> None:
    """UIDs, instance number, ImageType and derivation of exported slice ``i``."""
    k = level.k
    sop_uid = str(ds.get("SOPInstanceUID", "")) or _derived_uid(level.series_uid, f"instance-{i}")
    if level.split_instances:
        sop_uid = _derived_uid(sop_uid, f"slice-{i}")
        ds.InstanceNumber = i + 1
    if level.derived:
        sop_uid = _derived_uid(sop_uid, f"level-{k}")
        ds.ImageType = ["DERIVED", "SECONDARY"] + level.image_type[2:]
        ds.DerivationDescription = (
            f"mist-zarr level {k}: HTJ2K resolution {k} (5/3 wavelet low-pass), "
            f"{2**k}x fewer samples in rows and columns, origin unchanged")[:1024]
        for keyword in ("LargestImagePixelValue", "SmallestImagePixelValue"):
            if keyword in ds:
                del ds[keyword]
    elif level.image_type:
        ds.ImageType = level.image_type
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = new_series_uid
    if level.sop_class in _CLASSIC:
        ds.SOPClassUID = _CLASSIC[level.sop_class]
    if "NumberOfFrames" in ds:
        del ds["NumberOfFrames"]


def _set_pixel_data(ds: Any, level: _Level, i: int, meta: dict[str, Any]) -> None:
    """Image pixel module, pixel data and file meta of slice ``i`` (after _set_identity)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate

    info, colour = level.info, level.colour
    plane = np.ascontiguousarray(level.slices[i])
    # Level 0 reuses the stored chunk when its samples have the source's width;
    # unsigned sources are stored signed (headroom for the levels), so the
    # frame is then described as signed: same values, PixelRepresentation 1.
    passthrough = (not level.uncompressed and level.passthrough_layout
                   and info.stored_dtype.itemsize == plane.dtype.itemsize)
    _set_pixel_module(ds, plane.astype(info.stored_dtype) if passthrough else plane, meta)
    if level.derived:  # low-pass samples may overshoot the source's BitsStored range
        ds.BitsStored, ds.HighBit = ds.BitsAllocated, ds.BitsAllocated - 1
    # pixel data: the stored chunk as is at level 0, else encode the level
    if level.uncompressed or colour and not level.whole_plane:
        syntax, pixel = EXPLICIT_LE, plane.astype(plane.dtype.newbyteorder("<")).tobytes()
    else:
        stream = _stored_chunk(level, i) if passthrough else None
        if stream is None:
            stream = imagecodecs.htj2k_encode(plane, **encode_kwargs(
                max(1, num_levels(plane.shape[:2], info.alpha))))
        syntax = htj2k_transfer_syntax(stream)
        cs = parse_codestream(stream)
        ds.BitsStored, ds.HighBit = cs.bit_depth, cs.bit_depth - 1
        if colour:
            ds.PhotometricInterpretation = "YBR_RCT" if _uses_rct(stream) else "RGB"
        pixel = encapsulate([stream])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PixelData = pixel
    if syntax != EXPLICIT_LE:
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.LossyImageCompression = ds.get("LossyImageCompression", "00") or "00"


def _stored_chunk(level: _Level, i: int) -> bytes | None:
    """The stored level-0 codestream of slice ``i`` (one chunk per slice)."""
    coords = np.unravel_index(i, level.lead) if level.lead else ()
    image = level.image
    key = f"{image.store_path.path}/" + image.metadata.encode_chunk_key(
        tuple(int(c) for c in coords) + (0,) * (len(level.info.grid) - len(level.lead)))
    return get_bytes(image.store_path.store, key)


def _uses_rct(stream: bytes) -> bool:
    """True if the codestream applies the reversible colour transform (COD SGcod MCT)."""
    return read_coding_style(stream).multiple_component_transform


def _file_name(i: int, lead: tuple[int, ...], dims: tuple[str, ...]) -> str:
    if not lead:
        return "IM0.dcm"
    idx = np.unravel_index(i, lead)
    return "_".join(f"{d}{int(j):0{len(str(n - 1))}d}" for d, j, n in zip(dims, idx, lead)) + ".dcm"


def _set_geometry(ds, info: ImageInfo, k: int, i: int, lead, positions, affine_lps) -> None:
    spacing = info.level_spacing(k)
    iy, ix = info.dims.index("y"), info.dims.index("x")
    has_geometry = positions is not None and positions[i] is not None
    if "PixelSpacing" in ds or has_geometry:
        ds.PixelSpacing = [_ds(spacing[iy]), _ds(spacing[ix])]
    for keyword in ("ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        if keyword in ds and k:
            row, col = (float(v) for v in ds[keyword].value)
            ds[keyword].value = [_ds(row * 2**k), _ds(col * 2**k)]
    if not has_geometry:
        return
    ds.ImagePositionPatient = [_ds(v) for v in positions[i]]  # origin unchanged at every level
    if "ImageOrientationPatient" not in ds:
        row = affine_lps[:3, 0] / np.linalg.norm(affine_lps[:3, 0])
        col = affine_lps[:3, 1] / np.linalg.norm(affine_lps[:3, 1])
        ds.ImageOrientationPatient = [_ds(v) for v in np.concatenate([row, col])]


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters that keeps as much precision as fits."""
    for digits in range(15, 5, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.6g}"


def _set_pixel_module(ds, plane: np.ndarray, meta: dict[str, Any]) -> None:
    ds.Rows, ds.Columns = int(plane.shape[0]), int(plane.shape[1])
    colour = plane.ndim == 3
    ds.SamplesPerPixel = plane.shape[2] if colour else 1
    if colour:
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    else:
        ds.PhotometricInterpretation = meta.get("photometric") or "MONOCHROME2"
        if "PlanarConfiguration" in ds:
            del ds["PlanarConfiguration"]
    for keyword in ("PaletteColorLookupTableUID", "RedPaletteColorLookupTableDescriptor",
                    "GreenPaletteColorLookupTableDescriptor",
                    "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
                    "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData"):
        if keyword in ds:
            del ds[keyword]
    bits = plane.dtype.itemsize * 8
    ds.BitsAllocated = bits
    stored = int(ds.get("BitsStored", bits) or bits)
    ds.BitsStored = min(stored, bits)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if plane.dtype.kind == "i" else 0
