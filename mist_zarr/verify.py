"""``mist-zarr verify``: prove an image (or a whole dataset) decodes to what was written.

For every chunk: the codestream parses, its resolution prefixes equal the
index, the decoded samples match the CRC32C recorded at write time, and
(with ``levels``) every indexed prefix ends on a tile-part boundary and
decodes exactly like the full stream at that level. Optionally the images
are compared with their source files, read again.

What a checksum cannot catch: a chunk and its checksum changed together
consistently, or a *reader* that skips verification (plain zarr does not
check the index or the checksum; :class:`~mist_zarr.MultiscaleStore` checks
the prefix boundary of every level-k read but not the samples).
"""

from __future__ import annotations

import json
import os
import queue
import sys
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import zarr
from zarr.core.sync import sync

from .children import answer_channel, start_child, stop_child
from .codestream import CodestreamError, is_boundary, parse_codestream, prefix_lengths
from .converters.sources import iter_sources
from .errors import SourceIssue, one_line
from .format import ATTR, CHECKSUM, DONE_DIR, IMAGE, INDEX, TMP_DIR, ImageInfo, chunk_crc
from .reader import read_image
from .storage import get_bytes, get_json, join_key, open_group, resolve
from .tables import CATALOG, decode_catalog

__all__ = ["VerifyReport", "verify", "verify_image"]

def _damaged(image: str, where: str, problem: str) -> SourceIssue:
    """One thing wrong with ``image``, located by ``where``: a chunk key,
    "zarr.json", "index", "checksum" or "source"."""
    return SourceIssue(source=image, reason=problem, kind="damaged", key=where)


@dataclass
class VerifyReport:
    """Result of :func:`verify`; ``ok`` when nothing was found."""

    images: int = 0
    chunks: int = 0
    findings: list[SourceIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def merge(self, other: "VerifyReport") -> None:
        self.images += other.images
        self.chunks += other.chunks
        self.findings.extend(other.findings)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "images": self.images, "chunks": self.chunks,
                "findings": [{"image": f.source, "where": f.key, "problem": f.reason}
                             for f in self.findings]}

    def summary(self) -> str:
        head = (f"{self.images} image(s), {self.chunks} chunk(s) checked: "
                + ("OK" if self.ok else f"{len(self.findings)} problem(s)"))
        return "\n".join([head] + [f"BAD {f.source} {f.key}: {f.reason}" for f in self.findings])


def _open(path: Any, storage_options: Mapping[str, Any] | None = None
          ) -> tuple[zarr.Group | None, ImageInfo | None, list[SourceIssue]]:
    name = str(path)
    try:
        group = open_group(path, storage_options=storage_options)
    except Exception as exc:
        return None, None, [_damaged(name, "zarr.json", f"unreadable group metadata: {exc}")]
    try:
        info = ImageInfo.from_json(group.attrs[ATTR], where=name)
    except Exception as exc:
        return group, None, [_damaged(name, "zarr.json", f"no valid mist attributes: {exc!r}")]
    if not info.complete:
        return group, info, [_damaged(name, "zarr.json", "image is marked incomplete "
                                                        "(interrupted or failed write)")]
    return group, info, []


def verify_image(path: Any, *, levels: bool = False,
                 storage_options: Mapping[str, Any] | None = None) -> VerifyReport:
    """Check every chunk of the image at ``path`` (a path or URL); never raises for
    damage, reports it."""
    name = str(path)
    report = VerifyReport(images=1)
    group, info, findings = _open(path, storage_options)
    report.findings += findings
    if group is None or info is None or findings:
        return report
    try:
        index = group[INDEX][...]
        if index.shape != info.grid + (info.levels + 1,):
            raise ValueError(f"shape {index.shape}, expected {info.grid + (info.levels + 1,)}")
    except Exception as exc:
        report.findings.append(_damaged(name, "index", f"prefix index unreadable: {exc}"))
        return report
    try:
        crcs = group[CHECKSUM][...]
        if crcs.shape != info.grid:
            raise ValueError(f"shape {crcs.shape}, expected {info.grid}")
    except Exception as exc:
        report.findings.append(_damaged(name, "checksum", f"checksums unreadable: {exc}"))
        return report
    image = group[IMAGE]
    store, base = image.store_path.store, image.store_path.path
    zero_crc = chunk_crc(np.zeros(info.chunks, info.stored_dtype))
    for coords in np.ndindex(*info.grid):
        key = image.metadata.encode_chunk_key(coords)
        where = f"{IMAGE}/{key}"
        report.chunks += 1
        row = [int(v) for v in index[coords]]
        try:
            data = get_bytes(store, f"{base}/{key}")
        except Exception as exc:
            report.findings.append(_damaged(name, where, f"unreadable: {exc}"))
            continue
        if not any(row):
            if data is not None:
                report.findings.append(_damaged(name, where, "chunk exists but the index marks "
                                                            "it absent"))
            elif int(crcs[coords]) != zero_crc:
                report.findings.append(_damaged(name, where, "chunk is missing (the checksum "
                                                            "says it was not all fill value)"))
            continue
        if data is None:
            report.findings.append(_damaged(name, where, "chunk is missing"))
            continue
        report.findings += _check_chunk(name, where, data, row, int(crcs[coords]), info, levels)
    return report


