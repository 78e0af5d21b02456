"""Hessian-vector products of an objective: forward-over-reverse, reverse-over-reverse,
and the automatic choice between them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel.solvers._flat import _Flat
from bilevel.solvers.base import Objective, _scalar


def _forward_over_reverse(
    objective: Objective, flat: _Flat, x: Tensor
) -> Callable[[Tensor], Tensor]:
    def f(z: Tensor) -> Tensor:
        return _scalar(objective(flat.unravel(z)))

    grad_f = torch.func.grad(f)

    def hvp(v: Tensor) -> Tensor:
        return torch.func.jvp(grad_f, (x,), (v.to(x.dtype),))[1]

    return hvp


def _reverse_over_reverse(
    objective: Objective, flat: _Flat, x: Tensor
) -> Callable[[Tensor], Tensor]:
    # The first-order graph is built once per point and reused by every product.
    with torch.enable_grad():
        xl = x.detach().requires_grad_(True)
        f = _scalar(objective(flat.unravel(xl)))
        (g,) = torch.autograd.grad(f, xl, create_graph=True)

    def hvp(v: Tensor) -> Tensor:
        with torch.enable_grad():
            if not g.requires_grad:  # the objective is linear in x
                return torch.zeros_like(x)
            (hv,) = torch.autograd.grad(g, xl, v.to(x.dtype), retain_graph=True, allow_unused=True)
        return torch.zeros_like(x) if hv is None else hv.detach()

    return hvp


class _HVP:
    """Hessian-vector products at successive points, remembering which mode works.

    ``"auto"`` tries forward-over-reverse on the first product and switches to
    reverse-over-reverse for the rest of the solve if it raises (an operator
    without a forward-mode rule, or host work torch.func cannot trace).
    """

    def __init__(self, objective: Objective, flat: _Flat, mode: str) -> None:
        self.objective, self.flat, self.mode = objective, flat, mode
        self.reason: str | None = None

    def at(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        if self.mode == "reverse":
            return _reverse_over_reverse(self.objective, self.flat, x)
        fwd = _forward_over_reverse(self.objective, self.flat, x)
        if self.mode == "forward":
            return fwd
        return _auto_products(
            self, fwd, lambda: _reverse_over_reverse(self.objective, self.flat, x)
        )


def _auto_products(
    owner: Any,
    forward: Callable[[Tensor], Tensor],
    reverse: Callable[[], Callable[[Tensor], Tensor]],
) -> Callable[[Tensor], Tensor]:
    """Products at one point that settle ``owner.mode`` (``"auto"``) on the first one:
    ``forward`` if it runs, else ``reverse()`` (built once, on first need) for the rest of
    the solve, with why in ``owner.reason``."""
    rev: list[Callable[[Tensor], Tensor]] = []

    def first(v: Tensor) -> Tensor:
        if owner.mode == "auto":
            try:
                out = forward(v)
            except (RuntimeError, NotImplementedError) as err:
                owner.mode = "reverse"
                owner.reason = f"forward-over-reverse failed ({type(err).__name__}: {err})"
            else:
                owner.mode = "forward"
                return out
        if owner.mode == "forward":
            return forward(v)
        if not rev:
            rev.append(reverse())
        return rev[0](v)

    return first
