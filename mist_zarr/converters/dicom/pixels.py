"""Pixel decoding with pydicom's own pipeline, and lossy-source detection."""

from __future__ import annotations

import copy
import struct
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ...codestream import read_coding_style
from ...errors import DicomError, one_line
from .header import _FileInfo
from .jsonmodel import _JsonBuilder
from .tags import _floats, _pydicom, _text

_INT_DTYPES = {np.dtype(t) for t in ("int8", "uint8", "int16", "uint16", "int32", "uint32")}

_LOSSY_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    *(
        f"1.2.840.10008.1.2.4.{n}" for n in (52, 53, 54, 55, 56, 59, 60, 61, 62, 63, 64)
    ),  # retired lossy JPEG
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    *(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)),  # MPEG-2 / MPEG-4 / HEVC
    *(f"1.2.840.10008.1.2.4.{n}.1" for n in range(100, 107)),  # fragmentable video
    "1.2.840.10008.1.2.4.111",  # JPEG XL recompressed JPEG
    "1.2.840.10008.1.2.4.112",  # JPEG XL (may be lossy; codestream not inspected)
}

_MAYBE_LOSSY_J2K = {
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 multi-component
    "1.2.840.10008.1.2.4.203",  # HTJ2K
}


def _output_itemsize(info: _FileInfo) -> tuple[int, int]:
    """Return (bytes per sample, samples) of the decoded output of one pixel."""
    if info.photometric == "PALETTE COLOR":
        desc = _floats(info.ds, "RedPaletteColorLookupTableDescriptor", 3)
        return (2 if desc and desc[2] > 8 else 1), 3
    return max(1, info.bits_allocated // 8), info.spp


def _decode_file(info: _FileInfo) -> tuple[np.ndarray, str, list[str], list[str], str | None]:
    """Decode all frames of a file exactly as ``pixel_array`` does, as (frames, rows, cols[, 3]).

    Returns the array, its photometric interpretation, notes, pydicom
    warnings and a lossy-source reason (or None).
    """
    _pydicom()
    from pydicom.pixels import apply_color_lut

    path = info.path
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        ds = _with_pixel_data(info)
        ts = ds.file_meta.TransferSyntaxUID
        try:
            arr, props = _decode_dataset(ds, ts, path)
            lossy = _lossy_reason(ds, ts)
        finally:
            if info.pixel_loc is not None:
                del ds[0x7FE00010]  # keep only the header in memory
    caught = sorted({" ".join(str(r.message).split()) for r in records})
    notes: list[str] = []
    out_pi = str(props.get("photometric_interpretation", info.photometric)).upper()
    expected = (info.n_frames, info.rows, info.cols) + ((info.spp,) if info.spp > 1 else ())
    if info.n_frames == 1 and arr.shape == expected[1:]:
        arr = arr[None]
    if arr.shape != expected:
        raise DicomError(f"{path}: decoded pixel array has shape {arr.shape}, expected {expected}")
    if out_pi == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as exc:
            raise DicomError(
                f"{path}: cannot apply the palette colour LUT ({one_line(exc)})"
            ) from None
        notes.append(
            "PALETTE COLOR indices mapped to RGB with the palette LUT (pydicom apply_color_lut)"
        )
        out_pi = "RGB"
    elif info.spp == 3 and out_pi == "RGB" and info.photometric != "RGB":
        notes.append(
            f"{info.photometric} decoded to RGB by pydicom (colour-space conversion as in pixel_array)"
        )
    if arr.ndim == 4 and out_pi != "RGB":
        raise DicomError(
            f"{path}: colour pixels in {out_pi} cannot be converted to RGB by pydicom; refused"
        )
    if arr.ndim == 3 and out_pi not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(
            f"{path}: single-sample photometric interpretation {out_pi!r} is not supported; refused"
        )
    if out_pi == "MONOCHROME1":
        notes.append("MONOCHROME1 kept as stored (minimum value displays white)")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype not in _INT_DTYPES:
        raise DicomError(
            f"{path}: decoded dtype {arr.dtype} is not an 8/16/32-bit integer type; refused"
        )
    return arr, out_pi, notes, caught, lossy


def _decode_dataset(ds: Any, ts: Any, path: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode with pydicom's own pipeline, with the options ``Dataset.pixel_array`` uses."""
    from pydicom.pixels import as_pixel_options, get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise DicomError(
            f"{path}: pydicom cannot decode the transfer syntax {ts.name} ({ts})"
        ) from None
    try:
        return decoder.as_array(ds, validate=True, raw=False, **as_pixel_options(ds))
    except MemoryError:
        raise
    except Exception as exc:
        hint = ""
        if "missing dependencies" in str(exc):
            hint = "; pydicom needs a decoder plugin (pylibjpeg-libjpeg, pylibjpeg-openjpeg or pyjpegls)"
        raise DicomError(
            f"{path}: cannot decode the pixel data ({ts.name}): {one_line(exc)}{hint}"
        ) from None


def _with_pixel_data(info: _FileInfo) -> Any:
    """Return the file's dataset with its pixel data loaded (the header is not parsed again)."""
    pydicom = _pydicom()
    from pydicom.dataelem import DataElement

    loc = info.pixel_loc
    try:
        if loc is None:  # deflated: the whole dataset is one zlib stream
            return pydicom.dcmread(info.path, force=False)
        with open(info.path, "rb") as fp:
            fp.seek(loc.start)
            value = fp.read(loc.end - loc.start)
    except Exception as exc:
        raise DicomError(f"{info.path}: cannot re-read the file ({one_line(exc)})") from None
    if len(value) != loc.end - loc.start:
        raise DicomError(f"{info.path}: file changed since it was scanned (pixel data truncated)")
    vr = loc.vr or ("OB" if loc.undefined_length or info.bits_allocated <= 8 else "OW")
    ds = info.ds
    ds[0x7FE00010] = DataElement(0x7FE00010, vr, value, is_undefined_length=loc.undefined_length)
    return ds


def _lossy_reason(ds: Any, ts: Any) -> str | None:
    """Return why a file's pixels are (possibly) lossy, or None when they are lossless."""
    if _text(ds, "LossyImageCompression") == "01":
        method = _text(ds, "LossyImageCompressionMethod")
        return "LossyImageCompression is 01" + (f" ({method})" if method else "")
    uid = str(ts)
    if uid in _LOSSY_TRANSFER_SYNTAXES:
        return f"lossy transfer syntax {ts.name}"
    if uid in _MAYBE_LOSSY_J2K:
        irreversible = _j2k_irreversible(ds)
        if irreversible is None:
            return f"{ts.name}: codestream wavelet could not be inspected, treated as lossy"
        if irreversible:
            return f"{ts.name} with the irreversible 9/7 wavelet"
    return None


def _j2k_irreversible(ds: Any) -> bool | None:
    """Return True if the first JPEG 2000 codestream uses the irreversible 9/7 wavelet.

    False for the reversible 5/3 wavelet, None when the codestream cannot be read.
    """
    try:
        from pydicom.encaps import generate_fragments

        data = bytes(ds.PixelData[:8])
        group, elem, bot_len = struct.unpack("<HHL", data)
        if (group, elem) != (0xFFFE, 0xE000):
            return None
        fragment = next(generate_fragments(ds.PixelData[8 + bot_len :]))
        return read_coding_style(fragment).transform == 0
    except Exception:
        return None


@dataclass
class _FrameReader:
    """The reader of a lazy stack (``LazyPlanes.read``): entries of its first axis, decoded.

    :meth:`part` makes the reader of a part to be sent to another process,
    with each header cut to what decoding reads (:func:`_pixel_header`): the
    whole headers of 1,000 CT files pickle to 14 MB in seconds, and reading
    them again there costs 2 ms a file, more than decoding it.
    ``first`` is the stack entry that entry 0 here is (for messages).
    """

    infos: list[_FileInfo]
    frames: list[int]
    inner: tuple[int, ...]
    label: str
    first: int = 0

    def __call__(self, start: int, stop: int) -> np.ndarray:
        return _read_frames(self.infos, self.frames, self.inner, self.label, start, stop,
                            base=self.first)

    def part(self, start: int, stop: int) -> "_FrameReader":
        """Entries ``start:stop``, with their headers cut to the pixel description."""
        n = int(np.prod(self.inner, dtype=np.int64))
        builder = _JsonBuilder()
        cut: dict[int, _FileInfo] = {}  # a file holding several frames is cut once
        infos = [cut.setdefault(id(i), _pixel_header(i, builder))
                 for i in self.infos[start * n : stop * n]]
        return _FrameReader(infos, self.frames[start * n : stop * n], self.inner, self.label,
                            self.first + start)


def _pixel_header(info: _FileInfo, builder: _JsonBuilder) -> _FileInfo:
    """``info`` with a header of the Image Pixel group (0028) and the pixel data group
    (7FE0) only: what pydicom's decoders and :func:`_decode_file` read (with the file
    meta and the dataset's encoding, which the shallow copy keeps)."""
    header = copy.copy(info.ds)
    object.__setattr__(header, "_dict", {tag: elem for tag, elem in info.ds._dict.items()
                                         if tag >> 16 in (0x0028, 0x7FE0)})
    return replace(info, ds=header, signature={}, builder=builder, warnings=[], _groups=None,
                   _shared=False)  # (the functional-group caches of enhanced files: not needed)


def _read_frames(infos: list[_FileInfo], frames: list[int], inner: tuple[int, ...],
                 label: str, start: int, stop: int, *, base: int = 0) -> np.ndarray:
    """Decode entries ``start:stop`` of the first axis of a lazy stack (see
    :func:`read_dicom_series`); ``inner`` is the shape of the other leading axes."""
    n = int(np.prod(inner, dtype=np.int64))
    first, last = start * n, stop * n
    where = f"while writing slices {base * n + first}-{base * n + last - 1}"
    block = None  # filled in place: a list of planes plus np.stack would hold the batch twice
    for k, (info, index) in enumerate(zip(infos[first:last], frames[first:last])):
        try:
            plane = _decode_file(info)[0][index]
        except DicomError as exc:
            raise DicomError(f"{label}: {exc} ({where})") from None
        if block is None:
            block = np.empty((last - first,) + plane.shape, plane.dtype)
        elif plane.shape != block.shape[1:] or plane.dtype != block.dtype:
            raise DicomError(f"{info.path}: decoded {plane.dtype}{plane.shape} differs from "
                             f"{block.dtype}{block.shape[1:]} read before: the file changed "
                             f"({where} of {label})")
        block[k] = plane
        del plane
    assert block is not None
    return block.reshape((stop - start, *inner) + block.shape[1:])
