"""``bench implicit``, outer loop: hypergradient descent on per-feature L2 weights.

The problem of :mod:`.implicit` (L2-regularised logistic regression, one weight per feature)
in the setting where warm starts and preconditioners pay: ``STEPS`` outer steps of Adam on
the log-weights. The trajectory is computed once with the exact hypergradient (Newton's
method and closed-form Hessian solves, SciPy float64), so every implementation sees the
same sequence of ``(h_t, w*_t)``; each then replays it from a fresh state (its warm start
and preconditioner memory start empty), and the time is the total of its ``STEPS``
hypergradient calls (argmin at the given ``w*_t`` and the backward). Before timing, every
step's hypergradient is checked against the exact one (largest relative error shown).

Implementations: bilevel ``cg`` cold, with a :class:`bilevel.WarmStart` (warm), and warm
with Jacobi preconditioning from a Hutchinson estimate refreshed every ``JACOBI_EVERY``
steps (warm+jacobi), against TorchOpt's ``solve_cg`` and JAXopt's ``solve_cg`` (jitted) at
the same relative tolerance; for few unknowns also bilevel's default ``linalg.auto`` (an
exact dense solve). "products" counts operator applications (Hessian-vector
products) of the replay, probes and warm-start residuals included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

import bilevel
from bilevel import linalg

from . import core, jaxopt_peer
from .core import Impl, peer
from .implicit import LAMBDA, Design, Exact, breast_cancer, inner_loss_fn, outer_loss_fn, synthetic
from .report import Report, log
from .settings import Settings

STEPS = 20
TOL = 1e-10  # relative residual of every linear solve
CHECK_RTOL = 1e-6  # largest relative error of any step's hypergradient
OUTER_LR = 0.1  # Adam on log-weights
JACOBI_PROBES = 16
JACOBI_EVERY = 10
SUBJECT = "bilevel cg warm+jacobi"
TARGET = 0.8
AUTO_MAX_DENSE = 64


@dataclass
class Trajectory:
    """The outer steps every implementation replays: ``(h_t, w*_t, exact hypergradient)``."""

    name: str
    train: tuple[Design, Tensor]
    val: tuple[Design, Tensor]
    steps: list[tuple[Tensor, Tensor, Tensor]]

    @property
    def p(self) -> int:
        return self.train[0].p


def trajectory(name: str, data: Any, lam: float, steps: int, device: torch.device) -> Trajectory:
    """Adam on the log-weights with the exact hypergradient, from ``log(lam)`` everywhere."""
    train, val = data
    exact = Exact(train, val)
    p = train[0].p
    h = np.full(p, math.log(lam))
    m, v = np.zeros(p), np.zeros(p)
    w: np.ndarray | None = None
    out = []
    for t in range(steps):
        w, _ = exact.newton(np.exp(h), w)
        g = exact.hypergrad(w, h)
        out.append(
            (
                torch.tensor(h, dtype=torch.float64, device=device),
                torch.tensor(w, dtype=torch.float64, device=device),
                torch.tensor(g, dtype=torch.float64),
            )
        )
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        mhat, vhat = m / (1 - 0.9 ** (t + 1)), v / (1 - 0.999 ** (t + 1))
        h = h - OUTER_LR * mhat / (np.sqrt(vhat) + 1e-8)
    dtype = torch.float64
    return Trajectory(
        name,
        (train[0].to(device, dtype), train[1].to(device, dtype)),
        (val[0].to(device, dtype), val[1].to(device, dtype)),
        out,
    )


class Replay:
    """``fn()`` replays the trajectory from a fresh state; returns every step's hypergradient
    divided by the norm of the exact one (so the check weighs every step alike) and records
    the products and the largest per-step relative error of its latest replay."""

    def __init__(
        self,
        traj: Trajectory,
        step: Callable[[Any, int], tuple[Tensor, int]],
        fresh: Callable[[], Any] = lambda: None,
    ) -> None:
        self.traj = traj
        self.step = step  # (state, t) -> (hypergradient at step t, products)
        self.fresh = fresh  # the state a replay starts from
        self.products = 0
        self.max_error = math.nan

    def __call__(self) -> Tensor:
        state = self.fresh()
        outs, products, worst = [], 0, 0.0
        for t, (_, _, g) in enumerate(self.traj.steps):
            hg, n = self.step(state, t)
            products += n
            scale = float(g.norm()) or 1.0
            hg = hg.detach().cpu()
            worst = max(worst, float((hg - g).norm()) / scale)
            outs.append(hg / scale)
        self.products, self.max_error = products, worst
        return torch.cat(outs)

    def reference(self) -> Tensor:
        return torch.cat([g / (float(g.norm()) or 1.0) for _, _, g in self.traj.steps])


def bilevel_replay(traj: Trajectory, warm: bool, jacobi: bool, solver: Any = None) -> Replay:
    inner, outer = inner_loss_fn(traj.train), outer_loss_fn(traj.val)
    pre = linalg.jacobi(probes=JACOBI_PROBES, every=JACOBI_EVERY) if jacobi else None
    solver = solver or linalg.cg(tol=TOL, preconditioner=pre)

    def step(ws: Any, t: int) -> tuple[Tensor, int]:
        h, w_star, _ = traj.steps[t]
        hh = h.detach().requires_grad_()
        started = ws is not None and bool(ws.solutions)  # the warm start's residual product
        diag = bilevel.ImplicitDiagnostics()
        w = bilevel.argmin(inner, w_star, hh, linear_solver=solver, warm_start=ws, diagnostics=diag)
        (g,) = torch.autograd.grad(outer(w), hh)  # type: ignore[arg-type]
        info = diag.last_backward
        n = info.iterations
        n += JACOBI_PROBES if info.preconditioner.endswith("estimated)") else 0
        return g, n + int(started)

    return Replay(traj, step, bilevel.WarmStart if warm else lambda: None)


def torchopt_replay(traj: Trajectory) -> Replay:
    import torchopt

    inner, outer = inner_loss_fn(traj.train), outer_loss_fn(traj.val)
    cg = torchopt.linear_solve.solve_cg(rtol=TOL)
    count = [0]

    def solve(matvec: Any, b: Any, **kw: Any) -> Any:
        def counted(v: Any) -> Any:
            count[0] += 1
            return matvec(v)

        return cg(counted, b, **kw)

    def optimality(w: Tensor, h: Tensor) -> Tensor:
        return torch.func.grad(inner)(w, h)

    def step(_: Any, t: int) -> tuple[Tensor, int]:
        h, w_star, _ = traj.steps[t]

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
        def solution(w0: Tensor, hh: Tensor) -> Tensor:
            return w_star

        hh = h.detach().requires_grad_()
        count[0] = 0
        (g,) = torch.autograd.grad(outer(solution(w_star, hh)), hh)
        return g, count[0]

    return Replay(traj, step)


def jaxopt_replay(traj: Trajectory) -> tuple[Replay, str]:
    """JAXopt's jitted hypergradient, compiled once on the first step (untimed)."""
    jax = jaxopt_peer._jax()
    j = jaxopt_peer
    train = (j._design(traj.train[0]), j.to_jax(traj.train[1]))
    val = (j._design(traj.val[0]), j.to_jax(traj.val[1]))
    fn = j.given_solution(j._logistic_inner, j._logistic_outer, TOL, traj.p)
    h0, w0, _ = traj.steps[0]
    jitted = j.Jitted(fn, j.to_jax(h0), j.to_jax(w0), train, val)
    args = [(j.to_jax(h), j.to_jax(w)) for h, w, _ in traj.steps]

    def step(_: Any, t: int) -> tuple[Tensor, int]:
        out = jax.block_until_ready(jitted.fn(*args[t], train, val))
        return torch.from_numpy(np.array(out)), 0

    return Replay(traj, step), jitted.note


