"""A stack of ``B`` problems for ``solve_batch``: checks, row-wise values and gradients.

The leaves of a stacked tree carry the problems in dimension 0. Every reduction here
is row-wise (elementwise products and sums over a row), never a ``bmm`` or a reduction
over the whole stack, so a row's bits do not depend on how many rows there are.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import Tree, tree_unflatten
from bilevel.solvers._flat import _tree_value_and_grad
from bilevel.solvers.base import _NO_PATH, SolverInfo, _check_tree


def _stacked(init: Tree, name: str = "init") -> tuple[list[Tensor], Any, int]:
    """Leaves, spec and ``B`` of a tree whose leaves carry ``B >= 1`` problems in dim 0."""
    leaves, spec = _check_tree(init, name)
    batch = leaves[0].shape[0] if leaves[0].ndim else 0
    if batch < 1 or any(leaf.ndim == 0 or leaf.shape[0] != batch for leaf in leaves):
        raise ValueError(
            f"{name} must carry the problems in dimension 0 of every leaf (one size B >= 1); "
            f"got shapes {[tuple(leaf.shape) for leaf in leaves]}"
        )
    return leaves, spec, batch


Oracle = Callable[[Sequence[Tensor]], tuple[Tensor, list[Tensor]]]
"""Leaves of ``B`` problems -> their values ``(B,)`` and gradients (like the leaves)."""


def _single_oracle(objective: Callable[[Tree], Tensor], spec: Any) -> Oracle:
    """One problem as a stack of one whose leaves keep their own shapes (no batch
    dimension, nothing to index: a single call pays nothing for sharing the code)."""

    def oracle(leaves: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        f, grads = _tree_value_and_grad(objective, leaves, spec)
        return f.reshape(1), grads

    return oracle


def _stack_oracle(values: Callable[[Tree], Tensor], spec: Any) -> Oracle:
    """A stack: ``values`` of a tree whose leaves carry the problems in dimension 0."""
    return lambda leaves: _values_and_grads(values, leaves, spec)


def _values_and_grads(
    values: Callable[[Tree], Tensor], leaves: Sequence[Tensor], spec: Any
) -> tuple[Tensor, list[Tensor]]:
    """Values ``(B,)`` and gradients (leaves of the stack): one backward of the sum (rows
    are independent problems, so row ``i`` of the gradient is problem ``i``'s)."""
    B = leaves[0].shape[0]
    with torch.enable_grad():
        xs = [leaf.detach().requires_grad_(True) for leaf in leaves]
        f = values(tree_unflatten(xs, spec))
        if not isinstance(f, Tensor) or f.shape != (B,):
            got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"the objective values must have shape ({B},); got {got}")
        if not f.requires_grad:
            raise ValueError(_NO_PATH)
        grads = torch.autograd.grad(f.sum(), xs, allow_unused=True)
    if all(g is None for g in grads):
        raise ValueError(_NO_PATH)
    out = [torch.zeros_like(x) if g is None else g.detach() for x, g in zip(xs, grads)]
    return f.detach(), out


def _row_norms(leaves: Sequence[Tensor], B: int) -> Tensor:
    """Per-row Euclidean norm over all leaves ``(B,)``, in their widest dtype."""
    norms = [torch.linalg.vector_norm(leaf.reshape(B, -1), dim=1) for leaf in leaves]
    if len(norms) == 1:
        return norms[0]
    dtype = norms[0].dtype
    for n in norms[1:]:
        dtype = torch.promote_types(dtype, n.dtype)
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms], 1), dim=1)


def _keep(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``where(mask, new, old)`` with a ``(B,)`` mask over the rows of ``(B, ...)`` tensors."""
    return torch.where(mask.reshape(mask.shape + (1,) * (new.ndim - 1)), new, old)


def _timed(infos: list[SolverInfo], start: float) -> list[SolverInfo]:
    """Every row's record gets the stack's wall time (the rows ran together)."""
    elapsed = time.perf_counter() - start
    for info in infos:
        info.time = elapsed
    return infos
