"""Line searches on ``phi(t) = f(x + t d)``.

:class:`_Search` is the line search of L-BFGS for a stack of ``B`` problems at once: each
problem has its own trial step, bracket and evaluation count as ``(B,)`` tensors, so one
batched evaluation advances every search and the decisions (strong Wolfe with approximate
Wolfe conditions near the optimum, or Armijo backtracking) are ``torch.where`` masks, not
host branches: the form for a loop that must keep its decisions on the device. The eager
solver makes the same decisions on the host
(:class:`bilevel.solvers._host_search._HostSearches`, ``_HostSearch``), where a hundred
numpy operations cost less than these few dozen kernels. :func:`_backtracking` is the
one-problem Armijo search of Newton-CG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from bilevel.solvers._flat import _Flat, _flat_value_and_grad
from bilevel.solvers.base import Objective


class _LineFunction:
    """phi(t) = f(x + t d) with one host sync per evaluation."""

    def __init__(self, objective: Objective, flat: _Flat, x: Tensor, d: Tensor) -> None:
        self.objective, self.flat, self.x, self.d = objective, flat, x, d
        self.evals = 0

    def __call__(self, t: float) -> tuple[float, float, Tensor, Tensor]:
        f, g = _flat_value_and_grad(self.objective, self.flat, self.x + t * self.d)
        self.evals += 1
        f_host, dphi = torch.stack([f.to(g.dtype), g @ self.d]).tolist()
        return f_host, dphi, f, g


def _backtracking(
    phi: _LineFunction, f0: float, d0: float, t: float, c1: float, max_evals: int, f_tol: float
) -> tuple[float, float, Tensor, Tensor] | None:
    """Armijo backtracking (halving), with the same rounding-level slack as above."""
    while phi.evals < max_evals:
        f_t, s_t, ft, gt = phi(t)
        if (
            math.isfinite(f_t)
            and math.isfinite(s_t)
            and (f_t <= f0 + c1 * t * d0 or (f_t <= f0 + f_tol and s_t <= (2 * c1 - 1) * d0))
        ):
            return t, f_t, ft, gt
        t *= 0.5
    return None


# -- the batched line search of L-BFGS ---------------------------------------------------


@dataclass(frozen=True)
class _WolfeOptions:
    """Constants of the batched line search: ``strong`` Wolfe (else Armijo backtracking)."""

    strong: bool
    c1: float
    c2: float
    max_evals: int


def _cubic_min(t1: Tensor, f1: Tensor, d1: Tensor, t2: Tensor, f2: Tensor, d2: Tensor) -> Tensor:
    """Per problem, the minimiser of the cubic through two points and slopes (non-finite if none)."""
    a = d1 + d2 - 3.0 * (f1 - f2) / (t1 - t2)
    disc = a * a - d1 * d2
    b = torch.copysign(disc.clamp_min(0).sqrt(), t2 - t1)
    b = torch.where(disc >= 0, b, torch.full_like(b, math.nan))  # no real minimiser
    return t2 - (t2 - t1) * (d2 + b - a) / (d2 - d1 + 2.0 * b)


def _rows(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``where(mask, a, b)`` with a ``(B,)`` mask over the rows of ``(B, n)`` tensors."""
    return torch.where(mask.unsqueeze(-1), a, b)


@dataclass(frozen=True)
class _Outcome:
    """Which searches ended at this evaluation, and the step each one accepted."""

    ended: Tensor  # (B,) bool: the search finished (accepted or failed)
    accepted: Tensor  # (B,) bool: it found a step
    t: Tensor
    f: Tensor
    g: Tensor  # (B, n): the gradient at the accepted point


