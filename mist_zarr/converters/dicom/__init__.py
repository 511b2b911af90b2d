"""DICOM: read files into in-memory volumes (the reader half of ``mist-zarr convert``) and export.

Two steps:

* :func:`scan_dicom` walks files and folders, reads headers only and groups
  image objects by SeriesInstanceUID (files sharing a UID but not a
  SeriesNumber are kept apart; files without a UID are grouped by folder and
  series attributes). Files that are not DICOM, unreadable or truncated are
  listed in ``ScanResult.rejected``; DICOM objects without an image (SR, SEG,
  RTSTRUCT, RTPLAN, PR, KO, DICOMDIR ...) and further copies of an instance
  (same SOPInstanceUID) in ``ScanResult.skipped``. Nothing is raised for a
  bad file. A series keeps every copy of an instance (``SeriesRef.copies``):
  reading uses the first copy that decodes and refuses copies whose pixels
  differ (a conflict), so a broken first copy never loses the image.
* :func:`read_dicom_series` turns one series into one or more
  :class:`DicomVolume` (a series splits into several stacks when its images
  differ in orientation, matrix, pixel format, echo, image type or
  enhanced-MF StackID, or when acquisitions form separate volumes).
  Inconsistent geometry is refused with :class:`DicomError`, never guessed.
* :func:`dicom_sources` is the hook ``mist_zarr.convert`` calls: it yields
  :class:`~mist_zarr.converters.base.SourceImage` objects and reports every
  rejected file and refused series.

Decisions (the reasons are in the principles of ``design.md``):

* Pixels are the *stored* values exactly as ``Dataset.pixel_array`` returns
  them in pydicom 3 (no rescale, signedness from PixelRepresentation,
  BitsStored masking / sign extension by pydicom), in native byte order.
  MONOCHROME1 is kept as stored and recorded. Colour becomes RGB with a
  trailing ``c`` axis: YBR_FULL / YBR_FULL_422 are converted by pydicom
  (``convert_color_space``, the ``pixel_array`` default), JPEG 2000 YBR_RCT /
  YBR_ICT are reversed by the decoder, PALETTE COLOR indices are mapped with
  ``apply_color_lut``; each conversion is recorded in ``DicomVolume.notes``.
* Slices are ordered by their position projected on the slice normal (the
  cross product of the ImageOrientationPatient cosines), never by
  InstanceNumber. Several images at every position make a 4-D ``(t, z, y, x)``
  volume; at one position they are ordered by TemporalPositionIdentifier /
  TemporalPositionIndex, AcquisitionNumber, TriggerTime,
  DimensionIndexValues and finally InstanceNumber. Unequal image counts per
  position, non-collinear origins or differing in-plane origins are refused.
  Non-uniform spacing, missing slices and gantry tilt are warnings; tilt is
  kept as a shear in the affine (no resampling, unlike dcm2niix), and every
  slice position is kept in ``per_slice["position_lps"]``.
* Siemens mosaics (ImageType contains MOSAIC) are de-mosaicked with the CSA
  image header (NumberOfImagesInMosaic, SliceNormalVector; parsed by
  ``nibabel.nicom.csareader``). When that is impossible the mosaic frame is
  returned as a 2-D image with an explicit warning, never as a wrong stack.
* Multi-frame objects without per-frame positions (cine, NM, SC ...) get a
  ``t`` axis when frames are temporal (FrameTime / FrameTimeVector /
  TemporalPositionIndex) and a neutral ``frame`` axis otherwise.
* ``affine`` is RAS+ (NIfTI convention): it maps ``(i, j, k, 1)`` with
  ``i`` = column (last spatial array axis), ``j`` = row, ``k`` = slice
  (the spatial array axes reversed) to millimetres. 2-D images use ``k = 0``
  with the slice normal times a nominal thickness. Without
  ImagePositionPatient / ImageOrientationPatient (e.g. CR) the geometry is
  nominal (PatientOrientation letters when usable, origin 0) and a warning
  says so. Compared with dcm2niix (the test oracle) the voxels and the
  geometry agree after reorientation to the closest RAS+; dcm2niix differs
  in storage order (it flips rows), it resamples gantry-tilted CT where this
  reader keeps the shear, and a mosaic that cannot be de-mosaicked here
  stays 2-D where dcm2niix may still try.
* ``metadata`` is the DICOM JSON model (PS3.18 F.2) of the attributes common
  to all slices of the volume; attributes that vary between slices are in
  ``per_slice`` (values are the JSON model ``Value`` arrays, or the
  ``InlineBinary`` / ``BulkDataURI`` string for binary VRs; VRs are in
  ``per_slice_vr``). Binary values over 1024 bytes are replaced by a
  ``BulkDataURI`` of the form ``urn:x-mist-zarr:omitted:<bytes>:sha1-<hex16>``.
  Pixel data is never in the metadata.
* Lossy sources are flagged (``lossy_source``): LossyImageCompression "01",
  JPEG baseline/extended, JPEG-LS near-lossless, MPEG/HEVC, JPEG XL, and
  JPEG 2000 / HTJ2K codestreams that use the irreversible 9/7 wavelet (or that
  cannot be inspected in a "may be lossy" transfer syntax).

Where each part lives (one thing per module):

* ``tags`` typed attribute access; ``header`` header-only reads, pixel
  extent and size checks, non-image classification; ``scan`` walking and
  grouping into series; ``frames`` one frame expander per flavour (classic,
  enhanced multi-frame, mosaic, RT Dose grid), chosen once per file;
  ``stack`` grouping frames into stacks, ordering and planning; ``geometry``
  pure-numpy direction cosines, slice layout and affines; ``pixels``
  decoding and lossy detection; ``jsonmodel`` the DICOM JSON model;
  ``naming`` series names; ``series`` reading and assembling a series;
  ``volume`` the :class:`DicomVolume` result; ``export`` writing a stored
  image back as DICOM.
"""

