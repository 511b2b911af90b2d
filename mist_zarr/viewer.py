"""The web viewer's routes for ``mist-zarr serve``: the page and its bundle.

The page's source lives in ``mist_zarr/web/`` (``package.json``,
``src/``); ``npm ci`` + esbuild build it into ``mist_zarr/web/dist/`` when
the package is built or installed (see ``setup.py``). A wheel carries the
built files, so installing from a wheel needs no Node. Where the bundle is
missing, ``/`` answers with a page saying how to build it, and
:func:`viewer_status` says the same on the console.

Routes (all GET, read-only):

* ``/`` -- the viewer page;
* ``/_viewer/<file>`` -- the bundle (JavaScript, WebAssembly, CSS).

The page lists the images from ``/catalog.json``, the dataset catalog that
:mod:`mist_zarr.http_view` serves to every client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from .access import open as open_level

__all__ = [
    "BUNDLE_DIR",
    "PREFIX",
    "add_viewer_routes",
    "render_plane",
    "viewer_status",
]

WEB_DIR = Path(__file__).resolve().parent / "web"
BUNDLE_DIR = WEB_DIR / "dist"
PREFIX = "/_viewer"
# The files the page needs; anything else under /_viewer/ is 404.
_ASSETS = {
    "viewer.js": "text/javascript",
    "viewer.css": "text/css",
    "openjphjs.wasm": "application/wasm",
}
_BUILD_HINT = (
    "the web viewer is not built: install Node.js >= 20 with npm and reinstall "
    "(pip install -e . runs `npm ci` and esbuild), or run `npm ci && npm run build` "
    f"in {WEB_DIR}"
)


def viewer_status() -> str:
    """One line for the console: where the viewer is, or how to build it."""
    if (BUNDLE_DIR / "viewer.js").is_file():
        return "web viewer at / (catalog, slices, progressive refinement)"
    return _BUILD_HINT


def render_plane(
    source: Any, level: int, pos: tuple[int, ...], center: float, width: float
) -> np.ndarray:
    """The viewer's grey image of one plane, computed server-side: uint8 (y, x) or (y, x, 3).

    The same rule as the page (``web/src/display.js``): values as
    :func:`mist_zarr.open` returns them at ``level``; for CT, times the DICOM
    rescale slope plus intercept (HU); ``round(255 * clip((x - (center -
    width / 2)) / width, 0, 1))``; inverted for MONOCHROME1. ``pos`` indexes
    the axes before ``y``.
    """

    image = open_level(source, scale=level)
    plane = np.asarray(image[tuple(pos)].values, dtype=np.float64)
    meta = image.attrs["metadata"]
    dicom = meta.get("dicom", {})

    def number(tag: str) -> float | None:
        value = (dicom.get(tag) or {}).get("Value") or [None]
        return value[0] if isinstance(value[0], (int, float)) else None

    modality = meta.get("modality") or ((dicom.get("00080060") or {}).get("Value") or [""])[0]
    slope, intercept = number("00281053"), number("00281052")
    if modality == "CT" and slope is not None and intercept is not None:
        plane = plane * slope + intercept
    grey = np.floor(255 * np.clip((plane - (center - width / 2)) / width, 0, 1) + 0.5)
    photometric = meta.get("photometric") or ((dicom.get("00280004") or {}).get("Value") or [""])[0]
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return grey[..., :3].astype(np.uint8) if grey.ndim == 3 else grey.astype(np.uint8)


def add_viewer_routes(app: web.Application, root: Path) -> None:
    """Register the viewer's routes on app; call before the catch-all file route."""

    async def page(request: web.Request) -> web.Response:
        html = (WEB_DIR / "index.html").read_text(encoding="utf-8")
        if not (BUNDLE_DIR / "viewer.js").is_file():
            html = html.replace("<!--status-->", f"<p class=error>{_BUILD_HINT}</p>")
        return web.Response(text=html, content_type="text/html")

    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in _ASSETS or not (BUNDLE_DIR / name).is_file():
            raise web.HTTPNotFound(text=f"{PREFIX}/{name}: no such viewer file ({viewer_status()})")
        return web.FileResponse(BUNDLE_DIR / name, headers={"Content-Type": _ASSETS[name]})

    app.router.add_get("/", page)
    app.router.add_get(PREFIX + "/{name}", asset)
