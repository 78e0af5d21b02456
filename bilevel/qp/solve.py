"""``bilevel.qp``: the differentiable batched QP."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from bilevel.qp.kkt import QPFunction, duals_from_primal
from bilevel.qp.primal_dual import InteriorPoint, interior_point
from bilevel.qp.problem import QPData, as_qp_data

__all__ = ["qp"]


def qp(
    Q: Tensor,
    p: Tensor,
    A: Tensor | None = None,
    b: Tensor | None = None,
    G: Tensor | None = None,
    h: Tensor | None = None,
    *,
    solver: InteriorPoint | None = None,
    solution: Tensor | Sequence[Tensor] | None = None,
    active_tol: float | None = None,
    return_duals: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """``argmin_x 1/2 x'Qx + p'x  s.t.  Ax = b, Gx <= h``, differentiable w.r.t. every input.

    Inputs have shapes ``Q (n, n)``, ``p (n,)``, ``A (me, n)``, ``b (me,)``, ``G (mi, n)``,
    ``h (mi,)``, each optionally with a leading batch dimension ``B`` (inputs without it
    are shared by the batch; their gradients are summed over it). ``Q`` must be positive
    semi-definite (positive definite on the null space of ``A``) and is used as
    ``(Q + Q')/2``. Either constraint pair may be ``None``.

    Forward: ``bilevel.qp.interior_point`` (batched, per-element convergence), or
    ``solution`` from any other solver: the primal ``x`` (multipliers are then recovered
    by least squares on the active set ``h - Gx <= active_tol``) or ``(x, y, z)``.
    Backward: the implicit function theorem on the KKT conditions with the active set
    (see ``bilevel.qp.kkt``); first derivatives only.

    Args:
        solver: an ``bilevel.qp.interior_point(...)`` configuration (default one).
        solution: a precomputed solution, skipping the forward solve.
        active_tol: slack below which an inequality counts as active for a given primal
            ``solution`` (default ``1e-7`` in float64, ``1e-4`` in float32).
        return_duals: also return the multipliers ``y`` (equalities) and ``z >= 0``
            (inequalities); gradients flow through them as well.

    Raises:
        bilevel.QPError: a problem not solved within the iteration cap (infeasible,
            unbounded); its message and ``.elements`` name the batch elements.

    Example:
        >>> Q = torch.eye(2, dtype=torch.float64)
        >>> p = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
        >>> G = torch.eye(2, dtype=torch.float64); h = torch.tensor([2.0, 1.0], dtype=torch.float64)
        >>> x = qp(Q, p, G=G, h=h)               # x = min(-p, h): the second bound is active
        >>> x.detach().round(decimals=8)
        tensor([1., 1.], dtype=torch.float64)
        >>> x.sum().backward(); p.grad
        tensor([-1.,  0.], dtype=torch.float64)
    """
    _refuse_transforms(Q, p, A, b, G, h)
    data = as_qp_data(Q, p, A, b, G, h)
    data = dataclasses.replace(data, Q=0.5 * (data.Q + data.Q.mT))
    if not isinstance(return_duals, bool):
        raise TypeError(f"return_duals must be a bool, got {type(return_duals).__name__}")
    if solver is not None and not isinstance(solver, InteriorPoint):
        raise TypeError(
            "solver must be a bilevel.qp.interior_point(...) configuration; to use another "
            f"solver, pass its result as solution=, got {type(solver).__name__}"
        )
    detached = dataclasses.replace(
        data, **{k: getattr(data, k).detach() for k in ("Q", "p", "A", "b", "G", "h")}
    )
    lu = None
    with torch.no_grad():
        if solution is None:
            res = (solver or interior_point())(detached)
            x, y, z, s, lu = res.x, res.y, res.z, res.s, res.lu
        else:
            x, y, z = _given(solution, detached, active_tol)
            s = detached.h - (detached.G @ x.unsqueeze(-1)).squeeze(-1)
        active = z > s
    out = QPFunction.apply(data.Q, data.p, data.A, data.b, data.G, data.h, (x, y, z, active), lu)
    if data.unbatched:
        out = tuple(t.squeeze(0) for t in out)
    return tuple(out) if return_duals else out[0]


def _refuse_transforms(*inputs: Tensor | None) -> None:
    """Refuse ``vmap`` and forward mode before any work, naming what to do instead: the
    interior-point loop reads its convergence flag on the host (no per-element reads under
    ``vmap``) and the KKT backward is reverse mode only."""
    import torch.autograd.forward_ad as fwAD

    from bilevel.linalg.base import _is_batched

    tensors = [t for t in inputs if isinstance(t, Tensor)]
    if any(_is_batched(t) for t in tensors):
        raise RuntimeError(
            "qp does not run under torch.func.vmap: it is batched itself, so pass the "
            "problems stacked along a leading batch dimension "
            "(Q (B, n, n), p (B, n), ...; shared inputs without it); each element keeps its "
            "own convergence"
        )
    if any(fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(
            "qp has no forward-mode derivative (torch.func.jvp, jacfwd, forward_ad): its KKT "
            "backward is reverse mode; use backward(), torch.autograd.grad or "
            "torch.func.jacrev instead"
        )


def _given(
    solution: Tensor | Sequence[Tensor], data: QPData, active_tol: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    B, (n, me, mi) = data.batch, data.sizes
    want = {"x": (B, n), "y": (B, me), "z": (B, mi)}
    parts = [solution] if isinstance(solution, Tensor) else list(solution)
    if len(parts) not in (1, 3) or not all(isinstance(t, Tensor) for t in parts):
        raise TypeError("solution must be a tensor x or a tuple (x, y, z) of tensors")
    fixed = []
    for name, t in zip(want, parts):
        t = t.detach().to(data.p.dtype)
        if data.unbatched and t.ndim == 1:
            t = t.unsqueeze(0)
        if tuple(t.shape) != want[name]:
            raise ValueError(
                f"qp: solution {name} must have shape {want[name][1:] if data.unbatched else want[name]}, "
                f"got {tuple(t.shape)}"
            )
        fixed.append(t)
    if len(fixed) == 3:
        return fixed[0], fixed[1], fixed[2]
    tol = (
        active_tol if active_tol is not None else (1e-7 if data.p.dtype == torch.float64 else 1e-4)
    )
    y, z = duals_from_primal(data, fixed[0], tol)
    return fixed[0], y, z
