"""The documentation runs and the CLI reference matches the code."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_cli_reference_is_current():
    sys.path.insert(0, str(DOCS))
    try:
        from make_cli_reference import render
    finally:
        sys.path.pop(0)
    assert (DOCS / "cli.md").read_text() == render(), "run: python docs/make_cli_reference.py"


RUNNABLE = sorted(p.name for p in DOCS.glob("*.md") if "```python\n" in p.read_text())


def test_runnable_pages_are_found():
    assert {"api.md", "datasets.md"} <= set(RUNNABLE)


@pytest.mark.parametrize("page", RUNNABLE)
def test_python_blocks_run(page, tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"{page}", "exec"), namespace)  # noqa: S102 - our own docs
    out = capsys.readouterr().out
    # every "# value" comment after a print must match what was printed
    for code, expected in re.findall(r"print\((.*?)\)\s+# (.+)", "\n".join(blocks)):
        assert expected.strip() in out, f"{page}: expected {expected!r} from print({code})"
