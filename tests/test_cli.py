"""The mist-zarr command line, run as a user would."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import mist_zarr

from .conftest import shared


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mist_zarr.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_demo_writes_and_prints_every_level(tmp_path):
    out = run("demo", "--out", str(tmp_path / "p.zarr"), "--slices", "3", "--size", "256")
    assert out.returncode == 0, out.stderr
    rows = re.findall(r"^\s+s(\d)\s+(\d+)x(\d+)x(\d+)\s.*?([\d,]+)\s+[\d.]+%$", out.stdout, re.M)
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    assert [int(r[2]) for r in rows] == [256, 128, 64]
    index = mist_zarr.read_index(mist_zarr.open_image(tmp_path / "p.zarr")[0])
    assert [int(r[4].replace(",", "")) for r in rows] == [int(index[..., k].sum()) for k in range(3)]
    assert "bit-exact" in out.stdout


def test_info_describes_a_store(tmp_path):
    mist_zarr.write_image(tmp_path / "a.zarr", np.ones((300, 200), np.uint16), spacing=(0.2, 0.3))
    out = run("info", str(tmp_path / "a.zarr"))
    assert out.returncode == 0, out.stderr
    assert "('y', 'x') (300, 200)" in out.stdout and "uint16" in out.stdout
    assert re.search(r"s2\s+75x50", out.stdout)


def test_errors_name_the_input_and_exit_nonzero(tmp_path):
    out = run("info", str(tmp_path / "missing.zarr"))
    assert out.returncode == 2 and "missing.zarr" in out.stderr and "Traceback" not in out.stderr


HEAVY = ("zarr", "numpy", "imagecodecs", "pandas", "pyarrow", "dask", "xarray", "pydicom",
         "nibabel", "highdicom", "torch")

_LOADED = """
import sys
{body}
print("LOADED:" + ",".join(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("body", [
    "import mist_zarr",
    "from mist_zarr.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    "from mist_zarr.cli import main\ntry:\n    main(['convert', '--help'])\nexcept SystemExit:\n    pass",
], ids=["import", "help", "convert-help"])
def test_start_up_loads_no_heavy_dependency(body):
    out = subprocess.run([sys.executable, "-c", _LOADED.format(body=body, heavy=HEAVY)],
                         capture_output=True, text=True, check=True).stdout
    loaded = out.rsplit("LOADED:", 1)[1].strip()
    assert loaded == "", f"loaded at start-up: {loaded}"


def _loaded(body: str, heavy) -> set[str]:
    out = subprocess.run([sys.executable, "-c", _LOADED.format(body=body, heavy=tuple(heavy))],
                         capture_output=True, text=True, check=True).stdout
    return set(filter(None, out.rsplit("LOADED:", 1)[1].strip().split(",")))


def _local_dataset(tmp_path):
    """A dataset converted from two PNGs (one refused), its image path and the catalog."""
    src = tmp_path / "src"
    src.mkdir()
    _gradient_png(src / "g.png")
    (src / "bad.png").write_bytes((src / "g.png").read_bytes()[:200])
    assert run("convert", "-q", str(src), str(tmp_path / "ds")).returncode == 1  # one failed
    return tmp_path / "ds", tmp_path / "ds" / "g"


def test_info_and_ls_of_a_local_dataset_load_neither_zarr_nor_pandas(tmp_path):
    """Start-up (issue 16): a local image's info is read with json, numpy and imagecodecs'
    zstd; ls with pyarrow alone (catalog) or the csv module (failures)."""
    dest, image = _local_dataset(tmp_path)
    cases = {
        ("info", str(image)): {"numpy", "imagecodecs"},
        ("ls", str(dest)): {"numpy", "pyarrow"},
        ("ls", str(dest), "--json"): {"numpy", "pyarrow"},
        ("ls", str(dest), "--warnings"): {"numpy", "pyarrow"},
        ("ls", str(dest), "--failures"): {"numpy"},
    }
    for argv, allowed in cases.items():
        body = f"from mist_zarr.cli import main\nassert main({list(argv)!r}) == 0"
        loaded = _loaded(body, HEAVY)
        assert loaded <= allowed, f"mist-zarr {' '.join(argv)} loaded {loaded - allowed}"


def test_convert_loads_no_pandas(tmp_path):
    """The catalog and failure report that end every convert are written without pandas."""
    png = _gradient_png(tmp_path / "g.png")
    body = ("from mist_zarr.cli import main\n"
            f"assert main(['convert', '-q', {str(png)!r}, {str(tmp_path / 'ds')!r}]) == 0")
    assert _loaded(body, ("pandas", "dask", "xarray", "highdicom", "torch")) == set()
    assert (tmp_path / "ds" / "catalog.parquet").is_file()


def test_convert_scans_before_it_loads_zarr(tmp_path):
    """Start-up (issue 16): ``convert`` lists and scans its sources (the progress it shows
    first) with neither zarr nor the writer loaded; both load once the scan is done."""
    ct = shared("ct", "CRLM-CT-1004")
    n = sum(1 for p in ct.rglob("*") if p.is_file() and not p.name.startswith("."))
    body = f"""
import mist_zarr.cli, mist_zarr.convert
from mist_zarr.converters.sources import plan
steps = []
units, _ = plan({str(ct)!r}, on_scan=lambda *step: steps.append((*step, "zarr" in sys.modules)))
assert [s for s in steps if s[3]] == [], "zarr loaded during the scan"
done = {{step: [d for s, d, t, _ in steps if s == step] for step in ("detect", "scan")}}
assert done == {{"detect": list(range({n} + 1)), "scan": list(range({n} + 1))}}, done
assert {{t for *_, t, _ in steps}} == {{{n}}} and len(units) == 1
"""
    assert _loaded(body, ("zarr", "mist_zarr.writer")) == set()
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # bars on
    out = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "convert", str(ct),
                          str(tmp_path / "ds")], capture_output=True, text=True, timeout=300,
                         env=env)  # with progress: the scan's bar first
    assert out.returncode == 0, out.stderr
    assert out.stderr.lstrip().startswith("detect:") and "scan:" in out.stderr
    assert f"0/{n} " in out.stderr and "1 image(s) converted" in out.stdout
    after = "from mist_zarr.cli import main\n" + \
        f"assert main(['convert', '-q', {str(ct)!r}, {str(tmp_path / 'ds2')!r}]) == 0"
    assert _loaded(after, ("zarr", "mist_zarr.writer")) == {"zarr", "mist_zarr.writer"}


