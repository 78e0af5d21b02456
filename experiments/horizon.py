"""horizon: learn SGD-momentum's learning-rate schedule over a long inner run, six ways.

An MLP (64-H-10, tanh) is trained on scikit-learn's digits by T steps of SGD with momentum
from a fresh random initialization. The learning rate is a schedule of B piecewise-constant
blocks, ``lr_t = exp(theta[t // (T / B)])``, and Adam learns ``theta`` (the log learning
rates) with hypergradients from one of these methods:

* ``truncated-K``  every K inner steps, reverse mode through those K steps only, on the
  validation loss at the end of the window (``OnlineHyperOptimizer(mode="truncated")``):
  greedy, so it shows the short-horizon bias of Wu et al. 2018 (learning rates too small).
* ``pes-K``        Persistent ES (Vicol, Metz, Sohl-Dickstein 2021) over windows of K steps
  (``PersistentES``): each particle carries the sum of its perturbations across windows, so
  the estimates are unbiased for the smoothed loss of the whole run; no graph at all.
* ``forward-K``    online forward mode (real-time HO, Franceschi et al. 2017): the tangent
  ``d params / d theta`` is carried along the whole run (``OnlineHyperOptimizer(mode=
  "forward")``) and theta is updated every K steps; memory O(P·B), flat in T.
* ``checkpoint``   the exact hypergradient of the validation loss after all T steps
  (``unroll(mode="checkpoint")``, O(sqrt(T)·P) memory): the full-horizon reference.
* ``reversible``   the same exact objective through ``unroll(mode="reversible")`` (SGD with
  momentum in fixed-point arithmetic, reversed exactly in the backward pass; Maclaurin et al.
  2015), when this bilevel has that mode.

One outer step of every method is one inner run of T steps from a new initialization and
new minibatches (the same ones for every method): the full-horizon methods update theta
once per run (``--outer-lr``), the windowed ones after every window (``--window-lr``,
``--pes-lr``), on the validation loss at the window's end. Each learned schedule is then evaluated by training
T steps from ``--eval-runs`` fresh initializations (the same for every method, and for the
initial constant schedule). The summary reports final validation / test loss and accuracy,
the learned schedule, the compute (wall time of the learning phase and per inner step) and
the memory each hypergradient held: the bytes autograd saved for backward (peak, measured
with saved-tensor hooks on the first outer step) plus the state the method carries between
steps (PES: particles; forward: tangents), and on a GPU the allocator's peak.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import bilevel
from bilevel.optim.base import HParams
from bilevel.optim.sgd import SGD
from bilevel.unroll.es import PersistentES
from bilevel.unroll.online import OnlineHyperOptimizer
from bilevel.unroll.validation import MODES as UNROLL_MODES

from . import learn_lr, plot
from .options import (
    Option,
    choice_list,
    int_list,
    nonneg_int,
    positive_float,
    positive_int,
    unit_float,
)
from .run import Run, UsageError

DESCRIPTION = (
    "learn SGD-momentum's learning-rate schedule over T = 2000 steps: truncated reverse, "
    "PES, online forward mode, full-horizon checkpoint, reversible"
)
DTYPE = "float32"
HAS_REVERSIBLE = "reversible" in UNROLL_MODES
KINDS = ("truncated", "pes", "forward", "checkpoint", "reversible")
DEFAULT_KINDS = [k for k in KINDS if k != "reversible" or HAS_REVERSIBLE]
LOG_LR_RANGE = (math.log(1e-4), math.log(3.0))


OPTIONS = [
    Option("hidden", 32, quick=16, type=positive_int, help="hidden units of the MLP 64-H-10"),
    Option("inner_steps", 2000, quick=60, type=positive_int, help="SGD steps T per inner run"),
    Option("blocks", 10, quick=3, type=positive_int, help="piecewise-constant lr blocks B"),
    Option("batch_size", 64, quick=32, type=positive_int, help="minibatch size of the inner SGD"),
    Option("momentum", 0.9, type=unit_float, help="SGD momentum (fixed)"),
    Option("init_lr", 0.01, type=positive_float, help="initial learning rate of every block"),
    Option(
        "outer_steps",
        20,
        quick=3,
        type=positive_int,
        help="inner runs of T steps per method (outer steps)",
    ),
    Option(
        "outer_lr",
        0.1,
        quick=0.3,
        type=positive_float,
        help="Adam step on log(lr) per run (full-horizon methods)",
    ),
    Option(
        "window_lr",
        0.003,
        quick=0.05,
        type=positive_float,
        help="Adam step on log(lr) per window (truncated, forward)",
    ),
    Option(
        "pes_lr",
        0.001,
        quick=0.05,
        type=positive_float,
        help="Adam step on log(lr) per window of PES (its estimates are noisier)",
    ),
    Option("methods", DEFAULT_KINDS, type=choice_list(KINDS), help="methods compared"),
    Option(
        "truncations",
        [10, 50],
        quick=[5, 10],
        type=int_list,
        help="window lengths K of the truncated method",
    ),
    Option("pes_window", 10, quick=5, type=positive_int, help="window K of PES"),
    Option("pes_pairs", 16, quick=4, type=positive_int, help="antithetic particle pairs of PES"),
    Option("pes_sigma", 0.1, type=positive_float, help="PES perturbation std on log(lr)"),
    Option(
        "forward_every",
        10,
        quick=5,
        type=positive_int,
        help="update period K of online forward mode",
    ),
    Option(
        "checkpoint_segments",
        0,
        type=nonneg_int,
        help="segments of the checkpoint mode (0: ceil(sqrt(T)))",
    ),
    Option("eval_runs", 3, quick=1, type=positive_int, help="fresh runs averaged per schedule"),
    Option("n_train", 1000, quick=400, type=positive_int, help="training examples"),
    Option("n_val", 400, quick=200, type=positive_int, help="validation examples"),
]


def method_names(cfg: dict[str, Any]) -> list[str]:
    """The phases run, in order (``truncated-10``, ``pes-10``, ...)."""
    names: list[str] = []
    for kind in cfg["methods"]:
        if kind == "truncated":
            names += [f"truncated-{k}" for k in cfg["truncations"]]
        elif kind == "pes":
            names.append(f"pes-{cfg['pes_window']}")
        elif kind == "forward":
            names.append(f"forward-{cfg['forward_every']}")
        else:
            names.append(kind)
    return list(dict.fromkeys(names))


def validate(cfg: dict[str, Any]) -> None:
    T = cfg["inner_steps"]
    if cfg["blocks"] > T:
        raise UsageError(f"--blocks {cfg['blocks']} exceeds --inner-steps {T}")
    windows = [("--truncations", k) for k in cfg["truncations"] if "truncated" in cfg["methods"]]
    if "pes" in cfg["methods"]:
        windows.append(("--pes-window", cfg["pes_window"]))
    if "forward" in cfg["methods"]:
        windows.append(("--forward-every", cfg["forward_every"]))
    for flag, k in windows:
        if k < 1 or T % k:
            raise UsageError(f"{flag} {k} must be a positive divisor of --inner-steps {T}")
    if cfg["checkpoint_segments"] > T:
        raise UsageError("--checkpoint-segments exceeds --inner-steps")
    if "reversible" in cfg["methods"] and not HAS_REVERSIBLE:
        raise UsageError(
            "--methods reversible needs bilevel.unroll(mode='reversible'), which this "
            "bilevel does not have; leave it out of --methods"
        )
    if cfg["n_train"] + cfg["n_val"] >= 1797:
        raise UsageError("--n-train + --n-val must be below the 1797 digits")


class BlockLRSGD(SGD):
    """SGD whose learning rate is ``exp(hparams["log_lr"][t // block])`` at step ``t``.

    The log learning rates are an explicit ``hparams`` tensor of B elements, so every method
    sees them: forward mode as B tangent directions, PES as the B numbers it perturbs,
    checkpoint and reverse modes through autograd.

    Example:
        >>> import torch
        >>> opt = BlockLRSGD(block=2, blocks=2, momentum=0.0)
        >>> h = {"log_lr": torch.log(torch.tensor([0.1, 0.5]))}
        >>> p, s = {"w": torch.zeros(1)}, None
        >>> s = opt.init(p, h)
        >>> for _ in range(3):
        ...     p, s = opt.step(p, {"w": torch.ones(1)}, s, h)
        >>> round(float(p["w"]), 4)  # 0.1 + 0.1 + 0.5
        -0.7
    """

    def __init__(self, block: int, blocks: int, **settings: Any) -> None:
        self.block, self.blocks = block, blocks
        super().__init__(**settings)

    def raw(self, setting: str, hparams: HParams) -> Any:
        if setting != "lr":
            return super().raw(setting, hparams)
        log_lr = hparams["log_lr"]
        block, last = self.block, self.blocks - 1
        return lambda step: log_lr[min(step // block, last)].exp()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(tree: Any) -> int:
    """Bytes of the tensors in a dict / list / tuple tree (each storage once)."""
    seen: dict[tuple[Any, int], int] = {}

    def walk(x: Any) -> None:
        if isinstance(x, Tensor):
            s = x.untyped_storage()
            seen[(x.device, s.data_ptr())] = s.nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(tree)
    return sum(seen.values())


class Problem(learn_lr.Problem):
    """learn-lr's digits MLP and losses, with the schedule's optimizer (pure functions)."""

    def __init__(self, run: Run, cfg: dict[str, Any]) -> None:
        super().__init__(run, cfg)
        self.block = self.steps // cfg["blocks"]
        self.optimizer = BlockLRSGD(self.block, cfg["blocks"], momentum=cfg["momentum"])
        steps = torch.arange(self.steps, device=run.device)
        self.block_of_step = (steps // self.block).clamp(max=cfg["blocks"] - 1)
        self.val = (self.data.x_val, self.data.y_val)

    def val_loss(self, params: dict[str, Tensor], hparams: Any, batch: Any = None) -> Tensor:
        x, y = self.val if batch is None else batch
        return F.cross_entropy(self.logits(params, x), y)

    def start(self, k: int) -> tuple[dict[str, Tensor], list[Any]]:
        """Outer step ``k``'s initialization and minibatches (shared by every method)."""
        gen = self.run.rng("train", k)  # not the phase: every method sees the same runs
        return self.init_params(gen), self.batches(gen)

    def evaluate(self, log_lr: Tensor) -> dict[str, Any]:
        """Mean final validation / test loss and accuracy of T-step runs with ``log_lr``."""
        hp = {"log_lr": log_lr.detach()}
        sums = {"val_loss": 0.0, "val_acc": 0.0, "test_loss": 0.0, "test_acc": 0.0}
        n = self.cfg["eval_runs"]
        for e in range(n):
            gen = self.run.rng("eval", e)
            try:
                with torch.no_grad():
                    result = bilevel.unroll(
                        self.inner_loss,
                        self.init_params(gen),
                        hp,
                        self.optimizer,
                        self.steps,
                        data=self.batches(gen),
                    )
            except bilevel.NonFiniteLossError:
                return {**dict.fromkeys(sums), "diverged": True}
            with torch.no_grad():
                for part, x, y in (
                    ("val", self.data.x_val, self.data.y_val),
                    ("test", self.data.x_test, self.data.y_test),
                ):
                    out = self.logits(result.params, x)
                    loss = float(F.cross_entropy(out, y))
                    if not math.isfinite(loss):
                        return {**dict.fromkeys(sums), "diverged": True}
                    sums[f"{part}_loss"] += loss / n
                    sums[f"{part}_acc"] += float((out.argmax(1) == y).double().mean()) / n
        return {**sums, "diverged": False}


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null (C++ code writes there, not to sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Measure:
    """Peak bytes of tensors allocated and not yet freed while active, above the start.

    From the profiler's allocation events (``profile_memory=True``): on the CPU, where torch
    keeps no allocator statistics, as on a GPU (the run's device only). Tensors that existed
    before (the data, the initial parameters) are not counted.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> Measure:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._prof = profile(activities=activities, profile_memory=True)
        with _quiet_stderr():  # kineto prints a line on stderr at start and stop
            self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        with _quiet_stderr():
            self._prof.__exit__(*exc)
        if exc[0] is not None:
            return
        kind = "CUDA" if self.device.type == "cuda" else "CPU"
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in self._prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and kind in str(e.device_type())
        )
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        self.peak = peak
        del self._prof


class Learner:
    """One method: its state (theta, Adam, timings, memory) and its outer step."""

    def __init__(self, problem: Problem, name: str) -> None:
        self.p, self.name = problem, name
        self.kind, _, k = name.partition("-")
        self.window = int(k) if k else problem.steps
        self.cfg = problem.cfg

    def init(self) -> dict[str, Any]:
        run, cfg = self.p.run, self.cfg
        log_lr = torch.full(
            (cfg["blocks"],),
            math.log(cfg["init_lr"]),
            device=run.device,
            dtype=run.dtype,
            requires_grad=True,
        )
        if self.kind in ("checkpoint", "reversible"):
            step_size = cfg["outer_lr"]
        else:
            step_size = cfg["pes_lr"] if self.kind == "pes" else cfg["window_lr"]
        outer = torch.optim.Adam([log_lr], lr=step_size)
        return {
            "log_lr": log_lr,
            "outer": outer,
            "times": [],
            "peak_bytes": 0,
            "carried_bytes": 0,
            "skipped": 0,
        }

    def step(self, state: dict[str, Any], k: int) -> dict[str, Any]:
        run = self.p.run
        params, batches = self.p.start(k)
        log_lr: Tensor = state["log_lr"]
        before = log_lr.detach().clone()
        measure = Measure(run.device) if k == 0 else None
        _sync(run.device)
        t0 = time.perf_counter()
        with measure if measure is not None else contextlib.nullcontext():
            if self.kind in ("checkpoint", "reversible"):
                loss, carried = self._full(state, params, batches)
            elif self.kind == "pes":
                loss, carried = self._pes(state, params, batches, k)
            else:
                loss, carried = self._online(state, params, batches)
        _sync(run.device)
        elapsed = time.perf_counter() - t0
        skipped = loss is None or not bool(torch.isfinite(log_lr).all())
        if skipped:  # a diverged run: keep the schedule it started from
            with torch.no_grad():
                log_lr.copy_(before)
            state["skipped"] += 1
        if measure is not None:
            state["peak_bytes"] = measure.peak
            state["carried_bytes"] = carried
        state["times"].append(elapsed)
        lr = log_lr.detach().exp()
        return {
            "outer_loss": loss,
            "run_s": elapsed,
            "skipped": int(skipped),
            "lr_first": float(lr[0]),
            "lr_last": float(lr[-1]),
            "lr_mean": float(lr.mean()),
        }

    def _clamp(self, log_lr: Tensor) -> None:
        with torch.no_grad():
            log_lr.clamp_(*LOG_LR_RANGE)

    def _full(self, state: dict[str, Any], params: Any, batches: list) -> tuple[Any, int]:
        """One exact hypergradient of the final validation loss; one Adam step."""
        p, log_lr, outer = self.p, state["log_lr"], state["outer"]
        kw: dict[str, Any] = {}
        if self.kind == "checkpoint" and self.cfg["checkpoint_segments"]:
            kw["segments"] = self.cfg["checkpoint_segments"]
        hparams: dict[str, Any] = {"log_lr": log_lr}
        optimizer: Any = p.optimizer
        if self.kind == "reversible":
            # the reversible mode takes bilevel.optim.sgd itself: the same schedule as a
            # per-step tensor, lr_t = exp(log_lr[t // block]), differentiable to log_lr
            hparams = {"lr": bilevel.optim.schedule(log_lr.exp()[p.block_of_step])}
            optimizer = bilevel.optim.sgd(momentum=self.cfg["momentum"])
        outer.zero_grad()
        try:
            result = bilevel.unroll(
                p.inner_loss,
                params,
                hparams,
                optimizer,
                p.steps,
                data=batches,
                mode=self.kind,
                **kw,
            )
            loss = p.val_loss(result.params, None)
            loss.backward()
        except bilevel.NonFiniteLossError:
            return None, 0
        value = float(loss.detach())
        if math.isfinite(value) and bool(torch.isfinite(log_lr.grad).all()):
            outer.step()
            self._clamp(log_lr)
            return value, 0
        return None, 0

    def _pes(self, state: dict[str, Any], params: Any, batches: list, k: int) -> tuple[Any, int]:
        """One inner run in windows; an Adam step on each window's PES estimate."""
        p, log_lr, outer = self.p, state["log_lr"], state["outer"]
        pes = PersistentES(
            p.inner_loss,
            p.val_loss,
            params,
            p.optimizer,
            window=self.window,
            sigma=self.cfg["pes_sigma"],
            pairs=self.cfg["pes_pairs"],
            data=batches,
            horizon=p.steps,
            generator=p.run.rng(self.name, k, "perturbations"),
        )
        carried = 0
        loss = None
        for w in range(p.steps // self.window):
            estimate = pes.step({"log_lr": log_lr})
            if w == 0:  # particles, their optimizer states, the accumulated perturbations
                carried = tensor_bytes([pes.particles, pes.state_tensors, pes.xi])
            outer.zero_grad()
            estimate.backward()
            outer.step()
            self._clamp(log_lr)
            loss = estimate.loss
        value = float(loss) if loss is not None else math.nan
        return (value if math.isfinite(value) else None), carried

    def _online(self, state: dict[str, Any], params: Any, batches: list) -> tuple[Any, int]:
        """One inner run with an update every window (truncated reverse or forward mode)."""
        p, log_lr = self.p, state["log_lr"]
        online = OnlineHyperOptimizer(
            p.inner_loss,
            p.val_loss,
            params,
            {"log_lr": log_lr},
            p.optimizer,
            state["outer"],
            every=self.window,
            mode="forward" if self.kind == "forward" else "truncated",
        )
        carried = 0
        for t, batch in enumerate(batches):
            online.step(batch, val_batch=p.val)
            if (t + 1) % self.window == 0:
                self._clamp(log_lr)
                if t + 1 == self.window and online._tangents is not None:
                    carried = tensor_bytes(list(online._tangents))
        with torch.no_grad():
            value = float(p.val_loss(online.params, None))
        return (value if math.isfinite(value) else None), carried

    def finish(self, state: dict[str, Any]) -> dict[str, Any]:
        ev = self.p.evaluate(state["log_lr"])
        times = state["times"] or [math.nan]
        return {
            **ev,
            "lr": state["log_lr"].detach().exp().cpu().tolist(),
            "train_s": sum(state["times"]),
            # the median: one stall on a shared machine must not make a slow mean
            "inner_step_ms": 1000 * statistics.median(times) / self.p.steps,
            "peak_bytes": state["peak_bytes"],
            "carried_bytes": state["carried_bytes"],
            "skipped": state["skipped"],
        }


def run(run: Run, cfg: dict[str, Any]) -> dict[str, Any]:
    problem = Problem(run, cfg)
    names = method_names(cfg)
    run.plan(1 + cfg["outer_steps"] * len(names))

    def init_step(state: dict[str, Any], k: int) -> dict[str, Any]:
        log_lr = torch.full((cfg["blocks"],), math.log(cfg["init_lr"]), dtype=run.dtype)
        state["result"] = problem.evaluate(log_lr.to(run.device))
        return {"val_loss": state["result"]["val_loss"]}

    initial = run.phase("initial", 1, lambda: {"result": {}}, init_step, lambda s: {**s["result"]})
    results: dict[str, Any] = {}
    for name in names:
        learner = Learner(problem, name)
        results[name] = run.phase(
            name, cfg["outer_steps"], learner.init, learner.step, learner.finish
        )
    summary = _summarize(cfg, initial, results)
    _plot(run, cfg, initial, results)
    summary["plots"] = ["horizon.png"]
    return summary


def _summarize(
    cfg: dict[str, Any], initial: dict[str, Any], results: dict[str, Any]
) -> dict[str, Any]:
    keys = ("val_loss", "val_acc", "test_loss", "test_acc")
    rows = [
        {
            "method": "initial (constant)",
            **{k: initial.get(k) for k in keys},
            "lr": f"{cfg['init_lr']:.3g}",
            "train_s": None,
            "step_ms": None,
            "peak_memory": None,
            "carried": None,
        }
    ]
    for name, r in results.items():
        lr = r["lr"]
        rows.append(
            {
                "method": name,
                **{k: r[k] for k in keys},
                "lr": f"{lr[0]:.3g}..{lr[-1]:.3g}",
                "train_s": r["train_s"],
                "step_ms": r["inner_step_ms"],
                "peak_memory": _fmt_bytes(r["peak_bytes"]),
                "carried": _fmt_bytes(r["carried_bytes"]),
            }
        )
    valid = [(n, r) for n, r in results.items() if r["val_loss"] is not None]
    best = min(valid, key=lambda nr: nr[1]["val_loss"])[0] if valid else None
    return {"table": rows, "initial": initial, "learned": results, "best_method": best}


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _plot(run: Run, cfg: dict[str, Any], initial: dict[str, Any], results: dict[str, Any]) -> None:
    from matplotlib.ticker import MaxNLocator  # matplotlib loads only when plotting

    fig, ax = plot.figure(2, 2, size=(4.8, 4.0))
    T, B = cfg["inner_steps"], cfg["blocks"]
    block = T // B
    names = list(results)
    # the learned schedules (steps as piecewise-constant lines)
    sched: dict[str, tuple[list[float], list[float]]] = {}
    for name, r in results.items():
        xs, ys = [], []
        for b, v in enumerate(r["lr"]):
            end = T if b == B - 1 else (b + 1) * block
            xs += [b * block, end]
            ys += [v, v]
        sched[name] = (xs, ys)
    sched["initial"] = ([0, T], [cfg["init_lr"]] * 2)
    plot.curves(
        ax[0],
        sched,
        xlabel="inner step",
        ylabel="learning rate",
        title=f"learned schedules (momentum {cfg['momentum']})",
        logy=True,
        legend_below=True,
    )
    # outer loss per run
    series = {}
    for name in names:
        rows = [r for r in run.read_metrics(name) if r.get("outer_loss") is not None]
        series[name] = ([r["step"] for r in rows], [r["outer_loss"] for r in rows])
    plot.curves(
        ax[1],
        series,
        xlabel="outer step (inner run)",
        ylabel="validation loss at the run's end",
        title="meta-training",
        logy=True,
        legend_below=True,
        marker=".",
    )
    ax[1].xaxis.set_major_locator(MaxNLocator(integer=True))  # outer steps are whole runs
    # final validation loss of the learned schedules
    labels = ["initial", *names]
    vals = [initial.get("val_loss"), *[results[n]["val_loss"] for n in names]]
    ax[2].barh(range(len(labels)), [v if v is not None else 0 for v in vals], color="tab:green")
    ax[2].set_yticks(range(len(labels)), labels, fontsize=plot.LEGEND_PT)
    ax[2].set_xlabel(f"validation loss after T = {T} steps")
    ax[2].set_title("final validation loss (fresh runs)", fontsize=10)
    # compute and memory
    y = list(range(len(names)))
    ax[3].barh(y, [results[n]["inner_step_ms"] for n in names], color="tab:blue")
    ax[3].set_yticks(y, names, fontsize=plot.LEGEND_PT)
    ax[3].set_xlabel("ms per inner step (median run)", color="tab:blue")
    twin = ax[3].twiny()
    twin.plot([max(results[n]["peak_bytes"], 1) for n in names], y, "o", color="tab:red")
    twin.set_xscale("log")
    twin.set_xlabel("peak bytes allocated in a run (dots)", color="tab:red")
    ax[3].set_title("compute and memory", fontsize=10)
    plot.save(fig, run.path("horizon.png"))
