"""The documentation runs and the CLI reference matches the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


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


def _blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def _check_printed(page: str, blocks: list[str], out: str) -> None:
    # every "# value" comment after a print must match what was printed
    for code, expected in re.findall(r"print\((.*?)\)\s+# (.+)", "\n".join(blocks)):
        assert expected.strip() in out, f"{page}: expected {expected!r} from print({code})"


@pytest.mark.parametrize("page", RUNNABLE)
def test_python_blocks_run(page, tmp_path, monkeypatch, capsys):
    blocks = _blocks(DOCS / page)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"{page}", "exec"), namespace)  # noqa: S102 - our own docs
    _check_printed(page, blocks, capsys.readouterr().out)


SCRIPTS = [f"docs/{p}" for p in RUNNABLE] + ["README.md"]


@pytest.mark.parametrize("page", SCRIPTS)
def test_python_blocks_run_as_a_script(page, tmp_path):
    """The page's examples saved as one file and run with ``python run.py`` in an empty
    folder, unguarded, as users run them: anything that re-runs ``__main__`` (process
    pools) or warns shows here and not in-process."""
    blocks = _blocks(ROOT / page)
    assert blocks, f"{page} has no python block"
    (tmp_path / "run.py").write_text("\n".join(blocks))
    run = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"{page}:\n{run.stderr}"
    assert "Traceback" not in run.stderr and "Warning" not in run.stderr, f"{page}:\n{run.stderr}"
    _check_printed(page, blocks, run.stdout)
