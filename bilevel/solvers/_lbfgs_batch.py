"""The L-BFGS iterations on a stack of ``B`` independent problems (one problem: ``B = 1``).

Every problem is a row: its iterate, gradient, curvature pairs, line search (see
:class:`bilevel.solvers.line_search._Search`), iteration count and stopping decision are
rows of batched tensors, updated with masks. Each loop pass makes one batched evaluation
of the objective at every live problem's own trial step; a problem whose line search
ends takes its step (or restarts, or stops) in the same pass and starts its next search,
without waiting for the others. Stopped problems are frozen, and not evaluated where
``values`` can take a subset of the stack (the ``vmap`` rule's). The host reads one flag per
evaluation (did a search end?) and one more when some did (is any problem still live?):
the line search branches on values, and these reads are its convergence checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel.solvers._flat import _eps
from bilevel.solvers._stack import _CONVERGED, _MAXITER, _NO_STEP, _NONFINITE, _RUNNING
from bilevel.solvers.base import _NO_PATH, SolverInfo
from bilevel.solvers.line_search import _rows, _Search, _WolfeOptions


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


def _pair_products(S: Tensor, Y: Tensor, s: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``s^T Y``, ``S^T y`` and ``y^T Y`` per problem, for the new pair's row and column of
    ``S^T Y`` and ``Y^T Y``. Elementwise products and row sums, not ``bmm``: a row's bits must
    not depend on how many rows the stack has (vmap equals a loop).
    """
    s_Y = (Y * s.unsqueeze(1)).sum(-1)
    S_y = (S * y.unsqueeze(1)).sum(-1)
    y_Y = (Y * y.unsqueeze(1)).sum(-1)
    return s_Y, S_y, y_Y


