"""Format converters for mist-zarr: DICOM, NIfTI and 2D image ingest and export."""
