"""Count the store reads one export call makes (zarr.json, index) and the stores it builds.

    python benchmarks/count_export_opens.py
"""
import collections, sys, tempfile
import numpy as np
import zarr.storage
import mist_zarr
from mist_zarr.phantom import ct_phantom

tmp = tempfile.mkdtemp()
src = f"{tmp}/ct"
vol = ct_phantom((8, 128, 128))
mist_zarr.write_image(src, vol)
counts = collections.Counter()
orig = zarr.storage.LocalStore.get
async def get(self, key, *a, **k):
    counts[key] += 1
    return await orig(self, key, *a, **k)
zarr.storage.LocalStore.get = get
stores = collections.Counter()
orig_init = zarr.storage.LocalStore.__init__
def init(self, *a, **k):
    stores["LocalStore"] += 1
    orig_init(self, *a, **k)
zarr.storage.LocalStore.__init__ = init
from pydicom.data import get_testdata_file
import shutil, os
os.makedirs(f"{tmp}/dcm"); shutil.copy(get_testdata_file("CT_small.dcm"), f"{tmp}/dcm/")
mist_zarr.convert(f"{tmp}/dcm", f"{tmp}/ds")
dsrc = f"{tmp}/ds/" + mist_zarr.list_images(f"{tmp}/ds")[0]["path"]
for fmt, src in (("nifti", src), ("png", src), ("dicom", dsrc)):
    counts.clear(); stores.clear()
    mist_zarr.export(src, f"{tmp}/out-{fmt}", format=fmt, scale=1)
    print(fmt, "zarr.json reads:", counts["zarr.json"], "index reads:", sum(v for k, v in counts.items() if k.startswith("index/")), "stores made:", stores["LocalStore"])
