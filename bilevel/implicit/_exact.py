"""The plain backward's exact solve, inlined: ``dense``'s arithmetic on one graph of ``F``.

On small problems a hypergradient's time is per-call work, not arithmetic: with the
solution given (``argmin(..., solver=None)``) at 3-30 unknowns, the general route through
:func:`bilevel.linalg.auto` (its input checks, tree conversions, the operator wrapper, the
matrix formed through ``matmat``) dispatched about 126 tensor operations per
hypergradient, against 38 for autograd through the closed form. For an argmin (whose
Hessian should be positive definite) this path runs what ``dense(method="solve")`` runs on
the same matrix when all is well: one batched backward for the matrix (its cotangents
batched by functorch's rules, which run each matrix-vector product of the loss's double
backward as one matrix product, so ``dense`` takes this path at any size; ``auto`` up to
its ``max_dense``), then the Cholesky factorisation that tests and solves it, the
residual and one host read (:func:`bilevel.linalg.dense.solve_by_cholesky`), so its
solution is bitwise the general path's. It returns None whenever that path would do anything else: a matrix that is not
positive definite, is singular or not finite (where it warns, raises or falls back), mixed
dtypes, a Tensor damping, a solver subclass. The general path then runs from the start
and decides.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel.implicit.diagnostics import _record
from bilevel.linalg.auto import Auto, dense_note
from bilevel.linalg.dense import (
    CHOLESKY,
    Dense,
    _basis_leaves,
    _ravel,
    _rows,
    _unravel,
    solve_by_cholesky,
)
from bilevel.linalg.info import LinearSolveInfo


def dense_plan(linear_solver: Any, n: int) -> tuple[float, float | None, str] | None:
    """``(damping, rcond, message)`` when ``linear_solver`` solves ``n`` unknowns as
    ``dense(method="solve")`` with a number as damping (``auto`` up to ``max_dense``, or
    ``dense`` itself; not subclasses, which may solve otherwise), else None. ``message`` is
    the info record's after a Cholesky solve."""
    kind = type(linear_solver)
    if kind is Auto:
        if n > linear_solver.max_dense or isinstance(linear_solver.damping, Tensor):
            return None
        return float(linear_solver.damping), None, dense_note(CHOLESKY, n, linear_solver.max_dense)
    if kind is Dense:
        if linear_solver.method != "solve" or not linear_solver.vectorize:
            return None
        if isinstance(linear_solver.damping, Tensor):
            return None
        return float(linear_solver.damping), linear_solver.rcond, CHOLESKY
    return None


def exact_vjp(
    problem: Any,
    vjp: Callable[[Sequence[Tensor], bool], list[Tensor]],
    sol: Sequence[Tensor],
    g: Sequence[Tensor],
    plan: tuple[float, float | None, str],
) -> list[Tensor] | None:
    """``u`` with ``(dF/dsol)^T u = -g`` (leaves shaped like ``sol``) as the dense solve of
    a positive definite Hessian computes it, its info record filed, or None (see the module
    docstring). ``vjp(V, batched)`` is ``(dF/dsol)^T V`` on the backward's graph of ``F``.
    """
    damping, rcond, message = plan
    b = [-x for x in g]
    dtype = b[0].dtype
    if not problem.minimum or any(x.dtype != dtype for x in (*b, *sol)):
        return None  # dense's LU route (no definiteness promised); mixed dtypes promote
    n = sum(x.numel() for x in b)
    M = operator_matrix(vjp, b, damping)
    if M is None:
        return None  # dense would form the matrix another way
    solved = solve_by_cholesky(M, _ravel(b), rcond if rcond is not None else n * _eps(dtype))
    if solved is None:
        return None  # not positive definite, singular or not finite: the general path
    flat_x, rn = solved
    info = LinearSolveInfo("dense", n, rn, True, False, message, threshold=math.nan)
    problem.linear_solver.last_info = info
    _record(problem.diagnostics, "vjp", info)
    return _unravel(flat_x, b)


def operator_matrix(
    vjp: Callable[[Sequence[Tensor], bool], list[Tensor]], b: Sequence[Tensor], damping: float
) -> Tensor | None:
    """The ``n x n`` matrix of ``v -> vjp(v) + damping * v`` in the flat coordinates of the
    leaves ``b``, from one batched backward over the basis vectors; None when that backward
    fails (an op with no batching rule)."""
    n = sum(x.numel() for x in b)
    basis = _basis(n, b)
    try:
        out = vjp(basis, True)
    except (RuntimeError, NotImplementedError, ValueError):
        return None
    if damping != 0:
        out = [torch.add(o, e, alpha=damping) for o, e in zip(out, basis)]
    rows: Any
    if len(out) == 1:
        rows = out[0] if out[0].dim() == 2 else out[0].reshape(n, -1)
    else:
        rows = _rows(out, n)
    return rows.transpose(0, 1)


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


_BASES: dict[Any, list[Tensor]] = {}  # the basis vectors per structure, dtype and device
_BASES_MAX = 16  # structures kept (64 unknowns in float64: 32 KiB each)


def _basis(n: int, b: Sequence[Tensor]) -> list[Tensor]:
    """The ``n`` basis vectors as leaves shaped like ``b``'s (dense's ``_basis_leaves``),
    kept across calls: only autograd reads them (as the batched backward's cotangents)."""
    key = (tuple(x.shape for x in b), b[0].dtype, b[0].device)
    basis = _BASES.get(key)
    if basis is None:
        if len(_BASES) >= _BASES_MAX:
            _BASES.clear()
        eye = torch.eye(n, dtype=b[0].dtype, device=b[0].device)
        basis = _BASES[key] = _basis_leaves(eye, list(b))
    return basis
