"""learn-lr: learn SGD's learning rate and momentum by unrolled hypergradients.

An MLP (64-H-10, tanh) is trained on scikit-learn's digits (standardized; train / validation /
test split) by T steps of SGD with momentum from a fresh random initialization. The outer
loss is the validation cross-entropy after those T steps; its gradient w.r.t. the learning
rate and momentum comes from ``bilevel.unroll``, and Adam updates log(lr) and logit(momentum).
Three parametrizations of the learning rate are learned:

* ``scalar``    one learning rate (with every unroll mode in ``--modes``),
* ``per-layer`` one learning rate per parameter tensor (reverse mode),
* ``per-step``  a schedule of T learning rates (reverse mode).

Every outer step draws a new initialization and new minibatches, so the learned setting is
meant to generalize to fresh runs. Each result (and every grid point of the baseline, a grid
search over fixed learning rates and momenta at the same T inner steps) is evaluated by
training from ``--eval-runs`` fresh initializations, the same ones for every method.
The summary compares validation / test loss and accuracy and the time per hypergradient.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import bilevel

from . import plot
from .compare import TIE_RULE, versus
from .data import Split, load_sklearn, split
from .options import (
    Option,
    choice_list,
    nonneg_int,
    positive_float,
    positive_int,
    unit_float,
)
from .run import Run, UsageError

DESCRIPTION = (
    "flagship: learn a scalar / per-layer / per-step SGD learning rate and momentum for an "
    "MLP on digits by unrolled hypergradients, every unroll mode, vs grid search"
)
DTYPE = "float32"
MODES = ("reverse", "truncated", "checkpoint", "forward", "first_order")
METHODS = ("scalar", "per-layer", "per-step")
LOG_LR_RANGE = (math.log(1e-5), math.log(10.0))


def _float_list(text: str) -> list[float]:
    return [unit_float(t.strip()) for t in text.split(",") if t.strip()] or [unit_float(text)]


OPTIONS = [
    Option("hidden", 64, quick=16, type=positive_int, help="hidden units of the MLP 64-H-10"),
    Option("inner_steps", 100, quick=10, type=positive_int, help="SGD steps T per inner run"),
    Option("batch_size", 64, quick=32, type=positive_int, help="minibatch size of the inner SGD"),
    Option("outer_steps", 60, quick=6, type=positive_int, help="outer Adam steps per method"),
    Option(
        "outer_lr",
        0.1,
        quick=0.3,
        type=positive_float,
        help="outer Adam step size on log(lr) and logit(momentum)",
    ),
    Option("init_lr", 0.01, type=positive_float, help="initial learning rate"),
    Option("init_momentum", 0.5, type=unit_float, help="initial momentum"),
    Option("methods", list(METHODS), type=choice_list(METHODS), help="parametrizations learned"),
    Option(
        "modes",
        list(MODES),
        type=choice_list(MODES),
        help="unroll modes compared on the scalar learning rate (the others use reverse)",
    ),
    Option("truncate", 20, quick=3, type=positive_int, help="K of the truncated mode"),
    Option(
        "grid_lrs",
        12,
        quick=3,
        type=positive_int,
        help="log-spaced fixed learning rates in [1e-3, 10] searched by the baseline",
    ),
    Option(
        "grid_momenta",
        [0.0, 0.5, 0.9],
        quick=[0.5, 0.9],
        type=_float_list,
        help="momenta searched by the baseline",
    ),
    Option(
        "eval_runs",
        3,
        quick=2,
        type=positive_int,
        help="fresh initializations averaged when evaluating a setting",
    ),
    Option("n_train", 1000, quick=400, type=positive_int, help="training examples"),
    Option("n_val", 400, quick=200, type=positive_int, help="validation examples"),
    Option(
        "checkpoint_segments",
        0,
        type=nonneg_int,
        help="segments of the checkpoint mode (0: ceil(sqrt(T)))",
    ),
]


def validate(cfg: dict[str, Any]) -> None:
    if cfg["truncate"] > cfg["inner_steps"]:
        raise UsageError(f"--truncate {cfg['truncate']} exceeds --inner-steps {cfg['inner_steps']}")
    if cfg["checkpoint_segments"] > cfg["inner_steps"]:
        raise UsageError("--checkpoint-segments exceeds --inner-steps")
    if cfg["n_train"] + cfg["n_val"] >= 1797:
        raise UsageError("--n-train + --n-val must be below the 1797 digits")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Problem:
    """The data, the MLP and the inner / outer losses (pure functions of explicit tensors)."""

    def __init__(self, run: Run, cfg: dict[str, Any]) -> None:
        x, y = load_sklearn("digits")
        data: Split = split(x, y, cfg["n_train"], cfg["n_val"], run.rng("split"))
        self.data = data.to(run.device, run.dtype)
        self.model = nn.Sequential(
            nn.Linear(data.num_features, cfg["hidden"]),
            nn.Tanh(),
            nn.Linear(cfg["hidden"], data.num_classes),
        ).to(device=run.device, dtype=run.dtype)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.run, self.cfg = run, cfg
        self.steps = cfg["inner_steps"]
        self.optimizer = bilevel.optim.sgd()  # lr and momentum are read from hparams

    def init_params(self, gen: torch.Generator) -> dict[str, Tensor]:
        """PyTorch's default Linear initialization, drawn from ``gen``."""
        params = {}
        for name, p in self.model.named_parameters():
            layer = self.model.get_submodule(name.split(".")[0])
            assert isinstance(layer, nn.Linear)
            bound = 1.0 / math.sqrt(layer.in_features)
            u = torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1
            params[name] = (u * bound).to(device=self.run.device, dtype=self.run.dtype)
        return params

    def batches(self, gen: torch.Generator) -> list[tuple[Tensor, Tensor]]:
        idx = torch.randint(
            self.data.x_train.shape[0], (self.steps, self.cfg["batch_size"]), generator=gen
        )
        idx = idx.to(self.run.device)
        return [(self.data.x_train[i], self.data.y_train[i]) for i in idx]

    def logits(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.model, params, (x,))

    def inner_loss(
        self, params: dict[str, Tensor], hparams: Any, batch: tuple[Tensor, Tensor]
    ) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.logits(params, x), y)

    def train(self, hparams: dict[str, Any], gen: torch.Generator, mode: str, **kw: Any) -> Any:
        return bilevel.unroll(
            self.inner_loss,
            self.init_params(gen),
            hparams,
            self.optimizer,
            self.steps,
            data=self.batches(gen),
            mode=mode,
            **kw,
        )

    def evaluate(self, lr: Any, momentum: Any) -> dict[str, Any]:
        """Mean validation / test loss and accuracy over the fixed evaluation runs."""
        hp = {"lr": _detach(lr), "momentum": _detach(momentum)}
        sums = {"val_loss": 0.0, "val_acc": 0.0, "test_loss": 0.0, "test_acc": 0.0}
        n = self.cfg["eval_runs"]
        for e in range(n):
            try:
                with torch.no_grad():  # an evaluation: no hypergradient wanted
                    result = self.train(hp, self.run.rng("eval", e), mode="first_order")
            except bilevel.NonFiniteLossError:
                return {
                    "val_loss": None,
                    "val_acc": None,
                    "test_loss": None,
                    "test_acc": None,
                    "diverged": True,
                }
            with torch.no_grad():
                for part, x, y in (
                    ("val", self.data.x_val, self.data.y_val),
                    ("test", self.data.x_test, self.data.y_test),
                ):
                    out = self.logits(result.params, x)
                    loss = float(F.cross_entropy(out, y))
                    if not math.isfinite(loss):
                        return {
                            "val_loss": None,
                            "val_acc": None,
                            "test_loss": None,
                            "test_acc": None,
                            "diverged": True,
                        }
                    sums[f"{part}_loss"] += loss / n
                    sums[f"{part}_acc"] += float((out.argmax(1) == y).double().mean()) / n
        return {**sums, "diverged": False}


