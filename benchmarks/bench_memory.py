"""Memory of converting one very large DICOM series: whole vs in slice batches.

Builds one series of ``--copies`` x 41 slices (512 x 512 int16) by stacking
copies of the shared ``ct/CRLM-CT-1004`` along z: each copy gets new
SOPInstanceUIDs, InstanceNumbers and ImagePositionPatient z shifted by the
stack height, so the result is a single, geometrically regular series (820
slices, 430 MB decoded, with the default 20 copies).

Then ``mist-zarr convert SERIES OUT -q --threads 2 --batch-mb B`` runs in a
fresh process for B = 0 (read whole) and each ``--batch`` size, alternating
for ``--repeat`` rounds, and prints wall time and peak RSS (median) side by
side. Every batched output must store exactly the chunks of the whole read
(equal prefix index and checksums), and the whole read is compared with the
pydicom stack once.

Run from the repository root::

    python benchmarks/bench_memory.py [--copies 20] [--batch 256 64] [--repeat 3] [--syntax j2k]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import zarr
from pydicom.uid import JPEG2000Lossless, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model, memory_gib, package_versions  # noqa: E402
from bench_convert import DEFAULT_DATA, find_mist_zarr, measure  # noqa: E402

SERIES = "ct/CRLM-CT-1004"  # native little endian; --syntax j2k recompresses it losslessly


def build_series(data: Path, copies: int, root: Path, syntax: str = "native") -> tuple[int, int]:
    """One series of ``copies`` stacked copies of SERIES under ``root``; (files, decoded bytes)."""
    sources = sorted((data / SERIES).glob("*.dcm"),
                     key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True)
                                         .ImagePositionPatient[2]))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sources]
    z = [float(h.ImagePositionPatient[2]) for h in headers]
    step = (z[-1] - z[0]) / (len(z) - 1)
    height = step * len(z)
    root.mkdir(parents=True)
    decoded = 0
    for copy in range(copies):
        for i, path in enumerate(sources):
            ds = pydicom.dcmread(path)
            n = copy * len(sources) + i
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), str(copy)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = n + 1
            ipp = [float(v) for v in ds.ImagePositionPatient]
            ipp[2] = z[0] + step * i + height * copy
            ds.ImagePositionPatient = ipp
            if "SliceLocation" in ds:
                ds.SliceLocation = ipp[2]
            if syntax == "j2k":  # JPEG 2000 lossless, encoded by pylibjpeg-openjpeg
                ds.compress(JPEG2000Lossless)
            ds.save_as(root / f"{n:05d}.dcm")
            decoded += ds.Rows * ds.Columns * 2
    return copies * len(sources), decoded


def image_of(out: Path) -> zarr.Group:
    [path] = [p.parent for p in out.rglob("zarr.json") if (p.parent / "index").is_dir()]
    return zarr.open_group(path, mode="r")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--copies", type=int, default=20, help="stacked copies of the CT series")
    parser.add_argument("--batch", type=float, nargs="+", default=[256, 64],
                        help="--batch-mb values to compare with 0 (whole)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--syntax", choices=["native", "j2k"], default="native",
                        help="transfer syntax of the built series: the second decode of a "
                             "batched read costs more for compressed files")
    args = parser.parse_args(argv)
    exe = find_mist_zarr()
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {memory_gib():.0f} GiB; "
          + ", ".join(package_versions(["mist-zarr", "zarr", "imagecodecs", "pydicom"])))
    with tempfile.TemporaryDirectory(prefix="mist-bench-memory-") as tmp:
        work = Path(tmp)
        files, decoded = build_series(args.data, args.copies, work / "series", args.syntax)
        print(f"one series: {files} slices ({args.syntax}), {decoded / 1e6:.0f} MB decoded int16")
        batches = [0.0, *args.batch]
        runs: dict[float, list] = {b: [] for b in batches}
        reference = None
        for r in range(args.repeat):
            for b in batches:
                out = work / f"out-{b:g}-{r}"
                cmd = [exe, "convert", str(work / "series"), str(out), "-q", "--threads", "2",
                       "--batch-mb", f"{b:g}"]
                runs[b].append(measure(cmd, work / "log.txt"))
                group = image_of(out)
                index, checksum = group["index"][...], group["checksum"][...]
                if reference is None:
                    reference = (index, checksum)
                    back = zarr.open_array(group.store_path.store,
                                           path=f"{group.store_path.path}/image", mode="r")
                    first = pydicom.dcmread(sorted((work / "series").glob("*.dcm"))[0])
                    assert np.array_equal(back[0], first.pixel_array), "slice 0 differs"
                elif not (np.array_equal(index, reference[0])
                          and np.array_equal(checksum, reference[1])):
                    raise AssertionError(f"--batch-mb {b:g} stored other chunks than the whole read")
                shutil.rmtree(out)
        print(f"\n{'--batch-mb':>10}{'wall s':>9}{'peak RSS MB':>13}{'RSS / whole':>13}"
              f"  (median of {args.repeat}; 2 encoder threads)")
        whole = statistics.median(run.peak_mb for run in runs[0.0])
        for b in batches:
            wall = statistics.median(run.wall for run in runs[b])
            peak = statistics.median(run.peak_mb for run in runs[b])
            label = "0 (whole)" if b == 0 else f"{b:g}"
            print(f"{label:>10}{wall:>9.1f}{peak:>13.0f}{peak / whole:>13.2f}")
        print("every batched run stored the same chunks (index and checksums) as the whole read")


if __name__ == "__main__":
    main()
