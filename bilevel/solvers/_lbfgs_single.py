"""The L-BFGS iterations of one problem: a stack of one, with its bookkeeping on the host.

:func:`_lbfgs_single` is :func:`bilevel.solvers._lbfgs_batch._lbfgs` for ``B = 1``: the
same tensor operations on the same ``(1, ...)`` tensors for every value that reaches the
iterate (the evaluations, the curvature products of the stack's history (``S^T y`` and
``Y^T y`` in one product), the compact-form direction of :func:`_compact_solve` and :func:`_compact_step`, the steps), so a single call
takes bit for bit the steps the stack's core takes on a stack of one (a row of a larger
stack agrees with it bit for bit, its compact form solved over exactly its pair count:
vmap equals a loop). What a stack must
decide per row with masks (which pairs to keep, the ring's time order, which searches
ended, why a problem stopped) one problem decides on the host, from numpy scalars of its
dtype (IEEE arithmetic and comparisons round as in a tensor of that dtype): no masks, no
gathers, and about half the kernel launches per iteration. Host reads: one per
evaluation (the line search's value and slope), one per step (``s^T y``, ``y^T y`` and the
gradient norm) and one per search (its slope at 0).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bilevel.solvers._flat import _eps
from bilevel.solvers._host_search import _HOST_DTYPES, _HostSearch
from bilevel.solvers._lbfgs_batch import (
    _CONVERGED,
    _MAXITER,
    _NO_STEP,
    _NONFINITE,
    _RUNNING,
    _compact_solve,
    _compact_step,
    _dot,
    _LBFGSSettings,
    _Result,
)

# (1, n) point -> its (1,) value and (1, n) gradient
_Evaluate = Callable[[Tensor], tuple[Tensor, Tensor]]


@functools.cache
def _rotation(first: int, m: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The time order of a full ring whose oldest slot is ``first`` (slot indices, oldest
    first) and its inverse (each slot's place in time), made once per rotation."""
    index = torch.arange(m, device=device).roll(-first)
    return index, torch.argsort(index)


class _Ring:
    """One problem's curvature pairs, with the write position, the pair count and the time
    order of the slots on the host. ``Z`` holds ``S`` and ``Y`` (``Z[0, 0]``, ``Z[0, 1]``) and
    ``M`` holds ``S^T Y`` and ``Y^T Y``, so that one product serves both: every entry is the
    row sum of the same elementwise products as in ``_History`` (the same bits).
    """

    def __init__(self, m: int, n: int, like: Tensor) -> None:
        self.Z = torch.zeros(1, 2, m, n, dtype=like.dtype, device=like.device)
        self.M = torch.zeros(1, 2, m, m, dtype=like.dtype, device=like.device)
        self.m, self.pos, self.count = m, 0, 0
        self.order: list[int] = []  # filled slots, oldest first

    def push(self, sy: Tensor) -> None:
        """Store the pair ``sy = [s; y]`` (2, n)."""
        at, u = self.pos, min(self.m, self.count + 1)
        self.Z[0, :, at] = sy
        # P[i, j, k]: row i of [s; y] against slot k of S (j = 0) or Y (j = 1)
        P = (self.Z[:, :, :u] * sy[:, None, None, :]).sum(-1)
        # the stack's write order: row at of S^T Y and Y^T Y (s^T Y, y^T Y), then their
        # column at (S^T y, y^T Y), which also sets the diagonal
        self.M[0, :, at, :u] = P[:, 1]
        self.M[0, :, :u, at] = P[1]
        self.order = [slot for slot in self.order if slot != at] + [at]
        self.pos = (at + 1) % self.m
        self.count = min(self.count + 1, self.m)

    def clear(self) -> None:
        self.pos, self.count, self.order = 0, 0, []

    def direction(self, g: Tensor) -> Tensor:
        """``_History.direction`` for one problem: its filled slots are the first ``count``."""
        c = self.count
        if c == 0:
            return -g
        Z = self.Z[:, :, :c]
        ab = (Z * g[:, None, None, :]).sum(-1)  # S^T g and Y^T g
        MM = self.M[:, :, :c, :c]
        wrapped = self.order[0] != 0  # the ring went round: time order is a rotation
        if wrapped:  # of the slots (all m filled), no longer slot order
            index, inverse = _rotation(self.order[0], c, g.device)
            ab, MM = ab[:, :, index], MM[:, :, index[:, None], index]
        SY, YY = MM[:, 0], MM[:, 1]
        last = MM[:, :, -1, -1]
        gamma = last[:, 0] / last[:, 1]
        # + 0.0: the stack adds its (here empty) identity rows, which turns a -0 into +0
        R = torch.triu(SY) + 0.0
        p, q = _compact_solve(R, SY, YY, ab[:, 0], ab[:, 1], gamma)
        if wrapped:  # back to slot order (a permutation: copies, the same bits)
            p, q = p[:, inverse], q[:, inverse]
        # the combinations over slots as the stack makes them, one per matrix (a sum over
        # slots of both at once can take another order for small n)
        return _compact_step(g, gamma, Z[:, 0], Z[:, 1], q, p)


