"""A decorator making any solver function differentiable: :func:`custom_root`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bilevel._tree import Tree
from bilevel.implicit.diagnostics import ImplicitDiagnostics
from bilevel.implicit.layer import (
    _check_hparams,
    _check_linear_solver,
    _check_solution,
    solve_layer,
)
from bilevel.implicit.user_problem import LayerSpec


def custom_root(
    optimality_fn: Callable[..., Tree],
    linear_solver: Any = None,
    symmetric: bool | None = None,
    diagnostics: ImplicitDiagnostics | None = None,
    *,
    stationarity_tol: float | None = None,
    strict: bool = False,
) -> Callable[[Callable[..., Tree]], Callable[..., Tree]]:
    """Decorator: make ``solver_fn(init, hparams, *args) -> solution`` differentiable.

    The solution is differentiated by the implicit function theorem applied to
    ``optimality_fn(solution, hparams, *args) = 0`` (same extra arguments as the
    solver). The solver runs without gradient tracking, on detached inputs, and may be
    anything (closed form, scipy, a loop with early stopping). Under ``torch.func.vmap``
    the solver is called once per batch element.

    The solver may return ``(solution, info)`` where ``info`` has a ``converged``
    attribute (e.g. a :class:`bilevel.solvers.SolverInfo`): a solve that did not
    converge then warns (raises when ``strict``), as in :func:`argmin`. For solvers
    that report nothing, ``stationarity_tol`` checks ``||F(solution)||`` instead (one
    evaluation of ``optimality_fn`` and one host sync per call).

    Args:
        optimality_fn: ``F(solution, hparams, *args)``, a tree shaped like the solution.
        linear_solver: the linear solver for backward/jvp passes (default
            ``auto(gmres())``, or ``auto(cg())`` when ``symmetric=True``: dense LU up to 64
            unknowns).
        symmetric: whether ``dF/dw`` is symmetric (e.g. ``F`` is a gradient); see :func:`root`.
        diagnostics: an :class:`ImplicitDiagnostics` shared by every call.
        stationarity_tol: if given, warn (raise when ``strict``) when
            ``||optimality_fn(solution, ...)|| > stationarity_tol``.
        strict: raise :class:`bilevel.solvers.NotStationaryError` instead of warning.

    Example:
        >>> import torch
        >>> def optimality(w, h, X, y):           # gradient of the ridge objective
        ...     return X.T @ (X @ w - y) + h * w
        >>> @custom_root(optimality, symmetric=True)
        ... def ridge(init, h, X, y):
        ...     return torch.linalg.solve(X.T @ X + h * torch.eye(X.shape[1], dtype=X.dtype), X.T @ y)
        >>> X = torch.randn(10, 3, dtype=torch.float64); y = torch.randn(10, dtype=torch.float64)
        >>> h = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> w = ridge(torch.zeros(3, dtype=torch.float64), h, X, y)
        >>> w.sum().backward(); h.grad.shape
        torch.Size([])
    """
    if not callable(optimality_fn):
        raise TypeError(f"optimality_fn must be callable, got {type(optimality_fn).__name__}")
    if stationarity_tol is not None and not (
        isinstance(stationarity_tol, (int, float)) and stationarity_tol >= 0
    ):
        raise ValueError(
            f"stationarity_tol must be a number >= 0 or None, got {stationarity_tol!r}"
        )
    lin, sym = _check_linear_solver(linear_solver, symmetric, "custom_root")

    def decorator(solver_fn: Callable[..., Tree]) -> Callable[..., Tree]:
        if not callable(solver_fn):
            raise TypeError(
                f"custom_root decorates a solver function, got {type(solver_fn).__name__}"
            )

        def wrapped(init: Tree, hparams: Any, *args: Any) -> Tree:
            _check_hparams(hparams)
            init_leaves, spec = _check_solution(init, "init")
            fn3 = lambda w, h, d: optimality_fn(w, h, *d)  # noqa: E731
            layer = LayerSpec(
                name=getattr(solver_fn, "__name__", "custom_root"),
                residual=fn3,
                target=None,
                kind="opaque",
                solver=solver_fn,
                linear_solver=lin,
                symmetric=sym,
                diagnostics=diagnostics,
                stationarity_tol=stationarity_tol,
                strict=strict,
                returns_info=False,
            )
            return solve_layer(layer, init_leaves, spec, hparams, tuple(args))

        wrapped.__name__ = getattr(solver_fn, "__name__", "wrapped")
        wrapped.__doc__ = solver_fn.__doc__
        wrapped.__wrapped__ = solver_fn  # type: ignore[attr-defined]
        return wrapped

    return decorator