def outer_impls(traj: Trajectory, notes: list[str]) -> tuple[list[Impl], dict[str, Replay]]:
    replays = {
        "bilevel cg cold": bilevel_replay(traj, warm=False, jacobi=False),
        "bilevel cg warm": bilevel_replay(traj, warm=True, jacobi=False),
        SUBJECT: bilevel_replay(traj, warm=True, jacobi=True),
    }
    impl_notes = {
        SUBJECT: f"jacobi(probes={JACOBI_PROBES}, every={JACOBI_EVERY}) + WarmStart",
    }
    if traj.p <= AUTO_MAX_DENSE:  # the implicit layers' default solves few unknowns exactly
        replays["bilevel auto"] = bilevel_replay(
            traj, False, False, linalg.auto(linalg.cg(tol=TOL), max_dense=AUTO_MAX_DENSE)
        )
        impl_notes["bilevel auto"] = "the default linear solver: dense LU for p <= 64"
    if peer("torchopt").available:
        replays["torchopt cg"] = torchopt_replay(traj)
        impl_notes["torchopt cg"] = f"solve_cg(rtol={TOL:g}), no warm start"
    else:
        notes.append("torchopt cg: missing")
    if (
        jaxopt_peer.peer().available
        and jaxopt_peer.device_mismatch(traj.steps[0][1].device) is None
    ):
        replay, note = jaxopt_replay(traj)
        replays["jaxopt cg"] = replay
        impl_notes["jaxopt cg"] = f"solve_cg(tol={TOL:g}), jit; {note}; products not counted"
    else:
        notes.append("jaxopt cg: missing or not on this device")
    impls = [Impl(name, r, note=impl_notes.get(name, "")) for name, r in replays.items()]
    return impls, replays


