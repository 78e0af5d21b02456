"""The starting point of a Krylov solve: zero, or a warm start scaled so that its residual is
never larger than zero's."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bilevel.linalg._vec import Vec, _dot, _safe, _sub, _zeros

Preconditioner = Callable[[Vec], Vec]


def scaled_start(
    A: Callable[[Vec], Vec], b: Vec, x0: Vec | None, M: Preconditioner | None = None
) -> tuple[Vec, Vec]:
    """The start ``x0`` (or ``a x0``) and its residual; from zero, ``(0, b)`` with no product.

    A warm start whose residual is larger than ``||b||`` (zero's) is scaled by the ``a`` that
    minimises the residual in the norm the solver measures (``||.||_2``, or the
    preconditioned norm of MINRES): ``a = <A x0, b> / <A x0, A x0>``. So a warm start costs
    its one product and never starts further away than zero (a stale ``x0`` from a much
    changed operator gets ``a`` near 0). The stopping rule stays relative to ``||b||``, so
    the answer has the accuracy of a cold solve.
    """
    if x0 is None:
        return _zeros(b), b
    Ax = A(x0)
    r = _sub(b, Ax)
    Mr, Mb = (r, b) if M is None else (M(r), M(b))
    # kept as it is when it starts no further than zero does, else scaled (rarely)
    keep = _dot(r, Mr) <= _dot(b, Mb)
    MAx = Ax if M is None else M(Ax)
    num, den = _dot(MAx, b), _dot(MAx, Ax)
    ok = den > 0
    a = (num / _safe(den, ok)) * ok.to(num.dtype)
    a = torch.where(keep, torch.ones_like(a), a)
    x = [torch.where(keep, t, a * t) for t in x0]
    return x, [torch.where(keep, ri, bi - a * ai) for ri, bi, ai in zip(r, b, Ax)]
