"""Stationarity checks at an inner solution: the (projected) gradient norm, a warning
or error above tolerance, and the fixed-point residual.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from bilevel._tree import Tree, tree_unflatten
from bilevel.solvers._flat import _Flat, _norm, _tree_value_and_grad
from bilevel.solvers.base import (
    MapFn,
    NotStationaryError,
    NotStationaryWarning,
    Objective,
    _apply_map,
    _check_tol,
    _check_tree,
)
from bilevel.solvers.bounds import _bound_arrays


def stationarity(objective: Objective, solution: Tree, bounds: Any = None) -> float:
    """The gradient norm of ``objective`` at ``solution`` (one host sync).

    With ``bounds=(lower, upper)`` (as in :func:`scipy_minimize`) it is the norm of
    the projected gradient ``w - clip(w - grad, lower, upper)``, zero at a
    constrained optimum.

    Example:
        >>> import torch
        >>> stationarity(lambda w: (w ** 2).sum(), torch.tensor([3.0, 4.0]))
        10.0
    """
    leaves, spec = _check_tree(solution, "solution")
    with torch.no_grad():
        _, grads = _tree_value_and_grad(objective, leaves, spec)
        if bounds is None:
            return float(_norm(grads))
        flat = _Flat(solution, "solution")
        box = _bound_arrays(bounds, solution, flat.size)
        assert box is not None
        x = flat.ravel(solution).detach()
        g = flat.ravel(tree_unflatten(grads, spec))
        lb = torch.as_tensor(box[0]).to(device=x.device, dtype=x.dtype)
        ub = torch.as_tensor(box[1]).to(device=x.device, dtype=x.dtype)
        return float((x - torch.minimum(torch.maximum(x - g, lb), ub)).norm())


def check_stationarity(
    objective: Objective, solution: Tree, tol: float, strict: bool = False, bounds: Any = None
) -> float:
    """Warn (or raise, when ``strict``) if the gradient norm at ``solution`` exceeds ``tol``.

    Implicit differentiation assumes ``solution`` is an exact optimum; the error of
    the hypergradient grows with the gradient norm there. Returns the norm. The
    warning is a :class:`NotStationaryWarning` (a ``RuntimeWarning``); strict mode
    raises :class:`NotStationaryError` (a ``RuntimeError``).

    Example:
        >>> import torch
        >>> check_stationarity(lambda w: (w ** 2).sum(), torch.zeros(2), tol=1e-8)
        0.0
    """
    tol = _check_tol(tol)
    norm = stationarity(objective, solution, bounds)
    if not norm <= tol:  # also catches NaN
        text = (
            f"solution is not stationary: gradient norm {norm:.3e} > tol {tol:.1e}; the implicit "
            "hypergradient assumes an exact optimum and may be inaccurate (solve the inner "
            "problem more accurately: lower the solver's tol or raise its maxiter)"
        )
        if strict:
            raise NotStationaryError(text)
        warnings.warn(text, NotStationaryWarning, stacklevel=2)
    return norm


def fixed_point_residual(map_fn: MapFn, solution: Tree) -> float:
    """``||map_fn(w) - w||`` at ``w = solution`` (one host sync).

    Example:
        >>> import torch
        >>> fixed_point_residual(lambda w: 0.5 * w + 1.0, torch.full((2,), 2.0))
        0.0
    """
    leaves, spec = _check_tree(solution, "solution")
    with torch.no_grad():
        out = _apply_map(map_fn, solution, spec, [leaf.shape for leaf in leaves])
        return float(_norm([a - b for a, b in zip(out, leaves)]))