def run_outer(s: Settings, report: Report) -> str:
    """The outer-loop table (appended to ``bench implicit``'s)."""
    steps = 3 if s.quick else STEPS
    configs: list[tuple[str, Callable[[], Any], float]] = [
        ("breast-cancer", lambda: breast_cancer(s.seed), LAMBDA["breast-cancer"])
    ]
    sizes = [300] if s.quick else [p for p in s.features if p >= 10_000] or [10_000]
    for p in sizes:
        configs.append(
            (f"synthetic p={p:g}", lambda p=p: synthetic(p, s.seed), LAMBDA["synthetic"])
        )
    table: list[dict[str, Any]] = []
    for name, make, lam in configs:
        log(s, f"[implicit outer] {name}: trajectory of {steps} steps (exact, SciPy)")
        traj = trajectory(name, make(), lam, steps, s.device)
        notes: list[str] = []
        impls, replays = outer_impls(traj, notes)
        reference = next(iter(replays.values())).reference()
        log(s, f"[implicit outer] {name}: {', '.join(replays)}")
        results = core.measure(
            impls,
            reference=reference,
            rtol=CHECK_RTOL,
            repeats=min(s.repeats, 3),
            warmup=0,
            device=s.device,
            verbose=s.verbose,
        )
        # the per-step check: the largest relative error of any step (from the check run)
        for nm, res in results.items():
            if res.failed is None and res.agree is not None:
                res.agree = replays[nm].max_error <= CHECK_RTOL
        targets = {}
        if "torchopt cg" in results and traj.p >= 10_000:
            targets["torchopt cg"] = (TARGET, f"{SUBJECT} <= {TARGET}x torchopt cg ({steps} steps)")
        extra = {
            nm: {"products": r.products, "max_step_error": r.max_error} for nm, r in replays.items()
        }
        config = {"data": name, "p": traj.p, "h": "per feature", "outer_steps": steps}
        rows = report.add_rows(
            "implicit outer", config, results, SUBJECT, targets, extra, label=f"{name} outer loop"
        )
        for note in notes:
            report.notes.append(f"implicit outer {name}: {note}")
        base = results.get("torchopt cg")
        for row in rows:
            vs = None
            if base is not None and base.median and row["median_s"]:
                vs = row["median_s"] / base.median
            table.append(
                {
                    "data": name,
                    "implementation": row["implementation"],
                    "total": core.fmt_time(row["median_s"]) if not row["failed"] else "-",
                    "n": str(row["repeats"]),
                    "products": str(row["products"]) if row["products"] else "-",
                    "max step err": core.fmt_err(row["max_step_error"]),
                    "agree": "FAILED"
                    if row["failed"]
                    else "yes"
                    if row["agree"]
                    else "NO (DISAGREES)",
                    "/ torchopt": core.fmt_ratio(vs),
                    "target": f"<={TARGET}" if row["implementation"] == SUBJECT and targets else "",
                    "met": ""
                    if row["implementation"] != SUBJECT or not targets or vs is None
                    else ("ok" if vs <= TARGET else "MISS"),
                    "note": (row["failed"] or row["note"] or "")[:70],
                }
            )
    cols = [
        "data",
        "implementation",
        "total",
        "n",
        "products",
        "max step err",
        "agree",
        "/ torchopt",
        "target",
        "met",
        "note",
    ]
    return core.format_table(
        table,
        cols,
        f"== implicit, outer loop: {steps} Adam steps on per-feature log L2 weights; total "
        f"hypergradient time of the {steps} steps (linear solves at tol {TOL:g}; every step "
        f"checked against the exact hypergradient, rel. error <= {CHECK_RTOL:g}) ==",
    )
