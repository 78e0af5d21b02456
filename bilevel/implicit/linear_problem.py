"""The linear system of a backward or forward-mode pass, itself an implicit problem (so
hypergradients are differentiable again).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import tree_leaves
from bilevel.implicit._leaves import _add_leaves
from bilevel.implicit.diagnostics import _record
from bilevel.implicit.problem import _Problem
from bilevel.implicit.warm_start import is_wrapped
from bilevel.linalg.base import LinearSolver


class _LinearProblem(_Problem):
    """``op(sol, theta) u + c = 0`` with ``op = dF/dsol`` (jvp) or its transpose (backward).

    Its parameters are ``[*theta, *sol, *c]`` of the parent problem, so differentiating
    through its solution differentiates the parent's hypergradient (double backward).
    """

    kind = "linear"

    def __init__(self, parent: _Problem, transpose: bool) -> None:
        self.parent = parent
        self.transpose = transpose
        self._share(parent)
        self.n_theta = parent.n_theta + 2 * parent.n_sol
        if isinstance(parent, _LinearProblem):  # second order: its own system, start cold
            self.warm_start = None

    def _split(self, theta: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        p, s = self.parent.n_theta, self.parent.n_sol
        theta = list(theta)
        return theta[:p], theta[p : p + s], theta[p + s :]

    def _op(self, transpose: bool) -> Callable[..., list[Tensor]]:
        return self.parent.rmatvec if transpose else self.parent.matvec

    def residual(self, sol: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
        pth, psol, c = self._split(theta)
        return _add_leaves(self._op(self.transpose)(psol, pth, sol), c)

    def matvec(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor], v: Sequence[Tensor]
    ) -> list[Tensor]:
        pth, psol, _ = self._split(theta)
        return self._op(self.transpose)(psol, pth, v)

    def rmatvec(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor], v: Sequence[Tensor]
    ) -> list[Tensor]:
        pth, psol, _ = self._split(theta)
        return self._op(not self.transpose)(psol, pth, v)

    def target(self, theta: Sequence[Tensor]) -> Any:
        pth, psol, c = self._split(theta)
        if self.parent.symmetric or not self.transpose:
            fast = self.parent.reused_operator(psol, pth)
            if fast is not None:
                return fast, c
        return self.plain_target(theta)

    def solve_plain(self, init: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
        return self.run(self.plain_target(theta), init)

    def plain_target(self, theta: Sequence[Tensor]) -> Any:
        pth, psol, c = self._split(theta)
        op = self._op(self.transpose)
        return (lambda v: op(psol, pth, list(v))), c

    def _not_a_minimum(self, info: Any) -> None:
        from bilevel.solvers import NotMinimumError, NotMinimumWarning

        lo, hi = info.min_curvature, info.max_curvature
        if info.negative_curvature:
            found = f"a direction with p^T H p / p^T p = {lo:.3e} <= 0"
        elif info.method == "dense":
            found = f"its smallest eigenvalue is {lo:.3e} (largest {hi:.3e})"
        else:
            found = (
                f"its Lanczos matrix is not positive definite (smallest diagonal entry v^T H v "
                f"or LDL^T pivot {lo:.3e}, largest v^T H v {hi:.3e})"
            )
        msg = (
            f"{self.name}: the solution is not a minimum: the {info.method} solve of the backward "
            f"pass met negative curvature of the inner loss's Hessian, {found}. The point is a "
            "saddle or a maximum, and the hypergradient is that of this stationary point, not of "
            "a minimiser: start the inner solver elsewhere, or make the inner loss convex there "
            "(regularisation)"
        )
        if self.strict:
            raise NotMinimumError(msg)
        warnings.warn(msg, NotMinimumWarning, stacklevel=2)

    def run(self, target: Any, init: Sequence[Tensor]) -> list[Tensor]:
        matvec, c = target
        b = [-x for x in c]
        kind = "vjp" if self.transpose else "jvp"
        ws = None if self.warm_start is None or is_wrapped(b) else self.warm_start
        x0 = None if ws is None else ws.start(kind, b)
        # a bilevel solver also gets the preconditioner memory the WarmStart carries
        kw = (
            {"memory": ws.memory(kind)}
            if ws is not None and isinstance(self.linear_solver, LinearSolver)
            else {}
        )
        try:
            if x0 is None:
                x, info = self.linear_solver(matvec, b, **kw)
            else:
                x, info = self.linear_solver(matvec, b, x0, **kw)
        except torch.linalg.LinAlgError as err:
            raise torch.linalg.LinAlgError(
                f"{self.name}: the linear solve of implicit differentiation failed: {err}. "
                "dF/dw is singular at the solution (is the minimizer / root unique? is the "
                "inner problem strongly convex there?)"
            ) from err
        self.report(kind, info)
        out = [t.detach() for t in tree_leaves(x)]
        if ws is not None:
            ws.store(kind, out)
        return out

    def report(self, kind: str, info: Any) -> None:
        """Record a linear solve's info and warn (raise when strict) as the theorem needs:
        negative curvature at a minimum, a solve that did not converge."""
        _record(self.diagnostics, kind, info)
        if self.minimum and getattr(info, "checked", True) and _indefinite(info):
            self._not_a_minimum(info)
        if _should_warn(info):
            warnings.warn(
                f"{self.name}: the {'backward' if self.transpose else 'forward-mode'} linear solve "
                f"of implicit differentiation did not converge ({info}); the hypergradient may be "
                "inaccurate. Hints: raise maxiter or loosen tol, add damping, use minres for a "
                "symmetric indefinite dF/dw (a saddle point) or gmres for a non-symmetric one, "
                "and check that the inner solution is accurate",
                RuntimeWarning,
                stacklevel=3,
            )


def _indefinite(info: Any) -> bool:
    indefinite = getattr(info, "indefinite", None)
    return bool(indefinite()) if callable(indefinite) else False


def _should_warn(info: Any) -> bool:
    """A linear solve that did not reach its tolerance, truncated Neumann series included."""
    return getattr(info, "checked", True) and not getattr(info, "converged", True)
