"""Line searches on ``phi(t) = f(x + t d)``: strong Wolfe (with approximate Wolfe
conditions near the optimum) and Armijo backtracking.
"""

from __future__ import annotations

import math

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


def _cubic_min(t1: float, f1: float, d1: float, t2: float, f2: float, d2: float) -> float:
    """Minimiser of the cubic interpolating two points and slopes (nan if none)."""
    if t1 == t2:
        return math.nan
    a = d1 + d2 - 3.0 * (f1 - f2) / (t1 - t2)
    disc = a * a - d1 * d2
    if not math.isfinite(disc) or disc < 0:
        return math.nan
    b = math.copysign(math.sqrt(disc), t2 - t1)
    denom = d2 - d1 + 2.0 * b
    if denom == 0:
        return math.nan
    return t2 - (t2 - t1) * (d2 + b - a) / denom


def _strong_wolfe(
    phi: _LineFunction,
    f0: float,
    d0: float,
    t: float,
    c1: float,
    c2: float,
    max_evals: int,
    f_tol: float,
) -> tuple[float, float, Tensor, Tensor] | None:
    """A step satisfying the strong Wolfe conditions (or their approximate form).

    Near the optimum f(x + t d) - f(x) falls below rounding error, so the Armijo test
    on values cannot be decided; there a step is accepted when f has not increased
    beyond ``f_tol`` and the slope satisfies (2 c1 - 1) d0 >= phi'(t), which is the
    Armijo condition for a quadratic written with slopes (Hager & Zhang's
    approximate Wolfe conditions). Returns ``(t, f, f_tensor, grad)`` or ``None``
    when no step was found. Points are tuples ``(t, f, slope, f_tensor, grad)``.
    """

    def armijo(t_: float, f_: float, s_: float) -> bool:
        return f_ <= f0 + c1 * t_ * d0 or (f_ <= f0 + f_tol and s_ <= (2 * c1 - 1) * d0)

    def curvature(s_: float) -> bool:
        return abs(s_) <= -c2 * d0

    def result(point: tuple | None) -> tuple[float, float, Tensor, Tensor] | None:
        if point is None or point[0] <= 0:
            return None
        return point[0], point[1], point[3], point[4]

    def zoom(lo: tuple, hi: tuple) -> tuple | None:
        # Invariant: lo satisfies Armijo and its slope points towards hi.
        while phi.evals < max_evals:
            t_lo, f_lo, s_lo = lo[:3]
            t_hi, f_hi, s_hi = hi[:3]
            width = abs(t_hi - t_lo)
            if width <= 1e-12 * max(abs(t_lo), abs(t_hi)):
                break
            t_new = _cubic_min(t_lo, f_lo, s_lo, t_hi, f_hi, s_hi)
            a, b = min(t_lo, t_hi), max(t_lo, t_hi)
            if not (math.isfinite(t_new) and a + 0.1 * width <= t_new <= b - 0.1 * width):
                t_new = 0.5 * (t_lo + t_hi)
            f_new, s_new, ft, gt = phi(t_new)
            point = (t_new, f_new, s_new, ft, gt)
            if not (math.isfinite(f_new) and math.isfinite(s_new)):
                hi = point
            elif not armijo(t_new, f_new, s_new) or f_new > f_lo + f_tol:
                hi = point
            else:
                if curvature(s_new):
                    return point
                if s_new * (t_hi - t_lo) >= 0:
                    hi = lo
                lo = point
        # Out of evaluations: a step that satisfies Armijo is still progress.
        return lo

    prev: tuple = (0.0, f0, d0, None, None)
    for i in range(max_evals):
        f_t, s_t, ft, gt = phi(t)
        point = (t, f_t, s_t, ft, gt)
        if not (math.isfinite(f_t) and math.isfinite(s_t)):
            return result(zoom(prev, point))
        if not armijo(t, f_t, s_t) or (i > 0 and f_t > prev[1] + f_tol):
            return result(zoom(prev, point))
        if curvature(s_t):
            return result(point)
        if s_t >= 0:
            return result(zoom(point, prev))
        # Still descending: extrapolate, within [t + 0.1 (t - t_prev), 10 t].
        lo_, hi_ = t + 0.1 * (t - prev[0]), 10.0 * t
        t_next = _cubic_min(prev[0], prev[1], prev[2], t, f_t, s_t)
        if not math.isfinite(t_next) or t_next > hi_:
            t_next = hi_
        elif t_next < lo_:
            t_next = lo_
        prev = point
        t = t_next
    # Still descending after max_evals extrapolations: take the last point.
    return result(prev)


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
