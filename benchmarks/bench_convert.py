"""Conversion benchmark: ``mist-zarr convert`` vs ``dcm2niix -z y``, side by side.

Two inputs:

(a) the shared CT series ``ct/CRLM-CT-1004`` (41 slices, 512 x 512 int16,
    uncompressed DICOM);
(b) a synthetic tree of ``--copies`` copies each of ``ct/CRLM-CT-1004`` and
    ``ct/CRLM-CT-1006``, laid out as ``tree/copyNN/<series>/*.dcm``. Every copy
    is a distinct series: pydicom rewrites StudyInstanceUID, SeriesInstanceUID
    and SOPInstanceUID (and MediaStorageSOPInstanceUID) deterministically per
    copy (``generate_uid(entropy_srcs=[original UID, copy number])``) and
    suffixes PatientID with the copy number; pixel data is untouched.

For each input the two converters run alternately (A B A B ...) for
``--repeat`` rounds, each run into a fresh output directory:

* A: ``mist-zarr convert IN OUT -q`` (default thread count: all cores);
* B: ``dcm2niix -z y -o OUT IN`` (plain conversion; dcm2niix searches
  sub-folders to depth 5 by default, so the tree converts whole).

Each run starts in a fresh ``python -c`` wrapper that launches the command and
reports its wall time, the CPU time (user + system) of all its processes, and
``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the peak resident set of the largest
single process the command ran (not the sum over processes; dcm2niix may
hand compression to a ``pigz`` child, the script says whether pigz is on PATH).
The wrapper's own interpreter start-up is outside the timed span. Input
files are read once before timing, so every run reads from the page cache.

Output size is the sum of file sizes under OUT: everything for mist-zarr, and
for dcm2niix the ``.nii.gz`` images with and without the ``.json`` sidecars.
The targets are mist-zarr faster than dcm2niix (median wall time) and at
least 1.4x smaller output than the ``.nii.gz`` images alone (the stricter of
the two dcm2niix sizes). Each run is checked: exit status 0 and one output
image per series; for (a) the mist-zarr image read back with
``mist_zarr.read_image`` must equal the pydicom ``pixel_array`` stack of the
input sorted by ImagePositionPatient z.

Run from the repository root::

    python benchmarks/bench_convert.py [--data DIR] [--copies 10] [--repeat 3]
                                       [--workdir DIR] [--keep]

Needs ``dcm2niix`` (from PyPI, in the test extra). About 2 minutes on a
2-core machine with the defaults.
"""

from __future__ import annotations

import argparse
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
TARGET_WALL = 1.0  # mist-zarr wall / dcm2niix wall must be below this
TARGET_SIZE = 1.4  # dcm2niix .nii.gz bytes / mist-zarr bytes must be at least this
MB = 1e6
MIST = "mist-zarr convert"
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


def mist_converter(exe: str) -> Converter:
    return Converter(
        MIST,
        lambda src, out: [exe, "convert", str(src), str(out), "-q"],
        makes_out=True,
        images=lambda out: len(mist_zarr.list_images(out)),
        sizes=lambda out: {"all": file_sizes(out)},
    )


def dcm2niix_converter(exe: str) -> Converter:
    def sizes(out: Path) -> dict[str, int]:
        nii = file_sizes(out, ".nii.gz")
        return {"all": nii + file_sizes(out, ".json"), "images": nii}

    return Converter(
        "dcm2niix -z y",
        lambda src, out: [exe, "-z", "y", "-o", str(out), str(src)],
        makes_out=False,
        images=lambda out: sum(1 for _ in out.rglob("*.nii.gz")),
        sizes=sizes,
    )


# -- measuring ------------------------------------------------------------------------


@dataclass
class Run:
    wall: float
    cpu: float
    peak_mb: float
    images: int = 0
    sizes: dict[str, int] = field(default_factory=dict)


def measure(cmd: Sequence[str], log: Path, check: bool = True) -> Run:
    """Run ``cmd`` in a fresh wrapper process; fail loudly if it fails (and ``check``)."""
    done = subprocess.run([sys.executable, "-c", WRAPPER, json.dumps(list(cmd)), str(log)],
                          check=True, capture_output=True, text=True)
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
    check: Callable[[Path], None] | None = None  # reads back the first mist-zarr output


