"""The two passes of ``mode="reversible"``: the fixed-point forward pass that fills the bit
buffer, and the backward pass that retraces it.

The backward pass starts from the final fixed-point weights and velocities and, for
t = T-1 .. 0, undoes step t exactly (:mod:`bilevel.unroll.fixed_point_arithmetic`), recomputing the
inner gradient at the recovered weights with a graph; the float SGD step
(``optimizer.step``, the differentiable one every mode uses) at those weights and
velocities then gives the vector-Jacobian product that moves the adjoints of the weights
and velocities one step back and adds step t's share to the hyperparameters' gradients
(Hessian-vector products of the inner loss included). At the end it checks that the
initial weights, velocities and the empty buffer were recovered bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from bilevel._tree import tree_flatten
from bilevel.optim.base import HParams, Optimizer, State
from bilevel.unroll.bitbuffer import BitBuffer, lower_bound
from bilevel.unroll.explicit import Explicit
from bilevel.unroll.fixed_point_arithmetic import (
    QuantisedSGD,
    Trajectory,
    forward_step,
    out_of_range,
    undo_velocities,
    undo_weights,
)
from bilevel.unroll.loop import Run
from bilevel.unroll.result import ReversibleReport
from bilevel.unroll.step import call_loss, check_loss


@dataclass(frozen=True)
class Plan:
    """A reversible unroll's non-tensor inputs."""

    run: Run
    sgd: QuantisedSGD
    explicit: Explicit
    names: list[str]
    start: State
    stores_batches: bool


@dataclass
class Record:
    """What the forward pass leaves for the result and the backward pass."""

    trajectory: Trajectory
    losses: list[Tensor] = field(default_factory=list)
    used: list[list[str]] = field(default_factory=list)
    batches: list[Any] = field(default_factory=list)
    report: ReversibleReport | None = None


def start(plan: Plan, params: dict[str, Tensor]) -> Trajectory:
    """The fixed-point start: the params and the state's velocities on the grid, and an
    empty buffer sized for T steps."""
    grid, ratio, layout = plan.sgd.grid, plan.sgd.momentum, plan.sgd.layout
    counts = dict(plan.start.get("param_steps") or dict.fromkeys(params, plan.start["step"]))
    n, d = ratio.numerator, ratio.denominator
    # the bits held at any time: log2(d/n) per step, plus what the floors can add (under
    # 3·d/L per step: pushes start from x >= L/d, refills from x >= L/n), plus a push of
    # log2(d) not yet followed by its pop
    per_step = math.log2(d / n) + 4 * d / lower_bound((n, d))
    bits = plan.run.steps * per_step + math.log2(d) + 1
    w = initial_weights(plan, params)
    v = initial_velocity(plan)
    buffer = BitBuffer(w.numel(), (ratio.numerator, ratio.denominator), bits, layout.device)
    velocity = plan.start.get("momentum_buffer") or {}
    given = [grid.to_int(x.detach()) for x in velocity.values() if isinstance(x, Tensor)]
    return Trajectory(w, v, counts, buffer, [out_of_range(w, *given)])


def initial_weights(plan: Plan, params: Mapping[str, Tensor]) -> Tensor:
    """The params on the grid, end to end."""
    ints = {k: plan.sgd.grid.to_int(p.detach()) for k, p in params.items()}
    return plan.sgd.layout.join(ints, torch.int64)


def initial_velocity(plan: Plan) -> Tensor:
    """The velocities the parameters start from on the grid, end to end: zero before a
    parameter's first update (which replaces it, as in torch)."""
    counts: dict[str, int] = plan.start.get("param_steps") or {}
    velocity = plan.start.get("momentum_buffer") or {}
    ints: dict[str, Tensor | None] = {}
    for k in plan.names:
        count: int = counts.get(k, plan.start["step"]) or 0
        given = velocity.get(k)
        ints[k] = plan.sgd.grid.to_int(given.detach()) if count > 0 and given is not None else None
    return plan.sgd.layout.join(ints, torch.int64)


