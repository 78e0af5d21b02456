"""Restarted GMRES for general (non-symmetric) operators."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel.linalg._vec import (
    Vec,
    _basis_combine,
    _basis_dot,
    _div,
    _norm,
    _safe,
    _stack_basis,
    _sub,
    _zeros,
)
from bilevel.linalg.base import _check_positive_int, _default_maxiter, _Iterative
from bilevel.linalg.info import LinearSolveInfo


class GMRES(_Iterative):
    """Restarted GMRES for general operators (see :func:`gmres`)."""

    name = "gmres"
    symmetric = False

    def __init__(
        self,
        tol: float,
        atol: float,
        maxiter: int | None,
        restart: int,
        damping: float | Tensor,
        check_every: int | None,
    ) -> None:
        super().__init__(tol, atol, maxiter, damping, check_every)
        _check_positive_int(restart, "restart")
        self.restart = restart

    def _options(self) -> dict[str, Any]:
        return dict(super()._options(), restart=self.restart)

    def _solve(
        self, A: Callable[[Vec], Vec], b: Vec, x0: Vec | None
    ) -> tuple[Vec, LinearSolveInfo]:
        maxiter = self.maxiter or _default_maxiter(sum(t.numel() for t in b))
        period = self._period(b)
        x = _zeros(b) if x0 is None else x0
        bnorm = _norm(b)
        threshold = self._threshold(bnorm)
        zero = torch.zeros_like(bnorm)
        one = torch.ones_like(bnorm)
        done = torch.zeros((), dtype=torch.bool, device=bnorm.device)
        iterations = torch.zeros((), dtype=torch.int64, device=bnorm.device)
        rres = zero
        total = 0
        stop = False
        first = True
        while total < maxiter and not stop:
            # each cycle restarts from the true residual
            r = b if (first and x0 is None) else _sub(b, A(x))
            first = False
            beta = _norm(r)
            rres = beta
            done = done | (beta <= threshold)
            V = [_div(r, _safe(beta, beta > 0))]
            # Qt: the product of this cycle's Givens rotations, so that Qt H = R (upper
            # triangular) and beta Qt e1 is the rotated right-hand side. Keeping the
            # product rather than the list of rotations costs O(1) ops per step, not O(j).
            Qt = one.reshape(1, 1)
            cols: list[Tensor] = []  # columns of R
            actives: list[Tensor] = []
            for _ in range(min(self.restart, maxiter - total)):
                active = ~done
                w = A(V[-1])
                # classical Gram-Schmidt twice ("twice is enough"): as stable as modified
                # Gram-Schmidt, with a fixed number of batched ops instead of O(j) small ones
                S = _stack_basis(V)
                h1 = _basis_dot(S, w)
                w = _sub(w, _basis_combine(S, h1, w))
                h2 = _basis_dot(S, w)
                w = _sub(w, _basis_combine(S, h2, w))
                hnext = _norm(w)
                V.append(_div(w, _safe(hnext, hnext > 0)))
                j = len(cols)
                last = torch.nn.functional.pad(one.reshape(1, 1), (j + 1, 0))
                Qt = torch.cat([torch.nn.functional.pad(Qt, (0, 1)), last])
                u = Qt @ torch.cat([(h1 + h2).to(Qt.dtype), hnext.reshape(1)])
                denom = torch.sqrt(u[j] * u[j] + u[j + 1] * u[j + 1])
                # (!= 0, not > 0: a NaN must reach the residual, not pass as a zero)
                ok = denom != 0
                c = torch.where(active & ok, u[j] / _safe(denom, ok), one)
                s = torch.where(active & ok, u[j + 1] / _safe(denom, ok), zero)
                Qt = torch.cat(
                    [Qt[:j], (c * Qt[j] + s * Qt[j + 1])[None], (c * Qt[j + 1] - s * Qt[j])[None]]
                )
                col = torch.cat([u[:j], torch.where(ok, denom, one).reshape(1)])
                # a masked step becomes a unit column with a zero right-hand side: y_j = 0
                unit = torch.nn.functional.pad(one.reshape(1), (j, 0))
                cols.append(torch.where(active, col, unit))
                actives.append(active)
                rres = torch.where(active, (beta * Qt[j + 1, 0]).abs(), rres)
                iterations = iterations + active.to(iterations.dtype)
                done = done | (rres <= threshold) | ~torch.isfinite(rres)
                total += 1
                if self._should_stop(done, total, maxiter, period):
                    stop = True
                    break
            k = len(cols)
            if k == 0:
                break
            R = torch.stack([torch.nn.functional.pad(c, (0, k - c.numel())) for c in cols], dim=1)
            rhs = torch.where(torch.stack(actives), beta * Qt[:k, 0], zero)
            y = torch.linalg.solve_triangular(R, rhs.unsqueeze(-1), upper=True)
            x = [xi + ui for xi, ui in zip(x, _basis_combine(_stack_basis(V[:k]), y[:, 0], x))]

        info, _ = self._finish(
            iterations=iterations,
            rnorm=rres,
            threshold=threshold,
            negative_curvature=torch.zeros_like(done),
            maxiter=maxiter,
        )
        return x, info


def gmres(
    tol: float = 1e-10,
    atol: float = 0.0,
    maxiter: int | None = None,
    restart: int = 20,
    damping: float | Tensor = 0.0,
    check_every: int | None = None,
) -> GMRES:
    """Restarted GMRES(``restart``) for a general (non-symmetric) operator.

    Each cycle builds an orthonormal Krylov basis of up to ``restart`` vectors
    (Arnoldi with classical Gram-Schmidt applied twice), keeps the Hessenberg
    matrix triangular with Givens rotations (so the residual norm is known at every
    step without extra work), then updates ``x``; the next cycle starts from the
    true residual. Memory: ``restart + 1`` vectors, plus a stacked copy of the
    basis during orthogonalisation (about ``2 (restart + 1)`` vectors at peak).
    ``maxiter`` counts Arnoldi steps (operator applications, besides one per
    restart); ``x0`` is a warm start.

    Args:
        tol, atol, maxiter, damping, check_every: as :func:`cg`.
        restart: Krylov vectors per cycle (more: faster convergence, more memory).

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)  # non-symmetric
        >>> x, info = gmres()(lambda v: A @ v, torch.tensor([4.0, 6.0], dtype=torch.float64))
        >>> torch.allclose(x, torch.tensor([1.0, 2.0], dtype=torch.float64)), info.iterations
        (True, 2)
    """
    return GMRES(tol, atol, maxiter, restart, damping, check_every)
