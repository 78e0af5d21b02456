"""Matplotlib (Agg backend, no display needed) helpers that write PNGs atomically."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from bilevel import distributed  # noqa: E402

from .io import atomic_write_bytes  # noqa: E402


def figure(
    ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (4.2, 3.2)
) -> tuple[Any, Any]:
    """A figure with ``nrows x ncols`` axes of ``size`` inches each; axes always an array."""
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(size[0] * ncols, size[1] * nrows),
        squeeze=False,
        constrained_layout=True,
    )
    return fig, axes.ravel()


def save(fig: Any, path: str | os.PathLike[str], dpi: int = 90) -> None:
    """Write ``fig`` as a PNG atomically and close it (only on rank 0 of a distributed run)."""
    if not distributed.is_main():
        plt.close(fig)
        return
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (window shrinks at the start), for noisy outer losses.

    Example:
        >>> smooth([1.0, 3.0, 5.0], 2)
        [1.0, 2.0, 4.0]
    """
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def curves(
    ax: Any,
    series: Mapping[str, tuple[Sequence[Any], Sequence[Any]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logy: bool = False,
    logx: bool = False,
) -> None:
    """One line per ``label: (x, y)`` on ``ax``, with a legend."""
    for label, (x, y) in series.items():
        ax.plot(list(x), list(y), label=label, lw=1.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=6.5, framealpha=0.6)
