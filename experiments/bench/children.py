"""Fresh processes: a configuration's peak RSS measured where nothing else has run."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import core


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_child(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """Run ``python -m experiments.bench --_child SPEC`` and parse its last stdout line."""
    cmd = [sys.executable, "-m", "experiments.bench", "--_child", json.dumps(spec)]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=_child_env(threads), timeout=1800
        )
    except subprocess.TimeoutExpired:
        return {"rss_error": "timed out"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"rss_error": f"exit {proc.returncode}: {tail[:120]}"}
    return dict(json.loads(lines[-1]))


def measure_rss(fn: Callable[[], Any]) -> int:
    """In the child: run ``fn`` once; print its peak RSS (and the increase over the setup)
    as the one JSON line :func:`run_child` reads."""
    gc.collect()
    before = core.peak_rss_bytes()
    fn()
    after = core.peak_rss_bytes()
    print(json.dumps({"peak_rss_bytes": after, "rss_increase_bytes": after - before}))
    return 0
