"""Datasets at scale: convert hundreds of series on dask.distributed, then read them at level 2.

    python benchmarks/bench_dataset.py [--data ../shared/data] [--copies 30]

Builds a tree of distinct DICOM series by copying the shared MR series
(every ``mr/dcm_qa_ts`` file is a series; the ``mr/dcm_qa_nih`` Siemens
series too) with rewritten UIDs, then prints, side by side in one run:

* conversion with 1 and 2 worker processes: series/s, input MB/s, peak RSS of
  each worker and of the client, for the full tree and for a third of it
  (peak memory per worker must not grow with the number of series);
* a per-series statistic (mean) over every series at level 2 and at level 0
  with dask on the same cluster: time and stored bytes read.

The series are converted with alpha = 16 (levels down to 16 px), since the
shared MR slices are only 64-72 px wide.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SERIES_SOURCES = ("mr/dcm_qa_ts/In", "mr/dcm_qa_nih/In/20180918Si")
# The MR slices are 64-72 px: alpha 16 gives them levels 64, 32, 16 px so that a
# level-2 read exists (the default alpha of 64 would give level 0 only).
ALPHA = 16


def build_tree(data: Path, copies: int, root: Path) -> tuple[int, int]:
    """``copies`` distinct copies of every shared MR file/series; (files, bytes)."""
    import pydicom
    from pydicom.uid import generate_uid

    sources = [p for s in SERIES_SOURCES for p in sorted((data / s).rglob("*"))
               if p.is_file() and not p.name.endswith(".txt")]
    files = nbytes = 0
    for copy in range(copies):
        for path in sources:
            ds = pydicom.dcmread(path)
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                setattr(ds, keyword, generate_uid(entropy_srcs=[str(ds.get(keyword)),
                                                                 f"copy{copy}"]))
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientID = f"{ds.get('PatientID', 'anon')}-{copy:03d}"
            out = root / f"copy{copy:03d}" / path.relative_to(data).parent / path.name
            out.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(out)
            files += 1
            nbytes += out.stat().st_size
    return files, nbytes


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM where /proc has it.

    Not ``ru_maxrss``: on Linux a process started by fork + exec (vfork in
    CPython) inherits in ``ru_maxrss`` the peak of the process that started it,
    and a LocalCluster's nannies start the workers from this client process: a
    worker's ``ru_maxrss`` is then at least the client's peak RSS at that time
    (which grows with the tree built and converted before), not its own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def convert_on_cluster(src: Path, dest: Path, workers: int) -> dict:
    """Convert with a fresh LocalCluster, configured as ``convert(workers=N)`` configures
    its own; peak RSS of each worker read before it closes."""
    import dask
    from distributed import Client, LocalCluster

    import mist_zarr
    from mist_zarr.convert import CLUSTER_CONFIG

    with dask.config.set(CLUSTER_CONFIG), LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True,
            dashboard_address=None) as cluster, Client(cluster) as client:
        t0 = time.perf_counter()
        report = mist_zarr.convert(src, dest, scheduler=cluster.scheduler_address, alpha=ALPHA)
        seconds = time.perf_counter() - t0
        peaks = sorted(client.run(peak_rss_mb).values())
    if not report.ok:
        raise SystemExit(f"conversion failed:\n{report.summary()}")
    return {"seconds": seconds, "series": len(report.converted), "bytes_in": report.bytes_in,
            "bytes_out": report.bytes_out, "worker_peaks": peaks}


def series_mean(path: str, level: int) -> float:
    """Mean of one series at ``level``: only that level's prefixes are read."""
    import mist_zarr

    return float(mist_zarr.open(path, scale=level).values.astype(np.float64).mean())