from __future__ import annotations

from ...errors import DicomError
from ..base import DEFAULT_MAX_BYTES
from .header import forget_headers
from .jsonmodel import BULK_DATA_THRESHOLD
from .naming import suggest_name
from .scan import ScanResult, SeriesRef, scan_dicom
from .series import dicom_sources, iter_dicom_volumes, read_dicom_series
from .volume import DicomVolume

__all__ = [
    "forget_headers",
    "BULK_DATA_THRESHOLD",
    "DEFAULT_MAX_BYTES",
    "FORMAT",
    "SUFFIXES",
    "DicomError",
    "DicomVolume",
    "ScanResult",
    "SeriesRef",
    "dicom_sources",
    "export_dicom",
    "iter_dicom_volumes",
    "read_dicom_series",
    "scan_dicom",
    "sniff",
    "suggest_name",
]

FORMAT = "dicom"

#: Usual DICOM file name suffixes; many DICOM files have none, so detection is by content (:func:`sniff`).
SUFFIXES = (".dcm", ".dicom")


def __getattr__(name: str):
    # export writes stored images back (zarr, the reader): imported when asked for, so that
    # detection and the scan at the start of ``convert`` do not pay for it
    if name == "export_dicom":
        from .export import export_dicom

        return export_dicom
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"export_dicom"})


def sniff(head: bytes) -> str | None:
    """Return "dicom" for a Part 10 file (``DICM`` after the 128-byte preamble),
    "dicom?" for a head that looks like preamble-less ACR-NEMA (group 0x0002 or
    0x0008 first; pydicom decides), else None. ``head`` is a file's first 132 bytes.

    Check "dicom" before other formats (a DICOM preamble may itself be a TIFF
    header) and "dicom?" after them (its test is weak).
    """
    if head[128:132] == b"DICM":
        return "dicom"
    return "dicom?" if len(head) >= 8 and head[0] in (0x02, 0x08) and head[1] == 0x00 else None
