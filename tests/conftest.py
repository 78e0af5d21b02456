"""Shared test configuration: the device the ``device``-marked tests run on.

``BILEVEL_TEST_DEVICE`` names it (default ``cpu``): ``BILEVEL_TEST_DEVICE=cuda python -m
pytest -m device`` runs the device-exercising tests on the GPU. A device that is asked for
but missing is an error, not a skip, so a GPU run cannot pass by running nothing.

Also the suite's running: ``slow`` tests left out unless chosen, pytest-xdist's workers
(pyproject's ``-n auto``) capped and given their share of the cores, and a serial run with a
warning where pytest-xdist is missing (tests/test_pytest_setup.py).
"""

from __future__ import annotations

import argparse
import gzip
import os
import warnings
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

import pytest
import torch

DEVICE_ENV = "BILEVEL_TEST_DEVICE"


def device_under_test() -> torch.device:
    """The device named by ``BILEVEL_TEST_DEVICE`` (default CPU), checked to exist."""
    name = os.environ.get(DEVICE_ENV, "cpu").strip() or "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise pytest.UsageError(f"{DEVICE_ENV}={name!r} is not a torch device: {err}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError(
                f"{DEVICE_ENV}={name!r} but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})"
            )
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    elif dev.type != "cpu":
        raise pytest.UsageError(f"{DEVICE_ENV} must name a cpu or cuda device, got {name!r}")
    return dev


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    if not pluginmanager.has_plugin("xdist"):
        # pyproject's addopts name pytest-xdist's options: without it (an environment that
        # did not install the test extra) the suite runs serially and says so
        # (_addoption: a short lowercase option is reserved to plugins; xdist adds it so)
        group = parser.getgroup("xdist", "pytest-xdist (not installed)")
        group._addoption("-n", "--numprocesses", default=None, help=argparse.SUPPRESS)
        group._addoption("--dist", default="no", help=argparse.SUPPRESS)


def pytest_configure(config: pytest.Config) -> None:
    device_under_test()  # a missing or misspelt device stops the run before any test
    if not config.pluginmanager.has_plugin("xdist") and config.getoption("numprocesses"):
        warnings.warn(
            "pytest-xdist is not installed, so the suite runs serially (about twice as long "
            'on two cores): pip install -e ".[test]" installs it',
            pytest.PytestConfigWarning,
            stacklevel=1,
        )
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        # one of several pytest-xdist workers: share the cores instead of each taking all of
        # them (two workers of two OpenMP threads on two cores ran the notebook 4x slower);
        # the environment variable reaches the subprocesses (notebook kernel, CLI runs)
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the ``slow`` tests unless ``-m`` chooses (``-m slow``: only they, as CI runs
    them) or the tests are named one by one (``path::test``: they run as named)."""
    if config.option.markexpr or any("::" in str(arg) for arg in config.args):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]


@pytest.hookimpl(optionalhook=True)  # xdist's hook: unknown without it
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject's default): one worker per core, at most 4 (each worker holds
    its own torch, about 1 GiB; more workers gained nothing on the suite's long files)."""
    return max(1, min(4, os.cpu_count() or 1))


def pytest_report_header(config: pytest.Config) -> str:
    return f"bilevel test device ({DEVICE_ENV}): {device_under_test()}"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device under test (``BILEVEL_TEST_DEVICE``, default CPU)."""
    return device_under_test()


DJIA_ENV = "BILEVEL_DJIA_CSV"


@pytest.fixture
def stock_csv(tmp_path: Path) -> Callable[..., Path]:
    """The course tutorial's DJIA CSV where ``BILEVEL_DJIA_CSV`` names it (``.ci/run`` sets it
    when ``../shared/data`` has the file), else a synthetic file in the same format
    (Date,Open,High,Low,Close,Volume,Name; gzipped; geometric random walks, tickers one after
    another), so the tests that read it always run."""

    def make(tickers: int = 4, days: int = 1200) -> Path:
        given = os.environ.get(DJIA_ENV)
        if given:
            assert Path(given).is_file(), f"{DJIA_ENV}={given}: no such file"
            return Path(given)
        g = torch.Generator().manual_seed(0)
        lines = ["Date,Open,High,Low,Close,Volume,Name"]
        start = date(2006, 1, 3)
        for i in range(tickers):
            steps = 0.01 * torch.randn(days, generator=g, dtype=torch.float64)
            close = 50.0 * torch.exp(torch.cumsum(steps, 0))
            for d, c in enumerate(close.tolist()):
                day = (start + timedelta(days=d)).isoformat()
                lines.append(f"{day},{c:.2f},{c * 1.01:.2f},{c * 0.99:.2f},{c:.2f},1000,T{i}")
        path = tmp_path / "stocks.csv.gz"
        path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
        return path

    return make


RidgeProblem = tuple[
    Callable[..., torch.Tensor], Callable[..., torch.Tensor], Callable[..., torch.Tensor]
]


@pytest.fixture
def ridge() -> Callable[..., RidgeProblem]:
    """``ridge(n, p, seed=0) -> (inner, outer, w_star)``: float64 ridge regression with
    ``lambda = exp(h)``, its validation loss and its closed-form solution ``w_star(h)``
    (Gaussian train and validation sets of ``n`` rows and ``p`` features)."""

    def make(n: int, p: int, seed: int = 0) -> RidgeProblem:
        D = torch.float64
        g = torch.Generator().manual_seed(seed)
        X, y = torch.randn(n, p, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)
        Xv, yv = torch.randn(n, p, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)

        def inner(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            return 0.5 * (X @ w - y).pow(2).mean() + 0.5 * h.exp() * (w * w).sum()

        def outer(w: torch.Tensor) -> torch.Tensor:
            return 0.5 * (Xv @ w - yv).pow(2).mean()

        def w_star(h: torch.Tensor) -> torch.Tensor:
            A = X.T @ X / n + h.exp() * torch.eye(p, dtype=D)
            return torch.linalg.solve(A, X.T @ y / n)

        return inner, outer, w_star

    return make
