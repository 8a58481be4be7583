"""Every documentation example, and demo.py, runs to the end (each asserts its own claims)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [*sorted((REPO / "docs" / "examples").glob("*.py")), REPO / "demo.py"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_script_runs(script: Path):
    result = subprocess.run(
        # -P: the script's folder (the repository root for demo.py) must not shadow the installed moe_ops.
        [sys.executable, "-P", str(script)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (
        f"{script.relative_to(REPO)} exited {result.returncode}\n"
        f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
    )
