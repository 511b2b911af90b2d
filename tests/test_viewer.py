"""The web viewer in a real browser: headless Chromium (Debian's package) driven by Playwright.

The dataset is converted from the shared real data (a CT series and a chest
PNG); the bundled server runs on 127.0.0.1 with the viewer. What the page
shows is compared with a server-side rendering of the same level and window
(mist_zarr.viewer.render_plane), and what it transfers with the server's
byte counter.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import urllib.error
import urllib.request
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mist_zarr
from mist_zarr.catalog import catalog
from mist_zarr.serve import serve_in_thread
from mist_zarr.viewer import BUNDLE_DIR, render_plane, viewer_status

from .conftest import shared

CT = "CRLM-CT-1004/19941122-CT_CH_ABD_PEL_W_CONTRAST/2-CT_CH_AB_PEL-0c62e737"
PNG = "00000075_000"


def chromium_executable() -> str:
    """The system Chromium (MIST_CHROMIUM overrides), or a skip saying how to get one."""
    for name in (os.environ.get("MIST_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    pytest.skip("no Chromium found: install Debian's `chromium` package "
                "(.ci/run does: apt-get install -y chromium) or set MIST_CHROMIUM")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")
    executable = chromium_executable()
    if not (BUNDLE_DIR / "viewer.js").is_file():
        if shutil.which("npm") is None:
            pytest.skip("the viewer bundle is not built and Node/npm is missing to build it")
        pytest.fail(f"the viewer bundle is not built in {BUNDLE_DIR}: run `pip install -e .` "
                    "(which runs npm ci + esbuild) or `npm ci && npm run build` in mist_zarr/web")
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("viewer-src")
    shutil.copytree(shared("ct", "CRLM-CT-1004"), src / "CRLM-CT-1004")
    shutil.copy(shared("radiographs", "nih-cxr14-png", f"{PNG}.png"), src)
    dest = tmp_path_factory.mktemp("viewer") / "dataset"
    report = mist_zarr.convert(src, dest)
    assert not report.failed, report.failed
    return dest


@pytest.fixture(scope="module")
def server(dataset: Path):
    with serve_in_thread(dataset, viewer=True) as srv:
        yield srv


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 900}, device_scale_factor=1)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, errors


def open_series(page, server, path: str, query: str = "", level: int = 0, pos: str = "") -> None:
    page.goto(f"{server.url}/{query}#/series/{path}")
    selector = f'canvas[data-level="{level}"]' + (f'[data-pos="{pos}"]' if pos else "")
    page.wait_for_selector(selector, state="attached", timeout=60_000)
    assert page.evaluate("window.mistViewer.errors") == []


def canvas_pixels(page) -> np.ndarray:
    """The canvas's pixels (lossless PNG from toDataURL), RGB."""
    url = page.evaluate("document.getElementById('view').toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def shown_window(page) -> tuple[float, float]:
    data = page.evaluate("Object.assign({}, document.getElementById('view').dataset)")
    return float(data["center"]), float(data["width"])


def test_page_lists_the_dataset(page, server, dataset):
    page.goto(server.url + "/")
    page.wait_for_selector("table.catalog")
    rows = page.eval_on_selector_all("table.catalog tbody tr", "rs => rs.map(r => [r.dataset.path, r.innerText])")
    expected = catalog(dataset, write=False)
    assert [r[0] for r in rows] == list(expected["path"])
    text = dict(rows)
    assert "CRLM-CT-1004" in text[CT] and "\tCT\t" in text[CT] and "41 x 512 x 512" in text[CT]
    assert f"\t{expected.set_index('path').loc[CT, 'levels']}\t" in text[CT]
    assert "1024 x 1024" in text[PNG] and "png" in text[PNG]
    page.click(f'tr[data-path="{CT}"] a')
    page.wait_for_selector('canvas[data-level="0"]', state="attached", timeout=60_000)
    assert page.input_value("#slider-z") == "20"


def test_catalog_json(server, dataset):
    # the page reads the catalog every client reads (mist_zarr.http_view)
    with urllib.request.urlopen(server.url + "/catalog.json") as resp:
        records = json.load(resp)["images"]
    expected = catalog(dataset, write=False)
    assert [r["path"] for r in records] == list(expected["path"])
    assert [r["bytes_per_level"] for r in records] == list(expected["bytes_per_level"])


@pytest.mark.parametrize("path, pos", [(CT, (20,)), (PNG, ())])
def test_every_level_matches_server_rendering(page, server, dataset, path, pos):
    levels = mist_zarr.open(dataset / path).attrs["levels"]
    for k in range(levels, -1, -1):
        open_series(page, server, path, f"?finest={k}", level=k)
        shown = canvas_pixels(page)
        center, width = shown_window(page)
        expected = render_plane(dataset / path, k, pos, center, width)
        assert shown.shape[:2] == expected.shape, (k, shown.shape, expected.shape)
        mad = np.abs(shown[..., 0].astype(float) - expected).mean()
        assert mad < 1.0, (path, k, mad)
        assert (shown[..., 0] == shown[..., 1]).all()


def test_ct_presets_use_the_stored_rescale(page, server, dataset):
    open_series(page, server, CT)
    # the stored DICOM window first: WindowCenter 40, WindowWidth 400 (HU)
    assert shown_window(page) == (40.0, 400.0)
    page.select_option("#preset", label="Lung (-600 / 1500)")
    assert shown_window(page) == (-600.0, 1500.0)
    expected = render_plane(dataset / CT, 0, (20,), -600.0, 1500.0)
    assert np.abs(canvas_pixels(page)[..., 0].astype(float) - expected).mean() < 1.0
    # the intercept matters: a stored 0 is -1024 HU, black in the lung window
    assert expected.min() == 0 and (canvas_pixels(page)[..., 0] == 0).any()


def test_radiograph_window_is_the_data_percentiles(page, server, dataset):
    open_series(page, server, PNG)
    coarsest = np.sort(np.asarray(mist_zarr.open(dataset / PNG, scale=4).values, float).ravel())

    def at(q: float) -> float:
        return coarsest[int(np.floor(q * (coarsest.size - 1) + 0.5))]

    lo, hi = at(0.01), at(0.99)
    assert shown_window(page) == pytest.approx(((lo + hi) / 2, hi - lo))


def test_screenshot_matches_at_full_size(page, server, dataset):
    open_series(page, server, CT)
    page.select_option("#zoom", "1")
    shot = np.asarray(Image.open(io.BytesIO(page.locator("#view").screenshot())).convert("L"))
    center, width = shown_window(page)
    expected = render_plane(dataset / CT, 0, (20,), center, width)
    assert shot.shape == expected.shape
    assert np.abs(shot.astype(float) - expected).mean() < 1.0


def index_row(dataset: Path, path: str, chunk: tuple[int, ...]) -> list[int]:
    import zarr

    index = zarr.open_array(dataset / path / "index", mode="r")[...]
    return [int(v) for v in index[chunk]]


@pytest.mark.parametrize("path, chunk, slider", [(CT, (5, 0, 0), "5"), (PNG, (0, 0), None)])
def test_refinement_transfers_the_chunk_once(page, server, dataset, path, chunk, slider):
    prefixes = index_row(dataset, path, chunk)  # bytes of level 0, 1, ..., n
    if slider:
        open_series(page, server, path)  # metadata, index and the middle slice
        server.reset_counters()
        page.fill("#slider-z", slider)
        page.wait_for_selector(f'canvas[data-level="0"][data-pos="{slider}"]', state="attached")
    else:
        page.goto(server.url + "/")
        page.wait_for_selector("table.catalog")
        server.reset_counters()
        page.click(f'tr[data-path="{path}"] a')
        page.wait_for_selector('canvas[data-level="0"]', state="attached", timeout=60_000)
    key = f"/{path}/image/c/" + "/".join(map(str, chunk))
    chunk_requests = sorted((r for r in server.requests if r.path == key),
                            key=lambda r: int(r.range_header.split("=")[1].split("-")[0]))
    # one request per level, n, n-1, ..., 0, each continuing the previous
    # one's range (sent at once, so they may arrive in any order); level k > 0
    # reaches two bytes past its prefix, checked for FF 90 (SOT) before decoding
    bounds = [0] + [p + 2 for p in prefixes[:0:-1]] + [prefixes[0]]
    assert [(r.status, r.range_header, r.body_len) for r in chunk_requests] == [
        (206, f"bytes={a}-{b - 1}", b - a) for a, b in pairwise(bounds)
    ]
    assert sum(r.body_len for r in chunk_requests) == prefixes[0]
    if slider:  # nothing but the chunk was transferred
        assert server.bytes_sent == prefixes[0]
        server.reset_counters()
        page.fill("#slider-z", "20")  # back to a slice held in full: no request
        page.wait_for_selector('canvas[data-level="0"][data-pos="20"]', state="attached")
        assert server.bytes_sent == 0
    log = page.evaluate("window.mistViewer.log")
    mine = [e for e in log if e["pos"] == [int(c) for c in chunk[:-2]]][-len(prefixes):]
    assert [e["level"] for e in mine] == list(range(len(prefixes) - 1, -1, -1))
    assert [e["bytes"] for e in mine] == [b - a for a, b in pairwise(bounds)]


def test_a_damaged_index_is_reported(page, server, dataset, tmp_path):
    """A prefix that does not end at a tile-part boundary is an error on the page, not an image."""
    bad = tmp_path / "bad"
    shutil.copytree(dataset / PNG, bad / PNG)
    import zarr

    index = zarr.open_array(bad / PNG / "index", mode="r+")
    row = index[0, 0]
    row[2] -= 1  # level 2 one byte short: decodes without error into a wrong image
    index[0, 0] = row
    with serve_in_thread(bad, viewer=True) as srv:
        page.goto(f"{srv.url}/#/series/{PNG}")
        page.wait_for_selector("p.error", timeout=60_000)
        message = page.inner_text("p.error")
    assert "FF 90" in message and "image/c/0/0" in message and "level-2 prefix" in message
    # levels 4 and 3 were shown; level 2 was refused before it was decoded
    assert page.evaluate("document.getElementById('view').dataset.level") == "3"


def test_without_the_bundle_the_page_says_how_to_build_it(dataset, monkeypatch, tmp_path):
    from mist_zarr import viewer

    monkeypatch.setattr(viewer, "BUNDLE_DIR", tmp_path)
    assert "npm" in viewer.viewer_status()
    with serve_in_thread(dataset, viewer=True) as srv, urllib.request.urlopen(srv.url + "/") as resp:
        html = resp.read().decode()
    assert "not built" in html and "npm ci" in html


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("viewer", [True, False])
def test_cli_serve_announces_and_serves_the_viewer(dataset, viewer):
    import subprocess
    import sys
    import time

    port = free_port()
    cmd = [sys.executable, "-m", "mist_zarr.cli", "serve", str(dataset), "--port", str(port)]
    proc = subprocess.Popen(cmd + ([] if viewer else ["--no-viewer"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        status = None
        for _ in range(200):  # at most ~20 s for the server to come up
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/") as resp:
                    status, body = resp.status, resp.read().decode()
                break
            except urllib.error.HTTPError as exc:
                status, body = exc.code, ""
                break
            except OSError:
                time.sleep(0.1)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    if viewer:
        assert status == 200 and "_viewer/viewer.js" in body
        assert viewer_status() in out
    else:
        assert status == 404 and "viewer" not in out


def test_viewer_request_pattern_under_load(server, dataset):
    """16 clients refining random CT slices the viewer's way, plus hostile viewer URLs."""
    import http.client
    import random
    from concurrent.futures import ThreadPoolExecutor

    import zarr

    index = zarr.open_array(dataset / CT / "index", mode="r")[...]
    port = int(server.url.rsplit(":", 1)[1])

    def get(path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        return resp.status, body

    def refine(i: int) -> tuple[str, list[tuple[int, bytes]]]:
        rnd = random.Random(i)
        if rnd.random() < 0.25:
            path = rnd.choice(["/_viewer/../zarr.json", "/_viewer/%2e%2e/catalog.json",
                               "/_viewer/..%2fcatalog.parquet", "/_viewer/viewer.js.map",
                               "/_viewer/", "/_viewer/index.html/x"])
            return path, [get(path, {})]
        z = rnd.randrange(index.shape[0])
        p = [int(v) for v in index[z, 0, 0]]
        bounds = [0] + [v + 2 for v in p[:0:-1]] + [p[0]]
        path = f"/{CT}/image/c/{z}/0/0"
        with ThreadPoolExecutor(len(bounds) - 1) as parts:  # the viewer sends them at once
            return path, list(parts.map(lambda ab: get(path, {"Range": f"bytes={ab[0]}-{ab[1] - 1}"}),
                                        pairwise(bounds)))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(refine, range(200)))
    for path, answers in results:
        if path.startswith("/_viewer/"):
            assert [status for status, _ in answers] in ([403], [404]), path
            continue
        assert all(status == 206 for status, _ in answers)
        assert b"".join(body for _, body in answers) == (dataset / path.lstrip("/")).read_bytes()
