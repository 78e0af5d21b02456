"""Implicit differentiation of a minimiser: :func:`argmin`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import Tree
from bilevel.implicit._leaves import _scalar_loss
from bilevel.implicit.compiled import CompiledLoss
from bilevel.implicit.diagnostics import ImplicitDiagnostics
from bilevel.implicit.layer import _check_hparams, _check_solution, _with_data, solve_layer
from bilevel.implicit.user_problem import LayerSpec
from bilevel.implicit.warm_start import WarmStart


def argmin(
    inner_loss: Callable[..., Tensor],
    solution_or_init: Tree,
    hparams: Any,
    data: Any = None,
    *,
    solver: Callable[..., Any] | None = None,
    linear_solver: Any = None,
    stationarity_tol: float | None = None,
    strict: bool = False,
    diagnostics: ImplicitDiagnostics | None = None,
    hvp: str = "reverse",
    warm_start: WarmStart | None = None,
    compiled: bool = False,
) -> Tree:
    """``argmin_w inner_loss(w, hparams[, data])``, differentiable w.r.t. hparams and data.

    Args:
        inner_loss: ``inner_loss(w, hparams)`` or, with ``data``, ``inner_loss(w, hparams,
            data)``; returns a scalar tensor.
        solution_or_init: with ``solver=None`` the solution, already computed (any way: a
            closed form, an external solver); otherwise the solver's starting point. A
            tensor or a dict/list/tuple of tensors of any shapes.
        hparams: a tensor or a dict of tensors / numbers / nested dicts. Gradients flow to
            every tensor in it that requires grad; numbers are constants.
        data: anything (e.g. a batch ``(x, y)``); its tensors are differentiable too.
        solver: ``solver(objective, init) -> (solution, info)`` minimizing ``objective(w)``,
            e.g. :func:`bilevel.solvers.lbfgs`; run without gradient tracking.
        linear_solver: the backward's linear solver (default :func:`bilevel.linalg.auto`: up to 64
            unknowns the Hessian formed and solved by the Cholesky factorisation that also
            tests it, LU when it is not positive definite, else :func:`bilevel.linalg.cg`);
            the operator is the Hessian ``d^2 inner_loss / dw^2`` by Hessian-vector products.
        stationarity_tol: if given, the gradient norm at the solution is checked against it
            (a ``RuntimeWarning`` naming the norm, or ``RuntimeError`` when ``strict``). Without
            it, a solver that reports ``converged=False`` triggers the same warning.
        strict: raise instead of warning when the solution is not stationary, and (in the
            backward pass) when it is not a minimum: a backward solve meeting negative
            curvature of the Hessian (:meth:`bilevel.linalg.LinearSolveInfo.indefinite`, cg
            and minres; the exact path of dense/auto tests the formed Hessian by Cholesky)
            warns :class:`bilevel.solvers.NotMinimumWarning` naming it.
        diagnostics: an :class:`ImplicitDiagnostics` collecting the solves' info records.
        hvp: ``"reverse"`` (default): Hessian-vector products by reverse-over-reverse,
            measured 2.5-4x faster on CPU than forward-over-reverse for losses dominated by
            matrix products (torch's forward-mode formulas for ``mm``/``mv`` copy the
            matrix); ``"forward"``: forward-over-reverse (``torch.func.jvp`` of
            ``torch.func.grad``, no double backward; when an op has no or a broken
            forward-mode formula, as ``huber_loss`` and ``mse_loss``, it warns once with a
            :class:`bilevel.forward_ad.ForwardModeFallbackWarning` and uses reverse mode for
            the problem's products).
        warm_start: a :class:`bilevel.WarmStart` carried across outer steps: the
            backward linear solve starts from the previous step's solution.
        compiled: compile the plain backward's exact path with ``torch.compile``
            (inductor): the Hessian, the dense solve with its checks and the
            hypergradient become one compiled call (about 0.1 ms at 3-30 unknowns against
            about 1 ms eager). Only with a linear solver that forms the matrix (the default
            ``auto`` up to 64 unknowns, ``dense``); the first call per inner loss and
            shapes compiles (10-40 s), so it pays in loops of thousands of calls (see the
            README, "Small problems"). Double backward, ``torch.func`` transforms and
            ``hvp="forward"`` still take the general path; a loss that cannot be compiled
            warns :class:`bilevel.CompileFallbackWarning` and runs uncompiled.

    Returns:
        The solution, shaped like ``solution_or_init``, attached to the autograd graph:
        backward, double backward, ``torch.func.jvp``/``jacfwd``/``jacrev``/``vmap`` work.

    Example:
        >>> X = torch.randn(20, 3, dtype=torch.float64); y = torch.randn(20, dtype=torch.float64)
        >>> l2 = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        >>> loss = lambda w, h: ((X @ w - y) ** 2).sum() + h * (w ** 2).sum()
        >>> w_star = torch.linalg.solve(X.T @ X + l2.detach() * torch.eye(3, dtype=torch.float64), X.T @ y)
        >>> w = argmin(loss, w_star, l2)            # solution given: closed form
        >>> w.sum().backward()
        >>> expected = -(torch.linalg.solve(X.T @ X + 0.5 * torch.eye(3, dtype=torch.float64), w_star)).sum()
        >>> bool(torch.allclose(l2.grad, expected))
        True
    """
    if not callable(inner_loss):
        raise TypeError(f"inner_loss must be callable, got {type(inner_loss).__name__}")
    if hvp not in ("forward", "reverse"):
        raise ValueError(f"hvp must be 'forward' or 'reverse', got {hvp!r}")
    _check_hparams(hparams)
    init_leaves, spec = _check_solution(solution_or_init, "solution_or_init")
    if solver is not None and not callable(solver):
        raise TypeError(
            f"solver must be callable solver(objective, init) or None, got {type(solver).__name__}"
        )
    if linear_solver is None:
        from bilevel.linalg.auto import _shared_auto

        linear_solver = _shared_auto()
    elif not callable(linear_solver):
        raise TypeError(
            f"linear_solver must be a bilevel.linalg solver, got {type(linear_solver).__name__}"
        )
    if not isinstance(compiled, bool):
        raise TypeError(f"compiled must be True or False, got {compiled!r}")
    loss3 = _with_data(inner_loss, data is not None)

    def objective(w: Any, h: Any, d: Any) -> Tensor:
        return _scalar_loss(loss3(w, h, d), "inner_loss")

    def residual(w: Any, h: Any, d: Any) -> Any:
        return torch.func.grad(lambda ww: objective(ww, h, d))(w)

    def target(h: Any, d: Any) -> Callable[[Any], Tensor]:
        return lambda w: objective(w, h, d)

    layer = LayerSpec(
        name="argmin",
        residual=residual,
        target=target,
        kind="objective",
        solver=solver,
        linear_solver=linear_solver,
        symmetric=True,
        diagnostics=diagnostics,
        objective=objective,
        stationarity_tol=stationarity_tol,
        strict=strict,
        hvp=hvp,
        warm_start=warm_start,
        compiled=CompiledLoss(inner_loss, data is not None) if compiled else None,
    )
    return solve_layer(layer, init_leaves, spec, hparams, data)
