"""The linear-solver protocol ``x, info = solver(matvec, b, x0=None)``: the info record,
input checks, the damped operator, and the device loop with periodic convergence checks
shared by the iterative solvers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import (
    Tree,
    tree_flatten,
    tree_unflatten,
)
from bilevel.linalg._vec import Vec, _sub, _zeros
from bilevel.linalg.info import LinearSolveInfo

MatVec = Callable[[Tree], Tree]


def _to_host(t: Tensor) -> list[float]:
    """The one place where solvers read device values (tests count calls)."""
    return t.detach().reshape(-1).tolist()


def _is_batched(t: Tensor) -> bool:
    """True inside ``torch.func.vmap``: values cannot be read on the host there."""
    fz = torch._C._functorch
    while fz.is_functorch_wrapped_tensor(t):
        if fz.is_batchedtensor(t):
            return True
        t = fz.get_unwrapped(t)
    return False


def _peel(t: Tensor) -> Tensor:
    """The plain tensor under functorch wrappers (``vmap``, ``grad``): every element's value.

    Under ``vmap`` a 0-d flag is one value per problem; peeled, it holds all of them (in
    some layout), so reductions over it (``all``, ``max``) are per-batch answers that a
    convergence check may read without branching on any single problem.
    """
    fz = torch._C._functorch
    while fz.is_functorch_wrapped_tensor(t):
        t = fz.get_unwrapped(t)
    return t


def _check_tree(b: Tree, name: str) -> tuple[list[Tensor], Any]:
    leaves, spec = tree_flatten(b)
    if not leaves:
        raise ValueError(f"{name} must be a tensor or a non-empty tree of tensors, got {b!r}")
    for leaf in leaves:
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{name} must contain only tensors, found {type(leaf).__name__}")
        if not leaf.is_floating_point():
            raise TypeError(
                f"{name} must contain real floating-point tensors, found dtype {leaf.dtype}"
            )
    return leaves, spec


def _check_same(x: Tree, b: Tree, name: str) -> None:
    lx, sx = tree_flatten(x)
    lb, sb = tree_flatten(b)
    if sx != sb:
        raise ValueError(f"{name} must have the structure of b: got {sx}, expected {sb}")
    for u, v in zip(lx, lb):
        if not isinstance(u, Tensor) or u.shape != v.shape:
            got = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
            raise ValueError(
                f"{name} must have the shapes of b: got a leaf {got}, expected {tuple(v.shape)}"
            )


def _check_positive_int(value: Any, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}"
        )


def _check_nonneg(value: Any, name: str) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a 0-d tensor, got shape {tuple(value.shape)}"
            )
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def _default_maxiter(n: int) -> int:
    # n steps suffice in exact arithmetic; rounding can need more on small problems,
    # and the cap keeps a hopeless solve on a huge network from running for hours.
    return max(min(10 * n, 1000), 1)


def _start(A: Callable[[Vec], Vec], b: Vec, x0: Vec | None) -> tuple[Vec, Vec]:
    """The starting point and its residual ``b - A x0``: from zero, ``b`` itself (no product)."""
    if x0 is None:
        return _zeros(b), b
    return x0, _sub(b, A(x0))


class _Operator:
    """``v -> A v + damping v`` on leaf lists; checks the first output against ``b``."""

    def __init__(
        self, matvec: MatVec, b: Tree, damping: float | Tensor, memory: Any = None
    ) -> None:
        if not callable(matvec):
            raise TypeError(f"matvec must be a function v -> A v, got {type(matvec).__name__}")
        self.matvec = matvec
        self.b = b
        self.spec = tree_flatten(b)[1]
        self.damping = damping
        self.checked = False
        self.plain = False
        # a matvec may also offer matmat(V): the products of a stack of vectors at once,
        # and say that its operator should be symmetric positive definite (dense tests it)
        self.batched = getattr(matvec, "matmat", None)
        self.definite = bool(getattr(matvec, "definite", False))
        # what the caller remembers about this operator across solves (a preconditioner's
        # diagonal estimate: bilevel.linalg.PreconditionerMemory), or None
        self.memory = memory

    def __call__(self, v: Vec) -> Vec:
        if self.checked and self.plain:
            # b was a list of tensors and matvec returned one: no tree conversions per product
            return self._damped(self.matvec(v), v)
        out_tree = self.matvec(tree_unflatten(list(v), self.spec))
        if not self.checked:
            try:
                _check_same(out_tree, self.b, "the output of matvec")
            except ValueError as e:
                raise ValueError(f"{e} (matvec(v) must return A v, shaped like b)") from None
            self.checked = True
            self.plain = (
                isinstance(self.b, list)
                and isinstance(out_tree, list)
                and all(isinstance(t, Tensor) for t in self.b)
            )
        return self._damped(tree_flatten(out_tree)[0], v)

    def matmat(self, V: Vec) -> Vec | None:
        """``A v + damping v`` for a stack of vectors (leading dimension), or None when the
        matvec offers no batched form."""
        if self.batched is None:
            return None
        out = self.batched(tree_unflatten(list(V), self.spec))
        return self._damped(tree_flatten(out)[0], V)

    def _damped(self, out: Vec, v: Vec) -> Vec:
        damping = self.damping
        if isinstance(damping, Tensor):
            return [torch.addcmul(av, vi, damping) for av, vi in zip(out, v)]
        if damping != 0:
            return [torch.add(av, vi, alpha=damping) for av, vi in zip(out, v)]
        return out


class LinearSolver:
    """Base class of the linear solvers: ``x, info = solver(matvec, b, x0=None)``.

    Attributes:
        name: the method's name, used in info records and messages.
        symmetric: True when the method assumes a symmetric operator (``cg``,
            ``minres``); callers must then pass a symmetric ``matvec``.
        last_info: the :class:`LinearSolveInfo` of the latest call (None before).

    Example:
        >>> from bilevel.linalg import cg
        >>> solver = cg(tol=1e-12)
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, info = solver(lambda v: A @ v, torch.ones(2, dtype=torch.float64))
        >>> bool(torch.allclose(A @ x, torch.ones(2, dtype=torch.float64))), info.converged
        (True, True)
    """

    name: str = "solver"
    symmetric: bool = False

    def __init__(self) -> None:
        self.last_info: LinearSolveInfo | None = None

    def __call__(
        self, matvec: MatVec, b: Tree, x0: Tree | None = None, *, memory: Any = None
    ) -> tuple[Tree, LinearSolveInfo]:
        """Solve ``A x = b`` from ``x0`` (None: zero); ``memory``: a
        :class:`~bilevel.linalg.PreconditionerMemory` kept across solves (cg, minres)."""
        leaves, spec = _check_tree(b, "b")
        if x0 is not None:
            _check_same(x0, b, "x0")
        A = _Operator(matvec, b, getattr(self, "damping", 0.0), memory)
        x0_leaves = None if x0 is None else tree_flatten(x0)[0]
        x, info = self._solve(A, leaves, x0_leaves)
        self.last_info = info
        return tree_unflatten(x, spec), info

    def _solve(
        self, A: Callable[[Vec], Vec], b: Vec, x0: Vec | None
    ) -> tuple[Vec, LinearSolveInfo]:  # pragma: no cover - abstract
        raise NotImplementedError  # pragma: no cover - abstract: every subclass defines it

    def forms_matrix(self, n: int) -> bool:
        """Whether a solve with ``n`` unknowns forms the operator's matrix (``dense``)."""
        return False

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{self.name}({opts})"

    def _options(self) -> dict[str, Any]:
        return {}


