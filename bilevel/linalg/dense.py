"""Direct solves with the operator formed as a dense matrix (small problems)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import tree_ravel, tree_unravel
from bilevel.linalg._vec import Vec, _safe
from bilevel.linalg.base import LinearSolver, _check_nonneg, _is_batched, _to_host
from bilevel.linalg.info import LinearSolveInfo


def _materialize(A: Callable[[Vec], Vec], b: Vec, vectorize: bool) -> Tensor:
    """The ``n x n`` matrix of ``A`` in the raveled coordinates of ``b``."""
    flat_b = _ravel(b)
    n = flat_b.numel()
    eye = torch.eye(n, dtype=flat_b.dtype, device=flat_b.device)

    def column(e: Tensor) -> Tensor:
        return tree_ravel(A(tree_unravel(e, b)))

    matmat = getattr(A, "matmat", None)
    if vectorize and matmat is not None:
        # the operator's own batched products (one pass through its graph) when it has them
        try:
            rows = _rows(matmat(_basis_leaves(eye, b)), n)
        except (RuntimeError, NotImplementedError, ValueError):
            rows = None
        if rows is not None:
            return rows.transpose(0, 1)
    if vectorize:
        try:
            rows = torch.func.vmap(column)(eye)
            return rows.transpose(0, 1)
        except (RuntimeError, NotImplementedError, ValueError):
            pass  # matvecs with in-place or data-dependent code: fall back to columns
    return torch.stack([column(eye[i]) for i in range(n)], dim=1)


def _basis_leaves(eye: Tensor, b: Vec) -> Vec:
    """The ``n`` basis vectors as leaves shaped like ``b``'s, stacked in dimension 0."""
    out, start = [], 0
    for leaf in b:
        k = leaf.numel()
        out.append(eye[:, start : start + k].reshape(-1, *leaf.shape).to(leaf.dtype))
        start += k
    return out


def _ravel(b: Vec) -> Tensor:
    return b[0].reshape(-1) if len(b) == 1 else torch.cat([x.reshape(-1) for x in b])


def _unravel(flat: Tensor, b: Vec) -> Vec:
    """``flat`` split into leaves shaped like ``b``'s, each in its own dtype."""
    if len(b) == 1 and b[0].dim() == 1 and flat.dtype == b[0].dtype:
        return [flat]  # the usual one-vector case: no slice or copy
    out, start = [], 0
    for leaf in b:
        k = leaf.numel()
        out.append(flat[start : start + k].reshape(leaf.shape).to(leaf.dtype))
        start += k
    return out


CHOLESKY = "Cholesky (positive definite)"  # the message of a solve by Cholesky


def solve_by_cholesky(M: Tensor, flat_b: Tensor, rcond: float) -> tuple[Tensor, float] | None:
    """``(x, ||b - M x||)`` by a Cholesky factorisation of ``M``, which should be symmetric
    positive definite, or None when it is not, is singular to working precision
    (``diag(L)^2``, the pivots of ``L D L^T``, at most ``rcond`` times the largest) or the
    residual is not finite: then the LU route decides (it raises, warns or solves). The
    factorisation that tests definiteness also solves, so no LU is needed; one host read.
    """
    L, flag = torch.linalg.cholesky_ex(M)
    # two triangular solves: the same substitutions as cholesky_solve, without its copies
    # of the right-hand side (measured 10% of a 3-30 unknown solve's time, cold caches)
    y = torch.linalg.solve_triangular(L, flat_b.unsqueeze(-1), upper=False)
    flat_x = torch.linalg.solve_triangular(L.mT, y, upper=True).squeeze(-1)
    rnorm = torch.linalg.vector_norm(torch.addmv(flat_b, M, flat_x, alpha=-1))
    vals = torch.cat([rnorm.reshape(1), flag.reshape(1), L.diagonal()]).tolist()
    rn, diag = vals[0], vals[2:]
    if vals[1] != 0 or not math.isfinite(rn) or not all(math.isfinite(v) for v in diag):
        return None
    ratio = (min(diag) / max(max(diag), torch.finfo(M.dtype).tiny)) ** 2
    return (flat_x, rn) if ratio > rcond else None


