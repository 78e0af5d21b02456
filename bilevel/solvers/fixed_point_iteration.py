"""Plain fixed-point iteration ``w <- map_fn(w)``, for one problem or a stack of them."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from bilevel.solvers._map_stack import _MAXITER, RowMap, _MapStackSolver, _Stops
from bilevel.solvers.base import _check_int, _check_tol


class FixedPointIteration(_MapStackSolver):
    """Plain iteration ``w <- map_fn(w)`` until ``||map_fn(w) - w|| <= tol``."""

    method = "fixed_point_iteration"
    # named here so the API reference lists it under this class (autodoc skips members
    # inherited from the private base)
    solve_batch = _MapStackSolver.solve_batch

    def __init__(self, tol: float = 1e-10, maxiter: int = 1000, check_every: int = 10) -> None:
        super().__init__()
        self.tol = _check_tol(tol)
        self.maxiter = _check_int(maxiter, "maxiter")
        self.check_every = _check_int(check_every, "check_every")

    def _settings(self) -> dict[str, Any]:
        return {"tol": self.tol, "maxiter": self.maxiter, "check_every": self.check_every}

    def _message(self, code: int, k: int) -> str:
        if code == _MAXITER:
            return (
                f"maxiter={self.maxiter} reached (the map may not be a contraction; try anderson())"
            )
        return super()._message(code, k)

    def _run(self, apply: RowMap, X: Tensor) -> tuple[Tensor, _Stops]:
        stops = _Stops.start(X)
        k = 0
        while True:
            X_new = apply(X)
            k += 1
            live = True
            checked = k % self.check_every == 0 or k == self.maxiter
            diff = X_new - X if checked else None
            # every live row takes its image, also one stopping now (the returned point)
            X = stops.rows(X_new, X)
            if diff is not None:
                live = stops.check(diff, k, self.tol, k >= self.maxiter)
            if k >= self.maxiter:
                stops.end(k)
                break
            if not live:
                break
        return X, stops


def fixed_point_iteration(
    tol: float = 1e-10, maxiter: int = 1000, check_every: int = 10
) -> FixedPointIteration:
    """A solver iterating ``w <- map_fn(w)``; ``solution, info = solver(map_fn, init)``.

    The residual ``||map_fn(w) - w||`` (reported as ``info.grad_norm``) is tested every
    ``check_every`` iterations and at ``maxiter`` (one host sync per test before
    ``maxiter``, and one at the end for the info record); the returned point is the last
    image ``map_fn(w)``. :meth:`FixedPointIteration.solve_batch` iterates a stack of
    problems at once, each with its own iterate and stopping decision (a stopped problem is
    frozen); under ``torch.func.vmap``, :func:`bilevel.fixed_point` with this solver uses
    it, and one problem alone runs through the same code as a stack of one, so every
    element gets the answer a single call gives.

    Example:
        >>> import torch
        >>> w, info = fixed_point_iteration(tol=1e-12)(lambda w: 0.5 * w + 1.0, torch.zeros(2, dtype=torch.float64))
        >>> torch.allclose(w, torch.full((2,), 2.0, dtype=torch.float64)), info.converged
        (True, True)
        >>> c = torch.tensor([[1.0], [4.0]], dtype=torch.float64)   # two problems, one call
        >>> W, infos = fixed_point_iteration(tol=1e-12, check_every=1).solve_batch(lambda W: 0.5 * W + c, torch.zeros(2, 1, dtype=torch.float64))
        >>> [round(x, 9) for x in W.flatten().tolist()], [i.iterations for i in infos]
        ([2.0, 8.0], [41, 43])
    """
    return FixedPointIteration(tol, maxiter, check_every)
