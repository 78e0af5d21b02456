"""The suite's own pytest set-up (pyproject's addopts, tests/conftest.py): slow tests left out
unless chosen, and a clear fallback where pytest-xdist is missing."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILE = "tests/test_lbfgs_compiled.py"  # 4 of its tests are marked slow
SLOW = "test_compiled_float32_tensor"


def _collect(*args: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout + run.stderr


def test_slow_tests_are_left_out_by_default():
    out = _collect("-n", "0", FILE)
    assert SLOW not in out and "4 deselected" in out


def test_a_named_slow_test_runs_and_without_xdist_the_suite_is_serial_and_says_so():
    out = _collect("-p", "no:xdist", f"{FILE}::{SLOW}")
    assert SLOW in out and "deselected" not in out
    assert "pytest-xdist is not installed" in out
