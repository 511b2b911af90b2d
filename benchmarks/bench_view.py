"""The virtual OME-Zarr view over HTTP vs. mist-zarr's own client, per level.

For the shared CT series (``ct/CRLM-CT-1004``, 41 x 512 x 512; a generated CT
phantom of the same shape when the shared data are absent), served by
``mist_zarr.serve.serve_in_thread`` on the loopback, reads every level k:

* **client**: ``mist_zarr.open(url, scale=k).values``: MultiscaleStore in the
  client, one ranged read (prefix + 2 boundary bytes) per chunk of the
  physical files;
* **view**: zarr-python alone (imagecodecs' codec registered) on
  ``<image>/ome/``, reading ``s{k}/image``: the server cuts the prefix.

Both are checked to return the same samples. Bytes are the server's body-byte
counter for one cold open + read; times are medians of ``--repeat`` cold runs.
The server runs in a thread of this process, so times include serving.

    python benchmarks/bench_view.py [--data DIR] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import imagecodecs.zarr
import numpy as np
import zarr

import mist_zarr
from mist_zarr.serve import serve_in_thread

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_model  # noqa: E402


def load_ct(data: Path) -> tuple[np.ndarray, str]:
    files = sorted((data / "ct" / "CRLM-CT-1004").rglob("*.dcm"))
    if not files:
        from mist_zarr.phantom import ct_phantom

        return ct_phantom((41, 512, 512)), "generated CT phantom 41x512x512"
    import pydicom

    slices = sorted((pydicom.dcmread(f) for f in files),
                    key=lambda d: float(d.ImagePositionPatient[2]))
    return np.stack([d.pixel_array for d in slices]), "CRLM-CT-1004 41x512x512"


def timed(server, read, repeat: int) -> tuple[float, int, np.ndarray]:
    times, sent, out = [], 0, None
    for _ in range(repeat):
        server.reset_counters()
        t0 = time.perf_counter()
        out = read()
        times.append(time.perf_counter() - t0)
        sent = server.bytes_sent
    return statistics.median(times), sent, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("MIST_DATA", "../shared/data"))
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    imagecodecs.zarr.register_codecs()
    volume, what = load_ct(Path(args.data))
    with tempfile.TemporaryDirectory() as tmp:
        info = mist_zarr.write_image(Path(tmp) / "ct.zarr", volume, spacing=(2.5, 0.78, 0.78))
        print(f"{what}; {cpu_model()}; {os.cpu_count()} CPUs; median of {args.repeat} cold reads")
        print(f"{'level':>5} {'client ms':>10} {'view ms':>8} {'view/client':>11} "
              f"{'client bytes':>13} {'view bytes':>11}")
        with serve_in_thread(tmp) as server:
            url = f"{server.url}/ct.zarr"
            for k in range(info.levels + 1):
                tc, bc, a = timed(server, lambda: mist_zarr.open(url, scale=k).values,
                                  args.repeat)
                tv, bv, b = timed(server, lambda: zarr.open_group(
                    f"{url}/ome/", mode="r")[f"s{k}/image"][...], args.repeat)
                if not np.array_equal(a, b):
                    raise SystemExit(f"level {k}: the view and the client disagree")
                print(f"{k:>5} {tc * 1e3:>10.1f} {tv * 1e3:>8.1f} {tv / tc:>11.2f} "
                      f"{bc:>13,} {bv:>11,}")


if __name__ == "__main__":
    main()
