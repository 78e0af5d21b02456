"""lasso: learn lasso and elastic-net regularisation by implicit hypergradients.

For each data set (scikit-learn's diabetes and breast cancer, the label regressed on the
standardized features, and a synthetic sparse design with ``--features`` columns, 10 of
them informative; split 50 / 25 / 25 % into train / validation / test) the inner problem

    w*(h) = argmin_w  1/(2n) ||X w - y||^2 + l1 ||w||_1 + 1/2 sum_j l2_j w_j^2

is solved by FISTA (:func:`bilevel.solvers.proximal_gradient`, warm started) and
differentiated through the proximal fixed point with the support-restricted backward
(Bertrand et al. 2020): :func:`bilevel.proximal_argmin`. Adam on the log-weights
minimises the validation MSE:

* ``lasso``          one l1 weight (l2 = 0),
* ``enet``           l1 and one l2 weight,
* ``enet-feature``   l1 and one l2 weight per feature.

The baseline is the regularisation path of scikit-learn (``Lasso`` warm-started along a
log grid of ``grid_size`` weights from ``alpha_max``, the path ``LassoCV`` computes, scored
on the same validation split); the summary adds ``LassoCV`` itself with that single split.
celer / sparse-ho are timed too when installed. Plots: validation loss against wall time.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import torch
from torch import Tensor

import bilevel

from . import plot
from .data import split
from .options import Option, choice_list, positive_float, positive_int
from .run import Run

DESCRIPTION = (
    "learn lasso / elastic-net weights (one, one per feature) by implicit hypergradients "
    "through the proximal fixed point, vs scikit-learn's regularisation path"
)
DTYPE = "float64"
DATASETS = ("diabetes", "breast_cancer", "synthetic")
METHODS = ("lasso", "enet", "enet-feature")
LOG_RANGE = (math.log(1e-8), math.log(1e3))

OPTIONS = [
    Option("datasets", list(DATASETS), type=choice_list(DATASETS), help="data sets"),
    Option("methods", list(METHODS), type=choice_list(METHODS), help="what is learned"),
    Option("features", 1000, quick=200, type=positive_int, help="synthetic design's columns"),
    Option("samples", 200, quick=100, type=positive_int, help="synthetic design's rows"),
    Option("outer_steps", 40, quick=5, type=positive_int, help="Adam steps per method"),
    Option("outer_lr", 0.2, type=positive_float, help="Adam step size on the log-weights"),
    Option("grid_size", 30, quick=5, type=positive_int, help="weights on the sklearn path"),
    Option("tol", 1e-8, quick=1e-7, type=positive_float, help="FISTA gradient-mapping tol"),
]


def _load(name: str, cfg: dict[str, Any], gen: torch.Generator) -> tuple[Tensor, Tensor]:
    if name == "synthetic":
        n, p = cfg["samples"], cfg["features"]
        X = torch.randn(n, p, generator=gen, dtype=torch.float64)
        w = torch.zeros(p, dtype=torch.float64)
        idx = torch.randperm(p, generator=gen)[:10]
        w[idx] = torch.randn(10, generator=gen, dtype=torch.float64).sign() * (
            1 + torch.rand(10, generator=gen, dtype=torch.float64)
        )
        return X, X @ w + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    from sklearn import datasets

    bunch = {"diabetes": datasets.load_diabetes, "breast_cancer": datasets.load_breast_cancer}
    data = bunch[name]()
    return torch.as_tensor(data.data, dtype=torch.float64), torch.as_tensor(
        data.target, dtype=torch.float64
    )


class Problem:
    """Least squares on one standardized split; y centred with the training mean."""

    def __init__(self, run: Run, cfg: dict[str, Any], name: str) -> None:
        x, y = _load(name, cfg, run.rng("data", name))
        n = x.shape[0]
        s = split(x, y, n // 2, n // 4, run.rng("split", name))
        mean, scale = s.y_train.mean(), s.y_train.std().clamp_min(1e-12)
        z = lambda t: ((t - mean) / scale).to(run.device, run.dtype)  # noqa: E731
        dev = lambda t: t.to(run.device, run.dtype)  # noqa: E731
        self.train = (dev(s.x_train), z(s.y_train))
        self.val = (dev(s.x_val), z(s.y_val))
        self.test = (dev(s.x_test), z(s.y_test))
        self.p = s.num_features
        X, yt = self.train
        self.alpha_max = float((X.T @ yt).abs().max() / X.shape[0])
        self.run, self.cfg, self.name = run, cfg, name
        # FISTA's step from the exact Lipschitz constant of the smooth part
        lip = float(torch.linalg.matrix_norm(X, ord=2) ** 2 / X.shape[0])
        self.solver = bilevel.solvers.proximal_gradient(
            step_size=1 / lip, tol=cfg["tol"], maxiter=20000
        )

    @staticmethod
    def smooth(w: Tensor, h: Any, data: tuple[Tensor, Tensor]) -> Tensor:
        X, y = data
        return 0.5 * ((X @ w - y) ** 2).mean()

    def mse(self, w: Tensor, part: tuple[Tensor, Tensor]) -> float:
        return float(((part[0] @ w - part[1]) ** 2).mean())

    def zeros(self) -> Tensor:
        return torch.zeros(self.p, device=self.run.device, dtype=self.run.dtype)


def _grid_phase(run: Run, prob: Problem) -> dict[str, Any]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso

    n = prob.cfg["grid_size"]
    alphas = [prob.alpha_max * (1e-3 ** (i / max(n - 1, 1))) for i in range(n)]
    X, y = (t.cpu().double().numpy() for t in prob.train)

    def init() -> dict[str, Any]:
        return {"coef": prob.zeros(), "wall_s": 0.0, "best": None}

    def step(state: dict[str, Any], k: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        model = Lasso(
            alpha=alphas[k], fit_intercept=False, warm_start=True, tol=1e-6, max_iter=100000
        )
        model.coef_ = state["coef"].cpu().numpy().copy()
        with warnings.catch_warnings():
            # scikit-learn's gap test at small weights; the MSE it reaches is what is scored
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X, y)
        state["wall_s"] += time.perf_counter() - t0
        w = torch.as_tensor(model.coef_, dtype=prob.run.dtype, device=prob.run.device)
        state["coef"] = w
        val = prob.mse(w, prob.val)
        if state["best"] is None or val < state["best"]["val_loss"]:
            state["best"] = {
                "alpha": alphas[k],
                "val_loss": val,
                "test_loss": prob.mse(w, prob.test),
                "nnz": int((w != 0).sum()),
                "solves": k + 1,
                "wall_s": state["wall_s"],
            }
        return {
            "alpha": alphas[k],
            "val_loss": val,
            "best_val_loss": state["best"]["val_loss"],
            "nnz": int((w != 0).sum()),
            "solves": k + 1,
            "cum_wall_s": state["wall_s"],
        }

    def finish(state: dict[str, Any]) -> dict[str, Any]:
        return {
            "best": state["best"],
            "wall_s": state["wall_s"],
            "solves": n,
            "lasso_cv": _lasso_cv(prob, alphas),
        }

    return run.phase(f"{prob.name}/grid", n, init, step, finish)


def _lasso_cv(prob: Problem, alphas: list[float]) -> dict[str, Any]:
    """scikit-learn's LassoCV on the same train / validation split (one 'fold')."""
    import numpy as np
    from sklearn.linear_model import LassoCV

    X = torch.cat([prob.train[0], prob.val[0]]).cpu().numpy()
    y = torch.cat([prob.train[1], prob.val[1]]).cpu().numpy()
    n_tr = prob.train[0].shape[0]
    folds = [(np.arange(n_tr), np.arange(n_tr, X.shape[0]))]
    from sklearn.exceptions import ConvergenceWarning

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        cv = LassoCV(alphas=alphas, cv=folds, fit_intercept=False, tol=1e-6, max_iter=100000)
        cv.fit(X, y)
    wall = time.perf_counter() - t0
    # LassoCV refits on train + validation with its chosen weight: the test loss is of that fit
    w = torch.as_tensor(cv.coef_, dtype=prob.run.dtype, device=prob.run.device)
    return {"alpha": float(cv.alpha_), "wall_s": wall, "test_loss": prob.mse(w, prob.test)}


