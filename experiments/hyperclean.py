"""hyperclean: data hyper-cleaning (Franceschi et al. 2017) on scikit-learn's digits.

Half of the training labels are replaced by a random wrong class. Each training example i
gets a weight ``sigmoid(a_i)``; the inner problem is a weighted, lightly L2-regularized
softmax regression

    w*(a) = argmin_w  1/n sum_i sigmoid(a_i) CE(x_i, y_i; w) + l2/2 ||W||^2

and the outer loss is the cross-entropy of w*(a) on a clean validation set. Its gradient
w.r.t. the n logits ``a`` comes from ``bilevel.argmin`` (implicit: L-BFGS + CG, warm
started) or, with ``--hypergrad unroll``, from ``bilevel.unroll`` through T gradient steps;
Adam updates ``a``. Examples whose weight falls below 1/2 are flagged as corrupted: the
summary reports precision / recall / F1 of the flags, and the test accuracy of a model
retrained with the learned weights, on everything, and on the clean examples only (oracle).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import bilevel
import bilevel.linalg
import bilevel.solvers

from . import plot
from .data import load_sklearn, split
from .options import Option, choice, positive_float, positive_int, unit_float
from .run import Run, UsageError

DESCRIPTION = (
    "data hyper-cleaning on digits with half the training labels corrupted: learn one weight "
    "per training example; precision / recall / F1 of the flags, retrained test accuracy"
)
DTYPE = "float64"

OPTIONS = [
    Option("n_train", 1000, quick=300, type=positive_int, help="training examples (corrupted)"),
    Option("n_val", 300, quick=150, type=positive_int, help="clean validation examples"),
    Option("corrupt", 0.5, type=unit_float, help="fraction of training labels corrupted"),
    Option("outer_steps", 150, quick=10, type=positive_int, help="outer Adam steps"),
    Option("outer_lr", 0.2, quick=0.5, type=positive_float, help="Adam step on the weight logits"),
    Option("l2", 3e-3, type=positive_float, help="fixed L2 weight of the inner problem"),
    Option(
        "hypergrad",
        "implicit",
        type=choice(["implicit", "unroll"]),
        help="implicit (argmin: L-BFGS + CG) or unroll (reverse mode through --inner-steps)",
    ),
    Option(
        "inner_steps", 100, quick=30, type=positive_int, help="gradient steps of --hypergrad unroll"
    ),
    Option("inner_lr", 1.0, type=positive_float, help="step size of --hypergrad unroll"),
    Option("tol", 1e-7, quick=1e-5, type=positive_float, help="L-BFGS gradient-norm tolerance"),
    Option("cg_tol", 1e-6, quick=1e-4, type=positive_float, help="CG relative tolerance"),
]


def validate(cfg: dict[str, Any]) -> None:
    if cfg["n_train"] + cfg["n_val"] >= 1797 - 50:
        raise UsageError(
            "--n-train + --n-val must leave at least 50 of the 1797 digits for testing"
        )


class Problem:
    def __init__(self, run: Run, cfg: dict[str, Any]) -> None:
        x, y = load_sklearn("digits")
        data = split(x, y, cfg["n_train"], cfg["n_val"], run.rng("split"))
        gen = run.rng("corrupt")
        n = cfg["n_train"]
        corrupted = torch.zeros(n, dtype=torch.bool)
        corrupted[torch.randperm(n, generator=gen)[: int(round(cfg["corrupt"] * n))]] = True
        shift = torch.randint(1, data.num_classes, (n,), generator=gen)  # a wrong class, uniformly
        noisy = torch.where(corrupted, (data.y_train + shift) % data.num_classes, data.y_train)
        self.data = data.to(run.device, run.dtype)
        self.y_noisy = noisy.to(run.device)
        self.corrupted = corrupted.to(run.device)
        self.k = data.num_classes
        self.run, self.cfg = run, cfg
        self.solver = bilevel.solvers.lbfgs(tol=cfg["tol"], maxiter=1000)
        self.linear_solver = bilevel.linalg.cg(tol=cfg["cg_tol"], maxiter=500)

    def zeros(self) -> dict[str, Tensor]:
        kw: dict[str, Any] = {"device": self.run.device, "dtype": self.run.dtype}
        return {
            "w": torch.zeros(self.data.num_features, self.k, **kw),
            "b": torch.zeros(self.k, **kw),
        }

    @staticmethod
    def logits(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return x @ params["w"] + params["b"]

    def inner_loss(
        self, params: dict[str, Tensor], hparams: dict[str, Tensor], batch: Any
    ) -> Tensor:
        x, y = batch
        ce = F.cross_entropy(self.logits(params, x), y, reduction="none")
        weights = hparams["weights"]
        return (weights * ce).sum() / ce.shape[0] + 0.5 * self.cfg["l2"] * (params["w"] ** 2).sum()

    def train_batch(self, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if mask is None:
            return self.data.x_train, self.y_noisy
        return self.data.x_train[mask], self.y_noisy[mask]

    def fit(self, weights: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """The inner solution for fixed weights (no hypergradient)."""
        batch = self.train_batch(mask)
        hp = {"weights": weights.detach() if mask is None else weights.detach()[mask]}
        sol, _ = self.solver(lambda w: self.inner_loss(w, hp, batch), self.zeros())
        return sol

    def solution(self, weights: Tensor, warm: dict[str, Tensor]) -> dict[str, Tensor]:
        """w*(weights), differentiable w.r.t. the weights."""
        if self.cfg["hypergrad"] == "implicit":
            return bilevel.argmin(
                self.inner_loss,
                warm,
                {"weights": weights},
                data=self.train_batch(),
                solver=self.solver,
                linear_solver=self.linear_solver,
            )
        result = bilevel.unroll(
            self.inner_loss,
            self.zeros(),
            {"weights": weights},
            bilevel.optim.sgd(lr=self.cfg["inner_lr"]),
            self.cfg["inner_steps"],
            data=self.train_batch(),
            mode="reverse",
        )
        return result.params

    def accuracy(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> float:
        with torch.no_grad():
            return float((self.logits(params, x).argmax(1) == y).double().mean())

    def flags(self, weights: Tensor) -> dict[str, float]:
        flagged = weights < 0.5
        tp = float((flagged & self.corrupted).sum())
        precision = tp / max(float(flagged.sum()), 1.0)
        recall = tp / max(float(self.corrupted.sum()), 1.0)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        return {"precision": precision, "recall": recall, "f1": f1, "flagged": int(flagged.sum())}


def run(run: Run, cfg: dict[str, Any]) -> dict[str, Any]:
    prob = Problem(run, cfg)
    n = cfg["n_train"]
    run.plan(cfg["outer_steps"])

    def init() -> dict[str, Any]:
        a = torch.zeros(n, device=run.device, dtype=run.dtype, requires_grad=True)
        return {
            "a": a,
            "outer": torch.optim.Adam([a], lr=cfg["outer_lr"]),
            "w": prob.zeros(),
            "time": 0.0,
            "times": [],
        }

    def step(state: dict[str, Any], k: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        a: Tensor = state["a"]
        state["outer"].zero_grad()
        weights = torch.sigmoid(a)
        w_star = prob.solution(weights, state["w"])
        val_loss = F.cross_entropy(prob.logits(w_star, prob.data.x_val), prob.data.y_val)
        val_loss.backward()
        state["outer"].step()
        state["time"] += time.perf_counter() - t0
        state["times"].append(time.perf_counter() - t0)
        state["w"] = {k_: v.detach() for k_, v in w_star.items()}
        wd = weights.detach()
        return {
            "outer_loss": float(val_loss.detach()),
            "val_acc": prob.accuracy(state["w"], prob.data.x_val, prob.data.y_val),
            "weight_clean": float(wd[~prob.corrupted].mean()),
            "weight_corrupted": float(wd[prob.corrupted].mean()),
            **{k_: v for k_, v in prob.flags(wd).items() if k_ != "flagged"},
            "hypergrad_s": time.perf_counter() - t0,
        }

    def finish(state: dict[str, Any]) -> dict[str, Any]:
        weights = torch.sigmoid(state["a"].detach())
        return {
            "weights": weights.cpu().tolist(),
            "flags": prob.flags(weights),
            "hypergrad_ms": 1000 * statistics.median(state["times"]),  # median: robust to stalls
        }

    learned = run.phase("learn-weights", cfg["outer_steps"], init, step, finish)
    weights = torch.tensor(learned["weights"], device=run.device, dtype=run.dtype)
    ones = torch.ones(n, device=run.device, dtype=run.dtype)
    kept = weights >= 0.5
    fits = {
        "learned weights": prob.fit(weights),
        "learned, flagged removed": prob.fit(ones, mask=kept),
        "all examples": prob.fit(ones),
        "clean only (oracle)": prob.fit(ones, mask=~prob.corrupted),
    }
    rows = []
    for name, params in fits.items():
        rows.append(
            {
                "training set": name,
                "val_loss": float(
                    F.cross_entropy(prob.logits(params, prob.data.x_val), prob.data.y_val)
                ),
                "test_acc": prob.accuracy(params, prob.data.x_test, prob.data.y_test),
            }
        )
    flags = learned["flags"]
    _plot(run, prob, weights)
    return {
        "table": rows,
        "tables": {
            "flags (weight < 1/2 = corrupted)": [
                {
                    "precision": flags["precision"],
                    "recall": flags["recall"],
                    "f1": flags["f1"],
                    "flagged": flags["flagged"],
                    "corrupted": int(prob.corrupted.sum()),
                    "hypergrad_ms": learned["hypergrad_ms"],
                }
            ]
        },
        "flags": flags,
        "test_acc": {r["training set"]: r["test_acc"] for r in rows},
        "plots": ["hyperclean.png"],
    }


def _plot(run: Run, prob: Problem, weights: Tensor) -> None:
    fig, ax = plot.figure(2, 1, size=(4.4, 3.2))
    rows = run.read_metrics("learn-weights")
    steps = [r["step"] for r in rows]
    plot.curves(
        ax[0],
        {
            "validation loss": (steps, [r["outer_loss"] for r in rows]),
            "F1 of flags": (steps, [r["f1"] for r in rows]),
            "mean weight, clean": (steps, [r["weight_clean"] for r in rows]),
            "mean weight, corrupted": (steps, [r["weight_corrupted"] for r in rows]),
        },
        xlabel="outer step",
        ylabel="value",
        title="hyper-cleaning",
    )
    w = weights.cpu()
    c = prob.corrupted.cpu()
    ax[1].hist(
        [w[~c].numpy(), w[c].numpy()],
        bins=20,
        range=(0, 1),
        label=["clean", "corrupted"],
        color=["tab:green", "tab:red"],
    )
    ax[1].axvline(0.5, color="k", ls=":", lw=1)
    ax[1].set_xlabel("learned example weight")
    ax[1].set_ylabel("training examples")
    plot.legend(ax[1])
    plot.save(fig, run.path("hyperclean.png"))