def level_statistics(dest: Path, levels: tuple[int, ...], workers: int,
                     repeat: int = 3) -> dict[int, tuple[float, int, dict]]:
    """Mean of every series at each level, one dask task per series, on one warmed-up
    LocalCluster; levels alternate so machine noise hits them alike.
    Returns level -> (median seconds, stored bytes read, means)."""
    import dask
    from distributed import Client, LocalCluster

    from mist_zarr.catalog import catalog

    rows = catalog(dest)
    rows = rows[rows.levels >= max(levels)]
    out: dict[int, tuple[list[float], int, dict]] = {
        k: ([], sum(int(b[k]) for b in rows.bytes_per_level), {}) for k in levels}
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("mist_zarr"))  # imports are not part of the figure
        for _ in range(repeat):
            for k in levels:
                tasks = {p: dask.delayed(series_mean)(str(dest / p), k) for p in rows.path}
                t0 = time.perf_counter()
                means = dask.compute(tasks)[0]
                out[k][0].append(time.perf_counter() - t0)
                out[k][2].update(means)
    return {k: (float(np.median(t)), n, m) for k, (t, n, m) in out.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("MIST_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--copies", type=int, default=30, help="copies of the MR series")
    parser.add_argument("--workdir", type=Path, help="keep the tree and datasets here")
    args = parser.parse_args(argv)

    import dask
    import distributed
    import imagecodecs
    import zarr

    import mist_zarr

    print(f"command : {' '.join([sys.executable] + sys.argv)}")
    print(f"machine : {platform.platform()}, {os.cpu_count()} cores, load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"versions: python {platform.python_version()}, mist_zarr {mist_zarr.__version__}, "
          f"zarr {zarr.__version__}, imagecodecs {imagecodecs.__version__}, dask {dask.__version__}, "
          f"distributed {distributed.__version__}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mist-bench-dataset-"))
    try:
        tree = work / "tree"
        small = work / "tree-small"
        files, nbytes = build_tree(args.data, args.copies, tree)
        small_files, small_bytes = build_tree(args.data, max(1, args.copies // 3), small)
        print(f"tree    : {files} files, {nbytes / 1e6:.1f} MB ({args.copies} copies of "
              f"{', '.join(SERIES_SOURCES)}); small tree: {small_files} files")
        print()
        print(f"{'convert':<22}{'series':>7}{'seconds':>9}{'series/s':>10}{'MB/s in':>9}"
              f"{'ratio':>7}  peak RSS per worker (MB)")
        results = {}
        for name, src, workers in (("small, 2 workers", small, 2), ("full, 1 worker", tree, 1),
                                   ("full, 2 workers", tree, 2)):
            dest = work / f"ds-{name.replace(', ', '-').replace(' ', '')}"
            shutil.rmtree(dest, ignore_errors=True)
            r = convert_on_cluster(src, dest, workers)
            results[name] = (r, dest)
            print(f"{name:<22}{r['series']:>7}{r['seconds']:>9.1f}"
                  f"{r['series'] / r['seconds']:>10.1f}{r['bytes_in'] / 1e6 / r['seconds']:>9.1f}"
                  f"{r['bytes_in'] / max(r['bytes_out'], 1):>7.2f}  "
                  + ", ".join(f"{p:.0f}" for p in r["worker_peaks"]))
        one, two = results["full, 1 worker"][0], results["full, 2 workers"][0]
        print(f"speed-up with 2 workers: {one['seconds'] / two['seconds']:.2f}x; peak worker RSS "
              f"small tree {max(results['small, 2 workers'][0]['worker_peaks']):.0f} MB vs full "
              f"tree {max(two['worker_peaks']):.0f} MB; client peak {peak_rss_mb():.0f} MB")
        print()
        dest = results["full, 2 workers"][1]
        print(f"{'statistic (mean)':<22}{'series':>7}{'seconds':>9}{'stored MB read':>16}"
              "  (median of 3, one task per series, 2 workers)")
        stats = level_statistics(dest, (2, 0), 2)
        for level, (seconds, read, means) in stats.items():
            print(f"{'level ' + str(level):<22}{len(means):>7}{seconds:>9.2f}{read / 1e6:>16.2f}")
        (s2, b2, _), (s0, b0, _) = stats[2], stats[0]
        print(f"level 2 vs level 0: {s0 / s2:.2f}x the speed, {100 * b2 / b0:.1f} % of the bytes")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
