"""Read-only static HTTP server for Zarr stores, with byte-range support.

Built on aiohttp's web server. aiohttp's own ``FileResponse`` is not used
because its Range handling is not what Zarr readers need: it answers
malformed and multi-range headers with 416, ``bytes=-0`` with the whole file
as a 206, and ignores an entity-tag ``If-Range`` (serving a range of a file
that may have changed).
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from stat import S_ISDIR, S_ISREG
from typing import Any, BinaryIO, NamedTuple

from aiohttp import hdrs, web

from .http_view import Body, VirtualViews
from .viewer import add_viewer_routes, viewer_status

__all__ = [
    "BYTES_SENT",
    "REQUESTS",
    "ByteCounter",
    "RequestRecord",
    "ServerHandle",
    "make_app",
    "run",
    "serve_in_thread",
]

_CHUNK_SIZE = 256 * 1024
# The request log exists for tests and benchmarks; bounding it keeps a
# long-running `run()` server from growing without limit.
_MAX_RECORDS = 100_000
_RANGE_SPEC = re.compile(r"(\d*)-(\d*)", re.ASCII)
# Browsers hide non-safelisted response headers from scripts unless exposed,
# and range readers need Content-Range to learn the file size.
_EXPOSED_HEADERS = "Content-Range, Content-Length, Accept-Ranges"


class RequestRecord(NamedTuple):
    """One answered request: URL path, status, Range header and body bytes sent."""

    path: str
    status: int
    range_header: str | None
    body_len: int


class ByteCounter:
    """Running total of response body bytes, safe to read and reset from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0

    @property
    def value(self) -> int:
        """Bytes counted since creation or the last reset."""
        return self._value

    def add(self, n: int) -> None:
        """Add n bytes to the total."""
        with self._lock:
            self._value += n

    def reset(self) -> None:
        """Set the total back to zero."""
        with self._lock:
            self._value = 0


# Mutable containers rather than plain values: a running app is frozen, so
# its items cannot be reassigned, only mutated.
BYTES_SENT = web.AppKey("mist_zarr.bytes_sent", ByteCounter)
REQUESTS = web.AppKey("mist_zarr.requests", deque[RequestRecord])


def make_app(
    root: str | os.PathLike[str],
    *,
    listing: bool = False,
    cors_origin: str | None = "*",
    delay: float = 0.0,
    viewer: bool = False,
) -> web.Application:
    """Return an aiohttp app serving the files under root, read-only.

    Only GET and HEAD are allowed (plus OPTIONS preflight when cors_origin is
    set). A GET with one byte range (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``)
    gets 206; an unsatisfiable one gets 416 with ``Content-Range: bytes */SIZE``.
    Syntactically invalid Range headers and multi-range requests are ignored
    and answered 200 with the full body, as RFC 9110 section 14.2 allows:
    Zarr readers only ever ask for one range, and multipart/byteranges would
    only add attack surface. Directories are 404 unless listing is true, in
    which case they are a JSON array of names (subdirectories end in "/").
    Paths with dot segments, backslashes or NUL, and symlinks resolving
    outside root, are 403. Raises ValueError if root is not a directory.
    ``delay`` (seconds) holds every GET before it is answered: a stand-in for
    network latency in tests and benchmarks.

    Beside the files, every image's virtual multiscale view is served at
    ``<image>/ome/`` (Zarr v3) and ``<image>/ome-v2/`` (Zarr v2), and every
    dataset root's catalog at ``<dataset>/catalog.json``
    (:mod:`mist_zarr.http_view`), under the same rules.

    With viewer, ``/`` is the web viewer (``mist_zarr.viewer``).
    """
    base = _check_root(root)
    views = VirtualViews(base, _resolve)
    app = web.Application()
    app[BYTES_SENT] = ByteCounter()
    app[REQUESTS] = deque(maxlen=_MAX_RECORDS)

    async def get(request: web.Request) -> web.StreamResponse:
        if delay > 0:
            await asyncio.sleep(delay)
        url_path = request.match_info["path"]
        body = await views.lookup(url_path)
        if body is not None:
            return await _send(request, body)
        target = await asyncio.to_thread(_open, base, url_path, listing)
        if isinstance(target, list):
            return web.json_response(target)
        f, st = target
        with f:
            return await _send(request, _file_body(f, st, url_path))

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        # Headers go on every response, errors included, so that browser
        # readers can see why a request failed.
        if cors_origin is not None:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = cors_origin
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = _EXPOSED_HEADERS
        # Counted here, on the event loop thread, just before the headers go
        # out: increments cannot interleave, and a client that has received a
        # response can rely on it being counted.
        sent = request.method == hdrs.METH_GET and response.status in (200, 206)
        body_len = (response.content_length or 0) if sent else 0
        app[BYTES_SENT].add(body_len)
        app[REQUESTS].append(
            RequestRecord(request.path, response.status, request.headers.get(hdrs.RANGE), body_len)
        )

    if viewer:  # before the catch-all route, which would answer "/" first
        add_viewer_routes(app, base)
    app.router.add_get("/{path:.*}", get)  # also answers HEAD
    if cors_origin is not None:
        app.router.add_route(hdrs.METH_OPTIONS, "/{path:.*}", _preflight)
    app.on_response_prepare.append(on_prepare)
    return app


