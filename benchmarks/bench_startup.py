"""Start-up benchmark: the light CLI verbs and a small convert, old code vs new, side by side.

Every command runs as a fresh ``python -c`` process that does what each
checkout's ``mist-zarr`` script does (``mist_zarr.cli.run()``, or
``sys.exit(main())`` before it) with ``PYTHONPATH`` set to the old checkout
(``--old``, required) or to this repository, old and new alternating (the
order swapped every round) for ``--repeat`` rounds:

* ``--help``, ``info IMAGE``, ``ls DATASET``, ``ls DATASET --json``,
  ``ls DATASET --failures`` on a dataset converted once from the shared
  41-slice CT (``ct/CRLM-CT-1004``): time to the first byte of output and to
  exit, and whether old and new print the same bytes;
* ``convert CT DEST -q`` into a fresh folder each run, against ``dcm2niix -z y``
  with no ``pigz`` on PATH (it then compresses in-process), run after the two
  converts in even rounds and before them in odd ones: the target of issue 16
  ("faster than dcm2niix -z y without pigz on every row");
* the same convert with its progress bars: the time to its first output (the
  bar of the source scan), the start-up target of issue 16.

Figures are wall seconds from process start (interpreter start-up included),
medians over the rounds, and the median of the per-round ratios new / old.
Then ``python -X importtime`` of each new command: the time spent importing
(the sum of the top-level imports' cumulative times) and the largest ones.

Run from the repository root::

    git worktree add /tmp/old COMMIT
    python benchmarks/bench_startup.py --old /tmp/old [--data DIR] [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _machine import cpu_model, package_versions
from bench_convert import find_dcm2niix

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("MIST_DATA", REPO.parent / "shared" / "data"))
CT = "ct/CRLM-CT-1004"
MAIN = ("import sys, mist_zarr.cli as cli\n"
        "cli.run() if hasattr(cli, 'run') else sys.exit(cli.main())")
PACKAGES = ("zarr", "numpy", "imagecodecs", "pyarrow", "pandas", "pydicom", "dcm2niix")


@dataclass
class Timing:
    first: list[float] = field(default_factory=list)  # s to the first byte of output
    wall: list[float] = field(default_factory=list)  # s to exit
    outputs: set[bytes] = field(default_factory=set)


def run(argv: list[str], env: dict[str, str] | None) -> tuple[float, float, bytes]:
    """``(s to first output byte, s to exit, output)`` of one run; fails if it fails."""
    t0 = time.perf_counter()
    # cwd: `python -c` puts the working directory first on sys.path, before PYTHONPATH
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            cwd=tempfile.gettempdir())
    head = proc.stdout.read(1)
    first = time.perf_counter() - t0
    out = head + proc.stdout.read()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {rc}:\n{out.decode(errors='replace')}")
    return first, wall, out


def code_env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root)}


def mist(*args: str) -> list[str]:
    return [sys.executable, "-c", MAIN, *args]


def run_dcm2niix(exe: str, src: Path, dest: Path, no_pigz: Path) -> float:
    """Wall s of ``dcm2niix -z y`` into a fresh ``dest``, no pigz on PATH."""
    dest.mkdir()
    _, wall, _ = run([exe, "-z", "y", "-o", str(dest), str(src)],
                     {**os.environ, "PATH": str(no_pigz)})
    shutil.rmtree(dest)
    return wall


def import_time(args: list[str], env: dict[str, str],
                code: str = MAIN) -> tuple[float, list[tuple[str, float]]]:
    """Seconds spent importing during ``mist-zarr ARGS`` (top-level imports' cumulative
    times from ``-X importtime``) and the five largest of them."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code, *args], env=env,
                          capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    top = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        name = name[1:]  # one space after the bar; nested imports are indented further
        if not name.startswith(" "):
            top.append((name.strip(), int(cumulative) / 1e6))
    return sum(s for _, s in top), sorted(top, key=lambda t: -t[1])[:5]


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--old", type=Path, required=True,
                        help="a checkout of the code to compare with, e.g. one made with "
                             "`git worktree add /tmp/old COMMIT`")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    src = args.data / CT
    if not src.is_dir():
        raise SystemExit(f"{src}: not found (the shared data; --data DIR)")
    work = Path(tempfile.mkdtemp(prefix="bench-startup-", dir=args.workdir))
    if args.old.resolve() == REPO:
        raise SystemExit(f"--old {args.old} is this checkout: give another one to compare with")
    old, new = code_env(args.old.resolve()), code_env(REPO)
    dcm2niix = find_dcm2niix()
    no_pigz = work / "empty-path"
    no_pigz.mkdir()
    print(f"CPU {cpu_model()}, {os.cpu_count()} cores; {', '.join(package_versions(PACKAGES))}")
    print(f"old = {args.old.resolve()}, new = {REPO}; {args.repeat} rounds; load {load()}")

    dataset = work / "dataset"
    run(mist("convert", str(src), str(dataset), "-q"), new)
    image = next(str(p.parent.parent) for p in dataset.rglob("index/zarr.json"))
    commands = {
        "--help": ["--help"],
        "info IMAGE": ["info", image],
        "ls DATASET": ["ls", str(dataset)],
        "ls DATASET --json": ["ls", str(dataset), "--json"],
        "ls DATASET --failures": ["ls", str(dataset), "--failures"],
        "convert 41 slices": None,  # a fresh DEST each run, -q: nothing before the summary
        "convert 41 slices, with progress": None,  # first output: the scan's progress bar
    }
    timings = {(name, code): Timing() for name in commands for code in ("old", "new")}
    dcm = Timing()
    for r in range(args.repeat):
        order = [("old", old), ("new", new)] if r % 2 == 0 else [("new", new), ("old", old)]
        for name, argv in commands.items():
            if name == "convert 41 slices" and r % 2:
                dcm.wall.append(run_dcm2niix(dcm2niix, src, work / f"dcm2niix-{r}", no_pigz))
            for code, env in order:
                if argv is None:
                    dest = work / f"convert-{r}-{code}"
                    quiet = [] if name.endswith("progress") else ["-q"]
                    first, wall, _ = run(mist("convert", str(src), str(dest), *quiet), env)
                    shutil.rmtree(dest)
                    out = b""
                else:
                    first, wall, out = run(mist(*argv), env)
                t = timings[name, code]
                t.first.append(first)
                t.wall.append(wall)
                t.outputs.add(out)
            if name == "convert 41 slices" and not r % 2:  # dcm2niix after, then before
                dcm.wall.append(run_dcm2niix(dcm2niix, src, work / f"dcm2niix-{r}", no_pigz))
    print(f"load after the runs: {load()}\n")

    med = statistics.median
    print("| command | old: first output | old: exit | new: first output | new: exit "
          "| new / old (median of rounds) | same output |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, argv in commands.items():
        o, n = timings[name, "old"], timings[name, "new"]
        ratio = med(b / a for a, b in zip(o.wall, n.wall))
        same = "n/a (timed)" if argv is None else \
            ("yes" if len(o.outputs | n.outputs) == 1 else "NO")
        print(f"| `mist-zarr {name}` | {med(o.first):.2f} | {med(o.wall):.2f} | "
              f"{med(n.first):.2f} | {med(n.wall):.2f} | {ratio:.2f} | {same} |")
    conv = timings["convert 41 slices", "new"]
    print(f"| `dcm2niix -z y` (no pigz), 41 slices | | | | {med(dcm.wall):.2f} | | |")
    print(f"\nconvert 41 slices, new / dcm2niix -z y (median of rounds): "
          f"{med(a / b for a, b in zip(conv.wall, dcm.wall)):.2f}; per round (s): "
          + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(conv.wall, dcm.wall)))

    print("\nimport time of the new code (python -X importtime; top-level cumulative):")
    for name, argv in commands.items():
        if name.endswith("progress"):
            continue
        if argv is None:
            dest = work / "convert-importtime"
            argv = ["convert", str(src), str(dest), "-q"]
        total, top = import_time(argv, new)
        print(f"  mist-zarr {name}: {total:.3f} s  ("
              + ", ".join(f"{m} {s:.3f}" for m, s in top) + ")")
    # what convert loads before its scan starts (the bar is drawn once the files are listed)
    total, top = import_time([], new, "import mist_zarr.cli, mist_zarr.convert, tqdm.auto")
    print(f"  mist-zarr convert, before its scan: {total:.3f} s  ("
          + ", ".join(f"{m} {s:.3f}" for m, s in top) + ")")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
