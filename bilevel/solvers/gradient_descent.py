"""Gradient descent with any :mod:`bilevel.optim` optimizer, to a gradient-norm tolerance."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import Tree, tree_unflatten
from bilevel.solvers._flat import _norm, _tree_value_and_grad
from bilevel.solvers.base import Objective, Solver, SolverInfo, _check_int, _check_tol, _check_tree


def _optimizer_names(init: Tree, leaves: list[Tensor]) -> list[str]:
    """Parameter names an optimizer sees (they key per-parameter settings)."""
    if isinstance(init, Tensor):
        return ["params"]
    if isinstance(init, Mapping) and all(isinstance(v, Tensor) for v in init.values()):
        return [str(k) for k in init]
    return [str(i) for i in range(len(leaves))]


class GradientDescent(Solver):
    """Runs a :mod:`bilevel.optim` optimizer until the gradient norm is <= ``tol``."""

    method = "gradient_descent"

    def __init__(
        self, optimizer: Any = None, tol: float = 1e-6, maxiter: int = 1000, check_every: int = 10
    ) -> None:
        super().__init__()
        if optimizer is None:
            from bilevel.optim import sgd

            optimizer = sgd(lr=0.1)
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "step")):
            raise TypeError(
                "optimizer must be a bilevel.optim optimizer (with init and step); got "
                f"{type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.tol = _check_tol(tol)
        self.maxiter = _check_int(maxiter, "maxiter")
        self.check_every = _check_int(check_every, "check_every")

    def _settings(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "tol": self.tol,
            "maxiter": self.maxiter,
            "check_every": self.check_every,
        }

    def _solve(self, objective: Objective, init: Tree) -> tuple[Tree, SolverInfo]:
        leaves, spec = _check_tree(init)
        names = _optimizer_names(init, leaves)
        # Copies, so that an objective or optimizer working in place cannot touch init.
        params = {n: leaf.detach().clone() for n, leaf in zip(names, leaves)}
        opt = self.optimizer
        if hasattr(opt, "validate"):
            opt.validate(params, {})  # device/dtype mismatches fail before the loop
        state = opt.init(params)
        converged, message, gnorm = False, "", math.nan
        f = torch.zeros(())
        k = 0
        for k in range(self.maxiter + 1):  # noqa: B007 - k is reported
            f, grads_list = _tree_value_and_grad(objective, list(params.values()), spec)
            if k % self.check_every == 0 or k == self.maxiter:
                gnorm = float(_norm(grads_list))  # the only sync of the loop
                if not math.isfinite(gnorm):
                    message = f"diverged: non-finite gradient at step {k}; lower the learning rate"
                    break
                if gnorm <= self.tol:
                    converged, message = True, "gradient norm <= tol"
                    break
            if k == self.maxiter:
                message = f"maxiter={self.maxiter} reached (raise maxiter or the learning rate)"
                break
            grads = dict(zip(names, grads_list))
            params, state = opt.step(params, grads, state, {})
        out = tree_unflatten([p.detach().clone() for p in params.values()], spec)
        info = SolverInfo(
            self.method, k, converged, gnorm, float(f), message, tol=self.tol, evaluations=k + 1
        )
        return out, info


def gradient_descent(
    optimizer: Any = None, tol: float = 1e-6, maxiter: int = 1000, check_every: int = 10
) -> GradientDescent:
    """A solver running any :mod:`bilevel.optim` optimizer to a gradient-norm tolerance.

    The optimizer's hyperparameters come from its constructor settings (``hparams``
    is empty). The gradient norm is read (one host sync) every ``check_every`` steps
    and at ``maxiter``, so the result can be up to ``check_every - 1`` steps past the
    first point below ``tol``. A tensor ``init`` is named ``"params"`` for the
    optimizer; a flat dict keeps its keys (for per-parameter settings).

    Example:
        >>> import torch, bilevel
        >>> solver = gradient_descent(bilevel.optim.sgd(lr=0.5), tol=1e-8)
        >>> w, info = solver(lambda w: ((w - 3.0) ** 2).sum(), torch.zeros(2, dtype=torch.float64))
        >>> w, info.converged
        (tensor([3., 3.], dtype=torch.float64), True)
    """
    return GradientDescent(optimizer, tol, maxiter, check_every)