def _check_root(root: str | os.PathLike[str]) -> Path:
    """Return root's real path, or raise ValueError if it is not a directory."""
    path = Path(root)
    if not path.exists():
        raise ValueError(f"serve root {str(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"serve root {str(path)!r} is not a directory")
    return Path(os.path.realpath(path))


def _resolve(root: Path, url_path: str) -> Path:
    """Map a decoded URL path to a real path inside root; raise 403 if it would escape."""
    # aiohttp has already percent-decoded the path, so "%2e%2e%2f" arrives
    # here as "../"; dot segments are refused rather than normalised.
    parts = url_path.split("/")
    if any(p in (".", "..") or "\\" in p or "\0" in p for p in parts):
        raise web.HTTPForbidden()
    # os.path.realpath, not Path.resolve: the latter raises RuntimeError on
    # symlink loops in Python 3.12, where we want the open to fail with 404.
    real = Path(os.path.realpath(root.joinpath(*filter(None, parts))))
    # 403, not 404, for a symlink leading out of root: Zarr reads a 404 as a
    # missing chunk and silently fills it, whereas a 403 is raised as an error.
    if not real.is_relative_to(root):
        raise web.HTTPForbidden()
    return real


def _open(
    root: Path, url_path: str, listing: bool
) -> tuple[BinaryIO, os.stat_result] | list[str]:
    """Open the file at url_path, or list the directory there; raise 403/404 otherwise."""
    path = _resolve(root, url_path)
    try:
        st = path.stat()
        if listing and S_ISDIR(st.st_mode):
            # os.path.isdir, unlike DirEntry.is_dir, is False for a symlink loop.
            with os.scandir(path) as entries:
                return sorted(e.name + "/" * os.path.isdir(e) for e in entries)
        if not S_ISREG(st.st_mode):  # directories, FIFOs, devices
            raise web.HTTPNotFound()
        f = path.open("rb")
    except PermissionError:
        raise web.HTTPForbidden() from None
    except OSError:  # missing, not a directory, symlink loop, name too long
        raise web.HTTPNotFound() from None
    # Describe the file actually opened, in case it was replaced meanwhile.
    return f, os.fstat(f.fileno())


def _file_body(f: BinaryIO, st: os.stat_result, url_path: str) -> Body:
    """The body of an open regular file (read while the file stays open)."""

    def read(start: int, n: int) -> bytes:
        f.seek(start)
        return f.read(n)

    content_type = "application/json" if url_path.endswith(".json") else "application/octet-stream"
    return Body(st.st_size, f"{st.st_mtime_ns:x}-{st.st_size:x}", int(st.st_mtime), content_type,
                read)


async def _send(request: web.Request, body: Body) -> web.StreamResponse:
    """Answer a GET or HEAD with body: conditional requests, one range, then the bytes."""
    mtime = body.mtime  # HTTP dates have one-second resolution
    headers = {
        hdrs.ACCEPT_RANGES: "bytes",
        hdrs.ETAG: f'"{body.tag}"',
        hdrs.LAST_MODIFIED: formatdate(mtime, usegmt=True),
    }
    if (status := _precondition(request, body.tag, mtime)) is not None:
        return web.Response(status=status, headers=headers)
    span = _byte_range(request, body.size, headers[hdrs.ETAG], mtime)
    start, stop = span or (0, body.size)
    if span:
        headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{stop - 1}/{body.size}"
    headers[hdrs.CONTENT_TYPE] = body.content_type
    resp = web.StreamResponse(status=206 if span else 200, headers=headers)
    resp.content_length = stop - start
    await resp.prepare(request)
    if request.method == hdrs.METH_GET:
        position = start
        while position < stop:
            chunk = await asyncio.to_thread(body.read, position, min(_CHUNK_SIZE, stop - position))
            if not chunk:
                # Headers promised more bytes than exist: fail, so that aiohttp
                # drops the connection instead of leaving the client waiting.
                raise OSError(f"{request.path} shrank while being sent")
            await resp.write(chunk)
            position += len(chunk)
    await resp.write_eof()
    return resp


def _precondition(request: web.Request, tag: str, mtime: int) -> int | None:
    """Evaluate conditional headers (RFC 9110 section 13.2.2): 412, 304 or None."""
    if (etags := request.if_match) is not None:
        if not any(e.value in (tag, "*") and not e.is_weak for e in etags):
            return 412
    elif (since := request.if_unmodified_since) is not None and mtime > since.timestamp():
        return 412
    if (etags := request.if_none_match) is not None:
        if any(e.value in (tag, "*") for e in etags):
            return 304
    elif (since := request.if_modified_since) is not None and mtime <= since.timestamp():
        return 304
    return None


def _byte_range(
    request: web.Request, size: int, etag: str, mtime: int
) -> tuple[int, int] | None:
    """Return the [start, stop) span to send, None for the whole file; raise 416."""
    header = request.headers.get(hdrs.RANGE)
    # RFC 9110 section 14.2: range handling is defined for GET only.
    if header is None or request.method != hdrs.METH_GET:
        return None
    # If-Range names the version the client holds part of; if that is not the
    # current one (strong comparison), send the whole file instead of a range.
    if (validator := request.headers.get(hdrs.IF_RANGE)) is not None:
        date = request.if_range
        if validator != etag and (date is None or int(date.timestamp()) != mtime):
            return None
    unit, _, range_set = header.partition("=")
    # A list header: whitespace around elements and empty elements are allowed.
    specs = [s for s in (s.strip(" \t") for s in range_set.split(",")) if s]
    if unit.lower() != "bytes" or len(specs) != 1:
        return None  # unknown unit, no range, or several ranges: ignored
    if not (m := _RANGE_SPEC.fullmatch(specs[0])) or m.groups() == ("", ""):
        return None
    try:
        first, last = (int(g) if g else None for g in m.groups())
    except ValueError:  # more digits than int() accepts: no such file exists
        return None
    if first is None:  # suffix range "-n": the last n bytes
        assert last is not None
        if last == 0:
            raise _unsatisfiable(size)
        # An empty file has no byte positions for a 206 to name, so its
        # (satisfiable) suffix range is answered with the whole, empty file.
        return (max(size - last, 0), size) if size else None
    if last is not None and last < first:
        return None  # invalid (RFC 9110 section 14.1.1), so ignored
    if first >= size:
        raise _unsatisfiable(size)
    return first, size if last is None else min(last + 1, size)


def _unsatisfiable(size: int) -> web.HTTPRequestRangeNotSatisfiable:
    """Return a 416 carrying the current size, as RFC 9110 section 15.5.17 asks."""
    return web.HTTPRequestRangeNotSatisfiable(headers={hdrs.CONTENT_RANGE: f"bytes */{size}"})


async def _preflight(request: web.Request) -> web.Response:
    """Answer a CORS preflight; the allow-origin header is added on prepare."""
    return web.Response(
        status=204,
        headers={
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: "GET, HEAD",
            hdrs.ACCESS_CONTROL_ALLOW_HEADERS: "Range",
            hdrs.ACCESS_CONTROL_MAX_AGE: "86400",
        },
    )


@dataclass(frozen=True)
class ServerHandle:
    """A server started by serve_in_thread: its base URL and traffic counters."""

    url: str
    app: web.Application

    @property
    def bytes_sent(self) -> int:
        """Body bytes sent in 200/206 GET responses so far."""
        return self.app[BYTES_SENT].value

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of the requests answered so far, oldest first."""
        return list(self.app[REQUESTS])

    def reset_counters(self) -> None:
        """Zero bytes_sent and clear requests."""
        self.app[BYTES_SENT].reset()
        self.app[REQUESTS].clear()


@contextmanager
def serve_in_thread(
    root: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    **app_kwargs: Any,
) -> Iterator[ServerHandle]:
    """Serve root from a background thread for the duration of the with block.

    port=0 binds a free port. app_kwargs are passed to make_app.
    """
    app = make_app(root, **app_kwargs)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_run_loop, args=(loop,), name="mist-zarr-serve", daemon=True)
    thread.start()

    def call(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    try:
        try:
            url = call(_start(runner, host, port))
            yield ServerHandle(url, app)
        finally:
            call(runner.cleanup())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()


async def _start(runner: web.AppRunner, host: str, port: int) -> str:
    """Set up runner, bind host:port and return the base URL."""
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return site.name  # reports the bound port when port was 0


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Run loop until stopped, then release its executor threads and close it."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def run(
    root: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    listing: bool = False,
    delay: float = 0.0,
    viewer: bool = True,
) -> None:
    """Serve root on host:port until interrupted, printing the URL (and the viewer's status)."""
    app = make_app(root, listing=listing, delay=delay, viewer=viewer)

    def announce(*args: Any) -> None:
        # Flush so the URL shows up even when stdout is a pipe; the URL first.
        print(*args, flush=True)
        if viewer:
            print(viewer_status(), flush=True)

    web.run_app(app, host=host, port=port, print=announce)
