"""``bench implicit``, small problems: the per-call overhead of an implicit hypergradient.

Ridge regression (one weight, ``lambda = exp(h)``, float64)::

    w*(h) = argmin_w  1/(2n) ||X w - y||^2 + lambda/2 ||w||^2,   outer: 1/(2n) ||X_v w* - y_v||^2

with designs 10 x 3, 100 x 30 and 1000 x 300 (Gaussian, fixed seed; the validation set has
the train set's size). The floor is autograd through the closed form
``torch.linalg.solve(X^T X / n + lambda I, X^T y / n)`` (forward included); then bilevel's
``argmin`` with the solution given (``solver=None``; ``auto``, ``cg`` and ``dense`` backward, and
``compiled=True`` with ``auto`` up to 64 unknowns, its compile time printed), with
``solvers.lbfgs`` from zero (forward solve included, the default ``auto`` backward; and
``lbfgs(compiled=True)``, the whole solver loop compiled, its compile time printed), and
JAXopt's counterparts (jitted).
Ratios are to the closed form.

Digits: multinomial logistic regression on scikit-learn's digits (64 pixels / 16, 10
classes, no intercept: 640 unknowns), L2 weight ``exp(h)``, half the images for training,
half for validation; bilevel against JAXopt with the solution given and with L-BFGS from
zero, at the same tolerances. Ratios are bilevel's time over JAXopt's.

The course tutorial's training step: the ``argmin-timeseries`` network (CNN encoder,
``bilevel.nn.RidgeArgMin`` layer with its exact forward solve and implicit backward (its
default exact block solve; and, a second row, ``--backward cg``), CNN decoder; the experiment's own settings, one batch of 32 synthetic windows, float64): zero
the gradients, forward, MSE, backward and an Adam step (learning rate 0, so that every call
sees the same weights), against the same network whose ridge layer is the hand-written
closed form ``torch.linalg.solve(X^T X + lambda I, X^T Y)`` under autograd. The gradients
of every parameter are compared before timing.

Every hypergradient is checked against the exact one (NumPy: closed form for ridge; Newton
with the dense Hessian for digits) before its time is shown.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import bilevel.implicit

from . import core, jaxopt_peer
from .core import Impl
from .report import Report, log
from .settings import Settings

RIDGE_SIZES = ((10, 3), (100, 30), (1000, 300))
RIDGE_LAMBDA = 0.1
DIGITS_LAMBDA = 1e-2
TOL = 1e-12  # relative residual of the backward linear solves
SOLVE_TOL = 1e-12  # gradient norm at which the L-BFGS forward solves stop (both libraries)
LBFGS_MAXITER = 500
LBFGS_HISTORY = 20
RTOL = 1e-9  # agreement with the exact hypergradient
COMPILED_MAX = 64  # unknowns up to which the compiled row runs (auto's dense limit)

CLOSED_FORM = "closed form"
TARGETS = {
    "bilevel auto": 2.0,
    "bilevel compiled": 2.0,
    "bilevel cg": 2.0,
    "bilevel dense": 2.0,
    "bilevel lbfgs": 3.0,
    "bilevel lbfgs compiled": 3.0,
}  # x closed form
TUTORIAL_TARGET = 1.5  # bilevel's training step / the closed-form layer's
TUTORIAL_RTOL = 1e-6  # gradients of the two networks (the experiment's cg tolerance is 1e-6)
TUTORIAL_CLOSED = "closed-form ridge layer"
TUTORIAL_BILEVEL = "bilevel RidgeArgMin"
TUTORIAL_BILEVEL_CG = "bilevel RidgeArgMin cg"
PAIRS = (("bilevel cg", "jaxopt cg"), ("bilevel lbfgs", "jaxopt LBFGS"))  # digits: bilevel / JAXopt


@dataclass
class Small:
    """One small problem: its torch data, losses, the exact answer, and JAX ports of both."""

    name: str
    unknowns: int
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    h: Tensor  # 0-d leaf, requires grad
    w_star: Tensor
    exact: Tensor
    inner: Callable[[Tensor, Tensor], Tensor]
    outer: Callable[[Tensor], Tensor]
    jax_inner: Callable[..., Any]
    jax_outer: Callable[..., Any]
    jax_train: Any
    jax_val: Any


# --------------------------------------------------------------------------- ridge


def ridge(n: int, p: int, seed: int) -> Small:
    g = torch.Generator().manual_seed(seed + p)
    X, Xv = (torch.randn(n, p, generator=g, dtype=torch.float64) for _ in range(2))
    w_true = torch.randn(p, generator=g, dtype=torch.float64)
    y, yv = (A @ w_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64) for A in (X, Xv))
    lam = RIDGE_LAMBDA
    # exact answer (NumPy): A w* = X^T y / n, dL/dh = -lambda w*^T A^-1 grad_w L_val
    Xn, yn, Xvn, yvn = (t.numpy() for t in (X, y, Xv, yv))
    A = Xn.T @ Xn / n + lam * np.eye(p)
    w = np.linalg.solve(A, Xn.T @ yn / n)
    gval = Xvn.T @ (Xvn @ w - yvn) / n
    exact = -lam * float(w @ np.linalg.solve(A, gval))

    def inner(w: Tensor, h: Tensor) -> Tensor:
        return 0.5 * (X @ w - y).pow(2).mean() + 0.5 * h.exp() * (w * w).sum()

    def outer(w: Tensor) -> Tensor:
        return 0.5 * (Xv @ w - yv).pow(2).mean()

    to = jaxopt_peer.to_jax if jaxopt_peer.peer().available else (lambda t: None)
    return Small(
        name=f"ridge {n}x{p}",
        unknowns=p,
        train=(X, y),
        val=(Xv, yv),
        h=torch.tensor(math.log(lam), dtype=torch.float64, requires_grad=True),
        w_star=torch.as_tensor(w),
        exact=torch.tensor(exact, dtype=torch.float64),
        inner=inner,
        outer=outer,
        jax_inner=_jax_ridge_inner,
        jax_outer=_jax_ridge_outer,
        jax_train=(to(X), to(y)),
        jax_val=(to(Xv), to(yv)),
    )


def _jax_ridge_inner(w: Any, h: Any, train: Any) -> Any:
    import jax.numpy as jnp

    X, y = train
    return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * jnp.exp(h) * (w * w).sum()


def _jax_ridge_outer(w: Any, val: Any) -> Any:
    X, y = val
    return 0.5 * ((X @ w - y) ** 2).mean()


def closed_form_impl(problem: Small) -> Callable[[], Tensor]:
    """Autograd through ``torch.linalg.solve`` of the normal equations: the floor."""
    X, y = problem.train
    n, p = X.shape
    eye = torch.eye(p, dtype=X.dtype)

    def run() -> Tensor:
        w = torch.linalg.solve(X.T @ X / n + problem.h.exp() * eye, X.T @ y / n)
        return torch.autograd.grad(problem.outer(w), problem.h)[0]

    return run


# --------------------------------------------------------------------------- digits


def digits_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and validation halves of the digits (pixels / 16): ``X, y, X_val, y_val``."""
    from sklearn.datasets import load_digits

    Xa, ya = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(Xa))
    Xa, ya = Xa[perm] / 16.0, ya[perm]
    half = len(Xa) // 2
    return Xa[:half], ya[:half], Xa[half:], ya[half:]