def trace(plan: Plan, record: Record) -> None:
    """The forward pass: T fixed-point steps, the buffers filled, the report written."""
    run, traj = plan.run, record.trajectory
    first_index = plan.start["step"]
    for t in range(run.steps):
        batch = run.batch_at(t)
        if plan.stores_batches:
            record.batches.append(batch)
        loss, used = forward_step(plan.sgd, traj, batch, first_index + t, t)
        record.losses.append(loss)
        record.used.append(used)
        run.checker(record.losses, t + 1)
    buffer = traj.buffer
    flags = torch.stack(traj.flags)  # [the start, step 0, step 1, ...]
    bad, first_bad, overflowed, payload_bits = torch.stack(
        [
            flags.any().double(),
            flags.double().argmax().double() - 1,
            buffer.overflowed.double(),
            buffer.payload_bits(),
        ]
    ).tolist()  # the one synchronisation of the forward pass
    radix = plan.sgd.grid.radix_bits
    if bad:
        where = "at the start" if first_bad < 0 else f"at step {int(first_bad)}"
        raise OverflowError(
            f"mode='reversible': a weight, velocity or update {where} is not "
            f"finite or outside the fixed-point range ±2**{62 - radix} (radix_bits={radix}); "
            "pass a smaller radix_bits, or lower the learning rate if the run diverges"
        )
    if overflowed:  # unreachable by the table's size bound: a guard, not a code path
        raise RuntimeError("mode='reversible': the bit buffer's spill table overflowed")
    ratio = plan.sgd.momentum
    weights = buffer.numel
    buffer_bytes = buffer.nbytes
    batch_bytes = sum(
        x.numel() * x.element_size()
        for x in tree_flatten(record.batches)[0]
        if isinstance(x, Tensor)
    )
    record.report = ReversibleReport(
        momentum=ratio,
        radix_bits=radix,
        weights=weights,
        steps=run.steps,
        bits_per_weight_step=payload_bits / (weights * run.steps),
        expected_bits_per_weight_step=math.log2(ratio.denominator / ratio.numerator),
        buffer_bytes=buffer_bytes,
        saved_bytes=buffer_bytes + 16 * weights + batch_bytes,
    )


def outputs(plan: Plan, traj: Trajectory) -> tuple[Tensor, ...]:
    """The final weights, then the final velocities, as floats in the params' dtypes."""
    w, v = plan.sgd.floats(traj.w), plan.sgd.floats(traj.v)
    return (*w.values(), *v.values())


class ReversibleUnroll(torch.autograd.Function):
    """The forward pass without a graph; the backward pass retraces it exactly.

    Inputs after ``plan`` and ``record``: the initial params, then the differentiable
    hyperparameters (``plan.explicit.hyper``). Outputs: final params, final velocities.
    """

    @staticmethod
    def forward(ctx: Any, plan: Plan, record: Record, *inputs: Tensor) -> Any:  # type: ignore[override]
        trace(plan, record)
        traj = record.trajectory
        ctx.plan, ctx.record, ctx.counts = plan, record, dict(traj.counts)
        ctx.save_for_backward(*inputs, traj.w, traj.v, *traj.buffer.tensors)
        return outputs(plan, traj)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_outputs: Tensor | None) -> Any:  # type: ignore[override]
        plan: Plan = ctx.plan
        record: Record = ctx.record
        n_p, n_h = len(plan.names), len(plan.explicit.hyper)
        saved = list(ctx.saved_tensors)
        params0, hyper = saved[:n_p], saved[n_p : n_p + n_h]
        w_end, v_end, *tables = saved[n_p + n_h :]
        buffer = record.trajectory.buffer.with_tensors(*tables)
        traj = Trajectory(w_end, v_end, dict(ctx.counts), buffer)
        w_bar = {
            k: torch.zeros_like(p) if g is None else g
            for k, p, g in zip(plan.names, params0, grad_outputs[:n_p])
        }
        v_bar = {
            k: torch.zeros_like(p) if g is None else g
            for k, p, g in zip(plan.names, params0, grad_outputs[n_p:])
        }
        live = [h.detach().requires_grad_() for h in hyper]
        with torch.enable_grad():  # backward runs without grad mode
            hp, opt = _float_problem(plan, live)
        h_bar: list[Tensor | None] = [None] * n_h
        for t in reversed(range(plan.run.steps)):
            batch = record.batches[t] if plan.stores_batches else plan.run.batch_at(t)
            step = _Step(plan, traj, batch, t, record.used[t])
            w_bar, v_bar, shares = step.vjp(hp, opt, live, w_bar, v_bar)
            h_bar = [a if b is None else b if a is None else a + b for a, b in zip(h_bar, shares)]
        _check_recovered(plan, traj, params0)
        grads_p = [
            w_bar[k] if need else None for k, need in zip(plan.names, ctx.needs_input_grad[2:])
        ]
        return (None, None, *grads_p, *h_bar)


