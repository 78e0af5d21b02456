"""l2: learn L2 regularization weights of logistic regression by implicit hypergradients.

For each data set (scikit-learn's breast cancer, binary; digits, 10 classes; features
standardized, split 50 / 25 / 25 % into train / validation / test) the inner problem is

    w*(h) = argmin_w  mean cross-entropy(train; w) + 1/2 sum_j exp(h_j) ||w_j||^2

(``w_j``: the weights of input feature j; the bias gets a small fixed weight so the problem
is strictly convex), solved by Newton-CG (default; robust when some weights become tiny and
the data nearly separable, where L-BFGS stalls) or L-BFGS to a tight tolerance. ``bilevel.argmin``
gives the gradient of the validation cross-entropy of w*(h) w.r.t. h by the implicit function
theorem (one conjugate-gradient solve with Hessian-vector products), and Adam updates h:

* ``scalar``      one weight for every feature,
* ``per-feature`` one weight per input feature.

By default (``--warm-start on``) each backward solve starts from the previous outer step's
solution, and (``--preconditioner jacobi``) is preconditioned with a Hutchinson estimate of
the Hessian's diagonal (same tolerance, so the same hypergradients to it); what the
:class:`bilevel.WarmStart` remembers is saved with the checkpoint, so a resumed run is exact.
``hypergrad_s`` in the summary is the time of the backward passes alone; ``--torchopt on``
also computes every hypergradient with TorchOpt's implicit CG at the same solution, checks
that the two agree and reports the time ratio (:mod:`experiments.l2_torchopt`).

The baseline is a grid search over the single weight with the same inner solver (warm
started along the grid, as the learned runs are along their path).

Under ``torchrun --nproc_per_node=N -m experiments l2 ...`` the training set is split across
the N processes (data-parallel, :mod:`bilevel.distributed`): the inner solver, the Hessian-
vector products of the conjugate-gradient solve and the hypergradient all see the global
loss through all-reduces, so every process runs the same iterations as one process would. The summary compares the
best validation loss, the wall time and the number of inner solves it took, and the test
accuracy; the plot shows validation loss against wall time and against inner solves.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import bilevel
import bilevel.linalg
import bilevel.solvers
from bilevel import distributed

from . import plot
from .compare import TIE_RULE, versus
from .data import Split, load_sklearn, split
from .l2_torchopt import TorchOptHypergradient, agree_rtol
from .options import (
    Option,
    choice,
    choice_list,
    nonneg_int,
    positive_float,
    positive_int,
)
from .run import Run

DESCRIPTION = (
    "learn one L2 weight and one per feature of logistic regression (breast cancer, digits) "
    "by implicit hypergradients, vs grid search in validation loss against wall time"
)
DTYPE = "float64"
DATASETS = ("breast_cancer", "digits")
METHODS = ("scalar", "per-feature")
BIAS_L2 = 1e-4
LOG_L2_RANGE = (math.log(1e-6), math.log(1e3))  # the range of the grid search, and more
JACOBI_PROBES = 16
JACOBI_EVERY = 10

OPTIONS = [
    Option("datasets", list(DATASETS), type=choice_list(DATASETS), help="data sets"),
    Option("methods", list(METHODS), type=choice_list(METHODS), help="parametrizations learned"),
    Option("outer_steps", 60, quick=6, type=positive_int, help="outer Adam steps per method"),
    Option("outer_lr", 0.3, quick=0.5, type=positive_float, help="Adam step size on log-weights"),
    Option("init_l2", 1.0, type=positive_float, help="initial L2 weight(s)"),
    Option(
        "grid_size",
        15,
        quick=4,
        type=positive_int,
        help="log-spaced weights in [1e-6, 1e1] of the grid search",
    ),
    Option("solver", "newton-cg", type=choice(["newton-cg", "lbfgs"]), help="inner solver"),
    Option("tol", 1e-6, type=positive_float, help="inner solver gradient-norm tolerance"),
    Option("cg_tol", 1e-7, quick=1e-6, type=positive_float, help="CG relative tolerance"),
    Option(
        "warm_start",
        "on",
        type=choice(["off", "on"]),
        help="on: start each backward CG solve from the previous outer step's (bilevel.WarmStart, "
        "saved with the checkpoint)",
    ),
    Option(
        "preconditioner",
        "jacobi",
        type=choice(["none", "jacobi"]),
        help="CG preconditioner; jacobi: a Hutchinson estimate of the Hessian's diagonal "
        f"({JACOBI_PROBES} probes), re-estimated every {JACOBI_EVERY} solves with --warm-start on",
    ),
    Option(
        "torchopt",
        "off",
        type=choice(["off", "on"]),
        help="on: at every outer step also compute the hypergradient with TorchOpt's implicit "
        "CG (custom_root + solve_cg at --cg-tol, no warm start) at the same solution, check "
        "that it agrees, and report bilevel's hypergradient time over TorchOpt's",
    ),
    Option(
        "max_examples",
        0,
        quick=300,
        type=nonneg_int,
        help="use at most this many examples per data set (0: all)",
    ),
]


def _solver(cfg: dict[str, Any]) -> Any:
    if cfg["solver"] == "lbfgs":
        return bilevel.solvers.lbfgs(tol=cfg["tol"], maxiter=1000)
    return bilevel.solvers.newton_cg(tol=cfg["tol"], maxiter=100)


class Problem:
    """Regularized logistic regression on one data set (pure functions of explicit tensors)."""

    def __init__(self, run: Run, cfg: dict[str, Any], name: str) -> None:
        x, y = load_sklearn(name)
        gen = run.rng("split", name)
        if cfg["max_examples"] and cfg["max_examples"] < x.shape[0]:
            keep = torch.randperm(x.shape[0], generator=gen)[: cfg["max_examples"]]
            x, y = x[keep], y[keep]
        n = x.shape[0]
        data: Split = split(x, y, n // 2, n // 4, gen)
        self.data = data.to(run.device, run.dtype)
        self.binary = data.num_classes == 2
        self.p = data.num_features
        self.k = 1 if self.binary else data.num_classes
        self.run, self.cfg, self.name = run, cfg, name
        self.solver = _solver(cfg)
        pre = None
        if cfg["preconditioner"] == "jacobi":
            pre = bilevel.linalg.jacobi(probes=JACOBI_PROBES, every=JACOBI_EVERY)
        self.linear_solver = bilevel.linalg.cg(tol=cfg["cg_tol"], maxiter=1000, preconditioner=pre)
        # this process's block of the training set (all of it in one process)
        self.train = (distributed.shard(self.data.x_train), distributed.shard(self.data.y_train))
        weight = self.train[0].shape[0] / self.data.x_train.shape[0]
        self.train_loss = distributed.data_parallel_loss(self.local_loss, weight, self.reg)
        self.torchopt: TorchOptHypergradient | None = None
        if cfg["torchopt"] == "on":
            if distributed.is_distributed():
                raise ValueError(
                    "l2 --torchopt on runs in one process (TorchOpt's solve sees no all-reduce); "
                    "run it without torchrun"
                )
            self.torchopt = TorchOptHypergradient(
                self.inner_loss,
                self.data_loss,
                self.train,
                (self.data.x_val, self.data.y_val),
                cfg["cg_tol"],
                maxiter=1000,
            )

    def zeros(self) -> dict[str, Tensor]:
        kw: dict[str, Any] = {"device": self.run.device, "dtype": self.run.dtype}
        return {"w": torch.zeros(self.p, self.k, **kw), "b": torch.zeros(self.k, **kw)}

    def data_loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = x @ params["w"] + params["b"]
        if self.binary:
            return F.binary_cross_entropy_with_logits(logits[:, 0], y.to(logits.dtype))
        return F.cross_entropy(logits, y)

    def reg(self, params: dict[str, Tensor], hparams: dict[str, Tensor]) -> Tensor:
        l2 = hparams["l2"]
        per_feature = l2[:, None] if l2.ndim else l2
        return (
            0.5 * (per_feature * params["w"] ** 2).sum() + 0.5 * BIAS_L2 * (params["b"] ** 2).sum()
        )

    def local_loss(
        self, params: dict[str, Tensor], hparams: dict[str, Tensor], batch: Any
    ) -> Tensor:
        return self.data_loss(params, *batch)

    def inner_loss(
        self, params: dict[str, Tensor], hparams: dict[str, Tensor], batch: Any
    ) -> Tensor:
        x, y = batch
        return self.data_loss(params, x, y) + self.reg(params, hparams)

    def solve(self, l2: Tensor, init: dict[str, Tensor]) -> tuple[dict[str, Tensor], Any]:
        """The inner solution for a fixed (detached) weight, without hypergradient."""
        hp = {"l2": l2.detach()}
        return self.solver(lambda w: self.train_loss(w, hp, self.train), init)

    def metrics(self, params: dict[str, Tensor]) -> dict[str, float]:
        with torch.no_grad():
            out = {}
            for part, x, y in (
                ("val", self.data.x_val, self.data.y_val),
                ("test", self.data.x_test, self.data.y_test),
            ):
                out[f"{part}_loss"] = float(self.data_loss(params, x, y))
                logits = x @ params["w"] + params["b"]
                pred = (logits[:, 0] > 0).long() if self.binary else logits.argmax(1)
                out[f"{part}_acc"] = float((pred == y).double().mean())
            return out


def _l2_text(l2: float | list[float]) -> float | str:
    """One weight as a number, several as their range."""
    return l2 if isinstance(l2, float) else f"{min(l2):.2g}..{max(l2):.2g}"


def _grid_phase(run: Run, prob: Problem, cfg: dict[str, Any]) -> dict[str, Any]:
    n = cfg["grid_size"]
    # from strong to weak regularization, warm-starting each solve at the previous solution
    weights = [10.0 * (1e-7 ** (i / (n - 1))) if n > 1 else cfg["init_l2"] for i in range(n)]

    def init() -> dict[str, Any]:
        return {"w": prob.zeros(), "wall_s": 0.0, "best": None}

    def step(state: dict[str, Any], k: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        sol, info = prob.solve(run.tensor(weights[k]), state["w"])
        m = prob.metrics(sol)
        state["wall_s"] += time.perf_counter() - t0
        state["w"] = sol
        if state["best"] is None or m["val_loss"] < state["best"]["val_loss"]:
            state["best"] = {"l2": weights[k], **m, "solves": k + 1, "wall_s": state["wall_s"]}
        return {
            "l2": weights[k],
            "val_loss": m["val_loss"],
            "best_val_loss": state["best"]["val_loss"],
            "test_acc": m["test_acc"],
            "solves": k + 1,
            "cum_wall_s": state["wall_s"],
            "inner_iters": info.iterations,
        }

    def finish(state: dict[str, Any]) -> dict[str, Any]:
        return {"best": state["best"], "wall_s": state["wall_s"], "solves": n}

    return run.phase(f"{prob.name}/grid", n, init, step, finish)


def _learn_phase(run: Run, prob: Problem, cfg: dict[str, Any], method: str) -> dict[str, Any]:
    shape = () if method == "scalar" else (prob.p,)

    def init() -> dict[str, Any]:
        log_l2 = torch.full(
            shape, math.log(cfg["init_l2"]), device=run.device, dtype=run.dtype, requires_grad=True
        )
        return {
            "log_l2": log_l2,
            "outer": torch.optim.Adam([log_l2], lr=cfg["outer_lr"]),
            "w": prob.zeros(),
            "wall_s": 0.0,
            "hypergrad_s": 0.0,
            "best": None,
            # the WarmStart object itself is not checkpointed (leading _); what it remembers
            # is, as tensors (its state_dict, below), so a resumed run solves bit for bit alike
            "_warm": bilevel.WarmStart() if cfg["warm_start"] == "on" else None,
            "warm": {},
            "torchopt_hypergrad_s": 0.0,
            "torchopt_max_rel_diff": 0.0,
        }

    def step(state: dict[str, Any], k: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        log_l2: Tensor = state["log_l2"]
        ws = state.get("_warm")
        if ws is not None and state["warm"] and not ws.solutions and not ws.preconditioners:
            ws.load_state_dict(state["warm"])  # resumed from a checkpoint
        state["outer"].zero_grad()
        w_star = distributed.data_parallel_argmin(
            prob.local_loss,
            state["w"],
            {"l2": log_l2.exp()},
            prob.train,
            reduction="mean",
            regularizer=prob.reg,
            solver=prob.solver,
            linear_solver=prob.linear_solver,
            warm_start=ws,
        )
        t_backward = time.perf_counter()
        val_loss = prob.data_loss(w_star, prob.data.x_val, prob.data.y_val)
        val_loss.backward()
        state["hypergrad_s"] += time.perf_counter() - t_backward
        if ws is not None:
            state["warm"] = ws.state_dict()
        peer_metrics = {}
        if prob.torchopt is not None:
            peer_metrics = _versus_torchopt(prob, state, w_star, log_l2)
        l2_solved = log_l2.detach().exp().cpu().tolist()  # the weights w_star was solved for
        state["outer"].step()
        with torch.no_grad():
            log_l2.clamp_(*LOG_L2_RANGE)
        state["wall_s"] += time.perf_counter() - t0
        state["w"] = {k_: v.detach() for k_, v in w_star.items()}
        m = prob.metrics(state["w"])  # the solution for the weights before this Adam step
        if state["best"] is None or m["val_loss"] < state["best"]["val_loss"]:
            state["best"] = {
                **m,
                "l2": _l2_text(l2_solved),
                "solves": k + 1,
                "wall_s": state["wall_s"],
            }
        l2 = log_l2.detach().exp()
        return {
            "outer_loss": m["val_loss"],
            "val_loss": m["val_loss"],
            "test_acc": m["test_acc"],
            "l2": float(l2.mean()),
            "l2_min": float(l2.min()),
            "l2_max": float(l2.max()),
            "hypergrad_norm": float(log_l2.grad.norm()) if log_l2.grad is not None else 0.0,
            "solves": k + 1,
            "cum_wall_s": state["wall_s"],
            "cum_hypergrad_s": state["hypergrad_s"],
            **peer_metrics,
        }

    def finish(state: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        l2 = state["log_l2"].detach().exp()
        sol, _ = prob.solve(l2, state["w"])
        wall_s = state["wall_s"] + time.perf_counter() - t0
        final = prob.metrics(sol)
        best = state["best"]
        if best is None or final["val_loss"] < best["val_loss"]:  # the last solve counts too
            solves = cfg["outer_steps"] + 1
            best = {**final, "l2": _l2_text(l2.cpu().tolist()), "solves": solves, "wall_s": wall_s}
        out = {
            "final": final,
            "best": best,
            "wall_s": wall_s,
            "hypergrad_s": state["hypergrad_s"],
            "solves": cfg["outer_steps"] + 1,
            "l2": state["log_l2"].detach().exp().cpu().tolist(),
        }
        if prob.torchopt is not None:
            out["torchopt"] = {
                "hypergrad_s": state["torchopt_hypergrad_s"],
                "hypergrad_vs_torchopt": state["hypergrad_s"] / state["torchopt_hypergrad_s"],
                "max_rel_diff": state["torchopt_max_rel_diff"],
                "agree_rtol": agree_rtol(cfg["cg_tol"]),
                "agree": state["torchopt_max_rel_diff"] <= agree_rtol(cfg["cg_tol"]),
            }
        return out

    return run.phase(f"{prob.name}/{method}", cfg["outer_steps"], init, step, finish)


def _versus_torchopt(
    prob: Problem, state: dict[str, Any], w_star: dict[str, Tensor], log_l2: Tensor
) -> dict[str, Any]:
    """TorchOpt's hypergradient at this step's solution: timed, and checked against ours."""
    assert prob.torchopt is not None and log_l2.grad is not None
    ours = log_l2.grad.detach()
    theirs, seconds = prob.torchopt({k: v.detach() for k, v in w_star.items()}, log_l2)
    rel = float((ours - theirs).norm() / theirs.norm().clamp_min(1e-300))
    state["torchopt_hypergrad_s"] += seconds
    state["torchopt_max_rel_diff"] = max(state["torchopt_max_rel_diff"], rel)
    limit = agree_rtol(prob.cfg["cg_tol"])
    if not rel <= limit:
        warnings.warn(
            f"l2 {prob.name}: bilevel's and TorchOpt's hypergradients differ by {rel:.2e} "
            f"(relative; allowed {limit:.1e} at --cg-tol {prob.cfg['cg_tol']:g}): the time "
            "ratio compares solves of different accuracy; tighten --cg-tol",
            RuntimeWarning,
            stacklevel=2,
        )
    return {"torchopt_rel_diff": rel, "cum_torchopt_hypergrad_s": state["torchopt_hypergrad_s"]}


def run(run: Run, cfg: dict[str, Any]) -> dict[str, Any]:
    run.plan(len(cfg["datasets"]) * (cfg["grid_size"] + cfg["outer_steps"] * len(cfg["methods"])))
    rows, results = [], {}
    for name in cfg["datasets"]:
        prob = Problem(run, cfg, name)
        grid = _grid_phase(run, prob, cfg)
        results[f"{name}/grid"] = grid
        gb = grid["best"]
        rows.append(
            {
                "data": name,
                "method": "grid search",
                "l2": gb["l2"],
                "val_loss": gb["val_loss"],
                "test_acc": gb["test_acc"],
                "solves_to_best": gb["solves"],
                "wall_to_best_s": gb["wall_s"],
                "solves": grid["solves"],
                "wall_s": grid["wall_s"],
                "solves_to_grid_best": gb["solves"],
            }
        )
        for method in cfg["methods"]:
            res = _learn_phase(run, prob, cfg, method)
            results[f"{name}/{method}"] = res
            # when did the learned path first reach the grid's best validation loss?
            reach = next(
                (
                    r
                    for r in run.read_metrics(f"{name}/{method}")
                    if r["val_loss"] <= gb["val_loss"]
                ),
                None,
            )
            best = res["best"]
            rows.append(
                {
                    "data": name,
                    "method": method,
                    "l2": best["l2"],
                    "val_loss": best["val_loss"],
                    "test_acc": best["test_acc"],
                    "solves_to_best": best["solves"],
                    "wall_to_best_s": best["wall_s"],
                    "solves": res["solves"],
                    "wall_s": res["wall_s"],
                    "hypergrad_s": res["hypergrad_s"],
                    **(
                        {
                            "torchopt_hypergrad_s": res["torchopt"]["hypergrad_s"],
                            "hypergrad_vs_torchopt": res["torchopt"]["hypergrad_vs_torchopt"],
                            "torchopt_agree": res["torchopt"]["agree"],
                        }
                        if "torchopt" in res
                        else {}
                    ),
                    "solves_to_grid_best": (
                        reach["solves"]
                        if reach
                        else best["solves"]
                        if best["val_loss"] <= gb["val_loss"]
                        else "not reached"
                    ),
                    "final_val_loss": res["final"]["val_loss"],
                }
            )
    summary: dict[str, Any] = {"table": rows, "results": results}
    versus_grid = {
        name: {
            m: versus(
                results[f"{name}/{m}"]["best"]["val_loss"],
                results[f"{name}/grid"]["best"]["val_loss"],
            )
            for m in cfg["methods"]
        }
        for name in cfg["datasets"]
    }
    summary["versus_grid"] = versus_grid
    summary["beats_grid"] = {
        name: {m: v == "better" for m, v in per.items()} for name, per in versus_grid.items()
    }
    summary["tie_rule"] = TIE_RULE
    _plot(run, cfg)
    summary["plots"] = ["l2.png"]
    return summary


def _plot(run: Run, cfg: dict[str, Any]) -> None:
    names = cfg["datasets"]
    fig, ax = plot.figure(len(names), 2, size=(4.4, 3.1))
    for i, name in enumerate(names):
        by_time, by_solves = {}, {}
        grid = run.read_metrics(f"{name}/grid")
        by_time["grid (best so far)"] = (
            [r["cum_wall_s"] for r in grid],
            [r["best_val_loss"] for r in grid],
        )
        by_solves["grid (best so far)"] = (
            [r["solves"] for r in grid],
            [r["best_val_loss"] for r in grid],
        )
        for method in cfg["methods"]:
            rows = run.read_metrics(f"{name}/{method}")
            by_time[method] = ([r["cum_wall_s"] for r in rows], [r["val_loss"] for r in rows])
            by_solves[method] = ([r["solves"] for r in rows], [r["val_loss"] for r in rows])
        plot.curves(
            ax[i], by_time, xlabel="wall time (s)", ylabel="validation loss", title=name, logy=True
        )
        plot.curves(
            ax[len(names) + i],
            by_solves,
            xlabel="inner solves",
            ylabel="validation loss",
            title=name,
            logy=True,
        )
    plot.save(fig, run.path("l2.png"))