def digits_val_loss(W: np.ndarray, Xv: np.ndarray, yv: np.ndarray) -> float:
    """The validation cross-entropy of the weights ``W`` (NumPy)."""
    Z = Xv @ W
    Zmax = Z.max(1)
    lse = Zmax + np.log(np.exp(Z - Zmax[:, None]).sum(1))
    return float(np.mean(lse - Z[np.arange(len(yv)), yv]))


def digits(seed: int) -> Small:
    X, y, Xv, yv = digits_data(seed)
    k = 10
    lam = DIGITS_LAMBDA
    W, H = digits_newton(X, y, k, lam)
    Pv = _softmax(Xv @ W)
    Pv[np.arange(len(yv)), yv] -= 1.0
    gval = (Xv.T @ Pv / len(yv)).ravel()
    exact = -lam * float(W.ravel() @ np.linalg.solve(H, gval))

    Xt, yt, Xvt, yvt = (torch.as_tensor(a) for a in (X, y, Xv, yv))

    def inner(w: Tensor, h: Tensor) -> Tensor:
        return F.cross_entropy(Xt @ w, yt) + 0.5 * h.exp() * (w * w).sum()

    def outer(w: Tensor) -> Tensor:
        return F.cross_entropy(Xvt @ w, yvt)

    if jaxopt_peer.peer().available:
        to = jaxopt_peer.to_jax
        jax_train, jax_val = (
            (to(Xt), to(F.one_hot(yt, k).double())),
            (
                to(Xvt),
                to(F.one_hot(yvt, k).double()),
            ),
        )
    else:
        jax_train = jax_val = None
    return Small(
        name="digits",
        unknowns=W.size,
        train=(Xt, yt),
        val=(Xvt, yvt),
        h=torch.tensor(math.log(lam), dtype=torch.float64, requires_grad=True),
        w_star=torch.as_tensor(W),
        exact=torch.tensor(exact, dtype=torch.float64),
        inner=inner,
        outer=outer,
        jax_inner=_jax_digits_inner,
        jax_outer=_jax_digits_outer,
        jax_train=jax_train,
        jax_val=jax_val,
    )


