"""Proximal operators, differentiable by autograd.

``prox_f(x, hparams, step) = argmin_z 1/2 ||z - x||^2 + step * f(z)``. Every operator
here has the signature ``prox(x, hparams, step=1.0)`` that
:func:`bilevel.solvers.proximal_gradient` calls, and is written with ``sign``/``relu``/
``where`` so that autograd returns its generalized Jacobian (the one implicit
differentiation through the proximal fixed point needs): for the lasso, ``1`` on the
support and ``0`` off it; derivatives w.r.t. the regularization weights are exact too.

============================  =============================================  ==================
operator                      ``f(z)``                                       ``hparams``
============================  =============================================  ==================
:func:`lasso`                 ``l1 * ||z||_1``                               ``l1``
:func:`elastic_net`           ``l1 * ||z||_1 + l2 / 2 * ||z||^2``            ``{'l1', 'l2'}``
:func:`group_lasso`           ``l2 * sum_g ||z_g||_2`` (groups: last dim)    ``l2``
:func:`ridge`                 ``l2 / 2 * ||z||^2``                           ``l2``
:func:`non_negative_lasso`    ``l1 * sum(z)`` on ``z >= 0``                  ``l1``
:func:`non_negative_ridge`    ``l2 / 2 * ||z||^2`` on ``z >= 0``             ``l2``
:func:`from_projection`       the indicator of a convex set                  the projection's
============================  =============================================  ==================

Weights may be numbers, 0-d tensors or tensors broadcastable to ``x`` (one per feature).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Prox",
    "elastic_net",
    "from_projection",
    "group_lasso",
    "identity",
    "lasso",
    "non_negative_lasso",
    "non_negative_ridge",
    "ridge",
]

Prox = Callable[[Tensor, Any, Any], Tensor]


def _check(x: Tensor, step: Any, name: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name}: x must be a floating tensor, got {type(x).__name__}")
    if not isinstance(step, (int, float, Tensor)):
        raise TypeError(f"{name}: step must be a number or a tensor, got {type(step).__name__}")


def _weight(value: Any, x: Tensor, name: str, what: str) -> Tensor | float:
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name}: {what} must be a number or a tensor, got {type(value).__name__}")
    if isinstance(value, Tensor):
        try:
            torch.broadcast_shapes(value.shape, x.shape)
        except RuntimeError:
            raise ValueError(
                f"{name}: {what} of shape {tuple(value.shape)} does not broadcast to x of "
                f"shape {tuple(x.shape)}"
            ) from None
        return value.to(x.dtype)
    return float(value)


def _step(step: Any, x: Tensor) -> Tensor | float:
    # a per-problem step arrives as a tensor of shape (B,) or (B, 1, ...) from the solver
    return step.to(x.dtype) if isinstance(step, Tensor) else float(step)


def identity(x: Tensor, hparams: Any = None, step: Any = 1.0) -> Tensor:
    """The prox of ``f = 0``: ``x`` itself (proximal gradient is then gradient descent).

    Example:
        >>> identity(torch.tensor([1.0, -2.0]))
        tensor([ 1., -2.])
    """
    _check(x, step, "identity")
    return x


def lasso(x: Tensor, l1: Any, step: Any = 1.0) -> Tensor:
    """Soft thresholding, the prox of ``l1 * ||z||_1``: ``sign(x) max(|x| - step l1, 0)``.

    Example:
        >>> lasso(torch.tensor([3.0, -0.5, -2.0]), 1.0)
        tensor([ 2., -0., -1.])
    """
    _check(x, step, "lasso")
    t = _step(step, x) * _weight(l1, x, "lasso", "l1")
    return torch.sign(x) * torch.relu(x.abs() - t)


def elastic_net(x: Tensor, hparams: Any, step: Any = 1.0) -> Tensor:
    """Prox of ``l1 ||z||_1 + l2/2 ||z||^2``: soft thresholding scaled by ``1/(1 + step l2)``.

    ``hparams`` is ``(l1, l2)`` or ``{"l1": ..., "l2": ...}``; either may be per feature.

    Example:
        >>> elastic_net(torch.tensor([3.0, -0.5]), (1.0, 1.0))
        tensor([1., -0.])
    """
    _check(x, step, "elastic_net")
    if isinstance(hparams, dict):
        missing = {"l1", "l2"} - set(hparams)
        if missing:
            raise ValueError(f"elastic_net: hparams is missing {sorted(missing)}")
        l1, l2 = hparams["l1"], hparams["l2"]
    elif isinstance(hparams, (tuple, list)) and len(hparams) == 2:
        l1, l2 = hparams
    else:
        raise TypeError(
            f"elastic_net: hparams must be (l1, l2) or {{'l1': .., 'l2': ..}}, got {hparams!r}"
        )
    s = _step(step, x)
    w2 = _weight(l2, x, "elastic_net", "l2")
    return lasso(x, l1, step) / (1 + s * w2)


def ridge(x: Tensor, l2: Any, step: Any = 1.0) -> Tensor:
    """Prox of ``l2/2 ||z||^2``: ``x / (1 + step l2)``.

    Example:
        >>> ridge(torch.tensor([2.0, -4.0]), 1.0)
        tensor([ 1., -2.])
    """
    _check(x, step, "ridge")
    return x / (1 + _step(step, x) * _weight(l2, x, "ridge", "l2"))


def non_negative_lasso(x: Tensor, l1: Any, step: Any = 1.0) -> Tensor:
    """Prox of ``l1 * sum(z)`` restricted to ``z >= 0``: ``max(x - step l1, 0)``.

    Example:
        >>> non_negative_lasso(torch.tensor([3.0, 0.5, -2.0]), 1.0)
        tensor([2., 0., 0.])
    """
    _check(x, step, "non_negative_lasso")
    return torch.relu(x - _step(step, x) * _weight(l1, x, "non_negative_lasso", "l1"))


def non_negative_ridge(x: Tensor, l2: Any, step: Any = 1.0) -> Tensor:
    """Prox of ``l2/2 ||z||^2`` restricted to ``z >= 0``: ``max(x, 0) / (1 + step l2)``.

    Example:
        >>> non_negative_ridge(torch.tensor([2.0, -4.0]), 1.0)
        tensor([1., 0.])
    """
    _check(x, step, "non_negative_ridge")
    return torch.relu(x) / (1 + _step(step, x) * _weight(l2, x, "non_negative_ridge", "l2"))


def group_lasso(x: Tensor, l2: Any, step: Any = 1.0) -> Tensor:
    """Block soft thresholding, the prox of ``l2 * sum_g ||z_g||_2``; groups along the last dim.

    ``z_g = max(1 - step l2 / ||x_g||, 0) x_g``. ``x`` of shape ``(..., groups, size)``
    (a 1-d ``x`` is one group); ``l2`` may be one weight per group, shape ``(..., groups, 1)``.
    At ``x_g = 0`` the output and its Jacobian are zero (no division by zero).

    Example:
        >>> group_lasso(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), 1.0)
        tensor([[2.4000, 3.2000],
                [0.0000, 0.0000]])
    """
    _check(x, step, "group_lasso")
    if x.ndim == 0:
        raise ValueError("group_lasso: x needs at least one dimension (the group)")
    t = _step(step, x) * _weight(l2, x, "group_lasso", "l2")
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    return torch.relu(1 - t / safe) * x


def from_projection(projection: Callable[..., Tensor]) -> Prox:
    """The prox of the indicator of a convex set is its projection (``step`` is ignored).

    Called as ``projection(x)`` when ``hparams`` is ``None``, else ``projection(x, hparams)``
    (e.g. the radius of a ball).

    Example:
        >>> from bilevel.constraints import project_l2_ball
        >>> prox = from_projection(project_l2_ball)
        >>> prox(torch.tensor([3.0, 4.0]), 2.0, 0.1)
        tensor([1.2000, 1.6000])
    """
    if not callable(projection):
        raise TypeError(f"projection must be callable, got {type(projection).__name__}")

    def prox(x: Tensor, hparams: Any = None, step: Any = 1.0) -> Tensor:
        _check(x, step, "from_projection")
        return projection(x) if hparams is None else projection(x, hparams)

    prox.__name__ = f"prox_{getattr(projection, '__name__', 'projection')}"
    return prox
