"""The in-process runner: one unit at a time, the next one read ahead on a thread."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..converters.sources import Unit
from ..errors import SourceIssue
from .report import SeriesResult
from .split import Submit
from .unit import Options, read_unit, write_unit

__all__ = ["Collect", "run_local"]

#: Receives each unit's outcome as it finishes (the report and the progress bar).
Collect = Callable[[Unit, tuple[list[SeriesResult], list[SourceIssue]]], None]


def run_local(units: list[Unit], dest: Any, options: Options, collect: Collect,
              submit: Submit | None = None) -> None:
    """Convert ``units`` in order in this process.

    Unit i+1 is read (pydicom, mostly Python) on a thread while unit i is
    encoded (imagecodecs releases the GIL): the second core is used, and at
    most two units' samples are in memory. With ``submit`` (a
    :class:`~.split.PartPool`'s) large images are written in parts by its processes.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="mist-read") as reader:
        ahead = reader.submit(read_unit, units[0], dest, options) if units else None
        for i, unit in enumerate(units):
            read = ahead.result()
            ahead = reader.submit(read_unit, units[i + 1], dest, options) \
                if i + 1 < len(units) else None
            collect(unit, write_unit(unit, dest, options, read, submit))
