"""Read every level of a virtual OME-Zarr over HTTP with one generic client, no mist-zarr.

usage: python -I -S read_ome.py CLIENT URL OUTDIR
CLIENT: zarr (zarr-python + imagecodecs), ome-zarr (ome-zarr-py's Reader) or
ngff-zarr (URL of the Zarr v2 rendering, ``<image>/ome-v2/``). Writes OUTDIR/<level>.npy per level and prints the levels' paths.
"""

import importlib.util
import os
import sys

# run with `python -I -S`: only the site-packages copy without mist-zarr is on the path
sys.path.append(os.environ["MIST_CLIENT_SITE"])
if importlib.util.find_spec("mist_zarr") is not None:
    raise SystemExit("mist_zarr is importable: this client must run without it")

from pathlib import Path

import imagecodecs.zarr
import numpy as np

imagecodecs.zarr.register_codecs()  # the HTJ2K chunks' codec, for zarr-python


def read_zarr(url):
    import zarr

    group = zarr.open_group(url, mode="r")
    datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
    return [(d["path"], group[d["path"]][...]) for d in datasets]


def read_ome_zarr(url):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    nodes = list(Reader(parse_url(url))())
    image = next(n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs))
    paths = image.metadata["coordinateTransformations"]
    return [(f"level {k}", np.asarray(a.compute())) for k, a in enumerate(image.data)
            ][: len(paths)]


def read_ngff_zarr(url):
    # ngff-zarr reads remote Zarr v3 through zarrs (zarrista), which has no HTJ2K
    # codec; a key->bytes mapping goes through its numcodecs reader, which reads
    # the view's Zarr v2 / NGFF 0.4 rendering (URL .../ome-v2/).
    import fsspec
    import imagecodecs.numcodecs
    import ngff_zarr

    imagecodecs.numcodecs.register_codecs()
    multiscales = ngff_zarr.from_ngff_zarr(fsspec.get_mapper(url))
    return [(f"level {k}", np.asarray(im.data.compute()))
            for k, im in enumerate(multiscales.images)]


READERS = {"zarr": read_zarr, "ome-zarr": read_ome_zarr, "ngff-zarr": read_ngff_zarr}

if __name__ == "__main__":
    client, url, out = sys.argv[1:4]
    for k, (name, samples) in enumerate(READERS[client](url)):
        np.save(Path(out) / f"{k}.npy", samples)
        print(name, samples.shape, samples.dtype)