def _check_chunk(name: str, where: str, data: bytes, row: list[int], crc: int,
                 info: ImageInfo, levels: bool) -> list[SourceIssue]:
    out: list[SourceIssue] = []
    if len(data) != row[0]:
        out.append(_damaged(name, where, f"{len(data)} bytes, the index says {row[0]}"))
    try:
        cs = parse_codestream(data)
        found = list(prefix_lengths(cs)[: info.levels + 1])
    except CodestreamError as exc:
        return out + [_damaged(name, where, f"codestream damaged: {exc}")]
    if found != row:
        out.append(_damaged(name, where, f"prefix index {row} disagrees with the codestream "
                                        f"{found}"))
    try:
        samples = imagecodecs.htj2k_decode(data)
    except Exception as exc:
        return out + [_damaged(name, where, f"does not decode: {exc}")]
    if samples.size != int(np.prod(info.chunks)) or \
            chunk_crc(samples.astype(info.stored_dtype, copy=False)) != crc:
        out.append(_damaged(name, where, "decoded samples do not match the checksum written "
                                        "with them"))
    if levels:
        for k in range(1, info.levels + 1):
            n = row[k]
            if not is_boundary(data[n: n + 2]):
                out.append(_damaged(name, where, f"level-{k} prefix of {n} bytes does not end "
                                                "on a tile-part boundary"))
                continue
            try:
                ok = np.array_equal(imagecodecs.htj2k_decode(data[:n], skipres=k),
                                    imagecodecs.htj2k_decode(data, skipres=k))
            except Exception as exc:
                ok, exc_text = False, str(exc)
            else:
                exc_text = ""
            if not ok:
                out.append(_damaged(name, where, f"level-{k} prefix does not decode like the "
                                                f"full stream {exc_text}".strip()))
    return out


def _is_image(path: Path) -> bool:
    try:
        doc = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return ATTR in doc.get("attributes", {})


def _find_images(root: Path) -> list[Path]:
    """Every folder under ``root`` whose zarr.json carries (or should carry) mist attributes."""
    images = []
    for dirpath, dirs, files in os.walk(root):
        here = Path(dirpath)
        # a dataset's bookkeeping: images being written (or left by a killed
        # writer, removed by the next convert) and completion markers
        dirs[:] = [d for d in dirs if d not in (TMP_DIR, DONE_DIR)]
        if "zarr.json" not in files:
            continue
        if _is_image(here) or {IMAGE, INDEX} <= set(dirs):
            images.append(here)
            dirs[:] = []
    return sorted(images)


