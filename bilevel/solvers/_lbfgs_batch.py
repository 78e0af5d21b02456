"""The L-BFGS iterations on a stack of ``B`` independent problems (one problem: ``B = 1``).

Every problem is a row: its iterate, gradient, curvature pairs, line search (see
:class:`bilevel.solvers.line_search._Search`), iteration count and stopping decision are
rows of batched tensors, updated with masks. Each loop pass makes one batched evaluation
of the objective at every live problem's own trial step; a problem whose line search
ends takes its step (or restarts, or stops) in the same pass and starts its next search,
without waiting for the others. Stopped problems are frozen. The host reads one flag per
evaluation (did a search end?) and one more when some did (is any problem still live?):
the line search branches on values, and these reads are its convergence checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel.solvers._flat import _eps
from bilevel.solvers.base import _NO_PATH, SolverInfo
from bilevel.solvers.line_search import _rows, _Search, _WolfeOptions

# why a problem stopped (0: still running)
_RUNNING, _CONVERGED, _NONFINITE, _MAXITER, _NO_STEP = range(5)


@dataclass(frozen=True)
class _LBFGSSettings:
    tol: float
    maxiter: int
    history_size: int
    wolfe: _WolfeOptions


def _value_and_grad(values: Callable[[Tensor], Tensor], X: Tensor) -> tuple[Tensor, Tensor]:
    """Values ``(B,)`` and gradients ``(B, n)``: one backward of the sum (rows are independent)."""
    with torch.enable_grad():
        Xl = X.detach().requires_grad_(True)
        f = values(Xl)
        if not isinstance(f, Tensor) or f.shape != X.shape[:1]:
            got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"the objective values must have shape ({X.shape[0]},); got {got}")
        if not f.requires_grad:
            raise ValueError(_NO_PATH)
        (g,) = torch.autograd.grad(f.sum(), Xl, allow_unused=True)
    if g is None:
        raise ValueError(_NO_PATH)
    return f.detach().to(X.dtype), g.detach()


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


class _History:
    """Curvature pairs per problem in a ring of ``m`` slots (slot-major, so a slot of all
    problems is one contiguous ``(B, n)`` block); each problem has its own write position.
    ``rho = 1 / s^T y``; 0 marks an empty slot. Updated in place (the solver owns it).
    """

    def __init__(self, B: int, m: int, n: int, like: Tensor) -> None:
        self.S = torch.zeros(m, B, n, dtype=like.dtype, device=like.device)
        self.Y = torch.zeros_like(self.S)
        self.rho = torch.zeros(m, B, dtype=like.dtype, device=like.device)
        self.pos = torch.zeros(B, dtype=torch.long, device=like.device)  # next slot to write
        self.count = torch.zeros(B, dtype=torch.long, device=like.device)  # pairs held
        self.rows = torch.arange(B, device=like.device)
        self.m = m

    def push(self, mask: Tensor, s: Tensor, y: Tensor, sy: Tensor) -> None:
        at = (self.pos, self.rows)
        self.S[at] = _rows(mask, s, self.S[at])
        self.Y[at] = _rows(mask, y, self.Y[at])
        self.rho[at] = torch.where(mask, 1.0 / torch.where(mask, sy, 1.0), self.rho[at])
        self.pos = torch.where(mask, (self.pos + 1) % self.m, self.pos)
        self.count = torch.where(mask, torch.clamp(self.count + 1, max=self.m), self.count)

    def clear(self, mask: Tensor) -> None:
        self.rho = torch.where(mask, 0.0, self.rho)
        self.count = torch.where(mask, 0, self.count)

    def any(self) -> Tensor:
        return self.count > 0

    def _slot(self, j: int) -> tuple[Tensor, Tensor, Tensor]:
        """Each problem's ``j``-th newest pair ``(s, y, rho)``."""
        at = ((self.pos - 1 - j) % self.m, self.rows)
        return self.S[at], self.Y[at], self.rho[at]

    def direction(self, g: Tensor, used: int) -> Tensor:
        """``-H g`` by the two-loop recursion over the newest ``used`` pairs (a host bound)."""
        q = -g
        pairs, alphas = [], []
        for j in range(used):
            s, y, rho = self._slot(j)
            a = rho * _dot(s, q)
            q = q - a.unsqueeze(1) * y
            pairs.append((s, y, rho))
            alphas.append(a)
        if used:
            s, y, rho = pairs[0]
            yy = _dot(y, y)
            gamma = torch.where(rho != 0, _dot(s, y) / torch.where(yy > 0, yy, 1), 1)
            q = q * gamma.unsqueeze(1)
        for (s, y, rho), a in zip(reversed(pairs), reversed(alphas)):
            b = rho * _dot(y, q)
            q = q + (a - b).unsqueeze(1) * s
        return q


