"""The differentiable collectives, a pair of conjugate operators:

* ``replicated(x)``: forward the identity (``x`` is the same on every rank), backward a
  sum over ranks (each rank holds part of the gradient);
* ``global_sum(x)``: forward a sum over ranks (each rank holds a part), backward the
  identity (the downstream computation is the same on every rank).

Each is the transpose of the other, so derivatives of any order stay consistent; both
have rules for backward, forward mode and ``vmap``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import Tree, tree_flatten, tree_unflatten
from bilevel.distributed.collectives import all_reduce_leaves
from bilevel.distributed.process import is_distributed


def _fill(
    tensors: Sequence[Tensor | None], like: Sequence[tuple[torch.Size, torch.dtype, torch.device]]
) -> list[Tensor]:
    return [
        torch.zeros(s, dtype=d, device=dev) if t is None else t
        for t, (s, d, dev) in zip(tensors, like)
    ]


class _GlobalSum(torch.autograd.Function):
    """Forward: sum over ranks. Backward: identity (conjugate of :class:`_Replicate`)."""

    @staticmethod
    def forward(*xs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return tuple(all_reduce_leaves(list(xs)))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Any) -> None:
        ctx.like = [(x.shape, x.dtype, x.device) for x in inputs]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return _Replicate.apply(*_fill(grads, ctx.like))

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> tuple[Tensor, ...]:  # type: ignore[override]
        return _GlobalSum.apply(*_fill(tangents, ctx.like))

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], *xs: Tensor) -> tuple[Any, Any]:
        # elementwise over ranks: the batch dimension is part of the tensor
        return _GlobalSum.apply(*xs), tuple(in_dims)


class _Replicate(torch.autograd.Function):
    """Forward: identity on a value held by every rank. Backward: sum over ranks."""

    @staticmethod
    def forward(*xs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        # a copy, not the input itself: outputs aliasing inputs complicate forward-mode AD
        return tuple(x.clone() for x in xs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Any) -> None:
        ctx.like = [(x.shape, x.dtype, x.device) for x in inputs]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return _GlobalSum.apply(*_fill(grads, ctx.like))

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> tuple[Tensor, ...]:  # type: ignore[override]
        return _Replicate.apply(*_fill(tangents, ctx.like))

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], *xs: Tensor) -> tuple[Any, Any]:
        return _Replicate.apply(*xs), tuple(in_dims)


def _apply_to_float_leaves(fn: Any, tree: Any) -> Any:
    leaves, spec = tree_flatten(tree)
    idx = [i for i, x in enumerate(leaves) if isinstance(x, Tensor) and x.is_floating_point()]
    if not idx or not is_distributed():
        return tree
    out = fn.apply(*[leaves[i] for i in idx])
    for i, x in zip(idx, out):
        leaves[i] = x
    return tree_unflatten(leaves, spec)


def global_sum(tree: Tree) -> Tree:
    """Differentiable sum over ranks of per-rank parts (e.g. local losses).

    Forward: an all-reduce. Backward: the identity, because what follows is computed
    identically on every rank; forward mode and ``vmap`` are supported, and derivatives
    of any order (its transpose is :func:`replicated`). Floating-point leaves only;
    other leaves are returned unchanged. Identity in a single process.

    Example:
        >>> w = torch.ones(3, requires_grad=True)
        >>> loss = global_sum((w ** 2).sum())     # the sum of every rank's local loss
        >>> loss.backward(); w.grad
        tensor([2., 2., 2.])
    """
    return _apply_to_float_leaves(_GlobalSum, tree)


def replicated(tree: Tree) -> Tree:
    """Mark values held identically by every rank (parameters, hyperparameters).

    Forward: the identity. Backward: the gradients of the ranks' local uses are summed
    over ranks, so the gradient w.r.t. a replicated value is the global one on every
    rank. Forward mode, ``vmap`` and higher derivatives are supported. Identity in a
    single process.

    Example:
        >>> w = torch.ones(2, requires_grad=True)
        >>> (replicated(w) * 3).sum().backward(); w.grad
        tensor([3., 3.])
    """
    return _apply_to_float_leaves(_Replicate, tree)