def verify(path: str | os.PathLike, *, levels: bool = False, source: Any = None,
           workers: int | None = None,
           storage_options: Mapping[str, Any] | None = None) -> VerifyReport:
    """Verify one image, or every image of a dataset root, in worker processes.

    ``path`` is a local path or a URL (``s3://``, ``https://`` ... via fsspec):
    a host checks the copy users read. A remote dataset's images are the ones
    its ``catalog.parquet`` lists (what its users find), or, without a catalog,
    the ones a listing of the store finds (HTTP cannot list).

    Each image is decoded in a separate Python process (``python -c``, not
    :mod:`multiprocessing`, so the caller's script is never re-run and needs
    no ``if __name__ == "__main__"`` guard), so a decoder crash on damaged
    data is reported against that image instead of taking the run down. If
    no worker process can start, the images are verified in threads of this
    process instead, with a warning. With ``source`` the images are compared
    with the files they came from. A local path that does not exist raises
    :class:`FileNotFoundError`, as does a URL without a zarr group.
    """
    if isinstance(path, str) and path.startswith("file://"):
        path = path[len("file://"):]
    remote = isinstance(path, str) and "://" in path
    images = _find_remote(path, storage_options) if remote else _find_local(Path(path))
    report = VerifyReport()
    if not images:
        report.findings.append(_damaged(str(path), "zarr.json", "no mist-zarr image found here"))
        return report
    workers = max(1, min(workers or os.cpu_count() or 1, len(images)))
    for one in _verify_isolated([where for _, where in images], levels, workers,
                                storage_options):
        report.merge(one)
    if source is not None:
        report.merge(_compare_sources(images, source, storage_options))
    return report


def _find_local(root: Path) -> list[tuple[str, str]]:
    """(name relative to the root, path) of each image at or under ``root``; the name
    of ``root`` itself is ""."""
    if not root.exists():
        raise FileNotFoundError(f"{root}: does not exist")
    if _is_image(root):
        return [("", str(root))]  # "": the image itself, whatever its source's name
    return [(str(p.relative_to(root)), str(p)) for p in _find_images(root)]


