"""Conversion benchmark: ``mist-zarr convert`` (1 and 2 workers) vs ``dcm2niix -z y``
(with and without ``pigz``), side by side.

Three inputs:

(a) the shared CT series ``ct/CRLM-CT-1004`` (41 slices, 512 x 512 int16,
    uncompressed DICOM);
(b) one long series of ``--long`` slices (default 1,000): the slices of (a)
    repeated, each copy with a new SOPInstanceUID and ImagePositionPatient
    continuing the slice spacing, all in one new series;
(c) a synthetic tree of ``--copies`` copies each of ``ct/CRLM-CT-1004`` and
    ``ct/CRLM-CT-1006``, laid out as ``tree/copyNN/<series>/*.dcm``. Every copy
    is a distinct series: pydicom rewrites StudyInstanceUID, SeriesInstanceUID
    and SOPInstanceUID (and MediaStorageSOPInstanceUID) deterministically per
    copy (``generate_uid(entropy_srcs=[original UID, copy number])``) and
    suffixes PatientID with the copy number; pixel data is untouched.

For each input the converters run alternately (A B C D A B C D ...) for
``--repeat`` rounds, each run into a fresh output directory:

* ``mist-zarr convert IN OUT -q`` (one process, threads on all cores),
  ``... --workers 1`` (the same: one worker is this process) and
  ``... --workers 2`` (a local dask cluster for many series; a single series
  larger than the split threshold is written in slice ranges by two local
  processes, ``mist_zarr.convert.split``); for the long series also
  ``... --workers 1 --threads 1``: one worker on one core, as each part of
  ``--workers 2`` is encoded, so that pair is the split's scaling per core;
* ``dcm2niix -z y -o OUT IN`` with ``PATH`` holding no ``pigz`` (dcm2niix
  then compresses in-process with zlib) and with the directory of ``pigz`` on
  ``PATH`` (dcm2niix hands compression to it); dcm2niix searches sub-folders
  to depth 5 by default, so the tree converts whole.

Each run starts in a fresh ``python -c`` wrapper that launches the command and
reports its wall time, the CPU time (user + system) of all its processes, and
``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the peak resident set of the largest
single process the command ran (not the sum over processes; dcm2niix may
hand compression to a ``pigz`` child, the script says whether pigz is on PATH).
The wrapper's own interpreter start-up is outside the timed span. Input
files are read once before timing, so every run reads from the page cache.

Output size is the sum of file sizes under OUT: everything for mist-zarr, and
for dcm2niix the ``.nii.gz`` images with and without the ``.json`` sidecars.
The targets (issue 16), at 2 workers: faster than ``dcm2niix -z y`` without
pigz on every input, no slower than ``dcm2niix -z y`` with pigz on the tree,
at least 1.6x faster than 1 worker on the long series, and output no larger than the raw HTJ2K size of the same slices + 1 %
(``imagecodecs.htj2k_encode`` of every slice with the layout's parameters). Each run is checked: exit status 0 and one output
image per series; for (a) the mist-zarr image read back with
``mist_zarr.read_image`` must equal the pydicom ``pixel_array`` stack of the
input sorted by ImagePositionPatient z.

Run from the repository root::

    python benchmarks/bench_convert.py [--data DIR] [--copies 10] [--long 1000]
                                       [--repeat 3] [--cases single,long,tree]
                                       [--workdir DIR] [--keep]

Needs ``dcm2niix`` (from PyPI, in the test extra) and, for the pigz rows,
``pigz`` on PATH (Debian's ``pigz``; without it those rows are left out).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

import mist_zarr

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("MIST_DATA", REPO.parent / "shared" / "data"))
SINGLE = "ct/CRLM-CT-1004"
TREE_SERIES = ("ct/CRLM-CT-1004", "ct/CRLM-CT-1006")
TARGET_SIZE = 1.01  # mist-zarr output / raw HTJ2K bytes of the same slices, at most
MB = 1e6
MIST = "mist-zarr convert"
MIST1 = "mist-zarr convert --workers 1"
MIST2 = "mist-zarr convert --workers 2"
# one worker on one core: what each of the two workers of MIST2 has (its parts
# are encoded on one thread each), so MIST1_CORE / MIST2 is the split's scaling
# per core; --workers 1 alone already encodes on every core of this machine
MIST1_CORE = "mist-zarr convert --workers 1 --threads 1"
TARGET_SPLIT = 1.6  # the 1,000-slice series: --workers 1 / --workers 2 wall time, at least
DCM = "dcm2niix -z y"
DCM_PIGZ = "dcm2niix -z y + pigz"
PACKAGES = ("mist-zarr", "zarr", "imagecodecs", "numpy", "pydicom", "dcm2niix")

# Runs one command (argv as JSON in argv[1], output to the log file argv[2])
# and prints its wall time, CPU time and peak RSS as JSON. RUSAGE_CHILDREN
# covers every descendant that was waited for; ru_maxrss is the largest one's
# peak in KiB.
WRAPPER = """\
import json, resource, subprocess, sys, time
cmd, log = json.loads(sys.argv[1]), sys.argv[2]
with open(log, "wb") as out:
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "wall": wall, "cpu": ru.ru_utime + ru.ru_stime,
                  "peak_kib": ru.ru_maxrss}))
