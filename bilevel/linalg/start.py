"""The starting point of a Krylov solve: zero, or a warm start when it starts closer than zero."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bilevel.linalg._vec import Vec, _dot, _sub, _zeros

Preconditioner = Callable[[Vec], Vec]


def warm_or_zero(
    A: Callable[[Vec], Vec], b: Vec, x0: Vec | None, M: Preconditioner | None = None
) -> tuple[Vec, Vec]:
    """The start and its residual: ``x0`` if its residual is no larger than zero's, else zero.

    From zero: ``(0, b)`` with no product. A warm start costs one product, ``A x0``; when its
    residual is larger than ``||b||`` (in the norm the solver measures: ``||.||_2``, or the
    preconditioned norm of MINRES) it is dropped for zero, so a stale ``x0`` (from a much
    changed operator) costs that one product and nothing more. The stopping rule stays
    relative to ``||b||``, so a warm solve has the accuracy of a cold one.
    """
    if x0 is None:
        return _zeros(b), b
    r = _sub(b, A(x0))
    Mr, Mb = (r, b) if M is None else (M(r), M(b))
    keep = _dot(r, Mr) <= _dot(b, Mb)
    x = [torch.where(keep, t, torch.zeros_like(t)) for t in x0]
    return x, [torch.where(keep, ri, bi) for ri, bi in zip(r, b)]
