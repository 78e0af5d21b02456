"""The line search of L-BFGS decided on the host, for one problem or a stack of them.

:class:`_HostSearch` (one problem) and :class:`_HostSearches` (a stack of ``B``, one row
each) make the decisions of :meth:`bilevel.solvers.line_search._Search.update` on numpy
scalars, or ``(B,)`` numpy arrays, of the problem's dtype instead of a few dozen small
tensor operations per evaluation (their launch cost dominated small problems and a
stack's passes alike). IEEE ``+ - * /``, ``sqrt`` and comparisons round the same on the
host as in a tensor of that dtype (a Python scalar meets a tensor, or an array, in its
dtype), and the operations are the tensor search's in the same order, so a single call
takes the steps its row of a stack takes (vmap equals a loop). One host read per
evaluation, the values and slopes ``(f, phi')``: the searches branch on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bilevel.solvers.line_search import _rows, _WolfeOptions

# dtypes whose tensor arithmetic with a Python scalar is the numpy scalar arithmetic
_HOST_DTYPES = {torch.float64: np.float64, torch.float32: np.float32}


@dataclass(frozen=True)
class _HostOutcome:
    """How a search ended: the step (host scalar), its value (host) and gradient (device)."""

    accepted: bool
    t: Any
    f: Any
    g: Tensor


def _cubic_min(t1: Any, f1: Any, d1: Any, t2: Any, f2: Any, d2: Any) -> Any:
    """:func:`bilevel.solvers.line_search._cubic_min` on scalars (nan if no minimiser)."""
    a = d1 + d2 - 3.0 * (f1 - f2) / (t1 - t2)
    disc = a * a - d1 * d2
    b = np.copysign(np.sqrt(np.maximum(disc, 0)), t2 - t1) if disc >= 0 else np.nan
    return t2 - (t2 - t1) * (d2 + b - a) / (d2 - d1 + 2.0 * b)


class _HostSearch:
    """One problem's line search: the fields of ``_HostSearches`` as host scalars (updated in place)."""

    def __init__(self, start: list[float], g0: Tensor) -> None:
        # numpy scalars of the problem's dtype (typed Any: numpy's stubs do not follow them)
        self.dt: Any = _HOST_DTYPES[g0.dtype]
        values: list[Any] = [self.dt(v) for v in start]
        self.t, self.f0, self.d0, self.f_tol = values
        self.evals, self.zoom = 0, False
        zero = self.dt(0)
        self.lo: tuple[Any, Any, Any, Tensor] = (zero, self.f0, self.d0, g0)  # t, f, slope, g
        self.hi: tuple[Any, Any, Any] = (zero, self.f0, self.d0)

    def update(self, f: Tensor, s: Tensor, g: Tensor, opts: _WolfeOptions) -> _HostOutcome | None:
        """Take the evaluation at ``self.t``; the outcome when the search ended, else None."""
        f_host, s_host = (self.dt(v) for v in torch.cat([f, s]).tolist())
        with np.errstate(all="ignore"):
            return self._update(f_host, s_host, g, opts)

    def _update(self, f: Any, s: Any, g: Tensor, opts: _WolfeOptions) -> _HostOutcome | None:
        t, d0, f0, f_tol = self.t, self.d0, self.f0, self.f_tol
        c1, c1_slope, neg_c2 = self.dt(opts.c1), self.dt(2 * opts.c1 - 1), self.dt(-opts.c2)
        lo_t, lo_f, lo_s, lo_g = self.lo
        finite = bool(np.isfinite(f) and np.isfinite(s))
        armijo = (f <= f0 + c1 * t * d0) or ((f <= f0 + f_tol) and (s <= c1_slope * d0))
        armijo = bool(armijo) and finite
        evals = self.evals + 1
        if not opts.strong:
            failed = not armijo and evals >= opts.max_evals
            self.t, self.evals = (t if armijo else 0.5 * t), evals
            return _HostOutcome(armijo, t, f, g) if armijo or failed else None
        curvature = bool(abs(s) <= neg_c2 * d0)
        into_lo_t = accept = into_t_lo = extrapolate = to_hi = to_lo = swap = False
        if not self.zoom:
            into_lo_t = not finite or not armijo or (self.evals > 0 and f > lo_f + f_tol)
            accept = not into_lo_t and curvature
            into_t_lo = not into_lo_t and not accept and bool(s >= 0)
            extrapolate = not (into_lo_t or accept or into_t_lo)
        else:
            to_hi = not finite or not armijo or bool(f > lo_f + f_tol)
            accept = not to_hi and curvature
            to_lo = not to_hi and not accept
            swap = to_lo and bool(s * (self.hi[0] - lo_t) >= 0)
        if into_lo_t or to_hi:
            self.hi = (t, f, s)
        elif into_t_lo or swap:
            self.hi = (lo_t, lo_f, lo_s)
        if into_t_lo or extrapolate or to_lo:
            self.lo = (t, f, s, g)
        new_t = t
        if extrapolate:
            low, high = t + 0.1 * (t - lo_t), 10.0 * t
            new_t = _cubic_min(lo_t, lo_f, lo_s, t, f, s)
            new_t = high if not np.isfinite(new_t) or new_t > high else new_t
            new_t = low if new_t < low else new_t
        accept = accept or (extrapolate and evals >= opts.max_evals)
        self.zoom = (self.zoom or into_lo_t or into_t_lo) and not accept
        self.evals = evals
        give_lo = False
        if self.zoom:
            (lo_t, lo_f, lo_s, lo_g), (hi_t, hi_f, hi_s) = self.lo, self.hi
            width = abs(hi_t - lo_t)
            tiny = width <= 1e-12 * np.maximum(abs(lo_t), abs(hi_t))
            give_lo = evals >= opts.max_evals or bool(tiny)
            new_t = _cubic_min(lo_t, lo_f, lo_s, hi_t, hi_f, hi_s)
            a, b = np.minimum(lo_t, hi_t), np.maximum(lo_t, hi_t)
            inside = np.isfinite(new_t) and a + 0.1 * width <= new_t and new_t <= b - 0.1 * width
            new_t = new_t if inside else 0.5 * (lo_t + hi_t)
        self.t = new_t
        if give_lo:
            return _HostOutcome(bool(lo_t > 0), lo_t, lo_f, lo_g)
        return _HostOutcome(True, t, f, g) if accept else None


