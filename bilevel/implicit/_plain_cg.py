"""The plain backward's cg solve, inlined: :class:`bilevel.linalg.cg`'s own loop on the
products of one graph of ``F``, without the solver protocol's wrappers.

With the solution given, a 3-unknown hypergradient with ``cg`` spent as much in set-up per
call (the solver's input checks and tree conversions, the operator wrapper and its checks
on every product, the linear problem's start) as in its three products. When the solve is
one the CPU loop runs as it is (``cg`` itself with no preconditioner, checked every
iteration, no warm start; or the default ``auto`` above its dense limit, which runs that
``cg``), this path calls that loop directly with the products (damped as
the operator wrapper damps them), so it computes the same iterates and stops after the
same iteration; the record and its warnings (not converged, negative curvature) are the
general path's. Up to 64 unknowns the products are matrix-vector products with the
matrix one batched backward forms (the values of the backward passes to rounding, for a
quarter of their cost at 30 unknowns), unless ``maxiter`` allows fewer products than
forming it costs. Anything else returns None and takes the general
path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel.implicit._exact import operator_matrix
from bilevel.linalg.auto import Auto, iterative_note
from bilevel.linalg.cg import CG
from bilevel.linalg.dense import _ravel, _unravel

# The batched backward that forms the matrix costs about 6 products at 30 unknowns: a cg
# truncated to fewer than min(n, this) iterations keeps one backward per product.
_MATRIX_MIN_ITERATIONS = 8


def plain_cg(linear_solver: Any, sol: Sequence[Tensor]) -> CG | None:
    """The ``cg`` whose CPU loop solves for ``linear_solver`` as it is, or None: ``cg`` itself
    with no preconditioner, checked every iteration, a number as damping (not a subclass,
    which may solve otherwise), or ``auto`` above its ``max_dense`` with such a ``cg`` as
    its iterative solver (what ``auto`` would run there)."""
    n = sum(x.numel() for x in sol)
    if type(linear_solver) is Auto and n > linear_solver.max_dense:
        linear_solver = linear_solver.iterative
    ok = (
        type(linear_solver) is CG
        and linear_solver.preconditioner is None
        and linear_solver.check_every in (None, 1)
        and not isinstance(linear_solver.damping, Tensor)
        and all(x.device.type == "cpu" for x in sol)
    )
    return linear_solver if ok else None


def cg_vjp(
    problem: Any,
    solver: CG,
    vjp: Callable[..., list[Tensor]],
    g: Sequence[Tensor],
    hessian: tuple[Sequence[Tensor | None], Sequence[Tensor]] | None = None,
) -> list[Tensor]:
    """``u`` with ``(dF/dsol)^T u = -g`` by ``solver``, the :func:`plain_cg` of
    ``problem.linear_solver``, its record filed and warned about as the general path does
    (and as ``auto`` notes its choice). ``vjp(v, batched=False)`` is ``(dF/dsol)^T v`` on
    the backward's graph of ``F`` (symmetric: an argmin's Hessian), ``batched``: ``v``'s
    leaves carry a leading batch dimension. Up to ``MAX_DOUBLE`` unknowns the matrix is
    formed by one batched backward and cg's products are matrix-vector products with it
    (26 backward passes through the graph cost 1.3 ms at 30 unknowns, the one batched pass
    0.3 ms); above, with ``hessian`` (``(F, sol leaves)`` when ``F`` is an argmin's
    gradient), the products are the backward of one recorded product
    (:mod:`bilevel.implicit._transposed`), else one backward each."""
    from bilevel.implicit._transposed import MAX_DOUBLE, transposed_products
    from bilevel.implicit.linear_problem import _LinearProblem

    damping = float(solver.damping)
    b = [-x for x in g]
    n = sum(x.numel() for x in b)
    M = None
    few = solver.maxiter is not None and solver.maxiter < min(n, _MATRIX_MIN_ITERATIONS)
    if n <= MAX_DOUBLE and not few and all(x.dtype == b[0].dtype for x in b):
        M = operator_matrix(vjp, b, 0.0)
    if M is not None:
        product = _matrix_products(M, b)
    elif hessian is None or n <= MAX_DOUBLE:
        product = vjp
    else:
        product = transposed_products(hessian[0], hessian[1], b, vjp)
    undamped = product
    if damping != 0:

        def product(v: Sequence[Tensor]) -> list[Tensor]:
            return [torch.add(o, vi, alpha=damping) for o, vi in zip(undamped(v), v)]

    x, info = solver._solve(product, b, None)
    chosen = problem.linear_solver
    if chosen is not solver:  # auto: its message as its own solve writes it
        info.message = iterative_note(info.message, n, chosen.max_dense, info.method)
    chosen.last_info = info
    lin = _LinearProblem(problem, transpose=True)
    lin.report("vjp", info)
    return x


def _matrix_products(M: Tensor, b: Sequence[Tensor]) -> Callable[[Sequence[Tensor]], list[Tensor]]:
    """``v -> M v`` on leaves shaped like ``b``'s (``M`` in their flat coordinates)."""
    if len(b) == 1 and b[0].dim() == 1:
        return lambda v: [M @ v[0]]
    leaves = list(b)
    return lambda v: _unravel(M @ _ravel(list(v)), leaves)
