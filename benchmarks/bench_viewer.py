"""Time to first image in the web viewer: progressive (coarsest level first) vs level 0 at once.

Converts three shared images (the CT series ``ct/CRLM-CT-1004``, one chest
PNG and the 1955 x 1841 CR radiograph ``RG1_J2KR.dcm``), serves them with
``mist_zarr.serve.serve_in_thread(viewer=True)`` and drives the viewer in
headless Chromium (Debian's package, through Playwright). For each image,
network profile and mode it measures, in the page (``performance.now()``):

* **open**: from choosing the series in the catalog (page and WebAssembly
  already loaded) to the first image drawn, and to level 0 drawn;
* **slice**: from moving the slider to another slice (3-D images only) to the
  first image and to level 0.

Modes: **progressive** (the viewer's default: coarsest level, then each finer
level as one Range request continuing the held prefix) and **level 0**
(``?progressive=0``: one request for the whole chunk). Network profiles:
the loopback as it is, and Chromium's network emulation at 20 Mbit/s with
40 ms latency (DevTools ``Network.emulateNetworkConditions``). Each figure is
the median of ``--repeat`` runs, each in a fresh browser context.

Run from the repository root::

    python benchmarks/bench_viewer.py [--data DIR] [--repeat 5] [--chromium PATH]

Needs Chromium (``apt-get install chromium``), Playwright's Python package
(the test/bench extras) and the built viewer (``pip install -e .`` with Node).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_model, package_versions

NETWORKS = {
    "loopback": None,
    "20 Mbit/s, 40 ms": {"offline": False, "latency": 40,
                         "downloadThroughput": 20e6 / 8, "uploadThroughput": 20e6 / 8},
}
MODES = {"progressive": "", "level 0": "?progressive=0"}


def convert_images(data: Path, work: Path) -> Path:
    import mist_zarr

    src = work / "src"
    src.mkdir()
    shutil.copytree(data / "ct" / "CRLM-CT-1004", src / "CRLM-CT-1004")
    png = min((data / "radiographs" / "nih-cxr14-png").glob("*.png"))
    shutil.copy(png, src)
    shutil.copy(data / "radiographs" / "RG1_J2KR.dcm", src)
    dest = work / "dataset"
    report = mist_zarr.convert(src, dest)
    if report.failed:
        raise SystemExit(f"conversion failed: {report.failed}")
    return dest


def measure(browser, url: str, path: str, mode: str, network: dict | None, slider: bool) -> dict:
    """One run in a fresh context: open the series from the catalog, then move the slider."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    try:
        page = context.new_page()
        if network:
            cdp = context.new_cdp_session(page)
            cdp.send("Network.enable")
            cdp.send("Network.emulateNetworkConditions", network)
        page.goto(f"{url}/{MODES[mode]}")
        page.wait_for_selector("table.catalog")
        t0 = page.evaluate(f"(() => {{ const t = performance.now(); location.hash = '#/series/{path}'; return t; }})()")
        page.wait_for_selector('canvas[data-level="0"]', state="attached", timeout=120_000)
        log = page.evaluate("window.mistViewer.log")
        out = {"open first": log[0]["t"] - t0, "open level 0": log[-1]["t"] - t0,
               "first bytes": log[0]["bytes"], "level 0 bytes": sum(e["bytes"] for e in log)}
        if slider:
            n = len(log)
            t1 = page.evaluate("""(() => { const s = document.getElementById('slider-z');
                const t = performance.now(); s.value = '5'; s.dispatchEvent(new Event('input')); return t; })()""")
            page.wait_for_selector('canvas[data-level="0"][data-pos="5"]', state="attached", timeout=120_000)
            log = page.evaluate("window.mistViewer.log")[n:]
            out |= {"slice first": log[0]["t"] - t1, "slice level 0": log[-1]["t"] - t1}
        errors = page.evaluate("window.mistViewer.errors")
        if errors:
            raise RuntimeError(f"{path}: the viewer reported {errors}")
        return out
    finally:
        context.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = os.environ.get("MIST_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--data", default=default_data, help="shared data directory")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (median)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from mist_zarr.catalog import catalog
    from mist_zarr.serve import serve_in_thread

    with tempfile.TemporaryDirectory(prefix="bench-viewer-") as tmp:
        dataset = convert_images(Path(args.data), Path(tmp))
        rows = catalog(dataset, write=False)
        with serve_in_thread(dataset, viewer=True) as srv, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            results = {}
            for _, row in rows.iterrows():
                for net_name, net in NETWORKS.items():
                    for mode in MODES:
                        runs = [measure(browser, srv.url, row["path"], mode, net, len(row["shape"]) == 3)
                                for _ in range(args.repeat)]
                        results[row["path"], net_name, mode] = {
                            key: statistics.median(r[key] for r in runs) for key in runs[0]}
            browser.close()
        report(rows, results, args)


def report(rows, results: dict, args) -> None:
    print(f"# bench_viewer: medians of {args.repeat} runs; {cpu_model()}, {os.cpu_count()} CPUs")
    print("# " + ", ".join(package_versions(["mist-zarr", "playwright"])))
    print("# times in ms from the user's action; the machine is shared, so times are noisy\n")
    print("| image | network | action | first image: progressive | level 0 at once | ratio "
          "| level 0: progressive | level 0 at once | ratio | bytes of first image (prog. / at once) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for _, row in rows.iterrows():
        name = f"{row['modality'] or row['source_format']} {'x'.join(map(str, row['shape']))}"
        for net in NETWORKS:
            prog, full = results[row["path"], net, "progressive"], results[row["path"], net, "level 0"]
            for action in ("open", "slice"):
                if f"{action} first" not in prog:
                    continue
                pf, ff = prog[f"{action} first"], full[f"{action} first"]
                p0, f0 = prog[f"{action} level 0"], full[f"{action} level 0"]
                print(f"| {name} | {net} | {action} | {pf:.0f} | {ff:.0f} | {ff / pf:.1f}x "
                      f"| {p0:.0f} | {f0:.0f} | {f0 / p0:.2f}x "
                      f"| {prog['first bytes'] / 1e3:.1f} kB / {full['first bytes'] / 1e3:.1f} kB |")


if __name__ == "__main__":
    main()