# -- a stack of problems -----------------------------------------------------------


def _cubic_min_rows(t1: Any, f1: Any, d1: Any, t2: Any, f2: Any, d2: Any) -> Any:
    """Per row, :func:`_cubic_min` on host arrays (nan where there is no minimiser)."""
    a = d1 + d2 - 3.0 * (f1 - f2) / (t1 - t2)
    disc = a * a - d1 * d2
    b = np.copysign(np.sqrt(np.maximum(disc, 0)), t2 - t1)
    b = np.where(disc >= 0, b, np.nan)  # no real minimiser
    return t2 - (t2 - t1) * (d2 + b - a) / (d2 - d1 + 2.0 * b)


def _to_device(a: Any, device: torch.device) -> Tensor:
    """A host array as a tensor on ``device``. On the CPU it shares the array's memory
    (``torch.tensor`` copied it for 10-15 us): callers pass arrays that nothing changes
    in place afterwards (results of numpy operations)."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def _device_mask(mask: Any, device: torch.device) -> Tensor:
    """A host boolean array as a mask on ``device``."""
    return _to_device(mask, device)


@dataclass(frozen=True)
class _HostOutcomes:
    """Which searches ended at this evaluation, and the step each one accepted (host
    arrays; ``g`` the gradients at the accepted points, on the device)."""

    ended: Any  # (B,) bool: the search finished (accepted or failed)
    accepted: Any  # (B,) bool: it found a step
    t: Any
    f: Any
    g: Tensor


class _HostSearches:
    """The line searches of ``B`` problems, one row each, decided on the host: the fields
    of :class:`bilevel.solvers.line_search._Search` as ``(B,)`` numpy arrays of the
    problems' dtype (``dt``), the decisions masks over them (about a hundred numpy
    operations on ``B`` numbers per pass instead of as many device kernels). Only the
    gradient at ``lo`` (``lo_g``) lives on the device.

    ``t`` is the next trial step. In the bracketing phase ``lo`` is the previous point
    (``t = 0`` at the start); in the zoom phase ``[lo, hi]`` brackets a step, ``lo``
    satisfying Armijo with its slope pointing towards ``hi``. ``f0, d0`` are the value and
    slope at ``t = 0``; ``f_tol`` is the rounding-level slack of the approximate Wolfe test.
    """

    def __init__(self, dt: Any, like: Tensor) -> None:
        B = like.shape[0]
        self.dt = dt
        zero = np.zeros(B, dtype=dt)
        self.t, self.f0, self.d0, self.f_tol = zero, zero, zero, zero
        self.lo_t, self.lo_f, self.lo_s, self.hi_t, self.hi_f, self.hi_s = (zero,) * 6
        self.evals = np.zeros(B, dtype=np.int64)
        self.zoom = np.zeros(B, dtype=bool)
        # read only where lo_t > 0, i.e. after a point of this search became lo
        self.lo_g = torch.zeros_like(like)

    def start(self, which: Any, t0: Any, f0: Any, d0: Any, f_tol: Any) -> None:
        """New searches in the rows ``which`` from ``t = 0`` (value ``f0``, slope ``d0``)."""

        zero = self.dt(0)
        fields = {"t": t0, "f0": f0, "d0": d0, "f_tol": f_tol, "lo_t": zero, "lo_f": f0}
        fields.update({"lo_s": d0, "hi_t": zero, "hi_f": f0, "hi_s": d0})
        for name, value in fields.items():
            setattr(self, name, np.where(which, value, getattr(self, name)))
        self.evals = np.where(which, 0, self.evals)
        self.zoom = self.zoom & ~which

    def update(self, live: Any, f: Any, s: Any, g: Tensor, opts: _WolfeOptions) -> _HostOutcomes:
        """Take the evaluation ``(f, s = phi'(t))`` (host) and gradients ``g`` (device) at
        every live row's trial step ``t``."""
        with np.errstate(all="ignore"):  # rows that are not live compute garbage, unused
            return self._update(live, f, s, g, opts)

    def _update(self, live: Any, f: Any, s: Any, g: Tensor, opts: _WolfeOptions) -> _HostOutcomes:
        dt = self.dt
        t, d0 = self.t, self.d0
        finite = np.isfinite(f) & np.isfinite(s)
        c1 = dt(opts.c1)
        # Armijo on values, or its slope form when the decrease is below rounding (Hager-Zhang)
        armijo = (f <= self.f0 + c1 * t * d0) | (
            (f <= self.f0 + self.f_tol) & (s <= dt(2 * opts.c1 - 1) * d0)
        )
        armijo = armijo & finite
        evals = self.evals + live
        if not opts.strong:
            ok = live & armijo
            failed = live & ~ok & (evals >= opts.max_evals)
            self.t, self.evals = np.where(live & ~ok, dt(0.5) * t, t), evals
            return _HostOutcomes(ok | failed, ok, t, f, g)
        curvature = abs(s) <= dt(-opts.c2) * d0
        bracket, zooming = live & ~self.zoom, live & self.zoom
        # bracketing: the step is too long (zoom into [previous, t]), acceptable, past the
        # minimum (zoom into [t, previous]), or still descending (extrapolate)
        into_lo_t = bracket & (
            ~finite | ~armijo | ((self.evals > 0) & (f > self.lo_f + self.f_tol))
        )
        accept_bracket = bracket & ~into_lo_t & curvature
        if (accept_bracket == live).all():
            # every live search takes its trial step (the usual case near convergence):
            # what the rest would give, lo and hi and t unchanged, no search zooming
            self.evals, self.zoom = evals, np.zeros_like(self.zoom)
            return _HostOutcomes(live.copy(), live.copy(), t, f, g)
        into_t_lo = bracket & ~into_lo_t & ~accept_bracket & (s >= 0)
        extrapolate = bracket & ~into_lo_t & ~accept_bracket & ~into_t_lo
        # zoom: the point replaces hi (too long) or lo (acceptable for Armijo)
        to_hi = zooming & (~finite | ~armijo | (f > self.lo_f + self.f_tol))
        accept_zoom = zooming & ~to_hi & curvature
        to_lo = zooming & ~to_hi & ~accept_zoom
        swap = to_lo & (s * (self.hi_t - self.lo_t) >= 0)
        point_hi = into_lo_t | to_hi
        lo_hi = into_t_lo | swap
        hi_t = np.where(point_hi, t, np.where(lo_hi, self.lo_t, self.hi_t))
        hi_f = np.where(point_hi, f, np.where(lo_hi, self.lo_f, self.hi_f))
        hi_s = np.where(point_hi, s, np.where(lo_hi, self.lo_s, self.hi_s))
        point_lo = into_t_lo | extrapolate | to_lo
        lo_t = np.where(point_lo, t, self.lo_t)
        lo_f = np.where(point_lo, f, self.lo_f)
        lo_s = np.where(point_lo, s, self.lo_s)
        if point_lo.any():
            self.lo_g = _rows(_device_mask(point_lo, g.device), g, self.lo_g)
        # extrapolation within [t + 0.1 (t - t_prev), 10 t]
        low, high = t + dt(0.1) * (t - self.lo_t), dt(10.0) * t
        t_next = _cubic_min_rows(self.lo_t, self.lo_f, self.lo_s, t, f, s)
        t_next = np.where(~np.isfinite(t_next) | (t_next > high), high, t_next)
        t_next = np.where(t_next < low, low, t_next)
        # still descending after max_evals evaluations: take the last point
        exhausted = extrapolate & (evals >= opts.max_evals)
        accepted_point = accept_bracket | accept_zoom | exhausted
        zoom = (self.zoom | into_lo_t | into_t_lo) & live & ~accepted_point
        # the next zoom trial: a safeguarded cubic step inside [lo, hi], else bisection; a
        # search out of evaluations, or with a bracket below resolution, returns lo
        width = abs(hi_t - lo_t)
        tiny = width <= dt(1e-12) * np.maximum(abs(lo_t), abs(hi_t))
        give_lo = zoom & ((evals >= opts.max_evals) | tiny)
        t_zoom = _cubic_min_rows(lo_t, lo_f, lo_s, hi_t, hi_f, hi_s)
        a, b = np.minimum(lo_t, hi_t), np.maximum(lo_t, hi_t)
        tenth = dt(0.1) * width
        inside = np.isfinite(t_zoom) & (a + tenth <= t_zoom) & (t_zoom <= b - tenth)
        t_zoom = np.where(inside, t_zoom, dt(0.5) * (lo_t + hi_t))
        self.t = np.where(zoom, t_zoom, np.where(extrapolate, t_next, t))
        self.evals, self.zoom = evals, zoom
        self.lo_t, self.lo_f, self.lo_s = lo_t, lo_f, lo_s
        self.hi_t, self.hi_f, self.hi_s = hi_t, hi_f, hi_s
        g_out = _rows(_device_mask(give_lo, g.device), self.lo_g, g) if give_lo.any() else g
        return _HostOutcomes(
            ended=accepted_point | give_lo,
            accepted=accepted_point | (give_lo & (lo_t > 0)),
            t=np.where(give_lo, lo_t, t),
            f=np.where(give_lo, lo_f, f),
            g=g_out,
        )
