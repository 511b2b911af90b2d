"""verify: every kind of damage is reported against the right chunk; readers refuse it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr

import mist_zarr
from mist_zarr import MultiscaleStore, PrefixError
from mist_zarr.verify import verify


@pytest.fixture
def image(tmp_path, phantom):
    path = tmp_path / "ds" / "img.zarr"
    mist_zarr.write_image(path, phantom)
    return path


def chunk(path, z):
    return path / "image" / "c" / str(z) / "0" / "0"


def test_clean_image_and_dataset_verify(image, tmp_path, phantom):
    report = verify(image, levels=True)
    assert report.ok and report.images == 1 and report.chunks == phantom.shape[0]
    shutil.copytree(image, tmp_path / "ds" / "nested" / "other.zarr")
    report = verify(tmp_path / "ds", workers=2)
    assert report.ok and report.images == 2


def test_flipped_byte_is_found_by_the_checksum(image):
    data = bytearray(chunk(image, 2).read_bytes())
    data[len(data) // 2] ^= 0x40  # inside entropy-coded data: decodes silently to a wrong image
    chunk(image, 2).write_bytes(bytes(data))
    report = verify(image)
    assert [(f.key, "checksum" in f.reason or "decode" in f.reason) for f in report.findings] \
        == [("image/c/2/0/0", True)]


def test_truncated_chunk(image):
    data = chunk(image, 1).read_bytes()
    chunk(image, 1).write_bytes(data[: len(data) - 100])
    (finding, *_) = verify(image).findings
    assert finding.key == "image/c/1/0/0" and "bytes, the index says" in finding.reason


def test_corrupt_index_is_found_and_refused_by_readers(image):
    index = zarr.open_array(image / "index", mode="r+")
    values = index[...]
    values[4, 0, 0, 2] += 3
    index[...] = values
    report = verify(image, levels=True)
    assert {f.key for f in report.findings} == {"image/c/4/0/0"}
    assert any("disagrees with the codestream" in f.reason for f in report.findings)
    arr = zarr.open_array(MultiscaleStore(image), path="s2/image", mode="r")
    with pytest.raises(PrefixError, match="s2/image/c/4/0/0"):
        arr[4]


def test_deleted_chunk(image):
    chunk(image, 3).unlink()
    (finding,) = verify(image).findings
    assert finding.key == "image/c/3/0/0" and finding.reason == "chunk is missing"


def test_damaged_zarr_json(image):
    (image / "zarr.json").write_text("{ not json")
    (finding,) = verify(image).findings
    assert finding.key == "zarr.json"
    with pytest.raises(Exception):
        mist_zarr.read_image(image)


def test_incomplete_image_is_reported(image):
    doc = json.loads((image / "zarr.json").read_text())
    doc["attributes"]["mist"]["complete"] = False
    (image / "zarr.json").write_text(json.dumps(doc))
    (finding,) = verify(image).findings
    assert "incomplete" in finding.reason


def test_verify_against_sources(tmp_path):
    import nibabel as nib

    data = np.random.default_rng(0).integers(0, 1000, (30, 40, 5), dtype=np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "a.nii.gz")
    assert mist_zarr.convert(tmp_path / "a.nii.gz", tmp_path / "ds").ok
    assert verify(tmp_path / "ds", source=tmp_path / "a.nii.gz").ok
    other = data.copy()
    other[0, 0, 0] += 1
    nib.save(nib.Nifti1Image(other, np.eye(4)), tmp_path / "a.nii.gz")
    (finding,) = verify(tmp_path / "ds", source=tmp_path / "a.nii.gz").findings
    assert finding.key == "source" and "differ" in finding.reason


def test_cli_verify_exit_codes(image):
    ok = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "verify", str(image), "--levels"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout
    chunk(image, 0).unlink()
    bad = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "verify", str(image)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "image/c/0/0/0" in bad.stdout


def test_read_image_refuses_a_damaged_chunk(image):
    data = bytearray(chunk(image, 2).read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk(image, 2).write_bytes(bytes(data))
    with pytest.raises(mist_zarr.ChecksumError, match=r"chunk \(2, 0, 0\)"):
        mist_zarr.read_image(image)
    assert mist_zarr.read_image(image, verify=False).shape == (6, 300, 260)


def _damaged_dataset(root, phantom):
    """A dataset root with one clean image and one whose chunk 2 has a flipped byte."""
    mist_zarr.write_image(root / "clean.zarr", phantom)
    mist_zarr.write_image(root / "bad.zarr", phantom)
    data = bytearray(chunk(root / "bad.zarr", 2).read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk(root / "bad.zarr", 2).write_bytes(bytes(data))


_SCRIPT = """import json
from mist_zarr.verify import verify
{body}
"""
_CALL = ("r = verify({root!r}, workers={workers})\n"
         "print('VERDICT', json.dumps([r.ok, sorted((f.source, f.key) for f in r.findings)]))")


def test_verdict_is_the_same_from_scripts_exec_and_cli(tmp_path, phantom):
    """Unguarded and guarded scripts (run as ``python x.py``, which multiprocessing's
    spawn / forkserver workers would re-run), notebook-style exec and the CLI agree,
    with one worker (the scripts) and two (exec, CLI)."""
    root = tmp_path / "ds"
    _damaged_dataset(root, phantom)
    call = _CALL.format(root=str(root), workers=1)
    # the unguarded script also writes a file, as the docs' examples do: re-running it fails
    unguarded = _SCRIPT.format(body=f"open('out.txt', 'x').write('once')\n{call}")
    guarded = _SCRIPT.format(body="def main():\n    " + call.replace("\n", "\n    ")
                             + "\nif __name__ == '__main__':\n    main()")
    verdicts = []
    for name, text in [("unguarded.py", unguarded), ("guarded.py", guarded)]:
        (tmp_path / name).write_text(text)
        run = subprocess.run([sys.executable, name], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
        verdicts.append(json.loads(run.stdout.split("VERDICT", 1)[1]))
        (tmp_path / "out.txt").unlink(missing_ok=True)
    cell = unguarded.replace("workers=1", "workers=2")
    exec_run = subprocess.run(
        [sys.executable, "-c", f"exec(compile({cell!r}, '<cell>', 'exec'), {{}})"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    verdicts.append(json.loads(exec_run.stdout.split("VERDICT", 1)[1]))
    cli = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "verify", str(root), "--json",
                          "--workers", "2"], capture_output=True, text=True, timeout=120)
    doc = json.loads(cli.stdout)
    verdicts.append([doc["ok"], sorted([f["image"], f["where"]] for f in doc["findings"])])
    expected = [False, [[str(root / "bad.zarr"), "image/c/2/0/0"]]]
    assert cli.returncode == 1
    assert verdicts == [expected] * 4


def test_a_worker_that_cannot_start_is_not_damage(tmp_path, phantom, monkeypatch):
    """An interpreter that cannot run the worker (here: one that exits at once) is a
    warning and an in-process verification, never a finding against the data."""
    root = tmp_path / "ds"
    _damaged_dataset(root, phantom)
    monkeypatch.setattr(sys, "executable", shutil.which("false"))
    with pytest.warns(RuntimeWarning, match="no worker process could start.*exit status 1"):
        report = verify(root, workers=2)
    assert not report.ok and report.images == 2
    assert [(f.source, f.key) for f in report.findings] == [(str(root / "bad.zarr"),
                                                            "image/c/2/0/0")]
    assert "checksum" in report.findings[0].reason


def test_verify_a_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        verify(tmp_path / "nope")
    cli = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "verify", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert cli.returncode == 2 and "does not exist" in cli.stderr and "BAD" not in cli.stdout


def test_a_worker_is_blamed_only_for_the_image_it_died_on(tmp_path):
    """A worker that dies while it verifies an image is that image's finding; one that was
    already dead when it was handed an image is not (the image goes to a new worker)."""
    import os
    import threading

    from mist_zarr.verify import _Worker, _WorkerUnavailable

    stuck = tmp_path / "stuck.zarr"
    stuck.mkdir()
    os.mkfifo(stuck / "zarr.json")  # reading it blocks the worker until it is killed
    worker = _Worker()
    threading.Timer(1.0, worker.proc.kill).start()
    assert worker.check(str(stuck), False) is None
    assert worker.close().startswith("killed by SIGKILL")
    idle = _Worker()
    idle.proc.kill()
    idle.proc.wait()
    with pytest.raises(_WorkerUnavailable):
        idle.check(str(stuck), False)
    idle.close()


# -- over URLs: a host checks the copy its users read ----------------------------------


def _converted_dataset(tmp_path, phantom):
    """A dataset with two images and its catalog, converted as a host would."""
    import nibabel as nib

    for name, shift in [("a", 0), ("b", 7)]:
        nib.save(nib.Nifti1Image((phantom + shift).astype(np.int16).T, np.eye(4)),
                 tmp_path / f"{name}.nii.gz")
    report = mist_zarr.convert([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"], tmp_path / "ds")
    assert len(report.converted) == 2 and (tmp_path / "ds" / "catalog.parquet").exists()
    return tmp_path / "ds", sorted(r.path for r in report.converted)


def test_a_dataset_verifies_over_http_and_damage_is_found_there(tmp_path, phantom):
    from mist_zarr.serve import serve_in_thread

    root, names = _converted_dataset(tmp_path, phantom)
    with serve_in_thread(root) as server:
        report = verify(server.url, levels=True, workers=2)
        assert report.ok and report.images == 2 and report.chunks == 2 * phantom.shape[0]
        one = verify(f"{server.url}/{names[1]}")  # one image by its URL
        assert one.ok and one.images == 1
        data = bytearray(chunk(root / names[1], 3).read_bytes())
        data[len(data) // 2] ^= 0x40
        chunk(root / names[1], 3).write_bytes(bytes(data))
        damaged = verify(server.url)
        assert [(f.source, f.key) for f in damaged.findings] == \
            [(f"{server.url}/{names[1]}", "image/c/3/0/0")]
        # the CLI, as a host runs it
        cli = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "verify", server.url,
                              "--json"], capture_output=True, text=True, timeout=120)
        assert cli.returncode == 1, cli.stderr
        assert [f["where"] for f in json.loads(cli.stdout)["findings"]] == ["image/c/3/0/0"]
        # against the sources, read again here and compared with what the server returns
        assert verify(f"{server.url}/{names[0]}", source=[tmp_path / "a.nii.gz"]).ok


def test_http_without_a_catalog_says_what_is_missing(tmp_path, phantom):
    from mist_zarr.serve import serve_in_thread

    root, _ = _converted_dataset(tmp_path, phantom)
    (root / "catalog.parquet").unlink()
    with serve_in_thread(root) as server, \
            pytest.raises(FileNotFoundError, match="no catalog.parquet lists the dataset's images"):
        verify(server.url)


def test_a_dataset_on_s3_verifies_by_listing(tmp_path, phantom):
    """Without a catalog an object store is listed; the workers get the storage options."""
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k",
                     aws_secret_access_key="s", region_name="us-east-1"
                     ).create_bucket(Bucket="host")
        options = {"endpoint_url": endpoint, "key": "k", "secret": "s"}
        for name in ("x/one", "two"):
            mist_zarr.write_image(f"s3://host/ds/{name}", phantom, storage_options=options)
        report = verify("s3://host/ds", storage_options=options, workers=2)
        assert report.ok and report.images == 2, report.findings
    finally:
        server.stop()