def _softmax(Z: np.ndarray) -> np.ndarray:
    E = np.exp(Z - Z.max(1, keepdims=True))
    return E / E.sum(1, keepdims=True)


def digits_newton(
    X: np.ndarray, y: np.ndarray, k: int, lam: float, W0: np.ndarray | None = None
) -> tuple[Any, Any]:
    """Newton's method with the dense Hessian (640 x 640) to the rounding floor; returns the
    solution and the Hessian there. The first steps, far from the solution, need not halve
    the gradient norm; near it (below 1e-8 of the start) it stops once the norm no longer
    halves (quadratic convergence has reached the floor). ``W0``: the start (default 0)."""
    n, d = X.shape
    W = np.zeros((d, k)) if W0 is None else W0.copy()
    previous = start = math.inf
    for _ in range(50):
        P = _softmax(X @ W)
        G = P.copy()
        G[np.arange(n), y] -= 1.0
        grad = (X.T @ G / n + lam * W).ravel()
        # H[(a,c),(b,e)] = 1/n sum_i x_ia x_ib (p_ic delta_ce - p_ic p_ie) + lambda delta
        M = P[:, :, None] * (np.eye(k)[None] - P[:, None, :])
        # as one matrix product (x_i x_i^T flattened) @ M_i flattened: BLAS, not einsum loops
        XX = (X[:, :, None] * X[:, None, :]).reshape(n, d * d)
        H4 = (XX.T @ M.reshape(n, k * k)).reshape(d, d, k, k)
        H = H4.transpose(0, 2, 1, 3).reshape(d * k, d * k) / n
        H[np.diag_indices_from(H)] += lam
        norm = float(np.linalg.norm(grad))
        start = norm if start == math.inf else start
        if norm == 0.0 or (norm < 1e-8 * start and norm > 0.5 * previous):
            return W, H
        previous = norm
        W = W - np.linalg.solve(H, grad).reshape(d, k)
    raise RuntimeError(f"digits: Newton's method did not converge (gradient norm {norm:.1e})")


def _jax_digits_inner(w: Any, h: Any, train: Any) -> Any:
    import jax
    import jax.numpy as jnp

    X, Y = train
    Z = X @ w
    ce = (jax.nn.logsumexp(Z, axis=1) - (Y * Z).sum(1)).mean()
    return ce + 0.5 * jnp.exp(h) * (w * w).sum()


def _jax_digits_outer(w: Any, val: Any) -> Any:
    import jax

    X, Y = val
    Z = X @ w
    return (jax.nn.logsumexp(Z, axis=1) - (Y * Z).sum(1)).mean()


# --------------------------------------------------------------------------- implementations


def bilevel_impl(
    problem: Small, linear_solver: Any, solver: Any = None, compiled: bool = False
) -> Callable[[], Tensor]:
    start = problem.w_star if solver is None else torch.zeros_like(problem.w_star)

    def run() -> Tensor:
        w = bilevel.implicit.argmin(
            problem.inner,
            start,
            problem.h,
            solver=solver,
            linear_solver=linear_solver,
            compiled=compiled,
        )
        return torch.autograd.grad(problem.outer(w), problem.h)[0]  # type: ignore[arg-type]

    return run