def test_convert_with_progress_when_tqdm_is_disabled(tmp_path):
    """TQDM_DISABLE (common in CI and batch jobs) silences the bars, not the convert."""
    png = _gradient_png(tmp_path / "g.png")
    out = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "convert", str(png),
                          str(tmp_path / "ds")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TQDM_DISABLE": "1"})
    assert out.returncode == 0, out.stderr
    assert "1 image(s) converted" in out.stdout and "scan" not in out.stderr


def test_info_and_ls_print_the_same_locally_and_over_http(tmp_path):
    """The light local reads and zarr's path (a URL) print the same bytes."""
    from mist_zarr.serve import serve_in_thread

    dest, image = _local_dataset(tmp_path)
    local = {args: run(*args, str(dest / where)) for args, where in
             [(("info",), "g"), (("ls",), ""), (("ls", "--json"), ""),
              (("ls", "--failures"), ""), (("ls", "--columns", "path,bytes,n_chunks"), "")]}
    with serve_in_thread(tmp_path) as server:
        for args, out in local.items():
            where = "g" if args == ("info",) else ""
            url = f"{server.url}/ds/{where}".rstrip("/")
            remote = run(*args, url)
            assert out.returncode == remote.returncode == 0, remote.stderr
            assert remote.stdout.replace(url, "LOCATION") == \
                out.stdout.replace(str(dest / where).rstrip("/"), "LOCATION"), args
    assert "g" in local["ls",].stdout and "bad.png" in local["ls", "--failures"].stdout


