"""KKT optimality functions for general smooth constrained problems (use with ``root``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["make_kkt_optimality_fn"]


def make_kkt_optimality_fn(
    objective: Callable[[Tensor, Any], Tensor],
    eq_constraint: Callable[[Tensor, Any], Tensor] | None = None,
    ineq_constraint: Callable[[Tensor, Any], Tensor] | None = None,
) -> Callable[[tuple[Tensor, ...], Any], tuple[Tensor, ...]]:
    """The KKT residual of ``min_x objective(x, h)  s.t.  eq(x, h) = 0, ineq(x, h) <= 0``.

    Returns ``F(w, hparams)`` with ``w = (x, y, z)`` (``y`` the multipliers of the
    equalities, ``z >= 0`` those of the inequalities; leave out the ones whose constraint
    is ``None``, so ``w = (x, z)`` or ``(x,)``):
    ``F = (grad_x L, eq(x), z * ineq(x))`` with ``L = f + y'eq + z'ineq``. Its root is
    a KKT point; :func:`bilevel.root` (or :func:`bilevel.custom_root`) differentiates it
    by the implicit function theorem. ``dF/dw`` is not symmetric: use ``gmres`` or
    ``dense``.

    Example:
        >>> import bilevel
        >>> f = lambda x, h: ((x - h) ** 2).sum()            # project h onto {x1 + x2 = 1}
        >>> F = make_kkt_optimality_fn(f, eq_constraint=lambda x, h: x.sum(-1, keepdim=True) - 1)
        >>> h = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
        >>> x0 = torch.tensor([1.0, 0.0], dtype=torch.float64); y0 = torch.zeros(1, dtype=torch.float64)
        >>> x, y = bilevel.root(F, (x0, y0), h, linear_solver=bilevel.linalg.dense())
        >>> x[0].backward(); h.grad                          # d x1 / d h = (1/2, -1/2)
        tensor([ 0.5000, -0.5000], dtype=torch.float64)
    """
    for name, fn in (
        ("objective", objective),
        ("eq_constraint", eq_constraint),
        ("ineq_constraint", ineq_constraint),
    ):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
    if objective is None:
        raise TypeError("objective is required")
    n_parts = 1 + (eq_constraint is not None) + (ineq_constraint is not None)
    layout = "(x" + (", y" if eq_constraint else "") + (", z" if ineq_constraint else "") + ")"

    def optimality_fn(w: tuple[Tensor, ...], hparams: Any) -> tuple[Tensor, ...]:
        if not isinstance(w, (tuple, list)) or len(w) != n_parts:
            raise ValueError(
                f"the KKT variables must be the tuple {layout}, got {type(w).__name__}"
                + (f" of length {len(w)}" if isinstance(w, (tuple, list)) else "")
            )
        x = w[0]
        y = w[1] if eq_constraint is not None else x
        z = w[-1] if ineq_constraint is not None else x  # x: a placeholder never read

        def lagrangian(xx: Tensor) -> Tensor:
            value = objective(xx, hparams).reshape(())
            if eq_constraint is not None:
                value = value + (y * eq_constraint(xx, hparams)).sum()
            if ineq_constraint is not None:
                value = value + (z * ineq_constraint(xx, hparams)).sum()
            return value

        out = [torch.func.grad(lagrangian)(x)]
        if eq_constraint is not None:
            out.append(eq_constraint(x, hparams))
        if ineq_constraint is not None:
            out.append(z * ineq_constraint(x, hparams))
        return tuple(out)

    return optimality_fn