def _rows(out: Vec | None, n: int) -> Tensor | None:
    """``[A e_1, ..., A e_n]`` as rows from batched leaves, or None."""
    if out is None:
        return None
    return torch.cat([o.reshape(n, -1) for o in out], dim=1)


class Dense(LinearSolver):
    """Forms the matrix and solves it directly (see :func:`dense`)."""

    name = "dense"
    symmetric = False

    def __init__(
        self,
        method: str = "solve",
        rcond: float | None = None,
        damping: float | Tensor = 0.0,
        vectorize: bool = True,
    ) -> None:
        super().__init__()
        if method not in ("solve", "lstsq"):
            raise ValueError(f"method must be 'solve' or 'lstsq', got {method!r}")
        if rcond is not None:
            _check_nonneg(rcond, "rcond")
        _check_nonneg(damping, "damping")
        self.method = method
        self.rcond = rcond
        self.damping = damping
        self.vectorize = vectorize

    def _options(self) -> dict[str, Any]:
        return dict(method=self.method, rcond=self.rcond, damping=self.damping)

    def forms_matrix(self, n: int) -> bool:
        return True

    def _solve(
        self, A: Callable[[Vec], Vec], b: Vec, x0: Vec | None
    ) -> tuple[Vec, LinearSolveInfo]:
        M = _materialize(A, b, self.vectorize)
        flat_b = _ravel(b).to(M.dtype)
        n = flat_b.numel()
        eps = torch.finfo(M.dtype).eps
        rcond = self.rcond if self.rcond is not None else n * eps
        # an operator that should be symmetric positive definite (the Hessian at a minimum)
        # is solved by the Cholesky factorisation that tests it; when that fails, LU decides
        definite = bool(getattr(A, "definite", False))
        if definite and self.method == "solve" and not (_is_batched(M) or _is_batched(flat_b)):
            solved = solve_by_cholesky(M, flat_b, rcond)
            if solved is not None:
                info = LinearSolveInfo(
                    self.name, n, solved[1], True, False, CHOLESKY, threshold=math.nan
                )
                return _unravel(solved[0], b), info
        if self.method == "solve":
            LU, pivots, lu_info = torch.linalg.lu_factor_ex(M)
            if _is_batched(M) or _is_batched(flat_b):
                # torch's vmap rule of lu_solve is wrong when LU and b are batched at
                # different vmap levels (vmap of jacrev: the matrix per problem, b per
                # cotangent; checked on torch 2.13); linalg.solve's rule is right
                flat_x = torch.linalg.solve(M, flat_b)
            else:
                flat_x = torch.linalg.lu_solve(LU, pivots, flat_b.unsqueeze(-1)).squeeze(-1)
            # the pivots travel to the host with the residual (one read, few device ops)
            extra = torch.cat([lu_info.to(M.dtype).reshape(1), LU.diagonal().abs()])
        else:
            U, s, Vh = torch.linalg.svd(M)
            keep = s > rcond * s.max()
            s_inv = torch.where(keep, 1.0 / _safe(s, keep), torch.zeros_like(s))
            flat_x = Vh.transpose(-2, -1) @ (s_inv * (U.transpose(-2, -1) @ flat_b))
            extra = torch.stack([keep.sum().to(M.dtype), s.max(), s.min()])
        rnorm = torch.linalg.vector_norm(torch.addmv(flat_b, M, flat_x, alpha=-1))
        # a definite operator's Cholesky test is read with the rest (no extra host read)
        if definite:
            extra = torch.cat([torch.linalg.cholesky_ex(M).info.to(M.dtype).reshape(1), extra])
        # leaves of mixed dtypes were promoted by the ravel: give each its own back
        x = _unravel(flat_x, b)
        summary = torch.cat([rnorm.reshape(1), extra])
        if _is_batched(summary):
            info = LinearSolveInfo(
                self.name,
                n,
                math.nan,
                False,
                False,
                "ran under torch.func.vmap: values not checked",
                checked=False,
            )
            return x, info
        vals = _to_host(summary)
        curvature = (math.nan, math.nan)
        if definite:
            if vals[1] != 0:  # not positive definite: the extreme eigenvalues say how far
                eig = torch.linalg.eigvalsh(M)
                curvature = (float(eig[0]), float(eig[-1]))
            vals = vals[:1] + vals[2:]
        rn = vals[0]
        if self.method == "solve":
            lu_flag, pivots_abs = vals[1], vals[2:]
            # a pivot at rounding level means numerically singular (partial pivoting keeps
            # the others at the scale of A): LU would return garbage, so refuse.
            if any(math.isnan(v) for v in pivots_abs):
                ratio_v = math.nan
            else:
                ratio_v = min(pivots_abs) / max(max(pivots_abs), torch.finfo(M.dtype).tiny)
            if lu_flag != 0 or not ratio_v > rcond:
                raise torch.linalg.LinAlgError(
                    f"dense(method='solve'): the operator is singular to working precision "
                    f"(smallest/largest LU pivot {ratio_v:.1e} <= rcond {rcond:.1e}, n={n}); "
                    "use dense(method='lstsq') for the minimum-norm least-squares solution, "
                    "or damping > 0 to solve (A + damping I) x = b"
                )
            message = ""
        else:
            rank, smax, smin = int(vals[1]), vals[2], vals[3]
            message = (
                f"rank {rank} of {n} (singular values kept above {rcond:.1e} x {smax:.1e}"
                f"; smallest {smin:.1e})"
            )
        finite = math.isfinite(rn)
        info = LinearSolveInfo(
            self.name,
            n,
            rn,
            finite,
            False,
            message if finite else "the solution is not finite; check the operator",
            threshold=math.nan,
            min_curvature=curvature[0],
            max_curvature=curvature[1],
        )
        return x, info