def _detach(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class Learner:
    """One parametrization of (lr, momentum) with its leaves and the outer optimizer."""

    def __init__(self, problem: Problem, method: str, mode: str) -> None:
        self.p, self.method, self.mode = problem, method, mode
        self.cfg = problem.cfg

    def init(self) -> dict[str, Any]:
        run, cfg = self.p.run, self.cfg
        shape = {"scalar": (), "per-layer": (len(self.p.names),), "per-step": (self.p.steps,)}[
            self.method
        ]
        log_lr = torch.full(
            shape, math.log(cfg["init_lr"]), device=run.device, dtype=run.dtype, requires_grad=True
        )
        mom = torch.tensor(
            _logit(cfg["init_momentum"]), device=run.device, dtype=run.dtype, requires_grad=True
        )
        outer = torch.optim.Adam([log_lr, mom], lr=cfg["outer_lr"])
        return {"log_lr": log_lr, "mom": mom, "outer": outer, "time": 0.0, "times": []}

    def hparams(self, state: dict[str, Any]) -> dict[str, Any]:
        lr = state["log_lr"].exp()
        if self.method == "per-layer":
            lr = {name: lr[i] for i, name in enumerate(self.p.names)}
        elif self.method == "per-step":  # explicit: T may equal a bias's length (--quick: 10)
            lr = bilevel.optim.schedule(lr)
        return {"lr": lr, "momentum": torch.sigmoid(state["mom"])}

    def step(self, state: dict[str, Any], k: int, phase: str) -> dict[str, Any]:
        p, run = self.p, self.p.run
        gen = run.rng(phase, k)
        kw: dict[str, Any] = {}
        if self.mode == "truncated":
            kw["truncate"] = self.cfg["truncate"]
        if self.mode == "checkpoint" and self.cfg["checkpoint_segments"]:
            kw["segments"] = self.cfg["checkpoint_segments"]
        outer: torch.optim.Optimizer = state["outer"]
        outer.zero_grad()
        _sync(run.device)
        t0 = time.perf_counter()
        try:
            result = p.train(self.hparams(state), gen, self.mode, **kw)
            val_loss = F.cross_entropy(p.logits(result.params, p.data.x_val), p.data.y_val)
            val_loss.backward()
        except bilevel.NonFiniteLossError:
            outer.zero_grad()
            return {"outer_loss": None, "skipped": 1, **self._values(state)}
        _sync(run.device)
        elapsed = time.perf_counter() - t0
        grads = [t.grad for t in (state["log_lr"], state["mom"])]
        finite = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        outer_loss = float(val_loss.detach())
        if finite and math.isfinite(outer_loss):
            outer.step()
            with torch.no_grad():
                state["log_lr"].clamp_(*LOG_LR_RANGE)
        state["time"] += elapsed
        state["times"].append(elapsed)
        return {
            "outer_loss": outer_loss,
            "inner_loss": float(result.losses[-1]),
            "hypergrad_s": elapsed,
            "skipped": int(not finite),
            **self._values(state),
        }

    def _values(self, state: dict[str, Any]) -> dict[str, Any]:
        lr = state["log_lr"].detach().exp()
        return {
            "lr": float(lr.mean()) if lr.ndim else float(lr),
            "momentum": float(torch.sigmoid(state["mom"].detach())),
        }

    def finish(self, state: dict[str, Any]) -> dict[str, Any]:
        hp = self.hparams(state)
        ev = self.p.evaluate(hp["lr"], hp["momentum"])
        return {
            **ev,
            "lr": state["log_lr"].detach().exp().cpu().tolist(),
            "momentum": float(torch.sigmoid(state["mom"]).detach()),
            # the median: one stall on a shared machine must not make a slow mean
            "hypergrad_ms": 1000 * statistics.median(state["times"] or [math.nan]),
            "wall_s": state["time"],
        }


def _grid(cfg: dict[str, Any]) -> list[tuple[float, float]]:
    n = cfg["grid_lrs"]
    lrs = [1e-3 * (1e4 ** (i / (n - 1))) if n > 1 else cfg["init_lr"] for i in range(n)]
    return [(lr, m) for m in cfg["grid_momenta"] for lr in lrs]


def phases(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """(method, mode) pairs learned, in order."""
    out = []
    for method in cfg["methods"]:
        modes = cfg["modes"] if method == "scalar" else ["reverse"]
        out += [(method, mode) for mode in modes]
    return out


def run(run: Run, cfg: dict[str, Any]) -> dict[str, Any]:
    problem = Problem(run, cfg)
    grid = _grid(cfg)
    learned = phases(cfg)
    run.plan(len(grid) + cfg["outer_steps"] * len(learned))

    # -- baseline: grid search over fixed (lr, momentum) at the same inner budget ----------
    def grid_step(state: dict[str, Any], k: int) -> dict[str, Any]:
        lr, mom = grid[k]
        t0 = time.perf_counter()
        ev = problem.evaluate(lr, mom)
        row = {"lr": lr, "momentum": mom, **ev, "eval_s": time.perf_counter() - t0}
        state["rows"].append(row)
        return row

    def grid_finish(state: dict[str, Any]) -> dict[str, Any]:
        ok = [r for r in state["rows"] if r["val_loss"] is not None]
        best = min(ok, key=lambda r: r["val_loss"]) if ok else None
        return {
            "rows": state["rows"],
            "best": best,
            "wall_s": sum(r["eval_s"] for r in state["rows"]),
        }

    grid_result = run.phase("grid", len(grid), lambda: {"rows": []}, grid_step, grid_finish)

    # -- learned hyperparameters ---------------------------------------------------------
    results: dict[str, Any] = {}
    for method, mode in learned:
        name = f"{method}/{mode}"
        learner = Learner(problem, method, mode)

        def step(
            state: dict[str, Any], k: int, learner: Learner = learner, name: str = name
        ) -> dict[str, Any]:
            return learner.step(state, k, name)

        results[name] = run.phase(name, cfg["outer_steps"], learner.init, step, learner.finish)

    summary = _summarize(cfg, grid, grid_result, results)
    _plot(run, cfg, grid_result, results, problem.names)
    summary["plots"] = ["learn_lr.png"]
    return summary


def _summarize(
    cfg: dict[str, Any], grid: list, grid_result: dict[str, Any], results: dict[str, Any]
) -> dict[str, Any]:
    best = grid_result["best"]
    rows = []
    keys = ("val_loss", "val_acc", "test_loss", "test_acc")
    if best is not None:
        rows.append(
            {
                "method": "grid search",
                "mode": "-",
                "lr": best["lr"],
                "momentum": best["momentum"],
                **{k: best[k] for k in keys},
                "hypergrad_ms": None,
                "inner_runs": len(grid) * cfg["eval_runs"],
                "wall_s": grid_result["wall_s"],
            }
        )
    for name, r in results.items():
        method, mode = name.split("/")
        lr = r["lr"]
        lr_text = lr if isinstance(lr, float) else f"{min(lr):.3g}..{max(lr):.3g}"
        rows.append(
            {
                "method": method,
                "mode": mode,
                "lr": lr_text,
                "momentum": r["momentum"],
                **{k: r[k] for k in keys},
                "hypergrad_ms": r["hypergrad_ms"],
                "inner_runs": cfg["outer_steps"] + cfg["eval_runs"],
                "wall_s": r["wall_s"],
            }
        )
    valid = [(n, r) for n, r in results.items() if r["val_loss"] is not None]
    best_name, best_learned = (
        min(valid, key=lambda nr: nr[1]["val_loss"]) if valid else (None, None)
    )
    summary: dict[str, Any] = {"table": rows, "grid_best": best, "best_learned": best_name}
    if best is not None and best_learned is not None:
        summary["versus_grid"] = versus(best_learned["val_loss"], best["val_loss"])
        summary["beats_grid"] = summary["versus_grid"] == "better"
        summary["tie_rule"] = TIE_RULE
        summary["val_loss_improvement"] = best["val_loss"] - best_learned["val_loss"]
        summary["test_acc_improvement"] = best_learned["test_acc"] - best["test_acc"]
    summary["learned"] = results
    return summary


def _plot(
    run: Run,
    cfg: dict[str, Any],
    grid_result: dict[str, Any],
    results: dict[str, Any],
    names: list[str],
) -> None:
    fig, ax = plot.figure(2, 2, size=(4.8, 4.2))  # room for the legends below the axes
    # outer loss curves
    series = {}
    for name in results:
        rows = [r for r in run.read_metrics(name) if r.get("outer_loss") is not None]
        y = [r["outer_loss"] for r in rows]
        series[name] = ([r["step"] for r in rows], plot.smooth(y, max(1, len(y) // 10)))
    plot.curves(
        ax[0],
        series,
        xlabel="outer step",
        ylabel="validation loss after T steps",
        title="outer loss (smoothed)",
        logy=True,
        legend_below=True,
    )
    # learned schedules, as effective steps lr / (1 - momentum) to compare across momenta
    T = cfg["inner_steps"]
    sched = {}
    for name, r in results.items():
        lr, damp = r["lr"], 1.0 - r["momentum"]
        if name.startswith("per-step"):
            sched["per-step"] = (list(range(T)), [v / damp for v in lr])
        elif name.startswith("per-layer"):
            for layer, v in zip(names, lr):
                sched[f"per-layer {layer}"] = ([0, T - 1], [v / damp] * 2)
        elif name == "scalar/reverse" or (name.startswith("scalar") and "scalar" not in sched):
            sched["scalar"] = ([0, T - 1], [lr / damp] * 2)
    best = grid_result["best"]
    if best is not None:
        sched["grid best"] = ([0, T - 1], [best["lr"] / (1 - best["momentum"])] * 2)
    plot.curves(
        ax[1],
        sched,
        xlabel="inner step",
        ylabel="lr / (1 - momentum)",
        title="learned effective step sizes",
        logy=True,
        legend_below=True,
    )
    # grid search
    gs = {}
    for m in cfg["grid_momenta"]:
        rows = [r for r in grid_result["rows"] if r["momentum"] == m and r["val_loss"] is not None]
        gs[f"grid, momentum {m}"] = ([r["lr"] for r in rows], [r["val_loss"] for r in rows])
    plot.curves(
        ax[2],
        gs,
        xlabel="fixed learning rate",
        ylabel="validation loss",
        title="grid search (lines) vs learned (markers)",
        logx=True,
        marker=".",
    )
    # each learned setting as a labelled marker at its (first) learning rate, not an
    # unlabelled horizontal line: several of them lie within a few per cent of each other
    for i, (name, r) in enumerate(results.items()):
        if r["val_loss"] is not None:
            lr = r["lr"] if isinstance(r["lr"], float) else r["lr"][0]
            ax[2].plot(
                [lr], [r["val_loss"]], ls="none", marker="os^Dv<>p*h"[i % 10], ms=5, label=name
            )
    plot.log_axis(ax[2], "y")  # after the markers: the limits include them
    plot.legend(ax[2], below=True, ncol=2)
    # cost
    labels = list(results)
    ax[3].barh(range(len(labels)), [results[n]["hypergrad_ms"] for n in labels], color="tab:blue")
    ax[3].set_yticks(range(len(labels)), labels, fontsize=plot.LEGEND_PT)
    ax[3].set_xlabel("median ms per hypergradient")
    ax[3].set_title(f"hypergradient cost (T={T})", fontsize=10)
    plot.save(fig, run.path("learn_lr.png"))
