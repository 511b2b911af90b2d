"""The package's layering (pyproject.toml [tool.importlinter]) holds, and no module imports
itself back through others. Both checks see function-level imports (grimp parses every
import statement, not only those at the top of a module)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")

ROOT = Path(__file__).resolve().parents[1]

def _env() -> dict[str, str]:
    # the checked-out package, not an installed copy elsewhere
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _graph():
    sys.path.insert(0, str(ROOT))
    try:
        return grimp.build_graph("mist_zarr", cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))


def test_lint_imports_keeps_the_layers_contract():
    exe = shutil.which("lint-imports")
    assert exe is not None, "lint-imports not installed: pip install -e '.[test]'"
    run = subprocess.run([exe, "--no-cache"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "mist_zarr layers KEPT" in run.stdout


def _closing_imports(graph) -> set[tuple[str, str]]:
    """Direct imports a -> b of mist_zarr modules where b also reaches a: each closes a cycle."""
    out = set()
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            if imported != importer and graph.chain_exists(importer=imported, imported=importer):
                out.add((importer, imported))
    return out


def test_no_import_cycle():
    graph = _graph()
    # grimp must see imports made inside functions (the ones that hid the old cycles):
    # export imports access only inside export() (xarray is slow to import)
    assert "mist_zarr.access" in graph.find_modules_directly_imported_by("mist_zarr.export")
    closing = _closing_imports(graph)
    assert not closing, f"import cycles between mist_zarr modules: {sorted(closing)}"