def dense(
    method: str = "solve",
    rcond: float | None = None,
    damping: float | Tensor = 0.0,
    vectorize: bool = True,
) -> Dense:
    """Direct solve with the operator formed as a dense ``n x n`` matrix (small ``n``).

    The matrix is built by applying ``matvec`` to the ``n`` basis vectors (batched:
    by ``matvec.matmat(V)`` when the matvec has that method, taking and returning
    stacks of vectors with a leading dimension, else with ``torch.func.vmap``; column
    by column if ``vectorize=False`` or the matvec cannot be vmapped). A matvec with
    ``definite = True`` promises a symmetric positive definite operator (a Hessian at
    a minimum): it is then tested by a Cholesky factorisation, which also solves it
    (``info.message`` ``"Cholesky (positive definite)"``; no LU); when the test fails the
    LU route runs and the info record carries the extreme eigenvalues
    (``min_curvature``, ``max_curvature``). Cost ``O(n)`` matvecs, ``O(n^2)`` memory and
    ``O(n^3)`` time: the tutorial's approach, for small problems and for checking
    the iterative solvers.

    Args:
        method: ``"solve"``: LU factorisation; raises ``torch.linalg.LinAlgError``
            (a ``RuntimeError``) when the matrix is singular to working precision.
            ``"lstsq"``: minimum-norm least squares through an SVD, dropping singular
            values below ``rcond * s_max`` (like the course tutorial's SVD solve).
        rcond: relative cutoff; None means ``n * eps`` of the dtype. With ``"solve"``
            it is the smallest accepted ratio of LU pivots.
        damping: ``lambda`` in ``A + lambda I``.
        vectorize: build the matrix with ``torch.func.vmap``.

    ``info.iterations`` is the number of operator applications (``n``) and
    ``info.residual_norm`` the true residual of the returned solution; ``x0`` is
    ignored.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
        >>> x, info = dense()(lambda v: A @ v, torch.tensor([3.0, 3.0], dtype=torch.float64))
        >>> x
        tensor([1., 1.], dtype=torch.float64)
    """
    return Dense(method, rcond, damping, vectorize)
