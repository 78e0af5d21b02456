"""Vector algebra on flat lists of leaf tensors, the solvers' working representation."""

from __future__ import annotations

import torch
from torch import Tensor

# The solvers work on the flat list of b's leaves (flattened once per solve): list
# comprehensions with fused ops cost a third of what pytree maps do per iteration.
Vec = list[Tensor]


def _dot(a: Vec, b: Vec) -> Tensor:
    """Real inner product of two leaf lists (a 0-d tensor on their device)."""
    dots = [_leaf_dot(x, y) for x, y in zip(a, b)]
    if len(dots) == 1:
        return dots[0]
    if all(d.dtype == dots[0].dtype for d in dots):
        return torch.stack(dots).sum()
    total = dots[0]
    for d in dots[1:]:
        total = total + d
    return total


def _leaf_dot(x: Tensor, y: Tensor) -> Tensor:
    if _batched(x) or _batched(y):
        # under vmap, dot's batching rule is a batched matrix product with its reshapes
        # (88 us a call for 25 rows of 1761, float32, one thread) where the product and the
        # row sum are two batched kernels (32 us); a linear solve makes two a iteration
        return (x * y).sum()
    # (1-d leaves, the common case, need no reshape: a dispatched op per vector saved)
    if x.dim() == 1 == y.dim():
        return torch.dot(x, y)
    return torch.dot(x.reshape(-1), y.reshape(-1))


_batched = torch._C._functorch.is_batchedtensor


def _norm(a: Vec) -> Tensor:
    return _dot(a, a).sqrt()


def _axpy(alpha: Tensor, x: Vec, y: Vec, out: Vec | None = None) -> Vec:
    """``y + alpha * x`` (``alpha`` a 0-d tensor): one pass per leaf; written into ``out``
    when given (which may be ``x`` or ``y`` itself: an in-place update, no allocation)."""
    if out is None:
        return [torch.addcmul(yi, xi, alpha) for xi, yi in zip(x, y)]
    for xi, yi, oi in zip(x, y, out):
        torch.addcmul(yi, xi, alpha, out=oi)
    return out


def _sub(a: Vec, b: Vec) -> Vec:
    return [x - y for x, y in zip(a, b)]


def _div(a: Vec, den: Tensor) -> Vec:
    return [x / den for x in a]


def _where(cond: Tensor, a: Vec, b: Vec) -> Vec:
    """``where(cond, a, b)`` leaf-wise with a 0-d device boolean ``cond``."""
    return [torch.where(cond, x, y) for x, y in zip(a, b)]


def _zeros(a: Vec) -> Vec:
    return [torch.zeros_like(x) for x in a]


def _stack_basis(V: list[Vec]) -> list[Tensor]:
    """Per leaf, the ``k`` basis vectors flattened and stacked: ``[k, numel]``."""
    return [torch.stack([v[i].reshape(-1) for v in V]) for i in range(len(V[0]))]


def _basis_dot(S: list[Tensor], w: Vec) -> Tensor:
    """The ``k`` inner products of the stacked basis with ``w``."""
    total = S[0] @ w[0].reshape(-1)
    for Si, wi in zip(S[1:], w[1:]):
        total = total + Si @ wi.reshape(-1)
    return total


def _basis_combine(S: list[Tensor], coef: Tensor, like: Vec) -> Vec:
    """``sum_j coef_j V_j`` shaped like ``like``."""
    return [(coef.to(Si.dtype) @ Si).reshape(li.shape) for Si, li in zip(S, like)]


def _safe(den: Tensor, ok: Tensor) -> Tensor:
    """A denominator that is 1 where ``ok`` is False, so masked lanes stay finite."""
    return torch.where(ok, den, torch.ones_like(den))