@dataclass(frozen=True)
class _Result:
    X: Tensor
    f: Tensor
    gnorm: Tensor
    iterations: Tensor
    evaluations: Tensor
    status: Tensor

    def infos(self, method: str, tol: float, maxiter: int, line_search: str) -> list[SolverInfo]:
        """One record per problem (the run's one host read of the results)."""
        rows = zip(
            self.iterations.tolist(),
            self.status.tolist(),
            self.gnorm.tolist(),
            self.f.tolist(),
            self.evaluations.tolist(),
        )
        out = []
        for k, status, gnorm, f, evals in rows:
            message = {
                _CONVERGED: "gradient norm <= tol",
                _NONFINITE: "non-finite objective or gradient at the current point",
                _MAXITER: f"maxiter={maxiter} reached",
                _NO_STEP: f"line search found no acceptable step (gradient norm {gnorm:.3e}); the "
                "objective may be non-smooth, or noisy at this precision",
            }[status]
            out.append(
                SolverInfo(
                    method,
                    k,
                    status == _CONVERGED,
                    gnorm,
                    f,
                    message,
                    tol=tol,
                    evaluations=evals,
                    extra={"line_search": line_search},
                )
            )
        return out


def _status(f: Tensor, gnorm: Tensor, k: Tensor, opts: _LBFGSSettings) -> Tensor:
    """Why each problem stops at this point, or ``_RUNNING``."""
    status = torch.where(k >= opts.maxiter, _MAXITER, _RUNNING)
    status = torch.where(gnorm <= opts.tol, _CONVERGED, status)
    return torch.where(torch.isfinite(f) & torch.isfinite(gnorm), status, _NONFINITE)


def _new_search(
    which: Tensor, g: Tensor, gnorm: Tensor, hist: _History, used: int
) -> tuple[Tensor, Tensor]:
    """Direction and first trial step of the next line search of the problems in ``which``."""
    d = hist.direction(g, used)
    d0 = _dot(g, d)
    steep = ~(torch.isfinite(d0) & (d0 < 0))  # not a descent direction: forget the pairs
    hist.clear(which & steep)
    d = _rows(steep, -g, d)
    tiny = torch.finfo(g.dtype).tiny
    t0 = torch.where(hist.any(), 1.0, torch.clamp(1.0 / gnorm.clamp_min(tiny), max=1.0))
    return d, t0


def _lbfgs(values: Callable[[Tensor], Tensor], X: Tensor, opts: _LBFGSSettings) -> _Result:
    B, n = X.shape
    m = opts.history_size
    eps = _eps(X.dtype)
    f, g = _value_and_grad(values, X)
    gnorm = torch.linalg.vector_norm(g, dim=1)
    k = torch.zeros(B, dtype=torch.long, device=X.device)
    evals = torch.ones_like(k)
    restarted = torch.zeros(B, dtype=torch.bool, device=X.device)
    hist = _History(B, m, n, X)
    status = _status(f, gnorm, k, opts)
    live = status == _RUNNING
    d, t0 = _new_search(live, g, gnorm, hist, 0)
    f_tol = 100 * eps * f.abs()
    search = _Search.start(t0, f, _dot(g, d), g, f_tol)
    if not bool(live.any()):
        return _Result(X, f, gnorm, k, evals, status)
    while True:
        f_t, g_t = _value_and_grad(values, X + search.t.unsqueeze(1) * d)
        evals = evals + live.long()
        search, out = search.update(live, f_t, _dot(g_t, d), g_t, opts.wolfe)
        ended = out.ended & live
        if not bool(ended.any()):  # host read: no search ended, evaluate again
            continue
        # a found step: x += t d, with a curvature pair when s^T y is safely positive
        step = ended & out.accepted
        s = out.t.unsqueeze(1) * d
        y = out.g - g
        sy, yy = _dot(s, y), _dot(y, y)
        pair = step & (sy > eps * yy) & (yy > 0)
        hist.push(pair, s, y, sy)
        X = _rows(step, X + s, X)
        f = torch.where(step, out.f, f)
        g = _rows(step, out.g, g)
        gnorm = torch.where(step, torch.linalg.vector_norm(g, dim=1), gnorm)
        k = k + step.long()
        restarted = restarted & ~step
        # no step: a stale history can give a poor direction, so retry steepest descent
        # once; a second failure stops the problem
        failed = ended & ~out.accepted
        retry = failed & hist.any() & ~restarted
        hist.clear(retry)
        restarted = restarted | retry
        status = torch.where(failed & ~retry, _NO_STEP, status)
        status = torch.where(step, _status(f, gnorm, k, opts), status)
        live = status == _RUNNING
        # host read: is any problem live, and how many pairs the longest history holds
        any_live, used = torch.stack([live.any().long(), hist.count.max()]).tolist()
        if not any_live:
            break
        again = ended & live
        d_new, t0 = _new_search(again, g, gnorm, hist, used)
        d = _rows(again, d_new, d)
        fresh = _Search.start(t0, f, _dot(g, d), g, 100 * eps * f.abs())
        search = search.where(again, fresh)
    return _Result(X, f, gnorm, k, evals, status)
