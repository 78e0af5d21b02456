"""The L-BFGS iterations on a stack of ``B`` independent problems (one problem: ``B = 1``).

Every problem is a row: its iterate, gradient, curvature pairs and direction are rows of
batched tensors; its line search (:class:`bilevel.solvers._host_search._HostSearches`),
iteration count, pair count and stopping decision are rows of host arrays. Each loop pass
makes one batched evaluation of the objective at every live problem's own trial step; a
problem whose line search ends takes its step (or restarts, or stops) in the same pass and
starts its next search, without waiting for the others. Stopped problems are frozen, and
not evaluated where ``values`` can take a subset of the stack (the ``vmap`` rule's).

The decisions are made on the host, as a single call's are
(:mod:`bilevel.solvers._lbfgs_single`), from three small reads: per evaluation the values
and slopes (the line search branches on them), per pass where a search ended ``s^T y``,
``y^T y`` and the new gradient norms (which pairs to keep, the convergence check), and the
new directions' slopes (a search starts from them). The tensor operations that reach an
iterate are the single call's, row by row, so a row of a stack takes the steps a single
call takes (vmap equals a loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bilevel.solvers._flat import _eps
from bilevel.solvers._host_search import _HOST_DTYPES, _device_mask, _HostSearches, _to_device

# the compact form's shared functions are imported from here by the single call's path
from bilevel.solvers._lbfgs_history import _compact_combine as _compact_combine
from bilevel.solvers._lbfgs_history import _compact_solve as _compact_solve
from bilevel.solvers._lbfgs_history import _compact_step as _compact_step
from bilevel.solvers._lbfgs_history import _History
from bilevel.solvers._stack import _CONVERGED, _MAXITER, _NO_STEP, _NONFINITE, _RUNNING
from bilevel.solvers.base import _NO_PATH, SolverInfo
from bilevel.solvers.line_search import _rows, _WolfeOptions


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


class _Running:
    """Evaluates the running rows only, where ``values`` can take a subset of the stack
    (``values(X, rows)``, flagged ``values.selectable``: the ``vmap`` rule's stacks); the
    rows of stopped problems come back as zeros (the solver freezes them). The subset is
    sliced when it changes, from the live flags the solver already read on the host.
    """

    def __init__(self, values: Callable[..., Tensor], B: int) -> None:
        self.values, self.B = values, B
        self.selectable = bool(getattr(values, "selectable", False)) and B > 1
        self.running: list[int] | None = None  # None: every row
        self.rows: Tensor | None = None

    def narrow(self, live: list[bool], device: torch.device) -> None:
        running = [i for i, x in enumerate(live) if x]
        if not self.selectable or len(running) == self.B or running == self.running:
            return
        # a new tensor only when the subset changes: values slices its data once per subset
        self.running = running
        self.rows = torch.tensor(running, dtype=torch.long, device=device)

    def __call__(self, X: Tensor, t: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        """Values and gradients at ``X + t d``, row by row."""
        rows = self.rows
        if rows is None:
            return _value_and_grad(self.values, X + t.unsqueeze(1) * d)
        Z = X.index_select(0, rows) + t.index_select(0, rows).unsqueeze(1) * d.index_select(0, rows)
        f, g = _value_and_grad(lambda W: self.values(W, rows), Z)
        f_all = f.new_zeros(self.B).index_copy(0, rows, f)
        return f_all, torch.zeros_like(X).index_copy(0, rows, g)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


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


def _host_status(f: Any, gnorm: Any, k: Any, opts: _LBFGSSettings, dt: Any) -> Any:
    """:func:`_status` on host arrays (``dt`` their dtype)."""
    status = np.where(k >= opts.maxiter, _MAXITER, _RUNNING)
    status = np.where(gnorm <= dt(opts.tol), _CONVERGED, status)
    return np.where(np.isfinite(f) & np.isfinite(gnorm), status, _NONFINITE)


def _read(*tensors: Tensor) -> list[Any]:
    """One host read of several ``(B,)`` tensors of one dtype: their numpy arrays."""
    both = torch.cat(tensors).cpu().numpy()
    B = tensors[0].shape[0]
    return [both[i * B : (i + 1) * B] for i in range(len(tensors))]


@dataclass
class _Rows:
    """Per-problem host state of the stack: value, gradient norm, counts, why it stopped."""

    f: Any
    gnorm: Any
    k: Any
    evals: Any
    restarted: Any
    status: Any

    def result(self, X: Tensor) -> _Result:
        def put(a: Any, dtype: torch.dtype) -> Tensor:
            return torch.tensor(a, dtype=dtype, device=X.device)

        return _Result(
            X,
            put(self.f, X.dtype),
            put(self.gnorm, X.dtype),
            put(self.k, torch.long),
            put(self.evals, torch.long),
            put(self.status, torch.long),
        )


def _new_searches(
    which: Any, g: Tensor, rows: _Rows, hist: _History, search: _HostSearches
) -> Tensor:
    """Directions of the next line searches of the problems in ``which`` (host booleans),
    whose searches start; a host read of their slopes. Other rows' directions are
    anything (they are not used)."""
    d = hist.direction(g, which)
    (d0,) = _read(_dot(g, d))
    steep = which & ~(np.isfinite(d0) & (d0 < 0))  # not a descent direction: forget the pairs
    if steep.any():
        hist.clear(steep)
        d = _rows(_device_mask(steep, g.device), -g, d)
        (d0,) = _read(_dot(g, d))
    dt = search.dt
    one, tiny = dt(1.0), dt(torch.finfo(g.dtype).tiny)
    with np.errstate(all="ignore"):
        t0 = np.where(hist.held_any(), one, np.minimum(one / np.maximum(rows.gnorm, tiny), one))
        f_tol = dt(100 * _eps(g.dtype)) * abs(rows.f)
    search.start(which, t0, rows.f, d0, f_tol)
    return d


def _lbfgs(values: Callable[..., Tensor], X: Tensor, opts: _LBFGSSettings) -> _Result:
    if X.dtype not in _HOST_DTYPES:
        raise ValueError(
            f"lbfgs needs float32 or float64 parameters; got {X.dtype} (cast them first)"
        )
    dt: Any = _HOST_DTYPES[X.dtype]
    B, n = X.shape
    evaluate = _Running(values, B)
    eps = dt(_eps(X.dtype))
    f_dev, g = _value_and_grad(values, X)
    f, gnorm = _read(f_dev, torch.linalg.vector_norm(g, dim=1))
    zeros = np.zeros(B, dtype=np.int64)
    rows = _Rows(f, gnorm, zeros, zeros + 1, zeros > 0, _host_status(f, gnorm, zeros, opts, dt))
    live = rows.status == _RUNNING
    if not live.any():
        return rows.result(X)
    hist = _History(B, opts.history_size, n, X)
    search = _HostSearches(dt, g)
    evaluate.narrow(live.tolist(), X.device)
    d = _new_searches(live, g, rows, hist, search)
    while True:
        t = _to_device(search.t, X.device)
        f_t, g_t = evaluate(X, t, d)
        rows.evals = rows.evals + live
        f_h, s_h = _read(f_t, _dot(g_t, d))  # host read: the searches branch on these
        out = search.update(live, f_h, s_h, g_t, opts.wolfe)
        ended = out.ended & live
        if not ended.any():  # no search ended, evaluate again
            continue
        # a found step: x += t d, with a curvature pair when s^T y is safely positive
        step = ended & out.accepted
        t_step = _to_device(out.t, X.device).unsqueeze(1)
        sy = torch.stack([t_step * d, out.g - g], 1)  # [s; y] per row
        # host read: the pairs' curvature (s^T y, y^T y) and the new gradient norms
        curv = (sy * sy[:, 1:]).sum(-1)
        sy_h, yy_h, gnorm_new = _read(
            curv[:, 0], curv[:, 1], torch.linalg.vector_norm(out.g, dim=1)
        )
        with np.errstate(all="ignore"):
            pair = step & (sy_h > eps * yy_h) & (yy_h > 0)
        hist.push(pair, sy, hist.used())
        moved = _device_mask(step, X.device)
        X = _rows(moved, X + sy[:, 0], X)
        g = _rows(moved, out.g, g)
        rows.f = np.where(step, out.f, rows.f)
        rows.gnorm = np.where(step, gnorm_new, rows.gnorm)
        rows.k = rows.k + step
        rows.restarted = rows.restarted & ~step
        # no step: a stale history can give a poor direction, so retry steepest descent
        # once; a second failure stops the problem
        failed = ended & ~out.accepted
        retry = failed & hist.held_any() & ~rows.restarted
        hist.clear(retry)
        rows.restarted = rows.restarted | retry
        status = np.where(failed & ~retry, _NO_STEP, rows.status)
        rows.status = np.where(step, _host_status(rows.f, rows.gnorm, rows.k, opts, dt), status)
        live = rows.status == _RUNNING
        if not live.any():
            break
        live_list = live.tolist()
        hist.keep(live_list)
        evaluate.narrow(live_list, X.device)
        again = ended & live
        d_new = _new_searches(again, g, rows, hist, search)
        d = d_new if again.all() else _rows(_device_mask(again, X.device), d_new, d)
    return rows.result(X)
