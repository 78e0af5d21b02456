"""``.ci/gpu``, the prepared GPU check, tested on the CPU with a stand-in ``nvidia-smi``: the
wheel index it picks from the driver's CUDA version, its plan, its argument errors, and its
runner (logs, summary, exit status) on a step that fails here for want of a GPU."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "gpu"


def _fake_nvidia_smi(bin_dir: Path, cuda_version: str) -> None:
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        'if [ "$#" -gt 0 ]; then echo "NVIDIA H200, 550.54.15, 143771 MiB"; exit 0; fi\n'
        f'echo "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: {cuda_version} |"\n'
    )
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)


def _run(tmp_path: Path, *args: str, cuda: str | None = "12.6") -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if cuda is not None:
        _fake_nvidia_smi(bin_dir, cuda)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:/usr/bin:/bin",
        OUT=str(tmp_path / "out"),
        PYTHON=sys.executable,  # for --no-install: this interpreter, which has the test extra
    )
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("cuda", "index", "fallbacks"),
    [
        ("12.6", "cu126", "cu124 cu121 cu118"),
        ("12.7", "cu126", "cu124 cu121 cu118"),
        ("12.9", "cu129", "cu128 cu126 cu124 cu121 cu118"),
        ("13.0", "cu130", "cu129 cu128"),
        ("11.8", "cu118", ""),
    ],
)
def test_dry_run_picks_the_newest_wheel_index_the_driver_supports(tmp_path, cuda, index, fallbacks):
    done = _run(tmp_path, "--dry-run", cuda=cuda)
    assert done.returncode == 0, done.stderr
    assert f"driver CUDA version: {cuda}; torch 2.13.0 from index {index} " in done.stdout
    assert f"(fallbacks: {fallbacks}" in done.stdout
    assert "GPU: NVIDIA H200, 550.54.15, 143771 MiB" in done.stdout
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"


def test_dry_run_plan_lists_every_step_with_its_timeout(tmp_path):
    done = _run(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("  ")}
    assert list(lines) == ["install", "tests", "sync", "amp", "bench"]
    assert "timeout  600s" in lines["install"]
    assert "BILEVEL_TEST_DEVICE=cuda .gpu-venv/bin/python -m pytest -m device" in lines["tests"]
    assert "tests/test_sync.py" in lines["sync"]
    assert "tests/test_mixed_precision.py" in lines["amp"]
    assert f"bench all --device cuda --json {tmp_path / 'out'}/bench.json" in lines["bench"]


def test_only_and_no_install_narrow_the_plan(tmp_path):
    done = _run(tmp_path, "--dry-run", "--only", "bench", "--no-install")
    assert done.returncode == 0, done.stderr
    steps = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")]
    assert steps == ["bench"]
    assert f"{sys.executable} -m experiments bench all --device cuda" in done.stdout


@pytest.mark.parametrize(
    ("args", "cuda", "code", "message"),
    [
        (["--only", "tests,lint"], "12.6", 2, "unknown step 'lint'"),
        (["--frobnicate"], "12.6", 2, "unknown argument '--frobnicate'"),
        (["--dry-run"], None, 3, "nvidia-smi not found"),
        (["--dry-run"], "11.4", 3, "older than any torch wheel"),
    ],
)
def test_bad_arguments_and_machines_stop_with_a_message(tmp_path, args, cuda, code, message):
    done = _run(tmp_path, *args, cuda=cuda)
    assert done.returncode == code
    assert message in done.stderr


def test_a_failing_step_is_logged_summarised_and_sets_the_exit_status(tmp_path):
    """No GPU here: the sync step's pytest refuses BILEVEL_TEST_DEVICE=cuda, so it fails."""
    done = _run(tmp_path, "--no-install", "--only", "sync")
    out = tmp_path / "out"
    assert done.returncode == 1, done.stdout + done.stderr
    assert (out / "nvidia-smi.txt").read_text().startswith("| NVIDIA-SMI")
    assert "torch.cuda.is_available() is False" in (out / "sync.log").read_text()
    summary = (out / "summary.txt").read_text()
    assert "GPU: NVIDIA H200" in summary
    assert "sync     FAILED (exit 4)" in summary
