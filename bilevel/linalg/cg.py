"""Conjugate gradients for symmetric positive definite operators."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel.linalg._rows import on_stacks
from bilevel.linalg._vec import Vec, _axpy, _dot
from bilevel.linalg.base import _default_maxiter
from bilevel.linalg.info import LinearSolveInfo
from bilevel.linalg.preconditioner import Diagonal, _Preconditioned, resolve
from bilevel.linalg.start import warm_or_zero


def _tracked(v: Vec) -> bool:
    """Whether autograd records ops on these vectors or functorch wraps them: then the
    solve must not update them in place."""
    fz = torch._C._functorch
    grad = torch.is_grad_enabled()
    return any((grad and t.requires_grad) or fz.is_functorch_wrapped_tensor(t) for t in v)


class CG(_Preconditioned):
    """Conjugate gradients for symmetric positive definite operators (see :func:`cg`)."""

    name = "cg"
    symmetric = True

    def _solve(
        self, A: Callable[[Vec], Vec], b: Vec, x0: Vec | None
    ) -> tuple[Vec, LinearSolveInfo]:
        maxiter = self.maxiter or _default_maxiter(sum(t.numel() for t in b))
        period = self._period(b)
        M, described = resolve(self.preconditioner, A, b, getattr(A, "memory", None))
        # under vmap, a cold solve without a preconditioner runs on the stacks under the
        # batched tensors: the same loop, without the batching rules' dispatch per operation
        rows, A, b, dot = on_stacks(A, b, x0, M)
        x, r = warm_or_zero(A, b, x0)
        # Outside autograd and functorch the vectors are updated in place (one pass each,
        # no fresh allocation: at p = 1e6 an allocation's page faults cost as much as the
        # pass), into buffers this solve owns; with a graph, out of place (same values).
        inplace = not _tracked([*b, *x])
        if inplace:
            r = [ri.clone() if ri is bi else ri for ri, bi in zip(r, b)]
        # with a preconditioner: z = M^-1 r builds the directions and rz = r^T z the step,
        # and the stopping rule still reads the true residual norm ||r|| (same accuracy)
        z = r if M is None else M(r)
        # p is updated in place: a buffer of its own (z may be r, or a user's M^-1 output)
        p = [t.clone() for t in z] if inplace and not isinstance(M, Diagonal) else z
        # a diagonal M^-1 writes z into one buffer per solve
        z_out = [torch.empty_like(t) for t in r] if inplace and isinstance(M, Diagonal) else None
        first = None
        if inplace and period == 1 and b[0].device.type == "cpu" and rows is None:
            first = A(p)
            if not _tracked(first):
                # decided before any of the masked loop's 0-d state exists (on a 3-unknown
                # solve its set-up and record cost as much as the products)
                start = _HostStart(x, r, p, z_out, first, M, cold=x0 is None)
                return self._solve_on_host(start, A, b, maxiter, described)
            inplace, z_out = False, None  # an operator with a graph: nothing updated yet
        bnorm = dot(b, b).sqrt()
        threshold = self._threshold(bnorm)
        rs = dot(r, r)
        rz = rs if M is None else dot(r, z)
        # the Rayleigh quotients' denominator p^T M p (M: the preconditioner's matrix, the
        # inverse of z = M^-1 r; I without one) by the recurrence of p' = z' + beta p, where
        # r'^T p = 0 gives p'^T M p' = r'^T z' + beta^2 p^T M p: no vector pass for it. With
        # a preconditioner they are the quotients of M^-1/2 A M^-1/2 (the signs of A's).
        pp = rz
        # squared threshold: one comparison per iteration, and ~(rs > t2) is also True for NaN
        t2 = threshold * threshold
        done = ~(rs > t2)
        negative = torch.zeros_like(done)
        iterations = torch.zeros((), dtype=torch.int64, device=bnorm.device)
        zero = torch.zeros_like(rs)
        lo = torch.full_like(bnorm, math.inf)  # extreme Rayleigh quotients of the directions
        hi = torch.full_like(bnorm, -math.inf)

        # The loop is a few fused vector ops and as few 0-d ops as masking allows (on
        # small and mid-sized problems the 0-d ops cost as much as the product). Per
        # iteration and vector entry: the product, then 13 reads and 4 writes with a
        # diagonal preconditioner (9 and 3 without), every update one kernel.
        for k in range(maxiter):
            Ap = first if k == 0 and first is not None else A(p)
            if k == 0 and inplace and _tracked(Ap):
                inplace, z_out = False, None  # an operator with a graph: nothing updated yet
            pAp = dot(p, Ap)
            # any vector's Rayleigh quotient lies in A's numerical range, so the quotients of
            # masked iterations (p = z) need no mask; fmin/fmax skip the 0/0 of p = 0
            q = pAp / pp
            lo = torch.fmin(lo, q)
            hi = torch.fmax(hi, q)
            live = ~done
            bad = live & (pAp <= 0)
            active = live & ~bad
            # Masking the scalars is enough: alpha = 0 leaves x and r as they are, and
            # beta = 0 restarts p from z, finite. No vector-sized where() per iteration.
            alpha = torch.where(active, rz / pAp, zero)
            x = _axpy(alpha, p, x, out=x if inplace else None)
            r = _axpy(-alpha, Ap, r, out=r if inplace else None)
            rs_new = dot(r, r)
            if M is None:
                z, rz_new = r, rs_new
            else:
                z = M(r) if z_out is None else M.into(r, z_out)  # type: ignore[attr-defined]
                rz_new = dot(r, z)
            # the new residual (not the old one) builds the next direction: Betty's bug
            beta = torch.where(active, rz_new / rz, zero)
            p = _axpy(beta, p, z, out=p if inplace else None)
            pp = rz_new + beta * beta * pp
            rs = torch.where(active, rs_new, rs)
            rz = rs if M is None else torch.where(active, rz_new, rz)
            iterations = iterations + active
            negative = negative | bad
            # a NaN from the operator stops the loop instead of running to maxiter
            done = done | bad | ~(rs > t2)
            if self._should_stop(done, k + 1, maxiter, period):
                break

        rnorm = rs.sqrt()
        if rows is not None:  # back under vmap: the caller's vectors, the batched record
            x = rows.batch(x)
            iterations, rnorm, threshold, negative, lo, hi = rows.scalars(
                [iterations, rnorm, threshold, negative, lo, hi]
            )
        info, _ = self._finish(
            iterations=iterations,
            rnorm=rnorm,
            threshold=threshold,
            negative_curvature=negative,
            maxiter=maxiter,
            curvature=(lo, hi),
        )
        info.preconditioner = described
        return x, info

    def _solve_on_host(
        self,
        start: _HostStart,
        A: Callable[[Vec], Vec],
        b: Vec,
        maxiter: int,
        described: str,
    ) -> tuple[Vec, LinearSolveInfo]:
        """The CPU loop that checks convergence every iteration: its scalars are Python
        floats (a CPU read synchronises with no device), so an iteration is its product,
        its reductions and three in-place vector updates, no 0-d tensor ops and no masks
        (on small problems those cost as much as the product). The same iterates as the
        masked loop to rounding, and the same stopping decisions."""
        x, r, p, z_out, M = start.x, start.r, start.p, start.z_out, start.M
        exact = b[0].dtype == torch.float64  # Python floats hold its values exactly
        dot = _host_dot_of(b)
        bb = _dot(b, b)
        if exact:
            bnorm = math.sqrt(float(bb))
            th = self.tol * bnorm  # torch.clamp(tol ||b||, min=atol), NaN kept
            th = self.atol if th < self.atol else th
            t2 = th * th
        else:
            threshold = self._threshold(bb.sqrt())
            t2 = float(threshold * threshold)
        # from zero, r is a copy of b: its norm is b's
        rs = float(bb) if exact and start.cold else dot(r, r)
        z = r if M is None else (M(r) if z_out is None else M.into(r, z_out))
        rz = rs if M is None else dot(r, z)
        pp = rz
        lo, hi = math.inf, -math.inf
        iterations, negative = 0, False
        Ap: Vec | None = start.Ap
        done = not rs > t2  # also for NaN
        for _ in range(maxiter):
            if done:
                break
            if Ap is None:
                Ap = A(p)
            pAp = dot(p, Ap)
            q = pAp / pp if pp != 0 else math.nan
            if q == q:  # NaN (0/0 of p = 0) is skipped, as fmin/fmax do
                lo, hi = min(lo, q), max(hi, q)
            if pAp <= 0:
                negative = True
                break
            alpha = rz / pAp
            for xi, pi, ri, ai in zip(x, p, r, Ap):
                xi.add_(pi, alpha=alpha)
                ri.add_(ai, alpha=-alpha)
            rs_new = dot(r, r)
            if M is None:
                z, rz_new = r, rs_new
            else:
                z = M(r) if z_out is None else M.into(r, z_out)
                rz_new = dot(r, z)
            beta = rz_new / rz
            for pi, zi in zip(p, z):
                torch.add(zi, pi, alpha=beta, out=pi)
            pp = rz_new + beta * beta * pp
            rs, rz = rs_new, rz_new
            iterations += 1
            Ap = None
            # a NaN from the operator stops the loop instead of running to maxiter
            done = not rs > t2
        rn = math.sqrt(rs) if rs >= 0 else math.nan
        if exact:
            info = self._info(iterations, rn, th, negative, lo, hi, maxiter)
        else:  # the record's values rounded to the working precision, as the masked loop's
            like = threshold
            info, _ = self._finish(
                iterations=torch.tensor(iterations, device=like.device),
                rnorm=torch.tensor(rn, dtype=like.dtype),
                threshold=threshold,
                negative_curvature=torch.tensor(negative, device=like.device),
                maxiter=maxiter,
                curvature=(
                    torch.tensor(lo, dtype=like.dtype, device=like.device),
                    torch.tensor(hi, dtype=like.dtype, device=like.device),
                ),
            )
        info.preconditioner = described
        return x, info


def _host_dot_of(b: Vec) -> Callable[[Vec, Vec], float]:
    """``u^T v`` read on the host, for vectors shaped like ``b``: one vector, the usual
    case, with no per-call list handling (a few microseconds per iteration of a small
    solve)."""
    if len(b) == 1 and b[0].dim() == 1:
        return lambda u, v: torch.dot(u[0], v[0]).item()
    return lambda u, v: float(_dot(u, v))


@dataclasses.dataclass(frozen=True)
class _HostStart:
    """Where the CPU loop starts: its own buffers (x, r, p; z_out for a diagonal M^-1), the
    first product, the preconditioner, and whether it starts from zero."""

    x: Vec
    r: Vec
    p: Vec
    z_out: Vec | None
    Ap: Vec
    M: Any
    cold: bool  # started from zero: r is a copy of b


def cg(
    tol: float = 1e-10,
    atol: float = 0.0,
    maxiter: int | None = None,
    damping: float | Tensor = 0.0,
    check_every: int | None = None,
    preconditioner: Any = None,
) -> CG:
    """Conjugate gradients for a symmetric positive definite operator.

    Solves ``(A + damping I) x = b``, stopping when ``||r|| <= max(tol ||b||, atol)``.
    One operator application per iteration. If a direction ``p`` has
    ``p^T A p <= 0`` (``A`` is not positive definite), CG stops and reports
    ``negative_curvature=True``, ``converged=False``; use :func:`minres` or damping.

    With ``preconditioner`` it runs preconditioned CG (the directions come from
    ``M^-1 r``), which needs far fewer iterations when ``M`` resembles ``A`` (a widely
    varying diagonal: per-feature regularisation weights); the stopping rule still reads
    the true residual ``||r||``, so the answer has the same accuracy. A start ``x0`` (a
    warm start) costs one product; it is dropped for zero when its residual is larger than
    ``||b||``, so it never starts further away than a cold solve.

    Outside autograd (no input or product requiring grad) and functorch transforms, each
    iteration updates its vectors in place, in buffers of its own (one pass over memory per
    update and no allocation: at 10^6 unknowns an allocation's page faults cost about as much
    as the pass); ``b`` and ``x0`` are never written, but the vector given to ``matvec`` is
    overwritten by the next iteration, so ``matvec`` must not keep it. Under autograd or
    functorch transforms the same iterates are computed out of place. Under ``vmap`` every
    problem keeps its own scalars and stops on its own; a cold solve without a
    preconditioner runs its loop on the stacks under the batched tensors (row-wise inner
    products, per-problem scalars as columns; the products still see the batched tensors,
    and the stacks are updated in place unless autograd tracks them), which saves the
    batching rules' dispatch of every vector and scalar operation.

    Args:
        tol: relative tolerance on the residual norm.
        atol: absolute tolerance on the residual norm.
        maxiter: maximum iterations; None means ``min(10 n, 1000)`` for ``n`` unknowns.
        damping: ``lambda`` in ``A + lambda I`` (a number or a 0-d tensor).
        check_every: read the convergence flag on the host every this many iterations;
            None: every iteration on CPU (no device to synchronise with), else every
            ``min(10, n)`` (CG ends in at most ``n`` steps in exact arithmetic, so a solve
            with 3 unknowns stops after 3 operator applications and one check).
        preconditioner: None; ``"jacobi"`` or :func:`jacobi` (a Hutchinson estimate of
            ``diag(A)``, remembered across solves by ``memory=`` or a
            :class:`bilevel.WarmStart`); a diagonal of ``A`` (a tensor, or a tree shaped like
            ``b``, of positive entries; damping is added to it); or a callable
            ``v -> M^-1 v`` on trees shaped like ``b`` (symmetric positive definite).
            ``info.preconditioner`` says which ran (and whether an estimate was reused).

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = {"u": torch.tensor([1.0], dtype=torch.float64), "v": torch.tensor([2.0], dtype=torch.float64)}
        >>> def matvec(t):
        ...     y = A @ torch.cat([t["u"], t["v"]])
        ...     return {"u": y[:1], "v": y[1:]}
        >>> x, info = cg()(matvec, b)
        >>> torch.allclose(torch.cat([x["u"], x["v"]]), torch.linalg.solve(A, torch.tensor([1.0, 2.0], dtype=torch.float64)))
        True
    """
    return CG(tol, atol, maxiter, damping, check_every, preconditioner)
