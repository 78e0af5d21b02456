"""Bench problem ``implicit``: hypergradients of L2-regularised logistic regression.

Inner problem (``s = 2 y - 1``, ``lambda = exp(h)``)::

    w*(h) = argmin_w  mean_i softplus(-s_i x_i.w) + 1/2 sum_j lambda_j w_j^2

with one regularization weight (``h`` a 0-d tensor) or one per feature (``h`` of shape
``(p,)``); the outer loss is the validation logistic loss at ``w*``. Designs: scikit-learn's
breast cancer (standardized, dense) and a synthetic sparse design with ``p`` features: each
row has ``K_NNZ`` non-zeros at power-law distributed columns (fixed seed), stored as
``(cols, vals)`` index arrays, so that ``X w`` is a gather and ``X^T r`` a scatter-add.

The solution ``w*`` is computed once, outside the timed region, by Newton's method with exact
solves (SciPy, float64), so every implementation times the hypergradient alone. The exact
hypergradient comes from the closed-form Hessian ``X^T D X / n + diag(lambda)``: a dense
Cholesky solve, or the Woodbury identity (an ``n x n`` dense solve) when ``p`` is large.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import bilevel.implicit

from . import core, implicit_small, jaxopt_peer
from .children import run_child
from .core import Impl, peer
from .report import STANDARD_COLUMNS, Report, log, standard_cells
from .settings import Settings

K_NNZ = 20
N_TRAIN = 2000
N_VAL = 1000
LAMBDA = {"breast-cancer": 1e-2, "synthetic": 1e-3}
TOL = 1e-12  # relative residual of every linear solve that aims at the exact answer
FD_EPS = 1e-4
NEUMANN_TERMS = 100
DENSE_SLOW_S = 30.0  # time budget of the repeats of slow methods (dense, finite differences)


@dataclass
class Design:
    """A design matrix, dense (``X``) or row-sparse (``cols``, ``vals``: K non-zeros a row)."""

    p: int
    X: Tensor | None = None
    cols: Tensor | None = None
    vals: Tensor | None = None

    @property
    def n(self) -> int:
        return len(self.X) if self.X is not None else len(self.cols)  # type: ignore[arg-type]

    def mv(self, w: Tensor) -> Tensor:
        if self.X is not None:
            return self.X @ w
        assert self.cols is not None and self.vals is not None
        return (self.vals * w[self.cols]).sum(-1)

    def scipy(self) -> Any:
        """The design as a SciPy CSR matrix (float64) for the exact reference."""
        import scipy.sparse as sp

        if self.X is not None:
            return sp.csr_matrix(self.X.detach().cpu().double().numpy())
        assert self.cols is not None and self.vals is not None
        n, k = self.cols.shape
        rows = np.repeat(np.arange(n), k)
        return sp.csr_matrix(
            (
                self.vals.detach().cpu().double().numpy().ravel(),
                (rows, self.cols.cpu().numpy().ravel()),
            ),
            shape=(n, self.p),
        )

    def to(self, device: torch.device, dtype: torch.dtype) -> Design:
        def mv(t: Tensor | None, float_: bool) -> Tensor | None:
            if t is None:
                return None
            return t.to(device, dtype) if float_ else t.to(device)

        return Design(self.p, mv(self.X, True), mv(self.cols, False), mv(self.vals, True))


@dataclass
class Problem:
    """One configuration: data, hyperparameters and the precomputed solution."""

    name: str
    train: tuple[Design, Tensor]  # design, signs s = 2y - 1
    val: tuple[Design, Tensor]
    h: Tensor  # the hyperparameter leaf (0-d or (p,)), requires grad
    w_star: Tensor
    exact: Tensor  # the exact hypergradient
    newton_iterations: int = 0

    @property
    def p(self) -> int:
        return self.train[0].p


# --------------------------------------------------------------------------- data


def breast_cancer(seed: int) -> tuple[tuple[Design, Tensor], tuple[Design, Tensor]]:
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X), generator=g)
    X = torch.as_tensor(X, dtype=torch.float64)[perm]
    s = torch.as_tensor(2.0 * y - 1.0, dtype=torch.float64)[perm]
    half = len(X) // 2
    mean, std = X[:half].mean(0), X[:half].std(0)
    X = (X - mean) / std
    p = X.shape[1]
    return (Design(p, X=X[:half]), s[:half]), (Design(p, X=X[half:]), s[half:])


def synthetic(p: int, seed: int) -> tuple[tuple[Design, Tensor], tuple[Design, Tensor]]:
    """A sparse design with power-law column frequencies (like words in documents)."""
    g = torch.Generator().manual_seed(seed + p)
    n = N_TRAIN + N_VAL
    # column j is drawn with probability ~ j^(-1/2): a few frequent features, a long tail
    u = torch.rand(n, K_NNZ, generator=g, dtype=torch.float64)
    cols = (p * u**2).long().clamp_max(p - 1)
    vals = torch.randn(n, K_NNZ, generator=g, dtype=torch.float64)
    w_true = torch.randn(p, generator=g, dtype=torch.float64) * (
        torch.rand(p, generator=g, dtype=torch.float64) < 0.2
    )
    z = (vals * w_true[cols]).sum(-1)
    s = torch.where(z + 0.5 * torch.randn(n, generator=g, dtype=torch.float64) > 0, 1.0, -1.0)
    s = s.to(torch.float64)
    tr, va = slice(0, N_TRAIN), slice(N_TRAIN, n)
    return (Design(p, cols=cols[tr], vals=vals[tr]), s[tr]), (
        Design(p, cols=cols[va], vals=vals[va]),
        s[va],
    )


# --------------------------------------------------------------------------- losses


def inner_loss_fn(train: tuple[Design, Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    design, s = train

    def inner_loss(w: Tensor, h: Tensor) -> Tensor:
        return F.softplus(-s * design.mv(w)).mean() + 0.5 * (h.exp() * w * w).sum()

    return inner_loss


def outer_loss_fn(val: tuple[Design, Tensor]) -> Callable[[Tensor], Tensor]:
    design, s = val

    def outer_loss(w: Tensor) -> Tensor:
        return F.softplus(-s * design.mv(w)).mean()

    return outer_loss


# --------------------------------------------------------------------------- exact reference


class Exact:
    """Newton's method and hypergradients with the closed-form Hessian (NumPy/SciPy, float64)."""

    def __init__(self, train: tuple[Design, Tensor], val: tuple[Design, Tensor]) -> None:
        self.X = train[0].scipy()
        self.s = train[1].detach().cpu().double().numpy()
        self.Xv = val[0].scipy()
        self.sv = val[1].detach().cpu().double().numpy()
        self.n, self.p = self.X.shape

    @staticmethod
    def _sigmoid(z: np.ndarray) -> np.ndarray:
        return 0.5 * (1.0 + np.tanh(0.5 * z))

    def grad(self, w: np.ndarray, lam: np.ndarray) -> np.ndarray:
        z = self.s * (self.X @ w)
        return self.X.T @ (-self.s * self._sigmoid(-z)) / self.n + lam * w

    def solve(self, w: np.ndarray, lam: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``H(w)^-1 b`` for ``H = X^T D X / n + diag(lam)``, exactly."""
        import scipy.linalg as sl

        z = self.X @ w
        d = self._sigmoid(z) * self._sigmoid(-z) / self.n
        if self.p <= 2000:
            H = np.asarray((self.X.T @ self.X.multiply(d[:, None])).todense())
            H[np.diag_indices_from(H)] += lam
            return sl.cho_solve(sl.cho_factor(H), b)
        # Woodbury: (L + A^T A)^-1 = L^-1 - L^-1 A^T (I + A L^-1 A^T)^-1 A L^-1, A = sqrt(D) X
        import scipy.sparse as sp

        A = sp.diags(np.sqrt(d)) @ self.X
        Ab = A @ (b / lam)
        M = (A @ sp.diags(1.0 / lam) @ A.T).toarray()
        M[np.diag_indices_from(M)] += 1.0
        return b / lam - (A.T @ sl.cho_solve(sl.cho_factor(M), Ab)) / lam

    def newton(self, lam: np.ndarray, w0: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Newton's method to the rounding floor: it stops once the gradient norm no longer
        halves (quadratic convergence reaches that floor in a few steps)."""
        w = np.zeros(self.p) if w0 is None else w0.copy()
        previous = math.inf
        for it in range(50):
            g = self.grad(w, lam)
            norm = float(np.linalg.norm(g))
            if norm == 0.0 or norm > 0.5 * previous:
                return w, it
            previous = norm
            w = w - self.solve(w, lam, g)
        return w, 50

    def val_loss(self, w: np.ndarray) -> float:
        z = self.sv * (self.Xv @ w)
        return float(np.mean(np.logaddexp(0.0, -z)))

    def hypergrad(self, w: np.ndarray, h: np.ndarray) -> np.ndarray:
        lam = np.broadcast_to(np.exp(h), (self.p,))
        z = self.sv * (self.Xv @ w)
        gval = self.Xv.T @ (-self.sv * self._sigmoid(-z)) / len(self.sv)
        u = self.solve(w, lam, gval)
        # d(grad_w inner)/dh_j = lambda_j w_j e_j (per feature), lambda w (one weight)
        per_feature = -lam * w * u
        return per_feature if h.ndim else np.array(per_feature.sum())


def make_problem(
    name: str,
    data: tuple[tuple[Design, Tensor], tuple[Design, Tensor]],
    per_feature: bool,
    lam: float,
    device: torch.device,
) -> Problem:
    """Solve the inner problem and the exact hypergradient; move everything to ``device``."""
    train, val = data
    exact = Exact(train, val)
    p = train[0].p
    h = np.full(p, math.log(lam)) if per_feature else np.array(math.log(lam))
    w, iters = exact.newton(np.broadcast_to(np.exp(h), (p,)))
    g = exact.hypergrad(w, h)
    dtype = torch.float64
    return Problem(
        name=name,
        train=(train[0].to(device, dtype), train[1].to(device, dtype)),
        val=(val[0].to(device, dtype), val[1].to(device, dtype)),
        h=torch.tensor(h, dtype=dtype, device=device).requires_grad_(),
        w_star=torch.tensor(w, dtype=dtype, device=device),
        exact=torch.tensor(g, dtype=dtype),
        newton_iterations=iters,
    )


def finite_differences(problem: Problem, exact: Exact) -> Callable[[], Tensor]:
    """Central differences of the validation loss, re-solving the inner problem (Newton)."""
    h0 = problem.h.detach().cpu().double().numpy()
    w0 = problem.w_star.detach().cpu().double().numpy()
    p = problem.p

    def f(h: np.ndarray) -> float:
        w, _ = exact.newton(np.broadcast_to(np.exp(h), (p,)), w0)
        return exact.val_loss(w)

    def run() -> Tensor:
        if h0.ndim == 0:
            return torch.tensor((f(h0 + FD_EPS) - f(h0 - FD_EPS)) / (2 * FD_EPS))
        out = np.empty(p)
        for j in range(p):
            e = np.zeros(p)
            e[j] = FD_EPS
            out[j] = (f(h0 + e) - f(h0 - e)) / (2 * FD_EPS)
        return torch.tensor(out)

    return run


# --------------------------------------------------------------------------- implementations


def _hypergrad(problem: Problem, w: Tensor) -> Tensor:
    return torch.autograd.grad(outer_loss_fn(problem.val)(w), problem.h)[0]


def bilevel_impl(problem: Problem, linear_solver: Any) -> Callable[[], Tensor]:
    inner = inner_loss_fn(problem.train)

    def run() -> Tensor:
        w = bilevel.implicit.argmin(inner, problem.w_star, problem.h, linear_solver=linear_solver)
        return _hypergrad(problem, w)  # type: ignore[arg-type]

    return run


def _truncated_by_design(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """A row whose backward solve is truncated on purpose: its "did not converge" warning
    (which users must see) would only repeat the row's note, on every repeat."""

    def run() -> Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "argmin: the backward linear solve", RuntimeWarning)
            return fn()

    return run


def torchopt_impl(problem: Problem, solve: Any) -> Callable[[], Tensor]:
    """TorchOpt's ``custom_root`` around a solver that returns the precomputed solution."""
    import torchopt

    inner = inner_loss_fn(problem.train)

    def optimality(w: Tensor, h: Tensor) -> Tensor:
        return torch.func.grad(inner)(w, h)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def solver(w0: Tensor, h: Tensor) -> Tensor:
        return problem.w_star

    def run() -> Tensor:
        return _hypergrad(problem, solver(problem.w_star, problem.h))  # type: ignore[arg-type]

    return run


JAXOPT = "jaxopt cg"


def jaxopt_impls(problem: Problem, notes: list[str]) -> list[Impl]:
    """JAXopt's hypergradient at ``w*`` (jitted, x64, ``solve_cg`` at ``TOL``), compiled here;
    a note says why it is absent (missing, or JAX has no such device)."""
    j = jaxopt_peer.peer()
    if not j.available:
        notes.append(f"{JAXOPT}: missing ({j.note})")
        return []
    why = jaxopt_peer.device_mismatch(problem.w_star.device)
    if why is not None:
        notes.append(f"{JAXOPT} skipped: {why}")
        return []
    run = jaxopt_peer.logistic_given_solution(problem, TOL)
    return [Impl(JAXOPT, run, note=f"custom_root + solve_cg(tol={TOL:g}), jit; {run.note}")]


def tutorial_dense_impl(problem: Problem) -> Callable[[], Tensor]:
    """The course tutorial's backward: full Hessian and mixed derivatives by
    ``torch.autograd.functional``, then an SVD least-squares solve."""
    inner = inner_loss_fn(problem.train)
    outer = outer_loss_fn(problem.val)

    def run() -> Tensor:
        w, h = problem.w_star, problem.h.detach()
        H = torch.autograd.functional.hessian(lambda v: inner(v, h), w)
        mixed = torch.autograd.functional.jacobian(lambda hh: _grad_w(inner, w, hh), h)
        mixed = mixed.reshape(problem.p, -1)
        wv = w.detach().requires_grad_()
        gval = torch.autograd.grad(outer(wv), wv)[0]
        # dw/dh = -H^+ mixed (SVD least squares, as the tutorial); hypergradient gval^T dw/dh
        driver = "gelsd" if H.device.type == "cpu" else None
        dw_dh = torch.linalg.lstsq(H, -mixed, driver=driver).solution
        return (gval @ dw_dh).reshape(problem.h.shape)

    return run


def _grad_w(inner: Callable[[Tensor, Tensor], Tensor], w: Tensor, h: Tensor) -> Tensor:
    wv = w.detach().requires_grad_()
    with torch.enable_grad():
        return torch.autograd.grad(inner(wv, h), wv, create_graph=True)[0]


def dense_bytes(p: int, n_h: int, itemsize: int = 8) -> int:
    """Memory of the tutorial's method: the Hessian built row by row then stacked (2 p^2),
    the mixed derivatives (p n_h, twice), the SVD solve's copy of the matrix and solution."""
    return itemsize * (3 * p * p + 3 * p * n_h)


def lipschitz_bound(problem: Problem) -> float:
    """An upper bound of the Hessian's largest eigenvalue: ||X||_F^2 / (4 n) + max lambda."""
    design, _ = problem.train
    sq = design.X.pow(2).sum() if design.X is not None else design.vals.pow(2).sum()  # type: ignore[union-attr]
    return float(sq) / (4 * design.n) + float(problem.h.detach().exp().max())


SUBJECT = "bilevel cg"


def implicit_impls(
    problem: Problem, *, dense_max_bytes: float, fd: bool, exact: Exact
) -> tuple[list[Impl], list[str]]:
    """The implementations for one configuration and notes on what was skipped."""
    from bilevel import linalg

    notes: list[str] = []
    impls = [
        Impl(SUBJECT, bilevel_impl(problem, linalg.cg(tol=TOL))),
        Impl("bilevel minres", bilevel_impl(problem, linalg.minres(tol=TOL))),
        Impl("bilevel gmres", bilevel_impl(problem, linalg.gmres(tol=TOL, restart=50))),
    ]
    L = lipschitz_bound(problem)
    impls.append(
        Impl(
            "bilevel neumann",
            _truncated_by_design(
                bilevel_impl(problem, linalg.neumann(alpha=1.0 / L, maxiter=NEUMANN_TERMS, tol=TOL))
            ),
            check=False,
            max_seconds=DENSE_SLOW_S,
            note=f"{NEUMANN_TERMS} terms, alpha=1/L: truncated by design (its warning muted)",
        )
    )
    n_h = problem.h.numel()
    # bilevel's dense solver builds the matrix with one vmapped Hessian-vector product over
    # the p basis vectors: the batched intermediates (n K p) dominate its memory
    design = problem.train[0]
    nnz = design.n * (design.X.shape[1] if design.X is not None else K_NNZ)
    if 8 * (2 * problem.p**2 + nnz * problem.p) <= dense_max_bytes:
        impls.append(
            Impl("bilevel dense", bilevel_impl(problem, linalg.dense()), max_seconds=DENSE_SLOW_S)
        )
    t = peer("torchopt")
    if t.available:
        import torchopt

        impls.append(
            Impl(
                "torchopt cg",
                torchopt_impl(problem, torchopt.linear_solve.solve_cg(rtol=TOL)),
                note=f"solve_cg(rtol={TOL:g})",
            )
        )
        impls.append(
            Impl(
                "torchopt default",
                torchopt_impl(problem, None),
                check=False,
                note="solve_normal_cg(), rtol=1e-5",
            )
        )
    impls.extend(jaxopt_impls(problem, notes))
    need = dense_bytes(problem.p, n_h)
    if need <= dense_max_bytes:
        impls.append(
            Impl(
                "tutorial dense",
                tutorial_dense_impl(problem),
                max_seconds=DENSE_SLOW_S,
                note="hessian + jacobian + lstsq(gelsd)",
            )
        )
    else:
        notes.append(
            f"tutorial dense skipped: needs ~{need / 2**30:.1f} GiB (> --dense-max-gb "
            f"{dense_max_bytes / 2**30:g}); it grows like p^2 in memory and p^3 in time"
        )
    if fd and (n_h == 1 or n_h <= 100):
        impls.append(
            Impl(
                "finite differences",
                finite_differences(problem, exact),
                check=False,
                max_seconds=DENSE_SLOW_S,
                note=f"central, eps={FD_EPS:g}, {2 * n_h} Newton re-solves",
            )
        )
    elif fd:
        notes.append(f"finite differences skipped: {2 * n_h} inner re-solves")
    return impls, notes


def run_implicit(s: Settings, report: Report) -> None:
    configs: list[tuple[str, Any, float]] = [
        ("breast-cancer", lambda: breast_cancer(s.seed), LAMBDA["breast-cancer"])
    ]
    for p in s.features:
        configs.append(
            (f"synthetic p={p:g}", lambda p=p: synthetic(p, s.seed), LAMBDA["synthetic"])
        )
    table = []
    p_max = max(s.features) if s.features else 0
    for name, make_data, lam in configs:
        data = make_data()
        exact = Exact(*data)
        p = data[0][0].p
        for per_feature in (False, True):
            hname = "per feature" if per_feature else "one weight"
            log(s, f"[implicit] {name} {hname}")
            problem = make_problem(name, data, per_feature, lam, s.device)
            impls, notes = implicit_impls(
                problem, dense_max_bytes=s.dense_max_bytes, fd=True, exact=exact
            )
            results = s.measure(impls, problem.exact, 1e-9)
            targets: dict[str, tuple[float, str]] = {}
            if p >= 10_000 and "torchopt cg" in results:
                targets["torchopt cg"] = (0.8, "bilevel cg <= 0.8x torchopt cg (p >= 1e4)")
            if p == 10_000 and "tutorial dense" in results:
                targets["tutorial dense"] = (
                    1 / 40,
                    "bilevel cg >= 40x faster than dense (p = 1e4)",
                )
            extra: dict[str, dict[str, Any]] = {}
            if p == p_max and p >= 100_000:
                extra[SUBJECT] = _implicit_memory(s, problem, p, per_feature)
            config = {"data": name, "p": p, "h": hname}
            rows = report.add_rows(
                "implicit", config, results, SUBJECT, targets, extra, label=f"{name} {hname}"
            )
            for note in notes:
                report.notes.append(f"implicit {name} {hname}: {note}")
            sub = next(r for r in rows if r["implementation"] == SUBJECT)
            err = sub.get("rel_error")
            report.target(
                "implicit",
                f"{name} {hname}: bilevel cg rel. error",
                err,
                "<= 1e-9",
                None if err is None else err <= 1e-9,
            )
            if p == 10_000 and "tutorial dense" not in results:
                report.target(
                    "implicit",
                    f"{name} {hname}: bilevel cg >= 40x faster than dense",
                    None,
                    "dense skipped (--dense-max-gb)",
                    None,
                )
            for key in ("peak_rss_bytes", "cuda_peak_bytes"):
                if sub.get(key) is not None:
                    report.target(
                        "implicit",
                        f"{name} {hname}: bilevel cg {key.replace('_bytes', '')}",
                        sub[key] / 2**30,
                        "< 4 GiB",
                        sub[key] < 4 * 2**30,
                    )
            for row in rows:
                table.append(
                    {
                        "data": name,
                        "h": hname,
                        **standard_cells(row),
                        "peak RSS": core.fmt_bytes(
                            row.get("peak_rss_bytes") or row.get("cuda_peak_bytes")
                        ),
                    }
                )
            if not jaxopt_peer.peer().available:
                table.append(
                    {"data": name, "h": hname, **jaxopt_peer.missing_cells(JAXOPT), "peak RSS": "-"}
                )
    cols = ["data", "h", *STANDARD_COLUMNS[:-1], "peak RSS", "note"]
    main_table = core.format_table(
        table,
        cols,
        "== implicit: L2-regularised logistic regression, hypergradient w.r.t. log L2 weights given w* "
        "(rel.err vs the exact closed-form Hessian solve; linear solves at tol 1e-12) ==",
    )
    report.tables.append(main_table + "\n\n" + implicit_small.run_small(s, report))


def _implicit_memory(s: Settings, problem: Any, p: int, per_feature: bool) -> dict[str, Any]:
    if s.device.type == "cuda":
        from bilevel import linalg

        fn = bilevel_impl(problem, linalg.cg(tol=TOL))
        return {"cuda_peak_bytes": core.cuda_peak(fn, s.device)}
    if not s.rss:
        return {}
    log(s, f"[implicit]   fresh process: bilevel cg p={p:g}")
    return run_child(
        {
            "kind": "implicit",
            "p": p,
            "per_feature": per_feature,
            "seed": s.seed,
            "threads": s.threads,
        },
        s.threads,
    )


def child_fn(spec: dict[str, Any]) -> Callable[[], Any]:
    """In the fresh process: bilevel cg's hypergradient on the synthetic design of ``p``."""
    from bilevel import linalg

    data = synthetic(int(spec["p"]), int(spec["seed"]))
    problem = make_problem(
        "child", data, bool(spec["per_feature"]), LAMBDA["synthetic"], torch.device("cpu")
    )
    del data
    return bilevel_impl(problem, linalg.cg(tol=TOL))
