"""The package's shape: layers import downward only (pyproject's import-linter contract), modules stay small."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
MAX_LINES = 600


def lint_imports_command() -> list[str]:
    """The venv's lint-imports (beside this interpreter), else one on PATH."""
    beside = Path(sys.executable).with_name("lint-imports")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("lint-imports")
    if found is None:
        pytest.skip("import-linter is not installed; `pip install -e '.[test]'` installs it")
    return [found]


def test_layers_import_downward_only():
    """`lint-imports` keeps every contract of pyproject.toml's [tool.importlinter]."""
    result = subprocess.run(lint_imports_command() + ["--no-cache"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"lint-imports failed:\n{result.stdout}\n{result.stderr}"
    assert "0 broken" in result.stdout


def test_no_module_is_too_long():
    """No Python file under src/ exceeds MAX_LINES lines: split it by what it does."""
    too_long = {str(p.relative_to(ROOT)): n for p in sorted(SRC.rglob("*.py"))
                if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"
