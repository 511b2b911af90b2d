"""Enhanced multi-frame DICOM ingest: ``mist_zarr.convert`` before and after, side by side.

The inputs are the shared Siemens XA30 enhanced MR series in
``mr/dcm_qa_xa30/In`` (each series folder, then the whole folder). The two
contenders are two source trees of mist-zarr: ``--before`` (required: any
folder holding a ``mist_zarr`` package, e.g. a ``git worktree`` of an older
commit) and ``--after`` (default: this checkout).
Each round starts one fresh ``python -c`` worker per contender, with
``PYTHONPATH`` set to its tree, in alternating order (before first on even
rounds, after first on odd ones). A worker imports mist_zarr and converts a
small series once (imports and first-call costs stay outside the timings),
then, per input, reads it as DICOM (``scan_dicom`` + ``read_dicom_series``,
the part the enhanced work changed) and converts it into a fresh folder
(``mist_zarr.convert``: scan, read, HTJ2K writes, catalog), reporting wall and
CPU time (``time.process_time``: all threads of the worker) of each.

MB/s are MB (10^6 bytes) of stored samples (Rows x Columns x frames x samples
x bytes per sample, from the headers) per second of wall time; "x" is the
median over rounds of the per-round ratio before / after (of wall and of CPU
time: CPU time is the steadier figure on a loaded machine). After the timed
rounds the last round's outputs of the two contenders are compared file by
file, with the random run and write ids masked and ``catalog.parquet``
compared as a table: the script says whether they are identical.

Run from the repository root::

    python benchmarks/bench_enhanced.py --before DIR [--data DIR] [--after DIR]
                                        [--repeat 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("MIST_DATA", REPO.parent / "shared" / "data"))
XA30 = "mr/dcm_qa_xa30/In"
WARM_UP = "14_DWI_dir80_PA"
MB = 1e6
RUN_IDS = re.compile(rb'"(convert_run|run|write_id)": ?"[0-9a-f]{32}"')

# argv[1]: JSON [[name, source, output folder], ...]; prints one JSON line per input.
WORKER = """\
import json, sys, tempfile, time
import mist_zarr
from mist_zarr.converters.dicom import read_dicom_series, scan_dicom
from mist_zarr.converters.dicom.header import forget_headers
jobs, warm = json.loads(sys.argv[1]), sys.argv[2]
mist_zarr.convert(warm, tempfile.mkdtemp())
for name, src, out in jobs:
    row = {"name": name, "module": mist_zarr.__file__}
    c0, t0 = time.process_time(), time.perf_counter()
    volumes = [read_dicom_series(ref) for ref in scan_dicom(src).series]
    row.update(read_wall=time.perf_counter() - t0, read_cpu=time.process_time() - c0)
    del volumes
    forget_headers()
    c0, t0 = time.process_time(), time.perf_counter()
    mist_zarr.convert(src, out)
    row.update(wall=time.perf_counter() - t0, cpu=time.process_time() - c0)
    print(json.dumps(row))
