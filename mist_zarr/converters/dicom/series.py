"""Read one series: load headers, expand frames, plan stacks, decode pixels and assemble volumes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DicomError, SourceIssue, one_line
from ..base import DEFAULT_MAX_BYTES, LazyPlanes, SourceImage
from .frames import _expand_frames, _Frame
from .header import _FileInfo, _load_file
from .jsonmodel import _json_value, _JsonBuilder
from .naming import suggest_name
from .pixels import _decode_file, _FrameReader, _output_itemsize
from .scan import PathLike, ScanResult, SeriesRef, _scan, scan_dicom
from .stack import _group_frames, _Plan, _plan_stack
from .tags import _keyword, _text
from .volume import DicomVolume


def _resolve(
    ref_or_files: SeriesRef | PathLike | Iterable[PathLike],
) -> tuple[SeriesRef, list[str]]:
    """Return the series to read and warnings for files ignored while resolving it."""
    if isinstance(ref_or_files, SeriesRef):
        return ref_or_files, []
    scan, explicit = _scan(ref_or_files)
    issues = scan.rejected + scan.skipped
    named = [i for i in issues if i.source in explicit]
    if named:
        raise DicomError("; ".join(f"{i.source}: {i.reason}" for i in named))
    if not scan.series:
        detail = "; ".join(f"{i.source}: {i.reason}" for i in issues[:5])
        raise DicomError("no DICOM image series found" + (f" ({detail})" if detail else ""))
    if len(scan.series) > 1:
        uids = ", ".join(s.uid or s.key for s in scan.series)
        raise DicomError(
            f"the files hold {len(scan.series)} series ({uids}); scan_dicom() them and read each SeriesRef"
        )
    ignored = [f"ignored {i.source}: {i.reason}" for i in issues]
    return scan.series[0], ignored


def _series_label(ref: SeriesRef) -> str:
    desc = f" ({ref.description})" if ref.description else ""
    if ref.uid:
        return f"series {ref.uid}{desc}"
    where = str(Path(ref.files[0]).parent) if ref.files else "?"
    return f"series without SeriesInstanceUID in {where}{desc}"


def read_dicom_series(
    ref_or_files: SeriesRef | PathLike | Iterable[PathLike],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    batch_bytes: int | None = None,
) -> list[DicomVolume]:
    """Read one series (a SeriesRef, or files / folders holding exactly one series) into volumes.

    Returns one DicomVolume per geometrically consistent stack. Raises
    DicomError naming the file or series and the reason when a file is bad,
    the geometry is inconsistent, the pixels cannot be decoded losslessly,
    or the decoded size would exceed ``max_bytes`` (checked before decoding).

    With ``batch_bytes``, a stack of single-frame files that decodes to more
    than that is returned lazily, as :class:`~mist_zarr.converters.base.LazyPlanes`
    read in batches of at most ``batch_bytes``: every file is decoded once
    here (for its value range, photometric interpretation and lossy flags,
    which the metadata needs) and once more when its batch is written, so
    memory stays bounded by a batch, at the cost of a second decode.
    """
    ref, ignored = _resolve(ref_or_files)
    label = _series_label(ref)
    try:
        return _read_series(ref, label, max_bytes, ignored, batch_bytes)
    except (DicomError, MemoryError, ImportError):
        raise
    except Exception as exc:
        raise DicomError(f"{label}: unexpected error while reading ({one_line(exc)})") from exc


def iter_dicom_volumes(
    paths: ScanResult | PathLike | Iterable[PathLike], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> Iterator[tuple[SeriesRef, list[DicomVolume] | DicomError]]:
    """Yield (series, volumes or the DicomError that refused it) for every series found."""
    scan = paths if isinstance(paths, ScanResult) else scan_dicom(paths)
    for ref in scan.series:
        try:
            yield ref, read_dicom_series(ref, max_bytes=max_bytes)
        except DicomError as exc:
            yield ref, exc


def dicom_sources(
    files: Iterable[PathLike] | PathLike,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    problems: list[SourceIssue] | None = None,
) -> Iterator[SourceImage]:
    """Yield a ``SourceImage`` per volume of every series in ``files`` (the ``mist-zarr convert`` hook).

    Rejected files and refused series are appended to ``problems`` as
    :class:`~mist_zarr.errors.SourceIssue` with kind "failed"; DICOM objects
    without an image and duplicates with kind "skipped".
    """
    scan = scan_dicom(files)
    sink: list[SourceIssue] = problems if problems is not None else []
    sink += [replace(i, kind="failed") for i in scan.rejected]
    sink += list(scan.skipped)
    for ref, result in iter_dicom_volumes(scan, max_bytes=max_bytes):
        if isinstance(result, DicomError):
            sink.append(SourceIssue(ref.uid or ref.key, str(result), kind="failed"))
            continue
        for volume in result:
            yield volume.to_source_image()


@dataclass(eq=False)  # identity semantics: stacks are collected in sets and dicts
class _Stack:
    """One planned stack of the series being read, and what decoding its files found."""

    plan: _Plan
    size: int  # decoded bytes
    lazy: bool = False  # returned as LazyPlanes, decoded again in batches when written
    data: np.ndarray | LazyPlanes | None = None  # (slices, rows, cols[, 3]) unless lazy
    photometrics: set[str] = field(default_factory=set)  # as decoded, must end up one
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    lossy: list[str] = field(default_factory=list)  # reasons the source may be lossy
    # lazy stacks only: plane shape, dtype and value range, from the first decode
    survey: tuple[tuple[int, ...], np.dtype, float, float] | None = None


@dataclass
class _SeriesRead:
    """What assembling each volume needs to know about the whole series."""

    ref: SeriesRef
    label: str
    files: list[_FileInfo]
    split: bool  # more than one stack: names and keys carry the stack key
    ignored: list[str]  # warnings for files ignored while resolving the series


def _read_series(
    ref: SeriesRef, label: str, max_bytes: int, ignored: list[str], batch_bytes: int | None = None
) -> list[DicomVolume]:
    if not ref.files:
        raise DicomError(f"{label}: no files")
    builder = _JsonBuilder()
    files = [_load_instance([p, *ref.copies[p]], builder, label) if p in ref.copies
             else _load_file(p, builder) for p in ref.files]
    stacks = _plan_series(files, label)
    _check_size(stacks, label, max_bytes)
    for stack in stacks:
        stack.lazy = (batch_bytes is not None and stack.size > batch_bytes
                      and _batchable(stack.plan, files))
    _decode_stacks(stacks, files, label)
    for stack in stacks:
        if stack.lazy:
            assert batch_bytes is not None
            stack.data = _lazy_planes(stack, files, label, batch_bytes)
    series = _SeriesRead(ref, label, files, len(stacks) > 1, ignored)
    return [_assemble(stack, series) for stack in stacks]


def _load_instance(paths: list[str], builder: _JsonBuilder, label: str) -> _FileInfo:
    """The first copy of an instance (files sharing a SOPInstanceUID) that reads and decodes.

    Every copy is decoded: copies whose pixels differ are a conflict, refused
    rather than resolved by file order; copies that fail are named in a warning.
    """
    good: list[tuple[_FileInfo, np.ndarray]] = []
    failed: list[str] = []
    for path in paths:
        try:
            info = _load_file(path, builder)
            good.append((info, _decode_file(info)[0]))
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken copy: the next one may be good
            failed.append(f"{path}: {one_line(exc)}")
    if not good:
        raise DicomError(f"{label}: no copy of the instance in {', '.join(paths)} decodes "
                         f"({'; '.join(failed)})")
    chosen, pixels = good[0]
    for other, theirs in good[1:]:
        if theirs.shape != pixels.shape or not np.array_equal(theirs, pixels):
            raise DicomError(
                f"{label}: conflict: {chosen.path} and {other.path} share SOPInstanceUID "
                f"{_text(chosen.ds, 'SOPInstanceUID')} but their pixel data differ "
                f"({pixels.dtype}{pixels.shape} vs {theirs.dtype}{theirs.shape}); refusing to "
                "choose one")
    if failed:
        chosen.warnings.append(f"used {chosen.path} for SOPInstanceUID "
                               f"{_text(chosen.ds, 'SOPInstanceUID')}: its other copies failed "
                               f"({'; '.join(failed)})")
    return chosen


def _plan_series(files: list[_FileInfo], label: str) -> list[_Stack]:
    """Expand every file into frames, group them into stacks and plan each, in file order."""
    frames: list[_Frame] = []
    for fi, info in enumerate(files):
        frames.extend(_expand_frames(fi, info))
    plans: list[_Plan] = []
    for group in _group_frames(frames):
        plans.extend(_plan_stack(group, files, label))
    plans.sort(key=lambda p: (p.frames[0].file, p.frames[0].index, p.stack_key))
    stacks = []
    for plan in plans:
        info = files[plan.frames[0].file]
        itemsize, samples = _output_itemsize(info)
        rows, cols = (
            (info.mosaic[1], info.mosaic[2])
            if plan.frames[0].tile is not None and info.mosaic is not None
            else (info.rows, info.cols)
        )
        stacks.append(_Stack(plan, len(plan.frames) * rows * cols * samples * itemsize))
    return stacks


def _check_size(stacks: list[_Stack], label: str, max_bytes: int) -> None:
    total = sum(s.size for s in stacks)
    if total > max_bytes:
        raise DicomError(
            f"{label}: decoding needs {total} bytes ({len(stacks)} stack(s), "
            f"{sum(len(s.plan.frames) for s in stacks)} "
            f"slices) which exceeds max_bytes={max_bytes}; refused before decoding"
        )


def _decode_stacks(stacks: list[_Stack], files: list[_FileInfo], label: str) -> None:
    """Decode every file once, in file order, and put each frame into its stack."""
    targets: dict[int, list[tuple[_Stack, int, _Frame]]] = {}
    for stack in stacks:
        for slot, f in enumerate(stack.plan.frames):
            targets.setdefault(f.file, []).append((stack, slot, f))
    for fi in sorted(targets):
        info = files[fi]
        arr, photometric, notes, caught, lossy_reason = _decode_file(info)
        for stack in dict.fromkeys(t[0] for t in targets[fi]):
            stack.photometrics.add(photometric)
            stack.notes += notes
            stack.warnings += [f"pydicom: {w}" for w in caught]
            if lossy_reason:
                stack.lossy.append(lossy_reason)
        for stack, slot, f in targets[fi]:
            _place(stack, slot, f, arr[f.index], info, label)
        del arr


def _place(stack: _Stack, slot: int, f: _Frame, src: np.ndarray, info: _FileInfo, label: str) -> None:
    """Store one decoded frame in its stack (or, for a lazy stack, only survey it)."""
    if stack.lazy:  # survey only: the pixels are decoded again when written
        shape, dtype, lo, hi = stack.survey or (src.shape, src.dtype, np.inf, -np.inf)
        if (shape, dtype) != (src.shape, src.dtype):
            raise DicomError(
                f"{info.path}: decoded {src.dtype}{src.shape} differs from "
                f"{dtype}{shape} of the other images of {label}"
            )
        stack.survey = (shape, dtype, min(lo, float(src.min())), max(hi, float(src.max())))
        return
    if f.tile is not None:
        side, tr, tc = info.mosaic  # type: ignore[misc]
        r0, c0 = (f.tile // side) * tr, (f.tile % side) * tc
        src = src[r0 : r0 + tr, c0 : c0 + tc]
    out = stack.data
    if out is None:
        out = stack.data = np.empty((len(stack.plan.frames),) + src.shape, dtype=src.dtype)
    elif out.shape[1:] != src.shape or out.dtype != src.dtype:
        raise DicomError(
            f"{info.path}: decoded {src.dtype}{src.shape} differs from {out.dtype}{out.shape[1:]} "
            f"of the other images of {label}"
        )
    out[slot] = src


def _lazy_planes(stack: _Stack, files: list[_FileInfo], label: str, batch_bytes: int) -> LazyPlanes:
    assert stack.survey is not None
    plane_shape, dtype, lo, hi = stack.survey
    frames, lead = stack.plan.frames, stack.plan.lead
    # batches of whole entries of the first axis (slices, or volumes of a time series)
    inner = int(np.prod(lead[1:], dtype=np.int64))
    step = max(1, batch_bytes // max(1, inner * int(np.prod(plane_shape)) * dtype.itemsize))
    batches = [(a, min(a + step, lead[0])) for a in range(0, lead[0], step)]
    reader = _FrameReader([files[f.file] for f in frames], [f.index for f in frames], lead[1:],
                          label)
    return LazyPlanes(lead + plane_shape, dtype, batches, reader, (lo, hi))


def _batchable(plan: _Plan, files: list[_FileInfo]) -> bool:
    """A stack that can be read in batches of slices: one frame per file, no mosaic."""
    return (all(f.tile is None for f in plan.frames)
            and all(files[f.file].n_frames == 1 for f in plan.frames)
            and len({f.file for f in plan.frames}) == len(plan.frames))


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def _assemble(stack: _Stack, series: _SeriesRead) -> DicomVolume:
    plan, files, label = stack.plan, series.files, series.label
    if len(stack.photometrics) != 1:
        raise DicomError(
            f"{label}: images decode to different photometric interpretations {sorted(stack.photometrics)}"
        )
    data = stack.data
    assert data is not None
    # (slices, rows, cols[, 3]) as decoded; lazy stacks carry their leading axes already
    colour = data.ndim - (len(plan.lead) if stack.lazy else 1) == 3
    if not stack.lazy:
        data = data.reshape(plan.lead + data.shape[1:])
    dims = plan.dims + (("c",) if colour else ())
    notes = _unique(stack.notes)
    warn = _unique(stack.warnings) + series.ignored
    lossy = _unique(stack.lossy)
    order = list(dict.fromkeys(f.file for f in plan.frames))
    base = files[plan.frames[0].file]
    per_slice, per_slice_vr, varying = _per_slice(plan, files, order)
    metadata = {t: e for t, e in base.json().items() if t not in varying}
    if base.builder.dropped:
        dropped = ", ".join(sorted(base.builder.dropped))
        warn = warn + [f"attributes with invalid values left out of the JSON metadata: {dropped}"]
    if base.mosaic is not None and plan.frames[0].tile is not None:
        side, tr, tc = base.mosaic
        n = max(f.tile or 0 for f in plan.frames) + 1
        mosaic_note = (
            f"Siemens mosaic de-mosaicked: {n} slices of {tr}x{tc} from a {side}x{side} grid "
            f"({base.rows}x{base.cols}); Rows/Columns in metadata describe the mosaic"
        )
        notes = [mosaic_note, *notes]
    for fi in order:
        warn = warn + files[fi].warnings
    key, ref = plan.stack_key, series.ref
    return DicomVolume(
        data=data,
        dims=dims,
        spacing=tuple(float(v) for v in plan.spacing),
        affine=plan.affine,
        metadata=metadata,
        per_slice=per_slice,
        per_slice_vr=per_slice_vr,
        warnings=_unique(ref.warnings + plan.warnings + warn),
        notes=_unique(plan.notes + notes + [f"lossy source: {r}" for r in lossy]),
        source_files=[files[fi].path for fi in order],
        lossy_source=bool(lossy),
        photometric=next(iter(stack.photometrics)),
        source_photometric=base.photometric,
        transfer_syntaxes=_unique([str(files[fi].ts) for fi in order]),
        series_uid=ref.uid,
        stack_key=key,
        modality=_text(base.ds, "Modality"),
        name=suggest_name(base.ds, ref.uid or ref.key or base.path, key if series.split else ""),
        slice_offsets=plan.slice_offsets,
    )


def _per_slice(
    plan: _Plan, files: list[_FileInfo], order: list[int]
) -> tuple[dict[str, list[Any]], dict[str, str], list[str]]:
    """Per-slice values (and their VRs) of a stack, and the tags that vary between its files."""
    local = {fi: i for i, fi in enumerate(order)}
    base = files[plan.frames[0].file]
    per_slice: dict[str, list[Any]] = {
        "source_file_index": [local[f.file] for f in plan.frames],
        "frame_index": [f.index for f in plan.frames],
    }
    per_slice_vr: dict[str, str] = {}
    if any(f.tile is not None for f in plan.frames):
        per_slice["mosaic_tile_index"] = [f.tile for f in plan.frames]
    if plan.positions is not None:
        per_slice["position_lps"] = [[float(v) for v in p] for p in plan.positions]
    all_tags = sorted(set().union(*(files[fi].signature.keys() for fi in order)))
    varying = [t for t in all_tags if len({files[fi].signature.get(t) for fi in order}) > 1]
    for tag in varying:
        values = {fi: files[fi].element_json(tag) for fi in order}
        name = _keyword(tag)
        per_slice_vr[name] = next((v["vr"] for v in values.values() if v and "vr" in v), "UN")
        per_slice[name] = [_json_value(values[f.file]) for f in plan.frames]
    if base.enhanced:
        per_slice["PerFrameFunctionalGroupsSequence"] = [
            [item] if (item := files[f.file].perframe(f.index)) is not None else None
            for f in plan.frames
        ]
        per_slice_vr["PerFrameFunctionalGroupsSequence"] = "SQ"
    return per_slice, per_slice_vr, varying
