"""Matplotlib (Agg backend, no display needed) helpers that write PNGs atomically."""

from __future__ import annotations

import io
import math
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


LEGEND_PT = 8  # smallest legend font that stays readable in the README's scaled-down PNGs


def legend(ax: Any, below: bool = False, ncol: int = 1) -> None:
    """A readable legend: inside where it covers least, or ``below`` the axes (crowded plots)."""
    if below:
        ax.legend(
            fontsize=LEGEND_PT,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.18),
            ncol=ncol,
            frameon=False,
        )
    else:
        ax.legend(fontsize=LEGEND_PT, framealpha=0.7, loc="best")


def log_axis(ax: Any, which: str) -> None:
    """A log scale whose tick labels stay short over narrow ranges.

    matplotlib labels minor ticks of a log axis spanning less than a decade in scientific
    notation (``1.2015x10^0``); here every label is a plain number to 3 significant digits.
    """
    from matplotlib.ticker import FuncFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    short = FuncFormatter(lambda v, _: f"{v:.3g}")
    axis.set_major_formatter(short)
    axis.set_minor_formatter(short)
    lo, hi = (ax.get_ylim if which == "y" else ax.get_xlim)()
    ratio = hi / lo if lo > 0 else math.inf
    if ratio >= 3:  # label only the minor ticks at 2 and 5 (none over two decades or more)
        keep = (2, 5) if ratio < 100 else ()

        def sparse(v: float, _: Any) -> str:
            mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9))
            return f"{v:.3g}" if mantissa in keep else ""

        axis.set_minor_formatter(FuncFormatter(sparse))
    axis.get_offset_text().set_visible(False)


def curves(
    ax: Any,
    series: Mapping[str, tuple[Sequence[Any], Sequence[Any]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logy: bool = False,
    logx: bool = False,
    legend_below: bool = False,
    **style: Any,
) -> None:
    """One line per ``label: (x, y)`` on ``ax``, with a legend (``style``: line options)."""
    for label, (x, y) in series.items():
        ax.plot(list(x), list(y), label=label, **{"lw": 1.3, **style})
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if logy:
        log_axis(ax, "y")
    if logx:
        log_axis(ax, "x")
    ax.grid(alpha=0.3)
    if series:
        legend(ax, below=legend_below)