class _Iterative(LinearSolver):
    """Shared options and the device loop with periodic convergence checks."""

    def __init__(
        self,
        tol: float,
        atol: float,
        maxiter: int | None,
        damping: float | Tensor,
        check_every: int | None,
    ) -> None:
        super().__init__()
        _check_nonneg(tol, "tol")
        _check_nonneg(atol, "atol")
        _check_positive_int(maxiter, "maxiter", allow_none=True)
        _check_nonneg(damping, "damping")
        _check_positive_int(check_every, "check_every", allow_none=True)
        self.tol = float(tol)
        self.atol = float(atol)
        self.maxiter = maxiter
        self.damping = damping
        self.check_every = check_every

    def _options(self) -> dict[str, Any]:
        return dict(
            tol=self.tol,
            atol=self.atol,
            maxiter=self.maxiter,
            damping=self.damping,
            check_every=self.check_every,
        )

    # Krylov methods end in at most n steps (exact arithmetic): a default period of
    # min(10, n) lets a small solve stop there instead of running masked to the next check
    finite_termination: bool = True

    def _period(self, b: Vec) -> int:
        """Iterations between convergence checks for this right-hand side."""
        if self.check_every is not None:
            return self.check_every
        if b[0].device.type == "cpu":
            # reading a CPU flag is no device synchronisation (about a microsecond): check
            # every iteration and stop at convergence, instead of running masked products
            return 1
        n = sum(t.numel() for t in b)
        return max(min(10, n), 1) if self.finite_termination else 10

    def _should_stop(self, done: Tensor, iterations: int, maxiter: int, period: int) -> bool:
        """The periodic convergence check: the loop's only host synchronisation."""
        if iterations % period != 0 or iterations >= maxiter:
            return False
        # under vmap: every problem keeps its own scalars and mask; stop when all are done
        return bool(_to_host(_peel(done).all())[0])

    def _threshold(self, bnorm: Tensor) -> Tensor:
        return torch.clamp(self.tol * bnorm, min=self.atol)

    def _finish(
        self,
        *,
        iterations: Tensor,
        rnorm: Tensor,
        threshold: Tensor,
        negative_curvature: Tensor,
        maxiter: int,
        extra: Tensor | None = None,
        curvature: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[LinearSolveInfo, list[float]]:
        """One host sync gathering every scalar the info record needs."""
        nan = torch.full_like(rnorm, math.nan)
        lo, hi = (nan, nan) if curvature is None else curvature
        parts = [
            iterations.to(rnorm.dtype),
            rnorm,
            threshold.to(rnorm.dtype),
            negative_curvature.to(rnorm.dtype),
            lo.to(rnorm.dtype),
            hi.to(rnorm.dtype),
        ]
        if extra is not None:
            parts.append(extra.to(rnorm.dtype).reshape(-1))
        gathered = torch.cat([p.reshape(-1) for p in parts])
        if _is_batched(gathered):
            return self._finish_batched(parts, maxiter)
        vals = _to_host(gathered)
        info = self._info(int(vals[0]), vals[1], vals[2], bool(vals[3]), vals[4], vals[5], maxiter)
        return info, vals[6:]

    def _info(
        self, it: int, rn: float, th: float, neg: bool, lo: float, hi: float, maxiter: int
    ) -> LinearSolveInfo:
        """The record of a solve from its values on the host (``lo``, ``hi``: the extreme
        curvature met, +-inf when no direction was met)."""
        # +-inf: no direction was met (b = 0, or converged at x0)
        c_lo, c_hi = (v if math.isfinite(v) else math.nan for v in (lo, hi))
        converged = (rn <= th) and not neg and math.isfinite(rn)
        if converged:
            message = ""
        elif neg:
            message = (
                f"{self.name} met a direction of non-positive curvature (p^T A p <= 0): the "
                "operator is not positive definite; use minres (symmetric indefinite) or "
                "add damping"
            )
        elif not math.isfinite(rn):
            message = "the residual became non-finite; check the operator (NaN/inf in matvec?)"
        else:
            message = (
                f"reached maxiter={maxiter}; raise maxiter, loosen tol/atol, or add damping "
                "to improve the conditioning"
            )
        return LinearSolveInfo(
            self.name,
            it,
            rn,
            converged,
            neg,
            message,
            threshold=th,
            min_curvature=c_lo,
            max_curvature=c_hi,
        )

    def _finish_batched(
        self, parts: list[Tensor], maxiter: int
    ) -> tuple[LinearSolveInfo, list[float]]:
        """The record of a solve under ``vmap``: each problem ran on its own; one summary.

        Per-problem values are reduced on the device (one host sync): the most iterations,
        the largest residual and threshold, converged when every problem converged.
        """
        it, rn, th, neg, lo, hi = parts[:6]
        ok = (rn <= th) & (neg == 0) & torch.isfinite(rn)
        p_it, p_rn, p_ok, p_neg = _peel(it), _peel(rn), _peel(ok), _peel(neg)
        p_lo, p_hi = _peel(lo), _peel(hi)
        summary = torch.stack(
            [
                p_it.max(),
                p_rn.max(),
                _peel(th).max(),
                p_ok.all().to(p_rn.dtype),
                p_neg.max(),
                p_lo.min(),
                p_hi.max(),
                torch.full_like(p_rn.max(), float(max(p_ok.numel(), p_rn.numel()))),
            ]
        )
        vals = _to_host(summary)
        c_lo, c_hi = (v if math.isfinite(v) else math.nan for v in vals[5:7])
        converged, neg_any = bool(vals[3]), bool(vals[4])
        message = (
            f"under torch.func.vmap: {int(vals[7])} problems, each with its own step sizes and "
            "stopping decision; the record summarises them (most iterations, largest residual, "
            "converged when all did)"
        )
        if not converged:
            message += (
                "; some problem did not converge: raise maxiter, loosen tol/atol, or add damping"
            )
        info = LinearSolveInfo(
            self.name,
            int(vals[0]),
            vals[1],
            converged,
            neg_any,
            message,
            threshold=vals[2],
            min_curvature=c_lo,
            max_curvature=c_hi,
        )
        return info, []