class _History:
    """Curvature pairs per problem: ``m`` slots each, written in turn at the problem's own
    position ``pos``; ``count`` pairs held (a clear restarts at slot 0, so the filled slots
    and their time order follow from the two). Updated in place (the solver owns it).
    """

    def __init__(self, B: int, m: int, n: int, like: Tensor) -> None:
        self.S = torch.zeros(B, m, n, dtype=like.dtype, device=like.device)
        self.Y = torch.zeros_like(self.S)
        # s_i^T y_j and y_i^T y_j of the slots, updated at each push
        self.SY = torch.zeros(B, m, m, dtype=like.dtype, device=like.device)
        self.YY = torch.zeros_like(self.SY)
        self.pos = torch.zeros(B, dtype=torch.long, device=like.device)  # next slot to write
        self.count = torch.zeros(B, dtype=torch.long, device=like.device)  # pairs held
        self.rows = torch.arange(B, device=like.device)
        self.m, self.B = m, B
        # the stack's rows held here (None: all); finished problems are dropped, so that late
        # passes make the history's memory-bound products over the live rows only
        self.members: Tensor | None = None
        self.member_list = list(range(B))

    def _pick(self, t: Tensor) -> Tensor:
        """The rows of a stack-sized tensor that this history holds."""
        return t if self.members is None else t.index_select(0, self.members)

    def keep(self, live: list[bool]) -> None:
        """Drop the problems that stopped, when they are a quarter of the rows held or more."""
        kept = [i for i, row in enumerate(self.member_list) if live[row]]
        if not kept or 4 * len(kept) > 3 * len(self.member_list):
            return
        index = torch.tensor(kept, device=self.S.device)
        for name in ("S", "Y", "SY", "YY", "pos", "count"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.member_list = [self.member_list[i] for i in kept]
        self.members = torch.tensor(self.member_list, device=self.S.device)
        self.rows = torch.arange(len(kept), device=self.S.device)

    def held_any(self) -> Tensor:
        """``(B,)``: the problem holds a pair (rows not held hold none)."""
        if self.members is None:
            return self.count > 0
        held = torch.zeros(self.B, dtype=torch.bool, device=self.count.device)
        return held.index_copy(0, self.members, self.count > 0)

    def spread(self, d: Tensor, rest: Tensor) -> Tensor:
        """A stack-sized tensor: the held rows from ``d``, the others from ``rest``."""
        return d if self.members is None else rest.index_copy(0, self.members, d)

    def push(self, mask: Tensor, s: Tensor, y: Tensor, used: int) -> None:
        """Store ``(s, y)`` where ``mask`` (stack-sized); ``used`` bounds every pair count."""
        mask, s, y = self._pick(mask), self._pick(s), self._pick(y)
        at = (self.rows, self.pos)
        self.S[at] = _rows(mask, s, self.S[at])
        self.Y[at] = _rows(mask, y, self.Y[at])
        # filled slots are always 0 .. count - 1 (a clear restarts at 0), so the new slot is
        # below used + 1
        u = min(self.m, used + 1)
        s_Y, S_y, y_Y = _pair_products(self.S[:, :u], self.Y[:, :u], s, y)
        row = (self.rows, self.pos, slice(0, u))
        col = (self.rows, slice(0, u), self.pos)
        self.SY[row] = _rows(mask, s_Y, self.SY[row])
        self.SY[col] = _rows(mask, S_y, self.SY[col])
        self.YY[row] = _rows(mask, y_Y, self.YY[row])
        self.YY[col] = _rows(mask, y_Y, self.YY[col])
        self.pos = torch.where(mask, (self.pos + 1) % self.m, self.pos)
        self.count = torch.where(mask, torch.clamp(self.count + 1, max=self.m), self.count)

    def clear(self, mask: Tensor) -> None:
        mask = self._pick(mask)
        self.count = torch.where(mask, 0, self.count)
        self.pos = torch.where(mask, 0, self.pos)

    def direction(self, g: Tensor, used: int) -> Tensor:
        """``-H g`` from the compact form of the L-BFGS matrix (Byrd, Nocedal & Schnabel 1994),
        ``H = gamma I + S R^-T (D + gamma Y^T Y) R^-1 S^T - gamma (S R^-T Y^T + Y R^-1 S^T)``
        with ``R`` the upper triangle of ``S^T Y`` in time order: a fixed number of batched
        products and two small triangular solves whatever the history length (``used`` is a
        host bound on the pairs any problem holds; 0 gives steepest descent).
        """
        if used == 0:
            return -g
        rest, g = g, self._pick(g)
        m, dtype = used, g.dtype  # the filled slots are among the first used ones
        S, Y = self.S[:, :m], self.Y[:, :m]
        # slots in time order per problem, empty ones first: a problem holding fewer than m
        # pairs filled slots 0 .. count - 1 and writes next at pos = count, a full ring's
        # oldest slot is pos, so the order starts at pos either way
        j = torch.arange(m, device=g.device)
        order = (self.pos.unsqueeze(1) + j) % m
        valid = j >= m - self.count.unsqueeze(1)
        v = valid.to(dtype)
        gv = g.unsqueeze(1)
        a = torch.gather((S * gv).sum(-1), 1, order) * v  # S^T g
        b = torch.gather((Y * gv).sum(-1), 1, order) * v  # Y^T g
        pair = v.unsqueeze(2) * v.unsqueeze(1)
        rows = order.unsqueeze(2).expand(-1, -1, m)
        cols = order.unsqueeze(1).expand(-1, m, -1)
        SY = self.SY[:, :m, :m].gather(1, rows).gather(2, cols) * pair
        YY = self.YY[:, :m, :m].gather(1, rows).gather(2, cols) * pair
        sy = torch.diagonal(SY, dim1=1, dim2=2)
        yy = torch.diagonal(YY, dim1=1, dim2=2)
        # newest pair last: gamma = s^T y / y^T y of it, 1 for a problem with none
        gamma = torch.where(valid[:, -1], sy[:, -1] / torch.where(valid[:, -1], yy[:, -1], 1), 1)
        R = torch.triu(SY) + torch.diag_embed(1 - v)  # empty slots: identity rows
        p, q = _compact_solve(R, SY, YY, a, b, gamma)
        # back to slot order
        q_slot = torch.zeros_like(a).scatter(1, order, q)
        p_slot = torch.zeros_like(a).scatter(1, order, p)
        # rows not held: stopped problems, whose direction is not used
        return self.spread(_compact_step(g, gamma, S, Y, q_slot, p_slot), -rest)


def _compact_solve(
    R: Tensor, SY: Tensor, YY: Tensor, a: Tensor, b: Tensor, gamma: Tensor
) -> tuple[Tensor, Tensor]:
    """The small part of the compact form in time order: ``p = R^-1 S^T g`` and
    ``q = R^-T ((D + gamma Y^T Y) p - gamma Y^T g)`` (``D`` the diagonal of ``S^T Y``).
    Shared by a stack and a single problem, so both round the same.
    """
    sy = torch.diagonal(SY, dim1=1, dim2=2)
    p = torch.linalg.solve_triangular(R, a.unsqueeze(2), upper=True)
    YYp = (YY * p.mT).sum(-1, keepdim=True)
    rhs = (sy * p.squeeze(2)).unsqueeze(2) + gamma.reshape(-1, 1, 1) * YYp
    rhs = rhs - gamma.reshape(-1, 1, 1) * b.unsqueeze(2)
    q = torch.linalg.solve_triangular(R.mT, rhs, upper=False)
    return p.squeeze(2), q.squeeze(2)


def _compact_step(g: Tensor, gamma: Tensor, S: Tensor, Y: Tensor, q: Tensor, p: Tensor) -> Tensor:
    """``-H g = -(gamma g + S q - gamma Y p)`` with ``q, p`` in slot order."""
    return _compact_combine(g, gamma, (q.unsqueeze(2) * S).sum(1), (p.unsqueeze(2) * Y).sum(1))


def _compact_combine(g: Tensor, gamma: Tensor, Sq: Tensor, Yp: Tensor) -> Tensor:
    """``-(gamma g + S q - gamma Y p)`` from the combinations ``S q`` and ``Y p``."""
    Hg = gamma.unsqueeze(1) * g + Sq
    Hg = Hg - gamma.unsqueeze(1) * Yp
    return -Hg


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
    t0 = torch.where(hist.held_any(), 1.0, torch.clamp(1.0 / gnorm.clamp_min(tiny), max=1.0))
    return d, t0


def _lbfgs(values: Callable[..., Tensor], X: Tensor, opts: _LBFGSSettings) -> _Result:
    B, n = X.shape
    evaluate = _Running(values, B)
    m = opts.history_size
    eps = _eps(X.dtype)
    f, g = _value_and_grad(values, X)
    gnorm = torch.linalg.vector_norm(g, dim=1)
    k = torch.zeros(B, dtype=torch.long, device=X.device)
    evals = torch.ones_like(k)
    restarted = torch.zeros(B, dtype=torch.bool, device=X.device)
    hist = _History(B, m, n, X)
    used = 0  # a host bound on the pairs any problem holds, read with the live flag
    status = _status(f, gnorm, k, opts)
    live = status == _RUNNING
    d, t0 = _new_search(live, g, gnorm, hist, used)
    f_tol = 100 * eps * f.abs()
    live_host = live.tolist()  # host read: is any problem live, and which
    if not any(live_host):
        return _Result(X, f, gnorm, k, evals, status)
    evaluate.narrow(live_host, X.device)
    search = _Search.start(t0, f, _dot(g, d), g, f_tol)
    while True:
        f_t, g_t = evaluate(X, search.t, d)
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
        hist.push(pair, s, y, used)
        X = _rows(step, X + s, X)
        f = torch.where(step, out.f, f)
        g = _rows(step, out.g, g)
        gnorm = torch.where(step, torch.linalg.vector_norm(g, dim=1), gnorm)
        k = k + step.long()
        restarted = restarted & ~step
        # no step: a stale history can give a poor direction, so retry steepest descent
        # once; a second failure stops the problem
        failed = ended & ~out.accepted
        retry = failed & hist.held_any() & ~restarted
        hist.clear(retry)
        restarted = restarted | retry
        status = torch.where(failed & ~retry, _NO_STEP, status)
        status = torch.where(step, _status(f, gnorm, k, opts), status)
        live = status == _RUNNING
        # host read: which problems are live, and how many pairs the longest history holds
        *live_host, used = torch.cat([live.long(), hist.count.max().reshape(1)]).tolist()
        if not any(live_host):
            break
        hist.keep(live_host)
        evaluate.narrow(live_host, X.device)
        again = ended & live
        d_new, t0 = _new_search(again, g, gnorm, hist, used)
        d = _rows(again, d_new, d)
        search = search.where(again, _Search.start(t0, f, _dot(g, d), g, 100 * eps * f.abs()))
    return _Result(X, f, gnorm, k, evals, status)
