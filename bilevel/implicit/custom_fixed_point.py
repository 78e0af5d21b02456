"""A decorator making any fixed-point solver differentiable: :func:`custom_fixed_point`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bilevel._tree import Tree, tree_flatten, tree_unflatten
from bilevel.implicit.custom_root import custom_root
from bilevel.implicit.diagnostics import ImplicitDiagnostics


def custom_fixed_point(
    map_fn: Callable[..., Tree],
    linear_solver: Any = None,
    diagnostics: ImplicitDiagnostics | None = None,
) -> Callable[[Callable[..., Tree]], Callable[..., Tree]]:
    """Decorator: make ``solver_fn(init, hparams, *args)`` returning a fixed point of
    ``map_fn(w, hparams, *args)`` differentiable.

    :func:`custom_root` applied to ``F(w) = map_fn(w, hparams, *args) - w`` (``dF/dw =
    J - I`` is not symmetric in general: GMRES by default). The solver runs without
    gradient tracking and may be anything: Anderson acceleration, a loop with early
    stopping, a closed form. Under ``torch.func.vmap`` the solver runs once per element;
    :func:`bilevel.fixed_point` with :func:`bilevel.solvers.anderson` or
    :func:`bilevel.solvers.fixed_point_iteration` iterates the stack at once instead.

    Args:
        map_fn: ``map_fn(w, hparams, *args)``, a tree shaped like ``w``.
        linear_solver: the backward/jvp linear solver (default :func:`bilevel.linalg.gmres`).
        diagnostics: an :class:`ImplicitDiagnostics` shared by every call.

    Example:
        >>> import torch
        >>> step = lambda w, h, a: 0.5 * w + h * a            # fixed point w = 2 h a
        >>> @custom_fixed_point(step)
        ... def iterate(init, h, a):
        ...     w = init
        ...     for _ in range(200):
        ...         w = step(w, h, a)
        ...     return w
        >>> h = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        >>> w = iterate(torch.zeros(2, dtype=torch.float64), h, torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> w.sum().backward(); round(float(h.grad), 8)         # d(2 h (1 + 2)) / dh
        6.0
    """
    if not callable(map_fn):
        raise TypeError(f"map_fn must be callable, got {type(map_fn).__name__}")

    def residual(w: Tree, hparams: Any, *args: Any) -> Tree:
        mapped, spec = tree_flatten(map_fn(w, hparams, *args))
        leaves, _ = tree_flatten(w)
        return tree_unflatten([m - x for m, x in zip(mapped, leaves)], spec)

    return custom_root(
        residual, linear_solver=linear_solver, symmetric=False, diagnostics=diagnostics
    )
