"""A per-series statistic at level 2 over a whole dataset, on a LocalCluster, over HTTP."""

from __future__ import annotations

import dask
import dask.array as da
import nibabel as nib
import numpy as np
import zarr

import mist_zarr
from mist_zarr.catalog import catalog
from mist_zarr.serve import serve_in_thread


def test_level2_statistic_reads_only_level2_prefixes(tmp_path):
    from distributed import Client, LocalCluster

    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        data = np.random.default_rng(i).integers(0, 3000, (300 + 20 * i, 280, 6), dtype=np.int16)
        nib.save(nib.Nifti1Image(data, np.eye(4)), src / f"s{i}.nii.gz")
    assert mist_zarr.convert(src, tmp_path / "ds").ok
    rows = catalog(tmp_path / "ds")
    assert len(rows) == 5 and (rows.levels >= 2).all()
    expected = {p: mist_zarr.open(tmp_path / "ds" / p, scale=2).values.astype(np.float64).mean()
                for p in rows.path}
    with serve_in_thread(tmp_path) as server:
        root = f"{server.url}/ds"

        def level2(path):
            store = mist_zarr.MultiscaleStore(f"{root}/{path}")
            return da.from_zarr(zarr.open_array(store, path="s2/image", mode="r"))

        server.reset_counters()
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster):
            means = dask.compute({p: level2(p).astype(np.float64).mean() for p in rows.path})[0]
        records = server.requests
    for p in rows.path:
        np.testing.assert_allclose(means[p], expected[p], rtol=1e-12)
    chunk_bytes = sum(r.body_len for r in records if "/image/c/" in r.path)
    prefixes = 0
    for p in rows.path:
        index = mist_zarr.read_index(tmp_path / "ds" / p)
        prefixes += int(index[..., 2].sum()) + 2 * int((index[..., 0] > 0).sum())
    assert chunk_bytes == prefixes
    others = {r.path.rsplit("/", 3)[-1] if "/index/" not in r.path else "index-chunk"
              for r in records if "/image/c/" not in r.path}
    assert others <= {"zarr.json", "index-chunk"}, others
    full = sum(int(mist_zarr.read_index(tmp_path / "ds" / p)[..., 0].sum()) for p in rows.path)
    assert chunk_bytes < 0.25 * full
