"""The inner loop of the reverse-type modes: ``reverse``, ``truncated`` and ``first_order``.

They differ only in which steps build a graph through their inner gradient: every step
(reverse), the last K (truncated: the carry is detached where the differentiated window
begins), none (first_order: the steps still depend on params and hparams, only not through
the gradients). Without grad mode every mode runs this loop without graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import tree_detach
from bilevel.unroll.finite import FiniteChecker
from bilevel.unroll.result import UnrollResult
from bilevel.unroll.step import Carry, InnerStep, autograd_step


@dataclass(frozen=True)
class Run:
    """One call of ``unroll``: the step's inputs, the number of steps, the batches and the
    NaN/Inf check (which keeps its own count of what it has checked)."""

    inner: InnerStep
    steps: int
    batch_at: Callable[[int], Any]
    checker: FiniteChecker
    # tensors the first step read that outlive it (data, captured tensors): checkpoint
    # recomputation checks their version counters
    persistent: tuple[Any, ...] = ()


def finish(run: Run, carry: Carry, losses: list[Tensor]) -> UnrollResult:
    """The last finiteness check and the result, with buffers that carry no graph."""
    run.checker(losses, run.steps, final=True, params=carry.params)
    buffers = None if carry.buffers is None else tree_detach(carry.buffers)
    return UnrollResult(carry.params, carry.state, torch.stack(losses), buffers)


def run_autograd(run: Run, carry: Carry, mode: str, truncate: int | None) -> UnrollResult:
    """``reverse``, ``truncated`` (``truncate`` = K) or ``first_order``; no graph at all
    when grad mode is off."""
    differentiable = torch.is_grad_enabled()
    steps = run.steps
    losses: list[Tensor] = []
    first_differentiated = 0
    if not differentiable or mode == "first_order":
        first_differentiated = steps
    elif mode == "truncated":
        assert truncate is not None
        first_differentiated = steps - truncate
    for t in range(steps):
        create_graph = differentiable and t >= first_differentiated
        if differentiable and t == first_differentiated and mode == "truncated":
            carry = Carry(tree_detach(carry.params), tree_detach(carry.state), carry.buffers)
        carry, loss = autograd_step(run.inner, carry, run.batch_at(t), t, create_graph)
        if not create_graph and mode != "first_order":
            carry = Carry(tree_detach(carry.params), tree_detach(carry.state), carry.buffers)
        losses.append(loss)
        run.checker(losses, t + 1)
    return finish(run, carry, losses)