"""


# -- the two converters ---------------------------------------------------------------


def find_mist_zarr() -> str:
    """The ``mist-zarr`` script installed with this interpreter (not a version-manager shim)."""
    beside = Path(sys.executable).parent / "mist-zarr"
    found = str(beside) if beside.is_file() else shutil.which("mist-zarr")
    if not found:
        raise SystemExit("mist-zarr is not installed (pip install -e .)")
    return found


def find_dcm2niix() -> str:
    """The binary of the ``dcm2niix`` PyPI package, else the one on PATH."""
    try:
        import dcm2niix

        return str(dcm2niix.bin)
    except ImportError:
        found = shutil.which("dcm2niix")
        if not found:
            raise SystemExit("dcm2niix not found (pip install dcm2niix)") from None
        return found


def file_sizes(root: Path, suffix: str = "") -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()
               and p.name.endswith(suffix))


@dataclass(frozen=True)
class Converter:
    name: str
    command: Callable[[Path, Path], list[str]]
    makes_out: bool  # creates OUT itself (else OUT must exist)
    images: Callable[[Path], int]  # images written under OUT
    sizes: Callable[[Path], dict[str, int]]  # size figures under OUT
    path: str | None = None  # PATH for the run (None: this process's)


def mist_converter(exe: str, workers: int | None, threads: int | None = None) -> Converter:
    extra = [] if workers is None else ["--workers", str(workers)]
    extra += [] if threads is None else ["--threads", str(threads)]
    return Converter(
        " ".join([MIST, *extra]),
        lambda src, out: [exe, "convert", str(src), str(out), "-q", *extra],
        makes_out=True,
        images=lambda out: len(mist_zarr.list_images(out)),
        sizes=lambda out: {"all": file_sizes(out)},
    )


def dcm2niix_converter(exe: str, pigz: str | None, empty_dir: Path) -> Converter:
    def sizes(out: Path) -> dict[str, int]:
        nii = file_sizes(out, ".nii.gz")
        return {"all": nii + file_sizes(out, ".json"), "images": nii}

    return Converter(
        DCM_PIGZ if pigz else DCM,
        lambda src, out: [exe, "-z", "y", "-o", str(out), str(src)],
        makes_out=False,
        images=lambda out: sum(1 for _ in out.rglob("*.nii.gz")),
        sizes=sizes,
        # dcm2niix looks pigz up on PATH: a PATH of one empty folder hides it
        path=str(Path(pigz).parent) if pigz else str(empty_dir),
    )


# -- measuring ------------------------------------------------------------------------


@dataclass
class Run:
    wall: float
    cpu: float
    peak_mb: float
    images: int = 0
    sizes: dict[str, int] = field(default_factory=dict)


def measure(cmd: Sequence[str], log: Path, check: bool = True, path: str | None = None) -> Run:
    """Run ``cmd`` in a fresh wrapper process; fail loudly if it fails (and ``check``)."""
    env = None if path is None else {**os.environ, "PATH": path}
    done = subprocess.run([sys.executable, "-c", WRAPPER, json.dumps(list(cmd)), str(log)],
                          check=True, capture_output=True, text=True, env=env)
    stats = json.loads(done.stdout)
    if check and stats["rc"] != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited with {stats['rc']}:\n{log.read_text()}")
    return Run(stats["wall"], stats["cpu"], stats["peak_kib"] * 1024 / MB)


def warm_cache(src: Path) -> int:
    """Read every input file once (so every run reads from the page cache); total bytes."""
    total = 0
    for path in src.rglob("*"):
        if path.is_file():
            total += len(path.read_bytes())
    return total


@dataclass
class Case:
    key: str  # names the run directories
    label: str
    src: Path
    series: int  # series (= expected output images) under src
    files: int
    bytes_in: int
    raw_htj2k: int = 0
    repeat: int = 0  # bytes of the slices as bare HTJ2K codestreams
    check: Callable[[Path], None] | None = None  # reads back the first mist-zarr output


def run_case(case: Case, converters: Sequence[Converter], repeat: int, runs_dir: Path,
             keep: bool) -> dict[str, list[Run]]:
    """Alternate the converters for ``repeat`` rounds, checking every output."""
    results: dict[str, list[Run]] = {c.name: [] for c in converters}
    outputs = []
    for r in range(repeat):
        for conv in converters:
            out = runs_dir / f"{case.key}-{r}-{conv.name.replace(' ', '_')}"
            if not conv.makes_out:
                out.mkdir(parents=True)
            run = measure(conv.command(case.src, out), out.with_suffix(".log"), path=conv.path)
            run.images = conv.images(out)
            if run.images != case.series:
                raise AssertionError(f"{conv.name} wrote {run.images} images for {case.series} "
                                     f"series ({out})")
            if r == 0 and conv.name.startswith(MIST) and case.check is not None:
                case.check(out)
            run.sizes = conv.sizes(out)
            results[conv.name].append(run)
            outputs.append(out)
    # removed only now: deleting thousands of files just before the next run writes
    # makes ext4 search its inode tables (recently deleted inodes), a cost of the
    # benchmark's churn, not of a conversion (1-1.5 s of ~7 s for 1,000 slices here)
    if not keep:
        for out in outputs:
            shutil.rmtree(out)
    return results


def startup(cmd: Sequence[str], repeat: int, log: Path) -> tuple[float, float]:
    """Median wall s and peak RSS MB of a command that only starts up (``--version``)."""
    runs = [measure(cmd, log, check=False) for _ in range(repeat)]  # dcm2niix exits 3
    return statistics.median(r.wall for r in runs), max(r.peak_mb for r in runs)


# -- inputs ---------------------------------------------------------------------------


def dicom_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def stacked_pixels(directory: Path) -> np.ndarray:
    """Stored values of a single-frame series, slices sorted by ImagePositionPatient z."""
    datasets = [pydicom.dcmread(p) for p in dicom_files(directory)]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    return np.stack([ds.pixel_array for ds in datasets])


def check_roundtrip(series_dir: Path) -> Callable[[Path], None]:
    expected = stacked_pixels(series_dir)

    def check(out: Path) -> None:
        (row,) = mist_zarr.list_images(out)
        back = mist_zarr.read_image(out / row["path"])
        if back.shape != expected.shape or not np.array_equal(back, expected):
            raise AssertionError(f"{out / row['path']}: {back.shape} {back.dtype} read back, "
                                 f"not the input's {expected.shape} {expected.dtype} samples")
        print(f"check: mist-zarr image {row['path']} read back equals the pydicom stack "
              f"{expected.shape} {expected.dtype} sorted by z")

    return check


def copy_uid(uid: str, copy: int) -> str:
    return generate_uid(entropy_srcs=[str(uid), f"copy{copy}"])


def build_tree(data: Path, copies: int, root: Path) -> int:
    """``root/copyNN/<series>/*.dcm``: ``copies`` distinct copies of each series; file count."""
    files = 0
    for number in range(1, copies + 1):
        for series in TREE_SERIES:
            dest = root / f"copy{number:02d}" / Path(series).name
            dest.mkdir(parents=True)
            for path in dicom_files(data / series):
                ds = pydicom.dcmread(path)
                ds.StudyInstanceUID = copy_uid(ds.StudyInstanceUID, number)
                ds.SeriesInstanceUID = copy_uid(ds.SeriesInstanceUID, number)
                ds.SOPInstanceUID = copy_uid(ds.SOPInstanceUID, number)
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.PatientID = f"{ds.PatientID}-{number:02d}"
                ds.save_as(dest / path.name)
                files += 1
    return files


def build_long(data: Path, slices: int, dest: Path) -> int:
    """One series of ``slices`` slices: the slices of SINGLE repeated, new UIDs, z continued."""
    source = sorted((pydicom.dcmread(p) for p in dicom_files(data / SINGLE)),
                    key=lambda ds: float(ds.ImagePositionPatient[2]))
    step = float(source[1].ImagePositionPatient[2]) - float(source[0].ImagePositionPatient[2])
    series = copy_uid(source[0].SeriesInstanceUID, 9999)
    z0 = float(source[0].ImagePositionPatient[2])
    dest.mkdir(parents=True)
    for i in range(slices):
        ds = copy.deepcopy(source[i % len(source)])  # Dataset.copy() shares the elements
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = copy_uid(ds.SOPInstanceUID, 10000 + i)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, round(z0 + i * step, 3)]  # DS holds 16 characters
        ds.InstanceNumber = i + 1
        ds.save_as(dest / f"IM{i:05d}.dcm")
    return slices


def raw_htj2k_bytes(series_dirs: Sequence[Path]) -> int:
    """Bytes of every slice as one bare HTJ2K codestream with the layout's parameters."""
    import imagecodecs

    from mist_zarr.layout import encode_kwargs, num_levels

    total = 0
    for directory in series_dirs:
        for path in dicom_files(directory):
            plane = pydicom.dcmread(path).pixel_array
            total += len(imagecodecs.htj2k_encode(plane, **encode_kwargs(num_levels(plane.shape))))
    return total


# -- report ---------------------------------------------------------------------------


def source_state() -> str:
    """The checked-out commit, and whether the library has uncommitted changes."""
    git = ["git", "--no-optional-locks", "-C", str(REPO)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        changed = subprocess.run([*git, "status", "--porcelain", "--", "mist_zarr"],
                                 capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    changed = [line for line in changed if line.strip()]
    return f"{head}, " + (f"{len(changed)} uncommitted change(s) in mist_zarr/" if changed
                          else "mist_zarr/ clean")


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def print_environment(dcm2niix: str) -> None:
    import imagecodecs
    from _machine import cpu_model, memory_gib, package_versions

    mem, cpu = memory_gib(), cpu_model()
    print("mist-zarr convert vs dcm2niix benchmark")
    print(f"command:  {shlex.join(sys.orig_argv)}")
    print(f"machine:  {platform.platform()}, {cpu}, {os.cpu_count()} CPUs, {mem:.1f} GiB RAM, "
          f"load average {load_average()}")
    print(f"python:   {platform.python_version()} ({sys.executable})")
    print(f"source:   {source_state()}")
    versions = package_versions(PACKAGES)
    print(f"packages: {', '.join(versions)}; {imagecodecs.htj2k_version()}")
    # dcm2niix prints its banner and exits with status 3 for --version
    banner = subprocess.run([dcm2niix, "--version"], capture_output=True, text=True,
                            check=False).stdout
    print(f"dcm2niix: {banner.splitlines()[0].strip() if banner else '?'}")
    pigz = shutil.which("pigz")
    print(f"pigz:     {pigz or 'not on PATH: dcm2niix -z y compresses in-process (zlib)'}")


def span(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    med = fmt.format(statistics.median(values))
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return f"{med} ({lo}-{hi})"


def mb(nbytes: float) -> str:
    return f"{nbytes / MB:.2f}"


def one_size(runs: Sequence[Run], key: str) -> int:
    """The output size of every run (they must agree: both converters are deterministic)."""
    values = {r.sizes[key] for r in runs}
    if len(values) != 1:
        print(f"note: output size varies between runs: {sorted(values)}")
    return max(values)


def print_case(case: Case, results: dict[str, list[Run]], converters: Sequence[Converter],
               starts: dict[str, tuple[float, float]]) -> dict[str, bool]:
    print(f"\n=== {case.label}: {case.series} series, {case.files} files, "
          f"{mb(case.bytes_in)} MB of DICOM in, {case.repeat} runs each")
    print("| converter | wall s, median (min-max) | CPU s | peak RSS MB | output MB "
          "| images | start-up s, MB |")
    print("|---|---|---|---|---|---|---|")
    for conv in converters:
        runs = results[conv.name]
        out = one_size(runs, "all")
        nii = one_size(runs, "images") if "images" in runs[0].sizes else None
        shown = f"{mb(out)} (.nii.gz {mb(nii)})" if nii is not None else mb(out)
        start = starts[conv.name.split(" + ")[0].split(" --")[0]]
        print(f"| {conv.name} | {span([r.wall for r in runs])} "
              f"| {statistics.median(r.cpu for r in runs):.2f} "
              f"| {statistics.median(r.peak_mb for r in runs):.0f} "
              f"| {shown} | {runs[0].images} | {start[0]:.2f}, {start[1]:.0f} |")

    def ratio(a: str, b: str) -> float:
        return statistics.median(x.wall / y.wall for x, y in zip(results[a], results[b]))

    met: dict[str, bool] = {}
    verdict = {True: "met", False: "NOT met"}
    mists = [c.name for c in converters if c.name.startswith(MIST)]
    dcms = [c.name for c in converters if c.name.startswith(DCM)]
    for m in mists:
        print("wall " + m + " / " + ", ".join(f"{d}: {ratio(m, d):.2f}" for d in dcms)
              + " (median of pairwise ratios)")
    if MIST2 in results:
        met["faster than dcm2niix"] = ratio(MIST2, DCM) < 1.0
        if case.key == "tree" and DCM_PIGZ in results:
            met["no slower than dcm2niix + pigz"] = ratio(MIST2, DCM_PIGZ) <= 1.0
        print(f"in-process -> 2 workers: {ratio(MIST, MIST2):.2f}x faster")
        if MIST1 in results:
            print(f"1 -> 2 workers: {ratio(MIST1, MIST2):.2f}x faster (median of pairwise ratios)")
            if case.key == "long":
                met[f"2 workers >= {TARGET_SPLIT}x faster than 1"] = \
                    ratio(MIST1, MIST2) >= TARGET_SPLIT
        if MIST1_CORE in results:
            print(f"1 -> 2 workers, one core each (--workers 1 --threads 1 -> --workers 2): "
                  f"{ratio(MIST1_CORE, MIST2):.2f}x faster (median of pairwise ratios)")
    mist_out = one_size(results[MIST], "all")
    size = mist_out / case.raw_htj2k
    met["size <= raw HTJ2K + 1 %"] = size <= TARGET_SIZE
    print(f"mist-zarr output / raw HTJ2K of the slices: {mb(mist_out)} / {mb(case.raw_htj2k)} MB"
          f" = {size:.4f}; .nii.gz / mist-zarr: "
          f"{one_size(results[DCM], 'images') / mist_out:.2f}")
    print("targets: " + "; ".join(f"{k}: {verdict[v]}" for k, v in met.items()))
    return met


# -- main -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="shared data directory (default: ../shared/data or $MIST_DATA)")
    parser.add_argument("--copies", type=int, default=10,
                        help="copies of each of the two CT series in the tree (default: 10)")
    parser.add_argument("--long", type=int, default=1000,
                        help="slices of the long series (default: 1000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per converter and input")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to build the tree and write outputs (default: a temporary "
                             "directory); what the script writes there is removed at the end")
    parser.add_argument("--cases", default="single,long,tree",
                        help="inputs to run, comma-separated (default: single,long,tree)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the tree and every output (default: remove them)")
    args = parser.parse_args(argv)
    if not all((args.data / s).is_dir() for s in TREE_SERIES):
        raise SystemExit(f"shared CT series not found under {args.data} (set MIST_DATA or --data)")
    if args.repeat < 1 or args.copies < 1:
        raise SystemExit("--repeat and --copies must be at least 1")

    mist_exe, dcm2niix_exe = find_mist_zarr(), find_dcm2niix()
    made = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="mist-bench-convert-")) if made else args.workdir
    (workdir / "no-pigz").mkdir(parents=True, exist_ok=True)
    pigz = shutil.which("pigz")
    converters = [mist_converter(mist_exe, None), mist_converter(mist_exe, 1),
                  mist_converter(mist_exe, 2),
                  dcm2niix_converter(dcm2niix_exe, None, workdir / "no-pigz")]
    if pigz:
        converters.append(dcm2niix_converter(dcm2niix_exe, pigz, workdir / "no-pigz"))
    print_environment(dcm2niix_exe)
    for conv in converters:
        print(f"run:      {shlex.join(conv.command(Path('IN'), Path('OUT')))}"
              + (f"  (PATH={conv.path})" if conv.path else ""))

    tree, runs_dir, long = workdir / "tree", workdir / "runs", workdir / "long"
    if tree.exists() or runs_dir.exists() or long.exists():
        raise SystemExit(f"{tree} or {runs_dir} exists; choose an empty --workdir")
    print(f"workdir:  {workdir}")
    try:
        runs_dir.mkdir(parents=True)
        single = args.data / SINGLE
        wanted = set(args.cases.split(","))
        cases = []
        if "single" in wanted:
            cases.append(Case("single", f"(a) {SINGLE}", single, 1, len(dicom_files(single)),
                              warm_cache(single), raw_htj2k_bytes([single]), args.repeat,
                              check_roundtrip(single)))
        if "long" in wanted:
            t0 = time.perf_counter()
            build_long(args.data, args.long, long)
            print(f"long:     one series of {args.long} slices, built in "
                  f"{time.perf_counter() - t0:.1f} s")
            cases.append(Case("long", f"(b) one series of {args.long} slices", long, 1,
                              args.long, warm_cache(long), raw_htj2k_bytes([long]), args.repeat,
                              check_roundtrip(long)))
        if "tree" in wanted:
            t0 = time.perf_counter()
            files = build_tree(args.data, args.copies, tree)
            print(f"tree:     {args.copies} copies x {len(TREE_SERIES)} series, {files} files, "
                  f"built in {time.perf_counter() - t0:.1f} s")
            cases.append(Case("tree", f"(c) tree of {args.copies} x {len(TREE_SERIES)} series",
                              tree, args.copies * len(TREE_SERIES), files, warm_cache(tree),
                              args.copies * raw_htj2k_bytes([args.data / s for s in TREE_SERIES]),
                              args.repeat))
        log = runs_dir / "startup.log"
        starts = {MIST: startup([mist_exe, "--version"], args.repeat, log),
                  DCM: startup([dcm2niix_exe, "--version"], args.repeat, log)}
        verdicts = []
        for case in cases:
            # the long series also runs one worker on one core (the split's per-core scaling)
            these = converters + ([mist_converter(mist_exe, 1, threads=1)]
                                  if case.key == "long" else [])
            results = run_case(case, these, args.repeat, runs_dir, args.keep)
            verdicts.append((case.label, print_case(case, results, these, starts)))
        print(f"\nload average at the end: {load_average()}")
        print("start-up: `--version` (for mist-zarr the interpreter and its imports), median "
              "wall s and peak RSS; peak RSS is that of the largest single process")
        for label, m in verdicts:
            print(f"targets {label}: " + "; ".join(
                f"{k} {'met' if v else 'NOT met'}" for k, v in m.items()))
    finally:
        if args.keep:
            print(f"kept:     {workdir}")
        elif made:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for folder in (tree, runs_dir, long, workdir / "no-pigz"):
                shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
