"""MINRES (Paige & Saunders 1975) for symmetric, possibly indefinite operators."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel.linalg._rows import on_stacks
from bilevel.linalg._vec import Vec, _axpy, _div, _safe, _where, _zeros
from bilevel.linalg.base import _default_maxiter
from bilevel.linalg.info import LinearSolveInfo
from bilevel.linalg.preconditioner import _Preconditioned, resolve
from bilevel.linalg.start import warm_or_zero


def _minres_direction(v: Vec, w1: Vec, w2: Vec, eps: Tensor, delta: Tensor, gamma: Tensor) -> Vec:
    """``(v - eps w1 - delta w2) / gamma``."""
    return [(vi - eps * ai - delta * bi) / gamma for vi, ai, bi in zip(v, w1, w2)]


class MINRES(_Preconditioned):
    """MINRES for symmetric (possibly indefinite) operators (see :func:`minres`)."""

    name = "minres"
    symmetric = True

    def _solve(
        self, A: Callable[[Vec], Vec], b: Vec, x0: Vec | None
    ) -> tuple[Vec, LinearSolveInfo]:
        maxiter = self.maxiter or _default_maxiter(sum(t.numel() for t in b))
        period = self._period(b)
        M, described = resolve(self.preconditioner, A, b, getattr(A, "memory", None))
        # under vmap, a cold solve without a preconditioner runs on the stacks under the
        # batched tensors (its ~50 scalar operations an iteration were each a batching rule)
        rows, A, b, dot = on_stacks(A, b, x0, M)
        x, r1 = warm_or_zero(A, b, x0, M)
        # preconditioned MINRES: the Lanczos process of M^-1/2 A M^-1/2; residuals are
        # measured in the norm sqrt(r^T M^-1 r), ||b|| too (z = M^-1 r alongside r)
        z1 = r1 if M is None else M(r1)
        bnorm = dot(b, b).sqrt() if M is None else dot(b, M(b)).sqrt()
        threshold = self._threshold(bnorm)
        beta = dot(r1, z1).sqrt()
        zero = torch.zeros_like(beta)
        # Lanczos vectors r1 (previous) and r2 (current, unnormalised); w, w2 the last
        # two search directions; (cs, sn) the last Givens rotation; phibar = ||r_k||.
        r2, z2 = r1, z1
        w = _zeros(b)
        w2 = _zeros(b)
        oldb, dbar, epsln = zero, zero, zero
        phibar = beta
        cs, sn = -torch.ones_like(beta), zero
        eps = torch.finfo(beta.dtype).eps
        ls_tol = max(self.tol, eps)
        tnorm2 = zero  # ||T_k||_F^2, the estimate of ||A||^2
        done = phibar <= threshold
        singular = torch.zeros_like(done)
        iterations = torch.zeros((), dtype=torch.int64, device=beta.device)

        # Curvature of the Lanczos matrix T_k: its diagonal (Rayleigh quotients v^T A v) and
        # the pivots of T_k = L D L^T. T_k is positive definite iff every pivot is positive,
        # and by interlacing a T_k that is not means an A that is not (a saddle, a maximum).
        lo = torch.full_like(beta, math.inf)
        hi = torch.full_like(beta, -math.inf)
        pivot = torch.ones_like(beta)

        for k in range(maxiter):
            active = ~done & (beta > 0)
            v = _div(z2, _safe(beta, active))
            y = A(v)
            # three-term Lanczos recurrence; oldb = 0 on the first step
            has_prev = oldb > 0
            y = _axpy(-torch.where(has_prev, beta / _safe(oldb, has_prev), zero), r1, y)
            alfa = dot(v, y)
            # v has unit norm and is orthogonal to r1, so alfa = v^T A v: a Rayleigh quotient;
            # beta (the norm that normalised v) is T_k's off-diagonal entry
            # a pivot at rounding level followed by a coupling beta > 0 means T_k is
            # indefinite (a PSD matrix with a zero pivot has a zero column below it)
            floor = math.sqrt(eps) * torch.sqrt(tnorm2 + alfa * alfa + beta * beta)
            kept = torch.maximum(pivot, floor)
            pivot_new = alfa - torch.where(has_prev, beta * beta / _safe(kept, kept > 0), zero)
            pivot = torch.where(active, pivot_new, pivot)
            lo = torch.where(active, torch.minimum(lo, torch.minimum(alfa, pivot_new)), lo)
            hi = torch.where(active, torch.maximum(hi, alfa), hi)
            y = _axpy(-alfa / _safe(beta, active), r2, y)
            zy = y if M is None else M(y)
            beta_new = dot(y, zy).clamp_min(0).sqrt()
            tnorm2_new = tnorm2 + alfa * alfa + beta * beta + beta_new * beta_new
            # previous rotation applied to the new column of the tridiagonal matrix
            oldeps = epsln
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln_new = sn * beta_new
            dbar_new = -cs * beta_new
            # ||A r_{k-1}|| = phibar * root: when the residual is (numerically) orthogonal to
            # the range of A, the previous iterate is a least-squares solution and b is not
            # in the range: A is singular. Further steps would divide by a vanishing gamma.
            anorm = tnorm2_new.sqrt()
            root = torch.sqrt(gbar * gbar + dbar_new * dbar_new)
            # new rotation annihilating beta_new
            gamma = torch.sqrt(gbar * gbar + beta_new * beta_new)
            stuck = (phibar * root <= ls_tol * anorm * phibar) | (gamma <= eps * anorm)
            stuck = active & stuck
            active = active & ~stuck
            gamma = _safe(gamma, active)
            cs_new = gbar / gamma
            sn_new = beta_new / gamma
            phi = cs_new * phibar
            phibar_new = sn_new * phibar
            w_new = _minres_direction(v, w2, w, oldeps, delta, gamma)
            x = _where(active, _axpy(phi, w_new, x), x)
            w2 = _where(active, w, w2)
            w = _where(active, w_new, w)
            r1 = _where(active, r2, r1)
            r2 = _where(active, y, r2)
            z2 = r2 if M is None else _where(active, zy, z2)
            oldb = torch.where(active, beta, oldb)
            beta = torch.where(active, beta_new, beta)
            tnorm2 = torch.where(active, tnorm2_new, tnorm2)
            epsln = torch.where(active, epsln_new, epsln)
            dbar = torch.where(active, dbar_new, dbar)
            cs = torch.where(active, cs_new, cs)
            sn = torch.where(active, sn_new, sn)
            phibar = torch.where(active, phibar_new, phibar)
            iterations = iterations + active.to(iterations.dtype)
            singular = singular | stuck | (active & (beta <= 0) & (phibar > threshold))
            done = done | stuck | (phibar <= threshold) | (beta <= 0) | ~torch.isfinite(phibar)
            if self._should_stop(done, k + 1, maxiter, period):
                break

        rnorm, negative = phibar.abs(), torch.zeros_like(done)
        if rows is not None:  # back under vmap: the caller's vectors, the batched record
            x = rows.batch(x)
            iterations, rnorm, threshold, negative, singular, lo, hi = rows.scalars(
                [iterations, rnorm, threshold, negative, singular, lo, hi]
            )
        info, extra = self._finish(
            iterations=iterations,
            rnorm=rnorm,
            threshold=threshold,
            negative_curvature=negative,
            maxiter=maxiter,
            extra=singular,
            curvature=(lo, hi),
        )
        info.preconditioner = described
        if info.checked and not info.converged and extra and extra[0]:
            info.message = (
                "b is not in the range of the operator (the residual is orthogonal to it "
                f"to within {ls_tol:.0e}): the operator is singular, and x is a least-squares "
                "solution; add damping for a unique solution"
            )
        return x, info


def minres(
    tol: float = 1e-10,
    atol: float = 0.0,
    maxiter: int | None = None,
    damping: float | Tensor = 0.0,
    check_every: int | None = None,
    preconditioner: Any = None,
) -> MINRES:
    """MINRES (Paige & Saunders 1975) for a symmetric, possibly indefinite operator.

    Minimises ``||b - (A + damping I) x||`` over the Krylov space with a Lanczos
    three-term recurrence and Givens rotations: one operator application and
    ``O(n)`` memory per iteration, like CG, but valid for indefinite ``A`` (the
    Hessian of a non-convex inner problem). The residual norm decreases
    monotonically; ``info.residual_norm`` is the recurrence's estimate of it.
    If ``A`` is singular and ``b`` is not in its range (``||A r|| <= max(tol, eps)
    ||A|| ||r||``), MINRES stops at a least-squares solution (not necessarily the
    minimum-norm one) and says so in ``info.message``; ``damping`` makes it unique.
    In floating point, Lanczos loses orthogonality: on spread-out spectra MINRES
    (like CG) may need several times ``n`` iterations, where :func:`gmres` with a
    large ``restart`` (full orthogonalisation, more memory) needs at most ``n``.

    With ``preconditioner`` (the options of :func:`cg`; it must be symmetric positive
    definite, also when ``A`` is indefinite: a Jacobi estimate is made positive) it runs
    preconditioned MINRES, the Lanczos process of ``M^-1/2 A M^-1/2``; the residual it
    minimises, reports and tests against ``max(tol ||b||, atol)`` is then measured in the
    norm ``sqrt(r^T M^-1 r)``, ``||b||`` too. A warm start ``x0`` whose residual (in that
    norm) is larger than ``||b||`` is dropped for zero. Under ``vmap`` every problem keeps
    its own scalars and stops on its own; a cold solve without a preconditioner runs its
    loop on the stacks under the batched tensors, as :func:`cg` does.

    Args: as :func:`cg`.

    Example:
        >>> A = torch.tensor([[1.0, 2.0], [2.0, -1.0]], dtype=torch.float64)  # indefinite
        >>> x, info = minres()(lambda v: A @ v, torch.tensor([3.0, 1.0], dtype=torch.float64))
        >>> torch.allclose(x, torch.tensor([1.0, 1.0], dtype=torch.float64)), info.converged
        (True, True)
    """
    return MINRES(tol, atol, maxiter, damping, check_every, preconditioner)