def small_impls(
    problem: Small, *, closed_form: bool, dense: bool, lbfgs: bool, compiled: bool = True
) -> list[Impl]:
    """The implementations of one small problem (``lbfgs``: also solve from zero;
    ``compiled``: also the rows that run ``torch.compile``)."""
    from bilevel import linalg, solvers

    impls = [Impl(CLOSED_FORM, closed_form_impl(problem))] if closed_form else []
    impls.append(
        Impl("bilevel auto", bilevel_impl(problem, None), note="default linear_solver: auto()")
    )
    if compiled and problem.unknowns <= COMPILED_MAX:
        run = bilevel_impl(problem, None, compiled=True)
        start = time.perf_counter()
        run()  # dynamo and inductor compile here, untimed
        seconds = time.perf_counter() - start
        impls.append(
            Impl(
                "bilevel compiled",
                run,
                note=f"compiled=True, auto (dense); compile {seconds:.1f} s (untimed)",
            )
        )
    impls.append(Impl("bilevel cg", bilevel_impl(problem, linalg.cg(tol=TOL))))
    if dense:
        impls.append(Impl("bilevel dense", bilevel_impl(problem, linalg.dense())))
    if lbfgs:
        # ridge (closed_form): the user's default backward, auto; digits: cg at JAXopt's
        # tolerance (the pair compares the two libraries at the same tolerances)
        backward = None if closed_form else linalg.cg(tol=TOL)
        said = "auto()" if closed_form else f"cg(tol={TOL:g})"
        solver = solvers.lbfgs(tol=SOLVE_TOL, maxiter=LBFGS_MAXITER, history_size=LBFGS_HISTORY)
        impls.append(
            Impl(
                "bilevel lbfgs",
                bilevel_impl(problem, backward, solver),
                note=f"lbfgs(tol={SOLVE_TOL:g}) from 0 + {said}",
            )
        )
    if compiled and lbfgs and closed_form:
        impls.append(lbfgs_compiled_impl(problem))
    if jaxopt_peer.peer().available:
        impls.extend(jaxopt_impls(problem, lbfgs))
    return impls


def lbfgs_compiled_impl(problem: Small) -> Impl:
    """``solvers.lbfgs(compiled=True)`` from 0 + the default backward (``auto``): the row of
    ``bilevel lbfgs`` with the solver's loop compiled (the first call compiles, untimed)."""
    from bilevel import solvers

    solver = solvers.lbfgs(
        tol=SOLVE_TOL, maxiter=LBFGS_MAXITER, history_size=LBFGS_HISTORY, compiled=True
    )
    run = bilevel_impl(problem, None, solver)
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    info = solver.last_info
    ran = "compiled" if info is not None and "compiled" in info.message else "NOT compiled"
    return Impl(
        "bilevel lbfgs compiled",
        run,
        note=f"lbfgs(compiled=True) from 0 + auto(); {ran}, "
        f"compile {seconds:.1f} s (untimed); {info.iterations if info else '?'} it.",
    )


def jaxopt_impls(problem: Small, lbfgs: bool) -> list[Impl]:
    """JAXopt's ``custom_root`` at ``w*`` and ``LBFGS(implicit_diff=True)`` from 0, jitted."""
    import jax.numpy as jnp

    n = problem.unknowns
    h = jaxopt_peer.to_jax(problem.h)
    given = jaxopt_peer.Jitted(
        jaxopt_peer.given_solution(problem.jax_inner, problem.jax_outer, TOL, n),
        h,
        jaxopt_peer.to_jax(problem.w_star),
        problem.jax_train,
        problem.jax_val,
    )
    impls = [Impl("jaxopt cg", given, note=f"custom_root + solve_cg; {given.note}")]
    if not lbfgs:
        return impls
    lbfgs_kw = {"solve_tol": SOLVE_TOL, "maxiter": LBFGS_MAXITER, "history_size": LBFGS_HISTORY}
    w0 = jnp.zeros(tuple(problem.w_star.shape))
    solved = jaxopt_peer.Jitted(
        jaxopt_peer.lbfgs_solution(problem.jax_inner, problem.jax_outer, TOL, n, **lbfgs_kw),
        h,
        w0,
        problem.jax_train,
        problem.jax_val,
    )
    iters, gnorm = jaxopt_peer.lbfgs_iterations(
        problem.jax_inner, w0, h, problem.jax_train, **lbfgs_kw
    )
    note = f"LBFGS(tol={SOLVE_TOL:g}) {iters} it., |grad| {gnorm:.0e}"
    impls.append(Impl("jaxopt LBFGS", solved, note=f"{note}; {solved.note}"))
    return impls