@dataclass(frozen=True)
class _Search:
    """The line searches of ``B`` problems, one row each.

    ``t`` is the next trial step. In the bracketing phase ``lo`` is the previous point
    (``t = 0`` at the start); in the zoom phase ``[lo, hi]`` brackets a step, ``lo``
    satisfying Armijo with its slope pointing towards ``hi``. ``f0, d0`` are the value and
    slope at ``t = 0``; ``f_tol`` is the rounding-level slack of the approximate Wolfe test.
    """

    t: Tensor
    evals: Tensor
    zoom: Tensor
    f0: Tensor
    d0: Tensor
    f_tol: Tensor
    lo_t: Tensor
    lo_f: Tensor
    lo_s: Tensor
    lo_g: Tensor
    hi_t: Tensor
    hi_f: Tensor
    hi_s: Tensor

    @staticmethod
    def start(t0: Tensor, f0: Tensor, d0: Tensor, g0: Tensor, f_tol: Tensor) -> _Search:
        zero = torch.zeros_like(t0)
        return _Search(
            t=t0,
            evals=torch.zeros(t0.shape, dtype=torch.long, device=t0.device),
            zoom=torch.zeros(t0.shape, dtype=torch.bool, device=t0.device),
            f0=f0,
            d0=d0,
            f_tol=f_tol,
            lo_t=zero,
            lo_f=f0,
            lo_s=d0,
            lo_g=g0,
            hi_t=zero,
            hi_f=f0,
            hi_s=d0,
        )

    def where(self, mask: Tensor, other: _Search) -> _Search:
        """Rows of ``other`` where ``mask``, of ``self`` elsewhere."""
        out = {}
        for name in self.__dataclass_fields__:
            mine, theirs = getattr(self, name), getattr(other, name)
            pick = _rows if mine.ndim == 2 else torch.where
            out[name] = pick(mask, theirs, mine)
        return _Search(**out)

    def update(
        self, live: Tensor, f: Tensor, s: Tensor, g: Tensor, opts: _WolfeOptions
    ) -> tuple[_Search, _Outcome]:
        """Take the evaluation ``(f, s = phi'(t), g)`` at every live row's trial step ``t``."""
        t, d0 = self.t, self.d0
        finite = torch.isfinite(f) & torch.isfinite(s)
        c1 = opts.c1
        # Armijo on values, or its slope form when the decrease is below rounding (Hager-Zhang)
        armijo = (f <= self.f0 + c1 * t * d0) | (
            (f <= self.f0 + self.f_tol) & (s <= (2 * c1 - 1) * d0)
        )
        armijo = armijo & finite
        evals = self.evals + live.long()
        if not opts.strong:
            ok = live & armijo
            failed = live & ~ok & (evals >= opts.max_evals)
            state = replace(self, t=torch.where(live & ~ok, 0.5 * t, t), evals=evals)
            return state, _Outcome(ok | failed, ok, t, f, g)
        curvature = s.abs() <= -opts.c2 * d0
        bracket, zooming = live & ~self.zoom, live & self.zoom
        # bracketing: the step is too long (zoom into [previous, t]), acceptable, past the
        # minimum (zoom into [t, previous]), or still descending (extrapolate)
        into_lo_t = bracket & (
            ~finite | ~armijo | ((self.evals > 0) & (f > self.lo_f + self.f_tol))
        )
        accept_bracket = bracket & ~into_lo_t & curvature
        into_t_lo = bracket & ~into_lo_t & ~accept_bracket & (s >= 0)
        extrapolate = bracket & ~into_lo_t & ~accept_bracket & ~into_t_lo
        # zoom: the point replaces hi (too long) or lo (acceptable for Armijo)
        to_hi = zooming & (~finite | ~armijo | (f > self.lo_f + self.f_tol))
        accept_zoom = zooming & ~to_hi & curvature
        to_lo = zooming & ~to_hi & ~accept_zoom
        swap = to_lo & (s * (self.hi_t - self.lo_t) >= 0)
        point_hi = into_lo_t | to_hi
        lo_hi = into_t_lo | swap
        hi_t = torch.where(point_hi, t, torch.where(lo_hi, self.lo_t, self.hi_t))
        hi_f = torch.where(point_hi, f, torch.where(lo_hi, self.lo_f, self.hi_f))
        hi_s = torch.where(point_hi, s, torch.where(lo_hi, self.lo_s, self.hi_s))
        point_lo = into_t_lo | extrapolate | to_lo
        lo_t = torch.where(point_lo, t, self.lo_t)
        lo_f = torch.where(point_lo, f, self.lo_f)
        lo_s = torch.where(point_lo, s, self.lo_s)
        lo_g = _rows(point_lo, g, self.lo_g)
        # extrapolation within [t + 0.1 (t - t_prev), 10 t]
        low, high = t + 0.1 * (t - self.lo_t), 10.0 * t
        t_next = _cubic_min(self.lo_t, self.lo_f, self.lo_s, t, f, s)
        t_next = torch.where(~torch.isfinite(t_next) | (t_next > high), high, t_next)
        t_next = torch.where(t_next < low, low, t_next)
        # still descending after max_evals evaluations: take the last point
        exhausted = extrapolate & (evals >= opts.max_evals)
        accepted_point = accept_bracket | accept_zoom | exhausted
        zoom = (self.zoom | into_lo_t | into_t_lo) & live & ~accepted_point
        # the next zoom trial: a safeguarded cubic step inside [lo, hi], else bisection; a
        # search out of evaluations, or with a bracket below resolution, returns lo
        width = (hi_t - lo_t).abs()
        tiny = width <= 1e-12 * torch.maximum(lo_t.abs(), hi_t.abs())
        give_lo = zoom & ((evals >= opts.max_evals) | tiny)
        t_zoom = _cubic_min(lo_t, lo_f, lo_s, hi_t, hi_f, hi_s)
        a, b = torch.minimum(lo_t, hi_t), torch.maximum(lo_t, hi_t)
        inside = torch.isfinite(t_zoom) & (a + 0.1 * width <= t_zoom) & (t_zoom <= b - 0.1 * width)
        t_zoom = torch.where(inside, t_zoom, 0.5 * (lo_t + hi_t))
        new_t = torch.where(zoom, t_zoom, torch.where(extrapolate, t_next, t))
        ended = accepted_point | give_lo
        accepted = accepted_point | (give_lo & (lo_t > 0))
        outcome = _Outcome(
            ended=ended,
            accepted=accepted,
            t=torch.where(give_lo, lo_t, t),
            f=torch.where(give_lo, lo_f, f),
            g=_rows(give_lo, lo_g, g),
        )
        state = _Search(
            new_t, evals, zoom, self.f0, d0, self.f_tol, lo_t, lo_f, lo_s, lo_g, hi_t, hi_f, hi_s
        )
        return state, outcome
