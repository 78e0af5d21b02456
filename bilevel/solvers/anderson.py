"""Anderson acceleration (type II) of a fixed-point iteration, for one problem or a stack."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bilevel.solvers._flat import _eps
from bilevel.solvers._map_stack import RowMap, _MapStackSolver, _Stops
from bilevel.solvers.base import _check_int, _check_tol


class Anderson(_MapStackSolver):
    """Anderson acceleration (type II) of ``w <- map_fn(w)``."""

    method = "anderson"
    # named here so the API reference lists it under this class (autodoc skips members
    # inherited from the private base)
    solve_batch = _MapStackSolver.solve_batch

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

    def _extra(self) -> dict[str, Any]:
        return {"memory": self.memory}

    def _run(self, apply: RowMap, X: Tensor) -> tuple[Tensor, _Stops]:
        B, n = X.shape
        m, dtype = self.memory, X.dtype
        reg = self.regularization if self.regularization is not None else math.sqrt(_eps(dtype))
        tiny = float(torch.finfo(dtype).tiny)
        G = X.new_zeros(B, m, n)  # images map_fn(x_i), slot i % m
        F = X.new_zeros(B, m, n)  # residuals map_fn(x_i) - x_i
        gram = X.new_zeros(B, m, m)  # F_i^T F_j, the row and column of each new slot
        ones = X.new_ones(B, m, 1)
        eye = torch.eye(m, dtype=dtype, device=X.device)
        stops = _Stops.start(X)
        out, k = X, 0
        while True:
            gx = apply(X)
            fx = gx - X
            slot, filled = k % m, min(k + 1, m)
            G[:, slot] = stops.rows(gx, G[:, slot])
            F[:, slot] = stops.rows(fx, F[:, slot])
            # products as elementwise multiply and row sums, not bmm: a row's bits must not
            # depend on how many rows the stack has (vmap equals a loop)
            dots = (F[:, :filled] * F[:, slot].unsqueeze(1)).sum(-1)
            gram[:, slot, :filled] = stops.rows(dots, gram[:, slot, :filled])
            gram[:, :filled, slot] = stops.rows(dots, gram[:, :filled, slot])
            out = stops.rows(gx, out)  # the last image of each problem is its answer
            k += 1
            live = True
            if k % self.check_every == 0 or k == self.maxiter:
                live = stops.check(fx, k, self.tol, k >= self.maxiter)
            if k >= self.maxiter:
                stops.end(k)
                break
            if not live:
                break
            H = gram[:, :filled, :filled]
            # Scale-free Tikhonov term keeps the small Gram system solvable without a sync.
            scale = H.diagonal(dim1=1, dim2=2).mean(-1) + tiny
            H = H / scale[:, None, None] + reg * eye[:filled, :filled]
            # one LAPACK solve per matrix on the CPU: a row's weights do not depend on the stack
            z = torch.linalg.solve_ex(H, ones[:, :filled])[0].squeeze(-1)
            alpha = (z / z.sum(-1, keepdim=True)).unsqueeze(-1)
            images = G[:, :filled]
            if self.mixing != 1.0:
                images = images - (1.0 - self.mixing) * F[:, :filled]
            X = stops.rows((alpha * images).sum(1), X)
        return out, stops


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
    every ``check_every`` iterations (one sync each, and one at the end for the info
    record). There is no safeguard against divergence for maps far from contractive; use
    :func:`fixed_point_iteration` there. :meth:`Anderson.solve_batch` accelerates a stack
    of problems at once, each with its own iterate, history, least-squares weights and
    stopping decision (a stopped problem is frozen); under ``torch.func.vmap``,
    :func:`bilevel.fixed_point` with this solver uses it, and one problem alone runs
    through the same code as a stack of one, so every element gets the answer a single
    call gives.

    Example:
        >>> import torch
        >>> A = torch.tensor([[0.5, 0.2], [0.1, 0.4]], dtype=torch.float64)
        >>> w, info = anderson(tol=1e-12)(lambda w: A @ w + 1.0, torch.zeros(2, dtype=torch.float64))
        >>> torch.allclose(w, torch.linalg.solve(torch.eye(2, dtype=torch.float64) - A, torch.ones(2, dtype=torch.float64)))
        True
    """
    return Anderson(tol, maxiter, memory, mixing, regularization, check_every)
