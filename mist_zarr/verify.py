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
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import zarr

from .codestream import CodestreamError, is_boundary, parse_codestream, prefix_lengths
from .converters.sources import iter_sources
from .errors import SourceIssue
from .format import ATTR, CHECKSUM, DONE_DIR, IMAGE, INDEX, TMP_DIR, ImageInfo, chunk_crc
from .reader import read_image
from .storage import get_bytes, open_group

__all__ = ["VerifyReport", "verify", "verify_image"]

# fork() of a process running zarr's event-loop thread can deadlock; forkserver
# starts workers from a clean, single-threaded server.
_CONTEXT = multiprocessing.get_context("forkserver")


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


def _open(path: Any) -> tuple[zarr.Group | None, ImageInfo | None, list[SourceIssue]]:
    name = str(path)
    try:
        group = open_group(path)
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


def verify_image(path: Any, *, levels: bool = False) -> VerifyReport:
    """Check every chunk of the image at ``path``; never raises for damage, reports it."""
    name = str(path)
    report = VerifyReport(images=1)
    group, info, findings = _open(path)
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


def _verify_one(args: tuple[str, bool]) -> VerifyReport:
    return verify_image(args[0], levels=args[1])


def verify(path: str | os.PathLike, *, levels: bool = False, source: Any = None,
           workers: int | None = None) -> VerifyReport:
    """Verify one image, or every image of a dataset root, in parallel processes.

    Each image is decoded in a worker process, so a decoder crash on damaged
    data is reported against that image instead of taking the run down.
    With ``source`` the images are compared with the files they came from.
    """
    root = Path(path)
    images = [root] if _is_image(root) else _find_images(root)
    report = VerifyReport()
    if not images:
        report.findings.append(_damaged(str(root), "zarr.json", "no mist-zarr image found here"))
        return report
    workers = max(1, min(workers or os.cpu_count() or 1, len(images)))
    with ProcessPoolExecutor(max_workers=workers, mp_context=_CONTEXT) as pool:
        futures = {str(im): pool.submit(_verify_one, (str(im), levels)) for im in images}
        for name, fut in futures.items():
            try:
                report.merge(fut.result())
            except BrokenProcessPool:  # a crash takes the pool down: isolate what is left
                report.merge(_isolated(name, levels))
    if source is not None:
        report.merge(_compare_sources(root, images, source))
    return report


def _isolated(name: str, levels: bool) -> VerifyReport:
    """Verify in a child process; a crash becomes a finding."""
    with ProcessPoolExecutor(max_workers=1, mp_context=_CONTEXT) as pool:
        try:
            return pool.submit(_verify_one, (name, levels)).result()
        except BrokenProcessPool:
            return VerifyReport(images=1, findings=[_damaged(
                name, IMAGE, "the decoder crashed on this image's data (damaged chunk)")])


def _compare_sources(root: Path, images: list[Path], source: Any) -> VerifyReport:
    """Read the sources again as `convert` does and compare samples image by image."""

    report = VerifyReport()
    stored = {str(p.relative_to(root)) if p != root else p.name: p for p in images}
    for image in iter_sources(source, problems=[]):
        target = stored.get(image.name) or (stored.get(root.name) if len(stored) == 1 else None)
        if target is None:
            report.findings.append(_damaged(image.name, "source",
                                           "source image has no converted counterpart"))
            continue

        try:
            back = read_image(target)
        except Exception as exc:
            report.findings.append(_damaged(str(target), "source", f"unreadable: {exc}"))
            continue
        expected = np.asarray(image.data)
        if back.shape != expected.shape or not np.array_equal(back, expected):
            report.findings.append(_damaged(str(target), "source",
                                           "samples differ from the source files"))
    return report
