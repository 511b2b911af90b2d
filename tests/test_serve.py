"""Tests for mist_zarr.serve against a real server on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from email.message import Message
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
import zarr
from fsspec.implementations.http import HTTPFileSystem

import mist_zarr.serve
from mist_zarr.serve import BYTES_SENT, REQUESTS, make_app, run, serve_in_thread

SIZE = 5000
DATA = random.Random(0).randbytes(SIZE)
SECRET = b"TOP-SECRET-do-not-serve"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A store with files, a subdirectory and symlinks in and out of it; secrets beside it."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_bytes(SECRET)
    root = tmp_path / "store"
    (root / "sub").mkdir(parents=True)
    (root / "data.bin").write_bytes(DATA)
    (root / "empty.bin").write_bytes(b"")
    (root / "zarr.json").write_text('{"zarr_format": 3}')
    (root / "sub" / ".zattrs").write_text("{}")
    (root / "sub" / "x.bin").write_bytes(b"x")
    (root / "alias.bin").symlink_to("data.bin")
    (root / "subalias").symlink_to("sub")
    (root / "leak").symlink_to(tmp_path / "secret.txt")
    (root / "leakdir").symlink_to(tmp_path / "outside")
    (root / "loop").symlink_to("loop")
    return root


@pytest.fixture
def server(root: Path):
    with serve_in_thread(root) as srv:
        yield srv


class Reply(NamedTuple):
    status: int
    headers: Message
    body: bytes


def fetch(
    url: str, target: str, method: str = "GET", headers: dict[str, str] | None = None
) -> Reply:
    """Send target verbatim: unlike requests and urllib, http.client keeps dot segments."""
    conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=5)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def get_range(url: str, range_header: str, target: str = "/data.bin") -> Reply:
    return fetch(url, target, headers={"Range": range_header})


def tokens(value: str) -> set[str]:
    """The elements of a comma-separated header value."""
    return {t.strip() for t in value.split(",")}


# --- plain GET and HEAD ---------------------------------------------------------------


def test_get_full_file(server):
    status, headers, body = fetch(server.url, "/data.bin")
    assert (status, body) == (200, DATA)
    assert headers["Content-Length"] == str(SIZE)
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["ETag"].startswith('"') and headers["Last-Modified"].endswith(" GMT")
    assert server.bytes_sent == SIZE


@pytest.mark.parametrize(
    ("target", "content_type"),
    [
        ("/zarr.json", "application/json"),
        ("/sub/.zattrs", "application/octet-stream"),  # dotfiles (Zarr v2) are ordinary files
        ("/sub/x.bin", "application/octet-stream"),
    ],
)
def test_content_type(server, target, content_type):
    reply = fetch(server.url, target)
    assert (reply.status, reply.headers["Content-Type"]) == (200, content_type)


def test_head(server):
    status, headers, body = fetch(server.url, "/data.bin", "HEAD")
    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == str(SIZE)
    assert headers["Accept-Ranges"] == "bytes"
    assert server.bytes_sent == 0


def test_head_ignores_range(server):
    # RFC 9110 section 14.2 defines range handling for GET only.
    reply = fetch(server.url, "/data.bin", "HEAD", {"Range": "bytes=0-9"})
    assert (reply.status, reply.headers["Content-Length"]) == (200, str(SIZE))


def test_large_file(server, root):
    # Larger than the server's read size, so bodies are sent in several pieces.
    big = random.Random(2).randbytes(700_000)
    (root / "big.bin").write_bytes(big)
    assert fetch(server.url, "/big.bin").body == big
    assert get_range(server.url, "bytes=200000-600000", "/big.bin").body == big[200_000:600_001]


def test_empty_file(server):
    assert fetch(server.url, "/empty.bin")[::2] == (200, b"")


# --- ranges -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("range_header", "start", "stop"),
    [
        ("bytes=0-99", 0, 100),
        ("bytes=1000-1000", 1000, 1001),
        ("bytes=4000-", 4000, SIZE),
        ("bytes=-100", SIZE - 100, SIZE),
        ("bytes=4990-99999", 4990, SIZE),  # a last-pos past the end is clamped
        ("bytes=-99999", 0, SIZE),  # a suffix longer than the file is all of it
        ("bytes=0-", 0, SIZE),
        ("Bytes=10-19", 10, 20),  # the unit is case-insensitive
        ("bytes=10-19, ", 10, 20),  # list syntax allows empty elements
    ],
)
def test_single_range(server, range_header, start, stop):
    status, headers, body = get_range(server.url, range_header)
    assert (status, body) == (206, DATA[start:stop])
    assert headers["Content-Range"] == f"bytes {start}-{stop - 1}/{SIZE}"
    assert headers["Content-Length"] == str(stop - start)
    assert server.bytes_sent == stop - start


@pytest.mark.parametrize(
    ("target", "range_header", "size"),
    [
        ("/data.bin", f"bytes={SIZE}-", SIZE),
        ("/data.bin", "bytes=99999-100000", SIZE),
        ("/data.bin", "bytes=-0", SIZE),
        ("/empty.bin", "bytes=0-", 0),
    ],
)
def test_unsatisfiable_range(server, target, range_header, size):
    reply = get_range(server.url, range_header, target)
    assert (reply.status, reply.headers["Content-Range"]) == (416, f"bytes */{size}")
    assert server.bytes_sent == 0


@pytest.mark.parametrize(
    "range_header",
    [
        "bytes=abc",
        "bytes=5-2",
        "bytes=-",
        "bytes=",
        "bytes 0-1",
        "items=0-1",
        "",
        "bytes=1-2-3",
        "bytes=0x10-",
        "bytes=" + "9" * 5000 + "-",  # more digits than int() parses
    ],
)
def test_malformed_range_is_ignored(server, range_header):
    status, headers, body = get_range(server.url, range_header)
    assert (status, body) == (200, DATA)
    assert "Content-Range" not in headers


@pytest.mark.parametrize("range_header", ["bytes=0-1,5-6", "bytes=0-1, 10-", "bytes=-5,0-0"])
def test_multi_range_is_ignored(server, range_header):
    # The documented choice: multi-range requests get the whole file as a 200.
    status, headers, body = get_range(server.url, range_header)
    assert (status, body) == (200, DATA)
    assert "Content-Range" not in headers


def test_suffix_range_of_empty_file(server):
    assert get_range(server.url, "bytes=-5", "/empty.bin")[::2] == (200, b"")


def test_if_range(server):
    headers = fetch(server.url, "/data.bin", "HEAD").headers

    def status(validator: str) -> int:
        return fetch(
            server.url, "/data.bin", headers={"Range": "bytes=0-9", "If-Range": validator}
        ).status

    assert status(headers["ETag"]) == 206
    assert status(headers["Last-Modified"]) == 206
    assert status('"stale"') == 200
    assert status("W/" + headers["ETag"]) == 200  # If-Range compares strongly
    assert status("Thu, 01 Jan 1998 00:00:00 GMT") == 200


def test_conditional_requests(server):
    headers = fetch(server.url, "/data.bin", "HEAD").headers

    def status(name: str, value: str) -> int:
        return fetch(server.url, "/data.bin", headers={name: value}).status

    assert status("If-None-Match", headers["ETag"]) == 304
    assert status("If-Modified-Since", headers["Last-Modified"]) == 304
    assert status("If-None-Match", '"other"') == 200
    assert status("If-Match", '"other"') == 412
    assert status("If-Match", headers["ETag"]) == 200
    assert server.bytes_sent == 2 * SIZE  # the two 200s


# --- CORS and methods -------------------------------------------------------------


def test_cors_headers(server):
    for target in ("/data.bin", "/missing"):
        headers = get_range(server.url, "bytes=0-1", target).headers
        assert headers["Access-Control-Allow-Origin"] == "*"
        assert tokens(headers["Access-Control-Expose-Headers"]) == {
            "Content-Range",
            "Content-Length",
            "Accept-Ranges",
        }


def test_cors_preflight(server):
    preflight = {
        "Origin": "https://viewer.example",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "range",
    }
    status, headers, _ = fetch(server.url, "/data.bin", "OPTIONS", preflight)
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert tokens(headers["Access-Control-Allow-Methods"]) == {"GET", "HEAD"}
    assert headers["Access-Control-Allow-Headers"].lower() == "range"


def test_cors_custom_origin_and_disabled(root):
    origin = "https://viewer.example"
    with serve_in_thread(root, cors_origin=origin) as srv:
        assert fetch(srv.url, "/data.bin").headers["Access-Control-Allow-Origin"] == origin
    with serve_in_thread(root, cors_origin=None) as srv:
        assert "Access-Control-Allow-Origin" not in fetch(srv.url, "/data.bin").headers
        assert fetch(srv.url, "/data.bin", "OPTIONS").status == 405


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_other_methods_not_allowed(server, method):
    status, headers, _ = fetch(server.url, "/data.bin", method)
    assert status == 405
    assert {"GET", "HEAD"} <= tokens(headers["Allow"])
    assert server.bytes_sent == 0


# --- directories and missing files ----------------------------------------------------


@pytest.mark.parametrize("target", ["/", "/sub", "/sub/", "/subalias"])
def test_directory_is_404_without_listing(server, target):
    assert fetch(server.url, target).status == 404


def test_directory_listing(root):
    with serve_in_thread(root, listing=True) as srv:
        status, headers, body = fetch(srv.url, "/sub/")
        assert (status, headers["Content-Type"]) == (200, "application/json; charset=utf-8")
        assert json.loads(body) == [".zattrs", "x.bin"]
        names = json.loads(fetch(srv.url, "/").body)
        assert {"data.bin", "loop", "sub/", "subalias/", "zarr.json"} <= set(names)
        assert fetch(srv.url, "/data.bin")[::2] == (200, DATA)


@pytest.mark.parametrize("target", ["/missing", "/sub/missing", "/data.bin/x", "/loop"])
def test_missing_is_404(server, target):
    assert fetch(server.url, target).status == 404


# --- staying inside the root ------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/../secret.txt", 403),
        ("/%2e%2e/secret.txt", 403),
        ("/%2E%2E/secret.txt", 403),
        ("/..%2fsecret.txt", 403),
        ("/%2e%2e%2fsecret.txt", 403),
        ("/sub/../../secret.txt", 403),
        ("/sub/%2e%2e/%2e%2e/secret.txt", 403),
        ("/./data.bin", 403),
        ("/..\\secret.txt", 403),
        ("/%5c..%5csecret.txt", 403),
        ("/data.bin%00", 403),
        ("/%00/../secret.txt", 403),
        ("/leak", 403),  # symlink to a file outside the root
        ("/leakdir/secret.txt", 403),  # symlink to a directory outside the root
        ("//etc/passwd", 404),  # absolute-looking paths stay under the root
        ("/%2fetc%2fpasswd", 404),
    ],
)
def test_no_escape_from_root(server, target, expected):
    status, _, body = fetch(server.url, target)
    assert status == expected
    assert SECRET not in body
    assert fetch(server.url, "/data.bin")[::2] == (200, DATA)  # still serving


def test_absolute_path_of_secret(server, root):
    status, _, body = fetch(server.url, "/" + str(root.parent / "secret.txt"))
    assert status == 404 and SECRET not in body


@pytest.mark.parametrize(("target", "content"), [("/alias.bin", DATA), ("/subalias/x.bin", b"x")])
def test_symlinks_inside_root_are_served(server, target, content):
    assert fetch(server.url, target)[::2] == (200, content)


def test_server_survives_garbage(server):
    address = (urlsplit(server.url).hostname, urlsplit(server.url).port)
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert sock.recv(1024).split(b" ", 2)[1] == b"400"
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b"GET /data.bin HTTP/1.1\r\n")  # then hang up mid-request
    assert fetch(server.url, "/data.bin")[::2] == (200, DATA)


# --- byte accounting ----------------------------------------------------------------


def test_request_records(server):
    get_range(server.url, "bytes=10-19")
    fetch(server.url, "/missing")
    fetch(server.url, "/data.bin", "HEAD")
    assert server.requests == [
        ("/data.bin", 206, "bytes=10-19", 10),
        ("/missing", 404, None, 0),
        ("/data.bin", 200, None, 0),
    ]
    assert server.bytes_sent == server.app[BYTES_SENT].value == 10
    server.reset_counters()
    assert (server.bytes_sent, server.requests) == (0, [])


def test_byte_counter_under_concurrency(server):
    rng = random.Random(1)
    jobs = []
    for _ in range(50):
        start = rng.randrange(SIZE)
        jobs.append(rng.choice([None, f"bytes={start}-{rng.randrange(start, SIZE)}", "bytes=-77"]))

    def get(range_header: str | None) -> int:
        headers = {"Range": range_header} if range_header else {}
        resp = requests.get(server.url + "/data.bin", headers=headers, timeout=5)
        assert resp.status_code == (206 if range_header else 200)
        return len(resp.content)

    with ThreadPoolExecutor(8) as pool:
        received = sum(pool.map(get, jobs))
    assert server.bytes_sent == received
    assert len(server.requests) == 50
    assert sum(r.body_len for r in server.requests) == received


# --- real clients -----------------------------------------------------------------


def test_fsspec_range_read(server):
    fs = HTTPFileSystem(skip_instance_cache=True)
    url = server.url + "/data.bin"
    assert fs.cat_file(url, start=100, end=250) == DATA[100:250]
    assert fs.cat_file(url) == DATA
    assert fs.info(url)["size"] == SIZE
    assert any(r.status == 206 and r.body_len == 150 for r in server.requests)


def test_zarr_over_http(tmp_path):
    data = np.arange(24 * 24, dtype="uint16").reshape(24, 24)
    zarr.create_array(tmp_path / "a.zarr", data=data, chunks=(8, 8))
    with serve_in_thread(tmp_path) as srv:
        arr = zarr.open_array(srv.url + "/a.zarr", mode="r")
        np.testing.assert_array_equal(arr[4:20, 3:9], data[4:20, 3:9])
        assert srv.bytes_sent > 0


# --- lifecycle and entry points -----------------------------------------------------


def test_serve_in_thread_cleans_up(root):
    before = set(threading.enumerate())
    with serve_in_thread(root) as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        requests.get(srv.url + "/data.bin", timeout=5)  # start the file-reading threads
        port = urlsplit(srv.url).port
    assert set(threading.enumerate()) <= before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_serve_in_thread_port_in_use(root):
    before = set(threading.enumerate())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError), serve_in_thread(root, port=taken.getsockname()[1]):
            pass
    assert set(threading.enumerate()) <= before


def test_make_app_counters(root):
    app = make_app(root)
    assert app[BYTES_SENT].value == 0 and len(app[REQUESTS]) == 0


def _serve_briefly(root: Path) -> None:
    with serve_in_thread(root):
        pass


@pytest.mark.parametrize("entry", [make_app, _serve_briefly, run])
def test_bad_root(tmp_path, entry):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ValueError, match="missing'? does not exist"):
        entry(tmp_path / "missing")
    with pytest.raises(ValueError, match="file'? is not a directory"):
        entry(tmp_path / "file")


@pytest.mark.skipif(sys.platform == "win32", reason="stops the server with SIGINT")
def test_run_prints_url_and_serves(root):
    paths = [str(Path(mist_zarr.serve.__file__).parents[1]), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    code = "import sys; from mist_zarr.serve import run; run(sys.argv[1], port=0)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        url = proc.stdout.readline().split("Running on ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        assert fetch(url, "/data.bin")[::2] == (200, DATA)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        proc.stdout.close()
