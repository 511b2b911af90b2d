"""Regenerate docs/cli.md from the argparse definitions: ``python docs/make_cli_reference.py``.

``tests/test_docs.py`` fails when the committed file is out of date.
"""

from __future__ import annotations

import os
from pathlib import Path

from mist_zarr.cli import build_parser

OUT = Path(__file__).with_name("cli.md")


def render() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal width
    parser = build_parser()
    parts = ["# Command-line reference", "",
             "Generated from the argument parser by `docs/make_cli_reference.py`; "
             "a test keeps it in step with the code.", "",
             "```text", parser.format_help().rstrip(), "```", ""]
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        parts += [f"## `mist-zarr {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
