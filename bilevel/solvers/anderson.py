"""Anderson acceleration (type II) of a fixed-point iteration."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import Tree
from bilevel.solvers._flat import _eps, _Flat
from bilevel.solvers.base import MapFn, Solver, SolverInfo, _check_int, _check_tol


class Anderson(Solver):
    """Anderson acceleration (type II) of ``w <- map_fn(w)``."""

    method = "anderson"
    kind = "fixed_point"

    def __init__(
        self,
        tol: float = 1e-10,
        maxiter: int = 500,
        memory: int = 5,
        mixing: float = 1.0,
        regularization: float | None = None,
        check_every: int = 1,
    ) -> None:
        super().__init__()
        self.tol = _check_tol(tol)
        self.maxiter = _check_int(maxiter, "maxiter")
        self.memory = _check_int(memory, "memory")
        if isinstance(mixing, bool) or not isinstance(mixing, (int, float)) or not 0 < mixing <= 1:
            raise ValueError(f"mixing must be a number in (0, 1]; got {mixing!r}")
        self.mixing = float(mixing)
        self.regularization = (
            None if regularization is None else _check_tol(regularization, "regularization")
        )
        self.check_every = _check_int(check_every, "check_every")

    def _settings(self) -> dict[str, Any]:
        return {
            "tol": self.tol,
            "maxiter": self.maxiter,
            "memory": self.memory,
            "mixing": self.mixing,
            "check_every": self.check_every,
        }

    def _solve(self, map_fn: MapFn, init: Tree) -> tuple[Tree, SolverInfo]:
        flat = _Flat(init)
        x = flat.ravel(init).detach().clone()
        dtype, device, n, m = x.dtype, x.device, x.numel(), self.memory
        reg = self.regularization if self.regularization is not None else math.sqrt(_eps(dtype))
        tiny = float(torch.finfo(dtype).tiny)

        def g_of(z: Tensor) -> Tensor:
            return flat.ravel(map_fn(flat.unravel(z))).detach()

        G = torch.empty(m, n, dtype=dtype, device=device)  # images map_fn(x_i)
        F = torch.empty(m, n, dtype=dtype, device=device)  # residuals map_fn(x_i) - x_i
        ones = torch.ones(m, 1, dtype=dtype, device=device)
        eye = torch.eye(m, dtype=dtype, device=device)
        converged, message, res = False, "", math.nan
        k, gx = 0, x
        while True:
            gx = g_of(x)
            fx = gx - x
            G[k % m], F[k % m] = gx, fx
            k += 1
            if k % self.check_every == 0 or k == self.maxiter:
                res = float(fx.norm())  # the loop's only sync
                if not math.isfinite(res):
                    message = f"diverged: non-finite residual at iteration {k}"
                    break
                if res <= self.tol:
                    converged, message = True, "residual ||map_fn(w) - w|| <= tol"
                    break
            if k >= self.maxiter:
                message = f"maxiter={self.maxiter} reached"
                break
            mk = min(k, m)
            Fk = F[:mk]
            H = Fk @ Fk.T
            # Scale-free Tikhonov term keeps the small Gram system solvable without a sync.
            H = H / (H.diagonal().mean() + tiny) + reg * eye[:mk, :mk]
            z = torch.linalg.solve_ex(H, ones[:mk])[0]
            alpha = z / z.sum()
            x = (alpha.T @ (G[:mk] - (1.0 - self.mixing) * Fk)).reshape(-1)
        info = SolverInfo(
            self.method,
            k,
            converged,
            res,
            math.nan,
            message,
            tol=self.tol,
            evaluations=k,
            extra={"memory": m},
        )
        return flat.output(gx), info


def anderson(
    tol: float = 1e-10,
    maxiter: int = 500,
    memory: int = 5,
    mixing: float = 1.0,
    regularization: float | None = None,
    check_every: int = 1,
) -> Anderson:
    """Anderson acceleration of ``w <- map_fn(w)``; ``solution, info = solver(map_fn, init)``.

    Each step combines the last ``memory`` images ``map_fn(x_i)`` with the weights
    minimising the combined residual (sum of weights 1), from a small Gram system
    solved on the device with a relative Tikhonov term ``regularization`` (default
    ``sqrt(eps)`` of the dtype). ``mixing`` < 1 damps the step. The residual is read
    every ``check_every`` iterations (one sync each). There is no safeguard against
    divergence for maps far from contractive; use :func:`fixed_point_iteration` there.

    Example:
        >>> import torch
        >>> A = torch.tensor([[0.5, 0.2], [0.1, 0.4]], dtype=torch.float64)
        >>> w, info = anderson(tol=1e-12)(lambda w: A @ w + 1.0, torch.zeros(2, dtype=torch.float64))
        >>> torch.allclose(w, torch.linalg.solve(torch.eye(2, dtype=torch.float64) - A, torch.ones(2, dtype=torch.float64)))
        True
    """
    return Anderson(tol, maxiter, memory, mixing, regularization, check_every)
