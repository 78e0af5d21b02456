"""The line search of L-BFGS for a stack of one problem, decided on the host.

:class:`_HostSearch` makes the decisions of :meth:`bilevel.solvers.line_search._Search.update`
for ``B = 1`` with numpy scalars of the problem's dtype instead of a few dozen small tensor
operations per evaluation (their launch cost dominates small problems). IEEE ``+ - * /``,
``sqrt`` and comparisons round the same on the host as in a tensor of that dtype (a Python
scalar meets a tensor in the tensor's dtype), and the operations are the batched ones in
the same order, so a single call takes the same steps as its row in a stack (vmap equals a
loop). One host read per evaluation, ``(f, phi')``: the search branches on these values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bilevel.solvers.line_search import _WolfeOptions

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
    """One problem's line search: the fields of ``_Search`` as host scalars (updated in place)."""

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
