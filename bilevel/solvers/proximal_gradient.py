"""Proximal gradient (FISTA with backtracking and adaptive restart) for ``f(w) + g(w)``.

``f`` is smooth; ``g`` enters only through its proximal operator (:mod:`bilevel.prox`).
The solver works on a stack of ``B`` independent problems at once (one problem is
``B = 1``), each with its own Lipschitz estimate, momentum and stopping: a converged
problem is frozen while the others continue, so under :func:`torch.func.vmap` a batch
gives each problem's own answer. Backtracking needs no host synchronisation either: a
trial step that fails the sufficient-decrease test ``f(z) <= f(y) + <g, z - y> +
L/2 ||z - y||^2`` is not taken and that problem's ``L`` grows by ``backtrack``; the
next iteration retries. The only host reads are the convergence checks every
``check_every`` iterations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bilevel.solvers.base import Solver, SolverInfo, _check_int, _check_tol

__all__ = ["Composite", "ProximalGradient", "proximal_gradient"]


@dataclass(frozen=True)
class Composite:
    """What :class:`ProximalGradient` minimises: ``objective(w) + g(w)`` through ``prox``.

    ``objective(w)`` returns a 0-d tensor and ``prox(w, step)`` the prox of ``step * g``.
    With ``batch = B`` the problems are stacked along dimension 0 of ``w``: ``objective``
    returns the ``B`` values, ``prox`` takes one step per problem (shape ``(B,)``).
    """

    objective: Callable[[Tensor], Tensor]
    prox: Callable[[Tensor, Tensor], Tensor]
    batch: int | None = None


class ProximalGradient(Solver):
    """FISTA with backtracking, adaptive restart and per-problem stopping."""

    method = "proximal_gradient"
    kind = "composite"

    def __init__(
        self,
        step_size: float | None,
        tol: float,
        maxiter: int,
        check_every: int,
        acceleration: bool,
        backtrack: float,
    ) -> None:
        super().__init__()
        if step_size is not None and not (
            isinstance(step_size, (int, float)) and step_size > 0 and math.isfinite(step_size)
        ):
            raise ValueError(f"step_size must be a positive number or None, got {step_size!r}")
        if not (isinstance(backtrack, (int, float)) and backtrack > 1):
            raise ValueError(f"backtrack must be a number > 1, got {backtrack!r}")
        self.step_size = step_size
        self.tol = _check_tol(tol)
        self.maxiter = _check_int(maxiter, "maxiter")
        self.check_every = _check_int(check_every, "check_every")
        self.acceleration = bool(acceleration)
        self.backtrack = float(backtrack)

    def _settings(self) -> dict[str, Any]:
        return {
            "step_size": self.step_size,
            "tol": self.tol,
            "maxiter": self.maxiter,
            "acceleration": self.acceleration,
        }

    def __call__(self, fn: Any, init: Any) -> tuple[Any, SolverInfo]:
        if not isinstance(fn, Composite):
            raise TypeError(
                "proximal_gradient minimises a smooth objective plus a prox: use it with "
                "bilevel.proximal_argmin (or give it a bilevel.solvers.proximal_gradient."
                f"Composite), got {type(fn).__name__}"
            )
        if not isinstance(init, Tensor) or not init.is_floating_point():
            raise TypeError(
                f"proximal_gradient works on one floating tensor, got {type(init).__name__}"
            )
        start = time.perf_counter()
        with torch.no_grad():
            solution, info = self._solve(fn, init)
        info.time = time.perf_counter() - start
        self.last_info = info
        return solution, info

    def _solve(self, fn: Any, init: Any) -> tuple[Any, SolverInfo]:
        target: Composite = fn
        if target.batch is None:
            # one problem is a stack of one: its record is the row's, as in solve_batch
            values = lambda W: target.objective(W[0]).reshape(1)  # noqa: E731
            prox = lambda W, step: target.prox(W[0], step[0]).unsqueeze(0)  # noqa: E731
            run = _fista(values, prox, init.detach().unsqueeze(0).clone(), self)
            return run.x[0], run.rows(self)[0]
        run = _fista(target.objective, target.prox, init.detach().clone(), self)
        return run.x, run.summary(self)

    def solve_batch(self, target: Composite, init: Tensor) -> tuple[Tensor, list[SolverInfo]]:
        """Minimise a stack of ``B`` composite problems, one :class:`SolverInfo` per problem.

        ``target`` is a :class:`Composite` with ``batch = B`` (the ``vmap`` rule of
        :func:`bilevel.proximal_argmin` builds it); ``init`` has the problems in dimension
        0. Each problem keeps its own Lipschitz estimate, momentum and stopping decision,
        so element ``i``'s answer and record (iterations, step size, message) are what a
        single call on it gives.

        Example:
            >>> import bilevel
            >>> a = torch.tensor([[1.0], [1000.0]], dtype=torch.float64)
            >>> target = Composite(lambda W: 0.5 * (a * (W - 1) ** 2).sum(-1),
            ...                    lambda W, step: bilevel.prox.lasso(W, 0.1, step.unsqueeze(-1)), batch=2)
            >>> W, infos = proximal_gradient(tol=1e-12).solve_batch(target, torch.zeros(2, 1, dtype=torch.float64))
            >>> [i.converged for i in infos], [round(w, 12) for w in W.squeeze(-1).tolist()]
            ([True, True], [0.9, 0.9999])
        """
        if not isinstance(target, Composite) or target.batch is None:
            raise TypeError(
                "solve_batch needs a Composite with batch = B (the number of stacked problems)"
            )
        if not isinstance(init, Tensor) or init.ndim == 0 or init.shape[0] != target.batch:
            got = tuple(init.shape) if isinstance(init, Tensor) else type(init).__name__
            raise ValueError(
                f"init must carry the {target.batch} problems in dimension 0; got {got}"
            )
        start = time.perf_counter()
        with torch.no_grad():
            run = _fista(target.objective, target.prox, init.detach().clone(), self)
            infos = run.rows(self)
        elapsed = time.perf_counter() - start
        for info in infos:
            info.time = elapsed
        self.last_info = infos[-1]
        return run.x, infos


def _per_problem(v: Tensor, like: Tensor) -> Tensor:
    """A ``(B,)`` tensor shaped to broadcast against ``like`` of shape ``(B, ...)``."""
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def _sqnorm(v: Tensor) -> Tensor:
    return (v * v).reshape(v.shape[0], -1).sum(-1)


def _fista(
    values: Callable[[Tensor], Tensor],
    prox: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    opts: ProximalGradient,
) -> _Run:
    def value_and_grad(W: Tensor) -> tuple[Tensor, Tensor]:
        def total(V: Tensor) -> tuple[Tensor, Tensor]:
            v = values(V)
            return v.sum(), v

        g, (_, v) = torch.func.grad_and_value(total, has_aux=True)(W)
        return v, g

    B = x.shape[0]
    fx, gx = value_and_grad(x)
    if opts.step_size is not None:
        L = torch.full((B,), 1 / opts.step_size, dtype=x.dtype, device=x.device)
    else:
        # a secant estimate of the curvature along the gradient, per problem
        scale = (1 + _sqnorm(x).sqrt()) / _sqnorm(gx).sqrt().clamp_min(1e-30)
        probe = x - 1e-4 * _per_problem(scale, x) * gx
        _, gp = value_and_grad(probe)
        L = (_sqnorm(gp - gx) / _sqnorm(probe - x).clamp_min(1e-300)).sqrt()
        L = torch.where(torch.isfinite(L) & (L > 0), L, torch.ones_like(L))
    y, t = x.clone(), torch.ones(B, dtype=x.dtype, device=x.device)
    done = torch.zeros(B, dtype=torch.bool, device=x.device)
    res = torch.full((B,), math.inf, dtype=x.dtype, device=x.device)
    iterations = torch.zeros(B, dtype=torch.long, device=x.device)
    k = 0
    while k < opts.maxiter:
        k += 1
        fy, gy = value_and_grad(y)
        z = prox(y - _per_problem(1 / L, y) * gy, 1 / L)
        fz = values(z)
        dz = z - y
        model = fy + ((gy * dz).reshape(B, -1).sum(-1)) + 0.5 * L * _sqnorm(dz)
        slack = 1e-12 * (1 + fy.abs())  # rounding: accept ties
        ok = (fz <= model + slack) & ~done
        res = torch.where(ok, L * _sqnorm(dz).sqrt(), res)
        newly = ok & (res <= opts.tol)
        L = torch.where(done | ok, L, L * opts.backtrack)
        if opts.acceleration:
            t_new = 0.5 * (1 + torch.sqrt(1 + 4 * t * t))
            restart = ((y - z) * (z - x)).reshape(B, -1).sum(-1) > 0  # O'Donoghue-Candes
            beta = torch.where(restart, torch.zeros_like(t), (t - 1) / t_new)
            y_next = z + _per_problem(beta, z) * (z - x)
            t = torch.where(ok, torch.where(restart, torch.ones_like(t), t_new), t)
        else:
            y_next = z
        keep = _per_problem(ok, x)
        x = torch.where(keep, z, x)
        y = torch.where(_per_problem(newly, x), z, torch.where(keep, y_next, y))
        iterations = iterations + (~done).long()
        done = done | newly
        if k % opts.check_every == 0 and bool(done.all()):  # the loop's only host read
            break
    return _Run(x, values(x).detach(), L, res, done, iterations, k)


_CONVERGED = "gradient-mapping norm L ||prox step|| <= tol"


@dataclass(frozen=True)
class _Run:
    """Where a FISTA run ended: per-problem tensors, ``k`` the loop's iterations."""

    x: Tensor
    f: Tensor
    L: Tensor
    res: Tensor
    done: Tensor
    iterations: Tensor
    k: int

    def rows(self, opts: ProximalGradient) -> list[SolverInfo]:
        """One record per problem, from its own counts (independent of its batch-mates)."""
        out = []
        done, its = self.done.tolist(), self.iterations.tolist()
        floats = torch.stack([self.res, self.f.to(self.res.dtype), 1 / self.L]).tolist()
        for ok, n, (res, f, step) in zip(done, its, zip(*floats)):
            out.append(
                SolverInfo(
                    opts.method,
                    n,
                    ok,
                    res,
                    f,
                    _CONVERGED
                    if ok
                    else f"maxiter={opts.maxiter} reached; raise maxiter or give step_size <= 1/L",
                    tol=opts.tol,
                    evaluations=3 * n,
                    extra={"step_size": step},
                )
            )
        return out

    def summary(self, opts: ProximalGradient) -> SolverInfo:
        """One record for a whole batch (a :class:`Composite` with ``batch``)."""
        B = self.x.shape[0]
        converged = bool(self.done.all())
        return SolverInfo(
            opts.method,
            self.k,
            converged,
            float(self.res.max()) if B else 0.0,
            float(self.f.sum()) if B else 0.0,
            _CONVERGED + " for every problem"
            if converged
            else f"maxiter={opts.maxiter} reached for {int((~self.done).sum())} of {B} "
            "problem(s); raise maxiter or give step_size <= 1/L",
            tol=opts.tol,
            evaluations=3 * self.k,
            extra={"step_size": (1 / self.L).tolist(), "iterations": self.iterations.tolist()},
        )


