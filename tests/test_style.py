"""The tree is clean: ruff (lint and format) and snakefmt, configured in pyproject.toml, find nothing to change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    executable = BIN / tool
    if not executable.is_file():
        pytest.fail(f"{tool} is not installed in {BIN}: install the test extra ('pip install -e .[test]')")
    return subprocess.run([str(executable), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "command",
    [("ruff", "check", "."), ("ruff", "format", "--check", "."), ("snakefmt", "--check", "workflow/")],
    ids=["ruff check", "ruff format --check", "snakefmt --check"],
)
def test_the_tree_passes(command):
    result = run_tool(*command)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, f"`{' '.join(command)}` found something to change:\n{output[-6000:]}"
