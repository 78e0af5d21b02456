"""Implicit differentiation of a root: :func:`root`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bilevel._tree import Tree
from bilevel.implicit.diagnostics import ImplicitDiagnostics
from bilevel.implicit.layer import (
    _check_hparams,
    _check_linear_solver,
    _check_residual_shape,
    _check_solution,
    _with_data,
    solve_layer,
)
from bilevel.implicit.user_problem import LayerSpec
from bilevel.implicit.warm_start import WarmStart


def root(
    optimality_fn: Callable[..., Tree],
    solution_or_init: Tree,
    hparams: Any,
    data: Any = None,
    *,
    solver: Callable[..., Any] | None = None,
    linear_solver: Any = None,
    symmetric: bool | None = None,
    diagnostics: ImplicitDiagnostics | None = None,
    strict: bool = False,
    warm_start: WarmStart | None = None,
) -> Tree:
    """A root ``w`` of ``optimality_fn(w, hparams[, data]) = 0``, differentiable by the IFT.

    Args:
        optimality_fn: returns a residual shaped like ``w``.
        solution_or_init: the root (``solver=None``) or the solver's starting point.
        hparams, data: as in :func:`argmin`.
        solver: ``solver(fn, init) -> (solution, info)`` finding a root of ``fn(w)``, or
            ``None`` (the default: ``solution_or_init`` is the root). Under
            ``torch.func.vmap`` such a solver runs once per element (with ``None`` the
            given stack is taken at once). The fixed-point solvers of
            :mod:`bilevel.solvers` are refused here (they find ``w = fn(w)``): see
            :func:`fixed_point`.
        linear_solver: default :func:`bilevel.linalg.auto` of :func:`bilevel.linalg.gmres`
            (of ``cg`` when ``symmetric``): dense LU up to 64 unknowns.
        symmetric: whether ``dF/dw`` is symmetric. ``None`` infers it from the linear
            solver (with a warning for a symmetric-only one); ``False`` with ``cg``/
            ``minres`` is an error.
        diagnostics: an :class:`ImplicitDiagnostics`.
        strict: when the solver reports ``converged=False``, raise
            :class:`bilevel.solvers.NotStationaryError` instead of warning
            (:class:`bilevel.solvers.NotStationaryWarning`), as :func:`argmin` does.
        warm_start: a :class:`bilevel.WarmStart` carried across outer steps: the
            backward linear solve starts from the previous step's solution.

    Example:
        >>> import torch
        >>> h = torch.tensor([1.0, 4.0], dtype=torch.float64, requires_grad=True)
        >>> w = root(lambda w, h: w ** 2 - h, torch.sqrt(h.detach()), h)   # w = sqrt(h)
        >>> w.sum().backward()
        >>> h.grad                                                          # 1 / (2 sqrt(h))
        tensor([0.5000, 0.2500], dtype=torch.float64)
    """
    if not callable(optimality_fn):
        raise TypeError(f"optimality_fn must be callable, got {type(optimality_fn).__name__}")
    _check_hparams(hparams)
    init_leaves, spec = _check_solution(solution_or_init, "solution_or_init")
    if solver is not None and not callable(solver):
        raise TypeError(
            f"solver must be callable solver(fn, init) or None, got {type(solver).__name__}"
        )
    if getattr(solver, "kind", None) == "fixed_point":
        raise ValueError(
            f"root: solver={solver!r} iterates w <- fn(w), so it would return a fixed point of "
            "optimality_fn, not a root; use bilevel.fixed_point(map_fn, ...) with the map whose "
            "fixed point you want (e.g. w - step * optimality_fn(w)), or pass a root solver"
        )
    linear_solver, symmetric = _check_linear_solver(linear_solver, symmetric, "root")
    fn3 = _with_data(optimality_fn, data is not None)
    _check_residual_shape(
        fn3, solution_or_init, hparams, data, init_leaves, spec, "the output of optimality_fn"
    )
    layer = LayerSpec(
        name="root",
        residual=fn3,
        target=lambda h, d: lambda w: fn3(w, h, d),
        kind="map",
        solver=solver,
        linear_solver=linear_solver,
        symmetric=symmetric,
        diagnostics=diagnostics,
        strict=strict,
        warm_start=warm_start,
    )
    return solve_layer(layer, init_leaves, spec, hparams, data)
