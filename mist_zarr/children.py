"""Child Python processes serving requests on their stdin: verify's and convert's workers.

A child is ``python -c`` running one function of this package (not a
:mod:`multiprocessing` process), so the caller's script is never re-run and
needs no ``if __name__ == "__main__"`` guard. It answers on a duplicate of its
stdout (:func:`answer_channel`: its own stdout goes to stderr, so a library's
print cannot corrupt the protocol); its stderr is kept in a temporary file
for the message when it dies (:func:`stop_child`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

__all__ = ["Child", "answer_channel", "start_child", "stop_child"]

_HERE = str(Path(__file__).resolve().parents[1])  # the mist_zarr this process runs


class Child:
    """A running child: its process and the file its stderr goes to."""

    def __init__(self, proc: subprocess.Popen, stderr: IO[bytes]) -> None:
        self.proc, self.stderr = proc, stderr


def start_child(module: str, function: str, *, text: bool) -> Child:
    """Start ``python -c`` calling ``module.function()`` with pipes on stdin and stdout
    (text or binary); the child finds this mist_zarr also when only sys.path does."""
    code = (f"import sys\nif {_HERE!r} not in sys.path: sys.path.insert(0, {_HERE!r})\n"
            f"from {module} import {function}\n{function}()")
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - open for the child's lifetime
    try:
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, text=text)
    except OSError:
        stderr.close()
        raise
    return Child(proc, stderr)


def stop_child(child: Child) -> str:
    """Stop the child; return how it ended (exit status and the end of its stderr)."""
    proc = child.proc
    with contextlib.suppress(OSError):
        proc.stdin.close()
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    proc.stdout.close()
    child.stderr.seek(0)
    tail = child.stderr.read()[-2000:].decode(errors="replace").strip()
    child.stderr.close()
    if code < 0:
        try:
            status = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            status = f"killed by signal {-code}"
    else:
        status = f"exit status {code}"
    return f"{status}{': ' + tail.splitlines()[-1] if tail else ''}"


def answer_channel(mode: str) -> Any:
    """In the child: the parent's answer pipe (the original stdout, ``"w"`` line-buffered
    or ``"wb"``), with stdout itself sent to stderr from now on."""
    answers = os.fdopen(os.dup(1), mode, buffering=-1 if "b" in mode else 1)
    os.dup2(2, 1)
    return answers