def _lbfgs_single(evaluate: _Evaluate, X: Tensor, opts: _LBFGSSettings) -> _Result:
    """``_lbfgs`` on a ``(1, n)`` stack of a float32 or float64 problem, host-decided."""
    dt: Any = _HOST_DTYPES[X.dtype]
    eps, tiny = dt(_eps(X.dtype)), dt(torch.finfo(X.dtype).tiny)
    f_tol_factor, tol, one = dt(100 * _eps(X.dtype)), dt(opts.tol), dt(1.0)
    f_dev, g = evaluate(X)
    gnorm_dev = torch.linalg.vector_norm(g, dim=1)
    f, gnorm = (dt(v) for v in torch.cat([f_dev, gnorm_dev]).tolist())
    k, evals, restarted, status = 0, 1, False, _RUNNING
    ring = _Ring(opts.history_size, X.shape[1], X)

    def stopped() -> int:
        out = _MAXITER if k >= opts.maxiter else _RUNNING
        out = _CONVERGED if gnorm <= tol else out
        return out if np.isfinite(f) and np.isfinite(gnorm) else _NONFINITE

    def new_search() -> tuple[Tensor, _HostSearch]:
        d = ring.direction(g)
        d0 = dt(_dot(g, d).item())  # host read: the search branches on it
        if not (np.isfinite(d0) and d0 < 0):  # not a descent direction: forget the pairs
            ring.clear()
            d = -g
            d0 = dt(_dot(g, d).item())
        t0 = one if ring.count > 0 else min(one / max(gnorm, tiny), one)
        return d, _HostSearch([t0, f, d0, f_tol_factor * abs(f)], g)

    with np.errstate(all="ignore"):
        status = stopped()
        if status == _RUNNING:
            d, search = new_search()
        while status == _RUNNING:
            f_t, g_t = evaluate(X + search.t * d)
            evals += 1
            out = search.update(f_t, _dot(g_t, d), g_t, opts.wolfe)
            if out is None:  # the search goes on
                continue
            if out.accepted:
                # a found step: x += t d, with a curvature pair when s^T y is safely positive
                pair = torch.cat([out.t * d, out.g - g])  # [s; y]
                products = torch.cat(
                    [(pair * pair[1]).sum(-1), torch.linalg.vector_norm(out.g, dim=1)]
                )
                sy, yy, gnorm = (dt(v) for v in products.tolist())  # host read
                if sy > eps * yy and yy > 0:
                    ring.push(pair)
                X, f, g = X + pair[:1], out.f, out.g
                k += 1
                restarted = False
                status = stopped()
            elif ring.count > 0 and not restarted:
                # no step: a stale history can give a poor direction, so retry steepest
                # descent once; a second failure stops the problem
                ring.clear()
                restarted = True
            else:
                status = _NO_STEP
            if status == _RUNNING:
                d, search = new_search()
    f_out = torch.tensor([float(f)], dtype=X.dtype, device=X.device)
    gnorm_out = torch.tensor([float(gnorm)], dtype=X.dtype, device=X.device)
    counts = torch.tensor([k, evals, status], device=X.device)
    return _Result(X, f_out, gnorm_out, counts[:1], counts[1:2], counts[2:])
