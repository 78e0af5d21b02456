"""Truncated Neumann series (Richardson iteration)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel.linalg._vec import Vec, _norm, _where
from bilevel.linalg.base import _Iterative, _start
from bilevel.linalg.info import LinearSolveInfo

_DIVERGED = 1e6  # Neumann: residual growth over the initial one taken as divergence


class Neumann(_Iterative):
    """Truncated Neumann series (see :func:`neumann`)."""

    name = "neumann"
    finite_termination = False
    symmetric = False

    def __init__(
        self,
        alpha: float | Tensor,
        tol: float,
        atol: float,
        maxiter: int,
        damping: float | Tensor,
        check_every: int | None,
    ) -> None:
        super().__init__(tol, atol, maxiter, damping, check_every)
        if maxiter is None:
            raise ValueError("maxiter must be a positive int for neumann, got None")
        if isinstance(alpha, Tensor):
            if alpha.numel() != 1:
                raise ValueError(
                    f"alpha must be a number or a 0-d tensor, got shape {tuple(alpha.shape)}"
                )
        elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        self.alpha = alpha

    def _options(self) -> dict[str, Any]:
        return dict(super()._options(), alpha=self.alpha)

    def _solve(
        self, A: Callable[[Vec], Vec], b: Vec, x0: Vec | None
    ) -> tuple[Vec, LinearSolveInfo]:
        maxiter = self.maxiter
        period = self._period(b)
        assert maxiter is not None
        alpha = self.alpha
        x, r = _start(A, b, x0)
        threshold = self._threshold(_norm(b))
        rnorm = _norm(r)
        r0norm = rnorm
        done = rnorm <= threshold
        iterations = torch.zeros((), dtype=torch.int64, device=rnorm.device)
        # Richardson iteration x += alpha r, r -= alpha A r: from x0 = 0 its iterates are
        # the partial sums alpha sum_k (I - alpha A)^k b, with the residual for free.
        for k in range(maxiter):
            Ar = A(r)
            x_new = [xi + alpha * ri for xi, ri in zip(x, r)]
            r_new = [ri - alpha * ari for ri, ari in zip(r, Ar)]
            rnorm_new = _norm(r_new)
            # a diverging series (||I - alpha A|| > 1) stops long before overflowing; the
            # margin leaves room for the transient growth of non-normal operators
            active = ~done & (rnorm_new <= _DIVERGED * r0norm)
            x = _where(active, x_new, x)
            r = _where(active, r_new, r)
            rnorm = torch.where(active, rnorm_new, rnorm)
            iterations = iterations + active.to(iterations.dtype)
            done = done | ~active | (rnorm <= threshold)
            if self._should_stop(done, k + 1, maxiter, period):
                break

        info, extra = self._finish(
            iterations=iterations,
            rnorm=rnorm,
            threshold=threshold,
            negative_curvature=torch.zeros_like(done),
            maxiter=maxiter,
            extra=r0norm,
        )
        if info.checked and not info.converged and extra and info.residual_norm > extra[0]:
            info.message = (
                f"the series diverges: the residual grew from {extra[0]:.1e} to "
                f"{info.residual_norm:.1e}; it converges only when ||I - alpha A|| < 1 "
                f"(for symmetric A: 0 < alpha < 2 / lambda_max and A positive definite); "
                f"decrease alpha={self.alpha!r}, add damping, or use cg/minres/gmres. For a "
                "fixed point (operator I - J, alpha=1: the series of the map's Jacobian J) it "
                "means the map is not a contraction there; use gmres"
            )
        elif info.checked and not info.converged:
            info.message += (
                "; the Neumann series converges linearly at the rate ||I - alpha A|| "
                "(a truncated series is an approximation by design)"
            )
        return x, info


def neumann(
    alpha: float | Tensor = 1.0,
    maxiter: int = 100,
    damping: float | Tensor = 0.0,
    tol: float = 1e-10,
    atol: float = 0.0,
    check_every: int = 10,
) -> Neumann:
    """Truncated Neumann series (Lorraine et al. 2020): ``A^{-1} b ~ alpha sum_k (I - alpha A)^k b``.

    Computed as the Richardson iteration ``x += alpha r; r -= alpha A r`` (one
    operator application per term, residual known exactly). After ``K`` terms the
    residual is ``(I - alpha A)^K r_0``, so the error shrinks like
    ``||I - alpha A||^K``: the series converges if and only if the spectral radius
    of ``I - alpha A`` is below 1; for symmetric ``A`` that means ``A`` positive
    definite and ``0 < alpha < 2 / lambda_max(A)``, and the rate is
    ``max |1 - alpha lambda_i|``. The method does not need ``A`` symmetric.

    Choosing ``alpha``: for a Hessian ``H`` (``argmin``), ``alpha = 1 / lambda_max(H)``
    gives the rate ``1 - lambda_min / lambda_max``, so about ``kappa ln(1/tol)`` terms
    (``kappa`` the condition number); an inner learning rate ``lr`` converges only if
    ``lr < 2 / lambda_max`` and then needs about ``ln(1/tol) / (lr lambda_min)`` terms
    (iMAML's proximal weight ``lam`` adds ``lam`` to every eigenvalue of the loss's Hessian,
    so ``lambda_min = lam + lambda_min(H_loss)``, positive only when the loss's own negative
    curvature is above ``-lam``: a neural network's need not be). For
    :func:`bilevel.fixed_point` keep ``alpha = 1``: the operator there is ``I - J`` and
    the series is that of the map's Jacobian ``J``, convergent when the map is a
    contraction. It stops early when ``||r|| <= max(tol ||b||, atol)``; a series
    truncated at ``maxiter`` reports ``converged=False`` (the implicit layers then warn
    with its residual). A diverging series (residual above ``1e6`` times the initial
    one) stops there and says so in ``info.message``.

    Args:
        alpha: step size (a number or a 0-d tensor).
        maxiter: number of terms ``K``.
        damping, tol, atol, check_every: as :func:`cg`.

    Example:
        >>> A = torch.tensor([[1.0, 0.2], [0.2, 0.8]], dtype=torch.float64)
        >>> x, info = neumann(alpha=1.0, maxiter=200)(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> torch.allclose(A @ x, torch.ones(2, dtype=torch.float64)), info.converged
        (True, True)
    """
    return Neumann(alpha, tol, atol, maxiter, damping, check_every)