# --------------------------------------------------------------------------- tutorial step


class _ClosedFormRidge(torch.nn.Module):
    """The hand-written ridge layer: ``solve(X^T X + lambda I, X^T Y)`` under autograd."""

    def __init__(self, log_l2: Tensor) -> None:
        super().__init__()
        self.log_l2 = torch.nn.Parameter(log_l2.detach().clone())

    def forward(self, X: Tensor, Y: Tensor) -> Tensor:
        eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
        gram = X.transpose(-2, -1) @ X
        return torch.linalg.solve(gram + self.log_l2.exp() * eye, X.transpose(-2, -1) @ Y)


def tutorial_impls(seed: int) -> list[Impl]:
    """One training step of the tutorial's network, with bilevel's layer and the closed form."""
    from experiments import argmin_timeseries as T

    cfg = {o.name: o.default for o in T.OPTIONS}
    x, y = T.load_data(cfg, torch.Generator().manual_seed(seed))["train"]
    pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed + 1))
    x, y = x[pick[: cfg["batch_size"]]], y[pick[: cfg["batch_size"]]]
    ours = T.Forecaster(cfg, "argmin").double()
    T.init_weights(ours, torch.Generator().manual_seed(seed + 2))
    hand = T.Forecaster(cfg, "argmin").double()
    hand.load_state_dict(ours.state_dict())
    hand.ridge = _ClosedFormRidge(ours.ridge.log_l2)  # type: ignore[assignment]
    ours_cg = T.Forecaster({**cfg, "backward": "cg"}, "argmin").double()
    ours_cg.load_state_dict(ours.state_dict())

    def step_of(model: torch.nn.Module) -> Callable[[], Tensor]:
        opt = torch.optim.Adam(model.parameters(), lr=0.0)  # same cost, weights unchanged

        def step() -> Tensor:
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
            return torch.cat([p.grad.reshape(-1) for _, p in model.named_parameters()])  # type: ignore[union-attr]

        return step

    n_w = cfg["batch_size"] * (cfg["base"] - cfg["horizon"]) * cfg["horizon"]
    return [
        Impl(TUTORIAL_CLOSED, step_of(hand)),
        Impl(
            TUTORIAL_BILEVEL,
            step_of(ours),
            note=f"exact forward and backward (batched Cholesky); {n_w} unknowns per batch",
        ),
        Impl(
            TUTORIAL_BILEVEL_CG,
            step_of(ours_cg),
            note=f"--backward cg: cg(tol={cfg['cg_tol']:g}) on all {n_w} unknowns",
        ),
    ]


def run_tutorial(s: Settings, report: Report) -> list[dict[str, str]]:
    """Time the tutorial's training step; add its rows and target; return the table rows."""
    log(s, "[implicit] small: tutorial training step")
    results = s.measure(tutorial_impls(s.seed), TUTORIAL_CLOSED, TUTORIAL_RTOL)
    config = {"data": "tutorial step", "unknowns": "-"}
    rows = report.add_rows("implicit-small", config, results, TUTORIAL_CLOSED)
    floor = results[TUTORIAL_CLOSED].median
    cells = []
    for row in rows:
        ratio = row["median_s"] / floor if floor and row["median_s"] else None
        row["ratio_to_closed_form"] = ratio
        target = None
        if row["implementation"] == TUTORIAL_BILEVEL:
            target = TUTORIAL_TARGET
            report.target(
                "implicit-small",
                "tutorial training step: bilevel RidgeArgMin / closed-form layer",
                ratio,
                f"<= {TUTORIAL_TARGET:g}x",
                None if ratio is None else ratio <= TUTORIAL_TARGET,
            )
        from .report import standard_cells

        met = "" if target is None or ratio is None else ("ok" if ratio <= target else "MISS")
        cells.append(
            {
                **standard_cells(row),
                "data": "tutorial step",
                "unknowns": "-",
                "x closed form": core.fmt_ratio(ratio),
                "target": "" if target is None else f"<={target:g}",
                "met": met,
            }
        )
    return cells


