"""What the solves of implicit layers did: :class:`ImplicitDiagnostics` per problem, and
the process-wide latest records.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

_GLOBAL_LOCK = threading.Lock()
_LAST: dict[str, Any] = {"forward": None, "backward": None}


@dataclasses.dataclass
class ImplicitDiagnostics:
    """What the solves of one implicit problem did (thread-safe record).

    Pass one to :func:`argmin`, :func:`root`, :func:`fixed_point` or
    :func:`custom_root` (``diagnostics=``); it collects the forward solver's info
    record and one :class:`bilevel.linalg.LinearSolveInfo` per linear solve made by
    a backward (``"vjp"``) or forward-mode (``"jvp"``) pass, in order.

    Attributes:
        forward: the inner solver's info record (``None`` with a given solution).
        backward: ``(kind, info)`` pairs, ``kind`` in ``{"vjp", "jvp"}``.

    Example:
        >>> import torch
        >>> from bilevel import argmin
        >>> h = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        >>> diag = ImplicitDiagnostics()
        >>> w = argmin(lambda w, h: ((w - 1) ** 2).sum() + h * (w**2).sum(),
        ...            torch.full((3,), 1 / 3, dtype=torch.float64), h, diagnostics=diag)
        >>> w.sum().backward()
        >>> diag.last_backward.converged
        True
    """

    forward: Any = None
    backward: list[tuple[str, Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    @property
    def last_backward(self) -> Any:
        """The info record of the latest linear solve (``None`` before any)."""
        with self._lock:
            return self.backward[-1][1] if self.backward else None

    def _record_forward(self, info: Any) -> None:
        with self._lock:
            self.forward = info

    def _record_linear(self, kind: str, info: Any) -> None:
        with self._lock:
            self.backward.append((kind, info))


def last_backward_info() -> Any:
    """The :class:`~bilevel.linalg.LinearSolveInfo` of the latest implicit linear solve.

    Process-wide and meant for interactive use; with several threads or problems
    at once, pass an :class:`ImplicitDiagnostics` to each call instead.

    Example:
        >>> import torch
        >>> from bilevel import argmin
        >>> h = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> w = argmin(lambda w, h: ((w - h) ** 2).sum(), torch.ones(2, dtype=torch.float64), h)
        >>> w.sum().backward()
        >>> last_backward_info().method, last_backward_info().message  # the default: auto
        ('dense', 'auto: dense Cholesky for n=2 <= 64')
    """
    with _GLOBAL_LOCK:
        return _LAST["backward"]


def last_forward_info() -> Any:
    """The inner solver's info record of the latest implicit forward solve (or None)."""
    with _GLOBAL_LOCK:
        return _LAST["forward"]


def _record(diagnostics: ImplicitDiagnostics | None, kind: str, info: Any) -> None:
    with _GLOBAL_LOCK:
        _LAST["forward" if kind == "forward" else "backward"] = info
    if diagnostics is not None:
        if kind == "forward":
            diagnostics._record_forward(info)
        else:
            diagnostics._record_linear(kind, info)
