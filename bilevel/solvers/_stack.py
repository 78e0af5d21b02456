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

from bilevel._tree import Tree, tree_flatten, tree_unflatten
from bilevel.solvers._flat import _Flat, _tree_value_and_grad
from bilevel.solvers.base import _NO_PATH, SolverInfo, _check_tree

# why a problem of a stack stopped (0: still running), shared by the stacked solvers
_RUNNING, _CONVERGED, _NONFINITE, _MAXITER, _NO_STEP = range(5)


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


def _flat_rows(init: Tree, name: str = "init") -> tuple[_Flat, Tensor, Any]:
    """A stacked tree as one row per problem: the layout of one problem, the rows
    ``(B, n)`` (detached, in the layout's dtype) and the tree's spec."""
    leaves, spec, batch = _stacked(init, name)
    flat = _Flat(tree_unflatten([leaf[0] for leaf in leaves], spec))
    X = torch.cat([leaf.detach().reshape(batch, -1).to(flat.dtype) for leaf in leaves], 1)
    return flat, X, spec


def _unravel_rows(flat: _Flat, X: Tensor) -> Tree:
    """The tree of a stack of flat vectors ``X`` (B, n): every leaf gets dimension 0 of size B."""
    out, offset = [], 0
    for shape, dtype, n in zip(flat.shapes, flat.dtypes, flat.numels):
        out.append(X[:, offset : offset + n].reshape(X.shape[0], *shape).to(dtype))
        offset += n
    return tree_unflatten(out, flat.spec)


def _rows_tree(flat: _Flat, X: Tensor) -> Tree:
    """The solutions handed back: the rows as a stacked tree of fresh tensors."""
    return tree_unflatten(
        [leaf.detach().clone() for leaf in tree_flatten(_unravel_rows(flat, X))[0]], flat.spec
    )


class Oracle:
    """Values ``(B,)`` and gradients (like the leaves) of ``B`` problems' leaves.

    :meth:`narrow` tells it which problems are still running: a stack whose ``values``
    can evaluate a subset of its problems (``values.selectable``: the ``vmap`` rule's
    stacks) then evaluates those only, and the rows of stopped problems come back as
    zeros (the solvers freeze them anyway). A stack runs as many iterations as its
    slowest problem; skipping the stopped ones keeps the cost near the loop's where each
    problem's evaluation is expensive.
    """

    def __call__(self, leaves: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        raise NotImplementedError  # pragma: no cover - abstract

    def narrow(self, live: list[bool]) -> None:
        """The problems still running (read on the host at a convergence check)."""


class _SingleOracle(Oracle):
    """One problem as a stack of one whose leaves keep their own shapes (no batch
    dimension, nothing to index: a single call pays nothing for sharing the code)."""

    def __init__(self, objective: Callable[[Tree], Tensor], spec: Any) -> None:
        self.objective, self.spec = objective, spec

    def __call__(self, leaves: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        f, grads = _tree_value_and_grad(self.objective, leaves, self.spec)
        return f.reshape(1), grads


class _StackOracle(Oracle):
    """A stack: ``values`` of a tree whose leaves carry the problems in dimension 0."""

    def __init__(self, values: Callable[..., Tensor], spec: Any, batch: int) -> None:
        self.values, self.spec, self.batch = values, spec, batch
        self.selectable = bool(getattr(values, "selectable", False)) and batch > 1
        self.rows: Tensor | None = None  # the running problems, None: all
        self.device: torch.device | None = None

    def narrow(self, live: list[bool]) -> None:
        if not self.selectable or all(live):
            self.rows = None
            return
        running = [i for i, x in enumerate(live) if x]
        self.rows = torch.tensor(running, dtype=torch.long, device=self.device)

    def __call__(self, leaves: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        self.device = leaves[0].device
        rows = self.rows
        if rows is None:
            return _values_and_grads(self.values, leaves, self.spec)
        part = [x.index_select(0, rows) for x in leaves]
        f, grads = _values_and_grads(lambda tree: self.values(tree, rows), part, self.spec)
        f_all = f.new_zeros(self.batch).index_copy(0, rows, f)
        return f_all, [torch.zeros_like(x).index_copy(0, rows, g) for x, g in zip(leaves, grads)]


def _single_oracle(objective: Callable[[Tree], Tensor], spec: Any) -> Oracle:
    return _SingleOracle(objective, spec)


def _stack_oracle(values: Callable[..., Tensor], spec: Any, batch: int) -> Oracle:
    return _StackOracle(values, spec, batch)


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
