"""Matrix-free linear solvers over pytrees of tensors.

The implicit engine needs one linear solve per backward pass, ``A x = b`` where
``A`` is only available as a function ``matvec(v) -> A v`` (a Hessian-vector
product or the Jacobian of a fixed-point map) and ``b`` is a tensor or a
dict/tuple of tensors of any shapes. Every solver here is an object built by a
factory and called as::

    x, info = solver(matvec, b, x0=None)

Solvers:

* :func:`cg` -- conjugate gradients, symmetric positive definite ``A``; detects
  negative curvature.
* :func:`minres` -- MINRES (Paige & Saunders 1975), symmetric indefinite ``A``
  (the Hessian of a neural-network inner problem away from a strict minimum).
* :func:`gmres` -- restarted GMRES, any non-singular ``A`` (fixed points).
* :func:`neumann` -- truncated Neumann series (Lorraine et al. 2020), converges
  when ``||I - alpha A|| < 1``.
* :func:`dense` -- forms the matrix (small problems only): LU solve, or least
  squares with a singular-value cutoff.

All iterative loops run on the device: the only host synchronisations are one
convergence check every ``check_every`` iterations and one at the end that fills
the :class:`LinearSolveInfo` record. Between checks, iterations after convergence
are masked with ``torch.where`` on a device boolean, so they neither change nor
break the solution; results do not depend on ``check_every``.
Under ``torch.func.vmap`` (where reading a value on the host is impossible) the
solvers run ``maxiter`` masked iterations and report ``info.checked = False``.

Every solver accepts ``damping``: it then solves ``(A + damping I) x = b``.
Iterative solvers stop when ``||b - A x|| <= max(tol * ||b||, atol)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import (
    Tree,
    tree_flatten,
    tree_map2,
    tree_ravel,
    tree_unflatten,
    tree_unravel,
)

__all__ = [
    "LinearSolveInfo",
    "LinearSolver",
    "MatVec",
    "cg",
    "dense",
    "gmres",
    "minres",
    "neumann",
]

MatVec = Callable[[Tree], Tree]


# --------------------------------------------------------------------------- info


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
        return f"{head}; {self.message}" if self.message else head


# --------------------------------------------------------------------------- helpers


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


# The solvers work on the flat list of b's leaves (flattened once per solve): list
# comprehensions with fused ops cost a third of what pytree maps do per iteration.
Vec = list[Tensor]


def _dot(a: Vec, b: Vec) -> Tensor:
    """Real inner product of two leaf lists (a 0-d tensor on their device)."""
    dots = [torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)]
    if len(dots) == 1:
        return dots[0]
    if all(d.dtype == dots[0].dtype for d in dots):
        return torch.stack(dots).sum()
    total = dots[0]
    for d in dots[1:]:
        total = total + d
    return total


def _norm(a: Vec) -> Tensor:
    return _dot(a, a).sqrt()


def _axpy(alpha: Tensor, x: Vec, y: Vec) -> Vec:
    """``y + alpha * x`` (``alpha`` a 0-d tensor)."""
    return [torch.addcmul(yi, xi, alpha) for xi, yi in zip(x, y)]


def _sub(a: Vec, b: Vec) -> Vec:
    return [x - y for x, y in zip(a, b)]


def _div(a: Vec, den: Tensor) -> Vec:
    return [x / den for x in a]


def _where(cond: Tensor, a: Vec, b: Vec) -> Vec:
    """``where(cond, a, b)`` leaf-wise with a 0-d device boolean ``cond``."""
    return [torch.where(cond, x, y) for x, y in zip(a, b)]


def _zeros(a: Vec) -> Vec:
    return [torch.zeros_like(x) for x in a]


def _stack_basis(V: list[Vec]) -> list[Tensor]:
    """Per leaf, the ``k`` basis vectors flattened and stacked: ``[k, numel]``."""
    return [torch.stack([v[i].reshape(-1) for v in V]) for i in range(len(V[0]))]


def _basis_dot(S: list[Tensor], w: Vec) -> Tensor:
    """The ``k`` inner products of the stacked basis with ``w``."""
    total = S[0] @ w[0].reshape(-1)
    for Si, wi in zip(S[1:], w[1:]):
        total = total + Si @ wi.reshape(-1)
    return total


def _basis_combine(S: list[Tensor], coef: Tensor, like: Vec) -> Vec:
    """``sum_j coef_j V_j`` shaped like ``like``."""
    return [(coef.to(Si.dtype) @ Si).reshape(li.shape) for Si, li in zip(S, like)]


def _minres_direction(v: Vec, w1: Vec, w2: Vec, eps: Tensor, delta: Tensor, gamma: Tensor) -> Vec:
    """``(v - eps w1 - delta w2) / gamma``."""
    return [(vi - eps * ai - delta * bi) / gamma for vi, ai, bi in zip(v, w1, w2)]


def _safe(den: Tensor, ok: Tensor) -> Tensor:
    """A denominator that is 1 where ``ok`` is False, so masked lanes stay finite."""
    return torch.where(ok, den, torch.ones_like(den))


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


class _Operator:
    """``v -> A v + damping v`` on leaf lists; checks the first output against ``b``."""

    def __init__(self, matvec: MatVec, b: Tree, damping: float | Tensor) -> None:
        if not callable(matvec):
            raise TypeError(f"matvec must be a function v -> A v, got {type(matvec).__name__}")
        self.matvec = matvec
        self.b = b
        self.spec = tree_flatten(b)[1]
        self.damping = damping
        self.checked = False

    def __call__(self, v: Vec) -> Vec:
        out_tree = self.matvec(tree_unflatten(list(v), self.spec))
        if not self.checked:
            try:
                _check_same(out_tree, self.b, "the output of matvec")
            except ValueError as e:
                raise ValueError(f"{e} (matvec(v) must return A v, shaped like b)") from None
            self.checked = True
        out = tree_flatten(out_tree)[0]
        damping = self.damping
        if isinstance(damping, Tensor):
            return [torch.addcmul(av, vi, damping) for av, vi in zip(out, v)]
        if damping != 0:
            return [torch.add(av, vi, alpha=damping) for av, vi in zip(out, v)]
        return out


# --------------------------------------------------------------------------- base


class LinearSolver:
    """Base class of the linear solvers: ``x, info = solver(matvec, b, x0=None)``.

    Attributes:
        name: the method's name, used in info records and messages.
        symmetric: True when the method assumes a symmetric operator (``cg``,
            ``minres``); callers must then pass a symmetric ``matvec``.
        last_info: the :class:`LinearSolveInfo` of the latest call (None before).

    Example:
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
        self, matvec: MatVec, b: Tree, x0: Tree | None = None
    ) -> tuple[Tree, LinearSolveInfo]:
        leaves, spec = _check_tree(b, "b")
        if x0 is not None:
            _check_same(x0, b, "x0")
        A = _Operator(matvec, b, getattr(self, "damping", 0.0))
        x0_leaves = None if x0 is None else tree_flatten(x0)[0]
        x, info = self._solve(A, leaves, x0_leaves)
        self.last_info = info
        return tree_unflatten(x, spec), info

    def _solve(
        self, A: Callable[[Vec], Vec], b: Vec, x0: Vec | None
    ) -> tuple[Vec, LinearSolveInfo]:  # pragma: no cover - abstract
        raise NotImplementedError  # pragma: no cover - abstract: every subclass defines it

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
        check_every: int,
    ) -> None:
        super().__init__()
        _check_nonneg(tol, "tol")
        _check_nonneg(atol, "atol")
        _check_positive_int(maxiter, "maxiter", allow_none=True)
        _check_nonneg(damping, "damping")
        _check_positive_int(check_every, "check_every")
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

    def _should_stop(self, done: Tensor, iterations: int, maxiter: int) -> bool:
        """The periodic convergence check: the loop's only host synchronisation."""
        if iterations % self.check_every != 0 or iterations >= maxiter:
            return False
        if _is_batched(done):  # under vmap: run all iterations, masked per problem
            return False
        return bool(_to_host(done)[0])

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
    ) -> tuple[LinearSolveInfo, list[float]]:
        """One host sync gathering every scalar the info record needs."""
        parts = [
            iterations.to(rnorm.dtype),
            rnorm,
            threshold.to(rnorm.dtype),
            negative_curvature.to(rnorm.dtype),
        ]
        if extra is not None:
            parts.append(extra.to(rnorm.dtype).reshape(-1))
        gathered = torch.cat([p.reshape(-1) for p in parts])
        if _is_batched(gathered):
            info = LinearSolveInfo(
                self.name,
                maxiter,
                math.nan,
                False,
                False,
                "ran under torch.func.vmap: iterations were masked per problem on the "
                "device but values cannot be read back, so convergence was not checked",
                checked=False,
            )
            return info, []
        vals = _to_host(gathered)
        it, rn, th, neg = int(vals[0]), vals[1], vals[2], bool(vals[3])
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
        info = LinearSolveInfo(self.name, it, rn, converged, neg, message, threshold=th)
        return info, vals[4:]


