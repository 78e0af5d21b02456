"""The inner-solver protocol ``solution, info = solver(objective_or_map, init)``: the
:class:`SolverInfo` record, the stationarity exceptions, input checks and the
:class:`Solver` base class (validation, ``no_grad``, timing, ``last_info``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bilevel._tree import Tree, tree_flatten

Objective = Callable[[Tree], Tensor]
MapFn = Callable[[Tree], Tree]


@dataclass
class SolverInfo:
    """What a solver did: the convergence record every solver returns.

    ``grad_norm`` is the Euclidean norm of the gradient at the solution (the
    projected gradient when there are bounds; the residual ``||map_fn(w) - w||`` for
    fixed-point solvers). ``objective`` is ``nan`` when there is none.

    Example:
        >>> info = SolverInfo("lbfgs", 12, True, 3e-11, 0.25, "gradient norm <= tol", tol=1e-10)
        >>> print(info)
        lbfgs: converged in 12 iterations (gradient norm 3.000e-11 <= tol 1.0e-10, objective 0.25): gradient norm <= tol
    """

    method: str
    iterations: int
    converged: bool
    grad_norm: float
    objective: float
    message: str
    tol: float = math.nan
    evaluations: int = 0
    time: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        what = (
            "residual"
            if math.isnan(self.objective) and self.method in _FIXED_POINT
            else "gradient norm"
        )
        norm = f"{what} {self.grad_norm:.3e}"
        if not math.isnan(self.tol):
            norm += f" {'<=' if self.grad_norm <= self.tol else '>'} tol {self.tol:.1e}"
        if not math.isnan(self.objective):
            norm += f", objective {self.objective:.6g}"
        if self.converged:
            head = f"converged in {self.iterations} iterations"
        else:
            head = f"NOT converged after {self.iterations} iterations"
        return f"{self.method}: {head} ({norm}): {self.message}"


_FIXED_POINT = {"fixed_point_iteration", "anderson"}


class NotStationaryWarning(RuntimeWarning):
    """The inner solution's gradient norm is above tolerance (hypergradients may be off)."""


class NotStationaryError(RuntimeError):
    """Raised instead of :class:`NotStationaryWarning` in strict mode."""


class NotMinimumWarning(RuntimeWarning):
    """The inner solution of an argmin is a saddle point or a maximum (negative curvature)."""


class NotMinimumError(RuntimeError):
    """Raised instead of :class:`NotMinimumWarning` in strict mode."""


def _check_tol(tol: Any, name: str = "tol") -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"{name} must be a non-negative number; got {type(tol).__name__}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"{name} must be a finite number >= 0; got {tol!r}")
    return float(tol)


def _check_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= {minimum}; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value}")
    return int(value)


def _check_tree(tree: Any, name: str = "init") -> tuple[list[Tensor], Any]:
    """Leaves and spec of a tree of floating tensors, or a clear error."""
    leaves, spec = tree_flatten(tree)
    if not leaves:
        raise ValueError(f"{name} is empty: expected a tensor or a tree (dict) of tensors")
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor):
            raise TypeError(
                f"{name} must be a tensor or a tree (dict/list/tuple) of tensors; leaf {i} is "
                f"a {type(leaf).__name__}"
            )
        if not leaf.is_floating_point():
            raise TypeError(
                f"{name} must hold floating-point tensors; leaf {i} has dtype {leaf.dtype} "
                "(convert it with .double() or .float())"
            )
    devices = {leaf.device for leaf in leaves}
    if len(devices) > 1:
        raise ValueError(f"{name} has tensors on several devices {sorted(map(str, devices))}")
    return leaves, spec


def _scalar(out: Any) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"objective must return a 0-d tensor; got a {type(out).__name__}")
    if out.numel() != 1:
        raise ValueError(
            f"objective must return a scalar (0-d tensor); got a tensor of shape {tuple(out.shape)} "
            "(reduce it, e.g. with .sum() or .mean())"
        )
    return out.reshape(())


_NO_PATH = (
    "objective's output does not depend on the params it is given (no gradient path): use the "
    "tensors passed as its argument, not a captured copy, and do not detach them"
)


def _stopping(f: float, gnorm: float, tol: float, k: int, maxiter: int) -> tuple[bool, str] | None:
    """``(converged, message)`` when a descent loop must stop at iteration ``k``, else None."""
    if not (math.isfinite(f) and math.isfinite(gnorm)):
        return False, "non-finite objective or gradient at the current point"
    if gnorm <= tol:
        return True, "gradient norm <= tol"
    if k >= maxiter:
        return False, f"maxiter={maxiter} reached"
    return None


class Solver:
    """Base class: validation, ``no_grad``, timing and ``last_info``."""

    method = "solver"
    kind = "minimize"  # or "fixed_point": what the first argument of a call is

    def __init__(self) -> None:
        self.last_info: SolverInfo | None = None

    def __call__(self, fn: Callable[[Tree], Any], init: Tree) -> tuple[Tree, SolverInfo]:
        if not callable(fn):
            what = "objective" if self.kind == "minimize" else "map_fn"
            raise TypeError(f"{what} must be callable; got {type(fn).__name__}")
        _check_tree(init)
        start = time.perf_counter()
        with torch.no_grad():
            solution, info = self._solve(fn, init)
        info.time = time.perf_counter() - start
        self.last_info = info
        return solution, info

    def _solve(self, fn: Callable[[Tree], Any], init: Tree) -> tuple[Tree, SolverInfo]:
        raise NotImplementedError  # pragma: no cover - abstract

    def _settings(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._settings().items())
        return f"{self.method}({inner})"


def _apply_map(map_fn: MapFn, w: Tree, spec: Any, shapes: list[torch.Size]) -> list[Tensor]:
    out = map_fn(w)
    leaves, out_spec = tree_flatten(out)
    if out_spec != spec:
        raise ValueError(f"map_fn must return a tree with init's structure {spec}; got {out_spec}")
    for i, (leaf, shape) in enumerate(zip(leaves, shapes)):
        if not isinstance(leaf, Tensor) or leaf.shape != shape:
            got = tuple(leaf.shape) if isinstance(leaf, Tensor) else type(leaf).__name__
            raise ValueError(f"map_fn output leaf {i} should have shape {tuple(shape)}; got {got}")
    return [leaf.detach() for leaf in leaves]