def test_ls_exits_cleanly_every_time(tmp_path):
    """Without pandas loaded, pyarrow reading through a Python file object aborted the
    interpreter at exit ("terminate called without an active exception", rc 134) in 1
    run in 5 to 10 here: ls reads through an arrow buffer."""
    dest, _ = _local_dataset(tmp_path)
    codes = [run("ls", str(dest)).returncode for _ in range(10)]
    assert codes == [0] * 10


def test_lazy_names_are_the_functions_even_after_their_modules_load():
    import mist_zarr.convert  # noqa: F401 - the submodule, loaded first on purpose
    import mist_zarr.export  # noqa: F401
    import mist_zarr.verify  # noqa: F401

    for name in ("convert", "export", "verify"):
        assert callable(getattr(mist_zarr, name)) and not isinstance(getattr(mist_zarr, name),
                                                                    type(mist_zarr))
    assert set(mist_zarr.__all__) <= set(dir(mist_zarr))
    for name in mist_zarr.__all__:
        assert getattr(mist_zarr, name) is not None


def _gradient_png(path):
    """A real 8-bit grayscale PNG file (written by Pillow)."""
    from PIL import Image

    y, x = np.mgrid[:256, :320]
    Image.fromarray(((x + 2 * y) % 256).astype(np.uint8)).save(path)
    return path


def test_info_ratio_is_against_the_source_dtype(tmp_path):
    """A uint8 image is stored as int16 (headroom for the reduced levels): the lossless
    ratio compares with the uint8 samples the source had, not the wider storage."""
    a = np.add.outer(np.arange(300), np.arange(260)).astype(np.uint8)
    info = mist_zarr.write_image(tmp_path / "u8.zarr", a)
    assert info.stored_dtype == np.int16  # the case the ratio used to double
    out = run("info", str(tmp_path / "u8.zarr"))
    assert out.returncode == 0, out.stderr
    raw, stored, ratio = re.search(r"raw ([\d,]+) bytes \(uint8\) -> stored ([\d,]+) bytes "
                                   r"\(lossless ratio ([\d.]+) against the uint8 source\)",
                                   out.stdout).groups()
    index = mist_zarr.read_index(mist_zarr.open_image(tmp_path / "u8.zarr")[0])
    assert int(raw.replace(",", "")) == a.nbytes
    assert int(stored.replace(",", "")) == int(index[..., 0].sum())
    assert ratio == f"{a.nbytes / int(index[..., 0].sum()):.2f}"


def test_export_refuses_a_size_no_level_has(tmp_path):
    mist_zarr.write_image(tmp_path / "a.zarr", np.ones((300, 200), np.uint16))
    out = run("export", str(tmp_path / "a.zarr"), str(tmp_path / "png"), "--format", "png",
              "--size", "100000")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "a.zarr" in out.stderr and ">= 100000" in out.stderr
    assert "s0: 200, s1: 100, s2: 50" in out.stderr
    assert not (tmp_path / "png").exists()


def test_a_dataset_root_is_named_as_such_and_points_to_ls(tmp_path):
    png = _gradient_png(tmp_path / "g.png")
    assert run("convert", "-q", str(png), str(tmp_path / "ds")).returncode == 0
    for args in (["info", str(tmp_path / "ds")],
                 ["export", str(tmp_path / "ds"), str(tmp_path / "out"), "--format", "png"]):
        out = run(*args)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert f"{tmp_path / 'ds'}: is a mist-zarr dataset root, not an image" in out.stderr
        assert f"mist-zarr ls {tmp_path / 'ds'}" in out.stderr
    for kwargs in ({}, {"chunks": {}}):
        with pytest.raises(ValueError, match="dataset root.*mist-zarr ls"):
            mist_zarr.open(tmp_path / "ds", **kwargs)


def test_open_on_a_source_folder_points_to_convert(tmp_path):
    dicom = shared("ct", "CRLM-CT-1004")
    for kwargs in ({}, {"chunks": {}}):
        with pytest.raises(FileNotFoundError, match=f"{dicom}: not a zarr group.*"
                                                    f"mist-zarr convert {dicom} DATASET"):
            mist_zarr.open(dicom, **kwargs)
    out = run("info", str(dicom))
    assert out.returncode == 2 and f"mist-zarr convert {dicom}" in out.stderr
    with pytest.raises(FileNotFoundError, match="nope: does not exist"):
        mist_zarr.open(tmp_path / "nope")