"""


def sample_bytes(folder: Path) -> int:
    """Bytes of stored samples in the DICOM files under ``folder`` (from their headers)."""
    import pydicom

    total = 0
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        frames = int(ds.get("NumberOfFrames") or 1)
        total += (int(ds.Rows) * int(ds.Columns) * frames * int(ds.SamplesPerPixel)
                  * int(ds.BitsAllocated) // 8)
    return total


def run_worker(tree: Path, jobs: list[list[str]], warm: Path, cwd: Path) -> dict[str, dict]:
    # ``python -c`` puts its working directory first on sys.path: not a source tree
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(jobs), str(warm)],
                          env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"worker for {tree} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for row in rows:
        if not row["module"].startswith(str(tree)):
            raise SystemExit(f"worker for {tree} imported {row['module']}")
    return {row["name"]: row for row in rows}


def compare_outputs(a: Path, b: Path) -> list[str]:
    """Differences between two converted datasets (run and write ids masked)."""
    import pandas as pd

    fa = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    fb = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    diffs = [f"only in before: {p}" for p in sorted(fa - fb)]
    diffs += [f"only in after: {p}" for p in sorted(fb - fa)]
    for rel in sorted(fa & fb):
        if rel.name == "catalog.parquet":
            same = pd.read_parquet(a / rel).equals(pd.read_parquet(b / rel))
        else:
            same = (RUN_IDS.sub(b"ID", (a / rel).read_bytes())
                    == RUN_IDS.sub(b"ID", (b / rel).read_bytes()))
        if not same:
            diffs.append(f"differs: {rel}")
    return diffs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--before", type=Path, required=True,
                        help="a source tree of the code to compare with, e.g. one made with "
                             "`git worktree add /tmp/old COMMIT`")
    parser.add_argument("--after", type=Path, default=REPO)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="keep the last round's outputs here")
    args = parser.parse_args(argv)
    root = args.data / XA30
    if not root.is_dir():
        raise SystemExit(f"{root} not found (shared data)")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for tree in trees.values():
        if not (tree / "mist_zarr" / "__init__.py").is_file():
            raise SystemExit(f"{tree} holds no mist_zarr package")
    inputs = {p.name: p for p in sorted(root.iterdir()) if p.is_dir()} | {"all of In/": root}
    samples = {name: sample_bytes(path) for name, path in inputs.items()}
    print("enhanced multi-frame ingest, mist_zarr.convert before vs after")
    print(f"command:  {' '.join(sys.orig_argv)}")
    print(f"machine:  {platform.platform()}, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"python:   {platform.python_version()}")
    print(f"before:   {trees['before']}")
    print(f"after:    {trees['after']}")
    work = Path(tempfile.mkdtemp(prefix="bench-enhanced-"))
    times: dict[str, dict[str, list[dict]]] = {c: {n: [] for n in inputs} for c in trees}
    try:
        for r in range(args.repeat):
            order = list(trees) if r % 2 == 0 else list(trees)[::-1]
            for contender in order:
                # a fresh folder per round, all removed at the end: deleting the last
                # round's files just before writing makes ext4 search its inode tables
                # (recently deleted inodes), a cost of the benchmark, not of a conversion
                out = work / f"{contender}-{r}"
                jobs = [[name, str(path), str(out / f"{i}")]
                        for i, (name, path) in enumerate(inputs.items())]
                rows = run_worker(trees[contender], jobs, root / WARM_UP, work)
                for name in inputs:
                    times[contender][name].append(rows[name])
        print(f"load average after the runs: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        for key, title in (("", "mist_zarr.convert (scan, read, write, catalog)"),
                           ("read_", "the DICOM read alone: scan_dicom + read_dicom_series")):
            print(f"\n{title}: wall s (MB/s of samples), medians of {args.repeat}; "
                  "CPU s in brackets\n")
            print("| input | samples MB | before | after | before / after (wall) | (CPU) |")
            print("|---|---:|---:|---:|---:|---:|")
            for name in inputs:
                mb = samples[name] / MB
                cells = []
                for contender in trees:
                    runs = times[contender][name]
                    wall = statistics.median(x[key + "wall"] for x in runs)
                    cpu = statistics.median(x[key + "cpu"] for x in runs)
                    cells.append(f"{wall:.2f} ({mb / wall:.1f} MB/s) [{cpu:.2f}]")
                ratios = [statistics.median(b[key + m] / a[key + m] for b, a in
                                            zip(times["before"][name], times["after"][name]))
                          for m in ("wall", "cpu")]
                print(f"| {name} | {mb:.2f} | {cells[0]} | {cells[1]} | {ratios[0]:.1f}x "
                      f"| {ratios[1]:.1f}x |")
        diffs, last = [], args.repeat - 1
        for i in range(len(inputs)):
            diffs += compare_outputs(work / f"before-{last}" / f"{i}", work / f"after-{last}" / f"{i}")
        print("\noutputs (last round, file by file): "
              + ("identical" if not diffs else f"{len(diffs)} difference(s)"))
        for line in diffs[:20]:
            print(f"  {line}")
        if args.keep:
            for contender in trees:
                shutil.copytree(work / f"{contender}-{last}", args.keep / contender,
                                dirs_exist_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
