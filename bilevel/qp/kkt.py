"""Differentiation of a QP's solution through its KKT conditions with the active set.

At a solution ``(x, y, z)`` with active inequalities ``a`` (``z_i > s_i``, the dual larger
than the slack), the KKT residual
``R = (Qx + p + A'y + G_a'z_a,  Ax - b,  G_a x - h_a)`` vanishes. Its Jacobian in
``(x, y, z_a)`` is the symmetric matrix ``K = [[Q, A', G_a'], [A, 0, 0], [G_a, 0, 0]]``,
so by the implicit function theorem a backward pass is one solve ``K u = -(g_x, g_y, g_z)``
followed by closed forms, e.g. ``dL/dp = u_x``, ``dL/db = -u_y``,
``dL/dG_a = z_a u_x' + u_z x'`` (OptNet, Amos & Kolter 2017, in its active-set form).
Inactive constraints get zero gradients. Batches keep a fixed-size ``K``: an inactive
row is replaced by the identity row (its multiplier's adjoint is then zero). Without
inequalities ``K`` is exactly the matrix the interior-point method factorised last, and
that LU factorisation is reused.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from bilevel.linalg.base import _is_batched
from bilevel.qp.problem import QPData

__all__ = ["QPFunction", "duals_from_primal"]


def _mv(M: Tensor, v: Tensor) -> Tensor:
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def duals_from_primal(data: QPData, x: Tensor, active_tol: float) -> tuple[Tensor, Tensor]:
    """Multipliers ``(y, z)`` of a primal solution ``x`` given by another solver.

    Inequalities with slack ``h - Gx <= active_tol`` are taken as active; ``(y, z_a)`` is
    the least-squares solution of stationarity ``Qx + p + A'y + G_a'z_a = 0``. Warns when
    ``x`` is infeasible or not optimal (residual or a negative multiplier above
    ``sqrt(active_tol)``), naming the batch elements.
    """
    n, me, mi = data.sizes
    slack = data.h - _mv(data.G, x)
    active = slack <= active_tol
    M = torch.cat([data.A.mT, data.G.mT * active.unsqueeze(-2).to(x.dtype)], dim=-1)
    r = _mv(data.Q, x) + data.p
    w = -_mv(torch.linalg.pinv(M), r)
    y, z = w[..., :me], w[..., me:] * active.to(x.dtype)
    stat = (r + _mv(M, w)).abs().amax(-1) if n else torch.zeros(data.batch).to(x)
    primal = torch.zeros(data.batch, dtype=x.dtype, device=x.device)
    if me:
        primal = torch.maximum(primal, (_mv(data.A, x) - data.b).abs().amax(-1))
    if mi:
        primal = torch.maximum(primal, (-slack).clamp_min(0).amax(-1))
    worst = torch.maximum(stat, primal)
    if mi:
        worst = torch.maximum(worst, (-z).clamp_min(0).amax(-1))
    bad = (worst > active_tol**0.5).nonzero().flatten().tolist()
    if bad:
        warnings.warn(
            f"qp: the given solution is not a KKT point of batch element(s) {bad[:10]} "
            f"(worst residual {float(worst.max()):.2e}: infeasible, not stationary or a negative "
            "multiplier); its gradients are those of the nearest active-set problem. Solve more "
            "accurately, or raise active_tol if near-active constraints were missed",
            RuntimeWarning,
            stacklevel=3,
        )
    return y, z.clamp_min(0)


class QPFunction(torch.autograd.Function):
    """``(x, y, z) = argmin`` of the QP, given a precomputed solution; KKT backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        Q: Tensor,
        p: Tensor,
        A: Tensor,
        b: Tensor,
        G: Tensor,
        h: Tensor,
        solution: tuple[Tensor, Tensor, Tensor, Tensor],
        lu: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        x, y, z, _ = solution
        return x.clone(), y.clone(), z.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        Q, p, A, b, G, h, solution, lu = inputs
        x, y, z, active = solution
        ctx.lu = lu
        ctx.save_for_backward(Q, A, G, x, y, z, active)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gx: Tensor, gy: Tensor, gz: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        Q, A, G, x, y, z, active = ctx.saved_tensors
        B, n = x.shape
        me, mi = A.shape[1], G.shape[1]
        m = active.to(x.dtype)
        gx = torch.zeros_like(x) if gx is None else gx
        gy = torch.zeros_like(y) if gy is None else gy
        gz = torch.zeros_like(z) if gz is None else gz
        rhs = -torch.cat([gx, gy, gz * m], dim=-1).unsqueeze(-1)
        if mi == 0 and ctx.lu is not None:
            u = torch.linalg.lu_solve(ctx.lu[0], ctx.lu[1], rhs).squeeze(-1)
        else:
            u = _solve_kkt(_kkt_matrix(Q, A, G, m), rhs)
        ux, uy, uz = u[:, :n], u[:, n : n + me], u[:, n + me :] * m
        za = z * m
        outer = lambda a, c: a.unsqueeze(-1) * c.unsqueeze(-2)  # noqa: E731
        gQ = 0.5 * (outer(ux, x) + outer(x, ux))
        gA = outer(y, ux) + outer(uy, x)
        gG = outer(za, ux) + outer(uz, x)
        return gQ, ux, gA, -uy, gG, -uz, None, None


def _kkt_matrix(Q: Tensor, A: Tensor, G: Tensor, m: Tensor) -> Tensor:
    B = Q.shape[0]
    me, mi = A.shape[1], G.shape[1]
    Ga = G * m.unsqueeze(-1)
    zeros = lambda r, c: torch.zeros(B, r, c, dtype=Q.dtype, device=Q.device)  # noqa: E731
    rows = [
        torch.cat([Q, A.mT, Ga.mT], dim=-1),
        torch.cat([A, zeros(me, me), zeros(me, mi)], dim=-1),
        torch.cat([Ga, zeros(mi, me), torch.diag_embed(1 - m)], dim=-1),
    ]
    return torch.cat(rows, dim=-2)


def _solve_kkt(K: Tensor, rhs: Tensor) -> Tensor:
    """``K^{-1} rhs``; least squares (pseudo-inverse) for the elements where ``K`` is
    singular (dependent active constraints). One host read of the failure flags."""
    u, info = torch.linalg.solve_ex(K, rhs)
    if _is_batched(u):
        # under torch.func (jacrev batches the cotangents) the failure flags cannot be read:
        # every element's least-squares answer is formed, kept where the solve failed
        singular = (info != 0).unsqueeze(-1).unsqueeze(-1)
        return torch.where(singular, torch.linalg.pinv(K) @ rhs, u).squeeze(-1)
    failed = (info != 0).nonzero().flatten()
    if failed.numel():  # only those elements pay for a pseudo-inverse
        u = u.index_put((failed,), torch.linalg.pinv(K[failed]) @ rhs[failed])
    return u.squeeze(-1)
