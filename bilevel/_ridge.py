"""The ridge problem behind :class:`bilevel.nn.RidgeRegression`: its optimality
condition, its forward solve, its Gram matrices and the exact block backward
(:class:`_GramCholesky`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel.linalg.base import LinearSolver, _is_batched, _peel, _to_host
from bilevel.linalg.info import LinearSolveInfo


def _ridge_optimality(W: Tensor, h: dict[str, Tensor], X: Tensor, Y: Tensor) -> Tensor:
    # half the gradient of ||X W - Y||^2 + lambda ||W||^2 (same roots, better scaled)
    lam = h["log_l2"].exp()
    lam = lam.unsqueeze(-1) if lam.ndim > 0 else lam  # per-feature weights scale rows of W
    return X.transpose(-2, -1) @ (X @ W - Y) + lam * W


def _ridge_solve(
    init: Tensor, h: dict[str, Tensor], X: Tensor, Y: Tensor, method: str, cg_solver: Any
) -> Tensor:
    lam = h["log_l2"].exp()
    if method == "solve":
        return torch.linalg.solve(_ridge_gram(X, lam), X.transpose(-2, -1) @ Y)
    lam_rows = lam.unsqueeze(-1) if lam.ndim > 0 else lam
    rhs = X.transpose(-2, -1) @ Y
    x, _ = cg_solver(lambda V: X.transpose(-2, -1) @ (X @ V) + lam_rows * V, rhs, init)
    return x


def _ridge_gram(X: Tensor, lam: Tensor) -> Tensor:
    """``X^T X + diag(lambda)`` per problem: the Hessian of each column's ridge problem."""
    p = X.shape[-1]
    gram = X.transpose(-2, -1) @ X
    if lam.ndim > 0:
        return gram + torch.diag_embed(lam.expand(p))
    return gram + lam * torch.eye(p, dtype=X.dtype, device=X.device)


class _GramCholesky(LinearSolver):
    """The exact backward of :class:`RidgeRegression`: ``(X^T X + lambda I) u = b`` for
    every problem and column at once, by a batched Cholesky factorisation of the Gram
    matrices, instead of CG on all the unknowns as one system (the operator is block
    diagonal: a ``p x p`` block per problem and column). ``matvec`` serves one product,
    the residual check of the info record. A Gram that is not positive definite (not
    possible for ``lambda > 0`` in exact arithmetic) raises ``LinAlgError``."""

    name = "cholesky"
    symmetric = True

    def __init__(self, X: Tensor, lam: Tensor) -> None:
        super().__init__()
        self.X, self.lam = X, lam
        # a direct solve's relative residual is about eps x cond: above sqrt(eps) the
        # Gram matrices are too ill-conditioned for an accurate hypergradient (warned)
        self.tol = torch.finfo(X.dtype).eps ** 0.5

    def _solve(
        self, A: Callable[[list[Tensor]], list[Tensor]], b: list[Tensor], x0: Any
    ) -> tuple[list[Tensor], LinearSolveInfo]:
        (rhs,) = b
        factor, flag = torch.linalg.cholesky_ex(self._gram(A, rhs))
        u = torch.cholesky_solve(rhs, factor)
        (Au,) = A([u])
        norms = torch.stack(
            [torch.linalg.vector_norm(rhs - Au), torch.linalg.vector_norm(rhs), flag.ne(0).any()]
        )
        if _is_batched(norms):  # under vmap: each problem's check, reduced on the device
            return [u], self._check_batched(norms)
        rn, bn, bad = norms.tolist()
        if bad:
            raise torch.linalg.LinAlgError(
                "RidgeRegression: a Gram matrix X^T X + lambda I is not positive definite"
            )
        converged = rn <= self.tol * bn or rn == 0.0
        message = (
            "" if converged else "ill-conditioned Gram matrices (relative residual > sqrt(eps))"
        )
        info = LinearSolveInfo(self.name, 1, rn, converged, False, message, threshold=self.tol * bn)
        return [u], info

    def _gram(self, A: Callable[[list[Tensor]], list[Tensor]], rhs: Tensor) -> Tensor:
        """The Gram matrices: from the forward's ``X`` and ``lambda``, except when those were
        captured inside a ``torch.func`` transform (``vmap(grad(...))``): a captured wrapper
        cannot be used at the backward's level, so the matrices are then formed from ``p``
        products of the backward's own operator (column ``j``: ``A e_j``, the same for every
        target column)."""
        fz = torch._C._functorch
        if not (fz.is_functorch_wrapped_tensor(self.X) or fz.is_functorch_wrapped_tensor(self.lam)):
            return _ridge_gram(self.X.detach(), self.lam.detach())
        p = rhs.shape[-2]
        basis = torch.eye(p, dtype=rhs.dtype, device=rhs.device)
        columns = [A([basis[j].unsqueeze(-1).expand_as(rhs)])[0][..., 0] for j in range(p)]
        return torch.stack(columns, dim=-1)

    def _check_batched(self, norms: Tensor) -> LinearSolveInfo:
        """The record under ``vmap``: every problem's residual test and positive-
        definiteness test, reduced across the batch on the device, then one host read (the
        batch layout of the peeled values is unknown, so only reductions are read): the
        largest residual and threshold, converged when every problem passed."""
        rn, bn, bad = norms.unbind()
        threshold = self.tol * bn
        failed = (rn > threshold) & (rn != 0)
        summary = torch.stack(
            [
                _peel(rn).max(),
                _peel(threshold).max(),
                _peel(failed | (bad != 0)).to(rn.dtype).max(),
                _peel(bad).to(rn.dtype).max(),
            ]
        )
        worst, worst_threshold, any_failed, any_bad = _to_host(summary)
        if any_bad:
            raise torch.linalg.LinAlgError(
                "RidgeRegression: a Gram matrix X^T X + lambda I is not positive definite"
            )
        converged = not any_failed
        message = "under torch.func.vmap: the largest residual and threshold of the batch" + (
            "" if converged else "; ill-conditioned Gram matrices (relative residual > sqrt(eps))"
        )
        return LinearSolveInfo(
            self.name, 1, worst, converged, False, message, threshold=worst_threshold
        )
