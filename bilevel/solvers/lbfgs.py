"""Limited-memory BFGS with a strong Wolfe line search."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import Tree
from bilevel.solvers._flat import _eps, _Flat, _flat_value_and_grad
from bilevel.solvers.base import Objective, Solver, SolverInfo, _check_int, _check_tol, _stopping
from bilevel.solvers.line_search import _backtracking, _LineFunction, _strong_wolfe


class LBFGS(Solver):
    """Limited-memory BFGS over the flattened parameters with a strong Wolfe line search."""

    method = "lbfgs"

    def __init__(
        self,
        tol: float = 1e-8,
        maxiter: int = 500,
        history_size: int = 20,
        line_search: str | None = "strong_wolfe",
        c1: float = 1e-4,
        c2: float = 0.9,
        max_evals_per_iter: int = 25,
    ) -> None:
        super().__init__()
        self.tol = _check_tol(tol)
        self.maxiter = _check_int(maxiter, "maxiter")
        self.history_size = _check_int(history_size, "history_size")
        if line_search not in ("strong_wolfe", "backtracking", None):
            raise ValueError(
                f"line_search must be 'strong_wolfe' or 'backtracking'; got {line_search!r}"
            )
        self.line_search = line_search or "backtracking"
        if not 0 < c1 < c2 < 1:
            raise ValueError(f"line search constants need 0 < c1 < c2 < 1; got c1={c1}, c2={c2}")
        self.c1, self.c2 = float(c1), float(c2)
        self.max_evals_per_iter = _check_int(max_evals_per_iter, "max_evals_per_iter")

    def _settings(self) -> dict[str, Any]:
        return {
            "tol": self.tol,
            "maxiter": self.maxiter,
            "history_size": self.history_size,
            "line_search": self.line_search,
        }

    def _direction(self, g: Tensor, hist: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
        # Two-loop recursion; the scalars stay on the device.
        q = -g
        alphas = []
        for s, y, rho in reversed(hist):
            a = rho * (s @ q)
            q = q - a * y
            alphas.append(a)
        if hist:
            s, y, _ = hist[-1]
            q = q * ((s @ y) / (y @ y))
        for (s, y, rho), a in zip(hist, reversed(alphas)):
            b = rho * (y @ q)
            q = q + (a - b) * s
        return q

    def _solve(self, objective: Objective, init: Tree) -> tuple[Tree, SolverInfo]:
        flat = _Flat(init)
        x = flat.ravel(init).detach().clone()
        f, g = _flat_value_and_grad(objective, flat, x)
        evals = 1
        f_host, gnorm = torch.stack([f.to(g.dtype), g.norm()]).tolist()
        f_tol = 100 * _eps(g.dtype) * abs(f_host)
        hist: list[tuple[Tensor, Tensor, Tensor]] = []
        converged, message, k = False, "", 0
        restarted = False
        while True:
            stop = _stopping(f_host, gnorm, self.tol, k, self.maxiter)
            if stop is not None:
                converged, message = stop
                break
            d = self._direction(g, hist)
            d0 = float(g @ d)
            if not (math.isfinite(d0) and d0 < 0):
                hist.clear()
                d = -g
                d0 = -gnorm * gnorm
            t0 = 1.0 if hist else min(1.0, 1.0 / max(gnorm, 1e-300))
            phi = _LineFunction(objective, flat, x, d)
            if self.line_search == "strong_wolfe":
                found = _strong_wolfe(
                    phi, f_host, d0, t0, self.c1, self.c2, self.max_evals_per_iter, f_tol
                )
            else:
                found = _backtracking(phi, f_host, d0, t0, self.c1, self.max_evals_per_iter, f_tol)
            evals += phi.evals
            if found is None:
                if hist and not restarted:
                    # A stale curvature history can give a poor direction: retry steepest descent.
                    hist.clear()
                    restarted = True
                    continue
                message = (
                    f"line search found no acceptable step (gradient norm {gnorm:.3e}); the "
                    "objective may be non-smooth, or noisy at this precision"
                )
                break
            restarted = False
            t, f_new_host, f_new, g_new = found
            s = t * d
            y = g_new - g
            sy, yy, gnorm_new = torch.stack([s @ y, y @ y, g_new.norm()]).tolist()
            if sy > _eps(g.dtype) * yy and yy > 0:
                hist.append((s, y, torch.as_tensor(1.0 / sy, dtype=g.dtype, device=g.device)))
                if len(hist) > self.history_size:
                    hist.pop(0)
            x = x + s
            f, g, f_host, gnorm = f_new, g_new, f_new_host, gnorm_new
            f_tol = 100 * _eps(g.dtype) * abs(f_host)
            k += 1
        info = SolverInfo(
            self.method,
            k,
            converged,
            gnorm,
            f_host,
            message,
            tol=self.tol,
            evaluations=evals,
            extra={"line_search": self.line_search},
        )
        return flat.output(x), info


def lbfgs(
    tol: float = 1e-8,
    maxiter: int = 500,
    history_size: int = 20,
    line_search: str | None = "strong_wolfe",
    c1: float = 1e-4,
    c2: float = 0.9,
    max_evals_per_iter: int = 25,
) -> LBFGS:
    """L-BFGS with a strong Wolfe line search, run to gradient norm <= ``tol``.

    Works on the parameters flattened into one vector (leaves of mixed floating
    dtypes are promoted, then cast back). Near the optimum, where differences of
    objective values are below rounding error, steps are accepted on the slope
    (approximate Wolfe conditions), which lets it reach gradient norms near machine
    precision (1e-12 on well-conditioned float64 problems). ``line_search`` can be
    ``"backtracking"`` (Armijo only).

    Example:
        >>> import torch
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> w, info = lbfgs(tol=1e-12)(lambda w: 0.5 * w @ A @ w - b @ w, torch.zeros(2, dtype=torch.float64))
        >>> torch.allclose(w, torch.linalg.solve(A, b)), info.converged
        (True, True)
    """
    return LBFGS(tol, maxiter, history_size, line_search, c1, c2, max_evals_per_iter)
