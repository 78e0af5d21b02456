"""Plain fixed-point iteration ``w <- map_fn(w)``."""

from __future__ import annotations

import math
from typing import Any

from bilevel._tree import Tree, tree_unflatten
from bilevel.solvers._flat import _norm
from bilevel.solvers.base import (
    MapFn,
    Solver,
    SolverInfo,
    _apply_map,
    _check_int,
    _check_tol,
    _check_tree,
)


class FixedPointIteration(Solver):
    """Plain iteration ``w <- map_fn(w)`` until ``||map_fn(w) - w|| <= tol``."""

    method = "fixed_point_iteration"
    kind = "fixed_point"

    def __init__(self, tol: float = 1e-10, maxiter: int = 1000, check_every: int = 10) -> None:
        super().__init__()
        self.tol = _check_tol(tol)
        self.maxiter = _check_int(maxiter, "maxiter")
        self.check_every = _check_int(check_every, "check_every")

    def _settings(self) -> dict[str, Any]:
        return {"tol": self.tol, "maxiter": self.maxiter, "check_every": self.check_every}

    def _solve(self, map_fn: MapFn, init: Tree) -> tuple[Tree, SolverInfo]:
        leaves, spec = _check_tree(init)
        shapes = [leaf.shape for leaf in leaves]
        w = [leaf.detach().clone() for leaf in leaves]  # a map working in place cannot touch init
        converged, message, res = False, "", math.nan
        k = 0
        while True:
            w_new = _apply_map(map_fn, tree_unflatten(w, spec), spec, shapes)
            k += 1
            if k % self.check_every == 0 or k == self.maxiter:
                res = float(_norm([a - b for a, b in zip(w_new, w)]))  # the loop's only sync
                if not math.isfinite(res):
                    w = w_new
                    message = f"diverged: non-finite residual at iteration {k}"
                    break
                if res <= self.tol:
                    w, converged, message = w_new, True, "residual ||map_fn(w) - w|| <= tol"
                    break
            w = w_new
            if k >= self.maxiter:
                message = (
                    f"maxiter={self.maxiter} reached (the map may not be a contraction; try "
                    "anderson())"
                )
                break
        out = tree_unflatten([leaf.clone() for leaf in w], spec)
        info = SolverInfo(
            self.method, k, converged, res, math.nan, message, tol=self.tol, evaluations=k
        )
        return out, info


def fixed_point_iteration(
    tol: float = 1e-10, maxiter: int = 1000, check_every: int = 10
) -> FixedPointIteration:
    """A solver iterating ``w <- map_fn(w)``; ``solution, info = solver(map_fn, init)``.

    The residual ``||map_fn(w) - w||`` (reported as ``info.grad_norm``) is read every
    ``check_every`` iterations and at ``maxiter`` (one host sync each); the returned
    point is the last image ``map_fn(w)``.

    Example:
        >>> import torch
        >>> w, info = fixed_point_iteration(tol=1e-12)(lambda w: 0.5 * w + 1.0, torch.zeros(2, dtype=torch.float64))
        >>> torch.allclose(w, torch.full((2,), 2.0, dtype=torch.float64)), info.converged
        (True, True)
    """
    return FixedPointIteration(tol, maxiter, check_every)
