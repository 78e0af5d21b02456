"""Fixed-point solvers over a stack of ``B`` independent problems (one problem: ``B = 1``).

A solver subclassing :class:`_MapStackSolver` writes its iterations once, on rows: every
problem's iterate, memory, iteration count and stopping decision are rows of batched
tensors, and a problem that stopped is frozen (masks) while the others go on. A single
call runs as a stack of one through the same code, so a row of :meth:`solve_batch` gets
the answer and info record of a single call on it (the ``vmap`` rule of
:func:`bilevel.fixed_point`).

Every problem of a stack starts at iteration 0 and a live problem makes one iteration per
pass, so the live problems share the iteration number ``k``: it is a host integer, and so
is the number of filled history slots. Problems stop only at a convergence check (or at
``maxiter``), where the host reads one number: how many problems are still live.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import Tree
from bilevel.solvers._flat import _Flat
from bilevel.solvers._stack import (
    _CONVERGED,
    _MAXITER,
    _NONFINITE,
    _flat_rows,
    _rows_tree,
    _unravel_rows,
)
from bilevel.solvers.base import MapFn, Solver, SolverInfo, _apply_map, _check_tree

RowMap = Callable[[Tensor], Tensor]  # (B, n) iterates -> (B, n) images


@dataclass
class _Stops:
    """Per-problem stopping record of a stack: ``iterations`` and ``code`` (long, ``(B,)``),
    ``residual`` (the last residual norm measured, ``nan`` before the first check), and
    ``live``, the mask of problems still iterating. Updated by :meth:`check` and :meth:`end`.
    """

    iterations: Tensor
    code: Tensor
    residual: Tensor
    live: Tensor
    all_live: bool = True  # known on the host: no problem has stopped yet

    @classmethod
    def start(cls, X: Tensor) -> _Stops:
        B = X.shape[0]
        long = torch.zeros(B, dtype=torch.long, device=X.device)
        nan = torch.full((B,), math.nan, dtype=X.dtype, device=X.device)
        live = torch.ones(B, dtype=torch.bool, device=X.device)
        return cls(long, long.clone(), nan, live)

    def check(self, diff: Tensor, k: int, tol: float, last: bool) -> bool:
        """Stop the live problems whose residual rows ``diff`` are non-finite or below
        ``tol`` at iteration ``k``; returns whether any problem is still live (the one
        host read of a check; none at the ``last`` iteration, where all stop anyway)."""
        r = torch.linalg.vector_norm(diff, dim=1)
        bad = self.live & ~torch.isfinite(r)
        done = self.live & (r <= tol)
        stop = bad | done
        self.residual = torch.where(self.live, r, self.residual)
        code = torch.where(done, _CONVERGED, self.code)
        self.code = torch.where(bad, _NONFINITE, code)
        self.iterations = torch.where(stop, k, self.iterations)
        self.live = self.live & ~stop
        if last:
            return False
        left = int(self.live.sum())  # the loop's convergence check: one read per check
        self.all_live = left == self.live.shape[0]
        return left > 0

    def end(self, k: int) -> None:
        """``maxiter`` reached at iteration ``k``: the live problems stop there."""
        self.iterations = torch.where(self.live, k, self.iterations)
        self.code = torch.where(self.live, _MAXITER, self.code)
        self.live = torch.zeros_like(self.live)

    def rows(self, new: Tensor, old: Tensor) -> Tensor:
        """``new`` on the live problems' rows, ``old`` on the stopped ones (dimension 0)."""
        if self.all_live:
            return new  # every row live: the mask would select ``new`` bit for bit
        mask = self.live.reshape(-1, *([1] * (new.ndim - 1)))
        return torch.where(mask, new, old)

    def records(self) -> list[tuple[int, int, float]]:
        """``(iterations, code, residual)`` per problem: one host read for the stack."""
        dtype = torch.promote_types(self.residual.dtype, torch.float32)  # counts stay exact
        table = torch.stack(
            [self.iterations.to(dtype), self.code.to(dtype), self.residual.to(dtype)]
        )
        its, codes, res = table.tolist()
        return [(int(i), int(c), float(r)) for i, c, r in zip(its, codes, res)]


