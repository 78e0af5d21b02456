"""Shared test configuration: the device the ``device``-marked tests run on.

``BILEVEL_TEST_DEVICE`` names it (default ``cpu``): ``BILEVEL_TEST_DEVICE=cuda python -m
pytest -m device`` runs the device-exercising tests on the GPU. A device that is asked for
but missing is an error, not a skip, so a GPU run cannot pass by running nothing.
"""

from __future__ import annotations

import os

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


def pytest_configure(config: pytest.Config) -> None:
    device_under_test()  # a missing or misspelt device stops the run before any test


def pytest_report_header(config: pytest.Config) -> str:
    return f"bilevel test device ({DEVICE_ENV}): {device_under_test()}"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device under test (``BILEVEL_TEST_DEVICE``, default CPU)."""
    return device_under_test()
