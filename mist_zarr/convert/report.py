"""What a conversion did: one :class:`SeriesResult` per image, one SourceIssue per problem."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import SourceIssue
from ..tables import dumps

__all__ = ["ConvertReport", "Problem", "SeriesResult", "dumps", "issue_json"]

#: Deprecated name of :class:`mist_zarr.errors.SourceIssue` (a source not converted, and why).
Problem = SourceIssue


@dataclass
class SeriesResult:
    """One image written (or found complete) under the dataset root."""

    path: str
    source_format: str
    shape: tuple[int, ...]
    dtype: str
    bytes_in: int
    bytes_out: int
    sources: int
    status: str = "converted"  # or "existing"
    warnings: list[str] = field(default_factory=list)
    parts: int = 1  # slice ranges written by different workers (convert.split)


@dataclass
class ConvertReport:
    """What :func:`convert` did. ``ok`` is False when any source failed."""

    dest: str
    converted: list[SeriesResult] = field(default_factory=list)
    problems: list[SourceIssue] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[SourceIssue]:
        return [p for p in self.problems if p.kind == "failed"]

    @property
    def skipped(self) -> list[SourceIssue]:
        return [p for p in self.problems if p.kind == "skipped"]

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def bytes_in(self) -> int:
        return sum(s.bytes_in for s in self.converted if s.status == "converted")

    @property
    def bytes_out(self) -> int:
        return sum(s.bytes_out for s in self.converted if s.status == "converted")

    def to_json(self) -> dict[str, Any]:
        return {"dest": self.dest, "ok": self.ok, "seconds": self.seconds,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "converted": [asdict(s) for s in self.converted],
                "problems": [issue_json(p) for p in self.problems]}

    def summary(self, max_skipped: int = 10, max_warnings: int = 5) -> str:
        new = [s for s in self.converted if s.status == "converted"]
        lines = [
            f"{len(new)} image(s) converted, {len(self.converted) - len(new)} already complete, "
            f"{len(self.failed)} failed, {len(self.skipped)} file(s) skipped "
            f"in {self.seconds:.1f} s",
        ]
        if new:
            ratio = self.bytes_in / max(self.bytes_out, 1)
            lines.append(f"bytes in {self.bytes_in:,} -> out {self.bytes_out:,} "
                         f"(ratio {ratio:.2f})")
        warned = [s for s in new if s.warnings]
        for s in warned:  # printed per image, so that they reach the person converting
            for w in s.warnings[:max_warnings]:
                lines.append(f"warning {s.path}: {w}")
            if len(s.warnings) > max_warnings:
                lines.append(f"warning {s.path}: ... and {len(s.warnings) - max_warnings} more")
        if warned:
            total = sum(len(s.warnings) for s in warned)
            lines.append(f"{len(warned)} image(s) converted with warnings ({total} in all); "
                         "`mist-zarr ls DEST --warnings` lists them, `mist-zarr info IMAGE` "
                         "shows an image's")
        for p in self.failed:
            lines.append(f"FAILED  {p.source}: {p.reason}")
        for p in self.skipped[:max_skipped]:
            lines.append(f"skipped {p.source}: {p.reason}")
        if len(self.skipped) > max_skipped:
            lines.append(f"... and {len(self.skipped) - max_skipped} more skipped file(s) "
                         "(all are listed in the JSON report)")
        return "\n".join(lines)


def issue_json(issue: SourceIssue) -> dict[str, str]:
    """A problem as ``convert --json`` and failures.csv show it (the former Problem's keys)."""
    return {"source": issue.source, "reason": issue.reason, "kind": issue.kind, "key": issue.key}