# --------------------------------------------------------------------------- CG


class CG(_Iterative):
    """Conjugate gradients for symmetric positive definite operators (see :func:`cg`)."""

    name = "cg"
    symmetric = True

    def _solve(
        self, A: Callable[[Vec], Vec], b: Vec, x0: Vec | None
    ) -> tuple[Vec, LinearSolveInfo]:
        maxiter = self.maxiter or _default_maxiter(sum(t.numel() for t in b))
        if x0 is None:
            x = _zeros(b)
            r = b
        else:
            x = x0
            r = _sub(b, A(x0))
        bnorm = _norm(b)
        threshold = self._threshold(bnorm)
        rs = _dot(r, r)
        p = r
        done = rs.sqrt() <= threshold
        negative = torch.zeros_like(done)
        iterations = torch.zeros((), dtype=torch.int64, device=bnorm.device)

        for k in range(maxiter):
            Ap = A(p)
            pAp = _dot(p, Ap)
            bad = (pAp <= 0) & ~done
            active = ~done & ~bad
            alpha = rs / _safe(pAp, active)
            alpha = torch.where(active, alpha, torch.zeros_like(alpha))
            # Masking the scalars is enough: alpha = 0 leaves x and r as they are, and
            # beta = 0 restarts p from r, finite. No vector-sized where() per iteration.
            x = _axpy(alpha, p, x)
            r = _axpy(-alpha, Ap, r)
            rs_new = _dot(r, r)
            # the new residual (not the old one) builds the next direction: Betty's bug
            beta = torch.where(active, rs_new / _safe(rs, active), torch.zeros_like(rs))
            p = _axpy(beta, p, r)
            rs = torch.where(active, rs_new, rs)
            iterations = iterations + active.to(iterations.dtype)
            negative = negative | bad
            # a NaN from the operator stops the loop instead of running to maxiter
            done = done | bad | (rs.sqrt() <= threshold) | ~torch.isfinite(rs)
            if self._should_stop(done, k + 1, maxiter):
                break

        info, _ = self._finish(
            iterations=iterations,
            rnorm=rs.sqrt(),
            threshold=threshold,
            negative_curvature=negative,
            maxiter=maxiter,
        )
        return x, info


