"""The problem protocol of the implicit Function: an optimality function ``F(sol, theta)``
over flat lists of tensors, its products, and how to run its solver.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from bilevel.implicit._leaves import _zeros_like_leaves
from bilevel.implicit._products import _ForwardModeSwitch, _jvp, _vjp
from bilevel.implicit.diagnostics import ImplicitDiagnostics

#
# A problem knows its optimality function F(sol, theta) over flat lists of tensors
# (sol: the solution's leaves, theta: the tensor leaves of hyperparameters and data),
# the products with dF/dsol and its transpose, and how to run its solver. Problems are
# the non-tensor first argument of _Implicit; _BatchedProblem is the same problem for a
# stack of instances (the vmap rule), _LinearProblem the linear system of a backward or
# jvp pass.


class _Problem:
    kind: str = "opaque"  # how the solver's target batches: objective | map | linear | opaque
    symmetric: bool = False
    linear_solver: Any = None
    diagnostics: ImplicitDiagnostics | None = None
    switch: _ForwardModeSwitch
    n_sol: int
    n_theta: int
    name: str = "implicit"
    minimum: bool = False  # F is the gradient of a loss to minimise (argmin): curvature matters
    strict: bool = False  # raise instead of warning when a solve is not what the theorem assumes
    warm_start: Any = None  # a WarmStart for the backward / jvp linear solves, or None
    given: bool = False  # the solution is given and nothing checks it: solve copies init

    def residual(self, sol: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract: every subclass defines it

    def matvec(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor], v: Sequence[Tensor]
    ) -> list[Tensor]:
        """``(dF/dsol) v``."""
        return list(_jvp(lambda s: self.residual(s, theta), [list(sol)], [list(v)], self.switch))

    def rmatvec(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor], v: Sequence[Tensor]
    ) -> list[Tensor]:
        """``(dF/dsol)^T v``."""
        _, fn = _vjp(lambda s: self.residual(s, theta), list(sol))
        return list(fn(list(v))[0])

    def target(self, theta: Sequence[Tensor]) -> Any:
        """What the solver is given (objective, map, (matvec, rhs)), closed over theta."""
        raise NotImplementedError  # pragma: no cover - abstract: every subclass defines it

    def run(self, target: Any, init: Sequence[Tensor]) -> list[Tensor]:
        """Run the solver on ``target`` from ``init``; detached solution leaves."""
        raise NotImplementedError  # pragma: no cover - abstract: every subclass defines it

    def solve(self, init: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
        return self.run(self.target(theta), init)

    def solve_plain(self, init: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
        """:meth:`solve` with operations ``torch.func.vmap`` can batch (no reused graphs)."""
        return self.solve(init, theta)

    # the theta-side of the theorem -------------------------------------------------
    def vjp_theta(
        self,
        sol: Sequence[Tensor],
        theta: Sequence[Tensor],
        u: Sequence[Tensor],
        which: Sequence[int],
    ) -> list[Tensor]:
        """``(dF/dtheta_i)^T u`` for ``i in which``."""
        theta = list(theta)

        def f(*sel: Tensor) -> list[Tensor]:
            th = list(theta)
            for i, t in zip(which, sel):
                th[i] = t
            return self.residual(sol, th)

        _, fn = _vjp(f, *[theta[i] for i in which])
        return list(fn(list(u)))

    def jvp_theta(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor], tangents: Sequence[Tensor | None]
    ) -> list[Tensor]:
        """``sum_i (dF/dtheta_i) dtheta_i`` over the non-None tangents."""
        theta = list(theta)
        which = [i for i, t in enumerate(tangents) if t is not None]
        if not which:
            return _zeros_like_leaves(sol)

        def f(*sel: Tensor) -> list[Tensor]:
            th = list(theta)
            for i, t in zip(which, sel):
                th[i] = t
            return self.residual(sol, th)

        prim = [theta[i] for i in which]
        tang = [tangents[i] for i in which]
        return list(_jvp(f, prim, tang, self.switch))

    def _share(self, parent: _Problem) -> None:
        """Take the parent's settings and sizes (derived problems: linear, batched)."""
        self.symmetric = parent.symmetric
        self.linear_solver = parent.linear_solver
        self.diagnostics = parent.diagnostics
        self.switch = parent.switch
        self.n_sol = parent.n_sol
        self.n_theta = parent.n_theta
        self.name = parent.name
        self.minimum = parent.minimum
        self.strict = parent.strict
        self.warm_start = parent.warm_start

    def plain_vjp(
        self,
        sol: Sequence[Tensor],
        theta: Sequence[Tensor],
        g: Sequence[Tensor],
        which: Sequence[int],
    ) -> list[Tensor] | None:
        """The backward pass ``(dF/dtheta_i)^T u`` with ``(dF/dsol)^T u = -g``, for ``i`` in
        ``which``, on one plain autograd graph; None when this problem has no such path
        (the general path, a differentiable linear solve, is then used)."""
        return None

    def reused_operator(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor]
    ) -> Callable[[Sequence[Tensor]], list[Tensor]] | None:
        """A faster ``v -> (dF/dsol) v`` for one linear solve's loop, or None."""
        return None
