"""The code passes the linter configured in pyproject.toml ([tool.ruff]: pyflakes, pycodestyle, bugbear, pyupgrade,
import order, and no function above McCabe complexity 15)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    found = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (it comes with the [dev] extra: pip install -e '.[dev]')")
    return [found]


def test_the_repository_passes_ruff():
    proc = subprocess.run([*_ruff(), "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_the_configuration_is_the_one_in_pyproject():
    """A finding injected into a scratch file is reported: the check above can fail."""
    proc = subprocess.run([*_ruff(), "check", "--no-cache", "--stdin-filename", "planner/scratch.py", "-"],
                          input="import os\nl = 1\n", capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 1 and "F401" in proc.stdout and "E741" in proc.stdout, proc.stdout
