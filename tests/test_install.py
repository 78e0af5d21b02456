"""Installing bilevel puts no top-level ``experiments`` package in site-packages.

The repository is copied, built and installed (``--no-deps --no-build-isolation``: offline,
a few seconds) into a scratch virtual environment that sees this environment's packages
(torch, setuptools) through a ``.pth`` file. From a project folder with its own
``experiments`` package, ``python -m experiments`` must run the project's package, while
``bilevel-exp`` and ``python -m bilevel_experiments`` run bilevel's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("bilevel", "experiments"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root)
    (Path(site.stdout.strip()) / "parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q"]
    done = _run([*pip, "--no-deps", "--no-build-isolation", str(src)], root)
    assert done.returncode == 0, done.stderr
    project = root / "project"
    (project / "experiments").mkdir(parents=True)
    (project / "experiments" / "__init__.py").write_text("")
    (project / "experiments" / "__main__.py").write_text("print('the project s own experiments')\n")
    return root


def test_site_packages_hold_bilevel_experiments_not_experiments(scratch):
    py = str(scratch / "venv" / "bin" / "python")
    site = Path(_run([py, "-c", "import bilevel; print(bilevel.__file__)"], scratch).stdout)
    site = site.parent.parent
    assert (site / "bilevel_experiments" / "cli.py").exists()
    assert not (site / "experiments").exists()
    missing = _run([py, "-c", "import experiments"], scratch)  # a folder without experiments/
    assert "No module named 'experiments'" in missing.stderr


def test_project_with_its_own_experiments_package(scratch):
    project, venv = scratch / "project", scratch / "venv" / "bin"
    own = _run([str(venv / "python"), "-m", "experiments"], project)
    assert own.returncode == 0 and "the project s own experiments" in own.stdout, own.stderr
    for cmd in ([str(venv / "bilevel-exp")], [str(venv / "python"), "-m", "bilevel_experiments"]):
        listing = _run([*cmd, "--help"], project)
        assert listing.returncode == 0, listing.stderr
        for name in ("learn-lr", "l2", "maml", "hyperclean", "argmin-timeseries", "bench"):
            assert f"  {name} " in listing.stdout
        assert "unavailable" not in listing.stdout, listing.stdout
        one = _run([*cmd, "l2", "--help"], project)
        assert one.returncode == 0 and "--quick" in one.stdout, one.stderr
        bench = _run([*cmd, "bench", "--help"], project)  # the bench/ subpackage too
        assert bench.returncode == 0 and "--repeats" in bench.stdout, bench.stderr