def cg(
    tol: float = 1e-10,
    atol: float = 0.0,
    maxiter: int | None = None,
    damping: float | Tensor = 0.0,
    check_every: int = 10,
) -> CG:
    """Conjugate gradients for a symmetric positive definite operator.

    Solves ``(A + damping I) x = b``, stopping when ``||r|| <= max(tol ||b||, atol)``.
    One operator application per iteration. If a direction ``p`` has
    ``p^T A p <= 0`` (``A`` is not positive definite), CG stops and reports
    ``negative_curvature=True``, ``converged=False``; use :func:`minres` or damping.

    Args:
        tol: relative tolerance on the residual norm.
        atol: absolute tolerance on the residual norm.
        maxiter: maximum iterations; None means ``min(10 n, 1000)`` for ``n`` unknowns.
        damping: ``lambda`` in ``A + lambda I`` (a number or a 0-d tensor).
        check_every: read the convergence flag on the host every this many iterations.

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
    return CG(tol, atol, maxiter, damping, check_every)


# --------------------------------------------------------------------------- dense


def _materialize(A: Callable[[Vec], Vec], b: Vec, vectorize: bool) -> Tensor:
    """The ``n x n`` matrix of ``A`` in the raveled coordinates of ``b``."""
    flat_b = tree_ravel(b)
    n = flat_b.numel()
    eye = torch.eye(n, dtype=flat_b.dtype, device=flat_b.device)

    def column(e: Tensor) -> Tensor:
        return tree_ravel(A(tree_unravel(e, b)))

    if vectorize:
        try:
            rows = torch.func.vmap(column)(eye)
            return rows.transpose(0, 1)
        except (RuntimeError, NotImplementedError, ValueError):
            pass  # matvecs with in-place or data-dependent code: fall back to columns
    return torch.stack([column(eye[i]) for i in range(n)], dim=1)


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

    def _solve(
        self, A: Callable[[Vec], Vec], b: Vec, x0: Vec | None
    ) -> tuple[Vec, LinearSolveInfo]:
        M = _materialize(A, b, self.vectorize)
        flat_b = tree_ravel(b).to(M.dtype)
        n = flat_b.numel()
        eps = torch.finfo(M.dtype).eps
        rcond = self.rcond if self.rcond is not None else n * eps
        if self.method == "solve":
            LU, pivots, lu_info = torch.linalg.lu_factor_ex(M)
            diag = LU.diagonal().abs()
            # a pivot at rounding level means numerically singular (partial pivoting keeps
            # the others at the scale of A): LU would return garbage, so refuse.
            ratio = diag.min() / diag.max().clamp_min(torch.finfo(M.dtype).tiny)
            flat_x = torch.linalg.lu_solve(LU, pivots, flat_b.unsqueeze(-1)).squeeze(-1)
            extra = torch.stack([ratio, lu_info.to(M.dtype)])
        else:
            U, s, Vh = torch.linalg.svd(M)
            keep = s > rcond * s.max()
            s_inv = torch.where(keep, 1.0 / _safe(s, keep), torch.zeros_like(s))
            flat_x = Vh.transpose(-2, -1) @ (s_inv * (U.transpose(-2, -1) @ flat_b))
            extra = torch.stack([keep.sum().to(M.dtype), s.max(), s.min()])
        rnorm = torch.linalg.vector_norm(M @ flat_x - flat_b)
        # leaves of mixed dtypes were promoted by the ravel: give each its own back
        x = tree_map2(lambda xi, bi: xi.to(bi.dtype), tree_unravel(flat_x, b), b)
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
        rn = vals[0]
        if self.method == "solve":
            ratio_v, lu_flag = vals[1], vals[2]
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
        )
        return x, info


def dense(
    method: str = "solve",
    rcond: float | None = None,
    damping: float | Tensor = 0.0,
    vectorize: bool = True,
) -> Dense:
    """Direct solve with the operator formed as a dense ``n x n`` matrix (small ``n``).

    The matrix is built by applying ``matvec`` to the ``n`` basis vectors (batched
    with ``torch.func.vmap``, or column by column if ``vectorize=False`` or the
    matvec cannot be vmapped). Cost ``O(n)`` matvecs, ``O(n^2)`` memory and
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


