"""Implicit differentiation of composite problems through the proximal fixed point.

``w* = argmin_w f(w, h) + g(w, h')`` is a fixed point of one proximal gradient step,
``w = T(w) = prox_{eta g}(w - eta grad f(w))`` for every ``eta > 0``; the implicit
function theorem on ``T(w) - w = 0`` gives the hypergradient (Blondel et al. 2021).

Support restriction (Bertrand et al. 2020, "Implicit differentiation of Lasso-type
models for hyperparameter optimization"): for a prox that is flat off the support
(lasso, elastic net, group lasso, their non-negative forms), ``dT/dw`` has zero rows
outside the support ``S = {w_j != 0}`` and ``dT/dh`` vanishes there, so the linear
system of a backward (or jvp) pass decouples: only its ``|S|`` support coordinates
matter, and the rest are set to zero exactly. The restricted system is solved instead
of the full one: its Krylov iterations are bounded by ``|S|`` and its conditioning is
that of the Hessian on the support (well posed even with more features than samples).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel.implicit._leaves import _Packer, _scalar_loss
from bilevel.implicit.diagnostics import ImplicitDiagnostics
from bilevel.implicit.fixed_point import _map_residual
from bilevel.implicit.layer import (
    _call_implicit,
    _check_hparams,
    _check_linear_solver,
    _check_residual_shape,
    _check_solution,
    _with_data,
)
from bilevel.implicit.user_problem import LayerSpec, _UserProblem

__all__ = ["proximal_argmin"]


class _ProximalProblem(_UserProblem):
    """The proximal fixed point; products restricted to the support when asked."""

    def __init__(self, *args: Any, restricted: bool) -> None:
        super().__init__(*args)
        self.restricted = restricted

    def _masked(
        self,
        op: Callable[..., list[Tensor]],
        sol: Sequence[Tensor],
        theta: Sequence[Tensor],
        v: Sequence[Tensor],
    ) -> list[Tensor]:
        # off the support the operator is the identity (those coordinates are decoupled
        # and come out zero when the right-hand side is zero there: Bertrand et al. 2020)
        masks = [(x != 0).to(x.dtype) for x in sol]
        out = op(sol, theta, [m * x for m, x in zip(masks, v)])
        return [m * o - (1 - m) * x for m, o, x in zip(masks, out, v)]

    def matvec(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor], v: Sequence[Tensor]
    ) -> list[Tensor]:
        if not self.restricted:
            return super().matvec(sol, theta, v)
        return self._masked(super().matvec, sol, theta, v)

    def rmatvec(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor], v: Sequence[Tensor]
    ) -> list[Tensor]:
        if not self.restricted:
            return super().rmatvec(sol, theta, v)
        return self._masked(super().rmatvec, sol, theta, v)

    def _finish(self, out: Any, init: Sequence[Tensor], target: Any, info: Any) -> list[Tensor]:
        sol = super()._finish(out, init, target, info)
        if info is not None and not getattr(info, "converged", True):
            from bilevel.solvers import NotStationaryWarning

            warnings.warn(
                f"proximal_argmin: the inner solver did not converge ({info}); the implicit "
                "hypergradient assumes a minimiser: raise its maxiter or loosen its tol",
                NotStationaryWarning,
                stacklevel=2,
            )
        return sol


def proximal_argmin(
    smooth_loss: Callable[..., Tensor],
    solution_or_init: Tensor,
    hparams: Any,
    data: Any = None,
    *,
    prox: Callable[[Tensor, Any, Any], Tensor],
    prox_hparams: Any = None,
    step_size: float = 1.0,
    solver: Any = "default",
    linear_solver: Any = None,
    support_restricted: bool = True,
    diagnostics: ImplicitDiagnostics | None = None,
) -> Tensor:
    """``argmin_w smooth_loss(w, hparams[, data]) + g(w)``, differentiable by the IFT.

    Args:
        smooth_loss: the smooth part ``f``; returns a scalar.
        solution_or_init: the solution (``solver=None``) or the solver's start: a tensor.
        hparams, data: as in :func:`bilevel.argmin`.
        prox: ``prox(w, prox_hparams, step)``, the proximal operator of ``step * g``
            (e.g. :func:`bilevel.prox.lasso`, :func:`bilevel.prox.elastic_net`).
        prox_hparams: the prox's hyperparameters (e.g. ``l1``; a dict ``{"l1", "l2"}``
            for the elastic net); ``None`` passes ``hparams``. Differentiable too.
        step_size: ``eta`` of the fixed point ``w = prox(w - eta grad f, eta)``; any
            ``eta > 0`` has the same fixed points, and with ``support_restricted`` the
            hypergradient does not depend on it; ``1/L`` conditions the full system best.
        solver: default :func:`bilevel.solvers.proximal_gradient`; ``None``: the given
            tensor is the solution.
        linear_solver: default :func:`bilevel.linalg.gmres`.
        support_restricted: solve the backward/jvp linear system on the support only
            (valid for proxes whose output is locally constant where it is zero, i.e.
            every sparsity-inducing prox of :mod:`bilevel.prox`; set ``False`` for others,
            e.g. ridge or a projection whose zeros are not flat).
        diagnostics: an :class:`ImplicitDiagnostics`.

    Example:
        >>> import bilevel
        >>> _ = torch.manual_seed(0)
        >>> X = torch.randn(30, 5, dtype=torch.float64); y = X[:, 0] + 0.1 * torch.randn(30, dtype=torch.float64)
        >>> l1 = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        >>> f = lambda w, h, d: 0.5 * ((d[0] @ w - d[1]) ** 2).mean()
        >>> w = proximal_argmin(f, torch.zeros(5, dtype=torch.float64), {}, (X, y),
        ...                     prox=bilevel.prox.lasso, prox_hparams=l1)
        >>> w.abs().sum().backward()
        >>> bool(l1.grad < 0)                  # a larger penalty shrinks ||w||_1
        True
    """
    from bilevel.solvers.proximal_gradient import Composite, proximal_gradient

    if not callable(smooth_loss):
        raise TypeError(f"smooth_loss must be callable, got {type(smooth_loss).__name__}")
    if not callable(prox):
        raise TypeError(f"prox must be callable prox(w, hparams, step), got {type(prox).__name__}")
    if not isinstance(solution_or_init, Tensor):
        raise TypeError(
            "proximal_argmin: solution_or_init must be one tensor, got "
            f"{type(solution_or_init).__name__}"
        )
    if isinstance(step_size, bool) or not (
        isinstance(step_size, (int, float)) and step_size > 0 and math.isfinite(step_size)
    ):
        raise ValueError(f"step_size must be a positive number, got {step_size!r}")
    if not isinstance(support_restricted, bool):
        raise TypeError("support_restricted must be a bool")
    _check_hparams(hparams)
    init_leaves, spec = _check_solution(solution_or_init, "solution_or_init")
    if solver == "default":
        solver = proximal_gradient()
    if solver is not None and getattr(solver, "kind", None) != "composite":
        raise TypeError(
            "solver must be a composite solver (bilevel.solvers.proximal_gradient()) or None, "
            f"got {solver!r}"
        )
    linear_solver, symmetric = _check_linear_solver(linear_solver, None, "proximal_argmin")
    loss3 = _with_data(smooth_loss, data is not None)
    own_prox = prox_hparams is not None
    packed = {"loss": hparams, "prox": prox_hparams} if own_prox else {"loss": hparams}
    eta = float(step_size)

    def parts(h: Any) -> tuple[Any, Any]:
        return h["loss"], (h["prox"] if own_prox else h["loss"])

    def objective(w: Tensor, h: Any, d: Any) -> Tensor:
        return _scalar_loss(loss3(w, parts(h)[0], d), "smooth_loss")

    def step_map(w: Tensor, h: Any, d: Any) -> Tensor:
        g = torch.func.grad(lambda ww: objective(ww, h, d))(w)
        return prox(w - eta * g, parts(h)[1], eta)

    def target(h: Any, d: Any) -> Composite:
        return Composite(lambda w: objective(w, h, d), lambda w, step: prox(w, parts(h)[1], step))

    _check_residual_shape(
        step_map, solution_or_init, packed, data, init_leaves, spec, "the proximal step"
    )
    layer = LayerSpec(
        name="proximal_argmin",
        residual=_map_residual(step_map),
        target=target,
        kind="composite",
        solver=solver,
        linear_solver=linear_solver,
        symmetric=symmetric,
        diagnostics=diagnostics,
    )
    packer = _Packer((packed, data))
    problem = _ProximalProblem(layer, init_leaves, spec, packer, restricted=support_restricted)
    out: Tensor = _call_implicit(problem, init_leaves, packer, spec)
    return out