@pytest.mark.parametrize("what", ["empty folder", "text file", "missing"])
def test_convert_with_nothing_to_convert_fails_and_creates_nothing(tmp_path, what):
    src = tmp_path / "src"
    if what == "empty folder":
        src.mkdir()
    elif what == "text file":
        src = tmp_path / "notes.txt"
        src.write_text("not an image\n")
    out = run("convert", "-q", str(src), str(tmp_path / "dest"))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert str(src) in out.stderr
    assert ("no such file" if what == "missing" else "nothing to convert") in out.stderr
    if what == "text file":
        assert "notes.txt: not a DICOM, NIfTI, PNG, JPEG or TIFF file" in out.stderr
    assert not (tmp_path / "dest").exists()


def test_a_refused_rerun_is_no_recorded_failure(tmp_path):
    png = _gradient_png(tmp_path / "g.png")
    assert run("convert", "-q", str(png), str(tmp_path / "ds")).returncode == 0
    again = run("convert", "-q", str(png), str(tmp_path / "ds"))
    assert again.returncode == 1 and "already converted" in again.stdout  # the run's error
    failures = run("ls", "--failures", str(tmp_path / "ds"))
    assert failures.returncode == 0 and failures.stdout.strip() == "no failures recorded"
    # a source that really fails is still recorded
    bad = tmp_path / "bad.png"
    bad.write_bytes(png.read_bytes()[:200])
    run("convert", "-q", str(bad), str(tmp_path / "ds"))
    listed = run("ls", "--failures", str(tmp_path / "ds"))
    assert "bad.png" in listed.stdout and "g.png" not in listed.stdout


def test_output_into_a_closed_pipe_is_not_an_error(tmp_path):
    """`mist-zarr info x | head -1`: the reader leaves before mist-zarr writes."""
    mist_zarr.write_image(tmp_path / "a.zarr", np.ones((300, 200), np.uint16))
    proc = subprocess.Popen([sys.executable, "-m", "mist_zarr.cli", "info", str(tmp_path / "a.zarr")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before it prints anything (imports take far longer)
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141  # 128 + SIGPIPE, as a shell reports `head`'s writer
    assert stderr == ""


def test_conversion_warnings_are_printed_listed_and_shown(tmp_path):
    from PIL import Image

    from mist_zarr.catalog import catalog

    src = tmp_path / "src"
    src.mkdir()
    rgba = np.zeros((64, 80, 4), np.uint8)
    rgba[..., :3] = np.arange(80, dtype=np.uint8)[None, :, None]
    rgba[..., 3] = 255  # fully opaque: the alpha channel is dropped, with a warning
    Image.fromarray(rgba, "RGBA").save(src / "opaque.png")
    _gradient_png(src / "plain.png")
    out = run("convert", "-q", str(src), str(tmp_path / "ds"))
    assert out.returncode == 0, out.stderr
    printed = [line for line in out.stdout.splitlines() if line.startswith("warning opaque:")]
    assert printed and any("alpha" in line for line in printed)
    assert "1 image(s) converted with warnings" in out.stdout
    warnings = dict(zip(*catalog(tmp_path / "ds")[["path", "warnings"]].to_dict("list").values()))
    assert list(warnings["plain"]) == [] and [w for w in warnings["opaque"] if "alpha" in w]
    listed = run("ls", str(tmp_path / "ds"), "--warnings").stdout.splitlines()
    assert listed == [f"opaque: {w}" for w in warnings["opaque"]]
    table = run("ls", str(tmp_path / "ds")).stdout.splitlines()
    assert table[0].split()[-1] == "warnings"
    counts = {line.split()[0]: line.split()[-1] for line in table[1:]}
    assert counts == {"opaque": str(len(warnings["opaque"])), "plain": "0"}
    info = run("info", str(tmp_path / "ds" / "opaque")).stdout
    assert f"warnings      : {len(warnings['opaque'])}" in info
    assert all(f"    - {w}" in info for w in warnings["opaque"])