# --------------------------------------------------------------------------- MINRES


class MINRES(_Iterative):
    """MINRES for symmetric (possibly indefinite) operators (see :func:`minres`)."""

    name = "minres"
    symmetric = True

    def _solve(
        self, A: Callable[[Vec], Vec], b: Vec, x0: Vec | None
    ) -> tuple[Vec, LinearSolveInfo]:
        maxiter = self.maxiter or _default_maxiter(sum(t.numel() for t in b))
        if x0 is None:
            x = _zeros(b)
            r1 = b
        else:
            x = x0
            r1 = _sub(b, A(x0))
        bnorm = _norm(b)
        threshold = self._threshold(bnorm)
        beta = _norm(r1)
        zero = torch.zeros_like(beta)
        # Lanczos vectors r1 (previous) and r2 (current, unnormalised); w, w2 the last
        # two search directions; (cs, sn) the last Givens rotation; phibar = ||r_k||.
        r2 = r1
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

        for k in range(maxiter):
            active = ~done & (beta > 0)
            v = _div(r2, _safe(beta, active))
            y = A(v)
            # three-term Lanczos recurrence; oldb = 0 on the first step
            has_prev = oldb > 0
            y = _axpy(-torch.where(has_prev, beta / _safe(oldb, has_prev), zero), r1, y)
            alfa = _dot(v, y)
            y = _axpy(-alfa / _safe(beta, active), r2, y)
            beta_new = _norm(y)
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
            if self._should_stop(done, k + 1, maxiter):
                break

        info, extra = self._finish(
            iterations=iterations,
            rnorm=phibar.abs(),
            threshold=threshold,
            negative_curvature=torch.zeros_like(done),
            maxiter=maxiter,
            extra=singular,
        )
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
    check_every: int = 10,
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

    Args: as :func:`cg`.

    Example:
        >>> A = torch.tensor([[1.0, 2.0], [2.0, -1.0]], dtype=torch.float64)  # indefinite
        >>> x, info = minres()(lambda v: A @ v, torch.tensor([3.0, 1.0], dtype=torch.float64))
        >>> torch.allclose(x, torch.tensor([1.0, 1.0], dtype=torch.float64)), info.converged
        (True, True)
    """
    return MINRES(tol, atol, maxiter, damping, check_every)


# --------------------------------------------------------------------------- GMRES


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
        check_every: int,
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
                if self._should_stop(done, total, maxiter):
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
    check_every: int = 10,
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


# --------------------------------------------------------------------------- Neumann


_DIVERGED = 1e6  # Neumann: residual growth over the initial one taken as divergence


class Neumann(_Iterative):
    """Truncated Neumann series (see :func:`neumann`)."""

    name = "neumann"
    symmetric = False

    def __init__(
        self,
        alpha: float | Tensor,
        tol: float,
        atol: float,
        maxiter: int,
        damping: float | Tensor,
        check_every: int,
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
        assert maxiter is not None
        alpha = self.alpha
        if x0 is None:
            x = _zeros(b)
            r = b
        else:
            x = x0
            r = _sub(b, A(x0))
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
            if self._should_stop(done, k + 1, maxiter):
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
                f"decrease alpha={self.alpha!r}, add damping, or use cg/minres/gmres"
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
    ``max |1 - alpha lambda_i|``. Choose ``alpha`` about ``1 / lambda_max`` (the inner
    learning rate, for a Hessian). The method does not need ``A`` symmetric.
    It stops early when ``||r|| <= max(tol ||b||, atol)``; a truncated series is
    an approximation by design, reported with ``converged=False``. A diverging
    series (residual above ``1e6`` times the initial one) stops there and says so
    in ``info.message``.

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