def _find_remote(url: str, storage_options: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(name relative to the root, URL) of the image at ``url`` or of the dataset's images."""
    root = url.rstrip("/")
    store, prefix = resolve(root, storage_options)
    doc = get_json(store, join_key(prefix, "zarr.json"), strict=False)
    if isinstance(doc, dict) and ATTR in doc.get("attributes", {}):
        return [("", root)]
    data = get_bytes(store, join_key(prefix, CATALOG))
    listed = decode_catalog(data) if data is not None else None
    if listed is not None:
        return [(str(p), f"{root}/{p}") for p in listed.column("path")]
    try:
        keys, why = set(sync(_list(store, prefix))), ""
    except Exception as exc:  # e.g. HTTP, which has no listing
        keys, why = set(), f"the store cannot be listed ({one_line(exc)})"
    # an image is a group with its image and index arrays (as _find_images has it)
    names = sorted(k[: -len("/zarr.json")] for k in keys if k.endswith("/zarr.json")
                   and f"{k[: -len('zarr.json')]}{IMAGE}/zarr.json" in keys
                   and f"{k[: -len('zarr.json')]}{INDEX}/zarr.json" in keys
                   and k.split("/", 1)[0] not in (TMP_DIR, DONE_DIR))
    if not names:
        raise FileNotFoundError(
            f"{url}: not a mist-zarr image, and no catalog.parquet lists the dataset's images "
            f"({why or 'a listing of the store found none'}); write the catalog where the "
            "dataset was converted (mist-zarr catalog DATASET) and copy it with the images")
    return [(name, f"{root}/{name}") for name in names]


async def _list(store: Any, prefix: str) -> list[str]:
    """Every key under ``prefix``, relative to it."""
    base = f"{prefix}/" if prefix else ""
    return [key[len(base):] async for key in store.list_prefix(base)]


class _WorkerUnavailable(RuntimeError):
    """A worker process exited before it was ready to verify anything."""


class _Worker:
    """One ``python -c`` child (:mod:`mist_zarr.children`) verifying images sent on
    stdin, one JSON line each."""

    def __init__(self) -> None:
        try:
            self.child = start_child("mist_zarr.verify", "_serve", text=True)
        except OSError as exc:
            raise _WorkerUnavailable(f"{sys.executable}: {exc}") from exc
        self.proc = self.child.proc
        if self.proc.stdout.readline().strip() != _READY:
            raise _WorkerUnavailable(self.close())

    def check(self, path: str, levels: bool,
              storage_options: Mapping[str, Any] | None = None) -> VerifyReport | None:
        """The report for ``path``, or None if the child died verifying it.

        Raises :class:`_WorkerUnavailable` if it had died before it was asked.
        """
        try:
            self.proc.stdin.write(json.dumps({"path": path, "levels": levels,
                                              "storage_options": storage_options}) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:  # the child was gone before it saw the image
            raise _WorkerUnavailable(str(exc)) from exc
        try:
            answer = self.proc.stdout.readline()
        except OSError:
            return None
        if not answer:
            return None
        doc = json.loads(answer)
        if "error" in doc:
            raise RuntimeError(f"verifying {path} failed: {doc['error']}")
        return VerifyReport(images=doc["images"], chunks=doc["chunks"], findings=[
            _damaged(image, where, problem) for image, where, problem in doc["findings"]])

    def close(self) -> str:
        """Stop the child; return how it ended (exit status and the end of its stderr)."""
        return stop_child(self.child)


_READY = "mist-zarr verify worker ready"


def _serve() -> None:
    """The worker's loop (run by :class:`_Worker` in the child process)."""
    answers = answer_channel("w")
    answers.write(_READY + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            r = verify_image(request["path"], levels=request["levels"],
                             storage_options=request.get("storage_options"))
            doc: dict[str, Any] = {"images": r.images, "chunks": r.chunks, "findings": [
                [f.source, f.key, f.reason] for f in r.findings]}
        except Exception as exc:  # a bug, not damage: the parent raises it
            doc = {"error": repr(exc)}
        answers.write(json.dumps(doc) + "\n")


def _verify_isolated(images: list[str], levels: bool, workers: int,
                     storage_options: Mapping[str, Any] | None = None) -> list[VerifyReport]:
    """Reports in the order of ``images``, each from a worker process (see :func:`verify`)."""
    todo = queue.SimpleQueue()
    for i, name in enumerate(images):
        todo.put((i, name))
    results: list[VerifyReport | None] = [None] * len(images)
    unavailable: list[str] = []  # why a worker could not start: then none is tried again
    in_process: list[str] = []
    retried: set[str] = set()  # images handed to a worker that had died before it saw them

    def run() -> None:
        worker = None
        try:
            while True:
                try:
                    i, name = todo.get_nowait()
                except queue.Empty:
                    return
                if worker is None and not unavailable:
                    try:
                        worker = _Worker()
                    except _WorkerUnavailable as exc:
                        unavailable.append(str(exc))
                if worker is None:
                    in_process.append(name)
                    results[i] = verify_image(name, levels=levels,
                                              storage_options=storage_options)
                    continue
                try:
                    found = worker.check(name, levels, storage_options)
                except _WorkerUnavailable:  # died idle: not this image's doing; a new one tries
                    worker.close()
                    worker = None
                    if name not in retried:
                        retried.add(name)
                        todo.put((i, name))
                    else:  # twice: verify it here rather than blame it
                        in_process.append(name)
                        results[i] = verify_image(name, levels=levels,
                                              storage_options=storage_options)
                    continue
                if found is None:  # the child died on this image's data
                    how, worker = worker.close(), None
                    found = VerifyReport(images=1, findings=[_damaged(
                        name, IMAGE, f"the decoder crashed on this image's data (the verifying "
                                     f"process died: {how})")])
                results[i] = found
        finally:
            if worker is not None:
                worker.close()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for fut in [pool.submit(run) for _ in range(workers)]:
            fut.result()
    if in_process:
        why = (f"no worker process could start ({unavailable[0]})" if unavailable else
               "worker processes died before they were given the image(s)")
        warnings.warn(f"mist-zarr verify: {why}; verified {len(in_process)} image(s) in this process instead, without "
                      "crash isolation", RuntimeWarning, stacklevel=3)
    return [r for r in results if r is not None]


def _compare_sources(images: list[tuple[str, str]], source: Any,
                     storage_options: Mapping[str, Any] | None) -> VerifyReport:
    """Read the sources again as `convert` does and compare samples image by image."""

    report = VerifyReport()
    stored = dict(images)
    for image in iter_sources(source, problems=[]):
        target = stored.get(image.name) or stored.get("")
        if target is None:
            report.findings.append(_damaged(image.name, "source",
                                           "source image has no converted counterpart"))
            continue

        try:
            back = read_image(target, storage_options=storage_options)
        except Exception as exc:
            report.findings.append(_damaged(target, "source", f"unreadable: {exc}"))
            continue
        expected = np.asarray(image.data)
        if back.shape != expected.shape or not np.array_equal(back, expected):
            report.findings.append(_damaged(target, "source",
                                           "samples differ from the source files"))
    return report
