"""Inexact Newton with matrix-free conjugate gradients and an Armijo line search."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import Tree
from bilevel.solvers._flat import _eps, _Flat, _flat_value_and_grad
from bilevel.solvers._newton_batch import _default_cg_maxiter, _newton, _NewtonSettings, _StackHVP
from bilevel.solvers._stack import _flat_rows, _rows_tree, _timed, _unravel_rows
from bilevel.solvers.base import (
    Objective,
    Solver,
    SolverInfo,
    _check_int,
    _check_tol,
    _scalar,
    _stopping,
)
from bilevel.solvers.hvp import _HVP
from bilevel.solvers.line_search import _backtracking, _LineFunction


class NewtonCG(Solver):
    """Inexact Newton: H d = -g solved matrix-free by CG, then an Armijo line search."""

    method = "newton_cg"

    def __init__(
        self,
        tol: float = 1e-8,
        maxiter: int = 50,
        linear_solver: Any = None,
        cg_maxiter: int | None = None,
        hvp: str = "reverse",
        max_backtracks: int = 30,
    ) -> None:
        super().__init__()
        self.tol = _check_tol(tol)
        self.maxiter = _check_int(maxiter, "maxiter")
        if linear_solver is not None and not callable(linear_solver):
            raise TypeError(
                "linear_solver must be a bilevel.linalg solver, called as "
                f"x, info = solver(matvec, b); got {type(linear_solver).__name__}"
            )
        self.linear_solver = linear_solver
        self.cg_maxiter = None if cg_maxiter is None else _check_int(cg_maxiter, "cg_maxiter")
        if hvp not in ("auto", "forward", "reverse"):
            raise ValueError(f"hvp must be 'auto', 'forward' or 'reverse'; got {hvp!r}")
        self.hvp = hvp
        self.max_backtracks = _check_int(max_backtracks, "max_backtracks")

    def _settings(self) -> dict[str, Any]:
        return {"tol": self.tol, "maxiter": self.maxiter, "linear_solver": self.linear_solver}

    @property
    def supports_batch(self) -> bool:
        """Whether :meth:`solve_batch` runs: with the built-in CG (``linear_solver=None``);
        a given linear solver is a black box for one problem, so a ``vmap`` stack then
        runs once per problem."""
        return self.linear_solver is None

    def _settings_of_run(self, size: int) -> _NewtonSettings:
        cg_maxiter = _default_cg_maxiter(self.cg_maxiter, size)
        return _NewtonSettings(self.tol, self.maxiter, cg_maxiter, self.hvp, self.max_backtracks)

    def _solve(self, objective: Objective, init: Tree) -> tuple[Tree, SolverInfo]:
        if self.linear_solver is not None:
            return self._solve_with_linear_solver(objective, init)
        # one problem is a stack of one, through the same code: vmap equals a loop
        flat = _Flat(init)
        shape = init.shape if isinstance(init, Tensor) else None

        def values(X: Tensor) -> Tensor:
            # a tensor: the stack of one reshaped (one view), no tree to rebuild
            point = X.reshape(shape) if shape is not None else flat.unravel(X[0])
            return _scalar(objective(point)).reshape(1)

        products = _StackHVP(values, self.hvp)
        X = flat.ravel(init).detach().clone().unsqueeze(0)
        opts = self._settings_of_run(flat.size)
        run = _newton(values, X, opts, products)
        return flat.output(run.X[0]), run.infos(self.method, opts, products)[0]

    def solve_batch(
        self, values: Callable[[Tree], Tensor], init: Tree
    ) -> tuple[Tree, list[SolverInfo]]:
        """Minimise ``B`` independent objectives at once (the ``vmap`` rule of the layers).

        ``values(W)`` returns the ``(B,)`` objective values of a tree ``W`` whose leaves
        carry the problems in dimension 0, each depending on its own slice only. Every
        problem keeps its own iterate, forcing term, CG iterates (masked per row),
        backtracking step, iteration count and stopping decision; a stopped problem is
        frozen while the others go on. Element ``i``'s answer and record are a single
        call's (up to rounding). Needs the built-in CG (:attr:`supports_batch`).

        Example:
            >>> import torch
            >>> c = torch.tensor([[1.0], [-2.0], [30.0]], dtype=torch.float64)
            >>> loss = lambda W: ((W - c) ** 4).sum(1) + (W ** 2).sum(1)
            >>> w, infos = newton_cg(tol=1e-10).solve_batch(loss, torch.zeros(3, 1, dtype=torch.float64))
            >>> w1, info1 = newton_cg(tol=1e-10)(lambda v: ((v - c[2]) ** 4).sum() + (v ** 2).sum(),
            ...                                  torch.zeros(1, dtype=torch.float64))
            >>> [i.iterations for i in infos], info1.iterations
            ([5, 6, 11], 11)
            >>> bool(torch.allclose(w[2], w1, rtol=1e-12, atol=0))
            True
        """
        if not callable(values):
            raise TypeError(f"values must be callable; got {type(values).__name__}")
        if not self.supports_batch:
            raise ValueError(
                "newton_cg with a given linear_solver solves one problem at a time: use "
                "linear_solver=None (the built-in CG) to minimise a stack at once"
            )
        flat, X, spec = _flat_rows(init)

        def stacked(Z: Tensor) -> Tensor:
            return values(_unravel_rows(flat, Z))

        products = _StackHVP(stacked, self.hvp)
        opts = self._settings_of_run(flat.size)
        start = time.perf_counter()
        with torch.no_grad():
            run = _newton(stacked, X.clone(), opts, products)
        infos = _timed(run.infos(self.method, opts, products), start)
        self.last_info = infos[-1]
        return _rows_tree(flat, run.X), infos

    def _solve_with_linear_solver(
        self, objective: Objective, init: Tree
    ) -> tuple[Tree, SolverInfo]:
        flat = _Flat(init)
        x = flat.ravel(init).detach().clone()
        f, g = _flat_value_and_grad(objective, flat, x)
        evals, hvps = 1, [0]
        f_host, gnorm = torch.stack([f.to(g.dtype), g.norm()]).tolist()
        products = _HVP(objective, flat, self.hvp)
        converged, message, k = False, "", 0
        cg_notes: list[str] = []
        while True:
            stop = _stopping(f_host, gnorm, self.tol, k, self.maxiter)
            if stop is not None:
                converged, message = stop
                break
            base_hvp = products.at(x)

            def matvec(v: Tensor, _h: Callable[[Tensor], Tensor] = base_hvp) -> Tensor:
                hvps[0] += 1
                return _h(v)

            # a given linear solver is used as is (its own tolerance)
            d, lin_info = self.linear_solver(matvec, -g)
            if getattr(lin_info, "negative_curvature", False):
                # CG's iterate before the bad direction is still a descent direction.
                cg_notes.append(f"iteration {k}: negative curvature met by the linear solver")
            d0 = float(g @ d)
            if not (math.isfinite(d0) and d0 < 0):
                d, d0 = -g, -gnorm * gnorm
                cg_notes.append(f"iteration {k}: not a descent direction, used -gradient")
            phi = _LineFunction(objective, flat, x, d)
            f_tol = 100 * _eps(g.dtype) * abs(f_host)
            found = _backtracking(phi, f_host, d0, 1.0, 1e-4, self.max_backtracks, f_tol)
            evals += phi.evals
            if found is None:
                message = (
                    f"line search found no acceptable step (gradient norm {gnorm:.3e}); the "
                    "objective may be non-smooth, or noisy at this precision"
                )
                break
            t, f_host, f, g = found
            x = x + t * d
            gnorm = float(g.norm())
            k += 1
        extra: dict[str, Any] = {"hvp_evaluations": hvps[0], "hvp": products.mode}
        if products.reason is not None:
            extra["hvp_fallback_reason"] = products.reason
        if cg_notes:
            extra["linear_solver_notes"] = cg_notes
        info = SolverInfo(
            self.method,
            k,
            converged,
            gnorm,
            f_host,
            message,
            tol=self.tol,
            evaluations=evals,
            extra=extra,
        )
        return flat.output(x), info


def newton_cg(
    tol: float = 1e-8,
    maxiter: int = 50,
    linear_solver: Any = None,
    cg_maxiter: int | None = None,
    hvp: str = "reverse",
    max_backtracks: int = 30,
) -> NewtonCG:
    """Newton's method with matrix-free conjugate gradients and an Armijo line search.

    Each iteration solves ``H d = -g`` with Hessian-vector products: by default
    reverse-over-reverse on a first-order graph built once per iteration
    (``hvp="reverse"``, measured 4-5x faster per product on CPU than
    ``torch.func.jvp`` of ``torch.func.grad``); ``hvp="forward"`` uses the latter,
    and ``hvp="auto"`` tries forward-over-reverse and switches on the first failure
    (``info.extra["hvp"]`` says which ran). With ``linear_solver=None`` it runs its own
    conjugate gradients (those of :func:`bilevel.linalg.cg`, per problem of a stack) to
    the relative tolerance ``min(0.1, sqrt(||g|| / ||g_0||))`` (inexact Newton:
    superlinear convergence without over-solving far from the optimum), at most
    ``cg_maxiter`` (default ``max(20, min(n, 500))``) iterations; a given
    ``linear_solver`` is used as is. Under ``torch.func.vmap`` the layers minimise the
    stack at once with :meth:`NewtonCG.solve_batch` (a single call shares its code); with a
    given ``linear_solver`` they run once per problem. When CG meets negative curvature it returns its
    iterate so far (a descent direction); a direction that is not a descent
    direction is replaced by ``-g``. ``info.extra["hvp_evaluations"]`` counts the
    Hessian-vector products.

    ``hvp="reverse"`` builds the first-order graph once per Newton iteration and
    reuses it for every product of that iteration's CG solve: on CPU it measured
    about 4x faster than forward-over-reverse (logistic regression, p = 1000), at
    the memory cost of keeping that graph (``hvp="forward"`` never keeps one).

    Example:
        >>> import torch
        >>> w, info = newton_cg(tol=1e-10)(lambda w: (w.exp() - 2 * w).sum(), torch.zeros(3, dtype=torch.float64))
        >>> torch.allclose(w, torch.full((3,), 2.0, dtype=torch.float64).log()), info.converged
        (True, True)
    """
    return NewtonCG(tol, maxiter, linear_solver, cg_maxiter, hvp, max_backtracks)
