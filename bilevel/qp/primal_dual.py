"""A batched primal-dual interior-point method for convex QPs (Mehrotra predictor-corrector).

Each iteration factorises one batched Newton system (the reduced KKT system
``[[Q + G' diag(z/s) G, A'], [A, 0]]`` with the slacks and inequality duals eliminated,
or the augmented one) by LU, used for both the predictor and the corrector direction. Every batch element keeps its own
step length and stops on its own: a converged element is frozen (its iterate no longer
changes), so a batch gives the same answers as the elements solved one by one. The loop
reads one flag on the host every ``check_every`` iterations (whether every element has
converged) and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel.qp.problem import QPData, QPError

__all__ = ["IPMResult", "InteriorPoint", "interior_point"]


@dataclass(frozen=True)
class IPMResult:
    """Primal-dual solution ``(x, y, z)``, slacks ``s = h - Gx``, the LU factorisation of
    the KKT matrix when there are no inequalities (reused by the backward pass; None
    otherwise), and per-element convergence records."""

    x: Tensor
    y: Tensor
    z: Tensor
    s: Tensor
    lu: tuple[Tensor, Tensor] | None
    converged: Tensor
    iterations: Tensor
    residual: Tensor


@dataclass(frozen=True)
class InteriorPoint:
    """Options of the interior-point solver (see :func:`interior_point`)."""

    tol: float | None = None
    maxiter: int = 50
    check_every: int = 5
    system: str = "reduced"

    def __post_init__(self) -> None:
        if self.system not in ("augmented", "reduced"):
            raise ValueError(f"system must be 'augmented' or 'reduced', got {self.system!r}")
        if self.tol is not None and not (isinstance(self.tol, (int, float)) and self.tol > 0):
            raise ValueError(f"tol must be a positive number or None, got {self.tol!r}")
        for name in ("maxiter", "check_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

    def __call__(self, data: QPData) -> IPMResult:
        return _solve(data, self)


def interior_point(
    tol: float | None = None, maxiter: int = 50, check_every: int = 5, system: str = "reduced"
) -> InteriorPoint:
    """The forward solver of :func:`bilevel.qp`.

    Args:
        tol: stop an element when its relative primal and dual residuals are below
            ``tol`` and its duality measure ``s'z / m`` below ``tol^1.5`` (default
            ``1e-10`` in float64, ``1e-5`` in float32). An element whose accuracy stops improving for 4
            iterations once below ``100 tol`` (rounding in the reduced system, whose
            condition grows as the iterates approach the boundary, can set that floor)
            stops there too; each element returns its most accurate iterate.
        maxiter: iteration cap; an element not within ``100 tol`` by then raises
            :class:`bilevel.qp.QPError` naming it (infeasible, unbounded or ill-posed).
        check_every: iterations between host reads of the "all converged" flag.
        system: the Newton system factorised each iteration: ``"reduced"`` (default:
            slacks and duals eliminated, ``[[Q + G'(Z/S)G, A'], [A, 0]]``, size ``n + me``;
            ``Z/S`` grows without bound on active constraints, which limits the accuracy
            to about ``1e-8`` in float64) or ``"augmented"``
            (``[[Q, A', G'], [A, 0, 0], [G, 0, -S/Z]]``, size ``n + me + mi``: stays well
            conditioned, about ``1e-11`` here, at 3-7x the cost).

    Example:
        >>> solver = interior_point(tol=1e-9)
        >>> solver.maxiter
        50
    """
    return InteriorPoint(tol, maxiter, check_every, system)


def _mv(M: Tensor, v: Tensor) -> Tensor:
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def _mtv(M: Tensor, v: Tensor) -> Tensor:
    return (M.mT @ v.unsqueeze(-1)).squeeze(-1)


def _factor(data: QPData, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n, me, _ = data.sizes
    H = data.Q + data.G.mT @ (d.unsqueeze(-1) * data.G)
    top = torch.cat([H, data.A.mT], dim=-1)
    bottom = torch.cat(
        [data.A, torch.zeros(data.batch, me, me, dtype=H.dtype, device=H.device)], -1
    )
    lu, piv, info = torch.linalg.lu_factor_ex(torch.cat([top, bottom], dim=-2))
    return lu, piv, info


def _factor_augmented(data: QPData, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """LU of ``[[Q, A', G'], [A, 0, 0], [G, 0, -diag(w)]]`` (``w = s / z``)."""
    B, (_, me, mi) = data.batch, data.sizes
    zeros = lambda r, c: torch.zeros(B, r, c, dtype=w.dtype, device=w.device)  # noqa: E731
    K = torch.cat(
        [
            torch.cat([data.Q, data.A.mT, data.G.mT], -1),
            torch.cat([data.A, zeros(me, me), zeros(me, mi)], -1),
            torch.cat([data.G, zeros(mi, me), -torch.diag_embed(w)], -1),
        ],
        -2,
    )
    return torch.linalg.lu_factor_ex(K)


def _kkt_solve(lu: Tensor, piv: Tensor, rx: Tensor, ry: Tensor) -> tuple[Tensor, Tensor]:
    n = rx.shape[-1]
    sol = torch.linalg.lu_solve(lu, piv, torch.cat([rx, ry], dim=-1).unsqueeze(-1)).squeeze(-1)
    return sol[..., :n], sol[..., n:]


def _max_step(v: Tensor, dv: Tensor) -> Tensor:
    """Largest ``alpha <= 1`` with ``v + alpha dv >= 0``, per element (``v`` not empty)."""
    neg = dv < 0
    ratio = torch.where(
        neg, -v / torch.where(neg, dv, -torch.ones_like(dv)), 2 * torch.ones_like(v)
    )
    return ratio.amin(-1).clamp(max=1.0)


@dataclass(frozen=True)
class _Newton:
    """One interior-point iterate's reduced KKT system, factorised once for two directions."""

    G: Tensor
    lu: Tensor
    piv: Tensor
    rd: Tensor
    re: Tensor
    ri: Tensor
    s: Tensor
    z: Tensor

    augmented: bool

    def direction(self, rc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Newton direction for the complementarity target ``s * z = s * z - rc``."""
        if self.augmented:
            n, me = self.rd.shape[-1], self.re.shape[-1]
            rhs = torch.cat([-self.rd, -self.re, -self.ri + rc / self.z], -1).unsqueeze(-1)
            sol = torch.linalg.lu_solve(self.lu, self.piv, rhs).squeeze(-1)
            dx, dy, dz = sol[..., :n], sol[..., n : n + me], sol[..., n + me :]
            return dx, dy, dz, -self.ri - _mv(self.G, dx)
        d = self.z / self.s
        rx = -self.rd - _mtv(self.G, d * self.ri - rc / self.s)
        dx, dy = _kkt_solve(self.lu, self.piv, rx, -self.re)
        dz = d * (_mv(self.G, dx) + self.ri) - rc / self.s
        ds = -(rc + self.s * dz) / self.z
        return dx, dy, dz, ds


def _residuals(data: QPData, x: Tensor, y: Tensor, z: Tensor, s: Tensor) -> tuple[Tensor, ...]:
    rd = _mv(data.Q, x) + data.p + _mtv(data.A, y) + _mtv(data.G, z)
    re = _mv(data.A, x) - data.b
    ri = _mv(data.G, x) + s - data.h
    return rd, re, ri


def _measure(
    rd: Tensor, re: Tensor, ri: Tensor, s: Tensor, z: Tensor, scale: Tensor, tol: float
) -> tuple[Tensor, Tensor]:
    """Duality measure ``mu = s'z / m`` and one accuracy number per element: the worst
    scaled residual, or ``mu / tol^0.5`` when larger. The gap must fall to ``tol^1.5``,
    below the residuals, because on a weakly active constraint (``s_i`` and ``z_i`` both
    vanishing) the solution is only accurate to ``sqrt(mu)``."""
    mi = s.shape[-1]
    mu = (s * z).sum(-1) / mi if mi else torch.zeros_like(scale)
    worst = torch.maximum(torch.maximum(_inf(rd), _inf(re)), _inf(ri)) / scale
    return mu, torch.maximum(worst, mu / tol**0.5)


def _inf(v: Tensor) -> Tensor:
    if v.shape[-1] == 0:
        return torch.zeros(v.shape[:-1], dtype=v.dtype, device=v.device)
    return v.abs().amax(-1)


def _solve(data: QPData, opts: InteriorPoint) -> IPMResult:
    B, mi = data.batch, data.sizes[2]
    dtype, device = data.p.dtype, data.p.device
    tol = opts.tol if opts.tol is not None else (1e-10 if dtype == torch.float64 else 1e-5)
    acceptable = 100 * tol
    # CVXOPT-style start: the least-squares point of the relaxed problem, slacks and
    # duals shifted into the positive orthant
    lu, piv, _ = _factor(data, torch.ones(B, mi, dtype=dtype, device=device))
    x, y = _kkt_solve(lu, piv, -data.p + _mtv(data.G, data.h), data.b)
    s = data.h - _mv(data.G, x)
    z = -s
    if mi:
        for v in (s, z):
            shift = -v.amin(-1, keepdim=True)
            v += torch.where(shift >= 0, 1 + shift, torch.zeros_like(shift))
    scale = 1 + torch.maximum(_inf(data.p), torch.maximum(_inf(data.b), _inf(data.h)))
    done = torch.zeros(B, dtype=torch.bool, device=device)
    iterations = torch.zeros(B, dtype=torch.long, device=device)
    best = _Best.start(x, y, z, s)
    for it in range(1, opts.maxiter + 2):
        rd, re, ri = _residuals(data, x, y, z, s)
        mu, res = _measure(rd, re, ri, s, z, scale, tol)
        best = best.update(res, x, y, z, s)
        # converged, or stalled at an acceptable accuracy (rounding in the ill-conditioned
        # reduced system sets a floor on the dual residual as the iterates reach the boundary)
        done = done | (res <= tol) | ((best.since >= 4) & (best.res <= acceptable))
        if it > opts.maxiter or (it % opts.check_every == 0 and bool(done.all())):
            break  # the documented host sync
        augmented = opts.system == "augmented" and mi > 0
        if augmented:
            lu, piv, _ = _factor_augmented(data, s / z)
        else:
            lu, piv, _ = _factor(data, z / s)
        step = _Newton(data.G, lu, piv, rd, re, ri, s, z, augmented)
        dx, dy, dz, ds = step.direction(s * z)  # predictor (affine scaling)
        if mi:
            a = torch.minimum(_max_step(s, ds), _max_step(z, dz)).unsqueeze(-1)
            mu_aff = ((s + a * ds) * (z + a * dz)).sum(-1) / mi
            sigma = (mu_aff / mu.clamp_min(torch.finfo(dtype).tiny)).clamp(0, 1) ** 3
            dx, dy, dz, ds = step.direction(s * z + ds * dz - (sigma * mu).unsqueeze(-1))
            alpha = (0.99 * torch.minimum(_max_step(s, ds), _max_step(z, dz))).clamp(max=1.0)
        else:
            alpha = torch.ones(B, dtype=dtype, device=device)
        move = (~done).unsqueeze(-1)
        alpha = alpha.unsqueeze(-1)
        x = torch.where(move, x + alpha * dx, x)
        y = torch.where(move, y + alpha * dy, y)
        z = torch.where(move, z + alpha * dz, z)
        s = torch.where(move, s + alpha * ds, s)
        iterations = iterations + (~done).long()
    ok = best.res <= acceptable
    bad = (~ok).nonzero().flatten().tolist()
    if bad:
        _raise(data, bad, best, iterations, tol)
    # without inequalities the reduced KKT matrix never changed: its LU serves the backward
    return IPMResult(
        best.x, best.y, best.z, best.s, (lu, piv) if mi == 0 else None, ok, iterations, best.res
    )


@dataclass(frozen=True)
class _Best:
    """Each element's most accurate iterate so far, and iterations since it improved."""

    res: Tensor
    since: Tensor
    x: Tensor
    y: Tensor
    z: Tensor
    s: Tensor

    @staticmethod
    def start(x: Tensor, y: Tensor, z: Tensor, s: Tensor) -> _Best:
        B = x.shape[0]
        res = torch.full((B,), float("inf"), dtype=x.dtype, device=x.device)
        return _Best(res, torch.zeros(B, dtype=torch.long, device=x.device), x, y, z, s)

    def update(self, res: Tensor, x: Tensor, y: Tensor, z: Tensor, s: Tensor) -> _Best:
        better = res < self.res  # NaN never is
        keep = better.unsqueeze(-1)
        return _Best(
            torch.where(better, res, self.res),
            torch.where(better, torch.zeros_like(self.since), self.since + 1),
            torch.where(keep, x, self.x),
            torch.where(keep, y, self.y),
            torch.where(keep, z, self.z),
            torch.where(keep, s, self.s),
        )


def _raise(data: QPData, bad: list[int], best: _Best, iterations: Tensor, tol: float) -> None:
    x, y, z, s = best.x, best.y, best.z, best.s
    rd, re, ri = _residuals(data, x, y, z, s)
    lines = []
    for i in bad[:10]:
        primal = max(float(_inf(re[i : i + 1])[0]), float(_inf(ri[i : i + 1])[0]))
        dual = float(_inf(rd[i : i + 1])[0])
        why = (
            "primal infeasible (no x satisfies Ax = b, Gx <= h)?"
            if primal > 1e3 * tol or not torch.isfinite(x[i]).all()
            else "dual infeasible (unbounded below: Q not positive definite on the feasible set)?"
            if dual > 1e3 * tol
            else "slow convergence: raise maxiter"
        )
        lines.append(
            f"  element {i}: primal residual {primal:.2e}, dual residual {dual:.2e}, "
            f"duality gap {float((s[i] * z[i]).sum()):.2e}: {why}"
        )
    more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
    raise QPError(
        f"qp: {len(bad)} of {data.batch} problems did not converge within "
        f"{int(iterations.max())} interior-point iterations (tol {tol:.1e}): batch element(s) "
        f"{', '.join(map(str, bad[:10]))}{more}\n" + "\n".join(lines),
        bad,
    )