class _MapStackSolver(Solver):
    """Base of the fixed-point solvers: ``_run`` iterates a stack of rows; a single call
    is a stack of one, :meth:`solve_batch` a stack of many."""

    kind = "fixed_point"
    tol: float

    def _run(self, apply: RowMap, X: Tensor) -> tuple[Tensor, _Stops]:
        raise NotImplementedError  # pragma: no cover - abstract

    def _message(self, code: int, k: int) -> str:
        if code == _CONVERGED:
            return "residual ||map_fn(w) - w|| <= tol"
        if code == _NONFINITE:
            return f"diverged: non-finite residual at iteration {k}"
        return f"maxiter={getattr(self, 'maxiter', k)} reached"

    def _extra(self) -> dict[str, Any]:
        return {}

    def _infos(self, stops: _Stops) -> list[SolverInfo]:
        return [
            SolverInfo(
                self.method,
                k,
                code == _CONVERGED,
                res,
                math.nan,
                self._message(code, k),
                tol=self.tol,
                evaluations=k,
                extra=self._extra(),
            )
            for k, code, res in stops.records()
        ]

    def _solve(self, map_fn: MapFn, init: Tree) -> tuple[Tree, SolverInfo]:
        # one problem is a stack of one, through the same code: vmap equals a loop
        flat = _Flat(init)
        leaves, spec = _check_tree(init)
        shapes = [leaf.shape for leaf in leaves]
        single = isinstance(init, Tensor)

        def apply(X: Tensor) -> Tensor:
            if single:  # one tensor: no tree to rebuild or check at each evaluation
                out = map_fn(X[0].reshape(shapes[0]))
                if isinstance(out, Tensor) and out.shape == shapes[0]:
                    return out.detach().reshape(1, -1).to(X.dtype)
                _apply_map(lambda _: out, None, spec, shapes)  # raises, naming what is wrong
            images = _apply_map(map_fn, flat.unravel(X[0]), spec, shapes)
            return torch.cat([leaf.reshape(1, -1).to(flat.dtype) for leaf in images], 1)

        X, stops = self._run(apply, flat.ravel(init).detach().clone().unsqueeze(0))
        return flat.output(X[0]), self._infos(stops)[0]

    def solve_batch(
        self, maps: Callable[[Tree], Tree], init: Tree
    ) -> tuple[Tree, list[SolverInfo]]:
        """Solve ``B`` independent fixed-point problems at once (the ``vmap`` rule of the
        layers): ``maps(W)`` returns the images of a tree ``W`` whose leaves carry the
        problems in dimension 0, row ``i`` depending on row ``i`` only (as
        ``torch.func.vmap`` of one map does). Every problem keeps its own iterate, memory,
        iteration count and stopping decision; a stopped problem is frozen while the others
        go on, and the loop ends when all are done. Row ``i``'s answer and info record are a
        single call's on it, whatever its batch-mates do. Returns the solutions stacked like
        ``init`` and one :class:`SolverInfo` per problem. The host reads one number per
        convergence check (how many problems are live) and the info records at the end.
        """
        if not callable(maps):
            raise TypeError(f"maps must be callable; got {type(maps).__name__}")
        flat, X, spec = _flat_rows(init)
        batch = X.shape[0]
        shapes = [torch.Size((batch, *shape)) for shape in flat.shapes]

        single = isinstance(init, Tensor)

        def apply(X: Tensor) -> Tensor:
            if single:  # one tensor: no tree to rebuild or check at each evaluation
                out = maps(X.reshape(shapes[0]))
                if isinstance(out, Tensor) and out.shape == shapes[0]:
                    return out.detach().reshape(batch, -1).to(X.dtype)
                _apply_map(lambda _: out, None, spec, shapes)  # raises, naming what is wrong
            images = _apply_map(maps, _unravel_rows(flat, X), spec, shapes)
            return torch.cat([leaf.reshape(batch, -1).to(flat.dtype) for leaf in images], 1)

        start = time.perf_counter()
        with torch.no_grad():
            X, stops = self._run(apply, X.clone())
            infos = self._infos(stops)
        elapsed = time.perf_counter() - start
        for info in infos:
            info.time = elapsed
        self.last_info = infos[-1]
        return _rows_tree(flat, X), infos