def run_case(case: Case, converters: Sequence[Converter], repeat: int, runs_dir: Path,
             keep: bool) -> dict[str, list[Run]]:
    """Alternate the converters for ``repeat`` rounds, checking every output."""
    results: dict[str, list[Run]] = {c.name: [] for c in converters}
    for r in range(repeat):
        for conv in converters:
            out = runs_dir / f"{case.key}-{r}-{conv.name.split()[0]}"
            if not conv.makes_out:
                out.mkdir(parents=True)
            run = measure(conv.command(case.src, out), out.with_suffix(".log"))
            run.images = conv.images(out)
            if run.images != case.series:
                raise AssertionError(f"{conv.name} wrote {run.images} images for {case.series} "
                                     f"series ({out})")
            if r == 0 and conv.name == MIST and case.check is not None:
                case.check(out)
            run.sizes = conv.sizes(out)
            results[conv.name].append(run)
            if not keep:
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
    for copy in range(1, copies + 1):
        for series in TREE_SERIES:
            dest = root / f"copy{copy:02d}" / Path(series).name
            dest.mkdir(parents=True)
            for path in dicom_files(data / series):
                ds = pydicom.dcmread(path)
                ds.StudyInstanceUID = copy_uid(ds.StudyInstanceUID, copy)
                ds.SeriesInstanceUID = copy_uid(ds.SeriesInstanceUID, copy)
                ds.SOPInstanceUID = copy_uid(ds.SOPInstanceUID, copy)
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.PatientID = f"{ds.PatientID}-{copy:02d}"
                ds.save_as(dest / path.name)
                files += 1
    return files


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
    mist_runs, dcm_runs = (results[c.name] for c in converters)
    print(f"\n=== {case.label}: {case.series} series, {case.files} files, "
          f"{mb(case.bytes_in)} MB of DICOM in, {len(mist_runs)} runs each")
    print("| converter | wall s, median (min-max) | CPU s | peak RSS MB | output MB "
          "| images | start-up s, MB |")
    print("|---|---|---|---|---|---|---|")
    for conv in converters:
        runs = results[conv.name]
        out = one_size(runs, "all")
        nii = one_size(runs, "images") if "images" in runs[0].sizes else None
        shown = f"{mb(out)} (.nii.gz {mb(nii)})" if nii is not None else mb(out)
        print(f"| {conv.name} | {span([r.wall for r in runs])} "
              f"| {statistics.median(r.cpu for r in runs):.2f} "
              f"| {statistics.median(r.peak_mb for r in runs):.0f} "
              f"| {shown} | {runs[0].images} | {starts[conv.name][0]:.2f}, "
              f"{starts[conv.name][1]:.0f} |")
    wall = statistics.median(r.wall for r in mist_runs) / statistics.median(
        r.wall for r in dcm_runs)
    pairwise = statistics.median(a.wall / b.wall for a, b in zip(mist_runs, dcm_runs))
    best = min(r.wall for r in mist_runs) / min(r.wall for r in dcm_runs)
    mist_out = one_size(mist_runs, "all")
    size_nii = one_size(dcm_runs, "images") / mist_out
    size_all = one_size(dcm_runs, "all") / mist_out
    met = {"wall": wall < TARGET_WALL, "size": size_nii >= TARGET_SIZE}
    verdict = {True: "met", False: "NOT met"}
    print(f"wall mist-zarr / dcm2niix: {wall:.2f} (median of pairwise ratios {pairwise:.2f}, "
          f"best / best {best:.2f}); target < {TARGET_WALL:g}: {verdict[met['wall']]}")
    print(f"size dcm2niix / mist-zarr: {size_nii:.3f} (.nii.gz only), {size_all:.3f} "
          f"(with .json); target >= {TARGET_SIZE:g}: {verdict[met['size']]}")
    print(f"lossless ratio, DICOM in / output: mist-zarr {case.bytes_in / mist_out:.2f}, "
          f"dcm2niix {case.bytes_in / one_size(dcm_runs, 'images'):.2f} (.nii.gz)")
    return met


# -- main -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="shared data directory (default: ../shared/data or $MIST_DATA)")
    parser.add_argument("--copies", type=int, default=10,
                        help="copies of each of the two CT series in the tree (default: 10)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per converter and input")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to build the tree and write outputs (default: a temporary "
                             "directory); what the script writes there is removed at the end")
    parser.add_argument("--keep", action="store_true",
                        help="keep the tree and every output (default: remove them)")
    args = parser.parse_args(argv)
    if not all((args.data / s).is_dir() for s in TREE_SERIES):
        raise SystemExit(f"shared CT series not found under {args.data} (set MIST_DATA or --data)")
    if args.repeat < 1 or args.copies < 1:
        raise SystemExit("--repeat and --copies must be at least 1")

    mist_exe, dcm2niix_exe = find_mist_zarr(), find_dcm2niix()
    converters = (mist_converter(mist_exe), dcm2niix_converter(dcm2niix_exe))
    print_environment(dcm2niix_exe)
    for conv in converters:
        print(f"run:      {shlex.join(conv.command(Path('IN'), Path('OUT')))}")

    made = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="mist-bench-convert-")) if made else args.workdir
    tree, runs_dir = workdir / "tree", workdir / "runs"
    if tree.exists() or runs_dir.exists():
        raise SystemExit(f"{tree} or {runs_dir} exists; choose an empty --workdir")
    print(f"workdir:  {workdir}")
    try:
        runs_dir.mkdir(parents=True)
        single = args.data / SINGLE
        t0 = time.perf_counter()
        files = build_tree(args.data, args.copies, tree)
        print(f"tree:     {args.copies} copies x {len(TREE_SERIES)} series, {files} files, "
              f"built in {time.perf_counter() - t0:.1f} s")
        cases = [
            Case("single", f"(a) {SINGLE}", single, 1, len(dicom_files(single)), warm_cache(single),
                 check_roundtrip(single)),
            Case("tree", f"(b) tree of {args.copies} x {len(TREE_SERIES)} series", tree,
                 args.copies * len(TREE_SERIES), files, warm_cache(tree)),
        ]
        log = runs_dir / "startup.log"
        starts = {converters[0].name: startup([mist_exe, "--version"], args.repeat, log),
                  converters[1].name: startup([dcm2niix_exe, "--version"], args.repeat, log)}
        verdicts = []
        for case in cases:
            results = run_case(case, converters, args.repeat, runs_dir, args.keep)
            verdicts.append((case.label, print_case(case, results, converters, starts)))
        print(f"\nload average at the end: {load_average()}")
        print("start-up: `--version` (for mist-zarr the interpreter and its imports), median "
              "wall s and peak RSS; peak RSS is that of the largest single process")
        print("targets (faster; >= 1.4x smaller than .nii.gz): " + "; ".join(
            f"{label}: wall {'met' if m['wall'] else 'NOT met'}, "
            f"size {'met' if m['size'] else 'NOT met'}" for label, m in verdicts))
    finally:
        if args.keep:
            print(f"kept:     {workdir}")
        elif made:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            shutil.rmtree(tree, ignore_errors=True)
            shutil.rmtree(runs_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
