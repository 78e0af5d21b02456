"""Implicit differentiation of a fixed point: :func:`fixed_point` (and the fixed point of a
projected gradient step found by minimisation, for ``constraints.projected_argmin``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from bilevel._tree import Tree, tree_flatten, tree_unflatten
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


def fixed_point(
    map_fn: Callable[..., Tree],
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
    """A fixed point ``w = map_fn(w, hparams[, data])``, differentiable by the IFT.

    The optimality function is ``F(w) = w - map_fn(w)``; ``dF/dw = I - J`` (``J`` the
    map's Jacobian) is in general not symmetric, so the default linear solver is
    :func:`bilevel.linalg.gmres`. With ``linear_solver=bilevel.linalg.neumann()`` (its
    default ``alpha=1``) the backward solve is the Neumann series of the map's own
    Jacobian, ``sum_k (J^T)^k g``: no step size to choose, convergent when the map is a
    contraction at the fixed point (spectral radius of ``J`` below 1; the rate is that
    radius). A series that diverges or is truncated before ``tol`` warns with its
    residual.

    Args:
        map_fn: returns a tree shaped like ``w``.
        solution_or_init: the fixed point (``solver=None``) or the starting point.
        solver: ``solver(map, init) -> (solution, info)``, e.g.
            :func:`bilevel.solvers.fixed_point_iteration` or :func:`bilevel.solvers.anderson`.
            Under ``torch.func.vmap`` these two iterate the whole stack at once (their
            ``solve_batch``), each element with its own iterate and stopping, so every
            element gets the answer of a single call; another solver runs once per element.
        linear_solver, symmetric, diagnostics, strict: as in :func:`root`.
        warm_start: a :class:`bilevel.WarmStart` carried across outer steps: the
            backward linear solve starts from the previous step's solution.

    Example:
        >>> import torch
        >>> h = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        >>> w = fixed_point(lambda w, h: 0.5 * w + h, 2 * h.detach(), h)   # w = 2 h
        >>> w.backward(); h.grad
        tensor(2., dtype=torch.float64)
    """
    if not callable(map_fn):
        raise TypeError(f"map_fn must be callable, got {type(map_fn).__name__}")
    _check_hparams(hparams)
    init_leaves, spec = _check_solution(solution_or_init, "solution_or_init")
    if solver is not None and not callable(solver):
        raise TypeError(
            f"solver must be callable solver(map_fn, init) or None, got {type(solver).__name__}"
        )
    linear_solver, symmetric = _check_linear_solver(linear_solver, symmetric, "fixed_point")
    map3 = _with_data(map_fn, data is not None)
    _check_residual_shape(
        map3, solution_or_init, hparams, data, init_leaves, spec, "the output of map_fn"
    )

    layer = LayerSpec(
        name="fixed_point",
        residual=_map_residual(map3),
        target=lambda h, d: lambda w: map3(w, h, d),
        kind="map",
        solver=solver,
        linear_solver=linear_solver,
        symmetric=symmetric,
        diagnostics=diagnostics,
        strict=strict,
        warm_start=warm_start,
    )
    return solve_layer(layer, init_leaves, spec, hparams, data)


def _map_residual(map3: Callable[[Any, Any, Any], Any]) -> Callable[[Any, Any, Any], Any]:
    """The optimality function ``F(w) = w - map(w)`` of a fixed point of ``map3``.

    This sign makes ``dF/dw = I - J``, whose Neumann series with ``alpha = 1`` is the
    series of the map's Jacobian ``J`` (the hypergradient does not depend on the sign).
    """

    def residual(w: Any, h: Any, d: Any) -> Any:
        mapped, mspec = tree_flatten(map3(w, h, d))
        wl, _ = tree_flatten(w)
        return tree_unflatten([x - m for m, x in zip(mapped, wl)], mspec)

    return residual


def _constrained_argmin(
    loss3: Callable[[Any, Any, Any], Tensor],
    step_map: Callable[[Any, Any, Any], Any],
    solution_or_init: Tree,
    hparams: Any,
    data: Any,
    *,
    solver: Callable[..., Any],
    linear_solver: Any,
    diagnostics: ImplicitDiagnostics | None,
    strict: bool = False,
) -> Tree:
    """The fixed point of ``step_map`` found by minimizing ``loss3`` (constraints.projected_argmin)."""
    _check_hparams(hparams)
    init_leaves, spec = _check_solution(solution_or_init, "solution_or_init")
    linear_solver, symmetric = _check_linear_solver(linear_solver, None, "projected_argmin")
    _check_residual_shape(
        step_map, solution_or_init, hparams, data, init_leaves, spec, "the projected gradient step"
    )

    # the fixed point of the projected step, found by minimising the loss in the box
    layer = LayerSpec(
        name="projected_argmin",
        residual=_map_residual(step_map),
        target=lambda h, d: lambda w: loss3(w, h, d),
        kind="objective",
        solver=solver,
        linear_solver=linear_solver,
        symmetric=symmetric,
        diagnostics=diagnostics,
        strict=strict,
    )
    return solve_layer(layer, init_leaves, spec, hparams, data)
