"""``mode="auto"``: the fastest exact mode whose memory fits ``memory_budget``.

Two trial steps from the start (with a graph, random numbers replayed, their graph then
dropped) measure the bytes autograd saves for backward per differentiated step (unique
storages, through saved-tensor hooks). From them, for T steps:

* ``reverse`` keeps every step's graph: ``T * step_bytes``;
* ``checkpoint`` with S segments keeps S boundaries (params, state tensors,
  hyperparameters) and, in the backward pass, one recomputed segment:
  ``S * boundary_bytes + ceil(T / S) * step_bytes``, minimised over S;
* ``forward`` keeps the final tangents, H tangent directions of the params, and the
  hyperparameters: ``H * param_bytes + hyper_bytes``, whatever T is (but costs H forward-mode passes per step).

The first that fits, in that order (fastest first), runs from the start; the result's
``auto`` field reports the choice and the numbers behind it. Step bytes count the batch's
storage in every step where the whole run saves it once, so the estimates err on the side
of the budget.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import tree_flatten
from bilevel.unroll.explicit import Explicit, split_state
from bilevel.unroll.loop import Run
from bilevel.unroll.step import Carry, autograd_step

__all__ = ["AutoChoice"]


@dataclass(frozen=True)
class AutoChoice:
    """What ``mode="auto"`` chose, and why.

    Attributes:
        mode: ``"reverse"``, ``"checkpoint"`` or ``"forward"``.
        segments: the checkpoint segments (``None`` for the other modes).
        estimated_bytes: the estimated peak bytes saved for backward of the chosen mode.
        budget: the ``memory_budget`` it had to fit.
        step_bytes: measured bytes saved per differentiated step.
        boundary_bytes: bytes of one checkpoint boundary (params, state, hyperparameters).
        estimates: every mode's estimate (``"checkpoint"`` at its best segment count).

    Example:
        >>> c = AutoChoice("reverse", None, 800, 1000, 80, 24, {"reverse": 800})
        >>> c.mode, c.estimated_bytes <= c.budget
        ('reverse', True)
    """

    mode: str
    segments: int | None
    estimated_bytes: int
    budget: int
    step_bytes: int
    boundary_bytes: int
    estimates: dict[str, int]


def _nbytes(tensors: Any) -> int:
    return sum(
        x.numel() * x.element_size() for x in tree_flatten(tensors)[0] if isinstance(x, Tensor)
    )


@contextmanager
def _counting_saved_bytes(seen: dict[tuple[Any, int], int]) -> Iterator[None]:
    """Record every storage autograd saves (once each) into ``seen``: key -> bytes."""

    def pack(t: Tensor) -> Tensor:
        if t.layout == torch.strided:
            storage = t.untyped_storage()
            seen[(t.device, storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _measure_steps(run: Run, carry: Carry, trials: int) -> tuple[int, list[Any]]:
    """The largest bytes saved by one of the first ``trials`` steps, and their batches."""
    ref = next(iter(carry.params.values()))
    devices = [ref.device] if ref.is_cuda else []
    batches = [run.batch_at(t) for t in range(trials)]
    worst = 0
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        for t, batch in enumerate(batches):
            seen: dict[tuple[Any, int], int] = {}
            with _counting_saved_bytes(seen):
                carry, _ = autograd_step(run.inner, carry, batch, t, create_graph=True)
            worst = max(worst, sum(seen.values()))
    return worst, batches


def choose(run: Run, carry: Carry, budget: int) -> tuple[AutoChoice, Run]:
    """Measure, estimate, choose. Returns the choice and the run to execute (its first
    batches replayed from the trial, so an iterator of batches loses none)."""
    steps = run.steps
    step_bytes, batches = _measure_steps(run, carry, min(2, steps))
    replay = dict(enumerate(batches))
    source = run.batch_at

    def batch_at(t: int) -> Any:
        return replay.pop(t) if t in replay else source(t)

    explicit = Explicit.of(run.inner.hparams, run.inner.optimizer)
    hyper_bytes = _nbytes(explicit.hyper)
    param_bytes = _nbytes(carry.params)
    boundary = param_bytes + _nbytes(split_state(carry.state)[0]) + hyper_bytes
    estimates = {"reverse": steps * step_bytes}
    best_s = min(
        range(1, steps + 1), key=lambda s: s * boundary + math.ceil(steps / s) * step_bytes
    )
    estimates["checkpoint"] = best_s * boundary + math.ceil(steps / best_s) * step_bytes
    n_hyper = sum(h.numel() for h in explicit.hyper)
    if n_hyper:
        estimates["forward"] = n_hyper * param_bytes + hyper_bytes
    for mode in ("reverse", "checkpoint", "forward"):
        if mode in estimates and estimates[mode] <= budget:
            choice = AutoChoice(
                mode,
                best_s if mode == "checkpoint" else None,
                estimates[mode],
                budget,
                step_bytes,
                boundary,
                estimates,
            )
            return choice, dataclasses.replace(run, batch_at=batch_at)
    smallest = min(estimates.values())
    raise ValueError(
        f"mode='auto': no mode fits memory_budget={budget} bytes (estimates: {estimates}); "
        f"raise the budget to at least {smallest}, or use mode='truncated' (biased) or "
        "bilevel.unroll.es.PersistentES, whose memory does not grow with the steps"
    )
