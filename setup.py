"""Build hook: the web viewer's bundle is built with npm + esbuild when the package is built.

Everything else is configured in pyproject.toml. ``build_py`` (which both
``pip install -e .`` and wheel builds run) runs ``npm ci`` and ``npm run
build`` in ``mist_zarr/web`` when the bundle is missing or older than its
sources, so that a wheel carries ``mist_zarr/web/dist`` and installing a
wheel needs no Node. Without Node/npm (or with MIST_ZARR_SKIP_VIEWER=1) the
build goes on without the viewer and says so; ``mist-zarr serve`` then
explains how to get it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

WEB = Path(__file__).resolve().parent / "mist_zarr" / "web"
BUNDLE = WEB / "dist" / "viewer.js"
SOURCES = ["package.json", "package-lock.json", "build.mjs", "src"]


def _newest(paths: list[Path]) -> float:
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return max((f.stat().st_mtime for f in files), default=0.0)


def _warn(message: str) -> None:
    print(f"mist-zarr: {message}", file=sys.stderr, flush=True)


def build_viewer() -> None:
    """Run npm ci + the esbuild script unless the bundle is current; warn instead of failing."""
    if os.environ.get("MIST_ZARR_SKIP_VIEWER") == "1" or not (WEB / "package.json").is_file():
        return
    if BUNDLE.is_file() and BUNDLE.stat().st_mtime >= _newest([WEB / s for s in SOURCES]):
        return
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        _warn("Node.js/npm not found: installing without the web viewer "
              "(install Node >= 20 and reinstall to get it)")
        return
    lock = WEB / "node_modules" / ".package-lock.json"
    steps = [[npm, "run", "build"]]
    if not lock.is_file() or lock.stat().st_mtime < (WEB / "package-lock.json").stat().st_mtime:
        steps.insert(0, [npm, "ci", "--no-audit", "--no-fund"])
    for cmd in steps:
        result = subprocess.run(cmd, cwd=WEB, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            _warn(f"`{' '.join(cmd[1:])}` in {WEB} failed, installing without the web viewer:\n"
                  + (result.stderr or result.stdout)[-2000:])
            return


class BuildPyWithViewer(build_py):
    def run(self) -> None:
        build_viewer()  # before build_py collects package data, so dist/ is included
        super().run()


setup(cmdclass={"build_py": BuildPyWithViewer})
