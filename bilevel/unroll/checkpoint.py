"""``mode="checkpoint"``: exact hypergradients with memory O((T/S + S)·P).

The T steps are cut into S segments. Each segment runs without a graph and stores only
its input (params, state tensors, hyperparameters); its backward recomputes the segment
with a graph, replaying the forward's random numbers, and back-propagates through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from bilevel.unroll.explicit import Explicit, join_state, split_state
from bilevel.unroll.loop import Run, finish
from bilevel.unroll.result import UnrollResult
from bilevel.unroll.step import Carry, InnerLoss, InnerStep, autograd_step
from bilevel.unroll.versions import check_versions, tensor_versions


@dataclass(frozen=True)
class Segment:
    """A checkpointed segment's non-tensor inputs: what it needs to run (again) from its
    input tensors."""

    inner_loss: InnerLoss
    explicit: Explicit
    names: list[str]
    skeleton_in: tuple[Any, ...]
    buffers_in: dict[str, Tensor] | None
    batches: list[Any]
    start: int
    # weak references and version counters of the tensors the segment reads besides its
    # inputs (data, buffers, tensors captured by the inner loss), taken when it first runs
    versions: tuple[Any, ...] = ()

    def run(
        self, tensors: Sequence[Tensor], n_p: int, n_s: int, create_graph: bool
    ) -> tuple[Carry, list[Tensor]]:
        params = dict(zip(self.names, tensors[:n_p]))
        state = join_state(tensors[n_p : n_p + n_s], *self.skeleton_in)
        hparams, optimizer = self.explicit.substitute(tensors[n_p + n_s :])
        inner = InnerStep(self.inner_loss, optimizer, hparams)
        carry = Carry(params, state, self.buffers_in)
        losses = []
        for i, batch in enumerate(self.batches):
            carry, loss = autograd_step(inner, carry, batch, self.start + i, create_graph)
            losses.append(loss)
        return carry, losses


@dataclass
class SegmentOutputs:
    """A segment's side outputs: not differentiable, so not outputs of the Function."""

    skeleton: tuple[Any, ...] = ()
    buffers: dict[str, Tensor] | None = None
    losses: list[Tensor] = field(default_factory=list)


class _CheckpointSegment(torch.autograd.Function):
    """Runs a segment without a graph; its backward recomputes the segment with one."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, seg: Segment, side: SegmentOutputs, n_p: int, n_s: int, *tensors: Tensor
    ) -> Any:
        ctx.seg, ctx.n_p, ctx.n_s = seg, n_p, n_s
        ref = tensors[0]
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(ref.device) if ref.is_cuda else None
        carry, losses = seg.run(tensors, n_p, n_s, create_graph=False)
        s_tensors, *skeleton = split_state(carry.state)
        side.skeleton, side.buffers, side.losses = tuple(skeleton), carry.buffers, losses
        ctx.save_for_backward(*tensors)
        return (*[carry.params[k].detach() for k in seg.names], *[x.detach() for x in s_tensors])

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> Any:  # type: ignore[override]
        seg, n_p, n_s = ctx.seg, ctx.n_p, ctx.n_s
        # an in-place change since the forward would make the recomputation differ silently
        # (reverse mode gets autograd's own error for it): raise the same kind of error
        check_versions(
            list(seg.versions),
            f"the checkpointed segment of steps {seg.start}-{seg.start + len(seg.batches) - 1}",
        )
        inputs = [
            x.detach().requires_grad_(need)
            for x, need in zip(ctx.saved_tensors, ctx.needs_input_grad[4:])
        ]
        ref = inputs[0]
        devices = [ref.device] if ref.is_cuda else []
        # replay the forward's random numbers (dropout) so the recomputation is identical
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(ctx.rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ref.device)
            carry, _ = seg.run(inputs, n_p, n_s, create_graph=True)
        outputs = [carry.params[k] for k in seg.names] + list(split_state(carry.state)[0])
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
        wanted = [x for x in inputs if x.requires_grad]
        grads = iter(
            torch.autograd.grad(
                [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
            )
            if pairs and wanted
            else []
        )
        return (None, None, None, None, *[next(grads) if x.requires_grad else None for x in inputs])


def _read_tensors(run: Run, batches: list[Any], buffers: Any) -> list[Tensor]:
    alive = [t for ref in run.persistent if (t := ref()) is not None]
    leaves = [x for x in tree_flatten((batches, buffers))[0] if isinstance(x, Tensor)]
    unique = {id(t): t for t in [*alive, *leaves]}
    return list(unique.values())


def run_checkpoint(run: Run, carry: Carry, segments: int | None) -> UnrollResult:
    """The checkpointed unroll (grad mode on): ``segments`` segments, default ceil(sqrt(T))."""
    steps = run.steps
    n_segments = min(segments or math.isqrt(steps - 1) + 1, steps)
    bounds = [round(i * steps / n_segments) for i in range(n_segments + 1)]
    explicit = Explicit.of(run.inner.hparams, run.inner.optimizer)
    hyper = explicit.hyper
    names = list(carry.params)
    losses: list[Tensor] = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        s_tensors, *skeleton_in = split_state(carry.state)
        seg = Segment(
            inner_loss=run.inner.inner_loss,
            explicit=explicit,
            names=names,
            skeleton_in=tuple(skeleton_in),
            buffers_in=carry.buffers,
            batches=(batches := [run.batch_at(t) for t in range(start, stop)]),
            start=start,
            versions=tuple(tensor_versions(_read_tensors(run, batches, carry.buffers))),
        )
        side = SegmentOutputs()
        out = _CheckpointSegment.apply(
            seg, side, len(names), len(s_tensors), *carry.params.values(), *s_tensors, *hyper
        )
        params = dict(zip(names, out[: len(names)]))
        carry = Carry(params, join_state(out[len(names) :], *side.skeleton), side.buffers)
        losses.extend(side.losses)
        run.checker(losses, stop)
    return finish(run, carry, losses)