@dataclass(frozen=True)
class _Step:
    """Step ``t`` of the backward pass."""

    plan: Plan
    traj: Trajectory
    batch: Any
    t: int
    used: list[str]

    def vjp(
        self,
        hp: HParams,
        opt: Optimizer,
        live: list[Tensor],
        w_bar: dict[str, Tensor],
        v_bar: dict[str, Tensor],
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], list[Tensor | None]]:
        """Undo the step in place on the trajectory; the adjoints one step back and this
        step's share of the hyperparameters' gradients."""
        plan, traj, sgd = self.plan, self.traj, self.plan.sgd
        index = plan.start["step"] + self.t
        undo_weights(sgd, traj, index, self.used)
        names = plan.names
        with torch.enable_grad():
            w = {k: x.requires_grad_() for k, x in sgd.floats(traj.w).items()}
            loss = call_loss(plan.run.inner.inner_loss, w, hp, self.batch, None)
            check_loss(loss, self.t)
            grads = dict(
                zip(
                    names,
                    torch.autograd.grad(
                        loss, list(w.values()), create_graph=True, allow_unused=True
                    ),
                )
            )
            undo_velocities(sgd, traj, index, self.used, w, grads)
            v = {k: x.requires_grad_() for k, x in sgd.floats(traj.v).items()}
            state = {"step": index, "param_steps": dict(traj.counts), "momentum_buffer": v}
            new_p, new_s = opt.step(w, grads, state, hp)
            outs = [new_p[k] for k in names] + [new_s["momentum_buffer"][k] for k in names]
            bars = [w_bar[k] for k in names] + [v_bar[k] for k in names]
            inputs = [*w.values(), *v.values(), *live]
            pairs = [(o, b) for o, b in zip(outs, bars) if o.requires_grad]
            got = torch.autograd.grad(
                [o for o, _ in pairs], inputs, [b for _, b in pairs], allow_unused=True
            )
        n_p = len(names)
        zero = {k: torch.zeros_like(w_bar[k]) for k in names}
        new_w_bar = {k: zero[k] if g is None else g for k, g in zip(names, got[:n_p])}
        new_v_bar = {k: zero[k] if g is None else g for k, g in zip(names, got[n_p : 2 * n_p])}
        return new_w_bar, new_v_bar, list(got[2 * n_p :])


def _float_problem(plan: Plan, live: list[Tensor]) -> tuple[HParams, Optimizer]:
    """The float problem the backward pass differentiates: the hyperparameters replaced by
    ``live`` leaves, the momentum by its ratio ``n/d`` (through a tensor requiring grad,
    its gradient reaches that tensor)."""
    hp, opt = plan.explicit.substitute(live)
    ratio = float(plan.sgd.momentum)
    raw = plan.sgd.optimizer.raw("momentum", plan.sgd.hparams)
    value: Any = ratio
    for h, leaf in zip(live, plan.explicit.hyper):
        if leaf is raw:
            value = h + (ratio - h).detach()
    if opt.settings.get("momentum") is not None:
        return hp, opt.replace(momentum=value)
    return {**hp, "momentum": value}, opt


def _check_recovered(plan: Plan, traj: Trajectory, params0: list[Tensor]) -> None:
    """One synchronisation: the start recovered bit for bit, or the gradient is wrong."""
    start_w = initial_weights(plan, dict(zip(plan.names, params0)))
    checks = [(traj.w == start_w).all(), (traj.v == initial_velocity(plan)).all()]
    checks.append(traj.buffer.is_empty())
    recovered = bool(torch.stack(checks).all())
    if not recovered:
        raise RuntimeError(
            "mode='reversible': the backward pass did not retrace the forward trajectory bit "
            "for bit (the initial weights, velocities or buffer were not recovered), so the "
            "hypergradient would be wrong. The inner loss and the data must give the same "
            "gradient at the same weights: no dropout or other random draws, a data function "
            "that returns the same batch for the same step, no in-place change of the data "
            "before backward(), and on a GPU torch.use_deterministic_algorithms(True)"
        )