# --------------------------------------------------------------------------- the run


def run_small(s: Settings, report: Report) -> str:
    """Measure the small problems, add their rows and targets; return their tables."""
    sizes = RIDGE_SIZES[:1] if s.quick else RIDGE_SIZES
    j = jaxopt_peer.peer()
    ridge_rows: list[dict[str, str]] = []
    if not s.compile:
        report.notes.append(
            "implicit-small: bilevel compiled, bilevel lbfgs compiled: left out (--no-compile)"
        )
    for n, p in sizes:
        problem = ridge(n, p, s.seed)
        log(s, f"[implicit] small: {problem.name}")
        impls = small_impls(problem, closed_form=True, dense=True, lbfgs=True, compiled=s.compile)
        results = s.measure(impls, problem.exact, RTOL)  # type: ignore[arg-type]
        config = {"data": problem.name, "unknowns": p}
        rows = report.add_rows("implicit-small", config, results, CLOSED_FORM)
        floor = results[CLOSED_FORM].median
        for row in rows:
            name = row["implementation"]
            ratio = row["median_s"] / floor if floor and row["median_s"] else None
            row["ratio_to_closed_form"] = ratio
            if name in TARGETS:
                met = None if ratio is None else ratio <= TARGETS[name]
                report.target(
                    "implicit-small",
                    f"{problem.name}: {name} / closed form",
                    ratio,
                    f"<= {TARGETS[name]:g}x",
                    met,
                )
            ridge_rows.append(_cells(problem, row, ratio, TARGETS.get(name)))
        if not j.available:
            ridge_rows.append(_missing(problem))
    ridge_rows.extend(run_tutorial(s, report))
    problem = digits(s.seed)
    log(s, f"[implicit] small: {problem.name}")
    results = s.measure(
        small_impls(problem, closed_form=False, dense=False, lbfgs=not s.quick), problem.exact, RTOL
    )  # type: ignore[arg-type]
    rows = report.add_rows(
        "implicit-small", {"data": problem.name, "unknowns": problem.unknowns}, results, "-"
    )
    by_name = {r["implementation"]: r for r in rows}
    digits_rows = []
    for row in rows:
        ratio = None
        for mine, theirs in PAIRS:
            if row["implementation"] == mine and theirs in by_name:
                other = by_name[theirs]["median_s"]
                ratio = row["median_s"] / other if other and row["median_s"] else None
                row["ratio_to_jaxopt"] = ratio
                report.target(
                    "implicit-small",
                    f"digits (640 unknowns): {mine} / {theirs}",
                    ratio,
                    "<= 1x",
                    None if ratio is None else ratio <= 1.0,
                )
        digits_rows.append(_cells(problem, row, ratio, None))
    if not j.available:
        digits_rows.append(_missing(problem))
    cols = ["data", "unknowns", "implementation", "median", "IQR", "n", "rel.err", "agree"]
    return "\n\n".join(
        [
            core.format_table(
                ridge_rows,
                [*cols, "x closed form", "target", "met", "note"],
                "== implicit, small problems: ridge regression, hypergradient w.r.t. log lambda, "
                "and the tutorial's training step (x closed form = time / autograd through "
                "torch.linalg.solve; float64) ==",
            ),
            core.format_table(
                digits_rows,
                [*cols, "bilevel/jaxopt", "note"],
                "== implicit, small problems: digits multinomial logistic regression "
                "(64 x 10 unknowns), bilevel / JAXopt at the same tolerances ==",
            ),
        ]
    )


def _cells(
    problem: Small, row: dict[str, Any], ratio: float | None, target: float | None
) -> dict[str, str]:
    from .report import standard_cells

    cells = standard_cells(row)
    met = "" if target is None or ratio is None else ("ok" if ratio <= target else "MISS")
    return {
        **cells,
        "data": problem.name,
        "unknowns": str(problem.unknowns),
        "x closed form": core.fmt_ratio(ratio),
        "bilevel/jaxopt": core.fmt_ratio(ratio),
        "target": "" if target is None else f"<={target:g}",
        "met": met,
    }


def _missing(problem: Small) -> dict[str, str]:
    return {
        "data": problem.name,
        "unknowns": str(problem.unknowns),
        **jaxopt_peer.missing_cells("jaxopt"),
    }