def _learn_phase(run: Run, prob: Problem, method: str) -> dict[str, Any]:
    cfg = prob.cfg
    l2_shape: tuple[int, ...] | None = {"lasso": None, "enet": (), "enet-feature": (prob.p,)}[
        method
    ]

    def init() -> dict[str, Any]:
        kw: dict[str, Any] = {"device": run.device, "dtype": run.dtype, "requires_grad": True}
        log_l1 = torch.tensor(math.log(prob.alpha_max / 10), **kw)
        leaves = [log_l1]
        state: dict[str, Any] = {"log_l1": log_l1, "w": prob.zeros(), "wall_s": 0.0, "best": None}
        if l2_shape is not None:
            state["log_l2"] = torch.full(l2_shape, math.log(0.1), **kw)
            leaves.append(state["log_l2"])
        state["outer"] = torch.optim.Adam(leaves, lr=cfg["outer_lr"])
        return state

    def step(state: dict[str, Any], k: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        state["outer"].zero_grad()
        l1 = state["log_l1"].exp()
        if l2_shape is None:
            prox, ph = bilevel.prox.lasso, l1
        else:
            prox, ph = bilevel.prox.elastic_net, {"l1": l1, "l2": state["log_l2"].exp()}
        w = bilevel.proximal_argmin(
            prob.smooth,
            state["w"],
            {},
            prob.train,
            prox=prox,
            prox_hparams=ph,
            solver=prob.solver,
            linear_solver=bilevel.linalg.gmres(tol=1e-10, maxiter=500),
        )
        val = ((prob.val[0] @ w - prob.val[1]) ** 2).mean()
        val.backward()
        state["outer"].step()
        with torch.no_grad():
            for key in ("log_l1", "log_l2"):
                if key in state:
                    state[key].clamp_(*LOG_RANGE)
        state["wall_s"] += time.perf_counter() - t0
        w = w.detach()
        state["w"] = w
        val_f = float(val.detach())
        if state["best"] is None or val_f < state["best"]["val_loss"]:
            state["best"] = {
                "val_loss": val_f,
                "test_loss": prob.mse(w, prob.test),
                "nnz": int((w != 0).sum()),
                "solves": k + 1,
                "wall_s": state["wall_s"],
                "l1": float(l1.detach()),
            }
        return {
            "outer_loss": val_f,
            "val_loss": val_f,
            "l1": float(l1.detach()),
            "nnz": int((w != 0).sum()),
            "solves": k + 1,
            "cum_wall_s": state["wall_s"],
        }

    def finish(state: dict[str, Any]) -> dict[str, Any]:
        return {"best": state["best"], "wall_s": state["wall_s"], "solves": cfg["outer_steps"]}

    return run.phase(f"{prob.name}/{method}", cfg["outer_steps"], init, step, finish)


def _celer_timing(prob: Problem, alphas: list[float]) -> float | None:
    """celer's Lasso path over the same grid, when celer is installed (else None)."""
    try:
        from celer import Lasso as CelerLasso  # type: ignore[import-not-found]
    except ImportError:
        return None
    X, y = (t.cpu().numpy() for t in prob.train)
    t0 = time.perf_counter()
    model = CelerLasso(alpha=alphas[0], fit_intercept=False, warm_start=True)
    for a in alphas:
        model.alpha = a
        model.fit(X, y)
    return time.perf_counter() - t0


def run(run: Run, cfg: dict[str, Any]) -> dict[str, Any]:
    run.plan(len(cfg["datasets"]) * (cfg["grid_size"] + cfg["outer_steps"] * len(cfg["methods"])))
    rows, results = [], {}
    for name in cfg["datasets"]:
        prob = Problem(run, cfg, name)
        grid = _grid_phase(run, prob)
        results[f"{name}/grid"] = grid
        gb = grid["best"]
        rows.append(
            {
                "data": name,
                "method": "sklearn path",
                "l1": gb["alpha"],
                "val_loss": gb["val_loss"],
                "test_loss": gb["test_loss"],
                "nnz": gb["nnz"],
                "solves": grid["solves"],
                "wall_to_best_s": gb["wall_s"],
                "wall_s": grid["wall_s"],
            }
        )
        cv = grid["lasso_cv"]
        rows.append(
            {
                "data": name,
                "method": "LassoCV (1 split)",
                "l1": cv["alpha"],
                "test_loss": cv["test_loss"],
                "wall_s": cv["wall_s"],
            }
        )
        n = cfg["grid_size"]
        celer = _celer_timing(
            prob, [prob.alpha_max * (1e-3 ** (i / max(n - 1, 1))) for i in range(n)]
        )
        if celer is not None:
            rows.append({"data": name, "method": "celer path", "wall_s": celer})
        for method in cfg["methods"]:
            res = _learn_phase(run, prob, method)
            results[f"{name}/{method}"] = res
            b = res["best"]
            reach = next(
                (
                    r
                    for r in run.read_metrics(f"{name}/{method}")
                    if r["val_loss"] <= gb["val_loss"]
                ),
                None,
            )
            rows.append(
                {
                    "data": name,
                    "method": method,
                    "l1": b["l1"],
                    "val_loss": b["val_loss"],
                    "test_loss": b["test_loss"],
                    "nnz": b["nnz"],
                    "solves": res["solves"],
                    "wall_to_best_s": b["wall_s"],
                    "wall_s": res["wall_s"],
                    "wall_to_path_best_s": reach["cum_wall_s"] if reach else None,
                }
            )
    _plot(run, cfg)
    return {
        "table": rows,
        "results": results,
        "plots": ["lasso.png"],
        "celer_installed": any(r["method"] == "celer path" for r in rows),
    }


def _plot(run: Run, cfg: dict[str, Any]) -> None:
    names = cfg["datasets"]
    fig, ax = plot.figure(len(names), 1, size=(4.4, 3.1))
    for i, name in enumerate(names):
        grid = run.read_metrics(f"{name}/grid")
        series = {
            "sklearn path (best so far)": (
                [r["cum_wall_s"] for r in grid],
                [r["best_val_loss"] for r in grid],
            )
        }
        for method in cfg["methods"]:
            rows = run.read_metrics(f"{name}/{method}")
            series[method] = ([r["cum_wall_s"] for r in rows], [r["val_loss"] for r in rows])
        plot.curves(
            ax[i], series, xlabel="wall time (s)", ylabel="validation MSE", title=name, logx=True
        )
    plot.save(fig, run.path("lasso.png"))
