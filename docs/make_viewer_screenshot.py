"""Regenerate docs/viewer.png: ``python docs/make_viewer_screenshot.py [--data DIR]``.

Converts the shared CT series CRLM-CT-1004 and one chest PNG, serves them
with the viewer and photographs the CT series in headless Chromium.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import mist_zarr
from mist_zarr.serve import serve_in_thread

OUT = Path(__file__).resolve().parent / "viewer.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("MIST_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--data", default=default)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    data = Path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(data / "ct" / "CRLM-CT-1004", src / "CRLM-CT-1004")
        shutil.copy(min((data / "radiographs" / "nih-cxr14-png").glob("*.png")), src)
        mist_zarr.convert(src, Path(tmp) / "dataset")
        path = next(p for p in mist_zarr.catalog(Path(tmp) / "dataset")["path"] if p.startswith("CRLM"))
        with serve_in_thread(Path(tmp) / "dataset", viewer=True) as srv, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.goto(f"{srv.url}/#/series/{path}")
            page.wait_for_selector('canvas[data-level="0"]', state="attached", timeout=60_000)
            page.fill("#slider-z", "24")
            page.wait_for_selector('canvas[data-level="0"][data-pos="24"]', state="attached")
            page.screenshot(path=str(OUT))
            browser.close()
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