def proximal_gradient(
    step_size: float | None = None,
    tol: float = 1e-10,
    maxiter: int = 20000,
    check_every: int = 10,
    acceleration: bool = True,
    backtrack: float = 2.0,
) -> ProximalGradient:
    """The solver of :func:`bilevel.proximal_argmin`: FISTA with backtracking.

    Args:
        step_size: the initial step ``1/L`` (default: a secant estimate of the
            curvature); backtracking shrinks it per problem when too long.
        tol: stop a problem when its gradient-mapping norm ``L ||z - y||`` (zero exactly
            at a minimiser) is at most ``tol``.
        maxiter, check_every: iteration cap; iterations between host reads.
        acceleration: FISTA momentum with adaptive restart (``False``: ISTA).
        backtrack: factor by which ``L`` grows after a failed trial step.

    A single call's ``info.iterations`` counts the problem's own iterations (it stops
    being updated when it converges, up to ``check_every - 1`` loop passes before the
    loop ends); under ``torch.func.vmap``, :func:`bilevel.proximal_argmin` minimises the
    stack at once with :meth:`ProximalGradient.solve_batch`, one record per problem.

    Example:
        >>> import bilevel
        >>> target = Composite(lambda w: 0.5 * ((w - torch.tensor([3.0, 0.5])) ** 2).sum(),
        ...                    lambda w, step: bilevel.prox.lasso(w, 1.0, step))
        >>> w, info = proximal_gradient(tol=1e-8)(target, torch.zeros(2))
        >>> w, info.converged
        (tensor([2., 0.]), True)
    """
    return ProximalGradient(step_size, tol, maxiter, check_every, acceleration, backtrack)
