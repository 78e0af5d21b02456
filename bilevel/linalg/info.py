"""The record every linear solve returns: :class:`LinearSolveInfo`."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class LinearSolveInfo:
    """What a linear solve did, as plain Python values.

    Attributes:
        method: the solver's name (``"cg"``, ``"minres"``, ...).
        iterations: iterations run (operator applications for ``dense``).
        residual_norm: ``||b - (A + damping I) x||`` at the end (the solver's own
            recurrence for iterative methods, which tracks the true residual).
        converged: whether ``residual_norm <= threshold``.
        negative_curvature: CG met a direction with ``p^T A p <= 0`` and stopped.
        message: a human-readable explanation, with advice when it failed.
        threshold: the target ``max(tol * ||b||, atol)``.
        checked: False when the values could not be read from the device (the solve
            ran under ``torch.func.vmap``); then ``maxiter`` iterations were run and
            the numbers are not meaningful.
        min_curvature, max_curvature: curvature met by the solve. cg: the smallest and
            largest Rayleigh quotient ``p^T A p / p^T p`` of its search directions.
            minres: the largest diagonal entry of the Lanczos matrix ``T_k`` (Rayleigh
            quotients of the Lanczos vectors) and the smallest of those entries and of
            the pivots of ``T_k = L D L^T``, so ``min_curvature < 0`` exactly when
            ``T_k`` (hence ``A``) is not positive definite. dense, for an operator that
            should be positive definite (an implicit layer's Hessian): the extreme
            eigenvalues when a Cholesky test fails, else ``nan``. ``nan`` for solvers
            that do not track them. See :meth:`indefinite`. With a preconditioner ``M``
            (cg, minres) they are those of ``M^-1/2 A M^-1/2`` (the same signs as ``A``'s:
            a congruence).
        preconditioner: the preconditioner that ran (cg, minres), e.g. ``"jacobi (Hutchinson,
            16 probes, estimated)"``; empty for none.

    Example:
        >>> info = LinearSolveInfo("cg", 3, 1e-12, True, False, "", threshold=1e-10)
        >>> print(info)
        cg: converged in 3 iterations, residual 1.0e-12 (target 1.0e-10)
    """

    method: str
    iterations: int
    residual_norm: float
    converged: bool
    negative_curvature: bool
    message: str
    threshold: float = math.nan
    checked: bool = True
    min_curvature: float = math.nan
    max_curvature: float = math.nan
    preconditioner: str = ""

    def indefinite(self) -> bool:
        """Whether the solve met a direction of negative curvature (beyond rounding).

        True when cg stopped on ``p^T A p <= 0``, or when the smallest Rayleigh quotient
        is below ``-1e-6`` times the largest in magnitude: the operator (a Hessian) is then
        not positive semi-definite, so the point it was taken at is not a minimum.

        Example:
            >>> LinearSolveInfo("minres", 2, 0.0, True, False, "", min_curvature=-1.0,
            ...                 max_curvature=3.0).indefinite()
            True
        """
        if self.negative_curvature:
            return True
        lo, hi = self.min_curvature, self.max_curvature
        if math.isnan(lo) or math.isnan(hi):
            return False
        return lo < -1e-6 * max(abs(lo), abs(hi))

    def __str__(self) -> str:
        if not self.checked:
            head = f"{self.method}: ran {self.iterations} iterations, convergence not checked"
        elif self.method == "dense":
            state = "solved" if self.converged else "FAILED"
            head = (
                f"dense: {state} with {self.iterations} operator applications, "
                f"residual {self.residual_norm:.1e}"
            )
        else:
            state = "converged" if self.converged else "NOT converged"
            prep = "in" if self.converged else "after"
            head = (
                f"{self.method}: {state} {prep} {self.iterations} iterations, "
                f"residual {self.residual_norm:.1e}"
            )
            if not math.isnan(self.threshold):
                head += f" (target {self.threshold:.1e})"
            if self.preconditioner:
                head += f", preconditioner {self.preconditioner}"
        return f"{head}; {self.message}" if self.message else head
