"""Read levels of an image through fsspec reference files, with only fsspec + zarr +
imagecodecs (no mist-zarr): what a static-hosting user runs.

usage: python -I -S read_refs.py REFS_URL ZARR_FORMAT OUTDIR
REFS_URL is the URL of one reference file; the level's samples go to OUTDIR/image.npy
and its y coordinates to OUTDIR/y.npy.
"""

import importlib.util
import os
import sys

# run with `python -I -S`: only the site-packages copy without mist-zarr is on the path
sys.path.append(os.environ["MIST_CLIENT_SITE"])
if importlib.util.find_spec("mist_zarr") is not None:
    raise SystemExit("mist_zarr is importable: this client must run without it")

from pathlib import Path

import imagecodecs.numcodecs
import imagecodecs.zarr
import numpy as np
import zarr

imagecodecs.zarr.register_codecs()  # Zarr v3: the codec imagecodecs_htj2k
imagecodecs.numcodecs.register_codecs()  # Zarr v2: the numcodecs compressor

if __name__ == "__main__":
    refs_url, zarr_format, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    # zarr drives fsspec asynchronously, so the chunks' (http) filesystem must be async too
    group = zarr.open_group("reference://", mode="r", zarr_format=zarr_format, storage_options={
        "fo": refs_url, "remote_protocol": "http", "remote_options": {"asynchronous": True}})
    np.save(out / "image.npy", group["image"][...])
    np.save(out / "y.npy", group["y"][...])
    print(group["image"].shape, group["image"].dtype)
