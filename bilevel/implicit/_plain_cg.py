"""The plain backward's cg solve, inlined: :class:`bilevel.linalg.cg`'s own loop on the
products of one graph of ``F``, without the solver protocol's wrappers.

With the solution given, a 3-unknown hypergradient with ``cg`` spent as much in set-up per
call (the solver's input checks and tree conversions, the operator wrapper and its checks
on every product, the linear problem's start) as in its three products. When the solve is
one the CPU loop runs as it is (``cg`` itself with no preconditioner, checked every
iteration, no warm start), this path calls that loop directly with the products (damped as
the operator wrapper damps them), so it computes the same iterates and stops after the
same iteration; the record and its warnings (not converged, negative curvature) are the
general path's. Anything else returns None and takes the general path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel.linalg.cg import CG


def plain_cg(linear_solver: Any, sol: Sequence[Tensor]) -> bool:
    """Whether ``linear_solver`` solves as ``cg``'s CPU loop with no preconditioner (not a
    subclass, which may solve otherwise; a number as damping)."""
    return (
        type(linear_solver) is CG
        and linear_solver.preconditioner is None
        and linear_solver.check_every in (None, 1)
        and not isinstance(linear_solver.damping, Tensor)
        and all(x.device.type == "cpu" for x in sol)
    )


def cg_vjp(
    problem: Any,
    vjp: Callable[[Sequence[Tensor]], list[Tensor]],
    g: Sequence[Tensor],
    hessian: tuple[Sequence[Tensor | None], Sequence[Tensor]] | None = None,
) -> list[Tensor]:
    """``u`` with ``(dF/dsol)^T u = -g`` by ``problem.linear_solver`` (a :func:`plain_cg`
    solver), its record filed and warned about as the general path does. ``vjp(v)`` is
    ``(dF/dsol)^T v`` on the backward's graph of ``F`` (symmetric: an argmin's Hessian).
    ``hessian``: ``(F, sol leaves)`` when ``F`` is an argmin's gradient: above
    ``MAX_DOUBLE`` unknowns the products are then the backward of one recorded product
    (:mod:`bilevel.implicit._transposed`)."""
    from bilevel.implicit._transposed import MAX_DOUBLE, transposed_products
    from bilevel.implicit.linear_problem import _LinearProblem

    solver: CG = problem.linear_solver
    damping = float(solver.damping)
    b = [-x for x in g]
    n = sum(x.numel() for x in b)
    if hessian is None or n <= MAX_DOUBLE:
        product = vjp
    else:
        product = transposed_products(hessian[0], hessian[1], b, vjp)
    undamped = product
    if damping != 0:

        def product(v: Sequence[Tensor]) -> list[Tensor]:
            return [torch.add(o, vi, alpha=damping) for o, vi in zip(undamped(v), v)]

    x, info = solver._solve(product, b, None)
    solver.last_info = info
    lin = _LinearProblem(problem, transpose=True)
    lin.report("vjp", info)
    return x
